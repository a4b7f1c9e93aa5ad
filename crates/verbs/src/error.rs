//! Error types of the verbs layer.

use std::io;

/// Result alias used throughout the crate.
pub type Result<T, E = VerbsError> = std::result::Result<T, E>;

/// Everything that can go wrong in the verbs layer.
#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    /// `dlopen` of the verbs library failed (rdma-core not installed).
    #[error(
        "cannot load {library}: {reason} (install rdma-core's libibverbs1 and ibverbs-providers)"
    )]
    LibraryMissing {
        /// The soname that was tried, e.g. `libibverbs.so.1`.
        library: String,
        /// The `dlerror()` text.
        reason: String,
    },
    /// A mandatory symbol is missing from the loaded library (rdma-core too old).
    #[error("{library} lacks symbol {symbol}: {reason}")]
    SymbolMissing {
        /// The soname of the loaded library.
        library: String,
        /// The missing function.
        symbol: &'static str,
        /// The `dlerror()` text.
        reason: String,
    },
    /// An optional verb is not provided by this rdma-core / device.
    #[error("{op} is not supported: {reason}")]
    Unsupported {
        /// The verb, e.g. `ibv_reg_dmabuf_mr`.
        op: &'static str,
        /// Why.
        reason: String,
    },
    /// A verbs call failed with an OS error.
    #[error("{op} failed: {source}")]
    Call {
        /// The verb, e.g. `ibv_modify_qp(RTR)`.
        op: &'static str,
        /// errno of the failure.
        #[source]
        source: io::Error,
    },
    /// The requested RDMA device does not exist.
    #[error("RDMA device {wanted:?} not found (available: {available:?})")]
    NoDevice {
        /// The name asked for.
        wanted: String,
        /// Names of the devices that exist.
        available: Vec<String>,
    },
    /// A GID lookup failed or gave an unusable GID.
    #[error("GID index {index} on port {port} of {device}: {reason}")]
    Gid {
        /// Device name.
        device: String,
        /// Port number (1-based).
        port: u8,
        /// GID table index.
        index: u8,
        /// Why it is unusable.
        reason: String,
    },
    /// An argument is outside what the verbs layer accepts.
    #[error("invalid argument {what}: {reason}")]
    InvalidArgument {
        /// Which argument.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A [`SendBatch`](crate::SendBatch) is full.
    #[error("send batch is full (capacity {capacity} work requests)")]
    BatchFull {
        /// The fixed capacity of the batch.
        capacity: usize,
    },
    /// Posting work requests failed.
    #[error(transparent)]
    Post(#[from] PostError),
}

/// `ibv_post_send` / `ibv_post_recv` rejected a work request.
///
/// Work requests before `index` in the chain were posted and will complete;
/// the one at `index` and all after it were not posted.
#[derive(Debug, thiserror::Error)]
#[error("{op} rejected work request {index} of {count}: {source}")]
pub struct PostError {
    /// The posting verb.
    pub op: &'static str,
    /// Index (0-based) of the first work request that was not posted.
    pub index: usize,
    /// Number of work requests in the chain.
    pub count: usize,
    /// errno returned by the provider.
    #[source]
    pub source: io::Error,
}

/// Error for a verb that returned NULL / -1 and set `errno`.
pub(crate) fn errno_err(op: &'static str) -> VerbsError {
    VerbsError::Call {
        op,
        source: io::Error::last_os_error(),
    }
}

/// Error for a verb that returns an errno value (or -1 with `errno` set).
pub(crate) fn rc_err(op: &'static str, rc: libc::c_int) -> VerbsError {
    let source = if rc > 0 {
        io::Error::from_raw_os_error(rc)
    } else {
        io::Error::last_os_error()
    };
    VerbsError::Call { op, source }
}
