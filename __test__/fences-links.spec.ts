/**
 * A fence reaches every link a writer has to the fencing side. One writer connects to the
 * same decode twice, by two of its addresses (two peer keys, two links, two fence
 * channels); a fence by tag must fail the pending calls and refuse the new ones of that tag
 * on both links, and not one byte of a fenced write may land after it resolves.
 */
import test from 'ava'
import type { FenceResult } from '../lib/index.js'
import { HOST, expectKvError, makePrefill, ms, sleep, spawnPeer } from './helpers.js'

const LAYERS = 2
const BLOCKS = 16
const BLOCK_BYTES = 256 * 1024
const ROUNDS = 6
const CANARY = 0x3a
/** The decode's second address: the same listener reached another way (it binds every address). */
const OTHER = HOST === '127.0.0.1' ? '127.0.0.2' : '127.0.0.1'

test.serial('a fence by tag covers every link of a writer to the fencing side', async (t) => {
  const peer = await spawnPeer(t, { layers: LAYERS, blockNumber: BLOCKS, blockBytes: BLOCK_BYTES })
  const prefill = makePrefill(t, { layers: LAYERS, blockNumber: BLOCKS, blockBytes: BLOCK_BYTES })
  const hosts = [HOST, OTHER]
  const ensureConnected = async () => {
    for (const host of hosts) {
      if (!prefill.comm.isConnected(host, peer.port))
        t.true(await prefill.comm.connect(host, peer.port, { timeoutMs: ms(30_000) }))
    }
  }
  const ids = Array.from({ length: BLOCKS }, (_, i) => i)
  const codes = new Map<string, number>()
  for (let round = 0; round < ROUNDS; round++) {
    await ensureConnected()
    t.is(prefill.comm.metrics().peers.length, 2, 'two links to one decode')
    const tag = `two-links-${round}`
    // Calls of the tag in flight on both links (the first link's channel is the older one).
    const writes = Array.from({ length: 8 }, (_, i) =>
      prefill.comm.writeCache(hosts[i % 2], peer.port, ids, ids, i % LAYERS, { tag, timeoutMs: ms(20_000) }).then(
        () => 'ok',
        (error: { code?: string }) => error.code ?? 'unknown',
      ),
    )
    await sleep(round % 3)
    const result = await peer.request<FenceResult>('fenceAndPaint', {
      target: { tag },
      canary: CANARY,
      ackTimeoutMs: ms(5000),
    })
    t.deepEqual(result, { acknowledged: ['prefill-test'], cutOff: [] }, `round ${round}`)
    for (const code of await Promise.all(writes)) codes.set(code, (codes.get(code) ?? 0) + 1)
    await sleep(50)
    t.is(await peer.request<number>('notCanary', { canary: CANARY }), 0, `round ${round}: a fenced write landed`)
    // The tag is refused on either link, whichever channel took the fence.
    await ensureConnected()
    for (const host of hosts) {
      await expectKvError(t, () => prefill.comm.writeCache(host, peer.port, [0], [0], 0, { tag }), 'ERR_FENCED', [
        `'${tag}'`,
      ])
    }
    t.is(await peer.request<number>('notCanary', { canary: CANARY }), 0, `round ${round}: a refused call wrote`)
  }
  t.log(`outcomes: ${JSON.stringify(Object.fromEntries(codes))}`)
  t.deepEqual(
    [...codes.keys()].filter((c) => c !== 'ok' && c !== 'ERR_FENCED'),
    [],
    'every call resolved or failed ERR_FENCED',
  )
  // Another tag still goes over both links. A link without fenced calls of its own may have
  // been cut by the decode all the same (it cuts every connection of a writer that answered
  // with fenced calls); over RDMA the writer learns so at its next write: connect again.
  await ensureConnected()
  for (const host of hosts) {
    const write = () => prefill.comm.writeCache(host, peer.port, [1], [1], 0, { tag: 'fresh', timeoutMs: ms(20_000) })
    await write().catch(async (error: { code?: string }) => {
      t.log(`${host}: the link was cut (${error.code}); connecting again`)
      t.true(
        ['ERR_RDMA_COMPLETION', 'ERR_PEER_DISCONNECTED', 'ERR_NOT_CONNECTED'].includes(error.code ?? ''),
        error.code,
      )
      t.true(await prefill.comm.connect(host, peer.port, { timeoutMs: ms(30_000) }))
      await write()
    })
  }
})
