/**
 * The chaos supervisor: starts P prefill and D decode processes (prefill.ts, decode.ts),
 * SIGKILLs a random one every `killMinMs..killMaxMs` and starts it again, routes every
 * call that resolved OK to the decode process it was written to for verification, and
 * tallies what it sees (tally.ts). Samples every process's fds, RSS and threads from /proc.
 */
import { type ChildProcess, fork } from 'node:child_process'
import { readFileSync, readdirSync, readlinkSync } from 'node:fs'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'
import type { Transport } from '../../lib/index.js'
import {
  type BlockCounts,
  type DecodeAddress,
  type ToSupervisor,
  type ToWorker,
  type VerifyRequest,
  type WorkerConfig,
  now,
  random,
} from './protocol.js'
import { type Report, type Role, type Sample, Tally } from './tally.js'

export interface ChaosOptions {
  seconds: number
  transport: Transport
  host: string
  prefills: number
  decodes: number
  slots: number
  maxBlocks: number
  layers: number
  blockBytes: number
  timeoutMs: number
  connectTimeoutMs: number
  killMinMs: number
  killMaxMs: number
  abortRate: number
  lieRate: number
  seed: number
  /** Bound on the warm-up and on the recovery after the chaos stops. */
  settleMs: number
  maxFdGrowth: number
  /** Which processes may be killed: 'all', 'prefill' or 'decode'. */
  victims: string
  verbose: boolean
}

const ROOT = fileURLToPath(new URL('../..', import.meta.url))
const SCRIPT: Record<Role, string> = {
  prefill: fileURLToPath(new URL('./prefill.ts', import.meta.url)),
  decode: fileURLToPath(new URL('./decode.ts', import.meta.url)),
}
const other = (role: Role): Role => (role === 'prefill' ? 'decode' : 'prefill')

interface Proc {
  name: string
  role: Role
  index: number
  incarnation: number
  child: ChildProcess
  startedAt: number
  upAt?: number
  port?: number
  killedAt?: number
  exitedAt?: number
  log: string
  /** Peer index -> the peer incarnation with which a call of this process was verified. */
  peers: Map<number, number>
  baseline?: Sample
  last?: Sample
  peerRestartsSinceBaseline: number
  /** When the incarnation this one replaces was killed. */
  replacesKillAt?: number
  recovered: boolean
  drained: boolean
}

function sample(pid: number | undefined): Sample | undefined {
  if (pid === undefined) return undefined
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8')
    const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? 0)
    const fds = readdirSync(`/proc/${pid}/fd`)
    return {
      at: now(),
      fds: fds.length,
      fdKinds: fdKinds(pid, fds),
      rssMiB: kb('VmRSS') / 1024,
      threads: kb('Threads'),
    }
  } catch {
    return undefined
  }
}

/** Counts `fds` of process `pid` by kind: what a socket, pipe or anonymous inode is, or `file`. */
function fdKinds(pid: number, fds: string[]): Record<string, number> {
  const kinds: Record<string, number> = {}
  for (const fd of fds) {
    let target: string
    try {
      target = readlinkSync(`/proc/${pid}/fd/${fd}`)
    } catch {
      continue // closed meanwhile
    }
    const kind = /^(socket|pipe):/.exec(target)?.[1] ?? (target.startsWith('anon_inode:') ? target : 'file')
    kinds[kind] = (kinds[kind] ?? 0) + 1
  }
  return kinds
}

/** Per kind, `last` less `first`; kinds that did not change are left out. */
function kindGrowth(first: Record<string, number>, last: Record<string, number>): Record<string, number> {
  const growth: Record<string, number> = {}
  for (const kind of new Set([...Object.keys(first), ...Object.keys(last)])) {
    const change = (last[kind] ?? 0) - (first[kind] ?? 0)
    if (change !== 0) growth[kind] = change
  }
  return growth
}

export class Supervisor {
  private readonly procs: Record<Role, (Proc | undefined)[]> = { prefill: [], decode: [] }
  private readonly incarnations: Record<Role, number[]> = { prefill: [], decode: [] }
  /** Kill and exit times of every decode incarnation that ended, by `index.incarnation`. */
  private readonly ended = new Map<string, { killedAt?: number; exitedAt: number }>()
  private readonly pending = new Map<number, { request: VerifyRequest; prefill: Proc; localId: number }>()
  private readonly tally = new Tally()
  private readonly rand: () => number
  private nextId = 1
  private running = true

