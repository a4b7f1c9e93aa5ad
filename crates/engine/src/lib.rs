//! kvtransfer engine: moves KV-cache blocks from this process's registered regions into a
//! peer's pre-allocated blocks, over RDMA (one-sided WRITE) or TCP.
//!
//! The control plane (who talks to whom) lives above this crate: it carries the opaque
//! descriptors produced by [`Engine::hello`] and [`Engine::accept`] between the two sides.

pub mod auth;
pub mod config;
pub mod error;
pub mod gpu;
pub mod layout;
pub mod log;
pub mod plan;
pub mod transport;
pub mod wire;

use auth::{Challenge, Envelope, Nonce, Response};
use config::TransportChoice;
pub use error::{Error, Result};
use layout::{CacheLayout, RegionTable};
use plan::{BlockIds, PlanLimits};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};
use transport::rdma::{PendingQps, RdmaDevice};
use transport::tcp::{TcpLink, TcpServer, MAX_FRAME_PAYLOAD};
pub use transport::{
    Arrival, ArrivalSink, Completion, CompletionCallback, Done, Link, WriteJob, MAX_TAG_BYTES,
};
use transport::{DoneSlot, PooledRuns};
pub use wire::Role;
use wire::{Descriptor, MAX_NAME_BYTES};

/// A random u64 from the kernel (session tokens, instance ids, PSNs).
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: the destination range lies inside `bytes`.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if n > 0 {
            filled += n as usize;
        }
    }
    u64::from_ne_bytes(bytes)
}

/// How to build an engine.
pub struct EngineOptions {
    pub role: Role,
    pub gpu_idx: u32,
    /// The control-plane port (reported to peers as part of this side's name).
    pub name: String,
    /// Base address of each layer's key region.
    pub keys: Vec<u64>,
    /// Base address of each layer's value region, or empty for key-only caches.
    pub values: Vec<u64>,
    pub block_number: u32,
    pub block_bytes: u64,
    /// "auto" | "rdma" | "tcp"; `None` reads `KVCACHE_TRANSPORT`.
    pub transport: Option<String>,
    /// Receives arrival notices of tagged calls written into this engine's regions.
    pub arrivals: Option<ArrivalSink>,
    /// How long `finish_connect` may take to open the data connection.
    pub connect_timeout: Duration,
    /// RDMA settings; `None` reads them from the `KVCACHE_*` environment variables.
    pub rdma_settings: Option<config::RdmaSettings>,
    /// Shared secret both sides of a connection must know; `None` reads
    /// `KVCACHE_AUTH_TOKEN`; `Some(empty)` means no token regardless of the environment.
    pub auth_token: Option<Vec<u8>>,
}

/// How long a challenge stays usable.
const CHALLENGE_LIFETIME: Duration = Duration::from_secs(60);

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
    /// TCP data connections this side receives on.
    pub tcp_receivers: usize,
    /// Registered regions (per engine: layers × kinds).
    pub registered_regions: usize,
    /// Hellos accepted within the challenge lifetime, remembered to refuse replays.
    pub remembered_hellos: usize,
    /// Calls with a deadline the watchdog still tracks (completed ones are swept lazily).
    pub timed_calls: usize,
    /// Threads of the whole process.
    pub process_threads: usize,
}

/// A validated and planned `writeCache` call, not yet handed to its link.
struct PreparedWrite {
    peer: Arc<Peer>,
    runs: PooledRuns,
    layer: u32,
    blocks: u32,
    tag: Option<Vec<u8>>,
}

/// A call with a deadline, watched by the engine's watchdog thread.
struct Timed {
    deadline: Instant,
    seq: u64,
    peer_key: String,
    peer: Weak<Peer>,
    call: Weak<DoneSlot>,
    ms: u64,
}

impl PartialEq for Timed {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.seq) == (other.deadline, other.seq)
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.deadline, self.seq).cmp(&(other.deadline, other.seq))
    }
}

