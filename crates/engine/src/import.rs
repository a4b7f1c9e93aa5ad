//! Imported regions: cache memory that another process owns and shares with this one (the
//! sidecar's workers). Three forms, each a byte range `offset..offset + bytes` of a shared
//! object:
//! - a host-memory file descriptor (memfd, a `/dev/shm` file), mapped shared;
//! - a legacy CUDA IPC handle of an allocation's base (or PyTorch's record around it),
//!   opened in the engine's GPU context;
//! - cuMem (VMM) allocations exported as POSIX fds, imported and mapped back to back.
//!
//! An [`ImportedMemory`] keeps its mapping until dropped; the engine holds its imports in
//! the region table, so no transport thread can outlive them.

use crate::error::{Error, Result};
use device_swap::{Filler, VmmImport};
use kvtransfer_cuda::{Cuda, Gpu, IpcMapping, IPC_HANDLE_BYTES};
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use swap::HostPages;

mod device_swap;
mod swap;

pub(crate) use swap::ipc_refusal;

/// PyTorch's record around a CUDA IPC handle (`_share_cuda_()`): a version byte, a type
/// byte, then the handle.
const TORCH_RECORD_VERSION: u8 = 2;
const TORCH_TYPE_CUDA_IPC: u8 = b'c';
const TORCH_TYPE_EXPANDABLE: u8 = b'e';

/// What an imported region is a range of.
pub enum ImportSource {
    /// Host memory: a memfd or a `/dev/shm` file (the descriptor is the import's own).
    HostFd(OwnedFd),
    /// The legacy CUDA IPC handle of a `cuMemAlloc` allocation's base.
    CudaIpc([u8; IPC_HANDLE_BYTES]),
    /// cuMem allocations exported as POSIX fds, each `segment_bytes` long, mapped back to
    /// back in this order.
    CudaVmm {
        /// One descriptor per allocation.
        fds: Vec<OwnedFd>,
        /// Bytes of each allocation.
        segment_bytes: u64,
    },
}

/// One region to import: `bytes` bytes at `offset` of the shared object.
pub struct ImportSpec {
    /// The shared object.
    pub source: ImportSource,
    /// Where the region starts in it.
    pub offset: u64,
    /// The region's length.
    pub bytes: u64,
}

/// The legacy CUDA IPC handle in `bytes`: the 64-byte handle itself, or PyTorch's 66-byte
/// record (version 2, type `'c'`). `name` names the argument in errors.
pub fn parse_cuda_ipc_handle(name: &'static str, bytes: &[u8]) -> Result<[u8; IPC_HANDLE_BYTES]> {
    let handle = match bytes {
        [TORCH_RECORD_VERSION, TORCH_TYPE_CUDA_IPC, handle @ ..] if handle.len() == IPC_HANDLE_BYTES => handle,
        [TORCH_RECORD_VERSION, TORCH_TYPE_EXPANDABLE, ..] => {
            return Err(Error::invalid(
                name,
                "is PyTorch's expandable-segments record (type 'e'): share its segments as cudaVmmFds (the Python client's region_of does)",
            ))
        }
        handle if handle.len() == IPC_HANDLE_BYTES => handle,
        other => {
            return Err(Error::invalid(
                name,
                format!(
                    "{} bytes given; expected the {IPC_HANDLE_BYTES}-byte CUDA IPC handle or PyTorch's {}-byte record (version {TORCH_RECORD_VERSION}, type 'c')",
                    other.len(),
                    IPC_HANDLE_BYTES + 2
                ),
            ))
        }
    };
    let mut out = [0u8; IPC_HANDLE_BYTES];
    out.copy_from_slice(handle);
    Ok(out)
}

/// What keeps an imported region's memory mapped.
enum Keep {
    Host(#[expect(dead_code, reason = "held only to keep the pages mapped")] memmap2::MmapRaw),
    Ipc(#[expect(dead_code, reason = "held only to keep the handle open")] Arc<IpcMapping>),
    /// cuMem imports: their mapping lives in `ImportedMemory::vmm` (swapped in place).
    Vmm,
}

/// A region of another process's memory, mapped into this one until dropped.
pub struct ImportedMemory {
    address: u64,
    bytes: u64,
    host: bool,
    /// A CUDA IPC import: the handle and where its allocation is mapped here. Memory opened
    /// from a handle cannot be exported again; a transport that shares it (NVLink) passes
    /// this handle on instead.
    ipc: Option<([u8; IPC_HANDLE_BYTES], u64)>,
    /// A cuMem import: its reserved range, what is mapped there (each segment's base here
    /// and the owner's descriptor for it: an imported allocation cannot be exported
    /// again; a transport that shares it (NVLink) passes a duplicate of the owner's
    /// descriptor on instead), swapped in place at a warm re-attach.
    vmm: Option<VmmImport>,
    /// A host import: the page-aligned range its mapping covers (what [`swap`] replaces).
    host_pages: Option<HostPages>,
    _keep: Keep,
}

impl std::fmt::Debug for ImportedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.host { "host" } else { "device" };
        write!(
            f,
            "ImportedMemory({} {kind} bytes at {:#x})",
            self.bytes, self.address
        )
    }
}

