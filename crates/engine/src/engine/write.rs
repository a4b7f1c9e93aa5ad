//! The write path: validate and plan a `writeCache` call on the caller's thread, then (on
//! the submitting thread, `submitter.rs`) make its completion record, watch its deadline
//! and hand it to the peer's link.

use super::fence::Fences;
use super::integrity::Integrity;
use super::peers::{Peer, PeerRegistry};
use super::watchdog::Watchdog;
use super::{Engine, EngineInner};
use crate::error::{Error, Result};
use crate::plan::{self, BlockIds, PlanLimits, Run};
use crate::transport::{check_tag, JobPlan, WriteJob};
use crate::transport::{
    Accounting, Completion, CompletionCallback, Done, DoneSlot, OnDone, PooledRuns,
};
use crate::util::lock;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// A block list validated and planned once ([`Engine::prepare_blocks`]) for one peer, to
/// be written for any layer ([`CallBlocks::Prepared`]) without being validated or planned
/// again. Runs do not depend on the layer.
#[derive(Clone)]
pub struct PreparedBlocks {
    peer_key: String,
    /// The engine that planned it: a list is only written by its own engine.
    engine: Weak<EngineInner>,
    /// The connection it was planned against. While that connection stays registered
    /// and alive the plan fits it, and a call skips the peer lookup and the layout checks.
    planned_for: Weak<Peer>,
    /// Bytes one call moves per block, for `planned_for`.
    bytes_per_block: u64,
    /// The peer's blockNumber the remote ids were checked against.
    remote_block_number: u32,
    /// The longest run the plan made (in blocks); a link taking shorter runs refuses it.
    longest_run: u32,
    runs: Arc<[Run]>,
    blocks: u32,
}

impl std::fmt::Debug for PreparedBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedBlocks")
            .field("peer_key", &self.peer_key)
            .field("blocks", &self.blocks)
            .field("runs", &self.runs.len())
            .finish_non_exhaustive()
    }
}

impl PreparedBlocks {
    /// The peer (`host:port`) this list was prepared for.
    pub fn peer_key(&self) -> &str {
        &self.peer_key
    }

    /// Block ids in the list (before coalescing).
    pub fn blocks(&self) -> u32 {
        self.blocks
    }

    /// Coalesced runs: copies per region and layer.
    pub fn runs(&self) -> usize {
        self.runs.len()
    }
}

/// A validated and planned `writeCache` call, not yet handed to its link.
struct PreparedWrite {
    peer: Arc<Peer>,
    /// What the link will write.
    plan: JobPlan,
    /// Bytes one block moves: every kind's block (K, V, scales when present), or the
    /// kind's shard with tensor-parallel shards.
    bytes_per_block: u64,
}

/// A completion that counts the call's outcome in its peer's counters (bytes: every kind
/// of every block; latency from `started`, when the call was made, to the outcome) before
/// passing it to `on_done`.
fn counted_done(write: &PreparedWrite, on_done: OnDone, started: Instant) -> Done {
    let blocks = u64::from(write.plan.blocks);
    Done::counted(
        on_done,
        Accounting {
            counters: Arc::clone(&write.peer.counters),
            bytes: blocks * write.bytes_per_block,
            blocks,
            started,
            tagged: write.plan.notice.is_some(),
        },
    )
}

/// A connected peer as a caller holds it ([`Engine::peer`]): its key, and the connection
/// it named when the handle was made. A call through it skips the registry while that
/// connection stays registered and alive; after a reconnect it finds the new one by key.
#[derive(Clone)]
pub struct PeerHandle {
    key: Arc<str>,
    /// The engine that made it: a handle is only used with its own engine.
    engine: Weak<EngineInner>,
    connection: Weak<Peer>,
}

