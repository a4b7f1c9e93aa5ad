//! Warm re-attach (the sidecar): a restarted worker's shared memory replaces the old one
//! under the same communicator, so its links to peers stay up. The engine does the work
//! (`Engine::swap_imports`); this converts the regions as the constructor does.

use crate::errors::{to_js_error, Code};
use crate::regions::{import_spec, ImportedRegion};
use crate::NativeCommunicator;
use napi::bindgen_prelude::*;
use napi_derive::napi;

#[napi]
impl NativeCommunicator {
    /// Throws `ERR_UNSUPPORTED` (naming why) when this communicator's region memory cannot
    /// be swapped: a region not imported as host memory, or a transport other than TCP.
    #[napi]
    pub fn check_swappable(&self) -> Result<(), Code> {
        match self.engine.swap_refusal() {
            Some(refusal) => Err(to_js_error(refusal)),
            None => Ok(()),
        }
    }

    /// Parks every imported region on anonymous pages at the same address: the owner's
    /// memory is released and nothing lands in it any more.
    #[napi]
    pub fn park_imports(&self) -> Result<(), Code> {
        self.engine.park_imports().map_err(to_js_error)?;
        Ok(())
    }

    /// Maps the given regions (host descriptors, in the constructor's order: keys, values,
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
