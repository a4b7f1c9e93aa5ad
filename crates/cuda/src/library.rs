//! Loading `libcuda.so.1` at run time and `cuInit`: [`Cuda`].

use crate::error::{CudaError, LoadError};
use crate::sys::{Api, CUresult, SharingApi, CUDA_SUCCESS};
use libloading::Library;
use std::ffi::CStr;
use std::os::raw::c_char;
use std::sync::OnceLock;

/// The soname [`Cuda::get`] opens.
pub const LIBCUDA_SONAME: &str = "libcuda.so.1";

/// The loaded and initialized CUDA driver.
pub struct Cuda {
    pub(crate) api: Api,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field(
                "dmabuf_export",
                &self.api.mem_get_handle_for_address_range.is_some(),
            )
            .field("batch_copy", &self.batch_copy_supported())
            .finish()
    }
}

/// Resolves the first of `names` that `lib` has to a function pointer of type `T`.
///
/// # Safety
/// `T` must be the exact `extern "C"` signature of every symbol named.
unsafe fn symbol<T: Copy>(lib: &Library, soname: &str, names: &[&str]) -> Result<T, LoadError> {
    let mut last = (String::new(), String::new());
    for name in names {
        let cname = format!("{name}\0");
        // SAFETY: the caller guarantees T is the symbol's signature.
        match unsafe { lib.get::<T>(cname.as_bytes()) } {
            Ok(f) => return Ok(*f),
            Err(e) => last = ((*name).to_string(), e.to_string()),
        }
    }
    Err(LoadError::Symbol {
        library: soname.to_string(),
        symbol: last.0,
        reason: last.1,
    })
}

/// The sharing entry points, all or none.
///
/// # Safety
/// As for [`symbol`]: the signatures in [`SharingApi`] are the driver API's.
unsafe fn load_sharing(lib: &Library, s: &str) -> Result<SharingApi, LoadError> {
    // SAFETY: each signature in SharingApi is the driver API's (cuda.h), `_v2` where the
    // driver has one.
    unsafe {
        Ok(SharingApi {
            driver_get_version: symbol(lib, s, &["cuDriverGetVersion"])?,
            device_get_uuid: symbol(lib, s, &["cuDeviceGetUuid_v2", "cuDeviceGetUuid"])?,
            device_get_name: symbol(lib, s, &["cuDeviceGetName"])?,
            device_get_pci_bus_id: symbol(lib, s, &["cuDeviceGetPCIBusId"])?,
            device_can_access_peer: symbol(lib, s, &["cuDeviceCanAccessPeer"])?,
            ctx_enable_peer_access: symbol(lib, s, &["cuCtxEnablePeerAccess"])?,
            mem_get_address_range: symbol(lib, s, &["cuMemGetAddressRange_v2"])?,
            ipc_get_mem_handle: symbol(lib, s, &["cuIpcGetMemHandle"])?,
            ipc_open_mem_handle: symbol(lib, s, &["cuIpcOpenMemHandle_v2", "cuIpcOpenMemHandle"])?,
            ipc_close_mem_handle: symbol(lib, s, &["cuIpcCloseMemHandle"])?,
            mem_retain_allocation_handle: symbol(lib, s, &["cuMemRetainAllocationHandle"])?,
            mem_export_to_shareable_handle: symbol(lib, s, &["cuMemExportToShareableHandle"])?,
            mem_import_from_shareable_handle: symbol(lib, s, &["cuMemImportFromShareableHandle"])?,
            mem_create: symbol(lib, s, &["cuMemCreate"])?,
            mem_release: symbol(lib, s, &["cuMemRelease"])?,
            mem_get_allocation_properties_from_handle: symbol(
                lib,
                s,
                &["cuMemGetAllocationPropertiesFromHandle"],
            )?,
            mem_get_allocation_granularity: symbol(lib, s, &["cuMemGetAllocationGranularity"])?,
            mem_address_reserve: symbol(lib, s, &["cuMemAddressReserve"])?,
            mem_address_free: symbol(lib, s, &["cuMemAddressFree"])?,
            mem_map: symbol(lib, s, &["cuMemMap"])?,
            mem_unmap: symbol(lib, s, &["cuMemUnmap"])?,
            mem_set_access: symbol(lib, s, &["cuMemSetAccess"])?,
        })
    }
}

impl Cuda {
    /// The process-wide driver: loaded and `cuInit`ed on first use. The error says why
    /// CUDA is not usable here (library missing, symbol missing, `cuInit` failed: no GPU).
    pub fn get() -> Result<&'static Cuda, &'static LoadError> {
        static CUDA: OnceLock<Result<Cuda, LoadError>> = OnceLock::new();
        CUDA.get_or_init(|| Cuda::load(LIBCUDA_SONAME)).as_ref()
    }

