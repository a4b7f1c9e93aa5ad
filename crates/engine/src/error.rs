//! One error type for the whole engine. Every variant has a stable `code()` that the
//! binding exposes as `err.code`; messages name the offending value and the limit.

use std::fmt;

/// Which side of a transfer a block id belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// This process's cache (`localBlockIds`).
    Local,
    /// The peer's cache (`remoteBlockIds`).
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

/// Everything that can go wrong in the engine. Each variant maps to one stable code
/// ([`Error::code`]); its message (`Display`) names the offending value and the limit.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A block id is a valid integer but not below the cache's blockNumber
    /// (`ERR_BLOCK_ID_OUT_OF_RANGE`); nothing was written.
    #[error("{side}BlockIds[{index}] = {id} is out of range: the {side} cache has blockNumber {limit} (valid ids 0..{limit})")]
    BlockIdOutOfRange {
        /// Which id list holds the bad id.
        side: Side,
        /// Position of the bad id in that list.
        index: usize,
        /// The id given.
        id: u32,
        /// That side's blockNumber: valid ids are `0..limit`.
        limit: u32,
    },
    /// A block id is not an integer in `0..2^32` (negative, fractional, NaN, too large)
    /// (`ERR_INVALID_BLOCK_ID`); nothing was written.
    #[error("{side}BlockIds[{index}] = {value} is not a valid block id: ids must be integers in 0..{limit}")]
    InvalidBlockId {
        /// Which id list holds the bad value.
        side: Side,
        /// Position of the bad value in that list.
        index: usize,
        /// The value given, as a number.
        value: f64,
        /// That side's blockNumber: valid ids are `0..limit`.
        limit: u32,
    },
    /// The local and remote id lists differ in length (`ERR_BLOCK_COUNT_MISMATCH`); each
    /// local block is written to the remote block at the same position.
    #[error("localBlockIds has {local} entries but remoteBlockIds has {remote}: they must have the same length")]
    BlockCountMismatch {
        /// Length of `localBlockIds`.
        local: usize,
        /// Length of `remoteBlockIds`.
        remote: usize,
    },
    /// A layer index is not an integer below the cache's layer count
    /// (`ERR_LAYER_OUT_OF_RANGE`).
    #[error("layerIdx {layer} is out of range: the cache has {layers} layers (valid 0..{layers})")]
    LayerOutOfRange {
        /// The layer index given, as a number.
        layer: f64,
        /// The cache's layer count: valid indices are `0..layers`.
        layers: u32,
    },
    /// The two sides' caches cannot be paired: a layout property differs where it must
    /// match (`ERR_LAYOUT_MISMATCH`), found at connect time or when a prepared block list
    /// no longer fits the peer.
    #[error("layout mismatch between {here} and {peer}: {what} is {local} on {here} but {remote} on {peer}")]
    LayoutMismatch {
        /// Name of this side (the engine, or what was prepared).
        here: String,
        /// Name of the other side (the peer).
        peer: String,
        /// The property that differs (e.g. "layer count", "blockBytes").
        what: &'static str,
        /// Its value on this side (a count, a byte size, or 0/1 for a yes/no property).
        local: u64,
        /// Its value on the peer's side, in the same unit.
        remote: u64,
    },
    /// A region's size or end address does not fit in 64 bits (blockNumber × blockBytes too
    /// large, or address + length past the address space) (`ERR_REGION_OVERFLOW`).
    #[error("region size overflow: {what}")]
    RegionOverflow {
        /// Which computation overflowed, with its operands.
        what: String,
    },
    /// An argument is malformed or out of its allowed range (`ERR_INVALID_ARGUMENT`);
    /// build it with [`Error::invalid`].
    #[error("invalid {name}: {reason}")]
    InvalidArgument {
        /// The argument's name as the caller knows it.
        name: &'static str,
        /// What is wrong with it and what is allowed.
        reason: String,
    },
    /// A call names a peer this engine has no link to (`ERR_NOT_CONNECTED`): connect first.
    #[error("peer {peer} is not connected: call {} first", connect_call(.peer))]
    NotConnected {
        /// The peer key that was given.
        peer: String,
    },
    /// The engine (communicator) has been closed; no further calls are accepted and pending
    /// ones fail with this (`ERR_CLOSED`).
    #[error("the communicator is closed")]
    Closed,
    /// The peer sent something malformed or unexpected (a bad handshake message, frame or
    /// completion) (`ERR_PROTOCOL`); build it with [`Error::protocol`].
    #[error("protocol error from {peer}: {reason}")]
    Protocol {
        /// The peer that sent it (or "connecting peer" before it is known).
        peer: String,
        /// What was wrong with the message.
        reason: String,
    },
    /// A socket or other OS call failed (`ERR_IO`); build it with [`Error::io`].
    #[error("I/O error with {peer} during {during}: {source}")]
    Io {
        /// The peer (or the local address) the operation was for.
        peer: String,
        /// The step that failed (e.g. "data write", "resolve host").
        during: &'static str,
        /// Shared so that one cause can fail several pending calls.
        #[source]
        source: std::sync::Arc<std::io::Error>,
    },
    /// The link to a peer broke (the peer closed it, a transfer on it failed, or a timed-out
    /// call tore it down); its pending calls fail with this (`ERR_PEER_DISCONNECTED`).
    #[error("peer {peer} disconnected: {reason}")]
    PeerDisconnected {
        /// The peer whose link broke.
        peer: String,
        /// Why the link is gone and what to do (usually: connect again).
        reason: String,
    },
    /// The RDMA transport cannot be used on this host: libibverbs is missing, no device or
    /// no active port, or the configured NIC does not exist (`ERR_RDMA_UNAVAILABLE`).
    #[error("RDMA is not available: {reason}")]
    RdmaUnavailable {
        /// What is missing.
        reason: String,
    },
    /// The requested transport (or, for "auto", every candidate) cannot connect these two
    /// engines (`ERR_TRANSPORT_UNAVAILABLE`).
    #[error("transport '{transport}' cannot be used: {reason}")]
    TransportUnavailable {
        /// The transport's name ("nvlink", "rdma", "tcp", or "auto").
        transport: &'static str,
        /// Why it cannot be used.
        reason: String,
    },
    /// An ibverbs call failed (setting up a queue pair, registering memory, posting)
    /// (`ERR_RDMA`).
    #[error("RDMA {op} failed: {reason}")]
    Rdma {
        /// The verbs operation that failed (e.g. "ibv_reg_mr").
        op: &'static str,
        /// The error it returned, with context.
        reason: String,
    },
    /// A posted RDMA WRITE completed with an error status; the link is broken and its pending
    /// calls fail (`ERR_RDMA_COMPLETION`).
    #[error("RDMA work completion with {peer} failed: {status} (status {status_code}, vendor error {vendor_err:#x}); the connection is marked broken")]
    RdmaCompletion {
        /// The peer the failed request was writing to.
        peer: String,
        /// The work completion status as text (e.g. "remote access error").
        status: String,
        /// The raw `ibv_wc_status` value.
        status_code: u32,
        /// The NIC vendor's error syndrome for that completion.
        vendor_err: u32,
    },
    /// A CUDA driver call failed (`ERR_CUDA`).
    #[error("CUDA {op} failed: {reason}")]
    Cuda {
        /// The driver call that failed (e.g. "cuMemcpyDtoHAsync").
        op: &'static str,
        /// The driver's error name and numeric code.
        reason: String,
    },
    /// A call was not acknowledged within its timeout; its link was torn down first, so none
    /// of its bytes can land any more (`ERR_TIMEOUT`).
    #[error("timed out after {ms} ms: {what}")]
    Timeout {
        /// The timeout that expired, in milliseconds.
        ms: u64,
        /// Which call timed out and what was done about it.
        what: String,
    },
    /// The call was cancelled: its peer's link was torn down on request (`ERR_ABORTED`).
    #[error("the operation was aborted")]
    Aborted,
    /// The receiving side fenced the call's tag or this writer (`decode.fence`): the call
    /// was refused, or failed while pending with its connection torn down so that none of
    /// its bytes can land (`ERR_FENCED`).
    #[error("fenced by {peer}: {what}")]
    Fenced {
        /// The peer that fenced (its `host:port`).
        peer: String,
        /// What was fenced (the tag or every call) and what happened to this call.
        what: String,
    },
    /// The handshake's shared-secret check failed, on either side (`ERR_AUTH`).
    #[error("authentication with {peer} failed: {reason}")]
    Auth {
        /// The peer (or "connecting peer" before it is known).
        peer: String,
        /// Which check failed.
        reason: String,
    },
    /// The two sides' tensor-parallel settings cannot be paired (sizes, ranks or the shard
    /// geometry they imply) (`ERR_TP_MISMATCH`).
    #[error("tensor-parallel mismatch between {here} and {peer}: {reason}")]
    TensorParallel {
        /// Name of this engine.
        here: String,
        /// Name of the peer.
        peer: String,
        /// What does not match.
        reason: String,
    },
    /// The connection cannot give what the call asked for (a checksum or an acknowledged
    /// delivery over a transport or memory that does not offer it); nothing was sent
    /// (`ERR_UNSUPPORTED`).
    #[error("{what} is not available {reason}")]
    Unsupported {
        /// What was asked for (e.g. "checksum: 'crc32c'").
        what: &'static str,
        /// Where, and what would work.
        reason: String,
    },
    /// The bytes of a checksummed call in this side's memory do not have the checksum the
    /// writer computed: the arrival is an error (`ERR_CHECKSUM_MISMATCH`).
    #[error("checksum mismatch in layer {layer} from {peer}: the writer summed {expected:#010x}, this side's memory holds {actual:#010x}; the blocks must not be used")]
    ChecksumMismatch {
        /// The writer.
        peer: String,
        /// The layer written.
        layer: u32,
        /// The writer's CRC-32C.
        expected: u32,
        /// What the receiver summed.
        actual: u32,
    },
    /// The instance registry (etcd) cannot be reached and nothing seen earlier answers the
    /// question, e.g. a `connect` by name to an instance never seen (`ERR_REGISTRY_UNAVAILABLE`).
    /// Raised by the TypeScript layer, which owns the registry; listed here so that the one
    /// code list stays whole.
    #[error("registry {registry} is unavailable: {reason}")]
    RegistryUnavailable {
        /// The registry, as configured.
        registry: String,
        /// What failed.
        reason: String,
    },
    /// Another live instance already holds this name in the registry (`ERR_NAME_TAKEN`);
    /// raised at start by the TypeScript layer.
    #[error("name {name:?} is already taken in registry {registry}")]
    NameTaken {
        /// The name asked for.
        name: String,
        /// The registry, as configured.
        registry: String,
    },
    /// A bug: a panic inside kvtransfer, caught before it could take the process down.
    #[error("internal error in kvtransfer ({what}): this is a bug, not a usage error; please report it at https://github.com/kvtransfer/kvtransfer/issues with this message and a log taken with KVCACHE_DEBUG=1")]
    Internal {
        /// The panic's message, or where it happened.
        what: String,
    },
}

