//! Receiving side: the data listener, single-use session admissions, and the background
//! prefault of the regions that are about to be written.

use super::io::set_socket_options;
use super::lock;
use super::receiver::run_receiver;
use super::state::{Admission, ServerState};
use crate::error::{Error, Result};
use crate::layout::RegionTable;
use crate::transport::ArrivalSink;
use std::collections::HashMap;
use std::net::{IpAddr, Shutdown, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Listens for data connections and writes admitted peers' frames into local regions.
pub(super) struct TcpServer {
    state: Arc<ServerState>,
    listener: TcpListener,
    port: u16,
    accept_thread: Mutex<Option<JoinHandle<()>>>,
}

impl TcpServer {
    pub fn bind(
        ip: IpAddr,
        table: Arc<RegionTable>,
        arrivals: Option<ArrivalSink>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<TcpServer> {
        let listener =
            TcpListener::bind((ip, 0)).map_err(|e| Error::io(format!("{ip}"), "data listen", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::io(format!("{ip}"), "data listen", e))?
            .port();
        let state = Arc::new(ServerState {
            table,
            admissions: Mutex::new(HashMap::new()),
            connections: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            arrivals,
            metrics,
            prefault: Mutex::new(None),
            writers: Mutex::new(HashMap::new()),
        });
        let accept_thread = {
            let state = Arc::clone(&state);
            let listener = listener
                .try_clone()
                .map_err(|e| Error::io(format!("{ip}"), "data listen", e))?;
            std::thread::Builder::new()
                .name("kvt-tcp-accept".into())
                .spawn(move || run_acceptor(&state, &listener))
                .map_err(|e| Error::io(format!("{ip}"), "thread spawn", e))?
        };
        Ok(TcpServer {
            state,
            listener,
            port,
            accept_thread: Mutex::new(Some(accept_thread)),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Data connections being received on now.
    pub fn connections(&self) -> usize {
        let mut connections = lock(&self.state.connections);
        connections.retain(|(_, t)| !t.is_finished());
        connections.len()
    }

    /// Starts faulting the regions in on a background thread (once; no-op when running or
    /// done, or with `KVCACHE_TCP_PREFAULT=0`). Called by the first [`TcpServer::admit`];
    /// an engine that knows it will receive over TCP may call it earlier (at construction)
    /// to take page faults off the first transfer entirely.
    pub fn start_prefault(&self) {
        let mut prefault = lock(&self.state.prefault);
        if prefault.is_none() && prefault_enabled() {
            let state = Arc::clone(&self.state);
            *prefault = std::thread::Builder::new()
                .name("kvt-tcp-prefault".into())
                .spawn(move || prefault_regions(&state.table, &state.closed))
                .ok();
        }
    }

    /// Issues a single-use token for the data connection of peer `peer_name`.
    ///
    /// The first admission also starts faulting in the regions in the background (see
    /// [`prefault_regions`]): this engine is about to receive over TCP, so its regions are
    /// host memory that the receiver thread would otherwise fault in page by page.
    pub fn admit(&self, peer_name: &str) -> u64 {
        self.start_prefault();
        let mut admissions = lock(&self.state.admissions);
        loop {
            let session = crate::util::random_u64();
            if session != 0 && !admissions.contains_key(&session) {
                admissions.insert(
                    session,
                    Admission {
                        peer_name: peer_name.to_string(),
                    },
                );
                return session;
            }
        }
    }

    /// Cuts the writer named `peer_name` off (see `fence.rs`).
    pub fn isolate(&self, peer_name: &str) -> usize {
        super::fence::isolate(&self.state, peer_name)
    }

    /// Stops accepting, closes every data connection and waits until no thread can write
    /// into the regions any more.
    pub fn shutdown(&self) {
        self.state.closed.store(true, Ordering::SeqCst);
        // SAFETY: the fd belongs to `self.listener`, open until self drops; shutdown on a
        // listening socket wakes a blocked accept() on Linux.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(thread) = lock(&self.accept_thread).take() {
            let _ = thread.join();
        }
        if let Some(thread) = lock(&self.state.prefault).take() {
            let _ = thread.join();
        }
        let connections: Vec<_> = lock(&self.state.connections).drain(..).collect();
        for (stream, _) in &connections {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for (_, thread) in connections {
            let _ = thread.join();
        }
    }
}

/// `KVCACHE_TCP_PREFAULT=0` (or false/off/no) turns the background prefault off.
fn prefault_enabled() -> bool {
    crate::config::process().tcp_prefault
}

/// Bytes populated per `madvise` call (so that `shutdown` waits at most one chunk).
const PREFAULT_CHUNK: u64 = 64 << 20;

/// Faults every page of the regions in, writable, with `MADV_POPULATE_WRITE` (Linux 5.14+).
///
/// Why: a decode cache freshly allocated by the application (e.g. `Buffer.alloc`) is not
/// backed by pages yet; the receiver thread then pays a page fault plus a page clear for
/// every 4 KiB it lands, which measured at ~80% of its time for 384 MiB written into fresh
/// buffers on a 2-core VM (see docs/performance.md). RDMA pays this once at memory
/// registration; this is the TCP transport's equivalent, off the transfer's critical path.
/// Populating never changes the bytes of a mapping; failures (old kernels, memory that is
/// not ordinary host memory) are ignored, and the receiver faults pages in as before.
fn prefault_regions(table: &RegionTable, closed: &AtomicBool) {
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .unwrap_or(4096)
        .max(1);
    for (index, region) in table.regions().iter().enumerate() {
        if table.memory(index as u32).is_device() {
            continue; // GPU memory is not the CPU's to fault in
        }
        let mut at = region.addr / page * page;
        let end = region.addr + region.len;
        while at < end {
            if closed.load(Ordering::SeqCst) {
                return;
            }
            let len = (end - at).min(PREFAULT_CHUNK);
            // SAFETY: madvise only inspects the address range; MADV_POPULATE_WRITE faults in
            // pages of existing mappings without changing their contents, and fails (ignored)
            // for ranges that are unmapped or cannot be populated.
            let rc = unsafe {
                libc::madvise(
                    at as usize as *mut libc::c_void,
                    len as usize,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if rc != 0 {
                crate::log::debug!(
                    "tcp prefault of {len} bytes at {at:#x} stopped: {}",
                    std::io::Error::last_os_error()
                );
                break;
            }
            at += len;
        }
    }
}

fn run_acceptor(state: &Arc<ServerState>, listener: &TcpListener) {
    loop {
        let (stream, remote) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(_) if state.closed.load(Ordering::SeqCst) => return,
            Err(e) => {
                crate::log::log_error!("tcp data listener: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if state.closed.load(Ordering::SeqCst) {
            return;
        }
        set_socket_options(&stream);
        let Ok(handle_stream) = stream.try_clone() else {
            continue;
        };
        let worker_state = Arc::clone(state);
        let spawned = std::thread::Builder::new()
            .name("kvt-tcp-recv".into())
            .spawn(move || run_receiver(&worker_state, handle_stream, remote));
        if let Ok(thread) = spawned {
            let mut connections = lock(&state.connections);
            connections.retain(|(_, t)| !t.is_finished());
            connections.push((stream, thread));
        }
    }
}
