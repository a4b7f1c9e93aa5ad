//! Warm re-attach (the sidecar): the memory under this engine's imported host regions is
//! parked while no worker owns it and swapped for a restarted worker's, at the same
//! addresses, so the engine's links and peers stay as they are. A transport whose NIC
//! translated the old pages follows (`Transport::follow_pages`: RDMA registers the regions
//! again); its writers then take the new keys (`region_keys` here, `rekey` on their side)
//! before their fences are lifted.

use super::Engine;
use crate::error::{Error, Result};
use crate::import::ImportSpec;
use crate::transport::TransportKind;
use std::sync::atomic::Ordering;

impl Engine {
    /// Why this engine's region memory cannot be swapped (`ERR_UNSUPPORTED`): a region
    /// that was not imported as host memory, or a transport whose peers hold translations
    /// of the pages that it cannot renew (NVLink's mappings). `None`: it can.
    pub fn swap_refusal(&self) -> Option<Error> {
        let imports = self.inner.table.imports();
        let regions = self.inner.table.regions().len();
        if imports.len() != regions || imports.iter().any(|i| !i.is_host()) {
            return Some(Error::Unsupported {
                what: "a warm re-attach",
                reason: format!(
                    "here: {} of {regions} regions are imported host memory; every region must be shared as a host-memory descriptor (fd)",
                    imports.iter().filter(|i| i.is_host()).count()
                ),
            });
        }
        let refusals: Vec<String> = self
            .inner
            .transports
            .iter()
            .filter_map(|t| t.swap_refusal())
            .collect();
        if refusals.is_empty() {
            return None;
        }
        Some(Error::Unsupported {
            what: "a warm re-attach",
            reason: format!(
                "{} (use transport 'tcp' or 'rdma' for warm re-attach)",
                refusals.join("; ")
            ),
        })
    }

    /// Parks every imported region on private anonymous pages (zeros) at the same
    /// address: the owner's memory is released, and nothing lands in it any more (a
    /// transport's registrations of the old pages are released first).
    pub fn park_imports(&self) -> Result<()> {
        if let Some(refusal) = self.swap_refusal() {
            return Err(refusal);
        }
        for transport in &self.inner.transports {
            transport.follow_pages(true)?;
        }
        for import in self.inner.table.imports() {
            import.park()?;
        }
        Ok(())
    }

    /// Maps `specs` (one per region, in import order; `name` and index name each in
    /// errors) under the regions, at their addresses, and has every transport follow
    /// (RDMA: registered again, with new keys for the writers: [`Engine::region_keys`]).
    /// Every spec is checked before any is mapped: a refusal maps nothing.
    pub fn swap_imports(&self, specs: Vec<(&'static str, usize, ImportSpec)>) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        if let Some(refusal) = self.swap_refusal() {
            return Err(refusal);
        }
        let imports = self.inner.table.imports();
        if specs.len() != imports.len() {
            return Err(Error::invalid(
                "regions",
                format!(
                    "{} regions given; the attached communicator has {} (a re-attach keeps every region)",
                    specs.len(),
                    imports.len()
                ),
            ));
        }
        let checked = imports
            .iter()
            .zip(specs)
            .map(|(import, (name, index, spec))| import.check_swap(name, index, spec))
            .collect::<Result<Vec<_>>>()?;
        for (import, checked) in imports.iter().zip(checked) {
            import.swap(checked)?;
        }
        for transport in &self.inner.transports {
            transport.follow_pages(false)?;
        }
        Ok(())
    }

    /// What this side's writers need after a swap to reach its regions again, per
    /// transport that needs anything (RDMA: the new region keys of every rail): each goes
    /// to every writer, whose engine applies it with [`Engine::rekey`]. Empty while parked.
    pub fn region_keys(&self) -> Vec<(TransportKind, Vec<u8>)> {
        self.inner
            .transports
            .iter()
            .filter_map(|t| t.region_keys().map(|keys| (t.kind(), keys)))
            .collect()
    }

    /// Writing side: the receiver `peer_key` swapped its memory (warm re-attach) and sent
    /// `keys` for its `transport`: the link to it takes them, so every write from now on
    /// reaches the new memory. Returns how many rail pairs were updated (0: no link of
    /// that transport to that peer, or one that needs no keys). A link that cannot take
    /// them fails typed (`ERR_PROTOCOL` for keys that do not fit it, `ERR_PEER_DISCONNECTED`
    /// for a broken link) and keeps its old keys.
    pub fn rekey(&self, peer_key: &str, transport: TransportKind, keys: &[u8]) -> Result<usize> {
        self.check_open()?;
        match self.inner.peers.get(peer_key) {
            Some(peer) if peer.link.kind() == transport => peer.link.rekey(keys),
            _ => Ok(0),
        }
    }
}
