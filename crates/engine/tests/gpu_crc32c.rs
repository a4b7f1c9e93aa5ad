//! The CRC-32C kernel alone (`kvtransfer_cuda::Crc32cKernel`): its sum of a segment list
//! equals the CPU's CRC-32C (the `crc-fast` crate, what the engine sums host memory with)
//! of the segments' bytes concatenated, for random lists over device memory and mapped
//! pinned host memory (sizes 0..1 MiB, odd addresses and lengths, lists of thousands of
//! segments, a sum object reused launch after launch); and its throughput over 64 KiB
//! segments, printed. `#[ignore]`d: run with `--ignored` on a GPU machine
//! (scripts/gpu-tests.sh --run).

mod gpu_support;

use gpu_support::{note, pattern, require_gpu};
use kvtransfer_cuda::{Crc32cKernel, Crc32cSum, Gpu, PinnedBuffer, Stream, CRC32C_CHUNK_BYTES};
use std::sync::Arc;
use std::time::Instant;

const DEVICE_BYTES: usize = 8 << 20;
const HOST_BYTES: usize = 2 << 20;

fn cpu_crc32c<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u32 {
    let mut digest = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    for part in parts {
        digest.update(part);
    }
    digest.finalize() as u32
}

/// xorshift64*: the lists' sizes and places, reproducible from the seed printed on failure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// A segment length: mostly small and odd, sometimes up to 1 MiB, sometimes a chunk
    /// boundary's neighbour.
    fn len(&mut self, max: u64) -> u64 {
        let len = match self.below(8) {
            0 => 0,
            1 => self.below(17),
            2 => self.below(4096),
            3 => CRC32C_CHUNK_BYTES - 1 + self.below(3),
            4 => 64 << 10,
            5 => self.below(64 << 10),
            _ => self.below(1 << 20),
        };
        len.min(max)
    }
}

/// GPU 0's kernel and a stream, and one buffer of each memory with known content.
struct Fixture {
    kernel: Crc32cKernel,
    stream: Stream,
    device: kvtransfer_cuda::DeviceBuffer,
    device_bytes: Vec<u8>,
    host: PinnedBuffer,
    host_bytes: Vec<u8>,
    _gpu: Arc<Gpu>,
}

impl Fixture {
    fn new(test: &str) -> Fixture {
        let gpu = require_gpu(test);
        let kernel = gpu.crc32c_kernel().expect("load the CRC-32C kernel");
        let stream = gpu.stream().expect("a stream");
        let device_bytes = pattern(1, DEVICE_BYTES, 7);
        let device = gpu.alloc(DEVICE_BYTES).expect("cuMemAlloc");
        device.copy_from_host(&device_bytes).expect("cuMemcpyHtoD");
        let host_bytes = pattern(2, HOST_BYTES, 9);
        let mut host = gpu.pinned(HOST_BYTES).expect("cuMemHostAlloc");
        // SAFETY: `host` holds HOST_BYTES bytes of host memory no launch uses yet.
        unsafe {
            std::ptr::copy_nonoverlapping(host_bytes.as_ptr(), host.as_mut_ptr(), HOST_BYTES)
        };
        Fixture {
            kernel,
            stream,
            device,
            device_bytes,
            host,
            host_bytes,
            _gpu: gpu,
        }
    }

    /// Sums `segments` (memory 0: device, 1: host; offset; length) on the GPU and on the
    /// CPU, and returns both.
    fn both(&self, sum: &mut Crc32cSum, segments: &[(u8, u64, u64)]) -> (u32, u32) {
        sum.clear();
        for &(memory, offset, len) in segments {
            let base = match memory {
                0 => self.device.ptr(),
                _ => self.host.as_ptr() as u64,
            };
            sum.push(base + offset, len).expect("push a segment");
        }
        // SAFETY: every segment lies inside `device` or `host`, which live and stay
        // unmodified until the stream is synchronized below; `sum` is not touched before.
        unsafe { self.kernel.launch(&self.stream, sum) }.expect("launch");
        self.stream.synchronize().expect("the sum completes");
        let cpu = cpu_crc32c(segments.iter().map(|&(memory, offset, len)| {
            let bytes = if memory == 0 {
                &self.device_bytes
            } else {
                &self.host_bytes
            };
            &bytes[offset as usize..(offset + len) as usize]
        }));
        (sum.value(), cpu)
    }
}

