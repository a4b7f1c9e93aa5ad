//! Thin napi-rs binding over `kvtransfer-engine`: argument conversion, Promises and one
//! error map. No transfer logic lives here.

use kvtransfer_engine::lock;
use kvtransfer_engine::BlockIds;
use kvtransfer_engine::{
    Arrival, BlockOrder, ChecksumCheck, Engine, EngineOptions, Error, Role, TpOptions,
};
use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::JsDeferred;
use napi_derive::napi;
use std::sync::Arc;
use std::time::Duration;

mod calls;
pub use calls::{abort_call, write_cache, write_prepared};
mod doctor;
pub use doctor::native_doctor;
mod errors;
mod fence;
mod listen_auth;
mod metrics;
mod prepared;
mod regions;
mod sidecar;
mod swap;
use regions::{RegionInput, Regions};

use errors::{internal_error, invalid, napi_failure, to_js_error, Code, CodedError};

/// Every code an engine error can have (`err.code` of every error this addon throws or
/// rejects with), from the engine's one list.
#[napi]
pub fn error_codes() -> Vec<String> {
    kvtransfer_engine::ERROR_CODES
        .iter()
        .map(|code| (*code).to_string())
        .collect()
}

/// Settles a Promise on the JavaScript thread; an `Err` rejects it with the coded error.
type Settle<T> = Box<dyn FnOnce(Env) -> Result<T>>;

fn settle<T: ToNapiValue + 'static>(
    deferred: JsDeferred<T, Settle<T>>,
    result: kvtransfer_engine::Result<T>,
) {
    deferred.resolve(Box::new(move |env: Env| {
        // A Promise rejection carries a `napi::Error<Status>`; one that holds a JS error
        // object keeps that object, and with it the code.
        result
            .map_err(|error| napi::Error::from(JsError::from(to_js_error(error)).into_unknown(env)))
    }));
}

/// Runs a blocking engine call (`work`) on a new thread named `name` and returns a Promise
/// of its result; the JS thread never waits. `peer` names the call's peer in the error when
/// the thread cannot be started.
fn on_thread<'env, T, W>(
    env: &'env Env,
    name: &str,
    peer: String,
    work: W,
) -> Result<PromiseRaw<'env, T>, Code>
where
    T: ToNapiValue + Send + 'static,
    W: FnOnce() -> kvtransfer_engine::Result<T> + Send + 'static,
{
    let (deferred, promise) = env
        .create_deferred::<T, Settle<T>>()
        .map_err(napi_failure)?;
    // Handed over once the thread runs: when it cannot be started, the Promise is still here
    // to reject.
    let (hand_over, take_over) = std::sync::mpsc::sync_channel::<JsDeferred<T, Settle<T>>>(1);
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                .unwrap_or_else(|panic| Err(internal_error(&*panic)));
            if let Ok(deferred) = take_over.recv() {
                settle(deferred, result);
            }
        });
    match spawned {
        Ok(_) => {
            // The thread holds the receiver until it has taken the Promise over.
            let _ = hand_over.send(deferred);
        }
        Err(error) => settle(
            deferred,
            Err(kvtransfer_engine::Error::io(peer, "thread spawn", error)),
        ),
    }
    Ok(PromiseRaw::new(env.raw(), promise.raw()))
}

/// Block ids as accepted from JavaScript, borrowed for the duration of the synchronous
/// call: no napi reference is created or deleted per typed array (the engine copies what it
/// needs into its runs before the call returns).
/// napi's type generation does not follow aliases: arguments of this type spell their
/// TypeScript type out (`ts_arg_type = "Uint32Array | Int32Array | Float64Array"`).
pub(crate) type BlockIdSlices<'env> =
    Either3<Uint32ArraySlice<'env>, Int32ArraySlice<'env>, Float64ArraySlice<'env>>;

fn block_id_slices<'a>(input: &'a BlockIdSlices<'_>) -> BlockIds<'a> {
    match input {
        Either3::A(ids) => BlockIds::U32(ids),
        Either3::B(ids) => BlockIds::I32(ids),
        Either3::C(ids) => BlockIds::F64(ids),
    }
}

