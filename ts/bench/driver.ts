/**
 * The bench driver (prefill side): starts or reaches the agent, measures the reference
 * stream and every block size of the grid, and verifies the written blocks.
 */
import { fork } from 'node:child_process'
import { randomFillSync } from 'node:crypto'
import * as net from 'node:net'
import * as path from 'node:path'
import { peerCopyGbps } from '../../index.js'
import { RDMACommunicator } from '../index'
import { nativeAsync } from '../errors'
import { allocRegions, hostBuffers, type Region } from './regions'
import { type Agent, Channel } from './channel'
import {
  type BenchOptions,
  type BenchReport,
  type SizeResult,
  Progress,
  digest,
  formatSize,
  listen,
  machineInfo,
  percentile,
  permutation,
} from './common'
import { perftestReference } from './perftest'
import { shardLayout, shardOf, tpOptions } from './shards'

async function connectSocket(host: string, port: number, timeoutMs = 15_000): Promise<net.Socket> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    try {
      return await new Promise<net.Socket>((resolve, reject) => {
        const socket = net.connect({ host, port }, () => resolve(socket))
        socket.once('error', reject)
      })
    } catch (error) {
      if (Date.now() > deadline) throw error
      await new Promise((r) => setTimeout(r, 200))
    }
  }
}

export async function startAgent(options: BenchOptions): Promise<Agent> {
  if (options.connect) {
    const m = /^(.*):(\d+)$/.exec(options.connect)
    if (!m) throw new Error(`--connect expects host:port, got '${options.connect}'`)
    const host = m[1].replace(/^\[(.*)\]$/, '$1')
    const socket = await connectSocket(host, Number(m[2]))
    return { channel: new Channel(socket), host, describe: `agent at ${options.connect}` }
  }
  const cli = path.join(__dirname, '..', 'cli.js')
  const child = fork(cli, ['bench', '--listen', '0', '--agent-ipc'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  const port = await new Promise<number>((resolve, reject) => {
    child.once('message', (m: { port: number }) => resolve(m.port))
    child.once('exit', (code) => reject(new Error(`the bench agent exited with code ${code} before listening`)))
  })
  const socket = await connectSocket('127.0.0.1', port)
  return {
    channel: new Channel(socket),
    host: '127.0.0.1',
    child,
    describe: `forked agent (pid ${child.pid}) on loopback`,
  }
}

/**
 * A plain TCP stream from here into the agent for `ms` milliseconds, in 4 MiB writes. With
 * `walk`, the writes walk through the prefill regions and the agent reads into its decode
 * regions (the same memory traffic as a transfer); else both use one hot 4 MiB buffer.
 */
async function referenceStream(agent: Agent, ms: number, progress: Progress, prefill: Prefill, walk: boolean) {
  const chunkBytes = 4 * 2 ** 20
  const server = net.createServer()
  const port = await listen(server, 0, agent.child ? '127.0.0.1' : undefined)
  const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve))
  await agent.channel.call({ op: 'stream', port, host: agent.child ? '127.0.0.1' : undefined, walk })
  const socket = await accepted
  server.close()
  socket.setNoDelay(true)
  const slices = walk
    ? hostBuffers([...prefill.keys, ...prefill.values]).flatMap((r) =>
        Array.from({ length: Math.floor(r.length / chunkBytes) }, (_, i) =>
          r.subarray(i * chunkBytes, (i + 1) * chunkBytes),
        ),
      )
    : []
  if (slices.length === 0) slices.push(randomFillSync(Buffer.allocUnsafe(chunkBytes)))
  const start = process.hrtime.bigint()
  const deadline = start + BigInt(ms) * 1_000_000n
  let sent = 0
  while (process.hrtime.bigint() < deadline) {
    if (!socket.write(slices[(sent / chunkBytes) % slices.length])) await new Promise((r) => socket.once('drain', r))
    sent += chunkBytes
    const seconds = Number(process.hrtime.bigint() - start) / 1e9
    progress.update(`[reference] TCP stream  ${(sent / seconds / 1e9).toFixed(2)} GB/s`)
  }
  socket.end()
  const done = (await agent.channel.next()) as { bytes: number; seconds: number }
  const seconds = Number(process.hrtime.bigint() - start) / 1e9
  socket.destroy()
  progress.clear()
  return {
    gbps: done.bytes / seconds / 1e9,
    bytes: done.bytes,
    seconds,
    chunkBytes,
    note: walk
      ? 'node net stream between the same two processes, 4 MiB writes walking the prefill regions, 4 MiB reads walking the decode regions'
      : 'node net stream between the same two processes, 4 MiB writes from and reads into one hot 4 MiB buffer',
  }
}

interface Prefill {
  keys: Region[]
  values: Region[]
}

