/**
 * A pending writeCache keeps the Node process running until it settles; an idle
 * communicator does not (the native function that settles calls is shared and weak).
 */
import { fork } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import test, { type ExecutionContext } from 'ava'
import { HOST, TRANSPORT, ms, sleep, spawnPeer, within } from './helpers.js'
import type { WriterConfig } from './fixtures/pending-writer.js'

const WRITER_SCRIPT = fileURLToPath(new URL('./fixtures/pending-writer.ts', import.meta.url))
const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url))
const LAYOUT = { layers: 1, blockNumber: 8, blockBytes: 4096 }

/**
 * Runs the writer against a decode peer that is stopped (SIGSTOP) while the writer is left
 * with nothing but its communicator, for `stoppedMs`; returns the writer's exit code and output.
 */
async function runWriter(t: ExecutionContext, mode: WriterConfig['mode'], stoppedMs: number) {
  const peer = await spawnPeer(t, LAYOUT)
  const config: WriterConfig = { host: HOST, port: peer.port, transport: TRANSPORT, mode, ...LAYOUT }
  const writer = fork(WRITER_SCRIPT, [], {
    cwd: REPO_ROOT,
    execArgv: ['--import', '@oxc-node/core/register'],
    env: { ...process.env, KVT_WRITER_CONFIG: JSON.stringify(config) },
    stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
  })
  t.teardown(() => writer.kill('SIGKILL'))
  let output = ''
  writer.stdout!.on('data', (chunk: Buffer) => (output += chunk.toString()))
  writer.stderr!.on('data', (chunk: Buffer) => (output += chunk.toString()))
  const exited = new Promise<number | null>((resolve) => writer.once('exit', (code) => resolve(code)))
  await within(new Promise((resolve) => writer.once('message', resolve)), ms(30_000), 'writer connect')
  peer.child.kill('SIGSTOP')
  try {
    writer.send('go')
    await within(new Promise((resolve) => writer.once('disconnect', resolve)), ms(30_000), 'writer ready')
    await sleep(stoppedMs)
  } finally {
    peer.child.kill('SIGCONT')
  }
  const code = await within(exited, ms(30_000), `writer (${mode}) exit; output:\n${output}`)
  return { code, output }
}

test.serial('a pending writeCache keeps the process running until it settles', async (t) => {
  // Over TCP the stopped peer cannot acknowledge, so the call is still pending when the
  // writer has nothing else left; a process that exited then would print no outcome.
  const { code, output } = await runWriter(t, 'write', ms(500))
  t.is(code, 0, output)
  t.regex(output, /settled: ok/)
})

test.serial('an idle communicator does not keep the process running', async (t) => {
  const { code, output } = await runWriter(t, 'idle', 0)
  t.is(code, 0, output)
  t.notRegex(output, /settled/)
})
