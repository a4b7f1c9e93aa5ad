/**
 * Seeded, self-describing block content. Every block a chaos call writes starts with a
 * 16-byte header naming the call that wrote it (writer, incarnation, sequence number,
 * layer, K/V, position in the call); the rest is a xorshift32 stream seeded from the
 * header. The decode side can therefore tell, for each block it was told arrived, whether
 * it holds exactly that call's bytes, nothing new (still an older call's or zeros), a
 * torn mix, or another call's bytes (a write that landed late).
 */

export const MAGIC = 0x4b565443 // 'KVTC'
const HEADER_WORDS = 4

/** What one block of one call must hold. */
export interface BlockStamp {
  /** Prefill index (0..P-1). */
  writer: number
  /** The writer process's incarnation (1 for the first start, +1 per restart). */
  incarnation: number
  /** The call's sequence number within that incarnation. */
  seq: number
  layer: number
  /** 0: key region, 1: value region. */
  kind: number
  /** Position of the block in the call's id list. */
  index: number
}

function headerWords(s: BlockStamp): [number, number, number, number] {
  return [
    MAGIC,
    ((s.writer & 0xffff) << 16) | (s.incarnation & 0xffff),
    s.seq >>> 0,
    ((s.layer & 0xff) << 24) | ((s.kind & 0xff) << 16) | (s.index & 0xffff),
  ]
}

function seedOf(words: readonly number[]): number {
  let h = 0x811c9dc5
  for (const w of words) h = Math.imul(h ^ w, 0x01000193) >>> 0
  return h || 1
}

/** Writes the block of `stamp` into `block` (its length: a multiple of 4, at least 16). */
export function fill(block: Buffer, stamp: BlockStamp): void {
  const words = headerWords(stamp)
  const n = block.length >>> 2
  for (let i = 0; i < HEADER_WORDS; i++) block.writeUInt32LE(words[i]! >>> 0, i * 4)
  let x = seedOf(words)
  for (let i = HEADER_WORDS; i < n; i++) {
    x ^= x << 13
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    block.writeUInt32LE(x, i * 4)
  }
}

/** How a block compares with what a call should have put there. */
export type BlockVerdict =
  /** Exactly the call's bytes. */
  | 'ok'
  /** Zeros: nothing was ever written there. */
  | 'missing'
  /**
   * An earlier call's intact bytes (same writer): the call's bytes never landed, or a late
   * write of that earlier call overwrote them.
   */
  | 'stale'
  /** The call's header but other bytes after it (or a broken header): a torn or corrupted block. */
  | 'torn'
  /** Another call's complete bytes, of a later or unrelated call than expected: a late or misdirected write. */
  | 'foreign'

/** The stamp a block's header names (undefined: no valid header). */
export function readStamp(block: Buffer): BlockStamp | undefined {
  if (block.readUInt32LE(0) !== MAGIC) return undefined
  const a = block.readUInt32LE(4)
  const b = block.readUInt32LE(12)
  return {
    writer: a >>> 16,
    incarnation: a & 0xffff,
    seq: block.readUInt32LE(8),
    layer: b >>> 24,
    kind: (b >>> 16) & 0xff,
    index: b & 0xffff,
  }
}

/** Whether `block` holds the complete, intact content of `stamp`. */
export function intact(block: Buffer, stamp: BlockStamp): boolean {
  const words = headerWords(stamp)
  const n = block.length >>> 2
  for (let i = 0; i < HEADER_WORDS; i++) if (block.readUInt32LE(i * 4) !== words[i]! >>> 0) return false
  let x = seedOf(words)
  for (let i = HEADER_WORDS; i < n; i++) {
    x ^= x << 13
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    if (block.readUInt32LE(i * 4) !== x) return false
  }
  return true
}

/** Classifies `block` against the call `expected`. */
export function verdict(block: Buffer, expected: BlockStamp): BlockVerdict {
  if (intact(block, expected)) return 'ok'
  const found = readStamp(block)
  if (!found) return block.every((b) => b === 0) ? 'missing' : 'torn'
  if (!intact(block, found)) return 'torn'
  const sameWriter = found.writer === expected.writer && found.layer === expected.layer && found.kind === expected.kind
  const older =
    sameWriter &&
    (found.incarnation < expected.incarnation ||
      (found.incarnation === expected.incarnation && found.seq < expected.seq))
  return older ? 'stale' : 'foreign'
}
