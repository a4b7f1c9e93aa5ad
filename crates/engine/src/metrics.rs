//! Per-engine counters: totals and per peer, kept with relaxed atomics (no lock on the
//! write path: a connected peer's counters hang off its registry entry).
//!
//! What is counted where:
//! - Writing side (`writeCache`): bytes written (K and V of every block of a call that
//!   succeeded), blocks written, calls succeeded / failed (by error code, refused calls
//!   included), latency of succeeded calls (submit → completion) in a fixed log2 histogram
//!   of microseconds, arrival notices sent (tagged calls that succeeded), reconnects
//!   (a `connect` that replaced an existing link to the same peer).
//! - Receiving side: TCP counts every payload byte its receiver copied into the regions.
//!   RDMA writes are one-sided: the receiver's CPU never sees them, so it counts only what
//!   tagged calls' arrival notices announce (blocks × blockBytes × K/V); untagged RDMA
//!   calls are invisible to the receiver. Arrival notices received; dropped (malformed,
//!   or no one listening). The receiving side keys its peers by their `name`.
//!
//! Which peers have counters of their own: only peers a link was opened with (the writing
//! side's `connect`, the receiving side's accepted writers), at most `MAX_PEERS` of
//! them. Everything else (a call refused because its peer was never connected, which can
//! name any string; anything beyond the bound) counts in the totals and in the engine's
//! `untracked` counters, so that no caller can create a per-peer series by a typo.

use crate::error::{Error, ERROR_CODES};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Latency buckets: bucket `i` counts latencies of at most `2^i` µs (1 µs .. ~35 min);
/// the last one is everything above.
pub const LATENCY_BUCKETS: usize = 32;

/// Peers tracked individually; beyond this, calls count in the totals and the untracked
/// counters only (receivers key peers by a name the writer chose, and a misbehaving peer
/// must not grow memory without bound).
const MAX_PEERS: usize = 4096;

/// Upper bound (µs) of latency bucket `i` (`None` for the last: +Inf).
pub fn bucket_upper_us(i: usize) -> Option<u64> {
    (i + 1 < LATENCY_BUCKETS).then(|| 1u64 << i)
}

fn bucket_of(us: u64) -> usize {
    if us <= 1 {
        return 0;
    }
    // ceil(log2(us))
    let bucket = (64 - (us - 1).leading_zeros()) as usize;
    bucket.min(LATENCY_BUCKETS - 1)
}

/// One set of counters (the totals, or one peer's).
#[derive(Debug)]
pub struct Counters {
    bytes_written: AtomicU64,
    bytes_received: AtomicU64,
    blocks_written: AtomicU64,
    calls_succeeded: AtomicU64,
    calls_failed: AtomicU64,
    failures: [AtomicU64; ERROR_CODES.len()],
    latency: [AtomicU64; LATENCY_BUCKETS],
    latency_sum_us: AtomicU64,
    notices_sent: AtomicU64,
    notices_received: AtomicU64,
    notices_dropped: AtomicU64,
    checksum_mismatches: AtomicU64,
    reconnects: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            bytes_written: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            blocks_written: AtomicU64::new(0),
            calls_succeeded: AtomicU64::new(0),
            calls_failed: AtomicU64::new(0),
            failures: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_us: AtomicU64::new(0),
            notices_sent: AtomicU64::new(0),
            notices_received: AtomicU64::new(0),
            notices_dropped: AtomicU64::new(0),
            checksum_mismatches: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        }
    }
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    fn succeeded(&self, bytes: u64, blocks: u64, latency: Duration, tagged: bool) {
        add(&self.bytes_written, bytes);
        add(&self.blocks_written, blocks);
        add(&self.calls_succeeded, 1);
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        add(&self.latency[bucket_of(us)], 1);
        add(&self.latency_sum_us, us);
        if tagged {
            add(&self.notices_sent, 1);
        }
    }

    fn failed(&self, code_index: usize) {
        add(&self.calls_failed, 1);
        add(&self.failures[code_index], 1);
    }

    pub fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            bytes_written: get(&self.bytes_written),
            bytes_received: get(&self.bytes_received),
            blocks_written: get(&self.blocks_written),
            calls_succeeded: get(&self.calls_succeeded),
            calls_failed: get(&self.calls_failed),
            failures_by_code: ERROR_CODES
                .iter()
                .zip(&self.failures)
                .map(|(code, n)| (*code, get(n)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            latency_buckets: self.latency.each_ref().map(get),
            latency_sum_us: get(&self.latency_sum_us),
            notices_sent: get(&self.notices_sent),
            notices_received: get(&self.notices_received),
            notices_dropped: get(&self.notices_dropped),
            checksum_mismatches: get(&self.checksum_mismatches),
            reconnects: get(&self.reconnects),
        }
    }
}

