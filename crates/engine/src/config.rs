//! Settings read from the seed's environment variables, each parsed once with a clear error.

use crate::error::{Error, Result};
use std::net::{IpAddr, Ipv4Addr};

/// `1`, `true`, `yes`, `on` (any case) are true; anything else, or unset, is false.
pub fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportChoice {
    Auto,
    Rdma,
    Tcp,
}

impl TransportChoice {
    pub fn parse(text: &str, origin: &'static str) -> Result<Self> {
        match text {
            "auto" | "" => Ok(TransportChoice::Auto),
            "rdma" => Ok(TransportChoice::Rdma),
            "tcp" => Ok(TransportChoice::Tcp),
            other => Err(Error::invalid(
                origin,
                format!("'{other}' is not one of 'auto', 'rdma', 'tcp'"),
            )),
        }
    }

    /// The explicit option wins; else `KVCACHE_TRANSPORT`; else auto.
    pub fn resolve(explicit: Option<&str>) -> Result<Self> {
        match explicit {
            Some(text) => Self::parse(text, "transport"),
            None => match std::env::var("KVCACHE_TRANSPORT") {
                Ok(text) => Self::parse(text.trim(), "KVCACHE_TRANSPORT"),
                Err(_) => Ok(TransportChoice::Auto),
            },
        }
    }
}

/// RDMA settings from the environment (`KVCACHE_RDMA_*`, `KVCACHE_IB_TIMEOUT`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaSettings {
    pub nics: Vec<String>,
    /// `Some` when KVCACHE_RDMA_GID_INDEX was set explicitly.
    pub gid_index: Option<u8>,
    pub ib_timeout: u8,
    pub relaxed_ordering: bool,
    pub gdr_flush: bool,
    pub qps_per_peer: u16,
}

pub const DEFAULT_GID_INDEX: u8 = 3;
pub const DEFAULT_IB_TIMEOUT: u8 = 18;
/// Two RC queue pairs per peer (as Mooncake's default): chains alternate between them, and
/// on software providers each gets its own posting thread (`transport/doorbell.rs`).
pub const DEFAULT_QPS_PER_PEER: u16 = 2;

fn parse_number<T: TryFrom<u32>>(
    name: &'static str,
    range: std::ops::RangeInclusive<u32>,
) -> Result<Option<T>> {
    let Ok(text) = std::env::var(name) else {
        return Ok(None);
    };
    let text = text.trim();
    match text.parse::<u32>() {
        Ok(v) if range.contains(&v) => Ok(T::try_from(v).ok()),
        _ => Err(Error::invalid(
            name,
            format!(
                "'{text}' is not an integer in {}..={}",
                range.start(),
                range.end()
            ),
        )),
    }
}

impl RdmaSettings {
    pub fn from_env() -> Result<Self> {
        let nics = std::env::var("KVCACHE_RDMA_NICS")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        Ok(RdmaSettings {
            nics,
            gid_index: parse_number::<u8>("KVCACHE_RDMA_GID_INDEX", 0..=255)?,
            ib_timeout: parse_number::<u8>("KVCACHE_IB_TIMEOUT", 14..=31)?
                .unwrap_or(DEFAULT_IB_TIMEOUT),
            relaxed_ordering: env_flag("KVCACHE_RELAX_ORDERING"),
            gdr_flush: env_flag("KVCACHE_GDRCOPY_FLUSH_ENABLE"),
            qps_per_peer: parse_number::<u16>("KVCACHE_RDMA_QPS_PER_PEER", 1..=64)?
                .unwrap_or(DEFAULT_QPS_PER_PEER),
        })
    }
}

/// Address the data listener binds to: the IPv4 address of `KVCACHE_SOCKET_IFNAME` when
/// set, else all interfaces.
pub fn bind_address() -> Result<IpAddr> {
    match std::env::var("KVCACHE_SOCKET_IFNAME") {
        Ok(name) if !name.trim().is_empty() => interface_ipv4(name.trim()).map(IpAddr::V4),
        _ => Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
    }
}

/// The first IPv4 address of interface `name`.
pub fn interface_ipv4(name: &str) -> Result<Ipv4Addr> {
    let mut found = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(Error::invalid(
            "KVCACHE_SOCKET_IFNAME",
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
        Error::invalid(
            "KVCACHE_SOCKET_IFNAME",
            format!(
                "interface '{name}' has no IPv4 address; interfaces with one: {}",
                found.join(", ")
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_an_address_and_unknown_interfaces_are_named() {
        assert_eq!(interface_ipv4("lo").unwrap(), Ipv4Addr::LOCALHOST);
        let err = interface_ipv4("nope0").unwrap_err();
        assert!(err.to_string().contains("'nope0'") && err.to_string().contains("lo"));
    }

    #[test]
    fn transport_choice_parses() {
        assert_eq!(
            TransportChoice::parse("tcp", "transport").unwrap(),
            TransportChoice::Tcp
        );
        assert_eq!(
            TransportChoice::parse("ib", "transport")
                .unwrap_err()
                .code(),
            "ERR_INVALID_ARGUMENT"
        );
    }
}
