/**
 * Prepared block lists: `prepareBlocks` validates and plans once; `writeCache(ip, port,
 * prepared, layerIdx)` writes that list for any layer. Byte for byte against a decode peer
 * in another process; refusals typed, nothing written.
 */
import test from 'ava'
import { HOST, Mirror, assertPeerMatches, connect, expectKvError, freePort, makePrefill, spawnPeer } from './helpers.js'
import { PreparedBlocks } from '../lib/index.js'

test.serial('a prepared block list is written for every layer, byte for byte', async (t) => {
  const layers = 4
  const blockBytes = 2048
  const peer = await spawnPeer(t, { layers, blockNumber: 48, blockBytes })
  const prefill = makePrefill(t, { layers, blockNumber: 32, blockBytes })
  const mirror = new Mirror(prefill, 48)
  await connect(t, prefill, peer)
  const local = [5, 6, 7, 8, 20, 1, 31]
  const remote = Uint32Array.from([40, 41, 42, 43, 0, 17, 3])
  const prepared = prefill.comm.prepareBlocks(HOST, peer.port, local, remote)
  t.true(prepared instanceof PreparedBlocks)
  t.is(prepared.peer, `${HOST}:${peer.port}`)
  t.is(prepared.blocks, 7)
  t.is(prepared.runs, 4, '5..8 → 40..43 coalesces into one run')
  await Promise.all(
    Array.from({ length: layers }, (_, layer) =>
      prefill.comm.writeCache(HOST, peer.port, prepared, layer, { tag: 7n }),
    ),
  )
  for (let layer = 0; layer < layers; layer++) mirror.apply(layer, local, remote)
  await assertPeerMatches(t, peer, mirror, 'after the prepared writes')
  t.true((await peer.bytes(3, 'V', 3)).equals(prefill.block(3, 'V', 31)))
  // Plain and prepared calls mix on one link.
  await prefill.comm.writeCache(HOST, peer.port, [0], [47], 2)
  mirror.apply(2, [0], [47])
  await prefill.comm.writeCache(HOST, peer.port, prepared, 1)
  await assertPeerMatches(t, peer, mirror, 'after mixing plain and prepared writes')
  // An empty list is a no-op that resolves.
  await prefill.comm.writeCache(HOST, peer.port, prefill.comm.prepareBlocks(HOST, peer.port, [], []), 0)
})

test.serial(
  'prepareBlocks refuses bad ids itself (typed); a bad layer is refused per call; nothing written',
  async (t) => {
    const blockBytes = 1024
    const peer = await spawnPeer(t, { layers: 2, blockNumber: 16, blockBytes })
    const prefill = makePrefill(t, { layers: 2, blockNumber: 8, blockBytes })
    const mirror = new Mirror(prefill, 16)
    await connect(t, prefill, peer)
    const prepare = (local: number[], remote: number[]) => () =>
      prefill.comm.prepareBlocks(HOST, peer.port, local, remote)
    await expectKvError(t, prepare([1, 2], [3, 16]), 'ERR_BLOCK_ID_OUT_OF_RANGE', [
      'remoteBlockIds[1] = 16',
      'blockNumber 16',
    ])
    await expectKvError(t, prepare([8], [3]), 'ERR_BLOCK_ID_OUT_OF_RANGE', ['localBlockIds[0] = 8', 'blockNumber 8'])
    await expectKvError(t, prepare([-1], [3]), 'ERR_INVALID_BLOCK_ID', ['localBlockIds[0] = -1'])
    await expectKvError(t, prepare([1.5], [3]), 'ERR_INVALID_BLOCK_ID', ['localBlockIds[0] = 1.5'])
    await expectKvError(t, prepare([1, 2], [3]), 'ERR_BLOCK_COUNT_MISMATCH', ['2 entries', '1'])
    await expectKvError(t, () => prefill.comm.prepareBlocks(HOST, 1, [1], [1]), 'ERR_NOT_CONNECTED', [`${HOST}:1`])
    const prepared = prefill.comm.prepareBlocks(HOST, peer.port, [1], [2])
    await expectKvError(t, () => prefill.comm.writeCache(HOST, peer.port, prepared, 2), 'ERR_LAYER_OUT_OF_RANGE', [
      'layerIdx 2',
      '2 layers',
    ])
    await expectKvError(t, () => prefill.comm.writeCache(HOST, peer.port, prepared, 0.5), 'ERR_LAYER_OUT_OF_RANGE')
    await assertPeerMatches(t, peer, mirror, 'nothing was written')
  },
)

test.serial(
  'a prepared list is refused for another peer, by another communicator and after its peer reconnected with another blockNumber',
  async (t) => {
    const blockBytes = 1024
    const peerA = await spawnPeer(t, { layers: 1, blockNumber: 16, blockBytes })
    const peerB = await spawnPeer(t, { layers: 1, blockNumber: 16, blockBytes })
    const prefill = makePrefill(t, { layers: 1, blockNumber: 16, blockBytes })
    const mirrorB = new Mirror(prefill, 16)
    await connect(t, prefill, peerA)
    await connect(t, prefill, peerB)
    const prepared = prefill.comm.prepareBlocks(HOST, peerA.port, [1, 2, 3], [13, 14, 15])
    await expectKvError(t, () => prefill.comm.writeCache(HOST, peerB.port, prepared, 0), 'ERR_INVALID_ARGUMENT', [
      `prepared for peer ${HOST}:${peerA.port}`,
      `not ${HOST}:${peerB.port}`,
    ])
    await assertPeerMatches(t, peerB, mirrorB, 'nothing written to the other peer')

    // Another communicator connected to the same peer: its lists are its own.
    const other = makePrefill(t, { layers: 1, blockNumber: 16, blockBytes })
    await connect(t, other, peerA)
    other.comm.prepareBlocks(HOST, peerA.port, [4], [5])
    await expectKvError(t, () => other.comm.writeCache(HOST, peerA.port, prepared, 0), 'ERR_INVALID_ARGUMENT', [
      `for ${HOST}:${peerA.port} was prepared by another communicator`,
    ])
    await assertPeerMatches(t, peerA, new Mirror(prefill, 16), 'nothing written by the other communicator')

    // The same peer restarted with the same layout: the plan still fits.
    const port = await freePort()
    const first = await spawnPeer(undefined, { layers: 1, blockNumber: 16, blockBytes, port })
    await connect(t, prefill, first)
    const onPort = prefill.comm.prepareBlocks(HOST, port, [1, 2, 3], [13, 14, 15])
    await first.kill()
    const again = await spawnPeer(t, { layers: 1, blockNumber: 16, blockBytes, port })
    await connect(t, prefill, again)
    const mirror = new Mirror(prefill, 16)
    await prefill.comm.writeCache(HOST, port, onPort, 0)
    mirror.apply(0, [1, 2, 3], [13, 14, 15])
    await assertPeerMatches(t, again, mirror, 'reconnected with the same layout')
    await again.kill()

    // Restarted with a smaller cache: refused, nothing written.
    const smaller = await spawnPeer(t, { layers: 1, blockNumber: 14, blockBytes, port })
    await connect(t, prefill, smaller)
    await expectKvError(t, () => prefill.comm.writeCache(HOST, port, onPort, 0), 'ERR_LAYOUT_MISMATCH', [
      'remote blockNumber is 16',
      'but 14',
    ])
    await assertPeerMatches(t, smaller, new Mirror(prefill, 14), 'nothing written after the refusal')
  },
)
