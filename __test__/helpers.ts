/**
 * Shared helpers of the two-process suite: spawning the decode peer (fixtures/decode-peer.ts),
 * building prefill communicators in the test process, and a byte-exact model ("mirror") of
 * what the decode side's memory must hold.
 *
 * Environment:
 *   KVTRANSFER_TEST_TRANSPORT      transport of both sides (default 'tcp'; 'rdma' in the Soft-RoCE VM)
 *   KVTRANSFER_TEST_HOST           address the prefill side connects to (default 127.0.0.1)
 *   KVTRANSFER_TEST_TIMEOUT_SCALE  multiplies every waiting bound (default 1; e.g. 10 in a slow VM)
 *   KVTRANSFER_TEST_QUIET_SCALE    multiplies every wait for something that must not happen
 *                                  (`quietMs`; default: the timeout scale)
 */
import { fork, type ChildProcess } from 'node:child_process'
import { createHash } from 'node:crypto'
import * as net from 'node:net'
import { fileURLToPath } from 'node:url'
import type { ExecutionContext } from 'ava'
import { RDMACommunicator, KvTransferError } from '../lib/index.js'
import { communicatorOnHostRegions } from '../lib/setup.js'
import type { Arrival, KvTransferErrorCode, Transport } from '../lib/index.js'
import type { PeerConfig } from './fixtures/decode-peer.js'

export { RDMACommunicator, KvTransferError }
export type { Arrival, KvTransferErrorCode }

export const TRANSPORT = (process.env.KVTRANSFER_TEST_TRANSPORT || 'tcp') as Transport
export const HOST = process.env.KVTRANSFER_TEST_HOST || '127.0.0.1'
export const SCALE = Math.max(1, Number(process.env.KVTRANSFER_TEST_TIMEOUT_SCALE || 1))
/** A waiting bound scaled for slow machines. */
export const ms = (base: number): number => Math.round(base * SCALE)
const QUIET_SCALE = Math.max(1, Number(process.env.KVTRANSFER_TEST_QUIET_SCALE || SCALE))
/**
 * How long to wait for something that must NOT happen (a second event, a wait that must time
 * out): it is always waited out whole, so it is scaled apart from the bounds, which cost
 * only on failure. A slow VM scales it with its CPU (~5x), not with its process start.
 */
export const quietMs = (base: number): number => Math.round(base * QUIET_SCALE)

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url))
const PEER_SCRIPT = fileURLToPath(new URL('./fixtures/decode-peer.ts', import.meta.url))

export type Kind = 'K' | 'V'
export interface Digests {
  K: string[][]
  V: string[][] | null
}
export interface SerializedError {
  name: string
  isKvTransferError: boolean
  code?: string
  message: string
}
export interface WaitOutcome {
  ok: boolean
  arrivals?: Arrival[]
  digests?: Digests
  error?: SerializedError
  elapsedMs: number
}

export function sha256(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex')
}

export function sleep(milliseconds: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, milliseconds))
}

