/**
 * Options of the public API and their validation: every invalid value is refused with
 * `ERR_INVALID_ARGUMENT` naming it, before anything reaches the engine.
 */
import * as os from 'node:os'
import type { ImportedRegion, NativeOptions, NativeRail, NativeStats } from '../index.js'
import type { DeadlineOptions } from './deadline'
import { describeValue, invalidArgument, showValue } from './errors'
import type { RequestTag } from './tags'

/** Which side of disaggregated serving a communicator plays. */
export type Role = 'prefill' | 'decode'
/** `'auto'` picks NVLink when both sides are GPU memory on one host and their GPUs reach each other, else RDMA when a usable RDMA port exists on both sides, else TCP. */
export type Transport = 'auto' | 'nvlink' | 'rdma' | 'tcp'
/**
 * Memory another process shares: `bytes` bytes at `offset` of one shared object, named by
 * exactly one of:
 * - `fd`: a host-memory descriptor of this process (a memfd, a `/dev/shm` file);
 * - `cudaIpcHandle`: the 64-byte CUDA IPC handle of an allocation's base, or PyTorch's
 *   66-byte record from `untyped_storage()._share_cuda_()`;
 * - `cudaVmmFds` + `segmentBytes`: cuMem allocations exported as descriptors of this
 *   process, mapped back to back (PyTorch's expandable segments).
 *
 * The communicator maps its own copy when constructed (descriptors are duplicated: close
 * yours whenever you like) and releases it at `close()`.
 */
export type SharedRegion = { offset: number; bytes: number } & (
  { fd: number } | { cudaIpcHandle: Uint8Array } | { cudaVmmFds: number[]; segmentBytes: number }
)
/**
 * One layer's key or value region of `blockNumber × blockBytes` bytes: a native or device
 * address as a bigint (owned by the caller, who keeps it valid until `close()`), a
 * JavaScript buffer (kept alive by the communicator until `close()`), or a
 * {@link SharedRegion} of another process.
 */
export type CacheRegion = bigint | ArrayBufferView | ArrayBuffer | SharedRegion
/** Block ids: typed arrays pass to the engine without copying. */
export type BlockIds = readonly number[] | Int32Array | Uint32Array

/** Options of {@link RDMACommunicator}. */
/** The arguments the seed's and FastDeploy's positional constructors share. */
type PositionalLayout = [
  role: Role,
  gpuIdx: number,
  port: number | string,
  localKeyCache: CacheRegion[],
  localValueCache: CacheRegion[],
  blockNumber: number,
  blockBytes: number,
]

/** The seed's positional constructor arguments. */
export type SeedArguments = [...PositionalLayout, extra?: Partial<CommunicatorOptions>]

/** FastDeploy's positional constructor arguments (scales and prefill TP after the seed's). */
export type FastDeployArguments = [
  ...PositionalLayout,
  keyScaleCache: CacheRegion[],
  valueScaleCache?: CacheRegion[],
  scaleBlockBytes?: number,
  prefillTpSize?: number,
  prefillTpIdx?: number,
  extra?: Partial<CommunicatorOptions>,
]

