//! Where a checksummed call's bytes landed in this side's memory, found from the landing its
//! notice carries (`wire::Landing`), for receivers that do not see the bytes arrive (RDMA
//! WRITEs; GPU copies). [`land`] checks the landing against this side's regions before it
//! names a byte, then gives the ranges in the order the writer moved and summed them
//! ([`for_each_copy`](super::for_each_copy)): K for every run, then V, then the scales;
//! within a run in increasing address. [`record_landing`] puts them into a [`Landed`], which
//! sums host ranges with CRC-32C and compares with the notice's checksum.

use super::checksum::Landed;
use crate::layout::RegionTable;
use crate::wire::{Landing, Reach};

/// One range of this side's memory that a call wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LandedRange {
    /// The region (index in the region table).
    pub(crate) region: u32,
    /// Where the range starts (a host or device address).
    pub(crate) addr: u64,
    /// Bytes.
    pub(crate) len: u64,
    /// The region is GPU memory (the CPU must not read it).
    pub(crate) device: bool,
}

/// Checks `landing` against layer `layer` of `table`, then visits every range of this
/// side's memory the call wrote, in the writer's order, ranges contiguous in one region
/// merged. Refuses, before it visits anything, a layer past the layout, a kind count unlike
/// this side's, a segment that runs past its block, a run past `blockNumber`: so no range
/// lies outside a region. The refusal says which value broke which limit.
pub(crate) fn land(
    table: &RegionTable,
    layer: u32,
    landing: &Landing,
    mut visit: impl FnMut(LandedRange),
) -> Result<(), String> {
    let layout = table.layout;
    if layer >= layout.layers {
        return Err(format!(
            "layer {layer} is past this side's {} layers",
            layout.layers
        ));
    }
    let kinds = layout.kinds();
    if landing.kinds != kinds {
        return Err(format!(
            "the writer moves {} kinds per layer (K, V, scales), this side has {kinds}",
            landing.kinds
        ));
    }
    let cache = layout.cache_kinds();
    for kind in 0..kinds {
        let block = layout.kind_block_bytes(kind);
        let reach: &Reach = landing.reach(kind, cache);
        let end = u64::from(reach.pieces)
            .checked_sub(1)
            .and_then(|n| n.checked_mul(reach.stride))
            .and_then(|at| at.checked_add(reach.offset))
            .and_then(|at| at.checked_add(reach.piece));
        if end.is_none_or(|end| end > block) {
            return Err(format!(
                "{} segments of {} bytes from byte {} every {} bytes do not fit a {}-byte block of {}",
                reach.pieces,
                reach.piece,
                reach.offset,
                reach.stride,
                block,
                layout.kind_name(kind)
            ));
        }
    }
    for &(start, blocks) in &landing.runs {
        let end = u64::from(start) + u64::from(blocks);
        if end > u64::from(layout.block_number) {
            return Err(format!(
                "blocks {start}..{end} run past this side's blockNumber {}",
                layout.block_number
            ));
        }
    }
    let mut pending: Option<LandedRange> = None;
    let mut add = |range: LandedRange| match &mut pending {
        Some(p) if p.region == range.region && p.addr + p.len == range.addr => p.len += range.len,
        _ => {
            if let Some(done) = pending.replace(range) {
                visit(done);
            }
        }
    };
    for kind in 0..kinds {
        let region = layer * kinds + kind;
        let base = table.regions()[region as usize].addr;
        let device = table.memory(region).is_device();
        let block = layout.kind_block_bytes(kind);
        let reach = *landing.reach(kind, cache);
        if reach.piece == 0 {
            continue;
        }
        for &(start, blocks) in &landing.runs {
            for b in u64::from(start)..u64::from(start) + u64::from(blocks) {
                let at = base + b * block + reach.offset;
                for s in 0..u64::from(reach.pieces) {
                    add(LandedRange {
                        region,
                        addr: at + s * reach.stride,
                        len: reach.piece,
                        device,
                    });
                }
            }
        }
    }
    if let Some(done) = pending {
        visit(done);
    }
    Ok(())
}

/// [`land`] into `landed`: host ranges to sum, GPU ranges marking the call unchecked by the
/// CPU. On a refusal `landed` holds nothing of this call.
pub(crate) fn record_landing(
    table: &RegionTable,
    layer: u32,
    landing: &Landing,
    landed: &mut Landed,
) -> Result<(), String> {
    land(table, layer, landing, |range| {
        if range.device {
            landed.device();
        } else {
            landed.host(range.addr, range.len as usize);
        }
    })
}

#[cfg(test)]
#[path = "landing_tests.rs"]
mod tests;
