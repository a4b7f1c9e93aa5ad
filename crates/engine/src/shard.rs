//! Tensor-parallel shards: which bytes of each block a writer moves, and where in the
//! receiver's block they land, when the two sides split the attention heads over different
//! numbers of ranks. Planned once per peer at connect ([`Shard::between`]); every transport
//! gets the result through the copies it is handed (`transport::job::copy_op`).
//!
//! Head-major blocks (each block is its ranks' shards one after the other, FastDeploy's
//! layout), writer TP `w`, receiver TP `v`:
//! - `w > v`, `r = w/v`: the receiver's block is `r` writer blocks; writer rank `i` writes its
//!   whole block into receiver rank `⌊i/r⌋` at part `i mod r`.
//! - `v > w`, `r = v/w`: the writer's block is `r` receiver blocks; to receiver rank
//!   `k = i×r + j` writer rank `i` writes part `j` of its block as that rank's whole block.
//! - equal sizes (or replicated caches, MLA): whole blocks.
//!
//! Token-major blocks (`tokensPerBlock` rows of all heads): the same rule per token row, so a
//! block moves as `tokensPerBlock` segments with a stride on each side.

use crate::error::{Error, Result};
use crate::layout::CacheLayout;

/// Largest tensor-parallel size accepted (bounds the descriptor field).
pub const MAX_TP_SIZE: u32 = 1024;

/// How a block's bytes are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlockOrder {
    /// Heads outermost (HND): a rank's shard of a block is one contiguous range.
    #[default]
    HeadMajor,
    /// Tokens outermost (NHD): a rank's shard is one range per token row.
    TokenMajor {
        /// Token rows per block; blockBytes (and scaleBlockBytes) must be multiples of it.
        tokens_per_block: u32,
    },
}

impl BlockOrder {
    /// Descriptor encoding: 0 for head-major, else tokens per block.
    pub fn tokens_per_block(self) -> u32 {
        match self {
            BlockOrder::HeadMajor => 0,
            BlockOrder::TokenMajor { tokens_per_block } => tokens_per_block,
        }
    }

    /// Inverse of [`tokens_per_block`](Self::tokens_per_block): 0 is head-major.
    pub fn from_tokens_per_block(tokens: u32) -> Self {
        if tokens == 0 {
            BlockOrder::HeadMajor
        } else {
            BlockOrder::TokenMajor {
                tokens_per_block: tokens,
            }
        }
    }

    fn describe(self) -> String {
        match self {
            BlockOrder::HeadMajor => "head-major (HND)".into(),
            BlockOrder::TokenMajor { tokens_per_block } => {
                format!("token-major (NHD, {tokens_per_block} tokens per block)")
            }
        }
    }
}

/// One side's tensor-parallel setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpOptions {
    /// Ranks the heads are split over (1: no split).
    pub size: u32,
    /// This side's rank, `0..size`.
    pub rank: u32,
    /// Every rank holds the whole cache (MLA's latent cache): whole blocks, any pairing.
    pub replicated: bool,
    /// How this side's blocks are ordered (heads or tokens outermost).
    pub order: BlockOrder,
}

impl Default for TpOptions {
    fn default() -> Self {
        TpOptions {
            size: 1,
            rank: 0,
            replicated: false,
            order: BlockOrder::HeadMajor,
        }
    }
}

/// A tensor-parallel size (`tpSize`, or the `dstTpSize` a connect expects) is in
/// 1..=[`MAX_TP_SIZE`].
pub fn check_tp_size(name: &'static str, size: u32) -> Result<()> {
    if size == 0 || size > MAX_TP_SIZE {
        return Err(Error::invalid(
            name,
            format!("{size} given; it must be in 1..={MAX_TP_SIZE}"),
        ));
    }
    Ok(())
}

