/**
 * Request tags (ts/tags.ts): the engine's encoding (a type byte, then the value), its
 * limits and refusals, and the lookup keys that keep a bigint and a string apart.
 */
import test from 'ava'
import { type RequestTag, decodeTag, encodeTag, tagKey } from '../../ts/tags'
import { assertRefused } from './refusal'

const U64_MAX = 0xffff_ffff_ffff_ffffn

test('a bigint tag is type byte 0 and then the u64, little-endian', (t) => {
  t.deepEqual([...encodeTag(0x0102_0304_0506_0708n)], [0, 8, 7, 6, 5, 4, 3, 2, 1])
  t.deepEqual([...encodeTag(0n)], [0, 0, 0, 0, 0, 0, 0, 0, 0])
  t.deepEqual([...encodeTag(U64_MAX)], [0, 255, 255, 255, 255, 255, 255, 255, 255])
})

test('a string tag is type byte 1 and then its UTF-8 bytes', (t) => {
  t.deepEqual([...encodeTag('ab')], [1, 0x61, 0x62])
  t.deepEqual([...encodeTag('é')], [1, 0xc3, 0xa9])
  t.deepEqual([...encodeTag('')], [1])
})

test('a bigint outside 0..2^64-1 is refused naming it', (t) => {
  assertRefused(t, () => encodeTag(-1n), 'tag', '-1', 'not a u64')
  assertRefused(t, () => encodeTag(U64_MAX + 1n), 'tag', '18446744073709551616', 'not a u64')
})

test('a string tag of at most 254 UTF-8 bytes is taken; one byte more is refused with its size', (t) => {
  t.is(encodeTag('x'.repeat(254)).length, 255)
  assertRefused(t, () => encodeTag('x'.repeat(255)), 'tag', '255 bytes', 'at most 254', `'${'x'.repeat(16)}…'`)
})

test('the string limit counts bytes, not characters', (t) => {
  // 'é' is two bytes in UTF-8: 127 of them are 254 bytes, 128 are 256.
  t.is(encodeTag('é'.repeat(127)).length, 255)
  assertRefused(t, () => encodeTag('é'.repeat(128)), 'tag', '256 bytes')
})

test('anything but a bigint or a string is refused naming its type (and value), bytes included', (t) => {
  const refuse = (tag: unknown, type: string) =>
    assertRefused(t, () => encodeTag(tag as RequestTag), 'tag', `expected a bigint or a string, got ${type}`)
  refuse(42, 'number 42')
  refuse(Buffer.from('42'), 'object (Buffer)')
  refuse(new Uint8Array([1, 2]), 'object (Uint8Array)')
  refuse(undefined, 'undefined')
  refuse(null, 'null')
})

test('decodeTag gives back what encodeTag took: a bigint stays a bigint', (t) => {
  for (const tag of [0n, 42n, U64_MAX, '', '42', 'request-7', 'é漢🙂', 'x'.repeat(254)] as RequestTag[]) {
    const decoded = decodeTag(encodeTag(tag))
    t.is(typeof decoded, typeof tag)
    t.is(decoded, tag)
  }
})

test('a string tag whose encoding is 9 bytes long is still a string', (t) => {
  // Same length as a bigint's encoding: only the type byte tells them apart.
  const encoded = encodeTag('12345678')
  t.is(encoded.length, 9)
  t.is(decodeTag(encoded), '12345678')
})

test('tagKey keeps 42n and "42" apart, and a string cannot pose as a bigint', (t) => {
  t.not(tagKey(42n), tagKey('42'))
  t.not(tagKey(42n), tagKey('n:42'))
  t.is(tagKey(42n), tagKey(BigInt(42)))
  t.is(tagKey('req'), tagKey(`re${'q'}`))
  const keys = new Set([0n, '0', 1n, '1', '', 'n:0', 's:0'].map((tag) => tagKey(tag as RequestTag)))
  t.is(keys.size, 7)
})
