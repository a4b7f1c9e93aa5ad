//! Socket I/O of data connections: buffer sizes, non-blocking `writev` of a frame batch,
//! and the blocking form the GPU staging path uses.

use super::{sockopt, IOV_MAX, SOCKET_BUFFER_BYTES, WRITEV_MAX_BYTES};
use std::io::ErrorKind;
use std::net::TcpStream;
use std::os::fd::AsRawFd;

pub(super) fn set_socket_options(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    sockopt::set_liveness(stream);
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

/// Writes from `iovecs[*first..]` on a non-blocking socket until every byte is written
/// (`Ok(true)`) or the socket's send buffer is full (`Ok(false)`: `*first` and the
/// iovecs describe what is left). Each `writev` carries at most [`IOV_MAX`] iovecs and
/// about [`WRITEV_MAX_BYTES`].
pub(super) fn write_some(
    fd: libc::c_int,
    iovecs: &mut [libc::iovec],
    first: &mut usize,
) -> std::io::Result<bool> {
    while *first < iovecs.len() && iovecs[*first].iov_len == 0 {
        *first += 1;
    }
    while *first < iovecs.len() {
        let start = *first;
        // At least one iovec, then more while under both limits.
        let mut count = 1;
        let mut bytes = iovecs[start].iov_len;
        while start + count < iovecs.len() && count < IOV_MAX && bytes < WRITEV_MAX_BYTES {
            bytes += iovecs[start + count].iov_len;
            count += 1;
        }
        // SAFETY: fd is an open socket; iovecs[start..start+count] describe readable memory:
        // frame headers owned by the caller and payload ranges inside registered regions,
        // which stay valid while the link is open (the engine's region contract).
        let written = unsafe { libc::writev(fd, iovecs[start..].as_ptr(), count as libc::c_int) };
        if written < 0 {
            let err = std::io::Error::last_os_error();
            match err.kind() {
                ErrorKind::Interrupted => continue,
                ErrorKind::WouldBlock => return Ok(false),
                _ => return Err(err),
            }
        }
        let mut left = written as usize;
        while left > 0 {
            let iov = &mut iovecs[*first];
            if left >= iov.iov_len {
                left -= iov.iov_len;
                *first += 1;
            } else {
                // SAFETY: advancing within the same iovec's buffer by fewer than its length.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(left) }.cast();
                iov.iov_len -= left;
                left = 0;
            }
        }
        while *first < iovecs.len() && iovecs[*first].iov_len == 0 {
            *first += 1;
        }
    }
    Ok(true)
}

/// Writes every byte of `iovecs` on a non-blocking socket, waiting for room when its send
/// buffer is full. A reset or a dead peer (keepalive, `TCP_USER_TIMEOUT`) ends the wait
/// with the socket's error.
pub(super) fn write_all_waiting(
    fd: libc::c_int,
    iovecs: &mut [libc::iovec],
) -> std::io::Result<()> {
    let mut first = 0;
    while !write_some(fd, iovecs, &mut first)? {
        wait_for(fd, libc::POLLOUT, -1)?;
    }
    Ok(())
}

/// Waits until `fd` is ready for `events` (or in error: the next I/O call reports it), at
/// most `timeout_ms` (-1: no bound). `Ok(false)`: the time passed.
pub(super) fn wait_for(
    fd: libc::c_int,
    events: libc::c_short,
    timeout_ms: i32,
) -> std::io::Result<bool> {
    let mut poll_fd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: `poll_fd` is one live pollfd; fd is an open socket of the caller.
        let rc = unsafe { libc::poll(&mut poll_fd, 1, timeout_ms) };
        if rc >= 0 {
            return Ok(rc > 0);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
