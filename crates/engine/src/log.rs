//! The engine's log: one line per event, `[kvtransfer <level> <ISO 8601 UTC time>
//! pid=<pid>] <message>`, at four levels (`KVCACHE_LOG_LEVEL`: error, warn, info, debug;
//! default warn, so that a library says nothing while all is well; `KVCACHE_DEBUG` on means
//! debug). Error and warn lines go to `KVCACHE_ERROR_FILE` when set, else stderr; info and
//! debug lines to `KVCACHE_DEBUG_FILE` when set, else stderr. The settings are read once
//! per process, at the first line.

use crate::config::{LogLevel, LogSettings};
use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

struct Sinks {
    level: LogLevel,
    debug_file: Option<Mutex<File>>,
    error_file: Option<Mutex<File>>,
}

impl Sinks {
    /// Whether lines of `level` are printed.
    fn accepts(&self, level: LogLevel) -> bool {
        level <= self.level
    }

    /// The file lines of `level` go to (`None`: stderr).
    fn file_for(&self, level: LogLevel) -> Option<&Mutex<File>> {
        match level {
            LogLevel::Error | LogLevel::Warn => self.error_file.as_ref(),
            LogLevel::Info | LogLevel::Debug => self.debug_file.as_ref(),
        }
    }
}

fn open_append(path: Option<&std::ffi::OsStr>) -> Option<Mutex<File>> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path?)
        .ok()
        .map(Mutex::new)
}

fn sinks() -> &'static Sinks {
    static SINKS: OnceLock<Sinks> = OnceLock::new();
    SINKS.get_or_init(|| {
        // Validated by `Settings::from_env` when an engine is built; a malformed level or
        // flag here (a line logged before any engine) keeps its default.
        let settings = LogSettings::from_env_lenient();
        Sinks {
            level: settings.level,
            debug_file: open_append(settings.debug_file.as_deref()),
            error_file: open_append(settings.error_file.as_deref()),
        }
    })
}

/// Whether lines of `level` are printed in this process (the level is read once).
pub fn enabled(level: LogLevel) -> bool {
    sinks().accepts(level)
}

/// Whether debug lines are printed (`KVCACHE_LOG_LEVEL=debug` or `KVCACHE_DEBUG`).
pub fn debug_enabled() -> bool {
    enabled(LogLevel::Debug)
}

/// `message` with every control character written as its Rust escape (`\n`, `\u{1b}`): a
/// log line is one line, whatever a peer put in the values it carries (a name, a tag, a
/// reason), and drives no terminal.
fn escape_controls(message: &str) -> Cow<'_, str> {
    if !message.chars().any(char::is_control) {
        return Cow::Borrowed(message);
    }
    let mut out = String::with_capacity(message.len() + 16);
    for c in message.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `since_epoch` as ISO 8601 UTC with milliseconds: `2026-12-06T21:05:01.123Z`.
fn iso8601_utc(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since_epoch.subsec_millis()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch): eras of 400 years (146,097 days),
/// years counted from March so that the leap day is the last of its year.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let day_of_era = z % 146_097; // 0..=146_096
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365; // 0..=399
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100); // 0..=365
    let month_from_march = (5 * day_of_year + 2) / 153; // 0..=11
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

/// One whole line, newline included.
fn format_line(level: LogLevel, since_epoch: Duration, pid: u32, message: &str) -> String {
    format!(
        "[kvtransfer {} {} pid={pid}] {}\n",
        level.name(),
        iso8601_utc(since_epoch),
        escape_controls(message)
    )
}

fn emit(file: Option<&Mutex<File>>, level: LogLevel, message: std::fmt::Arguments<'_>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let line = format_line(level, now, std::process::id(), &message.to_string());
    match file {
        Some(file) => {
            if let Ok(mut file) = file.lock() {
                let _ = file.write_all(line.as_bytes());
            }
        }
        None => {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }
}

/// Writes one line at `level` when that level is printed (see the module's header).
pub fn line(level: LogLevel, message: std::fmt::Arguments<'_>) {
    let sinks = sinks();
    if sinks.accepts(level) {
        emit(sinks.file_for(level), level, message);
    }
}

/// One debug line (see [`line`]).
pub fn debug_line(message: std::fmt::Arguments<'_>) {
    line(LogLevel::Debug, message)
}

/// One error line: printed at every level.
pub fn error(message: std::fmt::Arguments<'_>) {
    line(LogLevel::Error, message)
}

/// One warn line: a choice the engine made on the operator's behalf.
pub fn warn(message: std::fmt::Arguments<'_>) {
    line(LogLevel::Warn, message)
}

/// One info line: a decision an operator may want (the transport chosen with each peer).
pub fn info(message: std::fmt::Arguments<'_>) {
    line(LogLevel::Info, message)
}

/// `debug!("...", args)`: formats only when debug lines are printed.
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::debug_enabled() {
            $crate::log::debug_line(format_args!($($arg)*));
        }
    };
}

/// `log_error!("...", args)`: printed at every level.
macro_rules! log_error {
    ($($arg:tt)*) => {
        $crate::log::error(format_args!($($arg)*))
    };
}

