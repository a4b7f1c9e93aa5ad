//! What the driver knows about an address: [`PointerInfo`] (`cuPointerGetAttribute`).

use crate::error::CudaError;
use crate::library::Cuda;
use crate::sys::DevicePtr;
use crate::sys::{
    CUDA_ERROR_INVALID_VALUE, CU_MEMORYTYPE_DEVICE, CU_MEMORYTYPE_HOST,
    CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, CU_POINTER_ATTRIBUTE_IS_MANAGED,
    CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_RANGE_SIZE,
    CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
};
use std::os::raw::{c_int, c_uint};

/// `CUDA_ERROR_INVALID_CONTEXT`: the driver may answer [`Cuda::pointer_info`] with it when
/// no context is current on the calling thread; make one current and ask again.
pub const ERROR_INVALID_CONTEXT: i32 = 201;

/// What CUDA reports for an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointerInfo {
    /// Not known to CUDA (ordinary pageable host memory).
    Unknown,
    /// Pinned/registered host memory or managed memory: the CPU may touch it.
    HostAccessible { managed: bool },
    /// Device memory of GPU `ordinal`, inside the allocation `range_start..+range_size`.
    Device {
        ordinal: u32,
        range_start: DevicePtr,
        range_size: u64,
    },
}

impl Cuda {
    /// What CUDA knows about the memory at `addr`. Works without a current context for
    /// addresses in the unified address space. The driver only looks the address up; it
    /// never dereferences it.
    pub fn pointer_info(&self, addr: u64) -> Result<PointerInfo, CudaError> {
        let mut memory_type: c_uint = 0;
        // SAFETY: MEMORY_TYPE writes one unsigned int to the valid out-pointer; the driver
        // only looks the address up, it never dereferences it.
        let rc = unsafe {
            (self.api.pointer_get_attribute)(
                (&mut memory_type as *mut c_uint).cast(),
                CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                addr,
            )
        };
        if rc == CUDA_ERROR_INVALID_VALUE {
            // Not memory that CUDA allocated or registered: ordinary pageable host memory.
            return Ok(PointerInfo::Unknown);
        }
        self.check("cuPointerGetAttribute(MEMORY_TYPE)", rc)?;
        let mut managed: c_uint = 0;
        // SAFETY: IS_MANAGED writes one unsigned int (a bool) to the valid out-pointer.
        self.check("cuPointerGetAttribute(IS_MANAGED)", unsafe {
            (self.api.pointer_get_attribute)(
                (&mut managed as *mut c_uint).cast(),
                CU_POINTER_ATTRIBUTE_IS_MANAGED,
                addr,
            )
        })?;
        if memory_type == CU_MEMORYTYPE_HOST || managed != 0 {
            return Ok(PointerInfo::HostAccessible {
                managed: managed != 0,
            });
        }
        if memory_type != CU_MEMORYTYPE_DEVICE {
            return Err(CudaError::other(
                "cuPointerGetAttribute(MEMORY_TYPE)",
                format!("unsupported memory type {memory_type} (arrays are not cache regions)"),
            ));
        }
        let mut ordinal: c_int = 0;
        // SAFETY: DEVICE_ORDINAL writes one int to the valid out-pointer.
        self.check("cuPointerGetAttribute(DEVICE_ORDINAL)", unsafe {
            (self.api.pointer_get_attribute)(
                (&mut ordinal as *mut c_int).cast(),
                CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                addr,
            )
        })?;
        let mut start: DevicePtr = 0;
        // SAFETY: RANGE_START_ADDR writes one CUdeviceptr to the valid out-pointer.
        self.check("cuPointerGetAttribute(RANGE_START_ADDR)", unsafe {
            (self.api.pointer_get_attribute)(
                (&mut start as *mut DevicePtr).cast(),
                CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
                addr,
            )
        })?;
        let mut size: usize = 0;
        // SAFETY: RANGE_SIZE writes one size_t to the valid out-pointer.
        self.check("cuPointerGetAttribute(RANGE_SIZE)", unsafe {
            (self.api.pointer_get_attribute)(
                (&mut size as *mut usize).cast(),
                CU_POINTER_ATTRIBUTE_RANGE_SIZE,
                addr,
            )
        })?;
        Ok(PointerInfo::Device {
            ordinal: ordinal.max(0) as u32,
            range_start: start,
            range_size: size as u64,
        })
    }
}