#[derive(Default)]
struct WatchState {
    heap: BinaryHeap<Reverse<Timed>>,
    next_seq: u64,
    next_sweep: usize,
    stop: bool,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Fails calls whose deadline passed: first tears their link down (no byte of them can
/// land afterwards), then reports `ERR_TIMEOUT`.
#[derive(Default)]
struct Watchdog {
    state: Mutex<WatchState>,
    wake: Condvar,
}

struct Peer {
    remote: CacheLayout,
    link: Box<dyn Link>,
}

struct EngineInner {
    /// Recycled buffers for planned runs.
    run_pool: Arc<transport::RunPool>,
    role: Role,
    name: String,
    instance_id: u64,
    table: Arc<RegionTable>,
    choice: TransportChoice,
    tcp: TcpServer,
    rdma: Option<RdmaDevice>,
    /// Queue pairs created by `hello` for a peer, until `finish_connect` uses them.
    pending_qps: Mutex<HashMap<String, PendingQps>>,
    peers: RwLock<HashMap<String, Arc<Peer>>>,
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
    watchdog: Arc<Watchdog>,
}

/// One communicator's engine. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

/// Transfer and connection counters of one peer, for `isConnected`-style queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub transport: &'static str,
    pub alive: bool,
    pub remote_block_number: u32,
}

impl Engine {
    /// Checks the layout and starts the data listener.
    ///
    /// The memory at every key/value address must stay valid, readable and writable for
    /// `block_number × block_bytes` bytes until [`Engine::close`] has returned.
    pub fn new(options: EngineOptions) -> Result<Engine> {
        Self::with_known_host(options, &|_| false)
    }

    /// [`Engine::new`], where `known_host(addr)` is true for region addresses the caller
    /// knows are host memory (JavaScript buffers): CUDA is not asked about those. Every
    /// other region is looked up with CUDA, when the driver loads, and recorded as host or
    /// device memory (see [`cuda::detect_region_memory`]).
    pub fn with_known_host(
        options: EngineOptions,
        known_host: &dyn Fn(u64) -> bool,
    ) -> Result<Engine> {
        let choice = TransportChoice::resolve(options.transport.as_deref())?;
        if options.name.len() > MAX_NAME_BYTES {
            return Err(Error::invalid(
                "name",
                format!(
                    "{} bytes given; at most {MAX_NAME_BYTES}",
                    options.name.len()
                ),
            ));
        }
        let mut table = RegionTable::new(
            &options.keys,
            &options.values,
            options.block_number,
            options.block_bytes,
        )?;
        gpu::detect_region_memory(&mut table, options.gpu_idx, known_host)?;
        let table = Arc::new(table);
        let settings = || {
            options
                .rdma_settings
                .clone()
                .map_or_else(config::RdmaSettings::from_env, Ok)
        };
        let rdma = match choice {
            TransportChoice::Tcp => None,
            TransportChoice::Rdma => Some(RdmaDevice::open(
                settings()?,
                options.gpu_idx,
                table.clone(),
                options.arrivals.clone(),
            )?),
            TransportChoice::Auto => {
                match settings().and_then(|settings| {
                    RdmaDevice::open(
                        settings,
                        options.gpu_idx,
                        table.clone(),
                        options.arrivals.clone(),
                    )
                }) {
                    Ok(device) => Some(device),
                    Err(e) => {
                        debug!("transport 'auto': RDMA not usable ({e}); using TCP");
                        None
                    }
                }
            }
        };
        let auth_token = match options.auth_token {
            Some(token) => Some(token),
            None => std::env::var("KVCACHE_AUTH_TOKEN")
                .ok()
                .map(String::into_bytes),
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
        let tcp = TcpServer::bind(config::bind_address()?, table.clone(), options.arrivals)?;
        debug!(
            "engine {} ({}) ready: {} layers, blockNumber {}, blockBytes {}, data port {}",
            options.name,
            options.role.as_str(),
            table.layout.layers,
            table.layout.block_number,
            table.layout.block_bytes,
            tcp.port()
        );
        Ok(Engine {
            inner: Arc::new(EngineInner {
                run_pool: Arc::default(),
                role: options.role,
                name: options.name,
                instance_id: random_u64(),
                table,
                choice,
                tcp,
                rdma,
                pending_qps: Mutex::new(HashMap::new()),
                peers: RwLock::new(HashMap::new()),
                closed: AtomicBool::new(false),
                close_lock: Mutex::new(()),
                connect_timeout: options.connect_timeout,
                auth_token,
                connecting: Mutex::new(HashMap::new()),
                challenge_key: auth::random_nonce(),
                started: Instant::now(),
                used_nonces: Mutex::new(HashMap::new()),
                watchdog: Arc::default(),
            }),
        })
    }

    pub fn layout(&self) -> CacheLayout {
        self.inner.table.layout
    }

    /// Where each region lives (host or GPU memory), in region order (layer-major, K then V).
    pub fn memory_kinds(&self) -> Vec<layout::MemoryKind> {
        self.inner.table.memory_kinds().to_vec()
    }

    pub fn role(&self) -> Role {
        self.inner.role
    }

    /// The transport this engine offers: "rdma" when a device is open, else "tcp".
    pub fn transport_name(&self) -> &'static str {
        if self.inner.rdma.is_some() {
            "rdma"
        } else {
            "tcp"
        }
    }

