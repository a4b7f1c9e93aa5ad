/**
 * kvtransfer: KV-cache transfer between prefill and decode communicators.
 *
 * @packageDocumentation
 */
import { EventEmitter } from 'node:events'
import * as os from 'node:os'
import { NativeCommunicator, ArrivalNotice } from '../index.js'
import { ControlServer, exchange } from './control'
import { type Expiry, withDeadline } from './deadline'
import { KvTransferError, fromNative, invalidArgument, native, nativeAsync } from './errors'

export { KvTransferError } from './errors'
export type { KvTransferErrorCode } from './errors'

/** Which side of disaggregated serving a communicator plays. */
export type Role = 'prefill' | 'decode'
/** `'auto'` picks RDMA when a usable RDMA port exists on both sides, else TCP. */
export type Transport = 'auto' | 'rdma' | 'tcp'
/**
 * One layer's key or value region of `blockNumber × blockBytes` bytes: a native or device
 * address as a bigint (owned by the caller, who keeps it valid until `close()`), or a
 * JavaScript buffer (kept alive by the communicator until `close()`).
 */
export type CacheRegion = bigint | ArrayBufferView | ArrayBuffer
/** Block ids: typed arrays pass to the engine without copying. */
export type BlockIds = readonly number[] | Int32Array | Uint32Array
/** A request tag attached to a write: a u64 as bigint, or a short string (≤ 254 bytes). */
export type RequestTag = bigint | string

/** Options of {@link RDMACommunicator}. */
export interface CommunicatorOptions {
  /** `'prefill'` (writes blocks to peers) or `'decode'` (receives them). */
  role: Role
  /** GPU index; also selects the RDMA NIC by modulo over `KVCACHE_RDMA_NICS`. */
  gpuIdx: number
  /** Control-plane port this communicator listens on (0: any free port, see `port`). */
  port: number | string
  /** One region per layer. */
  localKeyCache: CacheRegion[]
  /** One region per layer, or `[]` for key-only caches (e.g. MLA). */
  localValueCache: CacheRegion[]
  /** Number of blocks in every region (block ids are `0..blockNumber-1`). */
  blockNumber: number
  /** Bytes per block; each region is `blockNumber × blockBytes` bytes. Must match the peer's. */
  blockBytes: number
  /** Default: `KVCACHE_TRANSPORT`, else `'auto'`. */
  transport?: Transport
  /** Address the control plane binds to (default: all interfaces). */
  host?: string
  /** Name reported to peers in arrival notices (default `hostname:port`). */
  name?: string
  /**
   * Default timeout of `connect` in milliseconds (default 30000); also bounds how long the
   * engine waits for the data connection to open.
   */
  connectTimeoutMs?: number
  /**
   * Default timeout of `writeCache` in milliseconds (default 30000; 0: none). A call that
   * times out tears the connection to its peer down before it rejects with `ERR_TIMEOUT`.
   */
  writeTimeoutMs?: number
  /**
   * Shared secret of the connection handshake (default: `KVCACHE_AUTH_TOKEN`; `''`: none).
   * Both sides must have the same token, or neither; see README "Security".
   */
  authToken?: string
  /** Most arrival notices kept for tags nobody waits for yet (default 65536). */
  maxPendingArrivals?: number
}

/** Options of {@link RDMACommunicator.connect}. */
export interface ConnectOptions {
  /** How long to wait for the peer to answer (it may start later). */
  timeoutMs?: number
  /** Aborts the attempt; the promise rejects with `ERR_ABORTED`. */
  signal?: AbortSignal
}

/** Options of {@link RDMACommunicator.writeCache}. */
export interface WriteOptions {
  /** Tag the call: the receiving side gets an `'arrival'` event after all its bytes landed. */
  tag?: RequestTag
  /**
   * Milliseconds until the call fails with `ERR_TIMEOUT` (default: the communicator's
   * `writeTimeoutMs`, 30000; 0: none). Before it rejects, the connection to the peer is
   * torn down, so none of its bytes can land later; other pending calls to that peer fail
   * with `ERR_PEER_DISCONNECTED`; `connect` again to continue.
   */
  timeoutMs?: number
  /**
   * Aborting tears the connection to the peer down (as a timeout does) and rejects this
   * call and every other pending call to that peer with `ERR_ABORTED`.
   */
  signal?: AbortSignal
}

