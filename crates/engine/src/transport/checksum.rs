//! End-to-end checksums (`checksum: 'crc32c'`): the writer sums every byte a call moves, in
//! the order the copies move them ([`for_each_copy`], segment by segment), with CRC-32C
//! ([`Crc32c`]); the notice carries the sum; a receiver that records where the call's bytes
//! landed ([`Landed`]) sums them again from its own memory before it reports the arrival.

use super::job::{for_each_copy, ChecksumCheck, JobPlan};
use crate::layout::RegionTable;

/// A CRC-32C (Castagnoli, the `CRC-32/ISCSI` of the catalogues) over segments, as if they
/// were one buffer. The `crc-fast` crate folds 64 bytes per step with carry-less
/// multiplication (VPCLMULQDQ with AVX-512, PCLMULQDQ with SSE 4.1, PMULL on ARMv8, chosen
/// at run time; software elsewhere): about 4× the throughput of the CRC32 instruction
/// chains it replaced, which made the sums most of a checksummed call's extra cost
/// (docs/performance.md).
pub(crate) struct Crc32c(crc_fast::Digest);

impl Crc32c {
    pub(crate) fn new() -> Crc32c {
        Crc32c(crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi))
    }

    #[inline]
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub(crate) fn sum(&self) -> u32 {
        // A 32-bit CRC: the digest's value fits.
        self.0.finalize() as u32
    }
}

/// Calls `visit(address, length)` for the source ranges of every byte `plan` moves from
/// `table`'s regions, in the order the copies move them (what the checksum covers).
pub(crate) fn source_ranges(table: &RegionTable, plan: &JobPlan, mut visit: impl FnMut(u64, u64)) {
    for_each_copy(table, &plan.shard, plan.layer, &plan.runs, |op| {
        let mut done = 0;
        while done < op.len {
            let (local, _, contiguous) = op.at(done);
            let len = contiguous.min(op.len - done);
            visit(local, len);
            done += len;
        }
    });
}

/// CRC-32C of the bytes `plan` moves from host regions of `table`. The caller checked that
/// the layer's regions are host memory.
pub(crate) fn sum_call(table: &RegionTable, plan: &JobPlan) -> u32 {
    let mut crc = Crc32c::new();
    source_ranges(table, plan, |local, len| {
        // SAFETY: the planner checked every block id against this side's regions, so
        // `local..local+len` lies inside a registered host region, which the engine keeps
        // valid while the call is pending; it is only read.
        let bytes =
            unsafe { std::slice::from_raw_parts(local as usize as *const u8, len as usize) };
        crc.update(bytes);
    });
    crc.sum()
}

/// Adds the bytes `plan` moves from `table`'s regions (GPU memory) to `sum`, in the order
/// the copies move them, for the CRC-32C kernel to sum (the GPU side of [`sum_call`]).
pub(crate) fn push_call(
    sum: &mut kvtransfer_cuda::Crc32cSum,
    table: &RegionTable,
    plan: &JobPlan,
) -> Result<(), kvtransfer_cuda::CudaError> {
    sum.clear();
    let mut pushed = Ok(());
    source_ranges(table, plan, |local, len| {
        if pushed.is_ok() {
            pushed = sum.push(local, len);
        }
    });
    pushed
}

/// Where the bytes of the call being received landed, in the order they came (a receiver
/// records each frame, and checks at the call's end).
#[derive(Debug, Default)]
pub(crate) struct Landed {
    ranges: Vec<(u64, usize)>,
    /// Ranges of GPU memory, for a receiver that sums them on the GPU
    /// ([`Landed::check_with_gpu`]).
    gpu: Vec<(u64, u64)>,
    /// Some bytes went to GPU memory, which this side does not sum on the CPU.
    device: bool,
}

/// Sums ranges of GPU memory (a receiver's GPU summer): the ranges, and whether to flip
/// one byte first (`KVCACHE_TEST_CORRUPT_RECEIVE`); an error says why it could not sum.
pub(crate) type SumOnGpu<'a> = &'a mut dyn FnMut(&[(u64, u64)], bool) -> Result<u32, String>;

impl Landed {
    /// `len` bytes landed at host address `addr`.
    #[inline]
    pub(crate) fn host(&mut self, addr: u64, len: usize) {
        self.ranges.push((addr, len));
    }

    /// Bytes landed in GPU memory.
    #[inline]
    pub(crate) fn device(&mut self) {
        self.device = true;
    }

    /// `len` bytes landed at GPU address `addr` (summed only by [`Landed::check_with_gpu`]).
    #[inline]
    pub(crate) fn device_range(&mut self, addr: u64, len: u64) {
        self.device = true;
        self.gpu.push((addr, len));
    }

