//! One communicator's engine: its registered regions, its transports in order of
//! preference, its peers. The handshake (`handshake.rs`), the write path (`write.rs`), the
//! deadline watchdog (`watchdog.rs`) and the peer registry (`peers.rs`) are its parts.

mod explain;
mod fence;
mod handshake;
mod in_flight;
mod integrity;
mod left;
mod listen_auth;
mod peers;
mod submitter;
mod swap;
mod tp;
mod watchdog;
mod write;

pub use fence::MAX_FENCE_HOLD;
pub use in_flight::FenceScope;
pub use integrity::Integrity;
pub use left::{PeerLeft, PeerLeftSink};
pub use write::{CallAbort, CallBlocks, CallPeer, PeerHandle, PreparedBlocks, WriteCall};

use crate::auth::{self, Nonce};
use crate::config::{RdmaSettings, Settings, TransportChoice};
use crate::error::{Error, Result};
use crate::gpu;
use crate::layout::{self, CacheLayout, RegionTable};
use crate::log::debug;
use crate::metrics::{Metrics, Snapshot, Snapshots};
use crate::shard::TpOptions;
use crate::transport::{
    open_transports, ArrivalSink, Explanation, OpenContext, RunPool, Transport, TransportKind,
    Unusable,
};
use crate::wire::{check_name, Role};
pub use explain::TransportDecision;
use peers::PeerRegistry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use watchdog::Watchdog;

/// How to build an engine.
pub struct EngineOptions {
    /// This side's role, sent to peers in the handshake and logged; it does not change
    /// what the engine does.
    pub role: Role,
    /// The GPU this engine serves: where GPU regions are looked up, the GPU NVLink opens,
    /// and the index that selects the RDMA NIC.
    pub gpu_idx: u32,
    /// This side's name, reported to peers with its arrival notices: see
    /// [`crate::NAME_RULE`] (at most 255 bytes of visible ASCII, no quotes or
    /// backslash).
    pub name: String,
    /// Address every listener binds (the `host` option: `*`, an IP address or an interface
    /// name); `None`: `KVCACHE_SOCKET_IFNAME`'s IPv4 address, else all interfaces.
    pub host: Option<String>,
    /// Base address of each layer's key region.
    pub keys: Vec<u64>,
    /// Base address of each layer's value region, or empty for key-only caches.
    pub values: Vec<u64>,
    /// Base address of each layer's fp8 key-scale region (empty: none; then
    /// `scale_block_bytes` is 0).
    pub key_scales: Vec<u64>,
    /// Base address of each layer's value-scale region (one per value region, or empty).
    pub value_scales: Vec<u64>,
    /// Blocks in each region (valid block ids are `0..block_number`).
    pub block_number: u32,
    /// Bytes per block of each key and value region.
    pub block_bytes: u64,
    /// Bytes per block of the scale regions; 0: no scale regions.
    pub scale_block_bytes: u64,
    /// "auto" or a transport's name; `None` reads `KVCACHE_TRANSPORT`.
    pub transport: Option<String>,
    /// Receives arrival notices of tagged calls written into this engine's regions.
    pub arrivals: Option<ArrivalSink>,
    /// How long `finish_connect` may take to open the data connection (`Duration::ZERO`:
    /// no bound).
    pub connect_timeout: Duration,
    /// RDMA settings; `None` reads them from the `KVCACHE_*` environment variables.
    pub rdma_settings: Option<RdmaSettings>,
    /// The `rdmaDevices` option: the RDMA devices to write over, one rail each; wins over
    /// `KVCACHE_RDMA_NICS`. `None`: the variable, else the automatic choice.
    pub rdma_devices: Option<Vec<String>>,
    /// Shared secret both sides of a connection must know; `None` reads
    /// `KVCACHE_AUTH_TOKEN`; `Some(empty)` means no token regardless of the environment.
    pub auth_token: Option<Vec<u8>>,
    /// Tensor-parallel shards (default: size 1, rank 0, head-major).
    pub tp: TpOptions,
    /// Memory of other processes that the regions lie in ([`crate::Importer`]): kept
    /// mapped until every transport thread is gone.
    pub imports: Vec<crate::import::ImportedMemory>,
}

