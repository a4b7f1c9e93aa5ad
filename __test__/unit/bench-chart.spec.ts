/**
 * `kvtransfer bench --svg` (ts/bench/report.ts): the y axis is chosen by scale, so that its
 * labels never overlap from 0.1 to 1,500 GB/s, and the legend names each transport's
 * reference (TCP: the plain stream; RDMA: ib_write_bw; NVLink: a device-to-device copy).
 */
import test from 'ava'
import type { BenchReport, BenchTransport, SizeResult } from '../../ts/bench/common'
import { formatTable, renderSvg, yAxis } from '../../ts/bench/report'

const SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256].map((k) => k * 1024)

/** A report of `transport` whose GB/s rise to `peak` over SIZES, with a reference at `ref` (or none). */
function report(transport: BenchTransport, peak: number, ref: number | undefined): BenchReport {
  const results: SizeResult[] = SIZES.map((blockBytes, i) => {
    const gbps = peak * (0.2 + (0.8 * i) / (SIZES.length - 1))
    return {
      blockBytes,
      calls: 100,
      bytes: 1e9,
      seconds: 1e9 / (gbps * 1e9),
      gbps,
      blocksPerSec: (gbps * 1e9) / blockBytes,
      callsPerSec: 100,
      p50Ms: 0.1,
      p99Ms: 0.2,
      ...(ref === undefined ? {} : { referenceGbps: ref, ratio: gbps / ref }),
      verified: { checked: 512, mismatches: 0, detail: [] },
    }
  })
  const reference: BenchReport['reference'] =
    ref === undefined
      ? { skipped: 'reference stream disabled (--stream-ms 0)' }
      : transport === 'nvlink'
        ? { link: { gbps: ref, bytes: 512 * 2 ** 20, note: 'one cuMemcpyAsync of 512 MiB' } }
        : transport === 'rdma'
          ? { perftest: SIZES.map((size) => ({ size, gbps: ref })) }
          : { stream: { gbps: ref, bytes: 1e9, seconds: 1, chunkBytes: 4 << 20, note: 'stream' } }
  return {
    tool: 'kvtransfer bench',
    date: '2026-12-07T00:00:00.000Z',
    machine: { hostname: 'h', cpu: 'cpu', cores: 2, memoryGiB: 8, kernel: 'Linux', node: 'v20' },
    options: {
      batch: 1538,
      sizes: SIZES,
      concurrency: 4,
      layers: 4,
      scales: 0,
      tp: { prefill: 1, decode: 1, tokensPerBlock: 0 },
      transport,
      pattern: 'scattered',
      durationMs: 2000,
      warmup: 2,
      verify: 'sample',
      samples: 512,
      streamMs: ref === undefined ? 0 : 1000,
      perftestIterations: 1000,
      perftestPort: 18515,
      prepared: false,
    },
    peer: 'decode agent forked on loopback',
    reference,
    results,
    ok: true,
  }
}

interface Text {
  x: number
  y: number
  anchor: string
  text: string
}

/** Every `<text x y>` of the chart (the rotated axis title has no x/y and is left out). */
function texts(svg: string): Text[] {
  return [...svg.matchAll(/<text ([^>]*)>([^<]*)<\/text>/g)].flatMap((m) => {
    const attr = (name: string) => new RegExp(`\\b${name}="([^"]*)"`).exec(m[1])?.[1]
    const [x, y] = [attr('x'), attr('y')]
    return x === undefined || y === undefined
      ? []
      : [{ x: Number(x), y: Number(y), anchor: attr('text-anchor') ?? 'start', text: m[2] }]
  })
}

/** The y axis labels: the right-aligned texts. */
function yLabels(svg: string) {
  return texts(svg)
    .filter((t) => t.anchor === 'end')
    .map((t) => ({ ...t, value: Number(t.text.replace(/,/g, '')) }))
}

/** All the chart's words, for what the legend may and may not say. */
function words(svg: string): string {
  return texts(svg)
    .map((t) => t.text)
    .join(' | ')
}

/** Peaks from a slow TCP loopback to NVLink on GB200 (with references above and below the peak). */
const SCALES: Array<[BenchTransport, number, number | undefined]> = [
  ['tcp', 0.1, 0.12],
  ['tcp', 0.35, undefined],
  ['tcp', 1.2, 1.6],
  ['tcp', 3.9, 2.5],
  ['tcp', 9, 11],
  ['rdma', 23, 24.5],
  ['rdma', 48, 49],
  ['nvlink', 215, 396],
  ['nvlink', 367, 396],
  ['nvlink', 700, 760],
  ['nvlink', 1200, 1500],
  ['nvlink', 1500, 1450],
]

