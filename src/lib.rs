//! Thin napi-rs binding over `kvtransfer-engine`: argument conversion, Promises and one
//! error map. No transfer logic lives here.

use futures_channel::oneshot;
use kvtransfer_engine::BlockIds;
use kvtransfer_engine::{Arrival, Engine, EngineOptions, Role};
use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;
use std::sync::Arc;
use std::time::Duration;

/// The one error map: engine errors become JS errors whose message starts with the stable
/// code in brackets; the TypeScript layer lifts it into `err.code`.
fn to_js_error(error: kvtransfer_engine::Error) -> napi::Error {
    napi::Error::new(Status::GenericFailure, native_message(&error))
}

/// An engine error as the message the TypeScript layer parses: `[CODE] text`.
fn native_message(error: &kvtransfer_engine::Error) -> String {
    format!("[{}] {error}", error.code())
}

fn invalid(name: &'static str, reason: impl Into<String>) -> napi::Error {
    to_js_error(kvtransfer_engine::Error::invalid(name, reason))
}

/// A cache region: a native or device address owned by the caller, or bytes owned by JS
/// (kept alive by this communicator until it is dropped).
type RegionInput = Either<BigInt, Uint8Array>;

/// Block ids as accepted from JavaScript, borrowed for the duration of the synchronous
/// call: no napi reference is created or deleted per typed array (the engine copies what it
/// needs into its runs before the call returns).
type BlockIdSlices<'env> =
    Either3<Uint32ArraySlice<'env>, Int32ArraySlice<'env>, Float64ArraySlice<'env>>;

fn block_id_slices<'a>(input: &'a BlockIdSlices<'_>) -> BlockIds<'a> {
    match input {
        Either3::A(ids) => BlockIds::U32(ids),
        Either3::B(ids) => BlockIds::I32(ids),
        Either3::C(ids) => BlockIds::F64(ids),
    }
}

#[napi(object)]
pub struct NativeOptions {
    /// "prefill" or "decode".
    pub role: String,
    pub gpu_idx: u32,
    /// This side's name as reported to peers with arrival notices.
    pub name: String,
    pub local_key_cache: Vec<Either<BigInt, Uint8Array>>,
    pub local_value_cache: Vec<Either<BigInt, Uint8Array>>,
    pub block_number: u32,
    pub block_bytes: f64,
    /// "auto" | "rdma" | "tcp"; absent: `KVCACHE_TRANSPORT`, else "auto".
    pub transport: Option<String>,
    /// Milliseconds the data connection may take to open (default 10000).
    pub connect_timeout_ms: Option<u32>,
    /// Shared secret of the handshake; absent: `KVCACHE_AUTH_TOKEN`; empty: none.
    pub auth_token: Option<String>,
}

/// Live resources of the native engine (leak checks).
#[napi(object)]
pub struct NativeStats {
    pub peers: u32,
    pub live_links: u32,
    pub tcp_receivers: u32,
    pub registered_regions: u32,
    pub remembered_hellos: u32,
    pub timed_calls: u32,
    pub process_threads: u32,
}

/// An arrival notice: every byte of a tagged `writeCache` call is in this side's memory.
#[napi(object)]
pub struct ArrivalNotice {
    pub peer: String,
    pub tag: Buffer,
    pub layer_idx: u32,
    pub blocks: u32,
}

type ArrivalCallback = ThreadsafeFunction<ArrivalNotice, (), ArrivalNotice, Status, false, true>;

/// `(callId, error)`: a `writeCache` call settled; `error` is null on success, else the
/// `[CODE] text` message of its failure.
type CallSettled = FnArgs<(u32, Option<String>)>;

/// The one threadsafe function of a communicator that reports settled `writeCache` calls
/// (one per call would cost a threadsafe function and a task per call). Weak: the
/// TypeScript layer holds the process open while calls are pending.
type SettledCallback = ThreadsafeFunction<CallSettled, (), CallSettled, Status, false, true>;

