//! One error type for the whole engine. Every variant has a stable `code()` that the
//! binding exposes as `err.code`; messages name the offending value and the limit.

use std::fmt;

/// Which side of a transfer a block id belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Local,
    Remote,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Local => "local",
            Side::Remote => "remote",
        })
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("{side}BlockIds[{index}] = {id} is out of range: the {side} cache has blockNumber {limit} (valid ids 0..{limit})")]
    BlockIdOutOfRange {
        side: Side,
        index: usize,
        id: u32,
        limit: u32,
    },
    #[error("{side}BlockIds[{index}] = {value} is not a valid block id: ids must be integers in 0..{limit}")]
    InvalidBlockId {
        side: Side,
        index: usize,
        value: f64,
        limit: u32,
    },
    #[error("localBlockIds has {local} entries but remoteBlockIds has {remote}: they must have the same length")]
    BlockCountMismatch { local: usize, remote: usize },
    #[error("layerIdx {layer} is out of range: the cache has {layers} layers (valid 0..{layers})")]
    LayerOutOfRange { layer: f64, layers: u32 },
    #[error("layout mismatch between {here} and {peer}: {what} is {local} on {here} but {remote} on {peer}")]
    LayoutMismatch {
        here: String,
        peer: String,
        what: &'static str,
        local: u64,
        remote: u64,
    },
    #[error("region size overflow: {what}")]
    RegionOverflow { what: String },
    #[error("invalid {name}: {reason}")]
    InvalidArgument { name: &'static str, reason: String },
    #[error("peer {peer} is not connected: call connect('{peer}') first")]
    NotConnected { peer: String },
    #[error("the communicator is closed")]
    Closed,
    #[error("protocol error from {peer}: {reason}")]
    Protocol { peer: String, reason: String },
    #[error("I/O error with {peer} during {during}: {source}")]
    Io {
        peer: String,
        during: &'static str,
        /// Shared so that one cause can fail several pending calls.
        #[source]
        source: std::sync::Arc<std::io::Error>,
    },
    #[error("peer {peer} disconnected: {reason}")]
    PeerDisconnected { peer: String, reason: String },
    #[error("RDMA is not available: {reason}")]
    RdmaUnavailable { reason: String },
    #[error("transport '{transport}' cannot be used: {reason}")]
    TransportUnavailable {
        transport: &'static str,
        reason: String,
    },
    #[error("RDMA {op} failed: {reason}")]
    Rdma { op: &'static str, reason: String },
    #[error("RDMA work completion with {peer} failed: {status} (status {status_code}, vendor error {vendor_err:#x}); the connection is marked broken")]
    RdmaCompletion {
        peer: String,
        status: String,
        status_code: u32,
        vendor_err: u32,
    },
    #[error("CUDA {op} failed: {reason}")]
    Cuda { op: &'static str, reason: String },
    #[error("timed out after {ms} ms: {what}")]
    Timeout { ms: u64, what: String },
    #[error("the operation was aborted")]
    Aborted,
    #[error("authentication with {peer} failed: {reason}")]
    Auth { peer: String, reason: String },
}

impl Error {
    /// Stable, documented error code (`err.code` in JavaScript).
    pub fn code(&self) -> &'static str {
        match self {
            Error::BlockIdOutOfRange { .. } => "ERR_BLOCK_ID_OUT_OF_RANGE",
            Error::InvalidBlockId { .. } => "ERR_INVALID_BLOCK_ID",
            Error::BlockCountMismatch { .. } => "ERR_BLOCK_COUNT_MISMATCH",
            Error::LayerOutOfRange { .. } => "ERR_LAYER_OUT_OF_RANGE",
            Error::LayoutMismatch { .. } => "ERR_LAYOUT_MISMATCH",
            Error::RegionOverflow { .. } => "ERR_REGION_OVERFLOW",
            Error::InvalidArgument { .. } => "ERR_INVALID_ARGUMENT",
            Error::NotConnected { .. } => "ERR_NOT_CONNECTED",
            Error::Closed => "ERR_CLOSED",
            Error::Protocol { .. } => "ERR_PROTOCOL",
            Error::Io { .. } => "ERR_IO",
            Error::PeerDisconnected { .. } => "ERR_PEER_DISCONNECTED",
            Error::RdmaUnavailable { .. } => "ERR_RDMA_UNAVAILABLE",
            Error::TransportUnavailable { .. } => "ERR_TRANSPORT_UNAVAILABLE",
            Error::Rdma { .. } => "ERR_RDMA",
            Error::RdmaCompletion { .. } => "ERR_RDMA_COMPLETION",
            Error::Cuda { .. } => "ERR_CUDA",
            Error::Timeout { .. } => "ERR_TIMEOUT",
            Error::Aborted => "ERR_ABORTED",
            Error::Auth { .. } => "ERR_AUTH",
        }
    }

    pub fn invalid(name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name,
            reason: reason.into(),
        }
    }

    pub fn protocol(peer: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Protocol {
            peer: peer.into(),
            reason: reason.into(),
        }
    }

    pub fn io(peer: impl Into<String>, during: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            peer: peer.into(),
            during,
            source: std::sync::Arc::new(source),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
