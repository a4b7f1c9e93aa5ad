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

export function formatTable(report: BenchReport): string {
  const refName = { rdma: 'ib_write_bw', nvlink: 'link ceiling', tcp: 'TCP stream' }[report.options.transport]
  const header = ['block', 'GB/s', `${refName} GB/s`, 'ratio', 'blocks/s', 'calls/s', 'p50 ms', 'p99 ms', 'verified']
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
  ])
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)))
  const line = (cells: string[]) =>
    cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ')
  return [line(header), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(line)].join('\n')
}

/** A hand-written SVG line chart of GB/s against block size (log2 axis). */
export function renderSvg(report: BenchReport): string {
  const W = 760
  const H = 440
  const m = { left: 64, right: 24, top: 48, bottom: 56 }
  const results = report.results
  const refs = results.map((r) => r.referenceGbps ?? 0)
  const maxY = Math.max(0.1, ...results.map((r) => r.gbps), ...refs) * 1.15
  const xs = results.map((r) => Math.log2(r.blockBytes))
  const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)]
  const px = (x: number) => m.left + ((x - x0) / (x1 - x0)) * (W - m.left - m.right)
  const py = (y: number) => H - m.bottom - (y / maxY) * (H - m.top - m.bottom)
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
  const step = maxY > 8 ? 2 : maxY > 4 ? 1 : maxY > 1.5 ? 0.5 : 0.1
  for (let y = 0; y <= maxY; y += step) {
    parts.push(`<line x1="${m.left}" x2="${W - m.right}" y1="${py(y)}" y2="${py(y)}" stroke="#e5e5e5"/>`)
    parts.push(`<text x="${m.left - 8}" y="${py(y) + 4}" text-anchor="end">${y.toFixed(step < 1 ? 1 : 0)}</text>`)
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
  const refPoints = results.filter((r) => r.referenceGbps !== undefined)
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
    parts.push(`<text x="${x}" y="${py(r.gbps) - 9}" text-anchor="middle" fill="#1f77b4">${r.gbps.toFixed(2)}</text>`)
  }
  const refName = o.transport === 'rdma' ? 'ib_write_bw (perftest)' : 'plain TCP stream, same processes'
  const lx = W - m.right - 250
  parts.push(
    `<line x1="${lx}" x2="${lx + 24}" y1="${m.top + 8}" y2="${m.top + 8}" stroke="#1f77b4" stroke-width="2.5"/>`,
  )
  parts.push(`<text x="${lx + 30}" y="${m.top + 12}">kvtransfer writeCache</text>`)
  parts.push(
    `<line x1="${lx}" x2="${lx + 24}" y1="${m.top + 26}" y2="${m.top + 26}" stroke="#999" stroke-width="2" stroke-dasharray="6 4"/>`,
  )
  parts.push(`<text x="${lx + 30}" y="${m.top + 30}">${esc(refName)}</text>`)
  parts.push('</svg>')
  return `${parts.join('\n')}\n`
}
