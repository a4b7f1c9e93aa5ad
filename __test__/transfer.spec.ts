/**
 * Data path across two processes: the prefill communicator lives in this process, the
 * decode one in a forked child (fixtures/decode-peer.ts). Every written block is checked
 * byte for byte (SHA-256 of every block of every region, plus raw bytes of some), and every
 * block not written must still be zero.
 */
import test from 'ava'
import {
  HOST,
  Mirror,
  RDMACommunicator,
  TRANSPORT,
  assertPeerMatches,
  connect,
  freePort,
  makePrefill,
  ms,
  quietMs,
  pick,
  sleep,
  spawnPeer,
  within,
} from './helpers.js'

const LAYERS = 3
const PREFILL_BLOCKS = 32
const DECODE_BLOCKS = 48

for (const blockBytes of [1024, 64 * 1024]) {
  test.serial(
    `K+V blocks of ${blockBytes / 1024} KiB arrive byte for byte (scattered and contiguous; number[], Uint32Array, Int32Array)`,
    async (t) => {
      const peer = await spawnPeer(t, { layers: LAYERS, blockNumber: DECODE_BLOCKS, blockBytes })
      t.is(peer.transport, TRANSPORT === 'auto' ? peer.transport : TRANSPORT)
      const prefill = makePrefill(t, { layers: LAYERS, blockNumber: PREFILL_BLOCKS, blockBytes })
      const mirror = new Mirror(prefill, DECODE_BLOCKS)
      await connect(t, prefill, peer)

      // Nothing written yet: all zero.
      await assertPeerMatches(t, peer, mirror, 'before any write')

      const calls: Array<{
        layer: number
        local: number[] | Uint32Array | Int32Array
        remote: number[] | Uint32Array | Int32Array
      }> = [
        // scattered ids as number[]
        { layer: 0, local: [5, 17, 2, 30, 31], remote: [40, 3, 11, 25, 47] },
        // contiguous on both sides as Uint32Array (coalesced into one run)
        {
          layer: 1,
          local: Uint32Array.from({ length: 8 }, (_, i) => 8 + i),
          remote: Uint32Array.from({ length: 8 }, (_, i) => 16 + i),
        },
        // partly contiguous, partly scattered, as Int32Array
        { layer: 2, local: Int32Array.from([0, 1, 2, 20, 9, 9]), remote: Int32Array.from([44, 45, 46, 0, 31, 32]) },
        // contiguous locally but reversed remotely, number[]
        { layer: 0, local: [10, 11, 12, 13], remote: [9, 8, 7, 6] },
        // random selection, Uint32Array
        { layer: 2, local: Uint32Array.from(pick(PREFILL_BLOCKS, 6)), remote: Uint32Array.from([1, 2, 3, 12, 13, 14]) },
      ]
      for (const call of calls) {
        await prefill.comm.writeCache(HOST, peer.port, call.local, call.remote, call.layer)
        mirror.apply(call.layer, call.local, call.remote)
      }
      // An empty call is a no-op that resolves.
      await prefill.comm.writeCache(HOST, peer.port, [], [], 1)

      await assertPeerMatches(t, peer, mirror, 'after the writes')
      // Raw bytes of a few blocks, too.
      t.true((await peer.bytes(0, 'K', 40)).equals(prefill.block(0, 'K', 5)))
      t.true((await peer.bytes(0, 'V', 47)).equals(prefill.block(0, 'V', 31)))
      t.true((await peer.bytes(2, 'V', 32)).equals(prefill.block(2, 'V', 9)))
      t.true(
        (await peer.bytes(1, 'K', 15)).equals(Buffer.alloc(blockBytes)),
        'block 15 of layer 1 was not written and stays zero',
      )
    },
  )
}

test.serial('a block rewritten later holds the latest bytes', async (t) => {
  const blockBytes = 4096
  const peer = await spawnPeer(t, { layers: 1, blockNumber: 8, blockBytes })
  const prefill = makePrefill(t, { layers: 1, blockNumber: 8, blockBytes })
  const mirror = new Mirror(prefill, 8)
  await connect(t, prefill, peer)
  for (const local of [[1], [2], [3]]) {
    await prefill.comm.writeCache(HOST, peer.port, local, [5], 0)
    mirror.apply(0, local, [5])
  }
  await assertPeerMatches(t, peer, mirror)
  t.true((await peer.bytes(0, 'K', 5)).equals(prefill.block(0, 'K', 3)))
})

test.serial('key-only caches (localValueCache: []) transfer K only', async (t) => {
  const blockBytes = 2048
  const peer = await spawnPeer(t, { layers: 2, blockNumber: 16, blockBytes, keyOnly: true })
  const prefill = makePrefill(t, { layers: 2, blockNumber: 16, blockBytes, keyOnly: true })
  const mirror = new Mirror(prefill, 16)
  await connect(t, prefill, peer)
  await prefill.comm.writeCache(HOST, peer.port, [0, 5, 6, 7], [15, 1, 2, 3], 0)
  mirror.apply(0, [0, 5, 6, 7], [15, 1, 2, 3])
  await prefill.comm.writeCache(HOST, peer.port, Int32Array.from([3]), Int32Array.from([3]), 1)
  mirror.apply(1, [3], [3])
  const digests = await peer.digests()
  t.is(digests.V, null)
  await assertPeerMatches(t, peer, mirror)
  t.true((await peer.bytes(0, 'K', 15)).equals(prefill.block(0, 'K', 0)))
})

