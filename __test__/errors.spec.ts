/**
 * Every bad input gets its typed error (KvTransferError, stable code, a message naming the
 * value and the limit) and writes nothing: after each refused call a valid "fence" write
 * (ordered after it on the same link) completes, and the decode side's memory must then
 * hold exactly the fence block and zeros everywhere else.
 */
import test, { type ExecutionContext } from 'ava'
import {
  HOST,
  KvTransferError,
  Mirror,
  RDMACommunicator,
  TRANSPORT,
  assertPeerMatches,
  connect,
  expectKvError,
  freePort,
  makePrefill,
  ms,
  spawnPeer,
  type DecodePeer,
  type KvTransferErrorCode,
  type Prefill,
} from './helpers.js'

const LAYERS = 2
const BLOCK_BYTES = 1024
const PREFILL_BLOCKS = 16
const DECODE_BLOCKS = 8 // smaller than the prefill side: remote ids are limited by the handshake
const FENCE_LOCAL = 3
const FENCE_REMOTE = 7

let peer: DecodePeer
let prefill: Prefill
let mirror: Mirror

test.before(async () => {
  peer = await spawnPeer(undefined, { layers: LAYERS, blockNumber: DECODE_BLOCKS, blockBytes: BLOCK_BYTES })
  prefill = makePrefill(undefined, { layers: LAYERS, blockNumber: PREFILL_BLOCKS, blockBytes: BLOCK_BYTES })
  mirror = new Mirror(prefill, DECODE_BLOCKS)
  await prefill.comm.connect(HOST, peer.port, { timeoutMs: ms(30_000) })
})

test.after.always(async () => {
  await prefill?.comm.close()
  await peer?.kill()
})

const badWrite = test.macro(
  async (
    t,
    args: { local: unknown; remote: unknown; layer?: unknown; tag?: unknown; port?: unknown },
    code: KvTransferErrorCode,
    patterns: Array<string | RegExp>,
  ) => {
    t.true(prefill.comm.isConnected(HOST, peer.port))
    await expectKvError(
      t,
      () =>
        prefill.comm.writeCache(
          HOST,
          (args.port ?? peer.port) as number,
          args.local as number[],
          args.remote as number[],
          (args.layer ?? 0) as number,
          'tag' in args ? { tag: args.tag as string } : {},
        ),
      code,
      patterns,
    )
    // Fence: ordered after anything the refused call might have sent.
    for (let layer = 0; layer < LAYERS; layer++) {
      await prefill.comm.writeCache(HOST, peer.port, [FENCE_LOCAL], [FENCE_REMOTE], layer)
      mirror.apply(layer, [FENCE_LOCAL], [FENCE_REMOTE])
    }
    await assertPeerMatches(t, peer, mirror, 'after the refused call')
    t.true(prefill.comm.isConnected(HOST, peer.port), 'a refused call leaves the link usable')
  },
)

