//! NVLink benchmarks between two processes of one host (the harness of `gpu_nvlink.rs`):
//! the grid of block sizes, depths and block counts, and the copy kernel alone. `#[ignore]`d:
//! run with `--ignored` on a GPU machine (scripts/gpu-tests.sh --run).

use futures_executor::block_on;
use kvtransfer_engine::{BlockIds, CallBlocks, CallPeer, Engine, OnDone, Role, WriteCall};
use std::io::Write;
use std::time::{Duration, Instant};

mod gpu_support;
mod nvlink_support;
use gpu_support::{engine_options, note, permutation, require_gpu};
use nvlink_support::*;

/// Calls issued by `issue(i)` (call i writes layer i % layers), `depth` in flight, for at
/// least ~0.3 s after 8 untimed ones: GB/s of `bytes_per_call`, µs per call, and µs per
/// call spent in `issue` itself (the synchronous part: checks, planning, the launch).
fn measure(
    issue: impl Fn(usize) -> kvtransfer_engine::Completion,
    depth: usize,
    bytes_per_call: f64,
) -> (f64, f64, f64) {
    let in_call = std::cell::Cell::new(Duration::ZERO);
    let timed = |i: usize| {
        let started = Instant::now();
        let completion = issue(i);
        in_call.set(in_call.get() + started.elapsed());
        completion
    };
    for i in 0..8 {
        block_on(timed(i)).unwrap().unwrap();
    }
    in_call.set(Duration::ZERO);
    let mut pending = std::collections::VecDeque::new();
    let started = Instant::now();
    let mut calls = 0usize;
    while started.elapsed() < Duration::from_millis(300) || calls < 20 {
        while pending.len() < depth {
            pending.push_back(timed(calls));
            calls += 1;
        }
        block_on(pending.pop_front().unwrap()).unwrap().unwrap();
    }
    for completion in pending {
        block_on(completion).unwrap().unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    (
        calls as f64 * bytes_per_call / seconds / 1e9,
        seconds / calls as f64 * 1e6,
        in_call.get().as_secs_f64() / calls as f64 * 1e6,
    )
}

#[test]
#[ignore = "benchmark; needs an NVIDIA GPU and two processes: scripts/gpu-tests.sh --run"]
fn nvlink_bench_grid() {
    let gpu = require_gpu("nvlink_bench_grid");
    let peer_gpu = last_gpu();
    let mode = match (
        std::env::var("KVCACHE_CUDA_COPY_KERNEL").as_deref(),
        std::env::var("KVCACHE_CUDA_BATCH_COPY").as_deref(),
    ) {
        (Ok("0"), Ok("0")) => "one cuMemcpyAsync per block (FastDeploy's way)",
        (Ok("0"), _) => "copy engines, one cuMemcpyBatchAsync per call",
        _ => "kvtransfer default (one copy-kernel launch per call)",
    };
    // The link ceiling: one 512 MiB device-to-device copy (what the bench CLI uses too).
    let ceiling = kvtransfer_engine::peer_copy_gbps(0, peer_gpu, 512 << 20, 10).unwrap();
    let (layers, blocks) = (4usize, 1538usize);
    let mut table = format!(
        "### NVLink GPU 0 → GPU {peer_gpu}: {mode}\n\nbatch {blocks} scattered blocks (random ids both sides), K+V, one layer per call; link ceiling (one 512 MiB copy) {ceiling:.1} GB/s\n\n| block | 1 in flight GB/s | µs/call (in writeCache) | 4 in flight GB/s | µs/call (in writeCache) | 4 in flight / ceiling |\n| --- | --- | --- | --- | --- | --- |\n"
    );
    let mut prepared = String::from("\nThe same calls with the block list prepared once (`prepareBlocks`), one call per layer:\n\n| block | 1 in flight GB/s | µs/call | 4 in flight GB/s | µs/call |\n| --- | --- | --- | --- | --- |\n");
    for block_bytes in [1usize << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10] {
        let mut regions = Vec::new();
        for _ in 0..layers * 2 {
            let buffer = gpu.alloc(blocks * block_bytes).unwrap();
            buffer.fill(1).unwrap();
            regions.push(buffer);
        }
        let addrs: Vec<u64> = regions.iter().map(|b| b.ptr()).collect();
        let engine = Engine::new(engine_options(
            Role::Prefill,
            0,
            "nvlink-bench",
            &addrs,
            blocks,
            block_bytes,
            Some("nvlink"),
        ))
        .unwrap();
        let mut peer = Peer::spawn(peer_gpu, layers, blocks, block_bytes, "alloc", "zero");
        connect(&engine, &mut peer);
        let local = permutation(blocks, 11);
        let remote = permutation(blocks, 12);
        let bytes = (2 * blocks * block_bytes) as f64;
        let plain = |i: usize| {
            engine
                .write_cache(
                    KEY,
                    BlockIds::U32(&local),
                    BlockIds::U32(&remote),
                    (i % layers) as f64,
                    None,
                )
                .unwrap()
        };
        // The block list prepared once (`prepare_blocks`) and written per layer, as
        // FastDeploy's cache messager does (the same ids for every layer of a request).
        let list = engine
            .prepare_blocks(KEY, BlockIds::U32(&local), BlockIds::U32(&remote))
            .unwrap();
        let prepared_call = |i: usize| {
            let (sender, completion) = futures_channel::oneshot::channel();
            engine
                .write(
                    WriteCall {
                        peer: CallPeer::Key(KEY),
                        blocks: CallBlocks::Prepared(&list),
                        layer: (i % layers) as f64,
                        tag: None,
                        timeout: None,
                        integrity: Default::default(),
                    },
                    OnDone::Callback(Box::new(move |result| {
                        let _ = sender.send(result);
                    })),
                )
                .unwrap();
            completion
        };
        let (one, one_us, one_sync) = measure(plain, 1, bytes);
        let (four, four_us, four_sync) = measure(plain, 4, bytes);
        table.push_str(&format!(
            "| {} KiB | {one:.1} | {one_us:.1} ({one_sync:.1}) | {four:.1} | {four_us:.1} ({four_sync:.1}) | {:.2} |\n",
            block_bytes >> 10,
            four / ceiling
        ));
        let (p_one, p_one_us, _) = measure(prepared_call, 1, bytes);
        let (p_four, p_four_us, _) = measure(prepared_call, 4, bytes);
        prepared.push_str(&format!(
            "| {} KiB | {p_one:.1} | {p_one_us:.1} | {p_four:.1} | {p_four_us:.1} |\n",
            block_bytes >> 10
        ));
        engine.close();
        peer.exit();
    }
    table.push_str(&prepared);
    note(&table);
    if let Ok(path) = std::env::var("KVT_GPU_BENCH_OUT") {
        let path = format!("{}-nvlink.md", path.trim_end_matches(".md"));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        writeln!(file, "{table}").unwrap();
    }
}

/// The copy kernel alone (no engine): one launch moves 1538 scattered K and V blocks from
/// GPU 0 into the last GPU's memory; µs per launch waiting for each, and pipelined. Shows
/// how much of a call's time is the GPU's. `KVT_PTX_VARIANTS=path:threads:segments,...`
/// adds variants of the kernel to compare.
#[test]
#[ignore = "benchmark; needs an NVIDIA GPU: scripts/gpu-tests.sh --run"]
fn nvlink_copy_kernel_alone() {
    let gpu = require_gpu("nvlink_copy_kernel_alone");
    let cuda = kvtransfer_cuda::Cuda::get().unwrap();
    let peer = cuda.gpu(last_gpu()).unwrap();
    gpu.enable_peer_access(&peer).unwrap();
    let blocks = 1538usize;
    let mut variants = vec![("embedded".to_string(), gpu.copy_kernel().unwrap())];
    if let Ok(list) = std::env::var("KVT_PTX_VARIANTS") {
        for item in list.split(',').filter(|s| !s.is_empty()) {
            let parts: Vec<&str> = item.split(':').collect();
            let ptx = std::fs::read_to_string(parts[0]).unwrap();
            let kernel = gpu
                .copy_kernel_from(&ptx, parts[1].parse().unwrap(), parts[2].parse().unwrap())
                .unwrap();
            variants.push((item.to_string(), kernel));
        }
    }
    let mut report = String::from("| kernel | block | µs/launch (waited) | µs/launch (pipelined) | GB/s pipelined |\n| --- | --- | --- | --- | --- |\n");
    for block_bytes in [1usize << 10, 4 << 10] {
        let src: Vec<_> = (0..2)
            .map(|_| gpu.alloc(blocks * block_bytes).unwrap())
            .collect();
        let dst: Vec<_> = (0..2)
            .map(|_| peer.alloc(blocks * block_bytes).unwrap())
            .collect();
        let local = permutation(blocks, 21);
        let remote = permutation(blocks, 22);
        let n = 2 * blocks;
        let mut desc = gpu.pinned(3 * 8 * n).unwrap();
        let base = desc.as_mut_ptr().cast::<u64>();
        for kind in 0..2 {
            for i in 0..blocks {
                let at = kind * blocks + i;
                // SAFETY: `desc` holds 3n u64 and at < n.
                unsafe {
                    *base.add(at) = dst[kind].ptr() + (remote[i] as usize * block_bytes) as u64;
                    *base.add(n + at) = src[kind].ptr() + (local[i] as usize * block_bytes) as u64;
                    *base.add(2 * n + at) = block_bytes as u64;
                }
            }
        }
        // What filling such a table costs on this host: pinned (mapped) memory vs the heap.
        let fill = |out: *mut u64| {
            let started = Instant::now();
            for _ in 0..100 {
                for i in 0..3 * n {
                    // SAFETY: both targets hold 3n u64.
                    unsafe { out.add(i).write_volatile(i as u64) };
                }
            }
            started.elapsed().as_secs_f64() / 100.0 * 1e6
        };
        let mut heap = vec![0u64; 3 * n];
        let restore: Vec<u64> = (0..3 * n)
            .map(|i| {
                // SAFETY: i < 3n.
                unsafe { *base.add(i) }
            })
            .collect();
        let (pinned_us, heap_us) = (fill(base), fill(heap.as_mut_ptr()));
        for (i, v) in restore.iter().enumerate() {
            // SAFETY: i < 3n.
            unsafe { *base.add(i) = *v };
        }
        note(&format!(
            "{} KiB: writing the {}-byte descriptor table: {pinned_us:.1} µs into pinned memory, {heap_us:.1} µs into the heap",
            block_bytes >> 10,
            24 * n
        ));
        let at = base as u64;
        let stream = gpu.stream().unwrap();
        for (name, kernel) in &variants {
            // SAFETY: descriptors of n segments in mapped pinned memory, every range live
            // device memory (peer access enabled), not overlapping; synchronized before
            // anything is freed.
            let launch = || unsafe {
                kernel
                    .launch(&stream, at, at + 8 * n as u64, at + 16 * n as u64, n as u32)
                    .unwrap()
            };
            for _ in 0..20 {
                launch();
            }
            stream.synchronize().unwrap();
            let reps = 300;
            let started = Instant::now();
            for _ in 0..reps {
                launch();
                stream.synchronize().unwrap();
            }
            let waited = started.elapsed().as_secs_f64() / reps as f64 * 1e6;
            let started = Instant::now();
            for _ in 0..reps {
                launch();
            }
            stream.synchronize().unwrap();
            let pipelined = started.elapsed().as_secs_f64() / reps as f64 * 1e6;
            // The launch call alone (host side), queued behind the previous ones.
            let started = Instant::now();
            for _ in 0..reps {
                launch();
            }
            let launch_us = started.elapsed().as_secs_f64() / reps as f64 * 1e6;
            stream.synchronize().unwrap();
            note(&format!("{name}: cuLaunchKernel call {launch_us:.2} µs"));
            report.push_str(&format!(
                "| {name} | {} KiB | {waited:.1} | {pipelined:.1} | {:.1} |\n",
                block_bytes >> 10,
                (n * block_bytes) as f64 / pipelined / 1e3
            ));
        }
    }
    note(&report);
}
