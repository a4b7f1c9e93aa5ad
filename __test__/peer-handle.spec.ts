/**
 * Peer handles: `comm.peer(ip, port)` gives the connected peer; `writeCache(peer, ...)`
 * and `prepareBlocks(peer, ...)` take it in place of `ip, port`. Byte for byte against a
 * decode peer in another process; refusals typed, counted, nothing written.
 */
import test from 'ava'
import { HOST, Mirror, assertPeerMatches, connect, expectKvError, makePrefill, spawnPeer } from './helpers.js'
import { Peer } from '../lib/index.js'

test.serial('writes through a peer handle land byte for byte, plain and prepared', async (t) => {
  const layers = 2
  const blockBytes = 1024
  const peer = await spawnPeer(t, { layers, blockNumber: 16, blockBytes })
  const prefill = makePrefill(t, { layers, blockNumber: 16, blockBytes })
  const mirror = new Mirror(prefill, 16)
  await expectKvError(t, () => prefill.comm.peer(HOST, peer.port), 'ERR_NOT_CONNECTED', [`${HOST}:${peer.port}`])
  await connect(t, prefill, peer)
  const handle = prefill.comm.peer(HOST, peer.port)
  t.true(handle instanceof Peer)
  t.is(handle.key, `${HOST}:${peer.port}`)
  t.is(prefill.comm.peer(HOST, String(peer.port)), handle, 'one handle per connection, whatever the port spelling')
  await prefill.comm.writeCache(handle, [1, 2], [3, 4], 0, { tag: 'h' })
  mirror.apply(0, [1, 2], [3, 4])
  const prepared = prefill.comm.prepareBlocks(handle, [5, 6], [7, 9])
  t.is(prepared.peer, handle.key)
  await prefill.comm.writeCache(handle, prepared, 1)
  mirror.apply(1, [5, 6], [7, 9])
  // `ip, port` and the handle name the same peer: the list goes either way.
  await prefill.comm.writeCache(HOST, peer.port, prepared, 0)
  mirror.apply(0, [5, 6], [7, 9])
  await assertPeerMatches(t, peer, mirror, 'after writes through the handle')
})

test.serial(
  'a handle refused by another communicator or after its peer is gone: typed, counted, nothing written',
  async (t) => {
    const blockBytes = 1024
    const peer = await spawnPeer(t, { layers: 1, blockNumber: 16, blockBytes })
    const first = makePrefill(t, { layers: 1, blockNumber: 16, blockBytes })
    const second = makePrefill(t, { layers: 1, blockNumber: 16, blockBytes })
    const mirror = new Mirror(first, 16)
    await connect(t, first, peer)
    await connect(t, second, peer)
    const handle = first.comm.peer(HOST, peer.port)
    const foreign = await expectKvError(t, () => second.comm.writeCache(handle, [1], [2], 0), 'ERR_INVALID_ARGUMENT')
    // The engine refuses another engine's handle in the same sentence (crates/engine/tests/peer_handle.rs).
    t.is(
      foreign?.message,
      `invalid peer: the handle on ${handle.key} belongs to another communicator; use the one its connect returned`,
    )
    const prepared = first.comm.prepareBlocks(handle, [1], [2])
    await expectKvError(
      t,
      () => second.comm.writeCache(second.comm.peer(HOST, peer.port), prepared, 0),
      'ERR_INVALID_ARGUMENT',
      ['another communicator'],
    )
    t.is(second.comm.metrics().callsFailed, 2, 'both refusals are counted')
    await first.comm.abortPeer(HOST, peer.port)
    await expectKvError(t, () => first.comm.writeCache(handle, [1], [2], 0), 'ERR_NOT_CONNECTED', [handle.key])
    await assertPeerMatches(t, peer, mirror, 'nothing was written')
  },
)