/// A connect in progress on the connecting side: its nonce, then the acceptor's.
struct ConnectAuth {
    nonce_c: Nonce,
    nonce_a: Option<Nonce>,
}

/// Live resources of an engine, for leak checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Connected peers (links this side writes through).
    pub peers: usize,
    /// Of those, links still usable.
    pub live_links: usize,
    /// Connections this side receives on, over every transport (TCP data connections,
    /// NVLink side channels; RDMA has none: its writes land without a receiver).
    pub receivers: usize,
    /// Registered regions (per engine: layers × kinds).
    pub registered_regions: usize,
    /// Hellos accepted within the challenge lifetime, remembered to refuse replays.
    pub remembered_hellos: usize,
    /// Fence registrations accepted hellos may still make (with an auth token).
    pub open_fence_grants: usize,
    /// Calls with a deadline the watchdog still tracks (completed ones are swept lazily).
    pub timed_calls: usize,
    /// Threads of the whole process.
    pub process_threads: usize,
    /// NIC resources the transports hold now (RDMA: queue pairs of every link, spares and
    /// connects in progress included; completion queues, two per rail; registered bytes of
    /// the regions and of every link's buffers).
    pub nic: crate::transport::Resources,
}

/// One peer's counters: the writing side keys peers by `host:port`, the receiving side by
/// the writer's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerMetrics {
    /// The peer's key (`host:port` when writing, the writer's name when receiving).
    pub peer: String,
    /// The transport of the last link (a tracked peer always had one; none only for a
    /// transport code this build does not know).
    pub transport: Option<TransportKind>,
    /// This peer's counters since the engine was built.
    pub counters: Snapshot,
    /// The rails of its current link (RDMA: per NIC pair, state and counters since that
    /// link was opened); empty for other transports and for peers without a link.
    pub rails: Vec<crate::transport::RailReport>,
    /// The NIC resources its current link holds (RDMA: queue pairs, spares included, and
    /// registered buffers; the completion queues are shared by every link): zero for other
    /// transports and for peers without a link.
    pub resources: crate::transport::Resources,
}

/// An engine's counters since it was built (see `metrics.rs` for what is counted where).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineMetrics {
    /// Every call and notice of the engine.
    pub total: Snapshot,
    /// Calls and notices of no tracked peer: peers never connected (a refused call can name
    /// any string, and creates no per-peer counters), and any beyond the bound of tracked
    /// peers (4096). `total` is `untracked` plus the sum over `peers`.
    pub untracked: Snapshot,
    /// The tracked peers: those a link was opened with, sorted by key.
    pub peers: Vec<PeerMetrics>,
}

/// How a connected peer is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The transport of the peer's link.
    pub transport: TransportKind,
    /// Whether the link is still usable (false once it broke; connect again).
    pub alive: bool,
    /// The peer's blockNumber: remote block ids must be below it.
    pub remote_block_number: u32,
    /// The link's rails (RDMA: one per NIC pair, and local NICs left out with the
    /// reason), with their state and counters; empty for other transports.
    pub rails: Vec<crate::transport::RailReport>,
}

struct EngineInner {
    /// Recycled buffers for planned runs.
    run_pool: Arc<RunPool>,
    /// Sums checksummed calls' GPU sources where the link does not (`integrity.rs`), made
    /// for the first such call.
    gpu_summer: Mutex<Option<crate::gpu::checksum::GpuSummer>>,
    role: Role,
    /// The name given at construction; see `name()`.
    name: String,
    /// The name set once afterwards (`set_name`: the default `hostname:port` once the
    /// control port is bound); it replaces `name`.
    late_name: std::sync::OnceLock<String>,
    instance_id: u64,
    table: Arc<RegionTable>,
    /// This side's tensor-parallel setting, exchanged in the handshake.
    tp: TpOptions,
    choice: TransportChoice,
    /// Most preferred first.
    transports: Vec<Box<dyn Transport>>,
    /// Transports `auto` could not open on this side, with the reason.
    unusable: Vec<Unusable>,
    peers: Arc<PeerRegistry>,
    closed: AtomicBool,
    close_lock: Mutex<()>,
    connect_timeout: Duration,
    auth_token: Option<Vec<u8>>,
    /// Connecting side: handshake nonces per peer key.
    connecting: Mutex<HashMap<String, ConnectAuth>>,
    /// Accepting side: the key its nonces are authenticated with (`auth::issue_nonce`),
    /// and the clock their issue times count from.
    challenge_key: Nonce,
    started: Instant,
    /// Accepting side: nonce_a of every hello accepted within the challenge lifetime
    /// (single use). Only hellos with a valid MAC get here, so only token holders fill it.
    used_nonces: Mutex<HashMap<Nonce, Instant>>,
    /// Accepting side: the fence registration each accepted hello may make (`listen_auth.rs`).
    listen_grants: listen_auth::Grants,
    watchdog: Arc<Watchdog>,
    /// Hands checked calls to their links, off the callers' threads (`submitter.rs`).
    submitter: submitter::Submitter<write::QueuedCall>,
    metrics: Arc<Metrics>,
    /// Connecting side: why each peer is reached over its transport.
    decisions: Mutex<HashMap<String, TransportDecision>>,
    /// Where peers that left are reported (`left.rs`).
    peer_left: left::LeftSlot,
    /// Writing side: the fences receivers asked this engine to honour (`fence.rs`).
    fences: Arc<fence::Fences>,
}

