//! The CRC-32C kernel ([`Crc32cKernel`]): PTX (`crc32c.ptx`, generated from `crc32c.cu` by
//! `scripts/build-ptx.sh`), JIT-compiled by the driver, that sums a list of segments of GPU
//! or mapped pinned host memory as one buffer, in one launch; and one sum's buffers
//! ([`Crc32cSum`]): the segments cut into chunks, the result word.
//!
//! CRC-32C is Castagnoli's CRC (reflected polynomial 0x82F63B78, init and xorout
//! 0xFFFFFFFF; the `CRC-32/ISCSI` of the catalogues), the sum the CPU side computes.

use crate::context::Gpu;
use crate::error::CudaError;
use crate::memory::{DeviceBuffer, PinnedBuffer};
use crate::stream::Stream;
use crate::sys::{CUfunction, CUmodule};
use std::os::raw::{c_uint, c_void};
use std::sync::Arc;

/// The kernel's PTX, NUL-terminated for `cuModuleLoadData`.
static PTX: &str = concat!(include_str!("crc32c.ptx"), "\0");

/// Threads per block (the kernel's `__launch_bounds__`); each of its 8 warps sums one chunk
/// at a time.
const THREADS: c_uint = 256;
const WARPS: u64 = 8;
/// Blocks per SM at most (64 registers a thread, 21 KiB of shared memory a block).
const BLOCKS_PER_SM: u32 = 4;
/// `CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`.
const ATTRIBUTE_MULTIPROCESSOR_COUNT: i32 = 16;
/// Bytes of a chunk at most: segments are cut at multiples of the chunk size in the address
/// space, so a long segment is shared by many warps and each warp's chunk costs about the
/// same. Small sums use smaller chunks ([`chunk_bytes`]), down to [`MIN_CHUNK_BYTES`].
pub const CRC32C_CHUNK_BYTES: u64 = 16 << 10;
/// Bytes of a chunk at least (two 16-byte units per lane of a warp).
const MIN_CHUNK_BYTES: u64 = 1 << 10;

/// The chunk size for a sum of `total` bytes on a GPU of `sms` SMs: about one chunk per
/// warp of every SM (a small sum is spread over the GPU rather than queued on a few
/// warps), a power of two within [`MIN_CHUNK_BYTES`]..=[`CRC32C_CHUNK_BYTES`].
pub fn chunk_bytes(total: u64, sms: u32) -> u64 {
    let per_warp = total / (u64::from(sms.max(1)) * WARPS).max(1);
    per_warp
        .next_power_of_two()
        .clamp(MIN_CHUNK_BYTES, CRC32C_CHUNK_BYTES)
}

/// Cuts `segments` into chunks of at most `chunk` bytes (a power of two) at multiples of
/// `chunk` in the address space; `visit(address, position)` for each, in order, where the
/// position is the number of bytes before the chunk.
fn cut(segments: &[(u64, u64)], chunk: u64, mut visit: impl FnMut(u64, u64)) {
    let mut pos = 0;
    for &(addr, len) in segments {
        let (mut at, end) = (addr, addr + len);
        while at < end {
            let next = end.min((at / chunk + 1) * chunk);
            visit(at, pos);
            pos += next - at;
            at = next;
        }
    }
}
/// Chunks a new [`Crc32cSum`] has room for (the table grows when a sum needs more).
const INITIAL_CHUNKS: usize = 4096;

