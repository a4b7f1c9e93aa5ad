//! Fences: a receiving side that reclaims blocks makes sure no earlier write can still land
//! in them.
//!
//! Writing side ([`Engine::fence_writes`]): the receiver asked (over the control plane) that
//! no call of a tag, or no call at all, reach it any more. New calls of that scope to that
//! peer are refused with `ERR_FENCED` for a while; pending ones fail with `ERR_FENCED`, and
//! their connection is torn down through the link's `cancel` (the path of a timeout or an
//! abort), so that when this returns none of their bytes can land.
//!
//! Receiving side ([`Engine::cut_off`]): a writer that did not acknowledge in time is cut
//! off by every transport (`Transport::isolate`): after it returns, nothing that writer
//! sent can land here; the writer sees its connection break and connects again.

use super::in_flight::FenceScope;
use super::peers::Peer;
use super::Engine;
use crate::error::{Error, Result};
use crate::log::debug;
use crate::util::lock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest time a fence keeps refusing new calls of its scope.
pub const MAX_FENCE_HOLD: Duration = Duration::from_secs(3600);

/// The fences a writer honours: new calls of their scope to their peer are refused until
/// they expire.
#[derive(Default)]
pub(super) struct Fences {
    /// How many are recorded: the write path skips the lock while none is.
    count: AtomicUsize,
    held: Mutex<Vec<HeldFence>>,
}

struct HeldFence {
    peer: String,
    scope: FenceScope,
    until: Instant,
}

impl Fences {
    fn hold(&self, peer: &str, scope: FenceScope, hold: Duration) {
        let mut held = lock(&self.held);
        let now = Instant::now();
        held.retain(|f| f.until > now && !(f.peer == peer && f.scope == scope));
        held.push(HeldFence {
            peer: peer.to_string(),
            scope,
            until: now + hold,
        });
        self.count.store(held.len(), Ordering::Release);
    }

    /// Refuses a new call to `peer` with `tag` while a fence covers it.
    pub fn check(&self, peer: &str, tag: Option<&[u8]>) -> Result<()> {
        if self.count.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let mut held = lock(&self.held);
        let now = Instant::now();
        held.retain(|f| f.until > now);
        self.count.store(held.len(), Ordering::Release);
        match held.iter().find(|f| f.peer == peer && f.scope.covers(tag)) {
            Some(fence) => Err(Error::Fenced {
                peer: peer.to_string(),
                what: format!(
                    "{} is fenced for {} ms more; the call was refused and nothing was sent",
                    fence.scope.describe(),
                    fence.until.saturating_duration_since(now).as_millis()
                ),
            }),
            None => Ok(()),
        }
    }
}

impl Engine {
    /// Writing side: the receiver `peer_key` fenced `scope`. New calls of that scope to it
    /// are refused with `ERR_FENCED` for `hold` (at most [`MAX_FENCE_HOLD`]); calls of it
    /// still pending fail with `ERR_FENCED`, and then their connection is torn down (its
    /// other pending calls fail with `ERR_FENCED` too; the peer is reported as left and must
    /// be connected again). Returns how many pending calls were fenced: when this returns,
    /// none of their bytes can land any more. Blocks for the teardown.
    pub fn fence_writes(&self, peer_key: &str, scope: FenceScope, hold: Duration) -> Result<usize> {
        self.check_open()?;
        if let FenceScope::Tag(tag) = &scope {
            crate::transport::check_tag(&Some(tag.clone()))?;
        }
        if hold > MAX_FENCE_HOLD {
            return Err(Error::invalid(
                "holdMs",
                format!(
                    "{} ms given; at most {} ms",
                    hold.as_millis(),
                    MAX_FENCE_HOLD.as_millis()
                ),
            ));
        }
        self.inner.fences.hold(peer_key, scope.clone(), hold);
        // Calls checked before the fence was held are handed to their links first.
        self.inner.submitter.flush();
        let Some(peer) = self.inner.peers.get(peer_key) else {
            return Ok(0);
        };
        let error = Error::Fenced {
            peer: peer_key.to_string(),
            what: format!(
                "{} was fenced while this call was pending; its connection was torn down so that none of its bytes can land",
                scope.describe()
            ),
        };
        let fenced = peer.calls.fail_covered(&scope, &error);
        if fenced > 0 {
            tear_down_fenced(&self.inner.peers, &peer, error);
        }
        debug!(
            "fence of {} from {peer_key}: {fenced} pending call(s) failed",
            scope.describe()
        );
        Ok(fenced)
    }

    /// Receiving side: cuts the writer named `writer` off on every transport, so that
    /// nothing it sent can land here any more once this returns; it must connect again.
    /// Returns how many connections were cut. A transport that cannot stop a writer from
    /// this side (NVLink: the writer's GPU copies) fails with `ERR_TIMEOUT` after closing
    /// what it can.
    pub fn cut_off(&self, writer: &str, waited: Duration) -> Result<usize> {
        self.check_open()?;
        let mut cut = 0;
        let mut unenforced = Vec::new();
        for transport in &self.inner.transports {
            match transport.isolate(writer) {
                Ok(n) => cut += n,
                Err(reason) => unenforced.push(format!("{}: {reason}", transport.kind().name())),
            }
        }
        debug!("cut writer {writer} off: {cut} connection(s)");
        if unenforced.is_empty() {
            Ok(cut)
        } else {
            Err(Error::Timeout {
                ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                what: format!(
                    "fence: writer {writer} did not acknowledge, and {}",
                    unenforced.join("; ")
                ),
            })
        }
    }
}

/// Tears the connection of fenced calls down (not a newer one under the same key).
fn tear_down_fenced(peers: &super::peers::PeerRegistry, peer: &Arc<Peer>, error: Error) {
    peers.remove_if_same(&peer.key, peer);
    peer.left.report(
        "ERR_FENCED",
        format!(
            "the connection to {} was torn down by a fence: {error}",
            peer.key
        ),
    );
    peer.link.cancel(error);
}