/** Options of {@link RDMACommunicator.close}. */
export interface CloseOptions {
  /** Reject with `ERR_TIMEOUT` when the teardown takes longer (it still completes). */
  timeoutMs?: number
  /** Reject with `ERR_ABORTED` on abort (the teardown still completes). */
  signal?: AbortSignal
}

/** Live native resources (leak checks). */
export interface CommunicatorStats {
  peers: number
  liveLinks: number
  tcpReceivers: number
  registeredRegions: number
  rememberedHellos: number
  timedCalls: number
  processThreads: number
}

/** Delivered on the receiving side after every byte of a tagged call is in its memory. */
export interface Arrival {
  /** The writer's name (its `name` option). */
  peer: string
  /** The tag the writer passed to `writeCache` (a bigint stays a bigint). */
  tag: RequestTag
  /** The layer the call wrote. */
  layerIdx: number
  /** Number of blocks written by the call. */
  blocks: number
}

/** Options of {@link RDMACommunicator.waitForArrival}. */
export interface WaitOptions {
  /** Layers to wait for (default: `[0]`). A number `n` means layers `0..n-1`. */
  layers?: number | readonly number[]
  /** Rejects with `ERR_TIMEOUT` after this many milliseconds (default: wait forever). */
  timeoutMs?: number
  /** Aborts the wait; the promise rejects with `ERR_ABORTED`. */
  signal?: AbortSignal
}

const TAG_BIGINT = 0
const TAG_STRING = 1
const MAX_TAG_STRING_BYTES = 254

function encodeTag(tag: RequestTag): Buffer {
  if (typeof tag === 'bigint') {
    if (tag < 0n || tag > 0xffff_ffff_ffff_ffffn) throw invalidArgument('tag', `${tag} is not a u64 (0..2^64-1)`)
    const out = Buffer.alloc(9)
    out[0] = TAG_BIGINT
    out.writeBigUInt64LE(tag, 1)
    return out
  }
  if (typeof tag === 'string') {
    const bytes = Buffer.from(tag, 'utf8')
    if (bytes.length > MAX_TAG_STRING_BYTES) {
      throw invalidArgument('tag', `'${tag.slice(0, 16)}…' is ${bytes.length} bytes; at most ${MAX_TAG_STRING_BYTES}`)
    }
    return Buffer.concat([Buffer.from([TAG_STRING]), bytes])
  }
  throw invalidArgument('tag', `expected a bigint or a string, got ${typeof tag}`)
}

function decodeTag(bytes: Buffer): RequestTag {
  if (bytes[0] === TAG_BIGINT && bytes.length === 9) return bytes.readBigUInt64LE(1)
  return bytes.subarray(1).toString('utf8')
}

function tagKey(tag: RequestTag): string {
  return typeof tag === 'bigint' ? `n:${tag}` : `s:${tag}`
}

function toRegion(name: string, index: number, region: unknown): bigint | Uint8Array {
  if (typeof region === 'bigint') return region
  if (region instanceof ArrayBuffer || region instanceof SharedArrayBuffer) return new Uint8Array(region)
  if (ArrayBuffer.isView(region)) return new Uint8Array(region.buffer, region.byteOffset, region.byteLength)
  throw invalidArgument(name, `region ${index} must be a bigint address, an ArrayBuffer or a typed array; got ${typeof region}`)
}

function toBlockIds(name: string, ids: unknown): Uint32Array | Int32Array | Float64Array {
  if (ids instanceof Uint32Array || ids instanceof Int32Array) return ids
  if (Array.isArray(ids)) return numbersToFloat64(ids)
  throw invalidArgument(name, `expected number[], Int32Array or Uint32Array; got ${ids === null ? 'null' : typeof ids}`)
}

/** Copies a plain array for the native side; a non-number becomes NaN, which the engine
 *  refuses naming its index (no coercion of "3" or null). A plain loop: `Float64Array.from`
 *  with a mapping callback cost ~45 ns per id. */