    /// The RDMA device and GID index in use, when RDMA is.
    pub fn rdma_device(&self) -> Option<(String, u8)> {
        self.inner
            .rdma
            .as_ref()
            .map(|d| (d.device_name().to_string(), d.gid_index()))
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::SeqCst) {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    fn descriptor(&self, session: u64) -> Descriptor {
        let layout = self.inner.table.layout;
        Descriptor {
            role: self.inner.role,
            instance_id: self.inner.instance_id,
            layers: layout.layers,
            has_value: layout.has_value,
            block_number: layout.block_number,
            block_bytes: layout.block_bytes,
            name: self.inner.name.clone(),
            tcp_port: self.inner.tcp.port(),
            session,
            rdma: None,
        }
    }

    /// Layer count, K/V presence and blockBytes must match; blockNumber may differ.
    fn check_compatible(&self, peer: &str, remote: &Descriptor) -> Result<CacheLayout> {
        let local = self.inner.table.layout;
        let mismatch = |what, local: u64, remote: u64| Error::LayoutMismatch {
            here: self.inner.name.clone(),
            peer: peer.to_string(),
            what,
            local,
            remote,
        };
        if remote.layers != local.layers {
            return Err(mismatch(
                "layer count",
                local.layers.into(),
                remote.layers.into(),
            ));
        }
        if remote.block_bytes != local.block_bytes {
            return Err(mismatch(
                "blockBytes",
                local.block_bytes,
                remote.block_bytes,
            ));
        }
        if remote.has_value != local.has_value {
            return Err(mismatch(
                "value cache regions per layer",
                local.has_value.into(),
                remote.has_value.into(),
            ));
        }
        CacheLayout::new(
            remote.layers,
            remote.has_value,
            remote.block_number,
            remote.block_bytes,
        )
    }

    /// Whether this engine requires the shared-secret handshake.
    pub fn has_auth_token(&self) -> bool {
        self.inner.auth_token.is_some()
    }

    /// First handshake message of `connect(peer_key)`: this side's nonce (nothing else is
    /// revealed before the acceptor proved it knows the shared secret).
    pub fn auth_challenge(&self, peer_key: &str) -> Result<Vec<u8>> {
        self.check_open()?;
        let nonce_c = auth::random_nonce();
        self.inner
            .connecting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                peer_key.to_string(),
                ConnectAuth {
                    nonce_c,
                    nonce_a: None,
                },
            );
        Ok(Challenge {
            has_token: self.has_auth_token(),
            nonce_c,
        }
        .encode())
    }

    /// Accepting side, first message: answers a challenge with this side's nonce and its
    /// proof of the shared secret. Refuses (`ERR_AUTH`) when only one side has a token.
    pub fn auth_respond(&self, challenge: &[u8]) -> Result<Vec<u8>> {
        self.check_open()?;
        let challenge =
            Challenge::decode(challenge).map_err(|e| Error::protocol("connecting peer", e.0))?;
        let token = self.inner.auth_token.as_deref();
        self.check_token_presence(challenge.has_token)?;
        let nonce_a = auth::issue_nonce(
            &self.inner.challenge_key,
            &challenge.nonce_c,
            self.clock_ms(),
        );
        let proof = token.map_or([0; auth::MAC_BYTES], |token| {
            auth::mac(token, auth::LABEL_ACCEPTOR, &[&challenge.nonce_c, &nonce_a])
        });
        Ok(Response {
            has_token: token.is_some(),
            nonce_a,
            proof,
        }
        .encode())
    }

