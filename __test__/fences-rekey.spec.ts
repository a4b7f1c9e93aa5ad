/**
 * `rekey` over the fence channel (warm re-attach, ts/sidecar/warm.ts): the receiver sends
 * its new region keys to its writers before their fences lift. A writer applies them to its
 * links to that receiver and answers; one that cannot take them, or does not answer in
 * time, is cut off (it connects again, getting the keys with the handshake). The keys'
 * effect on RDMA links is tested in the Soft-RoCE VM (crates/engine/tests/rdma_swap.rs, the
 * Python e2e warm test); here, with two communicators in this process, the channel itself.
 */
import test from 'ava'
import * as zmq from 'zeromq'
import { CONTROL_PROTOCOL } from '../lib/control.js'
import type { FenceHub } from '../lib/fences.js'
import type { RDMACommunicator } from '../lib/index.js'
import { communicatorOnHostRegions } from '../lib/setup.js'
import { HOST, TRANSPORT, eventually, makePrefill, ms } from './helpers.js'

/** The sidecar's internal access to the hub (`warmAccess` is left out of the published types). */
function warm(comm: RDMACommunicator): { fences: FenceHub; writers: string[] } {
  return (comm as unknown as { warmAccess(): { fences: FenceHub; writers: string[] } }).warmAccess()
}

const BLOCKS = 4
const BLOCK_BYTES = 4096

test('rekey: a writer takes the keys and answers; one that cannot, or stays silent, is cut off', async (t) => {
  const { comm: decode } = communicatorOnHostRegions({
    role: 'decode',
    layers: 1,
    fill: 'zeros',
    blockNumber: BLOCKS,
    blockBytes: BLOCK_BYTES,
    transport: TRANSPORT,
    name: 'decode-rekey',
    authToken: '',
  })
  t.teardown(() => decode.close())
  await decode.ready
  const prefill = makePrefill(t, { layers: 1, blockNumber: BLOCKS, blockBytes: BLOCK_BYTES })
  t.true(await prefill.comm.connect(HOST, decode.port, { timeoutMs: ms(30_000) }))
  await prefill.comm.writeCache(HOST, decode.port, [0], [1], 0)
  const { fences, writers } = warm(decode)
  t.deepEqual(writers, ['prefill-test'])

  // Keys of a transport its link is not on (or that needs none): nothing to update, answered.
  const taken = await fences.rekey(writers, [{ transport: 'tcp', keys: Buffer.from([1]) }], ms(5000))
  t.deepEqual(taken, { acknowledged: ['prefill-test'], cutOff: [] })
  await prefill.comm.writeCache(HOST, decode.port, [1], [2], 0)

  // A silent writer (it listens for fences and answers nothing) is cut off after the wait.
  const ghost = new zmq.Dealer({ linger: 0 })
  t.teardown(() => ghost.close())
  ghost.connect(`tcp://${HOST}:${decode.port}`)
  await ghost.send([CONTROL_PROTOCOL, 'listen', 'ghost-writer'])
  const [, kind] = await ghost.receive()
  t.is(kind.toString(), 'listening')
  const silent = await fences.rekey(['ghost-writer'], [{ transport: 'rdma', keys: Buffer.from([1]) }], 200)
  t.deepEqual(silent, { acknowledged: [], cutOff: ['ghost-writer'] })
  t.false(warm(decode).writers.includes('ghost-writer'))

  // Keys the writer cannot take (a transport it does not know): it answers the error and is
  // cut off; its link ends, and it connects again.
  const refused = await fences.rekey(['prefill-test'], [{ transport: 'warp', keys: Buffer.from([1]) }], ms(5000))
  t.deepEqual(refused, { acknowledged: [], cutOff: ['prefill-test'] })
  t.deepEqual(warm(decode).writers, [])
  // TCP: the cut closed its connection. RDMA: its queue pairs here are in the error state,
  // so its next write fails.
  const lost = await eventually(
    async () =>
      !prefill.comm.isConnected(HOST, decode.port) ||
      prefill.comm.writeCache(HOST, decode.port, [2], [3], 0, { timeoutMs: ms(5000) }).then(
        () => false,
        () => true,
      ),
    ms(20_000),
  )
  t.true(lost, 'the cut-off writer lost its link')
})