impl std::fmt::Debug for PeerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerHandle")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl PeerHandle {
    /// The peer's key (`host:port`).
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// The peer a call goes to: by key (looked up in the registry) or by handle.
#[derive(Debug, Clone, Copy)]
pub enum CallPeer<'a> {
    /// The peer's key (`host:port`), looked up in the peer registry on each call.
    Key(&'a str),
    /// A handle from [`Engine::peer`]: skips the lookup while its connection stays up.
    Handle(&'a PeerHandle),
}

impl CallPeer<'_> {
    /// The peer's key (`host:port`).
    pub fn key(&self) -> &str {
        match self {
            CallPeer::Key(key) => key,
            CallPeer::Handle(handle) => handle.key(),
        }
    }
}

impl<'a> From<&'a str> for CallPeer<'a> {
    fn from(key: &'a str) -> Self {
        CallPeer::Key(key)
    }
}

impl<'a> From<&'a PeerHandle> for CallPeer<'a> {
    fn from(handle: &'a PeerHandle) -> Self {
        CallPeer::Handle(handle)
    }
}

/// One `writeCache` call: to which peer, which blocks, which layer, its tag and timeout.
#[derive(Debug)]
pub struct WriteCall<'a> {
    /// The peer whose cache is written.
    pub peer: CallPeer<'a>,
    /// Which local blocks go to which remote blocks.
    pub blocks: CallBlocks<'a>,
    /// Checked to be an integer layer of this side's layout.
    pub layer: f64,
    /// When present, the peer gets an arrival notice after the bytes (at most
    /// [`MAX_TAG_BYTES`]).
    pub tag: Option<Vec<u8>>,
    /// Counted from the call: when it passes with the call still pending, the link to the
    /// peer is torn down (TCP: reset, writer stopped; RDMA: queue pairs destroyed) and only
    /// then does the call fail with `ERR_TIMEOUT`; the link's other pending calls fail with
    /// `ERR_PEER_DISCONNECTED`. Other peers are unaffected.
    pub timeout: Option<Duration>,
    /// A checksum the receiver verifies, an acknowledged delivery (`integrity.rs`).
    pub integrity: Integrity,
}

/// The blocks a call writes.
#[derive(Debug, Clone, Copy)]
pub enum CallBlocks<'a> {
    /// Ids validated and planned for this call.
    Ids {
        /// Blocks of this side's cache to read.
        local: BlockIds<'a>,
        /// Blocks of the peer's cache to write, one per local id, at the same position.
        remote: BlockIds<'a>,
    },
    /// A list validated and planned once ([`Engine::prepare_blocks`]).
    Prepared(&'a PreparedBlocks),
}

impl<'a> WriteCall<'a> {
    /// A call of `local` into `remote` ids, with no timeout.
    pub fn ids(
        peer: impl Into<CallPeer<'a>>,
        local: BlockIds<'a>,
        remote: BlockIds<'a>,
        layer: f64,
        tag: Option<Vec<u8>>,
    ) -> Self {
        WriteCall {
            peer: peer.into(),
            blocks: CallBlocks::Ids { local, remote },
            layer,
            tag,
            timeout: None,
            integrity: Integrity::default(),
        }
    }
}

impl Engine {
    /// Validates and queues one call; its outcome goes to `on_done` (a callback, or a sink
    /// with the caller's call id), exactly once when this returns `Ok` (possibly before it
    /// returns) and never when it returns an error, which means nothing was sent. A
    /// prepared list is refused (typed, nothing sent) when another engine prepared it,
    /// when `peer_key` is not the peer it was prepared for, or when that peer reconnected
    /// with a layout the plan does not fit; while the connection it was planned against
    /// stays up, the peer is not even looked up.
    pub fn write(&self, call: WriteCall<'_>, on_done: OnDone) -> Result<()> {
        self.write_with(call, on_done, None)
    }

    /// [`Engine::write`] of a call that its caller may abort: [`CallAbort::abort`] aborts
    /// it while it is pending and does nothing once it completed, so an abort that comes
    /// too late changes nothing (not the call's outcome, not its connection).
    pub fn write_abortable(&self, call: WriteCall<'_>, on_done: OnDone) -> Result<CallAbort> {
        let abort = CallAbort::default();
        self.write_with(call, on_done, Some(abort.clone()))?;
        Ok(abort)
    }