    /// Milliseconds since this engine started: the clock of its challenge nonces.
    fn clock_ms(&self) -> u64 {
        self.inner.started.elapsed().as_millis() as u64
    }

    /// A token on one side only is refused before anything else is looked at.
    fn check_token_presence(&self, peer_has_token: bool) -> Result<()> {
        match (self.inner.auth_token.is_some(), peer_has_token) {
            (true, false) => Err(self.refuse_auth(
                "the connecting peer has no auth token but this side requires one (KVCACHE_AUTH_TOKEN / authToken)",
            )),
            (false, true) => Err(self.refuse_auth(
                "the connecting peer uses an auth token but this side has none (KVCACHE_AUTH_TOKEN / authToken)",
            )),
            _ => Ok(()),
        }
    }

    fn refuse_auth(&self, reason: &str) -> Error {
        crate::log_error!(
            "engine {}: refused a connecting peer: authentication failed: {reason}",
            self.inner.name
        );
        Error::Auth {
            peer: "connecting peer".into(),
            reason: reason.into(),
        }
    }

    /// Second message of `connect(peer_key)`, after the acceptor's `response`: checks the
    /// acceptor's proof (when a token is set), then returns this side's descriptor (with
    /// fresh queue pairs for the peer when RDMA is available) in an authenticated envelope.
    pub fn hello(&self, peer_key: &str, response: &[u8]) -> Result<Vec<u8>> {
        self.check_open()?;
        let response = Response::decode(response).map_err(|e| Error::protocol(peer_key, e.0))?;
        let nonce_c = {
            let mut connecting = self
                .inner
                .connecting
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let state = connecting.get_mut(peer_key).ok_or_else(|| {
                Error::protocol(
                    peer_key,
                    "no challenge was sent to this peer (call auth_challenge first)",
                )
            })?;
            state.nonce_a = Some(response.nonce_a);
            state.nonce_c
        };
        let auth_error = |reason: &str| Error::Auth {
            peer: peer_key.to_string(),
            reason: reason.to_string(),
        };
        let token = self.inner.auth_token.as_deref();
        match (token, response.has_token) {
            (Some(_), false) => return Err(auth_error("the peer has no auth token but this side requires one (KVCACHE_AUTH_TOKEN / authToken); nothing was sent")),
            (None, true) => return Err(auth_error("the peer requires an auth token but this side has none (set KVCACHE_AUTH_TOKEN or the authToken option)")),
            (Some(token), true) => {
                if !auth::verify(
                    token,
                    auth::LABEL_ACCEPTOR,
                    &[&nonce_c, &response.nonce_a],
                    &response.proof,
                ) {
                    return Err(auth_error("the peer's proof of the shared secret does not match: the two sides have different auth tokens; nothing was sent"));
                }
            }
            (None, false) => {}
        }
        let mut descriptor = self.descriptor(0);
        if let Some(device) = &self.inner.rdma {
            let pending = device.create_qps()?;
            descriptor.rdma = Some(device.endpoint(&pending, (0, 0, 0)));
            self.inner
                .pending_qps
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(peer_key.to_string(), pending);
        }
        let descriptor = descriptor.encode();
        let mac = token.map_or([0; auth::MAC_BYTES], |token| {
            auth::mac(
                token,
                auth::LABEL_HELLO,
                &[&nonce_c, &response.nonce_a, &descriptor],
            )
        });
        Ok(Envelope {
            has_token: token.is_some(),
            nonce_c,
            nonce_a: response.nonce_a,
            mac,
            descriptor,
        }
        .encode())
    }

