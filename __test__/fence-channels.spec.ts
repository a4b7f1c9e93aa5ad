/**
 * A writer's fence channels (one zeromq connection per receiver it connected to) end with
 * their links: when receivers restart on new ports, the writer's next `connect` releases the
 * channels of links that are gone, as the engine releases the links themselves. Before,
 * every receiver restart left a channel reconnecting to a dead port (an eventfd each).
 * (Counted with `stats().fenceChannels`: the fds themselves also depend on when the closed
 * communicators in this process are garbage-collected.)
 */
import test from 'ava'
import { setTimeout as sleep } from 'node:timers/promises'
import { RDMACommunicator } from '../lib/index.js'
import { HOST } from './helpers.js'

const BLOCKS = 4
const BLOCK_BYTES = 4096

function communicator(role: 'prefill' | 'decode', name: string): RDMACommunicator {
  const region = () => [Buffer.alloc(BLOCKS * BLOCK_BYTES)]
  return new RDMACommunicator({
    role,
    gpuIdx: 0,
    port: 0,
    name,
    host: HOST,
    localKeyCache: region(),
    localValueCache: region(),
    blockNumber: BLOCKS,
    blockBytes: BLOCK_BYTES,
    transport: 'tcp',
  })
}

test('fence channels to receivers that are gone are released at the next connect', async (t) => {
  const prefill = communicator('prefill', 'writer')
  t.teardown(() => prefill.close())
  await prefill.ready
  const RESTARTS = 8
  for (let i = 0; i <= RESTARTS; i++) {
    const decode = communicator('decode', `decode-${i}`)
    await decode.ready
    await prefill.connect(HOST, decode.port)
    await prefill.writeCache(HOST, decode.port, [0], [1], 0)
    // This receiver's channel, none of those before it (closed and restarted meanwhile).
    t.is(prefill.stats().fenceChannels, 1, `after ${i} receiver restarts`)
    await decode.close()
    // The writer notices the receiver is gone (its link breaks) before it connects again.
    const deadline = Date.now() + 10_000
    while (prefill.isConnected(HOST, decode.port) && Date.now() < deadline) await sleep(20)
  }
})
