//! Every `KVCACHE_*` environment variable, read and validated here and nowhere else. A
//! malformed value is a typed error (`ERR_INVALID_ARGUMENT`) naming the variable, the value
//! and what is allowed; [`Settings::from_env`] runs at engine construction, so a bad value
//! is refused there, never silently ignored. Values the data path reads on every call are
//! kept once per process (`process()`), from the same parsers.

use crate::error::{Error, Result};
use crate::transport_kind::TransportKind;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

/// What `transport` / `KVCACHE_TRANSPORT` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportChoice {
    /// The first transport, in order of preference, that both sides can use.
    Auto,
    /// Exactly this one, or a typed error saying why it cannot be had.
    Only(TransportKind),
}

impl TransportChoice {
    pub fn parse(text: &str, origin: &'static str) -> Result<Self> {
        match text.trim() {
            "auto" | "" => Ok(TransportChoice::Auto),
            other => TransportKind::parse(other)
                .map(TransportChoice::Only)
                .ok_or_else(|| {
                    let names: Vec<String> = TransportKind::PREFERENCE
                        .iter()
                        .map(|k| format!("'{}'", k.name()))
                        .collect();
                    Error::invalid(
                        origin,
                        format!("'{other}' is not one of 'auto', {}", names.join(", ")),
                    )
                }),
        }
    }

    /// The explicit option wins; else `KVCACHE_TRANSPORT`; else auto.
    pub fn resolve(explicit: Option<&str>) -> Result<Self> {
        match explicit {
            Some(text) => Self::parse(text, "transport"),
            None => match var("KVCACHE_TRANSPORT") {
                Some(text) => Self::parse(&text, "KVCACHE_TRANSPORT"),
                None => Ok(TransportChoice::Auto),
            },
        }
    }
}

/// RDMA settings from the environment (`KVCACHE_RDMA_*`, `KVCACHE_IB_TIMEOUT`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaSettings {
    /// `KVCACHE_RDMA_NICS`: RDMA device names, one picked per gpuIdx (index modulo the
    /// count); empty: the first device with an active port.
    pub nics: Vec<String>,
    /// `Some` when KVCACHE_RDMA_GID_INDEX was set explicitly.
    pub gid_index: Option<u8>,
    /// `KVCACHE_IB_TIMEOUT`: the queue pairs' ACK timeout exponent (4.096 µs × 2^n), 14..=31.
    pub ib_timeout: u8,
    /// `KVCACHE_RELAX_ORDERING`: register memory regions with PCIe relaxed ordering.
    pub relaxed_ordering: bool,
    /// `KVCACHE_GDRCOPY_FLUSH_ENABLE`: after a call's WRITEs, issue an RDMA READ that
    /// flushes them to GPU memory before the call completes.
    pub gdr_flush: bool,
    /// `KVCACHE_RDMA_QPS_PER_PEER`: RC queue pairs per peer, 1..=64.
    pub qps_per_peer: u16,
}

pub const DEFAULT_GID_INDEX: u8 = 3;
pub const DEFAULT_IB_TIMEOUT: u8 = 18;
/// Two RC queue pairs per peer (as Mooncake's default): chains alternate between them, and
/// on software providers each gets its own posting thread (`transport/rdma/doorbell.rs`).
pub const DEFAULT_QPS_PER_PEER: u16 = 2;
/// Default bound on how long sent TCP data may stay unacknowledged (and keepalive probes
/// unanswered) before the kernel drops the connection.
pub const DEFAULT_TCP_USER_TIMEOUT_MS: u32 = 2500;

impl RdmaSettings {
    /// Reads the variables, with defaults for unset ones; a malformed or out-of-range value
    /// is an [`Error::InvalidArgument`](crate::Error::InvalidArgument).
    pub fn from_env() -> Result<Self> {
        let nics = var("KVCACHE_RDMA_NICS")
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
            gid_index: gid_index()?,
            ib_timeout: ib_timeout()?.unwrap_or(DEFAULT_IB_TIMEOUT),
            relaxed_ordering: flag("KVCACHE_RELAX_ORDERING")?.unwrap_or(false),
            gdr_flush: flag("KVCACHE_GDRCOPY_FLUSH_ENABLE")?.unwrap_or(false),
            qps_per_peer: qps_per_peer()?.unwrap_or(DEFAULT_QPS_PER_PEER),
        })
    }
}

