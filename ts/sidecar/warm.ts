/**
 * Warm re-attach: a worker that attached with a `slot` and ends (dies, disconnects,
 * detaches) leaves its communicator, and so its links to peers, parked for a grace period.
 * A worker attaching with the same slot and the same layout takes it over, with the
 * regions swapped to its own memory at the same addresses (`NativeCommunicator.swapImports`).
 *
 * Regions shared as host descriptors (fd) or as cuMem GPU descriptors (cudaVmmFds: PyTorch's
 * expandable segments) can be swapped; legacy CUDA IPC handles cannot (`ERR_UNSUPPORTED`).
 *
 * While parked: this side's own calls in flight were failed (they read the worker's
 * memory), every writer that takes this side's fences refuses new calls with `ERR_FENCED`
 * (fenced before the park: a GPU region is remapped piece by piece, so no copy may touch
 * it meanwhile), and the regions lie on anonymous pages or, GPU regions, on one filler
 * granule (nothing lands in the old worker's memory; over RDMA they are not registered
 * either; over NVLink the writers dropped their mappings of it).
 *
 * Over RDMA the swap registers the regions again, with new keys; over NVLink the writers
 * get the new memory table and descriptors over the side channel, and the keys name that
 * table: each writer takes them over its fence channel (`rekey`, answered once its link
 * holds the new memory) before its fence is lifted. A writer that does not answer in time
 * is cut off (it stays fenced and connects again, as after a timeout).
 */
import type { RDMACommunicator } from '../communicator'
import { KvTransferError, describeValue, invalidArgument, native, nativeAsync } from '../errors'
import type { CacheRegion, CommunicatorOptions, SharedRegion } from '../options'
import type { Request } from './protocol'

/** Default grace period: how long a parked communicator waits for its worker. */
export const DEFAULT_WARM_GRACE_MS = 30_000
/** Fences on writers outlast the grace period by this much (released at re-attach). */
const HOLD_MARGIN_MS = 5_000
/** How long a writer has to take the new region keys at a re-attach (RDMA). */
const REKEY_WAIT_MS = 5_000
/** The longest grace period (a writer's fence holds at most an hour). */
export const MAX_WARM_GRACE_MS = 3_600_000 - HOLD_MARGIN_MS

/** Attach options a re-attach must repeat (besides the regions' count and sizes). */
const SAME = [
  'role',
  'transport',
  'gpuIdx',
  'blockNumber',
  'blockBytes',
  'scaleBlockBytes',
  'tpSize',
  'tpRank',
  'kvReplicated',
] as const

interface Parked {
  comm: RDMACommunicator
  options: CommunicatorOptions
  writers: string[]
  timer: NodeJS.Timeout
}

/** What the sidecar counts of warm re-attach, for its metrics. */
export interface WarmCounters {
  parked: number
  reattached: number
  expired: number
}

/** The `slot` field of an attach request: a non-empty string of at most 255 characters. */
export function slotField(request: Request): string | undefined {
  const slot = request.slot
  if (slot === undefined || slot === null) return undefined
  if (typeof slot !== 'string' || slot.length === 0 || slot.length > 255)
    throw invalidArgument('slot', `expected a non-empty string of at most 255 characters, got ${describeValue(slot)}`)
  return slot
}

/** The parked communicators, by slot, and the slots attached workers hold. */
export class WarmSlots {
  private readonly parked = new Map<string, Parked>()
  private readonly held = new Set<string>()
  readonly counters: WarmCounters = { parked: 0, reattached: 0, expired: 0 }

  constructor(readonly graceMs: number) {}

  /** Communicators parked now. */
  get parkedCount(): number {
    return this.parked.size
  }

  /** An attaching worker takes `slot`; refused while another attached worker holds it. */
  claim(slot: string): void {
    if (this.held.has(slot))
      throw invalidArgument('slot', `"${slot}" is held by an attached worker; one worker per slot`)
    this.held.add(slot)
  }

  /** The worker holding `slot` ended (its communicator parked or closed). */
  release(slot: string): void {
    this.held.delete(slot)
  }

  /**
   * Why `comm` cannot be parked for a warm re-attach (`ERR_UNSUPPORTED`: a region shared as
   * a legacy CUDA IPC handle, GPU regions over RDMA), or undefined when it can.
   */
  refusal(comm: RDMACommunicator): KvTransferError | undefined {
    if (this.graceMs === 0) return new KvTransferError('ERR_UNSUPPORTED', 'warm re-attach is off (grace period 0)')
    try {
      native(() => comm.warmAccess().native.checkSwappable())
      return undefined
    } catch (error) {
      return error as KvTransferError
    }
  }

