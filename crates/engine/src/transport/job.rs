//! What a transport is handed: one planned call (`WriteJob`), the copies it expands to,
//! and what the receiving side is told when a tagged call has landed.

use super::completion::{Done, PooledRuns};
use crate::error::Error;
use crate::layout::RegionTable;
use crate::plan::Run;

/// Largest request tag carried with an arrival notice.
pub const MAX_TAG_BYTES: usize = 255;

/// One `writeCache` call, planned and owned by the transport until it completes.
#[derive(Debug)]
pub struct WriteJob {
    pub runs: PooledRuns,
    pub layer: u32,
    /// Blocks in the call (before coalescing), reported with the arrival notice.
    pub blocks: u32,
    /// Request tag: when present the receiver gets an arrival notice after the bytes.
    pub tag: Option<Vec<u8>>,
    pub done: Done,
}

/// What the receiving side learns when a tagged call has landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    pub peer: String,
    pub tag: Vec<u8>,
    pub layer: u32,
    pub blocks: u32,
}

/// Called on a transport thread for each arrival; must not block for long.
pub type ArrivalSink = std::sync::Arc<dyn Fn(Arrival) + Send + Sync>;

/// One contiguous copy: `len` bytes from `local_addr` to `remote_offset` of region `region`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOp {
    pub region: u32,
    pub local_addr: u64,
    pub remote_offset: u64,
    pub len: u64,
}

/// The copy of `run` for `kind` (K, V, K-scale, V-scale: those present, in that order) of
/// `layer`. Offsets are in bounds because
/// the planner checked ids against both sides' block counts.
#[inline]
pub fn copy_op(table: &RegionTable, layer: u32, kind: u32, run: &Run) -> CopyOp {
    let layout = table.layout;
    let region = layer * layout.kinds() + kind;
    let block_bytes = layout.kind_block_bytes(kind);
    CopyOp {
        region,
        local_addr: table.regions()[region as usize].addr
            + u64::from(run.local_block) * block_bytes,
        remote_offset: u64::from(run.remote_block) * block_bytes,
        len: u64::from(run.blocks) * block_bytes,
    }
}

/// Expands runs of one layer into copy operations: K for every run, then V, K-scale and
/// V-scale when present (one posted stream; the last copy is the last scale's).
#[inline]
pub fn for_each_copy(table: &RegionTable, layer: u32, runs: &[Run], mut visit: impl FnMut(CopyOp)) {
    for kind in 0..table.layout.kinds() {
        for run in runs {
            visit(copy_op(table, layer, kind, run));
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
        for_each_copy(&table, 1, &runs, |op| ops.push(op));
        assert_eq!(
            ops,
            vec![
                CopyOp {
                    region: 2,
                    local_addr: 0x30100,
                    remote_offset: 768,
                    len: 512
                },
                CopyOp {
                    region: 3,
                    local_addr: 0x40100,
                    remote_offset: 768,
                    len: 512
                },
            ]
        );
    }
}
