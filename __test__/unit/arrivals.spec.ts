/**
 * The arrival store (ts/arrivals.ts): notices kept per tag up to a bound, and the waits of
 * waitForArrival that they settle, time out or that an abort ends.
 */
import test from 'ava'
import { type Arrival, Arrivals, layerSet } from '../../ts/arrivals'
import { KvTransferError } from '../../ts/errors'
import type { RequestTag } from '../../ts/tags'
import { stateOf, useFakeClock } from './fake-clock'
import { assertRefused } from './refusal'

const notice = (tag: RequestTag, layerIdx: number, blocks = 4): Arrival => ({
  peer: 'prefill-0',
  tag,
  layerIdx,
  blocks,
  tpRank: 0,
  tpSize: 1,
  part: 0,
  parts: 1,
  verified: false,
})
/** A notice from writer `tpRank` of `tpSize` covering `part` of `parts` of the blocks. */
const shard = (
  tag: RequestTag,
  layerIdx: number,
  tpRank: number,
  tpSize: number,
  part: number,
  parts: number,
  blocks = 4,
): Arrival => ({
  ...notice(tag, layerIdx, blocks),
  peer: `prefill-${tpRank}`,
  tpRank,
  tpSize,
  part,
  parts,
})
const layersOf = (arrivals: Arrival[]) => arrivals.map((a) => a.layerIdx).sort((a, b) => a - b)

test('layerSet: the default is layer 0, n means 0..n-1, a list is taken as it is', (t) => {
  t.deepEqual([...layerSet(undefined, 8)], [0])
  t.deepEqual([...layerSet(3, 8)], [0, 1, 2])
  t.deepEqual([...layerSet(8, 8)], [0, 1, 2, 3, 4, 5, 6, 7])
  t.deepEqual([...layerSet([4, 2, 4], 8)], [4, 2])
})

test('layerSet: what could never complete is refused, naming the value and the layer count', (t) => {
  for (const bad of [0, -1, 9, 1.5, Number.NaN]) {
    assertRefused(t, () => layerSet(bad, 8), 'layers', String(bad), '1..8')
  }
  assertRefused(t, () => layerSet('x', 8), 'layers', '"x"')
  assertRefused(t, () => layerSet([], 8), 'layers', 'array')
  assertRefused(t, () => layerSet(['1'], 8), 'layers', '"1"')
  for (const bad of [8, -1, 0.5]) {
    const error = t.throws(() => layerSet([0, bad], 8), { instanceOf: KvTransferError })
    t.is(error?.code, 'ERR_LAYER_OUT_OF_RANGE')
    t.true(
      error?.message.includes(`layer ${bad} is out of range`) && error.message.includes('8 layers'),
      error?.message,
    )
  }
})

test('a wait resolves only once every asked layer arrived, with those layers only', async (t) => {
  const arrivals = new Arrivals(100)
  const wait = arrivals.wait('req-1', new Set([0, 1, 2]), {})
  arrivals.add(notice('req-1', 0))
  arrivals.add(notice('req-1', 2))
  arrivals.add(notice('req-1', 7))
  arrivals.add(notice('req-2', 1))
  t.is(await stateOf(wait), 'pending', 'layer 1 of req-1 has not arrived (req-2 does not count)')
  arrivals.add(notice('req-1', 1, 9))
  const got = await wait
  t.deepEqual(layersOf(got), [0, 1, 2], 'layer 7 was not asked for')
  t.deepEqual(
    got.find((a) => a.layerIdx === 1),
    notice('req-1', 1, 9),
  )
})

test('notices kept before the wait count: it resolves at once', async (t) => {
  const arrivals = new Arrivals(100)
  arrivals.add(notice(5n, 0))
  arrivals.add(notice(5n, 1))
  t.deepEqual(layersOf(await arrivals.wait(5n, layerSet(2, 8), {})), [0, 1])
})

test('a bigint tag and the string of its digits are different tags', async (t) => {
  const arrivals = new Arrivals(100)
  const byBigint = arrivals.wait(42n, layerSet(1, 8), {})
  const byString = arrivals.wait('42', layerSet(1, 8), {})
  arrivals.add(notice('42', 0))
  t.is(await stateOf(byBigint), 'pending')
  t.deepEqual(
    (await byString).map((a) => a.tag),
    ['42'],
  )
  arrivals.add(notice(42n, 0))
  t.deepEqual(
    (await byBigint).map((a) => a.tag),
    [42n],
  )
})

