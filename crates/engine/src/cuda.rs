//! The CUDA driver API, loaded at run time from `libcuda.so.1` with `libloading`.
//!
//! Nothing links against CUDA: on hosts without the driver [`Cuda::get`] answers with the
//! reason and every region is host memory. With the driver present the engine asks it, per
//! registered region, whether the address is device memory ([`detect_region_memory`]);
//! device regions are then moved through pinned host staging buffers over TCP
//! (`transport::staging`) and registered with dma-buf or nvidia-peermem over RDMA
//! (`transport::gpu_mr`).
//!
//! Every wrapper returns a [`CudaError`] that names the failed call and the `CUresult`
//! (as `cuGetErrorName` spells it).

use crate::error::{Error, Result};
use crate::layout::{MemoryKind, RegionTable};
use libloading::Library;
use std::ffi::CStr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::raw::{c_char, c_int, c_uint, c_ulonglong, c_void};
use std::sync::{Arc, OnceLock};

type CUresult = c_int;
type CUdevice = c_int;
type CUcontext = *mut c_void;
type CUstream = *mut c_void;
type CUevent = *mut c_void;
type CUmodule = *mut c_void;
type CUfunction = *mut c_void;
/// A device address.
pub type DevicePtr = u64;

const CUDA_SUCCESS: CUresult = 0;
const CUDA_ERROR_INVALID_VALUE: CUresult = 1;
const CUDA_ERROR_INVALID_CONTEXT: CUresult = 201;

const CU_POINTER_ATTRIBUTE_MEMORY_TYPE: c_int = 2;
const CU_POINTER_ATTRIBUTE_IS_MANAGED: c_int = 8;
const CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: c_int = 9;
const CU_POINTER_ATTRIBUTE_RANGE_START_ADDR: c_int = 11;
const CU_POINTER_ATTRIBUTE_RANGE_SIZE: c_int = 12;

const CU_MEMORYTYPE_HOST: c_uint = 1;
const CU_MEMORYTYPE_DEVICE: c_uint = 2;

const CU_MEMHOSTALLOC_PORTABLE: c_uint = 0x01;
const CU_MEMHOSTALLOC_DEVICEMAP: c_uint = 0x02;
const CU_STREAM_NON_BLOCKING: c_uint = 0x1;
const CU_EVENT_DISABLE_TIMING: c_uint = 0x2;
const CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD: c_int = 0x1;
/// `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED`.
pub const DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED: c_int = 124;

/// A failed CUDA driver call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op} failed with {name} ({code})")]
pub struct CudaError {
    /// The driver function, e.g. `cuMemcpyDtoHAsync`.
    pub op: &'static str,
    /// The `CUresult`.
    pub code: i32,
    /// `cuGetErrorName` of the code, e.g. `CUDA_ERROR_INVALID_VALUE`.
    pub name: String,
}

impl From<CudaError> for Error {
    fn from(e: CudaError) -> Error {
        Error::Cuda {
            op: e.op,
            reason: format!("{} ({})", e.name, e.code),
        }
    }
}