/// `value` as a byte count of at least `min` (an integer JS number below 2^53).
fn byte_count(name: &'static str, value: f64, min: f64) -> Result<u64, Code> {
    if value.fract() == 0.0 && (min..=9.007_199_254_740_991e15).contains(&value) {
        Ok(value as u64)
    } else if min > 0.0 {
        Err(invalid(name, format!("{value} is not a positive integer")))
    } else {
        Err(invalid(
            name,
            format!("{value} is not a non-negative integer"),
        ))
    }
}

/// `value` as a u32 (a JS number's integer form; the engine checks its range). Arguments
/// that the binding would otherwise convert with napi's `u32` (which wraps `-1` to
/// 4294967295) take an `f64` and pass through here.
pub(crate) fn whole_number(name: &'static str, value: f64) -> Result<u32, Code> {
    if value.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&value) {
        Ok(value as u32)
    } else {
        Err(invalid(
            name,
            format!("{value} is not a whole number in 0..{}", u32::MAX),
        ))
    }
}

/// Checks the `dstTpSize` a `connect` expects (a tensor-parallel size), before anything is
/// sent: the engine's rule, so that the TypeScript layer does not repeat it.
#[napi]
pub fn check_dst_tp_size(value: f64) -> Result<(), Code> {
    let size = whole_number("dstTpSize", value)?;
    kvtransfer_engine::check_tp_size("dstTpSize", size).map_err(to_js_error)
}

/// Bytes of one region: `block_number` blocks of `block_bytes` (named `name`).
fn bytes_of_region(block_number: u32, name: &str, block_bytes: u64) -> Result<u64, Code> {
    u64::from(block_number)
        .checked_mul(block_bytes)
        .ok_or_else(|| {
            to_js_error(kvtransfer_engine::Error::RegionOverflow {
                what: format!(
                    "blockNumber {block_number} × {name} {block_bytes} does not fit in 64 bits"
                ),
            })
        })
}

/// The engine's arrival sink: each notice goes to `callback` (through a weak threadsafe
/// function kept in `slot`, which `close` empties).
fn arrival_sink(
    callback: Function<ArrivalNotice, ()>,
    slot: &ArrivalSlot,
) -> Result<kvtransfer_engine::ArrivalSink, Code> {
    let tsfn: Arc<ArrivalCallback> = Arc::new(
        callback
            .build_threadsafe_function()
            .weak::<true>()
            .callee_handled::<false>()
            .build()
            .map_err(napi_failure)?,
    );
    *lock(slot) = Some(tsfn);
    let slot = Arc::clone(slot);
    Ok(Arc::new(move |arrival: Arrival| {
        let Some(tsfn) = lock(&slot).clone() else {
            return;
        };
        let c = arrival.cover;
        let mismatch = match arrival.checksum {
            ChecksumCheck::Mismatch { expected, actual } => Some(Error::ChecksumMismatch {
                peer: arrival.peer.clone(),
                layer: arrival.layer,
                expected,
                actual,
            }),
            _ => None,
        };
        let notice = ArrivalNotice {
            peer: arrival.peer,
            tag: arrival.tag.into(),
            layer_idx: arrival.layer,
            blocks: arrival.blocks,
            tp_rank: c.writer_rank,
            tp_size: c.writer_size,
            part: c.part,
            parts: c.parts,
            verified: arrival.checksum == ChecksumCheck::Verified,
            error_code: mismatch.as_ref().map(|e| e.code().to_string()),
            error_message: mismatch.map(|e| e.to_string()),
        };
        tsfn.call(notice, ThreadsafeFunctionCallMode::NonBlocking);
    }))
}