  constructor(private readonly options: ChaosOptions) {
    this.rand = random(options.seed)
  }

  private count(role: Role): number {
    return role === 'prefill' ? this.options.prefills : this.options.decodes
  }

  private live(): Proc[] {
    return [...this.procs.prefill, ...this.procs.decode].filter((p): p is Proc => !!p && p.exitedAt === undefined)
  }

  private spawn(role: Role, index: number, replacesKillAt?: number): void {
    const incarnation = (this.incarnations[role][index] = (this.incarnations[role][index] ?? 0) + 1)
    const o = this.options
    const config: WorkerConfig = {
      role,
      index,
      incarnation,
      transport: o.transport,
      host: o.host,
      prefills: o.prefills,
      decodes: o.decodes,
      layers: o.layers,
      blockBytes: o.blockBytes,
      slots: o.slots,
      maxBlocks: o.maxBlocks,
      timeoutMs: o.timeoutMs,
      connectTimeoutMs: o.connectTimeoutMs,
      abortRate: o.abortRate,
      lieRate: o.lieRate,
      seed: Math.floor(this.rand() * 0xffff_ffff),
    }
    const child = fork(SCRIPT[role], [], {
      cwd: ROOT,
      execArgv: ['--import', '@oxc-node/core/register'],
      env: { ...process.env, KVT_CHAOS_CONFIG: JSON.stringify(config) },
      serialization: 'advanced',
      stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
    })
    const proc: Proc = {
      name: `${role[0]}${index}.${incarnation}`,
      role,
      index,
      incarnation,
      child,
      startedAt: now(),
      log: '',
      peers: new Map(),
      peerRestartsSinceBaseline: 0,
      replacesKillAt,
      recovered: false,
      drained: false,
    }
    this.procs[role][index] = proc
    const keep = (chunk: Buffer) => {
      proc.log = (proc.log + chunk.toString()).slice(-4000)
      if (o.verbose) process.stderr.write(`[${proc.name}] ${chunk.toString()}`)
    }
    child.stdout?.on('data', keep)
    child.stderr?.on('data', keep)
    child.on('message', (message: ToSupervisor) => this.onMessage(proc, message))
    child.on('exit', (code, signal) => this.onExit(proc, code, signal))
  }

  private send(proc: Proc | undefined, message: ToWorker): void {
    if (proc && proc.exitedAt === undefined && proc.child.connected) proc.child.send(message, () => undefined)
  }

  private table(): DecodeAddress[] {
    const table: DecodeAddress[] = []
    // A killed decode keeps its last address until its successor is up: the prefills learn of
    // its death only from the engine, as they would in production.
    this.procs.decode.forEach((d, index) => {
      if (d?.port !== undefined) table[index] = { index, incarnation: d.incarnation, port: d.port }
    })
    return table
  }

  private onMessage(proc: Proc, m: ToSupervisor): void {
    const t = this.tally
    switch (m.kind) {
      case 'up':
        proc.upAt = now()
        t.startMs.push(proc.upAt - proc.startedAt)
        if (proc.role === 'decode') {
          proc.port = m.port
          const table = this.table()
          for (const p of this.procs.prefill) this.send(p, { kind: 'decodes', table })
        } else this.send(proc, { kind: 'decodes', table: this.table() })
        break
      case 'startup-error':
        proc.log += `\nstartup error: ${m.failure.code}: ${m.failure.message}`
        break
      case 'call':
        if (m.failure) {
          t.calls.failed++
          t.failure(m.failure, 'writeCache')
        } else t.calls.ok++
        if (m.aborted) t.calls.aborted++
        break
      case 'connect':
        if (m.failure) {
          t.connects.failed++
          t.failure(m.failure, 'connect')
        } else t.connects.ok++
        break
      case 'hang':
        t.hangs.push(
          `${proc.name}: ${m.what} to d${m.decode}.${m.decodeIncarnation} not settled after ${Math.round(m.waitedMs)} ms`,
        )
        break
      case 'verify':
        this.verify(proc, m)
        break
      case 'verdict':
        this.verdict(m.id, m.blocks, m.arrived, m.detail)
        break
      case 'drained':
        proc.drained = true
        break
    }
  }

