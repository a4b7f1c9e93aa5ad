//! The other process of the NVLink tests (`tests/gpu_nvlink.rs`): a decode engine whose
//! regions are GPU memory, driven over stdin/stdout by the test, which plays prefill.
//!
//! `nvlink_peer <gpu> <layers> <blocks> <block_bytes> <memory> <init>`
//! - memory: `alloc` (cuMemAlloc), `vmm` (cuMemCreate, POSIX fd shareable), `split` (each
//!   region over two cuMemCreate allocations mapped back to back), `imported` (cuMemCreate
//!   memory this process owns as a sidecar's worker would, exported as POSIX fds and
//!   imported by the engine as the sidecar imports a worker's: warm re-attach tests);
//! - init: `pattern` (canaries: every block distinct) or `zero`.
//!
//! Commands, one per line: `respond <hex>` and `accept <hex>` (the handshake; answers hex or
//! `error <code> <message>`), `dump <path>` (every region, in order, into a file), `arrivals`
//! (`<count> <tag,tag,...>`), `exit`. With `imported` memory (warm re-attach): `park`,
//! `swap <zero|pattern> [short|split]` (new worker memory swapped in; `short`: one byte
//! less, refused; `split`: each region over two allocations), `dumpold <path>` (the
//! previous worker's memory, read through its own mapping), `keys` (the hex of the NVLink
//! keys, or `none`), `refusal` (`none` or the error), `ipc <hex handle> <bytes>` (an
//! engine over a legacy IPC import of that allocation: its warm re-attach refusal).