function numbersToFloat64(ids: unknown[]): Float64Array {
  const out = new Float64Array(ids.length)
  for (let i = 0; i < ids.length; i++) {
    const value = ids[i]
    out[i] = typeof value === 'number' ? value : Number.NaN
  }
  return out
}

function toPort(name: string, port: unknown): number {
  const value = typeof port === 'string' && port.trim() !== '' ? Number(port) : port
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > 65535) {
    throw invalidArgument(name, `${JSON.stringify(port)} is not a port number in 0..65535`)
  }
  return value
}

/** A timeout: a number of milliseconds in 0..2^31-1 (what Node's timers take). */
function checkMilliseconds(name: string, value: unknown): number {
  if (typeof value !== 'number' || !(value >= 0 && value <= 0x7fff_ffff)) {
    throw invalidArgument(name, `${String(value)} is not a number of milliseconds in 0..${0x7fff_ffff}`)
  }
  return value
}

function checkNonNegativeInteger(name: string, value: unknown, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > max) {
    throw invalidArgument(name, `${String(value)} is not an integer in 0..${max}`)
  }
  return value
}

/**
 * The control plane listens on `KVCACHE_SOCKET_IFNAME`'s address when set (ZeroMQ takes an
 * interface name in place of an address), else on all interfaces.
 */
function defaultControlHost(): string {
  const ifname = process.env.KVCACHE_SOCKET_IFNAME?.trim()
  return ifname ? ifname : '0.0.0.0'
}

function abortError(what: string): KvTransferError {
  return new KvTransferError('ERR_ABORTED', `${what} was aborted`)
}

/** A `writeCache` call handed to the engine, settled by `onCallSettled`. */
interface PendingCall {
  resolve: () => void
  reject: (error: KvTransferError) => void
}

/** Never fires in practice: the interval only holds the event loop open while referenced. */
const KEEP_ALIVE_INTERVAL_MS = 0x7fff_ffff

function keepAliveTick(): void {}

interface Waiter {
  layers: Set<number>
  resolve: (arrivals: Arrival[]) => void
  reject: (error: KvTransferError) => void
}

/**
 * A KV-cache communicator (the seed's `RDMACommunicator`), usable as prefill (writer) or
 * decode (receiver). Every communicator listens on its `port`; a writer `connect`s to the
 * receiver and then pushes blocks with `writeCache`.
 *
 * Events: `'arrival'` ({@link Arrival}) on the receiving side for every tagged call.
 */
export class RDMACommunicator extends EventEmitter {
  /** The side this communicator plays (the `role` option). */
  readonly role: Role
  /** The `gpuIdx` option. */
  readonly gpuIdx: number
  /** Number of blocks in every local region. */
  readonly blockNumber: number
  /** Bytes per block. */
  readonly blockBytes: number
  /** Resolves once the control plane listens; rejects with why it cannot. */
  readonly ready: Promise<void>
  private readonly native: NativeCommunicator
  private readonly control: ControlServer
  private readonly connectTimeoutMs: number
  private readonly writeTimeoutMs: number
  private readonly maxPendingArrivals: number
  private readonly arrived = new Map<string, Arrival[]>()
  private arrivedCount = 0
  private readonly waiters = new Map<string, Set<Waiter>>()
  private readonly pendingCalls = new Map<number, PendingCall>()
  /**
   * Data connections that a `connect` gave up on at its deadline while the engine was still
   * opening them: each settles once that attempt ended and, if it opened, was torn down. A
   * later `connect` to the same peer waits for it first.
   */
  private readonly abandoned = new Map<string, Promise<void>>()
  private nextCallId = 0
  private lastPeerKey: { ip: string; port: number | string; key: string } | undefined
  /**
   * Referenced exactly while `writeCache` calls are pending: the native function that
   * settles them is weak (shared by all calls), so an idle communicator lets the process
   * exit while a pending call keeps it running.
   */
  private readonly keepAlive: NodeJS.Timeout
  private boundPort: number
  private closing: Promise<void> | undefined

