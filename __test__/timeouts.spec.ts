/**
 * `timeoutMs: 0` means "no timeout" everywhere: `connect`, `connectTimeoutMs` (the engine's
 * bound on opening the data path included), `writeCache`, `writeTimeoutMs`,
 * `waitForArrival` and `close`. A timeout that is not a number of milliseconds in
 * 0..2^31-1 is refused, typed, naming the value, by every call that takes one.
 */
import test, { type ExecutionContext } from 'ava'
import { HOST, RDMACommunicator, TRANSPORT, expectKvError, freePort, ms, sleep, type Arrival } from './helpers.js'
import type { CommunicatorOptions } from '../lib/index.js'

const BLOCK_BYTES = 1024
const options = (over: Partial<CommunicatorOptions>): CommunicatorOptions => ({
  role: 'prefill',
  gpuIdx: 0,
  port: 0,
  localKeyCache: [Buffer.alloc(4 * BLOCK_BYTES, 5), Buffer.alloc(4 * BLOCK_BYTES, 5)],
  localValueCache: [],
  blockNumber: 4,
  blockBytes: BLOCK_BYTES,
  transport: TRANSPORT,
  authToken: '',
  ...over,
})

async function make(t: ExecutionContext, over: Partial<CommunicatorOptions> = {}): Promise<RDMACommunicator> {
  const comm = await RDMACommunicator.create(options(over))
  t.teardown(() => comm.close())
  return comm
}

test.serial('connect({ timeoutMs: 0 }) waits for a peer that starts later, without a timeout', async (t) => {
  const port = await freePort()
  const prefill = await make(t)
  const connecting = prefill.connect(HOST, port, { timeoutMs: 0 })
  // Longer than any "expire at once" could take to report.
  await sleep(600)
  const decode = await make(t, { role: 'decode', port })
  t.is(decode.port, port)
  t.true(await connecting)
  t.true(prefill.isConnected(HOST, port))
})

test.serial('connectTimeoutMs: 0 is no default timeout (nor an engine bound on the data path)', async (t) => {
  const decode = await make(t, { role: 'decode' })
  const prefill = await make(t, { connectTimeoutMs: 0 })
  t.true(await prefill.connect(HOST, decode.port))
  await prefill.writeCache(HOST, decode.port, [0], [1], 0)
})

test.serial('writeCache({ timeoutMs: 0 }) and writeTimeoutMs: 0 are no timeout', async (t) => {
  const decode = await make(t, { role: 'decode' })
  const prefill = await make(t, { writeTimeoutMs: 0 })
  await prefill.connect(HOST, decode.port, { timeoutMs: ms(30_000) })
  await prefill.writeCache(HOST, decode.port, [0], [1], 0)
  await prefill.writeCache(HOST, decode.port, [1], [2], 1, { timeoutMs: 0 })
  t.pass()
})

test.serial('waitForArrival({ timeoutMs: 0 }) waits until the arrival comes', async (t) => {
  const decode = await make(t, { role: 'decode' })
  const prefill = await make(t)
  await prefill.connect(HOST, decode.port, { timeoutMs: ms(30_000) })
  const waiting = decode.waitForArrival('later', { layers: 2, timeoutMs: 0 })
  let settled = false
  void waiting.then(
    () => (settled = true),
    () => (settled = true),
  )
  await sleep(300)
  t.false(settled, 'still waiting')
  await prefill.writeCache(HOST, decode.port, [0], [0], 0, { tag: 'later' })
  await prefill.writeCache(HOST, decode.port, [0], [0], 1, { tag: 'later' })
  const arrivals: Arrival[] = await waiting
  t.deepEqual(arrivals.map((a) => a.layerIdx).sort(), [0, 1])
})

test.serial('close({ timeoutMs: 0 }) is no timeout: it resolves once the teardown is done', async (t) => {
  const decode = await RDMACommunicator.create(options({ role: 'decode' }))
  const prefill = await RDMACommunicator.create(options({}))
  await prefill.connect(HOST, decode.port, { timeoutMs: ms(30_000) })
  await prefill.writeCache(HOST, decode.port, [0], [1], 0)
  // A teardown with links to join takes a few ms: longer than "expire at once".
  await Promise.all([prefill.close({ timeoutMs: 0 }), decode.close({ timeoutMs: 0 })])
  t.is(prefill.stats().liveLinks, 0)
  await expectKvError(t, () => prefill.connect(HOST, 1), 'ERR_CLOSED')
})

test.serial('a timeout that is not 0..2^31-1 ms is refused, naming it, by every call that takes one', async (t) => {
  const decode = await make(t, { role: 'decode' })
  const prefill = await make(t)
  await prefill.connect(HOST, decode.port, { timeoutMs: ms(30_000) })
  for (const bad of ['abc', -5, Number.NaN, 2 ** 31]) {
    const shown = typeof bad === 'string' ? '"abc"' : String(bad)
    const timeoutMs = bad as number
    const calls: Array<[string, () => unknown]> = [
      ['connect', () => prefill.connect(HOST, decode.port, { timeoutMs })],
      ['writeCache', () => prefill.writeCache(HOST, decode.port, [0], [0], 0, { timeoutMs })],
      ['waitForArrival', () => decode.waitForArrival('x', { timeoutMs })],
      ['close', () => decode.close({ timeoutMs })],
      ['create (connectTimeoutMs)', () => RDMACommunicator.create(options({ connectTimeoutMs: timeoutMs }))],
      ['create (writeTimeoutMs)', () => RDMACommunicator.create(options({ writeTimeoutMs: timeoutMs }))],
    ]
    for (const [what, run] of calls) {
      const error = await expectKvError(t, run, 'ERR_INVALID_ARGUMENT', [shown, '0..2147483647'])
      t.truthy(error, what)
    }
  }
  // Nothing was closed or torn down by the refused calls.
  t.true(prefill.isConnected(HOST, decode.port))
  await prefill.writeCache(HOST, decode.port, [0], [0], 0)
})
