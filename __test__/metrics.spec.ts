/**
 * comm.metrics() and comm.metricsText(): exact counts after known transfers and failures,
 * on both sides (both communicators in this process), and the Prometheus text parsed.
 */
import * as os from 'node:os'
import test, { type ExecutionContext } from 'ava'
import { HOST, RDMACommunicator, TRANSPORT, eventually, expectKvError, makePrefill, ms } from './helpers.js'
import { metricsText } from '../lib/index.js'

const LAYERS = 2
const BLOCKS = 8
const BLOCK_BYTES = 1024

/** A decode communicator on host regions (the default name, `hostname:port`, when `name` is undefined). */
async function makeDecode(t: ExecutionContext, name: string | undefined) {
  const decode = new RDMACommunicator({
    role: 'decode',
    gpuIdx: 0,
    port: 0,
    localKeyCache: Array.from({ length: LAYERS }, () => Buffer.alloc(BLOCKS * BLOCK_BYTES)),
    localValueCache: Array.from({ length: LAYERS }, () => Buffer.alloc(BLOCKS * BLOCK_BYTES)),
    blockNumber: BLOCKS,
    blockBytes: BLOCK_BYTES,
    transport: TRANSPORT,
    ...(name === undefined ? {} : { name }),
    authToken: '',
  })
  t.teardown(() => decode.close())
  await decode.ready
  return decode
}

/** A prefill communicator named `name`, connected to `decode`. */
async function connectedPrefill(t: ExecutionContext, decode: RDMACommunicator, name: string) {
  const prefill = makePrefill(t, { layers: LAYERS, blockNumber: BLOCKS, blockBytes: BLOCK_BYTES, name })
  t.true(await prefill.comm.connect(HOST, decode.port, { timeoutMs: ms(30_000) }))
  return prefill.comm
}

async function setup(t: ExecutionContext) {
  const decode = await makeDecode(t, 'decode-metrics')
  const prefill = await connectedPrefill(t, decode, 'prefill-metrics')
  return { decode, prefill, key: `${HOST}:${decode.port}` }
}

/** Two transfers (one tagged), three refusals (TS, engine, not connected); returns the expectations. */
async function traffic(t: ExecutionContext, prefill: RDMACommunicator, port: number) {
  await prefill.writeCache(HOST, port, [0, 1, 2], [3, 4, 5], 0)
  await prefill.writeCache(HOST, port, [5], [6], 1, { tag: 'req-1' })
  await expectKvError(
    t,
    () => prefill.writeCache(HOST, port, [0], [1], 'x' as unknown as number),
    'ERR_INVALID_ARGUMENT',
  )
  await expectKvError(t, () => prefill.writeCache(HOST, port, [BLOCKS], [1], 0), 'ERR_BLOCK_ID_OUT_OF_RANGE')
  await expectKvError(t, () => prefill.writeCache(HOST, 1, [0], [1], 0), 'ERR_NOT_CONNECTED')
}