/// The driver's entry points (resolved once; the library stays loaded for the process).
struct Api {
    get_error_name: unsafe extern "C" fn(CUresult, *mut *const c_char) -> CUresult,
    init: unsafe extern "C" fn(c_uint) -> CUresult,
    device_get_count: unsafe extern "C" fn(*mut c_int) -> CUresult,
    device_get: unsafe extern "C" fn(*mut CUdevice, c_int) -> CUresult,
    device_get_attribute: unsafe extern "C" fn(*mut c_int, c_int, CUdevice) -> CUresult,
    primary_ctx_retain: unsafe extern "C" fn(*mut CUcontext, CUdevice) -> CUresult,
    primary_ctx_release: unsafe extern "C" fn(CUdevice) -> CUresult,
    ctx_set_current: unsafe extern "C" fn(CUcontext) -> CUresult,
    ctx_get_current: unsafe extern "C" fn(*mut CUcontext) -> CUresult,
    pointer_get_attribute: unsafe extern "C" fn(*mut c_void, c_int, DevicePtr) -> CUresult,
    mem_host_alloc: unsafe extern "C" fn(*mut *mut c_void, usize, c_uint) -> CUresult,
    mem_free_host: unsafe extern "C" fn(*mut c_void) -> CUresult,
    mem_alloc: unsafe extern "C" fn(*mut DevicePtr, usize) -> CUresult,
    mem_free: unsafe extern "C" fn(DevicePtr) -> CUresult,
    memcpy_htod: unsafe extern "C" fn(DevicePtr, *const c_void, usize) -> CUresult,
    memcpy_dtoh: unsafe extern "C" fn(*mut c_void, DevicePtr, usize) -> CUresult,
    memset_d8: unsafe extern "C" fn(DevicePtr, u8, usize) -> CUresult,
    memcpy_htod_async: unsafe extern "C" fn(DevicePtr, *const c_void, usize, CUstream) -> CUresult,
    memcpy_dtoh_async: unsafe extern "C" fn(*mut c_void, DevicePtr, usize, CUstream) -> CUresult,
    /// Direction inferred from the addresses (unified addressing).
    memcpy_async: unsafe extern "C" fn(DevicePtr, DevicePtr, usize, CUstream) -> CUresult,
    /// CUDA 13's `cuMemcpyBatchAsync_v2` (no failIdx); absent on older drivers.
    memcpy_batch_async: Option<MemcpyBatchFn>,
    stream_create: unsafe extern "C" fn(*mut CUstream, c_uint) -> CUresult,
    stream_destroy: unsafe extern "C" fn(CUstream) -> CUresult,
    stream_synchronize: unsafe extern "C" fn(CUstream) -> CUresult,
    event_create: unsafe extern "C" fn(*mut CUevent, c_uint) -> CUresult,
    event_record: unsafe extern "C" fn(CUevent, CUstream) -> CUresult,
    event_synchronize: unsafe extern "C" fn(CUevent) -> CUresult,
    event_destroy: unsafe extern "C" fn(CUevent) -> CUresult,
    module_load_data: unsafe extern "C" fn(*mut CUmodule, *const c_void) -> CUresult,
    module_get_function: unsafe extern "C" fn(*mut CUfunction, CUmodule, *const c_char) -> CUresult,
    module_unload: unsafe extern "C" fn(CUmodule) -> CUresult,
    #[allow(clippy::type_complexity)]
    launch_kernel: unsafe extern "C" fn(
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
    ) -> CUresult,
    /// CUDA 11.7+; absent on older drivers.
    mem_get_handle_for_address_range:
        Option<unsafe extern "C" fn(*mut c_void, DevicePtr, usize, c_int, c_ulonglong) -> CUresult>,
    _lib: Library,
}

/// `cuMemcpyBatchAsync_v2(dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs, stream)`.
type MemcpyBatchFn = unsafe extern "C" fn(
    *mut DevicePtr,
    *mut DevicePtr,
    *mut usize,
    usize,
    *mut MemcpyAttributes,
    *mut usize,
    usize,
    CUstream,
) -> CUresult;

/// `CUmemcpyAttributes`.
#[repr(C)]
struct MemcpyAttributes {
    /// `CUmemcpySrcAccessOrder`.
    src_access_order: c_int,
    /// `CUmemLocation` {type, id}; type 0 (invalid) = no hint.
    src_loc_hint: [c_int; 2],
    dst_loc_hint: [c_int; 2],
    flags: c_uint,
}

/// `CU_MEMCPY_SRC_ACCESS_ORDER_STREAM`: sources are read in stream order.
const CU_MEMCPY_SRC_ACCESS_ORDER_STREAM: c_int = 1;

/// The loaded and initialized CUDA driver.
pub struct Cuda {
    api: Api,
    /// `cuMemcpyBatchAsync_v2` is present and not turned off (`KVCACHE_CUDA_BATCH_COPY=0`).
    batch: bool,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field(
                "dmabuf_export",
                &self.api.mem_get_handle_for_address_range.is_some(),
            )
            .field("batch_copy", &self.batch)
            .finish()
    }
}

