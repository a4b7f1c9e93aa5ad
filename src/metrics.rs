//! `metrics()` and the refusal counter of `NativeCommunicator` (counters kept by the
//! engine; see `crates/engine/src/metrics.rs` for what is counted where).

use crate::errors::Code;
use crate::NativeCommunicator;
use kvtransfer_engine::{MetricsSnapshot, RailReport, Resources, LATENCY_BUCKETS};
use napi::bindgen_prelude::Result;
use napi_derive::napi;
use std::collections::HashMap;

/// One set of counters (JS numbers: exact below 2^53).
#[napi(object)]
pub struct NativeCounters {
    pub bytes_written: f64,
    pub bytes_received: f64,
    pub blocks_written: f64,
    pub calls_succeeded: f64,
    pub calls_failed: f64,
    /// Error code → calls that failed with it (codes with a non-zero count).
    pub failures_by_code: HashMap<String, f64>,
    /// Succeeded calls per latency bucket (bounds in `latencyBucketUpperUs`).
    pub latency_buckets: Vec<f64>,
    pub latency_sum_us: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub notices_sent: f64,
    pub notices_received: f64,
    /// Arrival notices nobody consumed: `metrics()` adds, to the engine's count of notices
    /// with no one to hand them to, those evicted beyond `maxPendingArrivals` before an
    /// `'arrival'` listener received them or a `waitForArrival` resolved with them.
    pub notices_dropped: f64,
    /// Arrivals whose bytes did not have the writer's checksum (`ERR_CHECKSUM_MISMATCH`).
    pub checksum_mismatches: f64,
    pub reconnects: f64,
}

#[napi(object)]
pub struct NativePeerCounters {
    pub peer: String,
    pub transport: Option<String>,
    pub counters: NativeCounters,
    /// The rails of the peer's current link (RDMA; empty otherwise).
    pub rails: Vec<NativeRail>,
    /// NIC resources of the peer's current link (RDMA: its queue pairs, spares included,
    /// and registered buffers; its completion queues are the communicator's, shared).
    pub resources: NativeResources,
}

/// NIC resources held (RDMA; zero for other transports).
#[napi(object)]
pub struct NativeResources {
    pub queue_pairs: f64,
    pub completion_queues: f64,
    pub registered_bytes: f64,
}

fn resources(r: &Resources) -> NativeResources {
    NativeResources {
        queue_pairs: r.queue_pairs as f64,
        completion_queues: r.completion_queues as f64,
        registered_bytes: r.registered_bytes as f64,
    }
}

/// One rail of an RDMA link: a local NIC port paired with one of the peer's, or a local
/// NIC the handshake left out (`state` `refused`, with the reason).
#[napi(object)]
pub struct NativeRail {
    /// The local RDMA device (e.g. `mlx5_0`).
    pub device: String,
    /// Its port (1-based).
    pub port: u32,
    /// The peer's device it is paired with (empty when refused).
    pub peer_device: String,
    /// `healthy`, `quarantined` (waiting out its cooldown), `failed` (no rejoin left on
    /// this connection) or `refused` (never paired).
    pub state: String,
    /// The local GID table index used (null when refused).
    pub gid_index: Option<u32>,
    /// The local GID used (address, prefix, RoCE version) and why it was chosen.
    pub gid: String,
    pub gid_reason: String,
    /// The peer's GID written to.
    pub peer_gid: String,
    /// Active speed of the slower port of the pair, Mb/s (the weight of its share).
    pub speed_mbps: u32,
    /// Bytes of the work requests completed on this rail (data, flush, notices).
    pub bytes: f64,
    /// Work requests completed on this rail.
    pub wrs: f64,
    /// Failed work requests and posts, and ports seen down.
    pub failures: f64,
    pub quarantines: f64,
    pub rejoins: f64,
    /// Answers to acked calls (`delivery: 'acked'`) received on this rail.
    pub answers: f64,
    /// Answers received on this rail that named no call waiting for one (ignored).
    pub stray_answers: f64,
    /// Why it is refused or out of service (null while healthy).
    pub reason: Option<String>,
}

pub(crate) fn rails(reports: &[RailReport]) -> Vec<NativeRail> {
    reports
        .iter()
        .map(|r| NativeRail {
            device: r.local.clone(),
            port: u32::from(r.port),
            peer_device: r.remote.clone(),
            state: r.state.to_string(),
            gid_index: r.gid_index.map(u32::from),
            gid: r.gid.clone(),
            gid_reason: r.gid_reason.clone(),
            peer_gid: r.peer_gid.clone(),
            speed_mbps: r.speed_mbps,
            bytes: r.bytes as f64,
            wrs: r.wrs as f64,
            failures: r.failures as f64,
            quarantines: r.quarantines as f64,
            rejoins: r.rejoins as f64,
            answers: r.answers as f64,
            stray_answers: r.stray_answers as f64,
            reason: r.reason.clone(),
        })
        .collect()
}

