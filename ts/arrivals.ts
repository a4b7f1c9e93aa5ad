/**
 * Arrival notices on the receiving side: kept per tag (up to a bound) for waiters that come
 * later, and handed to the waiters of their tag.
 *
 * The rule, which the README and the `maxPendingArrivals` option state:
 * - Every notice is kept for `waitForArrival`, whether or not an `'arrival'` listener got
 *   it: adding a listener never changes what a wait sees.
 * - A notice is consumed once an `'arrival'` listener received it or a `waitForArrival`
 *   resolved with it.
 * - Beyond `maxPendingArrivals` kept notices, the oldest tag's notices are evicted, except
 *   those of a tag a `waitForArrival` is waiting for (they are what it gathers).
 * - `noticesDropped` counts the evicted notices that nobody consumed. `forgetArrivals`
 *   drops nothing the user did not ask to drop, so it counts nothing.
 */
import type { ArrivalNotice } from '../index.js'
import { type DeadlineOptions, withDeadline } from './deadline'
import {
  KvTransferError,
  type KvTransferErrorCode,
  abortError,
  describeValue,
  invalidArgument,
  showValue,
} from './errors'
import { type RequestTag, decodeTag, tagKey } from './tags'

/** Delivered on the receiving side after every byte of a tagged call is in its memory. */
export interface Arrival {
  /** The writer's name (its `name` option). */
  peer: string
  /** The tag the writer passed to `writeCache` (a bigint stays a bigint). */
  tag: RequestTag
  /** The layer the call wrote. */
  layerIdx: number
  /** Number of blocks written by the call. */
  blocks: number
  /** The writer's `tpRank`. */
  tpRank: number
  /** The writer's `tpSize`. */
  tpSize: number
  /**
   * Which part of this side's blocks the writer wrote, `0..parts`, by the shard rules: a
   * block is complete once all `parts` arrived (1 unless the writer has more ranks than
   * this side: then `writer tpSize / this tpSize`).
   */
  part: number
  /** Parts each of this side's blocks is made of (writers that must write it). */
  parts: number
  /** The call's `checksum` was verified against this side's memory (false: none given). */
  verified: boolean
  /** Set when the bytes failed their checksum (`ERR_CHECKSUM_MISMATCH`): do not use them. */
  error?: KvTransferError
}

/** Options of {@link RDMACommunicator.waitForArrival}. */
export interface WaitOptions {
  /**
   * Layers to wait for (default: `[0]`). A number `n` (1..layer count) means layers
   * `0..n-1`; a list names layer indexes (`ERR_LAYER_OUT_OF_RANGE` beyond the cache's).
   */
  layers?: number | readonly number[]
  /** Rejects with `ERR_TIMEOUT` after this many milliseconds (default, and 0: wait forever). */
  timeoutMs?: number
  /** Aborts the wait; the promise rejects with `ERR_ABORTED`. */
  signal?: AbortSignal
  /**
   * The blocks this side allocated for the request: a layer counts as arrived only once
   * every part of it carried exactly this many blocks (summed over the calls that wrote
   * it); more rejects with `ERR_BLOCK_COUNT_MISMATCH`. Absent: any number.
   */
  expectBlocks?: number
}

/** A kept notice, and whether a listener or a wait consumed it. */
interface Kept {
  arrival: Arrival
  consumed: boolean
}

interface Waiter {
  layers: Set<number>
  expectBlocks: number | undefined
  resolve: (arrivals: Arrival[]) => void
  reject: (error: KvTransferError) => void
}

/**
 * The layers `waitForArrival` waits for, in a cache of `layerCount` layers: `n` means
 * `0..n-1`; default `[0]`. Refuses what could never complete: a count outside
 * 1..layerCount, an empty list, an index that is not a layer of the cache.
 */
export function layerSet(layers: unknown, layerCount: number): Set<number> {
  if (layers === undefined) return new Set([0])
  if (typeof layers === 'number') {
    if (!Number.isInteger(layers) || layers < 1 || layers > layerCount) {
      throw invalidArgument(
        'layers',
        `${showValue(layers)} is not a layer count in 1..${layerCount} (the cache has ${layerCount} layers)`,
      )
    }
    return new Set(Array.from({ length: layers }, (_, i) => i))
  }
  if (!Array.isArray(layers) || layers.length === 0) {
    throw invalidArgument(
      'layers',
      `expected a layer count or a non-empty list of layer indexes, got ${describeValue(layers)}`,
    )
  }
  for (const layer of layers as unknown[]) {
    if (typeof layer !== 'number') {
      throw invalidArgument('layers', `expected layer indexes (numbers), got ${describeValue(layer)}`)
    }
    if (!Number.isInteger(layer) || layer < 0 || layer >= layerCount) {
      throw new KvTransferError(
        'ERR_LAYER_OUT_OF_RANGE',
        `layers: layer ${layer} is out of range: the cache has ${layerCount} layers (valid 0..${layerCount})`,
      )
    }
  }
  return new Set(layers as number[])
}

