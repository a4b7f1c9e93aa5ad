/**
 * The instance registry on a real etcd (Debian's etcd-server, started here on loopback
 * ports): publishing under a lease, listing, names resolved by connect and writeCache,
 * unique names, join and leave events, lease expiry of a silently stopped peer failing its
 * pending calls, an etcd outage (the data plane carries on; connect by name uses the last
 * entry seen or fails typed; the communicators re-register), and a three-member cluster
 * whose leader is SIGKILLed. Skipped, naming why, where etcd is not installed.
 */
import { spawn } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import anyTest, { type ExecutionContext, type TestFn } from 'ava'
import { Etcd3 } from 'etcd3'
import { KvTransferError, RDMACommunicator, listInstances } from '../lib/index.js'
import type { Instance, InstanceLeft } from '../lib/index.js'
import { communicatorOnHostRegions } from '../lib/setup.js'
import { ETCD, EtcdCluster } from './etcd.js'
import { HOST, TRANSPORT, eventually, freePort, ms, sleep, spawnPeer, within } from './helpers.js'

const test = anyTest as TestFn
const run = 'path' in ETCD ? test.serial : test.skip
if (!('path' in ETCD)) console.log(`registry tests skipped: ${ETCD.missing}`)

const LAYERS = 2
const BLOCKS = 8
const BLOCK_BYTES = 4096
const TTL = 2
const CLI = fileURLToPath(new URL('../lib/cli.js', import.meta.url))

/** Runs `kvtransfer <args>` (without blocking this process's event loop: etcd clients live here). */
function cli(
  args: string[],
  env: Record<string, string> = {},
): Promise<{ status: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, ...args], { env: { ...process.env, ...env } })
    let out = ''
    let err = ''
    child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()))
    child.stderr.on('data', (chunk: Buffer) => (err += chunk.toString()))
    child.on('close', (status) => resolve({ status, out, err }))
  })
}

/** A communicator in this process over host regions, registered in `registry`; closed after the test. */
async function member(
  t: ExecutionContext,
  registry: string,
  name: string,
  role: 'prefill' | 'decode' = 'prefill',
): Promise<RDMACommunicator> {
  const { comm } = communicatorOnHostRegions({
    role,
    layers: LAYERS,
    fill: role === 'prefill' ? 'random' : 'zeros',
    blockNumber: BLOCKS,
    blockBytes: BLOCK_BYTES,
    transport: TRANSPORT,
    host: HOST,
    name,
    authToken: '',
    registry,
    registryTtlSeconds: TTL,
  })
  t.teardown(() => comm.close())
  await comm.ready
  return comm
}

async function cluster(t: ExecutionContext, size = 1): Promise<EtcdCluster> {
  const etcd = await EtcdCluster.start(size)
  t.teardown(() => etcd.close())
  return etcd
}

/** Fails the test unless `check` holds within `timeoutMs`. */
async function until(
  t: ExecutionContext,
  check: () => boolean | Promise<boolean>,
  timeoutMs: number,
  what: string,
): Promise<void> {
  t.true(await eventually(check, timeoutMs), `${what}: not within ${timeoutMs} ms`)
}

/** Records the registry events `comm` emits. */
function recorder(comm: RDMACommunicator) {
  const joined: Instance[] = []
  const left: InstanceLeft[] = []
  comm.on('instance-joined', (instance) => joined.push(instance))
  comm.on('instance-left', (gone) => left.push(gone))
  return { joined, left }
}

/** The lease id of `name`'s entry, read straight from etcd. */
async function leaseOf(etcd: EtcdCluster, prefix: string, name: string): Promise<string | undefined> {
  const client = new Etcd3({ hosts: etcd.members.map((m) => `http://127.0.0.1:${m.clientPort}`) })
  try {
    return (await client.get(`/${prefix}/instances/${name}`).exec()).kvs[0]?.lease
  } finally {
    client.close()
  }
}

