//! Socket I/O of data connections: buffer sizes, `writev` of a whole frame batch.

use super::{sockopt, IOV_MAX, SOCKET_BUFFER_BYTES, WRITEV_MAX_BYTES};
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

/// Writes every byte described by `iovecs`, advancing through partial writes.
pub(super) fn writev_all(stream: &TcpStream, iovecs: &mut [libc::iovec]) -> std::io::Result<()> {
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
