/**
 * A communicator's `name` becomes its peers' arrival `peer`, their metric label and a part of
 * log lines: at most 255 bytes of visible ASCII other than `"`, `'` and `\`. Any other is
 * refused at construction (ERR_INVALID_ARGUMENT) with the value shown escaped and the rule
 * stated; a peer sending one in the handshake is ERR_PROTOCOL (crates/engine/tests/names.rs).
 */
import test from 'ava'
import { RDMACommunicator, TRANSPORT, expectKvError } from './helpers.js'
import { metricsText, METRICS_SOURCE, type HasMetrics } from '../lib/metrics.js'
import type { CommunicatorOptions } from '../lib/index.js'
import type { NativeCounters } from '../index.js'

const options = (name: string): CommunicatorOptions => ({
  role: 'prefill',
  gpuIdx: 0,
  port: 0,
  localKeyCache: [Buffer.alloc(4096)],
  localValueCache: [],
  blockNumber: 4,
  blockBytes: 1024,
  transport: TRANSPORT,
  authToken: '',
  name,
})

const RULE = 'visible ASCII'
/** [name, how the message shows it]. */
const BAD: Array<[string, string]> = [
  ['has space', "'has space'"],
  ['say"hi"', `'say\\"hi\\"'`],
  ["it's", "'it\\'s'"],
  ['back\\slash', "'back\\\\slash'"],
  ['line\nforged', "'line\\nforged'"],
  ['\u001b[2Jclear', "'\\u{1b}[2Jclear'"],
  ['café', "'café'"],
]

for (const [name, shown] of BAD) {
  test(`name ${JSON.stringify(name)} is refused at construction, shown escaped`, async (t) => {
    for (const build of [() => new RDMACommunicator(options(name)), () => RDMACommunicator.create(options(name))]) {
      const error = await expectKvError(t, build, 'ERR_INVALID_ARGUMENT', ['name', shown, RULE])
      t.false(/[\u0000-\u001f\u007f]/.test(error?.message ?? ''), `one line, no control characters: ${error?.message}`)
    }
  })
}

test('name: 255 bytes of the allowed characters are taken, 256 are refused', async (t) => {
  await expectKvError(t, () => new RDMACommunicator(options('n'.repeat(256))), 'ERR_INVALID_ARGUMENT', [
    'name',
    '256 bytes given; at most 255',
  ])
  for (const name of ['n'.repeat(255), 'prefill-0.rack_7:5000/a@b[1]{x}=y;z~!#$%&()*+,<>?^`|']) {
    const comm = await RDMACommunicator.create(options(name))
    t.is(comm.metrics().name, name)
    await comm.close()
  }
})

test('the Prometheus text escapes label values (backslash, double quote, newline)', (t) => {
  const zero: NativeCounters = {
    bytesWritten: 0,
    bytesReceived: 0,
    blocksWritten: 0,
    callsSucceeded: 1,
    callsFailed: 0,
    failuresByCode: {},
    latencyBuckets: [1],
    latencySumUs: 5,
    latencyP50Ms: 0,
    latencyP99Ms: 0,
    noticesSent: 0,
    noticesReceived: 0,
    noticesDropped: 0,
    checksumMismatches: 0,
    reconnects: 0,
  }
  const none = { queuePairs: 0, completionQueues: 0, registeredBytes: 0 }
  const source: HasMetrics = {
    [METRICS_SOURCE]: () => ({
      native: {
        name: 'local"\\\nx',
        role: 'decode',
        total: zero,
        untracked: zero,
        peers: [
          { peer: 'p"\\\nq', transport: 'tcp', counters: zero, rails: [], resources: none },
          {
            peer: 'r:1',
            transport: 'rdma',
            counters: zero,
            resources: { queuePairs: 2, completionQueues: 0, registeredBytes: 4160 },
            rails: [
              {
                device: 'd"\\\ny',
                port: 1,
                peerDevice: 'rxe1',
                state: 'quarantined',
                gidIndex: 1,
                gid: '10.77.0.1/24 RoCE v2',
                gidReason: 'index 1',
                peerGid: '10.77.0.2/24 RoCE v2',
                speedMbps: 1000,
                bytes: 5,
                wrs: 2,
                failures: 1,
                quarantines: 1,
                rejoins: 0,
                answers: 0,
                strayAnswers: 0,
                reason: 'a work request failed',
              },
            ],
          },
        ],
        latencyBucketUpperUs: [Infinity],
        resources: none,
      },
      dropped: new Map(),
    }),
  }
  const text = metricsText([source])
  t.true(text.includes('local="local\\"\\\\\\nx"'), text)
  t.true(text.includes('peer="p\\"\\\\\\nq"'), text)
  t.true(
    text.includes(
      'kvtransfer_rdma_rail_bytes_total{local="local\\"\\\\\\nx",role="decode",peer="r:1",rail="d\\"\\\\\\ny",port="1"} 5',
    ),
    text,
  )
  t.true(
    text.includes(
      'kvtransfer_rdma_rail_healthy{local="local\\"\\\\\\nx",role="decode",peer="r:1",rail="d\\"\\\\\\ny",port="1"} 0',
    ),
    text,
  )
  for (const line of text.split('\n')) t.false(/^[xqy]/.test(line), line)
})