    /// Answers a peer's hello: checks its layout and admits its data connection (RDMA
    /// queue pairs connected to the peer's when both sides have RDMA, else a TCP session).
    pub fn accept(&self, hello: &[u8]) -> Result<Vec<u8>> {
        self.check_open()?;
        let envelope =
            Envelope::decode(hello).map_err(|e| Error::protocol("connecting peer", e.0))?;
        let token = self.inner.auth_token.as_deref();
        self.check_token_presence(envelope.has_token)?;
        // Both sides have a token here (presence was checked above).
        if let Some(token) = token {
            let issued_ms = auth::nonce_issued_at(
                &self.inner.challenge_key,
                &envelope.nonce_c,
                &envelope.nonce_a,
            );
            let lifetime_ms = CHALLENGE_LIFETIME.as_millis() as u64;
            let expired_or_foreign =
                issued_ms.is_none_or(|ms| self.clock_ms().saturating_sub(ms) >= lifetime_ms);
            if expired_or_foreign {
                return Err(self.refuse_auth(
                    "the hello answers no challenge this side issued (unknown or expired nonce)",
                ));
            }
            if !auth::verify(
                token,
                auth::LABEL_HELLO,
                &[&envelope.nonce_c, &envelope.nonce_a, &envelope.descriptor],
                &envelope.mac,
            ) {
                return Err(self.refuse_auth(
                        "the hello's MAC does not match: the connecting peer does not know this side's auth token",
                    ));
            }
            let mut used = self
                .inner
                .used_nonces
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            used.retain(|_, at| at.elapsed() < CHALLENGE_LIFETIME);
            if used.insert(envelope.nonce_a, Instant::now()).is_some() {
                return Err(self.refuse_auth(
                    "the hello answers a challenge that was already used (a replayed hello)",
                ));
            }
        }
        let remote = Descriptor::decode(&envelope.descriptor)
            .map_err(|e| Error::protocol("connecting peer", e.0))?;
        let peer_name = if remote.name.is_empty() {
            format!("{:016x}", remote.instance_id)
        } else {
            remote.name.clone()
        };
        self.check_compatible(&peer_name, &remote)?;
        let mut reply = self.descriptor(0);
        match (&self.inner.rdma, &remote.rdma) {
            (Some(device), Some(theirs)) => {
                let pending = device.create_qps()?;
                reply.rdma =
                    Some(device.accept(&peer_name, remote.instance_id, pending, theirs)?);
            }
            (Some(_), None) if self.inner.choice == TransportChoice::Rdma => {
                return Err(Error::RdmaUnavailable {
                    reason: format!("peer {peer_name} offers no RDMA but this side was created with transport 'rdma'"),
                });
            }
            _ => reply.session = self.inner.tcp.admit(&peer_name),
        }
        debug!(
            "accepted hello from {peer_name} ({}) over {}",
            remote.role.as_str(),
            if reply.rdma.is_some() { "rdma" } else { "tcp" }
        );
        let reply = reply.encode();
        let mac = token.map_or([0; auth::MAC_BYTES], |token| {
            auth::mac(
                token,
                auth::LABEL_REPLY,
                &[&envelope.nonce_c, &envelope.nonce_a, &reply],
            )
        });
        Ok(Envelope {
            has_token: token.is_some(),
            nonce_c: envelope.nonce_c,
            nonce_a: envelope.nonce_a,
            mac,
            descriptor: reply,
        }
        .encode())
    }

    /// Completes `connect(host, port)` with the acceptor's reply: opens the data path and
    /// registers the peer under `peer_key` (replacing an earlier connection).
    pub fn finish_connect(&self, peer_key: &str, host: &str, reply: &[u8]) -> Result<()> {
        self.check_open()?;
        let envelope = Envelope::decode(reply).map_err(|e| Error::protocol(peer_key, e.0))?;
        let state = self
            .inner
            .connecting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(peer_key);
        if let Some(token) = self.inner.auth_token.as_deref() {
            let matches = state.is_some_and(|state| {
                state.nonce_c == envelope.nonce_c && state.nonce_a == Some(envelope.nonce_a)
            });
            if !envelope.has_token
                || !matches
                || !auth::verify(
                    token,
                    auth::LABEL_REPLY,
                    &[&envelope.nonce_c, &envelope.nonce_a, &envelope.descriptor],
                    &envelope.mac,
                )
            {
                self.inner
                    .pending_qps
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(peer_key);
                return Err(Error::Auth {
                    peer: peer_key.to_string(),
                    reason: "the peer's reply is not authenticated by the shared secret".into(),
                });
            }
        }
        let remote =
            Descriptor::decode(&envelope.descriptor).map_err(|e| Error::protocol(peer_key, e.0))?;
        let remote_layout = self.check_compatible(peer_key, &remote)?;
        let pending = self
            .inner
            .pending_qps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(peer_key);
        let link: Box<dyn Link> = match (&self.inner.rdma, pending, &remote.rdma) {
            (Some(device), Some(pending), Some(theirs)) => {
                Box::new(device.connect(peer_key, pending, theirs)?)
            }
            _ if self.inner.choice == TransportChoice::Rdma => {
                return Err(Error::RdmaUnavailable {
                    reason: format!("peer {peer_key} offers no RDMA but this side was created with transport 'rdma'"),
                });
            }
            _ => {
                if remote.session == 0 || remote.tcp_port == 0 {
                    return Err(Error::protocol(
                        peer_key,
                        "the reply carries no data-connection admission",
                    ));
                }
                let addr = resolve(host, remote.tcp_port)
                    .map_err(|e| Error::io(peer_key, "resolve host", e))?;
                Box::new(TcpLink::connect(
                    peer_key,
                    addr,
                    remote.session,
                    self.inner.table.clone(),
                    self.inner.connect_timeout,
                )?)
            }
        };
        let transport = link.transport_name();
        let peer = Arc::new(Peer {
            remote: remote_layout,
            link,
        });
        let replaced = {
            let _guard = self
                .inner
                .close_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if self.inner.closed.load(Ordering::SeqCst) {
                peer.link.shutdown();
                return Err(Error::Closed);
            }
            self.inner
                .peers
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(peer_key.to_string(), peer)
        };
        if let Some(old) = replaced {
            old.link.shutdown();
        }
        debug!("connected to {peer_key} over {transport}");
        Ok(())
    }

