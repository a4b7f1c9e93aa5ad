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
import { ChildProcess, fork, spawn } from 'node:child_process'
import { createHash, randomFillSync } from 'node:crypto'
import * as fs from 'node:fs'
import * as net from 'node:net'
import * as os from 'node:os'
import * as path from 'node:path'
import { RDMACommunicator } from './index'

export type BenchTransport = 'tcp' | 'rdma'
export type IdPattern = 'scattered' | 'contiguous'

export interface BenchOptions {
  /** Block ids per `writeCache` call (and blocks per region). */
  batch: number
  /** Block sizes in bytes. */
  sizes: number[]
  /** `writeCache` calls kept in flight. */
  concurrency: number
  layers: number
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
  /** GB/s of the reference at this size (stream for TCP, ib_write_bw for RDMA). */
  referenceGbps?: number
  ratio?: number
  verified: { checked: number; mismatches: number; detail: string[] }
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
    skipped?: string
  }
  results: SizeResult[]
  ok: boolean
}

// ---------------------------------------------------------------------------------------
// Coordination: newline-delimited JSON over one TCP socket.

type Json = Record<string, unknown>

class Channel {
  private buffered = ''
  private readonly queue: Json[] = []
  private readonly waiting: Array<{ resolve: (m: Json) => void; reject: (e: Error) => void }> = []
  private closedError: Error | undefined

  constructor(readonly socket: net.Socket) {
    socket.setNoDelay(true)
    socket.setEncoding('utf8')
    socket.on('data', (chunk: string) => {
      this.buffered += chunk
      let nl: number
      while ((nl = this.buffered.indexOf('\n')) >= 0) {
        const line = this.buffered.slice(0, nl)
        this.buffered = this.buffered.slice(nl + 1)
        if (line.trim() === '') continue
        const message = JSON.parse(line) as Json
        const waiter = this.waiting.shift()
        if (waiter) waiter.resolve(message)
        else this.queue.push(message)
      }
    })
    const onClose = (error?: Error) => {
      this.closedError ??= error ?? new Error('the bench peer closed the coordination socket')
      for (const waiter of this.waiting.splice(0)) waiter.reject(this.closedError)
    }
    socket.on('error', onClose)
    socket.on('close', () => onClose())
  }

  send(message: Json): void {
    this.socket.write(`${JSON.stringify(message)}\n`)
  }

  next(): Promise<Json> {
    const queued = this.queue.shift()
    if (queued) return Promise.resolve(queued)
    if (this.closedError) return Promise.reject(this.closedError)
    return new Promise((resolve, reject) => this.waiting.push({ resolve, reject }))
  }

  /** Sends a request and returns the reply; a reply with `error` becomes an exception. */
  async call(message: Json): Promise<Json> {
    this.send(message)
    const reply = await this.next()
    if (typeof reply.error === 'string') throw new Error(`bench agent: ${reply.error}`)
    return reply
  }
}

// ---------------------------------------------------------------------------------------
// Shared helpers

function errorText(error: unknown): string {
  if (error instanceof Error) return (error as { code?: string }).code ? `${(error as { code?: string }).code}: ${error.message}` : error.message
  return String(error)
}

function digest(bytes: Uint8Array): string {
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
  for (const part of text.split(',').map((p) => p.trim()).filter(Boolean)) {
    const range = /^(.+?)-(.+)$/.exec(part)
    if (range) {
      const [lo, hi] = [parseSize(range[1]), parseSize(range[2])]
      for (let s = lo; s <= hi; s *= 2) out.push(s)
    } else {
      out.push(parseSize(part))
    }
  }
  if (out.length === 0 || out.some((s) => !Number.isInteger(s) || s < 1)) throw new Error(`'${text}' selects no block sizes`)
  return [...new Set(out)].sort((a, b) => a - b)
}

/** A random permutation of `0..n` (Fisher–Yates, `Math.random` is fine for a benchmark). */
function permutation(n: number): Uint32Array {
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

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return Number.NaN
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))]
}

function findOnPath(binary: string): string | undefined {
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

function listen(server: net.Server, port: number, host?: string): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, host, () => resolve((server.address() as net.AddressInfo).port))
  })
}

// ---------------------------------------------------------------------------------------
// perftest (ib_write_bw) for the RDMA reference

export interface PerftestSettings {
  device: string
  gidIndex: number
  size: number
  iterations: number
  port: number
}

function perftestArgs(s: PerftestSettings): string[] {
  return ['-d', s.device, '-x', String(s.gidIndex), '-s', String(s.size), '-n', String(s.iterations), '-F', '-p', String(s.port)]
}

/**
 * The `BW average[MB/sec]` figure of an `ib_write_bw` report, in GB/s (perftest's MB is
 * 2^20 bytes). Undefined when the report has no such table or the figure is not a positive
 * number (`raw` then holds the line it looked at, for the report).
 */
export function parsePerftestBandwidth(output: string): number | undefined {
  return parsePerftestReport(output).gbps
}

