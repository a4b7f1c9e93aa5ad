//! NVLink transport: KV blocks copied by the GPU straight into another process's GPU
//! memory on the same host (CUDA IPC; over NVLink where the GPUs are joined by it, else
//! PCIe peer-to-peer, or within one GPU).
//!
//! - The acceptor (owner of the blocks) exports its regions once ([`memory::Exports`]):
//!   `cuMemAlloc` memory as legacy IPC handles on each allocation's base, `cuMemCreate`
//!   memory as POSIX file descriptors. The handshake reply carries its host identity, GPUs
//!   and an abstract Unix socket with a session; the writer connects there, receives the
//!   table (descriptors as `SCM_RIGHTS`) and imports it ([`memory::Imports`]).
//! - The writer's link ([`link`]) queues each call as one submission on its own stream
//!   and completes it once its event has passed; the arrival notice travels the socket
//!   after that. See docs/architecture.md, "NVLink: ordering and visibility".
//! - Usable only when every region on both sides is device memory, both processes run on
//!   one host in one network namespace, and the writer's GPU can access the acceptor's
//!   GPUs; otherwise `check_peer` says which of these failed and `auto` moves on.

mod endpoint;
mod link;
mod memory;
mod message;
mod server;
mod socket;

pub use endpoint::NvlinkEndpoint;
pub use memory::MemoryTable as NvlinkMemoryTable;

use super::{
    AcceptingPeer, ConnectTarget, Explanation, Link, Transport, TransportDetails, TransportKind,
};
use crate::error::{Error, Result};
use crate::gpu::checksum::CrcKernel;
use crate::layout::RegionTable;
use crate::transport::ArrivalSink;
use endpoint::{host_identity, network_namespace, process_token, uuid_text};
use kvtransfer_cuda::Gpu;
use link::NvlinkLink;
use memory::{Imports, MemoryTable};
use server::NvlinkServer;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::sync::Arc;

/// What the NVLink transport uses on this side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvlinkDetails {
    /// `GPU 0 NVIDIA H100 (GPU-…)`: the GPU that runs this side's copies.
    pub gpu: String,
    /// GPUs it can access (itself included).
    pub reachable_gpus: usize,
}

impl NvlinkDetails {
    pub(crate) fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("gpu", self.gpu.clone()),
            ("reachableGpus", self.reachable_gpus.to_string()),
        ]
    }
}

pub(crate) struct NvlinkTransport {
    table: Arc<RegionTable>,
    /// The GPU that runs this side's copies (gpuIdx).
    gpu: Arc<Gpu>,
    uuid: [u8; 16],
    /// GPUs `gpu` can access (itself included), by UUID.
    reachable: Vec<[u8; 16]>,
    server: NvlinkServer,
    /// The CRC-32C kernel of `gpu` (checksummed calls: the writer's sums and the
    /// receiver's), loaded on first use.
    crc: Arc<CrcKernel>,
}

fn unavailable(reason: impl Into<String>) -> Error {
    TransportKind::Nvlink.unavailable(reason.into())
}

impl NvlinkTransport {
    pub fn open(
        gpu_idx: u32,
        table: Arc<RegionTable>,
        arrivals: Option<ArrivalSink>,
    ) -> Result<NvlinkTransport> {
        let host: Vec<usize> = (0..table.regions().len())
            .filter(|&i| !table.memory(i as u32).is_device())
            .collect();
        if !host.is_empty() {
            return Err(unavailable(format!(
                "{} of {} regions are host memory (NVLink needs every region in GPU memory on both sides)",
                host.len(),
                table.regions().len()
            )));
        }
        // Only now the driver: host-only engines never load it here.
        let cuda =
            crate::gpu::driver().map_err(|e| unavailable(format!("no CUDA driver ({e})")))?;
        cuda.sharing_supported().map_err(|e| {
            unavailable(format!(
                "the CUDA driver cannot share memory between processes ({e})"
            ))
        })?;
        let gpu = cuda.gpu(gpu_idx)?;
        let uuid = gpu.uuid()?;
        let mut reachable = Vec::new();
        for ordinal in 0..cuda.device_count()? {
            let other = cuda.gpu(ordinal)?;
            if gpu.can_access_peer(&other)? {
                reachable.push(other.uuid()?);
            }
        }
        let crc = Arc::new(CrcKernel::new(Arc::clone(&gpu)));
        let server = NvlinkServer::bind(Arc::clone(&table), Arc::clone(&crc), arrivals)
            .map_err(|e| unavailable(format!("cannot listen on an abstract Unix socket ({e})")))?;
        crate::log::debug!(
            "nvlink: GPU {gpu_idx} ({}) reaches {} GPUs; side channel @{}",
            uuid_text(&uuid),
            reachable.len(),
            server.name()
        );
        Ok(NvlinkTransport {
            table,
            gpu,
            uuid,
            reachable,
            server,
            crc,
        })
    }

    fn endpoint(&self, gpus: Vec<[u8; 16]>, socket: String, session: u64) -> NvlinkEndpoint {
        NvlinkEndpoint {
            host: host_identity(),
            netns: network_namespace(),
            process: process_token(),
            gpu: self.uuid,
            gpus,
            socket,
            session,
        }
    }
}