#[napi(object)]
pub struct NativeOptions {
    /// "prefill" or "decode".
    pub role: String,
    pub gpu_idx: u32,
    /// This side's name as reported to peers with arrival notices (the engine checks it).
    pub name: String,
    /// Address every listener binds (the `host` option: `*`, an IP address or an interface
    /// name); absent: `KVCACHE_SOCKET_IFNAME`'s IPv4 address, else all interfaces.
    pub host: Option<String>,
    #[napi(ts_type = "Array<bigint | Uint8Array | ImportedRegion>")]
    pub local_key_cache: Vec<RegionInput>,
    #[napi(ts_type = "Array<bigint | Uint8Array | ImportedRegion>")]
    pub local_value_cache: Vec<RegionInput>,
    /// fp8 scale regions (one per layer; empty: none).
    #[napi(ts_type = "Array<bigint | Uint8Array | ImportedRegion>")]
    pub key_scale_cache: Option<Vec<RegionInput>>,
    #[napi(ts_type = "Array<bigint | Uint8Array | ImportedRegion>")]
    pub value_scale_cache: Option<Vec<RegionInput>>,
    pub block_number: u32,
    pub block_bytes: f64,
    /// Bytes per scale block (0: no scale regions).
    pub scale_block_bytes: Option<f64>,
    /// "auto" | "rdma" | "tcp"; absent: `KVCACHE_TRANSPORT`, else "auto".
    pub transport: Option<String>,
    /// Milliseconds the data connection may take to open (default 10000; 0: no bound).
    pub connect_timeout_ms: Option<u32>,
    /// Shared secret of the handshake; absent: `KVCACHE_AUTH_TOKEN`; empty: none.
    pub auth_token: Option<String>,
    /// Tensor-parallel ranks the heads are split over (default 1; the engine checks the
    /// range).
    pub tp_size: Option<f64>,
    /// This side's rank, `0..tpSize` (default 0).
    pub tp_rank: Option<f64>,
    /// Every rank holds the whole cache (MLA): whole blocks, any pairing (default false).
    pub kv_replicated: Option<bool>,
    /// Token-major blocks of this many token rows; 0 or absent: head-major.
    pub tokens_per_block: Option<u32>,
    /// RDMA devices, one rail each (the engine checks them); absent: the automatic choice.
    pub rdma_devices: Option<Vec<String>>,
}

/// Live resources of the native engine (leak checks).
#[napi(object)]
pub struct NativeStats {
    pub peers: u32,
    pub live_links: u32,
    pub receivers: u32,
    pub registered_regions: u32,
    pub remembered_hellos: u32,
    pub open_fence_grants: u32,
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
    /// The writer's tpRank and tpSize, and the part of this side's blocks it wrote.
    pub tp_rank: u32,
    pub tp_size: u32,
    pub part: u32,
    pub parts: u32,
    /// The call's checksum was verified against this side's memory.
    pub verified: bool,
    /// `ERR_CHECKSUM_MISMATCH` and its message when the bytes failed their checksum.
    pub error_code: Option<String>,
    pub error_message: Option<String>,
}

type ArrivalCallback = ThreadsafeFunction<ArrivalNotice, (), ArrivalNotice, Status, false, true>;

/// A connected peer whose link stopped being usable (see `kvtransfer_engine::PeerLeft`).
#[napi(object)]
pub struct PeerLeftNotice {
    /// `host:port`, as connected.
    pub peer: String,
    /// The stable code of why (`ERR_PEER_DISCONNECTED`, `ERR_TIMEOUT`, `ERR_ABORTED`, ...).
    pub code: String,
    /// What happened, in a sentence.
    pub reason: String,
}

type PeerLeftCallback = ThreadsafeFunction<PeerLeftNotice, (), PeerLeftNotice, Status, false, true>;

/// The engine's sink of peers that left: each goes to `callback` (a weak threadsafe
/// function, released when the engine's sink is cleared at close).
fn peer_left_sink(
    callback: Function<PeerLeftNotice, ()>,
) -> Result<kvtransfer_engine::PeerLeftSink, Code> {
    let tsfn: PeerLeftCallback = callback
        .build_threadsafe_function()
        .weak::<true>()
        .callee_handled::<false>()
        .build()
        .map_err(napi_failure)?;
    Ok(Arc::new(move |left: kvtransfer_engine::PeerLeft| {
        let notice = PeerLeftNotice {
            peer: left.peer,
            code: left.code.to_string(),
            reason: left.reason,
        };
        tsfn.call(notice, ThreadsafeFunctionCallMode::NonBlocking);
    }))
}

/// `(callId, error)`: a `writeCache` call settled; `error` is null on success, else its
/// failure (a JS error with `code`).
type CallSettled = FnArgs<(u32, Option<CodedError>)>;

/// The one threadsafe function of a communicator that reports settled `writeCache` calls
/// (one per call would cost a threadsafe function and a task per call). Weak: the
/// TypeScript layer holds the process open while calls are pending.
type SettledCallback = ThreadsafeFunction<CallSettled, (), CallSettled, Status, false, true>;

