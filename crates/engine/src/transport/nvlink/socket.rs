//! The NVLink transport's side channel: length-prefixed messages over a Unix stream socket,
//! with file descriptors passed as `SCM_RIGHTS` (no `pidfd_getfd`, so it works across PID
//! namespaces). The writer says hello with its session; the owner of the memory answers with
//! its memory table and the descriptors of its shareable allocations; then the writer sends
//! arrival notices. A closed socket means the other process is gone.

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// Largest message (a memory table of every region's allocations fits).
pub(crate) const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Descriptors per message at most (the kernel allows 253).
pub(crate) const MAX_FDS_PER_MESSAGE: usize = 64;

/// Sends one message (`u32` length + `payload`) with `fds` attached.
pub(crate) fn send(
    stream: &UnixStream,
    payload: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> io::Result<()> {
    assert!(fds.len() <= MAX_FDS_PER_MESSAGE && payload.len() <= MAX_MESSAGE_BYTES);
    let header = (payload.len() as u32).to_le_bytes();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other(
            "descriptors do not fit the control buffer",
        ));
    }
    let mut sent = 0usize;
    let total = header.len() + payload.len();
    while sent < total {
        let iov: Vec<IoSlice<'_>> = if sent < header.len() {
            vec![IoSlice::new(&header[sent..]), IoSlice::new(payload)]
        } else {
            vec![IoSlice::new(&payload[sent - header.len()..])]
        };
        // Descriptors ride with the first chunk only.
        let sent_now = if sent == 0 {
            sendmsg(stream, &iov, &mut control, SendFlags::NOSIGNAL)
        } else {
            sendmsg(
                stream,
                &iov,
                &mut SendAncillaryBuffer::default(),
                SendFlags::NOSIGNAL,
            )
        };
        // rustix does not retry interrupted calls (std's I/O does): a signal is no error.
        let n = match sent_now {
            Err(rustix::io::Errno::INTR) => continue,
            other => other.map_err(io::Error::from)?,
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        sent += n;
    }
    Ok(())
}

/// Receives one message and the descriptors that came with it; `Ok(None)` when the other
/// side closed the socket cleanly before a new message.
pub(crate) fn receive(stream: &UnixStream) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut fds = Vec::new();
    let mut header = [0u8; 4];
    if !fill(stream, &mut header, &mut fds, true)? {
        return Ok(None);
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a message of {len} bytes (at most {MAX_MESSAGE_BYTES})"),
        ));
    }
    let mut payload = vec![0u8; len];
    fill(stream, &mut payload, &mut fds, false)?;
    Ok(Some((payload, fds)))
}

/// Reads exactly `buf.len()` bytes, collecting descriptors; `Ok(false)` on a clean end of
/// stream before the first byte when `eof_ok`.
fn fill(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    eof_ok: bool,
) -> io::Result<bool> {
    let mut at = 0usize;
    while at < buf.len() {
        let mut space =
            [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = match recvmsg(
            stream.as_fd(),
            &mut [IoSliceMut::new(&mut buf[at..])],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            other => other.map_err(io::Error::from)?,
        };
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if got.bytes == 0 {
            if at == 0 && eof_ok {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        at += got.bytes;
    }
    Ok(true)
}
