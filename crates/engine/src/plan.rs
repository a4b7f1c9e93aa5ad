//! Transfer planning: (local ids, remote ids) → runs of blocks contiguous on both sides.
//! Validation happens before anything is produced, so a refused call writes nothing.

use crate::error::{Error, Result, Side};

/// Block ids as they arrive from callers: typed arrays pass through without conversion.
#[derive(Debug, Clone, Copy)]
pub enum BlockIds<'a> {
    /// A `Uint32Array` (or any `u32` slice): every value is an integer id.
    U32(&'a [u32]),
    /// An `Int32Array`: negative values are refused as invalid ids.
    I32(&'a [i32]),
    /// A `Float64Array`: values that are not integers in `0..2^32` are refused as invalid ids.
    F64(&'a [f64]),
}

impl BlockIds<'_> {
    /// How many ids there are.
    pub fn len(&self) -> usize {
        match self {
            BlockIds::U32(ids) => ids.len(),
            BlockIds::I32(ids) => ids.len(),
            BlockIds::F64(ids) => ids.len(),
        }
    }

    /// Whether there are no ids.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The id at `index`, or the raw value when it is not a non-negative integer below 2^32.
    #[inline]
    fn get(&self, index: usize) -> std::result::Result<u32, f64> {
        match self {
            BlockIds::U32(ids) => Ok(ids[index]),
            BlockIds::I32(ids) => u32::try_from(ids[index]).map_err(|_| f64::from(ids[index])),
            BlockIds::F64(ids) => {
                let v = ids[index];
                if v.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&v) {
                    Ok(v as u32)
                } else {
                    Err(v)
                }
            }
        }
    }
}

/// `blocks` consecutive blocks starting at `local_block` here and `remote_block` on the peer.
/// `repr(C)`: three u32, as the copy kernel's runs entry reads them.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First block of the run in this side's cache.
    pub local_block: u32,
    /// First block of the run in the peer's cache.
    pub remote_block: u32,
    /// Number of consecutive blocks (at least 1).
    pub blocks: u32,
}

/// Limits a plan is checked against.
#[derive(Debug, Clone, Copy)]
pub struct PlanLimits {
    /// This side's blockNumber: local ids must be below it.
    pub local_blocks: u32,
    /// The peer's blockNumber: remote ids must be below it.
    pub remote_blocks: u32,
    /// The most blocks one run may hold (keeps a run's byte length within one work request).
    pub max_run_blocks: u32,
}

impl PlanLimits {
    /// Limits for `block_bytes`-sized blocks with at most `max_run_bytes` per run.
    pub fn new(
        local_blocks: u32,
        remote_blocks: u32,
        block_bytes: u64,
        max_run_bytes: u64,
    ) -> Self {
        let max_run_blocks =
            (max_run_bytes / block_bytes.max(1)).clamp(1, u64::from(u32::MAX)) as u32;
        PlanLimits {
            local_blocks,
            remote_blocks,
            max_run_blocks,
        }
    }
}

fn checked_id(ids: BlockIds<'_>, index: usize, side: Side, limit: u32) -> Result<u32> {
    match ids.get(index) {
        Ok(id) if id < limit => Ok(id),
        Ok(id) => Err(Error::BlockIdOutOfRange {
            side,
            index,
            id,
            limit,
        }),
        Err(value) => Err(Error::InvalidBlockId {
            side,
            index,
            value,
            limit,
        }),
    }
}