    fn write_with(
        &self,
        call: WriteCall<'_>,
        on_done: OnDone,
        abort: Option<CallAbort>,
    ) -> Result<()> {
        let WriteCall {
            peer,
            blocks,
            layer,
            tag,
            timeout,
            integrity,
        } = call;
        let prepared = match blocks {
            CallBlocks::Ids { local, remote } => {
                self.prepare_write(peer, local, remote, layer, tag, integrity)
            }
            CallBlocks::Prepared(list) => self.reuse_prepared(peer, list, layer, tag, integrity),
        };
        let mut write = prepared.inspect_err(|error| {
            self.inner.metrics.peer(peer.key()).failed(error);
        })?;
        if let Err(error) = self.seal(&write.peer, &mut write.plan, integrity) {
            self.inner.metrics.peer(peer.key()).failed(&error);
            return Err(error);
        }
        self.dispatch(write, on_done, timeout, abort);
        Ok(())
    }

    /// [`Engine::write`] with a `Completion` to await instead of a callback.
    pub fn write_call(&self, call: WriteCall<'_>) -> Result<Completion> {
        let (sender, completion) = futures_channel::oneshot::channel();
        let on_done: CompletionCallback = Box::new(move |result| {
            let _ = sender.send(result);
        });
        self.write(call, on_done.into())?;
        Ok(completion)
    }

    /// [`Engine::write_call`] of `local` into `remote` ids, with no timeout.
    pub fn write_cache(
        &self,
        peer_key: &str,
        local: BlockIds<'_>,
        remote: BlockIds<'_>,
        layer: f64,
        tag: Option<Vec<u8>>,
    ) -> Result<Completion> {
        self.write_call(WriteCall::ids(peer_key, local, remote, layer, tag))
    }

