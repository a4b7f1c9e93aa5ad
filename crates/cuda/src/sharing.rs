//! Device memory shared between processes of one host, and what the driver says about a
//! device's identity and reach:
//! - legacy CUDA IPC: [`Cuda::ipc_handle`] of a `cuMemAlloc` allocation's base, opened in
//!   another process with [`Gpu::open_ipc`] ([`IpcMapping`]);
//! - virtual memory management (`cuMemCreate`, e.g. PyTorch's expandable segments):
//!   [`Cuda::retain_allocation`] → [`Allocation::export_fd`] (a POSIX file descriptor, to be
//!   passed over a Unix socket), [`Gpu::import_allocation`] and [`Gpu::map_allocations`]
//!   ([`Mapping`]) on the other side; [`Gpu::alloc_shareable`] makes such memory;
//! - [`Gpu::uuid`], [`Gpu::name`], [`Gpu::pci_bus_id`], [`Gpu::can_access_peer`],
//!   [`Gpu::enable_peer_access`], [`Cuda::driver_version`].

use crate::context::Gpu;
use crate::error::CudaError;
use crate::library::Cuda;
use crate::sys::DevicePtr;
use crate::sys::{
    IpcMemHandle, MemAccessDesc, MemAllocationProp, MemHandle, MemLocation, SharingApi,
    CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS,
    CU_MEM_ACCESS_FLAGS_PROT_READWRITE, CU_MEM_ALLOCATION_TYPE_PINNED,
    CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, CU_MEM_LOCATION_TYPE_DEVICE,
};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::raw::{c_char, c_int, c_void};
use std::sync::Arc;

/// Bytes of a legacy IPC handle.
pub const IPC_HANDLE_BYTES: usize = 64;

impl Cuda {
    /// The sharing entry points, or which one this driver lacks.
    pub(crate) fn sharing(&self) -> Result<&SharingApi, CudaError> {
        self.api
            .sharing
            .as_ref()
            .map_err(|e| CudaError::other("cuDriverGetVersion", e.to_string()))
    }

    /// Whether this driver has the entry points for sharing memory between processes.
    pub fn sharing_supported(&self) -> Result<(), String> {
        self.api
            .sharing
            .as_ref()
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// `cuDriverGetVersion`: e.g. 13000 for CUDA 13.0.
    pub fn driver_version(&self) -> Result<i32, CudaError> {
        let api = self.sharing()?;
        let mut version: c_int = 0;
        // SAFETY: valid out-pointer.
        self.check("cuDriverGetVersion", unsafe {
            (api.driver_get_version)(&mut version)
        })?;
        Ok(version)
    }

    /// The allocation that contains `ptr`: its base and size (`cuMemGetAddressRange`).
    pub fn address_range(&self, ptr: DevicePtr) -> Result<(DevicePtr, usize), CudaError> {
        let api = self.sharing()?;
        let (mut base, mut size): (DevicePtr, usize) = (0, 0);
        // SAFETY: valid out-pointers; the driver checks the address.
        self.check("cuMemGetAddressRange", unsafe {
            (api.mem_get_address_range)(&mut base, &mut size, ptr)
        })?;
        Ok((base, size))
    }

    /// The legacy IPC handle of the `cuMemAlloc` allocation whose base is `base`.
    pub fn ipc_handle(&self, base: DevicePtr) -> Result<[u8; IPC_HANDLE_BYTES], CudaError> {
        let api = self.sharing()?;
        let mut handle = IpcMemHandle {
            reserved: [0; IPC_HANDLE_BYTES],
        };
        // SAFETY: valid out-pointer; the driver checks the address.
        self.check("cuIpcGetMemHandle", unsafe {
            (api.ipc_get_mem_handle)(&mut handle, base)
        })?;
        Ok(handle.reserved)
    }

    /// The virtual-memory allocation mapped at `ptr` (retained; released on drop). Fails
    /// for memory that is not from `cuMemCreate` (e.g. `cuMemAlloc`).
    pub fn retain_allocation(&'static self, ptr: DevicePtr) -> Result<Allocation, CudaError> {
        let api = self.sharing()?;
        let mut handle: MemHandle = 0;
        // SAFETY: valid out-pointer; the address is only looked up, never dereferenced.
        self.check("cuMemRetainAllocationHandle", unsafe {
            (api.mem_retain_allocation_handle)(&mut handle, ptr as *mut c_void)
        })?;
        Ok(Allocation { cuda: self, handle })
    }
}

/// A virtual-memory allocation handle (`CUmemGenericAllocationHandle`), released on drop
/// (the memory lives on while it is mapped anywhere).
pub struct Allocation {
    pub(crate) cuda: &'static Cuda,
    pub(crate) handle: MemHandle,
}

impl std::fmt::Debug for Allocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Allocation({:#x})", self.handle)
    }
}

impl Allocation {
    /// A POSIX file descriptor for the allocation (`cuMemExportToShareableHandle`); fails
    /// unless it was created with `CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR` requested.
    pub fn export_fd(&self) -> Result<OwnedFd, CudaError> {
        let api = self.cuda.sharing()?;
        let mut fd: c_int = -1;
        // SAFETY: for POSIX_FILE_DESCRIPTOR the out-pointer is an int; live handle.
        self.cuda.check("cuMemExportToShareableHandle", unsafe {
            (api.mem_export_to_shareable_handle)(
                (&mut fd as *mut c_int).cast(),
                self.handle,
                CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                0,
            )
        })?;
        if fd < 0 {
            return Err(CudaError::other(
                "cuMemExportToShareableHandle",
                "returned no file descriptor",
            ));
        }
        // SAFETY: the driver handed over a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        if let Ok(api) = self.cuda.sharing() {
            // SAFETY: a retained, created or imported handle, released once.
            unsafe { (api.mem_release)(self.handle) };
        }
    }
}

