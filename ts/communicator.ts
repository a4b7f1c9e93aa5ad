/**
 * `RDMACommunicator`: the public class over the native engine (data path) and the ZeroMQ
 * control plane (handshakes).
 */
import { EventEmitter } from 'node:events'
import * as os from 'node:os'
import {
  type ArrivalNotice,
  NativeCommunicator,
  type PeerLeftNotice,
  checkDstTpSize as checkDstTpSizeNative,
} from '../index.js'
import { type Arrival, Arrivals, type WaitOptions, arrivalOf, waitSpec } from './arrivals'
import { PendingCalls } from './calls'
import { Connector } from './connecting'
import { ControlServer } from './control'
import { type DeadlineOptions, withDeadline } from './deadline'
import { Hosts } from './hosts'
import { KvTransferError, type KvTransferErrorCode, abortError, fromNative, native, nativeAsync } from './errors'
import type { CommunicatorEvent, CommunicatorEventArgs } from './events'
import { type FenceResult, type FenceTarget, FenceHub, checkFenceOptions, checkFenceTarget } from './fences'
import {
  type BlockIds,
  type CloseOptions,
  type CommunicatorOptions,
  type CommunicatorStats,
  type ConnectOptions,
  type FastDeployArguments,
  type FenceOptions,
  type PeerInfo,
  type Role,
  type SeedArguments,
  type WriteOptions,
  checkDstTpSize,
  checkSignal,
  parseSettings,
  toBlockIds,
  toDeadline,
  toHost,
  toOptions,
  toPort,
  toTimeout,
} from './options'
import {
  type DroppedNotices,
  type Metrics,
  METRICS_SOURCE,
  type MetricsSource,
  metricsText,
  toMetrics,
} from './metrics'
import { Peer, PeerBook, peerInfoOf } from './peer'
import { PreparedBlocks } from './prepared'
import type { Instance, InstanceFilter } from './registry'
import { instanceOf } from './registry/entry'
import { Names } from './registry/names'
import { type RequestTag, encodeTag } from './tags'
import { Writes } from './writes'

// `await using` looks `Symbol.asyncDispose` up; Node 20 before 20.4 lacks it. Node's own
// is this registered symbol, so both agree where it exists.
;(Symbol as { asyncDispose?: symbol }).asyncDispose ??= Symbol.for('nodejs.asyncDispose')

/**
 * A KV-cache communicator (the seed's `RDMACommunicator`), usable as prefill (writer) or
 * decode (receiver). Every communicator listens on its `port`; a writer `connect`s to the
 * receiver and then pushes blocks with `writeCache`.
 *
 * Events ({@link CommunicatorEvents}, typed): `'arrival'` ({@link Arrival}) on the
 * receiving side for every tagged call; `'peer-left'` ({@link PeerLeft}) on the writing
 * side when a connected peer's connection broke or was torn down.
 *
 * `await using comm = await RDMACommunicator.create(…)` closes it when the scope ends
 * (`Symbol.asyncDispose`).
 *
 * Prefer `await RDMACommunicator.create(options)`, which resolves once the communicator
 * listens. When its start fails (a port in use, a host that cannot be bound), `ready`
 * rejects, what it holds is released, and every later call throws or rejects with that
 * same error (code and message); `close()` still resolves.
 */