/// The native half of `RDMACommunicator`; use the TypeScript class instead.
#[napi]
pub struct NativeCommunicator {
    engine: Engine,
    /// JS-owned regions, held so that their memory outlives every transfer.
    _regions: Vec<Uint8Array>,
    /// The arrival callback; dropped at close so that the JS function it holds (which
    /// refers back to the communicator) no longer keeps the communicator alive.
    arrival_fn: ArrivalSlot,
    /// What the per-call functions reach this communicator by (`calls.rs`).
    calls: Arc<calls::Calls>,
}

type ArrivalSlot = Arc<std::sync::Mutex<Option<Arc<ArrivalCallback>>>>;

#[napi]
impl NativeCommunicator {
    #[napi(constructor)]
    pub fn new(
        options: NativeOptions,
        // Typed by hand: the TypeScript generator does not resolve the alias.
        #[napi(ts_arg_type = "(callId: number, error?: Error | null) => void")]
        on_call_settled: Function<CallSettled, ()>,
        on_arrival: Option<Function<ArrivalNotice, ()>>,
        on_peer_left: Option<Function<PeerLeftNotice, ()>>,
    ) -> Result<Self, Code> {
        let role = Role::parse(&options.role).ok_or_else(|| {
            invalid(
                "role",
                format!("{:?} is not 'prefill' or 'decode'", options.role),
            )
        })?;
        let block_bytes = byte_count("blockBytes", options.block_bytes, 1.0)?;
        let scale_block_bytes = byte_count(
            "scaleBlockBytes",
            options.scale_block_bytes.unwrap_or(0.0),
            0.0,
        )?;
        let key_scale_cache = options.key_scale_cache.unwrap_or_default();
        let value_scale_cache = options.value_scale_cache.unwrap_or_default();
        let region_bytes = bytes_of_region(options.block_number, "blockBytes", block_bytes)?;
        let scale_region_bytes =
            bytes_of_region(options.block_number, "scaleBlockBytes", scale_block_bytes)?;
        let mut regions = Regions::new(options.gpu_idx);
        let keys = regions.addresses("localKeyCache", options.local_key_cache, region_bytes)?;
        let values =
            regions.addresses("localValueCache", options.local_value_cache, region_bytes)?;
        let key_scales = regions.addresses("keyScaleCache", key_scale_cache, scale_region_bytes)?;
        let value_scales =
            regions.addresses("valueScaleCache", value_scale_cache, scale_region_bytes)?;
        let arrival_fn: ArrivalSlot = Arc::default();
        let arrivals = on_arrival
            .map(|callback| arrival_sink(callback, &arrival_fn))
            .transpose()?;
        let js_buffers = std::mem::take(&mut regions.js_buffers);
        let known_host = |addr: u64| js_buffers.contains(&addr);
        let engine_options = EngineOptions {
            role,
            gpu_idx: options.gpu_idx,
            name: options.name,
            host: options.host,
            keys,
            values,
            key_scales,
            value_scales,
            block_number: options.block_number,
            block_bytes,
            scale_block_bytes,
            transport: options.transport,
            arrivals,
            connect_timeout: Duration::from_millis(u64::from(
                options.connect_timeout_ms.unwrap_or(10_000),
            )),
            rdma_settings: None,
            rdma_devices: options.rdma_devices,
            auth_token: options.auth_token.map(String::into_bytes),
            tp: TpOptions {
                size: whole_number("tpSize", options.tp_size.unwrap_or(1.0))?,
                rank: whole_number("tpRank", options.tp_rank.unwrap_or(0.0))?,
                replicated: options.kv_replicated.unwrap_or(false),
                order: BlockOrder::from_tokens_per_block(options.tokens_per_block.unwrap_or(0)),
            },
            imports: std::mem::take(&mut regions.imports),
        };
        let settled_fn: SettledCallback = on_call_settled
            .build_threadsafe_function()
            .weak::<true>()
            .callee_handled::<false>()
            .build()
            .map_err(napi_failure)?;
        let peer_left = on_peer_left.map(peer_left_sink).transpose()?;
        let engine = Engine::with_known_host(engine_options, &known_host).map_err(to_js_error)?;
        engine.on_peer_left(peer_left);
        Ok(NativeCommunicator {
            calls: Arc::new(calls::Calls::new(engine.clone(), settled_fn)),
            engine,
            _regions: regions.held,
            arrival_fn,
        })
    }