impl TpOptions {
    /// Checks the setting against this side's layout (at construction).
    pub fn check(&self, layout: &CacheLayout) -> Result<()> {
        check_tp_size("tpSize", self.size)?;
        if self.rank >= self.size {
            return Err(Error::invalid(
                "tpRank",
                format!(
                    "{} given; with tpSize {} it must be in 0..{}",
                    self.rank, self.size, self.size
                ),
            ));
        }
        if let BlockOrder::TokenMajor { tokens_per_block } = self.order {
            for (name, bytes) in [
                ("blockBytes", layout.block_bytes),
                ("scaleBlockBytes", layout.scale_block_bytes),
            ] {
                if !bytes.is_multiple_of(u64::from(tokens_per_block)) {
                    return Err(Error::invalid(
                        "blockLayout.tokensPerBlock",
                        format!(
                            "{tokens_per_block} given but {name} {bytes} is not a multiple of it: a token-major block is tokensPerBlock equal rows"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Where one kind's bytes go for a peer: per block, `pieces` segments of `piece` bytes,
/// segment `s` of local block `b` at `b × local_block + local_offset + s × local_stride`,
/// landing at `b' × remote_block + remote_offset + s × remote_stride` of remote block `b'`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes of one local block (the distance between consecutive local blocks).
    pub local_block: u64,
    /// Bytes of one remote block (the distance between consecutive remote blocks).
    pub remote_block: u64,
    /// Where the first segment starts inside a local block, in bytes.
    pub local_offset: u64,
    /// Where the first segment lands inside a remote block, in bytes.
    pub remote_offset: u64,
    /// Bytes of one segment.
    pub piece: u64,
    /// Segments per block (1 for head-major blocks, one per token row for token-major).
    pub pieces: u32,
    /// Bytes between consecutive segments in a local block.
    pub local_stride: u64,
    /// Bytes between consecutive segments in a remote block.
    pub remote_stride: u64,
}

impl Geometry {
    /// Whole blocks of `block_bytes` on both sides (consecutive blocks are contiguous).
    pub const fn whole(block_bytes: u64) -> Self {
        Geometry {
            local_block: block_bytes,
            remote_block: block_bytes,
            local_offset: 0,
            remote_offset: 0,
            piece: block_bytes,
            pieces: 1,
            local_stride: block_bytes,
            remote_stride: block_bytes,
        }
    }

    /// Consecutive blocks form one contiguous range on both sides.
    #[inline]
    pub fn is_whole(&self) -> bool {
        self.pieces == 1
            && self.piece == self.local_block
            && self.piece == self.remote_block
            && self.local_offset == 0
            && self.remote_offset == 0
    }

    /// Bytes one block moves.
    #[inline]
    pub fn bytes_per_block(&self) -> u64 {
        self.piece * u64::from(self.pieces)
    }
}

/// A peer's shard plan: one geometry for K/V blocks and one for scale blocks, and what of
/// the receiver's shard the writer covers (what its arrival notices say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// The geometry of key and value blocks.
    pub kv: Geometry,
    /// The geometry of key-scale and value-scale blocks.
    pub scale: Geometry,
    /// Which writer this is and which part of the receiver's blocks it writes.
    pub cover: Cover,
}

/// What one writer writes of a receiver's blocks under the shard rules: the writer's rank
/// and size, and part `part` of `parts` equal parts of each receiver block (per token row
/// for token-major blocks). A receiver's block is complete once every part of it arrived:
/// `parts` is 1 for equal sizes, a receiver with more ranks than the writer, and replicated
/// caches; `writer size / receiver size` for a writer with more ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cover {
    /// The writer's tpRank.
    pub writer_rank: u32,
    /// The writer's tpSize.
    pub writer_size: u32,
    /// The part of each receiver block this writer writes, `0..parts`.
    pub part: u32,
    /// Parts a receiver block is made of (writers that must write it).
    pub parts: u32,
}

impl Cover {
    /// One writer of tpSize 1 writing whole blocks.
    pub const WHOLE: Cover = Cover {
        writer_rank: 0,
        writer_size: 1,
        part: 0,
        parts: 1,
    };
}

/// How the writer's block is cut against the receiver's: parts of each side's block (or
/// token row) and which part this pairing moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cut {
    local_parts: u64,
    local_part: u64,
    remote_parts: u64,
    remote_part: u64,
    /// Rows per block (1 unless token-major with a split).
    rows: u64,
}

impl Shard {
    /// Whole blocks of the layout's sizes (no split; what equal TP and replicated caches get).
    pub fn whole(layout: &CacheLayout) -> Self {
        Shard {
            kv: Geometry::whole(layout.block_bytes),
            scale: Geometry::whole(layout.scale_block_bytes),
            cover: Cover::WHOLE,
        }
    }

    /// The geometry of kind `kind` of `layout` (K/V first, then the scales).
    #[inline]
    pub fn geometry(&self, layout: &CacheLayout, kind: u32) -> &Geometry {
        if kind < layout.cache_kinds() {
            &self.kv
        } else {
            &self.scale
        }
    }

    /// Bytes one listed block moves over every kind of `layout`.
    pub fn bytes_per_block(&self, layout: &CacheLayout) -> u64 {
        (0..layout.kinds())
            .map(|kind| self.geometry(layout, kind).bytes_per_block())
            .sum()
    }

    /// The plan for `writer` writing into `receiver`, or why they cannot pair (sizes that
    /// do not divide, ranks that do not pair, block sizes against the rule, different block
    /// orders or replication). `here` and `peer` name the two sides in errors; `here_is_writer`
    /// says which of them the writer is.
    pub fn between(
        writer: (&TpOptions, &CacheLayout),
        receiver: (&TpOptions, &CacheLayout),
        here: &str,
        peer: &str,
        here_is_writer: bool,
    ) -> Result<Shard> {
        let ((w, w_layout), (v, v_layout)) = (writer, receiver);
        let (w_name, v_name) = if here_is_writer {
            (here, peer)
        } else {
            (peer, here)
        };
        let refuse = |reason: String| Error::TensorParallel {
            here: here.to_string(),
            peer: peer.to_string(),
            reason,
        };
        if w.replicated != v.replicated {
            return Err(refuse(format!(
                "kvReplicated is {} on the writer {w_name} but {} on the receiver {v_name}; both must declare the same cache",
                w.replicated, v.replicated
            )));
        }
        if w.order != v.order {
            return Err(refuse(format!(
                "blockLayout is {} on the writer {w_name} but {} on the receiver {v_name}",
                w.order.describe(),
                v.order.describe()
            )));
        }
        let cut = if w.replicated || w.size == v.size {
            if !w.replicated && w.rank != v.rank {
                return Err(refuse(format!(
                    "writer {w_name} is tpRank {} of tpSize {} and receiver {v_name} is tpRank {} of tpSize {}: with equal sizes rank i writes to rank i",
                    w.rank, w.size, v.rank, v.size
                )));
            }
            None
        } else {
            // The larger side's rank k pairs with the smaller side's rank k / r, as part k mod r.
            let writer_larger = w.size > v.size;
            let ((big, big_name), (small, small_name)) = if writer_larger {
                ((w, w_name), (v, v_name))
            } else {
                ((v, v_name), (w, w_name))
            };
            let r = Self::ratio(big.size, small.size, &refuse)?;
            if big.rank / r != small.rank {
                let pairs_with = if writer_larger {
                    "writes to receiver rank"
                } else {
                    "takes its shard from writer rank"
                };
                return Err(refuse(format!(
                    "{} {big_name} is tpRank {} of tpSize {}, which {pairs_with} {} (tpRank / {r}), but {small_name} is tpRank {} of tpSize {}",
                    if writer_larger { "writer" } else { "receiver" },
                    big.rank, big.size, big.rank / r, small.rank, small.size
                )));
            }
            let (parts, part) = (u64::from(r), u64::from(big.rank % r));
            Some(if writer_larger {
                Cut {
                    local_parts: 1,
                    local_part: 0,
                    remote_parts: parts,
                    remote_part: part,
                    rows: 1,
                }
            } else {
                Cut {
                    local_parts: parts,
                    local_part: part,
                    remote_parts: 1,
                    remote_part: 0,
                    rows: 1,
                }
            })
        };
        let writer_cover = |part: u64, parts: u64| Cover {
            writer_rank: w.rank,
            writer_size: w.size,
            part: part as u32,
            parts: parts as u32,
        };
        let Some(mut cut) = cut else {
            Self::same_bytes(w_layout, v_layout, here_is_writer, here, peer)?;
            return Ok(Shard {
                cover: writer_cover(0, 1),
                ..Shard::whole(w_layout)
            });
        };
        if let BlockOrder::TokenMajor { tokens_per_block } = w.order {
            cut.rows = tokens_per_block.into();
        }
        let kv = Self::cut_geometry(
            cut,
            w_layout.block_bytes,
            v_layout.block_bytes,
            "blockBytes",
            (w_name, v_name),
            (w.size, v.size),
            &refuse,
        )?;
        let scale = Self::cut_geometry(
            cut,
            w_layout.scale_block_bytes,
            v_layout.scale_block_bytes,
            "scaleBlockBytes",
            (w_name, v_name),
            (w.size, v.size),
            &refuse,
        )?;
        Ok(Shard {
            kv,
            scale,
            cover: writer_cover(cut.remote_part, cut.remote_parts),
        })
    }

    fn ratio(larger: u32, smaller: u32, refuse: &impl Fn(String) -> Error) -> Result<u32> {
        if !larger.is_multiple_of(smaller) {
            return Err(refuse(format!(
                "tpSize {larger} is not a multiple of tpSize {smaller}: one side's ranks must split the other's evenly"
            )));
        }
        Ok(larger / smaller)
    }

    /// Equal TP or replicated: both sides' block sizes must be equal.
    fn same_bytes(
        w: &CacheLayout,
        v: &CacheLayout,
        here_is_writer: bool,
        here: &str,
        peer: &str,
    ) -> Result<()> {
        let (local, remote) = if here_is_writer { (w, v) } else { (v, w) };
        for (what, l, r) in [
            ("blockBytes", local.block_bytes, remote.block_bytes),
            (
                "scaleBlockBytes",
                local.scale_block_bytes,
                remote.scale_block_bytes,
            ),
        ] {
            if l != r {
                return Err(Error::LayoutMismatch {
                    here: here.to_string(),
                    peer: peer.to_string(),
                    what,
                    local: l,
                    remote: r,
                });
            }
        }
        Ok(())
    }

    /// The geometry of one kind under `cut`: the part of each row (block, or token row) the
    /// two sides share must be the same size, which is the shard rule on block bytes.
    fn cut_geometry(
        cut: Cut,
        writer_block: u64,
        receiver_block: u64,
        what: &str,
        (w_name, v_name): (&str, &str),
        (w_size, v_size): (u32, u32),
        refuse: &impl Fn(String) -> Error,
    ) -> Result<Geometry> {
        if writer_block == 0 && receiver_block == 0 {
            return Ok(Geometry::whole(0));
        }
        let expected = |block: u64, parts: u64, other_parts: u64| block / parts * other_parts;
        let rule_holds = writer_block.is_multiple_of(cut.local_parts * cut.rows)
            && receiver_block.is_multiple_of(cut.remote_parts * cut.rows)
            && writer_block / cut.local_parts == receiver_block / cut.remote_parts;
        if !rule_holds {
            let wanted = if cut.remote_parts > 1 {
                format!(
                    "the receiver's {what} must be {} × the writer's ({} here)",
                    cut.remote_parts,
                    expected(writer_block, cut.local_parts, cut.remote_parts)
                )
            } else {
                format!(
                    "the writer's {what} must be {} × the receiver's ({} here)",
                    cut.local_parts,
                    expected(receiver_block, cut.remote_parts, cut.local_parts)
                )
            };
            return Err(refuse(format!(
                "{what} is {writer_block} on the writer {w_name} (tpSize {w_size}) and {receiver_block} on the receiver {v_name} (tpSize {v_size}); {wanted}{}",
                if cut.rows > 1 {
                    format!(", and both multiples of {} token rows", cut.rows)
                } else {
                    String::new()
                }
            )));
        }
        let local_row = writer_block / cut.rows;
        let remote_row = receiver_block / cut.rows;
        let piece = local_row / cut.local_parts;
        Ok(Geometry {
            local_block: writer_block,
            remote_block: receiver_block,
            local_offset: cut.local_part * piece,
            remote_offset: cut.remote_part * piece,
            piece,
            pieces: cut.rows as u32,
            local_stride: local_row,
            remote_stride: remote_row,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(size: u32, rank: u32) -> TpOptions {
        TpOptions {
            size,
            rank,
            ..TpOptions::default()
        }
    }

    fn layout(block_bytes: u64, scale: u64) -> CacheLayout {
        CacheLayout::new(2, true, 8, block_bytes)
            .unwrap()
            .with_scales(scale)
            .unwrap()
    }

    fn plan(w: TpOptions, wl: CacheLayout, v: TpOptions, vl: CacheLayout) -> Result<Shard> {
        Shard::between((&w, &wl), (&v, &vl), "writer", "receiver", true)
    }

    #[test]
    fn prefill_larger_writes_its_block_at_its_part_of_the_decode_block() {
        // 4 → 2: r = 2; rank 3 writes to decode rank 1 at part 1.
        let shard = plan(tp(4, 3), layout(256, 16), tp(2, 1), layout(512, 32)).unwrap();
        assert_eq!(
            shard.kv,
            Geometry {
                local_block: 256,
                remote_block: 512,
                local_offset: 0,
                remote_offset: 256,
                piece: 256,
                pieces: 1,
                local_stride: 256,
                remote_stride: 512,
            }
        );
        assert_eq!((shard.scale.remote_offset, shard.scale.piece), (16, 16));
        assert!(!shard.kv.is_whole());
        // FastDeploy's rule with d = 1: base + rid × bb × p + bb × i.
        let shard = plan(tp(2, 1), layout(100, 0), tp(1, 0), layout(200, 0)).unwrap();
        assert_eq!((shard.kv.remote_block, shard.kv.remote_offset), (200, 100));
        assert_eq!(shard.scale, Geometry::whole(0));
    }

    #[test]
    fn decode_larger_takes_a_slice_of_the_prefill_block() {
        // 2 → 4: r = 2; decode rank 3 = 1 × 2 + 1 takes bytes [256, 512) of rank 1's block.
        let shard = plan(tp(2, 1), layout(512, 32), tp(4, 3), layout(256, 16)).unwrap();
        assert_eq!(
            (
                shard.kv.local_offset,
                shard.kv.piece,
                shard.kv.remote_offset
            ),
            (256, 256, 0)
        );
        assert_eq!((shard.kv.local_block, shard.kv.remote_block), (512, 256));
        assert_eq!((shard.scale.local_offset, shard.scale.piece), (16, 16));
        assert_eq!(shard.bytes_per_block(&layout(512, 32)), 2 * 256 + 2 * 16);
    }

    #[test]
    fn equal_and_replicated_move_whole_blocks() {
        let shard = plan(tp(2, 1), layout(64, 0), tp(2, 1), layout(64, 0)).unwrap();
        assert!(shard.kv.is_whole());
        let mla = TpOptions {
            replicated: true,
            ..tp(4, 3)
        };
        let decode = TpOptions {
            replicated: true,
            ..tp(2, 0)
        };
        let shard = plan(mla, layout(64, 8), decode, layout(64, 8)).unwrap();
        assert!(shard.kv.is_whole() && shard.scale.is_whole());
        let err = plan(mla, layout(64, 8), decode, layout(128, 8)).unwrap_err();
        assert_eq!(err.code(), "ERR_LAYOUT_MISMATCH");
    }

    #[test]
    fn token_major_moves_one_segment_per_token_row() {
        let nhd = |size, rank| TpOptions {
            order: BlockOrder::TokenMajor {
                tokens_per_block: 4,
            },
            ..tp(size, rank)
        };
        // 2 → 1: prefill rows of 16 bytes into decode rows of 32, at byte 16 for rank 1.
        let shard = plan(nhd(2, 1), layout(64, 0), nhd(1, 0), layout(128, 0)).unwrap();
        assert_eq!(
            shard.kv,
            Geometry {
                local_block: 64,
                remote_block: 128,
                local_offset: 0,
                remote_offset: 16,
                piece: 16,
                pieces: 4,
                local_stride: 16,
                remote_stride: 32,
            }
        );
        // 1 → 2: decode rank 1 takes the second half of every 32-byte row.
        let shard = plan(nhd(1, 0), layout(128, 0), nhd(2, 1), layout(64, 0)).unwrap();
        assert_eq!(
            (
                shard.kv.local_offset,
                shard.kv.local_stride,
                shard.kv.remote_stride
            ),
            (16, 32, 16)
        );
        let err = plan(nhd(1, 0), layout(128, 0), tp(2, 1), layout(64, 0)).unwrap_err();
        assert!(err.to_string().contains("token-major"), "{err}");
    }

    #[test]
    fn refusals_name_the_values() {
        let cases = [
            (
                (3, 0, 64, 0),
                (2, 0, 64, 0),
                "tpSize 3 is not a multiple of tpSize 2",
            ),
            // 4 → 2: rank 2 belongs to decode rank 1, not 0.
            ((4, 2, 64, 0), (2, 0, 128, 0), "writes to receiver rank 1"),
            // 2 → 4: decode rank 2 takes its shard from prefill rank 1.
            (
                (2, 0, 64, 0),
                (4, 2, 32, 0),
                "takes its shard from writer rank 1",
            ),
            (
                (2, 0, 64, 0),
                (1, 0, 100, 0),
                "the receiver's blockBytes must be 2 × the writer's (128 here)",
            ),
            ((2, 0, 64, 8), (1, 0, 128, 8), "scaleBlockBytes is 8"),
            (
                (1, 0, 64, 0),
                (2, 0, 64, 0),
                "writer's blockBytes must be 2 ×",
            ),
            ((2, 1, 64, 0), (2, 0, 64, 0), "rank i writes to rank i"),
        ];
        for ((ws, wr, wb, wsc), (vs, vr, vb, vsc), wanted) in cases {
            let err = plan(tp(ws, wr), layout(wb, wsc), tp(vs, vr), layout(vb, vsc)).unwrap_err();
            assert_eq!(err.code(), "ERR_TP_MISMATCH", "{err}");
            assert!(err.to_string().contains(wanted), "{err}");
        }
        let err = plan(tp(1, 0), layout(64, 0), tp(1, 0), layout(32, 0)).unwrap_err();
        assert_eq!(err.code(), "ERR_LAYOUT_MISMATCH");
    }

    #[test]
    fn options_are_checked_against_the_layout() {
        assert!(tp(1, 0).check(&layout(64, 0)).is_ok());
        assert!(tp(0, 0).check(&layout(64, 0)).is_err());
        let err = tp(2, 2).check(&layout(64, 0)).unwrap_err();
        assert!(err.to_string().contains("tpRank"), "{err}");
        let nhd = TpOptions {
            order: BlockOrder::TokenMajor {
                tokens_per_block: 3,
            },
            ..tp(2, 0)
        };
        let err = nhd.check(&layout(64, 0)).unwrap_err();
        assert!(err.to_string().contains("blockBytes 64"), "{err}");
    }

    #[test]
    fn covers_say_which_part_of_the_receiver_block_each_writer_writes() {
        let cover = |w: TpOptions, wb: u64, v: TpOptions, vb: u64| {
            let c = plan(w, layout(wb, 0), v, layout(vb, 0)).unwrap().cover;
            (c.writer_rank, c.writer_size, c.part, c.parts)
        };
        // 2 → 1: two writers, each half of the decode block.
        assert_eq!(cover(tp(2, 1), 256, tp(1, 0), 512), (1, 2, 1, 2));
        // 4 → 2: writer rank 2 is part 0 of decode rank 1's block.
        assert_eq!(cover(tp(4, 2), 256, tp(2, 1), 512), (2, 4, 0, 2));
        // 1 → 2: the writer covers the decode rank's whole block.
        assert_eq!(cover(tp(1, 0), 512, tp(2, 1), 256), (0, 1, 0, 1));
        // Equal sizes and replicated (MLA) caches: whole blocks from one writer.
        assert_eq!(cover(tp(2, 1), 256, tp(2, 1), 256), (1, 2, 0, 1));
        let mla = |size, rank| TpOptions {
            replicated: true,
            ..tp(size, rank)
        };
        assert_eq!(cover(mla(4, 3), 256, mla(2, 0), 256), (3, 4, 0, 1));
    }
}
