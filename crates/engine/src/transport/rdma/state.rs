//! The RDMA transport's state, shared by its parts: the device side of an engine (`Shared`,
//! its commands to the progress thread), per-peer sender and receiver links, queue pairs,
//! chains and jobs in flight, the tuning. A leaf that the device, link, progress and chain
//! modules import by name.

use super::endpoint::QpEndpoint;
use super::route::LocalGid;
use crate::config::RdmaSettings;
use crate::error::{Error, Result};
use crate::layout::RegionTable;
use crate::transport::{ArrivalSink, BreakHook, WriteJob};
use kvtransfer_verbs::{
    Access, CompletionChannel, CompletionQueue, Context, MemoryRegion, ProtectionDomain, QueuePair,
    SharedReceiveQueue,
};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

/// Work requests per `ibv_post_send` chain; the last one of each chain is signaled.
pub const CHAIN_WRS: usize = 64;
/// Send-queue depth requested per queue pair.
pub(super) const SEND_QUEUE_DEPTH: u32 = 1024;
/// Receives kept posted on the shared receive queue (arrival notices).
pub(super) const NOTICE_RECEIVES: u32 = 256;
/// Notice slots per peer ring: at least NOTICE_RECEIVES, so an unconsumed slot is never
/// overwritten (a sender can be at most that many notices ahead: RNR flow control).
pub const NOTICE_SLOTS: u32 = NOTICE_RECEIVES;
/// Bytes per notice slot: the encoded notice behind its length (`notice.rs`).
pub(super) const NOTICE_SLOT_BYTES: usize = 512;
// A slot holds an encoded notice behind its length, and the length of the landing's tail
// after it (`notice.rs`).
const _: () = assert!(crate::wire::MAX_NOTICE_BYTES + 4 <= NOTICE_SLOT_BYTES);
/// Slots one notice spans at most: its extension slots and its head (`notice.rs`).
pub const MAX_NOTICE_SLOTS: usize = 8;
/// Notice slots a sender keeps in flight (its staging slots; a checksummed notice may span
/// several, `notice.rs`).
pub(super) const NOTICE_STAGING_SLOTS: usize = 128;
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
pub(super) const IDLE_SPINS: u32 = 64;

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

/// The data-path tuning in effect: each `KVCACHE_RDMA_TUNING` key that is set, else its
/// default constant.
pub fn tuning() -> Tuning {
    let t = crate::config::process().rdma_tuning;
    Tuning {
        chain_wrs: t.chain_wrs.unwrap_or(CHAIN_WRS),
        send_queue_depth: t.send_queue_depth.unwrap_or(SEND_QUEUE_DEPTH),
        idle_spins: t.idle_spins.unwrap_or(IDLE_SPINS),
        post_threads: t.post_threads,
    }
}

/// Work requests a send batch holds: a data chain's, and a notice's slots whatever the
/// tuning.
pub(super) fn batch_capacity() -> usize {
    tuning().chain_wrs.max(MAX_NOTICE_SLOTS)
}

pub(super) fn rdma_err(op: &'static str, e: impl std::fmt::Display) -> Error {
    Error::Rdma {
        op,
        reason: e.to_string(),
    }
}

/// What the peer needs to reach one of our queue pairs.
pub(super) fn endpoint_of(qp: &QueuePair, psn: u32) -> QpEndpoint {
    QpEndpoint {
        qp_num: qp.qp_num(),
        psn,
    }
}

/// A registered byte buffer owned by the engine (notice rings, staging, flush scratch).
pub(super) struct OwnedRegion {
    pub(super) mr: MemoryRegion,
    pub(super) bytes: Box<[u8]>,
}

impl OwnedRegion {
    pub(super) fn new(
        pd: &Arc<ProtectionDomain>,
        len: usize,
        access: Access,
    ) -> Result<OwnedRegion> {
        let mut bytes = vec![0u8; len].into_boxed_slice();
        // SAFETY: `bytes` is a heap allocation owned by the returned value and dropped
        // after `mr` (field order), so it stays mapped for the registration's lifetime.
        let mr = unsafe { MemoryRegion::register(pd, bytes.as_mut_ptr(), len, access) }
            .map_err(|e| rdma_err("ibv_reg_mr (engine buffer)", e))?;
        Ok(OwnedRegion { mr, bytes })
    }

