/**
 * Every listening socket of a communicator binds its `host` (the control plane and the TCP
 * data listener alike), else the documented default: `KVCACHE_SOCKET_IFNAME`'s IPv4 address,
 * else all interfaces. Checked with `ss -ltnp` as an operator would, on the decode peer's own
 * process, so that nothing else of this suite is counted.
 */
import { execFileSync } from 'node:child_process'
import test, { type ExecutionContext } from 'ava'
import {
  Mirror,
  RDMACommunicator,
  TRANSPORT,
  assertPeerMatches,
  expectKvError,
  makePrefill,
  ms,
  spawnPeer,
  type DecodePeer,
  type SpawnOptions,
} from './helpers.js'

const LAYOUT = { layers: 2, blockNumber: 8, blockBytes: 1024 }
/** Listeners of a communicator: the control plane, and the TCP data listener unless the transport is RDMA only. */
const LISTENERS = TRANSPORT === 'rdma' ? 1 : 2

/** Local addresses (`addr:port`) of the listening TCP sockets of process `pid`. */
function listeners(pid: number): string[] {
  const out = execFileSync('ss', ['-ltnpH'], { encoding: 'utf8' })
  return out
    .split('\n')
    .filter((line) => line.includes(`pid=${pid},`))
    .map((line) => line.trim().split(/\s+/)[3])
}

/** Forks the decode peer with `KVCACHE_SOCKET_IFNAME` set to `ifname` (undefined: unset). */
function spawnWith(t: ExecutionContext, ifname: string | undefined, options: Partial<SpawnOptions>) {
  const saved = process.env.KVCACHE_SOCKET_IFNAME
  if (ifname === undefined) delete process.env.KVCACHE_SOCKET_IFNAME
  else process.env.KVCACHE_SOCKET_IFNAME = ifname
  try {
    // The child's environment is copied when it is forked, before spawnPeer first awaits.
    return spawnPeer(t, { ...LAYOUT, ...options })
  } finally {
    if (saved === undefined) delete process.env.KVCACHE_SOCKET_IFNAME
    else process.env.KVCACHE_SOCKET_IFNAME = saved
  }
}

/** Asserts that the peer's listeners are its control port and data listener, all on `address`. */
function assertAllOn(t: ExecutionContext, peer: DecodePeer, address: string): void {
  const bound = listeners(peer.child.pid!)
  t.true(
    bound.includes(`${address}:${peer.port}`),
    `the control port ${peer.port} is on ${address}: ${bound.join(' ')}`,
  )
  t.is(bound.length, LISTENERS, `every listener: ${bound.join(' ')}`)
  for (const listener of bound) t.true(listener.startsWith(`${address}:`), `${listener} is on ${address}`)
}

test.serial("host '127.0.0.1': every listener is on 127.0.0.1, and writes still land", async (t) => {
  const peer = await spawnWith(t, undefined, { host: '127.0.0.1' })
  assertAllOn(t, peer, '127.0.0.1')

  const prefill = makePrefill(t, LAYOUT)
  t.true(await prefill.comm.connect('127.0.0.1', peer.port, { timeoutMs: ms(30_000) }))
  const mirror = new Mirror(prefill, LAYOUT.blockNumber)
  for (let layer = 0; layer < LAYOUT.layers; layer++) {
    await prefill.comm.writeCache('127.0.0.1', peer.port, [1, 2], [5, 6], layer)
    mirror.apply(layer, [1, 2], [5, 6])
  }
  await assertPeerMatches(t, peer, mirror)
})

test.serial("host names an interface ('lo'): every listener is on its address", async (t) => {
  assertAllOn(t, await spawnWith(t, undefined, { host: 'lo' }), '127.0.0.1')
})

test.serial('without host: every listener is on all interfaces (0.0.0.0), as documented', async (t) => {
  assertAllOn(t, await spawnWith(t, undefined, {}), '0.0.0.0')
})

test.serial("without host, KVCACHE_SOCKET_IFNAME=lo: every listener is on lo's address; host wins", async (t) => {
  assertAllOn(t, await spawnWith(t, 'lo', {}), '127.0.0.1')
  assertAllOn(t, await spawnWith(t, 'lo', { host: '0.0.0.0' }), '0.0.0.0')
})

test.serial('a host that a bind cannot take (a DNS name) is refused at construction, naming it', async (t) => {
  const options = {
    role: 'decode' as const,
    gpuIdx: 0,
    port: 0,
    localKeyCache: [Buffer.alloc(4096)],
    localValueCache: [],
    blockNumber: 4,
    blockBytes: 1024,
    transport: TRANSPORT,
    authToken: '',
    host: 'localhost',
  }
  // Closed again should it be built (it was, before: the control socket's bind then failed, ERR_IO).
  await expectKvError(t, () => new RDMACommunicator(options).close(), 'ERR_INVALID_ARGUMENT', [
    'host',
    "'localhost'",
    'lo',
  ])
  await expectKvError(t, () => RDMACommunicator.create(options), 'ERR_INVALID_ARGUMENT', ["'localhost'"])
})
