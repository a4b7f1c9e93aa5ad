/**
 * Many peers (the short form of scripts/scale.ts): one decode communicator takes 32 links
 * from 2 prefill processes of 16 communicators; every call must land byte for byte, the
 * decode communicator may run at most 16 threads whatever the link count, and each link
 * may cost it at most 2 file descriptors (its data connection and its control-plane one).
 */
import { execFile } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import test from 'ava'
import { TRANSPORT, ms } from './helpers.js'

const SCRIPT = fileURLToPath(new URL('../scripts/scale.ts', import.meta.url))
const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url))

const run = test.serial
const skipped = TRANSPORT !== 'tcp'
;(skipped ? test.skip : run)(
  'a decode communicator serves 32 links with a bounded thread count and two descriptors per link (tcp only)',
  async (t) => {
    const args = ['--procs', '2', '--comms', '16', '--calls', '4', '--max-threads', '16', '--max-fds-per-link', '2']
    const { code, stdout, stderr } = await new Promise<{ code: number | null; stdout: string; stderr: string }>(
      (resolve) => {
        const child = execFile(
          process.execPath,
          ['--import', '@oxc-node/core/register', SCRIPT, ...args],
          { cwd: REPO_ROOT, timeout: ms(120_000) },
          (error, stdout, stderr) => resolve({ code: error ? (child.exitCode ?? 1) : 0, stdout, stderr }),
        )
      },
    )
    const line = stdout.split('\n').find((l) => l.startsWith('scale: '))
    t.truthy(line, `no report; stderr: ${stderr}`)
    const report = JSON.parse(line!.slice('scale: '.length)) as {
      links: number
      failedCalls: number
      wrongBlocks: number
      decode: { communicatorThreads: number; perLink: { fds: number } }
    }
    t.log(line)
    t.is(report.links, 32)
    t.is(report.failedCalls, 0)
    t.is(report.wrongBlocks, 0)
    t.true(report.decode.communicatorThreads <= 16, `${report.decode.communicatorThreads} threads`)
    t.true(report.decode.perLink.fds <= 2, `${report.decode.perLink.fds} descriptors per link`)
    t.is(code, 0, stderr)
  },
)