    /// Validates and plans a block list once for `peer_key`; errors here mean nothing
    /// was planned. The list is written per layer with [`Engine::write`]
    /// ([`CallBlocks::Prepared`]).
    pub fn prepare_blocks<'p>(
        &self,
        peer: impl Into<CallPeer<'p>>,
        local: BlockIds<'_>,
        remote: BlockIds<'_>,
    ) -> Result<PreparedBlocks> {
        self.check_open()?;
        let layout = self.inner.table.layout;
        let peer = self.connected(peer.into())?;
        let limits = PlanLimits::new(
            layout.block_number,
            peer.remote.block_number,
            layout.block_bytes,
            peer.link.max_run_bytes(),
        );
        let mut runs = Vec::new();
        plan::plan_runs(local, remote, limits, &mut runs)?;
        Ok(PreparedBlocks {
            peer_key: peer.key.to_string(),
            engine: Arc::downgrade(&self.inner),
            planned_for: Arc::downgrade(&peer),
            bytes_per_block: peer.shard.bytes_per_block(&layout),
            remote_block_number: peer.remote.block_number,
            longest_run: runs.iter().map(|r| r.blocks).max().unwrap_or(0),
            runs: runs.into(),
            blocks: u32::try_from(local.len()).unwrap_or(u32::MAX),
        })
    }

    /// Checks that a prepared list still fits its peer and makes the call for `layer`.
    fn reuse_prepared(
        &self,
        peer: CallPeer<'_>,
        prepared: &PreparedBlocks,
        layer: f64,
        tag: Option<Vec<u8>>,
        integrity: Integrity,
    ) -> Result<PreparedWrite> {
        self.check_open()?;
        let layer = self.inner.table.layout.check_layer(layer)?;
        check_tag(&tag)?;
        self.inner.fences.check(peer.key(), tag.as_deref())?;
        if !std::ptr::eq(prepared.engine.as_ptr(), Arc::as_ptr(&self.inner)) {
            return Err(Error::invalid(
                "prepared",
                format!(
                    "the block list for {} was prepared by another communicator; call prepareBlocks on this one",
                    prepared.peer_key
                ),
            ));
        }
        if let CallPeer::Handle(handle) = peer {
            self.check_own(handle)?;
        }
        let peer_key = peer.key();
        if prepared.peer_key != peer_key {
            return Err(Error::invalid(
                "prepared",
                format!(
                    "the block list was prepared for peer {}, not {peer_key}; call prepareBlocks for {peer_key}",
                    prepared.peer_key
                ),
            ));
        }
        let (peer, bytes_per_block) = match prepared.planned_for.upgrade() {
            // Still the connection it was planned against: the plan fits it.
            Some(peer) if peer.is_registered() && peer.link.is_alive() => {
                (peer, prepared.bytes_per_block)
            }
            _ => self.refit(peer_key, prepared)?,
        };
        let (notice, landing) = self.notice_for(
            &peer,
            layer,
            (prepared.blocks, &prepared.runs[..]),
            tag.as_deref(),
            integrity,
        )?;
        Ok(PreparedWrite {
            bytes_per_block,
            plan: JobPlan {
                runs: PooledRuns::from(Arc::clone(&prepared.runs)),
                layer,
                blocks: prepared.blocks,
                shard: peer.shard,
                notice,
                landing,
                acked: integrity.acked,
            },
            peer,
        })
    }

    /// The peer now registered under `peer_key` (another connection than the prepared
    /// list was planned against), when the plan fits it, with the bytes a block moves.
    fn refit(&self, peer_key: &str, prepared: &PreparedBlocks) -> Result<(Arc<Peer>, u64)> {
        let layout = self.inner.table.layout;
        let peer = self.live_peer(peer_key)?;
        if peer.remote.block_number != prepared.remote_block_number {
            return Err(Error::LayoutMismatch {
                here: format!("the block list prepared for {peer_key}"),
                peer: format!("{peer_key} now"),
                what: "the remote blockNumber",
                local: prepared.remote_block_number.into(),
                remote: peer.remote.block_number.into(),
            });
        }
        let max_run_blocks = PlanLimits::new(
            layout.block_number,
            peer.remote.block_number,
            layout.block_bytes,
            peer.link.max_run_bytes(),
        )
        .max_run_blocks;
        if prepared.longest_run > max_run_blocks {
            return Err(Error::invalid(
                "prepared",
                format!(
                    "a run of {} blocks was planned but the connection to {peer_key} takes at most {max_run_blocks}; call prepareBlocks again",
                    prepared.longest_run
                ),
            ));
        }
        let bytes_per_block = peer.shard.bytes_per_block(&layout);
        Ok((peer, bytes_per_block))
    }

    /// A handle on the peer connected as `peer_key` (`ERR_NOT_CONNECTED` when none is):
    /// calls through it skip the registry while that connection lasts.
    pub fn peer(&self, peer_key: &str) -> Result<PeerHandle> {
        let peer = self.live_peer(peer_key)?;
        Ok(PeerHandle {
            key: Arc::clone(&peer.key),
            engine: Arc::downgrade(&self.inner),
            connection: Arc::downgrade(&peer),
        })
    }

    /// The connection a call to `peer` uses: the handle's own while it stays registered and
    /// alive, else the one registered under the key, when its link is usable.
    fn connected(&self, peer: CallPeer<'_>) -> Result<Arc<Peer>> {
        let handle = match peer {
            CallPeer::Key(key) => return self.live_peer(key),
            CallPeer::Handle(handle) => handle,
        };
        self.check_own(handle)?;
        match handle.connection.upgrade() {
            Some(peer) if peer.is_registered() && peer.link.is_alive() => Ok(peer),
            _ => self.live_peer(&handle.key),
        }
    }

    /// Refuses a handle another engine made (its connection is not this engine's).
    fn check_own(&self, handle: &PeerHandle) -> Result<()> {
        if std::ptr::eq(handle.engine.as_ptr(), Arc::as_ptr(&self.inner)) {
            return Ok(());
        }
        Err(Error::invalid(
            "peer",
            format!(
                "the handle on {} belongs to another communicator; use the one its connect returned",
                handle.key
            ),
        ))
    }

    /// The peer registered under `peer_key`, when its link is usable.
    fn live_peer(&self, peer_key: &str) -> Result<Arc<Peer>> {
        let broken = || Error::PeerDisconnected {
            peer: peer_key.to_string(),
            reason: "the connection broke; connect again".into(),
        };
        let Some(peer) = self.inner.peers.get(peer_key) else {
            // A broken connection released by a later connect (`PeerRegistry::insert`).
            if self.inner.peers.is_gone(peer_key) {
                return Err(broken());
            }
            return Err(Error::NotConnected {
                peer: peer_key.to_string(),
            });
        };
        if !peer.link.is_alive() {
            return Err(broken());
        }
        Ok(peer)
    }

    /// Validates and plans one call; errors here mean nothing was sent.
    fn prepare_write(
        &self,
        peer: CallPeer<'_>,
        local: BlockIds<'_>,
        remote: BlockIds<'_>,
        layer: f64,
        tag: Option<Vec<u8>>,
        integrity: Integrity,
    ) -> Result<PreparedWrite> {
        self.check_open()?;
        let layout = self.inner.table.layout;
        let layer = layout.check_layer(layer)?;
        check_tag(&tag)?;
        self.inner.fences.check(peer.key(), tag.as_deref())?;
        let peer = self.connected(peer)?;
        let limits = PlanLimits::new(
            layout.block_number,
            peer.remote.block_number,
            layout.block_bytes,
            peer.link.max_run_bytes(),
        );
        // A recycled buffer: it moves to the transport with the job and comes back to the
        // pool when the transport is done with it, so steady traffic does not allocate here.
        let mut runs = self.inner.run_pool.take();
        plan::plan_runs(local, remote, limits, &mut runs)?;
        let runs = self.inner.run_pool.pooled(runs);
        let blocks = u32::try_from(local.len()).unwrap_or(u32::MAX);
        let (notice, landing) =
            self.notice_for(&peer, layer, (blocks, &runs[..]), tag.as_deref(), integrity)?;
        Ok(PreparedWrite {
            bytes_per_block: peer.shard.bytes_per_block(&layout),
            plan: JobPlan {
                runs,
                layer,
                blocks,
                shard: peer.shard,
                notice,
                landing,
                acked: integrity.acked,
            },
            peer,
        })
    }

    /// Queues a checked call for the submitting thread (or, when there is none, hands it
    /// off here). The call's latency and its `timeout` count from now (one clock read).
    fn dispatch(
        &self,
        write: PreparedWrite,
        on_done: OnDone,
        timeout: Option<Duration>,
        abort: Option<CallAbort>,
    ) {
        let call = QueuedCall {
            write,
            on_done,
            started: Instant::now(),
            timeout,
            abort,
        };
        let inner = &self.inner;
        let queued = inner.submitter.push(call, || {
            let watchdog = Arc::clone(&inner.watchdog);
            let peers = Arc::downgrade(&inner.peers);
            let fences = Arc::clone(&inner.fences);
            move |call: QueuedCall| call.hand_off(&watchdog, &peers, &fences)
        });
        if let Err(call) = queued {
            call.hand_off(
                &inner.watchdog,
                &Arc::downgrade(&inner.peers),
                &inner.fences,
            );
        }
    }
}