/// A copy of one set of counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Bytes written by calls that succeeded, over every region of their blocks.
    pub bytes_written: u64,
    /// Payload bytes that landed in this side's regions (RDMA: only what tagged calls'
    /// arrival notices announce).
    pub bytes_received: u64,
    /// Blocks written by calls that succeeded.
    pub blocks_written: u64,
    /// Write calls that succeeded.
    pub calls_succeeded: u64,
    /// Write calls that were refused or failed (by code in `failures_by_code`).
    pub calls_failed: u64,
    /// Codes with a non-zero count, in `ERROR_CODES` order.
    pub failures_by_code: Vec<(&'static str, u64)>,
    /// Succeeded calls per latency bucket ([`bucket_upper_us`]).
    pub latency_buckets: [u64; LATENCY_BUCKETS],
    /// Sum of the succeeded calls' latencies (submit → completion), in microseconds.
    pub latency_sum_us: u64,
    /// Arrival notices sent (tagged calls that succeeded).
    pub notices_sent: u64,
    /// Arrival notices received from writers.
    pub notices_received: u64,
    /// Arrival notices dropped on receipt (malformed, or no one listening).
    pub notices_dropped: u64,
    /// Arrivals whose bytes in this side's memory did not have the writer's checksum.
    pub checksum_mismatches: u64,
    /// `connect` calls that replaced an existing link to the same peer.
    pub reconnects: u64,
}

impl Snapshot {
    /// The latency (ms) below which fraction `q` of succeeded calls fall, as the upper
    /// bound of the bucket holding that rank (0 when no call succeeded).
    pub fn latency_quantile_ms(&self, q: f64) -> f64 {
        let count: u64 = self.latency_buckets.iter().sum();
        if count == 0 {
            return 0.0;
        }
        let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0;
        for (i, n) in self.latency_buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let upper = bucket_upper_us(i).unwrap_or(1u64 << (LATENCY_BUCKETS - 1));
                return upper as f64 / 1000.0;
            }
        }
        0.0
    }
}

/// One peer's counters and the transport last used with it.
#[derive(Debug, Default)]
pub struct PeerCounters {
    counters: Counters,
    /// `TransportKind::code()` of the last link (0: none yet, e.g. refused calls only).
    transport: AtomicU8,
}

impl PeerCounters {
    pub fn transport_code(&self) -> u8 {
        self.transport.load(Ordering::Relaxed)
    }
}

/// An engine's counters: totals, per peer, and those of calls to no tracked peer.
#[derive(Debug, Default)]
pub struct Metrics {
    total: Counters,
    untracked: Counters,
    peers: RwLock<HashMap<String, Arc<PeerCounters>>>,
}

/// A copy of an engine's counters (see `Engine::metrics`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshots {
    /// Every call and notice of the engine.
    pub total: Snapshot,
    /// What no tracked peer counts: calls to peers never connected, and anything beyond
    /// `MAX_PEERS` peers. `total` is `untracked` plus the sum over `peers`.
    pub untracked: Snapshot,
    /// Each tracked peer's key, `TransportKind::code()` of its last link and counters,
    /// sorted by key.
    pub peers: Vec<(String, u8, Snapshot)>,
}

