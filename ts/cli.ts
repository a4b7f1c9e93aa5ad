#!/usr/bin/env node
/**
 * The `kvtransfer` command line. Subcommands: `bench`, `doctor`, `instances` and `serve` (see
 * `kvtransfer <command> --help`).
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { parseArgs } from 'node:util'
import {
  BenchOptions,
  DEFAULT_SIZES,
  type TpSetting,
  formatOverhead,
  formatSize,
  formatTable,
  parseBlockLayout,
  parseSizes,
  parseTp,
  renderSvg,
  runAgent,
  runBench,
  runOverhead,
} from './bench/index'
import { UsageError, integer } from './cli-args'
import { doctor, formatDoctor } from './doctor'
import { registryArgument, registryReport, runInstances } from './registry/command'
import { runServe } from './sidecar/command'
import { type SidecarStatus, formatSidecarStatus, sidecarStatus } from './sidecar/status'

const BENCH_HELP = `Usage: kvtransfer bench [options]

Measures writeCache throughput and call latency between two processes: this one (prefill)
and a decode agent, forked on loopback unless --connect is given.

Grid:
  --batch N            block ids per call, = blocks per region (default 1538)
  --sizes LIST         block sizes: 1K-256K (powers of two), 4K,64K, 65536 (default 1K-256K)
  --concurrency N      calls in flight (default 1)
  --layers N           layers, each with K and V regions (default 2)
  --scales BYTES       fp8 scale caches: K-scale and V-scale regions of BYTES per block (default 0: none);
                       GB/s counts K+V+scale bytes
  --tp P:D             tensor-parallel shards: prefill rank 0 of P writes to decode rank 0 of D (default 1:1);
                       a size is the bytes one block moves (the shard), so GB/s compare with 1:1 at that size
  --block-layout L     HND (head-major, default) | NHD:T (token-major, T token rows per block: one segment per row)
  --transport T        tcp | rdma | nvlink (default tcp)
  --src-gpu N          prefill regions in GPU N's memory (nvlink: default 0)
  --dst-gpu N          decode regions in GPU N's memory (nvlink: default 0; 1 for GPU0→GPU1)
  --pattern P          scattered (random permutations) | contiguous (default scattered)
  --contiguous         same as --pattern contiguous
  --prepared           plan the block list once (prepareBlocks) and write it per layer
  --duration SECONDS   timed run per size (default 2)
  --iterations N       timed calls per size (overrides --duration)
  --warmup N           extra untimed calls per size (default 2; every layer is written once anyway)
  --verify MODE        sample | full: digest compare at the end of each size (default sample)
  --samples N          blocks compared per size with --verify sample (default 512)

Reference:
  --stream-ms MS       plain TCP stream between the same processes (default 2000; 0 skips)
  --rdma-dev DEV       RDMA device for ib_write_bw (default: first of KVCACHE_RDMA_NICS)
  --gid-index N        GID index for ib_write_bw (default KVCACHE_RDMA_GID_INDEX, else 3)
  --perftest-iters N   ib_write_bw -n (default 5000; 0: no ib_write_bw reference)
  --perftest-port N    ib_write_bw -p (default 18515)
  (nvlink: the reference is one 512 MiB device-to-device copy between the two GPUs)

Two hosts:
  --listen PORT        run the decode agent on PORT (on the decode host)
  --connect HOST:PORT  drive an agent started with --listen (on the prefill host)

Other modes:
  --overhead           JS → native cost of one writeCache call with --batch ids

Output:
  --json FILE          write the report as JSON
  --svg FILE           draw GB/s against block size
  --quiet              no progress line on stderr

Exit status: 0 when every size verified, 1 on a data mismatch, 2 on a usage or setup error.
`

async function bench(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      batch: { type: 'string' },
      sizes: { type: 'string' },
      concurrency: { type: 'string' },
      layers: { type: 'string' },
      scales: { type: 'string' },
      tp: { type: 'string' },
      'block-layout': { type: 'string' },
      transport: { type: 'string' },
      'src-gpu': { type: 'string' },
      prepared: { type: 'boolean' },
      'dst-gpu': { type: 'string' },
      pattern: { type: 'string' },
      contiguous: { type: 'boolean' },
      duration: { type: 'string' },
      iterations: { type: 'string' },
      warmup: { type: 'string' },
      verify: { type: 'string' },
      samples: { type: 'string' },
      'stream-ms': { type: 'string' },
      'rdma-dev': { type: 'string' },
      'gid-index': { type: 'string' },
      'perftest-iters': { type: 'string' },
      'perftest-port': { type: 'string' },
      listen: { type: 'string' },
      connect: { type: 'string' },
      'agent-ipc': { type: 'boolean' },
      overhead: { type: 'boolean' },
      json: { type: 'string' },
      svg: { type: 'string' },
      quiet: { type: 'boolean', short: 'q' },
      help: { type: 'boolean', short: 'h' },
    },
  })
  if (values.help) {
    process.stdout.write(BENCH_HELP)
    return 0
  }
  if (values.listen !== undefined) {
    await runAgent(integer('listen', values.listen, 0, 0), values['agent-ipc'] === true)
    return 0
  }
  const transport = values.transport ?? 'tcp'
  if (transport !== 'tcp' && transport !== 'rdma' && transport !== 'nvlink')
    throw new UsageError(`--transport expects tcp, rdma or nvlink, got '${transport}'`)
  const gpu = (name: 'src-gpu' | 'dst-gpu') =>
    values[name] === undefined ? (transport === 'nvlink' ? 0 : undefined) : integer(name, values[name], 0, 0)
  const pattern = values.contiguous ? 'contiguous' : (values.pattern ?? 'scattered')
  if (pattern !== 'scattered' && pattern !== 'contiguous')
    throw new UsageError(`--pattern expects scattered or contiguous, got '${pattern}'`)
  const verify = values.verify ?? 'sample'
  if (verify !== 'sample' && verify !== 'full') throw new UsageError(`--verify expects sample or full, got '${verify}'`)
  let sizes = DEFAULT_SIZES
  try {
    if (values.sizes !== undefined) sizes = parseSizes(values.sizes)
  } catch (error) {
    throw new UsageError(`--sizes: ${(error as Error).message}`)
  }
  let tp: TpSetting
  try {
    tp = {
      ...parseTp(values.tp ?? '1:1'),
      tokensPerBlock: parseBlockLayout(values['block-layout'] ?? 'HND'),
    }
  } catch (error) {
    throw new UsageError(`--tp/--block-layout: ${(error as Error).message}`)
  }
  const duration = values.duration === undefined ? 2 : Number(values.duration)
  if (!(duration > 0)) throw new UsageError(`--duration expects seconds > 0, got '${values.duration}'`)
  const options: BenchOptions = {
    batch: integer('batch', values.batch, 1538),
    sizes,
    concurrency: integer('concurrency', values.concurrency, 1),
    layers: integer('layers', values.layers, 2),
    scales: integer('scales', values.scales, 0, 0),
    tp,
    transport,
    pattern,
    iterations: values.iterations === undefined ? undefined : integer('iterations', values.iterations, 1),
    durationMs: duration * 1000,
    warmup: integer('warmup', values.warmup, 2, 0),
    verify,
    samples: integer('samples', values.samples, 512),
    streamMs: integer('stream-ms', values['stream-ms'], 2000, 0),
    json: values.json,
    svg: values.svg,
    connect: values.connect,
    rdmaDevice: values['rdma-dev'],
    gidIndex: values['gid-index'] === undefined ? undefined : integer('gid-index', values['gid-index'], 3, 0),
    perftestIterations: integer('perftest-iters', values['perftest-iters'], 5000, 0),
    perftestPort: integer('perftest-port', values['perftest-port'], 18515),
    prepared: values.prepared === true,
    srcGpu: gpu('src-gpu'),
    dstGpu: gpu('dst-gpu'),
    progress: !values.quiet,
  }
  if ((options.srcGpu !== undefined || options.dstGpu !== undefined) && options.scales > 0)
    throw new UsageError('--scales with GPU regions (--src-gpu, --dst-gpu, nvlink) is not supported by the bench')
  const factor = Math.max(tp.prefill / tp.decode, tp.decode / tp.prefill)
  for (const size of sizes) {
    if (
      (size / Math.max(1, tp.tokensPerBlock)) % 1 !== 0 ||
      (options.scales / Math.max(1, tp.tokensPerBlock)) % 1 !== 0
    )
      throw new UsageError(`--block-layout NHD:${tp.tokensPerBlock}: size ${size} and --scales must be multiples of T`)
  }
  const maxBytes = options.batch * Math.max(...sizes) * factor
  if (maxBytes > 2 ** 32) throw new UsageError(`--batch × largest size = ${maxBytes} bytes per region; at most 4 GiB`)

  if (values.overhead) {
    const report = await runOverhead(options)
    console.log(
      `writeCache call overhead: ${report.batch} ids per call, ${report.machine.cpu} × ${report.machine.cores}`,
    )
    console.log(formatOverhead(report))
    if (options.json) fs.writeFileSync(options.json, `${JSON.stringify(report, null, 2)}\n`)
    return 0
  }

  const report = await runBench(options)
  const m = report.machine
  console.log(
    `kvtransfer bench: ${options.transport}, batch ${options.batch} ${options.pattern} ids${options.prepared ? ' (prepared)' : ''}, ${options.layers} layers × K+V, ` +
      (tp.prefill !== 1 || tp.decode !== 1 || tp.tokensPerBlock > 0
        ? `TP ${tp.prefill}:${tp.decode} ${tp.tokensPerBlock > 0 ? `NHD ${tp.tokensPerBlock} rows` : 'HND'} (sizes = bytes moved per block), `
        : '') +
      `${options.concurrency} in flight; ${report.peer}`,
  )
  console.log(`machine: ${m.cpu} × ${m.cores} cores, ${m.memoryGiB} GiB, ${m.kernel}, node ${m.node}`)
  const { stream, streamHot } = report.reference
  if (streamHot)
    console.log(`reference: plain TCP stream, hot 4 MiB buffers:             ${streamHot.gbps.toFixed(2)} GB/s`)
  if (stream)
    console.log(
      `reference: plain TCP stream walking the cache regions:     ${stream.gbps.toFixed(2)} GB/s (the ratio's reference)`,
    )
  if (report.reference.link)
    console.log(
      `reference: ${report.reference.link.note}: ${report.reference.link.gbps.toFixed(1)} GB/s (the ratio's reference)`,
    )
  if (options.srcGpu !== undefined || options.dstGpu !== undefined)
    console.log(
      `regions: prefill on GPU ${options.srcGpu ?? '-'}, decode on GPU ${options.dstGpu ?? '-'} (device memory)`,
    )
  if (report.reference.skipped) console.log(`reference: ${report.reference.skipped}`)
  for (const p of report.reference.perftest ?? []) {
    if (p.gbps !== undefined)
      console.log(`reference: ib_write_bw -s ${p.size}: ${(p.gbps * 1000).toFixed(1)} MB/s  [${p.raw ?? ''}]`)
    else console.log(`reference: ib_write_bw -s ${p.size}: ${p.skipped ?? 'no figure'}`)
  }
  const env = Object.entries(process.env).filter(
    ([k]) => k.startsWith('KVCACHE_RDMA') || k.startsWith('KVCACHE_BENCH') || k.startsWith('KVCACHE_CUDA'),
  )
  if (env.length > 0) console.log(`env: ${env.map(([k, v]) => `${k}=${v}`).join(' ')}`)
  console.log(formatTable(report))
  for (const r of report.results) {
    if (r.verified.mismatches > 0)
      console.log(`MISMATCH at ${formatSize(r.blockBytes)}: ${r.verified.detail.join('; ')}`)
  }
  if (options.json) fs.writeFileSync(options.json, `${JSON.stringify(report, null, 2)}\n`)
  if (options.svg) fs.writeFileSync(options.svg, renderSvg(report))
  return report.ok ? 0 : 1
}

const DOCTOR_HELP = `Usage: kvtransfer doctor [--json] [--transport NAME] [--gpu-idx N] [--sidecar PATH] [--registry URL]

What this host can do: RDMA devices, ports, GIDs (and the one kvtransfer picks), MTU,
relaxed ordering, dma-buf / peermem; GPUs with their peer-access matrix and the CUDA driver
version; the KVCACHE_* variables set (malformed ones with the error a communicator gets);
and every transport with whether it can be used here and why. Each transport is opened and
closed again exactly as a communicator opens it.

  --json               the report as JSON on stdout
  --transport NAME     exit status 1 unless NAME (e.g. rdma) can be used here
  --gpu-idx N          the gpuIdx to open the transports for (selects KVCACHE_RDMA_NICS' entry, and the NICs nearest that GPU; default 0)
  --sidecar PATH       also report on the sidecar (kvtransfer serve) listening on PATH: its
                       version, attached workers, their ports, transports and peers
  --registry URL       check that the etcd registry etcd://host:port[,host:port…]/prefix
                       answers (default: KVCACHE_REGISTRY, when set)

Exit status: 0; with --transport, 1 when that transport cannot be used; with --sidecar, 1
when no sidecar answers on PATH; 1 when a registry is configured and cannot be read; 2 on a
usage error.
`

async function runDoctor(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      json: { type: 'boolean' },
      transport: { type: 'string' },
      'gpu-idx': { type: 'string' },
      sidecar: { type: 'string' },
      registry: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  })
  if (values.help) {
    process.stdout.write(DOCTOR_HELP)
    return 0
  }
  const address = registryArgument(values.registry)
  const report = doctor({ gpuIdx: integer('gpu-idx', values['gpu-idx'], 0, 0) })
  const wanted = values.transport
  const names = report.transports.map((t) => t.name)
  if (wanted !== undefined && !names.includes(wanted))
    throw new UsageError(`--transport expects one of ${names.join(', ')}, got '${wanted}'`)
  let sidecar: SidecarStatus | { socket: string; error: string } | undefined
  if (values.sidecar !== undefined) {
    sidecar = await sidecarStatus(values.sidecar).catch((error: Error) => ({
      socket: values.sidecar!,
      error: error.message,
    }))
  }
  const registry = address && { url: address.url, ...(await registryReport(address)) }
  const json = { ...report, ...(sidecar && { sidecar }), ...(registry && { registry }) }
  process.stdout.write(values.json ? `${JSON.stringify(json, null, 2)}\n` : formatDoctor(report))
  if (registry && !values.json) process.stdout.write(`\n${registry.text}\n`)
  if (sidecar && !values.json)
    process.stdout.write(`\n${'error' in sidecar ? `sidecar: ${sidecar.error}\n` : formatSidecarStatus(sidecar)}`)
  const chosen = report.transports.find((t) => t.name === wanted)
  if (chosen && !values.json) process.stdout.write(`\n${chosen.usable ? 'OK' : 'NOT USABLE'}: ${chosen.reason}\n`)
  return (chosen && !chosen.usable) || (sidecar && 'error' in sidecar) || (registry && !registry.ok) ? 1 : 0
}

/** The version of this package (its package.json, next to lib/). */
function packageVersion(): string {
  const manifest = JSON.parse(fs.readFileSync(path.join(__dirname, '..', 'package.json'), 'utf8')) as {
    version?: unknown
  }
  return String(manifest.version)
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv
  if (command === 'bench') return bench(rest)
  if (command === 'doctor') return runDoctor(rest)
  if (command === 'serve') return runServe(rest)
  if (command === 'instances') return runInstances(rest)
  if (command === '--version' || command === '-V') {
    process.stdout.write(`${packageVersion()}\n`)
    return 0
  }
  if (command === undefined || command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(
      `Usage: kvtransfer <command>\n       kvtransfer --version\n\nCommands:\n  bench    transfer benchmark (kvtransfer bench --help)\n` +
        `  doctor   what this host can do: RDMA, GPUs, KVCACHE_* variables, usable transports (kvtransfer doctor --help)\n` +
        `  instances  the live instances of an etcd registry (kvtransfer instances --help)\n` +
        `  serve    the sidecar that PyTorch workers on this host attach their KV caches to (kvtransfer serve --help)\n\n` +
        `Options:\n  -V, --version  print the version of kvtransfer\n  -h, --help     this text\n`,
    )
    return command === undefined ? 2 : 0
  }
  process.stderr.write(`kvtransfer: unknown command '${command}' (try 'kvtransfer bench --help')\n`)
  return 2
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code
  },
  (error: unknown) => {
    const usage = error instanceof UsageError || (error as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')
    process.stderr.write(`kvtransfer: ${error instanceof Error ? error.message : String(error)}\n`)
    process.exitCode = 2
    if (!usage && process.env.KVCACHE_DEBUG) process.stderr.write(`${(error as Error).stack}\n`)
  },
)
