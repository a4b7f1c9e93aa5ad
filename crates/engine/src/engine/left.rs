//! Peers that left: a connected peer whose link stopped being usable is reported once per
//! connection to the engine's listener ([`Engine::on_peer_left`]), whether the link broke
//! on its own (the peer's process died or closed its communicator, the connection was lost,
//! a write failed) or the engine tore it down (a call timed out, a call was aborted,
//! [`Engine::cancel_peer`]). A connection this side ends itself is not reported: `close`,
//! a `connect` that replaces it, a connect given up ([`Engine::abandon_connect`]).

use super::Engine;
use crate::error::Error;
use crate::transport::BreakHook;
use crate::util::lock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A connected peer whose link stopped being usable: `connect` again to write to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLeft {
    /// The peer's key (`host:port`, as connected).
    pub peer: String,
    /// The stable code of why: `ERR_PEER_DISCONNECTED` (the peer's process went away or
    /// the connection was lost), `ERR_TIMEOUT` (a call timed out), `ERR_ABORTED` (a call
    /// was aborted, or `cancel_peer`), or the transport's error (`ERR_RDMA_COMPLETION`,
    /// `ERR_PROTOCOL`, ...).
    pub code: &'static str,
    /// What happened, in a sentence.
    pub reason: String,
}

/// Receives [`PeerLeft`] reports, on whichever thread found the link gone.
pub type PeerLeftSink = Arc<dyn Fn(PeerLeft) + Send + Sync>;

/// The engine's listener, shared by the reports of every connection.
pub(super) type LeftSlot = Arc<Mutex<Option<PeerLeftSink>>>;

/// One connection's report: made before its link is opened (the link's break hook holds
/// it), delivered at most once.
pub(super) struct LeftReport {
    key: Arc<str>,
    settled: AtomicBool,
    slot: LeftSlot,
}

impl LeftReport {
    pub fn new(key: &str, slot: &LeftSlot) -> Arc<LeftReport> {
        Arc::new(LeftReport {
            key: key.into(),
            settled: AtomicBool::new(false),
            slot: Arc::clone(slot),
        })
    }

    /// What the link calls when it breaks on its own: reports its error.
    pub fn hook(self: &Arc<Self>) -> BreakHook {
        let report = Arc::clone(self);
        Arc::new(move |error: &Error| report.report(error.code(), error.to_string()))
    }

    /// Reports that the peer left (`code`, `reason`), unless this connection already was
    /// reported or silenced.
    pub fn report(&self, code: &'static str, reason: String) {
        if self.settled.swap(true, Ordering::SeqCst) {
            return;
        }
        crate::log::debug!("peer {} left: {reason}", self.key);
        let sink = lock(&self.slot).clone();
        if let Some(sink) = sink {
            sink(PeerLeft {
                peer: self.key.to_string(),
                code,
                reason,
            });
        }
    }

    /// This side ends the connection itself: nothing is reported for it.
    pub fn silence(&self) {
        self.settled.store(true, Ordering::SeqCst);
    }
}

impl Engine {
    /// Where reports of peers that left go (`None`: nowhere). See [`PeerLeft`]; a
    /// connection is reported once, on the thread that found its link gone.
    pub fn on_peer_left(&self, sink: Option<PeerLeftSink>) {
        *lock(&self.inner.peer_left) = sink;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_reported_once_and_never_after_it_was_silenced() {
        let slot: LeftSlot = Arc::default();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink: PeerLeftSink = {
            let seen = Arc::clone(&seen);
            Arc::new(move |left: PeerLeft| lock(&seen).push(left))
        };
        *lock(&slot) = Some(sink);
        let report = LeftReport::new("10.0.0.2:5555", &slot);
        let hook = report.hook();
        hook(&Error::PeerDisconnected {
            peer: "10.0.0.2:5555".into(),
            reason: "connection lost".into(),
        });
        report.report("ERR_ABORTED", "later".into());
        hook(&Error::Aborted);
        let silenced = LeftReport::new("10.0.0.3:5555", &slot);
        silenced.silence();
        silenced.hook()(&Error::Closed);
        let seen = lock(&seen);
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].peer, "10.0.0.2:5555");
        assert_eq!(seen[0].code, "ERR_PEER_DISCONNECTED");
        assert!(seen[0].reason.contains("connection lost"), "{seen:?}");
    }
}
