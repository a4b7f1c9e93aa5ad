//! The write path: validate and plan a `writeCache` call, hand it to the peer's link, and
//! watch its deadline.

use super::peers::Peer;
use super::Engine;
use crate::error::{Error, Result};
use crate::plan::{self, BlockIds, PlanLimits};
use crate::transport::{Completion, CompletionCallback, Done, PooledRuns, WriteJob, MAX_TAG_BYTES};
use std::sync::Arc;
use std::time::Instant;

/// A completion that counts the call's outcome in its peer's counters (bytes: K and V of
/// every block; latency from here to the outcome) before passing it to `deliver`.
fn counted_done(write: &PreparedWrite, deliver: CompletionCallback) -> Done {
    let counters = write.peer.counters.clone();
    let blocks = u64::from(write.blocks);
    let bytes = blocks * write.bytes_per_block;
    let tagged = write.tag.is_some();
    let started = Instant::now();
    Done::with_callback(Box::new(move |result| {
        match &result {
            Ok(()) => counters.succeeded(bytes, blocks, started.elapsed(), tagged),
            Err(error) => counters.failed(error),
        }
        deliver(result);
    }))
}

/// A validated and planned `writeCache` call, not yet handed to its link.
struct PreparedWrite {
    peer: Arc<Peer>,
    runs: PooledRuns,
    layer: u32,
    blocks: u32,
    /// Bytes one block moves: blockBytes for K, and as much for V when present.
    bytes_per_block: u64,
    tag: Option<Vec<u8>>,
}

impl Engine {
    /// Validates and queues one `writeCache` call. Errors here mean nothing was sent.
    pub fn write_cache(
        &self,
        peer_key: &str,
        local: BlockIds<'_>,
        remote: BlockIds<'_>,
        layer: f64,
        tag: Option<Vec<u8>>,
    ) -> Result<Completion> {
        self.write_cache_until(peer_key, local, remote, layer, tag, None)
    }

    /// [`Engine::write_cache`] with a deadline: when the call has not completed by then,
    /// the link to the peer is torn down (TCP: reset, writer stopped; RDMA: queue pairs
    /// destroyed) and only then does the call fail with `ERR_TIMEOUT`; the link's other
    /// pending calls fail with `ERR_PEER_DISCONNECTED`. Other peers are unaffected.
    pub fn write_cache_until(
        &self,
        peer_key: &str,
        local: BlockIds<'_>,
        remote: BlockIds<'_>,
        layer: f64,
        tag: Option<Vec<u8>>,
        deadline: Option<Instant>,
    ) -> Result<Completion> {
        let write = self.counted(
            peer_key,
            self.prepare_write(peer_key, local, remote, layer, tag),
        )?;
        let (sender, completion) = futures_channel::oneshot::channel();
        let done = counted_done(
            &write,
            Box::new(move |result| {
                let _ = sender.send(result);
            }),
        );
        self.submit_write(peer_key, write, done, deadline);
        Ok(completion)
    }

    /// [`Engine::write_cache_until`] that passes the outcome to `on_done` instead of
    /// returning a `Completion`. `on_done` is called exactly once when this returns `Ok`
    /// (possibly before it returns), and never when it returns an error.
    #[expect(
        clippy::too_many_arguments,
        reason = "the seed's writeCache arguments plus deadline and callback"
    )]
    pub fn write_cache_with_callback(
        &self,
        peer_key: &str,
        local: BlockIds<'_>,
        remote: BlockIds<'_>,
        layer: f64,
        tag: Option<Vec<u8>>,
        deadline: Option<Instant>,
        on_done: CompletionCallback,
    ) -> Result<()> {
        let write = self.counted(
            peer_key,
            self.prepare_write(peer_key, local, remote, layer, tag),
        )?;
        let done = counted_done(&write, on_done);
        self.submit_write(peer_key, write, done, deadline);
        Ok(())
    }

    /// Counts a call refused while preparing it.
    fn counted(&self, peer_key: &str, prepared: Result<PreparedWrite>) -> Result<PreparedWrite> {
        if let Err(error) = &prepared {
            self.inner.metrics.peer(peer_key).failed(error);
        }
        prepared
    }

    /// Validates and plans one call; errors here mean nothing was sent.
    fn prepare_write(
        &self,
        peer_key: &str,
        local: BlockIds<'_>,
        remote: BlockIds<'_>,
        layer: f64,
        tag: Option<Vec<u8>>,
    ) -> Result<PreparedWrite> {
        self.check_open()?;
        let layout = self.inner.table.layout;
        let layer = layout.check_layer(layer)?;
        if let Some(tag) = &tag {
            if tag.len() > MAX_TAG_BYTES {
                return Err(Error::invalid(
                    "tag",
                    format!("{} bytes given; at most {MAX_TAG_BYTES}", tag.len()),
                ));
            }
        }
        let peer = {
            self.inner
                .peers
                .get(peer_key)
                .ok_or_else(|| Error::NotConnected {
                    peer: peer_key.to_string(),
                })?
        };
        if !peer.link.is_alive() {
            return Err(Error::PeerDisconnected {
                peer: peer_key.to_string(),
                reason: "the connection broke; connect again".into(),
            });
        }
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
        Ok(PreparedWrite {
            peer,
            runs,
            layer,
            blocks,
            bytes_per_block: layout.block_bytes * u64::from(layout.kinds()),
            tag,
        })
    }

    /// Hands a prepared call to its link (or completes it at once when it has nothing to
    /// send), watching its deadline.
    fn submit_write(
        &self,
        peer_key: &str,
        write: PreparedWrite,
        done: Done,
        deadline: Option<Instant>,
    ) {
        let PreparedWrite {
            peer,
            runs,
            layer,
            blocks,
            tag,
            ..
        } = write;
        if runs.is_empty() && tag.is_none() {
            let _ = done.send(Ok(()));
            return;
        }
        if let Some(deadline) = deadline {
            self.inner
                .watchdog
                .watch(&self.inner, peer_key, &peer, &done, deadline);
        }
        peer.link.submit(WriteJob {
            runs,
            layer,
            blocks,
            tag,
            done,
        });
    }
}
