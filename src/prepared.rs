//! `prepareBlocks`: block lists validated and planned once, written per layer by handle
//! (`writePrepared`, in `calls.rs`).
//!
//! `writePrepared` takes the list's handle as a number, not the `NativePreparedBlocks`
//! object: napi-rs registers and releases a borrow for every class reference passed as an
//! argument, which cost about a third of the native part of each prepared call.

use crate::{block_id_slices, to_js_error, BlockIdSlices, Code, NativeCommunicator};
use kvtransfer_engine::PreparedBlocks;
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::sync::{Arc, Mutex, Weak};

/// The communicator's prepared lists, by handle. A handle is free again once its
/// `NativePreparedBlocks` is garbage collected; the TS `PreparedBlocks` holds that object,
/// so a handle taken from a live `PreparedBlocks` always names its own list.
#[derive(Default)]
pub(crate) struct PreparedTable {
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    lists: Vec<Option<Arc<PreparedBlocks>>>,
    free: Vec<u32>,
}

impl PreparedTable {
    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        crate::lock(&self.slots)
    }

    /// Keeps `list` under a new handle.
    fn insert(&self, list: Arc<PreparedBlocks>) -> u32 {
        let mut slots = self.slots();
        if let Some(handle) = slots.free.pop() {
            slots.lists[handle as usize] = Some(list);
            return handle;
        }
        slots.lists.push(Some(list));
        u32::try_from(slots.lists.len() - 1).unwrap_or(u32::MAX)
    }

    pub(crate) fn get(&self, handle: u32) -> Option<Arc<PreparedBlocks>> {
        self.slots().lists.get(handle as usize)?.clone()
    }

    fn remove(&self, handle: u32) {
        let mut slots = self.slots();
        if let Some(slot @ Some(_)) = slots.lists.get_mut(handle as usize) {
            *slot = None;
            slots.free.push(handle);
        }
    }
}

#[napi]
impl NativeCommunicator {
    /// Validates and plans a block list once for `peer_key` (throws, typed, when an id is
    /// bad or the peer is not connected).
    #[napi]
    pub fn prepare_blocks<'env>(
        &self,
        peer_key: String,
        #[napi(ts_arg_type = "Uint32Array | Int32Array | Float64Array")]
        local_block_ids: BlockIdSlices<'env>,
        #[napi(ts_arg_type = "Uint32Array | Int32Array | Float64Array")]
        remote_block_ids: BlockIdSlices<'env>,
    ) -> Result<NativePreparedBlocks, Code> {
        let prepared = self
            .engine
            .prepare_blocks(
                &peer_key,
                block_id_slices(&local_block_ids),
                block_id_slices(&remote_block_ids),
            )
            .map_err(to_js_error)?;
        let inner = Arc::new(prepared);
        let handle = self.calls.prepared.insert(Arc::clone(&inner));
        Ok(NativePreparedBlocks {
            inner,
            handle,
            table: Arc::downgrade(&self.calls.prepared),
        })
    }
}

/// A block list validated and planned once for one peer (`prepareBlocks`).
#[napi]
pub struct NativePreparedBlocks {
    inner: Arc<PreparedBlocks>,
    handle: u32,
    table: Weak<PreparedTable>,
}

#[napi]
impl NativePreparedBlocks {
    /// The number `writePrepared` takes for this list.
    #[napi(getter)]
    pub fn handle(&self) -> u32 {
        self.handle
    }

    /// The peer (`host:port`) the list was prepared for.
    #[napi(getter)]
    pub fn peer(&self) -> String {
        self.inner.peer_key().to_string()
    }

    /// Block ids in the list.
    #[napi(getter)]
    pub fn blocks(&self) -> u32 {
        self.inner.blocks()
    }

    /// Coalesced runs (copies per region and layer).
    #[napi(getter)]
    pub fn runs(&self) -> u32 {
        u32::try_from(self.inner.runs()).unwrap_or(u32::MAX)
    }
}

impl Drop for NativePreparedBlocks {
    fn drop(&mut self) {
        if let Some(table) = self.table.upgrade() {
            table.remove(self.handle);
        }
    }
}
