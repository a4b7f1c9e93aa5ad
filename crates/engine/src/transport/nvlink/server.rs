//! The acceptor's side channel: an abstract Unix socket that admits one connection per
//! session the handshake granted, hands the writer the memory table (and the descriptors of
//! shareable allocations), then receives the writer's arrival notices until it goes away,
//! answering the calls that ask for it (`message.rs`). A checksummed call's notice comes
//! with its landing: the ranges of this side's GPU memory the call wrote, which the
//! connection's thread sums with the CRC-32C kernel before it reports the arrival.
//!
//! A warm re-attach (`follow`): at a park every connected writer is told to release its
//! mappings, and sessions not yet used are withdrawn (a connect while parked is refused);
//! after the swap the regions are exported again and every writer gets the new table and
//! descriptors, numbered, so its engine can tell when it has them (`region_keys`).

use super::memory::Exports;
use super::message::{Message, MAX_LANDING_BYTES};
use super::socket::{self, MAX_FDS_PER_MESSAGE};
use crate::error::{Error, Result};
use crate::gpu::checksum::{CrcKernel, GpuSummer};
use crate::layout::{MemoryKind, RegionTable};
use crate::transport::{land, Arrival, ArrivalSink, ChecksumCheck};
use crate::wire::{Landing, Notice};
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

/// One writer connected to the side channel.
struct Writer {
    peer: String,
    stream: UnixStream,
    /// Held while a message is sent: answers (the connection's thread) and warm re-attach
    /// messages (the thread that swaps) never interleave.
    send: Mutex<()>,
}

impl Writer {
    fn send(&self, payload: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) -> std::io::Result<()> {
        let _one = lock(&self.send);
        socket::send(&self.stream, payload, fds)
    }

    /// Sends `exports`: their table (`generation` 0: the first, as the handshake sends
    /// it; else as a `Message::Table`), then their descriptors in batches.
    fn send_exports(&self, exports: &Exports, generation: u64) -> std::io::Result<()> {
        let _one = lock(&self.send);
        let table = exports.table.encode();
        if generation == 0 {
            socket::send(&self.stream, &table, &[])?;
        } else {
            let message = Message::Table {
                generation,
                table: &table,
            };
            socket::send(&self.stream, &message.encode(), &[])?;
        }
        for batch in exports.fds.chunks(MAX_FDS_PER_MESSAGE) {
            let fds: Vec<_> = batch.iter().map(AsFd::as_fd).collect();
            let payload = if generation == 0 {
                (fds.len() as u32).to_le_bytes().to_vec()
            } else {
                Message::Fds {
                    count: fds.len() as u32,
                }
                .encode()
            };
            socket::send(&self.stream, &payload, &fds)?;
        }
        Ok(())
    }
}

/// What the side channel shares now.
#[derive(Default)]
struct Sharing {
    /// This side's regions as shared with writers; made on first use (only acceptors need
    /// it), or why they cannot be shared. `None` while parked or not made yet.
    exports: Option<std::result::Result<Arc<Exports>, String>>,
    /// Parked by a warm re-attach: nothing is shared.
    parked: bool,
    /// Tables sent after swaps so far.
    generation: u64,
    /// Writers that got the table.
    writers: Vec<Arc<Writer>>,
}

struct Shared {
    /// Session → peer name.
    admissions: Mutex<HashMap<u64, String>>,
    sharing: Mutex<Sharing>,
    /// Open connections (a clone of each stream, to shut it down) and their threads.
    connections: Mutex<Vec<(UnixStream, JoinHandle<()>)>>,
    closing: AtomicBool,
    arrivals: Option<ArrivalSink>,
    /// This side's regions: where a checksummed call's landing points.
    table: Arc<RegionTable>,
    /// The CRC-32C kernel of the transport's GPU, which sums them.
    crc: Arc<CrcKernel>,
}

