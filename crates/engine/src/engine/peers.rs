//! The peer registry: the links this engine writes through, by `host:port` key.

use super::left::LeftReport;
use crate::layout::CacheLayout;
use crate::metrics::CallCounters;
use crate::shard::Shard;
use crate::transport::Link;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// How many keys of released broken connections are remembered (so that a call by such a
/// key still fails `ERR_PEER_DISCONNECTED`, not `ERR_NOT_CONNECTED`).
const GONE_KEYS: usize = 1024;

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
    pub calls: super::in_flight::InFlight,
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
            calls: super::in_flight::InFlight::default(),
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
    /// Keys whose broken connection was released by a later `insert`, oldest first.
    gone: Mutex<VecDeque<String>>,
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
    ///
    /// Also releases every other registered peer whose link broke on its own (its process
    /// died, the connection was lost): a peer that comes back elsewhere (a restarted
    /// process on a new port or host) is never connected under the old key again, and its
    /// link would otherwise keep its threads and sockets for the engine's lifetime. Their
    /// keys are remembered (bounded) so that calls by them still fail as disconnected.
    pub fn insert(&self, key: &str, peer: Arc<Peer>) -> Option<Arc<Peer>> {
        peer.set_registered(true);
        let (replaced, broken) = {
            let mut peers = self.write();
            let replaced = peers.insert(key.to_string(), peer);
            let dead: Vec<String> = peers
                .iter()
                .filter(|(k, p)| k.as_str() != key && !p.link.is_alive())
                .map(|(k, _)| k.clone())
                .collect();
            let broken: Vec<Arc<Peer>> = dead.iter().filter_map(|k| peers.remove(k)).collect();
            (replaced, broken)
        };
        {
            let mut gone = crate::util::lock(&self.gone);
            gone.retain(|k| k != key);
            for peer in &broken {
                gone.push_back(peer.key.to_string());
            }
            while gone.len() > GONE_KEYS {
                gone.pop_front();
            }
        }
        // Outside the registry's lock and off the links' own threads (a shutdown joins them),
        // as a connection replaced under its own key is shut down.
        for peer in broken {
            peer.set_registered(false);
            peer.link.shutdown();
        }
        unregistered(replaced)
    }

    /// Whether `key` named a connection that broke and was released (see `insert`).
    pub fn is_gone(&self, key: &str) -> bool {
        crate::util::lock(&self.gone).iter().any(|k| k == key)
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
