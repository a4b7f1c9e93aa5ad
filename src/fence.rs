//! Fences (`decode.fence`): the writing side honours a receiver's fence, the receiving side
//! cuts a writer off that did not acknowledge one. Both block, so each runs on a thread of
//! its own and settles a Promise.

use crate::errors::Code;
use crate::{on_thread, NativeCommunicator};
use kvtransfer_engine::FenceScope;
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::time::Duration;

#[napi]
impl NativeCommunicator {
    /// Writing side: the receiver `peerKey` fenced `tag` (an encoded tag), or every call
    /// (`tag` null). New calls of it to that peer are refused with `ERR_FENCED` for
    /// `holdMs`; pending ones fail with `ERR_FENCED` and their connection is torn down.
    /// Resolves with how many pending calls were fenced, once none of their bytes can land.
    #[napi(ts_return_type = "Promise<number>")]
    pub fn fence_writes<'env>(
        &self,
        env: &'env Env,
        peer_key: String,
        tag: Option<Buffer>,
        hold_ms: f64,
    ) -> Result<PromiseRaw<'env, u32>, Code> {
        let scope = tag.map_or(FenceScope::All, |t| FenceScope::Tag(t.to_vec()));
        let hold = Duration::try_from_secs_f64(hold_ms.max(0.0) / 1000.0).unwrap_or(Duration::MAX);
        let engine = self.engine.clone();
        on_thread(env, "kvt-fence", peer_key.clone(), move || {
            let fenced = engine.fence_writes(&peer_key, scope, hold)?;
            Ok(u32::try_from(fenced).unwrap_or(u32::MAX))
        })
    }

    /// Receiving side: cuts the writer named `writer` off on every transport (it did not
    /// acknowledge a fence within `waitedMs`). Resolves with how many connections were cut,
    /// once nothing it sent can land any more; rejects `ERR_TIMEOUT` where a transport
    /// cannot stop it from this side (NVLink).
    #[napi(ts_return_type = "Promise<number>")]
    pub fn cut_off<'env>(
        &self,
        env: &'env Env,
        writer: String,
        waited_ms: f64,
    ) -> Result<PromiseRaw<'env, u32>, Code> {
        let waited =
            Duration::try_from_secs_f64(waited_ms.max(0.0) / 1000.0).unwrap_or(Duration::MAX);
        let engine = self.engine.clone();
        on_thread(env, "kvt-cut-off", writer.clone(), move || {
            let cut = engine.cut_off(&writer, waited)?;
            Ok(u32::try_from(cut).unwrap_or(u32::MAX))
        })
    }
}
