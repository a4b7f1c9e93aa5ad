//! Why a peer is reached over its transport: a sentence built on the connecting side from
//! what this side offered, what the acceptor chose and what it declined, in the engine's
//! generic wording; each transport supplies its own phrase (`Transport::explain`). `auto`
//! logs it once per peer at info level. The acceptor's side: the declined offers its reply
//! carries.

use super::Engine;
use crate::config::TransportChoice;
use crate::transport::{Explanation, Transport, TransportKind};
use crate::wire::{Declined, Descriptor};

/// The transport chosen with a peer and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportDecision {
    /// The transport the link to the peer uses.
    pub transport: TransportKind,
    /// One sentence, starting with the transport's name.
    pub reason: String,
    /// What the transport uses on this side.
    pub explanation: Explanation,
}

/// When the acceptor passed an offer over without saying why (it always says; kept for a
/// reply that lists none).
const NO_REASON_GIVEN: &str = "the peer gave no reason (KVCACHE_DEBUG=1 on the peer logs why)";

/// The acceptor's reasons for offers the sentence does not tell already (`told`: their
/// kind codes), each as `the peer: <kind>: <reason>`.
fn untold_declined(declined: &[Declined], told: &[u8], parts: &mut Vec<String>) {
    for d in declined.iter().filter(|d| !told.contains(&d.kind)) {
        let kind = TransportKind::from_code(d.kind).map_or("?", TransportKind::name);
        parts.push(format!("the peer: {kind}: {}", d.reason));
    }
}

impl Engine {
    /// Connecting side: records (and under `auto`, logs once) why `peer_key` is reached
    /// over `chosen`; `declined` is the acceptor's account of the offers it passed over.
    pub(super) fn record_decision(
        &self,
        peer_key: &str,
        chosen: &dyn Transport,
        declined: &[Declined],
    ) {
        let kind = chosen.kind();
        let explanation = chosen.explain();
        let auto = self.inner.choice == TransportChoice::Auto;
        let reason = if auto {
            self.auto_reason(kind, &explanation, declined)
        } else {
            let mut parts = vec![format!(
                "chosen explicitly (the transport option or KVCACHE_TRANSPORT; no fallback); {}",
                explanation.summary
            )];
            untold_declined(declined, &[], &mut parts);
            format!("{}: {}", kind.name(), parts.join("; "))
        };
        let first = {
            let mut decisions = crate::util::lock(&self.inner.decisions);
            let first = !decisions.contains_key(peer_key);
            decisions.insert(
                peer_key.to_string(),
                TransportDecision {
                    transport: kind,
                    reason: reason.clone(),
                    explanation,
                },
            );
            first
        };
        if auto && first {
            crate::log::log_info!(
                "engine {}: transport with {peer_key}: {reason}",
                self.inner.name()
            );
        }
    }

    /// `auto`'s sentence: for each transport preferred over `chosen`, why it was not taken
    /// (not usable here, or offered and declined by the peer), then why `chosen` was.
    fn auto_reason(
        &self,
        chosen: TransportKind,
        explanation: &Explanation,
        declined: &[Declined],
    ) -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut told = Vec::new();
        for better in TransportKind::PREFERENCE
            .into_iter()
            .take_while(|kind| *kind != chosen)
        {
            if let Some(offered) = self.transport(better) {
                let why = declined
                    .iter()
                    .find(|d| d.kind == better.code())
                    .map_or_else(
                        || NO_REASON_GIVEN.to_string(),
                        |d| format!("{}: {}", better.name(), d.reason),
                    );
                told.push(better.code());
                parts.push(format!(
                    "this side offered {} ({}) but the peer declined it: {why}",
                    better.label(),
                    offered.explain().summary
                ));
            } else if let Some(unusable) = self
                .inner
                .unusable
                .iter()
                .find(|u| u.kind == better && u.in_question)
            {
                parts.push(format!(
                    "{} is not usable on this side ({})",
                    better.label(),
                    unusable.reason
                ));
            }
        }
        untold_declined(declined, &told, &mut parts);
        if let Some(because) = explanation.chosen_because {
            parts.push(format!("{because}; {}", explanation.summary));
        }
        if parts.is_empty() {
            parts.push(format!(
                "the only transport both sides have; {}",
                explanation.summary
            ));
        }
        format!("{}: {}", chosen.name(), parts.join("; "))
    }

    /// Why `peer_key` (a peer this side connected to) is reached over its transport.
    pub fn transport_decision(&self, peer_key: &str) -> Option<TransportDecision> {
        crate::util::lock(&self.inner.decisions)
            .get(peer_key)
            .cloned()
    }

    /// Accepting side: why each transport the peer offered and prefers over `chosen` was
    /// not taken (empty: nothing was passed over). `declined`: the offers this side's
    /// transports refused, with their reasons.
    pub(super) fn declined_offers(
        &self,
        chosen: TransportKind,
        remote: &Descriptor,
        declined: &[(TransportKind, String)],
    ) -> Vec<Declined> {
        TransportKind::PREFERENCE
            .into_iter()
            .take_while(|kind| *kind != chosen)
            .filter(|kind| remote.endpoint(kind.code()).is_some())
            .map(|kind| {
                let unusable = self.inner.unusable.iter().find(|u| u.kind == kind);
                let reason = match (declined.iter().find(|(k, _)| *k == kind), unusable) {
                    (Some((_, why)), _) => why.clone(),
                    (None, Some(unusable)) => {
                        format!("not usable on the acceptor ({})", unusable.reason)
                    }
                    (None, None) => format!(
                        "the acceptor uses only {} (its transport option or KVCACHE_TRANSPORT)",
                        self.transport_names().join(", ")
                    ),
                };
                Declined {
                    kind: kind.code(),
                    reason,
                }
            })
            .collect()
    }
}