pub(crate) struct NvlinkServer {
    name: String,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl NvlinkServer {
    /// Listens on a fresh abstract socket name.
    pub fn bind(
        table: Arc<RegionTable>,
        crc: Arc<CrcKernel>,
        arrivals: Option<ArrivalSink>,
    ) -> std::io::Result<NvlinkServer> {
        let name = format!(
            "kvtransfer-nvlink-{}-{:016x}",
            std::process::id(),
            crate::util::random_u64()
        );
        let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
        let shared = Arc::new(Shared {
            admissions: Mutex::new(HashMap::new()),
            sharing: Mutex::new(Sharing::default()),
            connections: Mutex::new(Vec::new()),
            closing: AtomicBool::new(false),
            arrivals,
            table,
            crc,
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

    /// This side's regions as shared with writers (exported on first use), or why they
    /// cannot be (a sentence), e.g. while parked.
    pub fn exports(&self) -> std::result::Result<Arc<Exports>, String> {
        let mut sharing = lock(&self.shared.sharing);
        if sharing.parked {
            return Err("this side's memory is parked (its worker is restarting: warm re-attach); connect again once it re-attached".into());
        }
        sharing
            .exports
            .get_or_insert_with(|| Exports::of(&self.shared.table).map(Arc::new))
            .clone()
    }

    /// A session admitting `peer` once.
    pub fn admit(&self, peer: &str) -> u64 {
        let session = crate::util::random_u64() | 1;
        lock(&self.shared.admissions).insert(session, peer.to_string());
        session
    }

    /// Withdraws the unused admissions of `peer` (a fence cutting it off).
    pub fn withdraw(&self, peer: &str) {
        lock(&self.shared.admissions).retain(|_, name| name != peer);
    }

    /// Follows a warm re-attach of this side's memory. `parked`: every writer is told to
    /// release its mappings of the old memory, and unused sessions are withdrawn. Else (the
    /// new memory is mapped): the regions are exported again and every writer gets the new
    /// table with its descriptors; a writer that cannot be sent them is disconnected.
    pub fn follow(&self, parked: bool) -> Result<()> {
        let mut sharing = lock(&self.shared.sharing);
        if parked {
            sharing.parked = true;
            sharing.exports = None;
            lock(&self.shared.admissions).clear();
            for writer in &sharing.writers {
                if let Err(e) = writer.send(&Message::Release.encode(), &[]) {
                    crate::log::debug!("nvlink: telling {} to release: {e}", writer.peer);
                }
            }
            return Ok(());
        }
        sharing.parked = false;
        let exports = Exports::of(&self.shared.table).map(Arc::new);
        sharing.exports = Some(exports.clone());
        let exports = exports.map_err(|why| Error::Unsupported {
            what: "a warm re-attach over NVLink",
            reason: format!("the new memory cannot be shared with writers: {why}"),
        })?;
        sharing.generation += 1;
        let generation = sharing.generation;
        sharing
            .writers
            .retain(|writer| match writer.send_exports(&exports, generation) {
                Ok(()) => true,
                Err(e) => {
                    crate::log::debug!(
                        "nvlink: sending {} the new memory table: {e}; disconnected",
                        writer.peer
                    );
                    let _ = writer.stream.shutdown(std::net::Shutdown::Both);
                    false
                }
            });
        Ok(())
    }

    /// What writers need after a swap: the number of the table sent to them (8 bytes,
    /// little endian), which their link waits for; `None` while parked or before any swap.
    pub fn region_keys(&self) -> Option<Vec<u8>> {
        let sharing = lock(&self.shared.sharing);
        (!sharing.parked && sharing.generation > 0)
            .then(|| sharing.generation.to_le_bytes().to_vec())
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
    let Some(peer) = lock(&shared.admissions).remove(&session) else {
        crate::log::debug!("nvlink: a connection presented an unknown session; closed");
        return;
    };
    let Ok(clone) = stream.try_clone() else {
        return;
    };
    let writer = Arc::new(Writer {
        peer: peer.clone(),
        stream: clone,
        send: Mutex::new(()),
    });
    // The table now shared, sent under the sharing lock: a park or swap reaches this
    // writer only after it (and a park before it withdrew the session).
    let exports = {
        let mut sharing = lock(&shared.sharing);
        let Some(Ok(exports)) = sharing.exports.clone().filter(|_| !sharing.parked) else {
            crate::log::debug!("nvlink: {peer} connected while this side is parked; closed");
            return;
        };
        if let Err(e) = writer.send_exports(&exports, 0) {
            crate::log::debug!("nvlink: sending the memory table to {peer} failed: {e}");
            return;
        }
        sharing.writers.push(Arc::clone(&writer));
        exports
    };
    let _ = stream.set_read_timeout(None);
    crate::log::debug!(
        "nvlink: {peer} opened {} allocations ({} by descriptor)",
        exports.table.pieces.len(),
        exports.fds.len()
    );
    // Made for the connection's first checksummed call.
    let mut summer = None;
    loop {
        match socket::receive(stream) {
            Ok(Some((bytes, _))) => {
                if let Err(why) = take(&writer, &bytes, shared, &mut summer) {
                    crate::log::debug!("nvlink: side channel of {peer}: {why}; connection closed");
                    break;
                }
            }
            Ok(None) => {
                crate::log::debug!("nvlink: {peer} closed its side channel");
                break;
            }
            Err(e) => {
                crate::log::debug!("nvlink: side channel of {peer}: {e}");
                break;
            }
        }
    }
    lock(&shared.sharing)
        .writers
        .retain(|w| !Arc::ptr_eq(w, &writer));
}

/// Takes one message from `peer`: checks a checksummed call's bytes, hands its notice to
/// the arrival sink, then answers a call that asked for it (so the writer's call resolves
/// only after the arrival was taken).
fn take(
    writer: &Writer,
    bytes: &[u8],
    shared: &Shared,
    summer: &mut Option<GpuSummer>,
) -> Result<(), String> {
    let (notice, landing, answer) = match Message::decode(bytes) {
        Some(Message::Notice { notice, landing }) => (Some(notice), landing, None),
        Some(Message::Acked {
            seq,
            notice,
            landing,
        }) => (notice, landing, Some(seq)),
        _ => return Err("a malformed message".into()),
    };
    let peer = writer.peer.as_str();
    if let Some(notice) = notice {
        let notice = Notice::decode(notice).map_err(|e| format!("a malformed notice: {e}"))?;
        let check = match notice.checksum {
            None => ChecksumCheck::Absent,
            Some(expected) => verify(shared, summer, peer, &notice, expected, landing),
        };
        if let Some(sink) = &shared.arrivals {
            sink(Arrival::of(peer, &notice, check));
        }
    }
    if let Some(seq) = answer {
        writer
            .send(&Message::Answer { seq }.encode(), &[])
            .map_err(|e| format!("answering call {seq}: {e}"))?;
    }
    Ok(())
}

/// Sums the bytes a checksummed call wrote (the ranges its `landing` names, checked
/// against this side's regions) with the CRC-32C kernel and compares them with the
/// writer's `expected` sum. With `KVCACHE_TEST_CORRUPT_RECEIVE` set (tests only), one byte
/// is flipped in GPU memory first, as a bit flip on the way would have. A landing this side
/// cannot follow is a mismatch (nothing summed: the sum of no bytes, 0), logged with why.
fn verify(
    shared: &Shared,
    summer: &mut Option<GpuSummer>,
    peer: &str,
    notice: &Notice<'_>,
    expected: u32,
    landing: &[u8],
) -> ChecksumCheck {
    let table = &shared.table;
    let layer = notice.layer;
    let ranges = (|| {
        if landing.len() > MAX_LANDING_BYTES {
            return Err(format!(
                "its landing takes {} bytes; at most {MAX_LANDING_BYTES}",
                landing.len()
            ));
        }
        let landing = Landing::decode(landing).map_err(|e| e.0)?;
        if landing.blocks() != u64::from(notice.blocks) {
            return Err(format!(
                "its landing names {} blocks but the notice {}",
                landing.blocks(),
                notice.blocks
            ));
        }
        let mut ranges = Vec::new();
        land(table, layer, &landing, |range| {
            ranges.push((range.addr, range.len))
        })?;
        Ok(ranges)
    })();
    let ranges = match ranges {
        Ok(ranges) => ranges,
        Err(why) => {
            crate::log::log_error!(
                "nvlink: checksummed notice from {peer} for layer {layer} ({} blocks): {why}; reported as a checksum mismatch",
                notice.blocks
            );
            return ChecksumCheck::Mismatch {
                expected,
                actual: 0,
            };
        }
    };
    // The kernel runs on this transport's GPU: it sums regions there only.
    let ordinal = shared.crc.gpu().ordinal();
    let kinds = table.layout.kinds();
    let here = (layer * kinds..(layer + 1) * kinds)
        .all(|region| table.memory(region) == MemoryKind::Device { ordinal });
    if !here {
        return ChecksumCheck::Unchecked;
    }
    let summed = (|| {
        if summer.is_none() {
            *summer = Some(GpuSummer::new(&shared.crc)?);
        }
        let summer = summer.as_mut().expect("made above");
        if crate::config::process().test_corrupt_receive {
            if let Some(&(addr, _)) = ranges.iter().find(|(_, len)| *len > 0) {
                // SAFETY: a byte of this side's device region that the call just wrote
                // (checked against the region table by `land`).
                unsafe { summer.flip_byte(addr) }?;
            }
        }
        // SAFETY: the ranges lie in this side's registered device regions on the kernel's
        // GPU (checked above), valid while the transport lives; only read.
        unsafe { summer.sum(ranges.iter().copied()) }
    })();
    match summed {
        Ok(actual) if actual == expected => ChecksumCheck::Verified,
        Ok(actual) => ChecksumCheck::Mismatch { expected, actual },
        Err(e) => {
            crate::log::log_warn!(
                "nvlink: summing {peer}'s call on the GPU failed ({e}); reported unverified"
            );
            ChecksumCheck::Unchecked
        }
    }
}
