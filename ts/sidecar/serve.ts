/**
 * `kvtransfer serve`: the sidecar. Workers on this host attach over a Unix domain socket
 * (native: admission, framing, descriptors); each gets its own {@link RDMACommunicator}
 * over the memory it shares. Requests map one to one onto the TS API (docs/sidecar.md).
 */
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { NativeSidecar, type NativeSidecarEvent } from '../../index.js'
import { RDMACommunicator } from '../communicator'
import { KvTransferError, describeValue, invalidArgument, native } from '../errors'
import { checkNonNegativeInteger, checkType, toPort } from '../options'
import { metricsText } from '../metrics'
import type { Peer } from '../peer'
import type { PreparedBlocks } from '../prepared'
import { MetricsServer } from './metrics-server'
import type { SidecarStatus } from './status'
import { DEFAULT_WARM_GRACE_MS, MAX_WARM_GRACE_MS, WarmSlots, slotField } from './warm'
import type { CommunicatorOptions } from '../options'
import type { Arrival } from '../arrivals'
import {
  type Request,
  SIDECAR_PROTOCOL,
  attachOptions,
  fenceArguments,
  idsField,
  numberField,
  parseRequest,
  stringField,
  tagField,
  tagJson,
} from './protocol'

/** Every request the protocol has. */
const OPS = new Set([
  'hello',
  'status',
  'attach',
  'connect',
  'prepare',
  'release',
  'write',
  'wait',
  'forget',
  'fence',
  'peerInfo',
  'metrics',
  'detach',
])

/** Options of {@link Sidecar.start}. */
export interface SidecarOptions {
  /** The socket's path (default: {@link defaultSocketPath}). */
  socket?: string
  /** The socket file's permission bits (default 0o600). */
  mode?: number
  /** User ids admitted besides the sidecar's own (root is always admitted). */
  allowUids?: number[]
  /** Serve Prometheus metrics on this port (default: none; 0: any free port). */
  metricsPort?: number
  /** The metrics server's address (default 127.0.0.1). */
  metricsHost?: string
  /**
   * How long the communicator of a worker that attached with a `slot` is kept after the
   * worker ends, for a worker re-attaching with that slot (default 30000; 0: never kept).
   */
  warmGraceMs?: number
}

/** `KVTRANSFER_SOCKET`, else `$XDG_RUNTIME_DIR/kvtransfer.sock`, else `/tmp/kvtransfer-<uid>.sock`. */
export function defaultSocketPath(): string {
  const env = process.env.KVTRANSFER_SOCKET
  if (env) return env
  const runtime = process.env.XDG_RUNTIME_DIR
  if (runtime) return path.join(runtime, 'kvtransfer.sock')
  return path.join(os.tmpdir(), `kvtransfer-${os.userInfo().uid}.sock`)
}

/** One attached worker: its connection and, once attached, its communicator. */
interface Worker {
  conn: number
  pid: number
  uid: number
  greeted: boolean
  /** Descriptors received and not yet used by an `attach` (closed at attach and detach). */
  fds: number[]
  comm?: RDMACommunicator
  /** The slot it attached with (warm re-attach), and its attach options. */
  slot?: string
  options?: CommunicatorOptions
  /** It took over a parked communicator (its `connect` keeps the links it finds). */
  reattached?: boolean
  /** Its communicator's arrival listener (removed when the communicator is parked). */
  onArrival?: (arrival: Arrival) => void
  attaching?: Promise<void>
  prepared: Map<number, PreparedBlocks>
  nextPrepared: number
  /** `detach` was asked: end the worker once its answer is sent. */
  detachAnswered?: boolean
}

/** What the sidecar counts, for its own metrics. */
interface SidecarCounters {
  attaches: number
  detaches: number
}

/** A running sidecar. */
export class Sidecar {
  private readonly workers = new Map<number, Worker>()
  /** Workers being ended (their communicators closing or being parked). */
  private readonly ending = new Set<Promise<void>>()
  private readonly counters: SidecarCounters = { attaches: 0, detaches: 0 }
  private readonly started = Date.now()
  private metricsServer: MetricsServer | undefined
  private closing: Promise<void> | undefined

  private constructor(
    /** The socket's path. */
    readonly socket: string,
    private readonly native: NativeSidecar,
    private readonly warm: WarmSlots,
  ) {}

