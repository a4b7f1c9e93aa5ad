/**
 * The README's Quick start runs as written: the first ```ts block under "## Quick start" is
 * taken from README.md, its import specifier 'kvtransfer' pointed at this checkout's built
 * package (what `require.resolve('kvtransfer')` gives through package.json's "exports"), and
 * the result written to a temporary .mts file, type-checked with tsc against lib/index.d.ts,
 * and run with node as the ava config runs TypeScript (`--import @oxc-node/core/register`).
 * It must exit 0 within a bound. Nothing else of the block is changed.
 */
import test from 'ava'
import { execFile } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import * as os from 'node:os'
import * as path from 'node:path'
import { fileURLToPath } from 'node:url'
import { ms } from './helpers.js'

const ROOT = fileURLToPath(new URL('..', import.meta.url))
const require = createRequire(import.meta.url)

/** The first ```ts block of the README's "## Quick start" section (up to the next "## "). */
function quickStart(readme: string): string {
  const heading = /^## Quick start[ \t]*$/m.exec(readme)
  if (!heading) throw new Error('README.md has no "## Quick start" section')
  const rest = readme.slice(heading.index + heading[0].length)
  const next = rest.search(/^## /m)
  const section = next < 0 ? rest : rest.slice(0, next)
  const block = /^```ts[ \t]*\n([\s\S]*?)^```[ \t]*$/m.exec(section)
  if (!block) throw new Error('the Quick start section has no ```ts block')
  return block[1]
}

/** `code` with every `from 'kvtransfer'` (either quote) importing `entry` instead. */
function pointAt(code: string, entry: string): string {
  let count = 0
  const out = code.replace(/(\bfrom\s*)(['"])kvtransfer\2/g, (_, from: string) => {
    count++
    return `${from}${JSON.stringify(entry)}`
  })
  if (count === 0) throw new Error("the Quick start does not import from 'kvtransfer'")
  return out
}

function execNode(args: string[], timeoutMs: number) {
  return new Promise<{ code: number | null; signal: string | null; stdout: string; stderr: string }>((resolve) => {
    execFile(
      process.execPath,
      args,
      { cwd: ROOT, timeout: timeoutMs, killSignal: 'SIGKILL', encoding: 'utf8' },
      (error, stdout, stderr) => {
        const code = error ? (typeof error.code === 'number' ? error.code : null) : 0
        resolve({ code, signal: error?.signal ?? null, stdout, stderr })
      },
    )
  })
}

function writeQuickStart(t: { teardown: (fn: () => void) => void }): string {
  const entry = require.resolve('kvtransfer')
  const code = pointAt(quickStart(readFileSync(path.join(ROOT, 'README.md'), 'utf8')), entry)
  const dir = mkdtempSync(path.join(os.tmpdir(), 'kvt-quickstart-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const file = path.join(dir, 'quickstart.mts')
  writeFileSync(file, code)
  return file
}

test('the extraction finds the block and rewrites only the specifier', (t) => {
  const readme = [
    '# x',
    '## Quick start',
    'text',
    '```ts',
    "import { RDMACommunicator } from 'kvtransfer'",
    "const s = 'kvtransfer'",
    '```',
    '```ts',
    'second()',
    '```',
    '## API',
  ].join('\n')
  const code = quickStart(readme)
  t.is(code, "import { RDMACommunicator } from 'kvtransfer'\nconst s = 'kvtransfer'\n")
  t.is(pointAt(code, '/p/lib/index.js'), `import { RDMACommunicator } from "/p/lib/index.js"\nconst s = 'kvtransfer'\n`)
  t.throws(() => quickStart('## Quick start\n```js\nx\n```\n'), { message: /no ```ts block/ })
  t.throws(() => quickStart('## Quick start\n\n## API\n```ts\nx\n```\n'), { message: /no ```ts block/ })
  t.throws(() => pointAt('const a = 1', '/p'), { message: /does not import/ })
})

test('the README Quick start type-checks against the built declarations', async (t) => {
  const file = writeQuickStart(t)
  const tsc = require.resolve('typescript/bin/tsc')
  const r = await execNode(
    [
      tsc,
      '--noEmit',
      '--strict',
      '--target',
      'es2022',
      '--module',
      'nodenext',
      '--moduleResolution',
      'nodenext',
      '--skipLibCheck',
      '--typeRoots',
      path.join(ROOT, 'node_modules/@types'),
      '--types',
      'node',
      file,
    ],
    ms(120_000),
  )
  t.is(r.code, 0, `tsc on the Quick start:\n${r.stdout}${r.stderr}`)
})

test('the README Quick start runs as written and exits 0', async (t) => {
  const file = writeQuickStart(t)
  const r = await execNode(['--import', '@oxc-node/core/register', file], ms(60_000))
  t.is(
    r.code,
    0,
    `the Quick start ${r.signal ? `was killed (${r.signal}) after its time` : `exited ${r.code}`}:\n${r.stdout}${r.stderr}`,
  )
})
