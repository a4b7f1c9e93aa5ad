//! What a transport is handed: one planned call (`WriteJob`), the copies it expands to,
//! and what the receiving side is told when a tagged call has landed.

use super::completion::{Done, PooledRuns};
use crate::error::Error;
use crate::layout::RegionTable;
use crate::plan::Run;
use crate::shard::{Cover, Shard};
use crate::wire::Notice;

/// A borrowed view of what a job writes: what frame and work-request builders take (and
/// what benches and tests without a job build from).
#[derive(Debug, Clone, Copy)]
pub struct JobView<'a> {
    /// The call's blocks, coalesced into runs contiguous on both sides.
    pub runs: &'a [Run],
    /// The layer written.
    pub layer: u32,
    /// Blocks in the call (before coalescing), reported with the arrival notice.
    pub blocks: u32,
    /// Which bytes of each block go where on the peer.
    pub shard: &'a Shard,
    /// The encoded arrival notice (`wire::Notice`): when present the receiver gets it
    /// after the bytes.
    pub notice: Option<&'a [u8]>,
}

impl JobPlan {
    pub fn view(&self) -> JobView<'_> {
        JobView {
            runs: &self.runs,
            layer: self.layer,
            blocks: self.blocks,
            shard: &self.shard,
            notice: self.notice.as_deref(),
        }
    }

    /// The call's request tag, read from its encoded notice (fences match calls by it).
    pub fn tag(&self) -> Option<&[u8]> {
        self.notice.as_deref().map(crate::wire::notice_tag)
    }
}

/// Largest request tag carried with an arrival notice.
pub const MAX_TAG_BYTES: usize = crate::wire::MAX_NOTICE_TAG_BYTES;

/// Refuses a tag longer than [`MAX_TAG_BYTES`].
pub(crate) fn check_tag(tag: &Option<Vec<u8>>) -> crate::error::Result<()> {
    match tag {
        Some(tag) if tag.len() > MAX_TAG_BYTES => Err(Error::invalid(
            "tag",
            format!("{} bytes given; at most {MAX_TAG_BYTES}", tag.len()),
        )),
        _ => Ok(()),
    }
}

/// One `writeCache` call, planned and owned by the transport until it completes.
#[derive(Debug)]
pub struct WriteJob {
    /// What it writes.
    pub plan: JobPlan,
    pub done: Done,
}

/// What a job writes: its planned runs of one layer, the shard rule, its tag. Transports
/// take it by reference where they build frames or work requests, apart from the job's
/// completion (`WriteJob::done`), which they keep until the peer has every byte.
#[derive(Debug)]
pub struct JobPlan {
    pub runs: PooledRuns,
    pub layer: u32,
    /// Blocks in the call (before coalescing), reported with the arrival notice.
    pub blocks: u32,
    /// Which bytes of each block go where on the peer (tensor-parallel shards; whole
    /// blocks without them).
    pub shard: Shard,
    /// The encoded arrival notice (`wire::Notice`: tag, layer, blocks, the writer's shard
    /// cover, the checksum): when present the receiver gets it after the bytes. Transports
    /// carry it as it is.
    pub notice: Option<Vec<u8>>,
    /// A checksummed call's landing (`wire::Landing`), for links whose receiver finds the
    /// call's bytes from it (`ReceiverChecks::landing_limit`); carried with the notice.
    pub landing: Option<Vec<u8>>,
    /// `delivery: 'acked'`: the job completes only once the receiving engine answered it
    /// (after it took the notice, for a tagged call). Set only where the link's
    /// `receiver_checks().answers_acked_calls` says it can.
    pub acked: bool,
}

/// What the receiving side learns when a tagged call has landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// The writer's name (as it gave it at construction).
    pub peer: String,
    /// The call's request tag.
    pub tag: Vec<u8>,
    /// The layer the call wrote.
    pub layer: u32,
    /// Blocks the call wrote.
    pub blocks: u32,
    /// The writer (tpRank/tpSize) and the part of this side's blocks it wrote.
    pub cover: Cover,
    /// Whether the receiver checked the call's checksum, and what it found.
    pub checksum: ChecksumCheck,
}

impl Arrival {
    /// The arrival a decoded notice from `peer` reports, with the receiver's `checksum` check.
    pub fn of(peer: &str, notice: &Notice<'_>, checksum: ChecksumCheck) -> Arrival {
        Arrival {
            peer: peer.to_string(),
            tag: notice.tag.to_vec(),
            layer: notice.layer,
            blocks: notice.blocks,
            cover: notice.cover,
            checksum,
        }
    }
}

/// The receiver's check of a call's checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumCheck {
    /// The call carried none.
    Absent,
    /// The bytes in this side's memory have the writer's checksum.
    Verified,
    /// The call carried one, but its bytes landed where this side cannot sum them on the
    /// CPU (GPU memory): reported as not verified.
    Unchecked,
    /// They do not: the arrival is an error (`ERR_CHECKSUM_MISMATCH`).
    Mismatch {
        /// What the writer summed.
        expected: u32,
        /// What this side's memory holds.
        actual: u32,
    },
}

/// Called on a transport thread for each arrival; must not block for long.
pub type ArrivalSink = std::sync::Arc<dyn Fn(Arrival) + Send + Sync>;

