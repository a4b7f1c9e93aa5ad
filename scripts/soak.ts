/**
 * Soak test: many small writeCache calls and connect/close cycles in one process (decode
 * and prefill communicators side by side), reporting resident memory, open file
 * descriptors, threads and the engines' live resources before and after. Fails (exit 1)
 * when any of them grew beyond a small bound.
 *
 *   node --import @oxc-node/core/register scripts/soak.ts [--calls N] [--cycles N] [--inflight N]
 *   (defaults: 100000 calls, 50 cycles, 64 in flight; transport from KVTRANSFER_TEST_TRANSPORT)
 *
 * Prints one line `soak: {...}` with the numbers.
 */
import { readdirSync, readFileSync } from 'node:fs'
import { RDMACommunicator } from '../lib/index.js'
import type { Transport } from '../lib/index.js'

const args = process.argv.slice(2)
const arg = (name: string, fallback: number): number => {
  const i = args.indexOf(`--${name}`)
  return i >= 0 ? Number(args[i + 1]) : fallback
}
const CALLS = arg('calls', 100_000)
const CYCLES = arg('cycles', 50)
const INFLIGHT = arg('inflight', 64)
const TRANSPORT = (process.env.KVTRANSFER_TEST_TRANSPORT || 'tcp') as Transport
const HOST = process.env.KVTRANSFER_TEST_HOST || '127.0.0.1'
const BLOCKS = 64
const BLOCK_BYTES = 1024

function sample() {
  const status = readFileSync('/proc/self/status', 'utf8')
  const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? 0)
  return {
    rssMiB: Math.round(kb('VmRSS') / 102.4) / 10,
    fds: readdirSync('/proc/self/fd').length,
    threads: kb('Threads'),
  }
}

function communicator(role: 'prefill' | 'decode', name: string): RDMACommunicator {
  const region = () => Buffer.alloc(BLOCKS * BLOCK_BYTES, role === 'prefill' ? 7 : 0)
  return new RDMACommunicator({
    role,
    gpuIdx: 0,
    port: 0,
    localKeyCache: [region(), region()],
    localValueCache: [region(), region()],
    blockNumber: BLOCKS,
    blockBytes: BLOCK_BYTES,
    transport: TRANSPORT,
    name,
  })
}

async function main(): Promise<void> {
  const decode = communicator('decode', 'soak-decode')
  await decode.ready
  const cycle = async (calls: number) => {
    const prefill = communicator('prefill', 'soak-prefill')
    await prefill.ready
    await prefill.connect(HOST, decode.port, { timeoutMs: 60_000 })
    let next = 0
    const worker = async () => {
      while (next < calls) {
        const i = next++
        await prefill.writeCache(HOST, decode.port, [i % BLOCKS], [(i * 7) % BLOCKS], i % 2, { timeoutMs: 30_000 })
      }
    }
    await Promise.all(Array.from({ length: Math.min(INFLIGHT, Math.max(1, calls)) }, worker))
    await prefill.close()
  }
  // Warm up (allocators, thread pools, lazily started threads), then measure.
  await cycle(Math.min(1000, CALLS))
  global.gc?.()
  const before = { ...sample(), engine: decode.stats() }
  const started = Date.now()
  // The calls are spread over the cycles: every cycle connects, writes, closes.
  const perCycle = Math.ceil(CALLS / Math.max(1, CYCLES))
  for (let c = 0; c < Math.max(1, CYCLES); c++) await cycle(perCycle)
  // Let closed communicators be collected (their native halves release sockets then).
  for (let i = 0; i < 3; i++) {
    await new Promise((resolve) => setTimeout(resolve, 100))
    global.gc?.()
  }
  const after = { ...sample(), engine: decode.stats() }
  await decode.close()
  const report = {
    transport: TRANSPORT,
    calls: perCycle * Math.max(1, CYCLES),
    cycles: CYCLES,
    seconds: (Date.now() - started) / 1000,
    before,
    after,
    growth: {
      rssMiB: after.rssMiB - before.rssMiB,
      fds: after.fds - before.fds,
      threads: after.threads - before.threads,
    },
  }
  console.log(`soak: ${JSON.stringify(report)}`)
  const problems: string[] = []
  if (report.growth.fds > 4) problems.push(`file descriptors grew by ${report.growth.fds}`)
  if (report.growth.threads > 4) problems.push(`threads grew by ${report.growth.threads}`)
  if (report.growth.rssMiB > 64) problems.push(`RSS grew by ${report.growth.rssMiB} MiB`)
  if (after.engine.receivers > 0) problems.push(`${after.engine.receivers} receiving connections left open`)
  if (problems.length > 0) {
    console.error(`soak FAILED: ${problems.join('; ')}`)
    process.exit(1)
  }
}

main().catch((error: unknown) => {
  console.error(error)
  process.exit(1)
})
