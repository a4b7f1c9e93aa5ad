/**
 * The bench report as a text table and as an SVG chart.
 */
import { type BenchReport, formatSize } from './common'

function fmt(value: number | undefined, digits: number): string {
  return value === undefined || !Number.isFinite(value) ? '-' : value.toFixed(digits)
}

function fmtCount(value: number): string {
  if (value >= 1e6) return `${(value / 1e6).toFixed(2)} M`
  if (value >= 1e3) return `${(value / 1e3).toFixed(1)} k`
  return value.toFixed(0)
}

/** What a transport's ratio is measured against: a short name (table) and a long one (chart legend). */
export function referenceName(report: Pick<BenchReport, 'options' | 'reference'>): { short: string; long: string } {
  switch (report.options.transport) {
    case 'rdma':
      return { short: 'ib_write_bw', long: 'ib_write_bw (perftest), same block size' }
    case 'nvlink': {
      const bytes = report.reference.link?.bytes
      const size = bytes === undefined ? '' : ` ${formatSize(bytes)}`
      return { short: 'D2D copy', long: `one${size} device-to-device copy (cuMemcpyAsync)` }
    }
    default:
      return { short: 'TCP stream', long: 'plain TCP stream between the same processes' }
  }
}

/** `rxe0:1 302.38 MB 50.1 %, rxe1:1 301.10 MB 49.9 %`: what each rail carried of the timed calls. */
function railShares(rails: Array<{ device: string; port: number; bytes: number }>): string {
  const total = rails.reduce((n, r) => n + r.bytes, 0)
  return rails
    .map(
      (r) =>
        `${r.device}:${r.port} ${fmtCount(r.bytes)}B ${total > 0 ? ((100 * r.bytes) / total).toFixed(1) : '0.0'} %`,
    )
    .join(', ')
}

export function formatTable(report: BenchReport): string {
  const withRails = report.results.some((r) => r.rails !== undefined)
  const header = [
    'block',
    'GB/s',
    `${referenceName(report).short} GB/s`,
    'ratio',
    'blocks/s',
    'calls/s',
    'p50 ms',
    'p99 ms',
    'verified',
    ...(withRails ? ['rails (bytes, share)'] : []),
  ]
  const rows = report.results.map((r) => [
    formatSize(r.blockBytes),
    fmt(r.gbps, 2),
    fmt(r.referenceGbps, 2),
    fmt(r.ratio, 2),
    fmtCount(r.blocksPerSec),
    fmt(r.callsPerSec, 0),
    fmt(r.p50Ms, 2),
    fmt(r.p99Ms, 2),
    r.verified.mismatches === 0 ? `ok ${r.verified.checked}` : `FAIL ${r.verified.mismatches}/${r.verified.checked}`,
    ...(withRails ? [railShares(r.rails ?? [])] : []),
  ])
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)))
  const line = (cells: string[]) =>
    cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ')
  return [line(header), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(line)].join('\n')
}

/**
 * The y axis of a chart whose largest value is `max`: a step of 1, 2 or 5 × 10^k giving at
 * most `maxTicks` intervals, the top (a whole number of steps, at least `max`), and the
 * decimals a label needs at that step. (A fixed step drew dozens of overlapping labels at
 * NVLink's hundreds of GB/s.)
 */
export function yAxis(max: number, maxTicks = 8): { step: number; top: number; ticks: number; decimals: number } {
  const span = Number.isFinite(max) && max > 0 ? max : 1
  const raw = span / maxTicks
  const exponent = Math.floor(Math.log10(raw))
  const magnitude = 10 ** exponent
  const factor = [1, 2, 5, 10].find((f) => f * magnitude >= raw * (1 - 1e-9)) ?? 10
  const step = factor * magnitude
  const ticks = Math.max(1, Math.ceil(span / step - 1e-9))
  const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9))
  return { step, top: ticks * step, ticks, decimals }
}

/** `1500` → `1,500`; `0.25` with 2 decimals → `0.25`. */
export function formatAxisValue(value: number, decimals: number): string {
  return value.toLocaleString('en-US', { minimumFractionDigits: decimals, maximumFractionDigits: decimals })
}

/** A point's label: 2 to 4 significant digits (`0.077`, `0.77`, `3.66`, `12.4`, `367`, `1,184`). */
function formatPoint(gbps: number): string {
  return formatAxisValue(gbps, gbps >= 100 ? 0 : gbps >= 10 ? 1 : gbps >= 0.1 ? 2 : 3)
}

