//! The writer's side of the acceptor's warm re-attach: at its park (`Message::Release`)
//! the link stops writing, lets its copies finish and drops its mappings of the old memory
//! (so the dead worker's GPU memory can be freed); after its swap (`Message::Table` and its
//! descriptors) it opens the new memory and numbers it, and `rekey` (the fence channel's,
//! before the writer's fence is lifted) waits for that number.

use super::Shared;
use crate::error::{Error, Result};
use crate::transport::nvlink::memory::{Imports, MemoryTable};
use crate::transport::nvlink::message::Message;
use crate::transport::nvlink::socket;
use crate::util::lock;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long `rekey` waits for the acceptor's new table (the sidecar waits 5 s for the
/// writer's answer).
const REOPEN_WAIT: Duration = Duration::from_secs(4);

/// What a call to a parked acceptor fails with.
pub(super) fn parked(peer: &str) -> Error {
    Error::Fenced {
        peer: peer.to_string(),
        what: "its memory is parked for a warm re-attach (its worker is restarting); the call was refused unsent, writes resume once the new worker attached".into(),
    }
}

impl Shared {
    /// The acceptor parked: no new copy starts, the stream finishes what it has, and the
    /// mappings of the old memory are released once no job is in flight.
    pub(super) fn park(&self) {
        {
            let mut submitter = lock(&self.submitter);
            submitter.bases = None;
            let _current = self.gpu.scoped();
            let _ = submitter.copies.synchronize();
        }
        self.release_imports();
        crate::log::debug!(
            "nvlink to {}: the peer parked its memory (warm re-attach)",
            self.peer
        );
    }

    /// The acceptor's new memory table `generation` (its descriptors follow on `socket`):
    /// the old mappings are dropped, the new ones opened, and writes go there from now on.
    /// An error breaks the link (the caller).
    pub(super) fn reopen(&self, socket: &UnixStream, generation: u64, table: &[u8]) -> Result<()> {
        let peer = self.peer.as_str();
        let table = MemoryTable::decode(table).map_err(|e| Error::protocol(peer, e.0))?;
        let mut fds = Vec::with_capacity(table.fds());
        while fds.len() < table.fds() {
            let (bytes, batch) = socket::receive(socket)
                .map_err(|e| Error::io(peer, "receive the new shared allocations", e))?
                .ok_or_else(|| Error::PeerDisconnected {
                    peer: peer.to_string(),
                    reason: "the peer closed the NVLink side channel while sending its new memory table (warm re-attach)".into(),
                })?;
            match Message::decode(&bytes) {
                Some(Message::Fds { count }) if count as usize == batch.len() && count > 0 => {
                    fds.extend(batch);
                }
                _ => return Err(Error::protocol(
                    peer,
                    "the new memory table's descriptors were expected on the NVLink side channel",
                )),
            }
        }
        if table.regions.len() != self.table.regions().len() {
            return Err(Error::protocol(
                peer,
                format!(
                    "the new memory table lists {} regions; the layouts agreed on {}",
                    table.regions.len(),
                    self.table.regions().len()
                ),
            ));
        }
        self.park();
        let imports = Imports::open(peer, &self.gpu, &table, fds, self.same_process)?;
        let bases = Arc::clone(&imports.bases);
        *lock(&self.imports) = Some(imports);
        lock(&self.submitter).bases = Some(bases);
        *lock(&self.reopened) = generation;
        self.reopened_changed.notify_all();
        crate::log::debug!(
            "nvlink to {peer}: its new memory (table {generation}, {} allocations) opened",
            table.pieces.len()
        );
        Ok(())
    }

    /// `rekey`'s wait: until table `keys` (8 bytes, little endian) was opened. Not in time:
    /// the link breaks (it connects again, as after a timeout).
    pub(super) fn wait_reopened(&self, keys: &[u8]) -> Result<usize> {
        let generation = <[u8; 8]>::try_from(keys)
            .map(u64::from_le_bytes)
            .map_err(|_| {
                Error::protocol(
                    &self.peer,
                    format!(
                        "NVLink keys of {} bytes; 8 expected (the number of the receiver's memory table)",
                        keys.len()
                    ),
                )
            })?;
        let deadline = Instant::now() + REOPEN_WAIT;
        let mut reopened = lock(&self.reopened);
        loop {
            if *reopened >= generation {
                return Ok(1);
            }
            if let Some(error) = self.failure() {
                return Err(error);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let error = Error::Timeout {
                    ms: REOPEN_WAIT.as_millis() as u64,
                    what: format!(
                        "waiting for {}'s memory table {generation} after its warm re-attach over the NVLink side channel (this link opened {}); the link is closed and connects again",
                        self.peer, *reopened
                    ),
                };
                drop(reopened);
                // A link that may never get the table would refuse every call: it breaks,
                // so the writer connects again (and gets the table with the handshake).
                self.break_with(error.clone(), false);
                let _ = self.socket.shutdown(std::net::Shutdown::Both);
                return Err(error);
            }
            reopened = crate::util::wait_timeout(&self.reopened_changed, reopened, left);
        }
    }
}
