/**
 * The constructor's options (ts/options.ts): the three argument forms, the defaults and
 * what is handed to the engine, and the refusals (`ERR_INVALID_ARGUMENT`, naming the option
 * and the value). The values the engine checks (`role`, `blockBytes`, the tensor-parallel
 * sizes, `dstTpSize`) are checked only for their type here; their ranges are tested across
 * processes (errors.spec.ts, tp.spec.ts, error-codes.spec.ts).
 */
import * as os from 'node:os'
import test, { type ExecutionContext } from 'ava'
import {
  type CommunicatorOptions,
  checkDstTpSize,
  checkNonNegativeInteger,
  parseSettings,
  toBlockIds,
  toPort,
  toTimeout,
  toRegion,
} from '../../ts/options'
import { assertRefused } from './refusal'

const LAYER_BYTES = 4 * 64

/** A valid options object: 2 layers of 4 blocks of 64 bytes. */
function options(overrides: Partial<CommunicatorOptions> = {}): CommunicatorOptions {
  return {
    role: 'prefill',
    gpuIdx: 0,
    port: 0,
    localKeyCache: [Buffer.alloc(LAYER_BYTES), Buffer.alloc(LAYER_BYTES)],
    localValueCache: [Buffer.alloc(LAYER_BYTES), Buffer.alloc(LAYER_BYTES)],
    blockNumber: 4,
    blockBytes: 64,
    ...overrides,
  }
}

/** Runs `body` with KVCACHE_SOCKET_IFNAME set to `value` (undefined: unset), then restores it. */
function withSocketIfname(t: ExecutionContext, value: string | undefined): void {
  const saved = process.env.KVCACHE_SOCKET_IFNAME
  if (value === undefined) delete process.env.KVCACHE_SOCKET_IFNAME
  else process.env.KVCACHE_SOCKET_IFNAME = value
  t.teardown(() => {
    if (saved === undefined) delete process.env.KVCACHE_SOCKET_IFNAME
    else process.env.KVCACHE_SOCKET_IFNAME = saved
  })
}

test.serial('an options object gets the documented defaults', (t) => {
  withSocketIfname(t, undefined)
  const settings = parseSettings([options({ port: 5555 })])
  t.like(settings, {
    role: 'prefill',
    port: 5555,
    gpuIdx: 0,
    blockNumber: 4,
    blockBytes: 64,
    host: '0.0.0.0',
    connectTimeoutMs: 30_000,
    writeTimeoutMs: 30_000,
    maxPendingArrivals: 65_536,
    defaultName: true,
  })
  t.like(settings.native, {
    role: 'prefill',
    gpuIdx: 0,
    name: `${os.hostname()}:5555`,
    blockNumber: 4,
    blockBytes: 64,
    scaleBlockBytes: 0,
    transport: undefined,
    connectTimeoutMs: 30_000,
    authToken: undefined,
    tpSize: 1,
    tpRank: 0,
    kvReplicated: false,
    tokensPerBlock: 0,
  })
  t.is(settings.native.localKeyCache.length, 2)
  t.is(settings.native.localValueCache.length, 2)
  t.deepEqual(settings.native.keyScaleCache, [])
  t.deepEqual(settings.native.valueScaleCache, [])
})

test('given options pass through to the engine', (t) => {
  const settings = parseSettings([
    options({
      role: 'decode',
      gpuIdx: 3,
      host: '127.0.0.1',
      name: 'decode-7',
      transport: 'tcp',
      authToken: 'secret',
      connectTimeoutMs: 500,
      writeTimeoutMs: 0,
      maxPendingArrivals: 8,
      tpSize: 4,
      tpRank: 3,
      kvReplicated: true,
    }),
  ])
  t.like(settings, {
    role: 'decode',
    gpuIdx: 3,
    host: '127.0.0.1',
    connectTimeoutMs: 500,
    writeTimeoutMs: undefined,
    maxPendingArrivals: 8,
    defaultName: false,
  })
  t.like(settings.native, {
    role: 'decode',
    gpuIdx: 3,
    name: 'decode-7',
    transport: 'tcp',
    authToken: 'secret',
    connectTimeoutMs: 500,
    tpSize: 4,
    tpRank: 3,
    kvReplicated: true,
  })
})

test.serial('the control plane listens on KVCACHE_SOCKET_IFNAME (trimmed) unless host is given', (t) => {
  withSocketIfname(t, ' eth1 ')
  t.is(parseSettings([options()]).host, 'eth1')
  t.is(parseSettings([options({ host: '10.0.0.2' })]).host, '10.0.0.2')
})

test.serial('a blank KVCACHE_SOCKET_IFNAME means all interfaces', (t) => {
  withSocketIfname(t, '  ')
  t.is(parseSettings([options()]).host, '0.0.0.0')
})

