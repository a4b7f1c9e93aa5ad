//! TCP transport: framed one-sided writes over a stream socket.
//!
//! Event-driven: two threads per transport whatever the number of links, and one socket
//! per link on each side.
//!
//! Sender: the submitting thread turns each job into `WRITE` frames (24-byte header +
//! payload gathered straight from the local regions with a non-blocking `writev`)
//! followed by a `COMMIT` frame; what does not fit the socket's send buffer is queued and
//! written by the send loop (`sender.rs`, one thread, epoll through `mio`), which also
//! reads every link's `ACK`s and completes the jobs in order.
//! Receiver: the receive loop (`server.rs`, one thread) accepts data connections and
//! parses each one's frames as they arrive (`receiver.rs`): every frame is checked against
//! the registered regions before its payload is copied into place, and a `COMMIT` is
//! acknowledged only after every earlier frame of the stream has been written to memory.

mod batch;
mod fence;
pub mod frame;
mod io;
mod link;
mod receiver;
#[cfg(test)]
mod receiver_tests;
mod sender;
mod server;
pub(crate) mod sockopt;
mod spin;
pub(crate) mod staging;
mod state;

pub use batch::FrameBatch;

use super::{
    AcceptingPeer, ConnectTarget, Explanation, Link, Transport, TransportDetails, TransportKind,
};
use crate::error::{Error, Result};
use crate::layout::RegionTable;
use crate::transport::ArrivalSink;
use crate::wire::{DecodeError, Reader};
use link::TcpLink;
use sender::SendLoop;
use server::TcpServer;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bytes of the receive loop's buffer, shared by its connections (payloads of 16 KiB or
/// more bypass it).
const RECEIVE_BUFFER_BYTES: usize = 1 << 20;
/// Largest single frame payload (runs longer than this are split into several frames).
pub const MAX_FRAME_PAYLOAD: u64 = 1 << 30;
/// How long a new data connection may take to present its session token.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most iovecs handed to one writev (Linux IOV_MAX).
const IOV_MAX: usize = 1024;
/// Most payload bytes handed to one writev. One huge writev (up to 128 MiB of 256 KiB
/// frames) keeps the socket busy in one `tcp_sendmsg` for its whole length and halved
/// loopback throughput at 256 KiB blocks; ~1 MiB per call matches the stream reference
/// (docs/performance.md, "Changes to the TCP transport").
const WRITEV_MAX_BYTES: usize = 1 << 20;
const SOCKET_BUFFER_BYTES: libc::c_int = 4 << 20;

use crate::util::lock;

/// The TCP endpoint: the data listener's port and, in an acceptor's reply, the session
/// token that admits one data connection (0 in a connector's offer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpEndpoint {
    /// The data listener's TCP port.
    pub port: u16,
    /// The session token that admits one data connection (0 in an offer).
    pub session: u64,
}

impl TcpEndpoint {
    /// Its wire form: port (u16 LE), session (u64 LE).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(10);
        out.extend_from_slice(&self.port.to_le_bytes());
        out.extend_from_slice(&self.session.to_le_bytes());
        out
    }

    /// Parses an endpoint of exactly 10 bytes.
    pub fn decode(bytes: &[u8]) -> std::result::Result<TcpEndpoint, DecodeError> {
        let mut r = Reader::new(bytes);
        let endpoint = TcpEndpoint {
            port: r.u16("tcp port")?,
            session: r.u64("session")?,
        };
        r.finish("TCP endpoint")?;
        Ok(endpoint)
    }
}

/// Works on any machine: the data listener of this engine, and links that connect to the
/// peers' listeners.
pub(crate) struct TcpTransport {
    server: TcpServer,
    table: Arc<RegionTable>,
    /// The address the data listener is bound to (`KVCACHE_SOCKET_IFNAME`, else all).
    bind: IpAddr,
    /// Started by the first link this side opens (an engine that only accepts has none).
    send_loop: Mutex<Option<Arc<SendLoop>>>,
}

