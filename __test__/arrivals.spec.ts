/**
 * Arrival notices across processes: the decode child waits with waitForArrival and
 * reports what it got plus the digests of its memory at that moment.
 */
import test, { type ExecutionContext } from 'ava'
import {
  HOST,
  Mirror,
  RDMACommunicator,
  TRANSPORT,
  assertPeerMatches,
  connect,
  differences,
  eventually,
  makePrefill,
  ms,
  quietMs,
  spawnPeer,
  sleep,
  type Arrival,
} from './helpers.js'

const LAYERS = 3
const BLOCK_BYTES = 8192
const BLOCKS = 16

async function setup(t: ExecutionContext) {
  const peer = await spawnPeer(t, { layers: LAYERS, blockNumber: BLOCKS, blockBytes: BLOCK_BYTES })
  const prefill = makePrefill(t, {
    layers: LAYERS,
    blockNumber: BLOCKS,
    blockBytes: BLOCK_BYTES,
    name: 'prefill-arrivals',
  })
  const mirror = new Mirror(prefill, BLOCKS)
  await connect(t, prefill, peer)
  return { peer, prefill, mirror }
}

const byLayer = (a: Arrival, b: Arrival) => a.layerIdx - b.layerIdx

test.serial(
  'bigint tag: waitForArrival (registered first) resolves once all layers landed, bytes already there',
  async (t) => {
    const { peer, prefill, mirror } = await setup(t)
    const tag = 0xffff_ffff_ffff_fffen
    const wait = await peer.startWait(tag, { layers: [0, 1, 2], timeoutMs: ms(60_000) })
    const local = [3, 4, 5, 9]
    const remote = [0, 1, 2, 15]
    for (let layer = 0; layer < LAYERS; layer++) {
      await prefill.comm.writeCache(HOST, peer.port, local, remote, layer, { tag })
      mirror.apply(layer, local, remote)
    }
    const outcome = await wait.finish()
    t.true(outcome.ok, outcome.error?.message)
    const arrivals = [...outcome.arrivals!].sort(byLayer)
    t.deepEqual(
      arrivals,
      [0, 1, 2].map((layerIdx) => ({
        peer: 'prefill-arrivals',
        tag,
        layerIdx,
        blocks: 4,
        tpRank: 0,
        tpSize: 1,
        part: 0,
        parts: 1,
        verified: false,
      })),
    )
    t.is(typeof arrivals[0].tag, 'bigint')
    t.deepEqual(differences(outcome.digests!, mirror.digests()), [], 'every byte is in place when the wait resolves')
  },
)

test.serial('waitForArrival resolves only when every requested layer arrived', async (t) => {
  const { peer, prefill, mirror } = await setup(t)
  const tag = 'partial'
  const wait = await peer.startWait(tag, { layers: LAYERS, timeoutMs: ms(60_000) })
  await prefill.comm.writeCache(HOST, peer.port, [1], [1], 0, { tag })
  await prefill.comm.writeCache(HOST, peer.port, [2], [2], 2, { tag })
  mirror.apply(0, [1], [1])
  mirror.apply(2, [2], [2])
  let done = false
  const finishing = wait.finish().then((o) => {
    done = true
    return o
  })
  await sleep(quietMs(500))
  t.false(done, 'layer 1 has not arrived yet')
  await prefill.comm.writeCache(HOST, peer.port, [3, 4], [3, 4], 1, { tag })
  mirror.apply(1, [3, 4], [3, 4])
  const outcome = await finishing
  t.true(outcome.ok, outcome.error?.message)
  t.deepEqual(
    outcome.arrivals!.map((a) => [a.layerIdx, a.blocks]).sort((a, b) => a[0] - b[0]),
    [
      [0, 1],
      [1, 2],
      [2, 1],
    ],
  )
  t.deepEqual(differences(outcome.digests!, mirror.digests()), [])
})

test.serial('string tag: notices that arrive before the wait are kept', async (t) => {
  const { peer, prefill, mirror } = await setup(t)
  const tag = 'req-αβγ-42'
  for (let layer = 0; layer < LAYERS; layer++) {
    await prefill.comm.writeCache(HOST, peer.port, Uint32Array.from([7, 8]), Uint32Array.from([10, 11]), layer, { tag })
    mirror.apply(layer, [7, 8], [10, 11])
  }
  // Let the notices reach the child's JS thread before it starts waiting.
  t.true(await eventually(async () => (await peer.events()).length === LAYERS, ms(10_000)))
  const wait = await peer.startWait(tag, { layers: [2, 0, 1], timeoutMs: ms(5_000) })
  const outcome = await wait.finish()
  t.true(outcome.ok, outcome.error?.message)
  t.deepEqual(
    [...outcome.arrivals!].sort(byLayer),
    [0, 1, 2].map((layerIdx) => ({
      peer: 'prefill-arrivals',
      tag,
      layerIdx,
      blocks: 2,
      tpRank: 0,
      tpSize: 1,
      part: 0,
      parts: 1,
      verified: false,
    })),
  )
  t.deepEqual(differences(outcome.digests!, mirror.digests()), [])
  // A string tag and a bigint tag with the same digits are different tags.
  const other = await peer.startWait('42', { timeoutMs: 200 })
  t.is((await other.finish()).error?.code, 'ERR_TIMEOUT')
})