    pub(super) fn addr(&self) -> u64 {
        self.bytes.as_ptr() as u64
    }
}

/// The device side of one engine: its rails, the regions registered once per rail, the
/// progress thread.
pub(crate) struct RdmaDevice {
    pub(super) shared: Arc<Shared>,
    pub(super) thread: Mutex<Option<JoinHandle<()>>>,
}

/// One rail: an RDMA device port with its protection domain, the regions registered under
/// it, its completion queues and its shared receive queue (arrival notices).
pub(super) struct Rail {
    pub(super) context: Arc<Context>,
    pub(super) pd: Arc<ProtectionDomain>,
    pub(super) port: u8,
    pub(super) lid: u16,
    pub(super) mtu: u32,
    pub(super) infiniband: bool,
    /// The port's active speed (Mb/s): the weight of this rail's share of a call's bytes.
    pub(super) speed_mbps: u32,
    /// The GIDs this rail may use, most preferred first (`route.rs`).
    pub(super) gids: Vec<LocalGid>,
    /// Whether KVCACHE_RDMA_GID_INDEX forced the GID.
    pub(super) forced_gid: bool,
    /// Why the first GID is preferred (for the doctor and the decision log).
    pub(super) gid_reason: String,
    pub(super) region_mrs: Vec<MemoryRegion>,
    pub(super) send_cq: Arc<CompletionQueue>,
    pub(super) recv_cq: Arc<CompletionQueue>,
    pub(super) srq: Arc<SharedReceiveQueue>,
    pub(super) channel: Arc<CompletionChannel>,
    /// Its completion queues and regions, counted (dropped last: field order).
    pub(super) _tally: super::tally::Tally,
}

impl Rail {
    pub(super) fn name(&self) -> &str {
        self.context.name()
    }
}

pub(super) struct Shared {
    pub(super) rails: Vec<Rail>,
    pub(super) settings: RdmaSettings,
    pub(super) table: Arc<RegionTable>,
    pub(super) commands: Mutex<VecDeque<Command>>,
    pub(super) wake_fd: libc::c_int,
    pub(super) next_link: AtomicU64,
    pub(super) arrivals: Option<ArrivalSink>,
    /// The NIC resources held now (`tally.rs`).
    pub(super) live: Arc<super::tally::Live>,
    /// Why these devices (`rail.rs::choose_ports`).
    pub(super) nic_reason: String,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: wake_fd is the eventfd created in `RdmaDevice::open`, closed only here.
        unsafe { libc::close(self.wake_fd) };
    }
}

pub(super) enum Command {
    AddSender(Box<SenderLink>),
    AddReceiver(Box<ReceiverLink>),
    Submit(u64, WriteJob),
    /// Moves the link's queue pairs to the error state, destroys them and fails its jobs
    /// with the error (or `Closed`), then answers.
    RemoveSender(u64, Option<Error>, mpsc::Sender<()>),
    /// Receiving side, for a fence: moves the queue pairs of every receiver link of the
    /// named writer to the error state and destroys them, then answers how many links.
    Isolate(String, mpsc::Sender<usize>),
    Shutdown,
}

impl Shared {
    /// Takes every queued command, oldest first.
    pub(super) fn take_commands(&self) -> Vec<Command> {
        crate::util::lock(&self.commands).drain(..).collect()
    }

    pub(super) fn send(&self, command: Command) {
        crate::util::lock(&self.commands).push_back(command);
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.wake_fd, (&one as *const u64).cast(), 8) };
    }
}

/// Queue pairs created for a peer, before they are connected: per local rail (indexed as
/// `Shared::rails`), each with its initial PSN.
pub(crate) struct PendingQps {
    pub(super) rails: Vec<Vec<(QueuePair, u32)>>,
    /// Its queue pairs, counted until the connect keeps them or gives up.
    pub(super) _tally: super::tally::Tally,
}

// ---------------------------------------------------------------------------------------
// Progress-thread state

