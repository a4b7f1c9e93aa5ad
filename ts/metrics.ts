/**
 * `comm.metrics()` and `comm.metricsText()`: the engine's counters as an object and in the
 * Prometheus text exposition format (version 0.0.4).
 *
 * What is counted where (see also crates/engine/src/metrics.rs):
 * - writing side: bytes/blocks written, calls succeeded/failed (refused calls included, by
 *   code), latency of succeeded calls, arrival notices sent (tagged calls that succeeded),
 *   reconnects; peers keyed `ip:port`.
 * - receiving side: bytes received (TCP: every payload byte landed; RDMA writes are
 *   one-sided, so only the bytes announced by tagged calls' arrival notices), notices
 *   received and dropped (evicted beyond `maxPendingArrivals` before an `'arrival'`
 *   listener or a `waitForArrival` consumed them; see ts/arrivals.ts);
 *   peers keyed by the writer's `name`.
 * - per peer only for peers a link was opened with (at most 4096); the rest (a call refused
 *   because its peer was never connected names any string it was given) counts in the
 *   totals and in `untracked`, so that a typo cannot create a permanent series.
 */
import type { IncomingMessage, ServerResponse } from 'node:http'
import type { NativeCounters, NativeMetrics, NativeRail, NativeResources } from '../index.js'
import { describeValue, invalidArgument } from './errors'

/** Latency of the calls that succeeded (ms; p50/p99 are upper bounds of log2 buckets of µs). */
export interface LatencySummary {
  count: number
  p50: number
  p99: number
}

/**
 * One set of counters: the binding's generated `NativeCounters` (each field documented
 * there; `callsFailed` counts every `writeCache` that rejected, refused ones included,
 * and `failuresByCode` sums to it), with the latency histogram summarised as `latencyMs`.
 */
export type Counters = Omit<NativeCounters, 'latencyBuckets' | 'latencySumUs' | 'latencyP50Ms' | 'latencyP99Ms'> & {
  latencyMs: LatencySummary
}

export interface PeerMetrics extends Counters {
  /** `ip:port` on the writing side; the writer's `name` on the receiving side. */
  peer: string
  /**
   * Transport of the last link with the peer (every listed peer had one; null only for a
   * transport this build cannot name).
   */
  transport: string | null
  /**
   * RDMA: the rails of the peer's current link, each with its state and counters since that
   * link was opened (see `Rail` of `peerInfo`); `[]` for other transports.
   */
  rails: NativeRail[]
  /**
   * RDMA: the NIC resources of the peer's current link (its queue pairs, the spare sets a
   * quarantined rail rejoins on included, and its registered buffers; completion queues
   * are the communicator's, shared by every link); zeros otherwise.
   */
  resources: NativeResources
}

export interface Metrics extends Counters {
  /** This communicator's `name` (`hostname:port` by default): the `local` label of {@link metricsText}. */
  name: string
  role: string
  /** The peers a link was opened with (at most 4096), each with its own counters. */
  peers: PeerMetrics[]
  /**
   * What no listed peer counts: calls to peers that were never connected (refused with
   * `ERR_NOT_CONNECTED`, or with an invalid argument before any link), and anything beyond
   * 4096 peers. The totals are these plus the sum over `peers`.
   */
  untracked: Counters
  /**
   * NIC resources this communicator holds now (RDMA: queue pairs of every link,
   * completion queues, two per rail, and registered bytes of its regions and links);
   * zeros without RDMA.
   */
  resources: NativeResources
}

/** Notices the TypeScript layer dropped (evicted unconsumed), per peer. */
export type DroppedNotices = Map<string, number>

function counters(c: NativeCounters, dropped: number): Counters {
  return {
    bytesWritten: c.bytesWritten,
    bytesReceived: c.bytesReceived,
    blocksWritten: c.blocksWritten,
    callsSucceeded: c.callsSucceeded,
    callsFailed: c.callsFailed,
    failuresByCode: { ...c.failuresByCode },
    latencyMs: { count: c.callsSucceeded, p50: c.latencyP50Ms, p99: c.latencyP99Ms },
    noticesSent: c.noticesSent,
    noticesReceived: c.noticesReceived,
    noticesDropped: c.noticesDropped + dropped,
    checksumMismatches: c.checksumMismatches,
    reconnects: c.reconnects,
  }
}

