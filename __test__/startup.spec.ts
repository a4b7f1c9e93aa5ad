/**
 * Starting a communicator: a start that fails (a port in use, an address that cannot be
 * bound) is never hidden. `ready` rejects with it, and every later call throws or rejects
 * with that same error (code and message), instead of timing out or reporting something
 * else; `close()` still resolves. `RDMACommunicator.create` resolves once the communicator
 * listens, or rejects with that error after releasing what it held.
 */
import * as net from 'node:net'
import test, { type ExecutionContext } from 'ava'
import {
  HOST,
  KvTransferError,
  RDMACommunicator,
  TRANSPORT,
  eventually,
  expectKvError,
  ms,
  within,
  type Arrival,
} from './helpers.js'
import type { CommunicatorOptions } from '../lib/index.js'

const options = (over: Partial<CommunicatorOptions> = {}): CommunicatorOptions => ({
  role: 'decode',
  gpuIdx: 0,
  port: 0,
  localKeyCache: [Buffer.alloc(4 * 1024), Buffer.alloc(4 * 1024)],
  localValueCache: [],
  blockNumber: 4,
  blockBytes: 1024,
  transport: TRANSPORT,
  authToken: '',
  ...over,
})

/** A port some other program (a plain TCP server) holds for the test's duration. */
async function takenPort(t: ExecutionContext): Promise<number> {
  const server = net.createServer()
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(0, resolve)
  })
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())))
  return (server.address() as net.AddressInfo).port
}

/** The start error, as `ready` reports it. */
async function startError(comm: RDMACommunicator): Promise<KvTransferError> {
  const error = await comm.ready.then(
    () => undefined,
    (e: unknown) => e,
  )
  if (!(error instanceof KvTransferError)) throw new Error(`ready should reject with a KvTransferError: ${error}`)
  return error
}

/** Asserts that `run` throws or rejects with `expected`'s code and message. */
async function failsLike(t: ExecutionContext, what: string, run: () => unknown, expected: KvTransferError) {
  let error: unknown
  try {
    await within(Promise.resolve().then(run), ms(5_000), what)
  } catch (e) {
    error = e
  }
  t.true(error instanceof KvTransferError, `${what}: expected the start error, got ${String(error)}`)
  const e = error as KvTransferError
  t.is(e.code, expected.code, `${what}: ${e.message}`)
  t.is(e.message, expected.message, what)
}

test.serial('a port in use: ready rejects ERR_IO naming the port, and every later call fails with it', async (t) => {
  const port = await takenPort(t)
  const comm = new RDMACommunicator(options({ port }))
  t.teardown(() => comm.close())
  const start = await startError(comm)
  t.is(start.code, 'ERR_IO')
  t.regex(start.message, new RegExp(`:${port}\\b`), 'names the port')
  t.regex(start.message, /in use/)
  const ids = [0, 1]
  const calls: Array<[string, () => unknown]> = [
    ['connect', () => comm.connect(HOST, port, { timeoutMs: ms(30_000) })],
    ['connect (defaults)', () => comm.connect(HOST, port)],
    ['writeCache(ip, port, …)', () => comm.writeCache(HOST, port, ids, ids, 0)],
    ['waitForArrival', () => comm.waitForArrival('req', { timeoutMs: ms(30_000) })],
    ['waitForArrival (no timeout)', () => comm.waitForArrival(1n)],
    ['prepareBlocks', () => comm.prepareBlocks(HOST, port, ids, ids)],
    ['peer', () => comm.peer(HOST, port)],
    ['isConnected', () => comm.isConnected(HOST, port)],
    ['abortPeer', () => comm.abortPeer(HOST, port)],
    ['peerInfo', () => comm.peerInfo(HOST, port)],
    ['forgetArrivals', () => comm.forgetArrivals('req')],
  ]
  for (const [what, run] of calls) await failsLike(t, what, run, start)
  // The same after close, which resolves: the start error is what the caller must see.
  await comm.close()
  for (const [what, run] of calls) await failsLike(t, `${what} after close`, run, start)
})