  private callName(r: VerifyRequest): string {
    return `p${r.writer}.${r.writerIncarnation} call ${r.seq} -> d${r.decode}.${r.decodeIncarnation} layer ${r.layer} blocks [${r.remoteIds.join(',')}]`
  }

  /** A call whose receiver incarnation ended before it could be checked. */
  private receiverGone(request: VerifyRequest, end: { killedAt?: number; exitedAt: number }): void {
    this.tally.unverified++
    if (request.issuedAt > end.exitedAt)
      this.tally.falseSuccesses.push(
        `${this.callName(request)}: resolved OK though issued ${Math.round(request.issuedAt - end.exitedAt)} ms after its receiver had exited`,
      )
    else if (end.killedAt !== undefined && request.issuedAt > end.killedAt) this.tally.okAfterKill++
  }

  private verify(prefill: Proc, m: VerifyRequest): void {
    const decode = this.procs.decode[m.decode]
    const end = this.ended.get(`${m.decode}.${m.decodeIncarnation}`)
    if (!decode || decode.incarnation !== m.decodeIncarnation || decode.killedAt !== undefined) {
      // Killed (maybe not yet exited): its memory cannot be trusted to answer.
      this.receiverGone(m, end ?? { killedAt: decode?.killedAt, exitedAt: Infinity })
      this.send(prefill, { kind: 'verified', id: m.id })
      return
    }
    const id = this.nextId++
    this.pending.set(id, { request: m, prefill, localId: m.id })
    this.send(decode, { ...m, kind: 'verify', id })
  }

  private verdict(id: number, blocks: BlockCounts, arrived: boolean, detail: string | undefined): void {
    const entry = this.pending.get(id)
    if (!entry) return
    this.pending.delete(id)
    const { request: r, prefill, localId } = entry
    this.tally.verdict(this.callName(r), blocks, arrived, detail)
    const good = arrived && blocks.ok === r.remoteIds.length * 2
    const decode = this.procs.decode[r.decode]
    if (good && decode?.incarnation === r.decodeIncarnation) {
      this.connected(decode, r.writer, r.writerIncarnation)
      if (prefill === this.procs.prefill[r.writer]) this.connected(prefill, r.decode, r.decodeIncarnation)
    }
    this.send(prefill, { kind: 'verified', id: localId })
  }

  /** `proc` has a verified call with peer `index.incarnation`: recovery and baseline bookkeeping. */
  private connected(proc: Proc, index: number, incarnation: number): void {
    proc.peers.set(index, incarnation)
    if (!proc.recovered) {
      proc.recovered = true
      if (proc.replacesKillAt !== undefined) this.tally.recoveryMs[proc.role].push(now() - proc.replacesKillAt)
    }
    if (!proc.baseline && this.fullyConnected(proc)) proc.baseline = sample(proc.child.pid)
  }

  /** Whether `proc` has a verified call with the current incarnation of every peer. */
  private fullyConnected(proc: Proc): boolean {
    const peers = this.procs[other(proc.role)]
    for (let i = 0; i < this.count(other(proc.role)); i++) {
      const peer = peers[i]
      if (!peer || peer.killedAt !== undefined || proc.peers.get(i) !== peer.incarnation) return false
    }
    return true
  }

  private onExit(proc: Proc, code: number | null, signal: NodeJS.Signals | null): void {
    proc.exitedAt = now()
    if (proc.killedAt === undefined && this.running)
      this.tally.crashes.push(`${proc.name} exited (code ${code}, signal ${signal}): ${proc.log.trim().slice(-800)}`)
    if (proc.role === 'decode') {
      const end = { killedAt: proc.killedAt, exitedAt: proc.exitedAt }
      this.ended.set(`${proc.index}.${proc.incarnation}`, end)
      for (const [id, entry] of this.pending) {
        if (entry.request.decode !== proc.index || entry.request.decodeIncarnation !== proc.incarnation) continue
        this.pending.delete(id)
        this.receiverGone(entry.request, end)
        this.send(entry.prefill, { kind: 'verified', id: entry.localId })
      }
    }
    if (this.procs[proc.role][proc.index] === proc && this.running) {
      if (proc.killedAt !== undefined) this.tally.restarts[proc.role]++
      this.spawn(proc.role, proc.index, proc.killedAt ?? proc.exitedAt)
    }
  }