impl Gpu {
    /// Loads the CRC-32C kernel (`crc32c.ptx`, JIT-compiled by the driver for this GPU)
    /// into this GPU's primary context, which it makes current on the calling thread.
    pub fn crc32c_kernel(self: &Arc<Self>) -> Result<Crc32cKernel, CudaError> {
        self.bind()?;
        let sms = self.attribute(ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32;
        let image = std::ffi::CString::new(PTX.trim_end_matches('\0'))
            .map_err(|_| CudaError::other("cuModuleLoadData", "PTX with a NUL byte inside"))?;
        let mut module: CUmodule = std::ptr::null_mut();
        // SAFETY: a NUL-terminated PTX image; valid out-pointer; a context is current.
        self.cuda.check("cuModuleLoadData", unsafe {
            (self.cuda.api.module_load_data)(&mut module, image.as_ptr().cast())
        })?;
        let mut function: CUfunction = std::ptr::null_mut();
        // SAFETY: a loaded module and a NUL-terminated name.
        let rc = unsafe {
            (self.cuda.api.module_get_function)(&mut function, module, c"kvt_crc32c".as_ptr())
        };
        // Made before the check so that the module is unloaded on failure too.
        let kernel = Crc32cKernel {
            gpu: Arc::clone(self),
            module,
            function,
            max_blocks: sms.saturating_mul(BLOCKS_PER_SM),
        };
        self.cuda.check("cuModuleGetFunction", rc)?;
        Ok(kernel)
    }
}

/// The CRC-32C kernel loaded in a GPU's context; unloaded on drop.
pub struct Crc32cKernel {
    gpu: Arc<Gpu>,
    module: CUmodule,
    function: CUfunction,
    /// Blocks per launch at most (the warps stride over further chunks).
    max_blocks: u32,
}

// SAFETY: module and function handles may be used from any thread with the context current.
unsafe impl Send for Crc32cKernel {}
// SAFETY: launching only reads the handles; the driver's launch is thread-safe.
unsafe impl Sync for Crc32cKernel {}

impl Crc32cKernel {
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The buffers of one sum: its chunk table and result word (mapped pinned memory), its
    /// partial sums (device memory). Makes the kernel's context current.
    pub fn sum_buffers(&self) -> Result<Crc32cSum, CudaError> {
        let scratch = self.gpu.alloc(4 * (self.max_blocks as usize + 1))?;
        // The ticket (the last word) starts at 0; each launch's last block resets it.
        scratch.fill(0)?;
        let mut out = self.gpu.pinned(4)?;
        // SAFETY: 4 bytes of host memory this value owns, not in use by any launch yet.
        unsafe { out.as_mut_ptr().cast::<u32>().write_volatile(0) };
        Ok(Crc32cSum {
            segments: Vec::new(),
            table: self.gpu.pinned(16 * INITIAL_CHUNKS)?,
            capacity: INITIAL_CHUNKS,
            chunks: 0,
            total: 0,
            scratch,
            out,
            max_blocks: self.max_blocks,
            gpu: Arc::clone(&self.gpu),
        })
    }