/// The JavaScript call that connects `peer` (a key `host:port`): `connect('host', port)`.
fn connect_call(peer: &str) -> String {
    match peer.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => format!("connect('{host}', {port})"),
        _ => format!("connect('{peer}', port)"),
    }
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
            Error::Fenced { .. } => "ERR_FENCED",
            Error::Auth { .. } => "ERR_AUTH",
            Error::TensorParallel { .. } => "ERR_TP_MISMATCH",
            Error::Unsupported { .. } => "ERR_UNSUPPORTED",
            Error::ChecksumMismatch { .. } => "ERR_CHECKSUM_MISMATCH",
            Error::RegistryUnavailable { .. } => "ERR_REGISTRY_UNAVAILABLE",
            Error::NameTaken { .. } => "ERR_NAME_TAKEN",
            Error::Internal { .. } => "ERR_INTERNAL",
        }
    }

    /// An [`Error::InvalidArgument`] for argument `name`.
    pub fn invalid(name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name,
            reason: reason.into(),
        }
    }

    /// An [`Error::Protocol`] from `peer`.
    pub fn protocol(peer: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Protocol {
            peer: peer.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Io`] with `peer` during step `during` (the cause is wrapped in an `Arc`).
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
    "ERR_FENCED",
    "ERR_AUTH",
    "ERR_TP_MISMATCH",
    "ERR_UNSUPPORTED",
    "ERR_CHECKSUM_MISMATCH",
    "ERR_REGISTRY_UNAVAILABLE",
    "ERR_NAME_TAKEN",
    "ERR_INTERNAL",
];

/// The engine's result type: [`Error`] unless another error type is named.
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
                Error::Aborted => Error::Fenced {
                    peer: text(),
                    what: text(),
                },
                Error::Fenced { .. } => Error::Auth {
                    peer: text(),
                    reason: text(),
                },
                Error::Auth { .. } => Error::TensorParallel {
                    here: text(),
                    peer: text(),
                    reason: text(),
                },
                Error::TensorParallel { .. } => Error::Unsupported {
                    what: "what",
                    reason: text(),
                },
                Error::Unsupported { .. } => Error::ChecksumMismatch {
                    peer: text(),
                    layer: 0,
                    expected: 0,
                    actual: 1,
                },
                Error::ChecksumMismatch { .. } => Error::RegistryUnavailable {
                    registry: text(),
                    reason: text(),
                },
                Error::RegistryUnavailable { .. } => Error::NameTaken {
                    name: text(),
                    registry: text(),
                },
                Error::NameTaken { .. } => Error::Internal { what: text() },
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

    /// The hint names a call that works: `connect(host, port)`, never the `host:port` key.
    #[test]
    fn not_connected_hint_is_a_working_call() {
        let hint = |peer: &str| {
            Error::NotConnected {
                peer: peer.to_owned(),
            }
            .to_string()
        };
        assert_eq!(
            hint("127.0.0.1:40609"),
            "peer 127.0.0.1:40609 is not connected: call connect('127.0.0.1', 40609) first"
        );
        assert_eq!(
            hint("::1:40609"),
            "peer ::1:40609 is not connected: call connect('::1', 40609) first"
        );
        assert_eq!(
            hint("nowhere"),
            "peer nowhere is not connected: call connect('nowhere', port) first"
        );
    }
}
