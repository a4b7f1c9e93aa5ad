/**
 * The chaos run's counters, its summary and its gate. Pure bookkeeping: the supervisor
 * feeds it what it saw; nothing here touches processes.
 */
import type { BlockCounts, Failure } from './protocol.js'

export type Role = 'prefill' | 'decode'

/** Resources of one process incarnation, sampled from /proc by the supervisor. */
export interface Sample {
  at: number
  fds: number
  /** Open fds by kind (`socket`, `pipe`, `anon_inode:[eventfd]`, `file`). */
  fdKinds: Record<string, number>
  rssMiB: number
  threads: number
}

export interface Growth {
  process: string
  /** Seconds between the baseline (first moment connected to every peer) and the last sample. */
  seconds: number
  fds: number
  rssMiB: number
  threads: number
  /** Restarts of other processes it lived through after its baseline. */
  peerRestarts: number
  /** How the count of each kind of fd changed (kinds that did not change are left out). */
  fdKindGrowth: Record<string, number>
}

const percentile = (sorted: number[], p: number): number =>
  sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))]! : 0

function summarize(values: number[]) {
  const sorted = [...values].sort((a, b) => a - b)
  const round = (x: number) => Math.round(x)
  return {
    count: sorted.length,
    p50: round(percentile(sorted, 0.5)),
    p95: round(percentile(sorted, 0.95)),
    max: round(sorted[sorted.length - 1] ?? 0),
  }
}

export class Tally {
  calls = { ok: 0, failed: 0, aborted: 0 }
  failures: Record<string, number> = {}
  connects = { ok: 0, failed: 0 }
  connectFailures: Record<string, number> = {}
  untyped = 0
  untypedExamples: string[] = []
  verified = 0
  /** Calls that resolved OK while their bytes were not (all) there, or no arrival notice came. */
  falseSuccesses: string[] = []
  blocks: BlockCounts = { ok: 0, missing: 0, stale: 0, torn: 0, foreign: 0 }
  noArrival = 0
  /** OK calls whose receiver died before it could check them. */
  unverified = 0
  /** ...of which the call was issued after the receiver had been sent SIGKILL (one-sided delivery into a dying process). */
  okAfterKill = 0
  hangs: string[] = []
  crashes: string[] = []
  restarts: Record<Role, number> = { prefill: 0, decode: 0 }
  startMs: number[] = []
  recoveryMs: Record<Role, number[]> = { prefill: [], decode: [] }
  unrecovered: string[] = []
  growth: Growth[] = []

  failure(f: Failure, what: 'writeCache' | 'connect'): void {
    const counts = what === 'connect' ? this.connectFailures : this.failures
    counts[f.code] = (counts[f.code] ?? 0) + 1
    if (f.typed) return
    this.untyped++
    if (this.untypedExamples.length < 10) this.untypedExamples.push(`${what}: ${f.code}: ${f.message}`)
  }

  verdict(call: string, blocks: BlockCounts, arrived: boolean, detail: string | undefined): void {
    for (const k of Object.keys(blocks) as (keyof BlockCounts)[]) this.blocks[k] += blocks[k]
    const bad = blocks.missing + blocks.stale + blocks.torn + blocks.foreign
    if (!arrived) this.noArrival++
    if (bad || !arrived) this.falseSuccesses.push(`${call}: ${detail ?? ''}${arrived ? '' : ' (no arrival notice)'}`)
    else this.verified++
  }

