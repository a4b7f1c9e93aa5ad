//! RDMA transport: one-sided RDMA WRITE from registered local regions straight into the
//! peer's registered regions, over RC queue pairs.
//!
//! One progress thread per engine owns every queue pair's bookkeeping. It turns jobs into
//! chains of WRITE work requests (one `ibv_post_send` per chain: doorbell batching), signals
//! only the last request of each chain (selective signaling; the send queue is kept full
//! and completions are reaped as they arrive, never drained), spreads chains over the
//! peer's queue pairs, and checks every completion status. A failed completion fails the
//! call it belongs to with the status, and the connection is marked broken (its queue pairs
//! moved to the error state), so no later call can report a false success.
//!
//! After a call's data: with `KVCACHE_GDRCOPY_FLUSH_ENABLE`, an RDMA READ of the last
//! written remote bytes (the call completes after it); with a tag, a WRITE WITH IMMEDIATE
//! that puts the arrival notice into the peer's notice ring and raises a receive
//! completion there. The progress thread blocks on the completion channel when idle.

mod chain;
mod device;
mod doorbell;
mod endpoint;
mod gpu_mr;
pub(crate) mod inventory;
mod link;
mod notice;
mod progress;

pub use chain::{fill_write_chain, ChainCursor};
pub use endpoint::{QpEndpoint, RdmaEndpoint};
pub use notice::decode_notice;

use super::{
    copy_op, fail, AcceptingPeer, Arrival, ArrivalSink, ConnectTarget, Link, Transport,
    TransportKind, WriteJob,
};
use crate::config::RdmaSettings;
use crate::error::{Error, Result};
use crate::layout::RegionTable;
use chain::{break_link, finish_phase, post_link};
use doorbell::{Doorbell, PostingThreads};
use kvtransfer_verbs as verbs;
use link::RdmaLink;
use notice::encode_notice;
use progress::Worker;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use verbs::{
    Access, CompletionChannel, CompletionQueue, Context, Dest, LocalBuf, MemoryRegion,
    ProtectionDomain, QpCaps, QueuePair, RemoteBuf, RtrParams, RtsParams, SendBatch,
    SharedReceiveQueue, WorkCompletion,
};

/// Work requests per `ibv_post_send` chain; the last one of each chain is signaled.
pub const CHAIN_WRS: usize = 64;
/// Send-queue depth requested per queue pair.
const SEND_QUEUE_DEPTH: u32 = 1024;
/// Receives kept posted on the shared receive queue (arrival notices).
const NOTICE_RECEIVES: u32 = 256;
/// Notice slots per peer ring: at least NOTICE_RECEIVES, so an unconsumed slot is never
/// overwritten (a sender can be at most that many notices ahead: RNR flow control).
pub const NOTICE_SLOTS: u32 = NOTICE_RECEIVES;
/// Bytes per notice slot: layer u32, blocks u32, tag length u8, tag.
const NOTICE_SLOT_BYTES: usize = 512;
/// Notices a sender keeps in flight (bounded by its staging slots).
const NOTICE_STAGING_SLOTS: usize = 128;
/// Largest RDMA WRITE per work request: longer runs are split, so that one large run can be
/// spread over a peer's queue pairs (256 KiB WRITEs still run at line rate on a NIC).
pub const MAX_WRITE_BYTES: u64 = 256 << 10;
/// A chain ends once it carries this many bytes (or `CHAIN_WRS` requests), so that a call
/// of a few large runs still alternates between the peer's queue pairs.
pub const CHAIN_BYTES: u64 = 1 << 20;
/// Transport retries before a request fails with RETRY_EXC_ERR. Not 7: Soft-RoCE treats 7
/// as "retry forever", so a dead peer would never be detected. A dead peer is reported
/// after about 4.096 µs × 2^KVCACHE_IB_TIMEOUT × (1 + retries).
pub const TRANSPORT_RETRY_COUNT: u8 = 6;
/// Idle polls before blocking on the completion channel.
const IDLE_SPINS: u32 = 64;

/// Data-path tuning (chain length, send-queue depth, idle polls, posting threads): the
/// constants above unless `KVCACHE_RDMA_TUNING` overrides them (config.rs).
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub chain_wrs: usize,
    pub send_queue_depth: u32,
    pub idle_spins: u32,
    /// Posting threads (`None`: one per queue pair of a peer on software providers, none
    /// on NICs; see `doorbell.rs`).
    pub post_threads: Option<u32>,
}