test('waiters of one tag each resolve when their own layers are in', async (t) => {
  const arrivals = new Arrivals(100)
  const first = arrivals.wait('r', new Set([0]), {})
  const both = arrivals.wait('r', new Set([0, 1]), {})
  arrivals.add(notice('r', 0))
  t.deepEqual(layersOf(await first), [0])
  t.is(await stateOf(both), 'pending')
  arrivals.add(notice('r', 1))
  t.deepEqual(layersOf(await both), [0, 1])
})

test.serial('a wait times out with ERR_TIMEOUT naming the tag and the missing layers', async (t) => {
  const clock = useFakeClock(t)
  const arrivals = new Arrivals(100)
  const wait = arrivals.wait(7n, layerSet(4, 8), { timeoutMs: 250 })
  arrivals.add(notice(7n, 1))
  arrivals.add(notice(7n, 3))
  clock.advance(249)
  t.is(await stateOf(wait), 'pending')
  clock.advance(1)
  const error = await t.throwsAsync(wait, { instanceOf: KvTransferError })
  t.is(error?.code, 'ERR_TIMEOUT')
  t.is(error?.message, 'timed out after 250 ms waiting for tag 7: layers 0, 2 have not arrived')
  // The abandoned waiter is gone: the missing layers arriving later settle nothing, and a
  // new wait still finds the kept notices.
  arrivals.add(notice(7n, 0))
  arrivals.add(notice(7n, 2))
  t.deepEqual(layersOf(await arrivals.wait(7n, layerSet(4, 8), {})), [0, 1, 2, 3])
})

test.serial('a wait whose layers arrive in time resolves and leaves no timer behind', async (t) => {
  const clock = useFakeClock(t)
  const arrivals = new Arrivals(100)
  const wait = arrivals.wait('soon', layerSet(1, 8), { timeoutMs: 1000 })
  t.is(clock.pending, 1)
  arrivals.add(notice('soon', 0))
  t.deepEqual(layersOf(await wait), [0])
  t.is(clock.pending, 0)
})

test('an abort rejects the wait with ERR_ABORTED naming the tag', async (t) => {
  const arrivals = new Arrivals(100)
  const controller = new AbortController()
  const wait = arrivals.wait('stop-me', layerSet(1, 8), { signal: controller.signal })
  controller.abort()
  const error = await t.throwsAsync(wait, { instanceOf: KvTransferError })
  t.is(error?.code, 'ERR_ABORTED')
  t.is(error?.message, 'waitForArrival(stop-me) was aborted')
})

test('an already aborted signal rejects the wait at once', async (t) => {
  const arrivals = new Arrivals(100)
  const error = await t.throwsAsync(arrivals.wait(1n, layerSet(1, 8), { signal: AbortSignal.abort() }), {
    instanceOf: KvTransferError,
  })
  t.is(error?.code, 'ERR_ABORTED')
})

test('beyond maxPending the oldest tag is dropped whole, each of its notices reported', async (t) => {
  const dropped: Arrival[] = []
  const arrivals = new Arrivals(3, (arrival) => dropped.push(arrival))
  arrivals.add(notice('old', 0))
  arrivals.add(notice('old', 1))
  arrivals.add(notice('mid', 0))
  t.deepEqual(dropped, [], 'three notices fit')
  arrivals.add(notice('new', 0))
  t.deepEqual(dropped, [notice('old', 0), notice('old', 1)])
  // What was kept still settles waits; what was dropped does not.
  t.deepEqual(layersOf(await arrivals.wait('mid', layerSet(1, 8), {})), [0])
  t.deepEqual(layersOf(await arrivals.wait('new', layerSet(1, 8), {})), [0])
  const controller = new AbortController()
  const waitForDropped = arrivals.wait('old', layerSet(1, 8), { signal: controller.signal })
  t.is(await stateOf(waitForDropped), 'pending')
  controller.abort()
  await t.throwsAsync(waitForDropped, { instanceOf: KvTransferError })
})