/// Resolves `name` (first of the candidates present) to a function pointer of type `T`.
///
/// # Safety
/// `T` must be the exact `extern "C"` signature of the symbol.
unsafe fn symbol<T: Copy>(lib: &Library, names: &[&str]) -> std::result::Result<T, String> {
    let mut last = String::new();
    for name in names {
        let cname = format!("{name}\0");
        // SAFETY: the caller guarantees T is the symbol's signature.
        match unsafe { lib.get::<T>(cname.as_bytes()) } {
            Ok(f) => return Ok(*f),
            Err(e) => last = format!("{name}: {e}"),
        }
    }
    Err(format!("libcuda.so.1 lacks {last}"))
}

impl Cuda {
    /// The process-wide driver: loaded and `cuInit`ed on first use. The error says why
    /// CUDA is not usable here (library missing, symbol missing, `cuInit` failed: no GPU).
    pub fn get() -> std::result::Result<&'static Cuda, &'static str> {
        static CUDA: OnceLock<std::result::Result<Cuda, String>> = OnceLock::new();
        CUDA.get_or_init(Cuda::load)
            .as_ref()
            .map_err(String::as_str)
    }

    fn load() -> std::result::Result<Cuda, String> {
        // SAFETY: loading the NVIDIA driver library runs its initializers, which have no
        // preconditions on this process.
        let lib = unsafe { Library::new("libcuda.so.1") }
            .map_err(|e| format!("cannot load libcuda.so.1: {e}"))?;
        // SAFETY: each signature below is the driver API's (cuda.h), with the `_v2` entry
        // points that take 64-bit device pointers and sizes.
        let api = unsafe {
            Api {
                get_error_name: symbol(&lib, &["cuGetErrorName"])?,
                init: symbol(&lib, &["cuInit"])?,
                device_get_count: symbol(&lib, &["cuDeviceGetCount"])?,
                device_get: symbol(&lib, &["cuDeviceGet"])?,
                device_get_attribute: symbol(&lib, &["cuDeviceGetAttribute"])?,
                primary_ctx_retain: symbol(&lib, &["cuDevicePrimaryCtxRetain"])?,
                primary_ctx_release: symbol(
                    &lib,
                    &["cuDevicePrimaryCtxRelease_v2", "cuDevicePrimaryCtxRelease"],
                )?,
                ctx_set_current: symbol(&lib, &["cuCtxSetCurrent"])?,
                ctx_get_current: symbol(&lib, &["cuCtxGetCurrent"])?,
                pointer_get_attribute: symbol(&lib, &["cuPointerGetAttribute"])?,
                mem_host_alloc: symbol(&lib, &["cuMemHostAlloc"])?,
                mem_free_host: symbol(&lib, &["cuMemFreeHost"])?,
                mem_alloc: symbol(&lib, &["cuMemAlloc_v2"])?,
                mem_free: symbol(&lib, &["cuMemFree_v2"])?,
                memcpy_htod: symbol(&lib, &["cuMemcpyHtoD_v2"])?,
                memcpy_dtoh: symbol(&lib, &["cuMemcpyDtoH_v2"])?,
                memset_d8: symbol(&lib, &["cuMemsetD8_v2"])?,
                memcpy_htod_async: symbol(&lib, &["cuMemcpyHtoDAsync_v2"])?,
                memcpy_dtoh_async: symbol(&lib, &["cuMemcpyDtoHAsync_v2"])?,
                memcpy_async: symbol(&lib, &["cuMemcpyAsync"])?,
                module_load_data: symbol(&lib, &["cuModuleLoadData"])?,
                module_get_function: symbol(&lib, &["cuModuleGetFunction"])?,
                module_unload: symbol(&lib, &["cuModuleUnload"])?,
                launch_kernel: symbol(&lib, &["cuLaunchKernel"])?,
                memcpy_batch_async: symbol(&lib, &["cuMemcpyBatchAsync_v2"]).ok(),
                stream_create: symbol(&lib, &["cuStreamCreate"])?,
                stream_destroy: symbol(&lib, &["cuStreamDestroy_v2"])?,
                stream_synchronize: symbol(&lib, &["cuStreamSynchronize"])?,
                event_create: symbol(&lib, &["cuEventCreate"])?,
                event_record: symbol(&lib, &["cuEventRecord"])?,
                event_synchronize: symbol(&lib, &["cuEventSynchronize"])?,
                event_destroy: symbol(&lib, &["cuEventDestroy_v2"])?,
                mem_get_handle_for_address_range: symbol(&lib, &["cuMemGetHandleForAddressRange"])
                    .ok(),
                _lib: lib,
            }
        };
        let batch = api.memcpy_batch_async.is_some()
            && std::env::var("KVCACHE_CUDA_BATCH_COPY")
                .map_or(true, |v| !matches!(v.trim(), "0" | "false" | "off" | "no"));
        let cuda = Cuda { api, batch };
        // SAFETY: cuInit takes flags (must be 0) and may be called any number of times.
        cuda.check("cuInit", unsafe { (cuda.api.init)(0) })
            .map_err(|e| format!("no usable GPU: {e}"))?;
        Ok(cuda)
    }