test.serial("the seed's positional constructor form connects and writes", async (t) => {
  const blockBytes = 1024
  const peer = await spawnPeer(t, { layers: 2, blockNumber: 8, blockBytes })
  const keys = [Buffer.alloc(8 * blockBytes, 0x11), Buffer.alloc(8 * blockBytes, 0x22)]
  // ArrayBuffer and a typed array that is not a Uint8Array are accepted regions, too.
  const values = [
    new Uint32Array(2 * blockBytes).fill(0x33333333),
    Buffer.alloc(8 * blockBytes, 0x44).buffer.slice(0, 8 * blockBytes),
  ]
  const comm = new RDMACommunicator('prefill', 0, '0', keys, values, 8, blockBytes, {
    transport: TRANSPORT,
    name: 'positional',
  })
  t.teardown(() => comm.close())
  t.is(comm.role, 'prefill')
  t.is(comm.blockNumber, 8)
  t.is(comm.blockBytes, blockBytes)
  await comm.ready
  t.true(comm.port > 0, 'port 0 binds some free port')
  t.is(await comm.connect(HOST, String(peer.port)), true)
  await comm.writeCache(HOST, peer.port, [1], [6], 0)
  await comm.writeCache(HOST, peer.port, [2], [7], 1)
  t.true((await peer.bytes(0, 'K', 6)).equals(Buffer.alloc(blockBytes, 0x11)))
  t.true((await peer.bytes(0, 'V', 6)).equals(Buffer.alloc(blockBytes, 0x33)))
  t.true((await peer.bytes(1, 'K', 7)).equals(Buffer.alloc(blockBytes, 0x22)))
  t.true((await peer.bytes(1, 'V', 7)).equals(Buffer.alloc(blockBytes, 0x44)))
  t.true((await peer.bytes(1, 'K', 6)).equals(Buffer.alloc(blockBytes)))
})

test.serial('connect waits for a peer that starts later', async (t) => {
  const blockBytes = 1024
  const port = await freePort()
  const prefill = makePrefill(t, { layers: 2, blockNumber: 8, blockBytes })
  const started = Date.now()
  const connecting = prefill.comm.connect(HOST, port, { timeoutMs: ms(30_000) })
  let settled = false
  connecting.then(
    () => (settled = true),
    () => (settled = true),
  )
  await sleep(quietMs(1000))
  t.false(settled, 'connect must still be waiting while nobody listens')
  t.false(prefill.comm.isConnected(HOST, port))
  const peer = await spawnPeer(t, { layers: 2, blockNumber: 8, blockBytes, port })
  t.is(peer.port, port)
  t.is(await within(connecting, ms(60_000), 'connect'), true)
  t.log(`connected after ${Date.now() - started} ms`)
  t.true(prefill.comm.isConnected(HOST, port))
  t.false(prefill.comm.isConnected(HOST, port === 65535 ? 65534 : port + 1), 'another port is another peer')
  t.false(prefill.comm.isConnected('192.0.2.1', port), 'another host is another peer')
  // And the link works.
  const mirror = new Mirror(prefill, 8)
  await prefill.comm.writeCache(HOST, port, [7, 0], [0, 7], 1)
  mirror.apply(1, [7, 0], [0, 7])
  await assertPeerMatches(t, peer, mirror)
})

test.serial('64 concurrent writeCache calls across layers all resolve and land exactly', async (t) => {
  const layers = 4
  const blockBytes = 4096
  const blockNumber = 128
  const perCall = 8
  const peer = await spawnPeer(t, { layers, blockNumber, blockBytes })
  const prefill = makePrefill(t, { layers, blockNumber, blockBytes })
  const mirror = new Mirror(prefill, blockNumber)
  await connect(t, prefill, peer)
  // Per layer: 16 calls of 8 blocks cover every decode block exactly once, in random order.
  const calls: Array<{ layer: number; local: number[]; remote: number[] }> = []
  for (let layer = 0; layer < layers; layer++) {
    const remote = pick(blockNumber, blockNumber)
    for (let c = 0; c < blockNumber / perCall; c++) {
      calls.push({ layer, local: pick(blockNumber, perCall), remote: remote.slice(c * perCall, (c + 1) * perCall) })
    }
  }
  // Interleave layers so that calls of all layers are in flight together.
  calls.sort((a, b) => a.remote[0] - b.remote[0])
  t.is(calls.length, 64)
  const kinds = [
    (ids: number[]) => ids,
    (ids: number[]) => Uint32Array.from(ids),
    (ids: number[]) => Int32Array.from(ids),
  ]
  const results = await within(
    Promise.allSettled(
      calls.map((call, i) =>
        prefill.comm.writeCache(HOST, peer.port, kinds[i % 3](call.local), kinds[(i + 1) % 3](call.remote), call.layer),
      ),
    ),
    ms(120_000),
    '64 writes',
  )
  const failed = results.filter((r) => r.status === 'rejected')
  t.deepEqual(failed, [], 'every call resolves')
  for (const call of calls) mirror.apply(call.layer, call.local, call.remote)
  await assertPeerMatches(t, peer, mirror)
})