function sum(map: DroppedNotices): number {
  let total = 0
  for (const n of map.values()) total += n
  return total
}

/** Notices dropped from peers that have no counters of their own (not in `native.peers`). */
function untrackedDropped(native: NativeMetrics, dropped: DroppedNotices): number {
  if (dropped.size === 0) return 0
  const tracked = new Set(native.peers.map((p) => p.peer))
  let total = 0
  for (const [peer, n] of dropped) if (!tracked.has(peer)) total += n
  return total
}

export function toMetrics(native: NativeMetrics, dropped: DroppedNotices): Metrics {
  return {
    name: native.name,
    role: native.role,
    ...counters(native.total, sum(dropped)),
    peers: native.peers.map((p) => ({
      peer: p.peer,
      transport: p.transport ?? null,
      ...counters(p.counters, dropped.get(p.peer) ?? 0),
      rails: p.rails.map((r) => ({ ...r })),
      resources: { ...p.resources },
    })),
    untracked: counters(native.untracked, untrackedDropped(native, dropped)),
    resources: { ...native.resources },
  }
}

/** A label value escaped for the text format. */
function label(value: string): string {
  return value.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n')
}

function labels(pairs: Record<string, string>): string {
  const parts = Object.entries(pairs).map(([k, v]) => `${k}="${label(v)}"`)
  return parts.length === 0 ? '' : `{${parts.join(',')}}`
}

/** Counters exposed as `kvtransfer_<name>_total`, by field. */
type CounterField =
  | 'bytesWritten'
  | 'bytesReceived'
  | 'blocksWritten'
  | 'callsSucceeded'
  | 'noticesSent'
  | 'noticesReceived'
  | 'noticesDropped'
  | 'checksumMismatches'
  | 'reconnects'
const COUNTERS: Array<[CounterField, string, string]> = [
  ['bytesWritten', 'bytes_written', 'Bytes written to peers (K and V of every block of succeeded calls).'],
  [
    'bytesReceived',
    'bytes_received',
    'Bytes received into local regions (TCP: every payload byte; RDMA: announced by arrival notices only).',
  ],
  ['blocksWritten', 'blocks_written', 'Blocks written by succeeded calls.'],
  ['callsSucceeded', 'calls_succeeded', 'writeCache calls that succeeded.'],
  ['noticesSent', 'notices_sent', 'Arrival notices sent (tagged calls that succeeded).'],
  ['noticesReceived', 'notices_received', 'Arrival notices received.'],
  [
    'noticesDropped',
    'notices_dropped',
    'Arrival notices nobody consumed: evicted beyond maxPendingArrivals before an arrival listener or a waitForArrival took them.',
  ],
  [
    'checksumMismatches',
    'checksum_mismatches',
    'Arrivals whose received bytes did not have the checksum the writer computed (checksum: crc32c).',
  ],
  ['reconnects', 'reconnects', 'Connects that replaced an earlier link to the same peer.'],
]

/** Per-rail counters exposed as `kvtransfer_rdma_rail_<name>_total`, by field. */
type RailField = 'bytes' | 'wrs' | 'failures' | 'quarantines' | 'rejoins' | 'answers' | 'strayAnswers'
const RAIL_COUNTERS: Array<[RailField, string, string]> = [
  ['bytes', 'bytes', 'Bytes of the work requests completed on an RDMA rail (data, flush reads, notices).'],
  ['wrs', 'work_requests', 'Work requests completed on an RDMA rail.'],
  ['failures', 'failures', 'Failed work requests and posts on an RDMA rail, and its port seen down.'],
  ['quarantines', 'quarantines', 'Times an RDMA rail was quarantined (taken out of service for a cooldown).'],
  ['rejoins', 'rejoins', 'Times a quarantined RDMA rail came back after a successful probe.'],
  ['answers', 'answers', "Answers to acked calls (delivery: 'acked') received on an RDMA rail."],
  ['strayAnswers', 'stray_answers', 'Answers received on an RDMA rail that named no waiting call (ignored).'],
]

