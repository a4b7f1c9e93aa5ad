/**
 * Timeouts and cancellation, authentication, concurrent writers and the soak run, across
 * two real processes.
 */
import { execFile } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import test from 'ava'
import {
  HOST,
  Mirror,
  SCALE,
  TRANSPORT,
  assertPeerMatches,
  connect,
  eventually,
  expectKvError,
  makePrefill,
  ms,
  quietMs,
  pick,
  sleep,
  spawnPeer,
  within,
} from './helpers.js'

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url))
/** A stopped process still gets RDMA writes (the NIC does them): only TCP can stall it. */
const tcpOnly = TRANSPORT === 'tcp' ? test.serial : test.serial.skip

/** One call of 64 blocks × 256 KiB × K+V = 32 MiB: more than the socket buffers hold. */
const BIG = { layers: 1, blockNumber: 64, blockBytes: 256 * 1024 }
const ALL = Array.from({ length: 64 }, (_, i) => i)

tcpOnly(
  'a writeCache that times out rejects with ERR_TIMEOUT after the link is torn down; none of its bytes land later',
  async (t) => {
    const peer = await spawnPeer(t, BIG)
    const other = await spawnPeer(t, { layers: 1, blockNumber: 8, blockBytes: BIG.blockBytes })
    const prefill = makePrefill(t, { ...BIG, writeTimeoutMs: 1000 })
    await connect(t, prefill, peer)
    await prefill.comm.connect(HOST, other.port, { timeoutMs: ms(30_000) })
    peer.child.kill('SIGSTOP')
    t.teardown(() => peer.child.kill('SIGCONT'))
    const started = Date.now()
    const error = await expectKvError(t, () => prefill.comm.writeCache(HOST, peer.port, ALL, ALL, 0), 'ERR_TIMEOUT', [
      'torn down',
    ])
    const took = Date.now() - started
    t.log(`rejected after ${took} ms: ${error?.message}`)
    t.true(took >= 1000 && took < ms(5000), `took ${took} ms`)
    t.false(prefill.comm.isConnected(HOST, peer.port))
    // Another peer keeps working meanwhile.
    await prefill.comm.writeCache(HOST, other.port, [1], [2], 0)
    // The stalled peer resumes: whatever of the call reached its socket must not be applied.
    peer.child.kill('SIGCONT')
    await sleep(quietMs(1000))
    const zero = new Mirror(prefill, BIG.blockNumber)
    await assertPeerMatches(t, peer, zero, 'memory of the peer after the timed-out call')
    // Reconnecting works and writes land again.
    await connect(t, prefill, peer)
    await prefill.comm.writeCache(HOST, peer.port, [3], [4], 0)
    t.true((await peer.bytes(0, 'K', 4)).equals(prefill.block(0, 'K', 3)))
  },
)

tcpOnly('aborting a writeCache (AbortSignal) rejects every pending call of that peer with ERR_ABORTED', async (t) => {
  const peer = await spawnPeer(t, BIG)
  const prefill = makePrefill(t, BIG)
  await connect(t, prefill, peer)
  peer.child.kill('SIGSTOP')
  t.teardown(() => peer.child.kill('SIGCONT'))
  const controller = new AbortController()
  const first = prefill.comm.writeCache(HOST, peer.port, ALL, ALL, 0, { signal: controller.signal })
  const second = prefill.comm.writeCache(HOST, peer.port, ALL, ALL, 0)
  await sleep(200)
  controller.abort()
  await expectKvError(t, () => within(first, ms(5000), 'aborted write'), 'ERR_ABORTED')
  await expectKvError(t, () => within(second, ms(5000), 'other write of the aborted link'), 'ERR_ABORTED')
  t.false(prefill.comm.isConnected(HOST, peer.port))
  // An already-aborted signal: nothing is sent.
  await expectKvError(
    t,
    () => prefill.comm.writeCache(HOST, peer.port, [0], [0], 0, { signal: controller.signal }),
    'ERR_ABORTED',
  )
  peer.child.kill('SIGCONT')
  await sleep(quietMs(500))
  await assertPeerMatches(t, peer, new Mirror(prefill, BIG.blockNumber), 'memory of the peer after the abort')
})

