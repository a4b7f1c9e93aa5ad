/**
 * A real etcd for the registry tests: Debian's `etcd-server` (scripts/setup-debian.sh),
 * started as one or three members on free loopback ports with their data in a temporary
 * directory, stopped, killed or restarted by the tests, and removed afterwards.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import * as path from 'node:path'
import { freePort, sleep } from './helpers.js'

/** The etcd binary, or why there is none (the tests then skip, naming it). */
export const ETCD: { path: string } | { missing: string } = (() => {
  try {
    return { path: execFileSync('sh', ['-c', 'command -v etcd'], { encoding: 'utf8' }).trim() }
  } catch {
    return { missing: 'etcd is not installed (apt-get install etcd-server; scripts/setup-debian.sh does)' }
  }
})()

interface Member {
  name: string
  clientPort: number
  peerPort: number
  process: ChildProcess | undefined
  exited: Promise<void>
  log: string
}

export class EtcdCluster {
  private constructor(
    private readonly binary: string,
    private readonly dir: string,
    readonly members: Member[],
    private readonly token: string,
    /** The address every member listens on. */
    readonly host: string,
  ) {}

  /** Starts `size` members on `host` and resolves once every one answers `/health`. */
  static async start(size = 1, host = '127.0.0.1'): Promise<EtcdCluster> {
    if (!('path' in ETCD)) throw new Error(ETCD.missing)
    const dir = mkdtempSync(path.join(tmpdir(), 'kvt-etcd-'))
    const members: Member[] = []
    for (let i = 0; i < size; i++) {
      members.push({
        name: `m${i}`,
        clientPort: await freePort(),
        peerPort: await freePort(),
        process: undefined,
        exited: Promise.resolve(),
        log: '',
      })
    }
    const cluster = new EtcdCluster(ETCD.path, dir, members, `kvt-${process.pid}-${Date.now()}`, host)
    for (let i = 0; i < size; i++) cluster.launch(i, 'new')
    await Promise.all(members.map((_, i) => cluster.healthy(i)))
    return cluster
  }

  /** `etcd://<host>:<port>,…/prefix`: every member. */
  url(prefix: string): string {
    return `etcd://${this.members.map((m) => `${this.host}:${m.clientPort}`).join(',')}/${prefix}`
  }

  private launch(i: number, state: 'new' | 'existing'): void {
    const m = this.members[i]
    const cluster = this.members.map((p) => `${p.name}=http://${this.host}:${p.peerPort}`).join(',')
    const child = spawn(
      this.binary,
      [
        `--name=${m.name}`,
        `--data-dir=${path.join(this.dir, m.name)}`,
        `--listen-client-urls=http://${this.host}:${m.clientPort}`,
        `--advertise-client-urls=http://${this.host}:${m.clientPort}`,
        `--listen-peer-urls=http://${this.host}:${m.peerPort}`,
        `--initial-advertise-peer-urls=http://${this.host}:${m.peerPort}`,
        `--initial-cluster=${cluster}`,
        `--initial-cluster-state=${state}`,
        `--initial-cluster-token=${this.token}`,
        // Short elections: a killed leader is replaced in about a second; leases may be 2 s.
        '--heartbeat-interval=100',
        '--election-timeout=500',
        '--logger=zap',
        '--log-level=warn',
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    )
    const collect = (chunk: Buffer) => {
      m.log = (m.log + chunk.toString()).slice(-4096)
    }
    child.stdout?.on('data', collect)
    child.stderr?.on('data', collect)
    m.process = child
    m.exited = new Promise((resolve) => child.once('exit', () => resolve()))
  }

  /** Resolves once member `i` reports itself healthy (a leader exists); rejects after 20 s. */
  async healthy(i: number): Promise<void> {
    const m = this.members[i]
    const deadline = Date.now() + 20_000
    while (Date.now() < deadline) {
      try {
        const response = await fetch(`http://${this.host}:${m.clientPort}/health`)
        const body = (await response.json()) as { health?: string }
        if (body.health === 'true') return
      } catch {
        // not up yet
      }
      if (m.process && m.process.exitCode !== null) throw new Error(`etcd ${m.name} exited:\n${m.log}`)
      await sleep(100)
    }
    throw new Error(`etcd ${m.name} not healthy within 20 s:\n${m.log}`)
  }

  /** The index of the current leader (asked of every live member). */
  async leader(): Promise<number> {
    for (const m of this.members) {
      if (!m.process || m.process.exitCode !== null) continue
      try {
        const response = await fetch(`http://${this.host}:${m.clientPort}/v3/maintenance/status`, {
          method: 'POST',
          body: '{}',
        })
        const status = (await response.json()) as { leader?: string; header?: { member_id?: string } }
        if (status.leader && status.leader === status.header?.member_id) return this.members.indexOf(m)
      } catch {
        // this one is down; ask the next
      }
    }
    throw new Error('no etcd member reports itself the leader')
  }

  /** Sends `signal` to member `i` and waits for it to exit. */
  async stop(i: number, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    const m = this.members[i]
    if (m.process && m.process.exitCode === null && m.process.signalCode === null) m.process.kill(signal)
    await m.exited
    m.process = undefined
  }

  /** Starts member `i` again on its data directory and ports. */
  async restart(i: number): Promise<void> {
    this.launch(i, 'existing')
    await this.healthy(i)
  }

  /** Kills every member and removes the data. */
  async close(): Promise<void> {
    await Promise.all(this.members.map((_, i) => this.stop(i, 'SIGKILL')))
    rmSync(this.dir, { recursive: true, force: true })
  }
}