    pub fn peer_info(&self, peer_key: &str) -> Option<PeerInfo> {
        let peers = self.inner.peers.read().unwrap_or_else(|p| p.into_inner());
        peers.get(peer_key).map(|peer| PeerInfo {
            transport: peer.link.transport_name(),
            alive: peer.link.is_alive(),
            remote_block_number: peer.remote.block_number,
        })
    }

    pub fn is_connected(&self, peer_key: &str) -> bool {
        !self.inner.closed.load(Ordering::SeqCst)
            && self.peer_info(peer_key).is_some_and(|info| info.alive)
    }

    /// Validates and queues one `writeCache` call. Errors here mean nothing was sent.
    pub fn write_cache(
        &self,
        peer_key: &str,
        local: BlockIds<'_>,
        remote: BlockIds<'_>,
        layer: f64,
        tag: Option<Vec<u8>>,
    ) -> Result<Completion> {
        self.write_cache_until(peer_key, local, remote, layer, tag, None)
    }

    /// [`Engine::write_cache`] with a deadline: when the call has not completed by then,
    /// the link to the peer is torn down (TCP: reset, writer stopped; RDMA: queue pairs
    /// destroyed) and only then does the call fail with `ERR_TIMEOUT`; the link's other
    /// pending calls fail with `ERR_PEER_DISCONNECTED`. Other peers are unaffected.
    pub fn write_cache_until(
        &self,
        peer_key: &str,
        local: BlockIds<'_>,
        remote: BlockIds<'_>,
        layer: f64,
        tag: Option<Vec<u8>>,
        deadline: Option<Instant>,
    ) -> Result<Completion> {
        let write = self.prepare_write(peer_key, local, remote, layer, tag)?;
        let (done, completion) = Done::new();
        self.submit_write(peer_key, write, done, deadline);
        Ok(completion)
    }

    /// [`Engine::write_cache_until`] that passes the outcome to `on_done` instead of
    /// returning a `Completion`. `on_done` is called exactly once when this returns `Ok`
    /// (possibly before it returns), and never when it returns an error.
    #[allow(clippy::too_many_arguments)]
    pub fn write_cache_with_callback(
        &self,
        peer_key: &str,
        local: BlockIds<'_>,
        remote: BlockIds<'_>,
        layer: f64,
        tag: Option<Vec<u8>>,
        deadline: Option<Instant>,
        on_done: CompletionCallback,
    ) -> Result<()> {
        let write = self.prepare_write(peer_key, local, remote, layer, tag)?;
        self.submit_write(peer_key, write, Done::with_callback(on_done), deadline);
        Ok(())
    }

