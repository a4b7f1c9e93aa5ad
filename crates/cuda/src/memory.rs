//! Memory the crate allocates: device memory ([`DeviceBuffer`]) and page-locked host
//! memory mapped into the device's address space ([`PinnedBuffer`]).

use crate::context::Gpu;
use crate::error::CudaError;
use crate::sys::DevicePtr;
use crate::sys::{CU_MEMHOSTALLOC_DEVICEMAP, CU_MEMHOSTALLOC_PORTABLE};
use std::os::raw::c_void;
use std::sync::Arc;

impl Gpu {
    /// Device memory (`cuMemAlloc`). Makes this GPU's context current on the calling thread.
    pub fn alloc(self: &Arc<Self>, len: usize) -> Result<DeviceBuffer, CudaError> {
        self.bind()?;
        let mut ptr: DevicePtr = 0;
        // SAFETY: valid out-pointer; a context is current.
        self.cuda.check("cuMemAlloc", unsafe {
            (self.cuda.api.mem_alloc)(&mut ptr, len.max(1))
        })?;
        Ok(DeviceBuffer {
            gpu: Arc::clone(self),
            ptr,
            len,
        })
    }

    /// Page-locked host memory, portable to every context and mapped into the device's
    /// address space (`cuMemHostAlloc`; with unified addressing, which every 64-bit Linux
    /// platform has, kernels use the host pointer as is). Makes this GPU's context current
    /// on the calling thread.
    pub fn pinned(self: &Arc<Self>, len: usize) -> Result<PinnedBuffer, CudaError> {
        self.bind()?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer; a context is current.
        self.cuda.check("cuMemHostAlloc", unsafe {
            (self.cuda.api.mem_host_alloc)(
                &mut ptr,
                len.max(1),
                CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP,
            )
        })?;
        Ok(PinnedBuffer {
            gpu: Arc::clone(self),
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Gpu {
    /// Synchronous copy of `data` to device address `dst`, in this GPU's context.
    ///
    /// # Safety
    /// `dst..dst + data.len()` must be device memory (or mapped memory) this context can
    /// write, not in use by queued work.
    pub unsafe fn copy_htod(&self, dst: DevicePtr, data: &[u8]) -> Result<(), CudaError> {
        let _current = self.scoped()?;
        // SAFETY: the destination is the caller's contract, the source lies inside `data`.
        self.cuda.check("cuMemcpyHtoD", unsafe {
            (self.cuda.api.memcpy_htod)(dst, data.as_ptr().cast(), data.len())
        })?;
        // From pageable memory, cuMemcpyHtoD returns once `data` is staged, possibly before
        // the DMA into `dst` completed: work on a non-blocking stream (every engine copy)
        // could read `dst` before it. Wait for the legacy default stream the copy ran on.
        // SAFETY: synchronizing the legacy default stream of the current context.
        self.cuda.check("cuStreamSynchronize", unsafe {
            (self.cuda.api.stream_synchronize)(std::ptr::null_mut())
        })
    }

    /// Synchronous copy of `out.len()` bytes from device address `src` into `out`.
    ///
    /// # Safety
    /// `src..src + out.len()` must be device memory (or mapped memory) this context can
    /// read.
    pub unsafe fn copy_dtoh(&self, out: &mut [u8], src: DevicePtr) -> Result<(), CudaError> {
        let _current = self.scoped()?;
        // SAFETY: the source is the caller's contract, the destination lies inside `out`.
        self.cuda.check("cuMemcpyDtoH", unsafe {
            (self.cuda.api.memcpy_dtoh)(out.as_mut_ptr().cast(), src, out.len())
        })
    }
}

/// Device memory from `cuMemAlloc` (tests, benchmarks); freed on drop.
pub struct DeviceBuffer {
    gpu: Arc<Gpu>,
    ptr: DevicePtr,
    len: usize,
}

impl DeviceBuffer {
    pub fn ptr(&self) -> DevicePtr {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Synchronous copy of `data` to the start of the buffer.
    pub fn copy_from_host(&self, data: &[u8]) -> Result<(), CudaError> {
        self.copy_from_host_at(0, data)
    }

    /// Synchronous copy of `data` to byte `offset` of the buffer (panics past its end).
    pub fn copy_from_host_at(&self, offset: usize, data: &[u8]) -> Result<(), CudaError> {
        assert!(
            offset
                .checked_add(data.len())
                .is_some_and(|end| end <= self.len),
            "copy past the end of the device buffer"
        );
        // SAFETY: the destination lies inside this allocation.
        unsafe { self.gpu.copy_htod(self.ptr + offset as u64, data) }
    }

    /// Synchronous copy of the buffer's first `out.len()` bytes into `out`.
    pub fn copy_to_host(&self, out: &mut [u8]) -> Result<(), CudaError> {
        self.copy_to_host_at(0, out)
    }

    /// Synchronous copy of `out.len()` bytes from byte `offset` of the buffer (panics past
    /// its end).
    pub fn copy_to_host_at(&self, offset: usize, out: &mut [u8]) -> Result<(), CudaError> {
        assert!(
            offset
                .checked_add(out.len())
                .is_some_and(|end| end <= self.len),
            "copy past the end of the device buffer"
        );
        // SAFETY: the source lies inside this allocation.
        unsafe { self.gpu.copy_dtoh(out, self.ptr + offset as u64) }
    }

    /// Sets every byte to `value` (synchronously).
    pub fn fill(&self, value: u8) -> Result<(), CudaError> {
        let _current = self.gpu.scoped()?;
        // SAFETY: the range is this allocation.
        self.gpu.cuda.check("cuMemsetD8", unsafe {
            (self.gpu.cuda.api.memset_d8)(self.ptr, value, self.len)
        })?;
        // SAFETY: waits for the legacy default stream the memset ran on.
        self.gpu.cuda.check("cuStreamSynchronize", unsafe {
            (self.gpu.cuda.api.stream_synchronize)(std::ptr::null_mut())
        })
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let _current = self.gpu.scoped();
        // SAFETY: allocated by cuMemAlloc, freed once.
        unsafe { (self.gpu.cuda.api.mem_free)(self.ptr) };
    }
}

/// Page-locked host memory from `cuMemHostAlloc`; freed on drop.
pub struct PinnedBuffer {
    gpu: Arc<Gpu>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain host memory owned by this value.
unsafe impl Send for PinnedBuffer {}

impl PinnedBuffer {
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        let _current = self.gpu.scoped();
        // SAFETY: allocated by cuMemHostAlloc, freed once; users synchronize their streams
        // before dropping (no copy still reads or writes it).
        unsafe { (self.gpu.cuda.api.mem_free_host)(self.ptr.cast()) };
    }
}