test("the seed's positional form reads like the options object, extra options last", (t) => {
  const keys = [Buffer.alloc(LAYER_BYTES)]
  const settings = parseSettings(['decode', 2, '6000', keys, [], 4, 64, { name: 'positional', tpSize: 2 }])
  t.like(settings, { role: 'decode', gpuIdx: 2, port: 6000, blockNumber: 4, blockBytes: 64, defaultName: false })
  t.like(settings.native, { name: 'positional', tpSize: 2, tpRank: 0, scaleBlockBytes: 0 })
  t.is(settings.native.localKeyCache.length, 1)
  t.deepEqual(settings.native.localValueCache, [])
})

test("FastDeploy's positional form: scales, scale block bytes, TP size and rank, then extra options", (t) => {
  const keyScales = [Buffer.alloc(4 * 2)]
  const valueScales = [Buffer.alloc(4 * 2)]
  const settings = parseSettings([
    'prefill',
    0,
    0,
    [Buffer.alloc(LAYER_BYTES)],
    [Buffer.alloc(LAYER_BYTES)],
    4,
    64,
    keyScales,
    valueScales,
    2,
    8,
    5,
    { name: 'fd', tpSize: 1 },
  ])
  // The positional TP arguments win over the same keys in the extra options.
  t.like(settings.native, { name: 'fd', scaleBlockBytes: 2, tpSize: 8, tpRank: 5 })
  t.is(settings.native.keyScaleCache?.length, 1)
  t.is(settings.native.valueScaleCache?.length, 1)
})

test("FastDeploy's positional form fills what it leaves out with the defaults", (t) => {
  const settings = parseSettings(['prefill', 0, 0, [Buffer.alloc(LAYER_BYTES)], [], 4, 64, [], undefined])
  t.like(settings.native, { scaleBlockBytes: 0, tpSize: 1, tpRank: 0 })
  t.deepEqual(settings.native.keyScaleCache, [])
  t.deepEqual(settings.native.valueScaleCache, [])
})

test('regions: a bigint passes as it is, buffers and views become bytes over the same memory', (t) => {
  const arrayBuffer = new ArrayBuffer(32)
  const floats = new Float32Array(arrayBuffer, 8, 4)
  const fromArrayBuffer = toRegion('localKeyCache', 0, arrayBuffer)
  const fromView = toRegion('localKeyCache', 1, floats)
  t.is(toRegion('localKeyCache', 2, 0x7f00_0000_1000n), 0x7f00_0000_1000n)
  t.true(fromArrayBuffer instanceof Uint8Array)
  t.true(fromView instanceof Uint8Array)
  const view = fromView as Uint8Array
  t.is(view.buffer, arrayBuffer, 'no copy')
  t.is(view.byteOffset, 8)
  t.is(view.byteLength, 16)
  t.is((fromArrayBuffer as Uint8Array).byteLength, 32)
  const shared = new SharedArrayBuffer(8)
  t.is((toRegion('localValueCache', 0, shared) as Uint8Array).buffer, shared)
})

test("parseSettings hands the engine views of the caller's buffers, not copies", (t) => {
  const mine = Buffer.alloc(LAYER_BYTES)
  const view = parseSettings([options({ localKeyCache: [mine] })]).native.localKeyCache[0] as Uint8Array
  mine[5] = 42
  t.is(view.byteLength, LAYER_BYTES)
  t.is(view[5], 42)
})

test('a region of another type is refused naming the list, the index and the type', (t) => {
  assertRefused(t, () => toRegion('keyScaleCache', 3, 42), 'keyScaleCache', 'region 3', 'got number')
  assertRefused(
    t,
    () => parseSettings([options({ localValueCache: [Buffer.alloc(1), 'x' as unknown as Buffer] })]),
    'localValueCache',
    'region 1',
    'got string',
  )
})

test('region lists must be arrays', (t) => {
  const notAnArray = Buffer.alloc(4) as unknown as Buffer[]
  assertRefused(t, () => parseSettings([options({ localKeyCache: notAnArray })]), 'localKeyCache', 'array')
  assertRefused(
    t,
    () => parseSettings([options({ localValueCache: notAnArray })]),
    'localValueCache',
    '[] for key-only',
  )
  assertRefused(t, () => parseSettings([options({ keyScaleCache: notAnArray })]), 'keyScaleCache', 'array')
  assertRefused(t, () => parseSettings([options({ valueScaleCache: notAnArray })]), 'valueScaleCache', 'array')
})