async function benchSize(
  agent: Agent,
  options: BenchOptions,
  prefill: Prefill,
  blockBytes: number,
  progress: Progress,
): Promise<SizeResult> {
  const label = formatSize(blockBytes).padStart(7)
  // `blockBytes` is what one block moves; with --tp the sides' blocks are larger (shards.ts).
  const shard = shardLayout(options.tp, blockBytes)
  const scaleShard = shardLayout(options.tp, options.scales)
  const setup = (await agent.channel.call({
    op: 'setup',
    blockBytes: shard.decodeBlockBytes,
    scaleBlockBytes: scaleShard.decodeBlockBytes,
    transport: options.transport,
    tp: tpOptions(options.tp, 'decode'),
    rows: shard.rows,
    piece: shard.piece,
  })) as { port: number; transport: string }
  const scaleRegions = () =>
    options.scales > 0 ? prefill.keys.map(() => Buffer.alloc(options.batch * scaleShard.prefillBlockBytes, 0x5a)) : []
  const localBlockBytes = shard.prefillBlockBytes
  const used = options.batch * localBlockBytes
  const comm = new RDMACommunicator({
    role: 'prefill',
    gpuIdx: options.srcGpu ?? 0,
    port: 0,
    localKeyCache: prefill.keys.map((r) => r.cache(used)),
    localValueCache: prefill.values.map((r) => r.cache(used)),
    keyScaleCache: scaleRegions(),
    valueScaleCache: scaleRegions(),
    scaleBlockBytes: scaleShard.prefillBlockBytes,
    blockNumber: options.batch,
    blockBytes: localBlockBytes,
    transport: options.transport,
    ...tpOptions(options.tp, 'prefill'),
  })
  try {
    await comm.connect(agent.host, setup.port)
    const local =
      options.pattern === 'scattered'
        ? permutation(options.batch)
        : Uint32Array.from({ length: options.batch }, (_, i) => i)
    const remote = options.pattern === 'scattered' ? permutation(options.batch) : local
    const prepared = options.prepared ? comm.prepareBlocks(agent.host, setup.port, local, remote) : undefined
    const call = (layer: number) =>
      prepared
        ? comm.writeCache(agent.host, setup.port, prepared, layer)
        : comm.writeCache(agent.host, setup.port, local, remote, layer)
    // Warm-up: every layer once (so every block verified below was written), plus extra calls.
    for (let layer = 0; layer < options.layers; layer++) await call(layer)
    for (let i = 0; i < options.warmup; i++) await call(i % options.layers)

    // Per-rail bytes (RDMA) of the timed calls: the counters after minus before.
    const railBytes = () =>
      (comm.peerInfo(agent.host, setup.port)?.rails ?? [])
        .filter((r) => r.state !== 'refused')
        .map((r) => ({ device: r.device, port: r.port, bytes: r.bytes }))
    const railsBefore = railBytes()
    // K and V, plus K-scale and V-scale with --scales.
    const bytesPerCall = options.batch * (blockBytes + options.scales) * 2
    const latencies: number[] = []
    let issued = 0
    let finished = 0
    const start = process.hrtime.bigint()
    const deadline = start + BigInt(options.durationMs) * 1_000_000n
    const more = () =>
      options.iterations !== undefined ? issued < options.iterations : process.hrtime.bigint() < deadline || issued < 3
    const lane = async () => {
      while (more()) {
        const layer = issued++ % options.layers
        const t0 = process.hrtime.bigint()
        await call(layer)
        latencies.push(Number(process.hrtime.bigint() - t0) / 1e6)
        finished++
        const seconds = Number(process.hrtime.bigint() - start) / 1e9
        progress.update(
          `[${label}] ${finished} calls  ${((finished * bytesPerCall) / seconds / 1e9).toFixed(2)} GB/s  ${seconds.toFixed(1)} s`,
        )
      }
    }
    await Promise.all(Array.from({ length: options.concurrency }, lane))
    const seconds = Number(process.hrtime.bigint() - start) / 1e9
    const rails = railBytes().map((r) => ({
      ...r,
      bytes: r.bytes - (railsBefore.find((b) => b.device === r.device && b.port === r.port)?.bytes ?? 0),
    }))
    progress.update(`[${label}] verifying`, true)

    // Verification: digests of (a sample of) the written blocks, compared by the agent.
    const samples: Array<[number, number, number, string]> = []
    const all = options.verify === 'full'
    const total = options.layers * 2 * options.batch
    const count = all ? total : Math.min(options.samples, total)
    const picked = all ? null : new Set<number>()
    while (picked && picked.size < count) picked.add(Math.floor(Math.random() * total))
    for (const index of picked ?? Array.from({ length: total }, (_, i) => i)) {
      const layer = Math.floor(index / (2 * options.batch))
      const kind = Math.floor(index / options.batch) % 2
      const i = index % options.batch
      const region = (kind === 0 ? prefill.keys : prefill.values)[layer]
      samples.push([
        layer,
        kind,
        remote[i],
        digest(shardOf(region, local[i], localBlockBytes, shard.rows, shard.piece)),
      ])
    }
    const verdict = (await agent.channel.call({ op: 'verify', samples })) as {
      checked: number
      mismatches: number
      detail: string[]
    }
    progress.clear()
    latencies.sort((a, b) => a - b)
    const bytes = finished * bytesPerCall
    return {
      blockBytes,
      calls: finished,
      bytes,
      seconds,
      gbps: bytes / seconds / 1e9,
      blocksPerSec: bytes / seconds / blockBytes,
      callsPerSec: finished / seconds,
      p50Ms: percentile(latencies, 50),
      p99Ms: percentile(latencies, 99),
      verified: { checked: verdict.checked, mismatches: verdict.mismatches, detail: verdict.detail },
      ...(rails.length > 0 ? { rails } : {}),
    }
  } finally {
    await comm.close()
  }
}

