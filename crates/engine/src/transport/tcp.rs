//! TCP transport: framed one-sided writes over a stream socket.
//!
//! Sender: one writer thread per link turns each job into `WRITE` frames (24-byte header +
//! payload gathered straight from the local regions with `writev`) followed by a `COMMIT`
//! frame; a reader thread completes jobs in order as the receiver's `ACK`s come back.
//! Receiver: one thread per data connection checks every frame against the registered
//! regions before copying its payload into place, and acknowledges a `COMMIT` only after
//! every earlier frame of the stream has been written to memory.

use super::{fail, for_each_copy, Arrival, ArrivalSink, Done, Link, WriteJob};
use crate::error::{Error, Result};
use crate::layout::RegionTable;
use crate::plan::Run;
use crate::wire::frame::{self, Header};
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes of the receiver's staging buffer (payloads of `DIRECT_READ_MIN` or more bypass it).
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn set_socket_options(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    super::sockopt::set_liveness(stream);
    let fd = stream.as_raw_fd();
    for option in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: fd is an open socket owned by `stream`; the option value is a c_int that
        // outlives the call.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&SOCKET_BUFFER_BYTES as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Writes every byte described by `iovecs`, advancing through partial writes.
fn writev_all(stream: &TcpStream, iovecs: &mut [libc::iovec]) -> std::io::Result<()> {
    let fd = stream.as_raw_fd();
    let mut first = 0;
    while first < iovecs.len() {
        // At least one iovec, then more while under both limits.
        let mut count = 1;
        let mut bytes = iovecs[first].iov_len;
        while first + count < iovecs.len() && count < IOV_MAX && bytes < WRITEV_MAX_BYTES {
            bytes += iovecs[first + count].iov_len;
            count += 1;
        }
        // SAFETY: fd is an open socket; iovecs[first..first+count] describe readable memory:
        // frame headers owned by the caller and payload ranges inside registered regions,
        // which stay valid while the link is open (the engine's region contract).
        let written = unsafe { libc::writev(fd, iovecs[first..].as_ptr(), count as libc::c_int) };
        if written < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        let mut left = written as usize;
        while left > 0 {
            let iov = &mut iovecs[first];
            if left >= iov.iov_len {
                left -= iov.iov_len;
                first += 1;
            } else {
                // SAFETY: advancing within the same iovec's buffer by fewer than its length.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(left) }.cast();
                iov.iov_len -= left;
                left = 0;
            }
        }
        while first < iovecs.len() && iovecs[first].iov_len == 0 {
            first += 1;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Sender side

struct LinkState {
    peer: String,
    alive: AtomicBool,
    /// Jobs written and awaiting their ACK, in stream order.
    pending: Mutex<VecDeque<(u64, Done)>>,
    /// Set by `cancel`: the link's threads only mark it dead; the canceller fails the
    /// pending jobs once the writer has stopped.
    cancelling: Mutex<Option<Error>>,
}

impl LinkState {
    /// Marks the link broken and fails every pending job with `error` (unless a cancel
    /// is tearing it down: then the canceller fails them, after the teardown).
    fn break_link(&self, error: &Error) {
        if lock(&self.cancelling).is_some() {
            self.alive.store(false, Ordering::SeqCst);
            return;
        }
        self.fail_pending(error);
    }

    fn fail_pending(&self, error: &Error) {
        let drained: Vec<(u64, Done)> = {
            let mut pending = lock(&self.pending);
            self.alive.store(false, Ordering::SeqCst);
            pending.drain(..).collect()
        };
        if !drained.is_empty() {
            crate::log_error!(
                "tcp link to {} broken with {} pending calls: {error}",
                self.peer,
                drained.len()
            );
        }
        for (_, done) in drained {
            fail(done, error.duplicate());
        }
    }

    fn disconnected(&self, reason: impl Into<String>) -> Error {
        Error::PeerDisconnected {
            peer: self.peer.clone(),
            reason: reason.into(),
        }
    }
}

/// A sending connection to one peer.
pub struct TcpLink {
    state: Arc<LinkState>,
    stream: TcpStream,
    jobs: Mutex<Option<mpsc::Sender<WriteJob>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl TcpLink {
    /// Connects to the peer's data listener and presents `session`.
    pub fn connect(
        peer: &str,
        addr: SocketAddr,
        session: u64,
        table: Arc<RegionTable>,
        timeout: Duration,
    ) -> Result<TcpLink> {
        let stream = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| Error::io(peer, "data connect", e))?;
        set_socket_options(&stream);
        (&stream)
            .write_all(&frame::encode_hello(session))
            .map_err(|e| Error::io(peer, "data hello", e))?;
        let state = Arc::new(LinkState {
            peer: peer.to_string(),
            alive: AtomicBool::new(true),
            pending: Mutex::new(VecDeque::new()),
            cancelling: Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel::<WriteJob>();
        let writer = {
            let state = state.clone();
            let stream = stream
                .try_clone()
                .map_err(|e| Error::io(peer, "socket clone", e))?;
            std::thread::Builder::new()
                .name("kvt-tcp-writer".into())
                .spawn(move || run_writer(&state, &stream, &table, rx))
                .map_err(|e| Error::io(peer, "thread spawn", e))?
        };
        let reader = {
            let state = state.clone();
            let stream = stream
                .try_clone()
                .map_err(|e| Error::io(peer, "socket clone", e))?;
            std::thread::Builder::new()
                .name("kvt-tcp-acks".into())
                .spawn(move || run_ack_reader(&state, stream))
                .map_err(|e| Error::io(peer, "thread spawn", e))?
        };
        Ok(TcpLink {
            state,
            stream,
            jobs: Mutex::new(Some(tx)),
            threads: Mutex::new(vec![writer, reader]),
        })
    }
}

impl Link for TcpLink {
    fn submit(&self, job: WriteJob) {
        if !self.state.alive.load(Ordering::SeqCst) {
            return fail(
                job.done,
                self.state
                    .disconnected("the connection is broken; connect again"),
            );
        }
        let jobs = lock(&self.jobs);
        match jobs.as_ref() {
            Some(tx) => {
                if let Err(mpsc::SendError(job)) = tx.send(job) {
                    fail(job.done, self.state.disconnected("the writer stopped"));
                }
            }
            None => fail(job.done, Error::Closed),
        }
    }

    fn is_alive(&self) -> bool {
        self.state.alive.load(Ordering::SeqCst)
    }

    fn shutdown(&self) {
        lock(&self.jobs).take();
        let _ = self.stream.shutdown(Shutdown::Both);
        for thread in lock(&self.threads).drain(..) {
            let _ = thread.join();
        }
        self.state.break_link(&Error::Closed);
    }

    fn cancel(&self, error: Error) {
        *lock(&self.state.cancelling) = Some(error.duplicate());
        self.state.alive.store(false, Ordering::SeqCst);
        lock(&self.jobs).take();
        // Reset the connection: unsent bytes in the send queue are discarded and the peer
        // gets an RST (its receiver checks for it before every WRITE frame it applies).
        if super::sockopt::reset(&self.stream).is_err() {
            let _ = self.stream.shutdown(Shutdown::Both);
        }
        for thread in lock(&self.threads).drain(..) {
            let _ = thread.join();
        }
        // The writer has stopped: nothing of any pending job can be sent any more.
        let _ = super::sockopt::reset(&self.stream);
        self.state.fail_pending(&error);
    }

    fn transport_name(&self) -> &'static str {
        "tcp"
    }
}

/// Reused per-link scratch: frame headers and the iovecs that point at them.
///
/// Public (but hidden) so that `benches/planning.rs` and `tests/alloc_free.rs` can measure
/// the per-block cost of frame construction and prove it does not allocate once warm.
#[doc(hidden)]
pub struct FrameBatch {
    headers: Vec<[u8; frame::HEADER_BYTES]>,
    iovecs: Vec<libc::iovec>,
}

impl Default for FrameBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameBatch {
    pub fn new() -> Self {
        FrameBatch {
            headers: Vec::new(),
            iovecs: Vec::new(),
        }
    }

    /// Fills headers and iovecs for a job (no allocation once capacities settle).
    pub fn build(&mut self, table: &RegionTable, job: &WriteJob, call_id: u64) {
        self.build_frames(
            table,
            job.layer,
            &job.runs,
            job.blocks,
            job.tag.as_deref(),
            call_id,
        );
    }

    /// [`FrameBatch::build`] from the job's parts: `WRITE` frames for every run of `layer`
    /// (K, then V), then the `COMMIT` frame carrying `call_id` and the optional tag.
    pub fn build_frames(
        &mut self,
        table: &RegionTable,
        layer: u32,
        runs: &[Run],
        blocks: u32,
        tag: Option<&[u8]>,
        call_id: u64,
    ) {
        self.headers.clear();
        self.iovecs.clear();
        // One pass: headers and iovecs together; header iovecs get their address in a
        // second, cheap pass below because `headers` may still grow (and move) here.
        for_each_copy(table, layer, runs, |op| {
            if op.len == 0 {
                return;
            }
            let mut done = 0;
            loop {
                let len = (op.len - done).min(MAX_FRAME_PAYLOAD);
                let header = Header::write(op.region, op.remote_offset + done, len as u32);
                self.headers.push(header.encode());
                self.iovecs.push(libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: frame::HEADER_BYTES,
                });
                self.iovecs.push(libc::iovec {
                    iov_base: (op.local_addr + done) as usize as *mut libc::c_void,
                    iov_len: len as usize,
                });
                done += len;
                if done >= op.len {
                    break;
                }
            }
        });
        let tag_len = tag.map_or(0, <[u8]>::len);
        let commit = Header {
            kind: frame::COMMIT,
            flags: u8::from(tag.is_some()),
            region: blocks,
            offset: call_id,
            len: tag_len as u32,
            aux: layer,
        };
        self.headers.push(commit.encode());
        self.iovecs.push(libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: frame::HEADER_BYTES,
        });
        if let Some(tag) = tag {
            self.iovecs.push(libc::iovec {
                iov_base: tag.as_ptr() as *mut libc::c_void,
                iov_len: tag.len(),
            });
        }
        // `headers` no longer moves: point every header iovec (even slots) at its header.
        for (iov, header) in self.iovecs.iter_mut().step_by(2).zip(&self.headers) {
            iov.iov_base = header.as_ptr() as *mut libc::c_void;
        }
    }

    /// The iovecs of the last build: header, payload, header, payload, ..., commit[, tag].
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }

    /// Frames (WRITE and COMMIT) of the last build.
    pub fn frames(&self) -> usize {
        self.headers.len()
    }
}

fn run_writer(
    state: &LinkState,
    stream: &TcpStream,
    table: &RegionTable,
    jobs: mpsc::Receiver<WriteJob>,
) {
    let mut batch = FrameBatch::new();
    let mut device = super::staging::SendStaging::new();
    let mut call_id = 0u64;
    for job in jobs {
        call_id += 1;
        // GPU regions go through pinned staging (staging.rs); host-only jobs are unchanged.
        let staged = super::staging::layer_has_device(table, job.layer);
        if !staged {
            batch.build(table, &job, call_id);
        }
        {
            let mut pending = lock(&state.pending);
            if !state.alive.load(Ordering::SeqCst) {
                drop(pending);
                let error = lock(&state.cancelling)
                    .as_ref()
                    .map(Error::duplicate)
                    .unwrap_or_else(|| {
                        state.disconnected("the connection is broken; connect again")
                    });
                fail(job.done, error);
                continue;
            }
            pending.push_back((call_id, job.done));
        }
        if staged {
            let (runs, tag) = (&job.runs, job.tag.as_deref());
            let write = &mut |iovecs: &mut [libc::iovec]| writev_all(stream, iovecs);
            let sent = device.send(
                table,
                job.layer,
                runs,
                job.blocks,
                tag,
                call_id,
                write,
                &state.peer,
            );
            if let Err(e) = sent {
                state.break_link(&e);
                let _ = stream.shutdown(Shutdown::Both);
            }
        } else if let Err(e) = writev_all(stream, &mut batch.iovecs) {
            state.break_link(&Error::io(state.peer.clone(), "data write", e));
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn run_ack_reader(state: &LinkState, mut stream: TcpStream) {
    let mut bytes = [0u8; frame::HEADER_BYTES];
    let error = loop {
        if let Err(e) = stream.read_exact(&mut bytes) {
            break state.disconnected(format!("connection lost: {e}"));
        }
        let header = match Header::decode(&bytes) {
            Ok(h) => h,
            Err(e) => break Error::protocol(state.peer.clone(), e.0),
        };
        // Only ACK/NACK come back (their detail is bounded by the decoder): a hostile
        // receiver announcing a WRITE-sized detail must not make us allocate it.
        if header.kind != frame::ACK && header.kind != frame::NACK {
            break Error::protocol(
                state.peer.clone(),
                format!("unexpected frame type {} from receiver", header.kind),
            );
        }
        let mut detail = vec![0u8; header.len as usize];
        if let Err(e) = stream.read_exact(&mut detail) {
            break state.disconnected(format!("connection lost: {e}"));
        }
        let front = lock(&state.pending).pop_front();
        let Some((call_id, done)) = front else {
            break Error::protocol(state.peer.clone(), "acknowledgement for no pending call");
        };
        if call_id != header.offset && header.kind != frame::NACK {
            fail(
                done,
                Error::protocol(state.peer.clone(), "acknowledgements out of order"),
            );
            break Error::protocol(
                state.peer.clone(),
                format!("expected ack {call_id}, got {}", header.offset),
            );
        }
        match header.kind {
            frame::ACK => {
                let _ = done.send(Ok(()));
            }
            frame::NACK => {
                let reason = String::from_utf8_lossy(&detail).into_owned();
                fail(
                    done,
                    Error::protocol(
                        state.peer.clone(),
                        format!("the peer refused the write: {reason}"),
                    ),
                );
                break Error::protocol(
                    state.peer.clone(),
                    format!("the peer refused a write: {reason}"),
                );
            }
            other => {
                break Error::protocol(
                    state.peer.clone(),
                    format!("unexpected frame type {other} from receiver"),
                )
            }
        }
    };
    state.break_link(&error);
    let _ = stream.shutdown(Shutdown::Both);
}

// ---------------------------------------------------------------------------------------
// Receiver side

/// A session token handed out in a handshake reply, admitting one data connection.
#[derive(Debug, Clone)]
struct Admission {
    peer_name: String,
}

struct ServerState {
    table: Arc<RegionTable>,
    admissions: Mutex<HashMap<u64, Admission>>,
    connections: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
    closed: AtomicBool,
    arrivals: Option<ArrivalSink>,
    /// Started by the first admission: faults the regions in ahead of the first writes.
    prefault: Mutex<Option<JoinHandle<()>>>,
}

/// Listens for data connections and writes admitted peers' frames into local regions.
pub struct TcpServer {
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
            prefault: Mutex::new(None),
        });
        let accept_thread = {
            let state = state.clone();
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
            let state = self.state.clone();
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
            let session = crate::random_u64();
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
    std::env::var("KVCACHE_TCP_PREFAULT")
        .map(|v| {
            !matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "0" | "false" | "off" | "no"
            )
        })
        .unwrap_or(true)
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
                crate::debug!(
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
                crate::log_error!("tcp data listener: accept failed: {e}");
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
        let worker_state = state.clone();
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

/// Buffered reads from the data socket that can land payloads directly in region memory.
///
/// Small frames (headers, payloads under [`DIRECT_READ_MIN`]) are served from a staging
/// buffer filled by large reads, so that a stream of 1 KiB blocks costs one syscall per
/// ~1 MiB. Larger payloads are read straight into their destination with a `readv` whose
/// second iovec picks up the next frame header into the staging buffer, so a stream of
/// 64 KiB blocks costs one syscall and one copy (the kernel's) per frame.
struct FrameReader {
    stream: TcpStream,
    buffer: Box<[u8]>,
    start: usize,
    end: usize,
    /// The last payload went direct: keep read-ahead small so that the next large payload
    /// is not pulled through the staging buffer (an extra copy).
    direct: bool,
}

/// Payloads of at least this many bytes bypass the staging buffer.
const DIRECT_READ_MIN: usize = 16 * 1024;
/// Read-ahead into the staging buffer while a payload lands directly: one frame header.
const DIRECT_READ_AHEAD: usize = frame::HEADER_BYTES;

impl FrameReader {
    fn new(stream: TcpStream) -> Self {
        FrameReader {
            stream,
            buffer: vec![0u8; RECEIVE_BUFFER_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
            direct: false,
        }
    }

    /// Reads more bytes behind `end` (at least one, or an error): up to the whole free
    /// buffer, or only `want` bytes after a direct payload.
    fn fill(&mut self, want: usize) -> std::io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let limit = if self.direct {
            (self.end + want.max(DIRECT_READ_AHEAD)).min(self.buffer.len())
        } else {
            self.buffer.len()
        };
        let n = self.stream.read(&mut self.buffer[self.end..limit])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.end += n;
        Ok(())
    }

    fn read_exact(&mut self, out: &mut [u8]) -> std::io::Result<()> {
        let mut done = 0;
        while done < out.len() {
            if self.start == self.end {
                self.fill(out.len() - done)?;
            }
            let n = (self.end - self.start).min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.buffer[self.start..self.start + n]);
            self.start += n;
            done += n;
        }
        Ok(())
    }

    /// Moves unread bytes to the front of the buffer.
    fn compact(&mut self) {
        if self.start > 0 {
            self.buffer.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Reads `len` bytes into raw memory at `dst`.
    ///
    /// # Safety
    /// `dst..dst+len` must be writable memory that no Rust reference aliases.
    unsafe fn read_into(&mut self, dst: *mut u8, len: usize) -> std::io::Result<()> {
        let direct = len >= DIRECT_READ_MIN;
        self.direct = direct;
        let mut done = 0;
        while done < len {
            if self.start < self.end {
                let n = (self.end - self.start).min(len - done);
                // SAFETY: source is initialized buffer bytes; destination is inside the
                // caller's range (done + n <= len); the two never overlap (the buffer is ours).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.buffer.as_ptr().add(self.start),
                        dst.add(done),
                        n,
                    )
                };
                self.start += n;
                done += n;
            } else if direct {
                super::sockopt::check_not_reset(self.stream.as_raw_fd())?;
                // Staging is empty: land the rest in place and read ahead one header.
                self.start = 0;
                self.end = 0;
                // SAFETY: done < len, so dst+done stays inside the caller's writable range.
                let rest = unsafe { dst.add(done) };
                let iovecs = [
                    libc::iovec {
                        iov_base: rest.cast(),
                        iov_len: len - done,
                    },
                    libc::iovec {
                        iov_base: self.buffer.as_mut_ptr().cast(),
                        iov_len: DIRECT_READ_AHEAD,
                    },
                ];
                // SAFETY: fd is our open socket; both iovecs describe writable memory (the
                // caller's range per the contract, and the start of our own buffer).
                let n = unsafe { libc::readv(self.stream.as_raw_fd(), iovecs.as_ptr(), 2) };
                if n < 0 {
                    let err = std::io::Error::last_os_error();
                    if err.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(err);
                }
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                let n = n as usize;
                let into_dst = n.min(len - done);
                done += into_dst;
                self.end = n - into_dst;
            } else {
                self.compact();
                self.fill(len - done)?;
            }
        }
        Ok(())
    }
}

fn run_receiver(state: &ServerState, stream: TcpStream, remote: SocketAddr) {
    let mut hello = [0u8; frame::HELLO_BYTES];
    let _ = stream.set_read_timeout(Some(HELLO_TIMEOUT));
    let admission = (&stream)
        .read_exact(&mut hello)
        .map_err(|e| format!("no hello: {e}"))
        .and_then(|()| frame::decode_hello(&hello).map_err(|e| e.0))
        .and_then(|session| {
            lock(&state.admissions)
                .remove(&session)
                .ok_or_else(|| "unknown or already used session token".to_string())
        });
    let admission = match admission {
        Ok(admission) => admission,
        Err(reason) => {
            crate::log_error!("tcp data connection from {remote} refused: {reason}");
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    };
    let _ = stream.set_read_timeout(None);
    crate::debug!(
        "tcp data connection from {remote} admitted for peer {}",
        admission.peer_name
    );
    let Ok(ack_stream) = stream.try_clone() else {
        return;
    };
    let mut reader = FrameReader::new(stream);
    if let Err(reason) = receive_frames(state, &mut reader, &ack_stream, &admission) {
        if !state.closed.load(Ordering::SeqCst) {
            crate::debug!(
                "tcp data connection from {} ({remote}) ended: {reason}",
                admission.peer_name
            );
        }
    }
    let _ = ack_stream.shutdown(Shutdown::Both);
}

fn send_reply(stream: &TcpStream, kind: u8, call_id: u64, detail: &[u8]) -> std::io::Result<()> {
    let header = Header {
        kind,
        flags: 0,
        region: 0,
        offset: call_id,
        len: detail.len() as u32,
        aux: 0,
    };
    if detail.is_empty() {
        // The steady-state ACK: no allocation.
        return (&*stream).write_all(&header.encode());
    }
    let mut out = Vec::with_capacity(frame::HEADER_BYTES + detail.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(detail);
    (&*stream).write_all(&out)
}

fn receive_frames(
    state: &ServerState,
    reader: &mut FrameReader,
    ack_stream: &TcpStream,
    admission: &Admission,
) -> std::result::Result<(), String> {
    let mut bytes = [0u8; frame::HEADER_BYTES];
    let mut device = super::staging::RecvStaging::new();
    loop {
        reader.read_exact(&mut bytes).map_err(|e| e.to_string())?;
        let header = Header::decode(&bytes).map_err(|e| e.0)?;
        match header.kind {
            frame::WRITE => {
                // A writer that timed out or was aborted resets the connection before it
                // reports the failure: bytes of it still queued here must not land.
                super::sockopt::check_not_reset(reader.stream.as_raw_fd())
                    .map_err(|e| format!("the writer reset the connection: {e}"))?;
                let target = state.table.get(header.region).and_then(|region| {
                    let end = header.offset.checked_add(u64::from(header.len))?;
                    (end <= region.len).then_some(region.addr + header.offset)
                });
                let Some(addr) = target else {
                    let reason = format!(
                        "write of {} bytes at offset {} of region {} is outside the registered regions ({} regions of {} bytes)",
                        header.len,
                        header.offset,
                        header.region,
                        state.table.regions().len(),
                        state.table.layout.region_bytes()
                    );
                    return refuse(ack_stream, reason);
                };
                if state.table.memory(header.region).is_device() {
                    // GPU region: socket → pinned staging → async copy (staging.rs).
                    // SAFETY: read_into's destination is the staging slot given; the
                    // device range was checked to lie inside the registered region.
                    let read = &mut |dst: *mut u8, n| unsafe { reader.read_into(dst, n) };
                    let len = header.len as usize;
                    // SAFETY: addr..addr+len lies inside a registered device region.
                    match unsafe { device.receive(&state.table, addr, len, read) } {
                        Ok(()) => continue,
                        Err(super::staging::RecvError::Io(e)) => return Err(e.to_string()),
                        Err(super::staging::RecvError::Gpu(reason)) => {
                            return refuse(ack_stream, reason)
                        }
                    }
                }
                // SAFETY: the range was checked to lie inside a registered region, which the
                // engine keeps valid until this thread has been joined at close.
                unsafe { reader.read_into(addr as usize as *mut u8, header.len as usize) }
                    .map_err(|e| e.to_string())?;
            }
            frame::COMMIT => {
                let mut tag = vec![0u8; header.len as usize];
                reader.read_exact(&mut tag).map_err(|e| e.to_string())?;
                // Staged GPU copies land before the notice and the ACK (no-op for hosts).
                if let Err(super::staging::RecvError::Gpu(reason)) = device.flush() {
                    return refuse(ack_stream, reason);
                }
                if header.flags & 1 != 0 {
                    if let Some(sink) = &state.arrivals {
                        sink(Arrival {
                            peer: admission.peer_name.clone(),
                            tag,
                            layer: header.aux,
                            blocks: header.region,
                        });
                    }
                }
                send_reply(ack_stream, frame::ACK, header.offset, &[])
                    .map_err(|e| e.to_string())?;
            }
            other => return Err(format!("unexpected frame type {other} from writer")),
        }
    }
}

/// A frame outside the regions: nothing of it is written; a NACK fails the oldest pending
/// call and the connection is closed, since the rest of the stream cannot be trusted.
fn refuse(ack_stream: &TcpStream, reason: String) -> std::result::Result<(), String> {
    crate::log_error!("tcp receiver refused a frame: {reason}");
    let _ = send_reply(ack_stream, frame::NACK, 0, reason.as_bytes());
    Err(reason)
}
