//! GPU memory in the engine, on top of the CUDA driver crate (`kvtransfer-cuda`):
//! - [`regions`]: which registered regions are device memory ([`detect_region_memory`]);
//! - [`DeviceMemory`]: GPU memory for demos, benchmarks and tests;
//! - [`copy`]: queues of host↔device copies on a stream, batched, by the copy kernel or
//!   the copy engines, for any transport (TCP staging uses them);
//! - [`checksum`]: CRC-32C of GPU memory with the CRC-32C kernel, for any transport;
//! - [`inventory`]: the driver's view of this host's GPUs, for `kvtransfer doctor`.
//!
//! The driver crate knows nothing of the engine; its errors become [`Error::Cuda`] here.

pub mod checksum;
pub mod copy;
pub mod inventory;
mod memory;
pub mod regions;

pub use memory::{peer_copy_gbps, DeviceMemory};
pub use regions::detect_region_memory;

use crate::error::Error;
use kvtransfer_cuda::{Cuda, CudaError};

impl From<CudaError> for Error {
    fn from(e: CudaError) -> Error {
        Error::Cuda {
            op: e.op,
            reason: format!("{} ({})", e.name, e.code),
        }
    }
}

/// The process-wide driver, or why there is none as a [`CudaError`] of `cuInit` (for
/// paths that only run once a region was found to be device memory).
pub fn driver() -> Result<&'static Cuda, CudaError> {
    Cuda::get().map_err(|reason| CudaError {
        op: "cuInit",
        code: 0,
        name: reason.to_string(),
    })
}
