//! Socket options and teardown helpers of TCP data connections: fast detection of a dead
//! peer (TCP keepalive with short timers and `TCP_USER_TIMEOUT`), and the reset used when
//! a call times out or is aborted.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

/// Liveness settings of data sockets, from `KVCACHE_TCP_USER_TIMEOUT_MS` (default 2500,
/// 0 disables both the user timeout and keepalive tuning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    pub user_timeout_ms: u32,
    /// Idle seconds before the first keepalive probe, seconds between probes, probes.
    pub keepalive: (i32, i32, i32),
}

impl Liveness {
    pub fn for_timeout(user_timeout_ms: u32) -> Liveness {
        // Probes every second after one idle second; enough probes to cover the timeout.
        let count = (user_timeout_ms.div_ceil(1000) as i32 - 1).clamp(1, 127);
        Liveness {
            user_timeout_ms,
            keepalive: (1, 1, count),
        }
    }
}

pub fn liveness() -> Liveness {
    static LIVENESS: OnceLock<Liveness> = OnceLock::new();
    *LIVENESS.get_or_init(|| Liveness::for_timeout(crate::config::process().tcp_user_timeout_ms))
}

fn set_int(fd: libc::c_int, level: libc::c_int, option: libc::c_int, value: libc::c_int) {
    // SAFETY: fd is an open socket owned by the caller's stream; the option value is a
    // c_int that outlives the call.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Keepalive with short timers and `TCP_USER_TIMEOUT` on a data socket.
pub fn set_liveness(stream: &TcpStream) {
    let settings = liveness();
    if settings.user_timeout_ms == 0 {
        return;
    }
    let fd = stream.as_raw_fd();
    let (idle, interval, count) = settings.keepalive;
    set_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle);
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, interval);
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, count);
    set_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        settings.user_timeout_ms as libc::c_int,
    );
}

/// Aborts the connection without closing the descriptor: `connect(AF_UNSPEC)` makes the
/// kernel discard the send queue and send an RST; threads blocked on the socket wake up.
pub fn reset(stream: &TcpStream) -> std::io::Result<()> {
    // SAFETY: an all-zero sockaddr is a valid value; only its family (AF_UNSPEC) is read.
    let mut address: libc::sockaddr = unsafe { std::mem::zeroed() };
    address.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
    // SAFETY: fd is an open socket owned by `stream`; `address` is a live sockaddr of the
    // length passed.
    let rc = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            &address,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Fails when the peer reset the connection (a pending `SO_ERROR`), even while received
/// bytes are still queued: a receiver checks this before applying a frame.
pub fn check_not_reset(fd: libc::c_int) -> std::io::Result<()> {
    let mut error: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: fd is an open socket of the caller; `error` and `len` are live locals of the
    // sizes passed.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut error as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if error != 0 {
        return Err(std::io::Error::from_raw_os_error(error));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_covers_the_user_timeout() {
        assert_eq!(Liveness::for_timeout(3000).keepalive, (1, 1, 2));
        assert_eq!(Liveness::for_timeout(500).keepalive, (1, 1, 1));
        assert_eq!(Liveness::for_timeout(10_000).keepalive, (1, 1, 9));
    }

    #[test]
    fn reset_discards_unsent_data_and_the_peer_sees_it() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        (&client).write_all(&[7u8; 1000]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        check_not_reset(server.as_raw_fd()).unwrap();
        reset(&client).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        // Bytes are still queued, but the reset is visible before reading them.
        assert!(check_not_reset(server.as_raw_fd()).is_err());
        let mut buf = [0u8; 10];
        let _ = server.read(&mut buf);
    }
}