/// A checked and planned call on its way to the submitting thread.
pub(super) struct QueuedCall {
    write: PreparedWrite,
    on_done: OnDone,
    /// When the call was made: its latency and its timeout count from here.
    started: Instant,
    timeout: Option<Duration>,
    /// Its caller's handle, for a call that may be aborted.
    abort: Option<CallAbort>,
}

impl QueuedCall {
    /// Makes the call's completion record, watches its deadline and hands it to its link
    /// (or completes it at once when it has nothing to send, or fails it when it was
    /// aborted while queued).
    fn hand_off(self, watchdog: &Arc<Watchdog>, peers: &Weak<PeerRegistry>, fences: &Fences) {
        let done = counted_done(&self.write, self.on_done, self.started);
        let PreparedWrite { peer, plan, .. } = self.write;
        if let Some(abort) = &self.abort {
            let mut state = lock(&abort.state);
            if let AbortState::AbortedInQueue = *state {
                drop(state);
                let _ = done.send(Err(Error::Aborted));
                return;
            }
            *state = AbortState::Submitted {
                call: done.watch(),
                peer: Arc::downgrade(&peer),
                peers: Weak::clone(peers),
            };
        }
        if plan.runs.is_empty() && plan.notice.is_none() {
            let _ = done.send(Ok(()));
            return;
        }
        if let Some(timeout) = self.timeout {
            watchdog.watch(peers, &peer, &done, self.started, timeout);
        }
        // Tracked before the fences are read: a fence held after this finds the call, one
        // held before refuses it here (both go through the same locks).
        peer.calls.track(done.watch(), plan.tag());
        if let Err(error) = fences.check(&peer.key, plan.tag()) {
            let _ = done.send(Err(error));
            return;
        }
        peer.link.submit(WriteJob { plan, done });
    }
}