/** Runs the grid against a forked or remote agent; resolves with the report. */
export async function runBench(options: BenchOptions): Promise<BenchReport> {
  const progress = new Progress(options.progress)
  const agent = await startAgent(options)
  try {
    const largest = shardLayout(options.tp, Math.max(...options.sizes))
    progress.update('[setup] allocating regions', true)
    const init = (await agent.channel.call({
      op: 'init',
      layers: options.layers,
      blocks: options.batch,
      maxBlockBytes: largest.decodeBlockBytes,
      gpu: options.dstGpu,
    })) as { host: string }
    const bytes = options.batch * largest.prefillBlockBytes
    const prefill: Prefill = {
      keys: allocRegions(options.layers, bytes, options.srcGpu, true),
      values: allocRegions(options.layers, bytes, options.srcGpu, true),
    }
    const { progress: _progress, ...recorded } = options
    const report: BenchReport = {
      tool: 'kvtransfer bench',
      date: new Date().toISOString(),
      machine: machineInfo(),
      options: recorded,
      peer: options.connect ? `decode agent on ${init.host} (${options.connect})` : 'decode agent forked on loopback',
      reference: {},
      results: [],
      ok: true,
    }
    if (options.transport === 'nvlink') {
      progress.update('[setup] link ceiling (one 512 MiB device-to-device copy)', true)
      const src = options.srcGpu ?? 0
      const dst = options.dstGpu ?? 0
      report.reference.link = {
        gbps: await nativeAsync(peerCopyGbps(src, dst, 512 * 2 ** 20, 5)),
        bytes: 512 * 2 ** 20,
        note: `one cuMemcpyAsync of 512 MiB from GPU ${src} to GPU ${dst} (best of 5): the link's ceiling`,
      }
    } else if (options.transport === 'tcp') {
      if (options.streamMs > 0) {
        report.reference.streamHot = await referenceStream(agent, options.streamMs, progress, prefill, false)
        report.reference.stream = await referenceStream(agent, options.streamMs, progress, prefill, true)
      } else report.reference.skipped = 'reference stream disabled (--stream-ms 0)'
    } else {
      report.reference.perftest = []
    }
    for (const blockBytes of options.sizes) {
      if (options.transport === 'rdma') {
        // Reference and transfer back to back, per size.
        const [entry] = (await perftestReference(agent, options, progress, [blockBytes])) ?? []
        if (entry) report.reference.perftest?.push(entry)
        if (entry?.skipped && !report.reference.skipped)
          report.reference.skipped = `ib_write_bw reference skipped: ${entry.skipped}`
      }
      const result = await benchSize(agent, options, prefill, blockBytes, progress)
      const ref =
        options.transport === 'tcp'
          ? report.reference.stream?.gbps
          : options.transport === 'nvlink'
            ? report.reference.link?.gbps
            : report.reference.perftest?.find((p) => p.size === blockBytes)?.gbps
      if (ref !== undefined && ref > 0) {
        result.referenceGbps = ref
        result.ratio = result.gbps / ref
      }
      if (result.verified.mismatches > 0) report.ok = false
      report.results.push(result)
    }
    await agent.channel.call({ op: 'close' }).catch(() => undefined)
    for (const region of [...prefill.keys, ...prefill.values]) region.free()
    return report
  } finally {
    progress.clear()
    agent.channel.socket.end()
    if (agent.child) {
      const child = agent.child
      await new Promise<void>((resolve) => {
        if (child.exitCode !== null) return resolve()
        const timer = setTimeout(() => child.kill(), 5000)
        child.once('exit', () => {
          clearTimeout(timer)
          resolve()
        })
      })
    }
  }
}
