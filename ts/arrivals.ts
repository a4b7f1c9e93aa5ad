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
import { type DeadlineOptions, withDeadline } from './deadline'
import { KvTransferError, abortError, describeValue, invalidArgument, showValue } from './errors'
import { type RequestTag, tagKey } from './tags'

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
}

/** A kept notice, and whether a listener or a wait consumed it. */
interface Kept {
  arrival: Arrival
  consumed: boolean
}

interface Waiter {
  layers: Set<number>
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
  wait(tag: RequestTag, layers: Set<number>, options: DeadlineOptions): Promise<Arrival[]> {
    const key = tagKey(tag)
    let resolve!: Waiter['resolve']
    let reject!: Waiter['reject']
    const landed = new Promise<Arrival[]>((res, rej) => {
      resolve = res
      reject = rej
    })
    const waiter: Waiter = { layers, resolve, reject }
    let set = this.waiters.get(key)
    if (!set) this.waiters.set(key, (set = new Set()))
    set.add(waiter)
    this.settle(key, waiter)
    return withDeadline(landed, options, {
      timeout: () => {
        const got = new Set((this.arrived.get(key) ?? []).map((k) => k.arrival.layerIdx))
        const missing = [...layers].filter((l) => !got.has(l))
        return new KvTransferError(
          'ERR_TIMEOUT',
          `timed out after ${options.timeoutMs} ms waiting for tag ${String(tag)}: layers ${missing.join(', ')} have not arrived`,
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

  /** Resolves `waiter` if all its layers arrived (consuming their notices); returns whether it did. */
  private settle(key: string, waiter: Waiter): boolean {
    const list = this.arrived.get(key) ?? []
    const landed = new Set(list.map((k) => k.arrival.layerIdx))
    for (const layer of waiter.layers) if (!landed.has(layer)) return false
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