run(
  'single member: instances are listed with their entry, connect and writeCache by name, join and leave events',
  async (t) => {
    const etcd = await cluster(t)
    const registry = etcd.url('single')
    const prefill = await member(t, registry, 'prefill-0')
    const events = recorder(prefill)
    const decode = await spawnPeer(t, {
      layers: LAYERS,
      blockNumber: BLOCKS,
      blockBytes: BLOCK_BYTES,
      host: HOST,
      name: 'decode-0',
      registry,
      registryTtlSeconds: TTL,
    })
    const all = await prefill.instances()
    t.deepEqual(
      all.map((i) => i.name),
      ['decode-0', 'prefill-0'],
    )
    const entry = all[0]
    t.like(entry, {
      role: 'decode',
      tpSize: 1,
      tpRank: 0,
      layout: { layers: LAYERS, blockNumber: BLOCKS, blockBytes: BLOCK_BYTES, scaleBlockBytes: 0, keyOnly: false },
      transport: decode.transport,
      control: { host: HOST, port: decode.port },
      pid: decode.child.pid,
    })
    t.is(entry.transports[0].transport, decode.transport)
    t.regex(entry.transports[0].summary, /\S/, 'each transport says what it uses there')
    t.deepEqual(
      (await prefill.instances({ role: 'decode' })).map((i) => i.name),
      ['decode-0'],
    )
    t.deepEqual(await prefill.instances({ role: 'decode', tpRank: 1 }), [])
    t.deepEqual(
      (await listInstances(registry, { role: 'prefill' })).map((i) => i.name),
      ['prefill-0'],
    )
    await until(t, () => events.joined.some((i) => i.name === 'decode-0'), ms(5000), 'decode-0 joined')

    t.true(await prefill.connect('decode-0', { timeoutMs: ms(10_000) }))
    t.true(prefill.isConnected(HOST, decode.port))
    await prefill.writeCache('decode-0', [0, 1], [5, 6], 1, { tag: 'by-name' })
    const digests = await decode.digests()
    t.not(digests.K[1][5], digests.K[0][5], 'block 5 of layer 1 was written')
    t.is(prefill.peer('decode-0'), prefill.peer(HOST, decode.port))

    await decode.close()
    await until(t, () => events.left.some((l) => l.name === 'decode-0'), ms(5000), 'decode-0 left')
    t.deepEqual(
      (await prefill.instances()).map((i) => i.name),
      ['prefill-0'],
    )
  },
)

run(
  'names are unique: a second holder is refused ERR_NAME_TAKEN at start; the name is free again once the first closes',
  async (t) => {
    const etcd = await cluster(t)
    const registry = etcd.url('names')
    const first = await member(t, registry, 'decode-x', 'decode')
    const refused = await t.throwsAsync(member(t, registry, 'decode-x', 'decode'))
    t.true(refused instanceof KvTransferError)
    t.is((refused as KvTransferError).code, 'ERR_NAME_TAKEN')
    t.regex(refused!.message, /"decode-x" is already taken in registry etcd:\/\/.*pid \d+/)
    t.deepEqual(
      (await first.instances()).map((i) => i.pid),
      [process.pid],
    )
    await first.close()
    const second = await member(t, registry, 'decode-x', 'decode')
    t.is((await second.instances()).length, 1)
  },
)

run(
  'lease expiry: a peer stopped silently (SIGSTOP) leaves within TTL + 1 s; its pending call fails ERR_PEER_DISCONNECTED',
  async (t) => {
    const etcd = await cluster(t)
    const registry = etcd.url('lease')
    const prefill = await member(t, registry, 'prefill-l')
    const events = recorder(prefill)
    const decode = await spawnPeer(t, {
      layers: LAYERS,
      blockNumber: BLOCKS,
      blockBytes: BLOCK_BYTES,
      host: HOST,
      name: 'decode-l',
      registry,
      registryTtlSeconds: TTL,
    })
    await prefill.connect('decode-l', { timeoutMs: ms(10_000) })
    await prefill.writeCache('decode-l', [0], [0], 0)
    // No FIN, no RST: the process keeps its sockets and just stops answering (as a host that vanished).
    decode.child.kill('SIGSTOP')
    const stopped = Date.now()
    // kill() returns before every thread has stopped: wait until the kernel reports it stopped.
    const state = () => readFileSync(`/proc/${decode.child.pid}/stat`, 'utf8').replace(/^.*\) /s, '')[0]
    await until(t, () => state() === 'T', ms(2000), 'the decode process stopped')
    const pending = prefill.writeCache('decode-l', [1, 2, 3], [1, 2, 3], 0, { timeoutMs: 0 })
    const outcome = pending.then(
      () => undefined,
      (error: unknown) => error,
    )
    const error = await within(outcome, ms((TTL + 5) * 1000), 'the pending call')
    if (TRANSPORT === 'rdma' && error === undefined) {
      // One-sided: the stopped process's NIC (the kernel, for Soft-RoCE) takes the WRITEs
      // and the call completes without it, so nothing is left pending. The lease still
      // expires, and the link is torn down on it.
      await until(t, () => events.left.some((l) => l.name === 'decode-l'), ms((TTL + 5) * 1000), 'decode-l left')
      await until(t, () => !prefill.isConnected(HOST, decode.port), ms(1000), 'the link torn down')
    } else {
      t.true(error instanceof KvTransferError, String(error))
      t.is((error as KvTransferError).code, 'ERR_PEER_DISCONNECTED')
      t.regex((error as Error).message, /registry entry is gone/)
    }
    const elapsed = Date.now() - stopped
    t.log(`${error === undefined ? 'peer left' : 'pending call rejected'} ${elapsed} ms after SIGSTOP (TTL ${TTL} s)`)
    t.true(elapsed <= ms(TTL * 1000 + 1000), `${elapsed} ms > TTL + 1 s`)
    t.true(events.left.some((l) => l.name === 'decode-l' && l.instance.control.port === decode.port))
    t.false(prefill.isConnected(HOST, decode.port))
    decode.child.kill('SIGKILL')
  },
)

