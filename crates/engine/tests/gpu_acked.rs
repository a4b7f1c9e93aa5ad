//! `delivery: 'acked'` over NVLink (two engines in one process, GPU 0 writing into the last
//! GPU, or within GPU 0): an acked call resolves only once the receiving engine took its
//! arrival and answered, a plain call keeps resolving when its bytes landed, and an acked
//! call whose answer does not come fails `ERR_TIMEOUT`. The receiver's arrival sink is
//! held shut to stand for a receiver that took nothing (a stopped or dying process).
//! `#[ignore]`d: run with `--ignored` on a GPU machine (scripts/gpu-tests.sh --run).

mod gpu_support;

use gpu_support::{engine_options, pattern, require_gpu, Mem};
use kvtransfer_engine::{
    Arrival, ArrivalSink, BlockIds, Engine, Integrity, OnDone, Role, WriteCall,
};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

const KEY: &str = "nvlink-decode";
const BLOCKS: usize = 64;
const BLOCK_BYTES: usize = 64 << 10;
const SETTLE: Duration = Duration::from_secs(20);

/// The receiver's arrival sink: records each arrival, and blocks while shut.
#[derive(Default)]
struct Gate {
    shut: Mutex<bool>,
    opened: Condvar,
    taken: Mutex<Vec<Vec<u8>>>,
}

impl Gate {
    fn set_shut(&self, shut: bool) {
        *self.shut.lock().unwrap() = shut;
        self.opened.notify_all();
    }

    fn take(&self, arrival: Arrival) {
        let mut shut = self.shut.lock().unwrap();
        while *shut {
            shut = self.opened.wait(shut).unwrap();
        }
        self.taken.lock().unwrap().push(arrival.tag);
    }

    fn taken(&self) -> Vec<Vec<u8>> {
        self.taken.lock().unwrap().clone()
    }
}

struct Pair {
    prefill: Engine,
    decode: Engine,
    _regions: Vec<Mem>,
}

fn pair(test: &str, gate: &Arc<Gate>) -> Pair {
    let gpu = require_gpu(test);
    let cuda = kvtransfer_cuda::Cuda::get().unwrap();
    let decode_gpu = cuda.gpu(cuda.device_count().unwrap() - 1).unwrap();
    let len = BLOCKS * BLOCK_BYTES;
    let mut regions: Vec<Mem> = (0..2)
        .map(|r| Mem::new(Some(&gpu), pattern(r, len, 7)))
        .chain((0..2).map(|_| Mem::new(Some(&decode_gpu), vec![0; len])))
        .collect();
    let addrs: Vec<u64> = regions.iter_mut().map(Mem::addr).collect();
    let options = |role, gpu_idx, name: &str, addrs: &[u64]| {
        engine_options(
            role,
            gpu_idx,
            name,
            addrs,
            BLOCKS,
            BLOCK_BYTES,
            Some("nvlink"),
        )
    };
    let prefill = Engine::new(options(Role::Prefill, 0, "nvlink-prefill", &addrs[..2])).unwrap();
    let sink: ArrivalSink = {
        let gate = Arc::clone(gate);
        Arc::new(move |arrival| gate.take(arrival))
    };
    let decode = Engine::new(kvtransfer_engine::EngineOptions {
        arrivals: Some(sink),
        ..options(
            Role::Decode,
            decode_gpu.ordinal(),
            "nvlink-decode",
            &addrs[2..],
        )
    })
    .unwrap();
    let challenge = prefill.auth_challenge(KEY).unwrap();
    let response = decode.auth_respond(&challenge).unwrap();
    let hello = prefill.hello(KEY, &response).unwrap();
    let reply = decode.accept(&hello).unwrap();
    prefill.finish_connect(KEY, "127.0.0.1", &reply).unwrap();
    Pair {
        prefill,
        decode,
        _regions: regions,
    }
}

type Outcome = Receiver<kvtransfer_engine::Result<()>>;

/// Every block of layer 0, with `tag`, acked or not, and an optional timeout.
fn start(
    prefill: &Engine,
    tag: Option<&[u8]>,
    integrity: Integrity,
    timeout: Option<Duration>,
) -> kvtransfer_engine::Result<Outcome> {
    let ids: Vec<u32> = (0..BLOCKS as u32).collect();
    let (sender, outcome) = channel();
    prefill.write(
        WriteCall {
            integrity,
            timeout,
            ..WriteCall::ids(
                KEY,
                BlockIds::U32(&ids),
                BlockIds::U32(&ids),
                0.0,
                tag.map(<[u8]>::to_vec),
            )
        },
        OnDone::Callback(Box::new(move |result| {
            let _ = sender.send(result);
        })),
    )?;
    Ok(outcome)
}