export class RDMACommunicator extends EventEmitter<CommunicatorEventArgs> {
  /** The side this communicator plays (the `role` option). */
  readonly role: Role
  /** The `gpuIdx` option. */
  readonly gpuIdx: number
  /** Number of blocks in every local region. */
  readonly blockNumber: number
  /** Bytes per block. */
  readonly blockBytes: number
  /**
   * Resolves once the control plane listens; rejects with why it cannot (e.g. `ERR_IO`
   * naming the port in use), and every later call then fails with that error.
   */
  readonly ready: Promise<void>
  private readonly native: NativeCommunicator
  /** The peers `connect` reached, by the host and port calls spell. */
  private readonly peers = new PeerBook()
  /** Names and the addresses peers are keyed by (looked up asynchronously, kept). */
  private readonly hosts = new Hosts()
  private readonly control: ControlServer
  /** Undefined: none. */
  private readonly connectTimeoutMs: number | undefined
  /** Undefined: none. */
  private readonly writeTimeoutMs: number | undefined
  /** Layers of the local cache (what `waitForArrival` may wait for). */
  private readonly layerCount: number
  private readonly arrivals: Arrivals
  /** The `writeCache` calls the engine has not settled yet. */
  private readonly calls = new PendingCalls()
  /** `writeCache` from its arguments to the engine (writes.ts). */
  private readonly writes: Writes
  /** Arrival notices evicted unconsumed (beyond `maxPendingArrivals`), per writer. */
  private readonly droppedNotices: DroppedNotices = new Map()
  /** The handshakes of `connect`, and the attempts a deadline gave up on. */
  private readonly connector: Connector
  private boundPort: number
  /** Fences: the writers that take this side's, and this side's channels to its peers (fences.ts). */
  private readonly fences: FenceHub
  /** Its place in the registry (`names.membership`; undefined: none), and the peers `connect(name)` reached. */
  private readonly names: Names
  private closing: Promise<void> | undefined
  /** Why the start failed (`ready`'s rejection), once it did: every later call fails with it. */
  private startError: KvTransferError | undefined

  /** The seed's positional form: `(role, gpuIdx, port, localKeyCache, localValueCache, blockNumber, blockBytes)`. */
  constructor(...args: SeedArguments)
  /**
   * FastDeploy's positional form: `(role, gpuIdx, port, keyCachePtrs, valueCachePtrs,
   * blockNumber, blockBytes, keyScalePtrs = [], valueScalePtrs = [], scaleBlockBytes = 0,
   * prefillTpSize = 1, prefillTpIdx = 0, extra?)`.
   */
  constructor(...args: FastDeployArguments)
  /**
   * Creates a communicator and starts listening on `options.port` (await `ready`).
   * Throws a {@link KvTransferError} (`ERR_INVALID_ARGUMENT`, ...) for invalid options.
   */
  constructor(options: CommunicatorOptions)
  constructor(...args: unknown[]) {
    super()
    const settings = parseSettings(args)
    this.role = settings.role
    this.gpuIdx = settings.gpuIdx
    this.blockNumber = settings.blockNumber
    this.blockBytes = settings.blockBytes
    this.connectTimeoutMs = settings.connectTimeoutMs
    this.writeTimeoutMs = settings.writeTimeoutMs
    this.layerCount = settings.native.localKeyCache.length
    this.arrivals = new Arrivals(settings.maxPendingArrivals, (arrival) =>
      this.droppedNotices.set(arrival.peer, (this.droppedNotices.get(arrival.peer) ?? 0) + 1),
    )
    this.boundPort = settings.port
    this.native = native(
      () =>
        new NativeCommunicator(
          settings.native,
          (callId, error) => this.calls.settled(callId, error),
          (notice) => this.onArrival(notice),
          (left) => this.onPeerLeft(left),
        ),
    )
    this.connector = new Connector(this.native, this.hosts)
    this.fences = new FenceHub(this.native, () => this.control)
    this.names = Names.of(settings, this.connectTimeoutMs, {
      joined: (instance) => this.emit('instance-joined', instance),
      left: (left) => {
        // Links to it end first (its pending calls fail `ERR_PEER_DISCONNECTED`).
        const { host, port } = left.instance.control
        if (!this.closing) this.native.cancelPeer(`${host}:${port}`, 'lease').catch(() => undefined)
        this.emit('instance-left', left)
      },
    })
    this.writes = new Writes({
      owner: this,
      checkOpen: () => this.checkOpen(),
      peer: (ip, port) => this.peer(ip, port),
      native: this.native,
      calls: this.calls,
      peers: this.peers,
      hosts: this.hosts,
      names: this.names,
      writeTimeoutMs: this.writeTimeoutMs,
      integrity: settings.integrity,
    })
    this.control = new ControlServer(
      settings.host,
      settings.port,
      {
        challenge: (challenge) => native(() => this.native.authRespond(challenge)),
        hello: (hello) => native(() => this.native.accept(hello)),
        listen: (name, identity) => this.fences.listen(name, identity),
      },
      { fenced: (answer) => this.fences.fenced(answer) },
    )
    this.ready = this.control.ready.then(async (bound) => {
      this.boundPort = bound
      const name = settings.defaultName ? `${os.hostname()}:${bound}` : settings.native.name
      // Peers see the name in arrival notices: with port 0 the default must carry the bound port.
      if (name !== settings.native.name) native(() => this.native.setName(name))
      await this.names.membership?.join(instanceOf(settings, name, this.native.offers(), bound))
    })
    // Not an unhandled rejection: every later call reports it (see `startError`).
    this.ready.catch((error: unknown) => this.startFailed(fromNative(error)))
  }