fn gid_index() -> Result<Option<u8>> {
    number::<u8>("KVCACHE_RDMA_GID_INDEX", 0..=255)
}

fn ib_timeout() -> Result<Option<u8>> {
    number::<u8>("KVCACHE_IB_TIMEOUT", 14..=31)
}

fn qps_per_peer() -> Result<Option<u16>> {
    number::<u16>("KVCACHE_RDMA_QPS_PER_PEER", 1..=64)
}

fn tcp_user_timeout_ms() -> Result<Option<u32>> {
    number::<u32>("KVCACHE_TCP_USER_TIMEOUT_MS", 0..=3_600_000)
}

/// RDMA data-path tuning (chain length, send-queue depth, idle polls, posting threads),
/// from `KVCACHE_RDMA_TUNING="chain=N,sq=N,spins=N,posters=N"`, for side-by-side
/// measurements (`kvtransfer bench`, docs/performance.md). Unset keys keep the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdmaTuning {
    pub chain_wrs: Option<usize>,
    pub send_queue_depth: Option<u32>,
    pub idle_spins: Option<u32>,
    pub post_threads: Option<u32>,
}

impl RdmaTuning {
    fn from_env() -> Result<Self> {
        const NAME: &str = "KVCACHE_RDMA_TUNING";
        let mut t = RdmaTuning {
            chain_wrs: None,
            send_queue_depth: None,
            idle_spins: None,
            post_threads: None,
        };
        let text = var(NAME).unwrap_or_default();
        for item in text.split(',').filter(|s| !s.trim().is_empty()) {
            let bad = |why: &str| {
                Error::invalid(
                    NAME,
                    format!("'{item}' in '{text}' {why}: expected comma-separated chain=1..4096, sq=16..65536, spins=N, posters=0..64"),
                )
            };
            let (key, value) = item.split_once('=').ok_or_else(|| bad("has no '='"))?;
            let value: u32 = value
                .trim()
                .parse()
                .map_err(|_| bad("is not a whole number"))?;
            let in_range = |range: std::ops::RangeInclusive<u32>| {
                range
                    .contains(&value)
                    .then_some(value)
                    .ok_or_else(|| bad("is out of range"))
            };
            match key.trim() {
                "chain" => t.chain_wrs = Some(in_range(1..=4096)? as usize),
                "sq" => t.send_queue_depth = Some(in_range(16..=1 << 16)?),
                "spins" => t.idle_spins = Some(value),
                "posters" => t.post_threads = Some(in_range(0..=64)?),
                _ => return Err(bad("names no tuning key")),
            }
        }
        Ok(t)
    }
}

/// Settings the data path reads on every call: one copy per process, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSettings {
    pub rdma_tuning: RdmaTuning,
    /// `KVCACHE_TCP_USER_TIMEOUT_MS` (0: no user timeout, no keepalive tuning).
    pub tcp_user_timeout_ms: u32,
    /// `KVCACHE_TCP_PREFAULT`: touch receiving regions in the background on first connect.
    pub tcp_prefault: bool,
    /// `KVCACHE_CUDA_COPY_KERNEL`: small GPU copies through the copy kernel.
    pub cuda_copy_kernel: bool,
    /// `KVCACHE_CUDA_BATCH_COPY`: `cuMemcpyBatchAsync` where the driver has it.
    pub cuda_batch_copy: bool,
}

impl ProcessSettings {
    fn from_env() -> Result<Self> {
        Ok(ProcessSettings {
            rdma_tuning: RdmaTuning::from_env()?,
            tcp_user_timeout_ms: tcp_user_timeout_ms()?.unwrap_or(DEFAULT_TCP_USER_TIMEOUT_MS),
            tcp_prefault: flag("KVCACHE_TCP_PREFAULT")?.unwrap_or(true),
            cuda_copy_kernel: flag("KVCACHE_CUDA_COPY_KERNEL")?.unwrap_or(true),
            cuda_batch_copy: flag("KVCACHE_CUDA_BATCH_COPY")?.unwrap_or(true),
        })
    }
}