export interface CommunicatorOptions {
  /** `'prefill'` (writes blocks to peers) or `'decode'` (receives them). */
  role: Role
  /** GPU index; also selects the `KVCACHE_RDMA_NICS` entry (index modulo their count). */
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
  /**
   * fp8 scale caches: one key-scale region per layer of `blockNumber × scaleBlockBytes`
   * bytes (default `[]`: none). `writeCache` moves block `b`'s scales with its K/V.
   */
  keyScaleCache?: CacheRegion[]
  /** One value-scale region per layer (per `localValueCache` region; `[]` when key-only). */
  valueScaleCache?: CacheRegion[]
  /** Bytes per block of the scale regions (default 0: no scale regions). Must match the peer's. */
  scaleBlockBytes?: number
  /** Default: `KVCACHE_TRANSPORT`, else `'auto'`. */
  transport?: Transport
  /**
   * RDMA devices to write over, one rail each (first active port), e.g.
   * `['mlx5_0', 'mlx5_1']`: 1..8 names, none empty, none twice (else `ERR_INVALID_ARGUMENT`
   * naming the list); a name the host lacks makes RDMA unusable (`ERR_RDMA_UNAVAILABLE`
   * with `transport: 'rdma'`). Wins over `KVCACHE_RDMA_NICS`. Default: that variable's
   * entry for `gpuIdx`, else, with GPU regions, the devices nearest the GPU (same PCIe
   * switch, then host bridge, then NUMA node), else every active port (README "Several NICs").
   */
  rdmaDevices?: string[]
  /**
   * Address every listener binds: the control plane (ZeroMQ, on `port`) and the TCP data
   * listener. An IPv4 address, `'*'` (all interfaces) or an interface name (its IPv4
   * address); a DNS name is refused (`ERR_INVALID_ARGUMENT`). Default:
   * `KVCACHE_SOCKET_IFNAME`'s address, else all interfaces.
   */
  host?: string
  /**
   * Name reported to peers in arrival notices, their metric labels and log lines (default
   * `hostname:port`, with the bound port when `port` is 0): at most 255 bytes of visible
   * ASCII (0x21–0x7E) other than `"`, `'` and `\`, else `ERR_INVALID_ARGUMENT`.
   */
  name?: string
  /**
   * Default timeout of `connect` in milliseconds (default 30000; 0: none); also bounds how
   * long the engine waits for the data connection to open (0: no bound).
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
  /**
   * Most arrival notices kept for a later `waitForArrival`: an integer in 0..2^32-1
   * (default 65536; 0: none kept). Every notice is kept, whether or not an `'arrival'`
   * listener got it (a listener never hides a notice from a wait). Beyond the bound the
   * oldest tag's notices are evicted, except a tag a `waitForArrival` is gathering.
   * `metrics().noticesDropped` counts the evicted notices nobody consumed: a notice an
   * `'arrival'` listener received, or a wait resolved with, is consumed.
   */
  maxPendingArrivals?: number
  /**
   * Tensor-parallel ranks this side's attention heads are split over (default 1). Peers
   * with different sizes exchange shards (README "Tensor-parallel shards").
   */
  tpSize?: number
  /** This side's rank, `0..tpSize` (default 0). */
  tpRank?: number
  /** Every rank holds the whole cache (MLA's latent cache): whole blocks, any pairing (default false). */
  kvReplicated?: boolean
  /**
   * How a block's bytes are ordered (default `{ order: 'HND' }`: heads outermost, a rank's
   * shard is one range). `'NHD'`: `tokensPerBlock` rows of all heads; a shard is one range
   * per row. Both sides must declare the same.
   */
  blockLayout?: BlockLayout
  /** The default of every `writeCache`'s `checksum` option (default `'none'`). */
  checksum?: Checksum
  /** The default of every `writeCache`'s `delivery` option (default `'default'`). */
  delivery?: Delivery
  /**
   * The etcd registry this communicator publishes itself in and finds peers by name
   * through: `'etcd://host:port[,host:port…]/prefix'` (README "Running a fleet"). Default:
   * `KVCACHE_REGISTRY`, else none; `''`: none.
   */
  registry?: string
  /**
   * Seconds the registry entry outlives this process's last keep-alive: peers learn within
   * this (+ 1 s) that it vanished. An integer in 2..3600 (default 10).
   */
  registryTtlSeconds?: number
}

/**
 * `'crc32c'`: the writer computes a CRC-32C of the bytes the call moves, its arrival notice
 * carries it, and the receiver verifies its memory against it before it reports the
 * arrival (`Arrival.verified`; a mismatch rejects the receiver's `waitForArrival` with
 * `ERR_CHECKSUM_MISMATCH`). Needs a `tag`; host regions over TCP and RDMA, GPU regions
 * over NVLink and TCP (with a CRC-32C kernel; README "Checksums").
 * `'none'`: no checksum.
 */
export type Checksum = 'crc32c' | 'none'

/**
 * `'acked'`: the call resolves only after the receiving engine took it and answered
 * (TCP, RDMA, NVLink; `ERR_UNSUPPORTED` where a transport cannot: README "What a resolved call promises").
 * `'default'`: what the transport promises by itself.
 */
export type Delivery = 'acked' | 'default'

/** `integrity` bits of the native per-call functions (src/calls.rs). */
const INTEGRITY_CHECKSUM = 1
const INTEGRITY_ACKED = 2

/**
 * The integrity bits of `checksum` and `delivery` (each absent: `fallback`'s). Refuses
 * any other value.
 */
