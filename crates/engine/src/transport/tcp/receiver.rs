//! Receiving side, per connection: every frame is checked against the registered regions
//! before its payload is copied into place; a `COMMIT` is acknowledged only after every
//! earlier frame of the stream is in memory.

use super::frame::{self, Header};
use super::state::{Admission, ServerState};
use super::{lock, sockopt, staging, HELLO_TIMEOUT, RECEIVE_BUFFER_BYTES};
use crate::transport::Arrival;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

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
    /// When the writer's reset was last checked for (before a copy from the buffer).
    reset_checked: Option<Instant>,
    /// Bytes (each copy counting [`COPY_WEIGHT`] more) that may still be copied from the
    /// buffer before the clock is read again; 0 after a read from the socket or anything
    /// else that may have waited, so time spent waiting is always noticed.
    clock_budget: usize,
}

/// Copies from the staging buffer check for the writer's reset at least this often. A
/// check is a `getsockopt` (0.3–1 µs); checking before every copy cost a syscall per frame,
/// which for small blocks was most of the receiver's CPU time.
const RESET_CHECK_INTERVAL: Duration = Duration::from_micros(20);
/// Between socket reads, copies from the buffer run back to back; the clock (itself
/// ~0.1 µs on a VM) is read again once this many bytes were copied, each copy counting
/// [`COPY_WEIGHT`] bytes more: about 16 small frames, or 16 KiB of payload (~2 µs).
const CLOCK_BUDGET: usize = 16 * 1024;
const COPY_WEIGHT: usize = 1024;

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
            reset_checked: None,
            clock_budget: 0,
        }
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
        sockopt::check_not_reset(self.stream.as_raw_fd())?;
        self.reset_checked = Some(now);
        Ok(())
    }

    /// Something may have waited (a socket read, an ACK): read the clock before the next
    /// copy from the buffer.
    fn may_have_waited(&mut self) {
        self.clock_budget = 0;
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
        self.may_have_waited();
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
    /// [`Self::read_into`] into a slice this side holds exclusively.
    fn read_into_slice(&mut self, dst: &mut [u8]) -> std::io::Result<()> {
        // SAFETY: `dst` is an exclusive borrow of `dst.len()` writable bytes.
        unsafe { self.read_into(dst.as_mut_ptr(), dst.len()) }
    }

    /// A writer that timed out or was aborted resets the connection before it reports the
    /// failure, and none of its bytes may land afterwards, even those of a frame already
    /// begun or already buffered here: the reset is checked before every `readv` landing
    /// in place, and before copies from the staging buffer at least every
    /// [`RESET_CHECK_INTERVAL`], so no payload copy begins later than that after the
    /// reset reached this host.
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
                self.check_not_reset_lately(n)?;
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
                sockopt::check_not_reset(self.stream.as_raw_fd())?;
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

pub(super) fn run_receiver(state: &ServerState, stream: TcpStream, remote: SocketAddr) {
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
            crate::log::log_error!("tcp data connection from {remote} refused: {reason}");
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    };
    let _ = stream.set_read_timeout(None);
    crate::log::debug!(
        "tcp data connection from {remote} admitted for peer {}",
        admission.peer_name
    );
    let Ok(ack_stream) = stream.try_clone() else {
        return;
    };
    let _writer = super::fence::WriterGuard::new(state, &admission.peer_name);
    let mut reader = FrameReader::new(stream);
    if let Err(reason) = receive_frames(state, &mut reader, &ack_stream, &admission) {
        if !state.closed.load(Ordering::SeqCst) {
            crate::log::debug!(
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
    let mut device = staging::RecvStaging::new();
    let counters = state.metrics.connected_receiver(
        &admission.peer_name,
        crate::transport::TransportKind::Tcp.code(),
    );
    loop {
        reader.read_exact(&mut bytes).map_err(|e| e.to_string())?;
        let header = Header::decode(&bytes).map_err(|e| e.0)?;
        match header.kind {
            frame::WRITE => {
                // A writer that timed out or was aborted resets the connection before it
                // reports the failure: `read_into` checks for the reset before every copy,
                // so bytes of it still queued or buffered here do not land.
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
                    let fd = reader.stream.as_raw_fd();
                    let read = &mut |dst: &mut [u8]| reader.read_into_slice(dst);
                    let still_wanted = &mut || sockopt::check_not_reset(fd);
                    let len = header.len as usize;
                    // SAFETY: addr..addr+len was checked to lie inside a registered device
                    // region.
                    let received =
                        unsafe { device.receive(&state.table, addr, len, read, still_wanted) };
                    // Waiting for a free staging slot takes time the clock must see.
                    reader.may_have_waited();
                    match received {
                        Ok(()) => {
                            counters.received(u64::from(header.len));
                            continue;
                        }
                        Err(staging::RecvError::Io(e)) => return Err(e.to_string()),
                        Err(staging::RecvError::Gpu(reason)) => return refuse(ack_stream, reason),
                    }
                }
                // SAFETY: the range was checked to lie inside a registered region, which the
                // engine keeps valid until this thread has been joined at close.
                unsafe { reader.read_into(addr as usize as *mut u8, header.len as usize) }
                    .map_err(|e| e.to_string())?;
                counters.received(u64::from(header.len));
            }
            frame::COMMIT => {
                let mut tag = vec![0u8; header.len as usize];
                reader.read_exact(&mut tag).map_err(|e| e.to_string())?;
                // A call whose writer reset the connection is not completed here: its staged
                // GPU copies are not queued and no arrival notice is delivered for it.
                sockopt::check_not_reset(reader.stream.as_raw_fd())
                    .map_err(|e| format!("the writer reset the connection: {e}"))?;
                // Staged GPU copies land before the notice and the ACK (no-op for hosts).
                if let Err(staging::RecvError::Gpu(reason)) = device.flush() {
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
                reader.may_have_waited();
            }
            other => return Err(format!("unexpected frame type {other} from writer")),
        }
    }
}

/// A frame outside the regions: nothing of it is written; a NACK fails the oldest pending
/// call and the connection is closed, since the rest of the stream cannot be trusted.
fn refuse(ack_stream: &TcpStream, reason: String) -> std::result::Result<(), String> {
    crate::log::log_error!("tcp receiver refused a frame: {reason}");
    let _ = send_reply(ack_stream, frame::NACK, 0, reason.as_bytes());
    Err(reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A connected pair on loopback: (writer, the receiver's frame reader).
    fn pair() -> (TcpStream, FrameReader) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let writer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (writer, FrameReader::new(server))
    }

    fn settle() {
        std::thread::sleep(Duration::from_millis(50));
    }

    /// A WRITE header for `len` payload bytes.
    fn header(len: usize) -> [u8; frame::HEADER_BYTES] {
        Header {
            kind: frame::WRITE,
            flags: 0,
            region: 0,
            offset: 0,
            len: len as u32,
            aux: 0,
        }
        .encode()
    }

    /// The writer sends a frame's header and `sent` of its `len` payload bytes (all of them
    /// arriving before or after the header is read, per `payload_after_header`), then resets
    /// the connection, as a timed-out call does; the receiver, which began the frame before
    /// the reset, must write none of the payload afterwards.
    fn reset_mid_frame(len: usize, sent: usize, payload_after_header: bool) {
        let (mut writer, mut reader) = pair();
        writer.write_all(&header(len)).unwrap();
        if !payload_after_header {
            writer.write_all(&vec![0xAB; sent]).unwrap();
        }
        settle();
        let mut bytes = [0u8; frame::HEADER_BYTES];
        // Takes the header, and with it every byte that already arrived, into the buffer.
        reader.read_exact(&mut bytes).unwrap();
        assert_eq!(Header::decode(&bytes).unwrap().len as usize, len);
        if payload_after_header {
            writer.write_all(&vec![0xAB; sent]).unwrap();
            settle();
        }
        sockopt::reset(&writer).unwrap();
        settle();
        let mut region = vec![0u8; len];
        // SAFETY: `region` is a live, writable buffer of `len` bytes no reference aliases.
        let result = unsafe { reader.read_into(region.as_mut_ptr(), len) };
        assert!(result.is_err(), "the reset was not noticed");
        let landed = region.iter().filter(|&&b| b != 0).count();
        assert_eq!(
            landed, 0,
            "{landed} payload bytes landed after the writer reset the connection"
        );
    }

    #[test]
    fn a_buffered_small_payload_does_not_land_after_a_reset() {
        reset_mid_frame(8 * 1024, 8 * 1024, false);
    }

    #[test]
    fn a_queued_small_payload_does_not_land_after_a_reset() {
        reset_mid_frame(8 * 1024, 8 * 1024, true);
    }

    #[test]
    fn a_partly_buffered_large_payload_does_not_land_after_a_reset() {
        reset_mid_frame(64 * 1024, 32 * 1024, false);
    }

    #[test]
    fn a_queued_large_payload_does_not_land_after_a_reset() {
        reset_mid_frame(64 * 1024, 64 * 1024, true);
    }

    /// Checks are spaced, yet a reset that arrives while small frames are buffered here
    /// stops them within one clock budget (~16 frames), not at the end of the buffer.
    #[test]
    fn a_reset_while_frames_are_buffered_stops_them_within_the_budget() {
        const FRAMES: usize = 200;
        let (mut writer, mut reader) = pair();
        for _ in 0..FRAMES {
            writer.write_all(&header(1024)).unwrap();
            writer.write_all(&[0xAB; 1024]).unwrap();
        }
        settle();
        let mut bytes = [0u8; frame::HEADER_BYTES];
        let mut payload = vec![0u8; 1024];
        reader.read_exact(&mut bytes).unwrap();
        // SAFETY: `payload` is a live, writable buffer of its length no reference aliases.
        unsafe { reader.read_into(payload.as_mut_ptr(), payload.len()) }.unwrap();
        sockopt::reset(&writer).unwrap();
        settle();
        let mut landed_after_reset = 0;
        for _ in 1..FRAMES {
            reader.read_exact(&mut bytes).unwrap();
            payload.fill(0);
            // SAFETY: as above.
            if unsafe { reader.read_into(payload.as_mut_ptr(), payload.len()) }.is_err() {
                assert!(
                    payload.iter().all(|&b| b == 0),
                    "a refused payload landed in part"
                );
                break;
            }
            landed_after_reset += 1;
        }
        let bound = CLOCK_BUDGET / (1024 + COPY_WEIGHT) + 1;
        assert!(
            landed_after_reset <= bound,
            "{landed_after_reset} buffered payloads landed after the reset (at most {bound} may)"
        );
    }

    #[test]
    fn without_a_reset_the_payload_lands_whole() {
        let (mut writer, mut reader) = pair();
        writer.write_all(&header(8 * 1024)).unwrap();
        writer.write_all(&vec![0xAB; 8 * 1024]).unwrap();
        let mut bytes = [0u8; frame::HEADER_BYTES];
        reader.read_exact(&mut bytes).unwrap();
        let mut region = vec![0u8; 8 * 1024];
        // SAFETY: `region` is a live, writable buffer of its length no reference aliases.
        unsafe { reader.read_into(region.as_mut_ptr(), region.len()) }.unwrap();
        assert!(region.iter().all(|&b| b == 0xAB));
    }
}