/// The process's data-path settings. [`Settings::from_env`] has validated them before any
/// engine exists; should the environment have changed to something malformed since, the
/// values read first stay in force.
pub fn process() -> &'static ProcessSettings {
    static PROCESS: OnceLock<ProcessSettings> = OnceLock::new();
    PROCESS.get_or_init(|| {
        ProcessSettings::from_env().unwrap_or(ProcessSettings {
            rdma_tuning: RdmaTuning {
                chain_wrs: None,
                send_queue_depth: None,
                idle_spins: None,
                post_threads: None,
            },
            tcp_user_timeout_ms: DEFAULT_TCP_USER_TIMEOUT_MS,
            tcp_prefault: true,
            cuda_copy_kernel: true,
            cuda_batch_copy: true,
        })
    })
}

/// Logging: `KVCACHE_DEBUG` (a flag), `KVCACHE_DEBUG_FILE`, `KVCACHE_ERROR_FILE` (paths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    pub debug: bool,
    pub debug_file: Option<std::ffi::OsString>,
    pub error_file: Option<std::ffi::OsString>,
}

impl LogSettings {
    pub fn from_env() -> Result<Self> {
        Ok(LogSettings {
            debug: flag("KVCACHE_DEBUG")?.unwrap_or(false),
            debug_file: std::env::var_os("KVCACHE_DEBUG_FILE").filter(|v| !v.is_empty()),
            error_file: std::env::var_os("KVCACHE_ERROR_FILE").filter(|v| !v.is_empty()),
        })
    }
}

/// Everything an engine reads from the environment, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub transport: TransportChoice,
    /// `KVCACHE_AUTH_TOKEN` (empty: none).
    pub auth_token: Option<Vec<u8>>,
    /// `KVCACHE_SOCKET_IFNAME`'s IPv4 address, else all interfaces: what the listeners
    /// bind when the `host` option is not given.
    pub bind_address: IpAddr,
    pub rdma: RdmaSettings,
    pub process: ProcessSettings,
    pub log: LogSettings,
}

impl Settings {
    /// Reads and validates every `KVCACHE_*` variable; the first malformed one is the error.
    pub fn from_env() -> Result<Self> {
        Ok(Settings {
            transport: TransportChoice::resolve(None)?,
            auth_token: std::env::var_os("KVCACHE_AUTH_TOKEN")
                .map(std::os::unix::ffi::OsStringExt::into_vec)
                .filter(|v| !v.is_empty()),
            bind_address: bind_address()?,
            rdma: RdmaSettings::from_env()?,
            process: ProcessSettings::from_env()?,
            log: LogSettings::from_env()?,
        })
    }
}

/// One `KVCACHE_*` variable as `kvtransfer doctor` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariableReport {
    /// The variable's name (`KVCACHE_...`).
    pub name: String,
    /// What is set (`KVCACHE_AUTH_TOKEN`: only its length).
    pub value: String,
    /// What it controls; empty for a `KVCACHE_*` name the engine does not read.
    pub meaning: &'static str,
    /// The engine reads this variable.
    pub known: bool,
    /// Why construction refuses it: the very message `Settings::from_env` gives.
    pub error: Option<String>,
}

type Check = fn() -> Result<()>;

fn valid<T>(parsed: Result<T>) -> Result<()> {
    parsed.map(drop)
}

