//! Raw driver API: the types, constants and entry points of `cuda.h` that the crate uses.
//! Nothing here is public outside the crate.

use std::os::raw::{c_char, c_int, c_uint, c_ulonglong, c_void};

/// A device address (`CUdeviceptr`); with unified addressing also a pinned host address.
pub type DevicePtr = u64;

pub(crate) type CUresult = c_int;
pub(crate) type CUdevice = c_int;
pub(crate) type CUcontext = *mut c_void;
pub(crate) type CUstream = *mut c_void;
pub(crate) type CUevent = *mut c_void;
pub(crate) type CUmodule = *mut c_void;
pub(crate) type CUfunction = *mut c_void;

pub(crate) const CUDA_SUCCESS: CUresult = 0;
pub(crate) const CUDA_ERROR_INVALID_VALUE: CUresult = 1;

pub(crate) const CU_POINTER_ATTRIBUTE_MEMORY_TYPE: c_int = 2;
pub(crate) const CU_POINTER_ATTRIBUTE_IS_MANAGED: c_int = 8;
pub(crate) const CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: c_int = 9;
pub(crate) const CU_POINTER_ATTRIBUTE_RANGE_START_ADDR: c_int = 11;
pub(crate) const CU_POINTER_ATTRIBUTE_RANGE_SIZE: c_int = 12;

pub(crate) const CU_MEMORYTYPE_HOST: c_uint = 1;
pub(crate) const CU_MEMORYTYPE_DEVICE: c_uint = 2;

pub(crate) const CU_MEMHOSTALLOC_PORTABLE: c_uint = 0x01;
pub(crate) const CU_MEMHOSTALLOC_DEVICEMAP: c_uint = 0x02;
pub(crate) const CU_STREAM_NON_BLOCKING: c_uint = 0x1;
pub(crate) const CU_EVENT_DISABLE_TIMING: c_uint = 0x2;
pub(crate) const CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD: c_int = 0x1;

/// `CU_MEMCPY_SRC_ACCESS_ORDER_STREAM`: sources are read in stream order.
pub(crate) const CU_MEMCPY_SRC_ACCESS_ORDER_STREAM: c_int = 1;

/// `CUmemcpyAttributes`.
#[repr(C)]
pub(crate) struct MemcpyAttributes {
    /// `CUmemcpySrcAccessOrder`.
    pub src_access_order: c_int,
    /// `CUmemLocation` {type, id}; type 0 (invalid) = no hint.
    pub src_loc_hint: [c_int; 2],
    pub dst_loc_hint: [c_int; 2],
    pub flags: c_uint,
}

/// `cuMemcpyBatchAsync_v2(dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs, stream)`.
pub(crate) type MemcpyBatchFn = unsafe extern "C" fn(
    *mut DevicePtr,
    *mut DevicePtr,
    *mut usize,
    usize,
    *mut MemcpyAttributes,
    *mut usize,
    usize,
    CUstream,
) -> CUresult;

/// `cuLaunchKernel(f, grid xyz, block xyz, sharedMemBytes, stream, params, extra)`.
pub(crate) type LaunchKernelFn = unsafe extern "C" fn(
    CUfunction,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    CUstream,
    *mut *mut c_void,
    *mut *mut c_void,
) -> CUresult;

/// `cuMemGetHandleForAddressRange(handle, dptr, size, handleType, flags)`.
pub(crate) type GetHandleForAddressRangeFn =
    unsafe extern "C" fn(*mut c_void, DevicePtr, usize, c_int, c_ulonglong) -> CUresult;

/// `CUipcMemHandle`: an opaque 64-byte handle, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct IpcMemHandle {
    pub reserved: [u8; 64],
}

/// `CUmemLocation`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct MemLocation {
    pub kind: c_int,
    pub id: c_int,
}

/// `CUmemAllocationProp` (CUDA 12+ layout: allocFlags is 8 bytes).
#[repr(C)]
pub(crate) struct MemAllocationProp {
    pub kind: c_int,
    pub requested_handle_types: c_int,
    pub location: MemLocation,
    pub win32_handle_meta_data: *mut c_void,
    pub compression_type: u8,
    pub gpu_direct_rdma_capable: u8,
    pub usage: u16,
    pub reserved: [u8; 4],
}