  /** The seed's positional form: `(role, gpuIdx, port, localKeyCache, localValueCache, blockNumber, blockBytes)`. */
  constructor(
    role: Role,
    gpuIdx: number,
    port: number | string,
    localKeyCache: CacheRegion[],
    localValueCache: CacheRegion[],
    blockNumber: number,
    blockBytes: number,
    extra?: Partial<CommunicatorOptions>,
  )
  /**
   * Creates a communicator and starts listening on `options.port` (await `ready`).
   * Throws a {@link KvTransferError} (`ERR_INVALID_ARGUMENT`, ...) for invalid options.
   */
  constructor(options: CommunicatorOptions)
  constructor(...args: unknown[]) {
    super()
    const options: CommunicatorOptions =
      typeof args[0] === 'object' && args[0] !== null
        ? (args[0] as CommunicatorOptions)
        : {
            ...(args[7] as Partial<CommunicatorOptions> | undefined),
            role: args[0] as Role,
            gpuIdx: args[1] as number,
            port: args[2] as number | string,
            localKeyCache: args[3] as CacheRegion[],
            localValueCache: args[4] as CacheRegion[],
            blockNumber: args[5] as number,
            blockBytes: args[6] as number,
          }
    if (options.role !== 'prefill' && options.role !== 'decode') {
      throw invalidArgument('role', `${JSON.stringify(options.role)} is not 'prefill' or 'decode'`)
    }
    const port = toPort('port', options.port)
    this.role = options.role
    this.gpuIdx = checkNonNegativeInteger('gpuIdx', options.gpuIdx, 0xffff_ffff)
    this.blockNumber = checkNonNegativeInteger('blockNumber', options.blockNumber, 0xffff_ffff)
    this.blockBytes = checkNonNegativeInteger('blockBytes', options.blockBytes, Number.MAX_SAFE_INTEGER)
    if (!Array.isArray(options.localKeyCache)) throw invalidArgument('localKeyCache', 'expected an array of regions')
    if (!Array.isArray(options.localValueCache)) throw invalidArgument('localValueCache', 'expected an array of regions ([] for key-only)')
    this.connectTimeoutMs = checkMilliseconds('connectTimeoutMs', options.connectTimeoutMs ?? 30_000)
    this.writeTimeoutMs = checkNonNegativeInteger('writeTimeoutMs', options.writeTimeoutMs ?? 30_000, 0x7fff_ffff)
    this.maxPendingArrivals = options.maxPendingArrivals ?? 65_536
    this.boundPort = port
    this.native = native(
      () =>
        new NativeCommunicator(
          {
            role: options.role,
            gpuIdx: this.gpuIdx,
            name: options.name ?? `${os.hostname()}:${port}`,
            localKeyCache: options.localKeyCache.map((r, i) => toRegion('localKeyCache', i, r)),
            localValueCache: options.localValueCache.map((r, i) => toRegion('localValueCache', i, r)),
            blockNumber: this.blockNumber,
            blockBytes: this.blockBytes,
            transport: options.transport,
            // The engine's bound on opening the data connection (a whole millisecond, at least 1).
            connectTimeoutMs: Math.max(1, Math.ceil(this.connectTimeoutMs)),
            authToken: options.authToken,
          },
          (callId, error) => this.onCallSettled(callId, error),
          (notice) => this.onArrival(notice),
        ),
    )
    this.keepAlive = setInterval(keepAliveTick, KEEP_ALIVE_INTERVAL_MS).unref()
    this.control = new ControlServer(options.host ?? defaultControlHost(), port, {
      challenge: (challenge) => native(() => this.native.authRespond(challenge)),
      hello: (hello) => native(() => this.native.accept(hello)),
    })
    this.ready = this.control.ready.then((bound) => {
      this.boundPort = bound
    })
    this.ready.catch(() => undefined)
  }

  /** The control-plane port (the bound one when constructed with port 0). */
  get port(): number {
    return this.boundPort
  }

  /** `'tcp'` or `'rdma'`: the transport this side offers. */
  get transport(): 'tcp' | 'rdma' {
    return this.native.transport as 'tcp' | 'rdma'
  }

  private checkOpen(): void {
    if (this.closing) throw new KvTransferError('ERR_CLOSED', 'the communicator is closed')
  }

