/**
 * comm.peerInfo(ip, port): the transport chosen with a peer and why; `auto` logs the
 * decision once per peer at info level (KVCACHE_LOG_LEVEL=info, without KVCACHE_DEBUG).
 */
import test from 'ava'
import { mkdtempSync, readFileSync, existsSync } from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { HOST, RDMACommunicator, TRANSPORT, ms } from './helpers.js'
import type { Transport } from '../lib/index.js'

// Read by the engine at its first log line (after this module ran): info lines land here.
const LOG = path.join(mkdtempSync(path.join(os.tmpdir(), 'kvt-info-')), 'info.log')
process.env.KVCACHE_DEBUG_FILE = LOG
process.env.KVCACHE_LOG_LEVEL = 'info'
delete process.env.KVCACHE_DEBUG

function make(role: 'prefill' | 'decode', transport: Transport) {
  return new RDMACommunicator({
    role,
    gpuIdx: 0,
    port: 0,
    localKeyCache: [Buffer.alloc(4 * 1024)],
    localValueCache: [],
    blockNumber: 4,
    blockBytes: 1024,
    transport,
    name: `${role}-info`,
    authToken: '',
  })
}

test.serial('auto: peerInfo says which transport and why; the decision is logged once per peer', async (t) => {
  const decode = make('decode', 'auto')
  const prefill = make('prefill', 'auto')
  t.teardown(() => Promise.all([decode.close(), prefill.close()]))
  await Promise.all([decode.ready, prefill.ready])
  t.is(prefill.peerInfo(HOST, decode.port), null, 'not connected yet')
  t.true(await prefill.connect(HOST, decode.port, { timeoutMs: ms(30_000) }))
  const info = prefill.peerInfo(HOST, decode.port)!
  t.truthy(info)
  t.true(info.connected)
  t.true(info.reason.startsWith(`${info.transport}: `), info.reason)
  if (info.transport === 'tcp') {
    t.regex(info.reason, /RDMA is not usable on this side \(.+\)|offered RDMA .* but the peer declined it/)
  } else {
    t.regex(info.reason, /both sides offered RDMA.*GID index \d+ .*MTU \d+, \d+ QPs/)
    t.truthy(info.details.device)
    t.truthy(info.details.gidIndex)
  }
  t.true(await prefill.connect(HOST, decode.port, { timeoutMs: ms(30_000) }))
  const key = `${HOST}:${decode.port}`
  const lines = existsSync(LOG)
    ? readFileSync(LOG, 'utf8')
        .split('\n')
        .filter((l) => l.includes(' info ') && l.includes(key))
    : []
  t.is(lines.length, 1, `one info line for ${key} after two connects: ${JSON.stringify(lines)}`)
  t.true(lines[0].includes(info.reason))
})

test.serial('an explicit transport says it was chosen explicitly, and is not logged', async (t) => {
  const decode = make('decode', TRANSPORT)
  const prefill = make('prefill', TRANSPORT)
  t.teardown(() => Promise.all([decode.close(), prefill.close()]))
  await Promise.all([decode.ready, prefill.ready])
  t.true(await prefill.connect(HOST, decode.port, { timeoutMs: ms(30_000) }))
  const info = prefill.peerInfo(HOST, decode.port)!
  t.is(info.transport, TRANSPORT)
  t.regex(info.reason, new RegExp(`^${TRANSPORT}: chosen explicitly`))
  if (TRANSPORT !== 'rdma') t.deepEqual(info.rails, [], 'rails are RDMA only')
  const key = `${HOST}:${decode.port}`
  const logged = existsSync(LOG) && readFileSync(LOG, 'utf8').includes(key)
  t.false(logged)
  await prefill.abortPeer(HOST, decode.port)
  t.false(prefill.peerInfo(HOST, decode.port)!.connected)
})

// Soft-RoCE VM only (the ava suite runs there with transport 'rdma'): one call, then its
// rail shows in peerInfo, metrics() and the Prometheus text with the same counters.
;(TRANSPORT === 'rdma' ? test.serial : test.skip)(
  'rdma: each rail shows in peerInfo, metrics() and metricsText',
  async (t) => {
    const decode = make('decode', 'rdma')
    const prefill = make('prefill', 'rdma')
    t.teardown(() => Promise.all([decode.close(), prefill.close()]))
    await Promise.all([decode.ready, prefill.ready])
    t.true(await prefill.connect(HOST, decode.port, { timeoutMs: ms(30_000) }))
    await prefill.writeCache(HOST, decode.port, [0, 1], [2, 3], 0)
    const info = prefill.peerInfo(HOST, decode.port)!
    const paired = info.rails.filter((r) => r.state !== 'refused')
    t.true(paired.length >= 1, JSON.stringify(info.rails))
    for (const rail of paired) {
      t.is(rail.state, 'healthy')
      t.truthy(rail.device)
      t.true(rail.port >= 1)
      t.truthy(rail.peerDevice)
      t.is(typeof rail.gidIndex, 'number')
      t.true(rail.gidReason.startsWith(`index ${rail.gidIndex}`), rail.gidReason)
      t.is(rail.failures, 0)
      t.is(rail.quarantines, 0)
      t.falsy(rail.reason)
    }
    // 2 blocks of 1 KiB (K only) landed, plus the flush read and no notice (untagged).
    const bytes = paired.reduce((n, r) => n + r.bytes, 0)
    t.true(bytes >= 2 * 1024, `${bytes} bytes on the rails`)
    t.true(paired.reduce((n, r) => n + r.wrs, 0) >= 1)
    const peer = prefill.metrics().peers.find((p) => p.peer === `${HOST}:${decode.port}`)!
    t.deepEqual(peer.rails, info.rails)
    const text = prefill.metricsText()
    for (const rail of paired) {
      const series = `{local="prefill-info",role="prefill",peer="${HOST}:${decode.port}",rail="${rail.device}",port="${rail.port}"}`
      t.true(text.includes(`kvtransfer_rdma_rail_bytes_total${series} ${rail.bytes}\n`), text)
      t.true(text.includes(`kvtransfer_rdma_rail_work_requests_total${series} ${rail.wrs}\n`), text)
      t.true(text.includes(`kvtransfer_rdma_rail_healthy${series} 1\n`), text)
    }
    t.false(decode.metricsText().includes('kvtransfer_rdma_rail_'), 'the receiving side has no rails of its own')
  },
)

test.serial("auto to a tcp-only acceptor: peerInfo carries the acceptor's reason for declining RDMA", async (t) => {
  const decode = make('decode', 'tcp')
  const prefill = make('prefill', 'auto')
  t.teardown(() => Promise.all([decode.close(), prefill.close()]))
  await Promise.all([decode.ready, prefill.ready])
  t.true(await prefill.connect(HOST, decode.port, { timeoutMs: ms(30_000) }))
  const info = prefill.peerInfo(HOST, decode.port)!
  t.is(info.transport, 'tcp')
  if (TRANSPORT === 'rdma') {
    // This side offered RDMA (the VM has it); the acceptor said why it took TCP instead.
    t.regex(
      info.reason,
      /^tcp: this side offered RDMA \(.+\) but the peer declined it: rdma: the acceptor uses only tcp \(its transport option or KVCACHE_TRANSPORT\)$/,
    )
  } else {
    // No RDMA here: only this side's reason; the acceptor passed nothing over.
    t.regex(info.reason, /^tcp: RDMA is not usable on this side \(.+\)$/)
  }
})