impl TcpTransport {
    pub fn open(
        bind: IpAddr,
        table: Arc<RegionTable>,
        arrivals: Option<ArrivalSink>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<TcpTransport> {
        Ok(TcpTransport {
            server: TcpServer::bind(bind, Arc::clone(&table), arrivals, metrics)?,
            table,
            bind,
            send_loop: Mutex::new(None),
        })
    }

    fn send_loop(&self) -> Result<Arc<SendLoop>> {
        let mut slot = lock(&self.send_loop);
        if let Some(running) = slot.as_ref() {
            return Ok(Arc::clone(running));
        }
        let started =
            Arc::new(SendLoop::start().map_err(|e| Error::io("tcp", "send loop start", e))?);
        *slot = Some(Arc::clone(&started));
        Ok(started)
    }
}

impl Transport for TcpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    /// Both directions take every address from the region table at each frame (the
    /// receiver resolves a frame's region and offset locally; the sender builds its iovecs
    /// at hand-off), so a swap at the same address needs nothing here.
    fn swap_refusal(&self, _device: bool) -> Option<String> {
        None
    }

    fn offer(&self, _peer_key: &str) -> Result<Vec<u8>> {
        Ok(TcpEndpoint {
            port: self.server.port(),
            session: 0,
        }
        .encode())
    }

    fn check_peer(&self, theirs: &[u8]) -> std::result::Result<(), String> {
        TcpEndpoint::decode(theirs)
            .map(drop)
            .map_err(|e| format!("the peer's TCP endpoint is malformed: {e}"))
    }

    fn accept(&self, peer: AcceptingPeer<'_>, _theirs: &[u8]) -> Result<Vec<u8>> {
        Ok(TcpEndpoint {
            port: self.server.port(),
            session: self.server.admit(peer.name),
        }
        .encode())
    }

    fn connect(&self, target: ConnectTarget<'_>, theirs: &[u8]) -> Result<Box<dyn Link>> {
        let peer = target.peer_key;
        let theirs = TcpEndpoint::decode(theirs).map_err(|e| Error::protocol(peer, e.0))?;
        if theirs.session == 0 || theirs.port == 0 {
            return Err(Error::protocol(
                peer,
                "the reply carries no data-connection admission",
            ));
        }
        let addr =
            resolve(target.host, theirs.port).map_err(|e| Error::io(peer, "resolve host", e))?;
        Ok(Box::new(TcpLink::connect(
            peer,
            addr,
            theirs.session,
            Arc::clone(&self.table),
            target.bound(),
            Arc::clone(target.on_break),
            self.send_loop()?,
        )?))
    }

    fn forget(&self, _peer_key: &str) {}

    fn explain(&self) -> Explanation {
        Explanation {
            summary: format!("data listener on {}", self.bind),
            chosen_because: None,
            details: TransportDetails::Tcp(TcpDetails {
                bind_address: self.bind,
            }),
        }
    }

    fn receivers(&self) -> usize {
        self.server.connections()
    }

    fn isolate(&self, peer_name: &str) -> std::result::Result<usize, String> {
        Ok(self.server.isolate(peer_name))
    }

    fn shutdown(&self) {
        self.server.shutdown();
        if let Some(send_loop) = lock(&self.send_loop).take() {
            send_loop.stop();
        }
    }
}

/// What the TCP transport uses on this side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpDetails {
    /// The address its data listener is bound to.
    pub bind_address: IpAddr,
}

impl TcpDetails {
    pub(crate) fn fields(&self) -> Vec<(&'static str, String)> {
        vec![("bindAddress", self.bind_address.to_string())]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_round_trips_and_rejects_truncation() {
        let endpoint = TcpEndpoint {
            port: 40000,
            session: 99,
        };
        let bytes = endpoint.encode();
        assert_eq!(TcpEndpoint::decode(&bytes).unwrap(), endpoint);
        for cut in 0..bytes.len() {
            assert!(TcpEndpoint::decode(&bytes[..cut]).is_err());
        }
    }
}