    /// Validates and plans one call; errors here mean nothing was sent.
    fn prepare_write(
        &self,
        peer_key: &str,
        local: BlockIds<'_>,
        remote: BlockIds<'_>,
        layer: f64,
        tag: Option<Vec<u8>>,
    ) -> Result<PreparedWrite> {
        self.check_open()?;
        let layout = self.inner.table.layout;
        let layer = layout.check_layer(layer)?;
        if let Some(tag) = &tag {
            if tag.len() > MAX_TAG_BYTES {
                return Err(Error::invalid(
                    "tag",
                    format!("{} bytes given; at most {MAX_TAG_BYTES}", tag.len()),
                ));
            }
        }
        let peer = {
            let peers = self.inner.peers.read().unwrap_or_else(|p| p.into_inner());
            peers
                .get(peer_key)
                .cloned()
                .ok_or_else(|| Error::NotConnected {
                    peer: peer_key.to_string(),
                })?
        };
        if !peer.link.is_alive() {
            return Err(Error::PeerDisconnected {
                peer: peer_key.to_string(),
                reason: "the connection broke; connect again".into(),
            });
        }
        let limits = PlanLimits::new(
            layout.block_number,
            peer.remote.block_number,
            layout.block_bytes,
            MAX_FRAME_PAYLOAD,
        );
        // A recycled buffer: it moves to the transport with the job and comes back to the
        // pool when the transport is done with it, so steady traffic does not allocate here.
        let mut runs = self.inner.run_pool.take();
        plan::plan_runs(local, remote, limits, &mut runs)?;
        let runs = self.inner.run_pool.pooled(runs);
        let blocks = u32::try_from(local.len()).unwrap_or(u32::MAX);
        Ok(PreparedWrite {
            peer,
            runs,
            layer,
            blocks,
            tag,
        })
    }

    /// Hands a prepared call to its link (or completes it at once when it has nothing to
    /// send), watching its deadline.
    fn submit_write(
        &self,
        peer_key: &str,
        write: PreparedWrite,
        done: Done,
        deadline: Option<Instant>,
    ) {
        let PreparedWrite {
            peer,
            runs,
            layer,
            blocks,
            tag,
        } = write;
        if runs.is_empty() && tag.is_none() {
            let _ = done.send(Ok(()));
            return;
        }
        if let Some(deadline) = deadline {
            self.watch(peer_key, &peer, &done, deadline);
        }
        peer.link.submit(WriteJob {
            runs,
            layer,
            blocks,
            tag,
            done,
        });
    }

    fn watch(&self, peer_key: &str, peer: &Arc<Peer>, done: &Done, deadline: Instant) {
        let watchdog = &self.inner.watchdog;
        let mut state = watchdog.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.stop {
            return;
        }
        if state.thread.is_none() {
            let engine = Arc::downgrade(&self.inner);
            let dog = watchdog.clone();
            match std::thread::Builder::new()
                .name("kvt-deadline".into())
                .spawn(move || run_watchdog(&dog, &engine))
            {
                Ok(thread) => state.thread = Some(thread),
                Err(e) => crate::log_error!("cannot start the deadline thread: {e}"),
            }
        }
        if state.heap.len() >= state.next_sweep.max(1024) {
            state
                .heap
                .retain(|Reverse(t)| t.call.upgrade().is_some_and(|c| c.is_pending()));
            state.next_sweep = state.heap.len() * 2;
        }
        state.next_seq += 1;
        let seq = state.next_seq;
        let ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis()
            .try_into()
            .unwrap_or(u64::MAX);
        state.heap.push(Reverse(Timed {
            deadline,
            seq,
            peer_key: peer_key.to_string(),
            peer: Arc::downgrade(peer),
            call: done.watch(),
            ms,
        }));
        // The deadline thread sleeps until the earliest deadline: wake it only when this
        // one is the new earliest (a futex wake per call cost ~1 µs of the call's overhead).
        let earliest = state.heap.peek().is_some_and(|Reverse(top)| top.seq == seq);
        drop(state);
        if earliest {
            watchdog.wake.notify_one();
        }
    }

    /// Tears down the link to `peer_key` because of `error` (a timeout or an abort): when
    /// this returns no byte of any of its calls can land any more, and every pending call
    /// failed with `error`. Returns whether a link existed. Other peers are unaffected; a
    /// later `connect` makes a new link.
    pub fn cancel_peer(&self, peer_key: &str, error: Error) -> bool {
        let peer = self
            .inner
            .peers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(peer_key);
        match peer {
            Some(peer) => {
                crate::debug!("cancelling the link to {peer_key}: {error}");
                peer.link.cancel(error);
                true
            }
            None => false,
        }
    }

