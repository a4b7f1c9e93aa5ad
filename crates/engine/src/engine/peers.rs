//! The peer registry: the links this engine writes through, by `host:port` key.

use super::left::LeftReport;
use crate::layout::CacheLayout;
use crate::metrics::CallCounters;
use crate::shard::Shard;
use crate::transport::Link;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

/// A connected peer: its cache layout and the link to it.
pub(super) struct Peer {
    /// The key it is registered under (`host:port`).
    pub key: Arc<str>,
    pub remote: CacheLayout,
    /// Which bytes of each block go where in the peer's (tensor-parallel shards).
    pub shard: Shard,
    pub link: Box<dyn Link>,
    /// Where its calls are counted (the peer's counters outlive reconnects).
    pub counters: Arc<CallCounters>,
    /// Reports, once, that this connection's link stopped being usable (`left.rs`).
    pub left: Arc<LeftReport>,
    /// Its calls handed to the link, with their tags, for fences (`fence.rs`).
    pub calls: super::fence::InFlight,
    /// Whether the registry holds it under `key` (set by the registry only): a prepared
    /// list keeps its peer and skips the lookup while this holds.
    registered: AtomicBool,
}

impl Peer {
    pub fn new(
        key: &str,
        remote: CacheLayout,
        shard: Shard,
        link: Box<dyn Link>,
        counters: Arc<CallCounters>,
        left: Arc<LeftReport>,
    ) -> Peer {
        Peer {
            key: key.into(),
            remote,
            shard,
            link,
            counters,
            left,
            calls: super::fence::InFlight::default(),
            registered: AtomicBool::new(false),
        }
    }

    /// Whether this peer is still the one registered under its key (not removed, not
    /// replaced by a newer connection).
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }

    fn set_registered(&self, registered: bool) {
        self.registered.store(registered, Ordering::Release);
    }
}

#[derive(Default)]
pub(super) struct PeerRegistry {
    peers: RwLock<HashMap<String, Arc<Peer>>>,
}

impl PeerRegistry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Peer>>> {
        crate::util::read(&self.peers)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Peer>>> {
        crate::util::write(&self.peers)
    }

    pub fn get(&self, key: &str) -> Option<Arc<Peer>> {
        self.read().get(key).cloned()
    }

    /// Registers `peer` under `key`; returns the peer it replaces.
    pub fn insert(&self, key: &str, peer: Arc<Peer>) -> Option<Arc<Peer>> {
        peer.set_registered(true);
        let replaced = self.write().insert(key.to_string(), peer);
        unregistered(replaced)
    }

    pub fn remove(&self, key: &str) -> Option<Arc<Peer>> {
        let removed = self.write().remove(key);
        unregistered(removed)
    }

    /// Removes `key` only while it still names `peer` (not a newer connection).
    pub fn remove_if_same(&self, key: &str, peer: &Arc<Peer>) {
        let mut peers = self.write();
        if peers.get(key).is_some_and(|p| Arc::ptr_eq(p, peer)) {
            unregistered(peers.remove(key));
        }
    }

    pub fn drain(&self) -> Vec<Arc<Peer>> {
        let drained: Vec<Arc<Peer>> = self.write().drain().map(|(_, p)| p).collect();
        for peer in &drained {
            peer.set_registered(false);
        }
        drained
    }

    /// Peers, and of those the ones whose link is still usable.
    pub fn counts(&self) -> (usize, usize) {
        let peers = self.read();
        let alive = peers.values().filter(|p| p.link.is_alive()).count();
        (peers.len(), alive)
    }
}

/// `peer`, marked as no longer registered (it left the registry).
fn unregistered(peer: Option<Arc<Peer>>) -> Option<Arc<Peer>> {
    if let Some(peer) = &peer {
        peer.set_registered(false);
    }
    peer
}
