//! Logging as the seed describes: `KVCACHE_DEBUG` turns on debug lines (to
//! `KVCACHE_DEBUG_FILE` when set, else stderr); errors always go to `KVCACHE_ERROR_FILE`
//! when set, else stderr. Info lines (the transport `auto` chose with each peer, once per
//! peer) are always printed, where debug lines go.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

struct Sinks {
    debug_enabled: bool,
    debug_file: Option<Mutex<File>>,
    error_file: Option<Mutex<File>>,
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
        // Validated by `Settings::from_env` when an engine is built; a malformed value
        // here (logging before any engine) means no debug lines.
        let settings =
            crate::config::LogSettings::from_env().unwrap_or(crate::config::LogSettings {
                debug: false,
                debug_file: None,
                error_file: None,
            });
        Sinks {
            debug_enabled: settings.debug,
            debug_file: open_append(settings.debug_file.as_deref()),
            error_file: open_append(settings.error_file.as_deref()),
        }
    })
}

/// Whether `KVCACHE_DEBUG` turned debug lines on (read once per process).
pub fn debug_enabled() -> bool {
    sinks().debug_enabled
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

fn emit(file: Option<&Mutex<File>>, level: &str, message: std::fmt::Arguments<'_>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let message = message.to_string();
    let line = format!(
        "[kvtransfer {level} {}.{:06} pid={}] {}\n",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        escape_controls(&message)
    );
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

/// Writes one debug line (timestamp and pid prefixed) when debug lines are on: to
/// `KVCACHE_DEBUG_FILE` when set, else stderr.
pub fn debug_line(message: std::fmt::Arguments<'_>) {
    let sinks = sinks();
    if sinks.debug_enabled {
        emit(sinks.debug_file.as_ref(), "debug", message);
    }
}

/// Writes one error line (timestamp and pid prefixed), always: to `KVCACHE_ERROR_FILE`
/// when set, else stderr.
pub fn error(message: std::fmt::Arguments<'_>) {
    let sinks = sinks();
    emit(sinks.error_file.as_ref(), "error", message);
}

/// Decisions an operator wants without `KVCACHE_DEBUG` (the transport chosen with each
/// peer): to `KVCACHE_DEBUG_FILE` when set, else stderr.
pub fn info(message: std::fmt::Arguments<'_>) {
    let sinks = sinks();
    emit(sinks.debug_file.as_ref(), "info", message);
}

/// `debug!("...", args)`: formats only when KVCACHE_DEBUG is on.
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::debug_enabled() {
            $crate::log::debug_line(format_args!($($arg)*));
        }
    };
}

/// `log_error!("...", args)`: always printed.
macro_rules! log_error {
    ($($arg:tt)*) => {
        $crate::log::error(format_args!($($arg)*))
    };
}

/// `log_info!("...", args)`: always printed (see [`info`]).
macro_rules! log_info {
    ($($arg:tt)*) => {
        $crate::log::info(format_args!($($arg)*))
    };
}

// Ordinary paths (`crate::log::debug!`), not `#[macro_export]` ones resolved at the crate
// root: the macros stay where they are defined.
pub(crate) use {debug, log_error, log_info};

#[cfg(test)]
mod tests {
    use super::escape_controls;

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
}
