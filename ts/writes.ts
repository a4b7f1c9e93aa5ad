/**
 * A communicator's write path: a `writeCache`, in any of its forms, from its arguments to
 * the engine. Which peer it goes to (a name not looked up yet: once, asynchronously), the
 * checks before the engine (refusals counted here; the engine counts its own), a call id,
 * the native call and the call's Promise. (No closure or object per call: this is the hot
 * path of every layer.)
 */
import {
  type NativeCommunicator,
  writeCache as nativeWriteCache,
  writePrepared as nativeWritePrepared,
} from '../index.js'
import { type CallAbortHandle, type PendingCalls, countRefused } from './calls'
import { abortError, describeValue, fromNative, invalidArgument } from './errors'
import type { Hosts } from './hosts'
import { type BlockIds, type WriteOptions, checkSignal, toBlockIds, toIntegrity, toOptions, toTimeout } from './options'
import { Peer, type PeerBook } from './peer'
import { PreparedBlocks } from './prepared'
import type { Names } from './registry/names'
import { encodeTag } from './tags'

/** The options of a `writeCache` given none (shared: no object per call). */
const NO_OPTIONS: WriteOptions = Object.freeze({})

/** What the write path takes from its communicator. */
export interface WriteContext {
  /** The communicator: the owner of the peers it connected (`Peer.owner`). */
  owner: object
  /** Throws the start error once the start failed, else `ERR_CLOSED` once closed. */
  checkOpen: () => void
  /** The peer connected as `ip:port` (`comm.peer`). */
  peer: (ip: string, port: number | string) => Peer
  native: NativeCommunicator
  /** The calls the engine has not settled yet. */
  calls: PendingCalls
  peers: PeerBook
  hosts: Hosts
  names: Names
  /** The default timeout (the `writeTimeoutMs` option; undefined: none). */
  writeTimeoutMs: number | undefined
  /** The default `checksum` / `delivery` of calls (integrity bits). */
  integrity: number
}

export class Writes {
  constructor(private readonly context: WriteContext) {}

  /** `writeCache` in any of its forms (the communicator's overloads say which). */
  write(
    peerOrIp: Peer | string,
    a: number | string | BlockIds | PreparedBlocks,
    b?: BlockIds | PreparedBlocks | number,
    c?: BlockIds | number | WriteOptions,
    d?: number | WriteOptions,
    e?: WriteOptions,
  ): Promise<void> {
    const { context } = this
    if (typeof peerOrIp === 'string' && (Array.isArray(a) || ArrayBuffer.isView(a) || a instanceof PreparedBlocks)) {
      try {
        context.checkOpen()
        peerOrIp = context.names.peer(peerOrIp)
      } catch (error) {
        countRefused(context.native, peerOrIp as string, error)
        return Promise.reject(error)
      }
    }
    if (peerOrIp instanceof Peer) {
      return a instanceof PreparedBlocks
        ? this.submit(peerOrIp, a, undefined, b as number, c as WriteOptions | undefined)
        : this.submit(peerOrIp, a as BlockIds, b as BlockIds, c as number, d as WriteOptions | undefined)
    }
    const peer = context.peers.find(peerOrIp, a)
    if (!peer && typeof peerOrIp === 'string' && peerOrIp !== '' && context.hosts.known(peerOrIp) === undefined) {
      // A name not looked up yet: once (asynchronously), then as any other call. One that
      // does not resolve stays unknown, and the call reports it not connected.
      return context.hosts
        .lookup(peerOrIp)
        .catch(() => undefined)
        .then(() => this.writeByHost(peerOrIp, a, b, c, d, e))
    }
    return this.writeByHost(peerOrIp, a, b, c, d, e, peer)
  }

  /** `writeCache(ip, port, …)` once `ip` needs no lookup (`peer`: already found). */
  private writeByHost(
    host: string,
    a: number | string | BlockIds | PreparedBlocks,
    b?: BlockIds | PreparedBlocks | number,
    c?: BlockIds | number | WriteOptions,
    d?: number | WriteOptions,
    e?: WriteOptions,
    peer?: Peer,
  ): Promise<void> {
    const { context } = this
    try {
      context.checkOpen()
      peer ??= context.peer(host, a as number | string)
    } catch (error) {
      countRefused(context.native, `${context.hosts.known(String(host)) ?? String(host)}:${String(a)}`, error)
      return Promise.reject(error)
    }
    return b instanceof PreparedBlocks
      ? this.submit(peer, b, undefined, c as number, d as WriteOptions | undefined)
      : this.submit(peer, b as BlockIds, c as BlockIds, d as number, e)
  }

  /**
   * What every `writeCache` form shares: the checks before the engine (the ids' form, the
   * layer's type, the tag, the timeout, the signal; refusals counted here, the engine
   * counts its own), a call id, the native call and the call's Promise. `remoteBlockIds`
   * is undefined for a prepared list.
   */
  private submit(
    peer: Peer,
    blocks: BlockIds | PreparedBlocks,
    remoteBlockIds: BlockIds | undefined,
    layerIdx: number,
    options: WriteOptions = NO_OPTIONS,
  ): Promise<void> {
    const { context } = this
    let local: ReturnType<typeof toBlockIds> | undefined
    let remote: ReturnType<typeof toBlockIds> | undefined
    let tag: Buffer | undefined
    let timeoutMs: number | undefined
    let signal: AbortSignal | undefined
    let integrity = context.integrity
    try {
      context.checkOpen()
      this.own(peer)
      if (!(blocks instanceof PreparedBlocks)) {
        local = toBlockIds('localBlockIds', blocks)
        remote = toBlockIds('remoteBlockIds', remoteBlockIds as BlockIds)
      }
      if (typeof layerIdx !== 'number')
        throw invalidArgument('layerIdx', `expected a number, got ${describeValue(layerIdx)}`)
      if (options !== NO_OPTIONS) toOptions('options', options)
      tag = options.tag === undefined ? undefined : encodeTag(options.tag)
      timeoutMs = options.timeoutMs === undefined ? context.writeTimeoutMs : toTimeout('timeoutMs', options.timeoutMs)
      signal = checkSignal('signal', options.signal)
      integrity = toIntegrity(options.checksum, options.delivery, integrity)
      if (signal?.aborted) throw abortError(`writeCache to ${peer.key}`)
    } catch (error) {
      countRefused(context.native, peer.key, error)
      return Promise.reject(error)
    }
    const callId = context.calls.nextId()
    // With a signal, the engine hands out the call's abort (none is made otherwise).
    const abortable = signal !== undefined || undefined
    const rest = [layerIdx, tag, timeoutMs, abortable, integrity] as const
    let abort: CallAbortHandle | null
    try {
      abort =
        local === undefined
          ? nativeWritePrepared(peer.native, callId, (blocks as PreparedBlocks).list, ...rest)
          : nativeWriteCache(peer.native, callId, local, remote!, ...rest)
    } catch (error) {
      return Promise.reject(fromNative(error))
    }
    return context.calls.track(callId, signal, abort)
  }

  /**
   * `peer`, when this communicator connected it. The engine refuses another engine's
   * handle in the same words; here it must be caught first, because the native handle
   * would run the call on the communicator that made it.
   */
  own(peer: Peer): Peer {
    if (peer.owner === this.context.owner) return peer
    throw invalidArgument(
      'peer',
      `the handle on ${peer.key} belongs to another communicator; use the one its connect returned`,
    )
  }
}
