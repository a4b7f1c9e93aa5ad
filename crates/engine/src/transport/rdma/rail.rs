//! Opening the rails of an engine: which RDMA device ports (the explicit list, or every
//! active port), and per rail its port, speed, GID candidates, registered regions,
//! completion queues and shared receive queue.

use super::endpoint::{GidCandidate, MAX_RAILS};
use super::keys::RegionMrs;
use super::locality;
use super::route::{describe, interface_prefixes, prefix_of, rank, LocalGid};
use super::state::{rdma_err, Rail, NOTICE_RECEIVES};
use super::tally::{Live, Tally};
use crate::config::{check_rdma_devices, RdmaSettings};
use crate::error::{Error, Result};
use crate::layout::RegionTable;
use crate::transport::Resources;
use kvtransfer_verbs as verbs;
use kvtransfer_verbs::{
    Access, CompletionChannel, CompletionQueue, Context, ProtectionDomain, SharedReceiveQueue,
};
use std::sync::Arc;

fn unavailable(reason: String) -> Error {
    Error::RdmaUnavailable { reason }
}

/// The (device, port) rails an engine opens, and why those.
pub(super) struct ChosenPorts {
    pub ports: Vec<(Arc<Context>, u8)>,
    /// One sentence for `peerInfo` details and the doctor (`nics`).
    pub reason: String,
}

/// The devices named for this engine, and by what: the `rdmaDevices` option (it wins), else
/// `KVCACHE_RDMA_NICS` entry `gpu_idx % len` (names joined by `+`); `None`: neither.
fn named_devices(settings: &RdmaSettings, gpu_idx: u32) -> Option<(&'static str, Vec<String>)> {
    if let Some(devices) = &settings.devices {
        if !settings.nics.is_empty() {
            crate::log::debug!("rdma: the rdmaDevices option wins over KVCACHE_RDMA_NICS");
        }
        return Some(("rdmaDevices", devices.clone()));
    }
    let entry = settings
        .nics
        .get(gpu_idx as usize % settings.nics.len().max(1))?;
    Some((
        "KVCACHE_RDMA_NICS",
        entry.split('+').map(|w| w.trim().to_string()).collect(),
    ))
}

/// The rails to open: the named devices (first active port of each), else, with GPU
/// regions, the devices nearest the GPU (`locality.rs`; every active port of each), else
/// every active port of every device.
pub(super) fn choose_ports(
    library: &Arc<verbs::Library>,
    settings: &RdmaSettings,
    gpu_idx: u32,
    gpu: Option<u32>,
) -> Result<ChosenPorts> {
    let devices = verbs::list_devices(library).map_err(|e| unavailable(e.to_string()))?;
    let names: Vec<String> = devices.iter().map(|d| d.name.clone()).collect();
    if names.is_empty() {
        return Err(unavailable(
            "no RDMA device found (libibverbs lists none)".into(),
        ));
    }
    let Some((source, wanted)) = named_devices(settings, gpu_idx) else {
        return automatic(library, &names, gpu);
    };
    check_rdma_devices(source, &wanted)?;
    let mut ports = Vec::new();
    for name in &wanted {
        if !names.contains(name) {
            return Err(unavailable(format!(
                "{source} selects '{name}' for gpuIdx {gpu_idx}, but the devices are: {}",
                names.join(", ")
            )));
        }
        let context = Context::open(library, name).map_err(|e| unavailable(e.to_string()))?;
        let port = active_ports(&context)
            .next()
            .ok_or_else(|| unavailable(format!("device '{name}' has no active port")))?;
        ports.push((context, port));
    }
    let overridden = if source == "rdmaDevices" && !settings.nics.is_empty() {
        " (KVCACHE_RDMA_NICS is ignored while the option is given)"
    } else {
        ""
    };
    Ok(ChosenPorts {
        ports,
        reason: format!("named by {source}: {}{overridden}", wanted.join(", ")),
    })
}

/// No device named: with GPU regions the devices nearest the GPU, else (or when locality
/// cannot be read) every device; every active port of each, at most `MAX_RAILS`.
fn automatic(
    library: &Arc<verbs::Library>,
    names: &[String],
    gpu: Option<u32>,
) -> Result<ChosenPorts> {
    let (candidates, mut reason) = match gpu.map(locality::nearest_to_gpu) {
        Some(Ok(choice)) => (choice.devices, choice.reason),
        Some(Err(why)) => (names.to_vec(), locality::unknown_locality(&why)),
        None => (
            names.to_vec(),
            "every active port: no GPU regions".to_string(),
        ),
    };
    let mut ports = Vec::new();
    for name in &candidates {
        let Ok(context) = Context::open(library, name) else {
            continue;
        };
        for port in active_ports(&context) {
            ports.push((Arc::clone(&context), port));
        }
    }
    if ports.is_empty() {
        return Err(unavailable(format!(
            "no device has an active port (devices: {})",
            candidates.join(", ")
        )));
    }
    if ports.len() > MAX_RAILS {
        reason.push_str(&format!("; the first {MAX_RAILS} of {} ports", ports.len()));
        ports.truncate(MAX_RAILS);
    }
    Ok(ChosenPorts { ports, reason })
}

fn active_ports(context: &Context) -> impl Iterator<Item = u8> + '_ {
    (1..=context.attrs().phys_port_cnt)
        .filter(|&port| context.query_port(port).is_ok_and(|p| p.state_active))
}

