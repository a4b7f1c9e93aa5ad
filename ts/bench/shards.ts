/**
 * `kvtransfer bench --tp P:D [--block-layout NHD:T]`: tensor-parallel shards on the grid.
 * The bench measures one pairing, prefill rank 0 of P writing to decode rank 0 of D. A
 * grid size is the bytes one block moves (the shard), so GB/s compare with plain writes at
 * the same size: with P > D the decode blocks are P/D × that size, with D > P the prefill
 * blocks are D/P × that size.
 */
import type { Region } from './regions'

export interface TpSetting {
  prefill: number
  decode: number
  /** Token rows per block (`blockLayout: { order: 'NHD', tokensPerBlock }`); 0: head-major. */
  tokensPerBlock: number
}

/** `P:D`, both sizes in 1..1024, one a multiple of the other. */
export function parseTp(text: string): Pick<TpSetting, 'prefill' | 'decode'> {
  const m = /^(\d+):(\d+)$/.exec(text)
  const [p, d] = m ? [Number(m[1]), Number(m[2])] : [0, 0]
  if (!(p >= 1 && p <= 1024 && d >= 1 && d <= 1024) || (p % d !== 0 && d % p !== 0))
    throw new Error(`expects P:D (sizes in 1..1024, one a multiple of the other), got '${text}'`)
  return { prefill: p, decode: d }
}

/** `HND` or `NHD:T` → tokens per block (0: head-major). */
export function parseBlockLayout(text: string): number {
  if (text === 'HND') return 0
  const m = /^NHD:(\d+)$/.exec(text)
  if (!m || Number(m[1]) < 1) throw new Error(`expects HND or NHD:T (T tokens per block), got '${text}'`)
  return Number(m[1])
}

/** Both sides' block bytes when each block moves `moved` bytes, and the shard's row cut. */
export function shardLayout(tp: TpSetting, moved: number) {
  const rows = Math.max(1, tp.tokensPerBlock)
  return {
    prefillBlockBytes: tp.decode > tp.prefill ? (moved * tp.decode) / tp.prefill : moved,
    decodeBlockBytes: tp.prefill > tp.decode ? (moved * tp.prefill) / tp.decode : moved,
    rows,
    /** Bytes of the shard per row (rank 0's part: at the start of each row on both sides). */
    piece: moved / rows,
  }
}

/** Rank 0's shard of block `block` (`blockBytes` bytes of `rows` rows): `piece` bytes of each row. */
export function shardOf(region: Region, block: number, blockBytes: number, rows: number, piece: number): Uint8Array {
  const row = blockBytes / rows
  const start = block * blockBytes
  if (piece === blockBytes) return region.bytes(start, blockBytes)
  return Buffer.concat(Array.from({ length: rows }, (_, t) => region.bytes(start + t * row, piece)))
}

/** The communicator options of one side of the pairing. */
export function tpOptions(tp: TpSetting, role: 'prefill' | 'decode') {
  return {
    tpSize: role === 'prefill' ? tp.prefill : tp.decode,
    tpRank: 0,
    blockLayout:
      tp.tokensPerBlock > 0 ? { order: 'NHD' as const, tokensPerBlock: tp.tokensPerBlock } : { order: 'HND' as const },
  }
}
