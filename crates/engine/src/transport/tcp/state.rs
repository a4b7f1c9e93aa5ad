//! What the data listener and its receivers share: the admissions handed out in
//! handshakes and the server's state. A leaf, so that the listener (which starts
//! receivers) and the receivers (which read it) do not import each other.

use crate::gpu::checksum::CrcKernel;
use crate::layout::RegionTable;
use crate::transport::ArrivalSink;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

/// A session token handed out in a handshake reply, admitting one data connection.
#[derive(Debug, Clone)]
pub(super) struct Admission {
    pub(super) peer_name: String,
}

pub(super) struct ServerState {
    pub(super) table: Arc<RegionTable>,
    pub(super) admissions: Mutex<HashMap<u64, Admission>>,
    /// Data connections open now (admitted or awaiting their hello).
    pub(super) connections: AtomicUsize,
    pub(super) closed: AtomicBool,
    pub(super) arrivals: Option<ArrivalSink>,
    /// Counts received payload bytes per writer (by name).
    pub(super) metrics: Arc<crate::metrics::Metrics>,
    /// Started by the first admission: faults the regions in ahead of the first writes.
    pub(super) prefault: Mutex<Option<JoinHandle<()>>>,
    /// Writers to cut off, each with where to report how many connections were cut
    /// (`fence.rs`); served by the receive loop.
    pub(super) isolations: Mutex<Vec<Isolation>>,
    /// The receive loop has closed every connection and returned.
    pub(super) loop_ended: AtomicBool,
    /// The CRC-32C kernel of the GPU whose context copies device regions, made for the
    /// first checksummed call into them (or why it cannot be).
    pub(super) crc: OnceLock<Result<Arc<CrcKernel>, String>>,
}

/// A request to the receive loop (`fence.rs`): close `writer`'s connections and report how
/// many.
pub(super) struct Isolation {
    pub(super) writer: String,
    pub(super) done: std::sync::mpsc::Sender<usize>,
}