impl ImportedMemory {
    /// Where the region starts in this process (what the region table takes).
    pub fn address(&self) -> u64 {
        self.address
    }

    /// The region's length.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether the region is host memory (no CUDA lookup needed).
    pub fn is_host(&self) -> bool {
        self.host
    }

    /// The CUDA IPC handle of the allocation mapped at `base` here, when this region was
    /// imported from it.
    pub(crate) fn ipc_handle_at(&self, base: u64) -> Option<[u8; IPC_HANDLE_BYTES]> {
        self.ipc
            .filter(|&(_, mapped)| mapped == base)
            .map(|(handle, _)| handle)
    }

    /// The cuMem segment that holds address `at` here, when this region was imported from
    /// cuMem descriptors: its base here, its size, and a duplicate of the owner's descriptor.
    pub(crate) fn segment_at(&self, at: u64) -> Option<(u64, u64, std::io::Result<OwnedFd>)> {
        self.vmm.as_ref()?.segment_at(at)
    }

    /// Whether this region was imported from a legacy CUDA IPC handle (mapped where the
    /// driver chooses, so it cannot be swapped in place).
    pub(crate) fn is_ipc(&self) -> bool {
        self.ipc.is_some()
    }
}

/// Imports the regions of one communicator. CUDA IPC handles are opened once each (the
/// driver maps a handle once per context; several layers often share one allocation).
pub struct Importer {
    gpu_idx: u32,
    gpu: Option<Arc<Gpu>>,
    opened: HashMap<[u8; IPC_HANDLE_BYTES], Arc<IpcMapping>>,
    /// The one allocation that parked cuMem imports map at every granule, made at the
    /// first park.
    filler: Arc<Filler>,
}

impl Importer {
    /// An importer whose device imports use GPU `gpu_idx`'s context.
    pub fn new(gpu_idx: u32) -> Importer {
        Importer {
            gpu_idx,
            gpu: None,
            opened: HashMap::new(),
            filler: Arc::default(),
        }
    }