/// The counters a call reports to: the totals, and the peer's when tracked (else the
/// untracked ones).
#[derive(Clone)]
pub struct CallCounters {
    metrics: Arc<Metrics>,
    peer: Option<Arc<PeerCounters>>,
}

impl CallCounters {
    fn each(&self, visit: impl Fn(&Counters)) {
        visit(&self.metrics.total);
        match &self.peer {
            Some(peer) => visit(&peer.counters),
            None => visit(&self.metrics.untracked),
        }
    }

    /// A call that succeeded: `bytes` moved (K and V), `blocks` blocks, `latency`.
    pub fn succeeded(&self, bytes: u64, blocks: u64, latency: Duration, tagged: bool) {
        self.each(|c| c.succeeded(bytes, blocks, latency, tagged));
    }

    /// A call that was refused or failed with `error`.
    pub fn failed(&self, error: &Error) {
        self.failed_code(error.code());
    }

    /// A call that was refused or failed with `code` (an `ERROR_CODES` entry; anything
    /// else counts as `ERR_INVALID_ARGUMENT`).
    pub fn failed_code(&self, code: &str) {
        let index = ERROR_CODES
            .iter()
            .position(|c| *c == code)
            .or_else(|| {
                ERROR_CODES
                    .iter()
                    .position(|c| *c == "ERR_INVALID_ARGUMENT")
            })
            .unwrap_or(0);
        self.each(|c| c.failed(index));
    }

    /// Payload bytes that landed in this side's regions.
    pub fn received(&self, bytes: u64) {
        self.each(|c| add(&c.bytes_received, bytes));
    }

    pub fn notice_received(&self) {
        self.each(|c| add(&c.notices_received, 1));
    }

    pub fn notice_dropped(&self) {
        self.each(|c| add(&c.notices_dropped, 1));
    }

    /// An arrival failed its checksum (`ERR_CHECKSUM_MISMATCH`).
    pub fn checksum_mismatch(&self) {
        self.each(|c| add(&c.checksum_mismatches, 1));
    }

    pub fn reconnected(&self) {
        self.each(|c| add(&c.reconnects, 1));
    }
}

impl Metrics {
    /// The counters of `peer` when it is tracked (a link was opened with it), else the
    /// untracked ones: a call can name any peer, and must not create counters.
    pub fn peer(self: &Arc<Self>, peer: &str) -> CallCounters {
        CallCounters {
            metrics: Arc::clone(self),
            peer: crate::util::read(&self.peers).get(peer).cloned(),
        }
    }

    /// The counters of `peer`, created when new while fewer than `MAX_PEERS` exist (only
    /// for a peer a link was opened with).
    fn track(self: &Arc<Self>, peer: &str) -> CallCounters {
        let found = crate::util::read(&self.peers).get(peer).cloned();
        let peer = found.or_else(|| {
            let mut peers = crate::util::write(&self.peers);
            if let Some(existing) = peers.get(peer) {
                return Some(Arc::clone(existing));
            }
            (peers.len() < MAX_PEERS).then(|| {
                let counters = Arc::new(PeerCounters::default());
                peers.insert(peer.to_string(), Arc::clone(&counters));
                counters
            })
        });
        CallCounters {
            metrics: Arc::clone(self),
            peer,
        }
    }

    /// A link to `peer` over `transport_code` was opened: a reconnect when one was before.
    pub fn connected(self: &Arc<Self>, peer: &str, transport_code: u8) -> CallCounters {
        let counters = self.track(peer);
        if let Some(p) = &counters.peer {
            if p.transport.swap(transport_code, Ordering::Relaxed) != 0 {
                counters.reconnected();
            }
        }
        counters
    }

    /// Receiving side: the counters of the writer named `peer`, over `transport_code`.
    pub fn connected_receiver(self: &Arc<Self>, peer: &str, transport_code: u8) -> CallCounters {
        let counters = self.track(peer);
        if let Some(p) = &counters.peer {
            p.transport.store(transport_code, Ordering::Relaxed);
        }
        counters
    }