/** One series per paired rail of every tracked peer, with `rail` (device) and `port` labels. */
function railSeries(sources: MetricsSource[]): Array<{ labels: Record<string, string>; rail: NativeRail }> {
  const locals = localNames(sources)
  return sources.flatMap(({ native }, i) =>
    native.peers.flatMap((p) =>
      p.rails
        .filter((r) => r.state !== 'refused')
        .map((rail) => ({
          labels: { local: locals[i], role: native.role, peer: p.peer, rail: rail.device, port: String(rail.port) },
          rail,
        })),
    ),
  )
}

/** One communicator's counters, as the text renderer takes them. */
export interface MetricsSource {
  native: NativeMetrics
  dropped: DroppedNotices
}

/** How a communicator hands its counters to {@link metricsText} (not public API). */
export const METRICS_SOURCE: unique symbol = Symbol('kvtransfer.metricsSource')

/** Anything that has counters (an `RDMACommunicator`). */
export interface HasMetrics {
  [METRICS_SOURCE](): MetricsSource
}

/** One series (a label set) of every family: a tracked peer, or a communicator's untracked rest. */
interface Series {
  labels: Record<string, string>
  c: NativeCounters
  bounds: number[]
  dropped: number
  /** Whether the latency histogram is written even when no call succeeded. */
  histogram: boolean
}

/**
 * The `local` label of each source: its name, with `#2`, `#3`, ... after a name an earlier
 * source already has (two communicators given the same `name` must still give distinct
 * series; the suffix follows the order of `communicators`).
 */
function localNames(sources: MetricsSource[]): string[] {
  const seen = new Map<string, number>()
  return sources.map(({ native }) => {
    const n = (seen.get(native.name) ?? 0) + 1
    seen.set(native.name, n)
    return n === 1 ? native.name : `${native.name}#${n}`
  })
}

function seriesOf(sources: MetricsSource[]): Series[] {
  const locals = localNames(sources)
  return sources.flatMap(({ native, dropped }, i) => {
    const own = { local: locals[i], role: native.role }
    const bounds = native.latencyBucketUpperUs
    return [
      ...native.peers.map((p) => ({
        labels: { ...own, peer: p.peer, transport: p.transport ?? 'unknown' },
        c: p.counters,
        bounds,
        dropped: dropped.get(p.peer) ?? 0,
        histogram: true,
      })),
      // One series per communicator, without `peer` and `transport`, for what no tracked peer counts.
      {
        labels: own,
        c: native.untracked,
        bounds,
        dropped: untrackedDropped(native, dropped),
        histogram: native.untracked.callsSucceeded > 0,
      },
    ]
  })
}

/**
 * The metrics of `communicators` in the Prometheus text exposition format, one metric
 * family each (so several communicators of one process can be served together):
 * `kvtransfer_*_total` counters, failures by `code`, and the latency histogram
 * `kvtransfer_write_latency_seconds` (`_bucket{le}`, `_sum`, `_count`). Each series has the
 * labels `local` (the communicator's `name`, `hostname:port` by default) and `role`; one
 * series per tracked peer adds `peer` and `transport`, and one per communicator without
 * them counts calls to peers it does not track (never connected; beyond 4096), so that
 * `sum by (local)` gives each communicator's totals. RDMA links add, per tracked peer and
 * paired rail (labels `peer`, `rail`: the local device, `port`), the counters
 * `kvtransfer_rdma_rail_{bytes,work_requests,failures,quarantines,rejoins,answers,stray_answers}_total` and the
 * gauge `kvtransfer_rdma_rail_healthy` (at most 8 rails a peer, 4096 peers). A communicator
 * listed twice is rendered once.
 */
