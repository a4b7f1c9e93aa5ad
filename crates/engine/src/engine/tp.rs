//! The tensor-parallel part of the handshake: both sides plan the shards of a connection
//! from the two descriptors (`shard.rs`); the acceptor refuses a writer it cannot pair with,
//! the connector also checks the peer's size it was told to expect (`dst_tp_size`).

use super::Engine;
use crate::error::{Error, Result};
use crate::layout::CacheLayout;
use crate::shard::Shard;
use crate::wire::Descriptor;

impl Engine {
    /// The shards of a connection with the peer described by `remote` (its layout
    /// `remote_layout`, already checked for layers, K/V and scale presence). The connector
    /// (`here_is_writer`) writes; the acceptor receives.
    pub(super) fn plan_shards(
        &self,
        peer: &str,
        remote: &Descriptor,
        remote_layout: &CacheLayout,
        here_is_writer: bool,
        peer_tp_size: Option<u32>,
    ) -> Result<Shard> {
        let here = self.inner.name();
        if let Some(expected) = peer_tp_size {
            if expected != remote.tp.size {
                return Err(Error::TensorParallel {
                    here: here.to_string(),
                    peer: peer.to_string(),
                    reason: format!(
                        "dstTpSize {expected} was given to connect but {peer} declares tpSize {}",
                        remote.tp.size
                    ),
                });
            }
        }
        let ours = (&self.inner.tp, &self.inner.table.layout);
        let theirs = (&remote.tp, remote_layout);
        let (writer, receiver) = if here_is_writer {
            (ours, theirs)
        } else {
            (theirs, ours)
        };
        Shard::between(writer, receiver, here, peer, here_is_writer)
    }
}