test.serial(
  'remote id out of range (peer blockNumber from the handshake)',
  badWrite,
  { local: [0, 1, 2], remote: [1, 2, DECODE_BLOCKS] },
  'ERR_BLOCK_ID_OUT_OF_RANGE',
  ['remoteBlockIds[2] = 8', 'blockNumber 8'],
)
test.serial(
  'remote id valid here but not on the peer (Uint32Array)',
  badWrite,
  { local: Uint32Array.from([0]), remote: Uint32Array.from([12]) },
  'ERR_BLOCK_ID_OUT_OF_RANGE',
  ['remoteBlockIds[0] = 12', 'blockNumber 8'],
)
test.serial(
  'local id out of range',
  badWrite,
  { local: [0, PREFILL_BLOCKS], remote: [0, 1] },
  'ERR_BLOCK_ID_OUT_OF_RANGE',
  ['localBlockIds[1] = 16', 'blockNumber 16'],
)
test.serial(
  'huge local id (Uint32Array 2^32-1)',
  badWrite,
  { local: Uint32Array.from([0xffffffff]), remote: [0] },
  'ERR_BLOCK_ID_OUT_OF_RANGE',
  ['4294967295', 'blockNumber 16'],
)
test.serial('length mismatch', badWrite, { local: [0, 1, 2], remote: [0, 1] }, 'ERR_BLOCK_COUNT_MISMATCH', [
  '3 entries',
  'has 2',
])
test.serial('negative id (number[])', badWrite, { local: [-1], remote: [0] }, 'ERR_INVALID_BLOCK_ID', [
  'localBlockIds[0] = -1',
  '0..16',
])
test.serial(
  'negative id (Int32Array, remote)',
  badWrite,
  { local: Int32Array.from([0, 1]), remote: Int32Array.from([0, -3]) },
  'ERR_INVALID_BLOCK_ID',
  ['remoteBlockIds[1] = -3', '0..8'],
)
test.serial('non-integer id 1.5', badWrite, { local: [1.5], remote: [0] }, 'ERR_INVALID_BLOCK_ID', [
  'localBlockIds[0] = 1.5',
])
test.serial('NaN id', badWrite, { local: [0], remote: [Number.NaN] }, 'ERR_INVALID_BLOCK_ID', [
  'remoteBlockIds[0] = NaN',
])
test.serial('non-number id in an array', badWrite, { local: ['2'], remote: [0] }, 'ERR_INVALID_BLOCK_ID', [
  'localBlockIds[0]',
])
test.serial('ids that are not an array', badWrite, { local: 'abc', remote: [0] }, 'ERR_INVALID_ARGUMENT', [
  'localBlockIds',
  'Int32Array',
])
test.serial('layer too big', badWrite, { local: [0], remote: [0], layer: LAYERS }, 'ERR_LAYER_OUT_OF_RANGE', [
  'layerIdx 2',
  '2 layers',
])
test.serial('negative layer', badWrite, { local: [0], remote: [0], layer: -1 }, 'ERR_LAYER_OUT_OF_RANGE', [
  'layerIdx -1',
  '2 layers',
])
test.serial('fractional layer', badWrite, { local: [0], remote: [0], layer: 0.5 }, 'ERR_LAYER_OUT_OF_RANGE', [
  'layerIdx 0.5',
  '2 layers',
])
test.serial('NaN layer', badWrite, { local: [0], remote: [0], layer: Number.NaN }, 'ERR_LAYER_OUT_OF_RANGE', [
  'layerIdx NaN',
])
test.serial('layer that is not a number', badWrite, { local: [0], remote: [0], layer: '1' }, 'ERR_INVALID_ARGUMENT', [
  'layerIdx',
  'string',
])
test.serial(
  'string tag longer than 254 bytes',
  badWrite,
  { local: [0], remote: [0], tag: 'x'.repeat(255) },
  'ERR_INVALID_ARGUMENT',
  ['255 bytes', 'at most 254'],
)
test.serial(
  'multi-byte string tag over 254 bytes',
  badWrite,
  { local: [0], remote: [0], tag: 'é'.repeat(128) },
  'ERR_INVALID_ARGUMENT',
  ['256 bytes', 'at most 254'],
)
test.serial('negative bigint tag', badWrite, { local: [0], remote: [0], tag: -1n }, 'ERR_INVALID_ARGUMENT', [
  '-1',
  'u64',
])
test.serial('bigint tag of 2^64', badWrite, { local: [0], remote: [0], tag: 2n ** 64n }, 'ERR_INVALID_ARGUMENT', [
  '18446744073709551616',
  'u64',
])
test.serial('tag of a wrong type', badWrite, { local: [0], remote: [0], tag: 12 }, 'ERR_INVALID_ARGUMENT', [
  'tag',
  'number',
])
test.serial('bad port in writeCache', badWrite, { local: [0], remote: [0], port: 70000 }, 'ERR_INVALID_ARGUMENT', [
  '70000',
  '0..65535',
])

test.serial(
  'writeCache to an unknown (unconnected) peer',
  badWrite,
  { local: [0], remote: [0], port: 1 },
  'ERR_NOT_CONNECTED',
  [`${HOST}:1`],
)

test.serial('a bad call in the middle of a batch does not disturb the good ones', async (t) => {
  const good = [0, 1].map((layer) => prefill.comm.writeCache(HOST, peer.port, [10, 11], [4, 5], layer))
  const bad = prefill.comm.writeCache(HOST, peer.port, [10, 11], [4, 99], 1)
  await Promise.all(good)
  for (const layer of [0, 1]) mirror.apply(layer, [10, 11], [4, 5])
  await expectKvError(t, () => bad, 'ERR_BLOCK_ID_OUT_OF_RANGE', ['remoteBlockIds[1] = 99'])
  await assertPeerMatches(t, peer, mirror)
})

