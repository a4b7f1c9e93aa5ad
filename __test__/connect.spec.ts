/**
 * How long `connect` waits for the data connection: at most `connectTimeoutMs` in the
 * engine, and at most the call's own timeout. The peer's control plane answers but its data
 * port silently drops SYNs: a control-plane proxy forwards the handshake to a real decode
 * communicator and points the reply's data port at a listener that never accepts
 * (fixtures/blackhole.ts).
 */
import { fork } from 'node:child_process'
import * as net from 'node:net'
import { fileURLToPath } from 'node:url'
import test, { type ExecutionContext } from 'ava'
import * as zmq from 'zeromq'
import { RDMACommunicator, TRANSPORT, expectKvError, makePrefill, ms } from './helpers.js'

/** The data port is TCP's; RDMA opens no data connection. */
const tcpOnly = TRANSPORT === 'tcp' ? test.serial : test.serial.skip
const LOOPBACK = '127.0.0.1'
const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url))
const BLACKHOLE = fileURLToPath(new URL('./fixtures/blackhole.ts', import.meta.url))
/** Bytes before the descriptor in a handshake envelope: magic, version, flags, 2 nonces, MAC (crates/engine/src/auth.rs). */
const ENVELOPE_HEADER_BYTES = 4 + 2 + 1 + 2 * 32 + 32
/** Offset of the name length in a descriptor (crates/engine/src/wire/descriptor.rs): magic, version, length, role, instance id, layers, has-value, blockNumber, blockBytes, scaleBlockBytes, tpSize, tpRank, kvReplicated, tokensPerBlock. */
const NAME_LENGTH_AT = 4 + 2 + 4 + 1 + 8 + 4 + 1 + 4 + 8 + 8 + 4 + 4 + 1 + 4
const LAYOUT = { layers: 1, blockNumber: 4, blockBytes: 1024 }

/** A decode communicator in this process; `keys[0]` is its layer-0 K region. */
async function decodeHere(t: ExecutionContext) {
  const keys = [Buffer.alloc(LAYOUT.blockNumber * LAYOUT.blockBytes)]
  const comm = new RDMACommunicator({
    role: 'decode',
    gpuIdx: 0,
    port: 0,
    localKeyCache: keys,
    localValueCache: [Buffer.alloc(LAYOUT.blockNumber * LAYOUT.blockBytes)],
    blockNumber: LAYOUT.blockNumber,
    blockBytes: LAYOUT.blockBytes,
    transport: 'tcp',
    authToken: '',
  })
  t.teardown(() => comm.close())
  await comm.ready
  return { comm, keys }
}

/** A port whose SYNs go unanswered: the blackhole's accept queue, filled. */
async function blackhole(t: ExecutionContext): Promise<number> {
  const child = fork(BLACKHOLE, [], {
    cwd: REPO_ROOT,
    execArgv: ['--import', '@oxc-node/core/register'],
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  })
  t.teardown(() => void child.kill('SIGKILL'))
  const port = await new Promise<number>((resolve, reject) => {
    child.once('message', (message: { port: number }) => resolve(message.port))
    child.once('exit', (code) => reject(new Error(`the blackhole listener exited (${code})`)))
  })
  const sockets: net.Socket[] = []
  t.teardown(() => sockets.forEach((socket) => socket.destroy()))
  for (let i = 0; i < 16; i++) {
    const socket = net.connect({ host: LOOPBACK, port })
    socket.on('error', () => undefined)
    sockets.push(socket)
    const connected = await new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), 300)
      socket.once('connect', () => {
        clearTimeout(timer)
        resolve(true)
      })
    })
    if (!connected) return port // the queue is full: this SYN was dropped
  }
  throw new Error(`the listener on port ${port} keeps accepting connections`)
}

/** Copies a handshake reply with its descriptor's TCP data port set to `port`. */
function withDataPort(envelope: Buffer, port: number): Buffer {
  const out = Buffer.from(envelope)
  const at = ENVELOPE_HEADER_BYTES
  if (out.toString('latin1', at, at + 4) !== 'KVTX') throw new Error('unexpected handshake envelope layout')
  const nameLength = out[at + NAME_LENGTH_AT]
  // After the name: the endpoint count, then (kind u8, length u32, bytes) per endpoint. A
  // reply names one transport; TCP's endpoint (kind 1) starts with the data port.
  const endpoints = at + NAME_LENGTH_AT + 1 + nameLength
  if (out[endpoints] !== 1 || out[endpoints + 1] !== 1) throw new Error('the reply does not name the TCP transport')
  out.writeUInt16LE(port, endpoints + 1 + 1 + 4)
  return out
}