    /// `cuGetErrorName` of `code`.
    pub fn error_name(&self, code: i32) -> String {
        let mut name: *const c_char = std::ptr::null();
        // SAFETY: the out-pointer is valid; on success the driver returns a static string.
        let rc = unsafe { (self.api.get_error_name)(code, &mut name) };
        if rc != CUDA_SUCCESS || name.is_null() {
            return format!("CUresult {code}");
        }
        // SAFETY: a NUL-terminated static string owned by the driver.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    }

    fn check(&self, op: &'static str, code: CUresult) -> std::result::Result<(), CudaError> {
        if code == CUDA_SUCCESS {
            Ok(())
        } else {
            Err(CudaError {
                op,
                code,
                name: self.error_name(code),
            })
        }
    }

    /// GPUs the driver sees.
    pub fn device_count(&self) -> std::result::Result<u32, CudaError> {
        let mut count: c_int = 0;
        // SAFETY: valid out-pointer.
        self.check("cuDeviceGetCount", unsafe {
            (self.api.device_get_count)(&mut count)
        })?;
        Ok(count.max(0) as u32)
    }

    /// GPU `ordinal`, with its primary context retained (released when the last clone drops).
    pub fn gpu(&'static self, ordinal: u32) -> std::result::Result<Arc<Gpu>, CudaError> {
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

    /// What CUDA knows about the memory at `addr`. Works without a current context for
    /// addresses in the unified address space.
    pub fn pointer_info(&self, addr: u64) -> std::result::Result<PointerInfo, CudaError> {
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
            return Err(CudaError {
                op: "cuPointerGetAttribute(MEMORY_TYPE)",
                code: 0,
                name: format!(
                    "unsupported memory type {memory_type} (arrays are not cache regions)"
                ),
            });
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

/// One GPU with its primary context retained.
pub struct Gpu {
    cuda: &'static Cuda,
    device: CUdevice,
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

    pub fn cuda(&self) -> &'static Cuda {
        self.cuda
    }

    /// Makes this GPU's primary context current on the calling thread (engine threads).
    pub fn bind(&self) -> std::result::Result<(), CudaError> {
        // SAFETY: a retained primary context.
        self.cuda.check("cuCtxSetCurrent", unsafe {
            (self.cuda.api.ctx_set_current)(self.ctx)
        })
    }

    /// [`Gpu::bind`] for the guard's lifetime, then the caller's context again (for calls
    /// made on the application's threads).
    pub fn scoped(&self) -> std::result::Result<CurrentGuard, CudaError> {
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

    /// `cuDeviceGetAttribute`.
    pub fn attribute(&self, attribute: c_int) -> std::result::Result<i32, CudaError> {
        let mut value: c_int = 0;
        // SAFETY: valid out-pointer and device handle.
        self.cuda.check("cuDeviceGetAttribute", unsafe {
            (self.cuda.api.device_get_attribute)(&mut value, attribute, self.device)
        })?;
        Ok(value)
    }

    /// Device memory (`cuMemAlloc`).
    pub fn alloc(self: &Arc<Self>, len: usize) -> std::result::Result<DeviceBuffer, CudaError> {
        self.bind()?;
        let mut ptr: DevicePtr = 0;
        // SAFETY: valid out-pointer; a context is current.
        self.cuda.check("cuMemAlloc", unsafe {
            (self.cuda.api.mem_alloc)(&mut ptr, len.max(1))
        })?;
        Ok(DeviceBuffer {
            gpu: self.clone(),
            ptr,
            len,
        })
    }

    /// Page-locked host memory, portable to every context and mapped into the device's
    /// address space (`cuMemHostAlloc`; with unified addressing, which every 64-bit Linux
    /// platform has, kernels use the host pointer as is).
    pub fn pinned(self: &Arc<Self>, len: usize) -> std::result::Result<PinnedBuffer, CudaError> {
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
            gpu: self.clone(),
            ptr: ptr.cast(),
            len,
        })
    }

    /// A non-blocking stream of this GPU.
    pub fn stream(self: &Arc<Self>) -> std::result::Result<Stream, CudaError> {
        self.bind()?;
        let mut raw: CUstream = std::ptr::null_mut();
        // SAFETY: valid out-pointer; a context is current.
        self.cuda.check("cuStreamCreate", unsafe {
            (self.cuda.api.stream_create)(&mut raw, CU_STREAM_NON_BLOCKING)
        })?;
        Ok(Stream {
            gpu: self.clone(),
            raw,
        })
    }

    /// An event without timing (cheap to record and wait for).
    pub fn event(self: &Arc<Self>) -> std::result::Result<Event, CudaError> {
        self.bind()?;
        let mut raw: CUevent = std::ptr::null_mut();
        // SAFETY: valid out-pointer; a context is current.
        self.cuda.check("cuEventCreate", unsafe {
            (self.cuda.api.event_create)(&mut raw, CU_EVENT_DISABLE_TIMING)
        })?;
        Ok(Event {
            gpu: self.clone(),
            raw,
        })
    }

    /// Loads the segment-copy kernel (`transport/copy_segments.ptx`, JIT-compiled by the
    /// driver for this GPU) into this GPU's primary context.
    pub fn copy_kernel(self: &Arc<Self>) -> std::result::Result<CopyKernel, CudaError> {
        static PTX: &str = concat!(include_str!("transport/copy_segments.ptx"), "\0");
        self.bind()?;
        let mut module: CUmodule = std::ptr::null_mut();
        // SAFETY: a NUL-terminated PTX image; valid out-pointer; a context is current.
        self.cuda.check("cuModuleLoadData", unsafe {
            (self.cuda.api.module_load_data)(&mut module, PTX.as_ptr().cast())
        })?;
        let mut function: CUfunction = std::ptr::null_mut();
        // SAFETY: a loaded module and a NUL-terminated name.
        let rc = unsafe {
            (self.cuda.api.module_get_function)(
                &mut function,
                module,
                c"kvt_copy_segments".as_ptr(),
            )
        };
        let kernel = CopyKernel {
            gpu: self.clone(),
            module,
            function,
        };
        self.cuda.check("cuModuleGetFunction", rc)?;
        Ok(kernel)
    }

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
    pub fn dmabuf_fd(
        &self,
        addr: DevicePtr,
        len: usize,
    ) -> std::result::Result<OwnedFd, CudaError> {
        let Some(get) = self.cuda.api.mem_get_handle_for_address_range else {
            return Err(CudaError {
                op: "cuMemGetHandleForAddressRange",
                code: 0,
                name: "the driver lacks the symbol (CUDA 11.7+ driver needed)".into(),
            });
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
    pub fn copy_from_host(&self, data: &[u8]) -> std::result::Result<(), CudaError> {
        assert!(
            data.len() <= self.len,
            "copy past the end of the device buffer"
        );
        let _current = self.gpu.scoped()?;
        // SAFETY: the destination lies inside this allocation, the source inside `data`.
        self.gpu.cuda.check("cuMemcpyHtoD", unsafe {
            (self.gpu.cuda.api.memcpy_htod)(self.ptr, data.as_ptr().cast(), data.len())
        })
    }

    /// Synchronous copy of the buffer's first `out.len()` bytes into `out`.
    pub fn copy_to_host(&self, out: &mut [u8]) -> std::result::Result<(), CudaError> {
        assert!(
            out.len() <= self.len,
            "copy past the end of the device buffer"
        );
        let _current = self.gpu.scoped()?;
        // SAFETY: the source lies inside this allocation, the destination inside `out`.
        self.gpu.cuda.check("cuMemcpyDtoH", unsafe {
            (self.gpu.cuda.api.memcpy_dtoh)(out.as_mut_ptr().cast(), self.ptr, out.len())
        })
    }

    /// Sets every byte to `value` (synchronously).
    pub fn fill(&self, value: u8) -> std::result::Result<(), CudaError> {
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

/// A CUDA stream; destroyed on drop (after waiting for its work).
pub struct Stream {
    gpu: Arc<Gpu>,
    raw: CUstream,
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
    ) -> std::result::Result<(), CudaError> {
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
    ) -> std::result::Result<(), CudaError> {
        // SAFETY: forwarded to the caller.
        self.gpu.cuda.check("cuMemcpyHtoDAsync", unsafe {
            (self.gpu.cuda.api.memcpy_htod_async)(dst, src.cast(), len, self.raw)
        })
    }

    /// Whether [`Stream::copy_batch_async`] makes one driver call (`cuMemcpyBatchAsync_v2`)
    /// rather than one per copy.
    pub fn batched(&self) -> bool {
        self.gpu.cuda.batch
    }

    /// Queues `dsts.len()` copies (`sizes[i]` bytes from `srcs[i]` to `dsts[i]`, each
    /// address host or device memory, direction inferred): one `cuMemcpyBatchAsync_v2`
    /// where the driver has it, else one `cuMemcpyAsync` each. The slices are read during
    /// the call only.
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
    ) -> std::result::Result<(), CudaError> {
        assert!(dsts.len() == srcs.len() && srcs.len() == sizes.len());
        if dsts.is_empty() {
            return Ok(());
        }
        let api = &self.gpu.cuda.api;
        if let Some(batch) = api.memcpy_batch_async.filter(|_| self.gpu.cuda.batch) {
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
    pub fn synchronize(&self) -> std::result::Result<(), CudaError> {
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

/// The segment-copy kernel loaded in a GPU's context; unloaded on drop.
pub struct CopyKernel {
    gpu: Arc<Gpu>,
    module: CUmodule,
    function: CUfunction,
}

// SAFETY: module and function handles may be used from any thread with the context current.
unsafe impl Send for CopyKernel {}

/// Threads per block of the copy kernel.
const COPY_THREADS: c_uint = 128;
/// Most blocks per launch (the kernel strides over further segments).
const COPY_MAX_BLOCKS: c_uint = 8192;

impl CopyKernel {
    /// Queues one launch that copies `n` segments: `sizes[i]` bytes from `srcs[i]` to
    /// `dsts[i]`, where `dsts`, `srcs` and `sizes` are arrays of `n` u64 in memory the
    /// GPU can read (mapped pinned memory).
    ///
    /// # Safety
    /// The three arrays must hold `n` entries and stay unmodified, and every segment's
    /// source and destination (device memory or mapped pinned host memory) stay valid,
    /// until the stream (or a later event) has been synchronized; segments must not
    /// overlap. The stream must belong to this kernel's context, which must be current.
    pub unsafe fn launch(
        &self,
        stream: &Stream,
        dsts: u64,
        srcs: u64,
        sizes: u64,
        n: u32,
    ) -> std::result::Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        let (mut dsts, mut srcs, mut sizes, mut n) = (dsts, srcs, sizes, n);
        let mut params: [*mut c_void; 4] = [
            (&mut dsts as *mut u64).cast(),
            (&mut srcs as *mut u64).cast(),
            (&mut sizes as *mut u64).cast(),
            (&mut n as *mut u32).cast(),
        ];
        // SAFETY: `params` points at four live values matching the kernel's parameters
        // (u64, u64, u64, u32), read during the call; the memory contract is the caller's.
        self.gpu.cuda.check("cuLaunchKernel", unsafe {
            (self.gpu.cuda.api.launch_kernel)(
                self.function,
                n.min(COPY_MAX_BLOCKS),
                1,
                1,
                COPY_THREADS,
                1,
                1,
                0,
                stream.raw,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }
}

impl Drop for CopyKernel {
    fn drop(&mut self) {
        let _current = self.gpu.scoped();
        // SAFETY: loaded by cuModuleLoadData, unloaded once (launches were synchronized by
        // the owner's stream drop first).
        unsafe { (self.gpu.cuda.api.module_unload)(self.module) };
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
    pub fn record(&self, stream: &Stream) -> std::result::Result<(), CudaError> {
        // SAFETY: live event and stream of the same context.
        self.gpu.cuda.check("cuEventRecord", unsafe {
            (self.gpu.cuda.api.event_record)(self.raw, stream.raw)
        })
    }

    /// Waits until the work before the last record has completed.
    pub fn synchronize(&self) -> std::result::Result<(), CudaError> {
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

/// The memory kind of every region of `table`, recorded in the table.
///
/// Without a loadable driver or GPU everything stays host memory (no error). With CUDA,
/// each region address is looked up; `known_host(addr)` skips the lookup for addresses the
/// caller knows are host memory (JavaScript buffers). A device region must lie inside one
/// allocation, and `gpu_idx` must name a GPU when any region is device memory.
pub fn detect_region_memory(
    table: &mut RegionTable,
    gpu_idx: u32,
    known_host: &dyn Fn(u64) -> bool,
) -> Result<()> {
    let regions: Vec<(u64, u64)> = table.regions().iter().map(|r| (r.addr, r.len)).collect();
    if regions.iter().all(|&(addr, _)| known_host(addr)) {
        return Ok(());
    }
    let cuda = match Cuda::get() {
        Ok(cuda) => cuda,
        Err(reason) => {
            crate::debug!("cuda: {reason}; every region is host memory");
            return Ok(());
        }
    };
    // Lookups of unified addresses need no current context, so none is created for a
    // host-only table; only if the driver answers CUDA_ERROR_INVALID_CONTEXT is gpuIdx's
    // primary context made current (and the caller's restored afterwards).
    let mut scoped: Option<(CurrentGuard, Arc<Gpu>)> = None;
    let gpu_count = cuda.device_count()?;
    let names = |index: usize| {
        let layer = index / table.layout.kinds() as usize;
        let name = if table.layout.has_value && index % 2 == 1 {
            "localValueCache"
        } else {
            "localKeyCache"
        };
        (name, layer)
    };
    let mut kinds = Vec::with_capacity(regions.len());
    for (index, &(addr, len)) in regions.iter().enumerate() {
        if known_host(addr) {
            kinds.push(MemoryKind::Host);
            continue;
        }
        let (name, layer) = names(index);
        let info = match cuda.pointer_info(addr) {
            Err(e) if e.code == CUDA_ERROR_INVALID_CONTEXT && scoped.is_none() => {
                let gpu = cuda.gpu(gpu_idx)?;
                scoped = Some((gpu.scoped()?, gpu));
                cuda.pointer_info(addr)?
            }
            other => other?,
        };
        match info {
            PointerInfo::Unknown | PointerInfo::HostAccessible { .. } => {
                kinds.push(MemoryKind::Host)
            }
            PointerInfo::Device {
                ordinal,
                range_start,
                range_size,
            } => {
                if addr + len > range_start + range_size {
                    return Err(Error::invalid(
                        name,
                        format!(
                            "region {layer}: {len} bytes at {addr:#x} pass the end of its GPU allocation ({range_size} bytes at {range_start:#x})"
                        ),
                    ));
                }
                if gpu_idx >= gpu_count {
                    return Err(Error::invalid(
                        "gpuIdx",
                        format!("{gpu_idx} names no GPU ({gpu_count} present), but {name}[{layer}] is device memory of GPU {ordinal}"),
                    ));
                }
                if ordinal != gpu_idx {
                    crate::debug!(
                        "cuda: {name}[{layer}] is memory of GPU {ordinal}; copies use gpuIdx {gpu_idx}'s context (unified addressing)"
                    );
                }
                kinds.push(MemoryKind::Device { ordinal });
            }
        }
    }
    let devices = kinds.iter().filter(|k| k.is_device()).count();
    if devices > 0 {
        crate::debug!(
            "cuda: {devices} of {} regions are GPU memory (gpuIdx {gpu_idx})",
            kinds.len()
        );
    }
    table.set_memory(kinds, gpu_idx);
    Ok(())
}
