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

use super::doorbell::{Doorbell, PostingThreads};
use super::{copy_op, fail, Arrival, ArrivalSink, Link, WriteJob};
use crate::config::RdmaSettings;
use crate::error::{Error, Result};
use crate::layout::RegionTable;
use crate::wire::{QpEndpoint, RdmaEndpoint};
use kvtransfer_verbs as verbs;
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

/// Data-path tuning (chain length, send-queue depth, idle polls, posting threads). The
/// defaults are the constants above; `KVCACHE_RDMA_TUNING="chain=N,sq=N,spins=N,posters=N"`
/// overrides them for side-by-side measurements (`kvtransfer bench`,
/// docs/performance.md). Read once.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub chain_wrs: usize,
    pub send_queue_depth: u32,
    pub idle_spins: u32,
    /// Posting threads (`None`: one per queue pair of a peer on software providers, none
    /// on NICs; see `doorbell.rs`).
    pub post_threads: Option<u32>,
}

#[doc(hidden)]
pub fn tuning() -> Tuning {
    static TUNING: std::sync::OnceLock<Tuning> = std::sync::OnceLock::new();
    *TUNING.get_or_init(|| {
        let mut t = Tuning {
            chain_wrs: CHAIN_WRS,
            send_queue_depth: SEND_QUEUE_DEPTH,
            idle_spins: IDLE_SPINS,
            post_threads: None,
        };
        let text = std::env::var("KVCACHE_RDMA_TUNING").unwrap_or_default();
        for item in text.split(',').filter(|s| !s.trim().is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            let Ok(value) = value.trim().parse::<u32>() else {
                continue;
            };
            match key.trim() {
                "chain" => t.chain_wrs = value.clamp(1, 4096) as usize,
                "sq" => t.send_queue_depth = value.clamp(16, 1 << 16),
                "spins" => t.idle_spins = value,
                "posters" => t.post_threads = Some(value.min(64)),
                _ => {}
            }
        }
        t
    })
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
pub struct RdmaDevice {
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
pub struct PendingQps {
    qps: Vec<(QueuePair, u32)>,
}

impl RdmaDevice {
    /// Opens the NIC chosen by `KVCACHE_RDMA_NICS` (entry `gpu_idx % len`) or, when unset,
    /// the first device with an active port; selects the GID; registers every region.
    pub fn open(
        settings: RdmaSettings,
        gpu_idx: u32,
        table: Arc<RegionTable>,
        arrivals: Option<ArrivalSink>,
    ) -> Result<RdmaDevice> {
        let library = verbs::Library::load().map_err(|e| Error::RdmaUnavailable {
            reason: e.to_string(),
        })?;
        let devices = verbs::list_devices(&library).map_err(|e| Error::RdmaUnavailable {
            reason: e.to_string(),
        })?;
        let names: Vec<String> = devices.iter().map(|d| d.name.clone()).collect();
        if names.is_empty() {
            return Err(Error::RdmaUnavailable {
                reason: "no RDMA device found (libibverbs lists none)".into(),
            });
        }
        let (context, port) = if settings.nics.is_empty() {
            let mut found = None;
            for name in &names {
                let Ok(context) = Context::open(&library, name) else {
                    continue;
                };
                if let Some(port) = first_active_port(&context) {
                    found = Some((context, port));
                    break;
                }
            }
            found.ok_or_else(|| Error::RdmaUnavailable {
                reason: format!(
                    "no device has an active port (devices: {})",
                    names.join(", ")
                ),
            })?
        } else {
            let name = &settings.nics[gpu_idx as usize % settings.nics.len()];
            if !names.contains(name) {
                return Err(Error::RdmaUnavailable {
                    reason: format!(
                        "KVCACHE_RDMA_NICS selects '{name}' for gpuIdx {gpu_idx}, but the devices are: {}",
                        names.join(", ")
                    ),
                });
            }
            let context = Context::open(&library, name).map_err(|e| Error::RdmaUnavailable {
                reason: e.to_string(),
            })?;
            let port = first_active_port(&context).ok_or_else(|| Error::RdmaUnavailable {
                reason: format!("device '{name}' has no active port"),
            })?;
            (context, port)
        };
        let port_info = context
            .query_port(port)
            .map_err(|e| rdma_err("ibv_query_port", e))?;
        let infiniband = port_info.link_layer_is_infiniband;
        let (gid_index, gid) = select_gid(&context, port, infiniband, settings.gid_index)?;
        let pd = ProtectionDomain::new(&context).map_err(|e| rdma_err("ibv_alloc_pd", e))?;
        let mut access = Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ;
        if settings.relaxed_ordering {
            access |= Access::RELAXED_ORDERING;
        }
        // Host regions: ibv_reg_mr; GPU regions: dma-buf, else nvidia-peermem (gpu_mr.rs).
        let region_mrs = super::gpu_mr::register_regions(&pd, &table, access)?;
        let attrs = *context.attrs();
        let channel =
            CompletionChannel::new(&context).map_err(|e| rdma_err("ibv_create_comp_channel", e))?;
        let cq_size = attrs.max_cqe.clamp(256, 16 * 1024);
        let send_cq = CompletionQueue::new(&context, cq_size, Some(&channel))
            .map_err(|e| rdma_err("ibv_create_cq", e))?;
        let recv_cq = CompletionQueue::new(&context, NOTICE_RECEIVES * 2, Some(&channel))
            .map_err(|e| rdma_err("ibv_create_cq", e))?;
        let srq = SharedReceiveQueue::new(&pd, NOTICE_RECEIVES.min(attrs.max_srq_wr.max(1)))
            .map_err(|e| rdma_err("ibv_create_srq", e))?;
        for i in 0..srq.max_wr().min(NOTICE_RECEIVES) {
            srq.post_recv(u64::from(i))
                .map_err(|e| rdma_err("ibv_post_srq_recv", e))?;
        }
        // SAFETY: plain eventfd creation; the fd is owned by `Shared` and closed on drop.
        let wake_fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if wake_fd < 0 {
            return Err(rdma_err("eventfd", std::io::Error::last_os_error()));
        }
        crate::debug!(
            "rdma: device {} port {port} ({}), GID index {gid_index}, MTU code {}, {} regions registered{}",
            context.name(),
            if infiniband { "InfiniBand" } else { "RoCE" },
            port_info.active_mtu,
            region_mrs.len(),
            if settings.relaxed_ordering { " with relaxed ordering" } else { "" }
        );
        let shared = Arc::new(Shared {
            context,
            pd,
            port,
            gid_index,
            gid,
            lid: port_info.lid,
            mtu: port_info.active_mtu,
            infiniband,
            settings,
            table,
            region_mrs,
            send_cq,
            recv_cq,
            srq,
            channel,
            commands: Mutex::new(VecDeque::new()),
            wake_fd,
            next_link: AtomicU64::new(1),
            arrivals,
        });
        let qps_per_peer = u32::from(shared.settings.qps_per_peer.max(1));
        let post_threads =
            tuning()
                .post_threads
                .unwrap_or(if attrs.is_software_provider() && qps_per_peer > 1 {
                    qps_per_peer
                } else {
                    0
                });
        let doorbell = if post_threads == 0 {
            Doorbell::Inline
        } else {
            crate::debug!("rdma: {post_threads} posting threads (software provider)");
            Doorbell::Threads(PostingThreads::start(
                post_threads as usize,
                tuning().chain_wrs,
                shared.wake_fd,
            )?)
        };
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("kvt-rdma-progress".into())
                .spawn(move || Worker::new(shared, doorbell).run())
                .map_err(|e| rdma_err("thread spawn", e))?
        };
        Ok(RdmaDevice {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn device_name(&self) -> &str {
        self.shared.context.name()
    }

    pub fn gid_index(&self) -> u8 {
        self.shared.gid_index
    }

    /// Creates `qps_per_peer` RC queue pairs for a new peer (state INIT pending).
    pub fn create_qps(&self) -> Result<PendingQps> {
        let shared = &self.shared;
        let attrs = shared.context.attrs();
        let caps = QpCaps {
            max_send_wr: tuning().send_queue_depth.min(attrs.max_qp_wr),
            max_recv_wr: 0,
            max_send_sge: 1,
            max_inline: 0,
        };
        let mut qps = Vec::new();
        for _ in 0..shared.settings.qps_per_peer.max(1) {
            let qp = QueuePair::new_rc(
                &shared.pd,
                &shared.send_cq,
                &shared.recv_cq,
                Some(&shared.srq),
                caps,
            )
            .map_err(|e| rdma_err("ibv_create_qp", e))?;
            qp.to_init(
                shared.port,
                Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ,
            )
            .map_err(|e| rdma_err("ibv_modify_qp(INIT)", e))?;
            qps.push((qp, (crate::random_u64() as u32) & 0x00ff_ffff));
        }
        Ok(PendingQps { qps })
    }

    /// This side's endpoint for a descriptor (`notice_ring` zero unless accepting).
    pub fn endpoint(&self, pending: &PendingQps, notice_ring: (u64, u32, u32)) -> RdmaEndpoint {
        let shared = &self.shared;
        RdmaEndpoint {
            lid: shared.lid,
            gid: shared.gid,
            mtu: shared.mtu as u8,
            infiniband: shared.infiniband,
            qps: pending
                .qps
                .iter()
                .map(|(qp, psn)| endpoint_of(qp, *psn))
                .collect(),
            regions: shared
                .region_mrs
                .iter()
                .map(|mr| (mr.addr(), mr.rkey()))
                .collect(),
            notice_ring,
        }
    }

    fn connect_qps(&self, peer: &str, pending: &PendingQps, remote: &RdmaEndpoint) -> Result<()> {
        let shared = &self.shared;
        if remote.qps.len() != pending.qps.len() {
            return Err(Error::protocol(
                peer,
                format!("the peer has {} queue pairs per connection but this side {} (KVCACHE_RDMA_QPS_PER_PEER must match)", remote.qps.len(), pending.qps.len()),
            ));
        }
        if remote.infiniband != shared.infiniband {
            return Err(Error::protocol(
                peer,
                "one side is InfiniBand and the other RoCE",
            ));
        }
        let attrs = shared.context.attrs();
        let rd_atomic = attrs.max_qp_rd_atom.clamp(1, 16) as u8;
        let init_rd_atomic = attrs.max_qp_init_rd_atom.clamp(1, 16) as u8;
        for ((qp, psn), theirs) in pending.qps.iter().zip(&remote.qps) {
            let dest = if shared.infiniband {
                Dest::Lid(remote.lid)
            } else {
                Dest::Gid {
                    gid: remote.gid,
                    sgid_index: shared.gid_index,
                }
            };
            qp.to_rtr(&RtrParams {
                remote_qpn: theirs.qp_num,
                remote_psn: theirs.psn,
                path_mtu: shared.mtu.min(u32::from(remote.mtu)),
                dest,
                port: shared.port,
                min_rnr_timer: 12,
                max_dest_rd_atomic: rd_atomic,
            })
            .map_err(|e| rdma_err("ibv_modify_qp(RTR)", e))?;
            qp.to_rts(&RtsParams {
                psn: *psn,
                timeout: shared.settings.ib_timeout,
                retry_cnt: TRANSPORT_RETRY_COUNT,
                rnr_retry: 7,
                max_rd_atomic: init_rd_atomic,
            })
            .map_err(|e| rdma_err("ibv_modify_qp(RTS)", e))?;
        }
        Ok(())
    }

    /// Accepting side: connects `pending` to the peer and keeps its queue pairs (and a
    /// fresh notice ring) until the peer reconnects or the engine closes. Returns the
    /// endpoint to send back.
    pub fn accept(
        &self,
        peer_name: &str,
        peer_instance: u64,
        pending: PendingQps,
        remote: &RdmaEndpoint,
    ) -> Result<RdmaEndpoint> {
        self.connect_qps(peer_name, &pending, remote)?;
        let ring = OwnedRegion::new(
            &self.shared.pd,
            NOTICE_SLOTS as usize * NOTICE_SLOT_BYTES,
            Access::LOCAL_WRITE | Access::REMOTE_WRITE,
        )?;
        let endpoint = self.endpoint(&pending, (ring.addr(), ring.mr.rkey(), NOTICE_SLOTS));
        self.shared
            .send(Command::AddReceiver(Box::new(ReceiverLink {
                peer_name: peer_name.to_string(),
                instance: peer_instance,
                qps: pending.qps.into_iter().map(|(qp, _)| qp).collect(),
                ring,
            })));
        Ok(endpoint)
    }

    /// Connecting side: connects `pending` and returns the link writes go through.
    pub fn connect(
        &self,
        peer: &str,
        pending: PendingQps,
        remote: &RdmaEndpoint,
    ) -> Result<RdmaLink> {
        self.connect_qps(peer, &pending, remote)?;
        if remote.regions.len() != self.shared.table.regions().len() {
            return Err(Error::protocol(
                peer,
                "the peer announces a different number of regions",
            ));
        }
        let pd = &self.shared.pd;
        let staging = OwnedRegion::new(
            pd,
            NOTICE_STAGING_SLOTS * NOTICE_SLOT_BYTES,
            Access::LOCAL_WRITE,
        )?;
        let scratch = OwnedRegion::new(pd, 64, Access::LOCAL_WRITE)?;
        let id = self.shared.next_link.fetch_add(1, Ordering::Relaxed);
        let alive = Arc::new(AtomicBool::new(true));
        let qps = pending
            .qps
            .into_iter()
            .map(|(qp, _)| QpState {
                qp: Arc::new(qp),
                outstanding: 0,
                chains: VecDeque::new(),
            })
            .collect();
        self.shared.send(Command::AddSender(Box::new(SenderLink {
            id,
            peer: peer.to_string(),
            qps,
            next_qp: 0,
            remote_regions: remote.regions.clone(),
            notice_ring: remote.notice_ring,
            next_notice: 0,
            notices_in_flight: 0,
            staging,
            scratch,
            jobs: VecDeque::new(),
            next_job: 1,
            next_chain: 1,
            control: VecDeque::new(),
            alive: alive.clone(),
            broken: None,
        })));
        Ok(RdmaLink {
            id,
            peer: peer.to_string(),
            shared: self.shared.clone(),
            alive,
            removed: Mutex::new(false),
        })
    }

    /// Stops the progress thread; afterwards no queue pair of this engine exists.
    pub fn shutdown(&self) {
        self.shared.send(Command::Shutdown);
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RdmaDevice {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn first_active_port(context: &Context) -> Option<u8> {
    (1..=context.attrs().phys_port_cnt)
        .find(|&port| context.query_port(port).is_ok_and(|p| p.state_active))
}

/// GID choice: an explicit `KVCACHE_RDMA_GID_INDEX` must be usable (present, non-zero and,
/// on RoCE, a RoCE v2 GID); otherwise the default index 3 is used when it is a RoCE v2
/// IPv4-mapped GID, else the port's RoCE v2 IPv4 GID is selected and logged.
fn select_gid(
    context: &Context,
    port: u8,
    infiniband: bool,
    explicit: Option<u8>,
) -> Result<(u8, [u8; 16])> {
    let usable_v2_ipv4 = |index: u8| -> Option<[u8; 16]> {
        let gid = context.query_gid(port, index).ok()?;
        let v2 = infiniband || context.gid_type(port, index) == Some(verbs::GidType::RoceV2);
        (v2 && gid != [0; 16] && (infiniband || verbs::gid_ipv4(&gid).is_some())).then_some(gid)
    };
    if let Some(index) = explicit {
        return usable_v2_ipv4(index)
            .map(|gid| (index, gid))
            .ok_or_else(|| {
                let found = if infiniband {
                    Ok(None)
                } else {
                    context.find_roce_v2_ipv4_gid(port)
                };
                Error::RdmaUnavailable {
                    reason: format!(
                        "KVCACHE_RDMA_GID_INDEX={index} is not a usable {} GID on {} port {port}{}",
                        if infiniband { "" } else { "RoCE v2 IPv4" },
                        context.name(),
                        match found {
                            Ok(Some(good)) => format!(
                                " (index {good} is; set KVCACHE_RDMA_GID_INDEX={good} or unset it)"
                            ),
                            _ => String::new(),
                        }
                    ),
                }
            });
    }
    if let Some(gid) = usable_v2_ipv4(crate::config::DEFAULT_GID_INDEX) {
        return Ok((crate::config::DEFAULT_GID_INDEX, gid));
    }
    if infiniband {
        let gid = context
            .query_gid(port, 0)
            .map_err(|e| rdma_err("ibv_query_gid", e))?;
        return Ok((0, gid));
    }
    let index = context
        .find_roce_v2_ipv4_gid(port)
        .map_err(|e| rdma_err("ibv_query_gid", e))?
        .ok_or_else(|| Error::RdmaUnavailable {
            reason: format!("{} port {port} has no RoCE v2 IPv4 GID (is an IPv4 address configured on its netdev?)", context.name()),
        })?;
    let gid = context
        .query_gid(port, index)
        .map_err(|e| rdma_err("ibv_query_gid", e))?;
    // Logged once per process: every communicator of a process makes the same choice.
    static LOGGED: std::sync::Once = std::sync::Once::new();
    LOGGED.call_once(|| {
        crate::log::error(format_args!(
            "rdma: GID index {} is not a RoCE v2 IPv4 GID on {} port {port}; using index {index} (set KVCACHE_RDMA_GID_INDEX to choose)",
            crate::config::DEFAULT_GID_INDEX,
            context.name()
        ))
    });
    Ok((index, gid))
}

/// Engine-facing handle of a sending connection; the progress thread holds its state.
pub struct RdmaLink {
    id: u64,
    peer: String,
    shared: Arc<Shared>,
    alive: Arc<AtomicBool>,
    /// Held for the whole removal, so that a concurrent `shutdown`/`cancel` returns only
    /// once the queue pairs are destroyed too.
    removed: Mutex<bool>,
}

impl RdmaLink {
    fn remove(&self, error: Option<Error>) {
        let mut removed = self.removed.lock().unwrap_or_else(|p| p.into_inner());
        if *removed {
            return;
        }
        *removed = true;
        self.alive.store(false, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel();
        self.shared.send(Command::RemoveSender(self.id, error, tx));
        // The progress thread answers once the queue pairs are destroyed (no DMA can follow)
        // and the jobs failed; if it already stopped (engine shutdown), the sender is
        // dropped and recv returns at once. Waits without bound: a caller that reports a
        // timeout must not do so while a write may still land.
        let _ = rx.recv();
    }
}

impl Link for RdmaLink {
    fn submit(&self, job: WriteJob) {
        if !self.alive.load(Ordering::SeqCst) {
            return fail(
                job.done,
                Error::PeerDisconnected {
                    peer: self.peer.clone(),
                    reason: "the RDMA connection is broken; connect again".into(),
                },
            );
        }
        self.shared.send(Command::Submit(self.id, job));
    }

    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    fn shutdown(&self) {
        self.remove(None);
    }

    fn cancel(&self, error: Error) {
        self.remove(Some(error));
    }

    fn transport_name(&self) -> &'static str {
        "rdma"
    }
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

struct Worker {
    shared: Arc<Shared>,
    senders: HashMap<u64, SenderLink>,
    receivers: Vec<ReceiverLink>,
    /// qp_num → sender link id and queue-pair index.
    send_qps: HashMap<u32, (u64, usize)>,
    /// qp_num → index into `receivers`.
    recv_qps: HashMap<u32, usize>,
    batch: SendBatch,
    completions: Vec<WorkCompletion>,
    /// Dropped after the senders (field order): the posting threads are joined while the
    /// eventfd in `shared` is still open.
    doorbell: Doorbell,
}

impl Worker {
    fn new(shared: Arc<Shared>, doorbell: Doorbell) -> Worker {
        Worker {
            shared,
            senders: HashMap::new(),
            receivers: Vec::new(),
            send_qps: HashMap::new(),
            recv_qps: HashMap::new(),
            batch: SendBatch::with_capacity(tuning().chain_wrs),
            completions: vec![WorkCompletion::default(); 64],
            doorbell,
        }
    }

    fn run(mut self) {
        let mut idle = 0u32;
        loop {
            let commands = self.shared.take_commands();
            let mut progressed = !commands.is_empty();
            for command in commands {
                if !self.handle(command) {
                    self.stop();
                    return;
                }
            }
            progressed |= self.break_failed_posts();
            progressed |= self.post_all();
            progressed |= self.poll_send();
            progressed |= self.poll_recv();
            if progressed {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle < tuning().idle_spins {
                std::thread::yield_now();
                continue;
            }
            self.block();
            idle = 0;
        }
    }

    /// Arms both CQs, re-polls, then sleeps until a completion or a command arrives.
    fn block(&mut self) {
        let armed = self
            .shared
            .send_cq
            .request_notify()
            .and_then(|()| self.shared.recv_cq.request_notify());
        if let Err(e) = armed {
            crate::log_error!("rdma: cannot arm completion queues: {e}");
        }
        if self.poll_send() | self.poll_recv() {
            return;
        }
        if !self
            .shared
            .commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            return;
        }
        let mut fds = [
            libc::pollfd {
                fd: self.shared.wake_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.shared.channel.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfd structs.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
        let mut counter = 0u64;
        // SAFETY: reading 8 bytes into a live u64 from our non-blocking eventfd.
        unsafe { libc::read(self.shared.wake_fd, (&mut counter as *mut u64).cast(), 8) };
        while let Ok(Some(_)) = self.shared.channel.get_event() {}
    }

    /// Returns false on shutdown.
    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::AddSender(link) => {
                for (index, state) in link.qps.iter().enumerate() {
                    self.send_qps.insert(state.qp.qp_num(), (link.id, index));
                }
                self.senders.insert(link.id, *link);
            }
            Command::AddReceiver(link) => {
                // A peer that reconnects replaces its previous queue pairs and ring.
                if let Some(old) = self
                    .receivers
                    .iter()
                    .position(|r| r.instance == link.instance)
                {
                    self.receivers.swap_remove(old);
                }
                self.receivers.push(*link);
                self.recv_qps.clear();
                for (index, receiver) in self.receivers.iter().enumerate() {
                    for qp in &receiver.qps {
                        self.recv_qps.insert(qp.qp_num(), index);
                    }
                }
            }
            Command::Submit(id, job) => match self.senders.get_mut(&id) {
                Some(link) if link.broken.is_none() => {
                    let seq = link.next_job;
                    link.next_job += 1;
                    link.jobs.push_back(ActiveJob {
                        seq,
                        job,
                        cursor: (0, 0, 0),
                        posted_all: false,
                        chains_outstanding: 0,
                        phase: Phase::Data,
                        last_write: (0, 0, 0),
                    });
                }
                Some(link) => fail(
                    job.done,
                    Error::PeerDisconnected {
                        peer: link.peer.clone(),
                        reason: link.broken.clone().unwrap_or_default(),
                    },
                ),
                None => fail(job.done, Error::Closed),
            },
            Command::RemoveSender(id, error, done) => {
                if let Some(mut link) = self.senders.remove(&id) {
                    for state in &link.qps {
                        let _ = state.qp.to_error();
                        self.send_qps.remove(&state.qp.qp_num());
                    }
                    link.alive.store(false, Ordering::SeqCst);
                    let jobs: Vec<ActiveJob> = link.jobs.drain(..).collect();
                    // Dropping the link destroys its queue pairs: no DMA after this, so
                    // only now may its jobs fail (once no posting thread holds them).
                    self.doorbell.quiesce();
                    drop(link);
                    for active in jobs {
                        fail(
                            active.job.done,
                            error.as_ref().map_or(Error::Closed, Error::duplicate),
                        );
                    }
                }
                let _ = done.send(());
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn stop(&mut self) {
        for link in self.senders.values() {
            for state in &link.qps {
                let _ = state.qp.to_error();
            }
        }
        self.doorbell.quiesce();
        for (_, mut link) in self.senders.drain() {
            for active in link.jobs.drain(..) {
                fail(active.job.done, Error::Closed);
            }
            link.alive.store(false, Ordering::SeqCst);
        }
        self.receivers.clear();
        // Fail commands that raced with the shutdown.
        let rest = self.shared.take_commands();
        for command in rest {
            match command {
                Command::Submit(_, job) => fail(job.done, Error::Closed),
                Command::RemoveSender(_, _, done) => {
                    let _ = done.send(());
                }
                _ => {}
            }
        }
    }

    /// Breaks the links whose chains a posting thread failed to post.
    fn break_failed_posts(&mut self) -> bool {
        let failures = self.doorbell.take_failures();
        let any = !failures.is_empty();
        for (link_id, job, error) in failures {
            if let Some(link) = self.senders.get_mut(&link_id) {
                if link.broken.is_none() {
                    let status = error.to_string();
                    break_link(&self.doorbell, link, Some(job), error, &status);
                }
            }
        }
        any
    }

    fn post_all(&mut self) -> bool {
        let mut progressed = false;
        for link in self.senders.values_mut() {
            progressed |= post_link(&self.shared, &self.doorbell, link, &mut self.batch);
        }
        progressed
    }

    fn poll_send(&mut self) -> bool {
        let cq = self.shared.send_cq.clone();
        self.drain(&cq, "send", Self::on_send_completion)
    }

    /// Polls `cq` until it is empty, handing every completion to `handle`. Returns whether
    /// there was any.
    fn drain(
        &mut self,
        cq: &CompletionQueue,
        which: &str,
        handle: fn(&mut Self, &WorkCompletion),
    ) -> bool {
        let mut any = false;
        loop {
            let n = match cq.poll(&mut self.completions) {
                Ok(n) => n,
                Err(e) => {
                    crate::log_error!("rdma: ibv_poll_cq ({which}) failed: {e}");
                    return any;
                }
            };
            if n == 0 {
                return any;
            }
            any = true;
            for i in 0..n {
                let wc = self.completions[i];
                handle(self, &wc);
            }
        }
    }

    fn on_send_completion(&mut self, wc: &WorkCompletion) {
        let Some(&(link_id, qp_index)) = self.send_qps.get(&wc.qp_num) else {
            return;
        };
        let Some(link) = self.senders.get_mut(&link_id) else {
            return;
        };
        if link.broken.is_some() {
            return; // every job already failed
        }
        if !wc.is_success() {
            let status = verbs::wc_status_text(wc.status).to_string();
            let error = Error::RdmaCompletion {
                peer: link.peer.clone(),
                status: status.clone(),
                status_code: wc.status,
                vendor_err: wc.vendor_err,
            };
            crate::log_error!("{error}");
            // The failing request's chain names the call it belongs to.
            let failing_job = link.qps[qp_index]
                .chains
                .iter()
                .find(|c| c.id == wc.wr_id)
                .map(|c| c.job);
            break_link(&self.doorbell, link, failing_job, error, &status);
            return;
        }
        let qp = &mut link.qps[qp_index];
        let Some(chain) = qp.chains.pop_front() else {
            let reason = "completion for no posted chain".to_string();
            let error = Error::protocol(link.peer.clone(), reason.clone());
            break_link(&self.doorbell, link, None, error, &reason);
            return;
        };
        if chain.id != wc.wr_id {
            let reason = format!(
                "completion {} out of order (expected {})",
                wc.wr_id, chain.id
            );
            let error = Error::protocol(link.peer.clone(), reason.clone());
            break_link(&self.doorbell, link, None, error, &reason);
            return;
        }
        qp.outstanding -= chain.wrs;
        if let ChainKind::Notice { .. } = chain.kind {
            link.notices_in_flight -= 1;
        }
        let Some(position) = link.jobs.iter().position(|j| j.seq == chain.job) else {
            return;
        };
        link.jobs[position].chains_outstanding -= 1;
        finish_phase(link, position, self.shared.settings.gdr_flush);
    }

    fn poll_recv(&mut self) -> bool {
        let cq = self.shared.recv_cq.clone();
        self.drain(&cq, "receive", Self::on_recv_completion)
    }

    fn on_recv_completion(&mut self, wc: &WorkCompletion) {
        if wc.status == verbs::WC_STATUS_WR_FLUSH_ERR {
            return; // a receive queue being torn down
        }
        if wc.is_success() {
            self.deliver_notice(wc);
        } else {
            crate::log_error!(
                "rdma: notice receive failed: {} (status {})",
                verbs::wc_status_text(wc.status),
                wc.status
            );
        }
        // Repost only after the slot was read: until then the sender cannot reuse it.
        if let Err(e) = self.shared.srq.post_recv(wc.wr_id) {
            crate::log_error!("rdma: cannot repost a notice receive: {e}");
        }
    }

    fn deliver_notice(&self, wc: &WorkCompletion) {
        let Some(&index) = self.recv_qps.get(&wc.qp_num) else {
            return;
        };
        let Some(slot) = wc.imm_data else { return };
        let receiver = &self.receivers[index];
        if slot >= NOTICE_SLOTS {
            crate::log_error!(
                "rdma: notice from {} names slot {slot} outside its ring",
                receiver.peer_name
            );
            return;
        }
        let mut record = [0u8; NOTICE_SLOT_BYTES];
        // SAFETY: the slot lies inside the ring (slot < NOTICE_SLOTS); the NIC finished
        // writing it before raising this completion and cannot write it again until the
        // receive is reposted, so copying it through a raw pointer races with nothing.
        unsafe {
            std::ptr::copy_nonoverlapping(
                receiver
                    .ring
                    .bytes
                    .as_ptr()
                    .add(slot as usize * NOTICE_SLOT_BYTES),
                record.as_mut_ptr(),
                NOTICE_SLOT_BYTES,
            )
        };
        match decode_notice(&record) {
            Some((layer, blocks, tag)) => {
                if let Some(sink) = &self.shared.arrivals {
                    sink(Arrival {
                        peer: receiver.peer_name.clone(),
                        tag: tag.to_vec(),
                        layer,
                        blocks,
                    });
                }
            }
            None => crate::log_error!("rdma: malformed notice from {}", receiver.peer_name),
        }
    }
}

/// Moves a job whose posted requests all completed to its next phase: flush read, then
/// notice, then done.
fn finish_phase(link: &mut SenderLink, position: usize, gdr_flush: bool) {
    let active = &mut link.jobs[position];
    if active.chains_outstanding > 0 || !active.posted_all {
        return;
    }
    let next = match active.phase {
        Phase::Data if gdr_flush => Some(Phase::Flush),
        Phase::Data | Phase::Flush if active.job.tag.is_some() => Some(Phase::Notice),
        _ => None,
    };
    match next {
        Some(phase) => {
            active.phase = phase;
            link.control.push_back(active.seq);
        }
        None => {
            if let Some(done) = link.jobs.remove(position) {
                let _ = done.job.done.send(Ok(()));
            }
        }
    }
}

/// Fails every job of a broken link: the one whose request failed with `error`, the rest
/// as disconnected; moves its queue pairs to the error state.
fn break_link(
    doorbell: &Doorbell,
    link: &mut SenderLink,
    failing_job: Option<u64>,
    error: Error,
    status: &str,
) {
    let reason = format!("the RDMA connection broke: {status}; connect again");
    link.broken = Some(reason.clone());
    link.alive.store(false, Ordering::SeqCst);
    for state in &link.qps {
        let _ = state.qp.to_error();
    }
    // A chain still waiting in a posting thread must not read a buffer its failed caller
    // may free.
    doorbell.quiesce();
    let mut error = Some(error);
    for active in link.jobs.drain(..) {
        let this = if Some(active.seq) == failing_job || failing_job.is_none() {
            error.take().unwrap_or_else(|| Error::PeerDisconnected {
                peer: link.peer.clone(),
                reason: reason.clone(),
            })
        } else {
            Error::PeerDisconnected {
                peer: link.peer.clone(),
                reason: reason.clone(),
            }
        };
        fail(active.job.done, this);
    }
    link.control.clear();
}

fn encode_notice(out: &mut [u8], layer: u32, blocks: u32, tag: &[u8]) -> usize {
    out[0..4].copy_from_slice(&layer.to_le_bytes());
    out[4..8].copy_from_slice(&blocks.to_le_bytes());
    out[8] = tag.len() as u8;
    out[9..9 + tag.len()].copy_from_slice(tag);
    9 + tag.len()
}

/// Parses a notice slot; `None` when its tag length runs past the slot.
pub fn decode_notice(record: &[u8]) -> Option<(u32, u32, &[u8])> {
    if record.len() < 9 {
        return None;
    }
    let layer = u32::from_le_bytes(record[0..4].try_into().ok()?);
    let blocks = u32::from_le_bytes(record[4..8].try_into().ok()?);
    let len = record[8] as usize;
    let tag = record.get(9..9 + len)?;
    Some((layer, blocks, tag))
}

/// Posts what fits of a link's pending work. Returns whether anything was posted.
fn post_link(
    shared: &Shared,
    doorbell: &Doorbell,
    link: &mut SenderLink,
    batch: &mut SendBatch,
) -> bool {
    if link.broken.is_some() {
        return false;
    }
    let mut progressed = false;
    // Flush reads and notices first: they finish calls whose data already landed.
    while let Some(&seq) = link.control.front() {
        match post_control(doorbell, link, seq, batch) {
            Ok(true) => {
                link.control.pop_front();
                progressed = true;
            }
            Ok(false) => break,
            Err((job, error, status)) => {
                break_link(doorbell, link, Some(job), error, &status);
                return true;
            }
        }
    }
    let table = &shared.table;
    let mut job_index = 0;
    while job_index < link.jobs.len() {
        if link.jobs[job_index].posted_all {
            job_index += 1;
            continue;
        }
        // Pick a queue pair with room, round robin.
        let qp_count = link.qps.len();
        let Some(qp_index) = (0..qp_count)
            .map(|k| (link.next_qp + k) % qp_count)
            .find(|&i| link.qps[i].outstanding < link.qps[i].qp.caps().max_send_wr)
        else {
            break;
        };
        let room =
            (link.qps[qp_index].qp.caps().max_send_wr - link.qps[qp_index].outstanding) as usize;
        let chain_id = link.next_chain;
        link.next_chain += 1;
        batch.clear();
        let limit = room.min(batch.capacity());
        let active = &mut link.jobs[job_index];
        let finished = fill_chain(
            table,
            &shared.region_mrs,
            &link.remote_regions,
            active,
            batch,
            chain_id,
            limit,
        );
        if batch.is_empty() {
            // Nothing (more) to write: e.g. a notice-only call.
            active.posted_all = true;
            finish_phase(link, job_index, shared.settings.gdr_flush);
            progressed = true;
            continue;
        }
        let count = batch.len() as u32;
        let seq = active.seq;
        // SAFETY: every request reads a registered local region (lkey of its MR) that
        // stays valid until the engine closes (and its posting threads are joined); remote
        // ranges were bounds-checked by the planner against the peer's layout; `room` keeps
        // outstanding ≤ max_send_wr, counted from the hand-off on.
        let posted =
            unsafe { doorbell.ring(link.id, seq, qp_index, &link.qps[qp_index].qp, batch) };
        if let Err(error) = posted {
            let status = error.to_string();
            break_link(doorbell, link, Some(seq), error, &status);
            return true;
        }
        let active = &mut link.jobs[job_index];
        active.chains_outstanding += 1;
        active.posted_all = finished;
        let qp = &mut link.qps[qp_index];
        qp.outstanding += count;
        qp.chains.push_back(Chain {
            id: chain_id,
            wrs: count,
            job: seq,
            kind: ChainKind::Data,
        });
        link.next_qp = (qp_index + 1) % qp_count;
        progressed = true;
    }
    progressed
}

/// Fills `batch` with up to `limit` WRITE requests of `active` from its cursor; the last
/// one is signaled. Returns true when the job has no more data to post.
fn fill_chain(
    table: &RegionTable,
    mrs: &[MemoryRegion],
    remote_regions: &[(u64, u32)],
    active: &mut ActiveJob,
    batch: &mut SendBatch,
    chain_id: u64,
    limit: usize,
) -> bool {
    fill_write_chain(
        table,
        active.job.layer,
        &active.job.runs,
        |region| mrs[region].lkey(),
        remote_regions,
        &mut active.cursor,
        &mut active.last_write,
        batch,
        chain_id,
        limit,
    )
}

/// Where the next WRITE of a call starts: (kind, run index, byte offset inside the run).
#[doc(hidden)]
pub type ChainCursor = (u32, usize, u64);

/// The device-free core of [`fill_chain`] (also used by the `rdma_chain` criterion bench):
/// appends up to `limit` WRITE requests for `runs` of `layer` from `cursor` (the local key
/// of region `r` is `lkey(r)`, the peer's region `r` is `remote_regions[r]` = (address,
/// rkey)), signals the last one, and records the last written remote range in
/// `last_write`. Returns true when no data is left to post.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn fill_write_chain(
    table: &RegionTable,
    layer: u32,
    runs: &[crate::plan::Run],
    lkey: impl Fn(usize) -> u32,
    remote_regions: &[(u64, u32)],
    cursor: &mut ChainCursor,
    last_write: &mut (u64, u32, u64),
    batch: &mut SendBatch,
    chain_id: u64,
    limit: usize,
) -> bool {
    let layout = table.layout;
    let kinds = layout.kinds();
    let (mut kind, mut run_index, mut offset) = *cursor;
    let mut finished = false;
    let mut chain_bytes = 0;
    while batch.len() < limit && chain_bytes < CHAIN_BYTES {
        // `while`, not `if`: a call with no runs (an empty tagged call) skips every kind.
        while run_index >= runs.len() && kind < kinds {
            kind += 1;
            run_index = 0;
            offset = 0;
        }
        if kind >= kinds {
            finished = true;
            break;
        }
        let op = copy_op(table, layer, kind, &runs[run_index]);
        let len = (op.len - offset).min(MAX_WRITE_BYTES);
        let (remote_base, rkey) = remote_regions[op.region as usize];
        let remote_addr = remote_base + op.remote_offset + offset;
        let local = LocalBuf {
            addr: op.local_addr + offset,
            len: len as u32,
            lkey: lkey(op.region as usize),
        };
        let remote = RemoteBuf {
            addr: remote_addr,
            rkey,
        };
        if batch.push_write(chain_id, local, remote, false).is_err() {
            break;
        }
        *last_write = (remote_addr, rkey, len);
        chain_bytes += len;
        offset += len;
        if offset >= op.len {
            run_index += 1;
            offset = 0;
        }
    }
    if !finished && run_index >= runs.len() && kind + 1 >= kinds {
        finished = true;
    }
    *cursor = (kind, run_index, offset);
    batch.signal_last();
    finished
}

/// Posts the flush read or the notice of job `seq`. Ok(false): no send-queue room yet.
fn post_control(
    doorbell: &Doorbell,
    link: &mut SenderLink,
    seq: u64,
    batch: &mut SendBatch,
) -> std::result::Result<bool, (u64, Error, String)> {
    let Some(position) = link.jobs.iter().position(|j| j.seq == seq) else {
        return Ok(true);
    };
    // Flush and notice go on queue pair 0 (ordering with data is given by waiting for it).
    let qp_index = 0;
    if link.qps[qp_index].outstanding >= link.qps[qp_index].qp.caps().max_send_wr {
        return Ok(false);
    }
    let phase = link.jobs[position].phase;
    let chain_id = link.next_chain;
    batch.clear();
    let kind = match phase {
        Phase::Flush => {
            let (remote_addr, rkey, len) = link.jobs[position].last_write;
            let read_len = len.min(8);
            let local = LocalBuf {
                addr: link.scratch.addr(),
                len: read_len as u32,
                lkey: link.scratch.mr.lkey(),
            };
            let remote = RemoteBuf {
                addr: remote_addr + len - read_len,
                rkey,
            };
            let _ = batch.push_read(chain_id, local, remote, true);
            ChainKind::Flush
        }
        Phase::Notice => {
            if link.notice_ring.2 == 0 {
                // A peer without a notice ring cannot be told; the data is there: finish.
                if let Some(active) = link.jobs.remove(position) {
                    let _ = active.job.done.send(Ok(()));
                }
                return Ok(true);
            }
            if link.notices_in_flight >= NOTICE_STAGING_SLOTS {
                return Ok(false);
            }
            let notice = link.next_notice;
            link.next_notice += 1;
            let staging_slot = (notice % NOTICE_STAGING_SLOTS as u64) as usize;
            let remote_slot = (notice % u64::from(link.notice_ring.2)) as u32;
            let active = &link.jobs[position];
            let tag = active.job.tag.as_deref().unwrap_or(&[]);
            let start = staging_slot * NOTICE_SLOT_BYTES;
            let len = encode_notice(
                &mut link.staging.bytes[start..start + NOTICE_SLOT_BYTES],
                active.job.layer,
                active.job.blocks,
                tag,
            );
            let local = LocalBuf {
                addr: link.staging.addr() + start as u64,
                len: len as u32,
                lkey: link.staging.mr.lkey(),
            };
            let remote = RemoteBuf {
                addr: link.notice_ring.0 + u64::from(remote_slot) * NOTICE_SLOT_BYTES as u64,
                rkey: link.notice_ring.1,
            };
            let _ = batch.push_write_with_imm(chain_id, local, remote, remote_slot, true);
            link.notices_in_flight += 1;
            ChainKind::Notice { staging_slot }
        }
        Phase::Data => return Ok(true),
    };
    link.next_chain += 1;
    // SAFETY: the scratch and staging buffers are registered and owned by the link, which
    // outlives its queue pairs' requests (dropped together, after the QPs are destroyed
    // and the posting threads quiesced); the remote range is the tail of a range just
    // written, or a notice slot of the ring the peer announced; room was checked above.
    let posted = unsafe { doorbell.ring(link.id, seq, qp_index, &link.qps[qp_index].qp, batch) };
    if let Err(error) = posted {
        let status = error.to_string();
        return Err((seq, error, status));
    }
    let qp = &mut link.qps[qp_index];
    qp.outstanding += 1;
    qp.chains.push_back(Chain {
        id: chain_id,
        wrs: 1,
        job: seq,
        kind,
    });
    link.jobs[position].chains_outstanding += 1;
    Ok(true)
}
