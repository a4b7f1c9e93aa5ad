/**
 * Operating the package: the default name peers see, the `kvtransfer` command as installed
 * in a checkout, and why a transport was chosen (peerInfo).
 */
import test from 'ava'
import { execFileSync } from 'node:child_process'
import { statSync } from 'node:fs'
import * as os from 'node:os'
import { fileURLToPath } from 'node:url'
import { HOST, RDMACommunicator, TRANSPORT, eventually, makePrefill, ms, type Arrival } from './helpers.js'

const CLI = fileURLToPath(new URL('../lib/cli.js', import.meta.url))

function decode(name?: string) {
  return new RDMACommunicator({
    role: 'decode',
    gpuIdx: 0,
    port: 0,
    localKeyCache: [Buffer.alloc(4 * 1024)],
    localValueCache: [],
    blockNumber: 4,
    blockBytes: 1024,
    transport: TRANSPORT,
    authToken: '',
    ...(name === undefined ? {} : { name }),
  })
}

test.serial('the default name carries the bound port when port 0 is given', async (t) => {
  const receiver = decode('decode-named')
  t.teardown(() => receiver.close())
  const writer = new RDMACommunicator({
    role: 'prefill',
    gpuIdx: 0,
    port: 0,
    localKeyCache: [Buffer.alloc(4 * 1024, 7)],
    localValueCache: [],
    blockNumber: 4,
    blockBytes: 1024,
    transport: TRANSPORT,
    authToken: '',
  })
  t.teardown(() => writer.close())
  await Promise.all([receiver.ready, writer.ready])
  t.not(writer.port, 0)
  const arrivals: Arrival[] = []
  receiver.on('arrival', (a: Arrival) => arrivals.push(a))
  t.true(await writer.connect(HOST, receiver.port, { timeoutMs: ms(30_000) }))
  await writer.writeCache(HOST, receiver.port, [1], [2], 0, { tag: 'named' })
  t.true(await eventually(() => arrivals.length === 1, ms(10_000)))
  t.is(arrivals[0].peer, `${os.hostname()}:${writer.port}`)
  t.deepEqual(
    receiver.metrics().peers.map((p) => p.peer),
    [`${os.hostname()}:${writer.port}`],
  )
})

test('lib/cli.js is executable with a node shebang (npx kvtransfer in a checkout)', (t) => {
  t.true((statSync(CLI).mode & 0o111) !== 0, 'lib/cli.js has the execute bit (npm run build:ts sets it)')
  const out = execFileSync(CLI, ['--help'], { encoding: 'utf8' })
  t.regex(out, /Usage: kvtransfer/)
})

test('an explicit name is kept', async (t) => {
  const prefill = makePrefill(t, { layers: 1, blockNumber: 4, blockBytes: 1024, name: 'explicit', keyOnly: true })
  await prefill.comm.ready
  const receiver = decode()
  t.teardown(() => receiver.close())
  await receiver.ready
  const arrivals: Arrival[] = []
  receiver.on('arrival', (a: Arrival) => arrivals.push(a))
  t.true(await prefill.comm.connect(HOST, receiver.port, { timeoutMs: ms(30_000) }))
  await prefill.comm.writeCache(HOST, receiver.port, [0], [0], 0, { tag: 'explicit' })
  t.true(await eventually(() => arrivals.length === 1, ms(10_000)))
  t.is(arrivals[0].peer, 'explicit')
})
