//! Why a peer is reached over its transport: a sentence built on the connecting side from
//! what this side offered and what the acceptor chose, plus the details of that transport
//! (device, port, GID, MTU, QPs for RDMA). `auto` logs it once per peer at info level.
//! The acceptor's side of it: the note its reply carries on the offers it passed over.

use super::Engine;
use crate::config::TransportChoice;
use crate::transport::TransportKind;
use crate::wire::{Descriptor, Endpoint, MAX_NOTE_BYTES, NOTE_KIND};

/// The transport chosen with a peer and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportDecision {
    pub transport: TransportKind,
    /// One sentence, starting with the transport's name.
    pub reason: String,
    /// What the transport uses on this side (device, port, gidIndex, gid, mtu, ...).
    pub details: Vec<(&'static str, String)>,
}

/// `device rxe0 port 1, GID index 1 (RoCE, 10.77.0.1), MTU 1024, 2 QPs` from RDMA details.
fn rdma_summary(details: &[(&'static str, String)]) -> String {
    let get = |key: &str| {
        details
            .iter()
            .find(|(k, _)| *k == key)
            .map_or("?", |(_, v)| v.as_str())
    };
    format!(
        "{} port {}, GID index {} ({}, {}), MTU {}, {} QPs",
        get("device"),
        get("port"),
        get("gidIndex"),
        get("linkLayer"),
        get("gid"),
        get("mtu"),
        get("qpsPerPeer")
    )
}

impl Engine {
    /// Connecting side: records (and under `auto`, logs once) why `peer_key` is reached
    /// over `chosen`; `note` is the acceptor's own account of the offers it passed over
    /// (sent in its reply).
    pub(super) fn record_decision(
        &self,
        peer_key: &str,
        chosen: TransportKind,
        note: Option<String>,
    ) {
        let details = self.transport_details(chosen).unwrap_or_default();
        let auto = self.inner.choice == TransportChoice::Auto;
        let rdma_here = self.transport_details(TransportKind::Rdma).is_some();
        let rdma_unusable = self
            .inner
            .unusable
            .iter()
            .find(|(kind, _)| *kind == TransportKind::Rdma)
            .map(|(_, reason)| reason.as_str());
        let reason = match (chosen, auto) {
            (TransportKind::Nvlink, true) => format!(
                "nvlink: both processes run on this host, every region on both sides is GPU memory and the GPUs reach each other; {}",
                details
                    .iter()
                    .find(|(k, _)| *k == "gpu")
                    .map_or("?", |(_, v)| v.as_str())
            ),
            (TransportKind::Rdma, true) => format!(
                "rdma: both sides offered RDMA and the peer accepted this side's endpoint; {}",
                rdma_summary(&details)
            ),
            (TransportKind::Rdma, false) => format!(
                "rdma: chosen explicitly (the transport option or KVCACHE_TRANSPORT; no fallback); {}",
                rdma_summary(&details)
            ),
            (other, false) => format!(
                "{}: chosen explicitly (the transport option or KVCACHE_TRANSPORT; no fallback)",
                other.name()
            ),
            (other, true) if rdma_here => format!(
                "{}: this side offered RDMA ({}) but the peer declined it: {}",
                other.name(),
                rdma_summary(&self.transport_details(TransportKind::Rdma).unwrap_or_default()),
                note.as_deref().unwrap_or("it has no usable RDMA device, or its RDMA cannot serve this side's endpoint (KVCACHE_DEBUG=1 on the peer logs why)")
            ),
            (other, true) => format!(
                "{}: RDMA is not usable on this side ({})",
                other.name(),
                rdma_unusable.unwrap_or("not opened")
            ),
        };
        // With GPU regions here, why NVLink (preferred over everything) was not taken.
        let reason = match self.nvlink_passed_over(chosen, auto) {
            Some(why) => {
                let rest = reason
                    .strip_prefix(&format!("{}: ", chosen.name()))
                    .unwrap_or(&reason);
                format!("{}: {why}; {rest}", chosen.name())
            }
            None => reason,
        };
        // The acceptor's account, where the sentence above does not carry it already.
        let reason = match note {
            Some(note) if !reason.contains(&note) => format!("{reason}; the peer: {note}"),
            _ => reason,
        };
        let first = {
            let mut decisions = self
                .inner
                .decisions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let first = !decisions.contains_key(peer_key);
            decisions.insert(
                peer_key.to_string(),
                TransportDecision {
                    transport: chosen,
                    reason: reason.clone(),
                    details,
                },
            );
            first
        };
        if auto && first {
            crate::log_info!(
                "engine {}: transport with {peer_key}: {reason}",
                self.inner.name()
            );
        }
    }

    /// Under `auto`, when this side's regions are GPU memory and another transport was
    /// chosen: why NVLink was not (unusable here, or offered and declined by the peer,
    /// whose note then says why). None where NVLink was never in question (host memory).
    fn nvlink_passed_over(&self, chosen: TransportKind, auto: bool) -> Option<String> {
        if !auto || chosen == TransportKind::Nvlink || self.inner.table.gpu().is_none() {
            return None;
        }
        let unusable = self
            .inner
            .unusable
            .iter()
            .find(|(kind, _)| *kind == TransportKind::Nvlink);
        Some(match unusable {
            Some((_, reason)) => format!("NVLink is not usable on this side ({reason})"),
            None => "this side offered NVLink but the peer declined it".to_string(),
        })
    }

    /// Why `peer_key` (a peer this side connected to) is reached over its transport.
    pub fn transport_decision(&self, peer_key: &str) -> Option<TransportDecision> {
        self.inner
            .decisions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer_key)
            .cloned()
    }

    /// Accepting side: the note for the reply, saying why each transport the peer offered
    /// and prefers over `chosen` was not taken (none: nothing was passed over).
    pub(super) fn declined_note(
        &self,
        chosen: TransportKind,
        remote: &Descriptor,
        declined: &[(TransportKind, String)],
    ) -> Option<Endpoint> {
        let passed_over = TransportKind::PREFERENCE
            .into_iter()
            .take_while(|kind| *kind != chosen)
            .filter(|kind| remote.endpoint(kind.code()).is_some());
        let reasons: Vec<String> = passed_over
            .map(|kind| {
                let unusable = self.inner.unusable.iter().find(|(k, _)| *k == kind);
                match (declined.iter().find(|(k, _)| *k == kind), unusable) {
                    (Some((_, why)), _) => format!("{}: {why}", kind.name()),
                    (None, Some((_, why))) => {
                        format!("{}: not usable on the acceptor ({why})", kind.name())
                    }
                    (None, None) => format!(
                        "{}: the acceptor uses only {} (its transport option or KVCACHE_TRANSPORT)",
                        kind.name(),
                        self.transport_names().join(", ")
                    ),
                }
            })
            .collect();
        if reasons.is_empty() {
            return None;
        }
        let mut note = reasons.join("; ");
        if note.len() > MAX_NOTE_BYTES {
            let mut end = MAX_NOTE_BYTES;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
        }
        Some(Endpoint {
            kind: NOTE_KIND,
            bytes: note.into_bytes(),
        })
    }
}
