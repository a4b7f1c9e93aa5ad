//! Host↔device copies for any transport: a [`CopyQueue`] gathers copies (destination,
//! source, length; each address host or device memory) for one stream of one GPU and
//! queues them with one submission:
//! - many small copies (fewer than [`KERNEL_BELOW_AVERAGE_BYTES`] on average): one launch
//!   of the segment-copy kernel, the SMs move the bytes, its descriptors in a
//!   [`Descriptors`] table of mapped pinned memory;
//! - otherwise the copy engines: one `cuMemcpyBatchAsync` (CUDA 12.8+ drivers), else one
//!   `cuMemcpyAsync` per copy.
//!
//! [`CopySettings`] turns the kernel and the batch API off. Completion is the caller's:
//! record an [`Event`] after a submission, or [`CopyQueue::synchronize`].

use crate::plan::Run;
use kvtransfer_cuda::{CopyKernel, CudaError, Event, Gpu, PinnedBuffer, RunKinds, Stream};
use std::sync::Arc;

/// Copies per submission at most that the kernel takes (a [`Descriptors`] table's size);
/// larger submissions go to the copy engines.
pub const MAX_COPIES_PER_SUBMIT: usize = 8192;
/// Submissions whose copies average fewer bytes than this go through the copy kernel (one
/// launch; SMs move the bytes) rather than the copy engines, which pay ~1 µs per copy.
pub const KERNEL_BELOW_AVERAGE_BYTES: usize = 32 << 10;

/// Which copy paths may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopySettings {
    /// The segment-copy kernel for small copies (`KVCACHE_CUDA_COPY_KERNEL`).
    pub kernel: bool,
    /// `cuMemcpyBatchAsync` where the driver has it (`KVCACHE_CUDA_BATCH_COPY`).
    pub batch_api: bool,
    /// Submissions whose copies average fewer bytes go through the kernel.
    pub kernel_below_average_bytes: usize,
}

impl Default for CopySettings {
    fn default() -> Self {
        CopySettings {
            kernel: true,
            batch_api: true,
            kernel_below_average_bytes: KERNEL_BELOW_AVERAGE_BYTES,
        }
    }
}

impl CopySettings {
    /// `KVCACHE_CUDA_COPY_KERNEL=0` keeps every copy on the copy engines;
    /// `KVCACHE_CUDA_BATCH_COPY=0` issues one `cuMemcpyAsync` per copy. Both on by
    /// default; read and validated in `config.rs`.
    pub fn from_env() -> Self {
        let process = crate::config::process();
        CopySettings {
            kernel: process.cuda_copy_kernel,
            batch_api: process.cuda_batch_copy,
            kernel_below_average_bytes: KERNEL_BELOW_AVERAGE_BYTES,
        }
    }

    /// The same paths, with the kernel taking submissions up to `bytes` on average.
    pub fn kernel_below(self, bytes: usize) -> Self {
        CopySettings {
            kernel_below_average_bytes: bytes,
            ..self
        }
    }
}

/// Whether `n` copies of `total` bytes go through the kernel (when it is loaded), given
/// the average below which it takes them.
fn by_kernel(n: usize, total: usize, below_average: usize) -> bool {
    n > 1 && n <= MAX_COPIES_PER_SUBMIT && total / n < below_average
}

/// The descriptor table of one kernel launch (dsts, srcs, sizes: `MAX_COPIES_PER_SUBMIT`
/// u64 each) in mapped pinned memory. A submission writes it and the launch reads it, so
/// it may be reused only once that launch has completed: keep one per event.
pub struct Descriptors {
    buf: PinnedBuffer,
}

/// Copies gathered for one stream of one GPU, queued with one submission each.
pub struct CopyQueue {
    // Field order: the kernel and the stream drop before the context.
    kernel: Option<CopyKernel>,
    stream: Stream,
    gpu: Arc<Gpu>,
    /// `cuMemcpyBatchAsync` is allowed and the driver has it.
    batch_api: bool,
    kernel_below_average_bytes: usize,
    dsts: Vec<u64>,
    srcs: Vec<u64>,
    sizes: Vec<usize>,
}