tcpOnly(
  "calls that settle together get their own outcomes: the aborted peer's reject, the healthy peer's resolve",
  async (t) => {
    const stalled = await spawnPeer(t, BIG)
    const healthy = await spawnPeer(t, { layers: 1, blockNumber: 8, blockBytes: BIG.blockBytes })
    const prefill = makePrefill(t, BIG)
    await connect(t, prefill, stalled)
    await prefill.comm.connect(HOST, healthy.port, { timeoutMs: ms(30_000) })
    stalled.child.kill('SIGSTOP')
    t.teardown(() => stalled.child.kill('SIGCONT'))
    // Interleaved: stalled, healthy, healthy, stalled, healthy, ...
    const calls = Array.from({ length: 12 }, (_, i) => {
      const toStalled = i % 3 === 0
      const port = toStalled ? stalled.port : healthy.port
      const ids = toStalled ? ALL : [i % 8]
      return {
        toStalled,
        outcome: prefill.comm.writeCache(HOST, port, ids, ids, 0).then(
          () => 'ok',
          (e) => e.code,
        ),
      }
    })
    await sleep(200)
    // The abort runs on a native thread while this thread is busy: the healthy calls and the
    // aborted ones all settle before JavaScript hears of any, interleaved.
    const aborted = prefill.comm.abortPeer(HOST, stalled.port)
    const busyUntil = Date.now() + 500
    while (Date.now() < busyUntil);
    t.true(await aborted)
    const outcomes = await Promise.all(calls.map((c) => within(c.outcome, ms(5000), 'call')))
    t.deepEqual(
      outcomes,
      calls.map((c) => (c.toStalled ? 'ERR_ABORTED' : 'ok')),
    )
  },
)

test.serial(
  'an abort that comes after the engine completed the call changes nothing: bystanders never reject, the link stays up',
  async (t) => {
    const shape = { layers: 1, blockNumber: 16, blockBytes: 4096 }
    const peer = await spawnPeer(t, shape)
    const prefill = makePrefill(t, shape)
    await connect(t, prefill, peer)
    const settle = (call: Promise<void>) =>
      call.then(
        () => 'ok',
        (e: { code?: string }) => e.code ?? String(e),
      )
    const counts = { tooLate: 0, abortedWhilePending: 0 }
    for (let round = 0; round < 200; round++) {
      const to = prefill.comm.peer(HOST, peer.port)
      const controller = new AbortController()
      const before = [settle(prefill.comm.writeCache(to, [round % 16], [round % 16], 0))]
      const call = settle(prefill.comm.writeCache(to, [1], [2], 0, { signal: controller.signal }))
      // Hold this thread for a varying while: the engine finishes the call meanwhile (its
      // outcome waits for this thread), then the signal aborts, before the promise settles.
      const until = performance.now() + (round % 5) * 0.5 * SCALE
      while (performance.now() < until);
      controller.abort()
      const after = [settle(prefill.comm.writeCache(to, [(round + 3) % 16], [(round + 3) % 16], 0))]
      const outcome = await within(call, ms(10_000), `round ${round}: the call with a signal`)
      const bystanders = await within(Promise.all([...before, ...after]), ms(10_000), `round ${round}: bystanders`)
      if (outcome === 'ok') {
        // The abort came too late: it must have no effect at all.
        counts.tooLate++
        t.deepEqual(bystanders, ['ok', 'ok'], `round ${round}: a bystander was hurt by a too-late abort`)
        t.true(prefill.comm.isConnected(HOST, peer.port), `round ${round}: the link was torn down by a too-late abort`)
      } else {
        // Aborted while pending in the engine: that is the abort working.
        t.is(outcome, 'ERR_ABORTED', `round ${round}`)
        counts.abortedWhilePending++
        if (!prefill.comm.isConnected(HOST, peer.port)) await connect(t, prefill, peer)
      }
    }
    t.log(counts)
    t.true(counts.tooLate >= 20, `the race was exercised: ${JSON.stringify(counts)}`)
    await prefill.comm.writeCache(HOST, peer.port, [4], [5], 0)
    t.true((await peer.bytes(0, 'K', 5)).equals(prefill.block(0, 'K', 4)))
  },
)

