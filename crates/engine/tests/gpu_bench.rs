//! Throughput of GPU regions over TCP loopback against host regions, same grid, same
//! process. `#[ignore]`d: run with `--ignored --nocapture` (scripts/gpu-tests.sh); fails
//! where there is no GPU. Writes a markdown table to stderr and to `$KVT_GPU_BENCH_OUT`.

use futures_executor::block_on;
use kvtransfer_engine::BlockIds;
use kvtransfer_engine::Role;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

mod gpu_support;
use gpu_support::{connect, expect_regions, note, permutation, require_gpu, side};

const SIZES: [usize; 5] = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10];
const IN_FLIGHT: usize = 4;
const MEASURE: Duration = Duration::from_millis(1500);

/// GB/s (1e9 bytes/s, K and V counted) of scattered `batch`-block calls.
fn measure(
    gpu: &std::sync::Arc<kvtransfer_cuda::Gpu>,
    from_gpu: bool,
    to_gpu: bool,
    block_bytes: usize,
    batch: usize,
) -> (f64, usize) {
    let prefill = side(
        Role::Prefill,
        from_gpu.then_some(gpu),
        1,
        batch,
        block_bytes,
        3,
    );
    let decode = side(
        Role::Decode,
        to_gpu.then_some(gpu),
        1,
        batch,
        block_bytes,
        0,
    );
    connect(&prefill, &decode, "decode:0");
    let local = permutation(batch, 17);
    let remote = permutation(batch, 29);
    let call = || {
        prefill
            .engine
            .write_cache(
                "decode:0",
                BlockIds::U32(&local),
                BlockIds::U32(&remote),
                0.0,
                None,
            )
            .unwrap()
    };
    // Warm-up: staging buffers, socket buffers, page faults.
    for _ in 0..3 {
        block_on(call()).unwrap().unwrap();
    }
    let start = Instant::now();
    let mut in_flight = VecDeque::new();
    let mut calls = 0usize;
    while start.elapsed() < MEASURE || calls < 4 {
        while in_flight.len() < IN_FLIGHT {
            in_flight.push_back(call());
        }
        block_on(in_flight.pop_front().unwrap()).unwrap().unwrap();
        calls += 1;
    }
    for completion in in_flight {
        block_on(completion).unwrap().unwrap();
        calls += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    let bytes = (calls * batch * block_bytes * 2) as f64;
    expect_regions(
        &prefill,
        &decode,
        block_bytes,
        &[(0, local.clone(), remote.clone())],
    );
    prefill.engine.close();
    decode.engine.close();
    (bytes / seconds / 1e9, calls)
}

#[test]
#[ignore = "GPU throughput measurement, needs an NVIDIA GPU: run scripts/gpu-tests.sh --run on a GPU machine"]
fn tcp_loopback_throughput_device_vs_host() {
    let gpu = require_gpu("tcp_loopback_throughput_device_vs_host");
    let modes = [(false, false), (true, true), (false, true), (true, false)];
    let mut table = String::from(
        "| block | batch | host→host GB/s | device→device GB/s | host→device GB/s | device→host GB/s | device→device / host→host |\n|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for block_bytes in SIZES {
        let batch = if block_bytes >= 256 << 10 { 768 } else { 1538 };
        let mut row = Vec::new();
        for (from_gpu, to_gpu) in modes {
            let (gbps, calls) = measure(&gpu, from_gpu, to_gpu, block_bytes, batch);
            note(&format!(
                "{} KiB × {batch}, {}→{}: {gbps:.2} GB/s ({calls} calls, verified)",
                block_bytes >> 10,
                if from_gpu { "device" } else { "host" },
                if to_gpu { "device" } else { "host" }
            ));
            row.push(gbps);
        }
        table.push_str(&format!(
            "| {} KiB | {batch} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            block_bytes >> 10,
            row[0],
            row[1],
            row[2],
            row[3],
            row[1] / row[0]
        ));
    }
    note(&table);
    if let Some(path) = std::env::var_os("KVT_GPU_BENCH_OUT") {
        std::fs::write(path, &table).unwrap();
    }
}
