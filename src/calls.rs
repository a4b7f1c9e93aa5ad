//! The per-call functions, `writeCache` and `writePrepared`: module functions that take a
//! peer handle (`NativeCommunicator.peer`) as an External, not methods of
//! `NativeCommunicator`. napi-rs opens a borrow scope around every method call on a class
//! instance, which cost more than half of an empty method's call (0.44 µs vs 0.20 µs on
//! the 2-vCPU host); an External is one `napi_get_value_external`. The handle carries the
//! communicator's engine and the peer's connection: no key string crosses from JavaScript
//! and the engine looks nothing up while that connection lasts.

use crate::errors::{to_js_error, Code};
use crate::{block_id_slices, lock, on_thread, BlockIdSlices, NativeCommunicator, SettledCallback};
use kvtransfer_engine::{
    CallAbort, CallBlocks, CallPeer, CallSink, Engine, Integrity, OnDone, PeerHandle,
    PreparedBlocks, WriteCall,
};
use napi::bindgen_prelude::*;
use napi::threadsafe_function::ThreadsafeFunctionCallMode;
use napi_derive::napi;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a communicator's calls need: its engine and where settled calls are reported.
pub struct Calls {
    engine: Engine,
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

/// A peer as the per-call functions take it: the communicator's calls and the engine's
/// handle on the peer.
pub struct PeerCalls {
    calls: Arc<Calls>,
    peer: PeerHandle,
}

impl PeerCalls {
    /// The communicator's engine.
    pub(crate) fn engine(&self) -> &Engine {
        &self.calls.engine
    }

    /// The engine's handle on the peer.
    pub(crate) fn handle(&self) -> &PeerHandle {
        &self.peer
    }
}

#[napi]
impl NativeCommunicator {
    /// The handle `writeCache` and `writePrepared` take for the peer connected as
    /// `peer_key` (throws `ERR_NOT_CONNECTED` when none is). The TypeScript layer takes it
    /// once per connect.
    #[napi(ts_return_type = "ExternalObject<'Peer'>")]
    pub fn peer(&self, peer_key: String) -> Result<External<PeerCalls>, Code> {
        let peer = self.engine.peer(&peer_key).map_err(to_js_error)?;
        Ok(External::new(PeerCalls {
            calls: Arc::clone(&self.calls),
            peer,
        }))
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

/// `writeCache` to `peer` (a handle from `NativeCommunicator.peer`). Validates
/// synchronously (throws, nothing sent); once the peer has every byte, or the call failed,
/// `onCallSettled(callId, error)` is called (exactly once when this returns without
/// throwing). With `abortable`, returns the call's handle for `abortCall`, else null.
#[napi(ts_return_type = "ExternalObject<'CallAbort'> | null")]
#[allow(
    clippy::too_many_arguments,
    reason = "the arguments of the JS call, one by one: an options object would cost a conversion per call"
)]
pub fn write_cache<'env>(
    #[napi(ts_arg_type = "ExternalObject<'Peer'>")] peer: &External<PeerCalls>,
    call_id: u32,
    #[napi(ts_arg_type = "Uint32Array | Int32Array | Float64Array")] local_block_ids: BlockIdSlices<
        'env,
    >,
    #[napi(ts_arg_type = "Uint32Array | Int32Array | Float64Array")]
    remote_block_ids: BlockIdSlices<'env>,
    layer_idx: f64,
    tag: Option<Buffer>,
    timeout_ms: Option<f64>,
    abortable: Option<bool>,
    integrity: Option<u32>,
) -> Result<Option<External<CallAbort>>, Code> {
    let blocks = CallBlocks::Ids {
        local: block_id_slices(&local_block_ids),
        remote: block_id_slices(&remote_block_ids),
    };
    let call = (layer_idx, tag, timeout_ms, abortable, integrity);
    write(peer, call_id, blocks, call)
}

/// `writeCache` of the prepared block list `list` (`NativePreparedBlocks.list`) to `peer`:
/// no id is validated or planned again. The engine refuses a list another communicator
/// prepared or one prepared for another peer.
#[napi(ts_return_type = "ExternalObject<'CallAbort'> | null")]
#[allow(
    clippy::too_many_arguments,
    reason = "the arguments of the JS call, one by one: an options object would cost a conversion per call"
)]
pub fn write_prepared(
    #[napi(ts_arg_type = "ExternalObject<'Peer'>")] peer: &External<PeerCalls>,
    call_id: u32,
    #[napi(ts_arg_type = "ExternalObject<'PreparedList'>")] list: &External<Arc<PreparedBlocks>>,
    layer_idx: f64,
    tag: Option<Buffer>,
    timeout_ms: Option<f64>,
    abortable: Option<bool>,
    integrity: Option<u32>,
) -> Result<Option<External<CallAbort>>, Code> {
    let call = (layer_idx, tag, timeout_ms, abortable, integrity);
    write(peer, call_id, CallBlocks::Prepared(list), call)
}

/// `integrity` bits of the per-call functions: a checksum the receiver verifies.
const INTEGRITY_CHECKSUM: u32 = 1;
/// `integrity` bits of the per-call functions: an acknowledged delivery.
const INTEGRITY_ACKED: u32 = 2;

/// A call's layer, tag, timeout, whether it may be aborted and its integrity bits, as the
/// per-call functions take them.
type CallArgs = (f64, Option<Buffer>, Option<f64>, Option<bool>, Option<u32>);

/// What both per-call functions do with their converted arguments. An `abortable` call
/// returns the handle `abortCall` takes (none is made for other calls).
fn write(
    peer: &PeerCalls,
    call_id: u32,
    blocks: CallBlocks<'_>,
    (layer, tag, timeout_ms, abortable, integrity): CallArgs,
) -> Result<Option<External<CallAbort>>, Code> {
    let on_done = peer.calls.on_done(call_id)?;
    let bits = integrity.unwrap_or(0);
    let call = WriteCall {
        peer: CallPeer::Handle(&peer.peer),
        blocks,
        layer,
        tag: tag.map(|t| t.to_vec()),
        timeout: timeout(timeout_ms),
        integrity: Integrity {
            checksum: bits & INTEGRITY_CHECKSUM != 0,
            acked: bits & INTEGRITY_ACKED != 0,
        },
    };
    let engine = &peer.calls.engine;
    if abortable == Some(true) {
        let abort = engine.write_abortable(call, on_done).map_err(to_js_error)?;
        Ok(Some(External::new(abort)))
    } else {
        engine.write(call, on_done).map_err(to_js_error)?;
        Ok(None)
    }
}

/// Aborts the call whose handle `writeCache` or `writePrepared` returned, if it is still
/// pending in the engine; resolves with whether it was (see `CallAbort::abort`: a call
/// that completed first keeps its outcome and its connection). Its Promise then rejects
/// with `ERR_ABORTED` through `onCallSettled`, after the teardown.
#[napi(ts_return_type = "Promise<boolean>")]
pub fn abort_call<'env>(
    env: &'env Env,
    #[napi(ts_arg_type = "ExternalObject<'CallAbort'>")] call: &External<CallAbort>,
) -> Result<PromiseRaw<'env, bool>, Code> {
    let abort = CallAbort::clone(call);
    on_thread(env, "kvt-abort", "an aborted call".into(), move || {
        Ok(abort.abort())
    })
}
