//! One attached worker's connection: a reader thread that frames what arrives (with its
//! descriptors), and an outbox that sends answers without blocking the caller. An answer
//! goes out at once when nothing is queued; otherwise (the worker is slow to read) it
//! waits in the outbox for the connection's writer thread, up to a bound.

use super::frame::{self, Parsed, HEADER_BYTES, MAX_FDS_PER_FRAME};
use super::route::{Replies, WorkerRoute};
use super::SidecarEvent;
use crate::error::{Error, Result};
use crate::util::{lock, wait};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendFlags};
use std::collections::VecDeque;
use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, Weak};

/// Answers a worker has not read yet, beyond which it is disconnected (it stopped reading).
const MAX_QUEUED_BYTES: usize = 64 << 20;
/// Bytes read per receive.
const READ_CHUNK: usize = 64 << 10;

#[derive(Default)]
struct Outbox {
    queue: VecDeque<Vec<u8>>,
    queued_bytes: usize,
    /// The writer thread is sending a frame it took from the queue.
    busy: bool,
    closed: bool,
}

pub(crate) struct Connection {
    pub(crate) id: u64,
    stream: UnixStream,
    out: Mutex<Outbox>,
    wake: Condvar,
    /// The native path of this worker's `write` requests, once routed.
    route: Mutex<Option<Arc<WorkerRoute>>>,
}

impl Connection {
    pub(crate) fn new(id: u64, stream: UnixStream) -> Connection {
        Connection {
            id,
            stream,
            out: Mutex::default(),
            wake: Condvar::new(),
            route: Mutex::default(),
        }
    }

    /// The worker's route, created with `make` when it has none.
    pub(crate) fn route_or(&self, make: impl FnOnce() -> WorkerRoute) -> Arc<WorkerRoute> {
        Arc::clone(lock(&self.route).get_or_insert_with(|| Arc::new(make())))
    }

    pub(crate) fn route(&self) -> Option<Arc<WorkerRoute>> {
        lock(&self.route).clone()
    }

    /// Every `write` goes to the serving layer again.
    pub(crate) fn unroute(&self) {
        lock(&self.route).take();
    }

    /// Queues the frame of `body` as answer `id`: sent now if nothing is ahead of it.
    pub(crate) fn send(&self, id: u32, body: &[u8]) -> Result<()> {
        let frame = frame::encode(id, body);
        let mut out = lock(&self.out);
        if out.closed {
            return Err(Error::Closed);
        }
        let mut sent = 0;
        if out.queue.is_empty() && !out.busy {
            while sent < frame.len() {
                match rustix::net::send(
                    &self.stream,
                    &frame[sent..],
                    SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
                ) {
                    Ok(n) => sent += n,
                    Err(rustix::io::Errno::INTR) => {}
                    Err(rustix::io::Errno::AGAIN) => break,
                    Err(e) => {
                        drop(out);
                        self.shut_down();
                        return Err(Error::io(
                            format!("worker connection {}", self.id),
                            "answer",
                            e.into(),
                        ));
                    }
                }
            }
        }
        if sent < frame.len() {
            if out.queued_bytes + frame.len() - sent > MAX_QUEUED_BYTES {
                drop(out);
                self.shut_down();
                return Err(Error::invalid(
                    "worker",
                    format!("connection {} left {MAX_QUEUED_BYTES} bytes of answers unread; disconnected", self.id),
                ));
            }
            out.queued_bytes += frame.len() - sent;
            out.queue.push_back(frame[sent..].to_vec());
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Ends the connection: the reader sees end of stream, the writer stops.
    pub(crate) fn shut_down(&self) {
        lock(&self.out).closed = true;
        self.wake.notify_all();
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Sends queued answers until the connection closes (the writer thread's body).
    pub(crate) fn write_queued(&self) {
        let mut out = lock(&self.out);
        loop {
            while out.queue.is_empty() && !out.closed {
                out = wait(&self.wake, out);
            }
            if out.closed {
                return;
            }
            let Some(frame) = out.queue.pop_front() else {
                continue;
            };
            out.queued_bytes -= frame.len();
            out.busy = true;
            drop(out);
            let written = send_all(&self.stream, &frame);
            out = lock(&self.out);
            out.busy = false;
            if written.is_err() {
                out.closed = true;
                drop(out);
                let _ = self.stream.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    }

    /// Frames what arrives and hands each frame to `deliver` until the stream ends;
    /// returns why it ended.
    pub(crate) fn read_frames(self: &Arc<Self>, deliver: &dyn Fn(SidecarEvent)) -> String {
        let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
        let mut fds: Vec<OwnedFd> = Vec::new();
        let mut chunk = vec![0u8; READ_CHUNK];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_FRAME))];
        loop {
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let received = rustix::net::recvmsg(
                &self.stream,
                &mut [IoSliceMut::new(&mut chunk)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            );
            let received = match received {
                Ok(r) => r,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return format!("receive failed ({e})"),
            };
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(rights) = message {
                    fds.extend(rights);
                }
            }
            if received.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
                return format!("more than {MAX_FDS_PER_FRAME} descriptors in one message");
            }
            if received.bytes == 0 {
                return "the worker closed the connection".to_string();
            }
            buf.extend_from_slice(&chunk[..received.bytes]);
            let mut at = 0;
            loop {
                match frame::parse(&buf[at..]) {
                    Parsed::Partial => break,
                    Parsed::TooLong(len) => {
                        return format!(
                            "a frame of {len} bytes (at most {} bytes, at least {HEADER_BYTES})",
                            frame::MAX_FRAME_BYTES
                        )
                    }
                    Parsed::Frame { len, id } => {
                        let body = &buf[at + HEADER_BYTES..at + len];
                        let routed = fds.is_empty()
                            && self.route().is_some_and(|route| {
                                route.try_write(Arc::downgrade(self) as Weak<dyn Replies>, id, body)
                            });
                        if routed {
                            at += len;
                            continue;
                        }
                        deliver(SidecarEvent::Message {
                            conn: self.id,
                            id,
                            body: buf[at + HEADER_BYTES..at + len].to_vec(),
                            fds: std::mem::take(&mut fds),
                        });
                        at += len;
                    }
                }
            }
            buf.drain(..at);
        }
    }
}

impl Replies for Connection {
    fn reply(&self, id: u32, body: &[u8]) {
        // A connection that is gone (or stopped reading) has nobody to answer.
        let _ = self.send(id, body);
    }
}

/// Sends all of `bytes`, blocking, without raising SIGPIPE.
fn send_all(stream: &UnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match rustix::net::send(stream, bytes, SendFlags::NOSIGNAL) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
