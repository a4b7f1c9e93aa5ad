/**
 * Operating the package: the default name peers see, the `kvtransfer` command as installed
 * in a checkout (and its version), `await using`, and why a transport was chosen (peerInfo).
 */
import test from 'ava'
import { execFileSync } from 'node:child_process'
import { readFileSync, statSync } from 'node:fs'
import * as os from 'node:os'
import { fileURLToPath } from 'node:url'
import type { CommunicatorOptions } from '../lib/index.js'
import {
  HOST,
  KvTransferError,
  RDMACommunicator,
  TRANSPORT,
  eventually,
  makePrefill,
  ms,
  type Arrival,
} from './helpers.js'

const CLI = fileURLToPath(new URL('../lib/cli.js', import.meta.url))

function decodeOptions(name?: string): CommunicatorOptions {
  return {
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
  }
}

function decode(name?: string) {
  return new RDMACommunicator(decodeOptions(name))
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

test('kvtransfer --version and -V print the version of the package', (t) => {
  const { version } = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as {
    version: string
  }
  for (const flag of ['--version', '-V']) t.is(execFileSync(CLI, [flag], { encoding: 'utf8' }), `${version}\n`, flag)
  t.regex(execFileSync(CLI, ['--help'], { encoding: 'utf8' }), /-V, --version/)
})

test.serial('`await using` closes the communicator when its scope ends (Symbol.asyncDispose)', async (t) => {
  let port = 0
  let used: RDMACommunicator | undefined
  {
    await using comm = decode()
    used = comm
    await comm.ready
    port = comm.port
    t.true(comm.stats().registeredRegions > 0)
  }
  const error = await used.waitForArrival('after the scope').catch((e: KvTransferError) => e)
  t.is((error as KvTransferError).code, 'ERR_CLOSED', 'closed when the scope ended')
  // Its port was released: another communicator listens on it.
  const again = await RDMACommunicator.create({ ...decodeOptions(), port })
  t.is(again.port, port)
  await again.close()
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
