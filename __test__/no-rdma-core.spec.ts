/**
 * On a host without rdma-core the addon still loads, TCP works, and asking for 'rdma' fails
 * with a typed error naming the missing library. Simulated by hiding libibverbs.so.1 in a
 * private mount namespace (root + unshare), or run as is where rdma-core is absent.
 */
import test from 'ava'
import { execFileSync, spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import { fileURLToPath } from 'node:url'

const ROOT = fileURLToPath(new URL('..', import.meta.url))
const FIXTURE = fileURLToPath(new URL('./fixtures/no-rdma-core.ts', import.meta.url))

function libibverbsPaths(): string[] {
  try {
    const out = execFileSync('ldconfig', ['-p'], { encoding: 'utf8' })
    return [
      ...new Set(
        out
          .split('\n')
          .filter((l) => l.includes('libibverbs.so.1'))
          .map((l) => fs.realpathSync(l.split('=>')[1].trim())),
      ),
    ]
  } catch {
    return []
  }
}

const installed = libibverbsPaths()
const isRoot = process.getuid?.() === 0
const hasUnshare = spawnSync('unshare', ['--version']).status === 0
const runnable = installed.length === 0 || (isRoot && hasUnshare)

;(runnable ? test : test.skip)(
  'without libibverbs the addon loads, auto uses TCP, rdma fails naming the library',
  (t) => {
    const node = [process.execPath, '--import', '@oxc-node/core/register', FIXTURE].map((a) => `'${a}'`).join(' ')
    const hide = installed.map((p) => `mount --bind /dev/null '${p}'`).join(' && ')
    const command = installed.length === 0 ? node : `${hide} && ${node}`
    const args =
      installed.length === 0 ? ['-c', command] : ['--mount', '--propagation', 'private', 'bash', '-c', command]
    const run = spawnSync(installed.length === 0 ? 'bash' : 'unshare', args, {
      cwd: ROOT,
      encoding: 'utf8',
      timeout: 300_000,
    })
    t.is(run.status, 0, `fixture failed:\n${run.stdout}\n${run.stderr}`)
    const result = JSON.parse(run.stdout.trim().split('\n').pop() ?? '{}')
    t.deepEqual(result.rdma?.code, 'ERR_RDMA_UNAVAILABLE', JSON.stringify(result))
    t.true(result.rdma?.isKvTransferError)
    t.regex(result.rdma?.message ?? '', /libibverbs\.so\.1/)
    t.is(result.transport, 'tcp')
    t.true(result.dataOk)
  },
)
