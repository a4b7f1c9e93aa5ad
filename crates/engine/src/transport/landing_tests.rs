//! The receiver's ranges from a landing against the writer's own copies and sums: every
//! TP geometry, scales, key-only caches, scattered and backward runs, and the refusals.

use super::*;
use crate::layout::CacheLayout;
use crate::plan::Run;
use crate::shard::{BlockOrder, Shard, TpOptions};
use crate::transport::{for_each_copy, sum_call, ChecksumCheck, JobPlan, RunPool};

/// One side's cache in plain memory: its regions' bytes and the table naming them.
struct Side {
    memory: Vec<Vec<u8>>,
    table: RegionTable,
}

impl Side {
    fn new(layers: u32, values: bool, blocks: u32, block: u64, scale: u64, seed: u8) -> Side {
        let kinds = if values { 2 } else { 1 } * if scale > 0 { 2 } else { 1 };
        let mut memory = Vec::new();
        for layer in 0..layers {
            for kind in 0..kinds {
                let bytes = u64::from(blocks)
                    * if kind < kinds / 2 || scale == 0 {
                        block
                    } else {
                        scale
                    };
                let region: Vec<u8> = (0..bytes)
                    .map(|i| (i as u32 * 131 + i as u32 / 977 + layer * 7 + kind * 3) as u8 ^ seed)
                    .collect();
                memory.push(region);
            }
        }
        let addr = |k: u32| -> Vec<u64> {
            (0..layers)
                .map(|l| memory[(l * kinds + k) as usize].as_ptr() as u64)
                .collect()
        };
        let cache = if values { 2 } else { 1 };
        let (keys, vals) = (addr(0), if values { addr(1) } else { vec![] });
        let (ks, vs) = if scale > 0 {
            (addr(cache), if values { addr(cache + 1) } else { vec![] })
        } else {
            (vec![], vec![])
        };
        let table = RegionTable::with_scales(&keys, &vals, &ks, &vs, blocks, block, scale).unwrap();
        Side { memory, table }
    }

    fn layout(&self) -> CacheLayout {
        self.table.layout
    }
}

fn tp(size: u32, rank: u32, tokens: u32) -> TpOptions {
    TpOptions {
        size,
        rank,
        replicated: false,
        order: BlockOrder::from_tokens_per_block(tokens),
    }
}

fn plan(shard: Shard, layer: u32, list: &[(u32, u32, u32)]) -> JobPlan {
    let pool = std::sync::Arc::new(RunPool::default());
    let mut runs = pool.take();
    for &(local_block, remote_block, blocks) in list {
        runs.push(Run {
            local_block,
            remote_block,
            blocks,
        });
    }
    JobPlan {
        runs: pool.pooled(runs),
        layer,
        blocks: list.iter().map(|r| r.2).sum(),
        shard,
        notice: None,
        landing: None,
        acked: false,
    }
}

/// Moves `plan` from `writer` into `receiver` as a transport does (each contiguous piece of
/// each copy, in order), marking the bytes written; returns the marks per region.
fn transfer(writer: &Side, receiver: &mut Side, plan: &JobPlan) -> Vec<Vec<bool>> {
    let mut marks: Vec<Vec<bool>> = receiver
        .memory
        .iter()
        .map(|m| vec![false; m.len()])
        .collect();
    for_each_copy(&writer.table, &plan.shard, plan.layer, &plan.runs, |op| {
        let mut done = 0;
        while done < op.len {
            let (local, remote, contiguous) = op.at(done);
            let len = contiguous.min(op.len - done) as usize;
            let region = op.region as usize;
            let from = (local - writer.table.regions()[region].addr) as usize;
            let to = remote as usize;
            let source = writer.memory[region][from..from + len].to_vec();
            receiver.memory[region][to..to + len].copy_from_slice(&source);
            marks[region][to..to + len]
                .iter_mut()
                .for_each(|m| *m = true);
            done += len as u64;
        }
    });
    marks
}

/// The writer's sum verifies against the receiver's ranges from the landing, the ranges are
/// exactly the bytes written, and a flipped byte in them is a mismatch.
fn check(writer: &Side, receiver: &mut Side, shard: Shard, layer: u32, list: &[(u32, u32, u32)]) {
    let plan = plan(shard, layer, list);
    let marks = transfer(writer, receiver, &plan);
    let sum = sum_call(&writer.table, &plan);
    let mut bytes = Vec::new();
    Landing::encode(&plan.shard, writer.layout().kinds(), &plan.runs, &mut bytes);
    let landing = Landing::decode(&bytes).unwrap();
    let mut landed = Landed::default();
    record_landing(&receiver.table, layer, &landing, &mut landed).unwrap();
    assert_eq!(landed.check(Some(sum)), ChecksumCheck::Verified, "{list:?}");
    let mut seen: Vec<Vec<bool>> = receiver
        .memory
        .iter()
        .map(|m| vec![false; m.len()])
        .collect();
    let mut ranges = Vec::new();
    land(&receiver.table, layer, &landing, |range| ranges.push(range)).unwrap();
    for range in &ranges {
        let region = range.region as usize;
        let at = (range.addr - receiver.table.regions()[region].addr) as usize;
        for mark in &mut seen[region][at..at + range.len as usize] {
            assert!(!*mark, "a byte named twice");
            *mark = true;
        }
    }
    assert_eq!(seen, marks, "{list:?}");
    let first = ranges[0];
    let at = (first.addr - receiver.table.regions()[first.region as usize].addr) as usize;
    receiver.memory[first.region as usize][at + first.len as usize - 1] ^= 0x40;
    record_landing(&receiver.table, layer, &landing, &mut landed).unwrap();
    assert!(matches!(
        landed.check(Some(sum)),
        ChecksumCheck::Mismatch { expected, actual } if expected == sum && actual != sum
    ));
}