/// Every variable the engine reads, what it controls, and the parser that validates it
/// (the one [`Settings::from_env`] uses).
const VARIABLES: &[(&str, &str, Check)] = &[
    (
        "KVCACHE_TRANSPORT",
        "transport when the option is not given: auto or a transport name",
        || valid(TransportChoice::resolve(None)),
    ),
    (
        "KVCACHE_AUTH_TOKEN",
        "shared secret of the handshake",
        || Ok(()),
    ),
    (
        "KVCACHE_SOCKET_IFNAME",
        "interface whose IPv4 address the listeners bind when host is not given",
        || valid(bind_address()),
    ),
    (
        "KVCACHE_RDMA_NICS",
        "RDMA device per gpuIdx (comma-separated)",
        || Ok(()),
    ),
    (
        "KVCACHE_RDMA_GID_INDEX",
        "GID index (default: 3 if RoCE v2 IPv4, else found)",
        || valid(gid_index()),
    ),
    ("KVCACHE_IB_TIMEOUT", "RDMA ACK timeout exponent", || {
        valid(ib_timeout())
    }),
    (
        "KVCACHE_RELAX_ORDERING",
        "PCIe relaxed ordering on RDMA regions",
        || valid(flag("KVCACHE_RELAX_ORDERING")),
    ),
    (
        "KVCACHE_GDRCOPY_FLUSH_ENABLE",
        "RDMA READ flush after GPU writes",
        || valid(flag("KVCACHE_GDRCOPY_FLUSH_ENABLE")),
    ),
    (
        "KVCACHE_RDMA_QPS_PER_PEER",
        "RDMA queue pairs per peer",
        || valid(qps_per_peer()),
    ),
    (
        "KVCACHE_RDMA_TUNING",
        "RDMA data-path tuning (chain, sq, spins, posters)",
        || valid(RdmaTuning::from_env()),
    ),
    (
        "KVCACHE_TCP_USER_TIMEOUT_MS",
        "TCP user timeout and keepalive (0: off)",
        || valid(tcp_user_timeout_ms()),
    ),
    (
        "KVCACHE_TCP_PREFAULT",
        "touch receiving regions on first connect",
        || valid(flag("KVCACHE_TCP_PREFAULT")),
    ),
    (
        "KVCACHE_CUDA_COPY_KERNEL",
        "small GPU copies through the copy kernel",
        || valid(flag("KVCACHE_CUDA_COPY_KERNEL")),
    ),
    (
        "KVCACHE_CUDA_BATCH_COPY",
        "cuMemcpyBatchAsync where the driver has it",
        || valid(flag("KVCACHE_CUDA_BATCH_COPY")),
    ),
    ("KVCACHE_DEBUG", "debug log", || {
        valid(flag("KVCACHE_DEBUG"))
    }),
    (
        "KVCACHE_DEBUG_FILE",
        "file the debug log goes to",
        || Ok(()),
    ),
    ("KVCACHE_ERROR_FILE", "file error lines also go to", || {
        Ok(())
    }),
];

/// Every `KVCACHE_*` variable set in this process, in name order: those the engine reads
/// with their meaning and, when malformed, the error construction gives; others (typos)
/// marked unknown.
pub fn variables() -> Vec<VariableReport> {
    let mut report: Vec<VariableReport> = std::env::vars_os()
        .filter_map(|(name, value)| {
            let name = name.into_string().ok()?;
            name.starts_with("KVCACHE_").then_some((name, value))
        })
        .map(|(name, value)| {
            let entry = VARIABLES.iter().find(|(known, _, _)| *known == name);
            let value = if name == "KVCACHE_AUTH_TOKEN" {
                format!("({} bytes)", value.len())
            } else {
                value.to_string_lossy().into_owned()
            };
            VariableReport {
                value,
                meaning: entry.map_or("", |(_, meaning, _)| meaning),
                known: entry.is_some(),
                error: entry.and_then(|(_, _, check)| check().err().map(|e| e.to_string())),
                name,
            }
        })
        .collect();
    report.sort_by(|a, b| a.name.cmp(&b.name));
    report
}

/// A set, non-empty variable (surrounding blanks trimmed).
fn var(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// A yes/no variable: `1 true yes on` or `0 false no off` (any case); unset or empty is
/// `None`; anything else is an error naming the variable.
pub fn flag(name: &'static str) -> Result<Option<bool>> {
    let Some(text) = var(name) else {
        return Ok(None);
    };
    match text.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(Some(true)),
        "0" | "false" | "no" | "off" => Ok(Some(false)),
        _ => Err(Error::invalid(
            name,
            format!("'{text}' is not a yes/no value: use 1, true, yes, on or 0, false, no, off"),
        )),
    }
}