/// Validates every id, then fills `out` (cleared first; its capacity is reused, so a
/// steady stream of calls does not allocate) with coalesced runs in caller order.
pub fn plan_runs(
    local: BlockIds<'_>,
    remote: BlockIds<'_>,
    limits: PlanLimits,
    out: &mut Vec<Run>,
) -> Result<()> {
    out.clear();
    if local.len() != remote.len() {
        return Err(Error::BlockCountMismatch {
            local: local.len(),
            remote: remote.len(),
        });
    }
    for index in 0..local.len() {
        let local_block = checked_id(local, index, Side::Local, limits.local_blocks)?;
        let remote_block = checked_id(remote, index, Side::Remote, limits.remote_blocks)?;
        if let Some(last) = out.last_mut() {
            let extends = last.local_block + last.blocks == local_block
                && last.remote_block + last.blocks == remote_block
                && last.blocks < limits.max_run_blocks;
            if extends {
                last.blocks += 1;
                continue;
            }
        }
        out.push(Run {
            local_block,
            remote_block,
            blocks: 1,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(local: &[u32], remote: &[u32], max_run_blocks: u32) -> Vec<Run> {
        let mut out = Vec::new();
        let limits = PlanLimits {
            local_blocks: 100,
            remote_blocks: 50,
            max_run_blocks,
        };
        plan_runs(
            BlockIds::U32(local),
            BlockIds::U32(remote),
            limits,
            &mut out,
        )
        .unwrap();
        out
    }

    #[test]
    fn coalesces_runs_contiguous_on_both_sides() {
        let runs = plan(&[1, 2, 3, 7, 8, 9], &[10, 11, 12, 20, 22, 23], 64);
        assert_eq!(
            runs,
            vec![
                Run {
                    local_block: 1,
                    remote_block: 10,
                    blocks: 3
                },
                Run {
                    local_block: 7,
                    remote_block: 20,
                    blocks: 1
                },
                Run {
                    local_block: 8,
                    remote_block: 22,
                    blocks: 2
                },
            ]
        );
    }

    #[test]
    fn splits_runs_at_the_size_limit() {
        let ids: Vec<u32> = (0..10).collect();
        let runs = plan(&ids, &ids, 4);
        assert_eq!(
            runs.iter().map(|r| r.blocks).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
    }

    #[test]
    fn does_not_merge_descending_or_repeated_ids() {
        assert_eq!(plan(&[3, 2, 2], &[3, 2, 3], 64).len(), 3);
    }

    #[test]
    fn rejects_bad_ids_with_position_value_and_limit() {
        let limits = PlanLimits {
            local_blocks: 100,
            remote_blocks: 50,
            max_run_blocks: 8,
        };
        let mut out = vec![Run {
            local_block: 0,
            remote_block: 0,
            blocks: 1,
        }];
        let err = plan_runs(
            BlockIds::U32(&[1, 2]),
            BlockIds::U32(&[3, 50]),
            limits,
            &mut out,
        )
        .unwrap_err();
        assert_eq!(err.code(), "ERR_BLOCK_ID_OUT_OF_RANGE");
        assert_eq!(
            err.to_string(),
            "remoteBlockIds[1] = 50 is out of range: the remote cache has blockNumber 50 (valid ids 0..50)"
        );
        let err =
            plan_runs(BlockIds::I32(&[-1]), BlockIds::U32(&[3]), limits, &mut out).unwrap_err();
        assert_eq!(err.code(), "ERR_INVALID_BLOCK_ID");
        assert!(err.to_string().contains("localBlockIds[0] = -1"));
        let err =
            plan_runs(BlockIds::F64(&[1.5]), BlockIds::U32(&[3]), limits, &mut out).unwrap_err();
        assert_eq!(err.code(), "ERR_INVALID_BLOCK_ID");
        let err = plan_runs(
            BlockIds::F64(&[1.0]),
            BlockIds::U32(&[3, 4]),
            limits,
            &mut out,
        )
        .unwrap_err();
        assert_eq!(err.code(), "ERR_BLOCK_COUNT_MISMATCH");
        let err = plan_runs(
            BlockIds::F64(&[100.0]),
            BlockIds::U32(&[3]),
            limits,
            &mut out,
        )
        .unwrap_err();
        assert_eq!(err.code(), "ERR_BLOCK_ID_OUT_OF_RANGE");
    }

    #[test]
    fn reuses_capacity() {
        let limits = PlanLimits {
            local_blocks: 4096,
            remote_blocks: 4096,
            max_run_blocks: 8,
        };
        let ids: Vec<u32> = (0..1538).map(|i| i * 2).collect();
        let mut out = Vec::new();
        plan_runs(BlockIds::U32(&ids), BlockIds::U32(&ids), limits, &mut out).unwrap();
        let cap = out.capacity();
        let ptr = out.as_ptr();
        plan_runs(BlockIds::U32(&ids), BlockIds::U32(&ids), limits, &mut out).unwrap();
        assert_eq!((out.capacity(), out.as_ptr()), (cap, ptr));
        assert_eq!(out.len(), 1538);
    }
}
