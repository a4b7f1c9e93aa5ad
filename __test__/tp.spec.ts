/**
 * Tensor-parallel shards: several communicators in this process, prefill TP P and decode TP
 * D, every prefill rank connected to the decode ranks it pairs with. A "global" cache (all
 * heads) is random; each rank holds its shard of every block (head-major: one range of the
 * block; token-major: one range per token row). After the writes every decode rank must
 * hold, byte for byte, its shard of the listed global blocks, K, V and both scales; every
 * other byte keeps its canary. Every refusal is typed and writes nothing.
 */
import { randomFillSync } from 'node:crypto'
import test, { type ExecutionContext } from 'ava'
import { HOST, RDMACommunicator, TRANSPORT, expectKvError } from './helpers.js'

const LAYERS = 2
/** Bytes of one block of the whole cache (all heads), and of its scale block. */
const GLOBAL_BLOCK = 512
const GLOBAL_SCALE = 32
const PREFILL_BLOCKS = 12
const DECODE_BLOCKS = 16
const TOKENS = 4

type Order = 'HND' | 'NHD'
interface Rank {
  comm: RDMACommunicator
  /** [kind][layer]: K, V, K-scale, V-scale. */
  regions: Buffer[][]
  /** The bytes the regions held right after construction (the decode side's canaries). */
  canary: Buffer[][]
}
interface Cluster {
  prefill: Rank[]
  decode: Rank[]
  /** [kind][layer]: the whole cache, PREFILL_BLOCKS blocks. */
  global: Buffer[][]
  tokens: number
}

const kindBytes = (kind: number) => (kind < 2 ? GLOBAL_BLOCK : GLOBAL_SCALE)

/** Rank `rank` of `size`'s shard of one global block: one range per token row. */
function shardOf(block: Buffer, rank: number, size: number, tokens: number): Buffer {
  const row = block.length / tokens
  const part = row / size
  const rows = Array.from({ length: tokens }, (_, t) =>
    block.subarray(t * row + rank * part, t * row + (rank + 1) * part),
  )
  return Buffer.concat(rows)
}

interface RankOptions {
  tpSize: number
  tpRank: number
  order: Order
  replicated?: boolean
  /** The block bytes this rank declares (default: its shard of the global block). */
  blockBytes?: number
  scaleBlockBytes?: number
  dstTpSize?: number
}

async function makeRank(
  t: ExecutionContext,
  role: 'prefill' | 'decode',
  global: Buffer[][],
  options: RankOptions,
): Promise<Rank> {
  const size = options.replicated ? 1 : options.tpSize
  const rank = options.replicated ? 0 : options.tpRank
  const tokens = options.order === 'NHD' ? TOKENS : 1
  const blocks = role === 'prefill' ? PREFILL_BLOCKS : DECODE_BLOCKS
  const regions = [0, 1, 2, 3].map((kind) => {
    const declared = kind < 2 ? options.blockBytes : options.scaleBlockBytes
    const bytes = declared ?? kindBytes(kind) / size
    return Array.from({ length: LAYERS }, (_, layer) => {
      // Decode: random canaries. A declared size outside the model: random too.
      if (role === 'decode' || declared !== undefined) return randomFillSync(Buffer.alloc(blocks * bytes))
      const whole = global[kind][layer]
      const shards = Array.from({ length: blocks }, (_, b) =>
        shardOf(whole.subarray(b * kindBytes(kind), (b + 1) * kindBytes(kind)), rank, size, tokens),
      )
      return Buffer.concat(shards)
    })
  })
  const comm = new RDMACommunicator({
    role,
    gpuIdx: 0,
    port: 0,
    localKeyCache: regions[0],
    localValueCache: regions[1],
    keyScaleCache: regions[2],
    valueScaleCache: regions[3],
    blockNumber: blocks,
    blockBytes: options.blockBytes ?? GLOBAL_BLOCK / size,
    scaleBlockBytes: options.scaleBlockBytes ?? GLOBAL_SCALE / size,
    tpSize: options.tpSize,
    tpRank: options.tpRank,
    kvReplicated: options.replicated ?? false,
    blockLayout: options.order === 'NHD' ? { order: 'NHD', tokensPerBlock: TOKENS } : { order: 'HND' },
    transport: TRANSPORT,
    authToken: '',
  })
  t.teardown(() => comm.close())
  await comm.ready
  return { comm, regions, canary: regions.map((layers) => layers.map((r) => Buffer.from(r))) }
}

