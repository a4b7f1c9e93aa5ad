/**
 * The engine's log: quiet by default (warn), `KVCACHE_LOG_LEVEL` chooses the level,
 * `KVCACHE_DEBUG=1` still means debug, lines carry an ISO 8601 UTC time, and a malformed
 * level is refused like any malformed variable. Each case runs an auto connect in a child
 * process (fixtures/log-connect.ts): the level is read once per process.
 */
import test from 'ava'
import { execFile } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { HOST, ms } from './helpers.js'

const ROOT = fileURLToPath(new URL('..', import.meta.url))
const FIXTURE = fileURLToPath(new URL('./fixtures/log-connect.ts', import.meta.url))

/** `[kvtransfer <level> <ISO 8601 UTC, milliseconds> pid=<pid>] <message>` */
const LINE = /^\[kvtransfer (error|warn|info|debug) \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z pid=\d+\] \S/

interface Run {
  code: number | null
  stdout: string
  stderr: string
  /** The engine's lines on stderr, by level. */
  lines: Record<'error' | 'warn' | 'info' | 'debug', string[]>
  result: { key?: string; refused?: Refusal; viaCreate?: Refusal | null }
}
interface Refusal {
  isKvTransferError: boolean
  code: string
  message: string
}

/** Runs the fixture with the logging variables unset, then `env` applied. */
function run(env: Record<string, string>): Promise<Run> {
  const base = { ...process.env }
  for (const name of ['KVCACHE_LOG_LEVEL', 'KVCACHE_DEBUG', 'KVCACHE_DEBUG_FILE', 'KVCACHE_ERROR_FILE'])
    delete base[name]
  return new Promise((resolve, reject) => {
    execFile(
      process.execPath,
      ['--import', '@oxc-node/core/register', FIXTURE],
      { cwd: ROOT, env: { ...base, KVT_LOG_HOST: HOST, ...env }, timeout: ms(90_000), encoding: 'utf8' },
      (error, stdout, stderr) => {
        const code = error ? (typeof error.code === 'number' ? error.code : null) : 0
        if (error && code === null) return reject(new Error(`${error.message}\n${stderr}`))
        const lines: Run['lines'] = { error: [], warn: [], info: [], debug: [] }
        for (const line of stderr.split('\n')) {
          const level = /^\[kvtransfer (\w+) /.exec(line)?.[1] as keyof Run['lines'] | undefined
          if (level && level in lines) lines[level].push(line)
        }
        const last = stdout.trim().split('\n').pop() || '{}'
        resolve({ code, stdout, stderr, lines, result: JSON.parse(last) as Run['result'] })
      },
    )
  })
}

test('by default (warn) an auto connect prints no info or debug line', async (t) => {
  const r = await run({})
  t.is(r.code, 0, r.stderr)
  t.truthy(r.result.key)
  t.deepEqual(r.lines.info, [], r.stderr)
  t.deepEqual(r.lines.debug, [], r.stderr)
  for (const line of [...r.lines.error, ...r.lines.warn]) t.regex(line, LINE)
})

test('KVCACHE_LOG_LEVEL=info prints the transport decision once, with an ISO 8601 UTC time', async (t) => {
  const before = Date.now()
  const r = await run({ KVCACHE_LOG_LEVEL: 'info' })
  const after = Date.now()
  t.is(r.code, 0, r.stderr)
  const key = r.result.key!
  const decisions = r.lines.info.filter((l) => l.includes(`transport with ${key}: `))
  t.is(decisions.length, 1, r.stderr)
  t.regex(decisions[0], LINE)
  t.regex(decisions[0], /\] engine prefill-log: transport with \S+: (nvlink|rdma|tcp): /)
  const stamp = /^\[kvtransfer info (\S+) /.exec(decisions[0])![1]
  const at = Date.parse(stamp)
  t.true(at >= before - 1000 && at <= after + 1000, `${stamp} not within the run`)
  t.is(new Date(at).toISOString(), stamp, 'the exact form of Date#toISOString (UTC, milliseconds)')
  t.deepEqual(r.lines.debug, [], 'info prints no debug lines')
})

const debugSettings: Record<string, string>[] = [
  { KVCACHE_LOG_LEVEL: 'debug' },
  { KVCACHE_DEBUG: '1' },
  { KVCACHE_LOG_LEVEL: 'error', KVCACHE_DEBUG: '1' },
]
for (const env of debugSettings) {
  test(`${Object.entries(env)
    .map(([k, v]) => `${k}=${v}`)
    .join(' ')} prints debug and info lines`, async (t) => {
    const r = await run(env)
    t.is(r.code, 0, r.stderr)
    t.true(r.lines.debug.length > 0, r.stderr)
    t.is(r.lines.info.filter((l) => l.includes(`transport with ${r.result.key}: `)).length, 1, r.stderr)
    for (const line of r.lines.debug) t.regex(line, LINE)
  })
}

test('KVCACHE_LOG_LEVEL=error prints no info line; the level is read in any case', async (t) => {
  const r = await run({ KVCACHE_LOG_LEVEL: ' ERROR ' })
  t.is(r.code, 0, r.stderr)
  t.truthy(r.result.key)
  t.deepEqual([...r.lines.warn, ...r.lines.info, ...r.lines.debug], [], r.stderr)
})

test('a malformed KVCACHE_LOG_LEVEL is refused with a typed error naming it', async (t) => {
  for (const value of ['verbose', 'trace', '3']) {
    const r = await run({ KVCACHE_LOG_LEVEL: value })
    t.is(r.code, 0, r.stderr)
    const refused = r.result.refused
    t.truthy(refused, `KVCACHE_LOG_LEVEL=${value} was accepted: ${r.stdout}`)
    t.true(refused!.isKvTransferError)
    t.is(refused!.code, 'ERR_INVALID_ARGUMENT')
    t.regex(refused!.message, new RegExp(`KVCACHE_LOG_LEVEL.*'${value}'.*error, warn, info or debug`))
    t.deepEqual(r.result.viaCreate, refused, 'create rejects with the same error')
  }
})
