//! The CUDA driver API for kvtransfer, loaded at run time.
//!
//! This is the only crate that touches libcuda. It never links against it: the driver's
//! entry points are resolved with `dlopen`/`dlsym` (through `libloading`) from
//! `libcuda.so.1` the first time [`Cuda::get`] runs, so binaries start on hosts without
//! the NVIDIA driver, where [`Cuda::get`] answers with the reason ([`LoadError`]).
//!
//! What it offers, by concern:
//! - [`Cuda`] (`library.rs`): the loaded driver, `cuInit`, error names;
//! - [`Gpu`] (`context.rs`): a device and its retained primary context, made current on
//!   the calling thread ([`Gpu::bind`]) or for a scope ([`Gpu::scoped`]);
//! - [`DeviceBuffer`], [`PinnedBuffer`] (`memory.rs`): device and mapped pinned host memory;
//! - [`Stream`], [`Event`] (`stream.rs`): asynchronous copies, single or batched;
//! - [`CopyKernel`] (`kernel.rs`): the segment-copy kernel (hand-written PTX) that moves
//!   many small segments in one launch;
//! - [`Crc32cKernel`], [`Crc32cSum`] (`crc32c.rs`): the CRC-32C kernel (PTX from
//!   `crc32c.cu`) that sums a list of segments as one buffer in one launch;
//! - [`PointerInfo`] (`pointer.rs`): what the driver knows about an address;
//! - dma-buf export of device memory (`dmabuf.rs`);
//! - sharing memory between processes (legacy IPC, `cuMemCreate` allocations as POSIX file
//!   descriptors), device identity and peer access (`sharing.rs`);
//! - [`DeviceReport`] (`inventory.rs`): one GPU as a report shows it (`kvtransfer doctor`).
//!
//! Every wrapper returns a [`CudaError`] that names the failed call and the `CUresult`
//! (as `cuGetErrorName` spells it). The crate reads no environment variables and logs
//! nothing: policy (which copy path to use, what to tell the user) is the caller's.
//!
//! Ownership: buffers, streams, events and kernels hold an `Arc` of their [`Gpu`], so the
//! primary context is released only after them.

mod context;
mod crc32c;
mod dmabuf;
mod error;
mod inventory;
mod kernel;
mod library;
mod memory;
mod pointer;
mod remap;
mod sharing;
mod stream;
mod sys;

pub use context::{CurrentGuard, Gpu};
pub use crc32c::{Crc32cKernel, Crc32cSum, CRC32C_CHUNK_BYTES};
pub use dmabuf::DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED;
pub use error::{CudaError, LoadError};
pub use inventory::{uuid_text, DeviceReport};
pub use kernel::{CopyKernel, RunKinds};
pub use library::{Cuda, LIBCUDA_SONAME};
pub use memory::{DeviceBuffer, PinnedBuffer};
pub use pointer::{PointerInfo, ERROR_INVALID_CONTEXT};
pub use sharing::{Allocation, IpcMapping, Mapping, ShareableBuffer, IPC_HANDLE_BYTES};
pub use stream::{Event, Stream};
pub use sys::DevicePtr;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_error_names_library_and_reason() {
        let err = Cuda::load("libkvtransfer-does-not-exist.so.9").unwrap_err();
        let LoadError::Library { library, reason } = &err else {
            panic!("unexpected error {err:?}");
        };
        assert_eq!(library, "libkvtransfer-does-not-exist.so.9");
        assert!(
            reason.contains("libkvtransfer-does-not-exist.so.9"),
            "{reason}"
        );
        assert!(
            err.to_string()
                .starts_with("cannot load libkvtransfer-does-not-exist.so.9: "),
            "{err}"
        );
    }

    #[test]
    fn library_without_the_driver_api_names_the_missing_symbol() {
        // libc loads everywhere and has none of the driver's entry points.
        let err = Cuda::load("libc.so.6").unwrap_err();
        let LoadError::Symbol {
            library, symbol, ..
        } = &err
        else {
            panic!("unexpected error {err:?}");
        };
        assert_eq!(
            (library.as_str(), symbol.as_str()),
            ("libc.so.6", "cuGetErrorName")
        );
        assert!(
            err.to_string()
                .starts_with("libc.so.6 lacks cuGetErrorName: "),
            "{err}"
        );
    }

    #[test]
    fn errors_name_the_call_and_the_code() {
        let e = CudaError {
            op: "cuMemcpyDtoHAsync",
            code: 700,
            name: "CUDA_ERROR_ILLEGAL_ADDRESS".into(),
        };
        assert_eq!(
            e.to_string(),
            "cuMemcpyDtoHAsync failed with CUDA_ERROR_ILLEGAL_ADDRESS (700)"
        );
        assert_eq!(
            LoadError::Init(e).to_string(),
            "no usable GPU: cuMemcpyDtoHAsync failed with CUDA_ERROR_ILLEGAL_ADDRESS (700)"
        );
    }

    #[test]
    fn get_answers_the_same_every_time() {
        // With or without a driver here: loaded once, the same answer afterwards.
        match (Cuda::get(), Cuda::get()) {
            (Ok(a), Ok(b)) => assert!(std::ptr::eq(a, b)),
            (Err(a), Err(b)) => assert!(std::ptr::eq(a, b)),
            other => panic!("two different answers: {other:?}"),
        }
    }
}