    /// [`Landed::check`] for a receiver that can sum GPU memory with `sum_on_gpu`: a call
    /// whose bytes all landed in GPU memory is summed there; one that also wrote host
    /// memory is reported unchecked (its bytes are not summed on one side).
    pub(crate) fn check_with_gpu(
        &mut self,
        expected: Option<u32>,
        sum_on_gpu: SumOnGpu<'_>,
    ) -> ChecksumCheck {
        let check = match expected {
            Some(expected) if self.device && self.ranges.is_empty() && !self.gpu.is_empty() => {
                let corrupt = crate::config::process().test_corrupt_receive;
                match sum_on_gpu(&self.gpu, corrupt) {
                    Ok(actual) if actual == expected => Some(ChecksumCheck::Verified),
                    Ok(actual) => Some(ChecksumCheck::Mismatch { expected, actual }),
                    Err(why) => {
                        crate::log::log_warn!(
                            "summing a call's GPU bytes failed ({why}); reported unverified"
                        );
                        Some(ChecksumCheck::Unchecked)
                    }
                }
            }
            _ => None,
        };
        match check {
            Some(check) => {
                self.ranges.clear();
                self.gpu.clear();
                self.device = false;
                check
            }
            None => self.check(expected),
        }
    }

    /// Checks the recorded bytes against the notice's `expected` sum and forgets them (the
    /// next call starts empty). With `KVCACHE_TEST_CORRUPT_RECEIVE` set (tests only), one
    /// byte is flipped in memory first, as a bit flip on the way would have.
    pub(crate) fn check(&mut self, expected: Option<u32>) -> ChecksumCheck {
        let check = match expected {
            None => ChecksumCheck::Absent,
            Some(_) if self.device => ChecksumCheck::Unchecked,
            Some(expected) => {
                if crate::config::process().test_corrupt_receive {
                    self.corrupt_one_byte();
                }
                let mut crc = Crc32c::new();
                for &(addr, len) in &self.ranges {
                    // SAFETY: each range was checked against the registered regions before
                    // the bytes landed there; the engine keeps them valid until the
                    // receiving thread is joined at close. It is only read.
                    let bytes =
                        unsafe { std::slice::from_raw_parts(addr as usize as *const u8, len) };
                    crc.update(bytes);
                }
                let actual = crc.sum();
                if actual == expected {
                    ChecksumCheck::Verified
                } else {
                    ChecksumCheck::Mismatch { expected, actual }
                }
            }
        };
        self.ranges.clear();
        self.gpu.clear();
        self.device = false;
        check
    }

    /// The test hook: flips the first byte of the call's first non-empty range.
    fn corrupt_one_byte(&self) {
        if let Some(&(addr, _)) = self.ranges.iter().find(|(_, len)| *len > 0) {
            // SAFETY: as in `check`; a byte of a registered region this call just wrote.
            unsafe {
                let byte = addr as usize as *mut u8;
                byte.write_volatile(!byte.read_volatile());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Run;
    use crate::shard::Shard;
    use crate::transport::RunPool;

    #[test]
    fn crc32c_has_the_catalogue_check_value_whatever_the_segments() {
        // CRC-32/ISCSI's check value (the CRC of "123456789").
        let mut whole = Crc32c::new();
        whole.update(b"123456789");
        assert_eq!(whole.sum(), 0xe306_9283);
        // Segments of every length sum as the buffer they make up, long ones included
        // (the folding paths start at 64 and 256 bytes).
        let bytes: Vec<u8> = (0..70_000u32).map(|i| (i * 31 + i / 251) as u8).collect();
        let mut one = Crc32c::new();
        one.update(&bytes);
        for cut in [0, 1, 7, 63, 64, 65, 255, 256, 4097, 65_536, 69_999] {
            let mut two = Crc32c::new();
            two.update(&bytes[..cut]);
            two.update(&bytes[cut..]);
            assert_eq!(two.sum(), one.sum(), "cut at {cut}");
        }
        assert_ne!(one.sum(), Crc32c::new().sum());
    }

    #[test]
    fn the_receiver_sum_of_landed_bytes_matches_the_writer_sum() {
        let mut k = vec![0u8; 4 * 64];
        let mut v = vec![0u8; 4 * 64];
        for (i, b) in k.iter_mut().chain(v.iter_mut()).enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let (ka, va) = (k.as_ptr() as u64, v.as_ptr() as u64);
        let table = RegionTable::new(&[ka], &[va], 4, 64).unwrap();
        let pool = std::sync::Arc::new(RunPool::default());
        let mut runs = pool.take();
        runs.push(Run {
            local_block: 1,
            remote_block: 0,
            blocks: 2,
        });
        let plan = JobPlan {
            runs: pool.pooled(runs),
            layer: 0,
            blocks: 2,
            shard: Shard::whole(&table.layout),
            notice: None,
            landing: None,
            acked: false,
        };
        let sum = sum_call(&table, &plan);
        let mut landed = Landed::default();
        landed.host(ka + 64, 128);
        landed.host(va + 64, 128);
        assert_eq!(landed.check(Some(sum)), ChecksumCheck::Verified);
        assert_eq!(landed.check(None), ChecksumCheck::Absent);
        landed.host(ka + 64, 128);
        landed.host(va + 64, 127);
        assert!(matches!(
            landed.check(Some(sum)),
            ChecksumCheck::Mismatch { expected, .. } if expected == sum
        ));
        landed.device();
        assert_eq!(landed.check(Some(sum)), ChecksumCheck::Unchecked);
        drop((k, v));
    }
}
