/**
 * A communicator over fresh host-memory regions, one key (and value) region per layer: the
 * set-up that the demo, the overhead benchmark and the test suite share.
 */
import { randomFillSync } from 'node:crypto'
import { RDMACommunicator } from './communicator'
import type { CommunicatorOptions } from './options'

/** What the regions hold at first: random bytes (a sender's cache) or zeros (a receiver's). */
export type RegionFill = 'random' | 'zeros'

/** The communicator's options, less the regions, which are made here. */
export interface HostRegionsOptions extends Omit<
  CommunicatorOptions,
  'gpuIdx' | 'port' | 'localKeyCache' | 'localValueCache'
> {
  /** Regions per kind: one per layer. */
  layers: number
  fill: RegionFill
  /** Key regions only (e.g. MLA): `localValueCache` is `[]`. */
  keyOnly?: boolean
  /** Default 0. */
  gpuIdx?: number
  /** Default 0: any free port. */
  port?: number | string
}

export interface HostRegionsCommunicator {
  comm: RDMACommunicator
  /** One region of `blockNumber × blockBytes` bytes per layer. */
  keys: Buffer[]
  /** One per layer as `keys`, or `[]` with `keyOnly`. */
  values: Buffer[]
}

/** `count` regions of `bytes` bytes each, every page written already. */
export function hostRegions(count: number, bytes: number, fill: RegionFill): Buffer[] {
  return Array.from({ length: count }, () => {
    // Written now, as a serving engine's pre-allocated cache is: a fresh Buffer.alloc is
    // backed lazily and would make the first transfer pay the page faults.
    const region = Buffer.alloc(bytes)
    return fill === 'random' ? randomFillSync(region) : region.fill(0)
  })
}

/** Makes the regions (keys first, then values), then the communicator over them. */
export function communicatorOnHostRegions(options: HostRegionsOptions): HostRegionsCommunicator {
  const { layers, fill, keyOnly = false, gpuIdx = 0, port = 0, ...communicatorOptions } = options
  const regionBytes = options.blockNumber * options.blockBytes
  const keys = hostRegions(layers, regionBytes, fill)
  const values = keyOnly ? [] : hostRegions(layers, regionBytes, fill)
  const comm = new RDMACommunicator({
    ...communicatorOptions,
    gpuIdx,
    port,
    localKeyCache: keys,
    localValueCache: values,
  })
  return { comm, keys, values }
}