/** The `expectBlocks` of a wait: absent, or an integer in 1..2^32-1. */
/** The {@link Arrival} of a native notice (with its error when its checksum failed). */
export function arrivalOf(notice: ArrivalNotice): Arrival {
  const { peer, layerIdx, blocks, tpRank, tpSize, part, parts, verified } = notice
  const arrival: Arrival = { peer, tag: decodeTag(notice.tag), layerIdx, blocks, tpRank, tpSize, part, parts, verified }
  if (notice.errorCode) {
    const message = `tag ${String(arrival.tag)}: ${notice.errorMessage ?? ''}`
    arrival.error = new KvTransferError(notice.errorCode as KvTransferErrorCode, message)
  }
  return arrival
}

/** What a wait gathers: its layers (checked against `layerCount`) and `expectBlocks`. */
export function waitSpec(options: WaitOptions, layerCount: number): { layers: Set<number>; expectBlocks?: number } {
  return { layers: layerSet(options.layers, layerCount), expectBlocks: toExpectBlocks(options.expectBlocks) }
}

export function toExpectBlocks(value: unknown): number | undefined {
  if (value === undefined) return undefined
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > 0xffff_ffff) {
    throw invalidArgument('expectBlocks', `${showValue(value)} is not a block count in 1..4294967295`)
  }
  return value
}

/**
 * Arrival notices kept per tag (oldest tag evicted first beyond `maxPending`, unless a wait
 * is gathering it) and their waiters. See the rule above.
 */
export class Arrivals {
  private readonly arrived = new Map<string, Kept[]>()
  private count = 0
  private readonly waiters = new Map<string, Set<Waiter>>()

  constructor(
    private readonly maxPending: number,
    /** Called for each notice evicted unconsumed (what `noticesDropped` counts). */
    private readonly onDrop: (arrival: Arrival) => void = () => undefined,
  ) {}

  /**
   * Keeps `arrival` (`handled`: an `'arrival'` listener takes it, so it is consumed) and
   * settles the waiters of its tag that it completes; then evicts beyond the bound.
   */
  add(arrival: Arrival, handled = false): void {
    const key = tagKey(arrival.tag)
    let list = this.arrived.get(key)
    if (!list) this.arrived.set(key, (list = []))
    list.push({ arrival, consumed: handled })
    this.count++
    for (const waiter of this.waiters.get(key) ?? []) this.settle(key, waiter)
    this.evict()
  }

  /** Evicts the oldest tags' notices until at most `maxPending` are kept (tags being waited for stay). */
  private evict(): void {
    // Oldest tag first: Map iteration order is insertion order (deleting while iterating is safe).
    for (const [key, entries] of this.arrived) {
      if (this.count <= this.maxPending) return
      if (this.waiters.has(key)) continue
      this.arrived.delete(key)
      this.count -= entries.length
      for (const kept of entries) if (!kept.consumed) this.onDrop(kept.arrival)
    }
  }

  /**
   * Resolves when every layer of `layers` has arrived for `tag` (kept notices count);
   * rejects with `ERR_TIMEOUT` or `ERR_ABORTED` (`options`, checked by the caller: a
   * `timeoutMs` of 0 or undefined is none).
   */
  wait(tag: RequestTag, layers: Set<number>, options: DeadlineOptions, expectBlocks?: number): Promise<Arrival[]> {
    const key = tagKey(tag)
    let resolve!: Waiter['resolve']
    let reject!: Waiter['reject']
    const landed = new Promise<Arrival[]>((res, rej) => {
      resolve = res
      reject = rej
    })
    const waiter: Waiter = { layers, expectBlocks, resolve, reject }
    let set = this.waiters.get(key)
    if (!set) this.waiters.set(key, (set = new Set()))
    set.add(waiter)
    this.settle(key, waiter)
    return withDeadline(landed, options, {
      timeout: () => {
        const list = this.arrived.get(key) ?? []
        const absent = [...layers].filter((l) => partsOf(list, l).parts.size === 0)
        const partial = [...layers].filter((l) => !absent.includes(l)).map((l) => missingOf(list, l, expectBlocks))
        const missing = [
          ...(absent.length > 0 ? [`layers ${absent.join(', ')} have not arrived`] : []),
          ...partial.filter((m) => m !== undefined),
        ]
        return new KvTransferError(
          'ERR_TIMEOUT',
          `timed out after ${options.timeoutMs} ms waiting for tag ${String(tag)}: ${missing.join('; ')}`,
        )
      },
      abort: () => abortError(`waitForArrival(${String(tag)})`),
      // What it gathered beyond the bound is evicted with the next notice.
      abandon: () => this.remove(key, waiter),
    })
  }