    /// Loads the driver from `soname` and initializes it.
    pub(crate) fn load(soname: &str) -> Result<Cuda, LoadError> {
        // SAFETY: loading the NVIDIA driver library runs its initializers, which have no
        // preconditions on this process.
        let lib = unsafe { Library::new(soname) }.map_err(|e| LoadError::Library {
            library: soname.to_string(),
            reason: e.to_string(),
        })?;
        let s = soname;
        // SAFETY: each signature below is the driver API's (cuda.h), with the `_v2` entry
        // points that take 64-bit device pointers and sizes.
        let api = unsafe {
            Api {
                get_error_name: symbol(&lib, s, &["cuGetErrorName"])?,
                init: symbol(&lib, s, &["cuInit"])?,
                device_get_count: symbol(&lib, s, &["cuDeviceGetCount"])?,
                device_get: symbol(&lib, s, &["cuDeviceGet"])?,
                device_get_attribute: symbol(&lib, s, &["cuDeviceGetAttribute"])?,
                primary_ctx_retain: symbol(&lib, s, &["cuDevicePrimaryCtxRetain"])?,
                primary_ctx_release: symbol(
                    &lib,
                    s,
                    &["cuDevicePrimaryCtxRelease_v2", "cuDevicePrimaryCtxRelease"],
                )?,
                ctx_set_current: symbol(&lib, s, &["cuCtxSetCurrent"])?,
                ctx_get_current: symbol(&lib, s, &["cuCtxGetCurrent"])?,
                pointer_get_attribute: symbol(&lib, s, &["cuPointerGetAttribute"])?,
                mem_host_alloc: symbol(&lib, s, &["cuMemHostAlloc"])?,
                mem_free_host: symbol(&lib, s, &["cuMemFreeHost"])?,
                mem_alloc: symbol(&lib, s, &["cuMemAlloc_v2"])?,
                mem_free: symbol(&lib, s, &["cuMemFree_v2"])?,
                memcpy_htod: symbol(&lib, s, &["cuMemcpyHtoD_v2"])?,
                memcpy_dtoh: symbol(&lib, s, &["cuMemcpyDtoH_v2"])?,
                memset_d8: symbol(&lib, s, &["cuMemsetD8_v2"])?,
                memcpy_htod_async: symbol(&lib, s, &["cuMemcpyHtoDAsync_v2"])?,
                memcpy_dtoh_async: symbol(&lib, s, &["cuMemcpyDtoHAsync_v2"])?,
                memcpy_async: symbol(&lib, s, &["cuMemcpyAsync"])?,
                module_load_data: symbol(&lib, s, &["cuModuleLoadData"])?,
                module_get_function: symbol(&lib, s, &["cuModuleGetFunction"])?,
                module_unload: symbol(&lib, s, &["cuModuleUnload"])?,
                launch_kernel: symbol(&lib, s, &["cuLaunchKernel"])?,
                memcpy_batch_async: symbol(&lib, s, &["cuMemcpyBatchAsync_v2"]).ok(),
                stream_create: symbol(&lib, s, &["cuStreamCreate"])?,
                stream_destroy: symbol(&lib, s, &["cuStreamDestroy_v2"])?,
                stream_synchronize: symbol(&lib, s, &["cuStreamSynchronize"])?,
                event_create: symbol(&lib, s, &["cuEventCreate"])?,
                event_record: symbol(&lib, s, &["cuEventRecord"])?,
                event_synchronize: symbol(&lib, s, &["cuEventSynchronize"])?,
                event_destroy: symbol(&lib, s, &["cuEventDestroy_v2"])?,
                mem_get_handle_for_address_range: symbol(
                    &lib,
                    s,
                    &["cuMemGetHandleForAddressRange"],
                )
                .ok(),
                sharing: load_sharing(&lib, s),
                _lib: lib,
            }
        };
        let cuda = Cuda { api };
        // SAFETY: cuInit takes flags (must be 0) and may be called any number of times.
        cuda.check("cuInit", unsafe { (cuda.api.init)(0) })
            .map_err(LoadError::Init)?;
        Ok(cuda)
    }

    /// Whether the driver has `cuMemcpyBatchAsync_v2` (CUDA 12.8+ drivers), which
    /// [`Stream::copy_batch_async`](crate::Stream::copy_batch_async) uses when asked to.
    pub fn batch_copy_supported(&self) -> bool {
        self.api.memcpy_batch_async.is_some()
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

    /// `Ok` for `CUDA_SUCCESS`, else the error of `op` with the code's name.
    pub(crate) fn check(&self, op: &'static str, code: CUresult) -> Result<(), CudaError> {
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
}
