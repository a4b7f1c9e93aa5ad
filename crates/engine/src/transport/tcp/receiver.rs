//! Receiving side, per data connection: a parser driven by the receive loop
//! (`server.rs`) whenever bytes arrive. Every frame is checked against the registered
//! regions before its payload is copied into place; a `COMMIT` is acknowledged only after
//! every earlier frame of the stream is in memory.
//!
//! Small frames are read through the loop's shared buffer (one `read` of up to 1 MiB
//! serves many 1 KiB frames); payloads of [`DIRECT_READ_MIN`] or more land straight in
//! their region with a `readv` whose second iovec reads ahead one frame header, so a
//! stream of large blocks costs one syscall and one copy (the kernel's) per frame.
//! Nothing is kept per connection but the parser's state: a cut header or tag, and the
//! replies the socket had no room for.

use super::frame::{self, Header};
use super::io::wait_for;
use super::state::{Admission, ServerState};
use super::{lock, sockopt, staging};
use crate::gpu::checksum::GpuSummer;
use crate::metrics::CallCounters;
use crate::transport::{Arrival, Landed};
use crate::wire::Notice;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Copies from the shared buffer check for the writer's reset at least this often. A
/// check is a `getsockopt` (0.3–1 µs); checking before every copy cost a syscall per frame,
/// which for small blocks was most of the receiver's CPU time.
const RESET_CHECK_INTERVAL: Duration = Duration::from_micros(20);
/// Between socket reads, copies from the buffer run back to back; the clock (itself
/// ~0.1 µs on a VM) is read again once this many bytes were copied, each copy counting
/// [`COPY_WEIGHT`] bytes more: about 16 small frames, or 16 KiB of payload (~2 µs).
pub(super) const CLOCK_BUDGET: usize = 16 * 1024;
pub(super) const COPY_WEIGHT: usize = 1024;
/// Payloads of at least this many bytes bypass the shared buffer.
pub(super) const DIRECT_READ_MIN: usize = 16 * 1024;
/// Reads of one connection before the loop serves the others (a writer that never lets
/// its socket run dry must not starve them): up to 32 MiB through the buffer.
const READS_PER_TURN: usize = 32;
/// Read-ahead into the shared buffer while a payload lands directly: one frame header.
const DIRECT_READ_AHEAD: usize = frame::HEADER_BYTES;

/// Where the parser is in the stream.
enum Stage {
    /// The first bytes: the hello naming the session (`got` of them in `small`).
    Hello { got: usize },
    /// A frame header (`got` bytes in `small`).
    Header { got: usize },
    /// A host payload: `left` bytes still to land at `addr` (of `len`).
    Payload { addr: u64, left: usize, len: u32 },
    /// A `COMMIT`'s tag (`got` bytes in `tag`).
    Tag { commit: Header, got: usize },
}

/// Why a connection ends (logged at debug level, as the peer learns it from the socket).
pub(super) type End = String;

/// One data connection and its parser.
pub(super) struct Conn {
    pub(super) stream: TcpStream,
    remote: SocketAddr,
    pub(super) since: Instant,
    stage: Stage,
    small: [u8; frame::HEADER_BYTES],
    tag: Vec<u8>,
    admission: Option<(Admission, CallCounters)>,
    /// The last payload went direct: read only one header ahead, so that the next large
    /// payload is not pulled through the shared buffer (an extra copy).
    direct: bool,
    /// When the writer's reset was last checked for (before a copy from the buffer).
    reset_checked: Option<Instant>,
    /// Bytes (each copy counting [`COPY_WEIGHT`] more) that may still be copied from the
    /// buffer before the clock is read again; 0 after a read from the socket or anything
    /// else that may have waited, so time spent waiting is always noticed.
    clock_budget: usize,
    /// Replies the socket had no room for yet.
    out: Vec<u8>,
    device: staging::RecvStaging,
    /// Where the current call's bytes landed, for its checksum (transport/checksum.rs).
    landed: Landed,
    /// Sums the landed bytes of GPU regions (made for the first checksummed call into them).
    summer: Option<GpuSummer>,
}

/// Bytes of the shared buffer being parsed.
struct Input<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Input<'_> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, max: usize) -> &[u8] {
        let n = max.min(self.left());
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        out
    }
}

impl Conn {
    /// The writer this connection was admitted for (none before its hello).
    pub(super) fn writer(&self) -> Option<&str> {
        self.admission
            .as_ref()
            .map(|(admission, _)| admission.peer_name.as_str())
    }

