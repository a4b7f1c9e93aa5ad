/**
 * Complete arrivals across tensor-parallel ranks, between processes: a decode rank in a
 * child process waits with waitForArrival; prefill ranks (this process) connect to it and
 * only some of them write. The wait must time out, typed, naming what is missing, while a
 * writer the shard rules make responsible for the decode's shard has not written; once
 * every responsible writer wrote, it resolves. Also: the checksum test hook (a byte
 * corrupted on the receiving side) surfaces as ERR_CHECKSUM_MISMATCH and in metrics.
 */
import { randomFillSync } from 'node:crypto'
import test, { type ExecutionContext } from 'ava'
import { HOST, RDMACommunicator, TRANSPORT, ms, quietMs, spawnPeer } from './helpers.js'

/** Checksums are verified over TCP and RDMA (README "Checksums"): skipped on NVLink. */
const summing = TRANSPORT === 'tcp' || TRANSPORT === 'rdma' ? test.serial : test.serial.skip

const LAYERS = 2
const BLOCKS = 8
/** Bytes of a decode block. */
const DECODE_BLOCK = 1024

interface Case {
  /** Prefill tpSize, decode tpSize, the decode rank under test. */
  prefill: number
  decode: number
  decodeRank: number
  replicated?: boolean
  /** Prefill ranks that connect to the decode rank, and those of them that write. */
  connected: number[]
  writing: number[]
  /** What the timeout names as missing. */
  missing: RegExp
}

function prefillRank(t: ExecutionContext, c: Case, rank: number): RDMACommunicator {
  // The shard rule on block bytes: a writer with more ranks holds a part of the decode block.
  const blockBytes = c.replicated ? DECODE_BLOCK : (DECODE_BLOCK * c.decode) / c.prefill
  const regions = () => Array.from({ length: LAYERS }, () => randomFillSync(Buffer.alloc(BLOCKS * blockBytes)))
  const comm = new RDMACommunicator({
    role: 'prefill',
    gpuIdx: 0,
    port: 0,
    localKeyCache: regions(),
    localValueCache: regions(),
    blockNumber: BLOCKS,
    blockBytes,
    tpSize: c.prefill,
    tpRank: rank,
    kvReplicated: c.replicated ?? false,
    transport: TRANSPORT,
    name: `prefill-rank-${rank}`,
    authToken: '',
  })
  t.teardown(() => comm.close())
  return comm
}

async function run(t: ExecutionContext, c: Case) {
  const peer = await spawnPeer(t, {
    layers: LAYERS,
    blockNumber: BLOCKS,
    blockBytes: DECODE_BLOCK,
    tpSize: c.decode,
    tpRank: c.decodeRank,
    kvReplicated: c.replicated,
  })
  const ranks = new Map(c.connected.map((rank) => [rank, prefillRank(t, c, rank)]))
  for (const comm of ranks.values()) {
    t.true(await comm.connect(HOST, peer.port, { dstTpSize: c.decode, timeoutMs: ms(30_000) }))
  }
  const write = async (rank: number) => {
    for (let layer = 0; layer < LAYERS; layer++) {
      await ranks.get(rank)!.writeCache(HOST, peer.port, [0, 1, 2], [5, 6, 7], layer, { tag: 'req' })
    }
  }
  for (const rank of c.writing) await write(rank)
  const partial = await (await peer.startWait('req', { layers: LAYERS, timeoutMs: quietMs(1_500) })).finish()
  t.false(partial.ok, 'a responsible writer has not written: the wait must not resolve')
  t.is(partial.error?.code, 'ERR_TIMEOUT')
  t.regex(partial.error!.message, c.missing)
  // The missing writers write: now it resolves, with every part of every layer.
  for (const rank of c.connected.filter((r) => !c.writing.includes(r))) await write(rank)
  const whole = await (await peer.startWait('req', { layers: LAYERS, timeoutMs: ms(30_000), expectBlocks: 3 })).finish()
  t.true(whole.ok, whole.error?.message)
  return whole.arrivals!
}

test.serial('2:1: a decode block is two halves; with only rank 0 written the wait times out', async (t) => {
  const arrivals = await run(t, {
    prefill: 2,
    decode: 1,
    decodeRank: 0,
    connected: [0, 1],
    writing: [0],
    missing: /layer 0: part 1 of 2 has not arrived; layer 1: part 1 of 2 has not arrived/,
  })
  t.deepEqual(arrivals.map((a) => [a.layerIdx, a.tpRank, a.tpSize, a.part, a.parts]).sort(), [
    [0, 0, 2, 0, 2],
    [0, 1, 2, 1, 2],
    [1, 0, 2, 0, 2],
    [1, 1, 2, 1, 2],
  ])
})