async function makeCluster(
  t: ExecutionContext,
  p: number,
  d: number,
  order: Order,
  replicated = false,
): Promise<Cluster> {
  const global = [0, 1, 2, 3].map((kind) =>
    Array.from({ length: LAYERS }, () => randomFillSync(Buffer.alloc(PREFILL_BLOCKS * kindBytes(kind)))),
  )
  const ranks = (role: 'prefill' | 'decode', size: number) =>
    Promise.all(
      Array.from({ length: size }, (_, rank) =>
        makeRank(t, role, global, { tpSize: size, tpRank: rank, order, replicated }),
      ),
    )
  return {
    prefill: await ranks('prefill', p),
    decode: await ranks('decode', d),
    global,
    tokens: order === 'NHD' ? TOKENS : 1,
  }
}

/** The decode ranks prefill rank `i` of `p` writes to (decode TP `d`). */
function pairs(i: number, p: number, d: number): number[] {
  if (p >= d) return [Math.floor(i / (p / d))]
  const r = d / p
  return Array.from({ length: r }, (_, j) => i * r + j)
}

/** [layer, localIds, remoteIds]: runs contiguous on both sides, single blocks, the edges. */
const WRITES: Array<[number, number[], number[]]> = [
  [0, [1, 2, 3, 11], [4, 5, 6, 15]],
  [1, [0, 7], [9, 0]],
]
/** Written through a prepared list for layer 1. */
const PREPARED: [number[], number[]] = [
  [5, 6],
  [12, 13],
]

/** Every decode rank: its shard of each written global block, canaries elsewhere. */
function check(
  t: ExecutionContext,
  cluster: Cluster,
  written: Array<[number, number[], number[]]>,
  shards: (k: number) => [number, number],
) {
  cluster.decode.forEach((rank, k) => {
    const [shardRank, shardSize] = shards(k)
    for (let kind = 0; kind < 4; kind++) {
      const gb = kindBytes(kind)
      const bb = gb / shardSize
      for (let layer = 0; layer < LAYERS; layer++) {
        const expected = Buffer.from(rank.canary[kind][layer])
        for (const [l, local, remote] of written) {
          if (l !== layer) continue
          local.forEach((id, i) => {
            const block = cluster.global[kind][layer].subarray(id * gb, (id + 1) * gb)
            shardOf(block, shardRank, shardSize, cluster.tokens).copy(expected, remote[i] * bb)
          })
        }
        t.true(
          rank.regions[kind][layer].equals(expected),
          `decode rank ${k}: ${['K', 'V', 'K-scale', 'V-scale'][kind]} of layer ${layer}`,
        )
      }
    }
  })
}

/** Every prefill rank connects to its decode ranks and writes WRITES and PREPARED to each. */
async function writeAll(
  cluster: Cluster,
  targets: (i: number) => number[],
): Promise<Array<[number, number[], number[]]>> {
  for (const [i, prefill] of cluster.prefill.entries()) {
    for (const k of targets(i)) {
      const port = cluster.decode[k].comm.port
      await prefill.comm.connect(HOST, port, { dstTpSize: cluster.decode.length })
      for (const [layer, local, remote] of WRITES) await prefill.comm.writeCache(HOST, port, local, remote, layer)
      const prepared = prefill.comm.prepareBlocks(HOST, port, ...PREPARED)
      await prefill.comm.writeCache(HOST, port, prepared, 1)
    }
  }
  return [...WRITES, [1, ...PREPARED]]
}

for (const [p, d, order] of [
  [2, 1, 'HND'],
  [1, 2, 'HND'],
  [4, 2, 'HND'],
  [2, 4, 'HND'],
  [2, 2, 'HND'],
  [2, 1, 'NHD'],
  [2, 4, 'NHD'],
] as Array<[number, number, Order]>) {
  test.serial(
    `TP ${p}→${d} (${order}): every decode rank holds its shards byte for byte, canaries intact`,
    async (t) => {
      const cluster = await makeCluster(t, p, d, order)
      const written = await writeAll(cluster, (i) => pairs(i, p, d))
      check(t, cluster, written, (k) => [k, d])
      // Metrics count the bytes moved: the shard of K, V and both scales of every block.
      const blocks = written.reduce((n, [, ids]) => n + ids.length, 0) * pairs(0, p, d).length
      const shard = (2 * (GLOBAL_BLOCK + GLOBAL_SCALE)) / Math.max(p, d)
      t.is(cluster.prefill[0].comm.metrics().bytesWritten, blocks * shard)
    },
  )
}

