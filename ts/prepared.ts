/**
 * `PreparedBlocks`: a block list validated and planned once (`comm.prepareBlocks`), written
 * for any layer with `comm.writeCache(peer, prepared, layerIdx, options)`.
 */
import type { ExternalObject, NativePreparedBlocks } from '../index.js'

/**
 * A block list validated and planned once for one peer. Pass it to `writeCache` in place
 * of the two id lists: no id is validated or coalesced again, whatever the layer. Using it
 * on another communicator or with another peer (`ERR_INVALID_ARGUMENT`), or after that
 * peer reconnected with a different blockNumber (`ERR_LAYOUT_MISMATCH`), is refused and
 * writes nothing (the engine checks it).
 */
export class PreparedBlocks {
  /** @internal */
  readonly native: NativePreparedBlocks
  /** The peer (`host:port`) the list was prepared for. */
  readonly peer: string
  /** Block ids in the list. */
  readonly blocks: number
  /** Coalesced runs: copies per region and layer. */
  readonly runs: number
  /** @internal What the native `writePrepared` takes for this list. */
  readonly list: ExternalObject<'PreparedList'>

  private constructor(native: NativePreparedBlocks) {
    this.native = native
    this.peer = native.peer
    this.blocks = native.blocks
    this.runs = native.runs
    this.list = native.list
  }

  /** @internal Made by `comm.prepareBlocks`. */
  static of(native: NativePreparedBlocks): PreparedBlocks {
    return new PreparedBlocks(native)
  }
}