export function parsePerftestReport(output: string): { gbps?: number; raw: string } {
  const lines = output.split('\n')
  const at = lines.findIndex((l) => l.includes('BW average[MB/sec]'))
  if (at < 0) return { raw: lines.map((l) => l.trim()).filter(Boolean).slice(-3).join(' | ') }
  const columns = lines[at].trim().split(/\s{2,}/)
  const column = columns.findIndex((c) => c.includes('BW average'))
  for (const line of lines.slice(at + 1)) {
    const fields = line.trim().split(/\s+/)
    if (fields.length >= columns.length && /^\d+$/.test(fields[0])) {
      const mbps = Number(fields[column])
      const raw = `${lines[at].trim()} / ${line.trim()}`
      return Number.isFinite(mbps) && mbps > 0 ? { gbps: (mbps * 2 ** 20) / 1e9, raw } : { raw }
    }
  }
  return { raw: `${lines[at].trim()} / (no data row)` }
}

function runProcess(binary: string, args: string[], timeoutMs: number): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve) => {
    const child = spawn(binary, args, { stdio: ['ignore', 'pipe', 'pipe'] })
    let output = ''
    child.stdout.on('data', (d) => (output += d))
    child.stderr.on('data', (d) => (output += d))
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
    child.on('error', (e) => {
      clearTimeout(timer)
      resolve({ code: -1, output: output + String(e) })
    })
    child.on('close', (code) => {
      clearTimeout(timer)
      resolve({ code, output })
    })
  })
}

/** Whether a TCP socket listens on `port` (Linux: /proc/net/tcp{,6}); undefined elsewhere. */
function tcpListening(port: number): boolean | undefined {
  const hex = `:${port.toString(16).toUpperCase().padStart(4, '0')}`
  let known = false
  for (const file of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let text: string
    try {
      text = fs.readFileSync(file, 'utf8')
    } catch {
      continue
    }
    known = true
    // local_address rem_address st: LISTEN is state 0A.
    for (const line of text.split('\n')) {
      const fields = line.trim().split(/\s+/)
      if (fields[1]?.endsWith(hex) && fields[3] === '0A') return true
    }
  }
  return known ? false : undefined
}

interface PerftestServer {
  child: ChildProcess
  output: () => string
  exited: Promise<void>
}

/**
 * Starts an `ib_write_bw` server and resolves once it listens on its port (polled in
 * /proc/net/tcp: its "Waiting for client" banner sits in a block-buffered pipe), or it
 * exited, or after 20 s. Under TCG the server takes 0.3–2.5 s to listen; a fixed wait
 * let the client connect too early.
 */
function startPerftestServer(binary: string, settings: PerftestSettings): Promise<PerftestServer> {
  return new Promise((resolve) => {
    const child = spawn(binary, perftestArgs(settings), { stdio: ['ignore', 'pipe', 'pipe'] })
    let output = ''
    let done = false
    child.stdout?.on('data', (d: Buffer) => (output += d.toString()))
    child.stderr?.on('data', (d: Buffer) => (output += d.toString()))
    const exited = new Promise<void>((r) => child.once('close', () => r()))
    const server: PerftestServer = { child, output: () => output, exited }
    const finish = () => {
      if (done) return
      done = true
      clearInterval(poll)
      clearTimeout(timer)
      resolve(server)
    }
    const started = Date.now()
    const poll = setInterval(() => {
      const listening = tcpListening(settings.port)
      if (listening === true || output.includes('Waiting for client') || (listening === undefined && Date.now() - started > 1500)) finish()
    }, 50)
    const timer = setTimeout(finish, 20_000)
    void exited.then(finish)
    child.on('error', finish)
    setTimeout(() => child.kill('SIGKILL'), 180_000).unref()
  })
}

/** Stops a perftest server (if still running) and waits for it to exit. */
async function stopPerftestServer(server: PerftestServer | undefined): Promise<string> {
  if (!server) return ''
  if (server.child.exitCode === null && server.child.signalCode === null) {
    const timer = setTimeout(() => server.child.kill('SIGKILL'), 5000)
    // A server whose client finished exits by itself; give it a moment first.
    await Promise.race([server.exited, new Promise((r) => setTimeout(r, 3000))])
    server.child.kill()
    await server.exited
    clearTimeout(timer)
  }
  return server.output()
}

function rdmaDevice(options: { rdmaDevice?: string }): string | undefined {
  return options.rdmaDevice ?? (process.env.KVCACHE_RDMA_NICS ?? '').split(',').map((s) => s.trim()).find(Boolean)
}

function gidIndex(options: { gidIndex?: number }): number {
  return options.gidIndex ?? Number(process.env.KVCACHE_RDMA_GID_INDEX ?? 3)
}

// ---------------------------------------------------------------------------------------
// Agent (decode side)

interface AgentState {
  layers: number
  blocks: number
  keys: Buffer[]
  values: Buffer[]
  comm?: RDMACommunicator
  blockBytes: number
  perftest?: PerftestServer
}