// SAFETY: an allocation handle is a plain value usable from any thread.
unsafe impl Send for Allocation {}
// SAFETY: as above; no method mutates it.
unsafe impl Sync for Allocation {}

/// Another process's `cuMemAlloc` allocation, opened in this process; closed on drop.
pub struct IpcMapping {
    gpu: Arc<Gpu>,
    ptr: DevicePtr,
}

impl IpcMapping {
    /// Where the allocation's base is mapped in this process.
    pub fn ptr(&self) -> DevicePtr {
        self.ptr
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        let _current = self.gpu.scoped();
        if let Ok(api) = self.gpu.cuda.sharing() {
            // SAFETY: opened by cuIpcOpenMemHandle in this context, closed once; its users
            // synchronized their streams before dropping it.
            unsafe { (api.ipc_close_mem_handle)(self.ptr) };
        }
    }
}

// SAFETY: a device address and the context that maps it; usable from any thread.
unsafe impl Send for IpcMapping {}
// SAFETY: as above; no method mutates it.
unsafe impl Sync for IpcMapping {}

/// Allocations mapped one after the other into a reserved range of this process's
/// address space, readable and writable by one GPU; unmapped and freed on drop.
pub struct Mapping {
    pub(crate) gpu: Arc<Gpu>,
    pub(crate) ptr: DevicePtr,
    pub(crate) len: usize,
    /// What is mapped in the range now: (offset, bytes) of each `cuMemMap`, in address
    /// order (`remap` replaces them; each is unmapped whole, as the driver requires).
    pub(crate) chunks: std::sync::Mutex<Vec<(usize, usize)>>,
}

impl Mapping {
    pub fn ptr(&self) -> DevicePtr {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let _current = self.gpu.scoped();
        if let Ok(api) = self.gpu.cuda.sharing() {
            let chunks = std::mem::take(self.chunks.get_mut().unwrap_or_else(|p| p.into_inner()));
            // SAFETY: each chunk was mapped by map_allocations or remap in the range they
            // reserved, undone once; its users synchronized their streams before dropping it.
            unsafe {
                for (offset, bytes) in chunks {
                    (api.mem_unmap)(self.ptr + offset as u64, bytes);
                }
                (api.mem_address_free)(self.ptr, self.len);
            }
        }
    }
}

// SAFETY: a device address range; usable from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; no method mutates it.
unsafe impl Sync for Mapping {}

/// Shareable device memory made by [`Gpu::alloc_shareable`]: one `cuMemCreate` allocation
/// (POSIX file descriptors requested) mapped into this process.
pub struct ShareableBuffer {
    // Field order: unmapped before the handle is released.
    mapping: Mapping,
    allocation: Allocation,
}

impl ShareableBuffer {
    pub fn ptr(&self) -> DevicePtr {
        self.mapping.ptr
    }

    /// Bytes mapped (the request rounded up to the allocation granularity).
    pub fn len(&self) -> usize {
        self.mapping.len
    }

    pub fn is_empty(&self) -> bool {
        self.mapping.len == 0
    }

    pub fn allocation(&self) -> &Allocation {
        &self.allocation
    }

    /// Synchronous copy of `data` to the start of the buffer.
    pub fn copy_from_host(&self, data: &[u8]) -> Result<(), CudaError> {
        assert!(data.len() <= self.len(), "copy past the end of the buffer");
        // SAFETY: the destination lies inside this mapping.
        unsafe { self.mapping.gpu.copy_htod(self.ptr(), data) }
    }