impl CopyQueue {
    /// A queue on a new stream of `gpu`, whose primary context it makes current on the
    /// calling thread. If the kernel cannot be loaded, the copy engines do every copy.
    pub fn new(gpu: Arc<Gpu>, settings: CopySettings) -> Result<CopyQueue, CudaError> {
        gpu.bind()?;
        let stream = gpu.stream()?;
        let kernel = if settings.kernel {
            match gpu.copy_kernel() {
                Ok(kernel) => Some(kernel),
                Err(e) => {
                    crate::log::debug!("gpu copy: no copy kernel ({e}); copy engines only");
                    None
                }
            }
        } else {
            None
        };
        let batch_api = settings.batch_api && gpu.cuda().batch_copy_supported();
        Ok(CopyQueue {
            kernel,
            stream,
            gpu,
            batch_api,
            kernel_below_average_bytes: settings.kernel_below_average_bytes,
            dsts: Vec::new(),
            srcs: Vec::new(),
            sizes: Vec::new(),
        })
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The queue's stream (other work ordered with its copies, e.g. a checksum's kernel).
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// How submissions are queued, for the log.
    pub fn describe(&self) -> &'static str {
        match (self.kernel.is_some(), self.batch_api) {
            (true, true) => "of small blocks by kernel, others cuMemcpyBatchAsync",
            (true, false) => "of small blocks by kernel, others one cuMemcpyAsync each",
            (false, true) => "batched with cuMemcpyBatchAsync",
            (false, false) => "issued one cuMemcpyAsync each",
        }
    }

    /// A descriptor table for [`CopyQueue::submit`].
    pub fn descriptors(&self) -> Result<Descriptors, CudaError> {
        Ok(Descriptors {
            buf: self.gpu.pinned(3 * 8 * MAX_COPIES_PER_SUBMIT)?,
        })
    }

    /// Gathers a copy of `len` bytes from `src` to `dst` for the next submission.
    #[inline]
    pub fn push(&mut self, dst: u64, src: u64, len: usize) {
        self.dsts.push(dst);
        self.srcs.push(src);
        self.sizes.push(len);
    }

    /// Copies gathered since the last submission.
    #[inline]
    pub fn pending(&self) -> usize {
        self.dsts.len()
    }

    /// Queues the gathered copies on the stream and forgets them (also on error): small
    /// copies with one launch of the kernel (descriptors written to `desc`), others with
    /// the copy engines. Nothing to do when none is gathered.
    ///
    /// # Safety
    /// Every gathered range must stay valid, and every pinned host source unmodified and
    /// pinned host destination unread, until the stream (or a later event) has been
    /// synchronized; host memory must be pinned (mapped pinned for the kernel), copies must
    /// not overlap. `desc` must not be in use by an earlier launch still queued. The
    /// queue's context must be current.
    pub unsafe fn submit(&mut self, desc: &mut Descriptors) -> Result<(), CudaError> {
        let n = self.pending();
        let total: usize = self.sizes.iter().sum();
        let result = match &self.kernel {
            Some(kernel) if by_kernel(n, total, self.kernel_below_average_bytes) => {
                let base = desc.buf.as_mut_ptr().cast::<u64>();
                // SAFETY: `desc` holds 3 × MAX_COPIES_PER_SUBMIT u64 (allocated so, 8-byte
                // aligned pinned memory) and n <= MAX_COPIES_PER_SUBMIT; no launch reads it
                // now (caller's contract).
                unsafe {
                    std::ptr::copy_nonoverlapping(self.dsts.as_ptr(), base, n);
                    std::ptr::copy_nonoverlapping(
                        self.srcs.as_ptr(),
                        base.add(MAX_COPIES_PER_SUBMIT),
                        n,
                    );
                    for (i, &size) in self.sizes.iter().enumerate() {
                        *base.add(2 * MAX_COPIES_PER_SUBMIT + i) = size as u64;
                    }
                }
                let at = base as u64;
                let step = (MAX_COPIES_PER_SUBMIT * 8) as u64;
                // SAFETY: descriptors of n copies in mapped pinned memory, untouched until
                // the launch has completed; the copies' memory contract is the caller's.
                unsafe { kernel.launch(&self.stream, at, at + step, at + 2 * step, n as u32) }
            }
            // SAFETY: forwarded to the caller.
            _ => unsafe {
                self.stream.copy_batch_async(
                    &mut self.dsts,
                    &mut self.srcs,
                    &mut self.sizes,
                    self.batch_api,
                )
            },
        };
        self.dsts.clear();
        self.srcs.clear();
        self.sizes.clear();
        result
    }

    /// Whether `runs` planned runs of `kinds` kinds go through one launch of the kernel's
    /// runs entry ([`CopyQueue::launch_runs`]): the kernel is loaded with that entry and
    /// takes every average, and the runs fit a descriptor table.
    pub fn takes_runs(&self, runs: usize, kinds: u32) -> bool {
        self.kernel.as_ref().is_some_and(CopyKernel::has_runs)
            && self.kernel_below_average_bytes == usize::MAX
            && (1..=4).contains(&kinds)
            && runs * kinds as usize > 1
            && runs * std::mem::size_of::<Run>() <= 3 * 8 * MAX_COPIES_PER_SUBMIT
    }

    /// One launch for `runs` of every kind in `places` (`kinds` of them): the runs are
    /// copied into `desc` as they are (12 bytes each), nothing per kind or per copy is
    /// built on the host. Only when [`CopyQueue::takes_runs`].
    ///
    /// # Safety
    /// As for [`CopyQueue::submit`], for every copy the runs name.
    pub unsafe fn launch_runs(
        &mut self,
        desc: &mut Descriptors,
        runs: &[Run],
        kinds: u32,
        places: &RunKinds,
    ) -> Result<(), CudaError> {
        assert!(
            self.takes_runs(runs.len(), kinds),
            "launch_runs for {} runs",
            runs.len()
        );
        let base = desc.buf.as_mut_ptr();
        // SAFETY: the table holds 3 × 8 × MAX_COPIES_PER_SUBMIT bytes and the runs fit
        // (takes_runs); `Run` is repr(C) plain data; no launch reads the table now
        // (caller's contract).
        unsafe {
            std::ptr::copy_nonoverlapping(
                runs.as_ptr().cast::<u8>(),
                base,
                std::mem::size_of_val(runs),
            )
        };
        let kernel = self.kernel.as_ref().expect("takes_runs checked the kernel");
        // SAFETY: the runs table in mapped pinned memory, untouched until the launch has
        // completed; the copies' memory contract is the caller's.
        unsafe { kernel.launch_runs(&self.stream, base as u64, runs.len() as u32, kinds, places) }
    }

    /// Marks the point after everything submitted so far.
    pub fn record(&self, event: &Event) -> Result<(), CudaError> {
        event.record(&self.stream)
    }

    /// Waits for every submitted copy.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize()
    }
}

