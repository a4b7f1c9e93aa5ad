//! The engine-facing handle of a sending connection.

use super::keys::RegionKeys;
use super::state::{Command, RailInfo, Shared};
use crate::error::Error;
use crate::transport::{fail, Link, RailReport, Resources, TransportKind, WriteJob};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

/// Engine-facing handle of a sending connection; the progress thread holds its state.
pub(crate) struct RdmaLink {
    pub(super) id: u64,
    pub(super) peer: String,
    pub(super) shared: Arc<Shared>,
    pub(super) alive: Arc<AtomicBool>,
    /// Held for the whole removal, so that a concurrent `shutdown`/`cancel` returns only
    /// once the queue pairs are destroyed too.
    pub(super) removed: Mutex<bool>,
    /// The rail pairs, with their counters.
    pub(super) rails: Vec<RailInfo>,
    /// Local rails the acceptor did not pair: device, port, and why.
    pub(super) refused: Vec<(String, u8, String)>,
    /// The queue pairs and buffers this link created.
    pub(super) held: Resources,
}

impl RdmaLink {
    fn remove(&self, error: Option<Error>) {
        let mut removed = crate::util::lock(&self.removed);
        if *removed {
            return;
        }
        *removed = true;
        self.alive.store(false, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel();
        self.shared.send(Command::RemoveSender(self.id, error, tx));
        // The progress thread answers once the queue pairs are destroyed (no DMA can follow)
        // and the jobs failed; if it already stopped (engine shutdown), the sender is
        // dropped and recv returns at once. Waits without bound: a caller that reports a
        // timeout must not do so while a write may still land.
        let _ = rx.recv();
    }
}

impl Link for RdmaLink {
    fn submit(&self, job: WriteJob) {
        if !self.alive.load(Ordering::SeqCst) {
            return fail(
                job.done,
                Error::PeerDisconnected {
                    peer: self.peer.clone(),
                    reason: "the RDMA connection is broken; connect again".into(),
                },
            );
        }
        self.shared.send(Command::Submit(self.id, job));
    }

    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    fn shutdown(&self) {
        self.remove(None);
    }

    fn cancel(&self, error: Error) {
        self.remove(Some(error));
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }

    /// Replaces the peer's region keys on every rail pair (`rekey.rs`), on the progress
    /// thread: once this returns, every chain filled carries the new keys.
    fn rekey(&self, keys: &[u8]) -> crate::error::Result<usize> {
        let keys = RegionKeys::decode(keys)
            .map_err(|e| Error::protocol(&self.peer, format!("its new region keys: {}", e.0)))?;
        if !self.alive.load(Ordering::SeqCst) {
            return Err(Error::PeerDisconnected {
                peer: self.peer.clone(),
                reason: "the RDMA connection is broken; connect again".into(),
            });
        }
        let (tx, rx) = mpsc::channel();
        self.shared.send(Command::Rekey(self.id, keys, tx));
        rx.recv().unwrap_or(Err(Error::Closed))
    }

    fn resources(&self) -> Resources {
        self.held
    }

    /// The receiver answers a call that asks (`answer.rs`). It cannot see which bytes a
    /// call wrote: a checksummed call's notice carries its landing (`notice.rs`), from
    /// which the receiver finds and sums them (`verify.rs`).
    fn receiver_checks(&self) -> crate::transport::ReceiverChecks {
        crate::transport::ReceiverChecks {
            verifies_checksums: true,
            sums_gpu_memory: false,
            link_sums_gpu_sources: false,
            answers_acked_calls: true,
            landing_limit: Some(super::notice::MAX_LANDING_BYTES),
        }
    }

    fn rails(&self) -> Vec<RailReport> {
        let load = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
        let mut out: Vec<RailReport> = self
            .rails
            .iter()
            .map(|rail| {
                let c = &rail.counters;
                let state = c.state();
                RailReport {
                    local: rail.local.clone(),
                    port: rail.port,
                    remote: rail.remote.clone(),
                    state: state.name(),
                    gid: rail.gid.clone(),
                    peer_gid: rail.peer_gid.clone(),
                    gid_index: Some(rail.gid_index),
                    gid_reason: rail.gid_reason.clone(),
                    speed_mbps: rail.speed_mbps,
                    bytes: load(&c.bytes),
                    wrs: load(&c.wrs),
                    failures: load(&c.failures),
                    quarantines: load(&c.quarantines),
                    rejoins: load(&c.rejoins),
                    answers: load(&c.answers),
                    stray_answers: load(&c.stray_answers),
                    reason: c.reason(),
                }
            })
            .collect();
        out.extend(self.refused.iter().map(|(local, port, why)| RailReport {
            local: local.clone(),
            port: *port,
            remote: String::new(),
            state: "refused",
            gid: String::new(),
            peer_gid: String::new(),
            gid_index: None,
            gid_reason: String::new(),
            speed_mbps: 0,
            bytes: 0,
            wrs: 0,
            failures: 0,
            quarantines: 0,
            rejoins: 0,
            answers: 0,
            stray_answers: 0,
            reason: Some(why.clone()),
        }));
        out
    }
}