export function toIntegrity(checksum: unknown, delivery: unknown, fallback = 0): number {
  let bits = fallback
  if (checksum !== undefined) {
    if (checksum !== 'crc32c' && checksum !== 'none')
      throw invalidArgument('checksum', `${showValue(checksum)} is not 'crc32c' or 'none'`)
    bits = checksum === 'crc32c' ? bits | INTEGRITY_CHECKSUM : bits & ~INTEGRITY_CHECKSUM
  }
  if (delivery !== undefined) {
    if (delivery !== 'acked' && delivery !== 'default')
      throw invalidArgument('delivery', `${showValue(delivery)} is not 'acked' or 'default'`)
    bits = delivery === 'acked' ? bits | INTEGRITY_ACKED : bits & ~INTEGRITY_ACKED
  }
  return bits
}

/** The order of a block's bytes (see {@link CommunicatorOptions.blockLayout}). */
export type BlockLayout = { order: 'HND' } | { order: 'NHD'; tokensPerBlock: number }

/** Options of {@link RDMACommunicator.connect}. */
export interface ConnectOptions {
  /**
   * The peer's `tpSize` this side expects (FastDeploy's `dst_tp_size`); a peer declaring
   * another is refused with `ERR_TP_MISMATCH`. Absent or 0: not checked.
   */
  dstTpSize?: number
  /**
   * Milliseconds to wait for the peer to answer (it may start later) and the data path to
   * open (default: the communicator's `connectTimeoutMs`, 30000; 0: none).
   */
  timeoutMs?: number
  /** Aborts the attempt; the promise rejects with `ERR_ABORTED`. */
  signal?: AbortSignal
}

/** Options of {@link RDMACommunicator.fence}. */
export interface FenceOptions {
  /**
   * Milliseconds each writer has to acknowledge (default 1000; 0: cut every writer off at
   * once). A writer that does not is cut off by this side and must connect again.
   */
  ackTimeoutMs?: number
  /** Milliseconds the writers refuse new calls of the fenced tag or writer (default 30000). */
  holdMs?: number
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
  /** End-to-end checksum of this call (default: the communicator's `checksum`). */
  checksum?: Checksum
  /** Acknowledged delivery of this call (default: the communicator's `delivery`). */
  delivery?: Delivery
}

/** Options of {@link RDMACommunicator.close}. */
export interface CloseOptions {
  /**
   * Reject with `ERR_TIMEOUT` when the teardown takes longer than this many milliseconds
   * (it still completes). Default, and 0: none.
   */
  timeoutMs?: number
  /** Reject with `ERR_ABORTED` on abort (the teardown still completes). */
  signal?: AbortSignal
}

/** Live native resources (leak checks). */
/** `comm.peerInfo(ip, port)`: the transport used with a peer and why. */
export interface PeerInfo {
  transport: Transport
  /** One sentence starting with the transport's name, e.g. `"tcp: RDMA is not usable on this side (...)"`. */
  reason: string
  /** What the transport uses on this side (RDMA: device, port, linkLayer, gidIndex, gid, mtu, qpsPerPeer). */
  details: Record<string, string>
  /** Whether the link is still usable. */
  connected: boolean
  /**
   * RDMA: the link's rails (one per pair of NIC ports, and local NICs the peer could not
   * pair, state `refused`), each with its GID and why, its state and its counters; `[]`
   * for other transports.
   */
  rails: Rail[]
}

/**
 * One rail of an RDMA link: the binding's generated `NativeRail` (device, port, peer
 * device, state `healthy` / `quarantined` / `failed` / `refused`, GID index, GID and
 * why, peer GID, speed, and bytes, work requests, failures, quarantines, rejoins, answers
 * to acked calls and stray answers (ignored) since the link was opened).
 */
export type Rail = NativeRail

/** Live resources (leak checks): the binding's generated `NativeStats`, and the fence channels. */
export type CommunicatorStats = NativeStats & {
  /** Writing side: open fence channels, one per receiver whose link is up (a connect closes those of links that are gone). */
  fenceChannels: number
}

/** The largest timeout Node's timers take (ms). */
export const MAX_TIMEOUT_MS = 0x7fff_ffff