test('a notice that completes a waiter is kept too and counts toward the bound; evicted, it is no drop', async (t) => {
  const dropped: Arrival[] = []
  const arrivals = new Arrivals(1, (arrival) => dropped.push(arrival))
  const wait = arrivals.wait('a', layerSet(1, 8), {})
  arrivals.add(notice('a', 0))
  t.deepEqual(layersOf(await wait), [0])
  t.deepEqual(layersOf(await arrivals.wait('a', layerSet(1, 8), {})), [0], 'kept for a later wait')
  arrivals.add(notice('b', 0))
  t.deepEqual(dropped, [], "'a' was evicted for 'b', but a wait had consumed it")
  arrivals.add(notice('c', 0))
  t.deepEqual(dropped, [notice('b', 0)], 'nobody consumed b')
})

test('a notice a listener handled is kept for waits all the same; evicted, it is no drop', async (t) => {
  const dropped: Arrival[] = []
  const arrivals = new Arrivals(2, (arrival) => dropped.push(arrival))
  arrivals.add(notice('heard', 0), true)
  arrivals.add(notice('heard', 1), true)
  t.deepEqual(layersOf(await arrivals.wait('heard', layerSet(2, 8), {})), [0, 1], 'a listener does not hide it')
  arrivals.add(notice('unheard', 0))
  arrivals.add(notice('unheard', 1))
  t.deepEqual(dropped, [], "'heard' was evicted, consumed")
  arrivals.add(notice('later', 0), true)
  t.deepEqual(dropped, [notice('unheard', 0), notice('unheard', 1)], 'only what nobody consumed counts')
})

test('maxPending 0: nothing stays kept, a handled notice is no drop, and a wait in progress still gets its notice', async (t) => {
  const dropped: Arrival[] = []
  const arrivals = new Arrivals(0, (arrival) => dropped.push(arrival))
  arrivals.add(notice('heard', 0), true)
  t.deepEqual(dropped, [])
  arrivals.add(notice('unheard', 0))
  t.deepEqual(dropped, [notice('unheard', 0)], 'no listener, no wait: dropped at once')
  const wait = arrivals.wait('awaited', layerSet(1, 8), {})
  arrivals.add(notice('awaited', 0))
  t.deepEqual(layersOf(await wait), [0])
  t.deepEqual(dropped, [notice('unheard', 0)])
})

test('the notices of a tag a wait is gathering are not evicted, whatever the bound', async (t) => {
  const dropped: Arrival[] = []
  const arrivals = new Arrivals(2, (arrival) => dropped.push(arrival))
  const wait = arrivals.wait('long', layerSet(3, 8), {})
  arrivals.add(notice('long', 0))
  arrivals.add(notice('other', 0))
  arrivals.add(notice('long', 1))
  arrivals.add(notice('more', 0))
  t.deepEqual(
    dropped,
    [notice('other', 0), notice('more', 0)],
    "the tags no wait gathers went (the gathered notices count toward the bound); 'long' stayed",
  )
  arrivals.add(notice('long', 2))
  t.deepEqual(layersOf(await wait), [0, 1, 2])
})

test('forget drops the kept notices of a tag and frees their room', async (t) => {
  const dropped: Arrival[] = []
  const arrivals = new Arrivals(2, (arrival) => dropped.push(arrival))
  arrivals.add(notice('a', 0))
  arrivals.add(notice('b', 0))
  arrivals.forget('a')
  arrivals.add(notice('c', 0))
  t.deepEqual(dropped, [], 'forgetting "a" made room for "c"')
  arrivals.forget('never-seen')
  const controller = new AbortController()
  const wait = arrivals.wait('a', layerSet(1, 8), { signal: controller.signal })
  t.is(await stateOf(wait), 'pending', 'the forgotten notice no longer settles a wait')
  controller.abort()
  await t.throwsAsync(wait, { instanceOf: KvTransferError })
})

test('rejectAll rejects every waiter of every tag with the given error, and keeps the notices', async (t) => {
  const arrivals = new Arrivals(100)
  arrivals.add(notice('a', 0))
  // Each misses a layer: 'a' has only layer 0.
  const waits = [
    arrivals.wait('a', new Set([1]), {}),
    arrivals.wait('a', layerSet(2, 8), {}),
    arrivals.wait(9n, layerSet(1, 8), {}),
  ]
  const closed = new KvTransferError('ERR_CLOSED', 'communicator closed')
  arrivals.rejectAll(closed)
  for (const wait of waits) t.is(await t.throwsAsync(wait), closed)
  t.deepEqual(layersOf(await arrivals.wait('a', layerSet(1, 8), {})), [0])
})

