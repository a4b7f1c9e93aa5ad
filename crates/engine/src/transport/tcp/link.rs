//! Sending side of one link. The submitting thread turns each job into `WRITE` + `COMMIT`
//! frames and writes them itself (non-blocking `writev`); what does not fit the socket's
//! send buffer is queued and written by the transport's send loop (`sender.rs`) as room
//! frees up. The same loop reads the `ACK`s and completes the jobs in order.

use super::batch::FrameBatch;
use super::frame::{self, Header};
use super::io::{set_socket_options, write_all_waiting, write_some};
use super::sender::{Readiness, SendLoop};
use super::{lock, sockopt, staging, MAX_FRAME_PAYLOAD};
use crate::error::{Error, Result};
use crate::layout::RegionTable;
use crate::transport::{fail, BreakHook, Done, JobPlan, Link, TransportKind, WriteJob};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

/// A job whose frames did not all fit the send buffer: the rest of its iovecs, from
/// `first`, and its plan (the tag the last iovec may point at).
struct Queued {
    batch: FrameBatch,
    first: usize,
    _plan: JobPlan,
}

/// What only the thread writing to the socket touches.
struct Outbox {
    call_id: u64,
    /// Scratch reused for every job written whole at once.
    batch: FrameBatch,
    queue: VecDeque<Queued>,
    device: staging::SendStaging,
    /// Set by `cancel` and `shutdown`: nothing more may be written.
    closed: bool,
}

/// Acknowledgement bytes read but not yet parsed (a frame cut by the reads).
struct Acks {
    bytes: Vec<u8>,
}

struct LinkState {
    peer: String,
    stream: TcpStream,
    table: Arc<RegionTable>,
    alive: AtomicBool,
    /// Jobs written and awaiting their ACK, in stream order.
    pending: Mutex<VecDeque<(u64, Done)>>,
    /// Set by `cancel`: the loop only marks the link dead; the canceller fails the
    /// pending jobs once nothing can be written any more.
    cancelling: Mutex<Option<Error>>,
    /// Told when the link breaks on its own (not for `cancel`, which marks it dead first).
    on_break: BreakHook,
    out: Mutex<Outbox>,
    acks: Mutex<Acks>,
    /// The loop saw room in the send buffer while another thread held `out`: whoever
    /// holds it next continues the queue.
    kick: AtomicBool,
    /// Its token with the send loop (0 until registered).
    token: AtomicUsize,
    send_loop: Arc<SendLoop>,
}