test.serial('MLA (kvReplicated): whole blocks, any pairing (2 prefill ranks → 4 decode ranks, crossed)', async (t) => {
  const cluster = await makeCluster(t, 2, 4, 'HND', true)
  // Decode rank k is written by prefill rank (k + 1) mod 2: not the rank-to-rank rule.
  const written = await writeAll(cluster, (i) => [0, 1, 2, 3].filter((k) => (k + 1) % 2 === i))
  check(t, cluster, written, () => [0, 1])
})

/** Decode regions still hold exactly their canaries. */
function untouched(t: ExecutionContext, rank: Rank, what: string) {
  rank.regions.forEach((layers, kind) =>
    layers.forEach((region, layer) =>
      t.true(region.equals(rank.canary[kind][layer]), `${what}: kind ${kind} layer ${layer}`),
    ),
  )
}

test.serial('refused at connect with ERR_TP_MISMATCH, naming the values; nothing written', async (t) => {
  const global = [0, 1, 2, 3].map((kind) =>
    Array.from({ length: LAYERS }, () => randomFillSync(Buffer.alloc(PREFILL_BLOCKS * kindBytes(kind)))),
  )
  const decode = await makeRank(t, 'decode', global, { tpSize: 2, tpRank: 0, order: 'HND' })
  const port = decode.comm.port
  const refuse = async (prefill: RankOptions, code: 'ERR_TP_MISMATCH' | 'ERR_LAYOUT_MISMATCH', parts: string[]) => {
    const rank = await makeRank(t, 'prefill', global, prefill)
    await expectKvError(t, () => rank.comm.connect(HOST, port, { dstTpSize: prefill.dstTpSize }), code, parts)
    t.false(rank.comm.isConnected(HOST, port))
    await expectKvError(t, () => rank.comm.writeCache(HOST, port, [0], [0], 0), 'ERR_NOT_CONNECTED', [])
  }
  // Sizes that do not divide.
  await refuse({ tpSize: 3, tpRank: 0, order: 'HND', blockBytes: 256, scaleBlockBytes: 16 }, 'ERR_TP_MISMATCH', [
    'tpSize 3 is not a multiple of tpSize 2',
  ])
  // 4 → 2: prefill rank 2 belongs to decode rank 1, not 0.
  await refuse({ tpSize: 4, tpRank: 2, order: 'HND' }, 'ERR_TP_MISMATCH', ['tpRank 2 of tpSize 4', 'receiver rank 1'])
  // 1 → 2: decode rank 0 takes its shard from prefill rank 0 of 1; blockBytes must be 2 × 256.
  await refuse({ tpSize: 1, tpRank: 0, order: 'HND', blockBytes: 256, scaleBlockBytes: 32 }, 'ERR_TP_MISMATCH', [
    'blockBytes is 256',
    "writer's blockBytes must be 2 × the receiver's (512 here)",
  ])
  // 4 → 2 with a decode blockBytes that is not 2 × the prefill's.
  await refuse({ tpSize: 4, tpRank: 0, order: 'HND', blockBytes: 64, scaleBlockBytes: 8 }, 'ERR_TP_MISMATCH', [
    'blockBytes is 64',
    "receiver's blockBytes must be 2 × the writer's (128 here)",
  ])
  // Equal sizes: rank i writes to rank i only.
  await refuse({ tpSize: 2, tpRank: 1, order: 'HND' }, 'ERR_TP_MISMATCH', ['rank i writes to rank i'])
  // Equal sizes with another blockBytes: the layout check of old.
  await refuse({ tpSize: 2, tpRank: 0, order: 'HND', blockBytes: 128 }, 'ERR_LAYOUT_MISMATCH', ['blockBytes'])
  // The peer's size is not what connect was told (FastDeploy's dst_tp_size).
  await refuse({ tpSize: 2, tpRank: 0, order: 'HND', dstTpSize: 4 }, 'ERR_TP_MISMATCH', [
    'dstTpSize 4',
    'declares tpSize 2',
  ])
  // Replication and block order must be declared alike.
  await refuse(
    { tpSize: 2, tpRank: 0, order: 'HND', replicated: true, blockBytes: 256, scaleBlockBytes: 16 },
    'ERR_TP_MISMATCH',
    ['kvReplicated is true'],
  )
  await refuse({ tpSize: 4, tpRank: 0, order: 'NHD' }, 'ERR_TP_MISMATCH', ['token-major', 'head-major'])
  untouched(t, decode, 'after every refusal')
  // The right rank still connects (FastDeploy's positional dst_tp_size) and writes.
  const good = await makeRank(t, 'prefill', global, { tpSize: 4, tpRank: 1, order: 'HND' })
  await expectKvError(t, () => good.comm.connect(HOST, port, 3), 'ERR_TP_MISMATCH', ['dstTpSize 3'])
  t.true(await good.comm.connect(HOST, port, 2))
  await good.comm.writeCache(HOST, port, [4], [7], 1)
  const written = decode.regions[0][1].subarray(7 * 256, 8 * 256)
  t.true(written.subarray(128).equals(good.regions[0][1].subarray(4 * 128, 5 * 128)), 'rank 1 wrote the second half')
  t.true(written.subarray(0, 128).equals(decode.canary[0][1].subarray(7 * 256, 7 * 256 + 128)), 'the first half kept')
})