/// `CUmemAccessDesc`.
#[repr(C)]
pub(crate) struct MemAccessDesc {
    pub location: MemLocation,
    pub flags: c_int,
}

/// `CUmemGenericAllocationHandle`.
pub(crate) type MemHandle = c_ulonglong;

pub(crate) const CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS: c_uint = 0x1;
pub(crate) const CU_MEM_ALLOCATION_TYPE_PINNED: c_int = 0x1;
pub(crate) const CU_MEM_LOCATION_TYPE_DEVICE: c_int = 0x1;
pub(crate) const CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR: c_int = 0x1;
pub(crate) const CU_MEM_ACCESS_FLAGS_PROT_READWRITE: c_int = 0x3;
pub(crate) const CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED: CUresult = 704;

/// Entry points for sharing memory between processes and asking about devices (legacy
/// CUDA IPC, virtual memory management, device identity and peer access): CUDA 11.4+.
/// Resolved as a group; a driver without them has no NVLink transport.
pub(crate) struct SharingApi {
    pub driver_get_version: unsafe extern "C" fn(*mut c_int) -> CUresult,
    pub device_get_uuid: unsafe extern "C" fn(*mut [u8; 16], CUdevice) -> CUresult,
    pub device_get_name: unsafe extern "C" fn(*mut c_char, c_int, CUdevice) -> CUresult,
    pub device_get_pci_bus_id: unsafe extern "C" fn(*mut c_char, c_int, CUdevice) -> CUresult,
    pub device_can_access_peer: unsafe extern "C" fn(*mut c_int, CUdevice, CUdevice) -> CUresult,
    pub ctx_enable_peer_access: unsafe extern "C" fn(CUcontext, c_uint) -> CUresult,
    pub mem_get_address_range:
        unsafe extern "C" fn(*mut DevicePtr, *mut usize, DevicePtr) -> CUresult,
    pub ipc_get_mem_handle: unsafe extern "C" fn(*mut IpcMemHandle, DevicePtr) -> CUresult,
    pub ipc_open_mem_handle: unsafe extern "C" fn(*mut DevicePtr, IpcMemHandle, c_uint) -> CUresult,
    pub ipc_close_mem_handle: unsafe extern "C" fn(DevicePtr) -> CUresult,
    pub mem_retain_allocation_handle: unsafe extern "C" fn(*mut MemHandle, *mut c_void) -> CUresult,
    pub mem_export_to_shareable_handle:
        unsafe extern "C" fn(*mut c_void, MemHandle, c_int, c_ulonglong) -> CUresult,
    pub mem_import_from_shareable_handle:
        unsafe extern "C" fn(*mut MemHandle, *mut c_void, c_int) -> CUresult,
    pub mem_create: unsafe extern "C" fn(
        *mut MemHandle,
        usize,
        *const MemAllocationProp,
        c_ulonglong,
    ) -> CUresult,
    pub mem_release: unsafe extern "C" fn(MemHandle) -> CUresult,
    pub mem_get_allocation_properties_from_handle:
        unsafe extern "C" fn(*mut MemAllocationProp, MemHandle) -> CUresult,
    pub mem_get_allocation_granularity:
        unsafe extern "C" fn(*mut usize, *const MemAllocationProp, c_int) -> CUresult,
    pub mem_address_reserve:
        unsafe extern "C" fn(*mut DevicePtr, usize, usize, DevicePtr, c_ulonglong) -> CUresult,
    pub mem_address_free: unsafe extern "C" fn(DevicePtr, usize) -> CUresult,
    pub mem_map: unsafe extern "C" fn(DevicePtr, usize, usize, MemHandle, c_ulonglong) -> CUresult,
    pub mem_unmap: unsafe extern "C" fn(DevicePtr, usize) -> CUresult,
    pub mem_set_access:
        unsafe extern "C" fn(DevicePtr, usize, *const MemAccessDesc, usize) -> CUresult,
}

