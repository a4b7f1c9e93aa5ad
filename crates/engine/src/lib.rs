//! kvtransfer engine: moves KV-cache blocks from this process's registered regions into a
//! peer's pre-allocated blocks, over any of its transports (NVLink within a host, RDMA one-sided WRITE between
//! hosts, TCP anywhere).
//!
//! The control plane (who talks to whom) lives above this crate: it carries the opaque
//! messages produced by [`Engine::auth_challenge`], [`Engine::hello`] and
//! [`Engine::accept`] between the two sides.
//!
//! Floors: FFI crates (`kvtransfer-verbs`, `kvtransfer-cuda`) → this crate (layout,
//! planning, transports, wire, errors) → the Node binding. Modules are private; what users,
//! tests, benches and fuzz targets need is exported below on purpose.

#![warn(missing_docs)]

mod auth;
mod config;
mod doctor;
mod engine;
mod error;
mod gpu;
mod import;
mod layout;
pub mod log;
mod metrics;
mod plan;
mod shard;
mod sidecar;
mod transport;
mod transport_kind;
mod util;
mod wire;

pub use config::{RdmaSettings, VariableReport, DEFAULT_QPS_PER_PEER};
pub use doctor::{host_report, HostReport, TransportReport};
pub use engine::MAX_FENCE_HOLD;
pub use engine::{
    CallAbort, CallBlocks, CallPeer, Engine, EngineMetrics, EngineOptions, EngineStats, FenceScope,
    Integrity, PeerHandle, PeerInfo, PeerLeft, PeerLeftSink, PeerMetrics, PreparedBlocks,
    TransportDecision, WriteCall,
};
pub use error::{Error, Result, Side, ERROR_CODES};
pub use gpu::inventory::GpuInventory;
pub use gpu::{peer_copy_gbps, DeviceMemory};
pub use import::{parse_cuda_ipc_handle, ImportSource, ImportSpec, ImportedMemory, Importer};
pub use kvtransfer_cuda::DeviceReport as GpuReport;
pub use layout::{CacheLayout, MemoryKind};
pub use metrics::{bucket_upper_us, Snapshot as MetricsSnapshot, LATENCY_BUCKETS};
pub use plan::BlockIds;
pub use shard::{check_tp_size, BlockOrder, Cover, TpOptions, MAX_TP_SIZE};
pub use sidecar::{
    SidecarEvent, SidecarOptions, SidecarServer, MAX_FDS_PER_FRAME, MAX_FRAME_BYTES,
};
pub use transport::nvlink::NvlinkDetails;
pub use transport::rdma::inventory::{GidReport, RdmaDeviceReport, RdmaInventory, RdmaPortReport};
pub use transport::rdma::{RdmaDetails, RdmaRailDetails};
pub use transport::tcp::TcpDetails;
pub use transport::{
    Arrival, ArrivalSink, CallSink, ChecksumCheck, Completion, CompletionCallback, Explanation,
    OnDone, RailReport, Resources, TransportDetails, TransportKind, MAX_TAG_BYTES,
};
pub use util::lock;
pub use wire::{Role, MAX_NAME_BYTES, NAME_RULE};

/// Internals exported for this crate's own tests, benches and fuzz targets: codecs,
/// planning and chain building measured or fuzzed on their own. Not a stable API.
#[doc(hidden)]
pub mod internals {
    pub use crate::auth::{Challenge, Envelope, Response};
    pub use crate::layout::RegionTable;
    pub use crate::plan::{plan_runs, PlanLimits, Run};
    pub use crate::shard::{Geometry, Shard};
    pub use crate::transport::nvlink::{NvlinkEndpoint, NvlinkMemoryTable};
    pub use crate::transport::rdma::{
        decode_notice, fill_write_chain, lightest_rail, tuning, ChainCursor, ChainProgress,
        ChainTarget, MAX_WRITE_BYTES, TRANSPORT_RETRY_COUNT,
    };
    pub use crate::transport::rdma::{GidCandidate, QpEndpoint, RailEndpoint, RdmaEndpoint};
    pub use crate::transport::tcp::frame;
    pub use crate::transport::tcp::sockopt::check_not_reset;
    pub use crate::transport::tcp::staging::CHUNK_BYTES;
    pub use crate::transport::tcp::{FrameBatch, TcpEndpoint, MAX_FRAME_PAYLOAD};
    pub use crate::transport::JobView;
    pub use crate::util::scattered_ids;
    pub use crate::wire::{Declined, Descriptor, Endpoint, Landing, Notice};
}