async function handleAgentRequest(state: AgentState, message: Json, channel: Channel): Promise<Json> {
  switch (message.op) {
    case 'init': {
      state.layers = Number(message.layers)
      state.blocks = Number(message.blocks)
      const bytes = state.blocks * Number(message.maxBlockBytes)
      // Touched now (fill), so that neither the reference stream nor the first size pays
      // first-touch page faults that a resident KV cache would not have.
      const alloc = () => Array.from({ length: state.layers }, () => Buffer.allocUnsafe(bytes).fill(0))
      state.keys = alloc()
      state.values = alloc()
      return { ok: true, host: os.hostname(), machine: machineInfo() }
    }
    case 'setup': {
      await state.comm?.close()
      state.comm = undefined
      const blockBytes = Number(message.blockBytes)
      const used = state.blocks * blockBytes
      // Zero the part in use so that stale bytes from an earlier size cannot pass verification.
      for (const region of [...state.keys, ...state.values]) region.fill(0, 0, used)
      const comm = new RDMACommunicator({
        role: 'decode',
        gpuIdx: 0,
        port: 0,
        localKeyCache: state.keys.map((r) => r.subarray(0, used)),
        localValueCache: state.values.map((r) => r.subarray(0, used)),
        blockNumber: state.blocks,
        blockBytes,
        transport: message.transport as BenchTransport,
      })
      await comm.ready
      state.comm = comm
      state.blockBytes = blockBytes
      return { ok: true, port: comm.port, transport: comm.transport }
    }
    case 'verify': {
      const samples = message.samples as Array<[number, number, number, string]>
      const mismatches: string[] = []
      let bad = 0
      for (const [layer, kind, remote, expected] of samples) {
        const region = (kind === 0 ? state.keys : state.values)[layer]
        const got = digest(region.subarray(remote * state.blockBytes, (remote + 1) * state.blockBytes))
        if (got !== expected) {
          bad++
          if (mismatches.length < 5) mismatches.push(`layer ${layer} ${kind === 0 ? 'K' : 'V'} block ${remote}`)
        }
      }
      return { ok: true, checked: samples.length, mismatches: bad, detail: mismatches }
    }
    case 'stream': {
      // The reference: a plain TCP stream from the driver into this process, counted and
      // discarded. This side connects (so that it can read with a 4 MiB `onread` buffer,
      // one syscall per up to 4 MiB like iperf, instead of net's default 64 KiB chunks).
      const host = String(message.host ?? channel.socket.remoteAddress ?? '127.0.0.1')
      let bytes = 0
      let first = 0n
      // walk: read into successive 4 MiB slices of the decode regions (the transfer's
      // memory footprint: cold destination pages); else into one hot 4 MiB buffer.
      const chunk = 4 * 2 ** 20
      const hot = Buffer.allocUnsafe(chunk)
      const slices = message.walk ? [...state.keys, ...state.values].flatMap((r) => Array.from({ length: Math.floor(r.length / chunk) }, (_, i) => r.subarray(i * chunk, (i + 1) * chunk))) : []
      let next = 0
      const socket = net.connect({
        host,
        port: Number(message.port),
        onread: {
          buffer: slices.length > 0 ? () => slices[next++ % slices.length] : hot,
          callback: (n: number) => {
            if (bytes === 0) first = process.hrtime.bigint()
            bytes += n
            return true
          },
        },
      })
      socket.on('error', () => undefined)
      socket.on('end', () => {
        const seconds = Number(process.hrtime.bigint() - first) / 1e9
        channel.send({ op: 'stream-done', bytes, seconds })
        socket.end()
      })
      return { ok: true }
    }
    case 'perftest-server': {
      const binary = findOnPath('ib_write_bw')
      if (!binary) return { ok: false, skipped: 'ib_write_bw is not installed on the decode host' }
      // The previous size's server must be gone (it could still hold its port or its QP).
      await stopPerftestServer(state.perftest)
      state.perftest = await startPerftestServer(binary, message.settings as PerftestSettings)
      if (state.perftest.child.exitCode !== null) {
        const output = state.perftest.output().trim().split('\n').slice(-2).join(' | ')
        return { ok: false, skipped: `ib_write_bw server exited (${state.perftest.child.exitCode}): ${output}` }
      }
      return { ok: true }
    }
    case 'perftest-stop': {
      const output = await stopPerftestServer(state.perftest)
      state.perftest = undefined
      return { ok: true, output: output.slice(-4000) }
    }
    case 'close': {
      await state.comm?.close()
      state.comm = undefined
      return { ok: true }
    }
    default:
      return { error: `unknown request ${JSON.stringify(message.op)}` }
  }
}

async function serveDriver(socket: net.Socket): Promise<void> {
  const channel = new Channel(socket)
  const state: AgentState = { layers: 0, blocks: 0, keys: [], values: [], blockBytes: 0 }
  try {
    for (;;) {
      const message = await channel.next()
      let reply: Json
      try {
        reply = await handleAgentRequest(state, message, channel)
      } catch (error) {
        reply = { error: errorText(error) }
      }
      channel.send(reply)
      if (message.op === 'close') break
    }
  } catch {
    // The driver went away.
  } finally {
    await state.comm?.close().catch(() => undefined)
    state.perftest?.child.kill()
    socket.end()
  }
}

/**
 * Runs the decode agent on `port` (0: any). With `ipc` (forked by a local driver) it
 * reports the port over IPC and exits after one driver; otherwise it serves drivers one
 * after the other until killed.
 */
