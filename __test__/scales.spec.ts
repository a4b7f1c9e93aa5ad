/**
 * fp8 scale caches (keyScaleCache, valueScaleCache, scaleBlockBytes): one writeCache call
 * moves K, V, K-scale and V-scale of every listed block, byte for byte; unlisted blocks
 * stay zero; a scale layout that differs is refused at connect; FastDeploy's positional
 * constructor form is accepted.
 */
import { randomFillSync } from 'node:crypto'
import test, { type ExecutionContext } from 'ava'
import { HOST, RDMACommunicator, TRANSPORT, expectKvError } from './helpers.js'

const LAYERS = 2
const BLOCK_BYTES = 512

interface Cache {
  comm: RDMACommunicator
  regions: Buffer[][]
}

/** A communicator in this process with K, V, K-scale, V-scale regions (random or zero). */
async function make(
  t: ExecutionContext,
  role: 'prefill' | 'decode',
  blockNumber: number,
  scaleBlockBytes: number,
  positional = false,
): Promise<Cache> {
  const region = (bytes: number) =>
    Array.from({ length: LAYERS }, () =>
      role === 'prefill' ? randomFillSync(Buffer.alloc(blockNumber * bytes)) : Buffer.alloc(blockNumber * bytes),
    )
  const [keys, values] = [region(BLOCK_BYTES), region(BLOCK_BYTES)]
  const [keyScales, valueScales] = scaleBlockBytes > 0 ? [region(scaleBlockBytes), region(scaleBlockBytes)] : [[], []]
  const extra = { transport: TRANSPORT, authToken: '' }
  const comm = positional
    ? new RDMACommunicator(
        role,
        0,
        0,
        keys,
        values,
        blockNumber,
        BLOCK_BYTES,
        keyScales,
        valueScales,
        scaleBlockBytes,
        1,
        0,
        extra,
      )
    : new RDMACommunicator({
        role,
        gpuIdx: 0,
        port: 0,
        localKeyCache: keys,
        localValueCache: values,
        keyScaleCache: keyScales,
        valueScaleCache: valueScales,
        scaleBlockBytes,
        blockNumber,
        blockBytes: BLOCK_BYTES,
        ...extra,
      })
  t.teardown(() => comm.close())
  await comm.ready
  return { comm, regions: [keys, values, keyScales, valueScales] }
}

/** Every block of every region of `decode` equals the prefill block written there, or zero. */
function check(t: ExecutionContext, prefill: Cache, decode: Cache, writes: Array<[number, number[], number[]]>): void {
  for (let kind = 0; kind < 4; kind++) {
    for (let layer = 0; layer < LAYERS; layer++) {
      const dst = decode.regions[kind][layer]
      const src = prefill.regions[kind][layer]
      if (!dst) continue
      const bb = kind < 2 ? BLOCK_BYTES : dst.length / (decode.comm.blockNumber as number)
      const expected = Buffer.alloc(dst.length)
      for (const [l, local, remote] of writes) {
        if (l !== layer) continue
        local.forEach((id, i) => src.copy(expected, remote[i] * bb, id * bb, (id + 1) * bb))
      }
      t.true(dst.equals(expected), `kind ${['K', 'V', 'K-scale', 'V-scale'][kind]} layer ${layer}`)
    }
  }
}

for (const scaleBlockBytes of [32, 1, 2048]) {
  test.serial(
    `K, V and ${scaleBlockBytes}-byte scale blocks arrive byte for byte; unlisted blocks stay zero`,
    async (t) => {
      const decode = await make(t, 'decode', 24, scaleBlockBytes)
      const prefill = await make(t, 'prefill', 16, scaleBlockBytes)
      await prefill.comm.connect(HOST, decode.comm.port)
      const writes: Array<[number, number[], number[]]> = [
        [0, [1, 2, 3, 15], [20, 21, 22, 0]],
        [1, [7, 0], [5, 23]],
      ]
      for (const [layer, local, remote] of writes)
        await prefill.comm.writeCache(HOST, decode.comm.port, local, remote, layer)
      const prepared = prefill.comm.prepareBlocks(HOST, decode.comm.port, [9, 10], [11, 12])
      await prefill.comm.writeCache(HOST, decode.comm.port, prepared, 1)
      writes.push([1, [9, 10], [11, 12]])
      check(t, prefill, decode, writes)
    },
  )
}

test.serial("FastDeploy's positional form with scales (tp 1, rank 0) connects and writes", async (t) => {
  const decode = await make(t, 'decode', 8, 16, true)
  const prefill = await make(t, 'prefill', 8, 16, true)
  await prefill.comm.connect(HOST, decode.comm.port)
  await prefill.comm.writeCache(HOST, decode.comm.port, [3], [4], 1)
  check(t, prefill, decode, [[1, [3], [4]]])
})

test.serial(
  'scale layouts that differ are refused at connect with ERR_LAYOUT_MISMATCH; bad scale regions are typed',
  async (t) => {
    const decode = await make(t, 'decode', 8, 0)
    const prefill = await make(t, 'prefill', 8, 16)
    await expectKvError(t, () => prefill.comm.connect(HOST, decode.comm.port), 'ERR_LAYOUT_MISMATCH', [
      'scale cache regions',
      'scaleBlockBytes is 0',
      'but 16',
    ])
    const other = await make(t, 'prefill', 8, 32)
    const decode16 = await make(t, 'decode', 8, 16)
    await expectKvError(t, () => other.comm.connect(HOST, decode16.comm.port), 'ERR_LAYOUT_MISMATCH', [
      'scaleBlockBytes is 16',
      'but 32',
    ])
    const region = () => Buffer.alloc(64)
    const base = { role: 'prefill' as const, gpuIdx: 0, port: 0, blockNumber: 4, blockBytes: 16, transport: TRANSPORT }
    const withScales = (extra: object) => () =>
      new RDMACommunicator({ ...base, localKeyCache: [region()], localValueCache: [region()], ...extra })
    await expectKvError(
      t,
      withScales({ keyScaleCache: [region()], valueScaleCache: [region()] }),
      'ERR_INVALID_ARGUMENT',
      ['scaleBlockBytes is 0'],
    )
    await expectKvError(t, withScales({ keyScaleCache: [region()], scaleBlockBytes: 4 }), 'ERR_INVALID_ARGUMENT', [
      'valueScaleCache',
      '0 regions given but localValueCache has 1',
    ])
    await expectKvError(
      t,
      withScales({ keyScaleCache: [Buffer.alloc(7)], valueScaleCache: [region()], scaleBlockBytes: 4 }),
      'ERR_INVALID_ARGUMENT',
      ['keyScaleCache', '7 bytes', 'scaleBlockBytes = 16'],
    )
    await expectKvError(t, withScales({ scaleBlockBytes: 1.5 }), 'ERR_INVALID_ARGUMENT', ['scaleBlockBytes'])
  },
)