impl Drop for CopyQueue {
    fn drop(&mut self) {
        // No launch may run once the kernel is unloaded (its field drops first).
        let _current = self.gpu.scoped();
        let _ = self.stream.synchronize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_takes_many_small_copies_only() {
        let below = KERNEL_BELOW_AVERAGE_BYTES;
        assert!(by_kernel(2, 2 * 1024, below));
        assert!(by_kernel(1538, 1538 * 16 * 1024, below));
        // One copy: the copy engines (no launch for a single segment).
        assert!(!by_kernel(1, 1024, below));
        assert!(!by_kernel(0, 0, below));
        // Average at the threshold or above: the copy engines.
        assert!(!by_kernel(4, 4 * below, below));
        assert!(by_kernel(4, 4 * below - 4, below));
        assert!(by_kernel(4, 4 * below, 2 * below));
        // More than a descriptor table holds.
        assert!(by_kernel(
            MAX_COPIES_PER_SUBMIT,
            MAX_COPIES_PER_SUBMIT,
            below
        ));
        assert!(!by_kernel(
            MAX_COPIES_PER_SUBMIT + 1,
            MAX_COPIES_PER_SUBMIT + 1,
            below
        ));
    }

    #[test]
    fn settings_default_to_both_paths() {
        assert_eq!(
            CopySettings::default(),
            CopySettings {
                kernel: true,
                batch_api: true,
                kernel_below_average_bytes: KERNEL_BELOW_AVERAGE_BYTES,
            }
        );
    }
}