pub fn tuning() -> Tuning {
    let t = crate::config::process().rdma_tuning;
    Tuning {
        chain_wrs: t.chain_wrs.unwrap_or(CHAIN_WRS),
        send_queue_depth: t.send_queue_depth.unwrap_or(SEND_QUEUE_DEPTH),
        idle_spins: t.idle_spins.unwrap_or(IDLE_SPINS),
        post_threads: t.post_threads,
    }
}

pub(super) fn rdma_err(op: &'static str, e: impl std::fmt::Display) -> Error {
    Error::Rdma {
        op,
        reason: e.to_string(),
    }
}

/// What the peer needs to reach one of our queue pairs.
fn endpoint_of(qp: &QueuePair, psn: u32) -> QpEndpoint {
    QpEndpoint {
        qp_num: qp.qp_num(),
        psn,
    }
}

/// A registered byte buffer owned by the engine (notice rings, staging, flush scratch).
struct OwnedRegion {
    mr: MemoryRegion,
    bytes: Box<[u8]>,
}

impl OwnedRegion {
    fn new(pd: &Arc<ProtectionDomain>, len: usize, access: Access) -> Result<OwnedRegion> {
        let mut bytes = vec![0u8; len].into_boxed_slice();
        // SAFETY: `bytes` is a heap allocation owned by the returned value and dropped
        // after `mr` (field order), so it stays mapped for the registration's lifetime.
        let mr = unsafe { MemoryRegion::register(pd, bytes.as_mut_ptr(), len, access) }
            .map_err(|e| rdma_err("ibv_reg_mr (engine buffer)", e))?;
        Ok(OwnedRegion { mr, bytes })
    }

    fn addr(&self) -> u64 {
        self.bytes.as_ptr() as u64
    }
}

/// The device side of one engine: context, PD, the regions registered once, the shared
/// completion queues and the progress thread.
pub(crate) struct RdmaDevice {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    context: Arc<Context>,
    pd: Arc<ProtectionDomain>,
    port: u8,
    gid_index: u8,
    gid: [u8; 16],
    lid: u16,
    mtu: u32,
    infiniband: bool,
    settings: RdmaSettings,
    table: Arc<RegionTable>,
    region_mrs: Vec<MemoryRegion>,
    send_cq: Arc<CompletionQueue>,
    recv_cq: Arc<CompletionQueue>,
    srq: Arc<SharedReceiveQueue>,
    channel: Arc<CompletionChannel>,
    commands: Mutex<VecDeque<Command>>,
    wake_fd: libc::c_int,
    next_link: AtomicU64,
    arrivals: Option<ArrivalSink>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: wake_fd is the eventfd created in `RdmaDevice::open`, closed only here.
        unsafe { libc::close(self.wake_fd) };
    }
}

enum Command {
    AddSender(Box<SenderLink>),
    AddReceiver(Box<ReceiverLink>),
    Submit(u64, WriteJob),
    /// Moves the link's queue pairs to the error state, destroys them and fails its jobs
    /// with the error (or `Closed`), then answers.
    RemoveSender(u64, Option<Error>, mpsc::Sender<()>),
    Shutdown,
}

impl Shared {
    /// Takes every queued command, oldest first.
    fn take_commands(&self) -> Vec<Command> {
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect()
    }

    fn send(&self, command: Command) {
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(command);
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.wake_fd, (&one as *const u64).cast(), 8) };
    }
}

/// Queue pairs created for a peer, before they are connected.
pub(crate) struct PendingQps {
    qps: Vec<(QueuePair, u32)>,
}

// ---------------------------------------------------------------------------------------
// Progress-thread state

struct QpState {
    /// Shared with a posting thread while one of its chains waits there.
    qp: Arc<QueuePair>,
    /// Work requests posted and not yet covered by a completion.
    outstanding: u32,
    /// Posted chains in order: (chain id = wr_id of all its requests, requests, job seq).
    chains: VecDeque<Chain>,
}

