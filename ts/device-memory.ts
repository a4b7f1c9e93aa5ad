/**
 * `DeviceMemory`: GPU memory for demos, benchmarks and tests. Serving stacks pass their own
 * GPU addresses (PyTorch, CuPy); this lets you try the GPU paths (NVLink, GPU regions over
 * TCP or RDMA) from Node.js alone. The CUDA driver is loaded at run time, on first use.
 */
import { NativeDeviceMemory } from '../index.js'
import { describeValue, invalidArgument, native } from './errors'
import { checkType } from './options'

export class DeviceMemory {
  private constructor(private readonly memory: NativeDeviceMemory) {}

  /**
   * `bytes` of zeroed memory on GPU `gpuIdx` (`cuMemAlloc`). Throws `ERR_INVALID_ARGUMENT`
   * when there is no such GPU (or no CUDA driver), `ERR_CUDA` when the driver refuses.
   */
  static alloc(gpuIdx: number, bytes: number): DeviceMemory {
    // Types here; values (whole numbers, the GPU's existence) in the binding.
    checkType('gpuIdx', gpuIdx, 'number')
    checkType('bytes', bytes, 'number')
    return new DeviceMemory(native(() => NativeDeviceMemory.alloc(gpuIdx, bytes)))
  }

  /** The device address: what `localKeyCache` / `localValueCache` take. */
  get address(): bigint {
    return native(() => this.memory.address)
  }

  /** Bytes allocated. */
  get bytes(): number {
    return native(() => this.memory.bytes)
  }

  /** The GPU it lives on. */
  get gpu(): number {
    return native(() => this.memory.gpu)
  }

  /** Copies `data` to byte `offset` (synchronously; checked against the size). */
  write(offset: number, data: Uint8Array): void {
    checkType('offset', offset, 'number')
    if (!(data instanceof Uint8Array))
      throw invalidArgument('data', `expected a Uint8Array, got ${describeValue(data)}`)
    native(() => this.memory.write(offset, Buffer.from(data.buffer, data.byteOffset, data.byteLength)))
  }

  /** `length` bytes from byte `offset` (synchronously; checked against the size). */
  read(offset: number, length: number): Buffer {
    checkType('offset', offset, 'number')
    checkType('length', length, 'number')
    return native(() => this.memory.read(offset, length))
  }

  /** Frees the memory; close the communicators that use it first. */
  free(): void {
    this.memory.free()
  }
}
