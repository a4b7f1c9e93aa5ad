//! What the data listener and its receivers share: the admissions handed out in
//! handshakes and the server's state. A leaf, so that the listener (which starts
//! receivers) and the receivers (which read it) do not import each other.

use crate::layout::RegionTable;
use crate::transport::ArrivalSink;
use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};

/// A session token handed out in a handshake reply, admitting one data connection.
#[derive(Debug, Clone)]
pub(super) struct Admission {
    pub(super) peer_name: String,
}

pub(super) struct ServerState {
    pub(super) table: Arc<RegionTable>,
    pub(super) admissions: Mutex<HashMap<u64, Admission>>,
    pub(super) connections: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
    pub(super) closed: AtomicBool,
    pub(super) arrivals: Option<ArrivalSink>,
    /// Counts received payload bytes per writer (by name).
    pub(super) metrics: Arc<crate::metrics::Metrics>,
    /// Started by the first admission: faults the regions in ahead of the first writes.
    pub(super) prefault: Mutex<Option<JoinHandle<()>>>,
    /// Which writer each admitted receiver thread receives from (`fence.rs`).
    pub(super) writers: Mutex<HashMap<ThreadId, String>>,
}