    /// Queues one launch that sums `sum`'s segments into its result word
    /// ([`Crc32cSum::value`] once the stream has passed it).
    ///
    /// # Safety
    /// Every segment pushed to `sum` must stay valid (device memory of this context, memory
    /// it maps, or mapped pinned host memory) and unmodified until the stream (or a later
    /// event) has been synchronized; until then `sum` must be neither refilled
    /// ([`Crc32cSum::clear`], [`Crc32cSum::push`]) nor dropped, nor launched on another
    /// stream. `sum` must come from this kernel ([`Crc32cKernel::sum_buffers`]). The stream
    /// must belong to this kernel's context, which must be current.
    pub unsafe fn launch(&self, stream: &Stream, sum: &mut Crc32cSum) -> Result<(), CudaError> {
        sum.cut(self.max_blocks / BLOCKS_PER_SM)?;
        let n = u32::try_from(sum.chunks)
            .map_err(|_| CudaError::other("cuLaunchKernel", "more than 2^32 chunks to sum"))?;
        let blocks = (sum.chunks as u64)
            .div_ceil(WARPS)
            .clamp(1, u64::from(self.max_blocks));
        let partials = sum.scratch.ptr();
        let (mut chunks, mut n, mut total) = (sum.table.as_ptr() as u64, n, sum.total);
        let (mut partials, mut ticket, mut out) = (
            partials,
            partials + 4 * u64::from(self.max_blocks),
            sum.out.as_ptr() as u64,
        );
        let mut params: [*mut c_void; 6] = [
            (&mut chunks as *mut u64).cast(),
            (&mut n as *mut u32).cast(),
            (&mut total as *mut u64).cast(),
            (&mut partials as *mut u64).cast(),
            (&mut ticket as *mut u64).cast(),
            (&mut out as *mut u64).cast(),
        ];
        // SAFETY: `params` points at six live values matching the kernel's parameters (u64,
        // u32, u64, u64, u64, u64), read during the call. The chunk table holds `n` entries
        // in mapped pinned memory, the scratch holds `max_blocks` partials and the ticket,
        // `out` 4 bytes of mapped pinned memory, all owned by `sum`; the segments' contract
        // is the caller's.
        self.gpu.cuda.check("cuLaunchKernel", unsafe {
            (self.gpu.cuda.api.launch_kernel)(
                self.function,
                blocks as c_uint,
                1,
                1,
                THREADS,
                1,
                1,
                0,
                stream.raw,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }
}

impl Drop for Crc32cKernel {
    fn drop(&mut self) {
        let _current = self.gpu.scoped();
        // SAFETY: loaded by cuModuleLoadData, unloaded once (launches were synchronized by
        // their owners first).
        unsafe { (self.gpu.cuda.api.module_unload)(self.module) };
    }
}

/// One sum: the segments to sum (cut into chunks at launch: their addresses and positions in
/// a table of mapped pinned memory), the kernel's partial sums and ticket (device memory),
/// and the result (mapped pinned memory). Refill it only once the launch that read it has
/// completed: keep one per launch in flight.
pub struct Crc32cSum {
    // Field order: the memory drops before the context's last reference here.
    segments: Vec<(u64, u64)>,
    table: PinnedBuffer,
    /// Chunks `table` has room for.
    capacity: usize,
    chunks: usize,
    /// Bytes pushed since the last clear.
    total: u64,
    scratch: DeviceBuffer,
    out: PinnedBuffer,
    max_blocks: u32,
    gpu: Arc<Gpu>,
}

impl Crc32cSum {
    /// Forgets the segments pushed so far (the next sum starts empty).
    pub fn clear(&mut self) {
        self.segments.clear();
        self.chunks = 0;
        self.total = 0;
    }

    /// Bytes pushed since the last clear.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Appends `len` bytes at `addr` to the sum.
    pub fn push(&mut self, addr: u64, len: u64) -> Result<(), CudaError> {
        addr.checked_add(len)
            .ok_or_else(|| CudaError::other("crc32c", "a segment past the address space"))?;
        if len > 0 {
            self.segments.push((addr, len));
            self.total += len;
        }
        Ok(())
    }

    /// Writes the chunk table for a GPU of `sms` SMs, growing it (pinned memory, in the
    /// kernel's context, which is current) when it has no room; no launch reads it now
    /// (the launch's contract).
    fn cut(&mut self, sms: u32) -> Result<(), CudaError> {
        let chunk = chunk_bytes(self.total, sms);
        let mut count = 0usize;
        cut(&self.segments, chunk, |_, _| count += 1);
        if count > self.capacity {
            let capacity = count.next_power_of_two();
            self.table = self.gpu.pinned(16 * capacity)?;
            self.capacity = capacity;
        }
        let table = self.table.as_mut_ptr().cast::<u64>();
        let mut i = 0;
        cut(&self.segments, chunk, |at, pos| {
            // SAFETY: `table` holds `capacity` ≥ `count` pairs of u64 (16-byte aligned
            // pinned memory) and i < count; no launch reads it now (the launch's contract).
            unsafe {
                table.add(2 * i).write(at);
                table.add(2 * i + 1).write(pos);
            }
            i += 1;
        });
        self.chunks = count;
        Ok(())
    }

    /// The CRC-32C of the segments the last launch summed, once the stream has passed it
    /// (before that, an older value or 0).
    pub fn value(&self) -> u32 {
        // SAFETY: 4 bytes of mapped pinned memory this value owns; the GPU writes it with a
        // volatile store, read volatile here.
        unsafe { self.out.as_ptr().cast::<u32>().read_volatile() }
    }

    /// Blocks the last launch used (for tests of the reduction).
    pub fn blocks(&self) -> u32 {
        ((self.chunks as u64).div_ceil(WARPS)).clamp(1, u64::from(self.max_blocks)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::PTX;

    /// The reflected polynomial arithmetic the kernel's constant tables come from.
    const POLY: u32 = 0x82F6_3B78;
    const ONE: u32 = 0x8000_0000;

    fn times_x(v: u32) -> u32 {
        (v >> 1) ^ if v & 1 == 1 { POLY } else { 0 }
    }

    fn over_x(v: u32) -> u32 {
        if v & ONE != 0 {
            ((v ^ POLY) << 1) | 1
        } else {
            v << 1
        }
    }

    fn x_to(n: u32) -> u32 {
        (0..n).fold(ONE, |v, _| times_x(v))
    }

    fn mulmod(a: u32, mut b: u32) -> u32 {
        let mut p = 0;
        let mut m = ONE;
        while m != 0 {
            if a & m != 0 {
                p ^= b;
            }
            m >>= 1;
            b = times_x(b);
        }
        p
    }

    /// The hex words of `__constant__ u32 <name>[..] = {...};` in crc32c.cu.
    fn table(name: &str) -> Vec<u32> {
        let source = include_str!("crc32c.cu");
        let start = source.find(&format!("{name}[")).expect(name);
        let body = &source[start..];
        let body = &body[body.find('{').unwrap() + 1..body.find('}').unwrap()];
        body.split(',')
            .map(|w| u32::from_str_radix(w.trim().trim_start_matches("0x"), 16).unwrap())
            .collect()
    }

    #[test]
    fn ptx_is_one_nul_terminated_image_with_the_entry() {
        assert!(PTX.ends_with('\0'));
        assert_eq!(PTX.matches('\0').count(), 1);
        assert!(PTX.contains(".visible .entry kvt_crc32c("));
        assert!(PTX.contains(".version 7.0"), "lowered to ISA 7.0");
    }

    #[test]
    fn the_kernel_constants_are_the_powers_of_x_they_claim() {
        let p8 = table("kvt_crc_p8");
        assert_eq!(p8.len(), 64);
        let mut v = x_to(8);
        for (j, &word) in p8.iter().enumerate() {
            assert_eq!(word, v, "x^(8·2^{j})");
            v = mulmod(v, v);
        }
        let inv8 = table("kvt_crc_inv8");
        assert_eq!(inv8.len(), 16);
        for (z, &word) in inv8.iter().enumerate() {
            assert_eq!(mulmod(word, x_to(8 * z as u32)), ONE, "x^(-8·{z})");
            assert_eq!(word, (0..8 * z).fold(ONE, |v, _| over_x(v)));
        }
        let lane = table("kvt_crc_lane");
        assert_eq!(lane.len(), 32);
        for (k, &word) in lane.iter().enumerate() {
            assert_eq!(word, x_to(128 * k as u32), "x^(128·{k})");
        }
        let source = include_str!("crc32c.cu");
        assert!(source.contains(&format!("#define X4096 0x{:08x}u", x_to(4096))));
    }

    /// The standard CRC-32C, bit by bit (the reference).
    fn crc32c(parts: &[&[u8]]) -> u32 {
        let mut crc = !0u32;
        for part in parts {
            for &b in *part {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = times_x(crc);
                }
            }
        }
        !crc
    }

    /// The kernel's arithmetic on the CPU, lane by lane as `crc32c.cu` does it: chunks cut
    /// as `Crc32cSum::push` cuts them, 16-byte units interleaved over 32 lanes with the
    /// x^4096 step, each lane's term shifted by the units after its last one, the chunk's
    /// term by x^(8·(after − padding)), the init term at the end. Addresses are offsets
    /// into `memory`.
    fn kernel_model(memory: &[u8], segments: &[(u64, u64)], chunk: u64) -> u32 {
        let (p8, inv8, lane_f) = (
            table("kvt_crc_p8"),
            table("kvt_crc_inv8"),
            table("kvt_crc_lane"),
        );
        let x4096 = x_to(4096);
        let t0: Vec<u32> = (0..256u32)
            .map(|b| (0..8).fold(b, |c, _| times_x(c)))
            .collect();
        let mut t = vec![t0.clone()];
        for j in 1..16 {
            let prev: &Vec<u32> = &t[j - 1];
            t.push(
                prev.iter()
                    .map(|&v| (v >> 8) ^ t0[(v & 255) as usize])
                    .collect(),
            );
        }
        let raw16 = |u: &[u8; 16]| (0..16).fold(0, |r, i| r ^ t[15 - i][u[i] as usize]);
        let power8 = |e: u64| {
            (0..64)
                .filter(|j| e >> j & 1 == 1)
                .fold(ONE, |v, j| mulmod(v, p8[j]))
        };
        let mut chunks = Vec::new();
        super::cut(segments, chunk, |at, pos| chunks.push((at, pos)));
        let total: u64 = segments.iter().map(|&(_, len)| len).sum();
        let mut acc = 0u32;
        for (c, &(addr, pos)) in chunks.iter().enumerate() {
            let next = chunks.get(c + 1).map_or(total, |&(_, p)| p);
            let (len, after) = (next - pos, total - next);
            let (start, end) = (addr & !15, (addr + len + 15) & !15);
            let units = (end - start) / 16;
            let pad = end - (addr + len);
            let mut r = 0;
            for lane in 0..32u64 {
                let mut s = 0u32;
                let mut i = lane;
                while i < units {
                    let mut unit = [0u8; 16];
                    for (k, byte) in unit.iter_mut().enumerate() {
                        let a = start + 16 * i + k as u64;
                        if a >= addr && a < addr + len {
                            *byte = memory[a as usize];
                        }
                    }
                    s = mulmod(s, x4096) ^ raw16(&unit);
                    i += 32;
                }
                if lane < units {
                    let last = lane + ((units - 1 - lane) >> 5 << 5);
                    r ^= mulmod(lane_f[(units - 1 - last) as usize], s);
                }
            }
            let f = if after >= pad {
                power8(after - pad)
            } else {
                inv8[(pad - after) as usize]
            };
            acc ^= mulmod(f, r);
        }
        acc ^ mulmod(!0, power8(total)) ^ !0
    }

    #[test]
    fn the_kernel_arithmetic_is_crc32c() {
        let memory: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let c = super::CRC32C_CHUNK_BYTES;
        let cases: Vec<Vec<(u64, u64)>> = vec![
            vec![],
            vec![(5, 0)],
            vec![(0, 9)],
            vec![(3, 1), (17, 2), (100, 15), (1000, 16), (2001, 17)],
            vec![(c - 3, 7), (2 * c + 5, c + 40), (7, 513)],
            vec![(1, 3 * c), (0, 16 * 33 + 5)],
            vec![(c, 2 * c), (13, 511), (9, 0), (40_001, 70_000)],
        ];
        for segments in &cases {
            let parts: Vec<&[u8]> = segments
                .iter()
                .map(|&(a, l)| &memory[a as usize..(a + l) as usize])
                .collect();
            for chunk in [super::MIN_CHUNK_BYTES, 4096, c] {
                assert_eq!(
                    kernel_model(&memory, segments, chunk),
                    crc32c(&parts),
                    "{segments:?} in chunks of {chunk}"
                );
            }
        }
        assert_eq!(crc32c(&[b"123456789"]), 0xE306_9283);
    }

    #[test]
    fn small_sums_take_small_chunks() {
        use super::{chunk_bytes, CRC32C_CHUNK_BYTES, MIN_CHUNK_BYTES};
        assert_eq!(chunk_bytes(0, 132), MIN_CHUNK_BYTES);
        assert_eq!(chunk_bytes(128 << 10, 132), MIN_CHUNK_BYTES);
        assert_eq!(chunk_bytes(8 << 20, 132), 8 << 10);
        assert_eq!(chunk_bytes(512 << 20, 132), CRC32C_CHUNK_BYTES);
        assert_eq!(chunk_bytes(1 << 20, 0), CRC32C_CHUNK_BYTES);
    }
}
