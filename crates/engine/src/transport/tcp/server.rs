//! Receiving side: the data listener, single-use session admissions, the receive loop
//! (one thread, epoll through `mio`, for the listener and every data connection), and the
//! background prefault of the regions that are about to be written.

use super::io::set_socket_options;
use super::receiver::Conn;
use super::state::{Admission, ServerState};
use super::{lock, HELLO_TIMEOUT, RECEIVE_BUFFER_BYTES};
use crate::error::{Error, Result};
use crate::layout::RegionTable;
use crate::transport::ArrivalSink;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use std::collections::HashMap;
use std::net::{IpAddr, Shutdown, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const WAKER: Token = Token(0);
const LISTENER: Token = Token(1);
const FIRST_CONNECTION: usize = 2;

/// Listens for data connections and writes admitted peers' frames into local regions.
pub(super) struct TcpServer {
    state: Arc<ServerState>,
    port: u16,
    waker: Arc<Waker>,
    receive_loop: Mutex<Option<JoinHandle<()>>>,
}

impl TcpServer {
    pub fn bind(
        ip: IpAddr,
        table: Arc<RegionTable>,
        arrivals: Option<ArrivalSink>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<TcpServer> {
        let fail = |e: std::io::Error| Error::io(format!("{ip}"), "data listen", e);
        let listener = TcpListener::bind((ip, 0)).map_err(fail)?;
        let port = listener.local_addr().map_err(fail)?.port();
        listener.set_nonblocking(true).map_err(fail)?;
        let poll = Poll::new().map_err(fail)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(fail)?);
        let fd = listener.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&fd), LISTENER, Interest::READABLE)
            .map_err(fail)?;
        let state = Arc::new(ServerState {
            table,
            admissions: Mutex::new(HashMap::new()),
            connections: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            arrivals,
            metrics,
            prefault: Mutex::new(None),
            isolations: Mutex::new(Vec::new()),
            loop_ended: AtomicBool::new(false),
            crc: std::sync::OnceLock::new(),
        });
        let receive_loop = {
            let state = Arc::clone(&state);
            std::thread::Builder::new()
                .name("kvt-tcp-recv".into())
                .spawn(move || run_receive_loop(&state, poll, &listener))
                .map_err(|e| Error::io(format!("{ip}"), "thread spawn", e))?
        };
        Ok(TcpServer {
            state,
            port,
            waker,
            receive_loop: Mutex::new(Some(receive_loop)),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Data connections being received on now.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
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
    /// host memory that the receive loop would otherwise fault in page by page.
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
        super::fence::isolate(&self.state, &self.waker, peer_name)
    }

    /// Stops accepting, closes every data connection and waits until no thread can write
    /// into the regions any more.
    pub fn shutdown(&self) {
        self.state.closed.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if let Some(thread) = lock(&self.receive_loop).take() {
            let _ = thread.join();
        }
        if let Some(thread) = lock(&self.state.prefault).take() {
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

/// The receive loop: accepts data connections and parses every one of them as its bytes
/// arrive, on this one thread whatever the number of connections.
fn run_receive_loop(state: &ServerState, mut poll: Poll, listener: &TcpListener) {
    let mut events = Events::with_capacity(256);
    let mut conns: HashMap<usize, Conn> = HashMap::new();
    let mut next = FIRST_CONNECTION;
    // Shared by every connection: each parses all it read before the next one reads.
    let mut buffer = vec![0u8; RECEIVE_BUFFER_BYTES].into_boxed_slice();
    // Connections that stopped at their turn's end with bytes left: served again after
    // the events of the next poll, which then does not wait.
    let mut again: Vec<usize> = Vec::new();
    let mut spin = super::spin::Spin::new();
    while !state.closed.load(Ordering::SeqCst) {
        // Wake up now and then while a connection owes its hello.
        let timeout = if again.is_empty() {
            spin.timeout(
                conns
                    .values()
                    .any(Conn::in_hello)
                    .then_some(Duration::from_millis(250)),
            )
        } else {
            Some(Duration::ZERO)
        };
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            crate::log::log_error!("tcp receive loop: poll failed: {e}");
            break;
        }
        for event in events.iter() {
            match event.token() {
                WAKER => {}
                LISTENER => accept_all(state, poll.registry(), listener, &mut conns, &mut next),
                Token(token) => {
                    let Some(conn) = conns.get_mut(&token) else {
                        continue;
                    };
                    let mut outcome = Ok(false);
                    if event.is_writable() {
                        outcome = conn.writable().map(|()| false);
                    }
                    if outcome.is_ok()
                        && (event.is_readable() || event.is_read_closed() || event.is_error())
                        && !again.contains(&token)
                    {
                        spin.busy();
                        outcome = conn.readable(state, &mut buffer);
                    }
                    match outcome {
                        Ok(true) => again.push(token),
                        Ok(false) => {}
                        Err(reason) => close(state, poll.registry(), &mut conns, token, &reason),
                    }
                }
            }
        }
        for token in std::mem::take(&mut again) {
            let Some(conn) = conns.get_mut(&token) else {
                continue;
            };
            match conn.readable(state, &mut buffer) {
                Ok(true) => again.push(token),
                Ok(false) => {}
                Err(reason) => close(state, poll.registry(), &mut conns, token, &reason),
            }
        }
        serve_isolations(state, poll.registry(), &mut conns, &mut again);
        let late: Vec<usize> = conns
            .iter()
            .filter(|(_, c)| c.in_hello() && c.since.elapsed() > HELLO_TIMEOUT)
            .map(|(token, _)| *token)
            .collect();
        for token in late {
            crate::log::log_error!(
                "tcp data connection refused: no hello within {HELLO_TIMEOUT:?}"
            );
            close(state, poll.registry(), &mut conns, token, "no hello");
        }
    }
    for token in conns.keys().copied().collect::<Vec<_>>() {
        close(state, poll.registry(), &mut conns, token, "closing");
    }
    state.loop_ended.store(true, Ordering::SeqCst);
    for isolation in std::mem::take(&mut *lock(&state.isolations)) {
        let _ = isolation.done.send(0);
    }
}

/// Closes the connections of each writer a fence cuts off (`fence.rs`), between turns.
fn serve_isolations(
    state: &ServerState,
    registry: &Registry,
    conns: &mut HashMap<usize, Conn>,
    again: &mut Vec<usize>,
) {
    let isolations = std::mem::take(&mut *lock(&state.isolations));
    for isolation in isolations {
        let theirs: Vec<usize> = conns
            .iter()
            .filter(|(_, conn)| conn.writer() == Some(isolation.writer.as_str()))
            .map(|(token, _)| *token)
            .collect();
        for &token in &theirs {
            close(state, registry, conns, token, "cut off by a fence");
        }
        again.retain(|token| !theirs.contains(token));
        let _ = isolation.done.send(theirs.len());
    }
}

fn accept_all(
    state: &ServerState,
    registry: &Registry,
    listener: &TcpListener,
    conns: &mut HashMap<usize, Conn>,
    next: &mut usize,
) {
    loop {
        let (stream, remote) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors and the like: the pending connection stays queued and
                // the next one retries (the loop wakes again at the next arrival).
                crate::log::log_error!("tcp data listener: accept failed: {e}");
                return;
            }
        };
        set_socket_options(&stream);
        if stream.set_nonblocking(true).is_err() {
            continue;
        }
        let token = *next;
        *next += 1;
        let fd = stream.as_raw_fd();
        let registered = registry.register(
            &mut SourceFd(&fd),
            Token(token),
            Interest::READABLE | Interest::WRITABLE,
        );
        if registered.is_ok() {
            conns.insert(token, Conn::new(stream, remote));
            state.connections.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn close(
    state: &ServerState,
    registry: &Registry,
    conns: &mut HashMap<usize, Conn>,
    token: usize,
    reason: &str,
) {
    if let Some(conn) = conns.remove(&token) {
        let fd = conn.stream.as_raw_fd();
        let _ = registry.deregister(&mut SourceFd(&fd));
        let _ = conn.stream.shutdown(Shutdown::Both);
        if !state.closed.load(Ordering::SeqCst) {
            crate::log::debug!("tcp data connection ended: {reason}");
        }
        state.connections.fetch_sub(1, Ordering::SeqCst);
    }
}