  /**
   * Creates a communicator (the constructor's arguments, any form) and resolves once it
   * listens on its port. Rejects with what the constructor throws, or with why it cannot
   * listen (`ERR_IO` naming the port in use, ...), after releasing what it held.
   */
  static create(options: CommunicatorOptions): Promise<RDMACommunicator>
  /** The seed's positional form (see the constructor). */
  static create(...args: SeedArguments): Promise<RDMACommunicator>
  /** FastDeploy's positional form (see the constructor). */
  static create(...args: FastDeployArguments): Promise<RDMACommunicator>
  static async create(...args: unknown[]): Promise<RDMACommunicator> {
    const comm = new RDMACommunicator(...(args as [CommunicatorOptions]))
    try {
      await comm.ready
    } catch (error) {
      await comm.close().catch(() => undefined)
      throw error
    }
    return comm
  }

  /** The start failed: remember why, fail the waiters, release the engine and the port. */
  private startFailed(error: KvTransferError): void {
    if (this.closing) return // closed before it listened: calls report ERR_CLOSED
    this.startError = error
    void this.startClose(this.startFailure()).catch(() => undefined)
  }

  /** A fresh copy of the start error (code and message), for the call that reports it. */
  private startFailure(): KvTransferError {
    const start = this.startError!
    return new KvTransferError(start.code, start.message, { cause: start.cause })
  }

  /** @internal The sidecar's warm re-attach (sidecar/warm.ts): the engine, the writers that take this side's fences, the hub (rekey). */
  warmAccess(): { native: NativeCommunicator; writers: string[]; fences: FenceHub } {
    return { native: this.native, writers: this.fences.writers(), fences: this.fences }
  }

  /** The control-plane port (the bound one when constructed with port 0). */
  get port(): number {
    return this.boundPort
  }

  /** The default timeout of `writeCache` in milliseconds (the `writeTimeoutMs` option; 0: none). */
  get defaultWriteTimeoutMs(): number {
    return this.writeTimeoutMs ?? 0
  }

  /** `'tcp'` or `'rdma'`: the transport this side offers. */
  get transport(): 'tcp' | 'rdma' | 'nvlink' {
    return this.native.transport as 'tcp' | 'rdma' | 'nvlink'
  }

  /** Throws the start error once the start failed. */
  private checkStarted(): void {
    if (this.startError) throw this.startFailure()
  }

  /** Throws the start error once the start failed, else `ERR_CLOSED` once closed. */
  private checkOpen(): void {
    this.checkStarted()
    if (this.closing) throw new KvTransferError('ERR_CLOSED', 'the communicator is closed')
  }