  /**
   * Handshakes with the communicator listening on `ip:port` (waiting for it to start, up
   * to the timeout) and opens the data path. Resolves `true` when connected; rejects with a
   * {@link KvTransferError} saying why not (timeout, layout mismatch, refused, ...).
   */
  async connect(ip: string, port: number | string, options: ConnectOptions = {}): Promise<boolean> {
    this.checkOpen()
    const peerPort = toPort('port', port)
    if (typeof ip !== 'string' || ip.length === 0) throw invalidArgument('ip', `${JSON.stringify(ip)} is not a host name or address`)
    await this.ready
    const timeoutMs = options.timeoutMs ?? this.connectTimeoutMs
    const started = Date.now()
    const left = () => Math.max(1, timeoutMs - (Date.now() - started))
    const key = `${ip}:${peerPort}`
    const what = `connect to ${ip}:${peerPort}`
    const deadline = () => ({ timeoutMs: left(), signal: options.signal })
    const expired = {
      timeout: (cause?: unknown) =>
        new KvTransferError('ERR_TIMEOUT', `timed out after ${timeoutMs} ms: ${what}`, { cause }),
      abort: () => abortError(what),
    }
    const earlier = this.abandoned.get(key)
    if (earlier) await withDeadline(earlier, deadline(), expired)
    // challenge → nonce (the acceptor proves the shared secret), then hello → welcome.
    const challenge = native(() => this.native.authChallenge(key))
    const response = await exchange(ip, peerPort, 'challenge', challenge, left(), options.signal, timeoutMs)
    if (options.signal?.aborted) throw abortError(what)
    const hello = native(() => this.native.hello(key, response))
    const reply = await exchange(ip, peerPort, 'hello', hello, left(), options.signal, timeoutMs)
    if (options.signal?.aborted) throw abortError(what)
    // The engine bounds opening the data path by `connectTimeoutMs`; this call's deadline
    // may end the wait earlier, and then the attempt is torn down once it ends.
    const opening = nativeAsync(this.native.finishConnect(key, ip, reply))
    const outcome = opening.catch((error: unknown) => {
      // The engine's bound and this call's deadline ended together: report the deadline.
      throw Date.now() - started >= timeoutMs ? expired.timeout(error) : error
    })
    await withDeadline(outcome, deadline(), {
      ...expired,
      abandon: (reason) => this.abandon(key, opening, reason, timeoutMs),
    })
    return true
  }

  /** Tears the data path that `opening` opens down as soon as it opened (see `abandoned`). */
  private abandon(key: string, opening: Promise<void>, reason: Expiry, timeoutMs: number): void {
    const ended: Promise<void> = opening
      .then(
        () => this.native.cancelPeer(key, reason, timeoutMs),
        () => undefined,
      )
      .then(
        () => undefined,
        () => undefined,
      )
      .finally(() => {
        if (this.abandoned.get(key) === ended) this.abandoned.delete(key)
      })
    this.abandoned.set(key, ended)
  }

  /** Whether a usable connection to `ip:port` exists. */
  isConnected(ip: string, port: number | string): boolean {
    if (this.closing) return false
    return this.native.isConnected(`${ip}:${toPort('port', port)}`)
  }

  /**
   * Writes K (and V, when present) of `localBlockIds[i]` into the peer's
   * `remoteBlockIds[i]` of layer `layerIdx`. Resolves when every byte is in the peer's
   * memory. Invalid input rejects with a typed error and nothing is written.
   */
  writeCache(
    ip: string,
    port: number | string,
    localBlockIds: BlockIds,
    remoteBlockIds: BlockIds,
    layerIdx: number,
    options: WriteOptions = {},
  ): Promise<void> {
    // Not `async`: that would add a Promise and a resolution step to every call.
    try {
      return this.startWrite(ip, port, localBlockIds, remoteBlockIds, layerIdx, options)
    } catch (error) {
      return Promise.reject(error)
    }
  }

