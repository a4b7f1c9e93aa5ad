//! Every `KVCACHE_*` environment variable, read and validated here and nowhere else. A
//! malformed value is a typed error (`ERR_INVALID_ARGUMENT`) naming the variable, the value
//! and what is allowed; [`Settings::from_env`] runs at engine construction, so a bad value
//! is refused there, never silently ignored. Values the data path reads on every call are
//! kept once per process (`process()`), from the same parsers.

use crate::error::{Error, Result};
use crate::transport_kind::TransportKind;
use std::net::IpAddr;

mod address;
use address::bind_address;
#[cfg(test)]
use address::interface_ipv4;
pub use address::listen_address;
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
    /// `KVCACHE_RDMA_NICS`: entries separated by `,`, one picked per gpuIdx (index modulo
    /// the count); an entry names one RDMA device, or several joined by `+` (one rail
    /// each). Empty: the automatic choice (`transport/rdma/locality.rs`).
    pub nics: Vec<String>,
    /// The `rdmaDevices` option: one rail per named device. When given it wins over
    /// `KVCACHE_RDMA_NICS` (as an option wins over its variable everywhere).
    pub devices: Option<Vec<String>>,
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

/// Most RDMA devices (rails) one communicator writes over.
pub const MAX_RDMA_DEVICES: usize = 8;

/// The one check of a list of RDMA device names, wherever one is given (the `rdmaDevices`
/// option, a `KVCACHE_RDMA_NICS` entry; `name` names it): 1..=[`MAX_RDMA_DEVICES`] names,
/// none empty, none longer than 64 bytes (the kernel's `IB_DEVICE_NAME_MAX`), none twice.
/// Whether each exists is known only when the transport opens.
pub fn check_rdma_devices(name: &'static str, devices: &[String]) -> Result<()> {
    let shown = || format!("{devices:?}");
    if devices.is_empty() || devices.len() > MAX_RDMA_DEVICES {
        return Err(Error::invalid(
            name,
            format!(
                "{} names {} devices; it must name 1..={MAX_RDMA_DEVICES}",
                shown(),
                devices.len()
            ),
        ));
    }
    for (i, device) in devices.iter().enumerate() {
        if device.is_empty() || device.len() > 64 || device.chars().any(char::is_whitespace) {
            return Err(Error::invalid(
                name,
                format!(
                    "{}: entry {i} ({device:?}) is not an RDMA device name (1..=64 bytes, no spaces)",
                    shown()
                ),
            ));
        }
        if devices[..i].contains(device) {
            return Err(Error::invalid(
                name,
                format!("{} names '{device}' twice", shown()),
            ));
        }
    }
    Ok(())
}

impl RdmaSettings {
    /// These settings with the `rdmaDevices` option applied (checked here, at construction,
    /// so that `auto` cannot pass a bad list over by falling back to TCP).
    pub fn with_devices(mut self, devices: Option<Vec<String>>) -> Result<Self> {
        if let Some(devices) = devices {
            check_rdma_devices("rdmaDevices", &devices)?;
            self.devices = Some(devices);
        }
        Ok(self)
    }
}

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
            devices: None,
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
    /// `KVCACHE_TEST_CORRUPT_RECEIVE`, for tests only: the receiver flips one byte of every
    /// checksummed call it lands before verifying it, so a test sees the mismatch.
    pub test_corrupt_receive: bool,
    /// `KVCACHE_TEST_WRONG_ANSWER`, for tests only: an RDMA receiver answers every acked
    /// call with an immediate no writer waits for (and never with the right one), so a test
    /// sees the writer ignore and count it and the call fail by its timeout.
    pub test_wrong_answer: bool,
}

impl ProcessSettings {
    fn from_env() -> Result<Self> {
        Ok(ProcessSettings {
            rdma_tuning: RdmaTuning::from_env()?,
            tcp_user_timeout_ms: tcp_user_timeout_ms()?.unwrap_or(DEFAULT_TCP_USER_TIMEOUT_MS),
            tcp_prefault: flag("KVCACHE_TCP_PREFAULT")?.unwrap_or(true),
            cuda_copy_kernel: flag("KVCACHE_CUDA_COPY_KERNEL")?.unwrap_or(true),
            cuda_batch_copy: flag("KVCACHE_CUDA_BATCH_COPY")?.unwrap_or(true),
            test_corrupt_receive: flag("KVCACHE_TEST_CORRUPT_RECEIVE")?.unwrap_or(false),
            test_wrong_answer: flag("KVCACHE_TEST_WRONG_ANSWER")?.unwrap_or(false),
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
            test_corrupt_receive: false,
            test_wrong_answer: false,
        })
    })
}

/// How much the engine logs, from least to most: each level prints its own lines and
/// those of every level before it (`Warn` prints warnings and errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// Something failed: a refused handshake or frame, a broken link, a timed-out call.
    Error,
    /// The engine made a choice the operator should know of (a GID index it picked itself).
    Warn,
    /// Decisions: the transport `auto` chose with each peer, once per peer.
    Info,
    /// Everything else: connections, listeners, regions, copy paths.
    Debug,
}