async function decodePeer(t: ExecutionContext, options: { layers?: number; blockBytes?: number; keyOnly?: boolean }) {
  return spawnPeer(t, {
    layers: options.layers ?? 2,
    blockNumber: 8,
    blockBytes: options.blockBytes ?? 1024,
    keyOnly: options.keyOnly,
  })
}

test.serial('layer count mismatch at connect: ERR_LAYOUT_MISMATCH', async (t) => {
  const other = await decodePeer(t, { layers: 3 })
  const p = makePrefill(t, { layers: 2, blockNumber: 8, blockBytes: 1024 })
  await expectKvError(t, () => p.comm.connect(HOST, other.port, { timeoutMs: ms(30_000) }), 'ERR_LAYOUT_MISMATCH', [
    'layer count',
    /\b2\b/,
    /\b3\b/,
    `${HOST}:${other.port}`,
  ])
  t.false(p.comm.isConnected(HOST, other.port))
  await expectKvError(t, () => p.comm.writeCache(HOST, other.port, [0], [0], 0), 'ERR_NOT_CONNECTED')
  const digests = await other.digests()
  t.true(
    digests.K.flat().every((d) => d === digests.K[0][0]),
    'nothing written',
  )
})

test.serial('blockBytes mismatch at connect: ERR_LAYOUT_MISMATCH', async (t) => {
  const other = await decodePeer(t, { blockBytes: 2048 })
  const p = makePrefill(t, { layers: 2, blockNumber: 8, blockBytes: 1024 })
  await expectKvError(t, () => p.comm.connect(HOST, other.port, { timeoutMs: ms(30_000) }), 'ERR_LAYOUT_MISMATCH', [
    'blockBytes',
    '1024',
    '2048',
  ])
  t.false(p.comm.isConnected(HOST, other.port))
})

test.serial('key-only vs K+V mismatch at connect: ERR_LAYOUT_MISMATCH', async (t) => {
  const other = await decodePeer(t, { keyOnly: true })
  const p = makePrefill(t, { layers: 2, blockNumber: 8, blockBytes: 1024 })
  await expectKvError(t, () => p.comm.connect(HOST, other.port, { timeoutMs: ms(30_000) }), 'ERR_LAYOUT_MISMATCH', [
    'value cache',
  ])
  t.false(p.comm.isConnected(HOST, other.port))
})

test.serial('use after close: ERR_CLOSED', async (t) => {
  const other = await decodePeer(t, {})
  const p = makePrefill(t, { layers: 2, blockNumber: 8, blockBytes: 1024 })
  await connect(t, p, other)
  await p.comm.writeCache(HOST, other.port, [1], [1], 0)
  await p.comm.close()
  await p.comm.close() // idempotent
  t.false(p.comm.isConnected(HOST, other.port))
  await expectKvError(t, () => p.comm.writeCache(HOST, other.port, [2], [2], 0), 'ERR_CLOSED', ['closed'])
  await expectKvError(t, () => p.comm.connect(HOST, other.port), 'ERR_CLOSED', ['closed'])
  await expectKvError(t, () => p.comm.waitForArrival('x'), 'ERR_CLOSED', ['closed'])
  const digests = await other.digests()
  const zero = digests.K[0][0]
  t.not(digests.K[0][1], zero, 'the write before close landed')
  t.is(digests.K[0][2], zero, 'nothing written after close')
})

test.serial('close rejects pending waitForArrival with ERR_CLOSED', async (t) => {
  const p = makePrefill(t, { layers: 1, blockNumber: 4, blockBytes: 1024 })
  const waiting = p.comm.waitForArrival('never', { timeoutMs: ms(60_000) })
  await p.comm.close()
  await expectKvError(t, () => waiting, 'ERR_CLOSED')
})

// ---- constructor -------------------------------------------------------------------

const regions = (layers: number, bytes: number) => Array.from({ length: layers }, () => Buffer.alloc(bytes))
const options = (over: Record<string, unknown>) => ({
  role: 'prefill',
  gpuIdx: 0,
  port: 0,
  localKeyCache: regions(2, 4 * 1024),
  localValueCache: regions(2, 4 * 1024),
  blockNumber: 4,
  blockBytes: 1024,
  transport: TRANSPORT,
  ...over,
})

const badOptions = test.macro(
  async (t, over: Record<string, unknown>, code: KvTransferErrorCode, patterns: Array<string | RegExp>) => {
    await expectKvError(
      t,
      () => {
        const comm = new RDMACommunicator(options(over) as never)
        // Should not get here; do not leak it if it does.
        void comm.close()
      },
      code,
      patterns,
    )
  },
)