  /** Forgets the kept notices of `tag`. */
  forget(tag: RequestTag): void {
    const key = tagKey(tag)
    this.count -= this.arrived.get(key)?.length ?? 0
    this.arrived.delete(key)
  }

  /** Rejects every waiter with `error` (the communicator closes). */
  rejectAll(error: KvTransferError): void {
    for (const [key, set] of [...this.waiters]) {
      for (const waiter of [...set]) {
        this.remove(key, waiter)
        waiter.reject(error)
      }
    }
  }

  /**
   * Resolves `waiter` if all its layers arrived complete (consuming their notices), or
   * rejects it when one of them cannot (a checksum mismatch, writers that disagree on the
   * parts, more blocks than expected); returns whether it settled.
   */
  private settle(key: string, waiter: Waiter): boolean {
    const list = this.arrived.get(key) ?? []
    for (const layer of waiter.layers) {
      const state = layerState(list, layer, waiter.expectBlocks)
      if (state === 'pending') return false
      if (state !== 'complete') {
        this.remove(key, waiter)
        waiter.reject(state)
        return true
      }
    }
    this.remove(key, waiter)
    const taken = list.filter((k) => waiter.layers.has(k.arrival.layerIdx))
    for (const kept of taken) kept.consumed = true
    waiter.resolve(taken.map((k) => k.arrival))
    return true
  }

  private remove(key: string, waiter: Waiter): void {
    const set = this.waiters.get(key)
    if (!set) return
    set.delete(waiter)
    if (set.size === 0) this.waiters.delete(key)
  }
}

/** Blocks per part of `layer` in `list`, and the parts its notices name (undefined: none arrived). */
function partsOf(list: Kept[], layer: number): { parts: Set<number>; blocks: Map<number, number> } {
  const parts = new Set<number>()
  const blocks = new Map<number, number>()
  for (const { arrival } of list) {
    if (arrival.layerIdx !== layer) continue
    parts.add(arrival.parts)
    blocks.set(arrival.part, (blocks.get(arrival.part) ?? 0) + arrival.blocks)
  }
  return { parts, blocks }
}

/**
 * Whether `layer` arrived complete: every part the shard rules make this side's blocks of
 * (each writer responsible for them) arrived, with `expectBlocks` blocks each when given.
 * An error when it never can.
 */
function layerState(
  list: Kept[],
  layer: number,
  expectBlocks: number | undefined,
): 'pending' | 'complete' | KvTransferError {
  const failed = list.find((k) => k.arrival.layerIdx === layer && k.arrival.error)
  if (failed) return failed.arrival.error!
  const { parts, blocks } = partsOf(list, layer)
  if (parts.size === 0) return 'pending'
  if (parts.size > 1) {
    return new KvTransferError(
      'ERR_TP_MISMATCH',
      `layer ${layer}: writers disagree on the parts of a block (${[...parts].join(' and ')}): they declare different tpSize`,
    )
  }
  const [count] = parts
  for (let part = 0; part < count; part++) {
    const got = blocks.get(part)
    if (got === undefined) return 'pending'
    if (expectBlocks === undefined) continue
    if (got > expectBlocks) {
      return new KvTransferError(
        'ERR_BLOCK_COUNT_MISMATCH',
        `layer ${layer}${count > 1 ? ` part ${part} of ${count}` : ''}: ${got} blocks arrived, expectBlocks is ${expectBlocks}`,
      )
    }
    if (got < expectBlocks) return 'pending'
  }
  return 'complete'
}

/** What `layer` still lacks, in words (undefined: nothing). */
function missingOf(list: Kept[], layer: number, expectBlocks: number | undefined): string | undefined {
  if (layerState(list, layer, expectBlocks) === 'complete') return undefined
  const { parts, blocks } = partsOf(list, layer)
  if (parts.size !== 1) return `layer ${layer} has not arrived`
  const [count] = parts
  const lacking: string[] = []
  for (let part = 0; part < count; part++) {
    const got = blocks.get(part)
    const writer = count > 1 ? `part ${part} of ${count}` : 'the whole block'
    if (got === undefined) lacking.push(`${writer} has not arrived`)
    else if (expectBlocks !== undefined && got < expectBlocks)
      lacking.push(`${writer} has ${got} of ${expectBlocks} blocks`)
  }
  return `layer ${layer}: ${lacking.join(', ')}`
}
