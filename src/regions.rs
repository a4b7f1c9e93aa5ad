//! Cache regions as JavaScript gives them: a native or device address (bigint), bytes
//! owned by JS, or memory another process shares (an imported region). Converted to the
//! addresses the engine registers; imports are mapped here and handed to the engine.

use crate::errors::{invalid, to_js_error, Code};
use kvtransfer_engine::{
    parse_cuda_ipc_handle, ImportSource, ImportSpec, ImportedMemory, Importer,
};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

/// Memory another process shares: `bytes` bytes at `offset` of one shared object, named
/// by exactly one of `fd`, `cudaIpcHandle` or `cudaVmmFds` (with `segmentBytes`).
#[napi(object)]
pub struct ImportedRegion {
    /// Where the region starts in the shared object.
    pub offset: f64,
    /// The region's length.
    pub bytes: f64,
    /// A host-memory descriptor of this process (memfd, `/dev/shm` file); duplicated, so
    /// the caller may close it afterwards.
    pub fd: Option<i32>,
    /// The 64-byte CUDA IPC handle of the allocation base, or PyTorch's 66-byte record.
    pub cuda_ipc_handle: Option<Uint8Array>,
    /// cuMem allocations exported as descriptors of this process, mapped back to back.
    pub cuda_vmm_fds: Option<Vec<i32>>,
    /// Bytes of each `cudaVmmFds` allocation.
    pub segment_bytes: Option<f64>,
}

/// A cache region: a native or device address owned by the caller, bytes owned by JS
/// (kept alive by the communicator until it is dropped), or an imported region.
pub(crate) type RegionInput = Either3<BigInt, Uint8Array, ImportedRegion>;

/// The regions of one communicator, converted.
pub(crate) struct Regions {
    /// Imported memory, for the engine to hold.
    pub imports: Vec<ImportedMemory>,
    /// Addresses of JS buffers (host memory by construction: CUDA is not asked).
    pub js_buffers: Vec<u64>,
    /// JS buffers, held so that their memory outlives every transfer.
    pub held: Vec<Uint8Array>,
    importer: Importer,
}

impl Regions {
    pub(crate) fn new(gpu_idx: u32) -> Regions {
        Regions {
            imports: Vec::new(),
            js_buffers: Vec::new(),
            held: Vec::new(),
            importer: Importer::new(gpu_idx),
        }
    }

    /// The address of each region of the list `name`, each checked to hold `bytes`.
    pub(crate) fn addresses(
        &mut self,
        name: &'static str,
        regions: Vec<RegionInput>,
        bytes: u64,
    ) -> Result<Vec<u64>, Code> {
        regions
            .into_iter()
            .enumerate()
            .map(|(i, region)| self.address(name, i, region, bytes))
            .collect()
    }

    fn address(
        &mut self,
        name: &'static str,
        index: usize,
        region: RegionInput,
        region_bytes: u64,
    ) -> Result<u64, Code> {
        let too_small = |given: u64| {
            invalid(
                name,
                format!(
                    "region {index} has {given} bytes but blockNumber × {} = {region_bytes}",
                    if name.ends_with("ScaleCache") {
                        "scaleBlockBytes"
                    } else {
                        "blockBytes"
                    }
                ),
            )
        };
        match region {
            Either3::A(address) => {
                let (negative, value, lossless) = address.get_u64();
                if negative || !lossless || value == 0 {
                    return Err(invalid(
                        name,
                        format!(
                            "region {index}: the bigint address must be a positive 64-bit value"
                        ),
                    ));
                }
                Ok(value)
            }
            Either3::B(bytes) => {
                if (bytes.len() as u64) < region_bytes {
                    return Err(too_small(bytes.len() as u64));
                }
                let address = bytes.as_ptr() as u64;
                self.js_buffers.push(address);
                self.held.push(bytes);
                Ok(address)
            }
            Either3::C(shared) => {
                let spec = import_spec(name, index, shared)?;
                if spec.bytes < region_bytes {
                    return Err(too_small(spec.bytes));
                }
                let imported = self
                    .importer
                    .import(name, index, spec)
                    .map_err(to_js_error)?;
                let address = imported.address();
                self.imports.push(imported);
                Ok(address)
            }
        }
    }
}

/// A whole number of bytes given as a JS number.
fn byte_field(name: &'static str, index: usize, field: &str, value: f64) -> Result<u64, Code> {
    if value.is_finite() && value >= 0.0 && value.fract() == 0.0 && value <= (1u64 << 53) as f64 {
        Ok(value as u64)
    } else {
        Err(invalid(
            name,
            format!("region {index}: {field} {value} is not a whole number of bytes in 0..2^53"),
        ))
    }
}

/// A duplicate of the caller's descriptor `fd`, owned by the import.
fn duplicate(name: &'static str, index: usize, fd: i32) -> Result<OwnedFd, Code> {
    if fd < 0 {
        return Err(invalid(
            name,
            format!("region {index}: fd {fd} is not a descriptor"),
        ));
    }
    // SAFETY: borrowed only for the duplication below; a number that names no open
    // descriptor makes fcntl fail with EBADF, reported as a typed error.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd as RawFd) };
    borrowed.try_clone_to_owned().map_err(|e| {
        invalid(
            name,
            format!("region {index}: fd {fd} is not an open descriptor of this process ({e})"),
        )
    })
}

pub(crate) fn import_spec(
    name: &'static str,
    index: usize,
    shared: ImportedRegion,
) -> Result<ImportSpec, Code> {
    let offset = byte_field(name, index, "offset", shared.offset)?;
    let bytes = byte_field(name, index, "bytes", shared.bytes)?;
    let forms = usize::from(shared.fd.is_some())
        + usize::from(shared.cuda_ipc_handle.is_some())
        + usize::from(shared.cuda_vmm_fds.is_some());
    if forms != 1 {
        return Err(invalid(
            name,
            format!("region {index}: {forms} of fd, cudaIpcHandle, cudaVmmFds given; exactly one"),
        ));
    }
    let source = if let Some(fd) = shared.fd {
        ImportSource::HostFd(duplicate(name, index, fd)?)
    } else if let Some(handle) = shared.cuda_ipc_handle {
        ImportSource::CudaIpc(parse_cuda_ipc_handle(name, &handle).map_err(to_js_error)?)
    } else {
        let fds = shared.cuda_vmm_fds.unwrap_or_default();
        let segment_bytes = match shared.segment_bytes {
            Some(value) => byte_field(name, index, "segmentBytes", value)?,
            None => {
                return Err(invalid(
                    name,
                    format!("region {index}: cudaVmmFds needs segmentBytes"),
                ))
            }
        };
        ImportSource::CudaVmm {
            fds: fds
                .into_iter()
                .map(|fd| duplicate(name, index, fd))
                .collect::<Result<_, _>>()?,
            segment_bytes,
        }
    };
    Ok(ImportSpec {
        source,
        offset,
        bytes,
    })
}