test('bad role', badOptions, { role: 'encoder' }, 'ERR_INVALID_ARGUMENT', ['role', '"encoder"'])
test('bad port (too big)', badOptions, { port: 65536 }, 'ERR_INVALID_ARGUMENT', ['port', '65536', '0..65535'])
test('bad port (negative)', badOptions, { port: -1 }, 'ERR_INVALID_ARGUMENT', ['port', '-1', '0..65535'])
test('bad port (not a number)', badOptions, { port: 'http' }, 'ERR_INVALID_ARGUMENT', ['port', 'http', '0..65535'])
test('bad port (fractional)', badOptions, { port: 80.5 }, 'ERR_INVALID_ARGUMENT', ['port', '80.5'])
test('bad gpuIdx', badOptions, { gpuIdx: -2 }, 'ERR_INVALID_ARGUMENT', ['gpuIdx', '-2'])
test('blockBytes 0', badOptions, { blockBytes: 0 }, 'ERR_INVALID_ARGUMENT', ['blockBytes', '0'])
test('fractional blockBytes', badOptions, { blockBytes: 1.5 }, 'ERR_INVALID_ARGUMENT', ['blockBytes', '1.5'])
test('blockNumber 0', badOptions, { blockNumber: 0 }, 'ERR_INVALID_ARGUMENT', ['blockNumber', '0'])
test('no layers', badOptions, { localKeyCache: [], localValueCache: [] }, 'ERR_INVALID_ARGUMENT', [
  'localKeyCache',
  '0 layers',
])
test(
  'value regions for fewer layers than key regions',
  badOptions,
  { localValueCache: regions(1, 4096) },
  'ERR_INVALID_ARGUMENT',
  ['localValueCache', '1 regions', 'has 2'],
)
test(
  'region smaller than blockNumber × blockBytes',
  badOptions,
  { localKeyCache: [Buffer.alloc(4096), Buffer.alloc(4095)] },
  'ERR_INVALID_ARGUMENT',
  ['localKeyCache', 'region 1', '4095', '4096'],
)
test(
  'blockNumber × blockBytes larger than any buffer',
  badOptions,
  { blockNumber: 0xffffffff, blockBytes: 2 ** 52 },
  'ERR_REGION_OVERFLOW',
  ['blockNumber 4294967295', 'blockBytes 4503599627370496'],
)
test('region that is not memory', badOptions, { localKeyCache: [Buffer.alloc(4096), 'abc'] }, 'ERR_INVALID_ARGUMENT', [
  'localKeyCache',
  'region 1',
])
test('bigint address 0', badOptions, { localKeyCache: [0n, 0n], localValueCache: [] }, 'ERR_INVALID_ARGUMENT', [
  'localKeyCache',
  'region 0',
  'positive',
])
test(
  'negative bigint address',
  badOptions,
  { localKeyCache: [-4096n, -4096n], localValueCache: [] },
  'ERR_INVALID_ARGUMENT',
  ['localKeyCache', 'positive'],
)
test(
  'bigint address beyond 64 bits',
  badOptions,
  { localKeyCache: [2n ** 64n + 4096n, 2n ** 64n], localValueCache: [] },
  'ERR_INVALID_ARGUMENT',
  ['localKeyCache', '64-bit'],
)
test('bigint value address 0', badOptions, { localValueCache: [Buffer.alloc(4096), 0n] }, 'ERR_INVALID_ARGUMENT', [
  'localValueCache',
  'region 1',
  'positive',
])
// Construction fails before any memory is touched, so a fake (never dereferenced) address is safe here.
test(
  'blockNumber × blockBytes overflow with address regions: ERR_REGION_OVERFLOW',
  badOptions,
  {
    localKeyCache: [1n << 40n],
    localValueCache: [],
    blockNumber: 0xffffffff,
    blockBytes: 2 ** 52,
  },
  'ERR_REGION_OVERFLOW',
  ['4294967295', '4503599627370496'],
)
test('bad transport', badOptions, { transport: 'carrier-pigeon' }, 'ERR_INVALID_ARGUMENT', [
  'transport',
  'carrier-pigeon',
])
test('name too long', badOptions, { name: 'n'.repeat(4096) }, 'ERR_INVALID_ARGUMENT', ['name', '4096 bytes'])