pub(super) struct QpState {
    /// Shared with a posting thread while one of its chains waits there.
    pub(super) qp: Arc<QueuePair>,
    /// Work requests posted and not yet covered by a completion.
    pub(super) outstanding: u32,
    /// Posted chains in order: (chain id = wr_id of all its requests, requests, job seq).
    pub(super) chains: VecDeque<Chain>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Chain {
    pub(super) id: u64,
    pub(super) wrs: u32,
    /// Bytes its requests carry (counted on the rail when it completes).
    pub(super) bytes: u64,
    pub(super) job: u64,
    pub(super) kind: ChainKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChainKind {
    Data,
    Flush,
    /// A notice's WRITEs WITH IMMEDIATE: its extension slots and its head.
    Notice {
        slots: usize,
    },
    /// The READ that tries a quarantined rail's next queue pairs before it rejoins.
    Probe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Data,
    Flush,
    Notice,
}

/// Where the next WRITE of a call starts: (kind, run index, byte offset inside the run).
pub type ChainCursor = (u32, usize, u64);

/// How far a job's WRITEs have been posted: where the next one starts, and the last remote
/// range written (address, rkey, length: what the flush READ reads back).
#[derive(Debug, Clone, Copy, Default)]
pub struct ChainProgress {
    /// Where the next WRITE starts.
    pub cursor: ChainCursor,
    /// The last remote range written: (address, rkey, length in bytes).
    pub last_write: (u64, u32, u64),
    /// Bytes of WRITEs filled so far.
    pub bytes: u64,
}

pub(super) struct ActiveJob {
    pub(super) seq: u64,
    pub(super) job: WriteJob,
    /// How far its WRITEs have been posted.
    pub(super) progress: ChainProgress,
    pub(super) posted_all: bool,
    pub(super) chains_outstanding: u32,
    pub(super) phase: Phase,
    /// An acked call (`JobPlan::acked`): whether the receiver's answer came (it may come
    /// before the notice's own completion is polled).
    pub(super) answered: bool,
}

/// A rail's health as the writer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum RailState {
    Healthy = 0,
    Quarantined = 1,
    Failed = 2,
}

impl RailState {
    pub(crate) fn name(self) -> &'static str {
        match self {
            RailState::Healthy => "healthy",
            RailState::Quarantined => "quarantined",
            RailState::Failed => "failed",
        }
    }

    fn from_u8(v: u8) -> RailState {
        match v {
            0 => RailState::Healthy,
            1 => RailState::Quarantined,
            _ => RailState::Failed,
        }
    }
}

/// One rail pair's counters, shared by the progress thread (writes) and the link handle
/// (reports).
#[derive(Debug, Default)]
pub(crate) struct RailCounters {
    pub(crate) bytes: AtomicU64,
    pub(crate) wrs: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) quarantines: AtomicU64,
    pub(crate) rejoins: AtomicU64,
    /// Answers to acked calls that came in on this rail and completed a call.
    pub(crate) answers: AtomicU64,
    /// Answers that came in on this rail and named no call waiting for one (ignored).
    pub(crate) stray_answers: AtomicU64,
    state: AtomicU8,
    reason: Mutex<Option<String>>,
}