const SCATTERED: &[(u32, u32, u32)] = &[(0, 9, 2), (4, 0, 1), (2, 5, 3), (7, 14, 1), (6, 12, 1)];

#[test]
fn whole_blocks_verify_over_scattered_and_backward_runs() {
    let writer = Side::new(2, true, 16, 64, 0, 0x5a);
    let mut receiver = Side::new(2, true, 16, 64, 0, 0);
    let shard = Shard::whole(&writer.layout());
    check(&writer, &mut receiver, shard, 1, SCATTERED);
    check(&writer, &mut receiver, shard, 0, &[(0, 0, 16)]);
    // A key-only cache with scales.
    let writer = Side::new(1, false, 16, 64, 8, 0x11);
    let mut receiver = Side::new(1, false, 16, 64, 8, 0);
    let shard = Shard::whole(&writer.layout());
    check(&writer, &mut receiver, shard, 0, SCATTERED);
}

#[test]
fn tensor_parallel_splits_verify() {
    for tokens in [0, 4] {
        // 2:1: writer rank 1 of 2 writes the second half of each receiver block (per row
        // for token-major), scales too.
        let writer = Side::new(1, true, 16, 64, 8, 0x33);
        let mut receiver = Side::new(1, true, 16, 128, 16, 0);
        let shard = Shard::between(
            (&tp(2, 1, tokens), &writer.layout()),
            (&tp(1, 0, tokens), &receiver.layout()),
            "p",
            "d",
            true,
        )
        .unwrap();
        assert!(!shard.kv.is_whole());
        check(&writer, &mut receiver, shard, 0, SCATTERED);
        // 1:2: receiver rank 1 of 2 takes the second half of each writer block.
        let writer = Side::new(1, true, 16, 128, 16, 0x77);
        let mut receiver = Side::new(1, true, 16, 64, 8, 0);
        let shard = Shard::between(
            (&tp(1, 0, tokens), &writer.layout()),
            (&tp(2, 1, tokens), &receiver.layout()),
            "p",
            "d",
            true,
        )
        .unwrap();
        check(&writer, &mut receiver, shard, 0, SCATTERED);
        check(&writer, &mut receiver, shard, 0, &[(3, 3, 10)]);
    }
}

#[test]
fn landings_that_name_bytes_outside_the_regions_are_refused() {
    let receiver = Side::new(2, true, 16, 64, 8, 0);
    let layout = receiver.layout();
    let shard = Shard::whole(&layout);
    let good = |runs: &[(u32, u32)]| {
        let runs: Vec<Run> = runs
            .iter()
            .map(|&(remote_block, blocks)| Run {
                local_block: 0,
                remote_block,
                blocks,
            })
            .collect();
        let mut bytes = Vec::new();
        Landing::encode(&shard, layout.kinds(), &runs, &mut bytes);
        Landing::decode(&bytes).unwrap()
    };
    let refused = |landing: &Landing, layer: u32| {
        let mut visited = 0;
        let err = land(&receiver.table, layer, landing, |_| visited += 1).unwrap_err();
        assert_eq!(visited, 0, "{err}");
        err
    };
    assert!(land(&receiver.table, 1, &good(&[(15, 1)]), |_| {}).is_ok());
    let err = refused(&good(&[(0, 1), (15, 2)]), 1);
    assert!(
        err.contains("blocks 15..17") && err.contains("blockNumber 16"),
        "{err}"
    );
    let err = refused(&good(&[(16, 1)]), 0);
    assert!(err.contains("16..17"), "{err}");
    let err = refused(&good(&[(0, 1)]), 2);
    assert!(err.contains("layer 2") && err.contains("2 layers"), "{err}");
    let mut kinds = good(&[(0, 1)]);
    kinds.kinds = 2;
    assert!(refused(&kinds, 0).contains("2 kinds"));
    // A piece past its block: by offset, by length, by stride × pieces, by overflow.
    for (offset, piece, pieces, stride) in [
        (1, 64, 1, 64),
        (0, 65, 1, 65),
        (0, 16, 5, 16),
        (0, 16, 0, 16),
        (u64::MAX, 1, 1, 1),
        (0, 1, u32::MAX, u64::MAX),
    ] {
        let mut bad = good(&[(0, 1)]);
        bad.kv = crate::wire::Reach {
            offset,
            piece,
            pieces,
            stride,
        };
        let err = refused(&bad, 0);
        assert!(
            err.contains("do not fit a 64-byte block of localKeyCache"),
            "{err}"
        );
    }
    let mut scale = good(&[(0, 1)]);
    scale.scale.piece = 9;
    assert!(refused(&scale, 0).contains("8-byte block of keyScaleCache"));
}
