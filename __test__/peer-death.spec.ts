/**
 * The decode process dies (SIGKILL, or closes): the prefill side notices within a bounded
 * time, writes reject with a documented code and never hang, and isConnected turns false.
 */
import test, { type ExecutionContext } from 'ava'
import type { PeerLeft } from '../lib/index.js'
import {
  HOST,
  TRANSPORT,
  connect,
  eventually,
  expectKvError,
  makePrefill,
  ms,
  quietMs,
  sleep,
  spawnPeer,
  within,
} from './helpers.js'
import type { KvTransferErrorCode } from './helpers.js'

/** Documented codes for a broken link (ERR_RDMA_COMPLETION: the RDMA flavour). */
const BROKEN: KvTransferErrorCode[] = ['ERR_PEER_DISCONNECTED', 'ERR_IO', 'ERR_RDMA_COMPLETION']

async function writeUntilRejected(t: ExecutionContext, write: () => Promise<void>, boundMs: number): Promise<unknown> {
  const deadline = Date.now() + boundMs
  for (let attempt = 0; Date.now() < deadline; attempt++) {
    try {
      await within(write(), boundMs, `writeCache attempt ${attempt} after the peer died`)
    } catch (error) {
      t.log(`rejected on attempt ${attempt}: ${(error as Error).message}`)
      return error
    }
    await sleep(50)
  }
  t.fail(`writes kept succeeding for ${boundMs} ms after the peer died`)
  return undefined
}

test.serial(
  'SIGKILL of the decode process: writeCache rejects with a documented code, isConnected turns false',
  async (t) => {
    const blockBytes = 16 * 1024
    const peer = await spawnPeer(t, { layers: 2, blockNumber: 32, blockBytes })
    const prefill = makePrefill(t, { layers: 2, blockNumber: 32, blockBytes })
    await connect(t, prefill, peer)
    await prefill.comm.writeCache(HOST, peer.port, [0, 1], [0, 1], 0)
    await peer.kill('SIGKILL')
    const started = Date.now()
    const error = await writeUntilRejected(
      t,
      () => prefill.comm.writeCache(HOST, peer.port, [2, 3], [2, 3], 1),
      ms(15_000),
    )
    await expectKvError(t, () => Promise.reject(error), BROKEN, [`${HOST}:${peer.port}`])
    t.log(`noticed after ${Date.now() - started} ms`)
    t.true(await eventually(() => !prefill.comm.isConnected(HOST, peer.port), ms(10_000)), 'isConnected turns false')
    // Later calls fail at once with the same family of codes and do not hang.
    const next = await within(
      prefill.comm.writeCache(HOST, peer.port, [4], [4], 0).then(
        () => undefined,
        (e: unknown) => e,
      ),
      ms(5_000),
      'a write on a broken link',
    )
    await expectKvError(t, () => Promise.reject(next ?? new Error('resolved')), BROKEN)
  },
)

test.serial('writes in flight when the decode process dies all settle (none hangs)', async (t) => {
  const blockBytes = 64 * 1024
  const blockNumber = 64
  const peer = await spawnPeer(t, { layers: 4, blockNumber, blockBytes })
  const prefill = makePrefill(t, { layers: 4, blockNumber, blockBytes })
  await connect(t, prefill, peer)
  const ids = Array.from({ length: blockNumber }, (_, i) => i)
  const inflight: Array<Promise<unknown>> = []
  for (let round = 0; round < 8; round++) {
    for (let layer = 0; layer < 4; layer++) {
      inflight.push(
        prefill.comm.writeCache(HOST, peer.port, ids, ids, layer).then(
          () => 'ok',
          (e: unknown) => e,
        ),
      )
    }
  }
  await sleep(5)
  await peer.kill('SIGKILL')
  const results = await within(Promise.all(inflight), ms(30_000), 'writes in flight when the peer died')
  const failures = results.filter((r) => r !== 'ok')
  t.log(`${results.length - failures.length} resolved before the death, ${failures.length} rejected`)
  for (const failure of failures) await expectKvError(t, () => Promise.reject(failure), BROKEN)
  // The link is gone either way.
  const error = await writeUntilRejected(t, () => prefill.comm.writeCache(HOST, peer.port, [0], [0], 0), ms(15_000))
  await expectKvError(t, () => Promise.reject(error), BROKEN)
  t.true(await eventually(() => !prefill.comm.isConnected(HOST, peer.port), ms(10_000)))
})

test.serial('the decode side closing cleanly: writes reject, isConnected turns false', async (t) => {
  const peer = await spawnPeer(t, { layers: 1, blockNumber: 8, blockBytes: 1024 })
  const prefill = makePrefill(t, { layers: 1, blockNumber: 8, blockBytes: 1024 })
  await connect(t, prefill, peer)
  await prefill.comm.writeCache(HOST, peer.port, [1], [1], 0)
  await peer.close()
  const error = await writeUntilRejected(t, () => prefill.comm.writeCache(HOST, peer.port, [2], [2], 0), ms(15_000))
  await expectKvError(t, () => Promise.reject(error), BROKEN)
  t.true(await eventually(() => !prefill.comm.isConnected(HOST, peer.port), ms(10_000)))
})

