//! Shared fixtures of the engine's integration tests: two engines with patterned or zeroed
//! regions, connected through the same handshake calls the control plane makes.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the shared fixtures"
)]

pub mod hex;
pub mod imported;
pub mod rdma;

use kvtransfer_engine::RdmaSettings;
use kvtransfer_engine::{Arrival, ArrivalSink, Engine, EngineOptions, Role, TpOptions};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Side {
    pub engine: Engine,
    pub keys: Vec<Vec<u8>>,
    pub values: Vec<Vec<u8>>,
    /// fp8 scale regions (empty without scales).
    pub key_scales: Vec<Vec<u8>>,
    pub value_scales: Vec<Vec<u8>>,
    pub block_bytes: usize,
    pub scale_block_bytes: usize,
}

/// The arrivals a side reported, in order.
pub type Log = Arc<Mutex<Vec<Arrival>>>;

/// An empty log and the sink (`SideSpec::arrivals`) that fills it.
pub fn arrival_log() -> (Log, ArrivalSink) {
    let log: Log = Arc::default();
    let sink = Arc::clone(&log);
    (log, Arc::new(move |a| sink.lock().unwrap().push(a)))
}

/// Deterministic content of a prefill block, distinct per layer, kind and block.
pub fn pattern(layer: usize, kind: u8, block: usize, block_bytes: usize) -> Vec<u8> {
    (0..block_bytes)
        .map(|i| {
            (i as u64 * 31 + block as u64 * 7 + layer as u64 * 131 + u64::from(kind) * 17 + 1) as u8
        })
        .collect()
}

pub struct SideSpec {
    pub role: Role,
    pub layers: usize,
    pub block_number: usize,
    pub block_bytes: usize,
    pub fill: bool,
    pub with_values: bool,
    /// Bytes per scale block; 0: no scale regions.
    pub scale_block_bytes: usize,
    pub transport: &'static str,
    pub rdma: Option<RdmaSettings>,
    pub arrivals: Option<ArrivalSink>,
    /// `None`: no token (the environment is ignored).
    pub auth_token: Option<&'static str>,
    pub tp: TpOptions,
    /// The `host` option (`None`: the environment's default).
    pub host: Option<&'static str>,
    /// `None`: `<role>-test`.
    pub name: Option<String>,
}

impl SideSpec {
    pub fn new(role: Role, layers: usize, block_number: usize, block_bytes: usize) -> SideSpec {
        SideSpec {
            role,
            layers,
            block_number,
            block_bytes,
            fill: role == Role::Prefill,
            with_values: true,
            scale_block_bytes: 0,
            transport: "tcp",
            rdma: None,
            arrivals: None,
            auth_token: None,
            tp: TpOptions::default(),
            host: None,
            name: None,
        }
    }

    pub fn build(self) -> Side {
        self.try_build().unwrap()
    }

    pub fn try_build(self) -> kvtransfer_engine::Result<Side> {
        let make = |kind: u8, bb: usize| -> Vec<Vec<u8>> {
            (0..self.layers)
                .map(|layer| {
                    if self.fill {
                        (0..self.block_number)
                            .flat_map(|b| pattern(layer, kind, b, bb))
                            .collect()
                    } else {
                        vec![0u8; self.block_number * bb]
                    }
                })
                .collect()
        };
        let (bb, sbb) = (self.block_bytes, self.scale_block_bytes);
        let mut keys = make(0, bb);
        let mut values = if self.with_values {
            make(1, bb)
        } else {
            Vec::new()
        };
        let mut key_scales = if sbb > 0 { make(2, sbb) } else { Vec::new() };
        let mut value_scales = if sbb > 0 && self.with_values {
            make(3, sbb)
        } else {
            Vec::new()
        };
        let addrs = |regions: &mut Vec<Vec<u8>>| -> Vec<u64> {
            regions.iter_mut().map(|r| r.as_mut_ptr() as u64).collect()
        };
        let engine = Engine::new(EngineOptions {
            role: self.role,
            gpu_idx: 0,
            name: self
                .name
                .unwrap_or_else(|| format!("{}-test", self.role.as_str())),
            host: self.host.map(String::from),
            keys: addrs(&mut keys),
            values: addrs(&mut values),
            key_scales: addrs(&mut key_scales),
            value_scales: addrs(&mut value_scales),
            block_number: self.block_number as u32,
            block_bytes: self.block_bytes as u64,
            scale_block_bytes: sbb as u64,
            transport: Some(self.transport.into()),
            arrivals: self.arrivals,
            connect_timeout: Duration::from_secs(10),
            rdma_settings: self.rdma,
            rdma_devices: None,
            auth_token: Some(self.auth_token.unwrap_or("").as_bytes().to_vec()),
            tp: self.tp,
            imports: Vec::new(),
        })?;
        Ok(Side {
            engine,
            keys,
            values,
            key_scales,
            value_scales,
            block_bytes: self.block_bytes,
            scale_block_bytes: sbb,
        })
    }
}

