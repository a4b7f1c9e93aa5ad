//! The peer registry: the links this engine writes through, by `host:port` key.

use crate::layout::CacheLayout;
use crate::metrics::CallCounters;
use crate::shard::Shard;
use crate::transport::Link;
use std::collections::HashMap;
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
}

#[derive(Default)]
pub(super) struct PeerRegistry {
    peers: RwLock<HashMap<String, Arc<Peer>>>,
}

impl PeerRegistry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Peer>>> {
        self.peers.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Peer>>> {
        self.peers.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &str) -> Option<Arc<Peer>> {
        self.read().get(key).cloned()
    }

    /// Registers `peer` under `key`; returns the peer it replaces.
    pub fn insert(&self, key: &str, peer: Arc<Peer>) -> Option<Arc<Peer>> {
        self.write().insert(key.to_string(), peer)
    }

    pub fn remove(&self, key: &str) -> Option<Arc<Peer>> {
        self.write().remove(key)
    }

    /// Removes `key` only while it still names `peer` (not a newer connection).
    pub fn remove_if_same(&self, key: &str, peer: &Arc<Peer>) {
        let mut peers = self.write();
        if peers.get(key).is_some_and(|p| Arc::ptr_eq(p, peer)) {
            peers.remove(key);
        }
    }

    pub fn drain(&self) -> Vec<Arc<Peer>> {
        self.write().drain().map(|(_, p)| p).collect()
    }

    /// Peers, and of those the ones whose link is still usable.
    pub fn counts(&self) -> (usize, usize) {
        let peers = self.read();
        let alive = peers.values().filter(|p| p.link.is_alive()).count();
        (peers.len(), alive)
    }
}