#[derive(Debug, Clone, Copy)]
struct Chain {
    id: u64,
    wrs: u32,
    job: u64,
    kind: ChainKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChainKind {
    Data,
    Flush,
    Notice { staging_slot: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Data,
    Flush,
    Notice,
}

struct ActiveJob {
    seq: u64,
    job: WriteJob,
    /// Next copy op to post: (kind, run index, byte offset inside the run).
    cursor: (u32, usize, u64),
    posted_all: bool,
    chains_outstanding: u32,
    phase: Phase,
    /// Remote (addr, rkey) and length of the last written range (flush target).
    last_write: (u64, u32, u64),
}

struct SenderLink {
    id: u64,
    peer: String,
    qps: Vec<QpState>,
    next_qp: usize,
    remote_regions: Vec<(u64, u32)>,
    notice_ring: (u64, u32, u32),
    next_notice: u64,
    notices_in_flight: usize,
    staging: OwnedRegion,
    scratch: OwnedRegion,
    jobs: VecDeque<ActiveJob>,
    next_job: u64,
    next_chain: u64,
    /// Jobs whose flush or notice request waits for send-queue room.
    control: VecDeque<u64>,
    alive: Arc<AtomicBool>,
    broken: Option<String>,
}

struct ReceiverLink {
    peer_name: String,
    instance: u64,
    qps: Vec<QueuePair>,
    ring: OwnedRegion,
}

/// One-sided RDMA WRITE over RC queue pairs (InfiniBand or RoCE): the device this engine
/// opened, and the queue pairs offered to peers whose handshake is still in flight.
pub(crate) struct RdmaTransport {
    device: RdmaDevice,
    /// Queue pairs created by `offer` for a peer, until `connect` or `forget` takes them.
    offered: Mutex<HashMap<String, PendingQps>>,
}

impl RdmaTransport {
    pub fn open(
        settings: RdmaSettings,
        gpu_idx: u32,
        table: Arc<RegionTable>,
        arrivals: Option<ArrivalSink>,
    ) -> Result<RdmaTransport> {
        Ok(RdmaTransport {
            device: RdmaDevice::open(settings, gpu_idx, table, arrivals)?,
            offered: Mutex::new(HashMap::new()),
        })
    }

    fn offered(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingQps>> {
        self.offered.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Transport for RdmaTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }

    fn offer(&self, peer_key: &str) -> Result<Vec<u8>> {
        let pending = self.device.create_qps()?;
        let endpoint = self.device.endpoint(&pending, (0, 0, 0)).encode();
        self.offered().insert(peer_key.to_string(), pending);
        Ok(endpoint)
    }

    fn check_peer(&self, theirs: &[u8]) -> std::result::Result<(), String> {
        let theirs = RdmaEndpoint::decode(theirs)
            .map_err(|e| format!("the peer's RDMA endpoint is malformed: {e}"))?;
        let layer = |infiniband| if infiniband { "InfiniBand" } else { "RoCE" };
        let ours = self.device.infiniband();
        if theirs.infiniband != ours {
            return Err(format!(
                "the peer's port is {} but this side's ({}) is {}",
                layer(theirs.infiniband),
                self.device.device_name(),
                layer(ours)
            ));
        }
        Ok(())
    }

    fn accept(&self, peer: AcceptingPeer<'_>, theirs: &[u8]) -> Result<Vec<u8>> {
        let theirs = RdmaEndpoint::decode(theirs).map_err(|e| Error::protocol(peer.name, e.0))?;
        let pending = self.device.create_qps()?;
        let ours = self
            .device
            .accept(peer.name, peer.instance_id, pending, &theirs)?;
        Ok(ours.encode())
    }

    fn connect(&self, target: ConnectTarget<'_>, theirs: &[u8]) -> Result<Box<dyn Link>> {
        let peer = target.peer_key;
        let pending = self.offered().remove(peer).ok_or_else(|| {
            Error::protocol(
                peer,
                "the reply chose RDMA but no queue pairs were offered to this peer",
            )
        })?;
        let theirs = RdmaEndpoint::decode(theirs).map_err(|e| Error::protocol(peer, e.0))?;
        Ok(Box::new(self.device.connect(peer, pending, &theirs)?))
    }

    fn forget(&self, peer_key: &str) {
        self.offered().remove(peer_key);
    }

    fn details(&self) -> Vec<(&'static str, String)> {
        self.device.details()
    }

    fn shutdown(&self) {
        self.offered().clear();
        self.device.shutdown();
    }
}
