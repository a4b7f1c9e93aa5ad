/**
 * Request tags: a u64 (bigint) or a short string, encoded for the engine's arrival notices
 * (one type byte, then the value) and keyed for lookups.
 */
import { describeValue, invalidArgument } from './errors'

/** A request tag attached to a write: a u64 as bigint, or a short string (≤ 254 bytes). */
export type RequestTag = bigint | string

const TAG_BIGINT = 0
const TAG_STRING = 1
const MAX_TAG_STRING_BYTES = 254

/** The tag as the engine carries it; throws `ERR_INVALID_ARGUMENT` for an invalid tag. */
export function encodeTag(tag: RequestTag): Buffer {
  if (typeof tag === 'bigint') {
    if (tag < 0n || tag > 0xffff_ffff_ffff_ffffn) throw invalidArgument('tag', `${tag} is not a u64 (0..2^64-1)`)
    const out = Buffer.alloc(9)
    out[0] = TAG_BIGINT
    out.writeBigUInt64LE(tag, 1)
    return out
  }
  if (typeof tag === 'string') {
    const bytes = Buffer.from(tag, 'utf8')
    if (bytes.length > MAX_TAG_STRING_BYTES) {
      throw invalidArgument('tag', `'${tag.slice(0, 16)}…' is ${bytes.length} bytes; at most ${MAX_TAG_STRING_BYTES}`)
    }
    return Buffer.concat([Buffer.from([TAG_STRING]), bytes])
  }
  throw invalidArgument('tag', `expected a bigint or a string, got ${describeValue(tag)}`)
}

/** The tag of an arrival notice (a bigint stays a bigint). */
export function decodeTag(bytes: Buffer): RequestTag {
  if (bytes[0] === TAG_BIGINT && bytes.length === 9) return bytes.readBigUInt64LE(1)
  return bytes.subarray(1).toString('utf8')
}

/** A map key that keeps `42n` and `'42'` apart. */
export function tagKey(tag: RequestTag): string {
  return typeof tag === 'bigint' ? `n:${tag}` : `s:${tag}`
}