/// One communicator's engine. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

impl Engine {
    /// Checks the layout and the environment, and opens the transports.
    ///
    /// The memory at every key/value address must stay valid, readable and writable for
    /// `block_number × block_bytes` bytes until [`Engine::close`] has returned.
    pub fn new(options: EngineOptions) -> Result<Engine> {
        Self::with_known_host(options, &|_| false)
    }

    /// [`Engine::new`], where `known_host(addr)` is true for region addresses the caller
    /// knows are host memory (JavaScript buffers): CUDA is not asked about those. Every
    /// other region is looked up with CUDA, when the driver loads, and recorded as host or
    /// device memory.
    pub fn with_known_host(
        options: EngineOptions,
        known_host: &dyn Fn(u64) -> bool,
    ) -> Result<Engine> {
        // Every KVCACHE_* variable is validated here, whether or not an option overrides it.
        let settings = Settings::from_env()?;
        let choice = match options.transport.as_deref() {
            Some(text) => TransportChoice::parse(text, "transport")?,
            None => settings.transport,
        };
        check_name(&options.name).map_err(|reason| Error::invalid("name", reason))?;
        let bind_address = match &options.host {
            Some(host) => crate::config::listen_address(host)?,
            None => settings.bind_address,
        };
        let auth_token = match options.auth_token {
            Some(token) => Some(token),
            None => settings.auth_token.clone(),
        }
        .filter(|token| !token.is_empty());
        if let Some(token) = &auth_token {
            if token.len() > auth::MAX_TOKEN_BYTES {
                return Err(Error::invalid(
                    "authToken",
                    format!(
                        "{} bytes given; at most {}",
                        token.len(),
                        auth::MAX_TOKEN_BYTES
                    ),
                ));
            }
        }
        let mut table = RegionTable::with_scales(
            &options.keys,
            &options.values,
            &options.key_scales,
            &options.value_scales,
            options.block_number,
            options.block_bytes,
            options.scale_block_bytes,
        )?;
        options.tp.check(&table.layout)?;
        let imported_host = |addr: u64| {
            options
                .imports
                .iter()
                .any(|i| i.is_host() && addr >= i.address() && addr < i.address() + i.bytes())
        };
        gpu::detect_region_memory(&mut table, options.gpu_idx, &|addr| {
            known_host(addr) || imported_host(addr)
        })?;
        table.hold(options.imports);
        let table = Arc::new(table);
        let rdma = options
            .rdma_settings
            .unwrap_or(settings.rdma)
            .with_devices(options.rdma_devices)?;
        let metrics = Arc::new(Metrics::default());
        let opened = open_transports(
            choice,
            &OpenContext {
                table: &table,
                arrivals: &options.arrivals,
                gpu_idx: options.gpu_idx,
                bind_address,
                rdma: &rdma,
                metrics: &metrics,
            },
        )?;
        let inner = EngineInner {
            run_pool: Arc::default(),
            gpu_summer: Mutex::new(None),
            role: options.role,
            name: options.name,
            late_name: std::sync::OnceLock::new(),
            instance_id: crate::util::random_u64(),
            table,
            tp: options.tp,
            choice,
            transports: opened.usable,
            unusable: opened.unusable,
            peers: Arc::default(),
            closed: AtomicBool::new(false),
            close_lock: Mutex::new(()),
            connect_timeout: options.connect_timeout,
            auth_token,
            connecting: Mutex::new(HashMap::new()),
            challenge_key: auth::random_nonce(),
            started: Instant::now(),
            used_nonces: Mutex::new(HashMap::new()),
            listen_grants: Default::default(),
            watchdog: Arc::default(),
            submitter: Default::default(),
            metrics,
            decisions: Mutex::new(HashMap::new()),
            peer_left: Arc::default(),
            fences: Arc::default(),
        };
        let engine = Engine {
            inner: Arc::new(inner),
        };
        debug!(
            "engine {} ({}) ready: {} layers, blockNumber {}, blockBytes {}, transports {}",
            engine.inner.name(),
            engine.inner.role.as_str(),
            engine.inner.table.layout.layers,
            engine.inner.table.layout.block_number,
            engine.inner.table.layout.block_bytes,
            engine.transport_names().join(", ")
        );
        Ok(engine)
    }

