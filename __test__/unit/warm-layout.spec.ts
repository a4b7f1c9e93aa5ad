/**
 * The sidecar's warm re-attach layout check (ts/sidecar/warm.ts `checkSameLayout`): a
 * successor worker must share every region the way its predecessor did (a host
 * descriptor, cuMem GPU descriptors, or a legacy CUDA IPC handle) and with the same size;
 * GPU descriptor regions (PyTorch's expandable segments) are accepted like host ones.
 * Anything else is `ERR_LAYOUT_MISMATCH`, naming the region and both values.
 */
import test from 'ava'
import { KvTransferError } from '../../ts/errors'
import type { CommunicatorOptions, SharedRegion } from '../../ts/options'
import { checkSameLayout, form } from '../../ts/sidecar/warm'

const host = (bytes: number, fd = 3): SharedRegion => ({ offset: 0, bytes, fd })
const gpu = (bytes: number, fds = [4, 5], offset = 0): SharedRegion => ({
  offset,
  bytes,
  cudaVmmFds: fds,
  segmentBytes: 2 << 20,
})
const ipc = (bytes: number): SharedRegion => ({ offset: 0, bytes, cudaIpcHandle: new Uint8Array(64) })

function options(keys: SharedRegion[], values: SharedRegion[]): CommunicatorOptions {
  return {
    role: 'decode',
    gpuIdx: 0,
    blockNumber: 64,
    blockBytes: 65536,
    localKeyCache: keys,
    localValueCache: values,
  } as CommunicatorOptions
}

test('the form of a shared region', (t) => {
  t.is(form(host(8)), 'fd')
  t.is(form(gpu(8)), 'cudaVmmFds')
  t.is(form(ipc(8)), 'cudaIpcHandle')
})

test('GPU descriptor regions re-attach with other descriptors, offsets and segment counts', (t) => {
  const kept = options([gpu(4 << 20), gpu(4 << 20)], [gpu(4 << 20), gpu(4 << 20)])
  const given = options([gpu(4 << 20, [9]), gpu(4 << 20, [10, 11, 12], 2 << 20)], [gpu(4 << 20), gpu(4 << 20)])
  t.notThrows(() => checkSameLayout('decode/tp0', kept, given))
  // Mixed host and GPU regions, each kind as before.
  t.notThrows(() => checkSameLayout('s', options([host(64), gpu(64)], []), options([host(64, 7), gpu(64, [8])], [])))
})

test('a region shared another way, or of another size, is a layout mismatch naming it', (t) => {
  const kept = options([gpu(4 << 20), gpu(4 << 20)], [])
  for (const [given, field, was, now] of [
    [options([gpu(4 << 20), host(4 << 20)], []), "localKeyCache[1]'s form", 'cudaVmmFds', 'fd'],
    [options([ipc(4 << 20), gpu(4 << 20)], []), "localKeyCache[0]'s form", 'cudaVmmFds', 'cudaIpcHandle'],
    [options([gpu(4 << 20), gpu(2 << 20)], []), 'localKeyCache[1].bytes', String(4 << 20), String(2 << 20)],
    [options([gpu(4 << 20)], []), 'the number of localKeyCache regions', '2', '1'],
  ] as const) {
    const error = t.throws(() => checkSameLayout('decode/tp0', kept, given), { instanceOf: KvTransferError })
    t.is(error?.code, 'ERR_LAYOUT_MISMATCH')
    for (const mention of [field, was, now, 'decode/tp0']) {
      t.true(error?.message.includes(mention), `${error?.message} should mention ${mention}`)
    }
  }
})

test('a re-attach asking for another transport is a layout mismatch naming both', (t) => {
  const kept = { ...options([gpu(4 << 20)], []), transport: 'nvlink' } as CommunicatorOptions
  const given = { ...options([gpu(4 << 20)], []), transport: 'tcp' } as CommunicatorOptions
  const error = t.throws(() => checkSameLayout('decode/tp0', kept, given), { instanceOf: KvTransferError })
  t.is(error?.code, 'ERR_LAYOUT_MISMATCH')
  for (const mention of ['transport', '"nvlink"', '"tcp"', 'decode/tp0']) {
    t.true(error?.message.includes(mention), `${error?.message} should mention ${mention}`)
  }
  t.notThrows(() => checkSameLayout('decode/tp0', kept, { ...given, transport: 'nvlink' }))
})
