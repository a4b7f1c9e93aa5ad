//! The other process of the NVLink tests (`tests/gpu_nvlink.rs`): a decode engine whose
//! regions are GPU memory, driven over stdin/stdout by the test, which plays prefill.
//!
//! `nvlink_peer <gpu> <layers> <blocks> <block_bytes> <memory> <init>`
//! - memory: `alloc` (cuMemAlloc), `vmm` (cuMemCreate, POSIX fd shareable), `split` (each
//!   region over two cuMemCreate allocations mapped back to back);
//! - init: `pattern` (canaries: every block distinct) or `zero`.
//!
//! Commands, one per line: `respond <hex>` and `accept <hex>` (the handshake; answers hex or
//! `error <code> <message>`), `dump <path>` (every region, in order, into a file), `arrivals`
//! (`<count> <tag,tag,...>`), `exit`.

use gpu_support::hex::{hex, unhex};
use kvtransfer_cuda::{Allocation, Cuda, DeviceBuffer, Mapping, ShareableBuffer};
use kvtransfer_engine::{Arrival, Engine, Role};
use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex};

#[path = "../tests/gpu_support/mod.rs"]
mod gpu_support;

enum Region {
    Alloc(DeviceBuffer),
    Vmm(ShareableBuffer),
    /// Unmapped before its allocations are released (field order).
    Split {
        mapping: Mapping,
        _allocations: Vec<Allocation>,
    },
}

impl Region {
    fn ptr(&self) -> u64 {
        match self {
            Region::Alloc(b) => b.ptr(),
            Region::Vmm(b) => b.ptr(),
            Region::Split { mapping, .. } => mapping.ptr(),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, gpu, layers, blocks, block_bytes, memory, init] = args.as_slice() else {
        panic!("usage: nvlink_peer <gpu> <layers> <blocks> <block_bytes> <alloc|vmm|split> <pattern|zero>");
    };
    let (gpu, layers, blocks, block_bytes): (u32, usize, usize, usize) = (
        gpu.parse().unwrap(),
        layers.parse().unwrap(),
        blocks.parse().unwrap(),
        block_bytes.parse().unwrap(),
    );
    let gpu = Cuda::get().expect("cuda").gpu(gpu).expect("gpu");
    let len = blocks * block_bytes;
    let mut regions = Vec::new();
    for r in 0..layers * 2 {
        let region = match memory.as_str() {
            "alloc" => Region::Alloc(gpu.alloc(len).expect("cuMemAlloc")),
            "vmm" => Region::Vmm(gpu.alloc_shareable(len).expect("cuMemCreate")),
            "split" => {
                let (a, a_len) = gpu.create_shareable(len / 2).expect("cuMemCreate");
                let (b, b_len) = gpu
                    .create_shareable(len - a_len.min(len))
                    .expect("cuMemCreate");
                let mapping = gpu
                    .map_allocations(&[(&a, a_len), (&b, b_len)])
                    .expect("map two allocations back to back");
                assert!(mapping.len() >= len);
                Region::Split {
                    mapping,
                    _allocations: vec![a, b],
                }
            }
            other => panic!("unknown memory kind {other}"),
        };
        let content = match init.as_str() {
            "pattern" => gpu_support::pattern(r, len, 99),
            _ => vec![0u8; len],
        };
        // Through a cuMemAlloc buffer: every kind of region is device memory of this GPU.
        let bounce = gpu.alloc(len).expect("bounce");
        bounce.copy_from_host(&content).expect("fill bounce");
        copy_on_device(&gpu, region.ptr(), bounce.ptr(), len);
        regions.push(region);
    }
    let arrivals: Arc<Mutex<Vec<Arrival>>> = Arc::default();
    let sink = Arc::clone(&arrivals);
    let addrs: Vec<u64> = regions.iter().map(Region::ptr).collect();
    let mut options = gpu_support::engine_options(
        Role::Decode,
        gpu.ordinal(),
        "nvlink-peer",
        &addrs,
        blocks,
        block_bytes,
        std::env::var("KVT_PEER_TRANSPORT").ok().as_deref(),
    );
    options.arrivals = Some(Arc::new(move |a| sink.lock().unwrap().push(a)));
    let engine = Engine::new(options).expect("engine");
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let (command, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let answer = match command {
            "respond" => match engine.auth_respond(&unhex(rest)) {
                Ok(bytes) => hex(&bytes),
                Err(e) => format!("error {} {e}", e.code()),
            },
            "accept" => match engine.accept(&unhex(rest)) {
                Ok(bytes) => hex(&bytes),
                Err(e) => format!("error {} {e}", e.code()),
            },
            "dump" => {
                let mut file = std::fs::File::create(rest).unwrap();
                let mut buf = vec![0u8; len];
                for region in &regions {
                    let staging = gpu.alloc(len).expect("staging");
                    copy_on_device(&gpu, staging.ptr(), region.ptr(), len);
                    staging.copy_to_host(&mut buf).expect("read back");
                    file.write_all(&buf).unwrap();
                }
                "ok".to_string()
            }
            "arrivals" => {
                let arrivals = arrivals.lock().unwrap();
                let tags: Vec<String> = arrivals
                    .iter()
                    .map(|a| String::from_utf8_lossy(&a.tag).into_owned())
                    .collect();
                format!("{} {}", arrivals.len(), tags.join(","))
            }
            "exit" => break,
            other => format!("error unknown command {other}"),
        };
        writeln!(out, "{answer}").unwrap();
        out.flush().unwrap();
    }
    engine.close();
}

/// Device-to-device copy of `len` bytes from `src` to `dst` (both device memory of `gpu`).
fn copy_on_device(gpu: &Arc<kvtransfer_cuda::Gpu>, dst: u64, src: u64, len: usize) {
    let stream = gpu.stream().expect("stream");
    let (mut d, mut s, mut n) = (vec![dst], vec![src], vec![len]);
    // SAFETY: both ranges are live device memory of this GPU, `len` bytes, not overlapping;
    // the stream is synchronized before they can go.
    unsafe { stream.copy_batch_async(&mut d, &mut s, &mut n, false) }.expect("copy");
    stream.synchronize().expect("sync");
}
