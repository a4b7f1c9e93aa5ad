//! Device memory for demos, benchmarks and tests ([`DeviceMemory`], the package's
//! `DeviceMemory`): one `cuMemAlloc` allocation on a GPU, zeroed, with synchronous host
//! copies checked against its size. Serving stacks bring their own GPU memory (PyTorch,
//! CuPy); this is for trying kvtransfer without them.

use crate::error::{Error, Result};
use kvtransfer_cuda::DeviceBuffer;

/// One zeroed `cuMemAlloc` allocation on a GPU, freed on drop.
pub struct DeviceMemory {
    buffer: DeviceBuffer,
    gpu: u32,
}

impl std::fmt::Debug for DeviceMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceMemory({} bytes at {:#x} on GPU {})",
            self.buffer.len(),
            self.buffer.ptr(),
            self.gpu
        )
    }
}

impl DeviceMemory {
    /// `bytes` of zeroed memory on GPU `gpu_idx`.
    pub fn alloc(gpu_idx: u32, bytes: u64) -> Result<DeviceMemory> {
        if bytes == 0 {
            return Err(Error::invalid("bytes", "0 given; at least 1"));
        }
        let len = usize::try_from(bytes)
            .map_err(|_| Error::invalid("bytes", format!("{bytes} given; too large")))?;
        let cuda = super::driver().map_err(|e| {
            Error::invalid(
                "gpuIdx",
                format!(
                    "{gpu_idx} given, but this machine has no usable CUDA driver or GPU ({})",
                    e.name
                ),
            )
        })?;
        let count = cuda.device_count()?;
        if gpu_idx >= count {
            return Err(Error::invalid(
                "gpuIdx",
                format!("{gpu_idx} names no GPU ({count} present)"),
            ));
        }
        let buffer = cuda.gpu(gpu_idx)?.alloc(len)?;
        buffer.fill(0)?;
        Ok(DeviceMemory {
            buffer,
            gpu: gpu_idx,
        })
    }

    /// The device address (what a communicator's `localKeyCache` takes).
    pub fn address(&self) -> u64 {
        self.buffer.ptr()
    }

    /// The allocation's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.buffer.len() as u64
    }

    /// The GPU (ordinal) it lives on.
    pub fn gpu(&self) -> u32 {
        self.gpu
    }

    /// `offset..offset + len` inside the allocation, or the error naming both.
    fn range(&self, offset: u64, len: usize) -> Result<usize> {
        let size = self.bytes();
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(offset as usize),
            _ => Err(Error::invalid(
                "offset",
                format!("{offset} + {len} bytes pass the end of the {size}-byte allocation"),
            )),
        }
    }

    /// Copies `data` to byte `offset` (synchronously).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let at = self.range(offset, data.len())?;
        Ok(self.buffer.copy_from_host_at(at, data)?)
    }

    /// Copies `len` bytes from byte `offset` (synchronously).
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let at = self.range(offset, len)?;
        let mut out = vec![0u8; len];
        self.buffer.copy_to_host_at(at, &mut out)?;
        Ok(out)
    }
}

/// GB/s of one large device-to-device copy from GPU `src` to GPU `dst` (peer access
/// enabled; the same GPU works too), best of `reps` after one warm-up: the link's ceiling,
/// the reference of `kvtransfer bench --transport nvlink`.
pub fn peer_copy_gbps(src: u32, dst: u32, bytes: u64, reps: u32) -> Result<f64> {
    let from = DeviceMemory::alloc(src, bytes)?;
    let to = DeviceMemory::alloc(dst, bytes)?;
    let cuda = super::driver()?;
    let (src_gpu, dst_gpu) = (cuda.gpu(src)?, cuda.gpu(dst)?);
    if !src_gpu.can_access_peer(&dst_gpu)? {
        return Err(Error::invalid(
            "dstGpu",
            format!("GPU {src} cannot access GPU {dst} (no peer access between them)"),
        ));
    }
    src_gpu.enable_peer_access(&dst_gpu)?;
    let stream = src_gpu.stream()?;
    let len = from.buffer.len();
    let copy = || -> Result<()> {
        let (mut d, mut s, mut n) = (vec![to.address()], vec![from.address()], vec![len]);
        // SAFETY: two live allocations of `len` bytes (peer access enabled), not
        // overlapping; the stream is synchronized before either is freed.
        unsafe { stream.copy_batch_async(&mut d, &mut s, &mut n, false) }?;
        Ok(stream.synchronize()?)
    };
    copy()?;
    let mut best = 0f64;
    for _ in 0..reps.max(1) {
        let started = std::time::Instant::now();
        copy()?;
        best = best.max(len as f64 / started.elapsed().as_secs_f64() / 1e9);
    }
    Ok(best)
}