run(
  'etcd stopped and restarted: links keep working, connect by name uses the last entry seen or fails ERR_REGISTRY_UNAVAILABLE, both re-register',
  async (t) => {
    const etcd = await cluster(t)
    const prefix = 'outage'
    const registry = etcd.url(prefix)
    const prefill = await member(t, registry, 'prefill-o')
    const events = recorder(prefill)
    const decode = await spawnPeer(t, {
      layers: LAYERS,
      blockNumber: BLOCKS,
      blockBytes: BLOCK_BYTES,
      host: HOST,
      name: 'decode-o',
      registry,
      registryTtlSeconds: TTL,
    })
    await prefill.connect('decode-o', { timeoutMs: ms(10_000) })
    await prefill.writeCache('decode-o', [0], [0], 0)
    const leases = [await leaseOf(etcd, prefix, 'prefill-o'), await leaseOf(etcd, prefix, 'decode-o')]

    await etcd.stop(0)
    const down = Date.now()
    // The data plane does not need etcd.
    await prefill.writeCache('decode-o', [1], [1], 0)
    const unavailable = await t.throwsAsync(prefill.connect('never-seen', { timeoutMs: ms(10_000) }))
    t.is((unavailable as KvTransferError).code, 'ERR_REGISTRY_UNAVAILABLE', unavailable?.message)
    t.regex(unavailable!.message, /registry etcd:\/\/.* is unavailable/)
    const listing = await t.throwsAsync(prefill.instances())
    t.is((listing as KvTransferError).code, 'ERR_REGISTRY_UNAVAILABLE')
    // Reconnect by name: the last entry seen of decode-o.
    await prefill.abortPeer(HOST, decode.port)
    t.true(await prefill.connect('decode-o', { timeoutMs: ms(10_000) }))
    await prefill.writeCache('decode-o', [2], [2], 0)
    // Longer than twice the TTL: both clients give their leases up and publish anew once etcd is back.
    await sleep(Math.max(0, TTL * 2000 + 1000 - (Date.now() - down)))
    await prefill.writeCache('decode-o', [3], [3], 1)
    await etcd.restart(0)

    await until(
      t,
      async () => {
        const now = [await leaseOf(etcd, prefix, 'prefill-o'), await leaseOf(etcd, prefix, 'decode-o')]
        return now[0] !== undefined && now[1] !== undefined && now[0] !== leases[0] && now[1] !== leases[1]
      },
      ms(10_000),
      'both entries published under new leases',
    )
    t.deepEqual(
      (await prefill.instances()).map((i) => i.name),
      ['decode-o', 'prefill-o'],
    )
    await prefill.writeCache('decode-o', [4], [4], 1)
    t.true(prefill.isConnected(HOST, decode.port))
    t.deepEqual(
      events.left.map((l) => l.name),
      [],
      'nobody left',
    )
  },
)

run('three members, the leader SIGKILLed mid-run: registration and the watch carry on', async (t) => {
  const etcd = await cluster(t, 3)
  const prefix = 'three'
  const registry = etcd.url(prefix)
  const prefill = await member(t, registry, 'prefill-3')
  const decode = await member(t, registry, 'decode-3', 'decode')
  const events = recorder(prefill)
  await prefill.connect('decode-3', { timeoutMs: ms(10_000) })
  const leases = [await leaseOf(etcd, prefix, 'prefill-3'), await leaseOf(etcd, prefix, 'decode-3')]

  const leader = await etcd.leader()
  await etcd.stop(leader, 'SIGKILL')
  t.log(`killed leader m${leader}`)
  // Keep-alives go on through the other members: past twice the TTL, the same leases hold.
  await sleep(TTL * 2000 + 500)
  t.deepEqual(
    (await prefill.instances()).map((i) => i.name),
    ['decode-3', 'prefill-3'],
  )
  t.deepEqual([await leaseOf(etcd, prefix, 'prefill-3'), await leaseOf(etcd, prefix, 'decode-3')], leases)
  await prefill.writeCache('decode-3', [0, 1], [2, 3], 0)

  // The watch still reports: one joins and leaves after the kill.
  const late = await member(t, registry, 'decode-late', 'decode')
  await until(t, () => events.joined.some((i) => i.name === 'decode-late'), ms(5000), 'decode-late joined')
  await late.close()
  await until(t, () => events.left.some((l) => l.name === 'decode-late'), ms(5000), 'decode-late left')
  t.false(events.left.some((l) => l.name === 'decode-3'))
  t.true(decode.stats().receivers >= 1)
})