export async function runAgent(port: number, ipc: boolean): Promise<void> {
  const server = net.createServer()
  const bound = await listen(server, port, ipc ? '127.0.0.1' : undefined)
  if (ipc) {
    process.send?.({ port: bound })
    const socket = await new Promise<net.Socket>((resolve) => server.once('connection', resolve))
    server.close()
    await serveDriver(socket)
    process.disconnect?.()
    return
  }
  console.error(`kvtransfer bench agent: listening on port ${bound}; run 'kvtransfer bench --connect <this-host>:${bound}' on the prefill host`)
  let busy = Promise.resolve()
  server.on('connection', (socket) => {
    console.error(`kvtransfer bench agent: driver ${socket.remoteAddress}:${socket.remotePort} connected`)
    busy = busy.then(() => serveDriver(socket))
  })
  await new Promise<void>(() => undefined)
}

// ---------------------------------------------------------------------------------------
// Driver (prefill side)

interface Agent {
  channel: Channel
  /** Address of the agent as seen from here (for the communicator and the stream). */
  host: string
  child?: ChildProcess
  describe: string
}

async function connectSocket(host: string, port: number, timeoutMs = 15_000): Promise<net.Socket> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    try {
      return await new Promise<net.Socket>((resolve, reject) => {
        const socket = net.connect({ host, port }, () => resolve(socket))
        socket.once('error', reject)
      })
    } catch (error) {
      if (Date.now() > deadline) throw error
      await new Promise((r) => setTimeout(r, 200))
    }
  }
}