test.serial('metrics(): exact counts on the writing and the receiving side', async (t) => {
  const { decode, prefill, key } = await setup(t)
  await traffic(t, prefill, decode.port)
  const m = prefill.metrics()
  t.is(m.name, 'prefill-metrics')
  t.is(m.role, 'prefill')
  t.is(m.bytesWritten, 4 * BLOCK_BYTES * 2, 'K and V of 4 blocks')
  t.is(m.blocksWritten, 4)
  t.is(m.callsSucceeded, 2)
  t.is(m.callsFailed, 3)
  t.deepEqual(m.failuresByCode, {
    ERR_INVALID_ARGUMENT: 1,
    ERR_BLOCK_ID_OUT_OF_RANGE: 1,
    ERR_NOT_CONNECTED: 1,
  })
  t.is(
    Object.values(m.failuresByCode).reduce((a, b) => a + b, 0),
    m.callsFailed,
  )
  t.is(m.latencyMs.count, 2)
  t.true(m.latencyMs.p50 > 0 && m.latencyMs.p99 >= m.latencyMs.p50)
  t.is(m.noticesSent, 1)
  t.is(m.reconnects, 0)
  const peer = m.peers.find((p) => p.peer === key)!
  t.truthy(peer, JSON.stringify(m.peers))
  t.is(peer.transport, TRANSPORT)
  t.is(peer.bytesWritten, 8192)
  t.is(peer.callsSucceeded, 2)
  t.is(peer.callsFailed, 2)
  t.deepEqual(peer.failuresByCode, { ERR_INVALID_ARGUMENT: 1, ERR_BLOCK_ID_OUT_OF_RANGE: 1 })
  // A peer never connected gets no counters of its own: the call counts in `untracked`.
  t.deepEqual(
    m.peers.map((p) => p.peer),
    [key],
  )
  t.deepEqual(m.untracked.failuresByCode, { ERR_NOT_CONNECTED: 1 })
  t.is(m.untracked.callsFailed, 1)
  t.is(m.untracked.callsSucceeded, 0)
  t.is(peer.callsFailed + m.untracked.callsFailed, m.callsFailed, 'totals are the peers plus untracked')

  // Receiving side: TCP counts every landed byte; RDMA only what tagged calls' notices announce.
  t.true(await eventually(() => decode.metrics().noticesReceived === 1, ms(10_000)))
  const d = decode.metrics()
  t.is(d.role, 'decode')
  t.is(d.bytesReceived, TRANSPORT === 'tcp' ? 8192 : 2048)
  t.is(d.noticesDropped, 0)
  t.is(d.callsSucceeded, 0)
  const writer = d.peers.find((p) => p.peer === 'prefill-metrics')!
  t.truthy(writer, JSON.stringify(d.peers))
  t.is(writer.transport, TRANSPORT)
  t.is(writer.bytesReceived, d.bytesReceived)
  t.is(writer.noticesReceived, 1)

  // A second connect to the same peer is a reconnect.
  t.true(await prefill.connect(HOST, decode.port, { timeoutMs: ms(30_000) }))
  t.is(prefill.metrics().reconnects, 1)
  t.is(prefill.metrics().peers.find((p) => p.peer === key)!.reconnects, 1)
})

test.serial(
  'metrics(): refusals before the engine (aborted signal, closed communicator) count under their codes',
  async (t) => {
    const { decode, prefill } = await setup(t)
    const controller = new AbortController()
    controller.abort()
    await expectKvError(
      t,
      () => prefill.writeCache(HOST, decode.port, [0], [0], 0, { signal: controller.signal }),
      'ERR_ABORTED',
    )
    await prefill.close()
    await expectKvError(t, () => prefill.writeCache(HOST, decode.port, [0], [0], 0), 'ERR_CLOSED')
    const m = prefill.metrics()
    t.deepEqual(m.failuresByCode, { ERR_ABORTED: 1, ERR_CLOSED: 1 })
    t.is(m.callsFailed, 2)
  },
)

test.serial('metrics(): calls that fail after submission count under the code they rejected with', async (t) => {
  const { decode, prefill } = await setup(t)
  await decode.close()
  const codes: Record<string, number> = {}
  for (let i = 0; i < 200 && Object.keys(codes).length === 0; i++) {
    // Writes to a closed peer: refused once the link is known broken, failed before that.
    const calls = Array.from({ length: 8 }, () => prefill.writeCache(HOST, decode.port, [0, 1, 2, 3], [0, 1, 2, 3], 0))
    for (const outcome of await Promise.allSettled(calls)) {
      if (outcome.status === 'rejected') {
        const code = (outcome.reason as { code: string }).code
        codes[code] = (codes[code] ?? 0) + 1
      }
    }
    if (Object.keys(codes).length === 0) await new Promise((r) => setTimeout(r, 20))
  }
  const m = prefill.metrics()
  t.true(m.callsFailed > 0, 'the closed peer failed some calls')
  t.deepEqual(m.failuresByCode, codes, 'every rejection counted under its code')
  t.is(m.latencyMs.count, m.callsSucceeded)
})

/** Parses the text exposition format: families (HELP/TYPE) and samples. */
function parse(text: string) {
  const types = new Map<string, string>()
  const helps = new Set<string>()
  const samples: Array<{ name: string; labels: Record<string, string>; value: number }> = []
  for (const line of text.split('\n')) {
    if (line === '') continue
    let m = /^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.+)$/.exec(line)
    if (m) {
      if (m[1] === 'TYPE') types.set(m[2], m[3])
      else helps.add(m[2])
      continue
    }
    m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line)
    if (!m) throw new Error(`not a sample line: ${line}`)
    const labels: Record<string, string> = {}
    for (const pair of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2]
    const value = m[3] === '+Inf' ? Infinity : Number(m[3])
    if (Number.isNaN(value)) throw new Error(`bad value: ${line}`)
    samples.push({ name: m[1], labels, value })
  }
  // Prometheus rejects a scrape with two samples of one name and label set.
  const seen = new Set<string>()
  for (const s of samples) {
    const id = `${s.name}${JSON.stringify(Object.entries(s.labels).sort(([a], [b]) => a.localeCompare(b)))}`
    if (seen.has(id)) throw new Error(`duplicate series: ${id}`)
    seen.add(id)
  }
  return { types, helps, samples }
}

