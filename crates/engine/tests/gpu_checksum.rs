//! `checksum: 'crc32c'` between GPU regions over NVLink and over TCP (two engines in one
//! process, GPU 0 writing into the last GPU, or within GPU 0): the writer sums its GPU
//! sources with the CRC-32C kernel (NVLink: on its copy stream; TCP: the engine, before it
//! hands the call over), the receiver sums the landed bytes in its GPU memory with it
//! before it reports the arrival.
//! Scattered block lists over two layers, plain, acked and untagged neighbours: every
//! checksummed arrival is verified and the bytes are the writer's. The same test, run again
//! in a child process with `KVCACHE_TEST_CORRUPT_RECEIVE=1` (the receiver flips one landed
//! byte first), sees every checksummed arrival as a typed mismatch, counted in metrics.
//! And what the checksum costs per call, side by side with plain calls (printed).
//! `#[ignore]`d: run with `--ignored` on a GPU machine (scripts/gpu-tests.sh --run).

mod gpu_support;

use gpu_support::{engine_options, note, pattern, permutation, require_gpu, Mem};
use kvtransfer_engine::{
    Arrival, ArrivalSink, BlockIds, ChecksumCheck, Engine, Integrity, OnDone, Role, WriteCall,
};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &str = "nvlink-decode";
const LAYERS: usize = 2;
const BLOCKS: usize = 64;
const BLOCK_BYTES: usize = 64 << 10;
const SETTLE: Duration = Duration::from_secs(20);
const CORRUPT: &str = "KVCACHE_TEST_CORRUPT_RECEIVE";

const CHECKSUM: Integrity = Integrity {
    checksum: true,
    acked: false,
};

struct Pair {
    prefill: Engine,
    decode: Engine,
    /// Prefill regions, then decode regions (layer-major, K then V).
    regions: Vec<Mem>,
    /// What the prefill regions hold.
    sources: Vec<Vec<u8>>,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
}