/// Aborts one call while it is pending ([`Engine::write_abortable`]). Cheap to clone.
#[derive(Clone, Default)]
pub struct CallAbort {
    state: Arc<Mutex<AbortState>>,
}

impl std::fmt::Debug for CallAbort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallAbort")
    }
}

#[derive(Default)]
enum AbortState {
    /// Not handed to its link yet (on its way to the submitting thread).
    #[default]
    Queued,
    /// Aborted before it reached its link: it fails there with `ERR_ABORTED`, nothing sent.
    AbortedInQueue,
    /// Handed to its link: the call and the connection it went on.
    Submitted {
        call: Weak<DoneSlot>,
        peer: Weak<Peer>,
        peers: Weak<PeerRegistry>,
    },
}

impl CallAbort {
    /// Aborts the call if it is still pending, and returns whether it was. Whether it is
    /// pending is decided at one instant, against its completion: a call that completed
    /// first keeps its outcome and its connection is left alone. A pending call fails with
    /// `ERR_ABORTED`: one not yet handed to its link is never sent; otherwise the
    /// connection it went on is torn down first (as for a timeout: when this returns,
    /// none of its bytes can land any more), its other pending calls fail with
    /// `ERR_ABORTED`, and the peer is reported as left. Blocks for the teardown.
    pub fn abort(&self) -> bool {
        let (call, peer, peers) = {
            let mut state = lock(&self.state);
            match &*state {
                AbortState::Queued => {
                    *state = AbortState::AbortedInQueue;
                    return true;
                }
                AbortState::AbortedInQueue => return false,
                AbortState::Submitted { call, peer, peers } => {
                    (call.upgrade(), Weak::clone(peer), Weak::clone(peers))
                }
            }
        };
        // Released by its transport: it completed.
        let Some(call) = call else {
            return false;
        };
        if !call.fail_if_pending(Error::Aborted) {
            return false;
        }
        // The connection the call went on (not a newer one under the same key).
        if let Some(peer) = peer.upgrade() {
            if let Some(peers) = peers.upgrade() {
                peers.remove_if_same(&peer.key, &peer);
            }
            peer.left.report(
                "ERR_ABORTED",
                format!(
                    "a writeCache to {} was aborted: the connection was torn down so that none of its bytes can land",
                    peer.key
                ),
            );
            peer.link.cancel(Error::Aborted);
        }
        // Normally already failed by the teardown; covers a link that was closed meanwhile.
        call.complete(Err(Error::Aborted));
        true
    }
}