test('port already in use: ready rejects with ERR_IO naming the endpoint', async (t) => {
  const first = new RDMACommunicator(options({}) as never)
  t.teardown(() => first.close())
  await first.ready
  const second = new RDMACommunicator(options({ port: first.port }) as never)
  t.teardown(() => second.close())
  await expectKvError(t, () => second.ready, 'ERR_IO', [String(first.port)])
  await expectKvError(t, () => second.connect(HOST, first.port, { timeoutMs: 500 }), 'ERR_IO', [String(first.port)])
})

// ---- connect: bad arguments, timeout, abort ---------------------------------------

test('connect with a bad port or host', async (t) => {
  const p = makePrefill(t, { layers: 1, blockNumber: 4, blockBytes: 1024 })
  await expectKvError(t, () => p.comm.connect(HOST, 65536), 'ERR_INVALID_ARGUMENT', ['65536', '0..65535'])
  await expectKvError(t, () => p.comm.connect(HOST, 'x1'), 'ERR_INVALID_ARGUMENT', ['x1', '0..65535'])
  await expectKvError(t, () => p.comm.connect('', 5000), 'ERR_INVALID_ARGUMENT', ['ip'])
  t.throws(() => p.comm.isConnected(HOST, -5), { instanceOf: KvTransferError })
})

test.serial('connect to a port where nothing listens times out with ERR_TIMEOUT naming host:port', async (t) => {
  const port = await freePort()
  const p = makePrefill(t, { layers: 1, blockNumber: 4, blockBytes: 1024 })
  const timeoutMs = 500
  const started = Date.now()
  await expectKvError(t, () => p.comm.connect(HOST, port, { timeoutMs }), 'ERR_TIMEOUT', [
    `${HOST}:${port}`,
    `${timeoutMs} ms`,
  ])
  const elapsed = Date.now() - started
  t.log(`timed out after ${elapsed} ms`)
  t.true(elapsed >= timeoutMs * 0.9, `waited ${elapsed} ms`)
  t.true(elapsed < timeoutMs * 2 + ms(3000), `waited ${elapsed} ms for a ${timeoutMs} ms timeout`)
  t.false(p.comm.isConnected(HOST, port))
})

test.serial('connectTimeoutMs option is the default timeout of connect', async (t) => {
  const port = await freePort()
  const comm = new RDMACommunicator(options({ connectTimeoutMs: 400 }) as never)
  t.teardown(() => comm.close())
  const started = Date.now()
  await expectKvError(t, () => comm.connect(HOST, port), 'ERR_TIMEOUT', [`${HOST}:${port}`, '400 ms'])
  t.true(Date.now() - started < 800 + ms(3000))
})

test.serial('connect aborted by an AbortSignal: ERR_ABORTED', async (t) => {
  const port = await freePort()
  const p = makePrefill(t, { layers: 1, blockNumber: 4, blockBytes: 1024 })
  const controller = new AbortController()
  const started = Date.now()
  setTimeout(() => controller.abort(), 300)
  await expectKvError(
    t,
    () => p.comm.connect(HOST, port, { timeoutMs: ms(30_000), signal: controller.signal }),
    'ERR_ABORTED',
    [`${HOST}:${port}`],
  )
  t.true(Date.now() - started < ms(5000), 'abort ends the wait promptly')
  // Already aborted before the call.
  await expectKvError(t, () => p.comm.connect(HOST, port, { signal: AbortSignal.abort() }), 'ERR_ABORTED')
  t.false(p.comm.isConnected(HOST, port))
})

test.serial('a refused connect does not leave the communicator unusable', async (t) => {
  // A timeout first, then the real peer on the same port.
  const port = await freePort()
  const p = makePrefill(t, { layers: 1, blockNumber: 4, blockBytes: 1024 })
  await expectKvError(t, () => p.comm.connect(HOST, port, { timeoutMs: 300 }), 'ERR_TIMEOUT')
  const other = await spawnPeer(t, { layers: 1, blockNumber: 4, blockBytes: 1024, port })
  await connect(t, p, other)
  const m = new Mirror(p, 4)
  await p.comm.writeCache(HOST, port, [2], [1], 0)
  m.apply(0, [2], [1])
  await assertPeerMatches(t, other, m)
})

test('free port helper sanity', async (t) => {
  t.true((await freePort()) > 0)
})
