/**
 * A registered peer HOST that vanishes silently (no FIN, no RST, no more keep-alives): the
 * decode process runs in a network namespace joined to this one by a veth pair, etcd and
 * the prefill side here; then the namespace's end of the pair is set down. The peer's lease
 * expires and its pending call must fail `ERR_PEER_DISCONNECTED` within TTL + 1 s, from the
 * registry (TCP's own liveness is switched off here: `KVCACHE_TCP_USER_TIMEOUT_MS=0`).
 * The registry case of the engine's `tests/netns_silent_peer.rs`.
 *
 * Needs root, `ip netns` and etcd (skips naming what is missing, or fails with
 * KVTRANSFER_REQUIRE_NETNS=1). Only the namespace and addresses it creates are used.
 */
import { execFileSync } from 'node:child_process'
import test from 'ava'
import { KvTransferError } from '../lib/index.js'
import type { InstanceLeft } from '../lib/index.js'
import { communicatorOnHostRegions } from '../lib/setup.js'
import { ETCD, EtcdCluster } from './etcd.js'
import { ms, spawnPeer, within } from './helpers.js'

const TTL = 2
const ID = process.pid % 100_000
const NS = `kvt-reg-${ID}`
const [HERE, THERE] = ['10.251.0.1', '10.251.0.2']
const [VETH_HERE, VETH_THERE] = [`kvr${ID}`, `kvs${ID}`]

const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] })

function missing(): string | undefined {
  // It builds namespaces and moves addresses: scripts/test-all.sh runs it alone, in its
  // netns step (with KVTRANSFER_REQUIRE_NETNS=1), not inside the whole ava run.
  if (process.env.KVTRANSFER_REQUIRE_NETNS === undefined) return 'runs alone in the netns step of scripts/test-all.sh'
  if (process.getuid?.() !== 0) return 'not root (network namespaces need it)'
  if (!('path' in ETCD)) return ETCD.missing
  try {
    ip('netns', 'list')
  } catch {
    return '`ip netns` is not available'
  }
  return undefined
}
const why = missing()
const required = process.env.KVTRANSFER_REQUIRE_NETNS === '1'
if (why && !required) console.log(`registry netns test skipped: ${why}`)

;(why && !required ? test.skip : test)(
  'registry: a peer host that vanishes silently leaves within TTL + 1 s; its pending call fails ERR_PEER_DISCONNECTED',
  async (t) => {
    if (why) return t.fail(`KVTRANSFER_REQUIRE_NETNS=1 but ${why}`)
    ip('netns', 'add', NS)
    t.teardown(() => ip('netns', 'del', NS)) // removes the veth pair with it
    ip('link', 'add', VETH_HERE, 'type', 'veth', 'peer', 'name', VETH_THERE, 'netns', NS)
    ip('addr', 'add', `${HERE}/24`, 'dev', VETH_HERE)
    ip('link', 'set', VETH_HERE, 'up')
    ip('-n', NS, 'addr', 'add', `${THERE}/24`, 'dev', VETH_THERE)
    ip('-n', NS, 'link', 'set', 'lo', 'up')
    ip('-n', NS, 'link', 'set', VETH_THERE, 'up')

    const etcd = await EtcdCluster.start(1, HERE)
    t.teardown(() => etcd.close())
    const registry = etcd.url('netns')
    // Only the registry may notice: no TCP user timeout, no keepalive probes (read at creation).
    process.env.KVCACHE_TCP_USER_TIMEOUT_MS = '0'
    const { comm: prefill } = communicatorOnHostRegions({
      role: 'prefill',
      layers: 1,
      fill: 'random',
      blockNumber: 8,
      blockBytes: 4096,
      transport: 'tcp',
      host: HERE,
      name: 'prefill-n',
      authToken: '',
      registry,
      registryTtlSeconds: TTL,
    })
    t.teardown(() => prefill.close())
    await prefill.ready
    const left: InstanceLeft[] = []
    prefill.on('instance-left', (gone) => left.push(gone))
    const decode = await spawnPeer(
      t,
      {
        layers: 1,
        blockNumber: 8,
        blockBytes: 4096,
        transport: 'tcp',
        host: THERE,
        name: 'decode-n',
        registry,
        registryTtlSeconds: TTL,
      },
      { netns: NS },
    )
    await prefill.connect('decode-n', { timeoutMs: ms(10_000) })
    await prefill.writeCache('decode-n', [0], [0], 0)

    ip('-n', NS, 'link', 'set', VETH_THERE, 'down')
    const vanished = Date.now()
    const outcome = prefill.writeCache('decode-n', [1, 2], [1, 2], 0, { timeoutMs: 0 }).then(
      () => undefined,
      (error: unknown) => error,
    )
    const error = await within(outcome, ms((TTL + 10) * 1000), 'the pending call')
    const elapsed = Date.now() - vanished
    t.log(`registry: pending call rejected after ${elapsed} ms (TTL ${TTL} s)`)
    t.true(error instanceof KvTransferError, String(error))
    t.is((error as KvTransferError).code, 'ERR_PEER_DISCONNECTED')
    t.regex((error as Error).message, /registry entry is gone/)
    t.true(elapsed <= ms(TTL * 1000 + 1000), `${elapsed} ms > TTL + 1 s`)
    t.deepEqual(
      left.map((l) => l.name),
      ['decode-n'],
    )
    await decode.kill()
  },
)