type Sample = ReturnType<typeof parse>['samples'][number]

/** The samples of `name` whose labels include `labels` (a label given as undefined must be absent). */
function select(samples: Sample[], name: string, labels: Record<string, string | undefined>): Sample[] {
  return samples.filter(
    (s) =>
      s.name === name &&
      Object.entries(labels).every(([k, v]) => (v === undefined ? !(k in s.labels) : s.labels[k] === v)),
  )
}

test.serial('metricsText(): Prometheus text with counters, failures by code and a latency histogram', async (t) => {
  const { decode, prefill, key } = await setup(t)
  await traffic(t, prefill, decode.port)
  const text = prefill.metricsText()
  const { types, helps, samples } = parse(text)
  for (const [name, type] of types) {
    t.true(helps.has(name), `${name} has HELP`)
    t.true(name.startsWith('kvtransfer_'))
    if (type === 'counter') t.true(name.endsWith('_total'), name)
  }
  t.is(types.get('kvtransfer_bytes_written_total'), 'counter')
  t.is(types.get('kvtransfer_write_latency_seconds'), 'histogram')
  const one = (name: string, labels: Record<string, string | undefined>) => select(samples, name, labels)
  const mine = { local: 'prefill-metrics', peer: key, role: 'prefill', transport: TRANSPORT }
  t.is(one('kvtransfer_bytes_written_total', mine)[0].value, 8192)
  t.is(one('kvtransfer_calls_succeeded_total', mine)[0].value, 2)
  t.is(one('kvtransfer_calls_failed_total', { ...mine, code: 'ERR_BLOCK_ID_OUT_OF_RANGE' })[0].value, 1)
  // The call to a peer never connected: in the communicator's untracked series (no `peer`, no `transport`).
  const untracked = { local: 'prefill-metrics', role: 'prefill', peer: undefined, transport: undefined }
  t.is(one('kvtransfer_calls_failed_total', { ...untracked, code: 'ERR_NOT_CONNECTED' })[0].value, 1)
  t.is(one('kvtransfer_calls_succeeded_total', untracked)[0].value, 0)
  t.false(
    samples.some((s) => s.labels.peer === `${HOST}:1` || s.labels.transport === 'none'),
    'no series for the peer never connected',
  )
  t.is(one('kvtransfer_write_latency_seconds_count', untracked).length, 0, 'no histogram without a succeeded call')
  for (const s of samples) t.is(s.labels.local, 'prefill-metrics', `${s.name} has the local label`)
  const buckets = one('kvtransfer_write_latency_seconds_bucket', mine)
  t.true(buckets.length > 10)
  for (let i = 1; i < buckets.length; i++) t.true(buckets[i].value >= buckets[i - 1].value, 'cumulative')
  t.is(buckets.at(-1)!.labels.le, '+Inf')
  t.is(buckets.at(-1)!.value, 2)
  t.is(one('kvtransfer_write_latency_seconds_count', mine)[0].value, 2)
  t.true(one('kvtransfer_write_latency_seconds_sum', mine)[0].value > 0)
  // Several communicators render as one set of families.
  t.true(await eventually(() => decode.metrics().noticesReceived === 1, ms(10_000)))
  const both = parse(metricsText([prefill, decode]))
  t.is(both.types.size, types.size)
  t.is(text.split('# TYPE kvtransfer_bytes_written_total').length, 2)
  t.true(
    both.samples.some((s) => s.name === 'kvtransfer_notices_received_total' && s.labels.role === 'decode'),
    'the decode side is there too',
  )
})

/** Sums `name` by its `local` label (what `sum by (local) (...)` gives in PromQL). */
function sumByLocal(samples: Sample[], name: string): Map<string, number> {
  const sums = new Map<string, number>()
  for (const s of samples) if (s.name === name) sums.set(s.labels.local, (sums.get(s.labels.local) ?? 0) + s.value)
  return sums
}