    /// The transport this side prefers ("nvlink", "rdma" or "tcp"): the one `auto` picks
    /// with a peer that has it.
    #[napi(getter)]
    pub fn transport(&self) -> &'static str {
        self.engine.transport_name()
    }

    /// First handshake message to the peer `peer_key`: this side's nonce.
    #[napi]
    pub fn auth_challenge(&self, peer_key: String) -> Result<Buffer, Code> {
        self.engine
            .auth_challenge(&peer_key)
            .map(Buffer::from)
            .map_err(to_js_error)
    }

    /// Answers a connecting peer's challenge (this side's nonce and proof), or throws.
    #[napi]
    pub fn auth_respond(&self, challenge: Buffer) -> Result<Buffer, Code> {
        self.engine
            .auth_respond(&challenge)
            .map(Buffer::from)
            .map_err(to_js_error)
    }

    /// Checks the acceptor's `response`, then returns this side's descriptor envelope.
    #[napi]
    pub fn hello(&self, peer_key: String, response: Buffer) -> Result<Buffer, Code> {
        self.engine
            .hello(&peer_key, &response)
            .map(Buffer::from)
            .map_err(to_js_error)
    }

    /// Answers a peer's hello with this side's descriptor, or throws why it is refused.
    #[napi]
    pub fn accept(&self, hello: Buffer) -> Result<Buffer, Code> {
        self.engine
            .accept(&hello)
            .map(Buffer::from)
            .map_err(to_js_error)
    }

    /// Opens the data path to the peer that sent `reply`; resolves when usable. With
    /// `dst_tp_size`, a peer declaring another tpSize is refused (`ERR_TP_MISMATCH`).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn finish_connect<'env>(
        &self,
        env: &'env Env,
        peer_key: String,
        host: String,
        reply: Buffer,
        dst_tp_size: Option<f64>,
    ) -> Result<PromiseRaw<'env, ()>, Code> {
        let dst_tp_size = dst_tp_size
            .map(|size| whole_number("dstTpSize", size))
            .transpose()?;
        let engine = self.engine.clone();
        let reply = reply.to_vec();
        on_thread(env, "kvt-connect", peer_key.clone(), move || {
            engine.finish_connect_expecting(&peer_key, &host, &reply, dst_tp_size)
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
}

#[napi]
impl NativeCommunicator {
    /// Tears the link to `peer_key` down (`reason`: "abort", "timeout" or "lease": the
    /// registry saw the peer's lease expire); resolves, with whether a link existed, once no
    /// byte of its calls can land any more and every pending call of it has failed
    /// (`ERR_ABORTED` / `ERR_TIMEOUT` / `ERR_PEER_DISCONNECTED`). The peer is reported
    /// as left, unless `abandoned`: a connect gave up on the connection (its caller never
    /// saw it connected).
    #[napi(ts_return_type = "Promise<boolean>")]
    pub fn cancel_peer<'env>(
        &self,
        env: &'env Env,
        peer_key: String,
        reason: String,
        timeout_ms: Option<f64>,
        abandoned: Option<bool>,
    ) -> Result<PromiseRaw<'env, bool>, Code> {
        let error = match reason.as_str() {
            "abort" => kvtransfer_engine::Error::Aborted,
            "timeout" => kvtransfer_engine::Error::Timeout {
                ms: timeout_ms.unwrap_or(0.0).max(0.0) as u64,
                what: format!("a call to {peer_key}; the connection was torn down first"),
            },
            "lease" => kvtransfer_engine::Error::PeerDisconnected {
                peer: peer_key.clone(),
                reason: "its registry entry is gone (its lease expired or it left the registry); \
                         connect again once it is back"
                    .to_string(),
            },
            other => {
                return Err(invalid(
                    "reason",
                    format!("'{other}' is not 'abort', 'timeout' or 'lease'"),
                ))
            }
        };
        let engine = self.engine.clone();
        on_thread(env, "kvt-cancel", peer_key.clone(), move || {
            Ok(if abandoned == Some(true) {
                engine.abandon_connect(&peer_key, error)
            } else {
                engine.cancel_peer(&peer_key, error)
            })
        })
    }

    /// Live resources of the engine (peers, links, receivers, regions, threads).
    #[napi]
    pub fn stats(&self) -> NativeStats {
        let s = self.engine.stats();
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        NativeStats {
            peers: n(s.peers),
            live_links: n(s.live_links),
            receivers: n(s.receivers),
            registered_regions: n(s.registered_regions),
            remembered_hellos: n(s.remembered_hellos),
            open_fence_grants: n(s.open_fence_grants),
            timed_calls: n(s.timed_calls),
            process_threads: n(s.process_threads),
        }
    }

    /// Closes all links; afterwards no engine thread touches the regions.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn close<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, ()>, Code> {
        self.calls.stop_settling();
        let engine = self.engine.clone();
        let arrival_fn = Arc::clone(&self.arrival_fn);
        on_thread(env, "kvt-close", "this communicator".into(), move || {
            engine.close();
            lock(&arrival_fn).take();
            engine.on_peer_left(None);
            Ok(())
        })
    }
}

