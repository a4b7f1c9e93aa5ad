/**
 * perftest (`ib_write_bw`), the RDMA reference: the agent runs the server, the driver the
 * client, at each block size.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import * as fs from 'node:fs'
import type { Agent } from './channel'
import { type BenchOptions, type BenchReport, type Progress, findOnPath } from './common'

export interface PerftestSettings {
  device: string
  gidIndex: number
  size: number
  iterations: number
  port: number
}

export function perftestArgs(s: PerftestSettings): string[] {
  return [
    '-d',
    s.device,
    '-x',
    String(s.gidIndex),
    '-s',
    String(s.size),
    '-n',
    String(s.iterations),
    '-F',
    '-p',
    String(s.port),
  ]
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
  if (at < 0)
    return {
      raw: lines
        .map((l) => l.trim())
        .filter(Boolean)
        .slice(-3)
        .join(' | '),
    }
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

export function runProcess(
  binary: string,
  args: string[],
  timeoutMs: number,
): Promise<{ code: number | null; output: string }> {
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

export interface PerftestServer {
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
export function startPerftestServer(binary: string, settings: PerftestSettings): Promise<PerftestServer> {
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
      if (
        listening === true ||
        output.includes('Waiting for client') ||
        (listening === undefined && Date.now() - started > 1500)
      )
        finish()
    }, 50)
    const timer = setTimeout(finish, 20_000)
    void exited.then(finish)
    child.on('error', finish)
    setTimeout(() => child.kill('SIGKILL'), 180_000).unref()
  })
}

/** Stops a perftest server (if still running) and waits for it to exit. */
export async function stopPerftestServer(server: PerftestServer | undefined): Promise<string> {
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

export function rdmaDevice(options: { rdmaDevice?: string }): string | undefined {
  return (
    options.rdmaDevice ??
    (process.env.KVCACHE_RDMA_NICS ?? '')
      .split(',')
      .map((s) => s.trim())
      .find(Boolean)
  )
}

export function gidIndex(options: { gidIndex?: number }): number {
  return options.gidIndex ?? Number(process.env.KVCACHE_RDMA_GID_INDEX ?? 3)
}

/**
 * ib_write_bw at each of `sizes` (default: all of the grid). `runBench` measures each size
 * right before the transfer at that size, so a shared host's drifting load hits both
 * alike (Soft-RoCE under TCG varies ±20 % over minutes).
 */
export async function perftestReference(
  agent: Agent,
  options: BenchOptions,
  progress: Progress,
  sizes: number[] = options.sizes,
): Promise<BenchReport['reference']['perftest']> {
  const binary = findOnPath('ib_write_bw')
  const device = rdmaDevice(options)
  if (!binary) return sizes.map((size) => ({ size, skipped: 'ib_write_bw (perftest) is not installed' }))
  if (!device)
    return sizes.map((size) => ({ size, skipped: 'no RDMA device: pass --rdma-dev or set KVCACHE_RDMA_NICS' }))
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
      const server = (await agent.channel.call({ op: 'perftest-server', settings })) as {
        ok: boolean
        skipped?: string
      }
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
        entry = {
          size,
          skipped: `ib_write_bw gave no bandwidth (client exit ${client.code}): ${parsed.raw}${serverTail ? ` [server: ${serverTail}]` : ''}`,
        }
        progress.clear()
        console.error(`ib_write_bw -s ${size}, attempt ${attempt + 1}: unparsable report: ${parsed.raw}`)
      }
    }
    if (entry) out.push(entry)
  }
  progress.clear()
  return out
}
