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
    #[error("tensor-parallel mismatch between {here} and {peer}: {reason}")]
    TensorParallel {
        here: String,
        peer: String,
        reason: String,
    },
    /// A bug: a panic inside kvtransfer, caught before it could take the process down.
    #[error("internal error in kvtransfer ({what}): this is a bug, not a usage error; please report it at https://github.com/kvtransfer/kvtransfer/issues with this message and a log taken with KVCACHE_DEBUG=1")]
    Internal { what: String },
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
            Error::TensorParallel { .. } => "ERR_TP_MISMATCH",
            Error::Internal { .. } => "ERR_INTERNAL",
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

/// Every code that [`Error::code`] returns, in declaration order: the one list that the
/// binding exports (`errorCodes()`) and the TypeScript `KvTransferErrorCode` is checked against.
pub const ERROR_CODES: &[&str] = &[
    "ERR_BLOCK_ID_OUT_OF_RANGE",
    "ERR_INVALID_BLOCK_ID",
    "ERR_BLOCK_COUNT_MISMATCH",
    "ERR_LAYER_OUT_OF_RANGE",
    "ERR_LAYOUT_MISMATCH",
    "ERR_REGION_OVERFLOW",
    "ERR_INVALID_ARGUMENT",
    "ERR_NOT_CONNECTED",
    "ERR_CLOSED",
    "ERR_PROTOCOL",
    "ERR_IO",
    "ERR_PEER_DISCONNECTED",
    "ERR_RDMA_UNAVAILABLE",
    "ERR_TRANSPORT_UNAVAILABLE",
    "ERR_RDMA",
    "ERR_RDMA_COMPLETION",
    "ERR_CUDA",
    "ERR_TIMEOUT",
    "ERR_ABORTED",
    "ERR_AUTH",
    "ERR_TP_MISMATCH",
    "ERR_INTERNAL",
];

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod error_codes_tests {
    use super::*;

    /// One value of every variant, in declaration order, built as a chain: each arm of the
    /// `match` names a variant and builds a value of the next one. The `match` has no
    /// wildcard arm, so a new variant of `Error` does not compile until it has an arm here;
    /// link it into the chain (the last variant's arm ends it) and add its code to
    /// `ERROR_CODES`, or the tests below fail.
    fn one_of_each() -> Vec<Error> {
        let text = String::new;
        let mut all = vec![Error::BlockIdOutOfRange {
            side: Side::Local,
            index: 0,
            id: 0,
            limit: 0,
        }];
        loop {
            let next = match all.last().expect("seeded") {
                Error::BlockIdOutOfRange { .. } => Error::InvalidBlockId {
                    side: Side::Remote,
                    index: 0,
                    value: 0.5,
                    limit: 0,
                },
                Error::InvalidBlockId { .. } => Error::BlockCountMismatch {
                    local: 1,
                    remote: 2,
                },
                Error::BlockCountMismatch { .. } => Error::LayerOutOfRange {
                    layer: 1.0,
                    layers: 1,
                },
                Error::LayerOutOfRange { .. } => Error::LayoutMismatch {
                    here: text(),
                    peer: text(),
                    what: "layer count",
                    local: 1,
                    remote: 2,
                },
                Error::LayoutMismatch { .. } => Error::RegionOverflow { what: text() },
                Error::RegionOverflow { .. } => Error::invalid("name", "reason"),
                Error::InvalidArgument { .. } => Error::NotConnected { peer: text() },
                Error::NotConnected { .. } => Error::Closed,
                Error::Closed => Error::protocol("peer", "reason"),
                Error::Protocol { .. } => Error::io("peer", "test", std::io::Error::other("test")),
                Error::Io { .. } => Error::PeerDisconnected {
                    peer: text(),
                    reason: text(),
                },
                Error::PeerDisconnected { .. } => Error::RdmaUnavailable { reason: text() },
                Error::RdmaUnavailable { .. } => Error::TransportUnavailable {
                    transport: "tcp",
                    reason: text(),
                },
                Error::TransportUnavailable { .. } => Error::Rdma {
                    op: "op",
                    reason: text(),
                },
                Error::Rdma { .. } => Error::RdmaCompletion {
                    peer: text(),
                    status: text(),
                    status_code: 0,
                    vendor_err: 0,
                },
                Error::RdmaCompletion { .. } => Error::Cuda {
                    op: "op",
                    reason: text(),
                },
                Error::Cuda { .. } => Error::Timeout {
                    ms: 0,
                    what: text(),
                },
                Error::Timeout { .. } => Error::Aborted,
                Error::Aborted => Error::Auth {
                    peer: text(),
                    reason: text(),
                },
                Error::Auth { .. } => Error::TensorParallel {
                    here: text(),
                    peer: text(),
                    reason: text(),
                },
                Error::TensorParallel { .. } => Error::Internal { what: text() },
                Error::Internal { .. } => break,
            };
            all.push(next);
        }
        all
    }

    #[test]
    fn every_variant_code_is_listed_and_nothing_else() {
        let codes: Vec<&str> = one_of_each().iter().map(Error::code).collect();
        for code in &codes {
            assert!(
                ERROR_CODES.contains(code),
                "{code} is missing from ERROR_CODES"
            );
        }
        for code in ERROR_CODES {
            assert!(
                codes.contains(code),
                "ERROR_CODES lists {code}, which no variant has"
            );
            assert!(code.starts_with("ERR_"), "{code} does not start with ERR_");
        }
        let mut unique = ERROR_CODES.to_vec();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            unique.len(),
            ERROR_CODES.len(),
            "ERROR_CODES has duplicates"
        );
        assert_eq!(
            codes, ERROR_CODES,
            "one code per variant, in declaration order"
        );
    }
}
