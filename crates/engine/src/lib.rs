//! kvtransfer engine: moves KV-cache blocks from this process's registered regions into a
//! peer's pre-allocated blocks, over RDMA (one-sided WRITE) or TCP.
//!
//! The control plane (who talks to whom) lives above this crate: it carries the opaque
//! descriptors produced by [`Engine::hello`] and [`Engine::accept`] between the two sides.

pub mod config;
pub mod error;
pub mod layout;
pub mod log;
pub mod plan;
pub mod transport;
pub mod wire;

use config::TransportChoice;
pub use error::{Error, Result};
use layout::{CacheLayout, RegionTable};
use plan::{BlockIds, PlanLimits, Run};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use transport::rdma::{PendingQps, RdmaDevice};
use transport::tcp::{TcpLink, TcpServer, MAX_FRAME_PAYLOAD};
pub use transport::{Arrival, ArrivalSink, Completion, Link, WriteJob, MAX_TAG_BYTES};
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
}

struct Peer {
    remote: CacheLayout,
    link: Box<dyn Link>,
}

struct EngineInner {
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
        let table = Arc::new(RegionTable::new(
            &options.keys,
            &options.values,
            options.block_number,
            options.block_bytes,
        )?);
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
            }),
        })
    }

    pub fn layout(&self) -> CacheLayout {
        self.inner.table.layout
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

    /// First handshake message of `connect(peer_key)`: this side's descriptor, with fresh
    /// queue pairs for the peer when RDMA is available.
    pub fn hello(&self, peer_key: &str) -> Result<Vec<u8>> {
        self.check_open()?;
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
        Ok(descriptor.encode())
    }

    /// Answers a peer's hello: checks its layout and admits its data connection (RDMA
    /// queue pairs connected to the peer's when both sides have RDMA, else a TCP session).
    pub fn accept(&self, hello: &[u8]) -> Result<Vec<u8>> {
        self.check_open()?;
        let remote =
            Descriptor::decode(hello).map_err(|e| Error::protocol("connecting peer", e.0))?;
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
        Ok(reply.encode())
    }

    /// Completes `connect(host, port)` with the acceptor's reply: opens the data path and
    /// registers the peer under `peer_key` (replacing an earlier connection).
    pub fn finish_connect(&self, peer_key: &str, host: &str, reply: &[u8]) -> Result<()> {
        self.check_open()?;
        let remote = Descriptor::decode(reply).map_err(|e| Error::protocol(peer_key, e.0))?;
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
        let mut runs: Vec<Run> = Vec::new();
        plan::plan_runs(local, remote, limits, &mut runs)?;
        let (done, completion) = futures_channel::oneshot::channel();
        let blocks = u32::try_from(local.len()).unwrap_or(u32::MAX);
        if runs.is_empty() && tag.is_none() {
            let _ = done.send(Ok(()));
            return Ok(completion);
        }
        peer.link.submit(WriteJob {
            runs,
            layer,
            blocks,
            tag,
            done,
        });
        Ok(completion)
    }

    /// Closes every link and the listener. When it returns, no engine thread reads or
    /// writes the registered regions any more. Idempotent.
    pub fn close(&self) {
        self.inner.close();
    }
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
