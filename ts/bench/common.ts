/**
 * `kvtransfer bench`: options and report types, and the helpers that driver, agent and
 * report share.
 */
import { createHash } from 'node:crypto'
import * as fs from 'node:fs'
import type * as net from 'node:net'
import * as os from 'node:os'
import * as path from 'node:path'
import type { TpSetting } from './shards'

export type BenchTransport = 'tcp' | 'rdma' | 'nvlink'
export type IdPattern = 'scattered' | 'contiguous'

export interface BenchOptions {
  /** Block ids per `writeCache` call (and blocks per region). */
  batch: number
  /** Block sizes in bytes. */
  sizes: number[]
  /** `writeCache` calls kept in flight. */
  concurrency: number
  layers: number
  /** Bytes per fp8 scale block (K-scale and V-scale regions per layer); 0: none. */
  scales: number
  /** Tensor-parallel pairing (`--tp P:D`, `--block-layout`); default 1:1 head-major. */
  tp: TpSetting
  transport: BenchTransport
  pattern: IdPattern
  /** Timed calls per size; when absent, `durationMs` decides. */
  iterations?: number
  durationMs: number
  /** Calls before timing starts (at least one per layer is always made). */
  warmup: number
  verify: 'sample' | 'full'
  /** Blocks compared per size with `verify: 'sample'`. */
  samples: number
  /** Milliseconds of the plain TCP reference stream (0: skip). */
  streamMs: number
  json?: string
  svg?: string
  /** `host:port` of an agent started with `--listen` on another host. */
  connect?: string
  rdmaDevice?: string
  gidIndex?: number
  perftestIterations: number
  perftestPort: number
  /** Calls write a block list prepared once (`prepareBlocks`), as FastDeploy's cache
   * messager writes the same ids for every layer. */
  prepared: boolean
  /** GPU of the prefill regions (device memory; NVLink, or GPU regions over TCP/RDMA). */
  srcGpu?: number
  /** GPU of the decode regions. */
  dstGpu?: number
  progress: boolean
}

export const DEFAULT_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256].map((k) => k * 1024)

export interface SizeResult {
  blockBytes: number
  calls: number
  bytes: number
  seconds: number
  gbps: number
  /** Blocks per second; K and V blocks count separately (bytes/s ÷ blockBytes). */
  blocksPerSec: number
  callsPerSec: number
  p50Ms: number
  p99Ms: number
  /** GB/s of the reference at this size (TCP: the plain stream; RDMA: ib_write_bw; NVLink: the device-to-device copy). */
  referenceGbps?: number
  ratio?: number
  verified: { checked: number; mismatches: number; detail: string[] }
  /** RDMA: bytes each rail (local device and port) carried during the timed calls. */
  rails?: Array<{ device: string; port: number; bytes: number }>
}

export interface BenchReport {
  tool: 'kvtransfer bench'
  date: string
  machine: ReturnType<typeof machineInfo>
  options: Omit<BenchOptions, 'progress'>
  peer: string
  reference: {
    /** The ratio's reference: a stream with the transfer's memory footprint. */
    stream?: { gbps: number; bytes: number; seconds: number; chunkBytes: number; note: string }
    /** The same stream between hot 4 MiB buffers (the loopback ceiling, like iperf3). */
    streamHot?: { gbps: number; bytes: number; seconds: number; chunkBytes: number; note: string }
    /** ib_write_bw per size; `raw`: the header and data row parsed (or why not). */
    perftest?: Array<{ size: number; gbps?: number; raw?: string; skipped?: string }>
    /** NVLink: one large device-to-device copy between the two GPUs (the link's ceiling). */
    link?: { gbps: number; bytes: number; note: string }
    skipped?: string
  }
  results: SizeResult[]
  ok: boolean
}

export function errorText(error: unknown): string {
  if (error instanceof Error)
    return (error as { code?: string }).code ? `${(error as { code?: string }).code}: ${error.message}` : error.message
  return String(error)
}

export function digest(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex')
}

export function machineInfo() {
  const cpus = os.cpus()
  return {
    hostname: os.hostname(),
    cpu: cpus[0]?.model ?? 'unknown',
    cores: cpus.length,
    memoryGiB: Math.round(os.totalmem() / 2 ** 30),
    kernel: `${os.type()} ${os.release()}`,
    node: process.version,
  }
}

/** `1024` → `1 KiB`. */
export function formatSize(bytes: number): string {
  if (bytes >= 2 ** 20 && bytes % 2 ** 20 === 0) return `${bytes / 2 ** 20} MiB`
  if (bytes >= 1024 && bytes % 1024 === 0) return `${bytes / 1024} KiB`
  return `${bytes} B`
}

/** `64K`, `64k`, `65536`, `1M` → bytes. */
export function parseSize(text: string): number {
  const m = /^(\d+)\s*([kKmM]?)(i?[bB])?$/.exec(text.trim())
  if (!m) throw new Error(`'${text}' is not a size (e.g. 4K, 65536, 1M)`)
  const unit = m[2].toLowerCase() === 'k' ? 1024 : m[2].toLowerCase() === 'm' ? 2 ** 20 : 1
  return Number(m[1]) * unit
}

/** `1K-256K` (powers of two in between), `1K,64K`, or a mix. */
export function parseSizes(text: string): number[] {
  const out: number[] = []
  for (const part of text
    .split(',')
    .map((p) => p.trim())
    .filter(Boolean)) {
    const range = /^(.+?)-(.+)$/.exec(part)
    if (range) {
      const [lo, hi] = [parseSize(range[1]), parseSize(range[2])]
      for (let s = lo; s <= hi; s *= 2) out.push(s)
    } else {
      out.push(parseSize(part))
    }
  }
  if (out.length === 0 || out.some((s) => !Number.isInteger(s) || s < 1))
    throw new Error(`'${text}' selects no block sizes`)
  return [...new Set(out)].sort((a, b) => a - b)
}

/** A random permutation of `0..n` (Fisher–Yates, `Math.random` is fine for a benchmark). */
export function permutation(n: number): Uint32Array {
  const ids = new Uint32Array(n)
  for (let i = 0; i < n; i++) ids[i] = i
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1))
    const t = ids[i]
    ids[i] = ids[j]
    ids[j] = t
  }
  return ids
}

export function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return Number.NaN
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))]
}

export function findOnPath(binary: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    const candidate = path.join(dir, binary)
    try {
      fs.accessSync(candidate, fs.constants.X_OK)
      return candidate
    } catch {
      // not here
    }
  }
  return undefined
}

export function listen(server: net.Server, port: number, host?: string): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, host, () => resolve((server.address() as net.AddressInfo).port))
  })
}

/** A `\r` progress line on stderr (only on a terminal), at most 4 updates a second. */
export class Progress {
  private last = 0
  private readonly enabled: boolean
  constructor(enabled: boolean) {
    // A `\r` progress line only makes sense on a terminal.
    this.enabled = enabled && process.stderr.isTTY === true
  }
  update(text: string, force = false): void {
    if (!this.enabled) return
    const now = Date.now()
    if (!force && now - this.last < 250) return
    this.last = now
    process.stderr.write(`\r${text.padEnd(78)}`)
  }
  clear(): void {
    if (this.enabled) process.stderr.write(`\r${' '.repeat(78)}\r`)
  }
}
