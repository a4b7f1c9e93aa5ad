//! Opening the device side of an engine (its rails, the progress thread), queue pairs per
//! peer and rail, and the pairing of rails at the handshake.

use super::details::{RdmaDetails, RdmaRailDetails};
use super::doorbell::{Doorbell, PostingThreads};
use super::endpoint::{RailEndpoint, RdmaEndpoint};
use super::health::{split_sets, BASE_COOLDOWN};
use super::link::RdmaLink;
use super::progress::Worker;
use super::rail::{choose_ports, open_rail};
use super::route::{describe, gid_reason, pair_rails, RailGids};
use super::state::{
    batch_capacity, endpoint_of, rdma_err, register_buffer, tuning, Command, OwnedRegion,
    PendingQps, QpState, Rail, RailCounters, RailInfo, RailState, RdmaDevice, ReceiverLink,
    SendRail, SenderLink, Shared, NOTICE_SLOTS, NOTICE_SLOT_BYTES, NOTICE_STAGING_SLOTS,
    TRANSPORT_RETRY_COUNT,
};
use super::tally::{Live, Tally};
use crate::config::RdmaSettings;
use crate::error::{Error, Result};
use crate::layout::RegionTable;
use crate::transport::{ArrivalSink, BreakHook, Resources};
use kvtransfer_verbs as verbs;
use kvtransfer_verbs::{Access, Dest, QpCaps, QueuePair, RtrParams, RtsParams};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Sets of queue pairs kept per rail (when there are several) for a quarantined rail to
/// rejoin on: its failed set stays in the error state.
pub(super) const REJOINS: usize = 2;

fn gid_text(gid: &[u8; 16], infiniband: bool) -> String {
    if infiniband {
        format!("{gid:02x?}")
    } else {
        super::route::gid_address(gid).to_string()
    }
}

