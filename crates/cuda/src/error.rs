//! The crate's errors: a failed driver call ([`CudaError`]) and why the driver could not be
//! loaded at all ([`LoadError`]). Users convert them into their own error types.

/// A failed CUDA driver call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op} failed with {name} ({code})")]
pub struct CudaError {
    /// The driver function, e.g. `cuMemcpyDtoHAsync`.
    pub op: &'static str,
    /// The `CUresult` (0 for failures the crate detects itself, `name` then says what).
    pub code: i32,
    /// `cuGetErrorName` of the code, e.g. `CUDA_ERROR_INVALID_VALUE`.
    pub name: String,
}

impl CudaError {
    /// A failure of `op` detected by the crate rather than returned by the driver.
    pub(crate) fn other(op: &'static str, what: impl Into<String>) -> Self {
        CudaError {
            op,
            code: 0,
            name: what.into(),
        }
    }
}

/// Why the driver is not usable in this process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// `dlopen` failed: no NVIDIA driver installed.
    #[error("cannot load {library}: {reason}")]
    Library { library: String, reason: String },
    /// The library lacks an entry point the crate needs (a driver too old).
    #[error("{library} lacks {symbol}: {reason}")]
    Symbol {
        library: String,
        symbol: String,
        reason: String,
    },
    /// `cuInit` failed: typically no GPU (or no access to it).
    #[error("no usable GPU: {0}")]
    Init(#[source] CudaError),
}
