/**
 * The chaos run's block verdicts (scripts/chaos/pattern.ts): what the decode side reports
 * for each block a call said it wrote.
 */
import test from 'ava'
import { type BlockStamp, fill, readStamp, verdict } from '../../scripts/chaos/pattern.js'

const BLOCK = 256
const stamp: BlockStamp = { writer: 1, incarnation: 3, seq: 40, layer: 2, kind: 1, index: 5 }
const filled = (s: BlockStamp) => {
  const b = Buffer.alloc(BLOCK)
  fill(b, s)
  return b
}

test('a block holding exactly the call its header names is ok, and names that call', (t) => {
  const b = filled(stamp)
  t.is(verdict(b, stamp), 'ok')
  t.deepEqual(readStamp(b), stamp)
})

test('zeros are missing; an earlier call of the same writer is stale', (t) => {
  t.is(verdict(Buffer.alloc(BLOCK), stamp), 'missing')
  t.is(verdict(filled({ ...stamp, seq: 39 }), stamp), 'stale')
  t.is(verdict(filled({ ...stamp, incarnation: 2, seq: 900 }), stamp), 'stale')
})

test('one flipped byte anywhere is torn; a header over other bytes is torn', (t) => {
  for (const at of [0, 7, 16, BLOCK - 1]) {
    const b = filled(stamp)
    b[at] ^= 0x40
    t.not(verdict(b, stamp), 'ok', `byte ${at}`)
  }
  const b = filled(stamp)
  b[100] ^= 1
  t.is(verdict(b, stamp), 'torn')
  const mixed = filled(stamp)
  filled({ ...stamp, seq: 39 }).copy(mixed, 128, 128)
  t.is(verdict(mixed, stamp), 'torn')
})

test("a later call's or another writer's block is foreign", (t) => {
  t.is(verdict(filled({ ...stamp, seq: 41 }), stamp), 'foreign')
  t.is(verdict(filled({ ...stamp, writer: 0 }), stamp), 'foreign')
  t.is(verdict(filled({ ...stamp, index: 4 }), stamp), 'foreign')
})
