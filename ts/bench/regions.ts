/**
 * The bench's KV regions: host memory (Buffers) or GPU memory (`DeviceMemory`, with
 * `--src-gpu` / `--dst-gpu` and for `--transport nvlink`), behind one interface so that the
 * driver and the agent measure and verify either the same way.
 */
import { randomFillSync } from 'node:crypto'
import { DeviceMemory } from '../device-memory'
import type { CacheRegion } from '../options'

export interface Region {
  /** The first `used` bytes, as a communicator takes them. */
  cache(used: number): CacheRegion
  /** A copy of `length` bytes at `offset` (for digests). */
  bytes(offset: number, length: number): Uint8Array
  /** Zeroes the first `used` bytes. */
  zero(used: number): void
  free(): void
}

class HostRegion implements Region {
  constructor(readonly buffer: Buffer) {}
  cache(used: number): CacheRegion {
    return this.buffer.subarray(0, used)
  }
  bytes(offset: number, length: number): Uint8Array {
    return this.buffer.subarray(offset, offset + length)
  }
  zero(used: number): void {
    this.buffer.fill(0, 0, used)
  }
  free(): void {}
}

/** Host→device writes in 64 MiB pieces (one Buffer of the whole region is not needed). */
const PIECE = 64 * 2 ** 20

class GpuRegion implements Region {
  constructor(readonly memory: DeviceMemory) {}
  cache(): CacheRegion {
    return this.memory.address
  }
  bytes(offset: number, length: number): Uint8Array {
    return this.memory.read(offset, length)
  }
  fill(used: number, random: boolean): void {
    const piece = Buffer.alloc(Math.min(PIECE, used))
    for (let at = 0; at < used; at += PIECE) {
      const n = Math.min(PIECE, used - at)
      if (random) randomFillSync(piece, 0, n)
      this.memory.write(at, piece.subarray(0, n))
    }
  }
  zero(used: number): void {
    this.fill(used, false)
  }
  free(): void {
    this.memory.free()
  }
}

/** `count` regions of `bytes`, on GPU `gpu` when given (zeroed), else host memory
 * (touched); random content when `random`. */
export function allocRegions(count: number, bytes: number, gpu: number | undefined, random: boolean): Region[] {
  return Array.from({ length: count }, () => {
    if (gpu === undefined) {
      const buffer = Buffer.allocUnsafe(bytes)
      if (random) randomFillSync(buffer)
      else buffer.fill(0)
      return new HostRegion(buffer)
    }
    const region = new GpuRegion(DeviceMemory.alloc(gpu, bytes))
    if (random) region.fill(bytes, true)
    return region
  })
}

/** Host buffers behind host regions (the TCP reference stream walks them); none for GPU. */
export function hostBuffers(regions: Region[]): Buffer[] {
  return regions.flatMap((r) => (r instanceof HostRegion ? [r.buffer] : []))
}