test.serial('a waitForArrival made before the start failed rejects with the start error', async (t) => {
  const port = await takenPort(t)
  const comm = new RDMACommunicator(options({ port }))
  t.teardown(() => comm.close())
  // Registered at once, before the bind has failed, with no timeout: it must not hang.
  const waiting = comm.waitForArrival('early')
  const start = await startError(comm)
  await failsLike(t, 'the early waitForArrival', () => waiting, start)
})

test.serial('the Quick start with a decode port in use: the user sees why, not a timeout', async (t) => {
  const port = await takenPort(t)
  const decode = new RDMACommunicator(options({ port }))
  t.teardown(() => decode.close())
  decode.on('arrival', () => t.fail('no arrival can come'))
  // Never awaiting `ready`, as a first program does: waiting for the request reports the cause.
  const started = Date.now()
  const error = await expectKvError(
    t,
    () => decode.waitForArrival(42n, { layers: 2, timeoutMs: ms(30_000) }),
    'ERR_IO',
    [String(port), 'in use'],
  )
  t.truthy(error)
  t.true(Date.now() - started < ms(5_000), 'at once, not after the timeout')
})

test.serial('create() resolves once listening; the communicator then works', async (t) => {
  const decode = await RDMACommunicator.create(options())
  t.teardown(() => decode.close())
  t.true(decode instanceof RDMACommunicator)
  t.not(decode.port, 0, 'the bound port is known at once')
  // The seed's positional form, and FastDeploy's, are accepted too.
  const prefill = await RDMACommunicator.create(
    'prefill',
    0,
    0,
    [Buffer.alloc(4 * 1024, 7), Buffer.alloc(4 * 1024, 7)],
    [],
    4,
    1024,
    {
      transport: TRANSPORT,
      authToken: '',
    },
  )
  t.teardown(() => prefill.close())
  const fastDeploy = await RDMACommunicator.create(
    'prefill',
    0,
    0,
    [Buffer.alloc(4 * 1024)],
    [],
    4,
    1024,
    [],
    [],
    0,
    1,
    0,
    {
      transport: TRANSPORT,
      authToken: '',
    },
  )
  t.teardown(() => fastDeploy.close())
  t.not(fastDeploy.port, 0)
  const arrivals: Arrival[] = []
  decode.on('arrival', (a: Arrival) => arrivals.push(a))
  t.true(await prefill.connect(HOST, decode.port, { timeoutMs: ms(30_000) }))
  await prefill.writeCache(HOST, decode.port, [1], [2], 1, { tag: 'created' })
  t.true(await eventually(() => arrivals.length === 1, ms(10_000)))
})

test.serial('create() rejects with the start error and releases the half-built communicator', async (t) => {
  const port = await takenPort(t)
  const closed: RDMACommunicator[] = []
  const close = RDMACommunicator.prototype.close
  RDMACommunicator.prototype.close = function (this: RDMACommunicator, ...args) {
    closed.push(this)
    return close.apply(this, args)
  }
  t.teardown(() => {
    RDMACommunicator.prototype.close = close
  })
  await expectKvError(t, () => RDMACommunicator.create(options({ port })), 'ERR_IO', [String(port), 'in use'])
  t.is(closed.length, 1, 'closed before create rejected')
  t.deepEqual({ peers: closed[0].stats().peers, liveLinks: closed[0].stats().liveLinks }, { peers: 0, liveLinks: 0 })
  // An address this host does not have: the error names the endpoint.
  await expectKvError(t, () => RDMACommunicator.create(options({ host: '192.0.2.1' })), 'ERR_IO', ['192.0.2.1'])
})

test('create() rejects (never throws) on invalid options, typed', async (t) => {
  let promise: Promise<RDMACommunicator> | undefined
  t.notThrows(() => {
    promise = RDMACommunicator.create(options({ blockNumber: -1 }))
    promise.catch(() => undefined)
  })
  await expectKvError(t, () => promise, 'ERR_INVALID_ARGUMENT', ['blockNumber', '-1'])
})