impl Transport for NvlinkTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Nvlink
    }

    fn offer(&self, _peer_key: &str) -> Result<Vec<u8>> {
        Ok(self
            .endpoint(self.reachable.clone(), String::new(), 0)
            .encode())
    }

    fn check_peer(&self, theirs: &[u8]) -> std::result::Result<(), String> {
        let theirs = NvlinkEndpoint::decode(theirs)
            .map_err(|e| format!("the peer's NVLink endpoint is malformed: {e}"))?;
        if theirs.host != host_identity() {
            return Err(format!(
                "the peer runs on another host (boot id/hostname {} here, {} there)",
                host_identity(),
                theirs.host
            ));
        }
        if theirs.netns != network_namespace() {
            return Err("the peer runs in another network namespace, so it cannot reach this side's abstract Unix socket".into());
        }
        let exports = self.server.exports()?;
        for gpu in &exports.gpus {
            if !theirs.gpus.contains(gpu) {
                return Err(format!(
                    "the peer's GPU {} cannot access this side's GPU {} (no peer access between them, or the peer's process does not see that GPU)",
                    uuid_text(&theirs.gpu),
                    uuid_text(gpu)
                ));
            }
        }
        Ok(())
    }

    fn accept(&self, peer: AcceptingPeer<'_>, _theirs: &[u8]) -> Result<Vec<u8>> {
        let exports = self.server.exports().map_err(unavailable)?;
        let session = self.server.admit(peer.name);
        Ok(self
            .endpoint(
                exports.gpus.clone(),
                self.server.name().to_string(),
                session,
            )
            .encode())
    }

    fn connect(&self, target: ConnectTarget<'_>, theirs: &[u8]) -> Result<Box<dyn Link>> {
        let peer = target.peer_key;
        let theirs = NvlinkEndpoint::decode(theirs).map_err(|e| Error::protocol(peer, e.0))?;
        if theirs.session == 0 || theirs.socket.is_empty() {
            return Err(Error::protocol(
                peer,
                "the reply carries no NVLink side channel",
            ));
        }
        let addr = SocketAddr::from_abstract_name(theirs.socket.as_bytes())
            .map_err(|e| Error::io(peer, "name the NVLink side channel", e))?;
        let stream = UnixStream::connect_addr(&addr)
            .map_err(|e| Error::io(peer, "connect the NVLink side channel", e))?;
        let io = |what: &'static str| move |e| Error::io(peer, what, e);
        stream
            .set_read_timeout(target.bound())
            .map_err(io("set a timeout"))?;
        let mut hello = theirs.session.to_le_bytes().to_vec();
        hello.extend_from_slice(&process_token().to_le_bytes());
        socket::send(&stream, &hello, &[]).map_err(io("send the NVLink hello"))?;
        let closed = || Error::PeerDisconnected {
            peer: peer.to_string(),
            reason: "the peer closed the NVLink side channel before sending its memory table"
                .into(),
        };
        let (bytes, _) = socket::receive(&stream)
            .map_err(io("receive the memory table"))?
            .ok_or_else(closed)?;
        let table = MemoryTable::decode(&bytes).map_err(|e| Error::protocol(peer, e.0))?;
        let mut fds = Vec::with_capacity(table.fds());
        while fds.len() < table.fds() {
            let (_, batch) = socket::receive(&stream)
                .map_err(io("receive shared allocations"))?
                .ok_or_else(closed)?;
            if batch.is_empty() {
                return Err(Error::protocol(
                    peer,
                    "a descriptor message without descriptors",
                ));
            }
            fds.extend(batch);
        }
        if table.regions.len() != self.table.regions().len() {
            return Err(Error::protocol(
                peer,
                format!(
                    "the memory table lists {} regions; the layouts agreed on {}",
                    table.regions.len(),
                    self.table.regions().len()
                ),
            ));
        }
        let same_process = theirs.process == process_token();
        let imports = Imports::open(peer, &self.gpu, &table, fds, same_process)?;
        stream
            .set_read_timeout(None)
            .map_err(io("clear the timeout"))?;
        crate::log::debug!(
            "nvlink to {peer}: {} allocations imported{}",
            table.pieces.len(),
            if same_process {
                " (same process: addresses used as they are)"
            } else {
                ""
            }
        );
        Ok(Box::new(NvlinkLink::start(
            peer,
            Arc::clone(&self.table),
            Arc::clone(&self.gpu),
            imports,
            stream,
            Arc::clone(&self.crc),
            Arc::clone(target.on_break),
        )?))
    }

    fn forget(&self, _peer_key: &str) {}

    /// Follows a swap of cuMem imports: writers drop their mappings at the park and are
    /// handed the new table and descriptors after the swap (`server::follow`).
    fn swap_refusal(&self, _device: bool) -> Option<String> {
        None
    }

    fn follow_pages(&self, parked: bool) -> Result<()> {
        self.server.follow(parked)
    }

    fn region_keys(&self) -> Option<Vec<u8>> {
        self.server.region_keys()
    }

    fn explain(&self) -> Explanation {
        let name = self.gpu.name().unwrap_or_default();
        let gpu = format!(
            "GPU {} {name} ({})",
            self.gpu.ordinal(),
            uuid_text(&self.uuid)
        );
        Explanation {
            summary: gpu.clone(),
            chosen_because: Some("both processes run on this host, every region on both sides is GPU memory and the GPUs reach each other"),
            details: TransportDetails::Nvlink(NvlinkDetails {
                gpu,
                reachable_gpus: self.reachable.len(),
            }),
        }
    }

    fn receivers(&self) -> usize {
        self.server.connections()
    }

    fn isolate(&self, peer_name: &str) -> std::result::Result<usize, String> {
        self.server.withdraw(peer_name);
        if self.server.connections() == 0 {
            return Ok(0);
        }
        Err(format!(
            "over NVLink the writer's own GPU copies into this side's memory, so this side cannot stop a copy that {peer_name} queued; only its acknowledgement confirms the fence"
        ))
    }

    fn shutdown(&self) {
        self.server.shutdown();
    }
}