  /** Listens on the socket (and the metrics port, when given). */
  static async start(options: SidecarOptions = {}): Promise<Sidecar> {
    checkSidecarOptions(options)
    const socket = path.resolve(options.socket ?? defaultSocketPath())
    let sidecar: Sidecar | undefined
    const pending: NativeSidecarEvent[] = []
    const listener = native(
      () =>
        new NativeSidecar({ path: socket, mode: options.mode, allowedUids: options.allowUids }, (event) =>
          sidecar ? sidecar.onEvent(event) : pending.push(event),
        ),
    )
    sidecar = new Sidecar(socket, listener, new WarmSlots(options.warmGraceMs ?? DEFAULT_WARM_GRACE_MS))
    for (const event of pending) sidecar.onEvent(event)
    if (options.metricsPort !== undefined) {
      try {
        sidecar.metricsServer = await MetricsServer.start(options.metricsHost ?? '127.0.0.1', options.metricsPort, () =>
          sidecar!.metricsText(),
        )
      } catch (error) {
        await sidecar.close()
        throw error
      }
    }
    return sidecar
  }

  /** The metrics server's port, when serving one. */
  get metricsPort(): number | undefined {
    return this.metricsServer?.port
  }

  /** Workers attached now. */
  get workerCount(): number {
    let n = 0
    for (const worker of this.workers.values()) if (worker.comm) n++
    return n
  }

  /** Every attached worker's communicator metrics, then the sidecar's own, as Prometheus text. */
  metricsText(): string {
    const comms = [...this.workers.values()].flatMap((w) => (w.comm ? [w.comm] : []))
    const own = [
      '# HELP kvtransfer_sidecar_workers Workers attached now.',
      '# TYPE kvtransfer_sidecar_workers gauge',
      `kvtransfer_sidecar_workers ${comms.length}`,
      '# HELP kvtransfer_sidecar_attaches_total Workers that attached.',
      '# TYPE kvtransfer_sidecar_attaches_total counter',
      `kvtransfer_sidecar_attaches_total ${this.counters.attaches}`,
      '# HELP kvtransfer_sidecar_detaches_total Workers that detached (or died).',
      '# TYPE kvtransfer_sidecar_detaches_total counter',
      `kvtransfer_sidecar_detaches_total ${this.counters.detaches}`,
      '# HELP kvtransfer_sidecar_parked Communicators kept for a worker to re-attach to (warm re-attach).',
      '# TYPE kvtransfer_sidecar_parked gauge',
      `kvtransfer_sidecar_parked ${this.warm.parkedCount}`,
      '# HELP kvtransfer_sidecar_reattaches_total Workers that re-attached to a kept communicator.',
      '# TYPE kvtransfer_sidecar_reattaches_total counter',
      `kvtransfer_sidecar_reattaches_total ${this.warm.counters.reattached}`,
      '# HELP kvtransfer_sidecar_parked_expired_total Kept communicators closed when the grace period ended.',
      '# TYPE kvtransfer_sidecar_parked_expired_total counter',
      `kvtransfer_sidecar_parked_expired_total ${this.warm.counters.expired}`,
      '',
    ].join('\n')
    return metricsText(comms) + own
  }