test('a layer written in parts arrives only once every part did (2:1, 4:2)', async (t) => {
  const arrivals = new Arrivals(100)
  // 2 → 1: the decode's blocks are two halves, from writer ranks 0 and 1.
  const wait = arrivals.wait('r', new Set([0, 1]), {})
  arrivals.add(shard('r', 0, 0, 2, 0, 2))
  arrivals.add(shard('r', 1, 0, 2, 0, 2))
  t.is(await stateOf(wait), 'pending', 'rank 1 has written nothing yet')
  arrivals.add(shard('r', 0, 1, 2, 1, 2))
  t.is(await stateOf(wait), 'pending', 'layer 1 still lacks rank 1')
  arrivals.add(shard('r', 1, 1, 2, 1, 2))
  t.deepEqual(layersOf(await wait), [0, 0, 1, 1])
  // 4 → 2 (decode rank 1): writer ranks 2 and 3 are parts 0 and 1.
  const four = arrivals.wait('q', new Set([0]), {})
  arrivals.add(shard('q', 0, 3, 4, 1, 2))
  arrivals.add(shard('q', 0, 3, 4, 1, 2))
  t.is(await stateOf(four), 'pending', 'the same part twice is not the other part')
  arrivals.add(shard('q', 0, 2, 4, 0, 2))
  t.deepEqual((await four).map((a) => a.tpRank).sort(), [2, 3, 3])
})

test.serial('a wait missing a rank times out naming the part that did not arrive', async (t) => {
  const clock = useFakeClock(t)
  const arrivals = new Arrivals(100)
  const wait = arrivals.wait('half', new Set([0, 1, 2]), { timeoutMs: 100 })
  arrivals.add(shard('half', 0, 0, 2, 0, 2))
  arrivals.add(shard('half', 1, 0, 2, 0, 2))
  clock.advance(100)
  const error = await t.throwsAsync(wait, { instanceOf: KvTransferError })
  t.is(error?.code, 'ERR_TIMEOUT')
  t.is(
    error?.message,
    'timed out after 100 ms waiting for tag half: layers 2 have not arrived; layer 0: part 1 of 2 has not arrived; layer 1: part 1 of 2 has not arrived',
  )
})

test.serial('expectBlocks: a part counts once its calls carried that many blocks; more is refused', async (t) => {
  const clock = useFakeClock(t)
  const arrivals = new Arrivals(100)
  const wait = arrivals.wait('b', new Set([0]), { timeoutMs: 100 }, 8)
  arrivals.add(shard('b', 0, 0, 2, 0, 2, 5))
  arrivals.add(shard('b', 0, 1, 2, 1, 2, 8))
  t.is(await stateOf(wait), 'pending', 'part 0 has 5 of 8 blocks')
  clock.advance(100)
  const error = await t.throwsAsync(wait, { instanceOf: KvTransferError })
  t.regex(error!.message, /layer 0: part 0 of 2 has 5 of 8 blocks/)
  arrivals.add(shard('b', 0, 0, 2, 0, 2, 3))
  t.is((await arrivals.wait('b', new Set([0]), {}, 8)).length, 3, 'chunked writes sum up')
  const over = arrivals.wait('b', new Set([0]), {}, 7)
  const refused = await t.throwsAsync(over, { instanceOf: KvTransferError })
  t.is(refused?.code, 'ERR_BLOCK_COUNT_MISMATCH')
  t.regex(refused!.message, /8 blocks arrived, expectBlocks is 7/)
})

test('writers that disagree on the parts, and a failed checksum, reject the wait', async (t) => {
  const arrivals = new Arrivals(100)
  arrivals.add(shard('mixed', 0, 0, 2, 0, 2))
  arrivals.add(shard('mixed', 0, 0, 1, 0, 1))
  const mixed = await t.throwsAsync(arrivals.wait('mixed', new Set([0]), {}), { instanceOf: KvTransferError })
  t.is(mixed?.code, 'ERR_TP_MISMATCH')
  const wait = arrivals.wait('bad', new Set([0]), {})
  const error = new KvTransferError('ERR_CHECKSUM_MISMATCH', 'checksum mismatch')
  arrivals.add({ ...notice('bad', 0), error })
  t.is(await t.throwsAsync(wait), error)
})