fn region_address(
    name: &'static str,
    index: usize,
    region: &RegionInput,
    region_bytes: u64,
) -> Result<u64> {
    match region {
        Either::A(address) => {
            let (negative, value, lossless) = address.get_u64();
            if negative || !lossless || value == 0 {
                return Err(invalid(
                    name,
                    format!("region {index}: the bigint address must be a positive 64-bit value"),
                ));
            }
            Ok(value)
        }
        Either::B(bytes) => {
            if (bytes.len() as u64) < region_bytes {
                return Err(invalid(
                    name,
                    format!(
                        "region {index} has {} bytes but blockNumber × blockBytes = {region_bytes}",
                        bytes.len()
                    ),
                ));
            }
            Ok(bytes.as_ptr() as u64)
        }
    }
}

/// The native half of `RDMACommunicator`; use the TypeScript class instead.
#[napi]
pub struct NativeCommunicator {
    engine: Engine,
    /// JS-owned regions, held so that their memory outlives every transfer.
    _regions: Vec<RegionInput>,
    /// The arrival callback; dropped at close so that the JS function it holds (which
    /// refers back to the communicator) no longer keeps the communicator alive.
    arrival_fn: ArrivalSlot,
    /// Reports settled `writeCache` calls; taken at close (pending calls hold their own
    /// reference until the engine fails them, then it is released).
    settled_fn: std::sync::Mutex<Option<Arc<SettledCallback>>>,
}

type ArrivalSlot = Arc<std::sync::Mutex<Option<Arc<ArrivalCallback>>>>;