  private startWrite(
    ip: string,
    port: number | string,
    localBlockIds: BlockIds,
    remoteBlockIds: BlockIds,
    layerIdx: number,
    options: WriteOptions,
  ): Promise<void> {
    this.checkOpen()
    const key = this.peerKey(ip, port)
    const local = toBlockIds('localBlockIds', localBlockIds)
    const remote = toBlockIds('remoteBlockIds', remoteBlockIds)
    if (typeof layerIdx !== 'number') throw invalidArgument('layerIdx', `expected a number, got ${typeof layerIdx}`)
    const tag = options.tag === undefined ? undefined : encodeTag(options.tag)
    const timeoutMs = checkNonNegativeInteger('timeoutMs', options.timeoutMs ?? this.writeTimeoutMs, 0x7fff_ffff)
    const signal = options.signal
    if (signal?.aborted) throw abortError(`writeCache to ${key}`)
    const callId = this.nextCallId
    this.nextCallId = (callId + 1) >>> 0
    native(() => this.native.writeCache(callId, key, local, remote, layerIdx, tag, timeoutMs === 0 ? undefined : timeoutMs))
    // The engine settles the call asynchronously (through the event loop), so registering
    // it after the native call returns cannot miss its outcome.
    const settled = new Promise<void>((resolve, reject) => {
      this.pendingCalls.set(callId, { resolve, reject })
    })
    if (this.pendingCalls.size === 1) this.keepAlive.ref()
    if (!signal) return settled
    // Abort: the native cancel resets the link; this call then rejects with ERR_ABORTED
    // from the engine, after the teardown.
    const onAbort = () => void this.native.cancelPeer(key, 'abort').catch(() => undefined)
    signal.addEventListener('abort', onAbort, { once: true })
    return settled.finally(() => signal.removeEventListener('abort', onAbort))
  }

  /**
   * `ip:port`, reusing the last key built: calls mostly go to one peer, and a fresh string
   * costs the binding a flatten and a conversion on every call (~0.2 µs).
   */
  private peerKey(ip: string, port: number | string): string {
    const last = this.lastPeerKey
    if (last && ip === last.ip && port === last.port) return last.key
    const key = `${ip}:${toPort('port', port)}`
    this.lastPeerKey = { ip, port, key }
    return key
  }

  /** The engine's outcome of call `callId`: `error` (with its `code`) when it failed. */
  private onCallSettled(callId: number, error?: Error | null): void {
    const call = this.pendingCalls.get(callId)
    if (!call) return
    this.pendingCalls.delete(callId)
    if (this.pendingCalls.size === 0) {
      // Closing: no call can start any more, so the keep-alive is done for good.
      if (this.closing) clearInterval(this.keepAlive)
      else this.keepAlive.unref()
    }
    if (error == null) call.resolve()
    else call.reject(fromNative(error))
  }

  /**
   * Tears the connection to `ip:port` down and rejects its pending calls with
   * `ERR_ABORTED`; resolves (with whether a connection existed) once none of their bytes
   * can land any more.
   */
  async abortPeer(ip: string, port: number | string): Promise<boolean> {
    return nativeAsync(this.native.cancelPeer(`${ip}:${toPort('port', port)}`, 'abort'))
  }

  /** Live native resources: peers, links, receiving connections, regions, threads. */
  stats(): CommunicatorStats {
    return { ...this.native.stats() }
  }

  private onArrival(notice: ArrivalNotice): void {
    const arrival: Arrival = {
      peer: notice.peer,
      tag: decodeTag(notice.tag),
      layerIdx: notice.layerIdx,
      blocks: notice.blocks,
    }
    const key = tagKey(arrival.tag)
    let list = this.arrived.get(key)
    if (!list) this.arrived.set(key, (list = []))
    list.push(arrival)
    this.arrivedCount++
    while (this.arrivedCount > this.maxPendingArrivals) {
      // Oldest tag first: Map iteration order is insertion order.
      const [oldest, entries] = this.arrived.entries().next().value as [string, Arrival[]]
      this.arrived.delete(oldest)
      this.arrivedCount -= entries.length
    }
    for (const waiter of this.waiters.get(key) ?? []) this.settle(key, waiter)
    this.emit('arrival', arrival)
  }