impl LogLevel {
    /// Every level, least verbose first.
    pub const ALL: [LogLevel; 4] = [
        LogLevel::Error,
        LogLevel::Warn,
        LogLevel::Info,
        LogLevel::Debug,
    ];

    /// The name `KVCACHE_LOG_LEVEL` takes and log lines carry.
    pub fn name(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
        }
    }

    /// A level by name, in any case, surrounding blanks ignored.
    pub fn parse(text: &str) -> Option<Self> {
        let name = text.trim().to_ascii_lowercase();
        Self::ALL.into_iter().find(|level| level.name() == name)
    }
}

/// A library is quiet: only what went wrong, or what the engine chose on the operator's
/// behalf, is printed unless `KVCACHE_LOG_LEVEL` or `KVCACHE_DEBUG` asks for more.
pub const DEFAULT_LOG_LEVEL: LogLevel = LogLevel::Warn;

fn log_level() -> Result<Option<LogLevel>> {
    let Some(text) = var("KVCACHE_LOG_LEVEL") else {
        return Ok(None);
    };
    LogLevel::parse(&text).map(Some).ok_or_else(|| {
        Error::invalid(
            "KVCACHE_LOG_LEVEL",
            format!("'{text}' is not a log level: use error, warn, info or debug"),
        )
    })
}

/// Logging: `KVCACHE_LOG_LEVEL`, `KVCACHE_DEBUG` (a flag), `KVCACHE_DEBUG_FILE`,
/// `KVCACHE_ERROR_FILE` (paths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// The most verbose level printed: `KVCACHE_LOG_LEVEL`, else [`DEFAULT_LOG_LEVEL`];
    /// `KVCACHE_DEBUG` on makes it `Debug` whatever the level says.
    pub level: LogLevel,
    /// Where info and debug lines go (else stderr).
    pub debug_file: Option<std::ffi::OsString>,
    /// Where error and warn lines go (else stderr).
    pub error_file: Option<std::ffi::OsString>,
}

impl LogSettings {
    pub fn from_env() -> Result<Self> {
        Ok(Self::assemble(log_level()?, flag("KVCACHE_DEBUG")?))
    }

    /// For a line logged before any engine validated the environment: a malformed level or
    /// flag keeps its default; the files apply.
    pub fn from_env_lenient() -> Self {
        Self::assemble(
            log_level().unwrap_or(None),
            flag("KVCACHE_DEBUG").unwrap_or(None),
        )
    }

    fn assemble(level: Option<LogLevel>, debug: Option<bool>) -> Self {
        LogSettings {
            level: effective_log_level(level, debug),
            debug_file: std::env::var_os("KVCACHE_DEBUG_FILE").filter(|v| !v.is_empty()),
            error_file: std::env::var_os("KVCACHE_ERROR_FILE").filter(|v| !v.is_empty()),
        }
    }
}

/// `KVCACHE_LOG_LEVEL` (else the default), raised to `Debug` by `KVCACHE_DEBUG` on: the
/// flag keeps meaning "debug lines on", as it always has.
fn effective_log_level(level: Option<LogLevel>, debug: Option<bool>) -> LogLevel {
    let level = level.unwrap_or(DEFAULT_LOG_LEVEL);
    if debug == Some(true) {
        LogLevel::Debug
    } else {
        level
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
        "KVCACHE_REGISTRY",
        "etcd registry of instances, etcd://host:port[,host:port...]/prefix (read and checked by the TypeScript API)",
        || Ok(()),
    ),
    (
        "KVCACHE_SOCKET_IFNAME",
        "interface whose IPv4 address the listeners bind when host is not given",
        || valid(bind_address()),
    ),
    (
        "KVCACHE_RDMA_NICS",
        "RDMA devices per gpuIdx: entries comma-separated, picked by gpuIdx modulo their count; devices of an entry joined by + (the rdmaDevices option wins)",
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
    (
        "KVCACHE_TEST_CORRUPT_RECEIVE",
        "TESTS ONLY: corrupt one received byte of each checksummed call",
        || valid(flag("KVCACHE_TEST_CORRUPT_RECEIVE")),
    ),
    (
        "KVCACHE_TEST_WRONG_ANSWER",
        "TESTS ONLY: an RDMA receiver answers acked calls with a wrong call number",
        || valid(flag("KVCACHE_TEST_WRONG_ANSWER")),
    ),
    (
        "KVCACHE_LOG_LEVEL",
        "log level: error, warn (default), info or debug",
        || valid(log_level()),
    ),
    (
        "KVCACHE_DEBUG",
        "debug log (as KVCACHE_LOG_LEVEL=debug)",
        || valid(flag("KVCACHE_DEBUG")),
    ),
    (
        "KVCACHE_DEBUG_FILE",
        "file info and debug lines go to (else stderr)",
        || Ok(()),
    ),
    (
        "KVCACHE_ERROR_FILE",
        "file error and warn lines go to (else stderr)",
        || Ok(()),
    ),
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
pub(super) fn var(name: &str) -> Option<String> {
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

#[cfg(test)]
mod tests;