async function startAgent(options: BenchOptions): Promise<Agent> {
  if (options.connect) {
    const m = /^(.*):(\d+)$/.exec(options.connect)
    if (!m) throw new Error(`--connect expects host:port, got '${options.connect}'`)
    const host = m[1].replace(/^\[(.*)\]$/, '$1')
    const socket = await connectSocket(host, Number(m[2]))
    return { channel: new Channel(socket), host, describe: `agent at ${options.connect}` }
  }
  const cli = path.join(__dirname, 'cli.js')
  const child = fork(cli, ['bench', '--listen', '0', '--agent-ipc'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  const port = await new Promise<number>((resolve, reject) => {
    child.once('message', (m: { port: number }) => resolve(m.port))
    child.once('exit', (code) => reject(new Error(`the bench agent exited with code ${code} before listening`)))
  })
  const socket = await connectSocket('127.0.0.1', port)
  return { channel: new Channel(socket), host: '127.0.0.1', child, describe: `forked agent (pid ${child.pid}) on loopback` }
}

class Progress {
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

/**
 * A plain TCP stream from here into the agent for `ms` milliseconds, in 4 MiB writes. With
 * `walk`, the writes walk through the prefill regions and the agent reads into its decode
 * regions (the same memory traffic as a transfer); else both use one hot 4 MiB buffer.
 */
async function referenceStream(agent: Agent, ms: number, progress: Progress, prefill: Prefill, walk: boolean) {
  const chunkBytes = 4 * 2 ** 20
  const server = net.createServer()
  const port = await listen(server, 0, agent.child ? '127.0.0.1' : undefined)
  const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve))
  await agent.channel.call({ op: 'stream', port, host: agent.child ? '127.0.0.1' : undefined, walk })
  const socket = await accepted
  server.close()
  socket.setNoDelay(true)
  const slices = walk
    ? [...prefill.keys, ...prefill.values].flatMap((r) => Array.from({ length: Math.floor(r.length / chunkBytes) }, (_, i) => r.subarray(i * chunkBytes, (i + 1) * chunkBytes)))
    : []
  if (slices.length === 0) slices.push(randomFillSync(Buffer.allocUnsafe(chunkBytes)))
  const start = process.hrtime.bigint()
  const deadline = start + BigInt(ms) * 1_000_000n
  let sent = 0
  while (process.hrtime.bigint() < deadline) {
    if (!socket.write(slices[(sent / chunkBytes) % slices.length])) await new Promise((r) => socket.once('drain', r))
    sent += chunkBytes
    const seconds = Number(process.hrtime.bigint() - start) / 1e9
    progress.update(`[reference] TCP stream  ${(sent / seconds / 1e9).toFixed(2)} GB/s`)
  }
  socket.end()
  const done = (await agent.channel.next()) as { bytes: number; seconds: number }
  const seconds = Number(process.hrtime.bigint() - start) / 1e9
  socket.destroy()
  progress.clear()
  return {
    gbps: done.bytes / seconds / 1e9,
    bytes: done.bytes,
    seconds,
    chunkBytes,
    note: walk
      ? 'node net stream between the same two processes, 4 MiB writes walking the prefill regions, 4 MiB reads walking the decode regions'
      : 'node net stream between the same two processes, 4 MiB writes from and reads into one hot 4 MiB buffer',
  }
}

/**
 * ib_write_bw at each of `sizes` (default: all of the grid). `runBench` measures each size
 * right before the transfer at that size, so a shared host's drifting load hits both
 * alike (Soft-RoCE under TCG varies ±20 % over minutes).
 */
async function perftestReference(
  agent: Agent,
  options: BenchOptions,
  progress: Progress,
  sizes: number[] = options.sizes,
): Promise<BenchReport['reference']['perftest']> {
  const binary = findOnPath('ib_write_bw')
  const device = rdmaDevice(options)
  if (!binary) return sizes.map((size) => ({ size, skipped: 'ib_write_bw (perftest) is not installed' }))
  if (!device) return sizes.map((size) => ({ size, skipped: 'no RDMA device: pass --rdma-dev or set KVCACHE_RDMA_NICS' }))
  if (options.perftestIterations === 0) return sizes.map((size) => ({ size, skipped: 'disabled (--perftest-iters 0)' }))
  const out: NonNullable<BenchReport['reference']['perftest']> = []
  for (const size of sizes) {
    const index = Math.max(0, options.sizes.indexOf(size))
    // One port per size (and per attempt): a port is never reused while the previous
    // server's socket may linger.
    let entry: NonNullable<BenchReport['reference']['perftest']>[number] | undefined
    for (let attempt = 0; attempt < 2 && !entry?.gbps; attempt++) {
      progress.update(`[reference] ib_write_bw -s ${size}${attempt > 0 ? ' (retry)' : ''}`, true)
      const settings: PerftestSettings = {
        device,
        gidIndex: gidIndex(options),
        size,
        iterations: options.perftestIterations,
        port: options.perftestPort + 2 * index + attempt,
      }
      const server = (await agent.channel.call({ op: 'perftest-server', settings })) as { ok: boolean; skipped?: string }
      if (!server.ok) {
        entry = { size, skipped: server.skipped ?? 'the agent could not start ib_write_bw' }
        continue
      }
      const client = await runProcess(binary, [...perftestArgs(settings), agent.host], 120_000)
      const stopped = (await agent.channel.call({ op: 'perftest-stop' }).catch(() => ({}))) as { output?: string }
      const parsed = parsePerftestReport(client.output)
      if (parsed.gbps !== undefined) {
        entry = { size, gbps: parsed.gbps, raw: parsed.raw }
      } else {
        const serverTail = (stopped.output ?? '').trim().split('\n').slice(-2).join(' | ')
        entry = { size, skipped: `ib_write_bw gave no bandwidth (client exit ${client.code}): ${parsed.raw}${serverTail ? ` [server: ${serverTail}]` : ''}` }
        progress.clear()
        console.error(`ib_write_bw -s ${size}, attempt ${attempt + 1}: unparsable report: ${parsed.raw}`)
      }
    }
    if (entry) out.push(entry)
  }
  progress.clear()
  return out
}

interface Prefill {
  keys: Buffer[]
  values: Buffer[]
}

async function benchSize(agent: Agent, options: BenchOptions, prefill: Prefill, blockBytes: number, progress: Progress): Promise<SizeResult> {
  const label = formatSize(blockBytes).padStart(7)
  const setup = (await agent.channel.call({
    op: 'setup',
    blockBytes,
    transport: options.transport,
  })) as { port: number; transport: string }
  const used = options.batch * blockBytes
  const comm = new RDMACommunicator({
    role: 'prefill',
    gpuIdx: 0,
    port: 0,
    localKeyCache: prefill.keys.map((r) => r.subarray(0, used)),
    localValueCache: prefill.values.map((r) => r.subarray(0, used)),
    blockNumber: options.batch,
    blockBytes,
    transport: options.transport,
  })
  try {
    await comm.connect(agent.host, setup.port)
    const local = options.pattern === 'scattered' ? permutation(options.batch) : Uint32Array.from({ length: options.batch }, (_, i) => i)
    const remote = options.pattern === 'scattered' ? permutation(options.batch) : local
    const call = (layer: number) => comm.writeCache(agent.host, setup.port, local, remote, layer)
    // Warm-up: every layer once (so every block verified below was written), plus extra calls.
    for (let layer = 0; layer < options.layers; layer++) await call(layer)
    for (let i = 0; i < options.warmup; i++) await call(i % options.layers)

    const bytesPerCall = options.batch * blockBytes * 2
    const latencies: number[] = []
    let issued = 0
    let finished = 0
    const start = process.hrtime.bigint()
    const deadline = start + BigInt(options.durationMs) * 1_000_000n
    const more = () =>
      options.iterations !== undefined ? issued < options.iterations : process.hrtime.bigint() < deadline || issued < 3
    const lane = async () => {
      while (more()) {
        const layer = issued++ % options.layers
        const t0 = process.hrtime.bigint()
        await call(layer)
        latencies.push(Number(process.hrtime.bigint() - t0) / 1e6)
        finished++
        const seconds = Number(process.hrtime.bigint() - start) / 1e9
        progress.update(`[${label}] ${finished} calls  ${((finished * bytesPerCall) / seconds / 1e9).toFixed(2)} GB/s  ${seconds.toFixed(1)} s`)
      }
    }
    await Promise.all(Array.from({ length: options.concurrency }, lane))
    const seconds = Number(process.hrtime.bigint() - start) / 1e9
    progress.update(`[${label}] verifying`, true)

    // Verification: digests of (a sample of) the written blocks, compared by the agent.
    const samples: Array<[number, number, number, string]> = []
    const all = options.verify === 'full'
    const total = options.layers * 2 * options.batch
    const count = all ? total : Math.min(options.samples, total)
    const picked = all ? null : new Set<number>()
    while (picked && picked.size < count) picked.add(Math.floor(Math.random() * total))
    for (const index of picked ?? Array.from({ length: total }, (_, i) => i)) {
      const layer = Math.floor(index / (2 * options.batch))
      const kind = Math.floor(index / options.batch) % 2
      const i = index % options.batch
      const region = (kind === 0 ? prefill.keys : prefill.values)[layer]
      samples.push([layer, kind, remote[i], digest(region.subarray(local[i] * blockBytes, (local[i] + 1) * blockBytes))])
    }
    const verdict = (await agent.channel.call({ op: 'verify', samples })) as { checked: number; mismatches: number; detail: string[] }
    progress.clear()
    latencies.sort((a, b) => a - b)
    const bytes = finished * bytesPerCall
    return {
      blockBytes,
      calls: finished,
      bytes,
      seconds,
      gbps: bytes / seconds / 1e9,
      blocksPerSec: bytes / seconds / blockBytes,
      callsPerSec: finished / seconds,
      p50Ms: percentile(latencies, 50),
      p99Ms: percentile(latencies, 99),
      verified: { checked: verdict.checked, mismatches: verdict.mismatches, detail: verdict.detail },
    }
  } finally {
    await comm.close()
  }
}

function fmt(value: number | undefined, digits: number): string {
  return value === undefined || !Number.isFinite(value) ? '-' : value.toFixed(digits)
}

function fmtCount(value: number): string {
  if (value >= 1e6) return `${(value / 1e6).toFixed(2)} M`
  if (value >= 1e3) return `${(value / 1e3).toFixed(1)} k`
  return value.toFixed(0)
}

export function formatTable(report: BenchReport): string {
  const refName = report.options.transport === 'rdma' ? 'ib_write_bw' : 'TCP stream'
  const header = ['block', 'GB/s', `${refName} GB/s`, 'ratio', 'blocks/s', 'calls/s', 'p50 ms', 'p99 ms', 'verified']
  const rows = report.results.map((r) => [
    formatSize(r.blockBytes),
    fmt(r.gbps, 2),
    fmt(r.referenceGbps, 2),
    fmt(r.ratio, 2),
    fmtCount(r.blocksPerSec),
    fmt(r.callsPerSec, 0),
    fmt(r.p50Ms, 2),
    fmt(r.p99Ms, 2),
    r.verified.mismatches === 0 ? `ok ${r.verified.checked}` : `FAIL ${r.verified.mismatches}/${r.verified.checked}`,
  ])
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)))
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ')
  return [line(header), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(line)].join('\n')
}

