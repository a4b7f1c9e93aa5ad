//! Opening the device: NIC and GID choice, protection domain, registered regions, shared
//! completion queues, the progress thread; queue pairs per peer.

use super::doorbell::{Doorbell, PostingThreads};
use super::endpoint::RdmaEndpoint;
use super::gpu_mr;
use super::link::RdmaLink;
use super::progress::Worker;
use super::state::{
    endpoint_of, rdma_err, tuning, Command, OwnedRegion, PendingQps, QpState, RdmaDevice,
    ReceiverLink, SenderLink, Shared, NOTICE_RECEIVES, NOTICE_SLOTS, NOTICE_SLOT_BYTES,
    NOTICE_STAGING_SLOTS, TRANSPORT_RETRY_COUNT,
};
use crate::config::RdmaSettings;
use crate::error::{Error, Result};
use crate::layout::RegionTable;
use crate::transport::{ArrivalSink, BreakHook};
use kvtransfer_verbs as verbs;
use kvtransfer_verbs::{
    Access, CompletionChannel, CompletionQueue, Context, Dest, ProtectionDomain, QpCaps, QueuePair,
    RtrParams, RtsParams, SharedReceiveQueue,
};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What the RDMA transport uses on this side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaDetails {
    /// The RDMA device's name (e.g. `mlx5_0`).
    pub device: String,
    /// The active port used (1-based, as verbs numbers them).
    pub port: u8,
    /// InfiniBand, else RoCE.
    pub infiniband: bool,
    /// The GID table index the queue pairs use as their source GID.
    pub gid_index: u8,
    /// The GID: its IPv4 address on RoCE where it maps one, else its bytes.
    pub gid: String,
    /// The path MTU in bytes.
    pub mtu: u32,
    /// RC queue pairs created per peer.
    pub qps_per_peer: u16,
}

impl RdmaDetails {
    fn link_layer(&self) -> &'static str {
        if self.infiniband {
            "InfiniBand"
        } else {
            "RoCE"
        }
    }

    /// `rxe0 port 1, GID index 1 (RoCE, 10.77.0.1), MTU 1024, 2 QPs`.
    pub(crate) fn summary(&self) -> String {
        format!(
            "{} port {}, GID index {} ({}, {}), MTU {}, {} QPs",
            self.device,
            self.port,
            self.gid_index,
            self.link_layer(),
            self.gid,
            self.mtu,
            self.qps_per_peer
        )
    }

    pub(crate) fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("device", self.device.clone()),
            ("port", self.port.to_string()),
            ("linkLayer", self.link_layer().to_string()),
            ("gidIndex", self.gid_index.to_string()),
            ("gid", self.gid.clone()),
            ("mtu", self.mtu.to_string()),
            ("qpsPerPeer", self.qps_per_peer.to_string()),
        ]
    }
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
        let region_mrs = gpu_mr::register_regions(&pd, &table, access)?;
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
        crate::log::debug!(
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
            crate::log::debug!("rdma: {post_threads} posting threads (software provider)");
            Doorbell::Threads(PostingThreads::start(
                post_threads as usize,
                tuning().chain_wrs,
                shared.wake_fd,
            )?)
        };
        let thread = {
            let shared = Arc::clone(&shared);
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

    pub fn infiniband(&self) -> bool {
        self.shared.infiniband
    }

    /// What this side uses, for logs and reports: device, port, GID, MTU, queue pairs.
    pub fn details(&self) -> RdmaDetails {
        let shared = &self.shared;
        let gid = if shared.infiniband {
            format!("{:02x?}", shared.gid)
        } else {
            verbs::gid_ipv4(&shared.gid)
                .map_or_else(|| format!("{:02x?}", shared.gid), |ip| ip.to_string())
        };
        RdmaDetails {
            device: shared.context.name().to_string(),
            port: shared.port,
            infiniband: shared.infiniband,
            gid_index: shared.gid_index,
            gid,
            mtu: 128u32 << shared.mtu.clamp(1, 5),
            qps_per_peer: shared.settings.qps_per_peer.max(1),
        }
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
            qps.push((qp, (crate::util::random_u64() as u32) & 0x00ff_ffff));
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
        on_break: BreakHook,
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
            alive: Arc::clone(&alive),
            broken: None,
            on_break,
        })));
        Ok(RdmaLink {
            id,
            peer: peer.to_string(),
            shared: Arc::clone(&self.shared),
            alive,
            removed: Mutex::new(false),
        })
    }

    /// Stops the progress thread; afterwards no queue pair of this engine exists.
    /// Receiving side: cuts the writer named `writer` off (its queue pairs to this side go
    /// to the error state and are destroyed); returns how many of its links were cut. Once
    /// the progress thread stopped, nothing is received anyway.
    pub fn isolate(&self, writer: &str) -> usize {
        let (tx, rx) = std::sync::mpsc::channel();
        self.shared.send(Command::Isolate(writer.to_string(), tx));
        rx.recv().unwrap_or(0)
    }

    pub fn shutdown(&self) {
        self.shared.send(Command::Shutdown);
        if let Some(thread) = crate::util::lock(&self.thread).take() {
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
        crate::log::log_warn!(
            "rdma: GID index {} is not a RoCE v2 IPv4 GID on {} port {port}; using index {index} (set KVCACHE_RDMA_GID_INDEX to choose)",
            crate::config::DEFAULT_GID_INDEX,
            context.name()
        )
    });
    Ok((index, gid))
}
