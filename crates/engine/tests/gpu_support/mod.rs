//! Shared fixtures of the GPU tests (`gpu_*.rs`): the GPU requirement, regions in host or
//! device memory, and two engines over loopback TCP.
//!
//! The GPU tests are `#[ignore]`d, so a host without a GPU reports them as ignored, never
//! as passed. Run with `--ignored` (scripts/gpu-tests.sh --run) they need GPU 0: no
//! `libcuda.so.1`, a failing `cuInit` or no device fails the test, like any other problem.
#![allow(
    dead_code,
    reason = "each GPU test binary uses a different part of the shared fixtures"
)]

#[path = "../common/hex.rs"]
pub mod hex;

use kvtransfer_cuda::{Cuda, DeviceBuffer, Gpu};
use kvtransfer_engine::{Engine, EngineOptions, Role};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

/// Printed past the test harness's capture, so a skip is visible in every run.
pub fn note(message: &str) {
    let _ = writeln!(std::io::stderr(), "{message}");
}

/// GPU 0; panics (the test fails) where there is none.
pub fn require_gpu(test: &str) -> Arc<Gpu> {
    let cuda = Cuda::get().unwrap_or_else(|reason| panic!("{test} needs a GPU: {reason}"));
    let count = cuda
        .device_count()
        .expect("cuDeviceGetCount after a successful cuInit");
    assert!(
        count > 0,
        "{test} needs a GPU: the CUDA driver sees no device"
    );
    cuda.gpu(0).expect("retain GPU 0's primary context")
}

/// Deterministic content, distinct per region and offset.
pub fn pattern(region: usize, len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed ^ (region as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5851_F42D_4C95_7F2D;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes()[..(len - out.len()).min(8)]);
    }
    out
}

/// A region in host or device memory.
pub enum Mem {
    Host(Vec<u8>),
    Device(DeviceBuffer),
}

impl Mem {
    pub fn new(gpu: Option<&Arc<Gpu>>, content: Vec<u8>) -> Mem {
        match gpu {
            None => Mem::Host(content),
            Some(gpu) => {
                let buf = gpu.alloc(content.len()).expect("cuMemAlloc");
                buf.copy_from_host(&content).expect("cuMemcpyHtoD");
                Mem::Device(buf)
            }
        }
    }

    pub fn addr(&mut self) -> u64 {
        match self {
            Mem::Host(v) => v.as_mut_ptr() as u64,
            Mem::Device(d) => d.ptr(),
        }
    }

    pub fn read(&self) -> Vec<u8> {
        match self {
            Mem::Host(v) => v.clone(),
            Mem::Device(d) => {
                let mut out = vec![0u8; d.len()];
                d.copy_to_host(&mut out).expect("cuMemcpyDtoH");
                out
            }
        }
    }
}

pub struct Side {
    pub engine: Engine,
    /// Layer-major, K then V (region order).
    pub regions: Vec<Mem>,
    /// What each region held when the side was made.
    pub initial: Vec<Vec<u8>>,
}

/// A side of `layers` × (K, V) regions of `blocks × block_bytes`; patterned (prefill) or
/// zeroed (decode); on `gpu` when given.
pub fn side(
    role: Role,
    gpu: Option<&Arc<Gpu>>,
    layers: usize,
    blocks: usize,
    block_bytes: usize,
    seed: u64,
) -> Side {
    let len = blocks * block_bytes;
    let initial: Vec<Vec<u8>> = (0..layers * 2)
        .map(|r| {
            if role == Role::Prefill {
                pattern(r, len, seed)
            } else {
                vec![0u8; len]
            }
        })
        .collect();
    let mut regions: Vec<Mem> = initial.iter().map(|c| Mem::new(gpu, c.clone())).collect();
    let addrs: Vec<u64> = regions.iter_mut().map(Mem::addr).collect();
    let engine = Engine::new(engine_options(
        role,
        0,
        &format!("{}-gpu-test", role.as_str()),
        &addrs,
        blocks,
        block_bytes,
        Some("tcp"),
    ))
    .expect("engine");
    Side {
        engine,
        regions,
        initial,
    }
}

/// Options of an engine over `addrs` (layer-major, K then V), `blocks × block_bytes` each.
pub fn engine_options(
    role: Role,
    gpu_idx: u32,
    name: &str,
    addrs: &[u64],
    blocks: usize,
    block_bytes: usize,
    transport: Option<&str>,
) -> EngineOptions {
    EngineOptions {
        role,
        gpu_idx,
        name: name.into(),
        host: None,
        keys: addrs.iter().step_by(2).copied().collect(),
        values: addrs.iter().skip(1).step_by(2).copied().collect(),
        block_number: blocks as u32,
        block_bytes: block_bytes as u64,
        key_scales: Vec::new(),
        value_scales: Vec::new(),
        scale_block_bytes: 0,
        transport: transport.map(Into::into),
        arrivals: None,
        connect_timeout: Duration::from_secs(10),
        rdma_settings: None,
        rdma_devices: None,
        auth_token: None,
        tp: kvtransfer_engine::TpOptions::default(),
        imports: Vec::new(),
    }
}

pub fn connect(prefill: &Side, decode: &Side, key: &str) {
    let challenge = prefill.engine.auth_challenge(key).unwrap();
    let response = decode.engine.auth_respond(&challenge).unwrap();
    let hello = prefill.engine.hello(key, &response).unwrap();
    let reply = decode.engine.accept(&hello).unwrap();
    prefill
        .engine
        .finish_connect(key, "127.0.0.1", &reply)
        .unwrap();
}

/// A permutation of `0..n` (xorshift Fisher–Yates).
pub fn permutation(n: usize, seed: u64) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..n as u32).collect();
    let mut x = seed | 1;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ids.swap(i, (x % (i as u64 + 1)) as usize);
    }
    ids
}

/// Every decode region equals its initial content with `remote[i]` replaced by prefill
/// block `local[i]` of the same region, byte for byte; applied per call in order.
pub fn expect_regions(
    prefill: &Side,
    decode: &Side,
    block_bytes: usize,
    calls: &[(usize, Vec<u32>, Vec<u32>)],
) {
    let mut expected = decode.initial.clone();
    for (layer, local, remote) in calls {
        for kind in 0..2 {
            let r = layer * 2 + kind;
            let src = &prefill.initial[r];
            for (l, m) in local.iter().zip(remote) {
                let (l, m) = (*l as usize * block_bytes, *m as usize * block_bytes);
                expected[r][m..m + block_bytes].copy_from_slice(&src[l..l + block_bytes]);
            }
        }
    }
    for (r, want) in expected.iter().enumerate() {
        let got = decode.regions[r].read();
        if &got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            panic!(
                "region {r} (layer {}, {}) differs first at byte {at} (block {}): got {:#04x}, want {:#04x}",
                r / 2,
                if r % 2 == 0 { "K" } else { "V" },
                at / block_bytes,
                got[at],
                want[at]
            );
        }
    }
}