#[napi(object)]
pub struct NativeMetrics {
    /// This side's name (what peers see in arrival notices; `hostname:port` by default).
    pub name: String,
    pub role: String,
    pub total: NativeCounters,
    /// Calls and notices of no tracked peer: peers never connected (refused calls), and
    /// any beyond the engine's bound of tracked peers. `total` is these plus every peer's.
    pub untracked: NativeCounters,
    /// The tracked peers: those a link was opened with.
    pub peers: Vec<NativePeerCounters>,
    /// Upper bound (µs) of each latency bucket; the last is +Infinity.
    pub latency_bucket_upper_us: Vec<f64>,
    /// NIC resources the communicator holds now, over every link (RDMA: queue pairs,
    /// completion queues, two per rail; registered bytes of its regions and links).
    pub resources: NativeResources,
}

fn counters(s: &MetricsSnapshot) -> NativeCounters {
    let n = |v: u64| v as f64;
    NativeCounters {
        bytes_written: n(s.bytes_written),
        bytes_received: n(s.bytes_received),
        blocks_written: n(s.blocks_written),
        calls_succeeded: n(s.calls_succeeded),
        calls_failed: n(s.calls_failed),
        failures_by_code: s
            .failures_by_code
            .iter()
            .map(|(code, count)| ((*code).to_string(), n(*count)))
            .collect(),
        latency_buckets: s.latency_buckets.iter().map(|v| n(*v)).collect(),
        latency_sum_us: n(s.latency_sum_us),
        latency_p50_ms: s.latency_quantile_ms(0.5),
        latency_p99_ms: s.latency_quantile_ms(0.99),
        notices_sent: n(s.notices_sent),
        notices_received: n(s.notices_received),
        notices_dropped: n(s.notices_dropped),
        checksum_mismatches: n(s.checksum_mismatches),
        reconnects: n(s.reconnects),
    }
}

/// Why a connected peer is reached over its transport.
#[napi(object)]
pub struct NativePeerDecision {
    pub transport: String,
    pub reason: String,
    /// What the transport uses on this side (RDMA: device, port, gidIndex, gid, mtu, ...).
    pub details: HashMap<String, String>,
    /// Whether the link is still usable.
    pub alive: bool,
    /// The link's rails (RDMA; empty otherwise).
    pub rails: Vec<NativeRail>,
}

/// A transport this side opened (what the instance registry publishes of it).
#[napi(object)]
pub struct NativeOffer {
    pub transport: String,
    /// One phrase: what it uses on this side (e.g. the RDMA device and GID, the bind address).
    pub summary: String,
}

#[napi]
impl NativeCommunicator {
    /// The transports this side opened, most preferred first, each with its summary.
    #[napi]
    pub fn offers(&self) -> Vec<NativeOffer> {
        self.engine
            .transports()
            .into_iter()
            .map(|kind| NativeOffer {
                transport: kind.name().to_string(),
                summary: self
                    .engine
                    .transport_explanation(kind)
                    .map(|e| e.summary)
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// The transport of a peer this side connected to, and why; null for others.
    #[napi]
    pub fn peer_decision(&self, peer_key: String) -> Option<NativePeerDecision> {
        let decision = self.engine.transport_decision(&peer_key)?;
        Some(NativePeerDecision {
            transport: decision.transport.name().to_string(),
            reason: decision.reason,
            details: decision
                .explanation
                .fields()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            alive: self.engine.is_connected(&peer_key),
            rails: self
                .engine
                .peer_info(&peer_key)
                .map(|info| rails(&info.rails))
                .unwrap_or_default(),
        })
    }

    /// Counters since construction: totals and per peer.
    #[napi]
    pub fn metrics(&self) -> NativeMetrics {
        let metrics = self.engine.metrics();
        NativeMetrics {
            name: self.engine.name().to_string(),
            role: self.engine.role().as_str().to_string(),
            total: counters(&metrics.total),
            untracked: counters(&metrics.untracked),
            peers: metrics
                .peers
                .iter()
                .map(|p| NativePeerCounters {
                    peer: p.peer.clone(),
                    transport: p.transport.map(|t| t.name().to_string()),
                    counters: counters(&p.counters),
                    rails: rails(&p.rails),
                    resources: resources(&p.resources),
                })
                .collect(),
            latency_bucket_upper_us: (0..LATENCY_BUCKETS)
                .map(|i| {
                    kvtransfer_engine::bucket_upper_us(i).map_or(f64::INFINITY, |us| us as f64)
                })
                .collect(),
            resources: resources(&self.engine.stats().nic),
        }
    }

    /// Sets this side's name once (the default `hostname:port`, once the port is bound).
    #[napi]
    pub fn set_name(&self, name: String) -> Result<(), Code> {
        self.engine.set_name(&name).map_err(crate::to_js_error)
    }

    /// Counts a `writeCache` call the TypeScript layer refused before the engine saw it
    /// (under its peer when that peer is tracked, else under `untracked`).
    #[napi]
    pub fn count_refused_call(&self, peer_key: String, code: String) {
        self.engine.count_refused_call(&peer_key, &code);
    }
}