test.serial('waitForArrival for a tag never sent times out with ERR_TIMEOUT', async (t) => {
  const { peer, prefill } = await setup(t)
  await prefill.comm.writeCache(HOST, peer.port, [0], [0], 0, { tag: 'some-other-tag' })
  await prefill.comm.writeCache(HOST, peer.port, [0], [0], 1, { tag: 7n })
  const wait = await peer.startWait('never-sent', { layers: 2, timeoutMs: 300 })
  const outcome = await wait.finish()
  t.false(outcome.ok)
  t.true(outcome.error!.isKvTransferError)
  t.is(outcome.error!.code, 'ERR_TIMEOUT')
  t.regex(outcome.error!.message, /300 ms/)
  t.regex(outcome.error!.message, /never-sent/)
  t.regex(outcome.error!.message, /layers 0, 1/)
  t.true(outcome.elapsedMs >= 250 && outcome.elapsedMs < 300 + ms(5000), `elapsed ${outcome.elapsedMs} ms`)
  // Only layer 1 of 7n arrived: waiting for 0 and 1 names the missing layer.
  const partial = await peer.startWait(7n, { layers: [0, 1], timeoutMs: 200 })
  const p = await partial.finish()
  t.is(p.error?.code, 'ERR_TIMEOUT')
  t.regex(p.error!.message, /layers 0 have not arrived/)
})

test.serial('waitForArrival aborted by an AbortSignal: ERR_ABORTED', async (t) => {
  const { peer } = await setup(t)
  const wait = await peer.startWait('aborted', { timeoutMs: ms(60_000), abortAfterMs: 200 })
  const outcome = await wait.finish()
  t.is(outcome.error?.code, 'ERR_ABORTED')
  t.true(outcome.elapsedMs < ms(5000))
})

test.serial("'arrival' events fire exactly once per tagged call, none for untagged calls", async (t) => {
  const { peer, prefill } = await setup(t)
  const calls: Array<{ layer: number; tag: bigint | string; blocks: number[] }> = [
    { layer: 0, tag: 1n, blocks: [0] },
    { layer: 1, tag: 1n, blocks: [1, 2] },
    { layer: 2, tag: 1n, blocks: [3, 4, 5] },
    { layer: 0, tag: 'b', blocks: [6] },
    { layer: 0, tag: 'b', blocks: [7] }, // the same layer twice: two events
    { layer: 1, tag: 0n, blocks: [] }, // an empty tagged call still reports
  ]
  await Promise.all(
    calls.map((c) => prefill.comm.writeCache(HOST, peer.port, c.blocks, c.blocks, c.layer, { tag: c.tag })),
  )
  // Untagged calls: no events.
  await prefill.comm.writeCache(HOST, peer.port, [8, 9], [8, 9], 2)
  await prefill.comm.writeCache(HOST, peer.port, [10], [10], 0, {})
  t.true(await eventually(async () => (await peer.events()).length >= calls.length, ms(10_000)), 'all events arrive')
  await sleep(quietMs(500)) // room for duplicates to show up
  const events = await peer.events()
  const key = (e: { layer: number; tag: bigint | string; blocks: number }) =>
    `${typeof e.tag}:${String(e.tag)}:${e.layer}:${e.blocks}`
  t.deepEqual(
    events.map((e) => key({ layer: e.layerIdx, tag: e.tag, blocks: e.blocks })).sort(),
    calls.map((c) => key({ layer: c.layer, tag: c.tag, blocks: c.blocks.length })).sort(),
  )
  t.true(events.every((e) => e.peer === 'prefill-arrivals'))
})