for (const [transport, peak, ref] of SCALES) {
  test(`y labels at ${transport} scale (peak ${peak} GB/s, reference ${ref ?? 'none'}): few, distinct, evenly spaced`, (t) => {
    const labels = yLabels(renderSvg(report(transport, peak, ref)))
    const max = Math.max(peak, ref ?? 0)
    t.true(
      labels.length >= 4 && labels.length <= 9,
      `${labels.length} labels: ${labels.slice(0, 12).map((l) => l.text)}`,
    )
    t.is(new Set(labels.map((l) => l.text)).size, labels.length, 'no two labels read the same')
    t.is(labels[0].value, 0)
    t.true(labels.at(-1)!.value >= max, `the top label ${labels.at(-1)!.text} covers ${max}`)
    t.true(labels.at(-1)!.value <= max * 2, `the top label ${labels.at(-1)!.text} is not far above ${max}`)
    const step = labels[1].value - labels[0].value
    t.true(
      [1, 2, 5].some((f) => Math.abs(step / f / 10 ** Math.floor(Math.log10(step / f)) - 1) < 1e-9),
      `step ${step}`,
    )
    for (let i = 1; i < labels.length; i++) {
      t.true(Math.abs(labels[i].value - labels[i - 1].value - step) < step * 1e-6, `even step at ${labels[i].text}`)
      // 12 px text: at least two lines of it between label baselines (y grows downwards).
      t.true(labels[i - 1].y - labels[i].y >= 24, `${labels[i - 1].text} and ${labels[i].text} are apart`)
    }
    // Thousands are grouped, and no label carries more decimals than its step needs.
    for (const l of labels) {
      t.regex(l.text, /^\d{1,3}(,\d{3})*(\.\d+)?$/)
      if (l.value >= 1000) t.true(l.text.includes(','), l.text)
    }
  })
}

test('yAxis: a 1, 2 or 5 step; the labels need only the step decimals', (t) => {
  t.like(yAxis(0.108), { step: 0.02, decimals: 2 })
  t.like(yAxis(1.08), { step: 0.2, decimals: 1 })
  t.like(yAxis(4), { step: 0.5, decimals: 1 })
  t.like(yAxis(1296), { step: 200, top: 1400, ticks: 7, decimals: 0 })
  t.like(yAxis(0), { top: 1 })
  t.like(yAxis(Number.NaN), { top: 1 })
})

test('the legend names the reference of each transport', (t) => {
  const tcp = words(renderSvg(report('tcp', 2, 2.5)))
  t.regex(tcp, /reference: plain TCP stream between the same processes/)
  t.notRegex(tcp, /ib_write_bw|device-to-device/)
  const rdma = words(renderSvg(report('rdma', 24, 24.5)))
  t.regex(rdma, /reference: ib_write_bw \(perftest\)/)
  t.notRegex(rdma, /TCP|device-to-device/)
  const nvlink = words(renderSvg(report('nvlink', 367, 396)))
  t.regex(nvlink, /reference: one 512 MiB device-to-device copy \(cuMemcpyAsync\)/)
  t.notRegex(nvlink, /TCP|ib_write_bw/)
  // No reference measured: no reference line, and the legend says why.
  const none = renderSvg(report('tcp', 2, undefined))
  t.notRegex(words(none), /reference:/)
  t.regex(words(none), /reference stream disabled/)
  t.notRegex(none, /stroke-dasharray/)
})

test('point labels stay below the legend; the table names the same reference', (t) => {
  for (const [transport, peak, ref] of SCALES) {
    const svg = renderSvg(report(transport, peak, ref))
    const legendY = texts(svg).find((t) => t.text === 'kvtransfer writeCache')!.y
    const pointY = [...svg.matchAll(/<text x="[^"]+" y="([^"]+)" text-anchor="middle" fill="#1f77b4"[^>]*>/g)].map(
      (m) => Number(m[1]),
    )
    t.is(pointY.length, SIZES.length)
    // 12 px text: a point label's top (baseline - 12) below the legend's baseline.
    for (const y of pointY) t.true(y - 12 > legendY, `${transport} ${peak}: point label at ${y}, legend at ${legendY}`)
  }
  t.regex(formatTable(report('nvlink', 367, 396)).split('\n')[0], /D2D copy GB\/s/)
  t.regex(formatTable(report('tcp', 2, 2.5)).split('\n')[0], /TCP stream GB\/s/)
  t.regex(formatTable(report('rdma', 24, 24.5)).split('\n')[0], /ib_write_bw GB\/s/)
})