test('port: an integer or a numeric string in 0..65535, else refused naming the value', (t) => {
  t.is(toPort('port', 0), 0)
  t.is(toPort('port', 65535), 65535)
  t.is(toPort('port', '8080'), 8080)
  t.is(toPort('port', ' 8080 '), 8080)
  for (const bad of [65536, -1, 1.5, '', '  ', 'http', '80x', null, undefined]) {
    assertRefused(t, () => toPort('port', bad), 'port', String(JSON.stringify(bad)), 'not a port number in 0..65535')
  }
  assertRefused(t, () => parseSettings([options({ port: 'x' })]), 'port', '"x"')
})

// Known bug: the message is built with JSON.stringify, which throws a TypeError on a bigint.
test('a bigint port is refused with ERR_INVALID_ARGUMENT', (t) => {
  assertRefused(t, () => toPort('port', 80n), 'port', '80')
})

test('checkNonNegativeInteger: integers in 0..max, else refused with the value and the range', (t) => {
  t.is(checkNonNegativeInteger('n', 0, 4), 0)
  t.is(checkNonNegativeInteger('n', 4, 4), 4)
  for (const bad of [5, -1, 0.5, Number.NaN, Infinity, '1', null]) {
    assertRefused(
      t,
      () => checkNonNegativeInteger('n', bad, 4),
      'n',
      `${typeof bad === 'string' ? JSON.stringify(bad) : String(bad)} is not an integer in 0..4`,
    )
  }
})

test('gpuIdx, blockNumber and scaleBlockBytes are non-negative integers', (t) => {
  assertRefused(t, () => parseSettings([options({ gpuIdx: -1 })]), 'gpuIdx', '-1')
  assertRefused(t, () => parseSettings([options({ gpuIdx: 2 ** 32 })]), 'gpuIdx', '4294967296')
  assertRefused(t, () => parseSettings([options({ blockNumber: 1.5 })]), 'blockNumber', '1.5')
  assertRefused(t, () => parseSettings([options({ scaleBlockBytes: -2 })]), 'scaleBlockBytes', '-2')
})

test('role, blockBytes, tpSize and tpRank: their type here, their values in the engine', (t) => {
  // Values pass through unchanged: the engine is the one place that checks them.
  t.like(parseSettings([options({ tpSize: 0, tpRank: 5 })]).native, { tpSize: 0, tpRank: 5 })
  t.like(parseSettings([options({ blockBytes: 0 })]), { blockBytes: 0 })
  t.like(parseSettings([options({ role: 'encoder' as 'prefill' })]).native, { role: 'encoder' })
  assertRefused(t, () => parseSettings([options({ tpSize: '2' as unknown as number })]), 'tpSize', '"2"', 'number')
  assertRefused(t, () => parseSettings([options({ tpRank: true as unknown as number })]), 'tpRank', 'boolean')
  assertRefused(t, () => parseSettings([options({ blockBytes: 'x' as unknown as number })]), 'blockBytes', '"x"')
  assertRefused(t, () => parseSettings([options({ role: 1 as unknown as 'prefill' })]), 'role', 'number', 'string')
})

test('kvReplicated must be a boolean', (t) => {
  const kvReplicated = 'yes' as unknown as boolean
  assertRefused(t, () => parseSettings([options({ kvReplicated })]), 'kvReplicated', 'yes', 'not a boolean')
})

test('blockLayout: HND is head-major (0), NHD gives its tokens per block', (t) => {
  const tokensPerBlock = (blockLayout: CommunicatorOptions['blockLayout']) =>
    parseSettings([options({ blockLayout })]).native.tokensPerBlock
  t.is(tokensPerBlock(undefined), 0)
  t.is(tokensPerBlock({ order: 'HND' }), 0)
  t.is(tokensPerBlock({ order: 'NHD', tokensPerBlock: 16 }), 16)
})

test('blockLayout refusals name the field and the value', (t) => {
  const parse = (blockLayout: unknown) =>
    parseSettings([options({ blockLayout: blockLayout as CommunicatorOptions['blockLayout'] })])
  assertRefused(t, () => parse('NHD'), 'blockLayout', "{ order: 'HND' }")
  assertRefused(t, () => parse(null), 'blockLayout', "{ order: 'NHD', tokensPerBlock }")
  assertRefused(t, () => parse({ order: 'hnd' }), 'blockLayout.order', '"hnd"')
  assertRefused(t, () => parse({ order: 'NHD', tokensPerBlock: 0 }), 'blockLayout.tokensPerBlock', '0 given')
  assertRefused(t, () => parse({ order: 'NHD' }), 'blockLayout.tokensPerBlock', 'undefined')
})