/** The constructor's options, validated, with what the native side takes. */
export interface Settings {
  role: Role
  port: number
  gpuIdx: number
  blockNumber: number
  blockBytes: number
  host: string
  /** Undefined: none (see {@link toTimeout}). */
  connectTimeoutMs: number | undefined
  /** Undefined: none. */
  writeTimeoutMs: number | undefined
  maxPendingArrivals: number
  /** The default `checksum` and `delivery` of calls, as integrity bits. */
  integrity: number
  /** No `name` was given: the default `hostname:port` is set once the port is bound. */
  defaultName: boolean
  /** The registry (option, else `KVCACHE_REGISTRY`); undefined: none. */
  registry: RegistryAddress | undefined
  registryTtlSeconds: number
  native: NativeOptions
}

/** An options object (not an array, not a region). */
function isOptionsObject(value: unknown): value is Partial<CommunicatorOptions> {
  return typeof value === 'object' && value !== null && !Array.isArray(value) && !ArrayBuffer.isView(value)
}

/**
 * FastDeploy's positional arguments after `blockBytes`: `key_scale_ptrs=[],
 * value_scale_ptrs=[], scale_block_bytes=0, prefill_tp_size=1, prefill_tp_idx=0`, then
 * optionally an options object; or (the seed's form) an options object right away.
 */
function positionalExtras(rest: unknown[]): Partial<CommunicatorOptions> {
  if (rest.length === 0 || isOptionsObject(rest[0])) return { ...(rest[0] as Partial<CommunicatorOptions>) }
  const [keyScales, valueScales, scaleBlockBytes, tpSize, tpRank, extra] = rest
  return {
    ...(isOptionsObject(extra) ? extra : {}),
    keyScaleCache: (keyScales ?? []) as CacheRegion[],
    valueScaleCache: (valueScales ?? []) as CacheRegion[],
    scaleBlockBytes: (scaleBlockBytes ?? 0) as number,
    // FastDeploy's prefill_tp_size / prefill_tp_idx: this side's TP size and rank.
    tpSize: (tpSize ?? 1) as number,
    tpRank: (tpRank ?? 0) as number,
  }
}

/**
 * Validates the constructor's arguments: an options object, or the seed's positional form
 * `(role, gpuIdx, port, localKeyCache, localValueCache, blockNumber, blockBytes, extra?)`,
 * or FastDeploy's `(…, blockBytes, keyScalePtrs, valueScalePtrs, scaleBlockBytes,
 * prefillTpSize, prefillTpIdx, extra?)`.
 */