impl RailCounters {
    pub(crate) fn state(&self) -> RailState {
        RailState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub(crate) fn set_state(&self, state: RailState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// Why the rail is out of service (None while healthy).
    pub(crate) fn reason(&self) -> Option<String> {
        crate::util::lock(&self.reason).clone()
    }

    pub(crate) fn set_reason(&self, reason: Option<String>) {
        *crate::util::lock(&self.reason) = reason;
    }
}

/// What a link reports of one of its rails (fixed at connect, plus the counters).
#[derive(Debug, Clone)]
pub(crate) struct RailInfo {
    pub(crate) local: String,
    pub(crate) port: u8,
    pub(crate) remote: String,
    pub(crate) gid: String,
    pub(crate) gid_index: u8,
    pub(crate) gid_reason: String,
    pub(crate) peer_gid: String,
    pub(crate) speed_mbps: u32,
    pub(crate) counters: Arc<RailCounters>,
}

/// One rail pair of a sending link: its queue pairs and the peer's keys under its device.
pub(super) struct SendRail {
    /// Index into `Shared::rails`.
    pub(super) local: usize,
    pub(super) qps: Vec<QpState>,
    pub(super) next_qp: usize,
    pub(super) remote_regions: Vec<(u64, u32)>,
    pub(super) notice_ring: (u64, u32, u32),
    /// Share weight (the slower port's speed of the pair).
    pub(super) weight: u64,
    /// Bytes posted on this rail (the split keeps posted / weight level across rails).
    pub(super) posted: u64,
    pub(super) staging_mr: MemoryRegion,
    pub(super) scratch_mr: MemoryRegion,
    pub(super) counters: Arc<RailCounters>,
    /// Queue pairs connected at the handshake and not used yet: a quarantined rail rejoins
    /// on the next set (its failed ones are in the error state for good).
    pub(super) spares: VecDeque<Vec<QpState>>,
    /// While quarantined: when the next probe may run, and the cooldown after that.
    pub(super) retry_at: std::time::Instant,
    pub(super) cooldown: std::time::Duration,
}

pub(super) struct SenderLink {
    pub(super) id: u64,
    pub(super) peer: String,
    /// Dropped before the buffers below (field order): its MRs register them.
    pub(super) rails: Vec<SendRail>,
    pub(super) next_notice: u64,
    pub(super) notices_in_flight: usize,
    /// Acked calls whose notice was posted and whose answer has not come: the notice's
    /// immediate (what the answer carries back) → the job's seq (`notice.rs`).
    pub(super) awaiting: std::collections::HashMap<u32, u64>,
    pub(super) staging: Box<[u8]>,
    pub(super) scratch: Box<[u8]>,
    pub(super) jobs: VecDeque<ActiveJob>,
    pub(super) next_job: u64,
    pub(super) next_chain: u64,
    /// Jobs whose flush or notice request waits for send-queue room.
    pub(super) control: VecDeque<u64>,
    pub(super) alive: Arc<AtomicBool>,
    pub(super) broken: Option<String>,
    /// Told when the link breaks on its own (a failed request), not when it is removed.
    pub(super) on_break: BreakHook,
    /// Its queue pairs and buffers, counted (dropped after them: field order).
    pub(super) _tally: super::tally::Tally,
}

impl SenderLink {
    /// The rail that carries flush reads and notices: the first healthy one.
    pub(super) fn control_rail(&self) -> usize {
        self.rails
            .iter()
            .position(|r| r.counters.state() == RailState::Healthy)
            .unwrap_or(0)
    }
}

pub(super) struct ReceiverLink {
    pub(super) peer_name: String,
    pub(super) instance: u64,
    /// (local rail index, queue pair).
    pub(super) qps: Vec<(usize, QueuePair)>,
    /// Answers posted on each of `qps` (by index) and not yet completed.
    pub(super) answering: Vec<u32>,
    /// Answers waiting for send-queue room: (index into `qps`, immediate).
    pub(super) unsent: VecDeque<(usize, u32)>,
    /// Per queue pair (by index into `qps`): the landing bytes of the extension slots that
    /// came in since its last notice head (`verify.rs`).
    pub(super) assembly: Vec<Vec<u8>>,
    /// The ring registered under the other rails' devices (only held: dropped before
    /// `ring`, whose bytes they register).
    pub(super) _ring_mrs: Vec<MemoryRegion>,
    pub(super) ring: OwnedRegion,
    /// Its queue pairs and ring registrations, counted (dropped after them: field order).
    pub(super) _tally: super::tally::Tally,
}

/// Registers `len` bytes at `ptr` (a buffer the caller owns) under `pd`.
///
/// # Safety
/// The buffer stays allocated until the returned region is dropped.
pub(super) unsafe fn register_buffer(
    pd: &Arc<ProtectionDomain>,
    ptr: *mut u8,
    len: usize,
    access: Access,
) -> Result<MemoryRegion> {
    // SAFETY: forwarded from this function's contract.
    unsafe { MemoryRegion::register(pd, ptr, len, access) }
        .map_err(|e| rdma_err("ibv_reg_mr (engine buffer)", e))
}
