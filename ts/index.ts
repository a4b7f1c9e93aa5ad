/**
 * kvtransfer: KV-cache transfer between prefill and decode communicators.
 *
 * @packageDocumentation
 */
import { EventEmitter } from 'node:events'
import * as os from 'node:os'
import { NativeCommunicator, ArrivalNotice } from '../index.js'
import { ControlServer, exchangeHello } from './control'
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
  role: Role
  /** GPU index; also selects the RDMA NIC by modulo over `KVCACHE_RDMA_NICS`. */
  gpuIdx: number
  /** Control-plane port this communicator listens on (0: any free port, see `port`). */
  port: number | string
  /** One region per layer. */
  localKeyCache: CacheRegion[]
  /** One region per layer, or `[]` for key-only caches (e.g. MLA). */
  localValueCache: CacheRegion[]
  blockNumber: number
  blockBytes: number
  /** Default: `KVCACHE_TRANSPORT`, else `'auto'`. */
  transport?: Transport
  /** Address the control plane binds to (default: all interfaces). */
  host?: string
  /** Name reported to peers in arrival notices (default `hostname:port`). */
  name?: string
  /** Default timeout of `connect` in milliseconds (default 30000). */
  connectTimeoutMs?: number
  /** Most arrival notices kept for tags nobody waits for yet (default 65536). */
  maxPendingArrivals?: number
}

/** Options of {@link RDMACommunicator.connect}. */
export interface ConnectOptions {
  /** How long to wait for the peer to answer (it may start later). */
  timeoutMs?: number
  signal?: AbortSignal
}

/** Options of {@link RDMACommunicator.writeCache}. */
export interface WriteOptions {
  /** Tag the call: the receiving side gets an `'arrival'` event after all its bytes landed. */
  tag?: RequestTag
}

/** Delivered on the receiving side after every byte of a tagged call is in its memory. */
export interface Arrival {
  /** The writer's name (its `name` option). */
  peer: string
  tag: RequestTag
  layerIdx: number
  /** Number of blocks written by the call. */
  blocks: number
}

/** Options of {@link RDMACommunicator.waitForArrival}. */
export interface WaitOptions {
  /** Layers to wait for (default: `[0]`). A number `n` means layers `0..n-1`. */
  layers?: number | readonly number[]
  timeoutMs?: number
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
  if (Array.isArray(ids)) return Float64Array.from(ids, (v) => (typeof v === 'number' ? v : Number.NaN))
  throw invalidArgument(name, `expected number[], Int32Array or Uint32Array; got ${ids === null ? 'null' : typeof ids}`)
}

function toPort(name: string, port: unknown): number {
  const value = typeof port === 'string' && port.trim() !== '' ? Number(port) : port
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > 65535) {
    throw invalidArgument(name, `${JSON.stringify(port)} is not a port number in 0..65535`)
  }
  return value
}

function checkNonNegativeInteger(name: string, value: unknown, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > max) {
    throw invalidArgument(name, `${String(value)} is not an integer in 0..${max}`)
  }
  return value
}

function abortError(what: string): KvTransferError {
  return new KvTransferError('ERR_ABORTED', `${what} was aborted`)
}

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
  readonly role: Role
  readonly gpuIdx: number
  readonly blockNumber: number
  readonly blockBytes: number
  /** Resolves once the control plane listens; rejects with why it cannot. */
  readonly ready: Promise<void>
  private readonly native: NativeCommunicator
  private readonly control: ControlServer
  private readonly connectTimeoutMs: number
  private readonly maxPendingArrivals: number
  private readonly arrived = new Map<string, Arrival[]>()
  private arrivedCount = 0
  private readonly waiters = new Map<string, Set<Waiter>>()
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
    this.connectTimeoutMs = options.connectTimeoutMs ?? 30_000
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
          },
          (notice) => this.onArrival(notice),
        ),
    )
    this.control = new ControlServer(options.host ?? '0.0.0.0', port, (hello) => native(() => this.native.accept(hello)))
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
    const key = `${ip}:${peerPort}`
    const reply = await exchangeHello(ip, peerPort, native(() => this.native.hello(key)), timeoutMs, options.signal)
    if (options.signal?.aborted) throw abortError(`connect to ${ip}:${peerPort}`)
    await nativeAsync(this.native.finishConnect(key, ip, reply))
    return true
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
  async writeCache(
    ip: string,
    port: number | string,
    localBlockIds: BlockIds,
    remoteBlockIds: BlockIds,
    layerIdx: number,
    options: WriteOptions = {},
  ): Promise<void> {
    this.checkOpen()
    const key = `${ip}:${toPort('port', port)}`
    const local = toBlockIds('localBlockIds', localBlockIds)
    const remote = toBlockIds('remoteBlockIds', remoteBlockIds)
    if (typeof layerIdx !== 'number') throw invalidArgument('layerIdx', `expected a number, got ${typeof layerIdx}`)
    const tag = options.tag === undefined ? undefined : encodeTag(options.tag)
    await nativeAsync(native(() => this.native.writeCache(key, local, remote, layerIdx, tag)))
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

  /** Closes the control plane and every link; JS buffers are released afterwards. */
  close(): Promise<void> {
    if (!this.closing) {
      for (const set of this.waiters.values()) {
        for (const waiter of [...set]) waiter.reject(new KvTransferError('ERR_CLOSED', 'the communicator was closed'))
      }
      this.closing = (async () => {
        await this.control.close().catch(() => undefined)
        await nativeAsync(this.native.close())
      })()
    }
    return this.closing
  }
}

export { fromNative }