export function parseSettings(args: unknown[]): Settings {
  const options: CommunicatorOptions =
    typeof args[0] === 'object' && args[0] !== null
      ? (args[0] as CommunicatorOptions)
      : {
          ...positionalExtras(args.slice(7)),
          role: args[0] as Role,
          gpuIdx: args[1] as number,
          port: args[2] as number | string,
          localKeyCache: args[3] as CacheRegion[],
          localValueCache: args[4] as CacheRegion[],
          blockNumber: args[5] as number,
          blockBytes: args[6] as number,
        }
  // Values are checked once, by the engine (role, blockBytes, the tensor-parallel sizes);
  // here only their types, which the binding's conversion would otherwise report untyped.
  const role = checkType('role', options.role, 'string') as Role
  const port = toPort('port', options.port)
  const gpuIdx = checkNonNegativeInteger('gpuIdx', options.gpuIdx, 0xffff_ffff)
  const blockNumber = checkNonNegativeInteger('blockNumber', options.blockNumber, 0xffff_ffff)
  const blockBytes = checkType('blockBytes', options.blockBytes, 'number') as number
  checkRegionList('localKeyCache', options.localKeyCache)
  checkRegionList('localValueCache', options.localValueCache, ' ([] for key-only)')
  const keyScaleCache = options.keyScaleCache ?? []
  const valueScaleCache = options.valueScaleCache ?? []
  checkRegionList('keyScaleCache', keyScaleCache)
  checkRegionList('valueScaleCache', valueScaleCache)
  const scaleBlockBytes = checkNonNegativeInteger(
    'scaleBlockBytes',
    options.scaleBlockBytes ?? 0,
    Number.MAX_SAFE_INTEGER,
  )
  const tpSize = checkType('tpSize', options.tpSize ?? 1, 'number') as number
  const tpRank = checkType('tpRank', options.tpRank ?? 0, 'number') as number
  const kvReplicated = options.kvReplicated ?? false
  if (typeof kvReplicated !== 'boolean')
    throw invalidArgument('kvReplicated', `${showValue(kvReplicated)} is not a boolean`)
  const tokensPerBlock = parseBlockLayout(options.blockLayout)
  const connectTimeoutMs = toTimeout('connectTimeoutMs', options.connectTimeoutMs ?? 30_000)
  const writeTimeoutMs = toTimeout('writeTimeoutMs', options.writeTimeoutMs ?? 30_000)
  const maxPendingArrivals = checkNonNegativeInteger(
    'maxPendingArrivals',
    options.maxPendingArrivals ?? 65_536,
    0xffff_ffff,
  )
  // Strings the binding would otherwise refuse untyped (its values: the engine, the bind).
  const host = optionalString('host', options.host)
  const name = optionalString('name', options.name)
  const transport = optionalString('transport', options.transport) as Transport | undefined
  const authToken = optionalString('authToken', options.authToken)
  const rdmaDevices = optionalStringList('rdmaDevices', options.rdmaDevices)
  const registry = options.registry === undefined ? registryFromEnv() : toRegistry('registry', options.registry)
  const registryTtlSeconds = checkIntegerIn('registryTtlSeconds', options.registryTtlSeconds ?? 10, 2, 3600)
  return {
    role,
    port,
    gpuIdx,
    blockNumber,
    blockBytes,
    host: host ?? defaultControlHost(),
    connectTimeoutMs,
    writeTimeoutMs,
    maxPendingArrivals,
    integrity: toIntegrity(options.checksum, options.delivery),
    defaultName: name === undefined,
    registry,
    registryTtlSeconds,
    native: {
      role,
      gpuIdx,
      name: name ?? `${os.hostname()}:${port}`,
      // As given: absent, the engine binds its default (see the option's doc).
      host: options.host === undefined ? undefined : host,
      localKeyCache: options.localKeyCache.map((r, i) => toRegion('localKeyCache', i, r)),
      localValueCache: options.localValueCache.map((r, i) => toRegion('localValueCache', i, r)),
      keyScaleCache: keyScaleCache.map((r, i) => toRegion('keyScaleCache', i, r)),
      valueScaleCache: valueScaleCache.map((r, i) => toRegion('valueScaleCache', i, r)),
      blockNumber,
      blockBytes,
      scaleBlockBytes,
      transport,
      // The engine's bound on opening the data connection, in whole milliseconds (0: none).
      connectTimeoutMs: Math.ceil(connectTimeoutMs ?? 0),
      authToken,
      tpSize,
      tpRank,
      kvReplicated,
      tokensPerBlock,
      rdmaDevices,
    },
  }
}

/** `blockLayout` → tokens per block for the engine (0: head-major). */
function parseBlockLayout(layout: unknown): number {
  if (layout === undefined) return 0
  const given = layout as { order?: unknown; tokensPerBlock?: unknown }
  if (typeof layout !== 'object' || layout === null) {
    throw invalidArgument(
      'blockLayout',
      `expected { order: 'HND' } or { order: 'NHD', tokensPerBlock }, got ${describeValue(layout)}`,
    )
  }
  if (given.order === 'HND') return 0
  if (given.order !== 'NHD') {
    throw invalidArgument('blockLayout.order', `${JSON.stringify(given.order)} is not 'HND' or 'NHD'`)
  }
  const tokens = checkNonNegativeInteger('blockLayout.tokensPerBlock', given.tokensPerBlock, 0xffff_ffff)
  if (tokens === 0) throw invalidArgument('blockLayout.tokensPerBlock', '0 given; it must be at least 1')
  return tokens
}

/**
 * `dstTpSize` of `connect`: absent or 0 (not checked), else a number (the engine checks
 * that it is a tensor-parallel size).
 */
export function checkDstTpSize(value: unknown): number | undefined {
  const size = checkType('dstTpSize', value ?? 0, 'number') as number
  return size === 0 ? undefined : size
}

/** `value`, when `typeof value` is `type`; else a typed refusal naming what was given. */
export function checkType(name: string, value: unknown, type: 'number' | 'string'): unknown {
  if (typeof value !== type) throw invalidArgument(name, `expected a ${type}, got ${describeValue(value)}`)
  return value
}