    /// Totals, untracked, and every tracked peer (sorted by key).
    pub fn snapshot(&self) -> Snapshots {
        let mut peers: Vec<(String, u8, Snapshot)> = crate::util::read(&self.peers)
            .iter()
            .map(|(key, p)| (key.clone(), p.transport_code(), p.counters.snapshot()))
            .collect();
        peers.sort_by(|a, b| a.0.cmp(&b.0));
        Snapshots {
            total: self.total.snapshot(),
            untracked: self.untracked.snapshot(),
            peers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_of_microseconds() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 0);
        assert_eq!(bucket_of(2), 1);
        assert_eq!(bucket_of(3), 2);
        assert_eq!(bucket_of(1024), 10);
        assert_eq!(bucket_of(1025), 11);
        assert_eq!(bucket_of(u64::MAX), LATENCY_BUCKETS - 1);
        assert_eq!(bucket_upper_us(10), Some(1024));
        assert_eq!(bucket_upper_us(LATENCY_BUCKETS - 1), None);
    }

    #[test]
    fn counts_totals_and_peers_and_quantiles() {
        let metrics = Arc::new(Metrics::default());
        let a = metrics.connected("a:1", 1);
        for _ in 0..99 {
            a.succeeded(2048, 2, Duration::from_micros(100), false);
        }
        a.succeeded(2048, 2, Duration::from_millis(50), true);
        a.failed(&Error::Closed);
        metrics.peer("b:2").failed_code("ERR_TIMEOUT");
        metrics.peer("b:2").failed_code("not a code");
        let b = metrics.connected_receiver("b:2", 2);
        b.failed_code("ERR_TIMEOUT");
        b.failed_code("not a code");
        let Snapshots {
            total,
            untracked,
            peers,
        } = metrics.snapshot();
        assert_eq!(total.bytes_written, 100 * 2048);
        assert_eq!(total.blocks_written, 200);
        assert_eq!(total.calls_succeeded, 100);
        assert_eq!(total.calls_failed, 5);
        assert_eq!(total.notices_sent, 1);
        assert_eq!(
            total.failures_by_code.iter().map(|(_, n)| n).sum::<u64>(),
            5
        );
        // Calls to "b:2" before any link with it created no counters of its own.
        assert_eq!(untracked.calls_failed, 2);
        assert_eq!(untracked.calls_succeeded, 0);
        assert_eq!(total.latency_quantile_ms(0.5), 0.128);
        assert_eq!(total.latency_quantile_ms(0.99), 0.128);
        assert_eq!(total.latency_quantile_ms(1.0), 65.536);
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].0, "a:1");
        assert_eq!(peers[0].1, 1);
        assert_eq!(peers[0].2.calls_failed, 1);
        assert_eq!(peers[1].1, 2);
        let expected: Vec<(&str, u64)> = ERROR_CODES
            .iter()
            .filter(|c| **c == "ERR_INVALID_ARGUMENT" || **c == "ERR_TIMEOUT")
            .map(|c| (*c, 1))
            .collect();
        assert_eq!(peers[1].2.failures_by_code, expected);
        assert_eq!(untracked.failures_by_code, expected);
    }

    #[test]
    fn calls_to_unknown_peers_create_no_counters_and_peers_are_bounded() {
        let metrics = Arc::new(Metrics::default());
        for i in 0..10 {
            metrics
                .peer(&format!("typo-{i}:1"))
                .failed_code("ERR_NOT_CONNECTED");
        }
        for i in 0..MAX_PEERS + 3 {
            metrics
                .connected_receiver(&format!("writer-{i}"), 1)
                .received(1);
        }
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.peers.len(), MAX_PEERS);
        assert!(snapshot
            .peers
            .iter()
            .all(|(key, code, _)| *code == 1 && key.starts_with("writer-")));
        assert_eq!(snapshot.untracked.calls_failed, 10);
        assert_eq!(snapshot.untracked.bytes_received, 3);
        assert_eq!(snapshot.total.bytes_received, MAX_PEERS as u64 + 3);
        assert_eq!(snapshot.total.calls_failed, 10);
    }
}
