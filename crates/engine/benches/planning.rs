//! Per-block software cost of the sending side, before any byte moves: planning
//! (`plan_runs`: validate ids, coalesce runs) and building the TCP frames of one call
//! (`FrameBatch::build_frames`: headers + the iovec list handed to `writev`).
//!
//! Run: `cargo bench -p kvtransfer-engine --bench planning`. Budget: ≤ 20 ns per block for
//! 1538 scattered ids (plan + K/V frames), see docs/performance.md.
//!
//! RDMA hook: when the RDMA transport lands, add a `rdma_chain` group here that builds the
//! work-request chain (SGEs + `ibv_send_wr` list) of the same 1538-id call with its batch
//! builder, next to `tcp_frames`, so both transports' per-block costs sit in one report.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvtransfer_engine::layout::RegionTable;
use kvtransfer_engine::plan::{plan_runs, BlockIds, PlanLimits, Run};
use kvtransfer_engine::transport::tcp::{FrameBatch, MAX_FRAME_PAYLOAD};

const BATCH: u32 = 1538;
const LAYERS: usize = 2;

/// A deterministic permutation of `0..n` (xorshift Fisher–Yates): no coalescing possible.
fn scattered(n: u32, seed: u64) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..n).collect();
    let mut state = seed | 1;
    for i in (1..ids.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ids.swap(i, (state % (i as u64 + 1)) as usize);
    }
    ids
}

/// Region addresses are never dereferenced by planning or frame building.
fn table(block_bytes: u64) -> RegionTable {
    let region = u64::from(BATCH) * block_bytes;
    let keys: Vec<u64> = (0..LAYERS as u64)
        .map(|l| 0x1000_0000 + 2 * l * region)
        .collect();
    let values: Vec<u64> = keys.iter().map(|k| k + region).collect();
    RegionTable::new(&keys, &values, BATCH, block_bytes).unwrap()
}

fn bench(c: &mut Criterion) {
    let contiguous: Vec<u32> = (0..BATCH).collect();
    let cases = [
        (
            "scattered",
            scattered(BATCH, 0x9e37_79b9_7f4a_7c15),
            scattered(BATCH, 0x2545_f491_4f6c_dd1d),
        ),
        ("contiguous", contiguous.clone(), contiguous),
    ];
    for block_bytes in [1024u64, 65536] {
        let table = table(block_bytes);
        let limits = PlanLimits::new(BATCH, BATCH, block_bytes, MAX_FRAME_PAYLOAD);
        let mut group = c.benchmark_group(format!("{}KiB", block_bytes / 1024));
        // Throughput in elements = block ids per call: criterion's "time per element" is
        // the per-block cost.
        group.throughput(Throughput::Elements(u64::from(BATCH)));
        for (name, local, remote) in &cases {
            let (local, remote) = (BlockIds::U32(local), BlockIds::U32(remote));
            let mut runs: Vec<Run> = Vec::new();
            group.bench_function(BenchmarkId::new("plan", name), |b| {
                b.iter(|| {
                    plan_runs(black_box(local), black_box(remote), limits, &mut runs).unwrap();
                    black_box(runs.len())
                })
            });
            plan_runs(local, remote, limits, &mut runs).unwrap();
            let mut batch = FrameBatch::new();
            let mut call_id = 0u64;
            group.bench_function(BenchmarkId::new("tcp_frames", name), |b| {
                b.iter(|| {
                    call_id += 1;
                    batch.build_frames(&table, 1, black_box(&runs), BATCH, None, call_id);
                    black_box(batch.iovecs().len())
                })
            });
            group.bench_function(BenchmarkId::new("plan+tcp_frames", name), |b| {
                b.iter(|| {
                    call_id += 1;
                    plan_runs(black_box(local), black_box(remote), limits, &mut runs).unwrap();
                    batch.build_frames(&table, 1, &runs, BATCH, None, call_id);
                    black_box(batch.iovecs().len())
                })
            });
            // Untyped ids (a JS number[] arrives as f64): the validation path the TS layer
            // takes for plain arrays.
            let local_f64: Vec<f64> = match local {
                BlockIds::U32(ids) => ids.iter().map(|&v| f64::from(v)).collect(),
                _ => unreachable!(),
            };
            let remote_f64: Vec<f64> = match remote {
                BlockIds::U32(ids) => ids.iter().map(|&v| f64::from(v)).collect(),
                _ => unreachable!(),
            };
            group.bench_function(BenchmarkId::new("plan_f64", name), |b| {
                b.iter(|| {
                    plan_runs(
                        BlockIds::F64(black_box(&local_f64)),
                        BlockIds::F64(black_box(&remote_f64)),
                        limits,
                        &mut runs,
                    )
                    .unwrap();
                    black_box(runs.len())
                })
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = planning;
    config = Criterion::default().sample_size(50).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(planning);
