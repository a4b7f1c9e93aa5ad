/**
 * The README's set-up: `scripts/setup-debian.sh` installs only what the build (and so the
 * demo) needs; `--tests`, which `scripts/test-all.sh` runs first, adds what only the tests
 * need. Read from the script's own `--list` (it installs nothing then).
 */
import { execFileSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import test from 'ava'

const ROOT = fileURLToPath(new URL('..', import.meta.url))
const BUILD = ['build-essential', 'pkg-config', 'clang', 'libclang-dev', 'libibverbs-dev', 'librdmacm-dev']
/** What the tests need and the demo does not (the Soft-RoCE VM, perftest, the supply-chain check). */
const TESTS_ONLY = ['apt qemu-system-x86', 'apt busybox-static', 'apt perftest', 'cargo cargo-deny']

function list(...args: string[]): string[] {
  const out = execFileSync('bash', ['scripts/setup-debian.sh', ...args, '--list'], {
    cwd: ROOT,
    encoding: 'utf8',
    timeout: 30_000,
  })
  return out.trim().split('\n')
}

test('the demo path installs the build packages and nothing only the tests need', (t) => {
  const demo = list()
  for (const pkg of BUILD) t.true(demo.includes(`apt ${pkg}`), `${pkg} is installed: ${demo.join(', ')}`)
  for (const item of TESTS_ONLY) t.false(demo.includes(item), `${item} is not installed for the demo`)
  t.true(
    demo.every((line) => line.startsWith('apt ')),
    `nothing is compiled for the demo: ${demo.join(', ')}`,
  )
})

test('--tests adds the test tools, and scripts/test-all.sh runs it before anything else', (t) => {
  const demo = list()
  const tests = list('--tests')
  for (const item of TESTS_ONLY) t.true(tests.includes(item), `${item} is installed for the tests: ${tests.join(', ')}`)
  t.deepEqual(
    demo.filter((line) => !tests.includes(line)),
    [],
    'the tests get everything the demo gets',
  )
  const testAll = readFileSync(`${ROOT}/scripts/test-all.sh`, 'utf8')
  const setup = testAll.search(/^if bash scripts\/setup-debian\.sh --tests /m)
  t.true(setup > 0, 'scripts/test-all.sh runs scripts/setup-debian.sh --tests')
  t.true(setup < testAll.indexOf('cargo fmt'), 'before the first step that needs it')
})

test('an unknown argument is a usage error that installs nothing', (t) => {
  const error = t.throws(() => list('--bogus')) as Error & { status?: number; stderr?: string }
  t.is(error.status, 2)
  t.regex(String(error.stderr), /usage: bash scripts\/setup-debian\.sh \[--tests\] \[--list\]/)
})
