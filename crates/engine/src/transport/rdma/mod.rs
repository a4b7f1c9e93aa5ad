//! RDMA transport: one-sided RDMA WRITE from registered local regions straight into the
//! peer's registered regions, over RC queue pairs.
//!
//! One progress thread per engine owns every queue pair's bookkeeping. It turns jobs into
//! chains of WRITE work requests (one `ibv_post_send` per chain: doorbell batching), signals
//! only the last request of each chain (selective signaling; the send queue is kept full
//! and completions are reaped as they arrive, never drained), spreads chains over the
//! peer's queue pairs, and checks every completion status. A failed completion fails the
//! call it belongs to with the status, and the connection is marked broken (its queue pairs
//! moved to the error state), so no later call can report a false success.
//!
//! After a call's data: with `KVCACHE_GDRCOPY_FLUSH_ENABLE`, an RDMA READ of the last
//! written remote bytes (the call completes after it); with a tag, a WRITE WITH IMMEDIATE
//! that puts the arrival notice into the peer's notice ring and raises a receive
//! completion there; an acked call (`delivery: 'acked'`) completes only once the receiving
//! engine answered that notice (`answer.rs`). The progress thread blocks on the completion
//! channel when idle.

mod answer;
mod chain;
mod details;
mod device;
mod doorbell;
mod endpoint;
mod gpu_mr;
mod health;
pub(crate) mod inventory;
mod keys;
mod link;
pub(crate) mod locality;
mod notice;
mod progress;
mod rail;
mod rekey;
mod route;
mod state;
mod tally;
mod verify;

pub use chain::{fill_write_chain, lightest_rail, ChainTarget};
pub use details::{RdmaDetails, RdmaRailDetails};
pub use endpoint::{GidCandidate, QpEndpoint, RailEndpoint, RdmaEndpoint};
pub use notice::decode_notice;
pub use state::{tuning, ChainCursor, ChainProgress, MAX_WRITE_BYTES, TRANSPORT_RETRY_COUNT};
pub(crate) use state::{PendingQps, RdmaDevice};

use super::{
    AcceptingPeer, ArrivalSink, ConnectTarget, Explanation, Link, Transport, TransportDetails,
    TransportKind,
};
use crate::config::RdmaSettings;
use crate::error::{Error, Result};
use crate::layout::RegionTable;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One-sided RDMA WRITE over RC queue pairs (InfiniBand or RoCE): the device this engine
/// opened, and the queue pairs offered to peers whose handshake is still in flight.
pub(crate) struct RdmaTransport {
    device: RdmaDevice,
    /// Queue pairs created by `offer` for a peer, until `connect` or `forget` takes them.
    offered: Mutex<HashMap<String, PendingQps>>,
}

impl RdmaTransport {
    pub fn open(
        settings: RdmaSettings,
        gpu_idx: u32,
        table: Arc<RegionTable>,
        arrivals: Option<ArrivalSink>,
    ) -> Result<RdmaTransport> {
        Ok(RdmaTransport {
            device: RdmaDevice::open(settings, gpu_idx, table, arrivals)?,
            offered: Mutex::new(HashMap::new()),
        })
    }

    fn offered(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingQps>> {
        crate::util::lock(&self.offered)
    }
}

impl Transport for RdmaTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }

    fn offer(&self, peer_key: &str) -> Result<Vec<u8>> {
        let pending = self.device.create_qps()?;
        let endpoint = self.device.offer(&pending)?.encode();
        self.offered().insert(peer_key.to_string(), pending);
        Ok(endpoint)
    }

    fn check_peer(&self, theirs: &[u8]) -> std::result::Result<(), String> {
        let theirs = RdmaEndpoint::decode(theirs)
            .map_err(|e| format!("the peer's RDMA endpoint is malformed: {e}"))?;
        self.device.check_peer(&theirs)
    }

    fn accept(&self, peer: AcceptingPeer<'_>, theirs: &[u8]) -> Result<Vec<u8>> {
        let theirs = RdmaEndpoint::decode(theirs).map_err(|e| Error::protocol(peer.name, e.0))?;
        let ours = self.device.accept(peer.name, peer.instance_id, &theirs)?;
        Ok(ours.encode())
    }

    fn connect(&self, target: ConnectTarget<'_>, theirs: &[u8]) -> Result<Box<dyn Link>> {
        let peer = target.peer_key;
        let pending = self.offered().remove(peer).ok_or_else(|| {
            Error::protocol(
                peer,
                "the reply chose RDMA but no queue pairs were offered to this peer",
            )
        })?;
        let theirs = RdmaEndpoint::decode(theirs).map_err(|e| Error::protocol(peer, e.0))?;
        Ok(Box::new(self.device.connect(
            peer,
            pending,
            &theirs,
            Arc::clone(target.on_break),
        )?))
    }

    fn forget(&self, peer_key: &str) {
        self.offered().remove(peer_key);
    }

    fn explain(&self) -> Explanation {
        let details = self.device.details();
        Explanation {
            summary: details.summary(),
            chosen_because: Some(
                "both sides offered RDMA and the peer accepted this side's endpoint",
            ),
            details: TransportDetails::Rdma(details),
        }
    }

    fn isolate(&self, peer_name: &str) -> std::result::Result<usize, String> {
        Ok(self.device.isolate(peer_name))
    }

    /// Swaps are followed by registering the regions again (`rekey.rs`).
    fn swap_refusal(&self, device: bool) -> Option<String> {
        // GPU regions are dma-buf registrations: re-registering them after a swap is
        // untested anywhere (no GPU in the RDMA test VM), so it is refused.
        device.then(|| {
            "on RDMA with GPU regions: a dma-buf registration cannot be followed to new GPU memory here (untested, so refused); use transport 'nvlink' or 'tcp' for a warm re-attach of GPU regions, or attach anew".to_string()
        })
    }

    fn follow_pages(&self, parked: bool) -> Result<()> {
        if parked {
            self.device.park_regions();
            Ok(())
        } else {
            self.device.register_regions_again()
        }
    }

    fn region_keys(&self) -> Option<Vec<u8>> {
        self.device.region_keys().map(|keys| keys.encode())
    }

    fn resources(&self) -> super::Resources {
        self.device.shared.live.snapshot()
    }

    fn shutdown(&self) {
        self.offered().clear();
        self.device.shutdown();
    }
}