  /** Detaches every worker, removes the socket file and stops the metrics server. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      this.native.close()
      await Promise.all([...this.workers.values()].map((w) => this.detach(w)))
      // A worker that ended just before may still be parking its communicator.
      await Promise.all(this.ending)
      await this.warm.closeAll()
      await this.metricsServer?.close()
    })()
    return this.closing
  }

  private onEvent(event: NativeSidecarEvent): void {
    if (event.kind === 'connected') {
      this.workers.set(event.conn, {
        conn: event.conn,
        pid: event.pid ?? 0,
        uid: event.uid ?? 0,
        greeted: false,
        fds: [],
        prepared: new Map(),
        nextPrepared: 1,
      })
    } else if (event.kind === 'message') {
      const worker = this.workers.get(event.conn)
      if (!worker || this.closing) {
        closeFds(event.fds ?? [])
        return
      }
      worker.fds.push(...(event.fds ?? []))
      this.onMessage(worker, event.id ?? 0, event.body!)
    } else if (event.kind === 'closed') {
      const worker = this.workers.get(event.conn)
      if (worker) void this.detach(worker)
    }
  }

  private onMessage(worker: Worker, id: number, body: Buffer): void {
    let answer: Promise<unknown>
    try {
      answer = Promise.resolve(this.handle(worker, parseRequest(body)))
    } catch (error) {
      answer = Promise.reject(error)
    }
    answer.then(
      (ok) => {
        this.send(worker, id, { ok: ok === undefined ? {} : ok })
        // `detach` is answered first, then the connection ends.
        if (worker.detachAnswered) void this.detach(worker)
      },
      (error: unknown) => {
        const e = error instanceof KvTransferError ? error : new KvTransferError('ERR_INTERNAL', String(error))
        this.send(worker, id, { error: { code: e.code, message: e.message } })
      },
    )
  }

  private send(worker: Worker, id: number, message: unknown): void {
    try {
      this.native.send(worker.conn, id, Buffer.from(JSON.stringify(message)))
    } catch {
      // The worker is gone: its `closed` event detaches it.
    }
  }

  /** One request's answer (or a typed error). */
  private handle(worker: Worker, request: Request): unknown {
    if (!OPS.has(request.op)) throw new KvTransferError('ERR_PROTOCOL', `unknown op ${JSON.stringify(request.op)}`)
    if (request.op === 'hello') return this.hello(worker, request)
    if (!worker.greeted)
      throw new KvTransferError('ERR_PROTOCOL', `the first request must be "hello", got ${JSON.stringify(request.op)}`)
    if (request.op === 'attach') return this.attach(worker, request)
    if (request.op === 'status') return this.status(worker)
    const comm = worker.comm
    if (!comm)
      throw new KvTransferError(
        'ERR_NOT_CONNECTED',
        `"${request.op}" needs an attached worker: send "attach" first${worker.attaching ? ' and wait for its answer' : ''}`,
      )
    switch (request.op) {
      case 'connect': {
        const [ip, port] = [stringField(request, 'ip'), numberField(request, 'port')]
        // A re-attached worker finds its predecessor's links: it keeps them, warm.
        const kept = worker.reattached === true && comm.isConnected(ip, port)
        const connected = kept
          ? Promise.resolve(true)
          : comm.connect(ip, port, {
              dstTpSize: numberField(request, 'dstTpSize', 0),
              timeoutMs: request.timeoutMs as number | undefined,
            })
        return connected.then(() => {
          const key = `${ip}:${port}`
          // Writes naming this peer now go from the socket to the engine directly.
          this.native.routePeer(worker.conn, key, this.peerOf(comm, request, key).native, comm.defaultWriteTimeoutMs)
          return { peer: key, kept }
        })
      }
      case 'prepare': {
        const prepared = comm.prepareBlocks(
          this.peerOf(comm, request),
          idsField(request, 'local'),
          idsField(request, 'remote'),
        )
        const handle = worker.nextPrepared++
        worker.prepared.set(handle, prepared)
        this.native.routePrepared(worker.conn, handle, prepared.list)
        return { prepared: handle, blocks: prepared.blocks, runs: prepared.runs }
      }
      case 'release': {
        // Dropping the list lets its native plan be collected.
        const handle = numberField(request, 'prepared')
        this.native.unroutePrepared(worker.conn, handle)
        worker.prepared.delete(handle)
        return {}
      }
      case 'write':
        return this.write(worker, comm, request)
      case 'wait':
        return comm
          .waitForArrival(requiredTag(request), {
            layers: request.layers as number | number[] | undefined,
            timeoutMs: request.timeoutMs as number | undefined,
          })
          .then((arrivals) => ({ arrivals: arrivals.map((a) => ({ ...a, tag: tagJson(a.tag) })) }))
      case 'forget':
        comm.forgetArrivals(requiredTag(request))
        return {}
      case 'fence': {
        const { target, options } = fenceArguments(request)
        return comm.fence(target, options)
      }
      case 'peerInfo':
        return comm.peerInfo(stringField(request, 'ip'), numberField(request, 'port'))
      case 'metrics':
        return { metrics: jsonSafe(comm.metrics()), text: comm.metricsText() }
      case 'detach':
        worker.detachAnswered = true
        return {}
      default:
        throw new KvTransferError('ERR_PROTOCOL', `unknown op ${JSON.stringify(request.op)}`)
    }
  }

