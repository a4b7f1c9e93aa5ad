//! Fences over NVLink (two engines in one process, GPU 0 writing into the last GPU, or
//! within GPU 0). The writer honours a fence: its fenced calls fail `ERR_FENCED` after its
//! stream was synchronized behind the teardown, so when `fence_writes` returns not one byte
//! of them lands: each round starts writes into every block, fences them mid-flight, paints
//! the blocks with a canary and checks it afterwards. A receiver cannot cut an NVLink writer
//! off (the writer's GPU copies): `cut_off` says so with `ERR_TIMEOUT`. `#[ignore]`d: run
//! with `--ignored` on a GPU machine (scripts/gpu-tests.sh --run).

mod gpu_support;

use futures_executor::block_on;
use gpu_support::{engine_options, pattern, require_gpu, Mem};
use kvtransfer_engine::{BlockIds, Engine, FenceScope, OnDone, Role, WriteCall};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

const KEY: &str = "nvlink-decode";
const BLOCKS: usize = 64;
const BLOCK_BYTES: usize = 1 << 20;
const ROUNDS: usize = 20;
const CANARY: u8 = 0xC5;

struct Pair {
    prefill: Engine,
    decode: Engine,
    _prefill_regions: Vec<Mem>,
    decode_regions: Vec<Mem>,
}

fn pair(test: &str) -> Pair {
    let gpu = require_gpu(test);
    let cuda = kvtransfer_cuda::Cuda::get().unwrap();
    let decode_gpu = cuda.gpu(cuda.device_count().unwrap() - 1).unwrap();
    let len = BLOCKS * BLOCK_BYTES;
    let mut prefill_regions: Vec<Mem> = (0..2)
        .map(|r| Mem::new(Some(&gpu), pattern(r, len, 7)))
        .collect();
    let mut decode_regions: Vec<Mem> = (0..2)
        .map(|_| Mem::new(Some(&decode_gpu), vec![0; len]))
        .collect();
    let engine = |role, gpu_idx, name: &str, regions: &mut Vec<Mem>| {
        let addrs: Vec<u64> = regions.iter_mut().map(Mem::addr).collect();
        Engine::new(engine_options(
            role,
            gpu_idx,
            name,
            &addrs,
            BLOCKS,
            BLOCK_BYTES,
            Some("nvlink"),
        ))
        .unwrap()
    };
    let prefill = engine(Role::Prefill, 0, "nvlink-prefill", &mut prefill_regions);
    let decode = engine(
        Role::Decode,
        decode_gpu.ordinal(),
        "nvlink-decode",
        &mut decode_regions,
    );
    Pair {
        prefill,
        decode,
        _prefill_regions: prefill_regions,
        decode_regions,
    }
}

fn connect(pair: &Pair) {
    let challenge = pair.prefill.auth_challenge(KEY).unwrap();
    let response = pair.decode.auth_respond(&challenge).unwrap();
    let hello = pair.prefill.hello(KEY, &response).unwrap();
    let reply = pair.decode.accept(&hello).unwrap();
    pair.prefill
        .finish_connect(KEY, "127.0.0.1", &reply)
        .unwrap();
}

type Outcome = Receiver<kvtransfer_engine::Result<()>>;

fn start_writes(prefill: &Engine, tag: &[u8], calls: usize) -> Vec<Outcome> {
    let ids: Vec<u32> = (0..BLOCKS as u32).collect();
    (0..calls)
        .map(|_| {
            let (sender, outcome) = channel();
            prefill
                .write(
                    WriteCall::ids(
                        KEY,
                        BlockIds::U32(&ids),
                        BlockIds::U32(&ids),
                        0.0,
                        Some(tag.to_vec()),
                    ),
                    OnDone::Callback(Box::new(move |result| {
                        let _ = sender.send(result);
                    })),
                )
                .unwrap();
            outcome
        })
        .collect()
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu-tests.sh --run on a GPU machine"]
fn nvlink_a_fence_honoured_by_the_writer_leaves_no_byte_of_the_fenced_writes() {
    let mut pair =
        pair("nvlink_a_fence_honoured_by_the_writer_leaves_no_byte_of_the_fenced_writes");
    let canary = vec![CANARY; BLOCKS * BLOCK_BYTES];
    let mut fenced_mid_flight = 0;
    for round in 0..ROUNDS {
        if !pair.prefill.is_connected(KEY) {
            connect(&pair);
        }
        let tag = format!("req-{round}").into_bytes();
        let outcomes = start_writes(&pair.prefill, &tag, 8);
        std::thread::sleep(Duration::from_micros(100 * round as u64));
        let fenced = pair
            .prefill
            .fence_writes(KEY, FenceScope::Tag(tag.clone()), Duration::from_secs(5))
            .unwrap();
        for region in &mut pair.decode_regions {
            let Mem::Device(buffer) = region else {
                unreachable!("device regions")
            };
            buffer.copy_from_host(&canary).expect("cuMemcpyHtoD");
        }
        let codes: Vec<Option<&str>> = outcomes
            .iter()
            .map(|o| {
                o.recv_timeout(Duration::from_secs(20))
                    .expect("settles")
                    .err()
                    .map(|e| e.code())
            })
            .collect();
        assert!(
            codes.iter().all(|c| matches!(c, None | Some("ERR_FENCED"))),
            "round {round}: {codes:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
        for (r, region) in pair.decode_regions.iter().enumerate() {
            let got = region.read();
            let landed = got.iter().filter(|&&b| b != CANARY).count();
            assert_eq!(
                landed, 0,
                "round {round}: region {r}: a fenced write landed"
            );
        }
        fenced_mid_flight += usize::from(fenced > 0);
    }
    assert!(fenced_mid_flight > 0, "no round fenced a pending call");
    // A later call of another tag goes through (after a reconnect when the link was torn down).
    if !pair.prefill.is_connected(KEY) {
        connect(&pair);
    }
    block_on(
        pair.prefill
            .write_cache(KEY, BlockIds::U32(&[0]), BlockIds::U32(&[0]), 0.0, None)
            .unwrap(),
    )
    .unwrap()
    .unwrap();
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu-tests.sh --run on a GPU machine"]
fn nvlink_a_receiver_cannot_cut_a_writer_off_and_says_so() {
    let pair = pair("nvlink_a_receiver_cannot_cut_a_writer_off_and_says_so");
    connect(&pair);
    let outcomes = start_writes(&pair.prefill, b"t", 4);
    let result = pair
        .decode
        .cut_off("nvlink-prefill", Duration::from_millis(5));
    if pair.decode.stats().receivers > 0 {
        let error = result.expect_err("NVLink cannot be cut off from the receiving side");
        assert_eq!(error.code(), "ERR_TIMEOUT");
        assert!(error.to_string().contains("nvlink"), "{error}");
    } else {
        assert_eq!(result.unwrap(), 0);
    }
    for outcome in outcomes {
        let _ = outcome
            .recv_timeout(Duration::from_secs(20))
            .expect("settles");
    }
}
