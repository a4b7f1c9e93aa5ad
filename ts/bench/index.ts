/**
 * `kvtransfer bench`: transfer throughput and call latency between two processes (a
 * prefill driver and a decode agent), side by side with the link's reference limit.
 *
 * Topology: the driver (this process) owns the prefill communicator; the agent owns the
 * decode communicator. By default the driver forks the agent on loopback; for two hosts run
 * `kvtransfer bench --listen PORT` on the decode host and `kvtransfer bench --connect
 * HOST:PORT` on the prefill host. Driver and agent coordinate over one TCP socket carrying
 * newline-delimited JSON (setup, verify, reference stream, perftest server).
 *
 * Per block size: both sides create communicators (`batch` blocks per region, `layers`
 * layers, K+V), the driver connects, warms up (one call per layer), then keeps
 * `concurrency` `writeCache` calls of `batch` ids in flight for `duration` (or
 * `iterations` calls), and finally has the agent compare SHA-256 digests of a sample of
 * blocks (or all of them) against its own. Any mismatch exits non-zero.
 *
 * Reference: TCP: a plain `net` stream between the same two processes (large writes).
 * RDMA: `ib_write_bw` (perftest) at the same message size, when installed.
 */
export {
  type BenchOptions,
  type BenchReport,
  type BenchTransport,
  DEFAULT_SIZES,
  type IdPattern,
  type SizeResult,
  formatSize,
  machineInfo,
  parseSize,
  parseSizes,
} from './common'
export { type PerftestSettings, parsePerftestBandwidth, parsePerftestReport } from './perftest'
export { runAgent } from './agent'
export { type TpSetting, parseBlockLayout, parseTp } from './shards'
export { runBench } from './driver'
export { formatTable, renderSvg } from './report'
export { type OverheadReport, type OverheadRow, formatOverhead, runOverhead } from './overhead'
