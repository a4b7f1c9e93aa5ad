//! `prepareBlocks`: block lists validated and planned once, written per layer
//! (`writePrepared`, in `calls.rs`).
//!
//! `writePrepared` takes the list as an External (`NativePreparedBlocks.list`), not the
//! `NativePreparedBlocks` object: napi-rs registers and releases a borrow for every class
//! reference passed as an argument, which cost about a third of the native part of each
//! prepared call.

use crate::errors::{to_js_error, Code};
use crate::{block_id_slices, BlockIdSlices, NativeCommunicator};
use kvtransfer_engine::PreparedBlocks;
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::sync::Arc;

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
                peer_key.as_str(),
                block_id_slices(&local_block_ids),
                block_id_slices(&remote_block_ids),
            )
            .map_err(to_js_error)?;
        Ok(NativePreparedBlocks {
            inner: Arc::new(prepared),
        })
    }
}

/// A block list validated and planned once for one peer (`prepareBlocks`).
#[napi]
pub struct NativePreparedBlocks {
    inner: Arc<PreparedBlocks>,
}

#[napi]
impl NativePreparedBlocks {
    /// What `writePrepared` takes for this list (the TypeScript layer takes it once).
    #[napi(getter, ts_return_type = "ExternalObject<'PreparedList'>")]
    pub fn list(&self) -> External<Arc<PreparedBlocks>> {
        External::new(Arc::clone(&self.inner))
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