test('connectTimeoutMs: any number of ms in 0..2^31-1 (0: none); the engine gets whole ms (0: no bound)', (t) => {
  const parse = (connectTimeoutMs: unknown) =>
    parseSettings([options({ connectTimeoutMs: connectTimeoutMs as number })])
  t.like(parse(1.2), { connectTimeoutMs: 1.2, native: { connectTimeoutMs: 2 } })
  t.like(parse(0), { connectTimeoutMs: undefined, native: { connectTimeoutMs: 0 } })
  t.like(parse(0x7fff_ffff), { connectTimeoutMs: 0x7fff_ffff })
  for (const bad of [-1, 0x8000_0000, Number.NaN, '500']) {
    assertRefused(t, () => parse(bad), 'connectTimeoutMs', String(bad), 'milliseconds in 0..2147483647')
  }
})

test('writeTimeoutMs: the same rule (0: none)', (t) => {
  t.is(parseSettings([options({ writeTimeoutMs: 0 })]).writeTimeoutMs, undefined)
  t.is(parseSettings([options({ writeTimeoutMs: 1.5 })]).writeTimeoutMs, 1.5)
  assertRefused(t, () => parseSettings([options({ writeTimeoutMs: 2 ** 31 })]), 'writeTimeoutMs', '2147483648')
  assertRefused(t, () => parseSettings([options({ writeTimeoutMs: -5 })]), 'writeTimeoutMs', '-5')
})

test('toTimeout: every timeout of the API; 0 means none (undefined), else the milliseconds', (t) => {
  t.is(toTimeout('timeoutMs', 0), undefined)
  t.is(toTimeout('timeoutMs', 1), 1)
  t.is(toTimeout('timeoutMs', 0x7fff_ffff), 0x7fff_ffff)
  for (const bad of [-5, 'abc', Number.NaN, Infinity, null, 2 ** 31]) {
    assertRefused(t, () => toTimeout('timeoutMs', bad), 'timeoutMs', typeof bad === 'string' ? '"abc"' : String(bad))
  }
})

test('maxPendingArrivals, host, name, transport, authToken: their types are checked before the engine sees them', (t) => {
  const parse = (over: Record<string, unknown>) => parseSettings([options(over as Partial<CommunicatorOptions>)])
  t.is(parse({ maxPendingArrivals: 0 }).maxPendingArrivals, 0)
  assertRefused(t, () => parse({ maxPendingArrivals: -1 }), 'maxPendingArrivals', '-1', '0..4294967295')
  assertRefused(t, () => parse({ maxPendingArrivals: 'x' }), 'maxPendingArrivals', '"x"')
  assertRefused(t, () => parse({ maxPendingArrivals: 1.5 }), 'maxPendingArrivals', '1.5')
  assertRefused(t, () => parse({ authToken: 123 }), 'authToken', 'string', '123')
  assertRefused(t, () => parse({ name: 42 }), 'name', 'string', '42')
  assertRefused(t, () => parse({ host: 7 }), 'host', 'string', '7')
  assertRefused(t, () => parse({ transport: 1 }), 'transport', 'string', '1')
})

test('dstTpSize of connect: absent or 0 is "not checked", else the size', (t) => {
  t.is(checkDstTpSize(undefined), undefined)
  t.is(checkDstTpSize(0), undefined)
  t.is(checkDstTpSize(4), 4)
  // Its range is the engine's (checked before connect sends anything).
  t.is(checkDstTpSize(-1), -1)
  assertRefused(t, () => checkDstTpSize('4'), 'dstTpSize', '"4"')
})

test('block ids: typed arrays pass without a copy, a plain array becomes Float64Array', (t) => {
  const unsigned = Uint32Array.of(1, 2)
  const signed = Int32Array.of(-1, 2)
  t.is(toBlockIds('localBlockIds', unsigned), unsigned)
  t.is(toBlockIds('localBlockIds', signed), signed)
  const converted = toBlockIds('localBlockIds', [3, 1.5, -2])
  t.true(converted instanceof Float64Array)
  t.deepEqual([...converted], [3, 1.5, -2])
})

test('block ids: a non-number in a plain array becomes NaN (refused by the engine), never coerced', (t) => {
  const converted = toBlockIds('remoteBlockIds', [1, '2', null, undefined, 3n])
  t.is(converted[0], 1)
  for (let i = 1; i < converted.length; i++) t.true(Number.isNaN(converted[i]), `index ${i}`)
})

test('block ids of another type are refused naming the argument and the type', (t) => {
  assertRefused(t, () => toBlockIds('localBlockIds', null), 'localBlockIds', 'got null')
  assertRefused(t, () => toBlockIds('remoteBlockIds', '1,2'), 'remoteBlockIds', 'got string')
  assertRefused(t, () => toBlockIds('localBlockIds', Float64Array.of(1)), 'localBlockIds', 'got object')
})