test.serial(
  '60 layers, tags interleaved from two prefill peers into one decode: each notice once, after its bytes',
  async (t) => {
    const layers = 60
    const blocks = 16
    const blockBytes = 1024
    const peer = await spawnPeer(t, { layers, blockNumber: blocks, blockBytes })
    const a = makePrefill(t, { layers, blockNumber: blocks, blockBytes, name: 'prefill-a' })
    const b = makePrefill(t, { layers, blockNumber: blocks, blockBytes, name: 'prefill-b' })
    await connect(t, a, peer)
    await connect(t, b, peer)
    const mirrorA = new Mirror(a, blocks)
    const mirrorB = new Mirror(b, blocks)
    const tags = { a: ['a-0', 'a-1'], b: [7n, 8n] }
    const waits = await Promise.all(
      [...tags.a, ...tags.b].map((tag) => peer.startWait(tag, { layers, timeoutMs: ms(120_000) })),
    )
    // Peer a writes remote blocks 0..7 (tag a-0 even layers' ids 0..3, a-1 ids 4..7), peer b 8..15.
    const calls: Promise<void>[] = []
    for (let layer = 0; layer < layers; layer++) {
      for (let i = 0; i < 2; i++) {
        const localA = [i * 4, i * 4 + 1, i * 4 + 2, i * 4 + 3]
        const localB = [15 - i * 4, 14 - i * 4, 13 - i * 4, 12 - i * 4]
        const remoteA = localA
        const remoteB = [8 + i * 4, 9 + i * 4, 10 + i * 4, 11 + i * 4]
        calls.push(a.comm.writeCache(HOST, peer.port, localA, remoteA, layer, { tag: tags.a[i] }))
        calls.push(b.comm.writeCache(HOST, peer.port, localB, remoteB, layer, { tag: tags.b[i] }))
        mirrorA.apply(layer, localA, remoteA)
        mirrorB.apply(layer, localB, remoteB)
      }
    }
    await Promise.all(calls)
    for (let layer = 0; layer < layers; layer++) {
      mirrorB.keys[layer].copy(mirrorA.keys[layer], 8 * blockBytes, 8 * blockBytes)
      mirrorB.values[layer].copy(mirrorA.values[layer], 8 * blockBytes, 8 * blockBytes)
    }
    for (const wait of waits) {
      const outcome = await wait.finish()
      t.true(outcome.ok, outcome.error?.message)
      t.is(outcome.arrivals!.length, layers)
      t.deepEqual(
        outcome.arrivals!.map((x) => x.layerIdx).sort((x, y) => x - y),
        Array.from({ length: layers }, (_, i) => i),
      )
    }
    t.true(await eventually(async () => (await peer.events()).length === layers * 4, ms(10_000)))
    const events = await peer.events()
    const seen = new Set(events.map((e) => `${e.peer}|${String(e.tag)}|${e.layerIdx}`))
    t.is(seen.size, layers * 4, 'every (peer, tag, layer) notice exactly once')
    t.true(events.every((e) => (e.peer === 'prefill-a') === (typeof e.tag === 'string') && e.blocks === 4))
    await assertPeerMatches(t, peer, mirrorA)
  },
)

test.serial(
  'noticesDropped counts only the notices nobody consumed: a listener or a wait consumes them, and a listener hides none from waits',
  async (t) => {
    const shape = { layers: 1, blockNumber: 4, blockBytes: 1024 }
    const decode = async (name: string) => {
      const comm = await RDMACommunicator.create({
        role: 'decode',
        gpuIdx: 0,
        port: 0,
        localKeyCache: [Buffer.alloc(4096)],
        localValueCache: [Buffer.alloc(4096)],
        ...shape,
        transport: TRANSPORT,
        authToken: '',
        name,
        maxPendingArrivals: 2,
      })
      t.teardown(() => comm.close())
      return comm
    }
    const [heard, unheard, awaited] = await Promise.all([decode('heard'), decode('unheard'), decode('awaited')])
    const events: Arrival[] = []
    heard.on('arrival', (arrival) => events.push(arrival))
    const prefill = makePrefill(t, { ...shape, name: 'prefill-dropped' })
    for (const comm of [heard, unheard, awaited]) await prefill.comm.connect(HOST, comm.port, { timeoutMs: ms(30_000) })
    const tags = Array.from({ length: 6 }, (_, i) => `req-${i}`)
    for (const tag of tags) {
      await prefill.comm.writeCache(HOST, heard.port, [0], [0], 0, { tag })
      await prefill.comm.writeCache(HOST, unheard.port, [0], [0], 0, { tag })
      await prefill.comm.writeCache(HOST, awaited.port, [0], [0], 0, { tag })
      await awaited.waitForArrival(tag, { timeoutMs: ms(10_000) })
    }
    t.true(await eventually(() => events.length === tags.length, ms(10_000)), 'the listener heard every notice')
    t.true(await eventually(() => unheard.metrics().noticesDropped === 4, ms(10_000)), 'nobody consumed 4 of 6')
    await sleep(quietMs(200))
    // Six notices and room for two in each: four evicted from each communicator.
    t.is(unheard.metrics().noticesDropped, 4, 'no listener, no wait: the 4 evicted notices were dropped')
    t.is(heard.metrics().noticesDropped, 0, 'the listener consumed what was evicted')
    t.is(awaited.metrics().noticesDropped, 0, 'the waits consumed what was evicted')
    t.regex(heard.metricsText(), /kvtransfer_notices_dropped_total\{[^}]*peer="prefill-dropped"[^}]*\} 0\n/)
    // A listener hides nothing from a wait: the kept notices settle it as without one.
    const [last] = await heard.waitForArrival(tags[5], { timeoutMs: ms(5_000) })
    t.like(last, { peer: 'prefill-dropped', tag: tags[5], layerIdx: 0 })
  },
)