/// The port's active speed in Mb/s from sysfs (`rate`: "100 Gb/sec (4X EDR)"); 1000 when
/// it cannot be read.
pub(super) fn port_speed_mbps(device: &str, port: u8) -> u32 {
    std::fs::read_to_string(format!("/sys/class/infiniband/{device}/ports/{port}/rate"))
        .ok()
        .and_then(|text| {
            let gbps: f64 = text.split_whitespace().next()?.parse().ok()?;
            Some((gbps * 1000.0) as u32)
        })
        .filter(|&m| m > 0)
        .unwrap_or(1000)
}

/// The GIDs a rail may use, most preferred first, and why the first one leads.
/// `KVCACHE_RDMA_GID_INDEX` leaves that one (it must be usable).
pub(super) fn gid_candidates(
    context: &Context,
    port: u8,
    infiniband: bool,
    explicit: Option<u8>,
) -> Result<(Vec<LocalGid>, String)> {
    let prefixes = interface_prefixes();
    let candidate = |index: u8| -> Option<LocalGid> {
        let gid = context.query_gid(port, index).ok()?;
        if gid == [0; 16] {
            return None;
        }
        let v2 = if infiniband {
            true
        } else {
            match context.gid_type(port, index)? {
                verbs::GidType::RoceV2 => true,
                verbs::GidType::IbRoceV1 => false,
            }
        };
        Some(LocalGid {
            index,
            candidate: GidCandidate {
                gid,
                v2,
                prefix: if infiniband {
                    0
                } else {
                    prefix_of(&gid, &prefixes)
                },
            },
        })
    };
    if let Some(index) = explicit {
        let usable = candidate(index).filter(|g| {
            infiniband || (g.candidate.v2 && verbs::gid_ipv4(&g.candidate.gid).is_some())
        });
        return match usable {
            Some(g) => Ok((
                vec![g],
                format!("index {index}: forced by KVCACHE_RDMA_GID_INDEX"),
            )),
            None => {
                let found = if infiniband {
                    Ok(None)
                } else {
                    context.find_roce_v2_ipv4_gid(port)
                };
                Err(unavailable(format!(
                    "KVCACHE_RDMA_GID_INDEX={index} is not a usable {} GID on {} port {port}{}",
                    if infiniband { "" } else { "RoCE v2 IPv4" },
                    context.name(),
                    match found {
                        Ok(Some(good)) => format!(
                            " (index {good} is; set KVCACHE_RDMA_GID_INDEX={good} or unset it)"
                        ),
                        _ => String::new(),
                    }
                )))
            }
        };
    }
    let info = context
        .query_port(port)
        .map_err(|e| rdma_err("ibv_query_port", e))?;
    if infiniband {
        let gid = candidate(0).ok_or_else(|| {
            unavailable(format!(
                "{} port {port} has no GID at index 0",
                context.name()
            ))
        })?;
        return Ok((vec![gid], "index 0: InfiniBand routes by LID".into()));
    }
    let entries = info.gid_table_len.min(256);
    let mut gids: Vec<LocalGid> = (0..entries).filter_map(|i| candidate(i as u8)).collect();
    gids.sort_by_key(|g| (rank(&g.candidate), g.index));
    gids.truncate(super::endpoint::MAX_GIDS);
    let first = gids.first().ok_or_else(|| {
        unavailable(format!(
            "{} port {port} has no RoCE GID (is an address configured on its netdev?)",
            context.name()
        ))
    })?;
    let why = format!(
        "index {} ({}): RoCE v2 before v1, IPv4 before IPv6, link-local last; per peer, the first GID in the subnet of the peer's rail is used",
        first.index,
        describe(&first.candidate)
    );
    Ok((gids, why))
}

/// Opens one rail: protection domain, the regions registered under it, completion queues,
/// the shared receive queue with its notice receives posted.
pub(super) fn open_rail(
    context: Arc<Context>,
    port: u8,
    settings: &RdmaSettings,
    table: &RegionTable,
    access: Access,
    live: &Arc<Live>,
) -> Result<Rail> {
    let port_info = context
        .query_port(port)
        .map_err(|e| rdma_err("ibv_query_port", e))?;
    let infiniband = port_info.link_layer_is_infiniband;
    let (gids, gid_reason) = gid_candidates(&context, port, infiniband, settings.gid_index)?;
    let pd = ProtectionDomain::new(&context).map_err(|e| rdma_err("ibv_alloc_pd", e))?;
    let region_mrs = RegionMrs::register(&pd, table, access, live)?;
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
    let speed_mbps = port_speed_mbps(context.name(), port);
    crate::log::debug!(
        "rdma: rail {} port {port} ({}, {speed_mbps} Mb/s), GID {gid_reason}, MTU code {}, {} regions registered",
        context.name(),
        if infiniband { "InfiniBand" } else { "RoCE" },
        port_info.active_mtu,
        region_mrs.mrs.len(),
    );
    Ok(Rail {
        forced_gid: settings.gid_index.is_some(),
        context,
        pd,
        port,
        lid: port_info.lid,
        mtu: port_info.active_mtu,
        infiniband,
        speed_mbps,
        gids,
        gid_reason,
        region_mrs: std::sync::RwLock::new(region_mrs),
        send_cq,
        recv_cq,
        srq,
        channel,
        _tally: Tally::new(
            live,
            Resources {
                queue_pairs: 0,
                completion_queues: 2,
                registered_bytes: 0,
            },
        ),
    })
}