fn pair(test: &str, transport: &str) -> Pair {
    let gpu = require_gpu(test);
    let cuda = kvtransfer_cuda::Cuda::get().unwrap();
    let decode_gpu = cuda.gpu(cuda.device_count().unwrap() - 1).unwrap();
    let len = BLOCKS * BLOCK_BYTES;
    let sources: Vec<Vec<u8>> = (0..2 * LAYERS).map(|r| pattern(r, len, 21)).collect();
    let mut regions: Vec<Mem> = sources
        .iter()
        .map(|s| Mem::new(Some(&gpu), s.clone()))
        .chain((0..2 * LAYERS).map(|_| Mem::new(Some(&decode_gpu), vec![0; len])))
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
            Some(transport),
        )
    };
    let prefill = Engine::new(options(
        Role::Prefill,
        0,
        "nvlink-prefill",
        &addrs[..2 * LAYERS],
    ))
    .unwrap();
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let sink: ArrivalSink = {
        let arrivals = Arc::clone(&arrivals);
        Arc::new(move |arrival| arrivals.lock().unwrap().push(arrival))
    };
    let decode = Engine::new(kvtransfer_engine::EngineOptions {
        arrivals: Some(sink),
        ..options(
            Role::Decode,
            decode_gpu.ordinal(),
            "nvlink-decode",
            &addrs[2 * LAYERS..],
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
        regions,
        sources,
        arrivals,
    }
}

/// One call, waited for.
fn write(
    pair: &Pair,
    layer: usize,
    local: &[u32],
    remote: &[u32],
    tag: Option<Vec<u8>>,
    integrity: Integrity,
) -> kvtransfer_engine::Result<()> {
    let (sender, outcome) = channel();
    pair.prefill.write(
        WriteCall {
            integrity,
            ..WriteCall::ids(
                KEY,
                BlockIds::U32(local),
                BlockIds::U32(remote),
                layer as f64,
                tag,
            )
        },
        OnDone::Callback(Box::new(move |result| {
            let _ = sender.send(result);
        })),
    )?;
    outcome.recv_timeout(SETTLE).expect("the call settles")
}

/// The arrival of `tag`, waiting for it.
fn arrival(pair: &Pair, tag: &[u8]) -> Arrival {
    let deadline = Instant::now() + SETTLE;
    loop {
        if let Some(a) = pair.arrivals.lock().unwrap().iter().find(|a| a.tag == tag) {
            return a.clone();
        }
        assert!(Instant::now() < deadline, "no arrival for {tag:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu-tests.sh --run on a GPU machine"]
fn gpu_checksums_are_verified_and_a_corrupt_byte_is_a_mismatch() {
    let corrupt = std::env::var(CORRUPT).is_ok_and(|v| v == "1");
    for transport in ["nvlink", "tcp"] {
        calls_are_checked(transport, corrupt);
    }
    if !corrupt {
        // The same calls again with the receiver's test hook on, in a child process.
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "gpu_checksums_are_verified_and_a_corrupt_byte_is_a_mismatch",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CORRUPT, "1")
            .status()
            .expect("run the corrupting child");
        assert!(
            status.success(),
            "the child with {CORRUPT}=1 failed: {status}"
        );
    }
}

/// Checksummed calls between GPU regions over `transport`, each followed by a plain and an
/// untagged call of the same blocks: verified (or, with `corrupt`, mismatches), counted,
/// and the bytes are the writer's.
fn calls_are_checked(transport: &str, corrupt: bool) {
    let pair = pair(
        "gpu_checksums_are_verified_and_a_corrupt_byte_is_a_mismatch",
        transport,
    );
    let mut expected: Vec<Vec<u8>> = vec![vec![0; BLOCKS * BLOCK_BYTES]; 2 * LAYERS];
    let mut summed = 0u64;
    for call in 0..40u64 {
        let layer = (call % LAYERS as u64) as usize;
        // Scattered lists of 1..=BLOCKS blocks: many runs, some contiguous stretches.
        let count = 1 + (call as usize * 7) % BLOCKS;
        let local: Vec<u32> = permutation(BLOCKS, call + 1)[..count].to_vec();
        let mut remote: Vec<u32> = permutation(BLOCKS, call + 100)[..count].to_vec();
        if call % 5 == 0 {
            remote.sort_unstable();
        }
        let tag = format!("sum-{call}").into_bytes();
        let integrity = Integrity {
            checksum: true,
            acked: call % 3 == 0,
        };
        write(&pair, layer, &local, &remote, Some(tag.clone()), integrity)
            .unwrap_or_else(|e| panic!("{transport} call {call}: {e}"));
        let got = arrival(&pair, &tag);
        assert_eq!((got.layer, got.blocks), (layer as u32, count as u32));
        if corrupt {
            assert!(
                matches!(got.checksum, ChecksumCheck::Mismatch { expected, actual } if expected != actual),
                "{transport} call {call}: {:?} with a corrupted byte",
                got.checksum
            );
        } else {
            assert_eq!(
                got.checksum,
                ChecksumCheck::Verified,
                "{transport} call {call}"
            );
        }
        for kind in 0..2 {
            let r = layer * 2 + kind;
            for (l, m) in local.iter().zip(&remote) {
                let (l, m) = (*l as usize * BLOCK_BYTES, *m as usize * BLOCK_BYTES);
                expected[r][m..m + BLOCK_BYTES]
                    .copy_from_slice(&pair.sources[r][l..l + BLOCK_BYTES]);
            }
        }
        summed += 1;
        // A plain tagged call and an untagged one in between: no sum, no check.
        let plain = format!("plain-{call}").into_bytes();
        write(
            &pair,
            layer,
            &local,
            &remote,
            Some(plain.clone()),
            Integrity::default(),
        )
        .unwrap();
        assert_eq!(arrival(&pair, &plain).checksum, ChecksumCheck::Absent);
        write(&pair, layer, &local, &remote, None, Integrity::default()).unwrap();
    }
    // The bytes are the writer's (the corrupted run flipped one byte per checksummed call,
    // and the plain rewrite of the same blocks after it restored them).
    for (r, want) in expected.iter().enumerate() {
        let got = pair.regions[2 * LAYERS + r].read();
        assert!(
            &got == want,
            "{transport}: decode region {r} differs from what was written"
        );
    }
    let mismatches = pair.decode.metrics().total.checksum_mismatches;
    assert_eq!(
        mismatches,
        if corrupt { summed } else { 0 },
        "counted mismatches"
    );
    // A checksum without a tag is refused, typed, nothing sent.
    let refused = write(&pair, 0, &[0], &[0], None, CHECKSUM).unwrap_err();
    assert_eq!(refused.code(), "ERR_INVALID_ARGUMENT", "{refused}");
    pair.prefill.close();
    pair.decode.close();
    note(&format!(
        "{transport} checksums between GPU regions: {summed} checksummed calls {}",
        if corrupt {
            "each seen as ERR_CHECKSUM_MISMATCH with a corrupted byte, all counted"
        } else {
            "verified by the receiver's GPU sum"
        }
    ));
}

/// What the checksum costs per call: sequential tagged calls of 1 and of 64 blocks of 64 KiB
/// (K+V), plain and checksummed alternating in rounds, p50 of each; and a pipeline of 64-block
/// calls (8 in flight), GB/s of each (printed; a report, not a check).
#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu-tests.sh --run on a GPU machine"]
fn gpu_checksum_cost() {
    for transport in ["nvlink", "tcp"] {
        cost(transport);
    }
}

fn cost(transport: &str) {
    let pair = pair("gpu_checksum_cost", transport);
    let per_round = if transport == "tcp" { 20 } else { 100 };
    let p50 = |mut us: Vec<f64>| {
        us.sort_by(f64::total_cmp);
        us[us.len() / 2]
    };
    let kinds = [Integrity::default(), CHECKSUM];
    for blocks in [1usize, BLOCKS] {
        let ids: Vec<u32> = (0..blocks as u32).collect();
        let mut times = [Vec::new(), Vec::new()];
        for round in 0..8 {
            for (which, integrity) in kinds.into_iter().enumerate() {
                for _ in 0..per_round {
                    let started = Instant::now();
                    write(&pair, 0, &ids, &ids, Some(b"cost".to_vec()), integrity).unwrap();
                    if round > 0 {
                        times[which].push(started.elapsed().as_secs_f64() * 1e6);
                    }
                }
            }
        }
        let [plain, summed] = times;
        let (plain, summed) = (p50(plain), p50(summed));
        note(&format!(
            "{transport} checksum cost, {blocks} × {} KiB GPU blocks per call (K+V), sequential: p50 plain {plain:.1} µs, crc32c {summed:.1} µs (+{:.1} µs, {:.0} %)",
            BLOCK_BYTES >> 10,
            summed - plain,
            (summed / plain - 1.0) * 100.0
        ));
    }
    // Throughput: 64-block calls, 8 in flight, alternating rounds.
    let ids: Vec<u32> = (0..BLOCKS as u32).collect();
    let bytes_per_call = (2 * BLOCKS * BLOCK_BYTES) as f64;
    let mut rates = [Vec::new(), Vec::new()];
    for round in 0..6 {
        for (which, integrity) in kinds.into_iter().enumerate() {
            let calls = 2 * per_round;
            let (sender, outcomes) = channel();
            let started = Instant::now();
            for _ in 0..calls {
                let sender = sender.clone();
                pair.prefill
                    .write(
                        WriteCall {
                            integrity,
                            ..WriteCall::ids(
                                KEY,
                                BlockIds::U32(&ids),
                                BlockIds::U32(&ids),
                                0.0,
                                Some(b"rate".to_vec()),
                            )
                        },
                        OnDone::Callback(Box::new(move |result| {
                            let _ = sender.send(result);
                        })),
                    )
                    .unwrap();
            }
            for _ in 0..calls {
                outcomes.recv_timeout(SETTLE).unwrap().unwrap();
            }
            let rate = bytes_per_call * calls as f64 / started.elapsed().as_secs_f64() / 1e9;
            if round > 0 {
                rates[which].push(rate);
            }
        }
    }
    let [plain, summed] = rates.map(p50);
    note(&format!(
        "{transport} checksum cost, pipelined {BLOCKS} × {} KiB GPU calls (K+V): p50 plain {plain:.1} GB/s, crc32c {summed:.1} GB/s ({:.0} % of plain)",
        BLOCK_BYTES >> 10,
        summed / plain * 100.0
    ));
    pair.prefill.close();
    pair.decode.close();
}