test.serial('connect and close take timeoutMs and signal', async (t) => {
  const peer = await spawnPeer(t, { layers: 1, blockNumber: 8, blockBytes: 1024 })
  const prefill = makePrefill(t, { layers: 1, blockNumber: 8, blockBytes: 1024 })
  const aborted = AbortSignal.abort()
  await expectKvError(t, () => prefill.comm.connect(HOST, peer.port, { signal: aborted }), 'ERR_ABORTED')
  await prefill.comm.connect(HOST, peer.port, { timeoutMs: ms(30_000), signal: new AbortController().signal })
  await prefill.comm.writeCache(HOST, peer.port, [1], [1], 0, {
    timeoutMs: ms(10_000),
    signal: new AbortController().signal,
  })
  // Nothing listens on a fresh port: the connect times out.
  const { freePort } = await import('./helpers.js')
  const silent = await freePort()
  const started = Date.now()
  await expectKvError(t, () => prefill.comm.connect(HOST, silent, { timeoutMs: 300 }), 'ERR_TIMEOUT')
  t.true(Date.now() - started < ms(5000))
  await prefill.comm.close({ timeoutMs: ms(10_000) })
  await expectKvError(t, () => prefill.comm.writeCache(HOST, peer.port, [1], [1], 0), 'ERR_CLOSED')
})

test.serial('auth: the same token connects; a missing or different token is refused with ERR_AUTH', async (t) => {
  const shape = { layers: 1, blockNumber: 8, blockBytes: 1024 }
  const peer = await spawnPeer(t, { ...shape, authToken: 'open sesame' })
  const good = makePrefill(t, { ...shape, authToken: 'open sesame' })
  await connect(t, good, peer)
  await good.comm.writeCache(HOST, peer.port, [1], [2], 0)
  t.true((await peer.bytes(0, 'K', 2)).equals(good.block(0, 'K', 1)))
  const none = makePrefill(t, shape)
  await expectKvError(t, () => none.comm.connect(HOST, peer.port, { timeoutMs: ms(10_000) }), 'ERR_AUTH', [
    'auth token',
  ])
  const wrong = makePrefill(t, { ...shape, authToken: 'open barley' })
  await expectKvError(t, () => wrong.comm.connect(HOST, peer.port, { timeoutMs: ms(10_000) }), 'ERR_AUTH', [
    'different auth tokens',
  ])
  t.false(wrong.comm.isConnected(HOST, peer.port))
  // A token only on the connecting side.
  const open = await spawnPeer(t, shape)
  await expectKvError(t, () => good.comm.connect(HOST, open.port, { timeoutMs: ms(10_000) }), 'ERR_AUTH', ['has none'])
  // Nothing was written by the refused sides.
  t.true((await peer.bytes(0, 'K', 5)).equals(Buffer.alloc(1024)))
})

test.serial('many concurrent writers to several peers keep the data exact', async (t) => {
  const shape = { layers: 2, blockNumber: 128, blockBytes: 4096 }
  const peers = await Promise.all([0, 1, 2].map(() => spawnPeer(t, shape)))
  const prefill = makePrefill(t, shape)
  for (const peer of peers) await connect(t, prefill, peer)
  const mirrors = peers.map(() => new Mirror(prefill, shape.blockNumber))
  const calls: Array<Promise<void>> = []
  // Distinct destination blocks per call, so the final memory does not depend on order.
  for (const [p, peer] of peers.entries()) {
    for (const layer of [0, 1]) {
      const remote = pick(shape.blockNumber, shape.blockNumber)
      for (let c = 0; c < 32; c++) {
        const dst = remote.slice(c * 4, c * 4 + 4)
        const src = pick(shape.blockNumber, 4)
        mirrors[p].apply(layer, src, dst)
        calls.push(prefill.comm.writeCache(HOST, peer.port, src, dst, layer, { tag: `p${p}-l${layer}-c${c}` }))
      }
    }
  }
  await within(Promise.all(calls), ms(60_000), `${calls.length} concurrent calls`)
  for (const [p, peer] of peers.entries()) await assertPeerMatches(t, peer, mirrors[p], `peer ${p}`)
})