test.serial('4:2: decode rank 1 needs prefill ranks 2 and 3; with only rank 3 the wait times out', async (t) => {
  const arrivals = await run(t, {
    prefill: 4,
    decode: 2,
    decodeRank: 1,
    connected: [2, 3],
    writing: [3],
    missing: /layer 0: part 0 of 2 has not arrived/,
  })
  t.deepEqual([...new Set(arrivals.map((a) => `${a.tpRank}:${a.part}/${a.parts}`))].sort(), ['2:0/2', '3:1/2'])
})

test.serial('1:2: the one writer covers a decode rank whole; without it the wait times out', async (t) => {
  const arrivals = await run(t, {
    prefill: 1,
    decode: 2,
    decodeRank: 1,
    connected: [0],
    writing: [],
    missing: /layers 0, 1 have not arrived/,
  })
  t.true(arrivals.every((a) => a.tpSize === 1 && a.parts === 1))
})

test.serial(
  'MLA (replicated): any one writer holds the whole cache; with none written the wait times out',
  async (t) => {
    const arrivals = await run(t, {
      prefill: 2,
      decode: 1,
      decodeRank: 0,
      replicated: true,
      connected: [1],
      writing: [],
      missing: /layers 0, 1 have not arrived/,
    })
    t.true(arrivals.every((a) => a.tpRank === 1 && a.tpSize === 2 && a.parts === 1))
  },
)

summing('checksum: a byte corrupted on the receiving side is a typed mismatch, counted', async (t) => {
  const peer = await spawnPeer(t, {
    layers: LAYERS,
    blockNumber: BLOCKS,
    blockBytes: DECODE_BLOCK,
    // Test-only hook (README "Checksums"): flips one received byte of each checksummed call.
    env: { KVCACHE_TEST_CORRUPT_RECEIVE: '1' },
  })
  const comm = prefillRank(t, { prefill: 1, decode: 1, decodeRank: 0, connected: [0], writing: [], missing: /./ }, 0)
  t.true(await comm.connect(HOST, peer.port, { timeoutMs: ms(30_000) }))
  await comm.writeCache(HOST, peer.port, [1], [1], 0, { tag: 'plain' })
  await comm.writeCache(HOST, peer.port, [1, 2], [3, 4], 0, { tag: 'summed', checksum: 'crc32c' })
  const plain = await (await peer.startWait('plain', { timeoutMs: ms(10_000) })).finish()
  t.true(plain.ok, 'a call without a checksum is not touched by the hook')
  t.false(plain.arrivals![0].verified)
  const summed = await (await peer.startWait('summed', { timeoutMs: ms(10_000) })).finish()
  t.false(summed.ok)
  t.is(summed.error?.code, 'ERR_CHECKSUM_MISMATCH')
  t.regex(summed.error!.message, /tag summed: checksum mismatch in layer 0 from prefill-rank-0/)
  const metrics = await peer.request<{ checksumMismatches: number }>('metrics')
  t.is(metrics.checksumMismatches, 1)
})

summing('checksum: without corruption the arrival is verified; refusals are typed', async (t) => {
  const peer = await spawnPeer(t, { layers: LAYERS, blockNumber: BLOCKS, blockBytes: DECODE_BLOCK })
  const comm = prefillRank(t, { prefill: 1, decode: 1, decodeRank: 0, connected: [0], writing: [], missing: /./ }, 0)
  t.true(await comm.connect(HOST, peer.port, { timeoutMs: ms(30_000) }))
  await comm.writeCache(HOST, peer.port, [1, 2], [3, 4], 1, { tag: 'ok', checksum: 'crc32c', delivery: 'acked' })
  const ok = await (await peer.startWait('ok', { layers: [1], timeoutMs: ms(10_000) })).finish()
  t.true(ok.ok, ok.error?.message)
  t.true(ok.arrivals![0].verified)
  const untagged = await t.throwsAsync(comm.writeCache(HOST, peer.port, [1], [1], 0, { checksum: 'crc32c' }))
  t.is((untagged as { code?: string }).code, 'ERR_INVALID_ARGUMENT')
  const bad = await t.throwsAsync(comm.writeCache(HOST, peer.port, [1], [1], 0, { tag: 'x', checksum: 'md5' as never }))
  t.is((bad as { code?: string }).code, 'ERR_INVALID_ARGUMENT')
  t.regex((bad as Error).message, /invalid checksum: "md5" is not 'crc32c' or 'none'/)
})
