/**
 * Fence registrations with an auth token: a writer registers for a receiver's fences with a
 * proof from its own handshake, taken once. Someone without the token cannot take a writer's
 * fences (and acknowledge them while that writer's bytes still land): the receiver refuses
 * the registration `ERR_AUTH`, and its fences still reach the real writer.
 */
import test, { type ExecutionContext } from 'ava'
import { randomBytes } from 'node:crypto'
import * as zmq from 'zeromq'
import { RDMACommunicator } from '../lib/index.js'
import { HOST, ms } from './helpers.js'

const BLOCKS = 4
const BLOCK_BYTES = 4096

async function communicator(t: ExecutionContext, role: 'prefill' | 'decode', name: string, authToken: string) {
  const region = () => [Buffer.alloc(BLOCKS * BLOCK_BYTES)]
  const comm = new RDMACommunicator({
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
    authToken,
  })
  t.teardown(() => comm.close())
  await comm.ready
  return comm
}

/** Sends a `listen` for `name` (with `proof` after a zero byte, if any) from a fresh connection. */
async function rogueListen(t: ExecutionContext, port: number, name: string, proof?: Buffer): Promise<string[]> {
  const dealer = new zmq.Dealer({ linger: 0, receiveTimeout: ms(5000) })
  t.teardown(() => dealer.close())
  dealer.connect(`tcp://${HOST}:${port}`)
  const body = proof === undefined ? Buffer.from(name) : Buffer.concat([Buffer.from(name), Buffer.alloc(1), proof])
  await dealer.send([Buffer.from('KVT1'), Buffer.from('listen'), body])
  return (await dealer.receive()).map((frame) => frame.toString())
}

test('with an auth token, only the writer whose handshake it was can take its fences', async (t) => {
  const decode = await communicator(t, 'decode', 'decode-a', 'shared secret')
  const prefill = await communicator(t, 'prefill', 'writer-a', 'shared secret')
  t.true(await prefill.connect(HOST, decode.port, { timeoutMs: ms(20_000) }))
  // The writer's registration used up its grant.
  t.is(decode.stats().openFenceGrants, 0)

  const bare = await rogueListen(t, decode.port, 'writer-a')
  t.is(bare[1], 'refused')
  t.is(bare[2], 'ERR_AUTH')
  t.regex(bare[3], /0-byte proof.*64-byte proof/)
  const forged = await rogueListen(t, decode.port, 'writer-a', randomBytes(64))
  t.deepEqual(forged.slice(1, 3), ['refused', 'ERR_AUTH'])
  t.regex(forged[3], /answers no handshake this side accepted/)

  // The fence still goes to the real writer, which acknowledges it.
  const result = await decode.fence({ peer: 'writer-a' }, { ackTimeoutMs: ms(5000), holdMs: 0 })
  t.deepEqual(result, { acknowledged: ['writer-a'], cutOff: [] })
  // Reconnecting registers again (a fresh handshake, a fresh grant).
  await prefill.abortPeer(HOST, decode.port)
  t.true(await prefill.connect(HOST, decode.port, { timeoutMs: ms(20_000) }))
  t.deepEqual(await decode.fence({ peer: 'writer-a' }, { ackTimeoutMs: ms(5000), holdMs: 0 }), {
    acknowledged: ['writer-a'],
    cutOff: [],
  })
  t.is(decode.stats().openFenceGrants, 0)
})

test('without an auth token anyone may register, as anyone may connect', async (t) => {
  const decode = await communicator(t, 'decode', 'decode-b', '')
  const answer = await rogueListen(t, decode.port, 'anyone')
  t.is(answer[1], 'listening')
})
