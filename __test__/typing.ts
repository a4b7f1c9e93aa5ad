/**
 * Compile-time checks of the shipped types (lib/*.d.ts): `tsc -p __test__/tsconfig.json`
 * (`npm run typecheck`, scripts/test-all.sh) fails unless every line under a
 * `@ts-expect-error` is a type error ("Unused '@ts-expect-error' directive"), and unless
 * every other line compiles. Nothing here runs (ava runs *.spec.ts only).
 */
import {
  type CommunicatorEvents,
  type CommunicatorOptions,
  type KvTransferErrorCode,
  Peer,
  type PeerLeft,
  type PreparedBlocks,
  RDMACommunicator,
} from '../lib/index.js'

/** The events are typed: their names, their listeners' arguments, `emit`'s payload. */
export function typedEvents(comm: RDMACommunicator): void {
  comm.on('arrival', (arrival) => {
    const layer: number = arrival.layerIdx
    const tag: bigint | string = arrival.tag
    void [layer, tag]
  })
  comm.once('peer-left', (left) => {
    const code: KvTransferErrorCode = left.code
    const who: string = left.peer
    const why: string = left.reason
    void [code, who, why]
  })
  // Chaining keeps the communicator's type.
  comm.off('arrival', () => undefined).prependListener('peer-left', (left: PeerLeft) => void left)
  const listener: CommunicatorEvents['arrival'] = () => undefined
  comm.addListener('arrival', listener).removeListener('arrival', listener)
  const count: number = comm.listenerCount('peer-left')
  void count

  // @ts-expect-error a misspelt event name
  comm.on('arival', () => undefined)
  // @ts-expect-error an event that does not exist
  comm.once('connected', () => undefined)
  // @ts-expect-error a listener that expects a field of the wrong type
  comm.on('arrival', (arrival: { layerIdx: string }) => void arrival)
  // @ts-expect-error a field that does not exist
  comm.on('arrival', (arrival) => void arrival.layer)
  // @ts-expect-error peer-left's code is an error code, not a number
  comm.on('peer-left', (left: { code: number }) => void left)
  // @ts-expect-error one event's listener given for another
  comm.on('peer-left', listener)
  // @ts-expect-error emit checks the payload as well
  comm.emit('arrival', { peer: 'p', tag: 1n, layerIdx: '0', blocks: 1 })
  // @ts-expect-error and the name
  comm.removeAllListeners('arival')
}

/** `await using` closes it (Symbol.asyncDispose). */
export async function disposable(options: CommunicatorOptions): Promise<void> {
  await using comm = await RDMACommunicator.create(options)
  const closing: Promise<void> = comm[Symbol.asyncDispose]()
  void closing
}

/** What is internal is not in the shipped types (stripInternal, private constructors). */
export function internals(peer: Peer, prepared: PreparedBlocks): void {
  const key: string = peer.key
  void key
  // @ts-expect-error the native handle of a peer
  void peer.native
  // @ts-expect-error the communicator that connected it
  void peer.owner
  // @ts-expect-error the native handle of a prepared list
  void prepared.list
  // @ts-expect-error a Peer comes from comm.peer(), never from its constructor
  void new Peer()
  // @ts-expect-error nor from an internal factory
  void Peer.of
}
