/**
 * What the chaos supervisor and its worker processes share: the configuration a worker
 * starts with (env `KVT_CHAOS_CONFIG`, JSON), the block layout, and the IPC messages.
 */
import { KvTransferError } from '../../lib/index.js'
import type { Transport } from '../../lib/index.js'
import { KV_TRANSFER_ERROR_CODES } from '../../lib/errors.js'

const KNOWN_CODES: ReadonlySet<string> = new Set(KV_TRANSFER_ERROR_CODES)

export interface WorkerConfig {
  role: 'prefill' | 'decode'
  /** Index within its role (0..P-1 or 0..D-1); stays the same across restarts. */
  index: number
  /** 1 for the first start, +1 per restart. */
  incarnation: number
  transport: Transport
  host: string
  prefills: number
  decodes: number
  layers: number
  blockBytes: number
  /** Concurrent calls per (prefill, decode) pair; each owns a slot of `maxBlocks` blocks on both sides. */
  slots: number
  /** Blocks per call: 1..maxBlocks, at random. */
  maxBlocks: number
  /** `writeCache` timeout. */
  timeoutMs: number
  connectTimeoutMs: number
  /** Fraction of calls given an AbortSignal that fires at a random moment within the timeout. */
  abortRate: number
  /**
   * Self-test of the verification: this fraction of calls is not written at all but
   * reported as resolved OK, so the run must count them as false successes and fail.
   */
  lieRate: number
  /** Seed of this worker's random choices. */
  seed: number
}

/** Blocks of a decode's regions: one slot per (prefill, slot). */
export const decodeBlocks = (c: WorkerConfig): number => c.prefills * c.slots * c.maxBlocks
/** Blocks of a prefill's regions: one slot per (decode, slot). */
export const prefillBlocks = (c: WorkerConfig): number => c.decodes * c.slots * c.maxBlocks
/** First block of prefill `writer`'s slot `slot` in a decode's regions. */
export const remoteBase = (c: WorkerConfig, writer: number, slot: number): number =>
  (writer * c.slots + slot) * c.maxBlocks
/** First block of the slot of (decode, slot) in a prefill's regions. */
export const localBase = (c: WorkerConfig, decode: number, slot: number): number =>
  (decode * c.slots + slot) * c.maxBlocks

/** Wall-clock milliseconds with a fraction, comparable between processes of one host. */
export const now = (): number => performance.timeOrigin + performance.now()

/** A settled call's failure, as the worker saw it. */
export interface Failure {
  code: string
  /** A KvTransferError whose code is one of the package's stable codes. */
  typed: boolean
  message: string
}

/** A decode's address, as the supervisor tells prefills. */
export interface DecodeAddress {
  index: number
  incarnation: number
  port: number
}

/** One call to verify on the decode side. */
export interface VerifyRequest {
  id: number
  writer: number
  writerIncarnation: number
  seq: number
  tag: string
  layer: number
  remoteIds: number[]
  decode: number
  decodeIncarnation: number
  issuedAt: number
  settledAt: number
}

export type BlockCounts = Record<'ok' | 'missing' | 'stale' | 'torn' | 'foreign', number>

export type ToSupervisor =
  | { kind: 'up'; port: number }
  | { kind: 'startup-error'; failure: Failure }
  | {
      kind: 'call'
      decode: number
      decodeIncarnation: number
      issuedAt: number
      settledAt: number
      failure?: Failure
      aborted: boolean
    }
  | { kind: 'connect'; decode: number; decodeIncarnation: number; ms: number; failure?: Failure }
  | { kind: 'hang'; what: 'writeCache' | 'connect'; decode: number; decodeIncarnation: number; waitedMs: number }
  | ({ kind: 'verify' } & VerifyRequest)
  | { kind: 'verdict'; id: number; blocks: BlockCounts; arrived: boolean; detail?: string }
  | { kind: 'drained'; pending: number }

export type ToWorker =
  | { kind: 'decodes'; table: DecodeAddress[] }
  | { kind: 'verified'; id: number }
  | ({ kind: 'verify' } & VerifyRequest)
  | { kind: 'stop' }

/** Sends `message` to the supervisor (no-op without an IPC channel). */
export function tell(message: ToSupervisor): void {
  if (process.connected) process.send?.(message)
}

/** A small seeded PRNG (mulberry32). */
export function random(seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

/** What a worker reports of a rejection: its code, and whether it is one of the package's typed errors. */
export function toFailure(error: unknown): Failure {
  const code = (error as { code?: unknown } | null)?.code
  const typed = error instanceof KvTransferError && KNOWN_CODES.has(String(code))
  return {
    code: typeof code === 'string' ? code : error instanceof Error ? error.name : typeof error,
    typed,
    message: error instanceof Error ? error.message : String(error),
  }
}
