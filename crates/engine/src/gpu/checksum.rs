//! CRC-32C of GPU memory for any transport: the CRC-32C kernel of a GPU, loaded on first
//! use ([`CrcKernel`]: the driver JIT-compiles its PTX, which takes a while, and most
//! engines never sum on the GPU), and a summer of byte ranges on a stream of its own
//! ([`GpuSummer`]), for a receiver checking where a call's bytes landed.

use kvtransfer_cuda::{Crc32cKernel, Crc32cSum, CudaError, Gpu, Stream};
use std::sync::{Arc, OnceLock};

/// The CRC-32C kernel of one GPU, loaded on first use and kept (or the reason it could not
/// be loaded).
pub struct CrcKernel {
    gpu: Arc<Gpu>,
    kernel: OnceLock<Result<Arc<Crc32cKernel>, CudaError>>,
}

impl CrcKernel {
    pub fn new(gpu: Arc<Gpu>) -> CrcKernel {
        CrcKernel {
            gpu,
            kernel: OnceLock::new(),
        }
    }

    /// The GPU it runs on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The loaded kernel; loads it on the first call (makes the GPU's context current).
    pub fn get(&self) -> Result<&Arc<Crc32cKernel>, CudaError> {
        self.kernel
            .get_or_init(|| {
                let loaded = self.gpu.crc32c_kernel().map(Arc::new);
                match &loaded {
                    Ok(_) => crate::log::debug!("gpu {}: CRC-32C kernel loaded", self.gpu.ordinal()),
                    Err(e) => crate::log::log_warn!(
                        "gpu {}: the CRC-32C kernel could not be loaded ({e}); checksums of its memory fail",
                        self.gpu.ordinal()
                    ),
                }
                loaded
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// Sums byte ranges of GPU (or mapped pinned host) memory with the CRC-32C kernel on a
/// stream of its own, one sum at a time, waiting for each.
pub struct GpuSummer {
    // Field order: the sum's buffers and the stream drop before the kernel.
    sum: Crc32cSum,
    stream: Stream,
    kernel: Arc<Crc32cKernel>,
}

impl GpuSummer {
    /// A summer on a new stream of `kernel`'s GPU.
    /// Restores the calling thread's context afterwards (it may be the application's).
    pub fn new(kernel: &CrcKernel) -> Result<GpuSummer, CudaError> {
        let _current = kernel.gpu().scoped()?;
        let kernel = Arc::clone(kernel.get()?);
        let stream = kernel.gpu().stream()?;
        Ok(GpuSummer {
            sum: kernel.sum_buffers()?,
            stream,
            kernel,
        })
    }

    /// CRC-32C of `ranges` (address, length) as one buffer, in order; waits for it.
    ///
    /// # Safety
    /// Every range must be memory of the kernel's GPU (or memory it maps) that stays valid
    /// until this returns; bytes written meanwhile make the sum meaningless, not unsafe.
    pub unsafe fn sum(
        &mut self,
        ranges: impl IntoIterator<Item = (u64, u64)>,
    ) -> Result<u32, CudaError> {
        let _current = self.kernel.gpu().scoped()?;
        self.sum.clear();
        for (addr, len) in ranges {
            self.sum.push(addr, len)?;
        }
        // SAFETY: the ranges are the caller's contract; the sum is refilled only after the
        // synchronization below; stream and kernel share the context made current above.
        unsafe { self.kernel.launch(&self.stream, &mut self.sum) }?;
        self.stream.synchronize()?;
        Ok(self.sum.value())
    }

    /// The test hook (`KVCACHE_TEST_CORRUPT_RECEIVE`): flips the byte at `addr` of GPU
    /// memory, as a bit flip on the way would have.
    ///
    /// # Safety
    /// `addr` must be a byte of device memory of the kernel's GPU that may be written.
    pub unsafe fn flip_byte(&self, addr: u64) -> Result<(), CudaError> {
        let gpu = self.kernel.gpu();
        let mut byte = [0u8];
        // SAFETY: one byte of device memory (the caller's contract), read then written back.
        unsafe {
            gpu.copy_dtoh(&mut byte, addr)?;
            byte[0] = !byte[0];
            gpu.copy_htod(addr, &byte)
        }
    }
}
