/**
 * `DeviceMemory` (GPU memory for demos, benchmarks and tests): on a host without a CUDA
 * driver or GPU, allocation is refused with a typed error naming gpuIdx; on a GPU host the
 * memory round-trips bytes and every out-of-range access is refused, typed, nothing written.
 * Bad sizes are refused before the driver is asked.
 */
import test from 'ava'
import { DeviceMemory, KvTransferError } from '../lib/index.js'

function gpuPresent(): boolean {
  try {
    DeviceMemory.alloc(0, 1).free()
    return true
  } catch (error) {
    return !(error instanceof KvTransferError && error.code === 'ERR_INVALID_ARGUMENT')
  }
}

test('bad sizes are refused before the driver is asked', (t) => {
  for (const bytes of [0, -1, 1.5, Number.NaN, 2 ** 60]) {
    const err = t.throws(() => DeviceMemory.alloc(0, bytes), { instanceOf: KvTransferError })
    t.is(err?.code, 'ERR_INVALID_ARGUMENT')
    t.regex(err?.message ?? '', /bytes/)
  }
})

test('allocation names gpuIdx when the GPU or the driver is missing', (t) => {
  const err = t.throws(() => DeviceMemory.alloc(4096, 1024), { instanceOf: KvTransferError })
  t.is(err?.code, 'ERR_INVALID_ARGUMENT')
  t.regex(err?.message ?? '', /gpuIdx: 4096/)
})

// Reported as skipped where there is no GPU (never as passed).
const onGpu = gpuPresent() ? test : test.skip

onGpu('on a GPU: bytes round-trip, out-of-range access is refused, free is final', (t) => {
  const memory = DeviceMemory.alloc(0, 4096)
  t.is(typeof memory.address, 'bigint')
  t.is(memory.bytes, 4096)
  t.deepEqual([...memory.read(0, 8)], [0, 0, 0, 0, 0, 0, 0, 0])
  memory.write(100, Buffer.from('kvtransfer'))
  t.is(memory.read(100, 10).toString(), 'kvtransfer')
  const err = t.throws(() => memory.write(4090, Buffer.alloc(7)), { instanceOf: KvTransferError })
  t.is(err?.code, 'ERR_INVALID_ARGUMENT')
  t.regex(err?.message ?? '', /4090 \+ 7 bytes pass the end of the 4096-byte allocation/)
  t.deepEqual([...memory.read(4090, 6)], [0, 0, 0, 0, 0, 0])
  memory.free()
  t.throws(() => memory.read(0, 1), { instanceOf: KvTransferError })
})
