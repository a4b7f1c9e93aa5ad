//! Sending side: one writer thread per link turns jobs into `WRITE` + `COMMIT` frames;
//! an ack-reader thread completes them in order as `ACK`s come back.

use super::frame::{self, Header};
use super::io::{set_socket_options, writev_all};
use super::{lock, sockopt, staging, MAX_FRAME_PAYLOAD};
use crate::error::{Error, Result};
use crate::layout::RegionTable;
use crate::transport::{
    fail, for_each_copy, BreakHook, Done, JobView, Link, TransportKind, WriteJob,
};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

struct LinkState {
    peer: String,
    alive: AtomicBool,
    /// Jobs written and awaiting their ACK, in stream order.
    pending: Mutex<VecDeque<(u64, Done)>>,
    /// Set by `cancel`: the link's threads only mark it dead; the canceller fails the
    /// pending jobs once the writer has stopped.
    cancelling: Mutex<Option<Error>>,
    /// Told when the link breaks on its own (not for `cancel`, which marks it dead first).
    on_break: BreakHook,
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
        let (drained, was_alive): (Vec<(u64, Done)>, bool) = {
            let mut pending = lock(&self.pending);
            let was_alive = self.alive.swap(false, Ordering::SeqCst);
            (pending.drain(..).collect(), was_alive)
        };
        if was_alive {
            (self.on_break)(error);
        }
        if !drained.is_empty() {
            crate::log::log_error!(
                "tcp link to {} broken with {} pending calls: {error}",
                self.peer,
                drained.len()
            );
        }
        for (_, done) in drained {
            fail(done, error.clone());
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
pub(super) struct TcpLink {
    state: Arc<LinkState>,
    stream: TcpStream,
    jobs: Mutex<Option<mpsc::Sender<WriteJob>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl TcpLink {
    /// Connects to the peer's data listener (within `timeout`; `None`: no bound) and
    /// presents `session`.
    pub fn connect(
        peer: &str,
        addr: SocketAddr,
        session: u64,
        table: Arc<RegionTable>,
        timeout: Option<Duration>,
        on_break: BreakHook,
    ) -> Result<TcpLink> {
        let stream = match timeout {
            Some(timeout) => TcpStream::connect_timeout(&addr, timeout),
            None => TcpStream::connect(addr),
        }
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
            on_break,
        });
        let (tx, rx) = mpsc::channel::<WriteJob>();
        let writer = {
            let state = Arc::clone(&state);
            let stream = stream
                .try_clone()
                .map_err(|e| Error::io(peer, "socket clone", e))?;
            std::thread::Builder::new()
                .name("kvt-tcp-writer".into())
                .spawn(move || run_writer(&state, &stream, &table, rx))
                .map_err(|e| Error::io(peer, "thread spawn", e))?
        };
        let reader = {
            let state = Arc::clone(&state);
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
        *lock(&self.state.cancelling) = Some(error.clone());
        self.state.alive.store(false, Ordering::SeqCst);
        lock(&self.jobs).take();
        // Reset the connection: unsent bytes in the send queue are discarded and the peer
        // gets an RST (its receiver checks for it before every WRITE frame it applies).
        if sockopt::reset(&self.stream).is_err() {
            let _ = self.stream.shutdown(Shutdown::Both);
        }
        for thread in lock(&self.threads).drain(..) {
            let _ = thread.join();
        }
        // The writer has stopped: nothing of any pending job can be sent any more.
        let _ = sockopt::reset(&self.stream);
        self.state.fail_pending(&error);
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn max_run_bytes(&self) -> u64 {
        MAX_FRAME_PAYLOAD
    }

    /// The receiver acknowledges every call itself, after its notice (receiver.rs), and
    /// sums what it landed in host memory.
    fn receiver_checks(&self) -> crate::transport::ReceiverChecks {
        crate::transport::ReceiverChecks {
            verifies_checksums: true,
            answers_every_call: true,
        }
    }
}

/// Reused per-link scratch: frame headers and the iovecs that point at them.
///
/// Exported through `internals` so that `benches/planning.rs` and `tests/alloc_free.rs` can
/// measure the per-block cost of frame construction and prove it does not allocate once warm.
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
    /// An empty batch; its buffers grow on the first builds and are then reused.
    pub fn new() -> Self {
        FrameBatch {
            headers: Vec::new(),
            iovecs: Vec::new(),
        }
    }

    /// Fills headers and iovecs for a job (no allocation once capacities settle).
    /// `WRITE` frames for every run of the plan's layer (K, then V), then the `COMMIT`
    /// frame carrying `call_id` and the optional encoded notice.
    pub fn build(&mut self, table: &RegionTable, job: JobView<'_>, call_id: u64) {
        let JobView {
            runs,
            layer,
            blocks,
            shard,
            notice: tag,
        } = job;
        self.headers.clear();
        self.iovecs.clear();
        // One pass: headers and iovecs together; header iovecs get their address in a
        // second, cheap pass below because `headers` may still grow (and move) here.
        for_each_copy(table, shard, layer, runs, |op| {
            if op.len == 0 {
                return;
            }
            let mut done = 0;
            loop {
                let (local, remote, contiguous) = op.at(done);
                let len = contiguous.min(MAX_FRAME_PAYLOAD);
                let header = Header::write(op.region, remote, len as u32);
                self.headers.push(header.encode());
                self.iovecs.push(libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: frame::HEADER_BYTES,
                });
                self.iovecs.push(libc::iovec {
                    iov_base: local as usize as *mut libc::c_void,
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
    let mut device = staging::SendStaging::new();
    let mut call_id = 0u64;
    while let Some(job) = crate::util::poll_then_recv(&jobs) {
        call_id += 1;
        // GPU regions go through pinned staging (staging.rs); host-only jobs are unchanged.
        let staged = staging::layer_has_device(table, job.plan.layer);
        if !staged {
            batch.build(table, job.plan.view(), call_id);
        }
        {
            let mut pending = lock(&state.pending);
            if !state.alive.load(Ordering::SeqCst) {
                drop(pending);
                let error = lock(&state.cancelling)
                    .as_ref()
                    .map(Error::clone)
                    .unwrap_or_else(|| {
                        state.disconnected("the connection is broken; connect again")
                    });
                fail(job.done, error);
                continue;
            }
            pending.push_back((call_id, job.done));
        }
        if staged {
            let write = &mut |iovecs: &mut [libc::iovec]| writev_all(stream, iovecs);
            let sent = device.send(table, job.plan.view(), call_id, write, &state.peer);
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

/// Why the acknowledgement stream ended, for the error of the calls still pending.
fn lost(error: &std::io::Error) -> String {
    if error.kind() == std::io::ErrorKind::UnexpectedEof {
        "the peer closed the connection (its process exited or closed its communicator); connect again".into()
    } else {
        format!("connection lost: {error}; connect again")
    }
}

fn run_ack_reader(state: &LinkState, mut stream: TcpStream) {
    let mut bytes = [0u8; frame::HEADER_BYTES];
    let error = loop {
        if let Err(e) = stream.read_exact(&mut bytes) {
            break state.disconnected(lost(&e));
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
            break state.disconnected(lost(&e));
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
