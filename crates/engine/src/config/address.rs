//! The addresses listeners bind: the `host` option, `KVCACHE_SOCKET_IFNAME`, and an
//! interface's IPv4 address.

use super::var;
use crate::error::{Error, Result};
use std::net::{IpAddr, Ipv4Addr};

/// Address the listeners bind to when the `host` option is not given: the IPv4 address of
/// `KVCACHE_SOCKET_IFNAME` when set, else all interfaces.
pub(super) fn bind_address() -> Result<IpAddr> {
    match var("KVCACHE_SOCKET_IFNAME") {
        Some(name) => interface_ipv4(&name).map(IpAddr::V4),
        None => Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
    }
}

/// The address every listener binds for the `host` option, read as ZeroMQ's bind reads the
/// control socket's host: `*` (all interfaces), an IPv4 address, an IPv6 address (bare or in
/// brackets), or an interface name (its first IPv4 address). Anything else (a DNS name,
/// which a bind does not resolve) is `ERR_INVALID_ARGUMENT` naming the value.
pub fn listen_address(host: &str) -> Result<IpAddr> {
    if host == "*" {
        return Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(ip);
    }
    if host.is_empty() || !host.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid(
            "host",
            format!(
                "'{}' is not '*', an IP address or an interface name",
                host.escape_debug()
            ),
        ));
    }
    interface_ipv4_of("host", host).map(IpAddr::V4)
}

/// The first IPv4 address of interface `name`.
pub fn interface_ipv4(name: &str) -> Result<Ipv4Addr> {
    interface_ipv4_of("KVCACHE_SOCKET_IFNAME", name)
}

/// The first IPv4 address of interface `name`; a failure names `origin` (the option or
/// variable that gave the name).
fn interface_ipv4_of(origin: &'static str, name: &str) -> Result<Ipv4Addr> {
    let mut found = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(Error::invalid(
            origin,
            format!(
                "cannot list interfaces: {}",
                std::io::Error::last_os_error()
            ),
        ));
    }
    let mut answer = None;
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: cursor is a node of the list returned by getifaddrs, not yet freed.
        let entry = unsafe { &*cursor };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let entry_name = unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) }
            .to_string_lossy()
            .into_owned();
        if !entry.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family field is always readable.
            let family = unsafe { (*entry.ifa_addr).sa_family };
            if i32::from(family) == libc::AF_INET {
                // SAFETY: family AF_INET means the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if entry_name == name && answer.is_none() {
                    answer = Some(ip);
                }
                found.push(entry_name);
            }
        }
        cursor = entry.ifa_next;
    }
    // SAFETY: head came from getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    answer.ok_or_else(|| {
        found.sort();
        found.dedup();
        let what = if origin == "host" {
            format!("'{name}' is not '*', an IP address or an interface with an IPv4 address (a DNS name is not resolved for a bind)")
        } else {
            format!("interface '{name}' has no IPv4 address")
        };
        Error::invalid(
            origin,
            format!("{what}; interfaces with one: {}", found.join(", ")),
        )
    })
}