    /// A newly accepted (non-blocking) connection, waiting for its hello.
    pub(super) fn new(stream: TcpStream, remote: SocketAddr) -> Conn {
        Conn {
            stream,
            remote,
            since: Instant::now(),
            stage: Stage::Hello { got: 0 },
            small: [0; frame::HEADER_BYTES],
            tag: Vec::new(),
            admission: None,
            direct: false,
            reset_checked: None,
            clock_budget: 0,
            out: Vec::new(),
            device: staging::RecvStaging::new(),
            landed: Landed::default(),
            summer: None,
        }
    }

    /// Still waiting for its hello.
    pub(super) fn in_hello(&self) -> bool {
        matches!(self.stage, Stage::Hello { .. })
    }

    fn fd(&self) -> libc::c_int {
        self.stream.as_raw_fd()
    }

    /// Reads and applies what the socket holds now (using `buffer`, the loop's), at most
    /// [`READS_PER_TURN`] reads: `Ok(true)` when it stopped there (bytes may be left, and
    /// the loop comes back after serving the other connections), `Ok(false)` when the
    /// socket had no more.
    pub(super) fn readable(&mut self, state: &ServerState, buffer: &mut [u8]) -> Result<bool, End> {
        for _ in 0..READS_PER_TURN {
            if let Stage::Payload { addr, left, len } = self.stage {
                if len as usize >= DIRECT_READ_MIN {
                    match self.read_direct(addr, left, buffer)? {
                        None => return Ok(false),
                        Some((ahead, drained)) => {
                            self.parse(state, &buffer[..ahead])?;
                            if drained {
                                return Ok(false);
                            }
                            continue;
                        }
                    }
                }
            }
            let limit = if self.direct {
                DIRECT_READ_AHEAD
            } else {
                buffer.len()
            };
            let n = match (&self.stream).read(&mut buffer[..limit]) {
                Ok(0) => return Err("the writer closed the connection".into()),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            };
            self.may_have_waited();
            self.parse(state, &buffer[..n])?;
            if n < limit {
                // A short read drained the socket; edge-triggered readiness reports what
                // arrives later, so the read that would only say WouldBlock is skipped.
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Lands the rest of a large payload in place and reads one header ahead into
    /// `buffer`. `None`: the socket had nothing; else the bytes read ahead, and whether
    /// the read was short (the socket is drained).
    fn read_direct(
        &mut self,
        addr: u64,
        left: usize,
        buffer: &mut [u8],
    ) -> Result<Option<(usize, bool)>, End> {
        // A writer that timed out or was aborted resets the connection before it reports
        // the failure: none of its bytes may land afterwards.
        sockopt::check_not_reset(self.fd()).map_err(|e| e.to_string())?;
        let iovecs = [
            libc::iovec {
                iov_base: addr as usize as *mut libc::c_void,
                iov_len: left,
            },
            libc::iovec {
                iov_base: buffer.as_mut_ptr().cast(),
                iov_len: DIRECT_READ_AHEAD,
            },
        ];
        // SAFETY: fd is our open socket; the first iovec lies inside a registered region
        // (checked when the frame's header was parsed), which the engine keeps valid until
        // the receive loop has been joined at close; the second is the start of our buffer.
        let n = unsafe { libc::readv(self.fd(), iovecs.as_ptr(), 2) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            return match err.kind() {
                ErrorKind::WouldBlock | ErrorKind::Interrupted => Ok(None),
                _ => Err(err.to_string()),
            };
        }
        if n == 0 {
            return Err("the writer closed the connection".into());
        }
        self.may_have_waited();
        let n = n as usize;
        let into_dst = n.min(left);
        self.landed(addr, left, into_dst);
        Ok(Some((n - into_dst, n < left + DIRECT_READ_AHEAD)))
    }

    /// `n` more bytes of the current payload landed.
    fn landed(&mut self, addr: u64, left: usize, n: usize) {
        let Stage::Payload { len, .. } = self.stage else {
            return;
        };
        if n == left {
            if let Some((_, counters)) = &self.admission {
                counters.received(u64::from(len));
            }
            self.stage = Stage::Header { got: 0 };
        } else {
            self.stage = Stage::Payload {
                addr: addr + n as u64,
                left: left - n,
                len,
            };
        }
    }

    fn parse(&mut self, state: &ServerState, bytes: &[u8]) -> Result<(), End> {
        let mut input = Input { bytes, at: 0 };
        while input.left() > 0 {
            match self.stage {
                Stage::Hello { got } => {
                    let part = input.take(frame::HELLO_BYTES - got);
                    self.small[got..got + part.len()].copy_from_slice(part);
                    let got = got + part.len();
                    self.stage = Stage::Hello { got };
                    if got == frame::HELLO_BYTES {
                        self.admit(state)?;
                    }
                }
                Stage::Header { got } => {
                    let part = input.take(frame::HEADER_BYTES - got);
                    self.small[got..got + part.len()].copy_from_slice(part);
                    let got = got + part.len();
                    self.stage = Stage::Header { got };
                    if got == frame::HEADER_BYTES {
                        let header = Header::decode(&self.small).map_err(|e| e.0)?;
                        self.begin(state, header, &mut input)?;
                    }
                }
                Stage::Payload { addr, left, .. } => {
                    let n = left.min(input.left());
                    self.check_not_reset_lately(n).map_err(|e| e.to_string())?;
                    let part = input.take(n);
                    // SAFETY: addr..addr+left lies inside a registered region (checked
                    // when the header was parsed; n <= left), which the engine keeps valid
                    // until the receive loop has been joined; the source is our buffer.
                    unsafe {
                        std::ptr::copy_nonoverlapping(part.as_ptr(), addr as usize as *mut u8, n)
                    };
                    self.landed(addr, left, n);
                }
                Stage::Tag { commit, got } => {
                    let part = input.take(commit.len as usize - got);
                    self.tag[got..got + part.len()].copy_from_slice(part);
                    let got = got + part.len();
                    self.stage = Stage::Tag { commit, got };
                    if got == commit.len as usize {
                        self.commit(state, commit)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn admit(&mut self, state: &ServerState) -> Result<(), End> {
        let mut hello = [0u8; frame::HELLO_BYTES];
        hello.copy_from_slice(&self.small[..frame::HELLO_BYTES]);
        let admission = frame::decode_hello(&hello)
            .map_err(|e| e.0)
            .and_then(|session| {
                lock(&state.admissions)
                    .remove(&session)
                    .ok_or_else(|| "unknown or already used session token".to_string())
            });
        let admission = admission.map_err(|reason| {
            crate::log::log_error!("tcp data connection from {} refused: {reason}", self.remote);
            reason
        })?;
        crate::log::debug!(
            "tcp data connection from {} admitted for peer {}",
            self.remote,
            admission.peer_name
        );
        let counters = state.metrics.connected_receiver(
            &admission.peer_name,
            crate::transport::TransportKind::Tcp.code(),
        );
        self.admission = Some((admission, counters));
        self.stage = Stage::Header { got: 0 };
        Ok(())
    }

    /// A complete header: checks it and sets up what follows it.
    fn begin(
        &mut self,
        state: &ServerState,
        header: Header,
        input: &mut Input<'_>,
    ) -> Result<(), End> {
        match header.kind {
            frame::WRITE => {
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
                    return self.refuse(reason);
                };
                if state.table.memory(header.region).is_device() {
                    return self.device_payload(state, addr, header.len, input);
                }
                self.direct = header.len as usize >= DIRECT_READ_MIN;
                // The whole payload lands here before the call's COMMIT is parsed.
                self.landed.host(addr, header.len as usize);
                self.stage = Stage::Payload {
                    addr,
                    left: header.len as usize,
                    len: header.len,
                };
                if header.len == 0 {
                    self.landed(addr, 0, 0);
                }
                Ok(())
            }
            frame::COMMIT => {
                self.tag.clear();
                self.tag.resize(header.len as usize, 0);
                self.stage = Stage::Tag {
                    commit: header,
                    got: 0,
                };
                if header.len == 0 {
                    self.commit(state, header)?;
                }
                Ok(())
            }
            other => Err(format!("unexpected frame type {other} from writer")),
        }
    }

    /// A payload for a GPU region: socket → pinned staging → async copy (staging.rs). It
    /// is read to its end here, waiting for the writer's bytes (GPU regions over TCP are
    /// the fallback when neither NVLink nor RDMA serves; a dead writer ends the wait
    /// through keepalive, a close of the server through its flag).
    fn device_payload(
        &mut self,
        state: &ServerState,
        addr: u64,
        len: u32,
        input: &mut Input<'_>,
    ) -> Result<(), End> {
        let fd = self.fd();
        let stream = &self.stream;
        let read = &mut |dst: &mut [u8]| -> std::io::Result<()> {
            let mut done = 0;
            let buffered = input.take(dst.len());
            dst[..buffered.len()].copy_from_slice(buffered);
            done += buffered.len();
            while done < dst.len() {
                if state.closed.load(Ordering::SeqCst) {
                    return Err(std::io::Error::other("the transport is closing"));
                }
                match (&*stream).read(&mut dst[done..]) {
                    Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                    Ok(n) => done += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        wait_for(fd, libc::POLLIN, 100)?;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        };
        let still_wanted = &mut || sockopt::check_not_reset(fd);
        // SAFETY: addr..addr+len was checked to lie inside a registered device region.
        let received = unsafe {
            self.device
                .receive(&state.table, addr, len as usize, read, still_wanted)
        };
        // Waiting for a free staging slot takes time the clock must see.
        self.may_have_waited();
        self.stage = Stage::Header { got: 0 };
        match received {
            Ok(()) => {
                self.landed.device_range(addr, u64::from(len));
                if let Some((_, counters)) = &self.admission {
                    counters.received(u64::from(len));
                }
                Ok(())
            }
            Err(staging::RecvError::Io(e)) => Err(e.to_string()),
            Err(staging::RecvError::Gpu(reason)) => self.refuse(reason),
        }
    }

    fn commit(&mut self, state: &ServerState, commit: Header) -> Result<(), End> {
        // A call whose writer reset the connection is not completed here: its staged
        // GPU copies are not queued and no arrival notice is delivered for it.
        sockopt::check_not_reset(self.fd())
            .map_err(|e| format!("the writer reset the connection: {e}"))?;
        // It also serves the copies that follow within the interval (the next call's, at
        // one small call per round trip): one `getsockopt` per call instead of two.
        self.reset_checked = Some(Instant::now());
        // Staged GPU copies land before the notice and the ACK (no-op for hosts).
        if let Err(staging::RecvError::Gpu(reason)) = self.device.flush() {
            return self.refuse(reason);
        }
        if commit.flags & 1 != 0 {
            // The detail is the call's encoded notice (wire/notice.rs); its checksum is
            // checked against this side's memory before the arrival is reported.
            let notice = match Notice::decode(&self.tag) {
                Ok(notice) => notice,
                Err(e) => return self.refuse(format!("bad arrival notice: {e}")),
            };
            let summer = &mut self.summer;
            let checked = self
                .landed
                .check_with_gpu(notice.checksum, &mut |ranges, corrupt| {
                    staging::sum_landed(state, summer, ranges, corrupt)
                });
            if let (Some(sink), Some((admission, _))) = (&state.arrivals, &self.admission) {
                sink(Arrival::of(&admission.peer_name, &notice, checked));
            }
        } else {
            self.landed.check(None);
        }
        self.stage = Stage::Header { got: 0 };
        self.reply(frame::ACK, commit.offset, &[])?;
        self.may_have_waited();
        Ok(())
    }

    /// A frame outside the regions: nothing of it is written; a NACK fails the oldest
    /// pending call and the connection is closed, since the rest of the stream cannot be
    /// trusted.
    fn refuse(&mut self, reason: String) -> Result<(), End> {
        crate::log::log_error!("tcp receiver refused a frame: {reason}");
        let _ = self.reply(frame::NACK, 0, reason.as_bytes());
        Err(reason)
    }

    /// Sends an ACK or NACK, or queues it behind earlier replies the socket had no room for.
    fn reply(&mut self, kind: u8, call_id: u64, detail: &[u8]) -> Result<(), End> {
        let header = Header {
            kind,
            flags: 0,
            region: 0,
            offset: call_id,
            len: detail.len() as u32,
            aux: 0,
        };
        if self.out.is_empty() && detail.is_empty() {
            // The steady-state ACK: no allocation.
            let bytes = header.encode();
            let n = self.write_now(&bytes)?;
            self.out.extend_from_slice(&bytes[n..]);
            return Ok(());
        }
        self.out.extend_from_slice(&header.encode());
        self.out.extend_from_slice(detail);
        self.writable()
    }

    /// Writes what `bytes` it can now.
    fn write_now(&self, bytes: &[u8]) -> Result<usize, End> {
        let mut done = 0;
        while done < bytes.len() {
            match (&self.stream).write(&bytes[done..]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(done)
    }

    /// Room in the send buffer: sends queued replies.
    pub(super) fn writable(&mut self) -> Result<(), End> {
        if !self.out.is_empty() {
            let n = self.write_now(&self.out)?;
            self.out.drain(..n);
        }
        Ok(())
    }

    /// Fails when the writer reset the connection. Called before each copy of `len` bytes
    /// from the buffer; checks at most once per [`RESET_CHECK_INTERVAL`], so that no such
    /// copy begins much later than that after the reset reached this host.
    fn check_not_reset_lately(&mut self, len: usize) -> std::io::Result<()> {
        let weight = len.saturating_add(COPY_WEIGHT);
        if self.clock_budget > weight {
            self.clock_budget -= weight;
            return Ok(());
        }
        self.clock_budget = CLOCK_BUDGET;
        let now = Instant::now();
        if self
            .reset_checked
            .is_some_and(|checked| now.saturating_duration_since(checked) < RESET_CHECK_INTERVAL)
        {
            return Ok(());
        }
        sockopt::check_not_reset(self.fd())?;
        self.reset_checked = Some(now);
        Ok(())
    }

    /// Something may have waited (a socket read, an ACK): read the clock before the next
    /// copy from the buffer.
    fn may_have_waited(&mut self) {
        self.clock_budget = 0;
    }
}