    /// Live resources (for leak checks and monitoring).
    pub fn stats(&self) -> EngineStats {
        let peers = self.inner.peers.read().unwrap_or_else(|p| p.into_inner());
        EngineStats {
            peers: peers.len(),
            live_links: peers.values().filter(|p| p.link.is_alive()).count(),
            tcp_receivers: self.inner.tcp.connections(),
            registered_regions: self.inner.table.regions().len(),
            remembered_hellos: self
                .inner
                .used_nonces
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len(),
            timed_calls: self
                .inner
                .watchdog
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .heap
                .len(),
            process_threads: std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count()),
        }
    }

    /// Closes every link and the listener. When it returns, no engine thread reads or
    /// writes the registered regions any more. Idempotent.
    pub fn close(&self) {
        self.inner.close();
    }
}

fn run_watchdog(dog: &Watchdog, engine: &Weak<EngineInner>) {
    let mut state = dog.state.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if state.stop {
            return;
        }
        let now = Instant::now();
        let wait = match state.heap.peek() {
            None => None,
            Some(Reverse(top)) if top.deadline > now => Some(top.deadline - now),
            Some(_) => {
                let Some(Reverse(timed)) = state.heap.pop() else {
                    continue;
                };
                drop(state);
                expire(&timed, engine);
                state = dog.state.lock().unwrap_or_else(|p| p.into_inner());
                continue;
            }
        };
        state = match wait {
            None => dog.wake.wait(state).unwrap_or_else(|p| p.into_inner()),
            Some(wait) => {
                dog.wake
                    .wait_timeout(state, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        };
    }
}

/// A call's deadline passed: tear its link down, then fail it with `ERR_TIMEOUT`.
fn expire(timed: &Timed, engine: &Weak<EngineInner>) {
    let Some(call) = timed.call.upgrade() else {
        return;
    };
    if !call.is_pending() {
        return;
    }
    let peer_key = &timed.peer_key;
    let timeout = || {
        Error::Timeout {
        ms: timed.ms,
        what: format!("writeCache to {peer_key} was not acknowledged; the connection was torn down first, so none of its bytes can land any more"),
    }
    };
    call.override_failure(timeout());
    if let Some(peer) = timed.peer.upgrade() {
        if let Some(inner) = engine.upgrade() {
            let mut peers = inner.peers.write().unwrap_or_else(|p| p.into_inner());
            if peers.get(peer_key).is_some_and(|p| Arc::ptr_eq(p, &peer)) {
                peers.remove(peer_key);
            }
        }
        crate::log_error!(
            "writeCache to {peer_key} timed out after {} ms: tearing the connection down",
            timed.ms
        );
        peer.link.cancel(Error::PeerDisconnected {
            peer: peer_key.clone(),
            reason: format!(
                "the connection was torn down because a call to this peer timed out after {} ms; connect again",
                timed.ms
            ),
        });
    }
    // Normally already failed by the teardown; covers a link that was closed meanwhile.
    call.complete(Err(timeout()));
}

impl EngineInner {
    fn close(&self) {
        let peers: Vec<Arc<Peer>> = {
            let _guard = self.close_lock.lock().unwrap_or_else(|p| p.into_inner());
            if self.closed.swap(true, Ordering::SeqCst) {
                return;
            }
            self.peers
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .drain()
                .map(|(_, p)| p)
                .collect()
        };
        for peer in peers {
            peer.link.shutdown();
        }
        let watchdog_thread = {
            let mut state = self
                .watchdog
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            state.stop = true;
            state.heap.clear();
            state.thread.take()
        };
        self.watchdog.wake.notify_all();
        if let Some(thread) = watchdog_thread {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
        self.connecting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.pending_qps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        if let Some(device) = &self.rdma {
            device.shutdown();
        }
        self.tcp.shutdown();
        debug!("engine {} closed", self.name);
    }
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.close();
    }
}

fn resolve(host: &str, port: u16) -> std::io::Result<SocketAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    (host, port).to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no address for host '{host}'"),
        )
    })
}