/** A hand-written SVG line chart of GB/s against block size (log2 axis). */
export function renderSvg(report: BenchReport): string {
  const W = 760
  const H = 440
  const m = { left: 64, right: 24, top: 48, bottom: 56 }
  const results = report.results
  const refs = results.map((r) => r.referenceGbps ?? 0)
  const maxY = Math.max(0.1, ...results.map((r) => r.gbps), ...refs) * 1.15
  const xs = results.map((r) => Math.log2(r.blockBytes))
  const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)]
  const px = (x: number) => m.left + ((x - x0) / (x1 - x0)) * (W - m.left - m.right)
  const py = (y: number) => H - m.bottom - (y / maxY) * (H - m.top - m.bottom)
  const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')
  const parts: string[] = []
  parts.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`)
  parts.push(`<rect width="${W}" height="${H}" fill="white"/>`)
  const o = report.options
  parts.push(
    `<text x="${W / 2}" y="20" text-anchor="middle" font-size="14">${esc(
      `kvtransfer ${o.transport}: batch ${o.batch} ${o.pattern} ids, ${o.layers} layers K+V, ${o.concurrency} in flight`,
    )}</text>`,
  )
  parts.push(`<text x="${W / 2}" y="36" text-anchor="middle" fill="#666">${esc(`${report.machine.cpu}, ${report.machine.cores} cores, ${report.peer}`)}</text>`)
  const step = maxY > 8 ? 2 : maxY > 4 ? 1 : maxY > 1.5 ? 0.5 : 0.1
  for (let y = 0; y <= maxY; y += step) {
    parts.push(`<line x1="${m.left}" x2="${W - m.right}" y1="${py(y)}" y2="${py(y)}" stroke="#e5e5e5"/>`)
    parts.push(`<text x="${m.left - 8}" y="${py(y) + 4}" text-anchor="end">${y.toFixed(step < 1 ? 1 : 0)}</text>`)
  }
  for (const r of results) {
    const x = px(Math.log2(r.blockBytes))
    parts.push(`<line x1="${x}" x2="${x}" y1="${m.top}" y2="${H - m.bottom}" stroke="#f0f0f0"/>`)
    parts.push(`<text x="${x}" y="${H - m.bottom + 18}" text-anchor="middle">${esc(formatSize(r.blockBytes).replace(' ', ''))}</text>`)
  }
  parts.push(`<line x1="${m.left}" x2="${W - m.right}" y1="${py(0)}" y2="${py(0)}" stroke="#333"/>`)
  parts.push(`<line x1="${m.left}" x2="${m.left}" y1="${m.top}" y2="${py(0)}" stroke="#333"/>`)
  parts.push(`<text x="${W / 2}" y="${H - 14}" text-anchor="middle">block size</text>`)
  parts.push(`<text transform="translate(18 ${(m.top + H - m.bottom) / 2}) rotate(-90)" text-anchor="middle">GB/s</text>`)
  const refPoints = results.filter((r) => r.referenceGbps !== undefined)
  if (refPoints.length > 0) {
    const d = refPoints.map((r) => `${px(Math.log2(r.blockBytes))},${py(r.referenceGbps ?? 0)}`).join(' ')
    parts.push(`<polyline points="${d}" fill="none" stroke="#999" stroke-width="2" stroke-dasharray="6 4"/>`)
  }
  const d = results.map((r) => `${px(Math.log2(r.blockBytes))},${py(r.gbps)}`).join(' ')
  parts.push(`<polyline points="${d}" fill="none" stroke="#1f77b4" stroke-width="2.5"/>`)
  for (const r of results) {
    const x = px(Math.log2(r.blockBytes))
    const color = r.verified.mismatches === 0 ? '#1f77b4' : '#d62728'
    parts.push(`<circle cx="${x}" cy="${py(r.gbps)}" r="4" fill="${color}"/>`)
    parts.push(`<text x="${x}" y="${py(r.gbps) - 9}" text-anchor="middle" fill="#1f77b4">${r.gbps.toFixed(2)}</text>`)
  }
  const refName = o.transport === 'rdma' ? 'ib_write_bw (perftest)' : 'plain TCP stream, same processes'
  const lx = W - m.right - 250
  parts.push(`<line x1="${lx}" x2="${lx + 24}" y1="${m.top + 8}" y2="${m.top + 8}" stroke="#1f77b4" stroke-width="2.5"/>`)
  parts.push(`<text x="${lx + 30}" y="${m.top + 12}">kvtransfer writeCache</text>`)
  parts.push(`<line x1="${lx}" x2="${lx + 24}" y1="${m.top + 26}" y2="${m.top + 26}" stroke="#999" stroke-width="2" stroke-dasharray="6 4"/>`)
  parts.push(`<text x="${lx + 30}" y="${m.top + 30}">${esc(refName)}</text>`)
  parts.push('</svg>')
  return `${parts.join('\n')}\n`
}

/** Runs the grid against a forked or remote agent; resolves with the report. */
export async function runBench(options: BenchOptions): Promise<BenchReport> {
  const progress = new Progress(options.progress)
  const agent = await startAgent(options)
  try {
    const maxBlockBytes = Math.max(...options.sizes)
    progress.update('[setup] allocating regions', true)
    const init = (await agent.channel.call({ op: 'init', layers: options.layers, blocks: options.batch, maxBlockBytes })) as { host: string }
    const bytes = options.batch * maxBlockBytes
    const prefill: Prefill = {
      keys: Array.from({ length: options.layers }, () => randomFillSync(Buffer.allocUnsafe(bytes))),
      values: Array.from({ length: options.layers }, () => randomFillSync(Buffer.allocUnsafe(bytes))),
    }
    const { progress: _progress, ...recorded } = options
    const report: BenchReport = {
      tool: 'kvtransfer bench',
      date: new Date().toISOString(),
      machine: machineInfo(),
      options: recorded,
      peer: options.connect ? `decode agent on ${init.host} (${options.connect})` : 'decode agent forked on loopback',
      reference: {},
      results: [],
      ok: true,
    }
    if (options.transport === 'tcp') {
      if (options.streamMs > 0) {
        report.reference.streamHot = await referenceStream(agent, options.streamMs, progress, prefill, false)
        report.reference.stream = await referenceStream(agent, options.streamMs, progress, prefill, true)
      }
      else report.reference.skipped = 'reference stream disabled (--stream-ms 0)'
    } else {
      report.reference.perftest = []
    }
    for (const blockBytes of options.sizes) {
      if (options.transport === 'rdma') {
        // Reference and transfer back to back, per size.
        const [entry] = (await perftestReference(agent, options, progress, [blockBytes])) ?? []
        if (entry) report.reference.perftest?.push(entry)
        if (entry?.skipped && !report.reference.skipped) report.reference.skipped = `ib_write_bw reference skipped: ${entry.skipped}`
      }
      const result = await benchSize(agent, options, prefill, blockBytes, progress)
      const ref =
        options.transport === 'tcp'
          ? report.reference.stream?.gbps
          : report.reference.perftest?.find((p) => p.size === blockBytes)?.gbps
      if (ref !== undefined && ref > 0) {
        result.referenceGbps = ref
        result.ratio = result.gbps / ref
      }
      if (result.verified.mismatches > 0) report.ok = false
      report.results.push(result)
    }
    await agent.channel.call({ op: 'close' }).catch(() => undefined)
    return report
  } finally {
    progress.clear()
    agent.channel.socket.end()
    if (agent.child) {
      const child = agent.child
      await new Promise<void>((resolve) => {
        if (child.exitCode !== null) return resolve()
        const timer = setTimeout(() => child.kill(), 5000)
        child.once('exit', () => {
          clearTimeout(timer)
          resolve()
        })
      })
    }
  }
}

// ---------------------------------------------------------------------------------------
// --overhead: JS → native cost of one writeCache call

export interface OverheadRow {
  case: string
  /** Microseconds per call: median and p99 over bursts (each burst's mean). */
  medianUs: number
  p99Us: number
  calls: number
  note: string
}

export interface OverheadReport {
  tool: 'kvtransfer bench --overhead'
  date: string
  machine: ReturnType<typeof machineInfo>
  batch: number
  blockBytes: number
  rows: OverheadRow[]
}

/**
 * Measures the synchronous part of `writeCache` (TS wrapper, napi argument conversion,
 * validation of every id, planning, handing the job to the writer thread, creating the
 * Promise) for `batch` ids: the time from the call until it returns its Promise. Calls are
 * issued in bursts of 32 and then awaited, so the transfer (1-byte blocks, tiny) runs
 * outside the timed section. Also: calls refused after validating every id (the last id is
 * out of range), and the full round trip of one call at a time.
 */
export async function runOverhead(options: BenchOptions): Promise<OverheadReport> {
  const progress = new Progress(options.progress)
  const agent = await startAgent(options)
  const blockBytes = 1
  const burst = 32
  const rounds = options.iterations ?? 300
  const rows: OverheadRow[] = []
  try {
    await agent.channel.call({ op: 'init', layers: options.layers, blocks: options.batch, maxBlockBytes: blockBytes })
    const setup = (await agent.channel.call({ op: 'setup', blockBytes, transport: options.transport })) as { port: number }
    const keys = Array.from({ length: options.layers }, () => randomFillSync(Buffer.alloc(options.batch * blockBytes)))
    const values = Array.from({ length: options.layers }, () => randomFillSync(Buffer.alloc(options.batch * blockBytes)))
    const comm = new RDMACommunicator({
      role: 'prefill',
      gpuIdx: 0,
      port: 0,
      localKeyCache: keys,
      localValueCache: values,
      blockNumber: options.batch,
      blockBytes,
      transport: options.transport,
    })
    try {
      await comm.connect(agent.host, setup.port)
      const host = agent.host
      const port = setup.port
      const scattered = [permutation(options.batch), permutation(options.batch)]
      const contiguous = Uint32Array.from({ length: options.batch }, (_, i) => i)
      const badRemote = Uint32Array.from(scattered[1])
      badRemote[badRemote.length - 1] = options.batch // out of range: refused after checking all
      const plainArray = Array.from(scattered[0])

      const measure = async (name: string, note: string, issue: () => Promise<void>) => {
        const perCall: number[] = []
        for (let round = 0; round < rounds + 10; round++) {
          const pending: Promise<void>[] = new Array(burst)
          const t0 = process.hrtime.bigint()
          for (let i = 0; i < burst; i++) pending[i] = issue()
          const t1 = process.hrtime.bigint()
          await Promise.allSettled(pending)
          if (round >= 10) perCall.push(Number(t1 - t0) / 1e3 / burst)
          progress.update(`[overhead] ${name} ${round}/${rounds + 10}`)
        }
        perCall.sort((a, b) => a - b)
        rows.push({ case: name, medianUs: percentile(perCall, 50), p99Us: percentile(perCall, 99), calls: rounds * burst, note })
      }
      await measure('Uint32Array, scattered ids', 'sync part: wrapper + napi + validate + plan + hand-off + Promise', () =>
        comm.writeCache(host, port, scattered[0], scattered[1], 0),
      )
      await measure('Uint32Array, contiguous ids', 'same, ids coalesce into one run', () => comm.writeCache(host, port, contiguous, contiguous, 0))
      await measure('number[] (local), Uint32Array (remote)', 'plain arrays are converted to Float64Array in TS first', () =>
        comm.writeCache(host, port, plainArray, scattered[1], 0),
      )
      await measure('refused after validating all ids', 'last remote id out of range: includes building the error', () =>
        comm.writeCache(host, port, scattered[0], badRemote, 0).catch(() => undefined),
      )
      // One call at a time, awaited: the whole round trip of 1538 one-byte blocks.
      const rtts: number[] = []
      for (let i = 0; i < rounds; i++) {
        const t0 = process.hrtime.bigint()
        await comm.writeCache(host, port, scattered[0], scattered[1], 0)
        rtts.push(Number(process.hrtime.bigint() - t0) / 1e3)
        progress.update(`[overhead] round trip ${i}/${rounds}`)
      }
      rtts.sort((a, b) => a - b)
      rows.push({
        case: 'round trip, 1 in flight',
        medianUs: percentile(rtts, 50),
        p99Us: percentile(rtts, 99),
        calls: rounds,
        note: 'call → Promise resolved: includes the (tiny) transfer, the ACK and thread wake-ups',
      })
    } finally {
      await comm.close()
    }
    await agent.channel.call({ op: 'close' }).catch(() => undefined)
  } finally {
    progress.clear()
    agent.channel.socket.end()
  }
  return { tool: 'kvtransfer bench --overhead', date: new Date().toISOString(), machine: machineInfo(), batch: options.batch, blockBytes, rows }
}

export function formatOverhead(report: OverheadReport): string {
  const header = ['case', 'median µs/call', 'p99 µs/call', 'calls']
  const rows = report.rows.map((r) => [r.case, r.medianUs.toFixed(2), r.p99Us.toFixed(2), String(r.calls)])
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)))
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ')
  return [line(header), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(line)].join('\n')
}