  /** What `kvtransfer doctor --sidecar` shows. */
  private status(asking: Worker): Omit<SidecarStatus, 'socket'> {
    return {
      protocol: SIDECAR_PROTOCOL,
      sidecar: sidecarVersion(),
      pid: process.pid,
      uptimeS: Math.round((Date.now() - this.started) / 1000),
      metricsPort: this.metricsServer?.port ?? null,
      workers: [...this.workers.values()]
        .filter((w) => w !== asking)
        .map((w) => {
          const metrics = w.comm?.metrics()
          return {
            pid: w.pid,
            uid: w.uid,
            role: w.comm?.role ?? null,
            port: w.comm?.port ?? null,
            transport: w.comm?.transport ?? null,
            peers: (metrics?.peers ?? []).map((p) => ({ peer: p.peer, transport: p.transport ?? null })),
            callsSucceeded: Number(metrics?.callsSucceeded ?? 0),
            callsFailed: Number(metrics?.callsFailed ?? 0),
          }
        }),
    }
  }

  private hello(worker: Worker, request: Request): unknown {
    if (request.protocol !== SIDECAR_PROTOCOL)
      throw new KvTransferError(
        'ERR_PROTOCOL',
        `the client speaks sidecar protocol ${JSON.stringify(request.protocol)}, this sidecar ${SIDECAR_PROTOCOL}: upgrade the ${Number(request.protocol) > SIDECAR_PROTOCOL ? 'sidecar' : 'client'}`,
      )
    worker.greeted = true
    return { protocol: SIDECAR_PROTOCOL, sidecar: sidecarVersion(), pid: process.pid, ops: [...OPS] }
  }

  private async attach(worker: Worker, request: Request): Promise<unknown> {
    if (worker.comm || worker.attaching)
      throw new KvTransferError(
        'ERR_INVALID_ARGUMENT',
        'invalid attach: this connection is attached already (one worker per connection)',
      )
    const slot = slotField(request)
    const fds = worker.fds.splice(0)
    let claimed = false
    try {
      const options = attachOptions(request, fds)
      if (slot !== undefined) this.warm.claim(slot)
      claimed = slot !== undefined
      // A kept communicator of this slot takes the worker's memory (or refuses, typed).
      let comm = slot === undefined ? undefined : await this.warm.take(slot, options)
      const reattached = comm !== undefined
      comm ??= new RDMACommunicator(options)
      if (!reattached) await this.whenStarted(worker, comm)
      if (!this.workers.has(worker.conn)) {
        // The worker went away while its communicator started.
        await comm.close().catch(() => undefined)
        throw new KvTransferError('ERR_CLOSED', 'the worker disconnected while attaching')
      }
      claimed = false // the worker holds the slot now; its detach releases it
      worker.comm = comm
      worker.slot = slot
      worker.options = options
      worker.reattached = reattached
      this.counters.attaches++
      worker.onArrival = (arrival) => this.send(worker, 0, { event: 'arrival', ...arrival, tag: tagJson(arrival.tag) })
      comm.on('arrival', worker.onArrival)
      const refusal = slot === undefined ? undefined : this.warm.refusal(comm)
      return {
        port: comm.port,
        transport: comm.transport,
        name: comm.metrics().name,
        reattached,
        warm: slot !== undefined && refusal === undefined,
        ...(refusal ? { warmRefusal: { code: refusal.code, message: refusal.message } } : {}),
      }
    } catch (error) {
      if (claimed) this.warm.release(slot!)
      throw error
    } finally {
      // The communicator mapped its own duplicates (or failed): ours are done.
      closeFds(fds)
    }
  }

  /** Waits for a new communicator to start; closes it when it fails. */
  private async whenStarted(worker: Worker, comm: RDMACommunicator): Promise<void> {
    const attaching = comm.ready
    worker.attaching = attaching
    try {
      await attaching
    } catch (error) {
      await comm.close().catch(() => undefined)
      throw error
    } finally {
      worker.attaching = undefined
    }
  }

