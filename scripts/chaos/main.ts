/**
 * Chaos run: P prefill and D decode processes write seeded, verifiable blocks to each
 * other continuously while a supervisor SIGKILLs and restarts a random one every 1–4 s.
 * Every call that resolved OK is checked byte for byte on the decode side.
 *
 *   node --import @oxc-node/core/register scripts/chaos/main.ts [--seconds 60] [--json FILE|-] ...
 *   (scripts/chaos.sh wraps it; `--help` lists every option)
 *
 * Prints a summary; exits 1 on any false success (a call that resolved OK whose bytes are
 * not all there, or whose arrival notice never came, or that went to a receiver that had
 * already exited), any hang (a call or connect not settled 5 s after its timeout), any
 * untyped failure, a process exiting on its own, a process that did not recover once the
 * chaos stopped, or fd growth beyond `--max-fd-growth` in a process after its warm-up.
 */
import { writeFileSync } from 'node:fs'
import type { Transport } from '../../lib/index.js'
import { type ChaosOptions, Supervisor } from './supervisor.js'
import { formatReport } from './tally.js'

const scale = Math.max(1, Number(process.env.KVTRANSFER_TEST_TIMEOUT_SCALE || 1))
const defaults: ChaosOptions = {
  seconds: 60,
  transport: (process.env.KVTRANSFER_TEST_TRANSPORT || 'tcp') as Transport,
  host: process.env.KVTRANSFER_TEST_HOST || '127.0.0.1',
  prefills: 2,
  decodes: 2,
  slots: 4,
  maxBlocks: 8,
  layers: 2,
  blockBytes: 4096,
  timeoutMs: 2000 * scale,
  connectTimeoutMs: 2000 * scale,
  killMinMs: 1000,
  killMaxMs: 4000,
  abortRate: 0.02,
  lieRate: 0,
  seed: Date.now() % 0xffff_ffff,
  settleMs: 20_000 * scale,
  maxFdGrowth: 4,
  victims: 'all',
  verbose: false,
}

const FLAGS: Record<string, keyof ChaosOptions> = {
  '--seconds': 'seconds',
  '--transport': 'transport',
  '--host': 'host',
  '--prefills': 'prefills',
  '--decodes': 'decodes',
  '--slots': 'slots',
  '--max-blocks': 'maxBlocks',
  '--layers': 'layers',
  '--block-bytes': 'blockBytes',
  '--timeout-ms': 'timeoutMs',
  '--connect-timeout-ms': 'connectTimeoutMs',
  '--kill-min-ms': 'killMinMs',
  '--kill-max-ms': 'killMaxMs',
  '--abort-rate': 'abortRate',
  '--inject-lie': 'lieRate',
  '--seed': 'seed',
  '--settle-ms': 'settleMs',
  '--max-fd-growth': 'maxFdGrowth',
  '--victims': 'victims',
}

function usage(): string {
  const lines = Object.entries(FLAGS).map(
    ([flag, key]) => `  ${flag} <${typeof defaults[key]}> (default ${defaults[key]})`,
  )
  return [
    'usage: scripts/chaos.sh [options]',
    ...lines,
    '  --json <file|->  write the report as JSON',
    "  --verbose  echo the workers' output",
  ].join('\n')
}

function parse(argv: string[]): { options: ChaosOptions; json?: string } {
  const options: ChaosOptions = { ...defaults }
  let json: string | undefined
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i]!
    if (flag === '--help') {
      console.log(usage())
      process.exit(0)
    } else if (flag === '--verbose') options.verbose = true
    else if (flag === '--json') json = argv[++i]
    else if (FLAGS[flag]) {
      const key = FLAGS[flag]
      const value = argv[++i]
      if (value === undefined) throw new Error(`${flag} needs a value`)
      if (typeof defaults[key] === 'number') {
        const n = Number(value)
        if (!Number.isFinite(n) || n < 0) throw new Error(`${flag} must be a number >= 0, got ${value}`)
        ;(options as unknown as Record<string, number>)[key] = n
      } else (options as unknown as Record<string, string>)[key] = value
    } else throw new Error(`unknown option ${flag}\n${usage()}`)
  }
  if (options.blockBytes % 4 || options.blockBytes < 16)
    throw new Error('--block-bytes must be a multiple of 4, at least 16')
  if (!['all', 'prefill', 'decode'].includes(options.victims))
    throw new Error(`--victims must be all, prefill or decode, got ${options.victims}`)
  if (options.killMaxMs < options.killMinMs) throw new Error('--kill-max-ms must be at least --kill-min-ms')
  for (const key of ['prefills', 'decodes', 'slots', 'maxBlocks', 'layers'] as const)
    if (!Number.isInteger(options[key]) || options[key] < 1) throw new Error(`${key} must be an integer >= 1`)
  return { options, json }
}

async function main(): Promise<void> {
  const { options, json } = parse(process.argv.slice(2))
  const report = await new Supervisor(options).run()
  console.log(formatReport(report))
  if (json === '-') console.log(JSON.stringify(report, null, 2))
  else if (json) writeFileSync(json, `${JSON.stringify(report, null, 2)}\n`)
  process.exit(report.passed ? 0 : 1)
}

main().catch((error: unknown) => {
  console.error(error)
  process.exit(2)
})