impl RdmaDevice {
    /// Opens the rails (`rail.rs`: `KVCACHE_RDMA_NICS` entry `gpu_idx % len`, several
    /// devices joined by `+`, else every active port) and starts the progress thread.
    pub fn open(
        settings: RdmaSettings,
        gpu_idx: u32,
        table: Arc<RegionTable>,
        arrivals: Option<ArrivalSink>,
    ) -> Result<RdmaDevice> {
        let library = verbs::Library::load().map_err(|e| Error::RdmaUnavailable {
            reason: e.to_string(),
        })?;
        let mut access = Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ;
        if settings.relaxed_ordering {
            access |= Access::RELAXED_ORDERING;
        }
        let live = Arc::new(Live::default());
        let chosen = choose_ports(&library, &settings, gpu_idx, table.gpu())?;
        crate::log::debug!("rdma: NICs {}", chosen.reason);
        let mut rails = Vec::new();
        for (context, port) in chosen.ports {
            rails.push(open_rail(context, port, &settings, &table, access, &live)?);
        }
        let software = rails
            .iter()
            .any(|r: &Rail| r.context.attrs().is_software_provider());
        // SAFETY: plain eventfd creation; the fd is owned by `Shared` and closed on drop.
        let wake_fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if wake_fd < 0 {
            return Err(rdma_err("eventfd", std::io::Error::last_os_error()));
        }
        let rail_count = rails.len() as u32;
        let shared = Arc::new(Shared {
            rails,
            settings,
            table,
            commands: Mutex::new(VecDeque::new()),
            wake_fd,
            next_link: AtomicU64::new(1),
            arrivals,
            live,
            nic_reason: chosen.reason,
        });
        let qps_per_peer = u32::from(shared.settings.qps_per_peer.max(1));
        let post_threads =
            tuning()
                .post_threads
                .unwrap_or(if software && qps_per_peer * rail_count > 1 {
                    qps_per_peer * rail_count
                } else {
                    0
                });
        let doorbell = if post_threads == 0 {
            Doorbell::Inline
        } else {
            crate::log::debug!("rdma: {post_threads} posting threads (software provider)");
            Doorbell::Threads(PostingThreads::start(
                post_threads as usize,
                batch_capacity(),
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

    /// What this side uses, for logs and reports: rails, ports, GIDs, MTU, queue pairs.
    pub fn details(&self) -> RdmaDetails {
        let rails: Vec<RdmaRailDetails> = self
            .shared
            .rails
            .iter()
            .map(|r| RdmaRailDetails {
                device: r.name().to_string(),
                port: r.port,
                speed_mbps: r.speed_mbps,
                gid_index: r.gids[0].index,
                gid: gid_text(&r.gids[0].candidate.gid, r.infiniband),
                gid_reason: r.gid_reason.clone(),
            })
            .collect();
        let first = &self.shared.rails[0];
        RdmaDetails {
            device: rails[0].device.clone(),
            port: first.port,
            infiniband: first.infiniband,
            gid_index: rails[0].gid_index,
            gid: rails[0].gid.clone(),
            mtu: 128u32 << first.mtu.clamp(1, 5),
            qps_per_peer: self.shared.settings.qps_per_peer.max(1),
            qp_sets: if rails.len() > 1 {
                1 + REJOINS as u16
            } else {
                1
            },
            rails,
            nics: self.shared.nic_reason.clone(),
        }
    }

    fn rail_qps(&self, rail: usize, count: usize) -> Result<Vec<(QueuePair, u32)>> {
        let shared = &self.shared;
        let rail = &shared.rails[rail];
        let attrs = rail.context.attrs();
        let caps = QpCaps {
            max_send_wr: tuning().send_queue_depth.min(attrs.max_qp_wr),
            max_recv_wr: 0,
            max_send_sge: 1,
            max_inline: 0,
        };
        let mut qps = Vec::new();
        for _ in 0..count {
            let qp = QueuePair::new_rc(
                &rail.pd,
                &rail.send_cq,
                &rail.recv_cq,
                Some(&rail.srq),
                caps,
            )
            .map_err(|e| rdma_err("ibv_create_qp", e))?;
            qp.to_init(
                rail.port,
                Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ,
            )
            .map_err(|e| rdma_err("ibv_modify_qp(INIT)", e))?;
            qps.push((qp, (crate::util::random_u64() as u32) & 0x00ff_ffff));
        }
        Ok(qps)
    }

    /// Creates RC queue pairs on every rail for a new peer (state INIT): one set of
    /// `qps_per_peer`, and with several rails `REJOINS` more sets that a quarantined rail
    /// rejoins on.
    pub fn create_qps(&self) -> Result<PendingQps> {
        let rails = self.shared.rails.len();
        let sets = if rails > 1 { 1 + REJOINS } else { 1 };
        let count = usize::from(self.shared.settings.qps_per_peer.max(1)) * sets;
        let created = Resources {
            queue_pairs: (rails * count) as u64,
            ..Resources::default()
        };
        let rails = (0..rails)
            .map(|r| self.rail_qps(r, count))
            .collect::<Result<Vec<_>>>()?;
        Ok(PendingQps {
            rails,
            _tally: Tally::new(&self.shared.live, created),
        })
    }

    fn rail_endpoint(&self, rail: usize, qps: &[(QueuePair, u32)]) -> RailEndpoint {
        let r = &self.shared.rails[rail];
        RailEndpoint {
            device: r.name().to_string(),
            peer_rail: rail as u8,
            lid: r.lid,
            gids: r.gids.iter().map(|g| g.candidate).collect(),
            mtu: r.mtu as u8,
            infiniband: r.infiniband,
            speed_mbps: r.speed_mbps,
            qps: qps.iter().map(|(qp, psn)| endpoint_of(qp, *psn)).collect(),
            regions: r
                .region_mrs
                .iter()
                .map(|mr| (mr.addr(), mr.rkey()))
                .collect(),
            notice_ring: (0, 0, 0),
        }
    }

    /// The connector's offer: every rail, with all its GID candidates.
    pub fn offer(&self, pending: &PendingQps) -> RdmaEndpoint {
        RdmaEndpoint {
            rails: pending
                .rails
                .iter()
                .enumerate()
                .map(|(r, qps)| self.rail_endpoint(r, qps))
                .collect(),
            refused: Vec::new(),
        }
    }

    fn rail_gids(&self) -> Vec<RailGids<'_>> {
        self.shared
            .rails
            .iter()
            .map(|r| RailGids {
                device: r.name(),
                gids: &r.gids,
                forced: r.forced_gid,
                infiniband: r.infiniband,
            })
            .collect()
    }

    /// Whether at least one rail of this side can reach one of the peer's; else every
    /// rail's reason.
    pub fn check_peer(&self, theirs: &RdmaEndpoint) -> std::result::Result<(), String> {
        let (pairs, refused) = pair_rails(&self.rail_gids(), &theirs.rails);
        if pairs.is_empty() {
            return Err(format!(
                "no rail pairs: {}",
                refused
                    .iter()
                    .map(|(_, why)| why.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        Ok(())
    }

    fn connect_qps(
        &self,
        peer: &str,
        rail: usize,
        sgid_index: u8,
        qps: &[(QueuePair, u32)],
        remote: &RailEndpoint,
        dgid: [u8; 16],
    ) -> Result<()> {
        let rail = &self.shared.rails[rail];
        if remote.qps.len() != qps.len() {
            return Err(Error::protocol(
                peer,
                format!("the peer has {} queue pairs per connection but this side {} (KVCACHE_RDMA_QPS_PER_PEER must match)", remote.qps.len(), qps.len()),
            ));
        }
        if remote.infiniband != rail.infiniband {
            return Err(Error::protocol(
                peer,
                "one side is InfiniBand and the other RoCE",
            ));
        }
        let attrs = rail.context.attrs();
        let rd_atomic = attrs.max_qp_rd_atom.clamp(1, 16) as u8;
        let init_rd_atomic = attrs.max_qp_init_rd_atom.clamp(1, 16) as u8;
        for ((qp, psn), theirs) in qps.iter().zip(&remote.qps) {
            let dest = if rail.infiniband {
                Dest::Lid(remote.lid)
            } else {
                Dest::Gid {
                    gid: dgid,
                    sgid_index,
                }
            };
            qp.to_rtr(&RtrParams {
                remote_qpn: theirs.qp_num,
                remote_psn: theirs.psn,
                path_mtu: rail.mtu.min(u32::from(remote.mtu)),
                dest,
                port: rail.port,
                min_rnr_timer: 12,
                max_dest_rd_atomic: rd_atomic,
            })
            .map_err(|e| rdma_err("ibv_modify_qp(RTR)", e))?;
            qp.to_rts(&RtsParams {
                psn: *psn,
                timeout: self.shared.settings.ib_timeout,
                retry_cnt: TRANSPORT_RETRY_COUNT,
                rnr_retry: 7,
                max_rd_atomic: init_rd_atomic,
            })
            .map_err(|e| rdma_err("ibv_modify_qp(RTS)", e))?;
        }
        Ok(())
    }

    /// Accepting side: pairs the connector's rails with this side's, connects a set of
    /// queue pairs per pair and registers a fresh notice ring under each paired rail; keeps
    /// them until the peer reconnects or the engine closes. Returns the endpoint to send
    /// back.
    pub fn accept(
        &self,
        peer_name: &str,
        peer_instance: u64,
        remote: &RdmaEndpoint,
    ) -> Result<RdmaEndpoint> {
        let (pairs, refused) = pair_rails(&self.rail_gids(), &remote.rails);
        if pairs.is_empty() {
            return Err(Error::RdmaUnavailable {
                reason: format!(
                    "no rail of this side reaches a rail of {peer_name}: {}",
                    refused
                        .iter()
                        .map(|(_, why)| why.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            });
        }
        for (theirs, why) in &refused {
            crate::log::log_warn!(
                "rdma: {peer_name}'s rail {} is not used: {why}",
                remote.rails[*theirs as usize].device
            );
        }
        let mut ring = OwnedRegion::new(
            &self.shared.rails[pairs[0].ours].pd,
            NOTICE_SLOTS as usize * NOTICE_SLOT_BYTES,
            Access::LOCAL_WRITE | Access::REMOTE_WRITE,
        )?;
        let mut ring_mrs = Vec::new();
        let mut rails = Vec::new();
        let mut qps_kept = Vec::new();
        for (k, pair) in pairs.iter().enumerate() {
            let rail = &self.shared.rails[pair.ours];
            let theirs = &remote.rails[pair.theirs];
            let our_gid = rail.gids[pair.our_gid];
            let their_gid = theirs.gids[pair.their_gid];
            let qps = self.rail_qps(pair.ours, theirs.qps.len())?;
            self.connect_qps(
                peer_name,
                pair.ours,
                our_gid.index,
                &qps,
                theirs,
                their_gid.gid,
            )?;
            let ring_rkey = if k == 0 {
                ring.mr.rkey()
            } else {
                let len = ring.bytes.len();
                // SAFETY: the ring's bytes are owned by `ring`, which the receiver link
                // drops after `ring_mrs` (field order).
                let mr = unsafe {
                    register_buffer(
                        &rail.pd,
                        ring.bytes.as_mut_ptr(),
                        len,
                        Access::LOCAL_WRITE | Access::REMOTE_WRITE,
                    )
                }?;
                let rkey = mr.rkey();
                ring_mrs.push(mr);
                rkey
            };
            let mut endpoint = self.rail_endpoint(pair.ours, &qps);
            endpoint.peer_rail = pair.theirs as u8;
            endpoint.gids = vec![our_gid.candidate, their_gid];
            endpoint.notice_ring = (ring.addr(), ring_rkey, NOTICE_SLOTS);
            crate::log::debug!(
                "rdma: {peer_name}: rail {} ({}) pairs with its {} ({})",
                rail.name(),
                describe(&our_gid.candidate),
                theirs.device,
                describe(&their_gid)
            );
            rails.push(endpoint);
            qps_kept.extend(qps.into_iter().map(|(qp, _)| (pair.ours, qp)));
        }
        let held = Resources {
            queue_pairs: qps_kept.len() as u64,
            completion_queues: 0,
            registered_bytes: (ring.bytes.len() * (1 + ring_mrs.len())) as u64,
        };
        self.shared
            .send(Command::AddReceiver(Box::new(ReceiverLink {
                peer_name: peer_name.to_string(),
                instance: peer_instance,
                answering: vec![0; qps_kept.len()],
                assembly: vec![Vec::new(); qps_kept.len()],
                unsent: Default::default(),
                qps: qps_kept,
                _ring_mrs: ring_mrs,
                ring,
                _tally: Tally::new(&self.shared.live, held),
            })));
        Ok(RdmaEndpoint { rails, refused })
    }

    /// Connecting side: connects the queue pairs of each rail the acceptor paired and
    /// returns the link writes go through.
    pub fn connect(
        &self,
        peer: &str,
        pending: PendingQps,
        remote: &RdmaEndpoint,
        on_break: BreakHook,
    ) -> Result<RdmaLink> {
        let shared = &self.shared;
        let mut pending: Vec<Option<Vec<(QueuePair, u32)>>> =
            pending.rails.into_iter().map(Some).collect();
        let mut staging = vec![0u8; NOTICE_STAGING_SLOTS * NOTICE_SLOT_BYTES].into_boxed_slice();
        let mut scratch = vec![0u8; 64].into_boxed_slice();
        let mut rails = Vec::new();
        let mut infos = Vec::new();
        for theirs in &remote.rails {
            let ours = theirs.peer_rail as usize;
            let qps = pending.get_mut(ours).and_then(Option::take).ok_or_else(|| {
                Error::protocol(
                    peer,
                    format!("the reply pairs rail {ours}, which this side did not offer or offered once"),
                )
            })?;
            let rail = &shared.rails[ours];
            let (Some(their_gid), Some(our_gid)) = (theirs.gids.first(), theirs.gids.get(1)) else {
                return Err(Error::protocol(
                    peer,
                    "a paired rail names fewer than 2 GIDs",
                ));
            };
            let local = rail
                .gids
                .iter()
                .find(|g| g.candidate.gid == our_gid.gid)
                .ok_or_else(|| {
                    Error::protocol(
                        peer,
                        format!("the reply names a GID that {} did not offer", rail.name()),
                    )
                })?;
            self.connect_qps(peer, ours, local.index, &qps, theirs, their_gid.gid)?;
            if theirs.regions.len() != shared.table.regions().len() {
                return Err(Error::protocol(
                    peer,
                    "the peer announces a different number of regions",
                ));
            }
            // SAFETY: `staging` and `scratch` are boxed buffers moved into the sender link,
            // which drops its rails (and so these registrations) before them.
            let (staging_mr, scratch_mr) = unsafe {
                (
                    register_buffer(
                        &rail.pd,
                        staging.as_mut_ptr(),
                        staging.len(),
                        Access::LOCAL_WRITE,
                    )?,
                    register_buffer(
                        &rail.pd,
                        scratch.as_mut_ptr(),
                        scratch.len(),
                        Access::LOCAL_WRITE,
                    )?,
                )
            };
            let counters = Arc::new(RailCounters::default());
            counters.set_state(RailState::Healthy);
            let speed = rail.speed_mbps.min(theirs.speed_mbps).max(1);
            infos.push(RailInfo {
                local: rail.name().to_string(),
                port: rail.port,
                remote: theirs.device.clone(),
                gid: describe(&local.candidate),
                gid_index: local.index,
                gid_reason: gid_reason(
                    rail.name(),
                    local,
                    rail.forced_gid,
                    rail.infiniband,
                    &theirs.device,
                    their_gid,
                ),
                peer_gid: describe(their_gid),
                speed_mbps: speed,
                counters: Arc::clone(&counters),
            });
            let states = qps
                .into_iter()
                .map(|(qp, _)| QpState {
                    qp: Arc::new(qp),
                    outstanding: 0,
                    chains: VecDeque::new(),
                })
                .collect();
            let per_set = usize::from(shared.settings.qps_per_peer.max(1));
            let (qps, spares) = split_sets(states, per_set);
            rails.push(SendRail {
                local: ours,
                qps,
                spares,
                retry_at: std::time::Instant::now(),
                cooldown: BASE_COOLDOWN,
                next_qp: 0,
                remote_regions: theirs.regions.clone(),
                notice_ring: theirs.notice_ring,
                weight: u64::from(speed),
                posted: 0,
                staging_mr,
                scratch_mr,
                counters,
            });
        }
        if rails.is_empty() {
            return Err(Error::protocol(peer, "the reply pairs no rail"));
        }
        let refused: Vec<(String, u8, String)> = remote
            .refused
            .iter()
            .map(|(r, why)| {
                let (device, port) = shared.rails.get(*r as usize).map_or_else(
                    || (format!("rail {r}"), 0),
                    |rail| (rail.name().to_string(), rail.port),
                );
                crate::log::log_warn!("rdma: {peer}: rail {device} is not used: {why}");
                (device, port, why.clone())
            })
            .collect();
        let id = shared.next_link.fetch_add(1, Ordering::Relaxed);
        let alive = Arc::new(AtomicBool::new(true));
        let held = Resources {
            queue_pairs: rails
                .iter()
                .map(|r| r.qps.len() + r.spares.iter().map(Vec::len).sum::<usize>())
                .sum::<usize>() as u64,
            completion_queues: 0,
            registered_bytes: ((staging.len() + scratch.len()) * rails.len()) as u64,
        };
        shared.send(Command::AddSender(Box::new(SenderLink {
            id,
            peer: peer.to_string(),
            rails,
            next_notice: 0,
            notices_in_flight: 0,
            awaiting: Default::default(),
            staging,
            scratch,
            jobs: VecDeque::new(),
            next_job: 1,
            next_chain: 1,
            control: VecDeque::new(),
            alive: Arc::clone(&alive),
            broken: None,
            on_break,
            _tally: Tally::new(&shared.live, held),
        })));
        Ok(RdmaLink {
            id,
            peer: peer.to_string(),
            shared: Arc::clone(shared),
            alive,
            removed: Mutex::new(false),
            rails: infos,
            refused,
            held,
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