/// The driver's entry points (resolved once; the library stays loaded for the process).
pub(crate) struct Api {
    pub get_error_name: unsafe extern "C" fn(CUresult, *mut *const c_char) -> CUresult,
    pub init: unsafe extern "C" fn(c_uint) -> CUresult,
    pub device_get_count: unsafe extern "C" fn(*mut c_int) -> CUresult,
    pub device_get: unsafe extern "C" fn(*mut CUdevice, c_int) -> CUresult,
    pub device_get_attribute: unsafe extern "C" fn(*mut c_int, c_int, CUdevice) -> CUresult,
    pub primary_ctx_retain: unsafe extern "C" fn(*mut CUcontext, CUdevice) -> CUresult,
    pub primary_ctx_release: unsafe extern "C" fn(CUdevice) -> CUresult,
    pub ctx_set_current: unsafe extern "C" fn(CUcontext) -> CUresult,
    pub ctx_get_current: unsafe extern "C" fn(*mut CUcontext) -> CUresult,
    pub pointer_get_attribute: unsafe extern "C" fn(*mut c_void, c_int, DevicePtr) -> CUresult,
    pub mem_host_alloc: unsafe extern "C" fn(*mut *mut c_void, usize, c_uint) -> CUresult,
    pub mem_free_host: unsafe extern "C" fn(*mut c_void) -> CUresult,
    pub mem_alloc: unsafe extern "C" fn(*mut DevicePtr, usize) -> CUresult,
    pub mem_free: unsafe extern "C" fn(DevicePtr) -> CUresult,
    pub memcpy_htod: unsafe extern "C" fn(DevicePtr, *const c_void, usize) -> CUresult,
    pub memcpy_dtoh: unsafe extern "C" fn(*mut c_void, DevicePtr, usize) -> CUresult,
    pub memset_d8: unsafe extern "C" fn(DevicePtr, u8, usize) -> CUresult,
    pub memcpy_htod_async:
        unsafe extern "C" fn(DevicePtr, *const c_void, usize, CUstream) -> CUresult,
    pub memcpy_dtoh_async:
        unsafe extern "C" fn(*mut c_void, DevicePtr, usize, CUstream) -> CUresult,
    /// Direction inferred from the addresses (unified addressing).
    pub memcpy_async: unsafe extern "C" fn(DevicePtr, DevicePtr, usize, CUstream) -> CUresult,
    /// CUDA 13's `cuMemcpyBatchAsync_v2` (no failIdx); absent on older drivers.
    pub memcpy_batch_async: Option<MemcpyBatchFn>,
    pub stream_create: unsafe extern "C" fn(*mut CUstream, c_uint) -> CUresult,
    pub stream_destroy: unsafe extern "C" fn(CUstream) -> CUresult,
    pub stream_synchronize: unsafe extern "C" fn(CUstream) -> CUresult,
    pub event_create: unsafe extern "C" fn(*mut CUevent, c_uint) -> CUresult,
    pub event_record: unsafe extern "C" fn(CUevent, CUstream) -> CUresult,
    pub event_synchronize: unsafe extern "C" fn(CUevent) -> CUresult,
    pub event_destroy: unsafe extern "C" fn(CUevent) -> CUresult,
    pub module_load_data: unsafe extern "C" fn(*mut CUmodule, *const c_void) -> CUresult,
    pub module_get_function:
        unsafe extern "C" fn(*mut CUfunction, CUmodule, *const c_char) -> CUresult,
    pub module_unload: unsafe extern "C" fn(CUmodule) -> CUresult,
    pub launch_kernel: LaunchKernelFn,
    /// CUDA 11.7+; absent on older drivers.
    pub mem_get_handle_for_address_range: Option<GetHandleForAddressRangeFn>,
    /// Sharing and device identity (see [`SharingApi`]); the missing symbol otherwise.
    pub sharing: Result<SharingApi, crate::error::LoadError>,
    /// Keeps the entry points above valid.
    pub _lib: libloading::Library,
}