test.serial('reconnecting to a restarted decode process on the same port works', async (t) => {
  const peer = await spawnPeer(t, { layers: 1, blockNumber: 8, blockBytes: 1024 })
  const prefill = makePrefill(t, { layers: 1, blockNumber: 8, blockBytes: 1024 })
  await connect(t, prefill, peer)
  await peer.kill('SIGKILL')
  await writeUntilRejected(t, () => prefill.comm.writeCache(HOST, peer.port, [2], [2], 0), ms(15_000))
  const again = await spawnPeer(t, { layers: 1, blockNumber: 8, blockBytes: 1024, port: peer.port })
  await connect(t, prefill, again)
  await prefill.comm.writeCache(HOST, again.port, [5], [6], 0)
  t.true((await again.bytes(0, 'K', 6)).equals(prefill.block(0, 'K', 5)))
  t.true((await again.bytes(0, 'V', 6)).equals(prefill.block(0, 'V', 5)))
})

test.serial(
  "'peer-left': once, with the peer and a documented code, when a connected peer's process is killed",
  async (t) => {
    const peer = await spawnPeer(t, { layers: 1, blockNumber: 8, blockBytes: 1024 })
    const other = await spawnPeer(t, { layers: 1, blockNumber: 8, blockBytes: 1024 })
    const prefill = makePrefill(t, { layers: 1, blockNumber: 8, blockBytes: 1024 })
    const left: PeerLeft[] = []
    prefill.comm.on('peer-left', (event) => left.push(event))
    await connect(t, prefill, peer)
    await connect(t, prefill, other)
    // A reconnect replaces the connection: the peer did not leave.
    await connect(t, prefill, other)
    await prefill.comm.writeCache(HOST, peer.port, [1], [1], 0)
    await peer.kill('SIGKILL')
    // TCP and NVLink notice a killed process at once; one-sided RDMA when a write fails.
    if (TRANSPORT === 'rdma')
      await writeUntilRejected(t, () => prefill.comm.writeCache(HOST, peer.port, [2], [2], 0), ms(15_000))
    t.true(await eventually(() => left.length > 0, ms(15_000)), "'peer-left' is emitted")
    await sleep(quietMs(300)) // room for a second event
    t.is(left.length, 1, JSON.stringify(left))
    t.is(left[0].peer, `${HOST}:${peer.port}`)
    t.true(BROKEN.includes(left[0].code), left[0].code)
    t.true(typeof left[0].reason === 'string' && left[0].reason.length > 0)
    t.log(`${left[0].code}: ${left[0].reason}`)
    t.false(prefill.comm.isConnected(HOST, peer.port))
    // The other peer is still connected, and closing this side reports nothing.
    t.true(prefill.comm.isConnected(HOST, other.port))
    await prefill.comm.close()
    await sleep(quietMs(200))
    t.is(left.length, 1)
  },
)

test.serial("'peer-left' of a timed-out call and of abortPeer carry ERR_TIMEOUT and ERR_ABORTED", async (t) => {
  const blockBytes = 256 * 1024
  const all = Array.from({ length: 64 }, (_, i) => i)
  const stalled = await spawnPeer(t, { layers: 1, blockNumber: 64, blockBytes })
  const aborted = await spawnPeer(t, { layers: 1, blockNumber: 64, blockBytes })
  const prefill = makePrefill(t, { layers: 1, blockNumber: 64, blockBytes })
  const left: PeerLeft[] = []
  prefill.comm.on('peer-left', (event) => left.push(event))
  await connect(t, prefill, aborted)
  t.true(await prefill.comm.abortPeer(HOST, aborted.port))
  t.true(await eventually(() => left.length === 1, ms(5_000)))
  t.like(left[0], { peer: `${HOST}:${aborted.port}`, code: 'ERR_ABORTED' })
  if (TRANSPORT !== 'tcp') return // only TCP can stall a stopped process's writes
  await connect(t, prefill, stalled)
  stalled.child.kill('SIGSTOP')
  t.teardown(() => stalled.child.kill('SIGCONT'))
  await expectKvError(
    t,
    () => prefill.comm.writeCache(HOST, stalled.port, all, all, 0, { timeoutMs: 300 }),
    'ERR_TIMEOUT',
  )
  t.true(await eventually(() => left.length === 2, ms(5_000)))
  t.like(left[1], { peer: `${HOST}:${stalled.port}`, code: 'ERR_TIMEOUT' })
  t.regex(left[1].reason, /300 ms/)
})