/// GPU memory for demos, benchmarks and tests (`DeviceMemory` in the package): one
/// allocation, zeroed; `write`/`read` copy synchronously.
#[napi]
pub struct NativeDeviceMemory {
    inner: Option<kvtransfer_engine::DeviceMemory>,
}

#[napi]
impl NativeDeviceMemory {
    /// `bytes` of zeroed memory on GPU `gpuIdx` (the CUDA driver is loaded now, not before).
    #[napi(factory)]
    pub fn alloc(gpu_idx: f64, bytes: f64) -> Result<NativeDeviceMemory, Code> {
        let gpu_idx = whole_number("gpuIdx", gpu_idx)?;
        if !(bytes.is_finite() && bytes >= 1.0 && bytes.fract() == 0.0 && bytes <= 2f64.powi(53)) {
            return Err(invalid(
                "bytes",
                format!("{bytes} given; a whole number of bytes, at least 1"),
            ));
        }
        let inner =
            kvtransfer_engine::DeviceMemory::alloc(gpu_idx, bytes as u64).map_err(to_js_error)?;
        Ok(NativeDeviceMemory { inner: Some(inner) })
    }

    fn memory(&self) -> Result<&kvtransfer_engine::DeviceMemory, Code> {
        self.inner
            .as_ref()
            .ok_or_else(|| invalid("DeviceMemory", "used after free()"))
    }

    /// The device address (for `localKeyCache` / `localValueCache`).
    #[napi(getter)]
    pub fn address(&self) -> Result<BigInt, Code> {
        Ok(BigInt::from(self.memory()?.address()))
    }

    #[napi(getter)]
    pub fn bytes(&self) -> Result<f64, Code> {
        Ok(self.memory()?.bytes() as f64)
    }

    #[napi(getter)]
    pub fn gpu(&self) -> Result<u32, Code> {
        Ok(self.memory()?.gpu())
    }

    /// Copies `data` to byte `offset`.
    #[napi]
    pub fn write(&self, offset: f64, data: Buffer) -> Result<(), Code> {
        let offset = byte_offset(offset)?;
        self.memory()?.write(offset, &data).map_err(to_js_error)
    }

    /// `length` bytes from byte `offset`.
    #[napi]
    pub fn read(&self, offset: f64, length: f64) -> Result<Buffer, Code> {
        let offset = byte_offset(offset)?;
        let length = byte_offset(length)?;
        let length = usize::try_from(length)
            .map_err(|_| invalid("length", format!("{length} given; too large")))?;
        Ok(self
            .memory()?
            .read(offset, length)
            .map_err(to_js_error)?
            .into())
    }

    /// Frees the memory (again: nothing).
    #[napi]
    pub fn free(&mut self) {
        self.inner = None;
    }
}

fn byte_offset(value: f64) -> Result<u64, Code> {
    if value.is_finite() && value >= 0.0 && value.fract() == 0.0 && value <= 2f64.powi(53) {
        Ok(value as u64)
    } else {
        Err(invalid(
            "offset",
            format!("{value} given; a whole number of bytes, 0 or more"),
        ))
    }
}

/// GB/s of one large device-to-device copy from GPU `srcGpu` to `dstGpu` (best of `reps`):
/// the NVLink bench's reference. Runs on a worker thread.
#[napi(ts_return_type = "Promise<number>")]
pub fn peer_copy_gbps<'env>(
    env: &'env Env,
    src_gpu: u32,
    dst_gpu: u32,
    bytes: f64,
    reps: u32,
) -> Result<PromiseRaw<'env, f64>, Code> {
    let bytes = byte_offset(bytes)?;
    on_thread(env, "kvt-ceiling", "the link ceiling".into(), move || {
        kvtransfer_engine::peer_copy_gbps(src_gpu, dst_gpu, bytes, reps)
    })
}