/// One copy of `len` bytes into region `region` of the peer: segments of `piece` bytes,
/// segment `s` from `local_addr + s × local_stride` to `remote_offset + s × remote_stride`.
/// Whole blocks make one segment (`piece == len`): one contiguous range on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOp {
    pub region: u32,
    pub local_addr: u64,
    pub remote_offset: u64,
    pub len: u64,
    pub piece: u64,
    pub local_stride: u64,
    pub remote_stride: u64,
}

impl CopyOp {
    /// Where byte `offset` (< `len`) of the copy is: its local address, its remote offset,
    /// and how many bytes from there on are contiguous on both sides (the rest of its
    /// segment). Transports cut their frames / work requests at these bounds.
    #[inline]
    pub fn at(&self, offset: u64) -> (u64, u64, u64) {
        if self.piece >= self.len {
            return (
                self.local_addr + offset,
                self.remote_offset + offset,
                self.len - offset,
            );
        }
        let (segment, within) = (offset / self.piece, offset % self.piece);
        (
            self.local_addr + segment * self.local_stride + within,
            self.remote_offset + segment * self.remote_stride + within,
            self.piece - within,
        )
    }
}

/// The copy of `run` for `kind` (K, V, K-scale, V-scale: those present, in that order) of
/// `layer`, cut by `shard`. Offsets are in bounds because the planner checked ids against
/// both sides' block counts and the shard plan checked the block sizes.
#[inline]
pub fn copy_op(table: &RegionTable, shard: &Shard, layer: u32, kind: u32, run: &Run) -> CopyOp {
    let layout = table.layout;
    let region = layer * layout.kinds() + kind;
    let g = shard.geometry(&layout, kind);
    let len = u64::from(run.blocks) * g.bytes_per_block();
    CopyOp {
        region,
        local_addr: table.regions()[region as usize].addr
            + u64::from(run.local_block) * g.local_block
            + g.local_offset,
        remote_offset: u64::from(run.remote_block) * g.remote_block + g.remote_offset,
        len,
        piece: if g.is_whole() { len } else { g.piece },
        local_stride: g.local_stride,
        remote_stride: g.remote_stride,
    }
}

/// Expands runs of one layer into copy operations: K for every run, then V, K-scale and
/// V-scale when present (one posted stream; the last copy is the last scale's).
#[inline]
pub fn for_each_copy(
    table: &RegionTable,
    shard: &Shard,
    layer: u32,
    runs: &[Run],
    mut visit: impl FnMut(CopyOp),
) {
    for kind in 0..table.layout.kinds() {
        for run in runs {
            visit(copy_op(table, shard, layer, kind, run));
        }
    }
}

/// Fails a job's completion (the receiver may be gone; that is fine).
pub fn fail(done: Done, error: Error) {
    let _ = done.send(Err(error));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Run;

    #[test]
    fn expands_key_then_value() {
        let table = RegionTable::new(&[0x10000, 0x30000], &[0x20000, 0x40000], 8, 256).unwrap();
        let runs = [Run {
            local_block: 1,
            remote_block: 3,
            blocks: 2,
        }];
        let mut ops = Vec::new();
        let shard = Shard::whole(&table.layout);
        for_each_copy(&table, &shard, 1, &runs, |op| ops.push(op));
        assert_eq!(
            ops,
            vec![
                CopyOp {
                    region: 2,
                    local_addr: 0x30100,
                    remote_offset: 768,
                    len: 512,
                    piece: 512,
                    local_stride: 256,
                    remote_stride: 256,
                },
                CopyOp {
                    region: 3,
                    local_addr: 0x40100,
                    remote_offset: 768,
                    len: 512,
                    piece: 512,
                    local_stride: 256,
                    remote_stride: 256,
                },
            ]
        );
        assert_eq!(ops[0].at(100), (0x30164, 868, 412));
    }

    #[test]
    fn shards_cut_runs_into_strided_segments() {
        use crate::shard::{BlockOrder, TpOptions};
        // Token-major, 2 → 1: a 64-byte block of 4 rows of 16 into a 128-byte block of 4
        // rows of 32, at byte 16 of each row (writer rank 1).
        let table = RegionTable::new(&[0x10000], &[0x20000], 8, 64).unwrap();
        let remote = crate::layout::CacheLayout::new(1, true, 8, 128).unwrap();
        let nhd = |size, rank| TpOptions {
            size,
            rank,
            replicated: false,
            order: BlockOrder::TokenMajor {
                tokens_per_block: 4,
            },
        };
        let shard = Shard::between(
            (&nhd(2, 1), &table.layout),
            (&nhd(1, 0), &remote),
            "p",
            "d",
            true,
        )
        .unwrap();
        let run = Run {
            local_block: 2,
            remote_block: 5,
            blocks: 2,
        };
        let op = copy_op(&table, &shard, 0, 0, &run);
        assert_eq!((op.len, op.piece), (128, 16));
        // Segment 0: block 2 row 0 → remote block 5 row 0 at byte 16.
        assert_eq!(op.at(0), (0x10000 + 128, 5 * 128 + 16, 16));
        // Segment 5 (block 3 row 1), 3 bytes in.
        assert_eq!(
            op.at(5 * 16 + 3),
            (0x10000 + 128 + 5 * 16 + 3, 5 * 128 + 16 + 5 * 32 + 3, 13)
        );
    }
}
