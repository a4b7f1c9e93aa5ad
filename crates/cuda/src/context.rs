//! Devices and their primary contexts: [`Gpu`], and [`CurrentGuard`] for calls made on
//! threads that belong to someone else.

use crate::error::CudaError;
use crate::library::Cuda;
use crate::sys::{CUcontext, CUdevice};
use std::os::raw::c_int;
use std::sync::Arc;

impl Cuda {
    /// GPUs the driver sees.
    pub fn device_count(&self) -> Result<u32, CudaError> {
        let mut count: c_int = 0;
        // SAFETY: valid out-pointer.
        self.check("cuDeviceGetCount", unsafe {
            (self.api.device_get_count)(&mut count)
        })?;
        Ok(count.max(0) as u32)
    }

    /// GPU `ordinal`, with its primary context retained (released when the last clone drops).
    pub fn gpu(&'static self, ordinal: u32) -> Result<Arc<Gpu>, CudaError> {
        let mut device: CUdevice = 0;
        // SAFETY: valid out-pointer; the ordinal is checked by the driver.
        self.check("cuDeviceGet", unsafe {
            (self.api.device_get)(&mut device, ordinal as c_int)
        })?;
        let mut ctx: CUcontext = std::ptr::null_mut();
        // SAFETY: valid out-pointer and a device handle from cuDeviceGet.
        self.check("cuDevicePrimaryCtxRetain", unsafe {
            (self.api.primary_ctx_retain)(&mut ctx, device)
        })?;
        Ok(Arc::new(Gpu {
            cuda: self,
            device,
            ordinal,
            ctx,
        }))
    }
}

/// One GPU with its primary context retained.
pub struct Gpu {
    pub(crate) cuda: &'static Cuda,
    pub(crate) device: CUdevice,
    ordinal: u32,
    ctx: CUcontext,
}

// SAFETY: a primary context handle may be used (made current) from any thread; the struct
// holds no thread-affine state.
unsafe impl Send for Gpu {}
// SAFETY: as above; every method only passes the handle to thread-safe driver calls.
unsafe impl Sync for Gpu {}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({})", self.ordinal)
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // SAFETY: releases the retain taken in `Cuda::gpu`, once.
        unsafe { (self.cuda.api.primary_ctx_release)(self.device) };
    }
}

/// Restores the thread's previous current context when dropped (see [`Gpu::scoped`]).
pub struct CurrentGuard {
    cuda: &'static Cuda,
    previous: CUcontext,
}

impl Drop for CurrentGuard {
    fn drop(&mut self) {
        // SAFETY: `previous` was current on this thread (or null) when the guard was made.
        unsafe { (self.cuda.api.ctx_set_current)(self.previous) };
    }
}

impl Gpu {
    pub fn ordinal(&self) -> u32 {
        self.ordinal
    }

    pub(crate) fn ctx(&self) -> CUcontext {
        self.ctx
    }

    pub fn cuda(&self) -> &'static Cuda {
        self.cuda
    }

    /// Makes this GPU's primary context current on the calling thread (threads the caller
    /// owns; see [`Gpu::scoped`] for others).
    pub fn bind(&self) -> Result<(), CudaError> {
        // SAFETY: a retained primary context.
        self.cuda.check("cuCtxSetCurrent", unsafe {
            (self.cuda.api.ctx_set_current)(self.ctx)
        })
    }

    /// [`Gpu::bind`] for the guard's lifetime, then the caller's context again (for calls
    /// made on the application's threads).
    pub fn scoped(&self) -> Result<CurrentGuard, CudaError> {
        let mut previous: CUcontext = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        self.cuda.check("cuCtxGetCurrent", unsafe {
            (self.cuda.api.ctx_get_current)(&mut previous)
        })?;
        self.bind()?;
        Ok(CurrentGuard {
            cuda: self.cuda,
            previous,
        })
    }

    /// `cuDeviceGetAttribute` (`CU_DEVICE_ATTRIBUTE_*`).
    pub fn attribute(&self, attribute: i32) -> Result<i32, CudaError> {
        let mut value: c_int = 0;
        // SAFETY: valid out-pointer and device handle; the driver checks the attribute.
        self.cuda.check("cuDeviceGetAttribute", unsafe {
            (self.cuda.api.device_get_attribute)(&mut value, attribute, self.device)
        })?;
        Ok(value)
    }
}
