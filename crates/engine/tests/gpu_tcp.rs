//! GPU regions over the TCP transport (pinned staging), registration-time detection and
//! dma-buf export. The tests are `#[ignore]`d (reported as ignored where there is no GPU);
//! run with `--ignored` they fail on any problem, a missing GPU included. Run:
//! `scripts/gpu-tests.sh --run` on a GPU machine.

use futures_executor::block_on;
use kvtransfer_cuda::PointerInfo;
use kvtransfer_engine::internals::CHUNK_BYTES;
use kvtransfer_engine::{BlockIds, MemoryKind};
use kvtransfer_engine::{Engine, EngineOptions, Role};
use std::time::Duration;

mod gpu_support;
use gpu_support::{connect, expect_regions, note, permutation, require_gpu, side, Side};

const SIZES: [usize; 5] = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10];

/// Scattered calls on every layer plus one long contiguous run (crossing staging chunks),
/// all in flight together; then the decode side is compared byte for byte.
fn transfer_and_verify(
    prefill: &Side,
    decode: &Side,
    blocks: usize,
    block_bytes: usize,
    layers: usize,
) {
    connect(prefill, decode, "decode:0");
    let mut calls = Vec::new();
    let mut completions = Vec::new();
    for layer in 0..layers {
        let count = blocks * 3 / 4;
        let local: Vec<u32> = permutation(blocks, 7 + layer as u64)[..count].to_vec();
        let remote: Vec<u32> = permutation(blocks, 1000 + layer as u64)[..count].to_vec();
        completions.push(
            prefill
                .engine
                .write_cache(
                    "decode:0",
                    BlockIds::U32(&local),
                    BlockIds::U32(&remote),
                    layer as f64,
                    Some(format!("call-{layer}").into_bytes()),
                )
                .unwrap(),
        );
        calls.push((layer, local, remote));
    }
    // A contiguous run longer than one staging chunk where the region allows it.
    let run = blocks.min(2 * CHUNK_BYTES / block_bytes + 3);
    let local: Vec<u32> = (0..run as u32).collect();
    let remote: Vec<u32> = ((blocks - run) as u32..blocks as u32).collect();
    completions.push(
        prefill
            .engine
            .write_cache(
                "decode:0",
                BlockIds::U32(&local),
                BlockIds::U32(&remote),
                0.0,
                None,
            )
            .unwrap(),
    );
    calls.push((0, local, remote));
    for completion in completions {
        block_on(completion).unwrap().unwrap();
    }
    expect_regions(prefill, decode, block_bytes, &calls);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu-tests.sh --run on a GPU machine"]
fn device_to_device_every_block_size() {
    let gpu = require_gpu("device_to_device_every_block_size");
    // Plus sizes that are not multiples of 16 (the copy kernel's byte path).
    for block_bytes in SIZES.into_iter().chain([1000, 4100]) {
        let blocks = (24 << 20) / block_bytes / 2;
        let blocks = blocks.clamp(16, 1538);
        let prefill = side(Role::Prefill, Some(&gpu), 2, blocks, block_bytes, 11);
        let decode = side(Role::Decode, Some(&gpu), 2, blocks, block_bytes, 0);
        assert!(prefill.engine.memory_kinds().iter().all(|k| k.is_device()));
        assert!(decode.engine.memory_kinds().iter().all(|k| k.is_device()));
        transfer_and_verify(&prefill, &decode, blocks, block_bytes, 2);
        prefill.engine.close();
        decode.engine.close();
        note(&format!(
            "device→device over TCP: {block_bytes}-byte blocks × {blocks} verified"
        ));
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu-tests.sh --run on a GPU machine"]
fn host_to_device_and_device_to_host() {
    let gpu = require_gpu("host_to_device_and_device_to_host");
    for block_bytes in [1 << 10, 64 << 10, 256 << 10] {
        let blocks = ((24 << 20) / block_bytes / 2).clamp(16, 1538);
        for (from_gpu, to_gpu) in [(false, true), (true, false)] {
            let prefill = side(
                Role::Prefill,
                from_gpu.then_some(&gpu),
                2,
                blocks,
                block_bytes,
                5,
            );
            let decode = side(
                Role::Decode,
                to_gpu.then_some(&gpu),
                2,
                blocks,
                block_bytes,
                0,
            );
            transfer_and_verify(&prefill, &decode, blocks, block_bytes, 2);
            prefill.engine.close();
            decode.engine.close();
            note(&format!(
                "{}→{} over TCP: {block_bytes}-byte blocks × {blocks} verified",
                if from_gpu { "device" } else { "host" },
                if to_gpu { "device" } else { "host" }
            ));
        }
    }
}

fn options(
    keys: Vec<u64>,
    values: Vec<u64>,
    blocks: u32,
    block_bytes: u64,
    gpu_idx: u32,
) -> EngineOptions {
    EngineOptions {
        role: Role::Decode,
        gpu_idx,
        name: "detect".into(),
        host: None,
        keys,
        values,
        block_number: blocks,
        block_bytes,
        key_scales: Vec::new(),
        value_scales: Vec::new(),
        scale_block_bytes: 0,
        transport: Some("tcp".into()),
        arrivals: None,
        connect_timeout: Duration::from_secs(1),
        rdma_settings: None,
        rdma_devices: None,
        auth_token: None,
        tp: kvtransfer_engine::TpOptions::default(),
        imports: Vec::new(),
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu-tests.sh --run on a GPU machine"]
fn registration_detects_device_and_host_memory() {
    let gpu = require_gpu("registration_detects_device_and_host_memory");
    let device = gpu.alloc(1 << 20).unwrap();
    let mut host = vec![0u8; 1 << 20];
    let pinned = gpu.pinned(1 << 20).unwrap();
    let engine = Engine::new(options(
        vec![device.ptr(), host.as_mut_ptr() as u64],
        vec![host.as_mut_ptr() as u64 + 4096, pinned.as_ptr() as u64],
        64,
        1024,
        0,
    ))
    .unwrap();
    assert_eq!(
        engine.memory_kinds(),
        vec![
            MemoryKind::Device { ordinal: 0 },
            MemoryKind::Host,
            MemoryKind::Host,
            MemoryKind::Host
        ]
    );
    engine.close();
    // An address inside the allocation is device memory too; the region must fit in it.
    let engine = Engine::new(options(vec![device.ptr() + 4096], vec![], 16, 4096, 0)).unwrap();
    assert_eq!(
        engine.memory_kinds(),
        vec![MemoryKind::Device { ordinal: 0 }]
    );
    engine.close();
    let err = Engine::new(options(vec![device.ptr() + 4096], vec![], 256, 4096, 0))
        .err()
        .expect("an error");
    assert_eq!(err.code(), "ERR_INVALID_ARGUMENT", "{err}");
    assert!(
        err.to_string()
            .contains("pass the end of its GPU allocation"),
        "{err}"
    );
    // A caller's hint (JS buffers) skips the lookup.
    let engine = Engine::with_known_host(
        options(vec![host.as_mut_ptr() as u64], vec![], 16, 1024, 0),
        &|_| true,
    )
    .unwrap();
    assert_eq!(engine.memory_kinds(), vec![MemoryKind::Host]);
    engine.close();
    // gpuIdx naming no GPU is an error only when a region is device memory.
    let engine = Engine::new(options(
        vec![host.as_mut_ptr() as u64],
        vec![],
        16,
        1024,
        999,
    ))
    .unwrap();
    assert_eq!(engine.memory_kinds(), vec![MemoryKind::Host]);
    engine.close();
    let err = Engine::new(options(vec![device.ptr()], vec![], 16, 1024, 999))
        .err()
        .expect("an error");
    assert_eq!(err.code(), "ERR_INVALID_ARGUMENT", "{err}");
    assert!(err.to_string().contains("gpuIdx"), "{err}");
    // Lookups work on a thread with no current context (detection creates none).
    let ptr = device.ptr();
    let info = std::thread::spawn(move || {
        kvtransfer_cuda::Cuda::get()
            .unwrap()
            .pointer_info(ptr)
            .unwrap()
    })
    .join()
    .unwrap();
    assert!(
        matches!(info, PointerInfo::Device { ordinal: 0, range_start, range_size }
            if range_start == ptr && range_size == 1 << 20),
        "{info:?}"
    );
    note("registration: device pointer → Device{0}, pageable and pinned host → Host");
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu-tests.sh --run on a GPU machine"]
fn dmabuf_export_of_device_memory() {
    let gpu = require_gpu("dmabuf_export_of_device_memory");
    let device = gpu.alloc(4 << 20).unwrap();
    let start = device.ptr().div_ceil(1 << 16) << 16;
    match gpu.dmabuf_fd(start, 2 << 20) {
        Ok(fd) => {
            use std::os::fd::AsRawFd;
            assert!(fd.as_raw_fd() >= 0);
            note(&format!(
                "dma-buf: cuMemGetHandleForAddressRange gave fd {} (DMA_BUF_SUPPORTED = {})",
                fd.as_raw_fd(),
                gpu.dmabuf_supported()
            ));
        }
        Err(e) => {
            // Only acceptable where the device says it cannot export dma-bufs.
            assert!(
                !gpu.dmabuf_supported(),
                "the GPU reports dma-buf support but export failed: {e}"
            );
            assert_eq!(e.op, "cuMemGetHandleForAddressRange");
            note(&format!(
                "dma-buf export not supported on this GPU/driver: {e}"
            ));
        }
    }
}