test.serial('metricsText(): two communicators writing to one peer give distinct series (label local)', async (t) => {
  const decode = await makeDecode(t, 'decode-shared')
  const a = await connectedPrefill(t, decode, 'prefill-a')
  const b = await connectedPrefill(t, decode, 'prefill-b')
  await a.writeCache(HOST, decode.port, [0, 1], [0, 1], 0)
  await b.writeCache(HOST, decode.port, [2], [2], 0)
  await b.writeCache(HOST, decode.port, [3], [3], 1, { tag: 'b-1' })
  await expectKvError(t, () => a.writeCache(HOST, 1, [0], [1], 0), 'ERR_NOT_CONNECTED')
  await expectKvError(t, () => b.writeCache('no-such-host.invalid', 9, [0], [1], 0), 'ERR_NOT_CONNECTED')
  t.true(await eventually(() => decode.metrics().noticesReceived === 1, ms(10_000)))

  // parse() throws on two samples with one name and label set, which is what this gave before.
  const { samples } = parse(metricsText([a, b, decode]))
  const key = `${HOST}:${decode.port}`
  const written = select(samples, 'kvtransfer_bytes_written_total', { peer: key })
  t.deepEqual(
    written.map((s) => [s.labels.local, s.value]),
    [
      ['prefill-a', 2 * BLOCK_BYTES * 2],
      ['prefill-b', 2 * BLOCK_BYTES * 2],
    ],
  )
  for (const s of samples) t.truthy(s.labels.local, `${s.name} has the local label`)
  // Per communicator, the series add up to the totals of metrics().
  for (const [name, field] of [
    ['kvtransfer_bytes_written_total', 'bytesWritten'],
    ['kvtransfer_calls_succeeded_total', 'callsSucceeded'],
    ['kvtransfer_calls_failed_total', 'callsFailed'],
    ['kvtransfer_notices_received_total', 'noticesReceived'],
  ] as const) {
    const sums = sumByLocal(samples, name)
    for (const comm of [a, b, decode]) {
      const m = comm.metrics()
      t.is(sums.get(m.name) ?? 0, m[field], `${name} of ${m.name}`)
    }
  }
  // The decode side keys its writers by name: one series each.
  t.deepEqual(
    select(samples, 'kvtransfer_calls_succeeded_total', { local: 'decode-shared', peer: undefined }).length,
    1,
    'one untracked series for the decode side',
  )
  t.true(
    select(samples, 'kvtransfer_notices_received_total', { local: 'decode-shared', peer: 'prefill-b' })[0].value === 1,
  )
  // Refused calls to peers never connected create no peer series.
  t.false(samples.some((s) => s.labels.transport === 'none' || s.labels.peer?.includes('no-such-host')))
  t.is(
    select(samples, 'kvtransfer_calls_failed_total', {
      local: 'prefill-b',
      peer: undefined,
      code: 'ERR_NOT_CONNECTED',
    })[0].value,
    1,
  )
})

test.serial('metricsText(): communicators sharing a name, or listed twice, still give unique series', async (t) => {
  const decode = await makeDecode(t, undefined)
  const a = await connectedPrefill(t, decode, 'twin')
  const b = await connectedPrefill(t, decode, 'twin')
  await a.writeCache(HOST, decode.port, [0], [0], 0)
  await b.writeCache(HOST, decode.port, [1], [1], 0)
  const { samples } = parse(metricsText([a, b, a, decode]))
  t.deepEqual(
    select(samples, 'kvtransfer_calls_succeeded_total', { peer: `${HOST}:${decode.port}` }).map((s) => s.labels.local),
    ['twin', 'twin#2'],
  )
  // The default name is hostname:port, the bound port included.
  const local = `${os.hostname()}:${decode.port}`
  t.is(decode.metrics().name, local)
  t.true(select(samples, 'kvtransfer_bytes_received_total', { local }).length > 0)
})

test.serial('metrics(): many refused calls to peers never connected create no per-peer entries', async (t) => {
  const { prefill } = await setup(t)
  for (let port = 1; port <= 50; port++) {
    await expectKvError(t, () => prefill.writeCache(HOST, port, [0], [0], 0), 'ERR_NOT_CONNECTED')
  }
  await expectKvError(t, () => prefill.writeCache(HOST, 'x' as unknown as number, [0], [0], 0), 'ERR_INVALID_ARGUMENT')
  const m = prefill.metrics()
  t.is(m.peers.length, 1)
  t.is(m.untracked.callsFailed, 51)
  t.is(m.callsFailed, 51)
  const { samples } = parse(prefill.metricsText())
  t.is(select(samples, 'kvtransfer_calls_succeeded_total', {}).length, 2, 'the connected peer and the untracked rest')
})