  private write(worker: Worker, comm: RDMACommunicator, request: Request): Promise<void> {
    const peer = this.peerOf(comm, request)
    const layer = numberField(request, 'layer')
    const options = { tag: tagField(request), timeoutMs: request.timeoutMs as number | undefined }
    if (request.prepared !== undefined) {
      const handle = numberField(request, 'prepared')
      const prepared = worker.prepared.get(handle)
      if (!prepared)
        throw new KvTransferError(
          'ERR_INVALID_ARGUMENT',
          `invalid prepared: ${handle} names no prepared list of this worker`,
        )
      return comm.writeCache(peer, prepared, layer, options)
    }
    return comm.writeCache(peer, idsField(request, 'local'), idsField(request, 'remote'), layer, options)
  }

  /** The `peer` field (`"ip:port"`) as the communicator's {@link Peer}. */
  private peerOf(comm: RDMACommunicator, request: Request, key = stringField(request, 'peer')): Peer {
    const colon = key.lastIndexOf(':')
    if (colon <= 0)
      throw new KvTransferError('ERR_INVALID_ARGUMENT', `invalid peer: ${JSON.stringify(key)} is not "ip:port"`)
    return comm.peer(key.slice(0, colon), key.slice(colon + 1))
  }

  /**
   * Ends a worker: its communicator closes (its calls fail), its imports are released.
   * `close` awaits every end in progress, so a communicator being parked is closed too.
   */
  private detach(worker: Worker): Promise<void> {
    const ending = this.end(worker)
    this.ending.add(ending)
    const done = () => this.ending.delete(ending)
    ending.then(done, done)
    return ending
  }

  private async end(worker: Worker): Promise<void> {
    if (this.workers.get(worker.conn) !== worker) return
    this.workers.delete(worker.conn)
    this.native.unroute(worker.conn)
    this.native.disconnect(worker.conn)
    closeFds(worker.fds.splice(0))
    worker.prepared.clear()
    const comm = worker.comm
    worker.comm = undefined
    if (comm) {
      this.counters.detaches++
      if (worker.onArrival) comm.off('arrival', worker.onArrival)
      // With a slot, the communicator (and its links) may wait for the worker's successor.
      const kept =
        worker.slot !== undefined &&
        !this.closing &&
        (await this.warm.park(worker.slot, comm, worker.options!).catch(() => false))
      if (!kept) await comm.close().catch(() => undefined)
    }
    if (worker.slot !== undefined) this.warm.release(worker.slot)
  }
}

/** JS types of the options (the native socket checks the mode's range). */
function checkSidecarOptions(options: SidecarOptions): void {
  if (typeof options !== 'object' || options === null)
    throw invalidArgument('options', `expected an object, got ${describeValue(options)}`)
  if (options.socket !== undefined) checkType('socket', options.socket, 'string')
  if (options.mode !== undefined) checkNonNegativeInteger('mode', options.mode, 0o777)
  if (options.allowUids !== undefined) {
    if (!Array.isArray(options.allowUids))
      throw invalidArgument('allowUids', `expected a list of user ids, got ${describeValue(options.allowUids)}`)
    options.allowUids.forEach((uid, i) => checkNonNegativeInteger(`allowUids[${i}]`, uid, 0xffff_fffe))
  }
  if (options.metricsPort !== undefined) toPort('metricsPort', options.metricsPort)
  if (options.metricsHost !== undefined) checkType('metricsHost', options.metricsHost, 'string')
  if (options.warmGraceMs !== undefined) checkNonNegativeInteger('warmGraceMs', options.warmGraceMs, MAX_WARM_GRACE_MS)
}

function requiredTag(request: Request) {
  const tag = tagField(request)
  if (tag === undefined) throw new KvTransferError('ERR_INVALID_ARGUMENT', 'invalid tag: a tag is required')
  return tag
}

function closeFds(fds: readonly number[]): void {
  for (const fd of fds) {
    try {
      fs.closeSync(fd)
    } catch {
      // Already closed.
    }
  }
}

/** Bigints as decimal text (JSON has none). */
function jsonSafe(value: unknown): unknown {
  return JSON.parse(JSON.stringify(value, (_key, v: unknown) => (typeof v === 'bigint' ? v.toString() : v)))
}

function sidecarVersion(): string {
  try {
    const pkg = JSON.parse(fs.readFileSync(path.join(__dirname, '..', '..', 'package.json'), 'utf8')) as {
      version: string
    }
    return `kvtransfer/${pkg.version}`
  } catch {
    return 'kvtransfer'
  }
}