  private settle(key: string, waiter: Waiter): boolean {
    const list = this.arrived.get(key) ?? []
    const landed = new Set(list.map((a) => a.layerIdx))
    for (const layer of waiter.layers) if (!landed.has(layer)) return false
    this.waiters.get(key)?.delete(waiter)
    waiter.resolve(list.filter((a) => waiter.layers.has(a.layerIdx)))
    return true
  }

  /**
   * Resolves when every requested layer of `tag` has arrived (notices that came before the
   * call count too; up to `maxPendingArrivals` are kept). Rejects with `ERR_TIMEOUT` or
   * `ERR_ABORTED`.
   */
  waitForArrival(tag: RequestTag, options: WaitOptions = {}): Promise<Arrival[]> {
    this.checkOpen()
    encodeTag(tag)
    const layers = new Set<number>(
      typeof options.layers === 'number'
        ? Array.from({ length: options.layers }, (_, i) => i)
        : (options.layers ?? [0]),
    )
    const key = tagKey(tag)
    return new Promise<Arrival[]>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined
      const cleanup = () => {
        if (timer) clearTimeout(timer)
        options.signal?.removeEventListener('abort', onAbort)
        this.waiters.get(key)?.delete(waiter)
      }
      const waiter: Waiter = {
        layers,
        resolve: (arrivals) => {
          cleanup()
          resolve(arrivals)
        },
        reject: (error) => {
          cleanup()
          reject(error)
        },
      }
      const onAbort = () => waiter.reject(abortError(`waitForArrival(${String(tag)})`))
      if (options.signal?.aborted) return onAbort()
      let set = this.waiters.get(key)
      if (!set) this.waiters.set(key, (set = new Set()))
      set.add(waiter)
      if (this.settle(key, waiter)) return
      options.signal?.addEventListener('abort', onAbort, { once: true })
      if (options.timeoutMs !== undefined) {
        timer = setTimeout(() => {
          const got = new Set((this.arrived.get(key) ?? []).map((a) => a.layerIdx))
          const missing = [...layers].filter((l) => !got.has(l))
          waiter.reject(
            new KvTransferError(
              'ERR_TIMEOUT',
              `timed out after ${options.timeoutMs} ms waiting for tag ${String(tag)}: layers ${missing.join(', ')} have not arrived`,
            ),
          )
        }, options.timeoutMs)
      }
    })
  }

  /** Forgets the kept arrival notices of `tag` (call after consuming a request). */
  forgetArrivals(tag: RequestTag): void {
    const key = tagKey(tag)
    this.arrivedCount -= this.arrived.get(key)?.length ?? 0
    this.arrived.delete(key)
  }

  /**
   * Closes the control plane and every link; JS buffers are released afterwards. With a
   * timeout or signal the returned promise may reject (`ERR_TIMEOUT` / `ERR_ABORTED`)
   * before the teardown ends; the teardown still completes and the communicator is closed.
   */
  close(options: CloseOptions = {}): Promise<void> {
    const closing = this.startClose()
    if (options.timeoutMs === undefined && !options.signal) return closing
    return new Promise<void>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined
      const done = () => {
        if (timer) clearTimeout(timer)
        options.signal?.removeEventListener('abort', onAbort)
      }
      const onAbort = () => {
        done()
        reject(abortError('close'))
      }
      if (options.signal?.aborted) return onAbort()
      options.signal?.addEventListener('abort', onAbort, { once: true })
      if (options.timeoutMs !== undefined) {
        timer = setTimeout(() => {
          done()
          reject(new KvTransferError('ERR_TIMEOUT', `timed out after ${options.timeoutMs} ms: close (the teardown continues)`))
        }, options.timeoutMs)
      }
      closing.then(
        () => {
          done()
          resolve()
        },
        (error: unknown) => {
          done()
          reject(error)
        },
      )
    })
  }

  private startClose(): Promise<void> {
    if (!this.closing) {
      for (const set of this.waiters.values()) {
        for (const waiter of [...set]) waiter.reject(new KvTransferError('ERR_CLOSED', 'the communicator was closed'))
      }
      this.closing = (async () => {
        await this.control.close().catch(() => undefined)
        await nativeAsync(this.native.close())
      })()
      if (this.pendingCalls.size === 0) clearInterval(this.keepAlive)
    }
    return this.closing
  }
}

export { fromNative }
