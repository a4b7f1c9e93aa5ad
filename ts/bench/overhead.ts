/**
 * `kvtransfer bench --overhead`: the JS → native cost of one writeCache call.
 */
import { communicatorOnHostRegions } from '../setup'
import { type BenchOptions, Progress, machineInfo, percentile, permutation } from './common'
import { startAgent } from './driver'

export interface OverheadRow {
  case: string
  /** Microseconds per call: median and p99 over bursts (each burst's mean). */
  medianUs: number
  p99Us: number
  calls: number
  note: string
}

export interface OverheadReport {
  tool: 'kvtransfer bench --overhead'
  date: string
  machine: ReturnType<typeof machineInfo>
  batch: number
  blockBytes: number
  /** Layers per request in the plain-vs-prepared rows. */
  requestLayers: number
  rows: OverheadRow[]
}

/**
 * Measures the synchronous part of `writeCache` (TS wrapper, napi argument conversion,
 * validation of every id, planning, handing the job to the writer thread, creating the
 * Promise) for `batch` ids: the time from the call until it returns its Promise. Calls are
 * issued in bursts of 32 and then awaited, so the transfer (1-byte blocks, tiny) runs
 * outside the timed section. Also: calls refused after validating every id (the last id is
 * out of range), the full round trip of one call at a time, and a request of
 * `REQUEST_LAYERS` layers (the same ids for every layer, one call per layer, like
 * FastDeploy's cache messager) with plain calls vs one `prepareBlocks` and prepared calls
 * (the prepared request also split into its first call and the others, and issued one
 * call per 1 ms timer, as a model's layers come).
 */
/** Layers of one request in the plain-vs-prepared rows. */
const REQUEST_LAYERS = 60

