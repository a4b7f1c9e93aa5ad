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

/// What only the thread writing to the socket touches.
struct Outbox {
    call_id: u64,
    /// Frames of the job being written, reused from job to job; `first`: its first iovec
    /// not yet written whole.
    batch: FrameBatch,
    first: usize,
    /// The job `batch` was built for, while some of its frames are unwritten (the tag
    /// its last iovec may point at lives in it).
    current: Option<JobPlan>,
    /// Jobs waiting behind it (their frames are built when their turn comes).
    queue: VecDeque<(u64, JobPlan)>,
    device: staging::SendStaging,
    /// Set by `cancel` and `shutdown`: nothing more may be written.
    closed: bool,
}

impl Outbox {
    /// Jobs are waiting for room in the send buffer.
    fn busy(&self) -> bool {
        self.current.is_some() || !self.queue.is_empty()
    }

    fn clear(&mut self) {
        self.current = None;
        self.queue.clear();
    }
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

    /// Writes queued jobs until none is left or the send buffer is full.
    fn continue_queue(&self, out: &mut Outbox) {
        let fd = self.stream.as_raw_fd();
        loop {
            if out.closed {
                return out.clear();
            }
            if out.current.is_some() {
                match write_some(fd, &mut out.batch.iovecs, &mut out.first) {
                    Ok(true) => out.current = None,
                    Ok(false) => return,
                    Err(e) => {
                        out.clear();
                        return self.write_failed(e);
                    }
                }
            }
            let Some((call_id, plan)) = out.queue.pop_front() else {
                return;
            };
            out.batch.build(&self.table, plan.view(), call_id);
            out.first = 0;
            out.current = Some(plan);
        }
    }

    /// Writes every queued job, waiting for room (before a staged job, which is written
    /// with waits).
    fn flush_waiting(&self, out: &mut Outbox) -> std::io::Result<()> {
        let fd = self.stream.as_raw_fd();
        if out.current.take().is_some() {
            write_all_waiting(fd, &mut out.batch.iovecs[out.first..])?;
        }
        while let Some((call_id, plan)) = out.queue.pop_front() {
            out.batch.build(&self.table, plan.view(), call_id);
            write_all_waiting(fd, &mut out.batch.iovecs)?;
        }
        Ok(())
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
        let staged = staging::layer_has_device(&self.table, job.plan.layer);
        lock(&self.pending).push_back((call_id, job.done));
        let fd = self.stream.as_raw_fd();
        if staged {
            // GPU regions go through pinned staging (staging.rs), written with waits for
            // room on this thread, after every job queued before it.
            let out = &mut **out;
            if let Err(e) = self.flush_waiting(out) {
                out.clear();
                return self.write_failed(e);
            }
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
        if out.busy() {
            self.continue_queue(out);
        }
        if out.busy() {
            // Still no room: its frames are built when its turn comes.
            return out.queue.push_back((call_id, job.plan));
        }
        out.batch.build(&self.table, job.plan.view(), call_id);
        out.first = 0;
        let out = &mut **out;
        match write_some(fd, &mut out.batch.iovecs, &mut out.first) {
            Ok(true) => {}
            Ok(false) => out.current = Some(job.plan),
            Err(e) => self.write_failed(e),
        }
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
                let mut header_bytes = [0u8; frame::HEADER_BYTES];
                header_bytes.copy_from_slice(&acks.bytes[at..at + frame::HEADER_BYTES]);
                let header = Header::decode(&header_bytes)
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
            if n < chunk.len() {
                // A short read drained the socket; edge-triggered readiness reports what
                // arrives later, so the read that would only say WouldBlock is skipped.
                return Ok(());
            }
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
                first: 0,
                current: None,
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
            out.clear();
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

    /// The receiver acknowledges every call itself, after its notice (receiver.rs), and
    /// sums what it landed in host memory.
    fn receiver_checks(&self) -> crate::transport::ReceiverChecks {
        crate::transport::ReceiverChecks {
            verifies_checksums: true,
            sums_gpu_memory: true,
            link_sums_gpu_sources: false,
            answers_acked_calls: true,
            landing_limit: None,
        }
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