/** A hand-written SVG line chart of GB/s against block size (log2 axis). */
export function renderSvg(report: BenchReport): string {
  const W = 760
  const H = 460
  // The legend sits above the plot, under the title, so that no line runs through it.
  const m = { left: 72, right: 24, top: 80, bottom: 56 }
  const results = report.results
  const refPoints = results.filter((r) => r.referenceGbps !== undefined)
  const maxValue = Math.max(0, ...results.map((r) => r.gbps), ...refPoints.map((r) => r.referenceGbps ?? 0))
  // Headroom for the labels above the points.
  const axis = yAxis(maxValue * 1.08)
  const xs = results.map((r) => Math.log2(r.blockBytes))
  const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)]
  // The first and last points sit inset, so that their labels clear the y axis and the edge.
  const inset = 32
  const px = (x: number) => m.left + inset + ((x - x0) / (x1 - x0)) * (W - m.left - m.right - 2 * inset)
  const py = (y: number) => H - m.bottom - (y / axis.top) * (H - m.top - m.bottom)
  const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')
  const parts: string[] = []
  parts.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`,
  )
  parts.push(`<rect width="${W}" height="${H}" fill="white"/>`)
  const o = report.options
  parts.push(
    `<text x="${W / 2}" y="20" text-anchor="middle" font-size="14">${esc(
      `kvtransfer ${o.transport}: batch ${o.batch} ${o.pattern} ids, ${o.layers} layers K+V, ${o.concurrency} in flight`,
    )}</text>`,
  )
  parts.push(
    `<text x="${W / 2}" y="36" text-anchor="middle" fill="#666">${esc(`${report.machine.cpu}, ${report.machine.cores} cores, ${report.peer}`)}</text>`,
  )
  for (let i = 0; i <= axis.ticks; i++) {
    const y = py(i * axis.step)
    parts.push(`<line x1="${m.left}" x2="${W - m.right}" y1="${y}" y2="${y}" stroke="#e5e5e5"/>`)
    parts.push(
      `<text x="${m.left - 8}" y="${y + 4}" text-anchor="end">${formatAxisValue(i * axis.step, axis.decimals)}</text>`,
    )
  }
  for (const r of results) {
    const x = px(Math.log2(r.blockBytes))
    parts.push(`<line x1="${x}" x2="${x}" y1="${m.top}" y2="${H - m.bottom}" stroke="#f0f0f0"/>`)
    parts.push(
      `<text x="${x}" y="${H - m.bottom + 18}" text-anchor="middle">${esc(formatSize(r.blockBytes).replace(' ', ''))}</text>`,
    )
  }
  parts.push(`<line x1="${m.left}" x2="${W - m.right}" y1="${py(0)}" y2="${py(0)}" stroke="#333"/>`)
  parts.push(`<line x1="${m.left}" x2="${m.left}" y1="${m.top}" y2="${py(0)}" stroke="#333"/>`)
  parts.push(`<text x="${W / 2}" y="${H - 14}" text-anchor="middle">block size</text>`)
  parts.push(
    `<text transform="translate(18 ${(m.top + H - m.bottom) / 2}) rotate(-90)" text-anchor="middle">GB/s</text>`,
  )
  if (refPoints.length > 0) {
    const d = refPoints.map((r) => `${px(Math.log2(r.blockBytes))},${py(r.referenceGbps ?? 0)}`).join(' ')
    parts.push(`<polyline points="${d}" fill="none" stroke="#999" stroke-width="2" stroke-dasharray="6 4"/>`)
  }
  const d = results.map((r) => `${px(Math.log2(r.blockBytes))},${py(r.gbps)}`).join(' ')
  parts.push(`<polyline points="${d}" fill="none" stroke="#1f77b4" stroke-width="2.5"/>`)
  for (const r of results) {
    const x = px(Math.log2(r.blockBytes))
    const color = r.verified.mismatches === 0 ? '#1f77b4' : '#d62728'
    parts.push(`<circle cx="${x}" cy="${py(r.gbps)}" r="4" fill="${color}"/>`)
    // A white halo under the label (a copy drawn first, as not every renderer knows
    // paint-order) keeps it readable where it crosses the reference line.
    const at = `x="${x}" y="${py(r.gbps) - 9}" text-anchor="middle"`
    parts.push(
      `<text ${at} fill="white" stroke="white" stroke-width="3">${formatPoint(r.gbps)}</text>`,
      `<text ${at} fill="#1f77b4">${formatPoint(r.gbps)}</text>`,
    )
  }
  // Legend: one row under the title; the reference only when the report has one.
  const ly = 58
  parts.push(
    `<line x1="${m.left}" x2="${m.left + 24}" y1="${ly}" y2="${ly}" stroke="#1f77b4" stroke-width="2.5"/>`,
    `<text x="${m.left + 30}" y="${ly + 4}">kvtransfer writeCache</text>`,
  )
  const lx = m.left + 200
  if (refPoints.length > 0) {
    parts.push(
      `<line x1="${lx}" x2="${lx + 24}" y1="${ly}" y2="${ly}" stroke="#999" stroke-width="2" stroke-dasharray="6 4"/>`,
      `<text x="${lx + 30}" y="${ly + 4}">${esc(`reference: ${referenceName(report).long}`)}</text>`,
    )
  } else {
    const why = report.reference.skipped ?? 'no reference measured'
    const shown = why.length > 68 ? `${why.slice(0, 67)}…` : why
    parts.push(`<text x="${lx}" y="${ly + 4}" fill="#666">${esc(shown)}</text>`)
  }
  parts.push('</svg>')
  return `${parts.join('\n')}\n`
}
