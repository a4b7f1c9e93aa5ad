//! Warm re-attach (the sidecar): a restarted worker's shared memory replaces the old one
//! under the same communicator, so its links to peers stay up. The engine does the work
//! (`Engine::swap_imports`); this converts the regions as the constructor does, and carries
//! the new region keys (RDMA) from the receiving engine to its writers' engines.

use crate::errors::invalid;
use crate::errors::{to_js_error, Code};
use crate::regions::{import_spec, ImportedRegion};
use crate::{on_thread, NativeCommunicator};
use kvtransfer_engine::TransportKind;
use napi::bindgen_prelude::*;
use napi_derive::napi;

#[napi]
impl NativeCommunicator {
    /// Throws `ERR_UNSUPPORTED` (naming why) when this communicator's region memory cannot
    /// be swapped: a region not imported (host or cuMem GPU descriptors), one shared as a
    /// legacy CUDA IPC handle, or a transport that cannot follow a swap (RDMA over GPU
    /// regions).
    #[napi]
    pub fn check_swappable(&self) -> Result<(), Code> {
        match self.engine.swap_refusal() {
            Some(refusal) => Err(to_js_error(refusal)),
            None => Ok(()),
        }
    }

    /// Parks every imported region at the same address (anonymous pages; GPU regions: one
    /// filler granule): the owner's memory is released and nothing lands in it any more.
    #[napi]
    pub fn park_imports(&self) -> Result<(), Code> {
        self.engine.park_imports().map_err(to_js_error)?;
        Ok(())
    }

    /// Maps the given regions (host or cuMem descriptors, in the constructor's order: keys, values,
    /// key scales, value scales) under the communicator's regions, at their addresses.
    /// Everything is checked before anything is mapped.
    #[napi]
    pub fn swap_imports(
        &self,
        local_key_cache: Vec<ImportedRegion>,
        local_value_cache: Vec<ImportedRegion>,
        key_scale_cache: Vec<ImportedRegion>,
        value_scale_cache: Vec<ImportedRegion>,
    ) -> Result<(), Code> {
        let mut specs = Vec::new();
        for (name, list) in [
            ("localKeyCache", local_key_cache),
            ("localValueCache", local_value_cache),
            ("keyScaleCache", key_scale_cache),
            ("valueScaleCache", value_scale_cache),
        ] {
            for (index, region) in list.into_iter().enumerate() {
                specs.push((name, index, import_spec(name, index, region)?));
            }
        }
        self.engine.swap_imports(specs).map_err(to_js_error)?;
        Ok(())
    }
}

/// What a transport's writers need after a swap (see `regionKeys`).
#[napi(object)]
pub struct NativeRegionKeys {
    /// The transport's name (`rdma`, `nvlink`).
    pub transport: String,
    /// Its keys, as that transport encodes them.
    pub keys: Buffer,
}

#[napi]
impl NativeCommunicator {
    /// Receiving side, after `swapImports`: what the writers need to reach the new memory,
    /// per transport that needs anything (RDMA: every rail's new region keys; NVLink: the
    /// number of the memory table it sent them); empty for TCP, and while parked.
    #[napi]
    pub fn region_keys(&self) -> Vec<NativeRegionKeys> {
        self.engine
            .region_keys()
            .into_iter()
            .map(|(kind, keys)| NativeRegionKeys {
                transport: kind.name().to_string(),
                keys: keys.into(),
            })
            .collect()
    }

    /// Writing side: the receiver `peerKey` swapped its memory and sent `keys` for
    /// `transport` (its `regionKeys`): the link to it takes them before its fence is lifted.
    /// Resolves with how many rail pairs were updated (0: no such link, or one that needs
    /// no keys); rejects typed when the link cannot take them (it keeps its old keys).
    #[napi(ts_return_type = "Promise<number>")]
    pub fn rekey<'env>(
        &self,
        env: &'env Env,
        peer_key: String,
        transport: String,
        keys: Buffer,
    ) -> Result<PromiseRaw<'env, u32>, Code> {
        let kind = TransportKind::parse(&transport).ok_or_else(|| {
            invalid(
                "transport",
                format!("\"{transport}\" is not a transport this build knows (tcp, rdma, nvlink)"),
            )
        })?;
        let keys = keys.to_vec();
        let engine = self.engine.clone();
        on_thread(env, "kvt-rekey", peer_key.clone(), move || {
            let updated = engine.rekey(&peer_key, kind, &keys)?;
            Ok(u32::try_from(updated).unwrap_or(u32::MAX))
        })
    }
}