impl LinkState {
    /// Marks the link broken and fails every pending job with `error` (unless a cancel
    /// is tearing it down: then the canceller fails them, after the teardown).
    fn break_link(&self, error: &Error) {
        self.send_loop
            .remove(self.stream.as_raw_fd(), self.token.load(Ordering::SeqCst));
        let _ = self.stream.shutdown(Shutdown::Both);
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

    /// Why a job cannot be sent on a dead link.
    fn refusal(&self) -> Error {
        lock(&self.cancelling)
            .as_ref()
            .map(Error::clone)
            .unwrap_or_else(|| self.disconnected("the connection is broken; connect again"))
    }

    fn write_failed(&self, e: std::io::Error) {
        self.break_link(&Error::io(self.peer.clone(), "data write", e));
    }

    /// Writes queued jobs until the queue is empty or the send buffer is full.
    fn continue_queue(&self, out: &mut Outbox) {
        let fd = self.stream.as_raw_fd();
        while let Some(front) = out.queue.front_mut() {
            if out.closed {
                out.queue.clear();
                return;
            }
            match write_some(fd, &mut front.batch.iovecs, &mut front.first) {
                Ok(true) => {
                    out.queue.pop_front();
                }
                Ok(false) => return,
                Err(e) => {
                    out.queue.clear();
                    return self.write_failed(e);
                }
            }
        }
    }

    /// Continues the queue if the loop asked for it and `out` is free; called by the loop
    /// and by every thread right after it released `out`, so no wake-up is lost.
    fn drain_if_kicked(&self) {
        while self.kick.load(Ordering::SeqCst) {
            let mut out = match self.out.try_lock() {
                Ok(out) => out,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            self.kick.store(false, Ordering::SeqCst);
            self.continue_queue(&mut out);
        }
    }

    fn send(&self, out: &mut MutexGuard<'_, Outbox>, job: WriteJob) {
        if out.closed || !self.alive.load(Ordering::SeqCst) {
            return fail(job.done, self.refusal());
        }
        out.call_id += 1;
        let call_id = out.call_id;
        // GPU regions go through pinned staging (staging.rs), written with waits for room
        // on this thread; host-only jobs are written without waiting.
        let staged = staging::layer_has_device(&self.table, job.plan.layer);
        if !staged {
            out.batch.build(&self.table, job.plan.view(), call_id);
        }
        lock(&self.pending).push_back((call_id, job.done));
        let fd = self.stream.as_raw_fd();
        if staged {
            let out = &mut **out;
            for queued in &mut out.queue {
                let rest = &mut queued.batch.iovecs[queued.first..];
                if let Err(e) = write_all_waiting(fd, rest) {
                    out.queue.clear();
                    return self.write_failed(e);
                }
            }
            out.queue.clear();
            let write = &mut |iovecs: &mut [libc::iovec]| write_all_waiting(fd, iovecs);
            let view = job.plan.view();
            if let Err(e) = out
                .device
                .send(&self.table, view, call_id, write, &self.peer)
            {
                self.break_link(&e);
            }
            return;
        }
        if !out.queue.is_empty() {
            self.continue_queue(out);
        }
        let mut first = 0;
        if out.queue.is_empty() {
            match write_some(fd, &mut out.batch.iovecs, &mut first) {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => return self.write_failed(e),
            }
        }
        let batch = std::mem::take(&mut out.batch);
        out.queue.push_back(Queued {
            batch,
            first,
            _plan: job.plan,
        });
    }

    /// Reads every acknowledgement that arrived; `Err` ends the link with its error.
    fn read_acks(&self, acks: &mut Acks) -> std::result::Result<(), Error> {
        let mut chunk = [0u8; 4096];
        loop {
            let n = match (&self.stream).read(&mut chunk) {
                Ok(0) => {
                    return Err(self.disconnected(lost(&std::io::ErrorKind::UnexpectedEof.into())))
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.disconnected(lost(&e))),
            };
            acks.bytes.extend_from_slice(&chunk[..n]);
            let mut at = 0;
            while acks.bytes.len() - at >= frame::HEADER_BYTES {
                let header_bytes: &[u8; frame::HEADER_BYTES] = acks.bytes
                    [at..at + frame::HEADER_BYTES]
                    .try_into()
                    .unwrap_or(&[0; frame::HEADER_BYTES]);
                let header = Header::decode(header_bytes)
                    .map_err(|e| Error::protocol(self.peer.clone(), e.0))?;
                // Only ACK/NACK come back (their detail is bounded by the decoder): a hostile
                // receiver announcing a WRITE-sized detail must not make us wait for it.
                if header.kind != frame::ACK && header.kind != frame::NACK {
                    return Err(Error::protocol(
                        self.peer.clone(),
                        format!("unexpected frame type {} from receiver", header.kind),
                    ));
                }
                let end = at + frame::HEADER_BYTES + header.len as usize;
                if acks.bytes.len() < end {
                    break;
                }
                let detail = &acks.bytes[at + frame::HEADER_BYTES..end];
                self.complete(&header, detail)?;
                at = end;
            }
            acks.bytes.drain(..at);
        }
    }

    /// Completes the oldest pending job as `header` (an ACK or NACK) says.
    fn complete(&self, header: &Header, detail: &[u8]) -> std::result::Result<(), Error> {
        let front = lock(&self.pending).pop_front();
        let Some((call_id, done)) = front else {
            return Err(Error::protocol(
                self.peer.clone(),
                "acknowledgement for no pending call",
            ));
        };
        if header.kind == frame::NACK {
            let reason = String::from_utf8_lossy(detail).into_owned();
            fail(
                done,
                Error::protocol(
                    self.peer.clone(),
                    format!("the peer refused the write: {reason}"),
                ),
            );
            return Err(Error::protocol(
                self.peer.clone(),
                format!("the peer refused a write: {reason}"),
            ));
        }
        if call_id != header.offset {
            fail(
                done,
                Error::protocol(self.peer.clone(), "acknowledgements out of order"),
            );
            return Err(Error::protocol(
                self.peer.clone(),
                format!("expected ack {call_id}, got {}", header.offset),
            ));
        }
        let _ = done.send(Ok(()));
        Ok(())
    }
}

impl Readiness for LinkState {
    fn readable(&self) {
        let mut acks = lock(&self.acks);
        if !self.alive.load(Ordering::SeqCst) {
            return;
        }
        if let Err(error) = self.read_acks(&mut acks) {
            drop(acks);
            self.break_link(&error);
        }
    }

    fn writable(&self) {
        self.kick.store(true, Ordering::SeqCst);
        self.drain_if_kicked();
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

/// A sending connection to one peer.
pub(super) struct TcpLink {
    state: Arc<LinkState>,
}

impl TcpLink {
    /// Connects to the peer's data listener (within `timeout`; `None`: no bound), presents
    /// `session` and registers the socket with `send_loop`.
    pub fn connect(
        peer: &str,
        addr: SocketAddr,
        session: u64,
        table: Arc<RegionTable>,
        timeout: Option<Duration>,
        on_break: BreakHook,
        send_loop: Arc<SendLoop>,
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
        stream
            .set_nonblocking(true)
            .map_err(|e| Error::io(peer, "data connect", e))?;
        let state = Arc::new(LinkState {
            peer: peer.to_string(),
            stream,
            table,
            alive: AtomicBool::new(true),
            pending: Mutex::new(VecDeque::new()),
            cancelling: Mutex::new(None),
            on_break,
            out: Mutex::new(Outbox {
                call_id: 0,
                batch: FrameBatch::new(),
                queue: VecDeque::new(),
                device: staging::SendStaging::new(),
                closed: false,
            }),
            acks: Mutex::new(Acks {
                bytes: Vec::with_capacity(frame::HEADER_BYTES + frame::MAX_DETAIL_BYTES as usize),
            }),
            kick: AtomicBool::new(false),
            token: AtomicUsize::new(0),
            send_loop: Arc::clone(&send_loop),
        });
        let owner: Arc<dyn Readiness> = Arc::clone(&state) as Arc<dyn Readiness>;
        let token = send_loop
            .add(state.stream.as_raw_fd(), owner)
            .map_err(|e| Error::io(peer, "data connection registration", e))?;
        state.token.store(token, Ordering::SeqCst);
        Ok(TcpLink { state })
    }

    /// Stops every writer and the loop's handling of this link: once this returns, no
    /// byte is written and no acknowledgement is processed any more.
    fn quiesce(&self) {
        let state = &self.state;
        state
            .send_loop
            .remove(state.stream.as_raw_fd(), state.token.load(Ordering::SeqCst));
        {
            let mut out = lock(&state.out);
            out.closed = true;
            out.queue.clear();
        }
        drop(lock(&state.acks));
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
        {
            let mut out = lock(&self.state.out);
            self.state.send(&mut out, job);
        }
        self.state.drain_if_kicked();
    }

    fn is_alive(&self) -> bool {
        self.state.alive.load(Ordering::SeqCst)
    }

    fn shutdown(&self) {
        let _ = self.state.stream.shutdown(Shutdown::Both);
        self.quiesce();
        if lock(&self.state.cancelling).is_none() {
            self.state.fail_pending(&Error::Closed);
        }
    }

    fn cancel(&self, error: Error) {
        *lock(&self.state.cancelling) = Some(error.clone());
        self.state.alive.store(false, Ordering::SeqCst);
        // Reset the connection: unsent bytes in the send queue are discarded and the peer
        // gets an RST (its receiver checks for it before every WRITE frame it applies); a
        // staged write waiting for room wakes up with the error.
        if sockopt::reset(&self.state.stream).is_err() {
            let _ = self.state.stream.shutdown(Shutdown::Both);
        }
        self.quiesce();
        // Nothing of any pending job can be sent any more.
        let _ = sockopt::reset(&self.state.stream);
        self.state.fail_pending(&error);
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn max_run_bytes(&self) -> u64 {
        MAX_FRAME_PAYLOAD
    }
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        self.state.send_loop.remove(
            self.state.stream.as_raw_fd(),
            self.state.token.load(Ordering::SeqCst),
        );
    }
}