export function metricsText(communicators: HasMetrics[]): string {
  checkCommunicators(communicators)
  const sources = [...new Set(communicators)].map((c) => c[METRICS_SOURCE]())
  const lines: string[] = []
  const series = seriesOf(sources)
  for (const [field, name, help] of COUNTERS) {
    const metric = `kvtransfer_${name}_total`
    lines.push(`# HELP ${metric} ${help}`, `# TYPE ${metric} counter`)
    for (const s of series) {
      const value = s.c[field] + (field === 'noticesDropped' ? s.dropped : 0)
      lines.push(`${metric}${labels(s.labels)} ${value}`)
    }
  }
  const failed = 'kvtransfer_calls_failed_total'
  lines.push(`# HELP ${failed} writeCache calls that rejected (refused ones included), by error code.`)
  lines.push(`# TYPE ${failed} counter`)
  for (const s of series) {
    for (const [code, count] of Object.entries(s.c.failuresByCode)) {
      lines.push(`${failed}${labels({ ...s.labels, code })} ${count}`)
    }
  }
  const hist = 'kvtransfer_write_latency_seconds'
  lines.push(`# HELP ${hist} Latency of writeCache calls that succeeded (submit to completion).`)
  lines.push(`# TYPE ${hist} histogram`)
  for (const s of series) {
    if (!s.histogram) continue
    let cumulative = 0
    s.bounds.forEach((upperUs, i) => {
      cumulative += s.c.latencyBuckets[i] ?? 0
      const le = Number.isFinite(upperUs) ? String(upperUs / 1e6) : '+Inf'
      lines.push(`${hist}_bucket${labels({ ...s.labels, le })} ${cumulative}`)
    })
    lines.push(`${hist}_sum${labels(s.labels)} ${s.c.latencySumUs / 1e6}`)
    lines.push(`${hist}_count${labels(s.labels)} ${s.c.callsSucceeded}`)
  }
  const rails = railSeries(sources)
  if (rails.length > 0) {
    for (const [field, name, help] of RAIL_COUNTERS) {
      const metric = `kvtransfer_rdma_rail_${name}_total`
      lines.push(`# HELP ${metric} ${help}`, `# TYPE ${metric} counter`)
      for (const r of rails) lines.push(`${metric}${labels(r.labels)} ${r.rail[field]}`)
    }
    const up = 'kvtransfer_rdma_rail_healthy'
    lines.push(`# HELP ${up} 1 while an RDMA rail carries work, 0 while it is quarantined or failed.`)
    lines.push(`# TYPE ${up} gauge`)
    for (const r of rails) lines.push(`${up}${labels(r.labels)} ${r.rail.state === 'healthy' ? 1 : 0}`)
  }
  return lines.join('\n') + '\n'
}

/** The content type of {@link metricsText}. */
export const METRICS_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8'

/**
 * A Node `http` request handler serving the metrics of `communicators`, after those of
 * `extra` when given (a prom-client registry: `() => register.metrics()`), e.g.
 * `http.createServer(metricsHandler([comm], () => register.metrics())).listen(9400)`.
 */
export function metricsHandler(
  communicators: HasMetrics[],
  extra?: () => string | Promise<string>,
): (req: IncomingMessage, res: ServerResponse) => void {
  checkCommunicators(communicators)
  if (extra !== undefined && typeof extra !== 'function') {
    throw invalidArgument('extra', `expected a function returning Prometheus text, got ${describeValue(extra)}`)
  }
  return (_req, res) => {
    Promise.resolve(extra ? extra() : '')
      .then((before) => {
        res.writeHead(200, { 'Content-Type': METRICS_CONTENT_TYPE })
        res.end(before + metricsText(communicators))
      })
      .catch((error: unknown) => {
        res.writeHead(500, { 'Content-Type': 'text/plain' })
        res.end(String(error))
      })
  }
}

/** `communicators` of {@link metricsText} / {@link metricsHandler}: an array of communicators. */
function checkCommunicators(communicators: unknown): void {
  if (!Array.isArray(communicators)) {
    throw invalidArgument('communicators', `expected an array of RDMACommunicator, got ${describeValue(communicators)}`)
  }
  communicators.forEach((c: unknown, i) => {
    if (typeof (c as Partial<HasMetrics> | null)?.[METRICS_SOURCE] !== 'function') {
      throw invalidArgument('communicators', `element ${i} is not an RDMACommunicator: got ${describeValue(c)}`)
    }
  })
}