/** An optional string option: undefined, or a string (its value is checked where it is used). */
function optionalString(name: string, value: unknown): string | undefined {
  return value === undefined ? undefined : (checkType(name, value, 'string') as string)
}

/** An optional list of strings (its values are checked by the engine). */
function optionalStringList(name: string, value: unknown): string[] | undefined {
  if (value === undefined) return undefined
  if (!Array.isArray(value)) throw invalidArgument(name, `expected an array of strings, got ${describeValue(value)}`)
  const bad = value.findIndex((v) => typeof v !== 'string')
  if (bad >= 0) throw invalidArgument(name, `entry ${bad} is ${describeValue(value[bad])}, not a string`)
  return [...(value as string[])]
}

/** A list of regions (each checked by {@link toRegion}). */
function checkRegionList(name: string, value: unknown, hint = ''): void {
  if (!Array.isArray(value))
    throw invalidArgument(name, `expected an array of regions${hint}, got ${describeValue(value)}`)
}

/**
 * A timeout, wherever the API takes one (`connectTimeoutMs`, `writeTimeoutMs`, and the
 * `timeoutMs` of `connect`, `writeCache`, `waitForArrival` and `close`): a number of
 * milliseconds in 0..2^31-1 (what Node's timers take), where **0 means no timeout**. Returns
 * the timeout, or undefined for none: the one place that gives 0 its meaning.
 */
export function toTimeout(name: string, value: unknown): number | undefined {
  if (typeof value !== 'number' || !(value >= 0 && value <= MAX_TIMEOUT_MS)) {
    throw invalidArgument(
      name,
      `${showValue(value)} is not a number of milliseconds in 0..${MAX_TIMEOUT_MS} (0: no timeout)`,
    )
  }
  return value === 0 ? undefined : value
}

/** The `{ timeoutMs, signal }` of `waitForArrival` and `close`, checked (no default timeout). */
export function toDeadline(options: { timeoutMs?: unknown; signal?: unknown }): DeadlineOptions {
  return {
    timeoutMs: options.timeoutMs === undefined ? undefined : toTimeout('timeoutMs', options.timeoutMs),
    signal: checkSignal('signal', options.signal),
  }
}

/** An optional `signal`: undefined or an `AbortSignal`. */
export function checkSignal(name: string, value: unknown): AbortSignal | undefined {
  if (value === undefined || value instanceof AbortSignal) return value
  throw invalidArgument(name, `expected an AbortSignal, got ${describeValue(value)}`)
}

/** A call's options argument: absent (`{}`) or an object. */
export function toOptions<T extends object>(name: string, value: T | undefined): T {
  if (value === undefined) return {} as T
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw invalidArgument(name, `expected an options object, got ${describeValue(value)}`)
  }
  return value
}

/** A peer's host: a non-empty string (a name or an address; resolved where it is used). */
export function toHost(name: string, value: unknown): string {
  if (typeof value !== 'string' || value.length === 0) {
    throw invalidArgument(name, `expected a host name or address, got ${describeValue(value)}`)
  }
  return value
}

export function toRegion(name: string, index: number, region: unknown): bigint | Uint8Array | ImportedRegion {
  if (typeof region === 'bigint') return region
  if (region instanceof ArrayBuffer || region instanceof SharedArrayBuffer) return new Uint8Array(region)
  if (ArrayBuffer.isView(region)) return new Uint8Array(region.buffer, region.byteOffset, region.byteLength)
  // A shared region: the engine checks its fields (one form, sizes, the object's extent).
  if (typeof region === 'object' && region !== null && 'offset' in region && 'bytes' in region)
    return region as ImportedRegion
  throw invalidArgument(
    name,
    `region ${index} must be a bigint address, an ArrayBuffer, a typed array or a shared region ({ offset, bytes, fd | cudaIpcHandle | cudaVmmFds }); got ${describeValue(region)}`,
  )
}

export function toBlockIds(name: string, ids: unknown): Uint32Array | Int32Array | Float64Array {
  if (ids instanceof Uint32Array || ids instanceof Int32Array) return ids
  if (Array.isArray(ids)) return numbersToFloat64(ids)
  throw invalidArgument(name, `expected number[], Int32Array or Uint32Array; got ${describeValue(ids)}`)
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

export function toPort(name: string, port: unknown): number {
  const value = typeof port === 'string' && port.trim() !== '' ? Number(port) : port
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > 65535) {
    // A string shows its quotes, a bigint its n, an object its type (see showValue).
    throw invalidArgument(name, `${showValue(port)} is not a port number in 0..65535`)
  }
  return value
}

