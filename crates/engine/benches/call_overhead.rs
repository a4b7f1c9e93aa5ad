//! The engine's part of one prepared layer call (`Engine::write` of a prepared list):
//! the checks, the completion and its accounting, the deadline watch and the hand-off to
//! the link, without napi or JavaScript. Two engines on loopback TCP, 1538 one-byte blocks
//! per call (scattered or contiguous ids, prepared once), bursts of 60 layer calls like one
//! request of `bench --overhead`; only issuing the burst is timed, then its completions are
//! awaited outside the timed section. Outcomes go to one `CallSink` with a call id, as the
//! Node binding's do.
//!
//! Run: `cargo bench -p kvtransfer-engine --bench call_overhead`. The JS-visible figure
//! (`kvtransfer bench --overhead`) adds napi and the TypeScript wrapper; see
//! docs/performance.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kvtransfer_engine::internals::scattered_ids;
use kvtransfer_engine::{
    BlockIds, CallBlocks, CallPeer, CallSink, Engine, EngineOptions, OnDone, Role, TpOptions,
    WriteCall,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const BLOCKS: u32 = 1538;
const LAYERS: usize = 60;
const PEER: &str = "127.0.0.1:1";

fn engine(role: Role, regions: &mut [Vec<u8>]) -> Engine {
    let addrs: Vec<u64> = regions.iter_mut().map(|r| r.as_mut_ptr() as u64).collect();
    let (keys, values) = addrs.split_at(LAYERS);
    Engine::new(EngineOptions {
        role,
        gpu_idx: 0,
        name: format!("{}-bench", role.as_str()),
        host: None,
        keys: keys.to_vec(),
        values: values.to_vec(),
        key_scales: Vec::new(),
        value_scales: Vec::new(),
        block_number: BLOCKS,
        block_bytes: 1,
        scale_block_bytes: 0,
        transport: Some("tcp".into()),
        arrivals: None,
        connect_timeout: Duration::from_secs(10),
        rdma_settings: None,
        rdma_devices: None,
        auth_token: Some(Vec::new()),
        tp: TpOptions::default(),
        imports: Vec::new(),
    })
    .expect("engine")
}

/// Counts completed calls; the bench waits for a burst's calls outside the timed section.
#[derive(Default)]
struct Settled {
    count: AtomicUsize,
    failed: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

impl CallSink for Settled {
    fn settled(&self, _call: u64, result: kvtransfer_engine::Result<()>) {
        if result.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Release);
        self.wake.notify_one();
    }
}

impl Settled {
    fn wait_for(&self, calls: usize) {
        let mut guard = self.lock.lock().unwrap();
        while self.count.load(Ordering::Acquire) < calls {
            guard = self
                .wake
                .wait_timeout(guard, Duration::from_millis(1))
                .unwrap()
                .0;
        }
    }
}

fn bench(c: &mut Criterion) {
    let mut prefill_regions = vec![vec![7u8; BLOCKS as usize]; 2 * LAYERS];
    let mut decode_regions = vec![vec![0u8; BLOCKS as usize]; 2 * LAYERS];
    let prefill = engine(Role::Prefill, &mut prefill_regions);
    let decode = engine(Role::Decode, &mut decode_regions);
    let challenge = prefill.auth_challenge(PEER).unwrap();
    let response = decode.auth_respond(&challenge).unwrap();
    let hello = prefill.hello(PEER, &response).unwrap();
    let reply = decode.accept(&hello).unwrap();
    prefill.finish_connect(PEER, "127.0.0.1", &reply).unwrap();

    let settled = Arc::new(Settled::default());
    // Like the Node binding: one sink, a call id per call.
    let sink: Arc<dyn CallSink> = Arc::<Settled>::clone(&settled);
    let contiguous: Vec<u32> = (0..BLOCKS).collect();
    let lists = [
        (
            "scattered",
            scattered_ids(BLOCKS, 7),
            scattered_ids(BLOCKS, 11),
        ),
        ("contiguous", contiguous.clone(), contiguous),
    ];
    let mut group = c.benchmark_group("prepared_layer_call");
    for (ids, local, remote) in &lists {
        let prepared = prefill
            .prepare_blocks(PEER, BlockIds::U32(local), BlockIds::U32(remote))
            .unwrap();
        for timeout in [None, Some(Duration::from_secs(30))] {
            let name = format!(
                "{ids}/{}",
                if timeout.is_some() {
                    "30 s deadline"
                } else {
                    "no deadline"
                }
            );
            // Calls go through a peer handle, as the binding's do.
            let peer = prefill.peer(PEER).unwrap();
            group.bench_function(BenchmarkId::new("issue", name), |b| {
                b.iter_custom(|iters| {
                    let mut issuing = Duration::ZERO;
                    let mut calls = settled.count.load(Ordering::Acquire);
                    for _ in 0..iters.div_ceil(LAYERS as u64) {
                        let started = Instant::now();
                        for layer in 0..LAYERS {
                            prefill
                                .write(
                                    WriteCall {
                                        peer: CallPeer::Handle(&peer),
                                        blocks: CallBlocks::Prepared(&prepared),
                                        layer: layer as f64,
                                        tag: None,
                                        timeout,
                                        integrity: Default::default(),
                                    },
                                    OnDone::Sink(Arc::clone(&sink), layer as u64),
                                )
                                .unwrap();
                        }
                        issuing += started.elapsed();
                        calls += LAYERS;
                        settled.wait_for(calls);
                    }
                    // Criterion's iteration is one layer call; whole bursts were issued.
                    let issued = iters.div_ceil(LAYERS as u64) * LAYERS as u64;
                    issuing.mul_f64(iters as f64 / issued as f64)
                });
            });
        }
    }
    group.finish();
    assert_eq!(
        settled.failed.load(Ordering::Relaxed),
        0,
        "a benchmarked call failed"
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