/// `log_warn!("...", args)`: printed at warn (the default) and above.
macro_rules! log_warn {
    ($($arg:tt)*) => {
        $crate::log::warn(format_args!($($arg)*))
    };
}

/// `log_info!("...", args)`: printed at info and debug (see [`info`]).
macro_rules! log_info {
    ($($arg:tt)*) => {
        if $crate::log::enabled($crate::config::LogLevel::Info) {
            $crate::log::info(format_args!($($arg)*));
        }
    };
}

// Ordinary paths (`crate::log::debug!`), not `#[macro_export]` ones resolved at the crate
// root: the macros stay where they are defined.
pub(crate) use {debug, log_error, log_info, log_warn};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_stays_one_line_and_drives_no_terminal() {
        assert_eq!(
            escape_controls("accepted hello from prefill-0:5000"),
            "accepted hello from prefill-0:5000"
        );
        assert_eq!(
            escape_controls("from evil\n[kvtransfer error 1.0 pid=1] forged\r\u{1b}[2J"),
            "from evil\\n[kvtransfer error 1.0 pid=1] forged\\r\\u{1b}[2J"
        );
        assert_eq!(escape_controls("tab\tend\u{7f}"), "tab\\tend\\u{7f}");
        assert_eq!(escape_controls("caf\u{e9} \\ \""), "caf\u{e9} \\ \"");
    }

    #[test]
    fn timestamps_are_iso_8601_utc_with_milliseconds() {
        let at = |secs: u64, nanos: u32| iso8601_utc(Duration::new(secs, nanos));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(1_796_591_101, 123_456_789), "2026-12-06T21:05:01.123Z");
        assert_eq!(at(94_694_399, 999_999_999), "1972-12-31T23:59:59.999Z");
        assert_eq!(at(951_782_400, 0), "2000-02-29T00:00:00.000Z"); // 400-year leap day
        assert_eq!(at(951_782_400 - 1, 0), "2000-02-28T23:59:59.000Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000Z"); // 2100 is no leap year
        assert_eq!(at(4_107_542_400 - 86_400, 0), "2100-02-28T00:00:00.000Z");
        assert_eq!(at(253_402_300_799, 1_000_000), "9999-12-31T23:59:59.001Z");
    }

    /// `civil_from_days` against a plain walk over years and months, for every day of
    /// 1970..2400 (one whole 400-year cycle and more).
    #[test]
    fn civil_from_days_agrees_with_a_calendar_walk() {
        let leap =
            |y: u64| (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
        let mut days = 0u64;
        for year in 1970..2400u64 {
            for month in 1..=12u64 {
                let length = match month {
                    2 if leap(year) => 29,
                    2 => 28,
                    4 | 6 | 9 | 11 => 30,
                    _ => 31,
                };
                for day in 1..=length {
                    assert_eq!(civil_from_days(days), (year, month, day), "day {days}");
                    days += 1;
                }
            }
        }
    }

    #[test]
    fn a_line_names_its_level_time_and_pid() {
        let when = Duration::new(1_796_591_101, 123_000_000);
        assert_eq!(
            format_line(LogLevel::Warn, when, 483, "rdma: using index 1"),
            "[kvtransfer warn 2026-12-06T21:05:01.123Z pid=483] rdma: using index 1\n"
        );
        assert_eq!(
            format_line(LogLevel::Info, when, 7, "name evil\nforged"),
            "[kvtransfer info 2026-12-06T21:05:01.123Z pid=7] name evil\\nforged\n"
        );
    }

    /// Each level prints its own lines and those of every less verbose level; error and
    /// warn lines go where errors go, info and debug where debug lines go.
    #[test]
    fn levels_filter_and_route_lines() {
        use LogLevel::*;
        let printed = |threshold| -> Vec<LogLevel> {
            let sinks = Sinks {
                level: threshold,
                debug_file: None,
                error_file: None,
            };
            LogLevel::ALL
                .into_iter()
                .filter(|l| sinks.accepts(*l))
                .collect()
        };
        assert_eq!(printed(Error), [Error]);
        assert_eq!(printed(Warn), [Error, Warn]);
        assert_eq!(printed(Info), [Error, Warn, Info]);
        assert_eq!(printed(Debug), [Error, Warn, Info, Debug]);
        assert_eq!(printed(crate::config::DEFAULT_LOG_LEVEL), [Error, Warn]);

        let scratch = || Some(Mutex::new(File::open("/dev/null").unwrap()));
        let sinks = Sinks {
            level: Debug,
            debug_file: scratch(),
            error_file: scratch(),
        };
        let errors = sinks.error_file.as_ref().unwrap();
        let debugs = sinks.debug_file.as_ref().unwrap();
        for (level, file) in [
            (Error, errors),
            (Warn, errors),
            (Info, debugs),
            (Debug, debugs),
        ] {
            assert!(
                std::ptr::eq(sinks.file_for(level).unwrap(), file),
                "{level:?}"
            );
        }
    }
}
