//! Per-block software cost of the sending side, before any byte moves: planning
//! (`plan_runs`: validate ids, coalesce runs) and building the TCP frames of one call
//! (`FrameBatch::build_frames`: headers + the iovec list handed to `writev`).
//!
//! Run: `cargo bench -p kvtransfer-engine --bench planning`. Budget: ≤ 20 ns per block for
//! 1538 scattered ids (plan + K/V frames), see docs/performance.md.
//!
//! RDMA: `rdma_chain` builds the work-request chains of the same call with the transport's
//! own builder (`fill_write_chain`: one SGE + one `ibv_send_wr` per run and kind, pushed
//! into a `SendBatch` of `CHAIN_WRS` requests, tail signaled, then `link()` as
//! `ibv_post_send` would get it), without posting; `plan+rdma_chain` adds the planning.
//!
//! Rails: `plan+rdma_rails/1-…` and `/2-…` are one call's whole sending-side CPU work with
//! one rail and with two of equal speed: planning, then per chain the progress thread's
//! pick of the lightest rail (`lightest_rail`, the split by bytes weighted by port speed)
//! and the chain built against that rail's keys and the peer's regions as that rail sees
//! them. Their ratio is the per-call CPU cost of a second rail (target ≤ 1.1×):
//! `cargo bench -p kvtransfer-engine --bench planning -- rdma_rails`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvtransfer_engine::internals::scattered_ids;
use kvtransfer_engine::internals::{
    fill_write_chain, lightest_rail, tuning, ChainProgress, ChainTarget, MAX_WRITE_BYTES,
};
use kvtransfer_engine::internals::{plan_runs, PlanLimits, Run};
use kvtransfer_engine::internals::{FrameBatch, MAX_FRAME_PAYLOAD};
use kvtransfer_engine::internals::{JobView, RegionTable, Shard};
use kvtransfer_engine::BlockIds;
use kvtransfer_verbs::SendBatch;

/// Every chain of one call, as the progress thread builds them (chains of the configured
/// length, `KVCACHE_RDMA_TUNING=chain=N` to compare), linked but not posted. Returns the
/// work requests built.
fn rdma_chains(
    table: &RegionTable,
    runs: &[Run],
    remote_regions: &[(u64, u32)],
    batch: &mut SendBatch,
) -> usize {
    let mut progress = ChainProgress::default();
    let shard = Shard::whole(&table.layout);
    let job = JobView {
        runs,
        layer: 1,
        blocks: BATCH,
        shard: &shard,
        notice: None,
    };
    let target = ChainTarget {
        lkey: |region| 0x100 + region as u32,
        remote_regions,
    };
    let mut chain_id = 0;
    let mut wrs = 0;
    loop {
        chain_id += 1;
        batch.clear();
        let limit = batch.capacity();
        let finished = fill_write_chain(table, job, &target, &mut progress, batch, chain_id, limit);
        wrs += batch.len();
        black_box(batch.link());
        if finished {
            return wrs;
        }
    }
}

/// One rail as a sender link holds it: the peer's regions as seen through this rail
/// (address, rkey), the base of its local keys, its posted bytes and its weight.
struct BenchRail {
    remote_regions: Vec<(u64, u32)>,
    lkey_base: u32,
    posted: u64,
    weight: u64,
}

impl BenchRail {
    fn new(index: u32, regions: usize) -> BenchRail {
        BenchRail {
            remote_regions: (0..regions as u64)
                .map(|r| {
                    (
                        0x7000_0000_0000 + r * 0x1_0000_0000,
                        0x200 * (index + 1) + r as u32,
                    )
                })
                .collect(),
            lkey_base: 0x100 * (index + 1),
            posted: 0,
            weight: 100_000,
        }
    }
}