  /** Parks `comm` under `slot`; false when it cannot be (the caller closes it). */
  async park(slot: string, comm: RDMACommunicator, options: CommunicatorOptions): Promise<boolean> {
    if (this.refusal(comm) || this.parked.has(slot)) return false
    const { native: engine, writers } = comm.warmAccess()
    // This side's calls in flight read the worker's memory: none may read the parked pages.
    for (const peer of comm.metrics().peers) await nativeAsync(engine.fenceWrites(peer.peer, null, 0)).catch(() => 0)
    // Writers are fenced before the memory is parked: nothing of theirs is in flight while
    // it is replaced (GPU regions are unmapped and mapped piece by piece).
    const holdMs = this.graceMs + HOLD_MARGIN_MS
    await Promise.all(writers.map((peer) => comm.fence({ peer }, { holdMs }).catch(() => undefined)))
    try {
      native(() => engine.parkImports())
    } catch {
      await Promise.all(writers.map((peer) => comm.fence({ peer }, { holdMs: 0 }).catch(() => undefined)))
      return false
    }
    const timer = setTimeout(() => void this.expire(slot), this.graceMs)
    timer.unref()
    this.parked.set(slot, { comm, options, writers, timer })
    this.counters.parked++
    return true
  }

  /**
   * The communicator parked under `slot`, its regions swapped to `options`' (not yet
   * closed: the caller closes its descriptors); undefined when none is parked. A layout
   * that differs is refused (`ERR_LAYOUT_MISMATCH`, naming the field) and the parked
   * communicator is closed, so attaching again starts fresh.
   */
  async take(slot: string, options: CommunicatorOptions): Promise<RDMACommunicator | undefined> {
    const parked = this.parked.get(slot)
    if (!parked) return undefined
    this.parked.delete(slot)
    clearTimeout(parked.timer)
    const { comm } = parked
    try {
      checkSameLayout(slot, parked.options, options)
      native(() =>
        comm
          .warmAccess()
          .native.swapImports(
            shared(options.localKeyCache),
            shared(options.localValueCache),
            shared(options.keyScaleCache),
            shared(options.valueScaleCache),
          ),
      )
    } catch (error) {
      await comm.close().catch(() => undefined)
      throw error
    }
    // RDMA registered the new pages, NVLink sent the new memory table: the writers take
    // the new keys while still fenced.
    const { native: engine, fences } = comm.warmAccess()
    const keys = engine.regionKeys()
    if (keys.length > 0) await fences.rekey(parked.writers, keys, REKEY_WAIT_MS)
    // Writers may write again: their fences end now.
    await Promise.all(parked.writers.map((peer) => comm.fence({ peer }, { holdMs: 0 }).catch(() => undefined)))
    this.counters.reattached++
    return comm
  }

  /** Closes every parked communicator (the sidecar closes). */
  async closeAll(): Promise<void> {
    const slots = [...this.parked.keys()]
    await Promise.all(slots.map((slot) => this.expire(slot, false)))
  }

  private async expire(slot: string, counted = true): Promise<void> {
    const parked = this.parked.get(slot)
    if (!parked) return
    this.parked.delete(slot)
    clearTimeout(parked.timer)
    if (counted) this.counters.expired++
    await parked.comm.close().catch(() => undefined)
  }
}

/** The regions as the sidecar's attach gives them: shared regions, each with its fd. */
function shared(regions: CacheRegion[] | undefined): SharedRegion[] {
  return (regions ?? []) as SharedRegion[]
}

/** How a region is shared: a host descriptor, cuMem GPU descriptors, or a legacy CUDA IPC handle. */
export function form(region: SharedRegion): 'fd' | 'cudaVmmFds' | 'cudaIpcHandle' {
  if ('cudaVmmFds' in region) return 'cudaVmmFds'
  if ('cudaIpcHandle' in region) return 'cudaIpcHandle'
  return 'fd'
}

export function checkSameLayout(slot: string, kept: CommunicatorOptions, given: CommunicatorOptions): void {
  const differ = (field: string, was: unknown, now: unknown) =>
    new KvTransferError(
      'ERR_LAYOUT_MISMATCH',
      `warm re-attach of slot "${slot}": ${field} is ${JSON.stringify(now ?? null)} but the kept communicator has ${JSON.stringify(was ?? null)}; the kept communicator is closed, attach again to start fresh`,
    )
  for (const field of SAME) if (kept[field] !== given[field]) throw differ(field, kept[field], given[field])
  const lists = ['localKeyCache', 'localValueCache', 'keyScaleCache', 'valueScaleCache'] as const
  for (const list of lists) {
    const was = shared(kept[list])
    const now = shared(given[list])
    if (was.length !== now.length) throw differ(`the number of ${list} regions`, was.length, now.length)
    now.forEach((region, i) => {
      if (form(region) !== form(was[i])) throw differ(`${list}[${i}]'s form`, form(was[i]), form(region))
      if (region.bytes !== was[i].bytes) throw differ(`${list}[${i}].bytes`, was[i].bytes, region.bytes)
    })
  }
}
