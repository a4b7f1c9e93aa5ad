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
 *   received and dropped (no listener, or evicted unconsumed beyond `maxPendingArrivals`);
 *   peers keyed by the writer's `name`.
 */
import type { IncomingMessage, ServerResponse } from 'node:http'
import type { NativeCounters, NativeMetrics } from '../index.js'

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
  /** Transport of the last link with the peer (null: only refused calls so far). */
  transport: string | null
}

export interface Metrics extends Counters {
  role: string
  peers: PeerMetrics[]
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
    reconnects: c.reconnects,
  }
}

function sum(map: DroppedNotices): number {
  let total = 0
  for (const n of map.values()) total += n
  return total
}

export function toMetrics(native: NativeMetrics, dropped: DroppedNotices): Metrics {
  return {
    role: native.role,
    ...counters(native.total, sum(dropped)),
    peers: native.peers.map((p) => ({
      peer: p.peer,
      transport: p.transport ?? null,
      ...counters(p.counters, dropped.get(p.peer) ?? 0),
    })),
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
  ['noticesDropped', 'notices_dropped', 'Arrival notices dropped (no listener, or evicted unconsumed).'],
  ['reconnects', 'reconnects', 'Connects that replaced an earlier link to the same peer.'],
]

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

/**
 * The metrics of `communicators` in the Prometheus text exposition format, one metric
 * family each (so several communicators of one process can be served together):
 * `kvtransfer_*_total` counters with labels `role`, `peer`, `transport` (one series per
 * peer), failures by `code`, and the latency histogram `kvtransfer_write_latency_seconds`
 * (`_bucket{le}`, `_sum`, `_count`).
 */
export function metricsText(communicators: HasMetrics[]): string {
  const sources = communicators.map((c) => c[METRICS_SOURCE]())
  const lines: string[] = []
  const series = sources.flatMap(({ native, dropped }) =>
    native.peers.map((p) => ({
      labels: { role: native.role, peer: p.peer, transport: p.transport ?? 'none' },
      c: p.counters,
      bounds: native.latencyBucketUpperUs,
      dropped: dropped.get(p.peer) ?? 0,
    })),
  )
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
    let cumulative = 0
    s.bounds.forEach((upperUs, i) => {
      cumulative += s.c.latencyBuckets[i] ?? 0
      const le = Number.isFinite(upperUs) ? String(upperUs / 1e6) : '+Inf'
      lines.push(`${hist}_bucket${labels({ ...s.labels, le })} ${cumulative}`)
    })
    lines.push(`${hist}_sum${labels(s.labels)} ${s.c.latencySumUs / 1e6}`)
    lines.push(`${hist}_count${labels(s.labels)} ${s.c.callsSucceeded}`)
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