    /// The layout of this engine's cache, as given at construction.
    pub fn layout(&self) -> CacheLayout {
        self.inner.table.layout
    }

    /// Where each region lives (host or GPU memory), in region order (layer-major, K then V).
    pub fn memory_kinds(&self) -> Vec<layout::MemoryKind> {
        self.inner.table.memory_kinds().to_vec()
    }

    /// The role given at construction.
    pub fn role(&self) -> Role {
        self.inner.role
    }

    /// The transports this engine has, most preferred first.
    pub fn transports(&self) -> Vec<TransportKind> {
        self.inner.transports.iter().map(|t| t.kind()).collect()
    }

    fn transport_names(&self) -> Vec<&'static str> {
        self.inner
            .transports
            .iter()
            .map(|t| t.kind().name())
            .collect()
    }

    /// The transport this engine prefers (the one `auto` picks with a peer that has it).
    pub fn transport_name(&self) -> &'static str {
        self.transport_names().first().copied().unwrap_or("none")
    }

    /// What a transport of this engine uses and why `auto` takes it, when it is open.
    pub fn transport_explanation(&self, kind: TransportKind) -> Option<Explanation> {
        self.transport(kind).map(|t| t.explain())
    }

    fn transport(&self, kind: TransportKind) -> Option<&dyn Transport> {
        self.inner
            .transports
            .iter()
            .find(|t| t.kind() == kind)
            .map(|t| t.as_ref())
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::SeqCst) {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    /// How `peer_key` is reached, or `None` when this engine has no link to it.
    pub fn peer_info(&self, peer_key: &str) -> Option<PeerInfo> {
        self.inner.peers.get(peer_key).map(|peer| PeerInfo {
            transport: peer.link.kind(),
            alive: peer.link.is_alive(),
            remote_block_number: peer.remote.block_number,
            rails: peer.link.rails(),
        })
    }

    /// Whether the engine is open and has a live link to `peer_key`.
    pub fn is_connected(&self, peer_key: &str) -> bool {
        !self.inner.closed.load(Ordering::SeqCst)
            && self.peer_info(peer_key).is_some_and(|info| info.alive)
    }

    /// Tears down the link to `peer_key` because of `error` (a timeout or an abort): when
    /// this returns no byte of any of its calls can land any more, and every pending call
    /// failed with `error`. Returns whether a link existed. Other peers are unaffected; a
    /// later `connect` makes a new link. The peer is reported as left ([`PeerLeft`], with
    /// `error`'s code), unless its link had already broken and been reported.
    pub fn cancel_peer(&self, peer_key: &str, error: Error) -> bool {
        self.tear_down(peer_key, error, true)
    }

    /// [`Engine::cancel_peer`] for a connection that its `connect` gave up on (it timed out
    /// or was aborted while the engine was still opening it): its caller never saw it
    /// connected, so it is not reported as a peer that left.
    pub fn abandon_connect(&self, peer_key: &str, error: Error) -> bool {
        self.tear_down(peer_key, error, false)
    }

    fn tear_down(&self, peer_key: &str, error: Error, report: bool) -> bool {
        // Calls made before the cancel are in the link when it is torn down.
        self.inner.submitter.flush();
        match self.inner.peers.remove(peer_key) {
            Some(peer) => {
                debug!("cancelling the link to {peer_key}: {error}");
                // Reported first: the link is not usable from now on.
                if report {
                    peer.left.report(
                        error.code(),
                        format!("the connection was torn down on request: {error}"),
                    );
                } else {
                    peer.left.silence();
                }
                peer.link.cancel(error);
                true
            }
            None => false,
        }
    }

    /// Counters since the engine was built: totals and per peer (see `metrics.rs` for what
    /// is counted where).
    pub fn metrics(&self) -> EngineMetrics {
        let Snapshots {
            total,
            untracked,
            peers,
        } = self.inner.metrics.snapshot();
        let peers = peers
            .into_iter()
            .map(|(peer, code, counters)| {
                let link = self.inner.peers.get(&peer);
                PeerMetrics {
                    rails: link.as_ref().map(|p| p.link.rails()).unwrap_or_default(),
                    resources: link.map(|p| p.link.resources()).unwrap_or_default(),
                    peer,
                    transport: TransportKind::from_code(code),
                    counters,
                }
            })
            .collect();
        EngineMetrics {
            total,
            untracked,
            peers,
        }
    }

    /// Counts a `writeCache` call to `peer_key` that the caller refused before it reached
    /// the engine (argument checks above it), with its error code: in the peer's counters
    /// when it is tracked, else in the untracked ones (no counters are created for it).
    pub fn count_refused_call(&self, peer_key: &str, code: &str) {
        self.inner.metrics.peer(peer_key).failed_code(code);
    }

    /// This side's name (what peers see in arrival notices).
    pub fn name(&self) -> &str {
        self.inner.name()
    }

    /// Sets this side's name once, before any connection (the default `hostname:port`
    /// becomes known only when the control port is bound). The rule of
    /// [`EngineOptions::name`] applies.
    pub fn set_name(&self, name: &str) -> Result<()> {
        check_name(name).map_err(|reason| Error::invalid("name", reason))?;
        self.inner
            .late_name
            .set(name.to_string())
            .map_err(|_| Error::invalid("name", "the name was already set"))
    }

    /// Live resources (for leak checks and monitoring).
    pub fn stats(&self) -> EngineStats {
        let (peers, live_links) = self.inner.peers.counts();
        EngineStats {
            peers,
            live_links,
            receivers: self.inner.transports.iter().map(|t| t.receivers()).sum(),
            registered_regions: self.inner.table.regions().len(),
            remembered_hellos: crate::util::lock(&self.inner.used_nonces).len(),
            open_fence_grants: self.inner.listen_grants.len(),
            timed_calls: self.inner.watchdog.tracked(),
            process_threads: std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count()),
            nic: self.inner.transports.iter().map(|t| t.resources()).fold(
                crate::transport::Resources::default(),
                |a, b| crate::transport::Resources {
                    queue_pairs: a.queue_pairs + b.queue_pairs,
                    completion_queues: a.completion_queues + b.completion_queues,
                    registered_bytes: a.registered_bytes + b.registered_bytes,
                },
            ),
        }
    }

    /// Closes every link and the listener. When it returns, no engine thread reads or
    /// writes the registered regions any more. Idempotent.
    pub fn close(&self) {
        self.inner.close();
    }
}

impl EngineInner {
    /// This side's name, as peers see it in arrival notices.
    fn name(&self) -> &str {
        self.late_name.get().unwrap_or(&self.name)
    }

    fn close(&self) {
        {
            let _guard = crate::util::lock(&self.close_lock);
            if self.closed.swap(true, Ordering::SeqCst) {
                return;
            }
        }
        // Calls made before the close reach their links, and fail with them below. No peer
        // is added once `closed` is set (the handshake checks it under `close_lock`).
        self.submitter.flush();
        let peers = {
            let _guard = crate::util::lock(&self.close_lock);
            self.peers.drain()
        };
        for peer in peers {
            // This side closes: no peer left.
            peer.left.silence();
            peer.link.shutdown();
        }
        self.submitter.stop();
        self.watchdog.stop();
        crate::util::lock(&self.connecting).clear();
        for transport in &self.transports {
            transport.shutdown();
        }
        debug!("engine {} closed", self.name());
    }
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.close();
    }
}