#[napi]
impl NativeCommunicator {
    #[napi(constructor)]
    pub fn new(
        options: NativeOptions,
        // Spelled out (not `CallSettled`): the TypeScript generator does not resolve aliases.
        on_call_settled: Function<FnArgs<(u32, Option<String>)>, ()>,
        on_arrival: Option<Function<ArrivalNotice, ()>>,
    ) -> Result<Self> {
        let role = Role::parse(&options.role).ok_or_else(|| {
            invalid(
                "role",
                format!("'{}' is not 'prefill' or 'decode'", options.role),
            )
        })?;
        if !(options.block_bytes.fract() == 0.0
            && options.block_bytes >= 1.0
            && options.block_bytes <= 9.007_199_254_740_991e15)
        {
            return Err(invalid(
                "blockBytes",
                format!("{} is not a positive integer", options.block_bytes),
            ));
        }
        let block_bytes = options.block_bytes as u64;
        let region_bytes = u64::from(options.block_number)
            .checked_mul(block_bytes)
            .ok_or_else(|| {
                to_js_error(kvtransfer_engine::Error::RegionOverflow {
                    what: format!(
                        "blockNumber {} × blockBytes {block_bytes} does not fit in 64 bits",
                        options.block_number
                    ),
                })
            })?;
        let keys = options
            .local_key_cache
            .iter()
            .enumerate()
            .map(|(i, r)| region_address("localKeyCache", i, r, region_bytes))
            .collect::<Result<Vec<_>>>()?;
        let values = options
            .local_value_cache
            .iter()
            .enumerate()
            .map(|(i, r)| region_address("localValueCache", i, r, region_bytes))
            .collect::<Result<Vec<_>>>()?;
        let arrival_fn: ArrivalSlot = Arc::default();
        let arrivals = match on_arrival {
            Some(callback) => {
                let tsfn: Arc<ArrivalCallback> = Arc::new(
                    callback
                        .build_threadsafe_function()
                        .weak::<true>()
                        .callee_handled::<false>()
                        .build()?,
                );
                *arrival_fn.lock().unwrap_or_else(|p| p.into_inner()) = Some(tsfn);
                let slot = arrival_fn.clone();
                let sink: kvtransfer_engine::ArrivalSink = Arc::new(move |arrival: Arrival| {
                    let Some(tsfn) = slot.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
                        return;
                    };
                    let notice = ArrivalNotice {
                        peer: arrival.peer,
                        tag: arrival.tag.into(),
                        layer_idx: arrival.layer,
                        blocks: arrival.blocks,
                    };
                    tsfn.call(notice, ThreadsafeFunctionCallMode::NonBlocking);
                });
                Some(sink)
            }
            None => None,
        };
        // JS buffers are host memory by construction: CUDA is asked only about bigints.
        let js_buffers: Vec<u64> = options
            .local_key_cache
            .iter()
            .chain(&options.local_value_cache)
            .filter_map(|r| match r {
                Either::B(bytes) => Some(bytes.as_ptr() as u64),
                Either::A(_) => None,
            })
            .collect();
        let known_host = |addr: u64| js_buffers.contains(&addr);
        let engine_options = EngineOptions {
            role,
            gpu_idx: options.gpu_idx,
            name: options.name,
            keys,
            values,
            block_number: options.block_number,
            block_bytes,
            transport: options.transport,
            arrivals,
            connect_timeout: Duration::from_millis(u64::from(
                options.connect_timeout_ms.unwrap_or(10_000),
            )),
            rdma_settings: None,
            auth_token: options.auth_token.map(String::into_bytes),
        };
        let settled_fn: Arc<SettledCallback> = Arc::new(
            on_call_settled
                .build_threadsafe_function()
                .weak::<true>()
                .callee_handled::<false>()
                .build()?,
        );
        let engine = Engine::with_known_host(engine_options, &known_host).map_err(to_js_error)?;
        let mut regions = options.local_key_cache;
        regions.extend(options.local_value_cache);
        Ok(NativeCommunicator {
            engine,
            _regions: regions,
            arrival_fn,
            settled_fn: std::sync::Mutex::new(Some(settled_fn)),
        })
    }

    /// "tcp" or "rdma": the transport this side offers.
    #[napi(getter)]
    pub fn transport(&self) -> &'static str {
        self.engine.transport_name()
    }

    /// First handshake message to the peer `peer_key`: this side's nonce.
    #[napi]
    pub fn auth_challenge(&self, peer_key: String) -> Result<Buffer> {
        self.engine
            .auth_challenge(&peer_key)
            .map(Buffer::from)
            .map_err(to_js_error)
    }

    /// Answers a connecting peer's challenge (this side's nonce and proof), or throws.
    #[napi]
    pub fn auth_respond(&self, challenge: Buffer) -> Result<Buffer> {
        self.engine
            .auth_respond(&challenge)
            .map(Buffer::from)
            .map_err(to_js_error)
    }

    /// Checks the acceptor's `response`, then returns this side's descriptor envelope.
    #[napi]
    pub fn hello(&self, peer_key: String, response: Buffer) -> Result<Buffer> {
        self.engine
            .hello(&peer_key, &response)
            .map(Buffer::from)
            .map_err(to_js_error)
    }

    /// Answers a peer's hello with this side's descriptor, or throws why it is refused.
    #[napi]
    pub fn accept(&self, hello: Buffer) -> Result<Buffer> {
        self.engine
            .accept(&hello)
            .map(Buffer::from)
            .map_err(to_js_error)
    }

    /// Opens the data path to the peer that sent `reply`; resolves when usable.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn finish_connect<'env>(
        &self,
        env: &'env Env,
        peer_key: String,
        host: String,
        reply: Buffer,
    ) -> Result<PromiseRaw<'env, ()>> {
        let engine = self.engine.clone();
        let reply = reply.to_vec();
        let (done, completion) = oneshot::channel();
        std::thread::Builder::new()
            .name("kvt-connect".into())
            .spawn(move || {
                let _ = done.send(engine.finish_connect(&peer_key, &host, &reply));
            })
            .map_err(|e| {
                napi::Error::from_reason(format!("[ERR_IO] cannot start a connect thread: {e}"))
            })?;
        env.spawn_future(async move {
            match completion.await {
                Ok(result) => result.map_err(to_js_error),
                Err(_) => Err(to_js_error(kvtransfer_engine::Error::Closed)),
            }
        })
    }

    #[napi]
    pub fn is_connected(&self, peer_key: String) -> bool {
        self.engine.is_connected(&peer_key)
    }

    /// The transport used with a connected peer, or null.
    #[napi]
    pub fn peer_transport(&self, peer_key: String) -> Option<&'static str> {
        self.engine
            .peer_info(&peer_key)
            .map(|info| info.transport.name())
    }

    /// Validates synchronously (throws, nothing sent); once the peer has every byte, or the
    /// call failed, `onCallSettled(callId, error)` is called (exactly once when this
    /// returns without throwing).
    #[napi]
    #[allow(clippy::too_many_arguments)]
    pub fn write_cache<'env>(
        &self,
        call_id: u32,
        peer_key: String,
        local_block_ids: Either3<
            Uint32ArraySlice<'env>,
            Int32ArraySlice<'env>,
            Float64ArraySlice<'env>,
        >,
        remote_block_ids: Either3<
            Uint32ArraySlice<'env>,
            Int32ArraySlice<'env>,
            Float64ArraySlice<'env>,
        >,
        layer_idx: f64,
        tag: Option<Buffer>,
        timeout_ms: Option<f64>,
    ) -> Result<()> {
        let deadline = match timeout_ms {
            Some(ms) if ms.is_finite() && ms > 0.0 => {
                Some(std::time::Instant::now() + Duration::from_secs_f64(ms.min(3.1e10) / 1000.0))
            }
            _ => None,
        };
        let settled_fn = self
            .settled_fn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| to_js_error(kvtransfer_engine::Error::Closed))?;
        let on_done = Box::new(move |result: kvtransfer_engine::Result<()>| {
            let error = result.err().map(|error| native_message(&error));
            settled_fn.call(
                (call_id, error).into(),
                ThreadsafeFunctionCallMode::NonBlocking,
            );
        });
        self.engine
            .write_cache_with_callback(
                &peer_key,
                block_id_slices(&local_block_ids),
                block_id_slices(&remote_block_ids),
                layer_idx,
                tag.map(|t| t.to_vec()),
                deadline,
                on_done,
            )
            .map_err(to_js_error)
    }

    /// Tears the link to `peer_key` down (`reason`: "abort" or "timeout"); resolves, with
    /// whether a link existed, once no byte of its calls can land any more and every
    /// pending call of it has failed (`ERR_ABORTED` / `ERR_TIMEOUT`).
    #[napi(ts_return_type = "Promise<boolean>")]
    pub fn cancel_peer<'env>(
        &self,
        env: &'env Env,
        peer_key: String,
        reason: String,
        timeout_ms: Option<f64>,
    ) -> Result<PromiseRaw<'env, bool>> {
        let error = match reason.as_str() {
            "abort" => kvtransfer_engine::Error::Aborted,
            "timeout" => kvtransfer_engine::Error::Timeout {
                ms: timeout_ms.unwrap_or(0.0).max(0.0) as u64,
                what: format!("a call to {peer_key}; the connection was torn down first"),
            },
            other => {
                return Err(invalid(
                    "reason",
                    format!("'{other}' is not 'abort' or 'timeout'"),
                ))
            }
        };
        let engine = self.engine.clone();
        let (done, completion) = oneshot::channel();
        std::thread::Builder::new()
            .name("kvt-cancel".into())
            .spawn(move || {
                let _ = done.send(engine.cancel_peer(&peer_key, error));
            })
            .map_err(|e| {
                napi::Error::from_reason(format!("[ERR_IO] cannot start a cancel thread: {e}"))
            })?;
        env.spawn_future(async move { Ok(completion.await.unwrap_or(false)) })
    }

    /// Live resources of the engine (peers, links, receivers, regions, threads).
    #[napi]
    pub fn stats(&self) -> NativeStats {
        let s = self.engine.stats();
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        NativeStats {
            peers: n(s.peers),
            live_links: n(s.live_links),
            tcp_receivers: n(s.tcp_receivers),
            registered_regions: n(s.registered_regions),
            remembered_hellos: n(s.remembered_hellos),
            timed_calls: n(s.timed_calls),
            process_threads: n(s.process_threads),
        }
    }

    /// Closes all links; afterwards no engine thread touches the regions.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn close<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, ()>> {
        self.settled_fn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let engine = self.engine.clone();
        let arrival_fn = self.arrival_fn.clone();
        let (done, completion) = oneshot::channel();
        std::thread::Builder::new()
            .name("kvt-close".into())
            .spawn(move || {
                engine.close();
                arrival_fn.lock().unwrap_or_else(|p| p.into_inner()).take();
                let _ = done.send(());
            })
            .map_err(|e| {
                napi::Error::from_reason(format!("[ERR_IO] cannot start a close thread: {e}"))
            })?;
        env.spawn_future(async move {
            let _ = completion.await;
            Ok(())
        })
    }
}