/** Rejects with `what` when `promise` has not settled within `milliseconds`. */
export function within<T>(promise: Promise<T>, milliseconds: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise<T>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: not settled within ${milliseconds} ms`)), milliseconds)
    }),
  ])
}

/** A TCP port that was free a moment ago. */
export async function freePort(): Promise<number> {
  const server = net.createServer()
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(0, resolve)
  })
  const port = (server.address() as net.AddressInfo).port
  await new Promise<void>((resolve) => server.close(() => resolve()))
  return port
}

/** The decode communicator running in a child process. */
export class DecodePeer {
  port = 0
  transport = ''
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>
  private nextId = 1
  private readonly pending = new Map<
    number,
    { resolve: (v: unknown) => void; reject: (e: Error) => void; op: string }
  >()
  private output = ''

  constructor(
    readonly child: ChildProcess,
    readonly config: PeerConfig,
  ) {
    const collect = (chunk: Buffer) => {
      this.output = (this.output + chunk.toString()).slice(-8192)
    }
    child.stdout?.on('data', collect)
    child.stderr?.on('data', collect)
    child.on(
      'message',
      (message: { kind: string; id?: number; ok?: boolean; result?: unknown; error?: SerializedError }) => {
        if (message.kind !== 'reply' || message.id === undefined) return
        const entry = this.pending.get(message.id)
        if (!entry) return
        this.pending.delete(message.id)
        if (message.ok) entry.resolve(message.result)
        else
          entry.reject(new Error(`decode peer failed ${entry.op}: [${message.error?.code}] ${message.error?.message}`))
      },
    )
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        for (const entry of this.pending.values()) {
          entry.reject(
            new Error(
              `decode peer exited (code ${code}, signal ${signal}) during ${entry.op}; output:\n${this.output}`,
            ),
          )
        }
        this.pending.clear()
        resolve({ code, signal })
      })
    })
  }

  /** Last lines the child printed (for failure messages). */
  get log(): string {
    return this.output
  }

  get alive(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null
  }

  request<T>(op: string, args: Record<string, unknown> = {}): Promise<T> {
    if (!this.alive) return Promise.reject(new Error(`decode peer is not running (${op})`))
    const id = this.nextId++
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject, op })
      this.child.send({ id, op, ...args })
    })
  }

  digests(): Promise<Digests> {
    return this.request<Digests>('digests')
  }

  async bytes(layer: number, kind: Kind, block: number): Promise<Buffer> {
    return Buffer.from(await this.request<Uint8Array>('bytes', { layer, kind, block }))
  }

  /** Registers a waitForArrival in the child; resolves once it is registered. */
  async startWait(
    tag: bigint | string,
    options: { layers?: number | number[]; timeoutMs?: number; abortAfterMs?: number; expectBlocks?: number } = {},
  ) {
    const waitId = await this.request<number>('startWait', { tag, ...options })
    return { finish: () => this.request<WaitOutcome>('finishWait', { waitId }) }
  }

  events(): Promise<Arrival[]> {
    return this.request<Arrival[]>('events')
  }

  async close(): Promise<void> {
    await this.request('close')
    await this.exited
  }

  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    if (this.alive) this.child.kill(signal)
    await this.exited
  }
}

export interface SpawnOptions extends Partial<PeerConfig> {
  layers: number
  blockNumber: number
  blockBytes: number
  /** Variables added to the child's environment. */
  env?: Record<string, string>
}

/**
 * Forks the decode peer. Kills it at the end of the test (or pass `t` = undefined and
 * handle it yourself). With `waitListening: false` it returns as soon as the process exists;
 * with `netns` it runs in that network namespace (root).
 */
export async function spawnPeer(
  t: ExecutionContext | undefined,
  options: SpawnOptions,
  { waitListening = true, netns }: { waitListening?: boolean; netns?: string } = {},
): Promise<DecodePeer> {
  const { env, ...rest } = options
  const config: PeerConfig = { port: 0, transport: TRANSPORT, name: 'decode-peer', ...rest }
  const nodeArgs = ['--import', '@oxc-node/core/register']
  const child = fork(PEER_SCRIPT, [], {
    cwd: REPO_ROOT,
    // In network namespace `netns`: `ip netns exec` execs node in place (same pid, IPC kept).
    ...(netns
      ? { execPath: 'ip', execArgv: ['netns', 'exec', netns, process.execPath, ...nodeArgs] }
      : { execArgv: nodeArgs }),
    env: { ...process.env, ...env, KVT_PEER_CONFIG: JSON.stringify(config) },
    serialization: 'advanced',
    stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
  })
  const peer = new DecodePeer(child, config)
  t?.teardown(() => peer.kill())
  const listening = new Promise<void>((resolve, reject) => {
    child.on('message', (message: { kind: string; port?: number; transport?: string; error?: SerializedError }) => {
      if (message.kind === 'listening') {
        peer.port = message.port!
        peer.transport = message.transport!
        resolve()
      } else if (message.kind === 'startup-error') {
        reject(new Error(`decode peer could not start: [${message.error?.code}] ${message.error?.message}`))
      }
    })
    void peer.exited.then(({ code, signal }) =>
      reject(new Error(`decode peer exited before listening (code ${code}, signal ${signal}):\n${peer.log}`)),
    )
  })
  if (!waitListening) {
    listening.catch(() => undefined)
    return peer
  }
  try {
    await within(listening, ms(60_000), 'decode peer startup')
  } catch (error) {
    await peer.kill()
    throw error
  }
  return peer
}

export interface Prefill {
  comm: RDMACommunicator
  keys: Buffer[]
  values: Buffer[]
  layers: number
  blockNumber: number
  blockBytes: number
  block(layer: number, kind: Kind, id: number): Buffer
}

/** A prefill communicator in this process with random K (and V) regions; closed after the test. */
export function makePrefill(
  t: ExecutionContext | undefined,
  options: {
    layers: number
    blockNumber: number
    blockBytes: number
    keyOnly?: boolean
    name?: string
    authToken?: string
    writeTimeoutMs?: number
    connectTimeoutMs?: number
  },
): Prefill {
  const { layers, blockNumber, blockBytes } = options
  const { comm, keys, values } = communicatorOnHostRegions({
    role: 'prefill',
    layers,
    fill: 'random',
    keyOnly: options.keyOnly,
    blockNumber,
    blockBytes,
    transport: TRANSPORT,
    name: options.name ?? 'prefill-test',
    authToken: options.authToken ?? '',
    writeTimeoutMs: options.writeTimeoutMs,
    connectTimeoutMs: options.connectTimeoutMs,
  })
  t?.teardown(() => comm.close())
  return {
    comm,
    keys,
    values,
    layers,
    blockNumber,
    blockBytes,
    block: (layer, kind, id) => (kind === 'K' ? keys : values)[layer].subarray(id * blockBytes, (id + 1) * blockBytes),
  }
}

/**
 * What the decode side's memory must hold: starts zeroed, and `apply` copies the prefill
 * blocks a successful writeCache call moved.
 */
export class Mirror {
  readonly keys: Buffer[]
  readonly values: Buffer[]

  constructor(
    readonly prefill: Prefill,
    readonly blockNumber: number,
  ) {
    const zero = () => Buffer.alloc(blockNumber * prefill.blockBytes)
    this.keys = Array.from({ length: prefill.layers }, zero)
    this.values = prefill.values.length === 0 ? [] : Array.from({ length: prefill.layers }, zero)
  }

  apply(layer: number, local: ArrayLike<number>, remote: ArrayLike<number>): void {
    const size = this.prefill.blockBytes
    for (let i = 0; i < local.length; i++) {
      this.prefill.block(layer, 'K', local[i]).copy(this.keys[layer], remote[i] * size)
      if (this.values.length > 0) this.prefill.block(layer, 'V', local[i]).copy(this.values[layer], remote[i] * size)
    }
  }

  digests(): Digests {
    const size = this.prefill.blockBytes
    const of = (list: Buffer[]) =>
      list.map((r) => Array.from({ length: this.blockNumber }, (_, b) => sha256(r.subarray(b * size, (b + 1) * size))))
    return { K: of(this.keys), V: this.values.length === 0 ? null : of(this.values) }
  }
}

/** Every block whose digest differs, as readable lines (empty when all match). */
export function differences(actual: Digests, expected: Digests): string[] {
  const out: string[] = []
  for (const kind of ['K', 'V'] as const) {
    const a = actual[kind]
    const e = expected[kind]
    if (a === null || e === null) {
      if (a !== e) out.push(`${kind}: present on one side only`)
      continue
    }
    if (a.length !== e.length) out.push(`${kind}: ${a.length} layers, expected ${e.length}`)
    for (let layer = 0; layer < Math.min(a.length, e.length); layer++) {
      for (let b = 0; b < Math.max(a[layer].length, e[layer].length); b++) {
        if (a[layer][b] !== e[layer][b]) out.push(`layer ${layer} ${kind} block ${b} differs`)
      }
    }
  }
  return out
}

/** Compares the decode peer's memory with the mirror, block by block. */
export async function assertPeerMatches(
  t: ExecutionContext,
  peer: DecodePeer,
  mirror: Mirror,
  what = 'decode memory',
): Promise<void> {
  const diff = differences(await peer.digests(), mirror.digests())
  t.deepEqual(diff.slice(0, 20), [], `${what}: ${diff.length} blocks differ`)
}

/** Connects the prefill side to the peer, checking that connect resolves to true. */
export async function connect(t: ExecutionContext, prefill: Prefill, peer: DecodePeer): Promise<void> {
  const connected = await prefill.comm.connect(HOST, peer.port, { timeoutMs: ms(30_000) })
  t.is(connected, true)
  t.true(prefill.comm.isConnected(HOST, peer.port))
}

/**
 * Asserts that `run` rejects (or throws) a KvTransferError with `code` whose message
 * matches every pattern.
 */
export async function expectKvError(
  t: ExecutionContext,
  run: () => unknown,
  code: KvTransferErrorCode | readonly KvTransferErrorCode[],
  patterns: Array<string | RegExp> = [],
): Promise<KvTransferError | undefined> {
  let error: unknown
  try {
    await run()
  } catch (e) {
    error = e
  }
  if (error === undefined) {
    t.fail(`expected ${code}, but the call succeeded`)
    return undefined
  }
  t.true(error instanceof KvTransferError, `expected a KvTransferError, got ${String(error)}`)
  const e = error as KvTransferError
  const codes: readonly string[] = typeof code === 'string' ? [code] : code
  t.true(codes.includes(e.code), `code ${e.code} (message: ${e.message}) should be ${codes.join(' or ')}`)
  for (const pattern of patterns) {
    if (typeof pattern === 'string')
      t.true(e.message.includes(pattern), `message ${JSON.stringify(e.message)} should name ${JSON.stringify(pattern)}`)
    else t.regex(e.message, pattern)
  }
  return e
}

/** Polls `check` until it returns true or `timeoutMs` passes; returns the last result. */
export async function eventually(
  check: () => boolean | Promise<boolean>,
  timeoutMs: number,
  stepMs = 50,
): Promise<boolean> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    if (await check()) return true
    if (Date.now() > deadline) return false
    await sleep(stepMs)
  }
}

/** `k` distinct ids out of 0..n-1 in random order. */
export function pick(n: number, k: number): number[] {
  const ids = Array.from({ length: n }, (_, i) => i)
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1))
    ;[ids[i], ids[j]] = [ids[j], ids[i]]
  }
  return ids.slice(0, k)
}