use gpu_support::hex::{hex, unhex};
use kvtransfer_cuda::{Allocation, Cuda, DeviceBuffer, Mapping, ShareableBuffer};
use kvtransfer_engine::{
    Arrival, Engine, ImportSource, ImportSpec, ImportedMemory, Importer, Role, TransportKind,
};
use std::io::{BufRead, Write};
use std::os::fd::OwnedFd;
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
    let imported = memory == "imported";
    for r in 0..layers * 2 {
        let region = match memory.as_str() {
            "imported" => Region::Vmm(gpu.alloc_shareable(len).expect("cuMemCreate")),
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
    let mut importer = Importer::new(gpu.ordinal());
    let mut imports: Vec<ImportedMemory> = Vec::new();
    if imported {
        for (r, region) in regions.iter().enumerate() {
            let spec = vmm_spec(region, len as u64);
            imports.push(importer.import("regions", r, spec).expect("import"));
        }
    }
    let addrs: Vec<u64> = if imported {
        imports.iter().map(ImportedMemory::address).collect()
    } else {
        regions.iter().map(Region::ptr).collect()
    };
    let mut old: Vec<Region> = Vec::new();
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
    options.imports = imports;
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
            "dump" | "dumpold" => {
                let mut file = std::fs::File::create(rest).unwrap();
                let mut buf = vec![0u8; len];
                let which = if command == "dump" { &regions } else { &old };
                for region in which {
                    let staging = gpu.alloc(len).expect("staging");
                    copy_on_device(&gpu, staging.ptr(), region.ptr(), len);
                    staging.copy_to_host(&mut buf).expect("read back");
                    file.write_all(&buf).unwrap();
                }
                "ok".to_string()
            }
            "park" => match engine.park_imports() {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("error {} {e}", e.code()),
            },
            "swap" => {
                let mut args = rest.split(' ');
                let init = args.next().unwrap_or("zero");
                let shape = args.next().unwrap_or("");
                let fresh: Vec<Region> = (0..layers * 2)
                    .map(|r| {
                        let region = if shape == "split" {
                            split(&gpu, len)
                        } else {
                            Region::Vmm(gpu.alloc_shareable(len).expect("cuMemCreate"))
                        };
                        let content = match init {
                            "pattern" => gpu_support::pattern(r, len, 55),
                            _ => vec![0u8; len],
                        };
                        let bounce = gpu.alloc(len).expect("bounce");
                        bounce.copy_from_host(&content).expect("fill bounce");
                        copy_on_device(&gpu, region.ptr(), bounce.ptr(), len);
                        region
                    })
                    .collect();
                let bytes = if shape == "short" { len - 1 } else { len } as u64;
                let specs = fresh
                    .iter()
                    .enumerate()
                    .map(|(r, region)| ("regions", r, vmm_spec(region, bytes)))
                    .collect();
                match engine.swap_imports(specs) {
                    Ok(()) => {
                        old = std::mem::replace(&mut regions, fresh);
                        "ok".to_string()
                    }
                    Err(e) => format!("error {} {e}", e.code()),
                }
            }
            "keys" => engine
                .region_keys()
                .into_iter()
                .find(|(kind, _)| *kind == TransportKind::Nvlink)
                .map_or_else(|| "none".to_string(), |(_, keys)| hex(&keys)),
            "refusal" => match engine.swap_refusal() {
                None => "none".to_string(),
                Some(e) => format!("error {} {e}", e.code()),
            },
            "ipc" => {
                let (handle, bytes) = rest.split_once(' ').expect("ipc <hex> <bytes>");
                ipc_refusal(&gpu, &unhex(handle), bytes.parse().unwrap(), block_bytes)
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

/// `region`'s allocations exported as POSIX fds, as a worker shares them with the sidecar.
fn vmm_spec(region: &Region, bytes: u64) -> ImportSpec {
    let (fds, segment_bytes): (Vec<OwnedFd>, u64) = match region {
        Region::Vmm(buffer) => (
            vec![buffer.allocation().export_fd().expect("export fd")],
            buffer.len() as u64,
        ),
        Region::Split {
            mapping,
            _allocations,
        } => (
            _allocations
                .iter()
                .map(|a| a.export_fd().expect("export fd"))
                .collect(),
            (mapping.len() / _allocations.len()) as u64,
        ),
        Region::Alloc(_) => panic!("cuMemAlloc memory has no fd"),
    };
    ImportSpec {
        source: ImportSource::CudaVmm { fds, segment_bytes },
        offset: 0,
        bytes,
    }
}

/// A region over two equal cuMemCreate allocations mapped back to back.
fn split(gpu: &Arc<kvtransfer_cuda::Gpu>, len: usize) -> Region {
    let (a, a_len) = gpu.create_shareable(len.div_ceil(2)).expect("cuMemCreate");
    let (b, b_len) = gpu.create_shareable(a_len).expect("cuMemCreate");
    assert_eq!(a_len, b_len);
    let mapping = gpu
        .map_allocations(&[(&a, a_len), (&b, b_len)])
        .expect("map two allocations back to back");
    Region::Split {
        mapping,
        _allocations: vec![a, b],
    }
}

/// An engine over another process's cuMemAlloc allocation (its legacy IPC `handle`):
/// what its warm re-attach refusal says.
fn ipc_refusal(
    gpu: &Arc<kvtransfer_cuda::Gpu>,
    handle: &[u8],
    bytes: usize,
    block_bytes: usize,
) -> String {
    let handle = kvtransfer_engine::parse_cuda_ipc_handle("regions", handle).expect("handle");
    let mut importer = Importer::new(gpu.ordinal());
    let import = match importer.import(
        "regions",
        0,
        ImportSpec {
            source: ImportSource::CudaIpc(handle),
            offset: 0,
            bytes: bytes as u64,
        },
    ) {
        Ok(import) => import,
        Err(e) => return format!("error {} {e}", e.code()),
    };
    let mut options = gpu_support::engine_options(
        Role::Decode,
        gpu.ordinal(),
        "nvlink-peer-ipc",
        &[import.address()],
        bytes / block_bytes,
        block_bytes,
        Some("tcp"),
    );
    options.imports = vec![import];
    let engine = Engine::new(options).expect("engine over an IPC import");
    let answer = match (engine.swap_refusal(), engine.park_imports()) {
        (None, _) => "none".to_string(),
        (Some(refusal), Err(park)) if park.code() == refusal.code() => {
            format!("error {} {refusal}", refusal.code())
        }
        (Some(refusal), park) => format!("error MISMATCH {refusal} / park: {park:?}"),
    };
    engine.close();
    answer
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
