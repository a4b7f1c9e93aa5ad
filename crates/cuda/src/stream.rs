//! Asynchronous work: [`Stream`] (copies queued in order) and [`Event`] (a point in a
//! stream to wait for).

use crate::context::Gpu;
use crate::error::CudaError;
use crate::sys::DevicePtr;
use crate::sys::{
    CUevent, CUstream, MemcpyAttributes, CU_EVENT_DISABLE_TIMING,
    CU_MEMCPY_SRC_ACCESS_ORDER_STREAM, CU_STREAM_NON_BLOCKING,
};
use std::sync::Arc;

impl Gpu {
    /// A non-blocking stream of this GPU. Makes this GPU's context current on the calling
    /// thread.
    pub fn stream(self: &Arc<Self>) -> Result<Stream, CudaError> {
        self.bind()?;
        let mut raw: CUstream = std::ptr::null_mut();
        // SAFETY: valid out-pointer; a context is current.
        self.cuda.check("cuStreamCreate", unsafe {
            (self.cuda.api.stream_create)(&mut raw, CU_STREAM_NON_BLOCKING)
        })?;
        Ok(Stream {
            gpu: Arc::clone(self),
            raw,
        })
    }

    /// An event without timing (cheap to record and wait for). Makes this GPU's context
    /// current on the calling thread.
    pub fn event(self: &Arc<Self>) -> Result<Event, CudaError> {
        self.bind()?;
        let mut raw: CUevent = std::ptr::null_mut();
        // SAFETY: valid out-pointer; a context is current.
        self.cuda.check("cuEventCreate", unsafe {
            (self.cuda.api.event_create)(&mut raw, CU_EVENT_DISABLE_TIMING)
        })?;
        Ok(Event {
            gpu: Arc::clone(self),
            raw,
        })
    }
}

/// A CUDA stream; destroyed on drop (after waiting for its work).
pub struct Stream {
    gpu: Arc<Gpu>,
    pub(crate) raw: CUstream,
}

// SAFETY: stream handles may be used from any thread with the context current.
unsafe impl Send for Stream {}

impl Stream {
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Queues a device→host copy.
    ///
    /// # Safety
    /// `src..src+len` must be device memory and `dst..dst+len` pinned host memory, both
    /// valid until the stream (or an event recorded after this) has been synchronized; no
    /// one may read `dst` before then. The stream's context must be current.
    pub unsafe fn copy_dtoh_async(
        &self,
        dst: *mut u8,
        src: DevicePtr,
        len: usize,
    ) -> Result<(), CudaError> {
        // SAFETY: forwarded to the caller.
        self.gpu.cuda.check("cuMemcpyDtoHAsync", unsafe {
            (self.gpu.cuda.api.memcpy_dtoh_async)(dst.cast(), src, len, self.raw)
        })
    }

    /// Queues a host→device copy.
    ///
    /// # Safety
    /// `dst..dst+len` must be device memory and `src..src+len` pinned host memory, both
    /// valid and `src` unmodified until the stream (or a later event) has been
    /// synchronized. The stream's context must be current.
    pub unsafe fn copy_htod_async(
        &self,
        dst: DevicePtr,
        src: *const u8,
        len: usize,
    ) -> Result<(), CudaError> {
        // SAFETY: forwarded to the caller.
        self.gpu.cuda.check("cuMemcpyHtoDAsync", unsafe {
            (self.gpu.cuda.api.memcpy_htod_async)(dst, src.cast(), len, self.raw)
        })
    }

    /// Queues `dsts.len()` copies (`sizes[i]` bytes from `srcs[i]` to `dsts[i]`, each
    /// address host or device memory, direction inferred): one `cuMemcpyBatchAsync_v2`
    /// when `batch_api` is set and the driver has it
    /// ([`Cuda::batch_copy_supported`](crate::Cuda::batch_copy_supported)), else one
    /// `cuMemcpyAsync` each. The slices are read during the call only.
    ///
    /// # Safety
    /// Every range must stay valid, and every pinned host source unmodified and pinned
    /// host destination unread, until the stream (or a later event) has been synchronized;
    /// host memory must be pinned for the copy to be asynchronous. The stream's context
    /// must be current.
    pub unsafe fn copy_batch_async(
        &self,
        dsts: &mut [DevicePtr],
        srcs: &mut [DevicePtr],
        sizes: &mut [usize],
        batch_api: bool,
    ) -> Result<(), CudaError> {
        assert!(dsts.len() == srcs.len() && srcs.len() == sizes.len());
        if dsts.is_empty() {
            return Ok(());
        }
        let api = &self.gpu.cuda.api;
        if let Some(batch) = api.memcpy_batch_async.filter(|_| batch_api) {
            let mut attributes = MemcpyAttributes {
                src_access_order: CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
                src_loc_hint: [0; 2],
                dst_loc_hint: [0; 2],
                flags: 0,
            };
            let mut first: usize = 0;
            // SAFETY: three arrays of `count` entries and one attribute applying from copy
            // 0, all alive for the call (the driver reads them during submission only);
            // the memory contract is the caller's.
            return self.gpu.cuda.check("cuMemcpyBatchAsync", unsafe {
                batch(
                    dsts.as_mut_ptr(),
                    srcs.as_mut_ptr(),
                    sizes.as_mut_ptr(),
                    dsts.len(),
                    &mut attributes,
                    &mut first,
                    1,
                    self.raw,
                )
            });
        }
        for i in 0..dsts.len() {
            // SAFETY: the caller's contract, per copy.
            self.gpu.cuda.check("cuMemcpyAsync", unsafe {
                (api.memcpy_async)(dsts[i], srcs[i], sizes[i], self.raw)
            })?;
        }
        Ok(())
    }

    /// Waits for every queued operation.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        // SAFETY: a live stream.
        self.gpu.cuda.check("cuStreamSynchronize", unsafe {
            (self.gpu.cuda.api.stream_synchronize)(self.raw)
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _current = self.gpu.scoped();
        let _ = self.synchronize();
        // SAFETY: created by cuStreamCreate, destroyed once.
        unsafe { (self.gpu.cuda.api.stream_destroy)(self.raw) };
    }
}

/// A CUDA event; destroyed on drop.
pub struct Event {
    gpu: Arc<Gpu>,
    raw: CUevent,
}

// SAFETY: event handles may be used from any thread.
unsafe impl Send for Event {}

impl Event {
    /// Marks the point after everything queued on `stream` so far.
    pub fn record(&self, stream: &Stream) -> Result<(), CudaError> {
        // SAFETY: live event and stream of the same context.
        self.gpu.cuda.check("cuEventRecord", unsafe {
            (self.gpu.cuda.api.event_record)(self.raw, stream.raw)
        })
    }

    /// Waits until the work before the last record has completed.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        // SAFETY: a live event.
        self.gpu.cuda.check("cuEventSynchronize", unsafe {
            (self.gpu.cuda.api.event_synchronize)(self.raw)
        })
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created by cuEventCreate, destroyed once.
        unsafe { (self.gpu.cuda.api.event_destroy)(self.raw) };
    }
}
