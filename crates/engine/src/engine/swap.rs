//! Warm re-attach (the sidecar): the memory under this engine's imported regions (host
//! descriptors, cuMem GPU descriptors) is parked while no worker owns it and swapped for a
//! restarted worker's, at the same addresses, so the engine's links and peers stay as they
//! are. A transport whose peers translated the old memory follows
//! (`Transport::follow_pages`: RDMA registers the regions again; NVLink has its writers
//! drop their mappings and hands them the new descriptors); its writers then take what
//! they need (`region_keys` here, `rekey` on their side) before their fences are lifted.

use super::Engine;
use crate::error::{Error, Result};
use crate::import::ImportSpec;
use crate::transport::TransportKind;
use std::sync::atomic::Ordering;

impl Engine {
    /// Why this engine's region memory cannot be swapped (`ERR_UNSUPPORTED`): a region
    /// that was not imported (host memory or cuMem descriptors), one imported from a
    /// legacy CUDA IPC handle (mapped where the driver chooses), or a transport that
    /// cannot follow (RDMA over GPU regions). `None`: it can.
    pub fn swap_refusal(&self) -> Option<Error> {
        let imports = self.inner.table.imports();
        let regions = self.inner.table.regions().len();
        if imports.len() != regions {
            return Some(Error::Unsupported {
                what: "a warm re-attach",
                reason: format!(
                    "here: {} of {regions} regions are imported; every region must be shared with the sidecar (a host-memory descriptor, or cuMem descriptors for GPU memory)",
                    imports.len()
                ),
            });
        }
        let ipc = imports.iter().filter(|i| i.is_ipc()).count();
        if ipc > 0 {
            return Some(crate::import::ipc_refusal(&format!(
                "{ipc} of {regions} regions"
            )));
        }
        let device = imports.iter().any(|i| !i.is_host());
        let refusals: Vec<String> = self
            .inner
            .transports
            .iter()
            .filter_map(|t| t.swap_refusal(device))
            .collect();
        if refusals.is_empty() {
            return None;
        }
        Some(Error::Unsupported {
            what: "a warm re-attach",
            reason: refusals.join("; "),
        })
    }

    /// Parks every imported region at the same address (host: private anonymous pages;
    /// cuMem: one filler granule mapped all over): the owner's memory is released, and
    /// nothing lands in it any more (a transport's registrations or peers' mappings of the
    /// old memory are released first).
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