fn number<T: TryFrom<u32>>(
    name: &'static str,
    range: std::ops::RangeInclusive<u32>,
) -> Result<Option<T>> {
    let Some(text) = var(name) else {
        return Ok(None);
    };
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

/// Address the listeners bind to when the `host` option is not given: the IPv4 address of
/// `KVCACHE_SOCKET_IFNAME` when set, else all interfaces.
fn bind_address() -> Result<IpAddr> {
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
    fn host_is_star_an_address_or_an_interface() {
        let v4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
        assert_eq!(listen_address("127.0.0.1").unwrap(), v4(127, 0, 0, 1));
        assert_eq!(listen_address("0.0.0.0").unwrap(), v4(0, 0, 0, 0));
        assert_eq!(listen_address("*").unwrap(), v4(0, 0, 0, 0));
        assert_eq!(listen_address("lo").unwrap(), v4(127, 0, 0, 1));
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(listen_address("::1").unwrap(), v6);
        assert_eq!(listen_address("[::1]").unwrap(), v6);
        for bad in ["", "localhost", "nope0", "a b", "eth0\n"] {
            let err = listen_address(bad).unwrap_err();
            assert_eq!(err.code(), "ERR_INVALID_ARGUMENT", "{bad}");
            let text = err.to_string();
            assert!(
                text.contains("invalid host") && text.contains("interface"),
                "{text}"
            );
            assert!(!text.contains('\n'), "{text}");
        }
        let err = listen_address("localhost").unwrap_err().to_string();
        assert!(err.contains("'localhost'") && err.contains("lo"), "{err}");
    }

    #[test]
    fn transport_choice_parses() {
        assert_eq!(
            TransportChoice::parse("tcp", "transport").unwrap(),
            TransportChoice::Only(TransportKind::Tcp)
        );
        assert_eq!(
            TransportChoice::parse(" auto ", "transport").unwrap(),
            TransportChoice::Auto
        );
        let err = TransportChoice::parse("ib", "transport").unwrap_err();
        assert_eq!(err.code(), "ERR_INVALID_ARGUMENT");
        assert!(err.to_string().contains("'ib'") && err.to_string().contains("'rdma'"));
    }

    /// The doctor's list (`VARIABLES`) names every variable this file reads.
    #[test]
    fn every_variable_read_here_is_in_the_doctors_list() {
        let source = include_str!("config.rs");
        let mut names: Vec<&str> = source
            .match_indices("\"KVCACHE_")
            .map(|(at, _)| {
                let rest = &source[at + 1..];
                &rest[..rest.find('"').unwrap()]
            })
            .filter(|name| *name != "KVCACHE_")
            .collect();
        names.sort_unstable();
        names.dedup();
        assert!(names.len() >= 17, "{names:?}");
        for name in names {
            assert!(
                VARIABLES.iter().any(|(known, _, _)| *known == name),
                "{name} is read but not in VARIABLES"
            );
        }
    }

    /// Each malformed value names the variable, the value and what is allowed. Run in a
    /// child process per case: the environment is process-wide.
    #[test]
    fn malformed_variables_are_refused_by_name() {
        let cases = [
            ("KVCACHE_IB_TIMEOUT", "99", "14..=31"),
            ("KVCACHE_RELAX_ORDERING", "maybe", "yes/no"),
            ("KVCACHE_RDMA_GID_INDEX", "x", "0..=255"),
            ("KVCACHE_TCP_USER_TIMEOUT_MS", "soon", "0..=3600000"),
            ("KVCACHE_RDMA_TUNING", "chain=0", "out of range"),
            ("KVCACHE_RDMA_TUNING", "speed=3", "names no tuning key"),
            ("KVCACHE_CUDA_COPY_KERNEL", "2", "yes/no"),
            ("KVCACHE_TRANSPORT", "ib", "'auto'"),
            ("KVCACHE_DEBUG", "verbose", "yes/no"),
        ];
        if let Ok(case) = std::env::var("KVT_CONFIG_CASE") {
            let (name, value, allowed) = cases[case.parse::<usize>().unwrap()];
            let err = Settings::from_env().unwrap_err();
            let text = err.to_string();
            assert_eq!(err.code(), "ERR_INVALID_ARGUMENT");
            assert!(
                text.contains(name) && text.contains(value) && text.contains(allowed),
                "{text}"
            );
            return;
        }
        let exe = std::env::current_exe().unwrap();
        for (i, (name, value, _)) in cases.iter().enumerate() {
            let status = std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "config::tests::malformed_variables_are_refused_by_name",
                    "--quiet",
                ])
                .env("KVT_CONFIG_CASE", i.to_string())
                .env(name, value)
                // The child's own result line must not count as a test of this run.
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "{name}={value} was not refused by name");
        }
    }
}
