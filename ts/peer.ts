/**
 * `Peer`: a connected peer as calls take it (`comm.peer(ip, port)`); `PeerBook`: a
 * communicator's peers, found by the host and port a call spells.
 */
import type { ExternalObject, NativePeerDecision } from '../index.js'
import type { PeerInfo, Transport } from './options'

/**
 * A peer this communicator connected to. Pass it to `writeCache` and `prepareBlocks` in
 * place of `ip, port`: the call then builds no `ip:port` key, and the engine looks
 * nothing up while the connection it was made for lasts. After a reconnect it finds the
 * new connection; with none, calls reject `ERR_NOT_CONNECTED`.
 */
export class Peer {
  /** Its address (what the host it was connected as resolved to). */
  readonly ip: string
  /** Its control-plane port. */
  readonly port: number
  /** `address:port`: how metrics, logs and `peerInfo` name it. */
  readonly key: string
  /** @internal The native handle the per-call functions take. */
  readonly native: ExternalObject<'Peer'>
  /**
   * @internal The communicator that connected it. The native handle carries that
   * communicator's engine, so only it may pass the handle on: its calls settle there.
   */
  readonly owner: object

  private constructor(ip: string, port: number, native: ExternalObject<'Peer'>, owner: object) {
    this.ip = ip
    this.port = port
    this.key = `${ip}:${port}`
    this.native = native
    this.owner = owner
  }

  /** @internal Made by the communicator that connected it (`comm.peer(ip, port)`). */
  static of(ip: string, port: number, native: ExternalObject<'Peer'>, owner: object): Peer {
    return new Peer(ip, port, native, owner)
  }
}

/**
 * The peers a communicator connected, by host (each peer's address, and every name a call
 * reached it by) and then port, as the caller spells them: no key string per call.
 */
export class PeerBook {
  private readonly byHost = new Map<string, Map<number | string, Peer>>()

  /** The peer found before under exactly this `host` and `port`, if any. */
  find(host: unknown, port: unknown): Peer | undefined {
    return this.byHost.get(host as string)?.get(port as number | string)
  }

  /** Keeps `peer` for calls by its address or by `host` (replacing an earlier connection's). */
  remember(peer: Peer, host: string): void {
    for (const name of new Set([peer.ip, host])) {
      let ports = this.byHost.get(name)
      if (!ports) this.byHost.set(name, (ports = new Map()))
      ports.set(peer.port, peer)
    }
  }

  clear(): void {
    this.byHost.clear()
  }
}

/** `peerInfo`'s answer from the engine's decision (`null`: never connected). */
export function peerInfoOf(decision: NativePeerDecision | null): PeerInfo | null {
  if (!decision) return null
  return {
    transport: decision.transport as Transport,
    reason: decision.reason,
    details: { ...decision.details },
    connected: decision.alive,
    rails: decision.rails.map((r) => ({ ...r })),
  }
}