  /**
   * Handshakes with the communicator listening on `ip:port` (waiting for it to start, and
   * for a name to resolve, up to the timeout) and opens the data path. Resolves `true` when
   * connected; rejects with a {@link KvTransferError} saying why not (timeout, layout
   * mismatch, refused, ...). The peer is known by its address: afterwards any name or
   * address of it reaches it (`localhost` and `127.0.0.1` are one peer).
   * FastDeploy's `connect(ip, port, dst_tp_size)` is accepted: a number in place of the
   * options is `dstTpSize` (0: not checked).
   */
  async connect(ip: string, port: number | string, options?: ConnectOptions | number): Promise<boolean>
  /** Connects to the registry's instance `name` (README "Running a fleet"); later calls may name it in place of `ip, port`. */
  async connect(name: string, options?: ConnectOptions): Promise<boolean>
  async connect(
    ip: string,
    port?: number | string | ConnectOptions,
    options: ConnectOptions | number = {},
  ): Promise<boolean> {
    this.checkOpen()
    if (port === undefined || (typeof port === 'object' && port !== null))
      return this.names.connect(this, ip, port as ConnectOptions | undefined)
    options = typeof options === 'number' ? { dstTpSize: options } : toOptions('options', options)
    const dstTpSize = checkDstTpSize(options.dstTpSize)
    if (dstTpSize !== undefined) native(() => checkDstTpSizeNative(dstTpSize))
    const peerPort = toPort('port', port)
    toHost('ip', ip)
    const timeoutMs =
      options.timeoutMs === undefined ? this.connectTimeoutMs : toTimeout('timeoutMs', options.timeoutMs)
    const signal = checkSignal('signal', options.signal)
    try {
      await this.ready
    } catch (error) {
      throw this.startError ? this.startFailure() : fromNative(error)
    }
    const { ip: address, reply } = await this.connector.open({ host: ip, port: peerPort, dstTpSize, timeoutMs, signal })
    const key = `${address}:${peerPort}`
    await this.fences.follow(address, peerPort, key, reply, timeoutMs)
    const handle = native(() => this.native.peer(key))
    this.peers.remember(Peer.of(address, peerPort, handle, this), ip)
    return true
  }

  /**
   * Receiving side: resolves once no write of `target.tag` (or from the writer named
   * `target.peer`) can land in this process any more; see {@link FenceOptions} and the
   * README ("Fences") for what each writer and each transport does.
   */
  async fence(target: FenceTarget, options: FenceOptions = {}): Promise<FenceResult> {
    this.checkOpen()
    const checked = checkFenceTarget(target)
    const { ackTimeoutMs, holdMs } = checkFenceOptions(toOptions('options', options))
    await this.ready
    return this.fences.fence(checked, ackTimeoutMs, holdMs)
  }

  /** `ip:port` as the engine keys peers (see `Hosts.known`: no lookup here), checked. */
  private keyOf(ip: unknown, port: unknown): string {
    return this.hosts.key(toHost('ip', ip), toPort('port', port))
  }

  /**
   * The peer connected as `ip:port` (by this name, another name of it, or its address):
   * pass it to `writeCache` and `prepareBlocks` in place of `ip, port`. Throws
   * `ERR_NOT_CONNECTED` when this side never connected to it. A host name that this
   * communicator never looked up (by `connect`, `writeCache` or `abortPeer`) is not
   * resolved here (that would block): pass the address, or a name used before.
   */
  peer(ip: string, port: number | string): Peer
  /** The peer connected by `name` (`connect(name)`); `ERR_NOT_CONNECTED` when none was. */
  peer(name: string): Peer
  peer(ip: string, port?: number | string): Peer {
    this.checkOpen()
    if (port === undefined) return this.names.peer(ip)
    const known = this.peers.find(ip, port)
    if (known) return known
    const key = this.keyOf(ip, port)
    const address = key.slice(0, key.lastIndexOf(':'))
    const peerPort = toPort('port', port)
    // Connected (under another name or port spelling), or not: the engine says which.
    const peer =
      this.peers.find(address, peerPort) ??
      Peer.of(
        address,
        peerPort,
        native(() => this.native.peer(key)),
        this,
      )
    this.peers.remember(peer, ip)
    return peer
  }

  /**
   * Whether a usable connection to `ip:port` exists (by any name or address of the peer; a
   * name is known as in {@link peer}).
   */
  isConnected(ip: string, port: number | string): boolean {
    this.checkStarted()
    const key = this.keyOf(ip, port)
    if (this.closing) return false
    return this.native.isConnected(key)
  }

  /**
   * Validates and plans `localBlockIds[i] → remoteBlockIds[i]` once for the connected peer
   * (`peer`, or `ip, port`); pass the result to `writeCache(peer, prepared, layerIdx,
   * options)` for every layer. Bad ids throw here (typed, like `writeCache`).
   */
  prepareBlocks(peer: Peer, localBlockIds: BlockIds, remoteBlockIds: BlockIds): PreparedBlocks
  prepareBlocks(ip: string, port: number | string, localBlockIds: BlockIds, remoteBlockIds: BlockIds): PreparedBlocks
  prepareBlocks(peerOrIp: Peer | string, a: number | string | BlockIds, b: BlockIds, c?: BlockIds): PreparedBlocks {
    this.checkOpen()
    const byPeer = peerOrIp instanceof Peer
    const key = byPeer ? this.writes.own(peerOrIp).key : this.keyOf(peerOrIp, a)
    const local = toBlockIds('localBlockIds', (byPeer ? a : b) as BlockIds)
    const remote = toBlockIds('remoteBlockIds', (byPeer ? b : c) as BlockIds)
    return PreparedBlocks.of(native(() => this.native.prepareBlocks(key, local, remote)))
  }