const ACKED: Integrity = Integrity {
    checksum: false,
    acked: true,
};

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu-tests.sh --run on a GPU machine"]
fn nvlink_an_acked_call_resolves_only_after_the_receiver_took_it() {
    let gate = Arc::new(Gate::default());
    let pair = pair(
        "nvlink_an_acked_call_resolves_only_after_the_receiver_took_it",
        &gate,
    );
    // Resolved means taken: the arrival is recorded before the call resolves.
    for round in 0..20u8 {
        let tag = [b'a', round];
        let outcome = start(&pair.prefill, Some(&tag), ACKED, None).unwrap();
        outcome.recv_timeout(SETTLE).unwrap().unwrap();
        assert!(gate.taken().contains(&tag.to_vec()), "round {round}");
    }
    // An untagged acked call is answered too.
    let untagged = start(&pair.prefill, None, ACKED, None).unwrap();
    untagged.recv_timeout(SETTLE).unwrap().unwrap();

    // A receiver that takes nothing: the acked call waits; a plain call after it resolves
    // when its bytes landed (one-sided, as before).
    gate.set_shut(true);
    let acked = start(&pair.prefill, Some(b"held"), ACKED, None).unwrap();
    let plain = start(&pair.prefill, Some(b"plain"), Integrity::default(), None).unwrap();
    plain.recv_timeout(SETTLE).unwrap().unwrap();
    assert!(
        matches!(
            acked.recv_timeout(Duration::from_millis(500)),
            Err(RecvTimeoutError::Timeout)
        ),
        "an acked call settled while its receiver took nothing"
    );
    gate.set_shut(false);
    acked.recv_timeout(SETTLE).unwrap().unwrap();
    let taken = gate.taken();
    let at = |tag: &[u8]| taken.iter().position(|t| t == tag).unwrap();
    assert!(at(b"held") < at(b"plain"), "{taken:?}");

    // A checksummed acked call is answered once the receiver verified and took it
    // (gpu_checksum.rs checks the verification itself).
    let both = Integrity {
        checksum: true,
        acked: true,
    };
    let summed = start(&pair.prefill, Some(b"sum"), both, None).unwrap();
    summed.recv_timeout(SETTLE).unwrap().unwrap();
    assert!(gate.taken().contains(&b"sum".to_vec()));
    pair.prefill.close();
    pair.decode.close();
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu-tests.sh --run on a GPU machine"]
fn nvlink_an_acked_call_without_an_answer_times_out_typed() {
    let gate = Arc::new(Gate::default());
    let pair = pair(
        "nvlink_an_acked_call_without_an_answer_times_out_typed",
        &gate,
    );
    gate.set_shut(true);
    let acked = start(
        &pair.prefill,
        Some(b"late"),
        ACKED,
        Some(Duration::from_millis(300)),
    )
    .unwrap();
    let error = acked
        .recv_timeout(SETTLE)
        .expect("settles")
        .expect_err("no answer came");
    assert_eq!(error.code(), "ERR_TIMEOUT", "{error}");
    gate.set_shut(false);
    // The timeout tore the link down; nothing more goes to that peer until a reconnect.
    assert!(!pair.prefill.is_connected(KEY));
    pair.prefill.close();
    pair.decode.close();
}

/// What the answer costs per call: sequential calls of one block and of every block, acked
/// and plain alternating in rounds, p50 of each (printed; a report, not a check).
#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu-tests.sh --run on a GPU machine"]
fn nvlink_acked_cost_per_call() {
    let gate = Arc::new(Gate::default());
    let pair = pair("nvlink_acked_cost_per_call", &gate);
    let p50 = |mut us: Vec<f64>| {
        us.sort_by(f64::total_cmp);
        us[us.len() / 2]
    };
    for blocks in [1usize, BLOCKS] {
        let ids: Vec<u32> = (0..blocks as u32).collect();
        let mut times = [Vec::new(), Vec::new()];
        for round in 0..10 {
            for (which, integrity) in [Integrity::default(), ACKED].into_iter().enumerate() {
                for _ in 0..200 {
                    let started = std::time::Instant::now();
                    futures_executor::block_on(
                        pair.prefill
                            .write_call(WriteCall {
                                integrity,
                                ..WriteCall::ids(
                                    KEY,
                                    BlockIds::U32(&ids),
                                    BlockIds::U32(&ids),
                                    0.0,
                                    Some(b"cost".to_vec()),
                                )
                            })
                            .unwrap(),
                    )
                    .unwrap()
                    .unwrap();
                    if round > 0 {
                        times[which].push(started.elapsed().as_secs_f64() * 1e6);
                    }
                }
            }
        }
        let [plain, acked] = times;
        let (plain, acked) = (p50(plain), p50(acked));
        gpu_support::note(&format!(
            "nvlink, {blocks} × {} KiB blocks per call (K+V), tagged, sequential: p50 plain {plain:.1} µs, acked {acked:.1} µs (+{:.1} µs)",
            BLOCK_BYTES >> 10,
            acked - plain
        ));
    }
    pair.prefill.close();
    pair.decode.close();
}