/// The handshake of `connect`: challenge → response → hello → accept → finish.
pub fn connect(prefill: &Side, decode: &Side, key: &str) {
    try_connect(prefill, decode, key).unwrap();
}

/// Builds both sides and connects `prefill` to `decode` as `"decode"`.
pub fn pair(prefill: SideSpec, decode: SideSpec) -> (Side, Side) {
    let (prefill, decode) = (prefill.build(), decode.build());
    connect(&prefill, &decode, "decode");
    (prefill, decode)
}

/// The handshake's first three steps: the hello `decode` would be sent.
pub fn hello(prefill: &Side, decode: &Side, key: &str) -> kvtransfer_engine::Result<Vec<u8>> {
    hello_between(&prefill.engine, &decode.engine, key)
}

/// The whole handshake, returning the first error.
pub fn try_connect(prefill: &Side, decode: &Side, key: &str) -> kvtransfer_engine::Result<()> {
    connect_between(&prefill.engine, &decode.engine, key)
}

/// [`hello`] between two engines (a decode engine need not be a [`Side`]).
pub fn hello_between(
    prefill: &Engine,
    decode: &Engine,
    key: &str,
) -> kvtransfer_engine::Result<Vec<u8>> {
    let challenge = prefill.auth_challenge(key)?;
    let response = decode.auth_respond(&challenge)?;
    prefill.hello(key, &response)
}

/// [`try_connect`] between two engines.
pub fn connect_between(
    prefill: &Engine,
    decode: &Engine,
    key: &str,
) -> kvtransfer_engine::Result<()> {
    let hello = hello_between(prefill, decode, key)?;
    let reply = decode.accept(&hello)?;
    prefill.finish_connect(key, "127.0.0.1", &reply)
}

/// Asserts that decode block `remote[i]` equals prefill block `local[i]` (K, V and their
/// scales when present) for the layer, and that every other decode block of the layer is
/// still zero.
pub fn assert_written(prefill: &Side, decode: &Side, layer: usize, local: &[u32], remote: &[u32]) {
    let (kv, sbb) = (decode.block_bytes, decode.scale_block_bytes);
    let pairs: Vec<(&Vec<u8>, &Vec<u8>, usize)> =
        std::iter::once((&decode.keys[layer], &prefill.keys[layer], kv))
            .chain(
                decode
                    .values
                    .get(layer)
                    .zip(prefill.values.get(layer))
                    .map(|(d, s)| (d, s, kv)),
            )
            .chain(
                decode
                    .key_scales
                    .get(layer)
                    .zip(prefill.key_scales.get(layer))
                    .map(|(d, s)| (d, s, sbb)),
            )
            .chain(
                decode
                    .value_scales
                    .get(layer)
                    .zip(prefill.value_scales.get(layer))
                    .map(|(d, s)| (d, s, sbb)),
            )
            .collect();
    for (kind, (dst, src, bb)) in pairs.into_iter().enumerate() {
        for block in 0..dst.len() / bb {
            let got = &dst[block * bb..(block + 1) * bb];
            match remote.iter().rposition(|&r| r as usize == block) {
                Some(i) => {
                    let l = local[i] as usize;
                    assert!(
                        got == &src[l * bb..(l + 1) * bb],
                        "layer {layer} kind {kind} block {block} differs from local block {l}"
                    );
                }
                None => assert!(
                    got.iter().all(|&b| b == 0),
                    "layer {layer} kind {kind}: unlisted block {block} was written"
                ),
            }
        }
    }
}

/// Writes `local` blocks of `layer` to `remote` blocks of the peer `"decode"` and waits for
/// the call's outcome.
pub fn write(
    side: &Side,
    local: &[u32],
    remote: &[u32],
    layer: usize,
    tag: Option<&[u8]>,
) -> kvtransfer_engine::Result<()> {
    let completion = side.engine.write_cache(
        "decode",
        kvtransfer_engine::BlockIds::U32(local),
        kvtransfer_engine::BlockIds::U32(remote),
        layer as f64,
        tag.map(<[u8]>::to_vec),
    )?;
    futures_executor::block_on(completion).expect("completion dropped")
}

/// Makes `call` from `side` and waits for its outcome: `Err` on the outer level is a
/// refusal (nothing was sent), on the inner level a failed transfer.
pub fn settle(
    side: &Side,
    call: kvtransfer_engine::WriteCall<'_>,
) -> kvtransfer_engine::Result<kvtransfer_engine::Result<()>> {
    let (sender, outcome) = std::sync::mpsc::channel();
    side.engine.write(
        call,
        kvtransfer_engine::OnDone::Callback(Box::new(move |result| {
            let _ = sender.send(result);
        })),
    )?;
    Ok(outcome
        .recv()
        .expect("an accepted call reports its outcome"))
}