  /**
   * Writes K (and V, when present) of `localBlockIds[i]` into the peer's
   * `remoteBlockIds[i]` of layer `layerIdx`. Resolves when every byte is in the peer's
   * memory. Invalid input rejects with a typed error and nothing is written. The peer is
   * `ip, port` (as connected) or a {@link Peer} from `peer(ip, port)`, which saves the
   * lookup on every call.
   */
  writeCache(
    ip: string,
    port: number | string,
    localBlockIds: BlockIds,
    remoteBlockIds: BlockIds,
    layerIdx: number,
    options?: WriteOptions,
  ): Promise<void>
  writeCache(
    peer: Peer,
    localBlockIds: BlockIds,
    remoteBlockIds: BlockIds,
    layerIdx: number,
    options?: WriteOptions,
  ): Promise<void>
  /**
   * Writes a block list prepared with `prepareBlocks` for layer `layerIdx`: nothing is
   * validated or planned again. Refused (nothing written) when another communicator
   * prepared it or the peer is not the one it was prepared for (`ERR_INVALID_ARGUMENT`),
   * or when that peer reconnected with another blockNumber (`ERR_LAYOUT_MISMATCH`).
   */
  writeCache(
    ip: string,
    port: number | string,
    prepared: PreparedBlocks,
    layerIdx: number,
    options?: WriteOptions,
  ): Promise<void>
  writeCache(peer: Peer, prepared: PreparedBlocks, layerIdx: number, options?: WriteOptions): Promise<void>
  /** The {@link Peer} forms, with the name `connect(name)` connected in its place. */
  writeCache(
    name: string,
    localBlockIds: BlockIds,
    remoteBlockIds: BlockIds,
    layerIdx: number,
    options?: WriteOptions,
  ): Promise<void>
  writeCache(name: string, prepared: PreparedBlocks, layerIdx: number, options?: WriteOptions): Promise<void>
  writeCache(
    peerOrIp: Peer | string,
    a: number | string | BlockIds | PreparedBlocks,
    b?: BlockIds | PreparedBlocks | number,
    c?: BlockIds | number | WriteOptions,
    d?: number | WriteOptions,
    e?: WriteOptions,
  ): Promise<void> {
    // Not `async`: that would add a Promise and a resolution step to every call.
    return this.writes.write(peerOrIp, a, b, c, d, e)
  }

  /**
   * Tears the connection to `ip:port` down and rejects its pending calls with
   * `ERR_ABORTED`; resolves (with whether a connection existed) once none of their bytes
   * can land any more.
   */
  async abortPeer(ip: string, port: number | string): Promise<boolean> {
    this.checkStarted()
    let key = this.keyOf(ip, port)
    if (this.hosts.known(ip) === undefined) {
      // A name not looked up yet: one that does not resolve has no connection.
      if ((await this.hosts.lookup(ip).catch(() => undefined)) === undefined) return false
      key = this.keyOf(ip, port)
    }
    return nativeAsync(this.native.cancelPeer(key, 'abort'))
  }

  /** Live native resources: peers, links, receiving connections, regions, threads. */
  stats(): CommunicatorStats {
    return { ...this.native.stats(), fenceChannels: this.fences.channelCount }
  }

  /**
   * The transport used with `ip:port` (a peer this side connected to) and a sentence saying
   * why, with what it uses on this side (`details`: RDMA device, port, GID index and
   * address, MTU, QPs per peer) and, for RDMA, each rail with its state and counters
   * (`rails`); `null` when this side never connected to it.
   */
  peerInfo(ip: string, port: number | string): PeerInfo | null {
    this.checkStarted()
    return peerInfoOf(this.native.peerDecision(this.keyOf(ip, port)))
  }