  private killOne(): void {
    const candidates = this.live().filter(
      (p) =>
        p.upAt !== undefined &&
        p.killedAt === undefined &&
        (this.options.victims === 'all' || this.options.victims === p.role),
    )
    const victim = candidates[Math.floor(this.rand() * candidates.length)]
    if (!victim) return
    victim.killedAt = now()
    for (const p of this.procs[other(victim.role)]) if (p?.baseline) p.peerRestartsSinceBaseline++
    victim.child.kill('SIGKILL')
  }

  private sampleAll(): void {
    for (const p of this.live()) p.last = sample(p.child.pid) ?? p.last
  }

  /** Waits (up to `settleMs`) until every process has a verified call with every current peer. */
  private async settle(): Promise<Proc[]> {
    const deadline = now() + this.options.settleMs
    let waiting = this.live()
    while (now() < deadline) {
      waiting = this.live().filter((p) => !this.fullyConnected(p) || !p.baseline)
      if (waiting.length === 0) break
      await sleep(100)
    }
    return waiting
  }

  async run(): Promise<Report> {
    const o = this.options
    for (let i = 0; i < o.decodes; i++) this.spawn('decode', i)
    for (let i = 0; i < o.prefills; i++) this.spawn('prefill', i)
    const sampler = setInterval(() => this.sampleAll(), 1000)
    const cold = await this.settle()
    if (cold.length) this.tally.unrecovered.push(...cold.map((p) => `${p.name} (warm-up)`))
    const started = now()
    const end = started + o.seconds * 1000
    while (cold.length === 0 && now() < end) {
      await sleep(Math.min(end - now(), o.killMinMs + this.rand() * (o.killMaxMs - o.killMinMs)))
      if (now() < end) this.killOne()
    }
    const seconds = (now() - started) / 1000
    const stuck = await this.settle()
    this.tally.unrecovered.push(...stuck.map((p) => p.name))
    await sleep(1000)
    this.sampleAll()
    clearInterval(sampler)
    for (const p of this.live()) {
      if (!p.baseline || !p.last) continue
      this.tally.growth.push({
        process: p.name,
        seconds: Math.round((p.last.at - p.baseline.at) / 1000),
        fds: p.last.fds - p.baseline.fds,
        rssMiB: Math.round((p.last.rssMiB - p.baseline.rssMiB) * 10) / 10,
        threads: p.last.threads - p.baseline.threads,
        peerRestarts: p.peerRestartsSinceBaseline,
        fdKindGrowth: kindGrowth(p.baseline.fdKinds, p.last.fdKinds),
      })
    }
    await this.shutdown()
    return this.tally.report({ ...o, verbose: undefined }, seconds, o.maxFdGrowth)
  }

  /** Stops the prefills (their calls settle and are verified), then the decodes. */
  private async shutdown(): Promise<void> {
    this.running = false
    const prefills = this.procs.prefill.filter((p): p is Proc => !!p && p.exitedAt === undefined)
    for (const p of prefills) this.send(p, { kind: 'stop' })
    const bound = now() + this.options.timeoutMs + 10_000
    while (now() < bound && (prefills.some((p) => !p.drained) || this.pending.size > 0)) await sleep(50)
    // A live decode that never answered a verification is a hang too.
    for (const { request } of this.pending.values())
      this.tally.hangs.push(`${this.callName(request)}: its verification was never answered`)
    for (const p of this.live()) if (p.role === 'decode') this.send(p, { kind: 'stop' })
    const exitBound = now() + 5000
    while (now() < exitBound && this.live().length > 0) await sleep(50)
    for (const p of this.live()) p.child.kill('SIGKILL')
  }
}