run('kvtransfer instances (table, --json, --role) and doctor --registry, reachable and not', async (t) => {
  const etcd = await cluster(t)
  const registry = etcd.url('cli')
  await member(t, registry, 'prefill-c')
  const decode = await member(t, registry, 'decode-c', 'decode')

  const table = await cli(['instances', '--registry', registry])
  t.is(table.status, 0, table.err)
  const lines = table.out.trim().split('\n')
  t.regex(lines[0], /^NAME\s+ROLE\s+TP\s+LAYERS\s+BLOCKS\s+BLOCK BYTES\s+TRANSPORT\s+CONTROL\s+HOST\s+PID$/)
  t.regex(
    lines[1],
    new RegExp(
      `^decode-c\\s+decode\\s+0/1\\s+${LAYERS}\\s+${BLOCKS}\\s+${BLOCK_BYTES}\\s+\\S+\\s+${HOST}:${decode.port}\\s`,
    ),
  )
  t.regex(lines[2], /^prefill-c\s+prefill\s/)
  t.is(lines[3], `2 instances in ${registry}`)

  const json = await cli(['instances', '--json', '--role', 'decode'], { KVCACHE_REGISTRY: registry })
  t.is(json.status, 0, json.err)
  const listed = JSON.parse(json.out) as Instance[]
  t.deepEqual(
    listed.map((i) => [i.name, i.control.port]),
    [['decode-c', decode.port]],
  )

  const usage = await cli(['instances', '--registry', 'http://x'])
  t.is(usage.status, 2)
  t.regex(usage.err, /invalid --registry: "http:\/\/x" is not etcd:\/\/host:port/)

  const doctor = await cli(['doctor', '--registry', registry])
  t.is(doctor.status, 0, doctor.err)
  t.regex(doctor.out, new RegExp(`registry ${registry}: reachable, 2 live instances`))

  await etcd.stop(0)
  const down = await cli(['doctor', '--json'], { KVCACHE_REGISTRY: registry })
  t.is(down.status, 1)
  const report = JSON.parse(down.out) as { registry: { ok: boolean; text: string } }
  t.false(report.registry.ok)
  t.regex(report.registry.text, /NOT REACHABLE: registry .* is unavailable/)
  const unreadable = await cli(['instances', '--registry', registry])
  t.is(unreadable.status, 1)
  t.regex(unreadable.err, /is unavailable/)
})

run('connect(name) awaits an instance that joins later, and times out ERR_TIMEOUT naming the registry', async (t) => {
  const etcd = await cluster(t)
  const registry = etcd.url('later')
  const prefill = await member(t, registry, 'prefill-w')
  const timedOut = await t.throwsAsync(prefill.connect('decode-nobody', { timeoutMs: 300 }))
  t.is((timedOut as KvTransferError).code, 'ERR_TIMEOUT')
  t.regex(timedOut!.message, /no instance of that name is in registry etcd:\/\//)
  const connecting = prefill.connect('decode-w', { timeoutMs: ms(15_000) })
  await sleep(200)
  const decode = await member(t, registry, 'decode-w', 'decode')
  t.true(await connecting)
  t.true(prefill.isConnected(HOST, decode.port))
})

test('a registry that does not answer: the start fails ERR_REGISTRY_UNAVAILABLE at once', async (t) => {
  const port = await freePort()
  const started = Date.now()
  const error = await t.throwsAsync(member(t, `etcd://127.0.0.1:${port}/none`, 'prefill-u'))
  t.log(`refused after ${Date.now() - started} ms`)
  t.is((error as KvTransferError).code, 'ERR_REGISTRY_UNAVAILABLE', error?.message)
  t.regex(error!.message, new RegExp(`registry etcd://127.0.0.1:${port}/none is unavailable`))
})