    /// Synchronous copy of the buffer's first `out.len()` bytes into `out`.
    pub fn copy_to_host(&self, out: &mut [u8]) -> Result<(), CudaError> {
        assert!(out.len() <= self.len(), "copy past the end of the buffer");
        // SAFETY: the source lies inside this mapping.
        unsafe { self.mapping.gpu.copy_dtoh(out, self.ptr()) }
    }
}

pub(crate) fn device_prop(ordinal: u32, handle_types: c_int) -> MemAllocationProp {
    MemAllocationProp {
        kind: CU_MEM_ALLOCATION_TYPE_PINNED,
        requested_handle_types: handle_types,
        location: MemLocation {
            kind: CU_MEM_LOCATION_TYPE_DEVICE,
            id: ordinal as c_int,
        },
        win32_handle_meta_data: std::ptr::null_mut(),
        compression_type: 0,
        gpu_direct_rdma_capable: 0,
        usage: 0,
        reserved: [0; 4],
    }
}

fn c_string(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Gpu {
    /// The GPU's UUID (the same in every process, whatever `CUDA_VISIBLE_DEVICES` says).
    pub fn uuid(&self) -> Result<[u8; 16], CudaError> {
        let api = self.cuda.sharing()?;
        let mut uuid = [0u8; 16];
        // SAFETY: a 16-byte out-buffer (CUuuid) and a device handle.
        self.cuda.check("cuDeviceGetUuid", unsafe {
            (api.device_get_uuid)(&mut uuid, self.device)
        })?;
        Ok(uuid)
    }

    /// The product name, e.g. `NVIDIA H200`.
    pub fn name(&self) -> Result<String, CudaError> {
        let api = self.cuda.sharing()?;
        let mut buf: [c_char; 256] = [0; 256];
        // SAFETY: the buffer's length is passed; the driver NUL-terminates.
        self.cuda.check("cuDeviceGetName", unsafe {
            (api.device_get_name)(buf.as_mut_ptr(), buf.len() as c_int, self.device)
        })?;
        Ok(c_string(&buf))
    }

    /// The PCI bus id, e.g. `0000:18:00.0`.
    pub fn pci_bus_id(&self) -> Result<String, CudaError> {
        let api = self.cuda.sharing()?;
        let mut buf: [c_char; 64] = [0; 64];
        // SAFETY: the buffer's length is passed; the driver NUL-terminates.
        self.cuda.check("cuDeviceGetPCIBusId", unsafe {
            (api.device_get_pci_bus_id)(buf.as_mut_ptr(), buf.len() as c_int, self.device)
        })?;
        Ok(c_string(&buf))
    }

    /// Whether kernels of this GPU can access `peer`'s memory (true for the GPU itself).
    pub fn can_access_peer(&self, peer: &Gpu) -> Result<bool, CudaError> {
        if peer.device == self.device {
            return Ok(true);
        }
        let api = self.cuda.sharing()?;
        let mut can: c_int = 0;
        // SAFETY: valid out-pointer and device handles.
        self.cuda.check("cuDeviceCanAccessPeer", unsafe {
            (api.device_can_access_peer)(&mut can, self.device, peer.device)
        })?;
        Ok(can != 0)
    }

    /// Lets this GPU's context access `peer`'s memory (once enabled, enabling again is
    /// fine). Makes this GPU's context current on the calling thread.
    pub fn enable_peer_access(&self, peer: &Gpu) -> Result<(), CudaError> {
        if peer.device == self.device {
            return Ok(());
        }
        let api = self.cuda.sharing()?;
        self.bind()?;
        // SAFETY: a retained primary context of another device; flags must be 0.
        let rc = unsafe { (api.ctx_enable_peer_access)(peer.ctx(), 0) };
        if rc == CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
            return Ok(());
        }
        self.cuda.check("cuCtxEnablePeerAccess", rc)
    }

    /// Opens another process's legacy IPC handle in this GPU's context (peer access
    /// enabled as needed). Makes this GPU's context current on the calling thread.
    pub fn open_ipc(
        self: &Arc<Self>,
        handle: &[u8; IPC_HANDLE_BYTES],
    ) -> Result<IpcMapping, CudaError> {
        let api = self.cuda.sharing()?;
        self.bind()?;
        let mut ptr: DevicePtr = 0;
        // SAFETY: valid out-pointer; the handle is passed by value as the driver expects;
        // a context is current.
        self.cuda.check("cuIpcOpenMemHandle", unsafe {
            (api.ipc_open_mem_handle)(
                &mut ptr,
                IpcMemHandle { reserved: *handle },
                CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS,
            )
        })?;
        Ok(IpcMapping {
            gpu: Arc::clone(self),
            ptr,
        })
    }

    /// Imports an allocation from a POSIX file descriptor another process exported (the
    /// descriptor stays the caller's).
    pub fn import_allocation(&self, fd: &OwnedFd) -> Result<Allocation, CudaError> {
        use std::os::fd::AsRawFd;
        let api = self.cuda.sharing()?;
        let mut handle: MemHandle = 0;
        // SAFETY: for POSIX_FILE_DESCRIPTOR the OS handle is the descriptor's value cast
        // to a pointer; the descriptor is open for the call.
        self.cuda.check("cuMemImportFromShareableHandle", unsafe {
            (api.mem_import_from_shareable_handle)(
                &mut handle,
                fd.as_raw_fd() as isize as *mut c_void,
                CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
            )
        })?;
        Ok(Allocation {
            cuda: self.cuda,
            handle,
        })
    }

    /// Maps `pieces` (allocation, bytes) one after the other into a newly reserved range,
    /// readable and writable by this GPU.
    pub fn map_allocations(
        self: &Arc<Self>,
        pieces: &[(&Allocation, usize)],
    ) -> Result<Mapping, CudaError> {
        let api = self.cuda.sharing()?;
        let _current = self.scoped()?;
        let len: usize = pieces.iter().map(|&(_, size)| size).sum();
        let mut ptr: DevicePtr = 0;
        // SAFETY: valid out-pointer; alignment 0 = the default, no fixed address.
        self.cuda.check("cuMemAddressReserve", unsafe {
            (api.mem_address_reserve)(&mut ptr, len, 0, 0, 0)
        })?;
        let mut mapping = Mapping {
            gpu: Arc::clone(self),
            ptr,
            len: 0,
            chunks: std::sync::Mutex::new(Vec::with_capacity(pieces.len())),
        };
        let mut at = 0usize;
        for &(allocation, size) in pieces {
            // SAFETY: the target lies inside the range reserved above and is not mapped
            // yet; the handle is live.
            let mapped = self.cuda.check("cuMemMap", unsafe {
                (api.mem_map)(ptr + at as u64, size, 0, allocation.handle, 0)
            });
            if let Err(e) = mapped {
                // Unmap what was mapped, then free the whole reservation.
                // SAFETY: the first `at` bytes are mapped; the range was reserved above.
                unsafe {
                    if at > 0 {
                        (api.mem_unmap)(ptr, at);
                    }
                    (api.mem_address_free)(ptr, len);
                }
                std::mem::forget(mapping);
                return Err(e);
            }
            mapping
                .chunks
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .push((at, size));
            at += size;
        }
        mapping.len = len;
        let access = MemAccessDesc {
            location: MemLocation {
                kind: CU_MEM_LOCATION_TYPE_DEVICE,
                id: self.ordinal() as c_int,
            },
            flags: CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the whole range is mapped; one access descriptor.
        self.cuda.check("cuMemSetAccess", unsafe {
            (api.mem_set_access)(ptr, len, &access, 1)
        })?;
        Ok(mapping)
    }

    /// Device memory of at least `len` bytes from `cuMemCreate`, exportable as a POSIX
    /// file descriptor (what PyTorch's expandable segments make), mapped for this GPU.
    pub fn alloc_shareable(self: &Arc<Self>, len: usize) -> Result<ShareableBuffer, CudaError> {
        let (allocation, size) = self.create_shareable(len)?;
        let mapping = self.map_allocations(&[(&allocation, size)])?;
        Ok(ShareableBuffer {
            mapping,
            allocation,
        })
    }

    /// An unmapped `cuMemCreate` allocation of at least `len` bytes on this GPU, exportable
    /// as a POSIX file descriptor, and its size (rounded up to the granularity).
    pub fn create_shareable(&self, len: usize) -> Result<(Allocation, usize), CudaError> {
        let api = self.cuda.sharing()?;
        let _current = self.scoped()?;
        let prop = device_prop(self.ordinal(), CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
        let mut granularity: usize = 0;
        // SAFETY: valid out-pointer and property struct; option 0 = minimum granularity.
        self.cuda.check("cuMemGetAllocationGranularity", unsafe {
            (api.mem_get_allocation_granularity)(&mut granularity, &prop, 0)
        })?;
        let granularity = granularity.max(1);
        let size = len.max(1).div_ceil(granularity) * granularity;
        let mut handle: MemHandle = 0;
        // SAFETY: valid out-pointer and property struct; size is a granularity multiple.
        self.cuda.check("cuMemCreate", unsafe {
            (api.mem_create)(&mut handle, size, &prop, 0)
        })?;
        Ok((
            Allocation {
                cuda: self.cuda,
                handle,
            },
            size,
        ))
    }
}
