//! What a transport says about itself, so that the engine can explain a choice without
//! knowing any transport: a phrase for sentences, why `auto` takes it, and typed details
//! for reports (`peerInfo`, `doctor`).

use super::TransportDetails;

/// A transport's account of itself (see `Transport::explain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// What this side uses, as a phrase (`rxe0 port 1, GID index 1 (RoCE, 10.77.0.1), MTU
    /// 1024, 2 QPs`).
    pub summary: String,
    /// Why `auto` takes this transport once the peer accepted it; None for the transport
    /// that is taken only when nothing better is (TCP: its reason is why the others were
    /// not).
    pub chosen_because: Option<&'static str>,
    /// The same facts, typed.
    pub details: TransportDetails,
}

impl Explanation {
    /// The details as `(key, value)` pairs, for reports that print them.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        self.details.fields()
    }
}