  /**
   * Counters since construction, totals and per peer: bytes, blocks, calls succeeded and
   * failed (by code, refused calls included), latency of succeeded calls, arrival notices,
   * reconnects. Writing side peers are `ip:port`; receiving side peers are writers' names.
   */
  metrics(): Metrics {
    return toMetrics(this.native.metrics(), this.droppedNotices)
  }

  /** {@link metrics} in the Prometheus text exposition format (`kvtransfer_*`). */
  metricsText(): string {
    return metricsText([this])
  }

  /** What {@link metricsText} renders (its symbol is not exported: not for direct use). */
  [METRICS_SOURCE](): MetricsSource {
    return { native: this.native.metrics(), dropped: this.droppedNotices }
  }

  private onArrival(notice: ArrivalNotice): void {
    const arrival = arrivalOf(notice)
    // Kept for waitForArrival either way; a listener that takes it consumes it (see Arrivals).
    this.arrivals.add(arrival, this.listenerCount('arrival') > 0)
    this.emit('arrival', arrival)
  }

  /** The registry's live instances that pass `filter` (README "Running a fleet"). */
  async instances(filter: InstanceFilter = {}): Promise<Instance[]> {
    this.checkOpen()
    return this.names.instances(filter)
  }

  private onPeerLeft(left: PeerLeftNotice): void {
    this.emit('peer-left', { peer: left.peer, code: left.code as KvTransferErrorCode, reason: left.reason })
  }

  /**
   * Resolves when every requested layer of `tag` has arrived (notices that came before the
   * call count too; up to `maxPendingArrivals` are kept). Rejects with `ERR_TIMEOUT` or
   * `ERR_ABORTED`.
   */
  waitForArrival(tag: RequestTag, options: WaitOptions = {}): Promise<Arrival[]> {
    let spec: ReturnType<typeof waitSpec>
    let deadline: DeadlineOptions
    try {
      this.checkOpen()
      encodeTag(tag)
      deadline = toDeadline(toOptions('options', options))
      spec = waitSpec(options, this.layerCount)
    } catch (error) {
      return Promise.reject(error)
    }
    return this.arrivals.wait(tag, spec.layers, deadline, spec.expectBlocks)
  }

  /** Forgets the kept arrival notices of `tag` (call after consuming a request). */
  forgetArrivals(tag: RequestTag): void {
    this.checkStarted()
    encodeTag(tag)
    this.arrivals.forget(tag)
  }

  /**
   * Closes the control plane and every link; JS buffers are released afterwards. With a
   * timeout or signal the returned promise may reject (`ERR_TIMEOUT` / `ERR_ABORTED`)
   * before the teardown ends; the teardown still completes and the communicator is closed.
   */
  close(options: CloseOptions = {}): Promise<void> {
    let deadline: DeadlineOptions
    try {
      deadline = toDeadline(toOptions('options', options))
    } catch (error) {
      return Promise.reject(error)
    }
    return withDeadline(this.startClose(), deadline, {
      timeout: () =>
        new KvTransferError('ERR_TIMEOUT', `timed out after ${deadline.timeoutMs} ms: close (the teardown continues)`),
      abort: () => abortError('close'),
    })
  }

  /** Starts the teardown once; pending waiters reject with `reason` (default `ERR_CLOSED`). */
  private startClose(reason?: KvTransferError): Promise<void> {
    if (!this.closing) {
      this.arrivals.rejectAll(reason ?? new KvTransferError('ERR_CLOSED', 'the communicator was closed'))
      this.closing = (async () => {
        await this.names.membership?.close().catch(() => undefined)
        await this.fences.unfollowAll()
        await this.control.close().catch(() => undefined)
        await nativeAsync(this.native.close())
      })()
      this.calls.close()
      this.peers.clear()
      this.names.clear()
    }
    return this.closing
  }

  /** `await using comm = …`: closes the communicator when the scope ends (`close()`). */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close()
  }
}

/** Node's typing takes any name here; this one takes only the events that exist. */
export interface RDMACommunicator {
  removeAllListeners(event?: CommunicatorEvent): this
}