/// Every chain of one call over `rails`, as the progress thread splits them: each chain on
/// the rail with the fewest posted bytes for its weight, built against that rail. Returns
/// the work requests built.
fn rdma_rail_chains(
    table: &RegionTable,
    runs: &[Run],
    rails: &mut [BenchRail],
    batch: &mut SendBatch,
) -> usize {
    let mut progress = ChainProgress::default();
    let shard = Shard::whole(&table.layout);
    let job = JobView {
        runs,
        layer: 1,
        blocks: BATCH,
        shard: &shard,
        notice: None,
    };
    let mut chain_id = 0;
    let mut wrs = 0;
    loop {
        chain_id += 1;
        let r = lightest_rail(rails.iter().map(|r| Some((r.posted, r.weight)))).unwrap();
        let rail = &mut rails[r];
        let base = rail.lkey_base;
        let target = ChainTarget {
            lkey: |region| base + region as u32,
            remote_regions: &rail.remote_regions,
        };
        batch.clear();
        let limit = batch.capacity();
        let before = progress.bytes;
        let finished = fill_write_chain(table, job, &target, &mut progress, batch, chain_id, limit);
        rail.posted += progress.bytes - before;
        wrs += batch.len();
        black_box(batch.link());
        if finished {
            return wrs;
        }
    }
}

const BATCH: u32 = 1538;
const LAYERS: usize = 2;

/// A deterministic permutation of `0..n` (xorshift Fisher–Yates): no coalescing possible.
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
            scattered_ids(BATCH, 0x9e37_79b9_7f4a_7c15),
            scattered_ids(BATCH, 0x2545_f491_4f6c_dd1d),
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
                    batch.build(
                        &table,
                        JobView {
                            runs: black_box(&runs),
                            layer: 1,
                            blocks: BATCH,
                            shard: &Shard::whole(&table.layout),
                            notice: None,
                        },
                        call_id,
                    );
                    black_box(batch.iovecs().len())
                })
            });
            let remote_regions: Vec<(u64, u32)> = (0..table.regions().len() as u64)
                .map(|r| (0x7000_0000_0000 + r * 0x1_0000_0000, 0x200 + r as u32))
                .collect();
            let mut send_batch = SendBatch::with_capacity(tuning().chain_wrs);
            let writes_per_kind: u64 = runs
                .iter()
                .map(|run| (u64::from(run.blocks) * block_bytes).div_ceil(MAX_WRITE_BYTES))
                .sum();
            assert_eq!(
                rdma_chains(&table, &runs, &remote_regions, &mut send_batch) as u64,
                2 * writes_per_kind,
                "one WRITE per run and kind, split at {MAX_WRITE_BYTES} bytes"
            );
            group.bench_function(BenchmarkId::new("rdma_chain", name), |b| {
                b.iter(|| {
                    black_box(rdma_chains(
                        &table,
                        black_box(&runs),
                        &remote_regions,
                        &mut send_batch,
                    ))
                })
            });
            group.bench_function(BenchmarkId::new("plan+rdma_chain", name), |b| {
                b.iter(|| {
                    plan_runs(black_box(local), black_box(remote), limits, &mut runs).unwrap();
                    black_box(rdma_chains(&table, &runs, &remote_regions, &mut send_batch))
                })
            });
            for rail_count in [1u32, 2] {
                let mut rails: Vec<BenchRail> = (0..rail_count)
                    .map(|i| BenchRail::new(i, table.regions().len()))
                    .collect();
                let wrs = rdma_rail_chains(&table, &runs, &mut rails, &mut send_batch);
                assert_eq!(wrs as u64, 2 * writes_per_kind, "the same WRITEs, split");
                let total: u64 = rails.iter().map(|r| r.posted).sum();
                for rail in &rails {
                    assert!(
                        rail.posted * 10 >= total * 3 / u64::from(rail_count),
                        "every rail takes its share"
                    );
                }
                group.bench_function(
                    BenchmarkId::new("plan+rdma_rails", format!("{rail_count}-{name}")),
                    |b| {
                        b.iter(|| {
                            plan_runs(black_box(local), black_box(remote), limits, &mut runs)
                                .unwrap();
                            black_box(rdma_rail_chains(&table, &runs, &mut rails, &mut send_batch))
                        })
                    },
                );
            }
            group.bench_function(BenchmarkId::new("plan+tcp_frames", name), |b| {
                b.iter(|| {
                    call_id += 1;
                    plan_runs(black_box(local), black_box(remote), limits, &mut runs).unwrap();
                    batch.build(
                        &table,
                        JobView {
                            runs: &runs,
                            layer: 1,
                            blocks: BATCH,
                            shard: &Shard::whole(&table.layout),
                            notice: None,
                        },
                        call_id,
                    );
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
