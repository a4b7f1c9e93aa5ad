//! The kinds of transport this build knows, by name and wire code. A leaf: settings
//! (`config.rs`), the wire and the transports all name kinds, and none of them is above
//! the others.

use crate::error::Error;

/// The transports this build knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// TCP sockets: works between any two hosts.
    Tcp,
    /// RDMA one-sided WRITEs (InfiniBand or RoCE) between hosts.
    Rdma,
    /// CUDA IPC copies between GPUs of one host (over NVLink where joined, else PCIe).
    Nvlink,
}

impl TransportKind {
    /// Every kind, in the engine's order of preference for `auto` (fastest first).
    pub const PREFERENCE: [TransportKind; 3] = [
        TransportKind::Nvlink,
        TransportKind::Rdma,
        TransportKind::Tcp,
    ];

    /// How sentences name it (`NVLink`, `RDMA`, `TCP`).
    pub fn label(self) -> &'static str {
        match self {
            TransportKind::Tcp => "TCP",
            TransportKind::Rdma => "RDMA",
            TransportKind::Nvlink => "NVLink",
        }
    }

    /// The name users write (`transport: 'rdma'`, `KVCACHE_TRANSPORT=rdma`).
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Rdma => "rdma",
            TransportKind::Nvlink => "nvlink",
        }
    }

    /// The kind's code in a descriptor's endpoint list (stable across versions).
    pub fn code(self) -> u8 {
        match self {
            TransportKind::Tcp => 1,
            TransportKind::Rdma => 2,
            TransportKind::Nvlink => 3,
        }
    }

    /// The kind with descriptor code `code`, or `None` for a code this build does not know.
    pub fn from_code(code: u8) -> Option<TransportKind> {
        Self::PREFERENCE
            .into_iter()
            .find(|kind| kind.code() == code)
    }

    /// The kind named `name` (lowercase, as [`name`](Self::name) gives), if any.
    pub fn parse(name: &str) -> Option<TransportKind> {
        Self::PREFERENCE
            .into_iter()
            .find(|kind| kind.name() == name)
    }

    /// The typed error for "this transport cannot be used", carrying the reason.
    pub fn unavailable(self, reason: String) -> Error {
        match self {
            TransportKind::Rdma => Error::RdmaUnavailable { reason },
            other => Error::TransportUnavailable {
                transport: other.name(),
                reason,
            },
        }
    }
}