export function checkNonNegativeInteger(name: string, value: unknown, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > max) {
    throw invalidArgument(name, `${showValue(value)} is not an integer in 0..${max}`)
  }
  return value
}

/** An integer option in `min..max`. */
function checkIntegerIn(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw invalidArgument(name, `${showValue(value)} is not an integer in ${min}..${max}`)
  }
  return value
}

/** A registry, parsed: its etcd endpoints and the key prefix its instances live under. */
export interface RegistryAddress {
  /** As given, e.g. `etcd://10.0.0.5:2379,10.0.0.6:2379/prod`. */
  url: string
  /** `host:port` of each etcd member. */
  endpoints: string[]
  /** The key prefix, without slashes at either end (`prod`; default `kvtransfer`). */
  prefix: string
}

export const REGISTRY_FORM = 'etcd://host:port[,host:port…]/prefix'
const REGISTRY_HOST = /^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])$/
const REGISTRY_PREFIX_SEGMENT = /^[A-Za-z0-9._-]{1,128}$/
/** Most etcd members a registry names. */
export const MAX_REGISTRY_ENDPOINTS = 16

/**
 * The `registry` option or `KVCACHE_REGISTRY` (named by `name`): `''` is none, anything
 * else must be `etcd://host:port[,host:port…]/prefix` (the prefix is optional: default
 * `kvtransfer`), else `ERR_INVALID_ARGUMENT` naming the value and the form.
 */
export function toRegistry(name: string, value: unknown): RegistryAddress | undefined {
  if (typeof value !== 'string')
    throw invalidArgument(name, `expected a string ${REGISTRY_FORM}, got ${describeValue(value)}`)
  if (value === '') return undefined
  const bad = (why: string) => invalidArgument(name, `${showValue(value)} is not ${REGISTRY_FORM}: ${why}`)
  if (!value.startsWith('etcd://')) throw bad("it must start with 'etcd://'")
  const rest = value.slice('etcd://'.length)
  const slash = rest.indexOf('/')
  const hosts = slash < 0 ? rest : rest.slice(0, slash)
  const path = slash < 0 ? '' : rest.slice(slash + 1).replace(/\/+$/, '')
  const endpoints = hosts.split(',')
  if (endpoints.length > MAX_REGISTRY_ENDPOINTS)
    throw bad(`${endpoints.length} endpoints, at most ${MAX_REGISTRY_ENDPOINTS}`)
  for (const endpoint of endpoints) {
    const colon = endpoint.lastIndexOf(':')
    const host = colon < 0 ? endpoint : endpoint.slice(0, colon)
    const port = colon < 0 ? '' : endpoint.slice(colon + 1)
    if (!REGISTRY_HOST.test(host)) throw bad(`${JSON.stringify(endpoint)} has no valid host`)
    if (!/^[0-9]{1,5}$/.test(port) || Number(port) < 1 || Number(port) > 65535)
      throw bad(`${JSON.stringify(endpoint)} has no port in 1..65535`)
  }
  const segments = path === '' ? ['kvtransfer'] : path.split('/')
  for (const segment of segments) {
    if (!REGISTRY_PREFIX_SEGMENT.test(segment))
      throw bad(`prefix segment ${JSON.stringify(segment)} is not 1..128 of A-Z a-z 0-9 . _ -`)
  }
  return { url: value, endpoints, prefix: segments.join('/') }
}

/** `KVCACHE_REGISTRY`, checked as the option is; unset or empty: none. */
export function registryFromEnv(): RegistryAddress | undefined {
  return toRegistry('KVCACHE_REGISTRY', process.env.KVCACHE_REGISTRY ?? '')
}

/**
 * The control plane listens on `KVCACHE_SOCKET_IFNAME`'s address when set (ZeroMQ takes an
 * interface name in place of an address), else on all interfaces.
 */
function defaultControlHost(): string {
  const ifname = process.env.KVCACHE_SOCKET_IFNAME?.trim()
  return ifname ? ifname : '0.0.0.0'
}