export async function runOverhead(options: BenchOptions): Promise<OverheadReport> {
  const progress = new Progress(options.progress)
  const agent = await startAgent(options)
  const blockBytes = 1
  const burst = 32
  const rounds = options.iterations ?? 300
  const rows: OverheadRow[] = []
  /** Adds a row: the median and p99 of `samples` (µs per call). */
  const row = (name: string, samples: number[], calls: number, note: string) => {
    samples.sort((a, b) => a - b)
    rows.push({ case: name, medianUs: percentile(samples, 50), p99Us: percentile(samples, 99), calls, note })
  }
  const layers = Math.max(options.layers, REQUEST_LAYERS)
  try {
    await agent.channel.call({ op: 'init', layers, blocks: options.batch, maxBlockBytes: blockBytes })
    const setup = (await agent.channel.call({ op: 'setup', blockBytes, transport: options.transport })) as {
      port: number
    }
    const { comm } = communicatorOnHostRegions({
      role: 'prefill',
      layers,
      fill: 'random',
      blockNumber: options.batch,
      blockBytes,
      transport: options.transport,
    })
    try {
      await comm.connect(agent.host, setup.port)
      const host = agent.host
      const port = setup.port
      const scattered = [permutation(options.batch), permutation(options.batch)]
      const contiguous = Uint32Array.from({ length: options.batch }, (_, i) => i)
      const badRemote = Uint32Array.from(scattered[1])
      badRemote[badRemote.length - 1] = options.batch // out of range: refused after checking all
      const plainArray = Array.from(scattered[0])

      const measure = async (name: string, note: string, issue: () => Promise<void>) => {
        const perCall: number[] = []
        for (let round = 0; round < rounds + 10; round++) {
          const pending: Promise<void>[] = new Array(burst)
          const t0 = process.hrtime.bigint()
          for (let i = 0; i < burst; i++) pending[i] = issue()
          const t1 = process.hrtime.bigint()
          await Promise.allSettled(pending)
          if (round >= 10) perCall.push(Number(t1 - t0) / 1e3 / burst)
          progress.update(`[overhead] ${name} ${round}/${rounds + 10}`)
        }
        row(name, perCall, rounds * burst, note)
      }
      await measure(
        'Uint32Array, scattered ids',
        'sync part: wrapper + napi + validate + plan + hand-off + Promise',
        () => comm.writeCache(host, port, scattered[0], scattered[1], 0),
      )
      await measure('Uint32Array, contiguous ids', 'same, ids coalesce into one run', () =>
        comm.writeCache(host, port, contiguous, contiguous, 0),
      )
      await measure(
        'number[] (local), Uint32Array (remote)',
        'plain arrays are converted to Float64Array in TS first',
        () => comm.writeCache(host, port, plainArray, scattered[1], 0),
      )
      await measure(
        'refused after validating all ids',
        'last remote id out of range: includes building the error',
        () => comm.writeCache(host, port, scattered[0], badRemote, 0).catch(() => undefined),
      )
      // A request: the same ids for every layer, one call per layer; per layer call. With
      // `split`, also its first call (issued right after the previous request settled, on a
      // thread that waited for it) and the mean of the others, as rows of their own.
      const request = async (
        name: string,
        note: string,
        issue: (layer: number) => Promise<void>,
        split?: { first: string; rest: string },
      ) => {
        const perCall: number[] = []
        const firsts: number[] = []
        const rests: number[] = []
        for (let round = 0; round < rounds + 10; round++) {
          const pending: Promise<void>[] = new Array(REQUEST_LAYERS)
          const t0 = process.hrtime.bigint()
          pending[0] = issue(0)
          const tFirst = process.hrtime.bigint()
          for (let layer = 1; layer < REQUEST_LAYERS; layer++) pending[layer] = issue(layer)
          const t1 = process.hrtime.bigint()
          await Promise.allSettled(pending)
          if (round >= 10) {
            perCall.push(Number(t1 - t0) / 1e3 / REQUEST_LAYERS)
            firsts.push(Number(tFirst - t0) / 1e3)
            rests.push(Number(t1 - tFirst) / 1e3 / (REQUEST_LAYERS - 1))
          }
          progress.update(`[overhead] ${name} ${round}/${rounds + 10}`)
        }
        row(name, perCall, rounds * REQUEST_LAYERS, note)
        if (!split) return
        row(split.first, firsts, rounds, 'the call that starts a request, after awaiting the previous one')
        row(split.rest, rests, rounds * (REQUEST_LAYERS - 1), 'the calls that follow it in the same request')
      }
      await request(
        `${REQUEST_LAYERS} layers, plain (per layer call)`,
        'the same scattered Uint32Array ids for every layer: validated and planned on every call',
        (layer) => comm.writeCache(host, port, scattered[0], scattered[1], layer),
      )
      const prepared = comm.prepareBlocks(host, port, scattered[0], scattered[1])
      await request(
        `${REQUEST_LAYERS} layers, prepared (per layer call)`,
        'prepareBlocks once (not timed here), then writeCache(ip, port, prepared, layer)',
        (layer) => comm.writeCache(host, port, prepared, layer),
        {
          first: `${REQUEST_LAYERS} layers, prepared: first call of a request`,
          rest: `${REQUEST_LAYERS} layers, prepared: calls 2-${REQUEST_LAYERS} (per layer call)`,
        },
      )
      const peer = comm.peer(host, port)
      await request(
        `${REQUEST_LAYERS} layers, prepared, through a Peer (per layer call)`,
        'writeCache(peer, prepared, layer) with peer = comm.peer(ip, port): no per-call peer lookup',
        (layer) => comm.writeCache(peer, prepared, layer),
      )
      const preparedContiguous = comm.prepareBlocks(host, port, contiguous, contiguous)
      await request(
        `${REQUEST_LAYERS} layers, prepared contiguous ids (per layer call)`,
        'one run per call: the transfer threads barely compete with the issuing thread for CPU',
        (layer) => comm.writeCache(host, port, preparedContiguous, layer),
      )
      // Layer calls as a model issues them: one per layer, the thread asleep in between (a
      // 1 ms timer stands in for the layer's compute). Each call then starts on a thread
      // that waited, like the first call of a request above.
      const spaced: number[] = []
      const spacedRounds = Math.max(2, Math.round(rounds / 15))
      for (let round = 0; round < spacedRounds + 1; round++) {
        const pending: Promise<void>[] = new Array(REQUEST_LAYERS)
        for (let layer = 0; layer < REQUEST_LAYERS; layer++) {
          await new Promise((resolve) => setTimeout(resolve, 1))
          const t0 = process.hrtime.bigint()
          pending[layer] = comm.writeCache(host, port, prepared, layer)
          if (round >= 1) spaced.push(Number(process.hrtime.bigint() - t0) / 1e3)
        }
        await Promise.allSettled(pending)
        progress.update(`[overhead] spaced layer calls ${round}/${spacedRounds + 1}`)
      }
      row(
        `${REQUEST_LAYERS} layers, prepared, one call per 1 ms timer (per layer call)`,
        spaced,
        spacedRounds * REQUEST_LAYERS,
        'the thread sleeps between calls, as between the layers of a model',
      )
      const prepares: number[] = []
      for (let i = 0; i < rounds; i++) {
        const t0 = process.hrtime.bigint()
        comm.prepareBlocks(host, port, scattered[0], scattered[1])
        prepares.push(Number(process.hrtime.bigint() - t0) / 1e3)
      }
      row(
        'prepareBlocks (once per request)',
        prepares,
        rounds,
        "validate + plan the scattered ids once; amortized over the request's layers",
      )
      // One call at a time, awaited: the whole round trip of 1538 one-byte blocks.
      const rtts: number[] = []
      for (let i = 0; i < rounds; i++) {
        const t0 = process.hrtime.bigint()
        await comm.writeCache(host, port, scattered[0], scattered[1], 0)
        rtts.push(Number(process.hrtime.bigint() - t0) / 1e3)
        progress.update(`[overhead] round trip ${i}/${rounds}`)
      }
      row(
        'round trip, 1 in flight',
        rtts,
        rounds,
        'call → Promise resolved: includes the (tiny) transfer, the ACK and thread wake-ups',
      )
    } finally {
      await comm.close()
    }
    await agent.channel.call({ op: 'close' }).catch(() => undefined)
  } finally {
    progress.clear()
    agent.channel.socket.end()
  }
  return {
    tool: 'kvtransfer bench --overhead',
    date: new Date().toISOString(),
    machine: machineInfo(),
    batch: options.batch,
    blockBytes,
    requestLayers: REQUEST_LAYERS,
    rows,
  }
}

export function formatOverhead(report: OverheadReport): string {
  const header = ['case', 'median µs/call', 'p99 µs/call', 'calls']
  const rows = report.rows.map((r) => [r.case, r.medianUs.toFixed(2), r.p99Us.toFixed(2), String(r.calls)])
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)))
  const line = (cells: string[]) =>
    cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ')
  return [line(header), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(line)].join('\n')
}