#[test]
#[ignore = "needs a GPU: run with --ignored on a GPU machine (scripts/gpu-tests.sh --run)"]
fn gpu_crc32c_matches_the_cpu_sum_over_random_segment_lists() {
    let f = Fixture::new("gpu_crc32c_matches_the_cpu_sum_over_random_segment_lists");
    let mut sum = f.kernel.sum_buffers().expect("sum buffers");
    // Fixed cases first: nothing, empty segments, the catalogue's check value, units cut
    // at every alignment.
    assert_eq!(f.both(&mut sum, &[]), (0, 0), "no segment");
    assert_eq!(
        f.both(&mut sum, &[(0, 5, 0), (1, 3, 0)]),
        (0, 0),
        "empty ones"
    );
    let mut fixed: Vec<Vec<(u8, u64, u64)>> = Vec::new();
    for offset in 0..17 {
        for len in [1, 2, 3, 4, 15, 16, 17, 31, 32, 33, 511, 512, 513, 4097] {
            fixed.push(vec![(0, offset, len)]);
            fixed.push(vec![(1, offset + 1000, len), (0, offset * 3, len + 1)]);
        }
    }
    let c = CRC32C_CHUNK_BYTES;
    fixed.push(vec![(0, c - 1, 2), (0, 3 * c - 7, c + 14)]);
    fixed.push(vec![(0, 0, DEVICE_BYTES as u64)]);
    fixed.push(vec![
        (1, 1, HOST_BYTES as u64 - 1),
        (0, 1, DEVICE_BYTES as u64 - 2),
    ]);
    for (i, segments) in fixed.iter().enumerate() {
        let (gpu, cpu) = f.both(&mut sum, segments);
        assert_eq!(gpu, cpu, "fixed case {i}: {segments:?}");
    }

    let seed = std::env::var("KVT_CRC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_C4C3_2C00_0001u64);
    let mut rng = Rng(seed);
    let mut bytes = 0u64;
    let trials = 300;
    for trial in 0..trials {
        // Mostly a few segments, sometimes thousands (more chunks than the first table
        // holds, more warps than one launch's blocks: the table grows, warps stride).
        let count = match rng.below(10) {
            0 => 2000 + rng.below(6000),
            1..=3 => rng.below(300),
            _ => 1 + rng.below(12),
        };
        let segments: Vec<(u8, u64, u64)> = (0..count)
            .map(|_| {
                let memory = u8::from(rng.below(4) == 0);
                let size = if memory == 0 {
                    DEVICE_BYTES
                } else {
                    HOST_BYTES
                } as u64;
                let len = if count > 1000 {
                    rng.below(c + 100)
                } else {
                    rng.len(size)
                };
                (memory, rng.below(size - len + 1), len)
            })
            .collect();
        let (gpu, cpu) = f.both(&mut sum, &segments);
        bytes += sum.total();
        if gpu != cpu {
            let head: Vec<_> = segments.iter().take(20).collect();
            panic!(
                "trial {trial} (seed {seed:#x}): GPU {gpu:#010x}, CPU {cpu:#010x}, {} segments, {} bytes, {} blocks; first: {head:?}",
                segments.len(),
                sum.total(),
                sum.blocks()
            );
        }
    }
    note(&format!(
        "gpu_crc32c: {} fixed cases and {trials} random lists (seed {seed:#x}, {:.1} MiB) summed as the CPU does",
        fixed.len(),
        bytes as f64 / (1u64 << 20) as f64
    ));
}

#[test]
#[ignore = "needs a GPU: run with --ignored on a GPU machine (scripts/gpu-tests.sh --run)"]
fn gpu_crc32c_throughput_over_64k_segments() {
    let gpu = require_gpu("gpu_crc32c_throughput_over_64k_segments");
    let kernel = gpu.crc32c_kernel().expect("load the CRC-32C kernel");
    let stream = gpu.stream().expect("a stream");
    const SEGMENT: usize = 64 << 10;
    let total = 512 << 20;
    let content = pattern(3, total, 11);
    let buf = gpu.alloc(total).expect("cuMemAlloc");
    buf.copy_from_host(&content).expect("cuMemcpyHtoD");
    let mut sum = kernel.sum_buffers().expect("sum buffers");
    note("gpu_crc32c throughput (device memory, 64 KiB segments, one launch per sum):");
    for segments in [1usize, 16, 64, 256, 1024, 8192] {
        // Every other segment, so the list is not one contiguous range.
        let stride = if segments * 2 * SEGMENT <= total {
            2
        } else {
            1
        };
        sum.clear();
        for i in 0..segments {
            sum.push(buf.ptr() + (i * stride * SEGMENT) as u64, SEGMENT as u64)
                .expect("push");
        }
        let cpu = cpu_crc32c((0..segments).map(|i| {
            let at = i * stride * SEGMENT;
            &content[at..at + SEGMENT]
        }));
        let run = |sum: &mut Crc32cSum, iterations: u32| {
            let started = Instant::now();
            for _ in 0..iterations {
                // SAFETY: the segments lie inside `buf`, alive and unmodified until the
                // stream is synchronized below; `sum` is not refilled before.
                unsafe { kernel.launch(&stream, sum) }.expect("launch");
            }
            stream.synchronize().expect("the sums complete");
            started.elapsed()
        };
        run(&mut sum, 3);
        assert_eq!(sum.value(), cpu, "{segments} segments");
        let iterations = (2048 / segments).clamp(10, 200) as u32;
        let elapsed = run(&mut sum, iterations);
        let per = elapsed / iterations;
        let bytes = (segments * SEGMENT) as f64;
        note(&format!(
            "  {segments:>5} × 64 KiB = {:>7.2} MiB: {:>8.1} µs a sum, {:>7.1} GB/s",
            bytes / (1u64 << 20) as f64,
            per.as_secs_f64() * 1e6,
            bytes / per.as_secs_f64() / 1e9
        ));
    }
}
