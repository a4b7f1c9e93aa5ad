//! The acceptor's side channel: an abstract Unix socket that admits one connection per
//! session the handshake granted, hands the writer the memory table (and the descriptors of
//! shareable allocations), then receives the writer's arrival notices until it goes away,
//! answering the calls that ask for it (`message.rs`).

use super::memory::Exports;
use super::message::Message;
use super::socket::{self, MAX_FDS_PER_MESSAGE};
use crate::transport::{Arrival, ArrivalSink, ChecksumCheck};
use crate::wire::Notice;
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a new connection may take to present its session.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

use crate::util::lock;

struct Shared {
    /// Session → (peer name, what to share with it).
    admissions: Mutex<HashMap<u64, (String, Arc<Exports>)>>,
    /// Open connections (a clone of each stream, to shut it down) and their threads.
    connections: Mutex<Vec<(UnixStream, JoinHandle<()>)>>,
    closing: AtomicBool,
    arrivals: Option<ArrivalSink>,
}

pub(crate) struct NvlinkServer {
    name: String,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl NvlinkServer {
    /// Listens on a fresh abstract socket name.
    pub fn bind(arrivals: Option<ArrivalSink>) -> std::io::Result<NvlinkServer> {
        let name = format!(
            "kvtransfer-nvlink-{}-{:016x}",
            std::process::id(),
            crate::util::random_u64()
        );
        let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
        let shared = Arc::new(Shared {
            admissions: Mutex::new(HashMap::new()),
            connections: Mutex::new(Vec::new()),
            closing: AtomicBool::new(false),
            arrivals,
        });
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("kvt-nvlink-accept".into())
                .spawn(move || accept_loop(&listener, &shared))?
        };
        Ok(NvlinkServer {
            name,
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A session admitting `peer` once, to be given `exports`.
    pub fn admit(&self, peer: &str, exports: Arc<Exports>) -> u64 {
        let session = crate::util::random_u64() | 1;
        lock(&self.shared.admissions).insert(session, (peer.to_string(), exports));
        session
    }

    /// Withdraws the unused admissions of `peer` (a fence cutting it off).
    pub fn withdraw(&self, peer: &str) {
        lock(&self.shared.admissions).retain(|_, (name, _)| name != peer);
    }

    pub fn connections(&self) -> usize {
        let mut connections = lock(&self.shared.connections);
        connections.retain(|(_, thread)| !thread.is_finished());
        connections.len()
    }

    pub fn shutdown(&self) {
        if self.shared.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wakes the accept loop, which sees `closing`.
        if let Ok(addr) = SocketAddr::from_abstract_name(self.name.as_bytes()) {
            let _ = UnixStream::connect_addr(&addr);
        }
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
        let connections = std::mem::take(&mut *lock(&self.shared.connections));
        for (stream, thread) in connections {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            let _ = thread.join();
        }
    }
}

impl Drop for NvlinkServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.closing.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        let worker = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("kvt-nvlink-peer".into())
            .spawn(move || serve(&stream, &worker));
        if let Ok(thread) = spawned {
            lock(&shared.connections).push((clone, thread));
        }
    }
}

/// One writer: its hello, the memory table, then its notices until it closes.
fn serve(stream: &UnixStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(HELLO_TIMEOUT));
    let Ok(Some((hello, _))) = socket::receive(stream) else {
        return;
    };
    let Some(session) = hello
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    else {
        return;
    };
    let Some((peer, exports)) = lock(&shared.admissions).remove(&session) else {
        crate::log::debug!("nvlink: a connection presented an unknown session; closed");
        return;
    };
    if let Err(e) = send_exports(stream, &exports) {
        crate::log::debug!("nvlink: sending the memory table to {peer} failed: {e}");
        return;
    }
    let _ = stream.set_read_timeout(None);
    crate::log::debug!(
        "nvlink: {peer} opened {} allocations ({} by descriptor)",
        exports.table.pieces.len(),
        exports.fds.len()
    );
    loop {
        match socket::receive(stream) {
            Ok(Some((bytes, _))) => {
                if let Err(why) = take(stream, &peer, &bytes, shared) {
                    crate::log::debug!("nvlink: side channel of {peer}: {why}; connection closed");
                    return;
                }
            }
            Ok(None) => {
                crate::log::debug!("nvlink: {peer} closed its side channel");
                return;
            }
            Err(e) => {
                crate::log::debug!("nvlink: side channel of {peer}: {e}");
                return;
            }
        }
    }
}

/// Takes one message from `peer`: hands its notice to the arrival sink, then answers a
/// call that asked for it (so the writer's call resolves only after the arrival was taken).
fn take(stream: &UnixStream, peer: &str, bytes: &[u8], shared: &Shared) -> Result<(), String> {
    let (notice, answer) = match Message::decode(bytes) {
        Some(Message::Notice(notice)) => (Some(notice), None),
        Some(Message::Acked { seq, notice }) => (notice, Some(seq)),
        Some(Message::Answer { .. }) | None => return Err("a malformed message".into()),
    };
    if let Some(notice) = notice {
        let arrival = decode_notice(peer, notice).ok_or("a malformed notice")?;
        if let Some(sink) = &shared.arrivals {
            sink(arrival);
        }
    }
    if let Some(seq) = answer {
        socket::send(stream, &Message::Answer { seq }.encode(), &[])
            .map_err(|e| format!("answering call {seq}: {e}"))?;
    }
    Ok(())
}

fn send_exports(stream: &UnixStream, exports: &Exports) -> std::io::Result<()> {
    socket::send(stream, &exports.table.encode(), &[])?;
    for batch in exports.fds.chunks(MAX_FDS_PER_MESSAGE) {
        let fds: Vec<_> = batch.iter().map(AsFd::as_fd).collect();
        socket::send(stream, &(fds.len() as u32).to_le_bytes(), &fds)?;
    }
    Ok(())
}

/// The arrival a notice from `peer` reports (`None`: malformed). The copy kernel moved the
/// bytes, so a checksum is reported unchecked (writers refuse `checksum` on NVLink).
fn decode_notice(peer: &str, bytes: &[u8]) -> Option<Arrival> {
    let notice = Notice::decode(bytes).ok()?;
    let check = match notice.checksum {
        Some(_) => ChecksumCheck::Unchecked,
        None => ChecksumCheck::Absent,
    };
    Some(Arrival::of(peer, &notice, check))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::Cover;

    #[test]
    fn notices_decode_and_bad_ones_are_refused() {
        let notice = Notice {
            layer: 3,
            blocks: 1538,
            cover: Cover::WHOLE,
            checksum: None,
            tag: b"req-7",
        };
        let arrival = decode_notice("p", &notice.encode()).unwrap();
        assert_eq!(arrival, Arrival::of("p", &notice, ChecksumCheck::Absent));
        assert!(decode_notice("p", &[0; 7]).is_none());
    }
}