test.serial('bad tensor-parallel options are refused at construction with ERR_INVALID_ARGUMENT', async (t) => {
  const region = () => Buffer.alloc(64)
  const base = {
    role: 'prefill' as const,
    gpuIdx: 0,
    port: 0,
    blockNumber: 4,
    blockBytes: 16,
    localKeyCache: [region()],
    localValueCache: [region()],
    transport: TRANSPORT,
  }
  const make = (extra: object) => () => new RDMACommunicator({ ...base, ...extra })
  await expectKvError(t, make({ tpSize: 0 }), 'ERR_INVALID_ARGUMENT', ['tpSize', '0 given'])
  await expectKvError(t, make({ tpSize: 2, tpRank: 2 }), 'ERR_INVALID_ARGUMENT', ['tpRank', '2 given', '0..2'])
  await expectKvError(t, make({ tpSize: 1025 }), 'ERR_INVALID_ARGUMENT', ['tpSize', '1025'])
  await expectKvError(t, make({ blockLayout: { order: 'NHD', tokensPerBlock: 3 } }), 'ERR_INVALID_ARGUMENT', [
    'tokensPerBlock',
    '3 given but blockBytes 16',
  ])
  await expectKvError(t, make({ blockLayout: { order: 'XYZ' } }), 'ERR_INVALID_ARGUMENT', ['blockLayout.order'])
  await expectKvError(t, make({ kvReplicated: 'yes' }), 'ERR_INVALID_ARGUMENT', ['kvReplicated'])
  // FastDeploy's positional prefill_tp_size / prefill_tp_idx become tpSize / tpRank.
  await expectKvError(
    t,
    () => new RDMACommunicator('prefill', 0, 0, [region()], [region()], 4, 16, [], [], 0, 2, 2),
    'ERR_INVALID_ARGUMENT',
    ['tpRank', '2 given'],
  )
  const comm = new RDMACommunicator('prefill', 0, 0, [region()], [region()], 4, 16, [], [], 0, 2, 1, {
    transport: TRANSPORT,
    authToken: '',
  })
  t.teardown(() => comm.close())
  await comm.ready
  await expectKvError(t, () => comm.connect(HOST, 1, { dstTpSize: 2.5 }), 'ERR_INVALID_ARGUMENT', ['dstTpSize'])
})

test.serial(
  "FastDeploy's positional form: prefill_tp_size 2, prefill_tp_idx 1 writes the second half of a decode block",
  async (t) => {
    const decodeKeys = [randomFillSync(Buffer.alloc(4 * 64))]
    const decodeValues = [randomFillSync(Buffer.alloc(4 * 64))]
    const canary = Buffer.from(decodeKeys[0])
    const extra = { transport: TRANSPORT, authToken: '' }
    const decode = new RDMACommunicator('decode', 0, 0, decodeKeys, decodeValues, 4, 64, extra)
    t.teardown(() => decode.close())
    const keys = [randomFillSync(Buffer.alloc(4 * 32))]
    const values = [randomFillSync(Buffer.alloc(4 * 32))]
    const prefill = new RDMACommunicator('prefill', 0, 0, keys, values, 4, 32, [], [], 0, 2, 1, extra)
    t.teardown(() => prefill.close())
    await Promise.all([decode.ready, prefill.ready])
    // FastDeploy: base + rid × block_bytes × prefill_tp_size + block_bytes × prefill_tp_idx.
    await prefill.connect(HOST, decode.port, 1)
    await prefill.writeCache(HOST, decode.port, [3], [2], 0)
    const expected = Buffer.from(canary)
    keys[0].copy(expected, 2 * 64 + 32, 3 * 32, 4 * 32)
    t.true(decodeKeys[0].equals(expected))
  },
)
