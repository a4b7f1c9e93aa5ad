//! The per-call functions, `writeCache` and `writePrepared`: module functions that take the
//! communicator's `Calls` as an External, not methods of `NativeCommunicator`. napi-rs
//! opens a borrow scope around every method call on a class instance, which cost more than
//! half of an empty method's call (0.44 µs vs 0.20 µs on the 2-vCPU host); an External is
//! one `napi_get_value_external`.

use crate::prepared::PreparedTable;
use crate::{
    block_id_slices, invalid, lock, to_js_error, BlockIdSlices, Code, NativeCommunicator,
    SettledCallback,
};
use kvtransfer_engine::{CallBlocks, CallSink, Engine, OnDone, WriteCall};
use napi::bindgen_prelude::*;
use napi::threadsafe_function::ThreadsafeFunctionCallMode;
use napi_derive::napi;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a communicator's calls need: its engine, its prepared lists and where settled
/// calls are reported.
pub struct Calls {
    engine: Engine,
    pub(crate) prepared: Arc<PreparedTable>,
    /// Reports settled calls; taken at close (pending calls hold their own reference until
    /// the engine fails them, then it is released).
    settled: Mutex<Option<Arc<Settled>>>,
}

/// The `CallSink` of a communicator: `onCallSettled(callId, error)` through its one
/// threadsafe function.
struct Settled(SettledCallback);

impl CallSink for Settled {
    fn settled(&self, call: u64, result: kvtransfer_engine::Result<()>) {
        let error = result.err().map(to_js_error);
        // Call ids are the TypeScript layer's u32 counter.
        let call = u32::try_from(call).unwrap_or(u32::MAX);
        self.0.call(
            (call, error).into(),
            ThreadsafeFunctionCallMode::NonBlocking,
        );
    }
}

impl Calls {
    pub(crate) fn new(engine: Engine, settled: SettledCallback) -> Calls {
        Calls {
            engine,
            prepared: Arc::default(),
            settled: Mutex::new(Some(Arc::new(Settled(settled)))),
        }
    }

    /// New calls are refused (`ERR_CLOSED`) from now on (the communicator is closing).
    pub(crate) fn stop_settling(&self) {
        lock(&self.settled).take();
    }

    /// Where call `call_id` reports its outcome: `onCallSettled`.
    fn on_done(&self, call_id: u32) -> Result<OnDone, Code> {
        let sink: Arc<dyn CallSink> = lock(&self.settled)
            .clone()
            .ok_or_else(|| to_js_error(kvtransfer_engine::Error::Closed))?;
        Ok(OnDone::Sink(sink, call_id.into()))
    }
}

#[napi]
impl NativeCommunicator {
    /// The handle `writeCache` and `writePrepared` take (held by the TypeScript layer).
    #[napi(ts_return_type = "ExternalObject<'Calls'>")]
    pub fn calls(&self) -> External<Arc<Calls>> {
        External::new(Arc::clone(&self.calls))
    }
}

/// The timeout of a call with `timeout_ms` (absent, 0 or not finite: none). The engine
/// counts it from the call, with the clock read that times the call.
fn timeout(timeout_ms: Option<f64>) -> Option<Duration> {
    match timeout_ms {
        Some(ms) if ms.is_finite() && ms > 0.0 => {
            Some(Duration::from_secs_f64(ms.min(3.1e10) / 1000.0))
        }
        _ => None,
    }
}

/// `writeCache` of the communicator whose `calls()` is `calls`. Validates synchronously
/// (throws, nothing sent); once the peer has every byte, or the call failed,
/// `onCallSettled(callId, error)` is called (exactly once when this returns without
/// throwing).
#[napi]
#[allow(
    clippy::too_many_arguments,
    reason = "one argument per value of the JS call (an options object would cost a conversion on every call); `allow`, not `expect`: napi copies it onto the wrapper it generates, where the lint does not fire"
)]
pub fn write_cache<'env>(
    #[napi(ts_arg_type = "ExternalObject<'Calls'>")] calls: &External<Arc<Calls>>,
    call_id: u32,
    peer_key: String,
    #[napi(ts_arg_type = "Uint32Array | Int32Array | Float64Array")] local_block_ids: BlockIdSlices<
        'env,
    >,
    #[napi(ts_arg_type = "Uint32Array | Int32Array | Float64Array")]
    remote_block_ids: BlockIdSlices<'env>,
    layer_idx: f64,
    tag: Option<Buffer>,
    timeout_ms: Option<f64>,
) -> Result<(), Code> {
    let on_done = calls.on_done(call_id)?;
    calls
        .engine
        .write(
            WriteCall {
                peer_key: &peer_key,
                blocks: CallBlocks::Ids {
                    local: block_id_slices(&local_block_ids),
                    remote: block_id_slices(&remote_block_ids),
                },
                layer: layer_idx,
                tag: tag.map(|t| t.to_vec()),
                timeout: timeout(timeout_ms),
            },
            on_done,
        )
        .map_err(to_js_error)
}

/// `writeCache` of the prepared block list `handle` (`NativePreparedBlocks.handle`), to
/// the peer it was prepared for (the caller checked that it is the one meant): no id is
/// validated or planned again, and no key string crosses from JavaScript.
#[napi]
pub fn write_prepared(
    #[napi(ts_arg_type = "ExternalObject<'Calls'>")] calls: &External<Arc<Calls>>,
    call_id: u32,
    handle: u32,
    layer_idx: f64,
    tag: Option<Buffer>,
    timeout_ms: Option<f64>,
) -> Result<(), Code> {
    let prepared = calls.prepared.get(handle).ok_or_else(|| {
        invalid(
            "prepared",
            format!("no block list has handle {handle} on this communicator; call prepareBlocks"),
        )
    })?;
    let on_done = calls.on_done(call_id)?;
    calls
        .engine
        .write(
            WriteCall {
                peer_key: prepared.peer_key(),
                blocks: CallBlocks::Prepared(&prepared),
                layer: layer_idx,
                tag: tag.map(|t| t.to_vec()),
                timeout: timeout(timeout_ms),
            },
            on_done,
        )
        .map_err(to_js_error)
}