test.serial('soak (reduced): RSS, file descriptors and threads stay bounded', async (t) => {
  const calls = process.env.KVTRANSFER_SOAK_CALLS ?? '20000'
  const cycles = process.env.KVTRANSFER_SOAK_CYCLES ?? '20'
  const output = await new Promise<string>((resolve, reject) => {
    execFile(
      'bash',
      ['scripts/soak.sh', '--calls', calls, '--cycles', cycles],
      { cwd: REPO_ROOT, timeout: ms(120_000) },
      (error, stdout, stderr) =>
        error ? reject(new Error(`${error.message}\n${stdout}\n${stderr}`)) : resolve(stdout),
    )
  })
  const line = output.split('\n').find((l) => l.startsWith('soak: '))
  t.truthy(line, output)
  t.log(line)
  const report = JSON.parse(line!.slice(6)) as { growth: { fds: number; threads: number; rssMiB: number } }
  t.true(report.growth.fds <= 4)
  t.true(report.growth.threads <= 4)
  t.true(await eventually(() => true, 1))
})

test.serial(
  'SIGKILL mid-batch: pending calls reject within the configured timeout, other peers keep working, the restarted peer reconnects',
  async (t) => {
    const shape = { layers: 2, blockNumber: 64, blockBytes: 64 * 1024 }
    const victim = await spawnPeer(t, shape)
    const survivor = await spawnPeer(t, shape)
    const writeTimeoutMs = ms(3000)
    const prefill = makePrefill(t, { ...shape, writeTimeoutMs })
    await connect(t, prefill, victim)
    await connect(t, prefill, survivor)
    const ids = Array.from({ length: shape.blockNumber }, (_, i) => i)
    const inflight: Array<Promise<unknown>> = []
    for (let round = 0; round < 8; round++) {
      for (const layer of [0, 1])
        inflight.push(
          prefill.comm.writeCache(HOST, victim.port, ids, ids, layer).then(
            () => 'ok',
            (e: unknown) => e,
          ),
        )
    }
    await victim.kill('SIGKILL')
    const killed = Date.now()
    const results = await within(Promise.all(inflight), writeTimeoutMs + ms(2000), 'calls pending at the SIGKILL')
    const took = Date.now() - killed
    const failures = results.filter((r) => r !== 'ok')
    t.log(
      `${results.length - failures.length} resolved before the death, ${failures.length} rejected; all settled ${took} ms after the kill`,
    )
    for (const failure of failures) {
      await expectKvError(t, () => Promise.reject(failure), [
        'ERR_PEER_DISCONNECTED',
        'ERR_IO',
        'ERR_RDMA_COMPLETION',
        'ERR_TIMEOUT',
      ])
    }
    t.true(
      await eventually(() => !prefill.comm.isConnected(HOST, victim.port), writeTimeoutMs + ms(2000)),
      'isConnected turns false',
    )
    // The surviving peer is served throughout.
    const mirror = new Mirror(prefill, shape.blockNumber)
    await prefill.comm.writeCache(HOST, survivor.port, [1, 2], [3, 4], 1)
    mirror.apply(1, [1, 2], [3, 4])
    await assertPeerMatches(t, survivor, mirror, 'surviving peer')
    t.true(prefill.comm.isConnected(HOST, survivor.port))
    // The restarted peer (same port) accepts a new connection.
    const again = await spawnPeer(t, { ...shape, port: victim.port })
    await connect(t, prefill, again)
    await prefill.comm.writeCache(HOST, again.port, [5], [6], 0)
    t.true((await again.bytes(0, 'K', 6)).equals(prefill.block(0, 'K', 5)))
  },
)
