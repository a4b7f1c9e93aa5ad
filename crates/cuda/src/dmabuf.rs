//! Exporting device memory as a dma-buf (for `ibv_reg_dmabuf_mr`).

use crate::context::Gpu;
use crate::error::CudaError;
use crate::sys::DevicePtr;
use crate::sys::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::raw::c_int;

/// `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED`.
pub const DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED: i32 = 124;

impl Gpu {
    /// Whether this GPU and its driver can export dma-bufs
    /// (`CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED` and `cuMemGetHandleForAddressRange`).
    pub fn dmabuf_supported(&self) -> bool {
        self.cuda.api.mem_get_handle_for_address_range.is_some()
            && self
                .attribute(DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED)
                .is_ok_and(|v| v != 0)
    }

    /// A dma-buf file descriptor for `addr..addr + len` of device memory
    /// (`cuMemGetHandleForAddressRange`, `CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD`). Both must
    /// be aligned to the host page size.
    pub fn dmabuf_fd(&self, addr: DevicePtr, len: usize) -> Result<OwnedFd, CudaError> {
        let Some(get) = self.cuda.api.mem_get_handle_for_address_range else {
            return Err(CudaError::other(
                "cuMemGetHandleForAddressRange",
                "the driver lacks the symbol (CUDA 11.7+ driver needed)",
            ));
        };
        let _current = self.scoped()?;
        let mut fd: c_int = -1;
        // SAFETY: the handle type DMA_BUF_FD writes one int file descriptor to the valid
        // out-pointer; the driver checks the range.
        self.cuda.check("cuMemGetHandleForAddressRange", unsafe {
            get(
                (&mut fd as *mut c_int).cast(),
                addr,
                len,
                CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
                0,
            )
        })?;
        // SAFETY: on success the driver returned a new file descriptor that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}
