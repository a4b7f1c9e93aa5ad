/**
 * `decode.fence`: once it resolves, not one byte of the fenced writes lands. The decode runs
 * in its own process; each round starts writes into every block, fences them mid-flight,
 * paints every block with a canary at once, and checks afterwards that the canary is whole.
 * Runs over the transport the suite runs on (TCP here, RDMA in the Soft-RoCE VM).
 */
import test, { type ExecutionContext } from 'ava'
import type { FenceResult } from '../lib/index.js'
import { HOST, type Prefill, connect, expectKvError, makePrefill, ms, sleep, spawnPeer } from './helpers.js'
import type { DecodePeer } from './helpers.js'

const LAYERS = 2
const BLOCKS = 16
const BLOCK_BYTES = 256 * 1024
const ROUNDS = 8
const CANARY = 0xc5

/** Every block of every layer, written `calls` times with `tag`; each settles to its code or 'ok'. */
function startWrites(prefill: Prefill, peer: DecodePeer, tag: string, calls: number): Promise<string>[] {
  const ids = Array.from({ length: BLOCKS }, (_, i) => i)
  return Array.from({ length: calls }, (_, i) =>
    prefill.comm.writeCache(HOST, peer.port, ids, ids, i % LAYERS, { tag, timeoutMs: ms(20_000) }).then(
      () => 'ok',
      (error: { code?: string }) => error.code ?? 'unknown',
    ),
  )
}

async function setUp(t: ExecutionContext): Promise<{ prefill: Prefill; peer: DecodePeer }> {
  const peer = await spawnPeer(t, { layers: LAYERS, blockNumber: BLOCKS, blockBytes: BLOCK_BYTES })
  const prefill = makePrefill(t, { layers: LAYERS, blockNumber: BLOCKS, blockBytes: BLOCK_BYTES })
  return { prefill, peer }
}

async function ensureConnected(t: ExecutionContext, prefill: Prefill, peer: DecodePeer): Promise<void> {
  if (!prefill.comm.isConnected(HOST, peer.port)) await connect(t, prefill, peer)
}

test.serial('a fence by tag: the writer fails its pending calls ERR_FENCED and no byte lands after it', async (t) => {
  const { prefill, peer } = await setUp(t)
  const codes = new Map<string, number>()
  for (let round = 0; round < ROUNDS; round++) {
    await ensureConnected(t, prefill, peer)
    const tag = `req-${round}`
    const writes = startWrites(prefill, peer, tag, 6)
    await sleep(round % 4)
    const result = await peer.request<FenceResult>('fenceAndPaint', {
      target: { tag },
      canary: CANARY,
      ackTimeoutMs: ms(5000),
    })
    t.deepEqual(result, { acknowledged: ['prefill-test'], cutOff: [] }, `round ${round}`)
    for (const code of await Promise.all(writes)) codes.set(code, (codes.get(code) ?? 0) + 1)
    await sleep(50)
    t.is(await peer.request<number>('notCanary', { canary: CANARY }), 0, `round ${round}: a fenced write landed`)
    // The tag stays refused for holdMs, on this connection or a new one.
    await ensureConnected(t, prefill, peer)
    await expectKvError(t, () => prefill.comm.writeCache(HOST, peer.port, [0], [0], 0, { tag }), 'ERR_FENCED', [
      `'${tag}'`,
    ])
  }
  t.log(`outcomes: ${JSON.stringify(Object.fromEntries(codes))}`)
  t.deepEqual(
    [...codes.keys()].filter((c) => c !== 'ok' && c !== 'ERR_FENCED'),
    [],
    'every call resolved or failed ERR_FENCED',
  )
  t.true((codes.get('ERR_FENCED') ?? 0) > 0, 'some round fenced pending calls')
  // Another tag is not fenced.
  await prefill.comm.writeCache(HOST, peer.port, [1], [1], 0, { tag: 'fresh' })
})

test.serial('a writer that does not acknowledge is cut off; no byte lands after the fence', async (t) => {
  const { prefill, peer } = await setUp(t)
  let cutMidFlight = 0
  for (let round = 0; round < ROUNDS / 2; round++) {
    await ensureConnected(t, prefill, peer)
    // ~320 MiB: still in flight when the cut comes.
    const writes = startWrites(prefill, peer, `late-${round}`, 40)
    await sleep(round % 3)
    const fenced = peer.request<FenceResult>('fenceAndPaint', {
      target: { tag: `late-${round}` },
      canary: CANARY,
      ackTimeoutMs: 20,
    })
    // This process (the writer) is silent meanwhile: its engine threads keep writing, its
    // event loop cannot answer the fence.
    const until = Date.now() + 300
    while (Date.now() < until);
    const result = await fenced
    t.deepEqual(result, { acknowledged: [], cutOff: ['prefill-test'] }, `round ${round}`)
    const outcomes = await Promise.all(writes)
    if (outcomes.some((o) => o !== 'ok')) cutMidFlight++
    await sleep(50)
    t.is(await peer.request<number>('notCanary', { canary: CANARY }), 0, `round ${round}: a write landed after the cut`)
    t.log(`round ${round}: ${outcomes.filter((o) => o === 'ok').length} of ${outcomes.length} calls resolved`)
  }
  t.true(cutMidFlight > 0, 'some round cut the writer off mid-flight')
})

test.serial('fence checks its arguments', async (t) => {
  const { peer } = await setUp(t)
  const bad = [{}, { tag: 'a', peer: 'b' }, { peer: '' }, { tag: 1.5 }]
  for (const target of bad) {
    const error = await t.throwsAsync(peer.request('fenceAndPaint', { target, canary: 0 }))
    t.regex(error?.message ?? '', /\[ERR_INVALID_ARGUMENT\]/, JSON.stringify(target))
  }
  const error = await t.throwsAsync(
    peer.request('fenceAndPaint', { target: { tag: 'a' }, canary: 0, ackTimeoutMs: -1 }),
  )
  t.regex(error?.message ?? '', /\[ERR_INVALID_ARGUMENT\] invalid ackTimeoutMs/)
})