  report(config: Record<string, unknown>, seconds: number, maxFdGrowth: number) {
    const problems: string[] = []
    if (this.falseSuccesses.length) problems.push(`${this.falseSuccesses.length} false successes`)
    if (this.hangs.length) problems.push(`${this.hangs.length} hangs`)
    if (this.untyped) problems.push(`${this.untyped} untyped failures`)
    if (this.crashes.length) problems.push(`${this.crashes.length} processes exited on their own`)
    if (this.unrecovered.length) problems.push(`not recovered after the chaos stopped: ${this.unrecovered.join(', ')}`)
    const fdWorst = this.growth.reduce((m, g) => Math.max(m, g.fds), 0)
    if (fdWorst > maxFdGrowth) problems.push(`fd growth ${fdWorst} > ${maxFdGrowth}`)
    if (this.verified === 0) problems.push('no call was verified')
    return {
      config,
      seconds,
      calls: { ...this.calls, perSecond: Math.round((this.calls.ok + this.calls.failed) / seconds) },
      failuresByCode: this.failures,
      connects: { ...this.connects, failuresByCode: this.connectFailures },
      untypedFailures: this.untyped,
      untypedExamples: this.untypedExamples,
      verification: {
        verified: this.verified,
        falseSuccesses: this.falseSuccesses.length,
        falseSuccessExamples: this.falseSuccesses.slice(0, 10),
        blocks: this.blocks,
        noArrivalNotice: this.noArrival,
        unverifiedReceiverDied: this.unverified,
        okAfterReceiverKilled: this.okAfterKill,
      },
      hangs: this.hangs,
      crashes: this.crashes,
      restarts: this.restarts,
      startMs: summarize(this.startMs),
      recoveryMs: { prefill: summarize(this.recoveryMs.prefill), decode: summarize(this.recoveryMs.decode) },
      unrecovered: this.unrecovered,
      growth: {
        maxFds: fdWorst,
        maxRssMiB: this.growth.reduce((m, g) => Math.max(m, g.rssMiB), 0),
        maxThreads: this.growth.reduce((m, g) => Math.max(m, g.threads), 0),
        bound: { fds: maxFdGrowth },
        processes: this.growth,
      },
      problems,
      passed: problems.length === 0,
    }
  }
}

export type Report = ReturnType<Tally['report']>

const codes = (counts: Record<string, number>) =>
  Object.entries(counts)
    .sort((a, b) => b[1] - a[1])
    .map(([c, n]) => `${c} ${n}`)
    .join(', ') || 'none'

/** The human-readable summary. */
export function formatReport(r: Report): string {
  const v = r.verification
  const rec = (s: Report['startMs']) => `n=${s.count} p50 ${s.p50} ms, p95 ${s.p95} ms, max ${s.max} ms`
  return [
    `chaos: ${r.config.transport}, ${r.config.prefills} prefill x ${r.config.decodes} decode, ${r.seconds.toFixed(0)} s, seed ${r.config.seed}`,
    `  calls: ${r.calls.ok} ok, ${r.calls.failed} failed (${r.calls.aborted} with their signal aborted), ${r.calls.perSecond}/s`,
    `  failures by code: ${codes(r.failuresByCode)}`,
    `  connects: ${r.connects.ok} ok, ${r.connects.failed} failed (${codes(r.connects.failuresByCode)})`,
    `  verified on the decode side: ${v.verified} calls, blocks ${JSON.stringify(v.blocks)}`,
    `  false successes: ${v.falseSuccesses} (no arrival notice: ${v.noArrivalNotice})`,
    ...v.falseSuccessExamples.map((e) => `    ${e}`),
    `  OK but unverifiable (receiver died first): ${v.unverifiedReceiverDied}, of which issued after its SIGKILL: ${v.okAfterReceiverKilled}`,
    `  hangs: ${r.hangs.length}${r.hangs.length ? ` (${r.hangs.slice(0, 5).join('; ')})` : ''}`,
    `  untyped failures: ${r.untypedFailures}${r.untypedFailures ? ` (${r.untypedExamples.slice(0, 3).join('; ')})` : ''}`,
    `  restarts: ${r.restarts.prefill} prefill, ${r.restarts.decode} decode; start ${rec(r.startMs)}`,
    `  recovery (kill -> first verified call): prefill ${rec(r.recoveryMs.prefill)}; decode ${rec(r.recoveryMs.decode)}`,
    `  growth after warm-up (worst process): fds ${r.growth.maxFds} (bound ${r.growth.bound.fds}), RSS ${r.growth.maxRssMiB.toFixed(1)} MiB, threads ${r.growth.maxThreads}`,
    ...(r.crashes.length ? [`  processes that exited on their own: ${r.crashes.slice(0, 5).join('; ')}`] : []),
    r.passed ? 'chaos: PASSED' : `chaos FAILED: ${r.problems.join('; ')}`,
  ].join('\n')
}