/**
 * A control-plane proxy on `port` in front of the communicator on `target`; while
 * `dataPort` is set, the handshake reply points the connector's data connection there.
 */
async function controlProxy(t: ExecutionContext, target: number) {
  const router = new zmq.Router({ linger: 0 })
  await router.bind(`tcp://${LOOPBACK}:0`)
  const state = {
    port: Number(/:(\d+)$/.exec(router.lastEndpoint ?? '')?.[1]),
    dataPort: undefined as number | undefined,
  }
  const serve = async () => {
    for await (const [identity, ...request] of router) {
      const dealer = new zmq.Dealer({ linger: 0, receiveTimeout: 10_000 })
      dealer.connect(`tcp://${LOOPBACK}:${target}`)
      try {
        await dealer.send(request)
        const answer = await dealer.receive()
        if (state.dataPort !== undefined && answer[1]?.toString() === 'welcome') {
          answer[2] = withDataPort(answer[2], state.dataPort)
        }
        await router.send([identity, ...answer])
      } finally {
        dealer.close()
      }
    }
  }
  const serving = serve().catch(() => undefined)
  t.teardown(async () => {
    router.close()
    await serving
  })
  return state
}

/** Connects for real (the proxy no longer redirects), writes one block, checks it landed. */
async function connectAndWrite(
  t: ExecutionContext,
  prefill: ReturnType<typeof makePrefill>,
  port: number,
  keys: Buffer[],
) {
  const started = Date.now()
  t.true(await prefill.comm.connect(LOOPBACK, port, { timeoutMs: ms(30_000) }))
  const took = Date.now() - started
  await prefill.comm.writeCache(LOOPBACK, port, [1], [2], 0)
  t.true(keys[0].subarray(2 * LAYOUT.blockBytes, 3 * LAYOUT.blockBytes).equals(prefill.block(0, 'K', 1)))
  return took
}

tcpOnly('connectTimeoutMs bounds opening the data connection: ERR_TIMEOUT, and the engine gives up too', async (t) => {
  const decode = await decodeHere(t)
  const proxy = await controlProxy(t, decode.comm.port)
  proxy.dataPort = await blackhole(t)
  const prefill = makePrefill(t, { ...LAYOUT, connectTimeoutMs: 1500 })
  const started = Date.now()
  await expectKvError(t, () => prefill.comm.connect(LOOPBACK, proxy.port), 'ERR_TIMEOUT', [
    `${LOOPBACK}:${proxy.port}`,
    '1500 ms',
  ])
  const took = Date.now() - started
  t.log(`connect rejected after ${took} ms`)
  // Formerly the engine's own 10 s bound applied, and the call failed with ERR_IO after it.
  t.true(took >= 1400 && took < 1500 + ms(2500), `took ${took} ms`)
  t.false(prefill.comm.isConnected(LOOPBACK, proxy.port))
  // The next connect to that peer first waits for the engine's attempt to end: it ended
  // with connectTimeoutMs too, so this one does not wait out a longer native default.
  proxy.dataPort = undefined
  const again = await connectAndWrite(t, prefill, proxy.port, decode.keys)
  t.log(`the next connect took ${again} ms`)
  t.true(again < ms(4000), `took ${again} ms`)
})

tcpOnly("a connect's timeoutMs shorter than connectTimeoutMs ends the wait for the data connection", async (t) => {
  const decode = await decodeHere(t)
  const proxy = await controlProxy(t, decode.comm.port)
  proxy.dataPort = await blackhole(t)
  const prefill = makePrefill(t, { ...LAYOUT, connectTimeoutMs: 4000 })
  const started = Date.now()
  await expectKvError(t, () => prefill.comm.connect(LOOPBACK, proxy.port, { timeoutMs: 800 }), 'ERR_TIMEOUT', [
    `${LOOPBACK}:${proxy.port}`,
    '800 ms',
  ])
  const took = Date.now() - started
  t.log(`connect rejected after ${took} ms`)
  t.true(took >= 700 && took < 800 + ms(2000), `took ${took} ms`)
  t.false(prefill.comm.isConnected(LOOPBACK, proxy.port))
  // The abandoned attempt still runs in the engine (up to connectTimeoutMs); a new connect
  // waits for it to end and then connects.
  proxy.dataPort = undefined
  const again = await connectAndWrite(t, prefill, proxy.port, decode.keys)
  t.log(`the next connect took ${again} ms`)
  t.true(again < 4000 + ms(3000), `took ${again} ms`)
  t.true(prefill.comm.isConnected(LOOPBACK, proxy.port))
})
