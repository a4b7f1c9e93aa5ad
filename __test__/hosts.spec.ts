/**
 * Peers are keyed by their address, not by the host string a call spells: after
 * `connect('127.0.0.1', p)`, `localhost` names the same peer (and the reverse), a name
 * looked up once reaches the peer its address reached, and a call to an unconnected peer
 * says which `connect` call would connect it. Byte for byte against a decode peer in
 * another process.
 */
import { lookup } from 'node:dns/promises'
import * as os from 'node:os'
import test from 'ava'
import { HOST, Mirror, assertPeerMatches, expectKvError, freePort, makePrefill, ms, spawnPeer } from './helpers.js'

const LAYOUT = { layers: 2, blockNumber: 16, blockBytes: 1024 }
/** `localhost` is loopback: these tests need the peer reachable there (not so in a run against a remote HOST). */
const onLoopback = HOST === '127.0.0.1' ? test.serial : test.serial.skip
/** This machine's name, where it resolves (the lookup path: not an address, not `localhost`). */
const NAMED = await lookup(os.hostname(), { family: 4 }).then(
  ({ address }) => ({ name: os.hostname(), address }),
  () => undefined,
)
const named = NAMED ? test.serial : test.serial.skip

onLoopback("connected as 127.0.0.1: 'localhost' is the same peer for every call", async (t) => {
  const peer = await spawnPeer(t, LAYOUT)
  const prefill = makePrefill(t, LAYOUT)
  const mirror = new Mirror(prefill, LAYOUT.blockNumber)
  t.true(await prefill.comm.connect('127.0.0.1', peer.port, { timeoutMs: ms(30_000) }))
  t.true(prefill.comm.isConnected('localhost', peer.port))
  t.true(prefill.comm.isConnected('LOCALHOST', String(peer.port)))
  const handle = prefill.comm.peer('localhost', peer.port)
  t.is(handle, prefill.comm.peer('127.0.0.1', peer.port), 'one handle, whatever the name')
  t.is(handle.key, `127.0.0.1:${peer.port}`)
  t.is(prefill.comm.peerInfo('localhost', peer.port)?.transport as string | undefined, peer.transport)
  await prefill.comm.writeCache('localhost', peer.port, [1, 2], [3, 4], 0, { tag: 'by-name' })
  mirror.apply(0, [1, 2], [3, 4])
  const prepared = prefill.comm.prepareBlocks('localhost', peer.port, [5], [6])
  await prefill.comm.writeCache('127.0.0.1', peer.port, prepared, 1)
  mirror.apply(1, [5], [6])
  await assertPeerMatches(t, peer, mirror, 'after writes by name and by address')
  const perPeer = prefill.comm.metrics().peers.map((p) => p.peer)
  t.deepEqual(perPeer, [`127.0.0.1:${peer.port}`], 'one metrics series for the one peer')
  t.true(await prefill.comm.abortPeer('localhost', peer.port))
  t.false(prefill.comm.isConnected('127.0.0.1', peer.port))
})

onLoopback("connected as 'localhost': its address is the same peer", async (t) => {
  const peer = await spawnPeer(t, LAYOUT)
  const prefill = makePrefill(t, LAYOUT)
  const mirror = new Mirror(prefill, LAYOUT.blockNumber)
  t.true(await prefill.comm.connect('localhost', peer.port, { timeoutMs: ms(30_000) }))
  t.true(prefill.comm.isConnected('127.0.0.1', peer.port))
  await prefill.comm.writeCache('127.0.0.1', peer.port, [7], [8], 0)
  mirror.apply(0, [7], [8])
  await assertPeerMatches(t, peer, mirror, 'after a write by address')
})

onLoopback('a call to a peer never connected names the connect call that would connect it', async (t) => {
  const prefill = makePrefill(t, LAYOUT)
  await prefill.comm.ready
  const port = await freePort()
  t.false(prefill.comm.isConnected('localhost', port))
  // The hint is a call that works: `connect(host, port)` with the peer's address.
  await expectKvError(t, () => prefill.comm.writeCache('localhost', port, [1], [2], 0), 'ERR_NOT_CONNECTED', [
    `connect('127.0.0.1', ${port})`,
  ])
  await expectKvError(t, () => prefill.comm.peer('localhost', port), 'ERR_NOT_CONNECTED', [
    `connect('127.0.0.1', ${port})`,
  ])
})

named('a host name is looked up once: by name and by its address, one peer', async (t) => {
  const { name, address } = NAMED!
  const peer = await spawnPeer(t, LAYOUT)
  const prefill = makePrefill(t, LAYOUT)
  const mirror = new Mirror(prefill, LAYOUT.blockNumber)
  t.true(await prefill.comm.connect(address, peer.port, { timeoutMs: ms(30_000) }))
  // writeCache by a name it has not seen: looked up (asynchronously), then written.
  await prefill.comm.writeCache(name, peer.port, [9], [10], 0)
  mirror.apply(0, [9], [10])
  t.true(prefill.comm.isConnected(name, peer.port), 'the name is known once looked up')
  t.is(prefill.comm.peer(name, peer.port).key, `${address}:${peer.port}`)
  await assertPeerMatches(t, peer, mirror, 'after a write by name')
})

test('a name that does not resolve: connect times out naming the lookup failure', async (t) => {
  const prefill = makePrefill(t, LAYOUT)
  await prefill.comm.ready
  await expectKvError(t, () => prefill.comm.connect('no-such-host.invalid', 4000, { timeoutMs: 500 }), 'ERR_TIMEOUT', [
    'connect to no-such-host.invalid:4000',
    'no-such-host.invalid does not resolve',
  ])
  await expectKvError(
    t,
    () => prefill.comm.writeCache('no-such-host.invalid', 4000, [1], [2], 0),
    'ERR_NOT_CONNECTED',
    ["connect('no-such-host.invalid', 4000)"],
  )
  t.false(await prefill.comm.abortPeer('no-such-host.invalid', 4000))
})