    /// Maps `spec`; `name` and `index` name the region in errors (`localKeyCache`, 3).
    pub fn import(
        &mut self,
        name: &'static str,
        index: usize,
        spec: ImportSpec,
    ) -> Result<ImportedMemory> {
        if spec.bytes == 0 {
            return Err(Error::invalid(
                name,
                format!("region {index}: bytes is 0; at least 1"),
            ));
        }
        let end = spec.offset.checked_add(spec.bytes).ok_or_else(|| {
            Error::invalid(
                name,
                format!(
                    "region {index}: offset {} + bytes {} overflow",
                    spec.offset, spec.bytes
                ),
            )
        })?;
        let past_end = |what: &str, size: u64| {
            Error::invalid(
                name,
                format!(
                    "region {index}: offset {} + bytes {} = {end} passes the end of the {what} ({size} bytes)",
                    spec.offset, spec.bytes
                ),
            )
        };
        match spec.source {
            ImportSource::HostFd(fd) => {
                let file = File::from(fd);
                let size = shared_file_size(&file, name, index)?;
                if end > size {
                    return Err(past_end("shared file", size));
                }
                let len = usize::try_from(spec.bytes)
                    .map_err(|_| past_end("address space", usize::MAX as u64))?;
                // A raw mapping: another process writes the same pages, so the engine only
                // moves bytes through it, never forms references into it. The size was
                // checked just above; the owner must not shrink the file while attached.
                let map = memmap2::MmapOptions::new().offset(spec.offset).len(len).map_raw(&file)
                    .map_err(|e| Error::invalid(name, format!("region {index}: the descriptor cannot be mapped shared read-write ({e})")))?;
                let slack = spec.offset % swap::page_size();
                Ok(ImportedMemory {
                    address: map.as_mut_ptr() as u64,
                    bytes: spec.bytes,
                    host: true,
                    ipc: None,
                    vmm: None,
                    host_pages: Some(HostPages {
                        base: map.as_mut_ptr() as u64 - slack,
                        len: len + slack as usize,
                        slack,
                    }),
                    _keep: Keep::Host(map),
                })
            }
            ImportSource::CudaIpc(handle) => {
                let gpu = self.gpu(name)?;
                let mapping = match self.opened.get(&handle) {
                    Some(mapping) => Arc::clone(mapping),
                    None => {
                        let mapping = Arc::new(gpu.open_ipc(&handle).map_err(|e| {
                            Error::invalid(
                                name,
                                format!("region {index}: the CUDA IPC handle cannot be opened on GPU {} ({} {}): is its owner alive, and is it a handle of an allocation's base?", self.gpu_idx, e.op, e.name),
                            )
                        })?);
                        self.opened.insert(handle, Arc::clone(&mapping));
                        mapping
                    }
                };
                let (_, size) = Cuda::get()
                    .map_err(|e| Error::invalid(name, e.to_string()))?
                    .address_range(mapping.ptr())?;
                if end > size as u64 {
                    return Err(past_end("shared allocation", size as u64));
                }
                Ok(ImportedMemory {
                    address: mapping.ptr() + spec.offset,
                    bytes: spec.bytes,
                    host: false,
                    ipc: Some((handle, mapping.ptr())),
                    vmm: None,
                    host_pages: None,
                    _keep: Keep::Ipc(mapping),
                })
            }
            ImportSource::CudaVmm { fds, segment_bytes } => {
                if fds.is_empty() || segment_bytes == 0 {
                    return Err(Error::invalid(
                        name,
                        format!("region {index}: {} descriptors of {segment_bytes} bytes given; at least one of at least 1 byte", fds.len()),
                    ));
                }
                let size = segment_bytes.saturating_mul(fds.len() as u64);
                if end > size {
                    return Err(past_end("shared segments", size));
                }
                let segment = usize::try_from(segment_bytes)
                    .map_err(|_| past_end("address space", usize::MAX as u64))?;
                let gpu = self.gpu(name)?;
                let allocations = fds
                    .iter()
                    .map(|fd| gpu.import_allocation(fd))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| {
                        Error::invalid(name, format!("region {index}: a descriptor is not an exported cuMem allocation ({} {})", e.op, e.name))
                    })?;
                let pieces: Vec<_> = allocations.iter().map(|a| (a, segment)).collect();
                let mapping = gpu.map_allocations(&pieces).map_err(|e| {
                    Error::invalid(
                        name,
                        format!("region {index}: the segments cannot be mapped as {} × {segment_bytes} bytes ({} {}): is segmentBytes each allocation's size?", fds.len(), e.op, e.name),
                    )
                })?;
                let device = allocations[0].device_ordinal().ok().flatten();
                let address = mapping.ptr() + spec.offset;
                let vmm = VmmImport::new(
                    gpu,
                    mapping,
                    spec.offset,
                    device,
                    fds,
                    segment_bytes,
                    Arc::clone(&self.filler),
                );
                Ok(ImportedMemory {
                    address,
                    bytes: spec.bytes,
                    host: false,
                    ipc: None,
                    vmm: Some(vmm),
                    host_pages: None,
                    _keep: Keep::Vmm,
                })
            }
        }
    }

    fn gpu(&mut self, name: &'static str) -> Result<Arc<Gpu>> {
        if let Some(gpu) = &self.gpu {
            return Ok(Arc::clone(gpu));
        }
        let cannot = |why: String| {
            Error::invalid(
                name,
                format!(
                    "GPU memory was shared, but GPU {} cannot be opened here ({why})",
                    self.gpu_idx
                ),
            )
        };
        let cuda = Cuda::get().map_err(|e| cannot(e.to_string()))?;
        let gpu = cuda.gpu(self.gpu_idx).map_err(|e| cannot(e.name))?;
        self.gpu = Some(Arc::clone(&gpu));
        Ok(gpu)
    }
}

/// The size of a shared host-memory file (memfd, `/dev/shm`), for the end-of-file check.
fn shared_file_size(file: &File, name: &'static str, index: usize) -> Result<u64> {
    let metadata = file.metadata().map_err(|e| {
        Error::invalid(
            name,
            format!("region {index}: the descriptor cannot be read ({e})"),
        )
    })?;
    Ok(metadata.len())
}
