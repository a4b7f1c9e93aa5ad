//! `checksum: 'crc32c'` over RDMA on a real device (Soft-RoCE in the VM): the writer sums
//! the bytes it moves, the call's notice carries its landing (in extension slots when it is
//! long), the receiver finds the bytes from it, sums them and reports `Verified`; a byte
//! flipped in the receiver's memory (the `KVCACHE_TEST_CORRUPT_RECEIVE` hook) is a typed
//! mismatch, counted; a landing longer than a notice carries is refused, typed, and nothing
//! is sent. `#[ignore]`d where there is no device; `--ignored` runs them and they fail on
//! any problem, `KVTRANSFER_RDMA_DEVICE` unset included. Run with
//! `bash scripts/rxe-vm/run-rdma-tests.sh`.

mod common;

use common::rdma::{device, settings};
use common::{arrival_log, assert_written, settle, Log, Side, SideSpec};
use kvtransfer_engine::{
    Arrival, BlockIds, BlockOrder, ChecksumCheck, Integrity, Role, TpOptions, WriteCall,
};
use std::time::{Duration, Instant};

const SUM: Integrity = Integrity {
    checksum: true,
    acked: false,
};

/// A prefill and a decode over RDMA with K, V and scales, connected; the decode's arrivals
/// go to the returned log.
fn pair(dev: &str, blocks: usize, block_bytes: usize) -> (Side, Side, Log) {
    let (log, sink) = arrival_log();
    let spec = |role| SideSpec {
        scale_block_bytes: 64,
        ..SideSpec::new(role, 2, blocks, block_bytes).over_rdma(settings(dev))
    };
    let (prefill, decode) = common::pair(
        spec(Role::Prefill),
        SideSpec {
            arrivals: Some(sink),
            ..spec(Role::Decode)
        },
    );
    (prefill, decode, log)
}

/// A seeded permutation's first `n` of `0..blocks` (xorshift; scattered, backwards too).
fn scattered(seed: u64, blocks: u32, n: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..blocks).collect();
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for i in (1..ids.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ids.swap(i, (x % (i as u64 + 1)) as usize);
    }
    ids.truncate(n);
    ids
}

fn call<'a>(
    local: &'a [u32],
    remote: &'a [u32],
    layer: u32,
    tag: &[u8],
    integrity: Integrity,
) -> WriteCall<'a> {
    WriteCall {
        timeout: Some(Duration::from_secs(60)),
        integrity,
        ..WriteCall::ids(
            "decode",
            BlockIds::U32(local),
            BlockIds::U32(remote),
            f64::from(layer),
            Some(tag.to_vec()),
        )
    }
}

/// Waits until `log` holds `n` arrivals (the receiver reports one after the call resolved,
/// unless the call was acked).
fn arrivals(log: &Log, n: usize) -> Vec<Arrival> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = log.lock().unwrap().clone();
        if seen.len() >= n || Instant::now() > deadline {
            assert_eq!(seen.len(), n, "arrivals");
            return seen;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
#[ignore = "needs an RDMA device: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_checksummed_calls_verify_over_scattered_lists_and_long_tags() {
    let dev = device("rdma_checksummed_calls_verify_over_scattered_lists_and_long_tags");
    let (prefill, decode, log) = pair(&dev, 2048, 1024);
    let calls = 50u64;
    for i in 0..calls {
        // From one contiguous block to 1538 scattered ones (landings of a few bytes up to
        // most extension slots), tags up to the longest, acked and not, both layers.
        let n = [1usize, 7, 60, 400, 1538][i as usize % 5];
        let local = scattered(i, 2048, n);
        let remote = if n == 1 {
            vec![(i * 13 % 2048) as u32]
        } else {
            scattered(i + 1000, 2048, n)
        };
        let mut tag = format!("req-{i}-").into_bytes();
        tag.resize(if i % 2 == 0 { 255 } else { 20 }, b'x');
        let integrity = Integrity {
            acked: i % 3 == 0,
            ..SUM
        };
        settle(
            &prefill,
            call(&local, &remote, (i % 2) as u32, &tag, integrity),
        )
        .expect("taken")
        .expect("delivered");
        // A plain call resolves once the NIC acknowledged its notice, before the receiver
        // summed the blocks: the next call, which may rewrite some of them, waits for the
        // arrival (a rewrite before the sum is a mismatch, rightly: docs/rdma.md).
        arrivals(&log, i as usize + 1);
    }
    // A plain tagged call between them: no checksum asked, none checked.
    settle(
        &prefill,
        call(&[1], &[2], 0, b"plain", Integrity::default()),
    )
    .unwrap()
    .unwrap();
    let seen = arrivals(&log, calls as usize + 1);
    for arrival in &seen[..calls as usize] {
        assert_eq!(
            arrival.checksum,
            ChecksumCheck::Verified,
            "{}",
            String::from_utf8_lossy(&arrival.tag)
        );
    }
    assert_eq!(seen[calls as usize].checksum, ChecksumCheck::Absent);
    assert_eq!(decode.engine.metrics().total.checksum_mismatches, 0);
    prefill.engine.close();
    decode.engine.close();
}

#[test]
#[ignore = "needs an RDMA device: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_a_byte_flipped_in_the_receivers_memory_is_a_counted_mismatch() {
    const NAME: &str = "rdma_a_byte_flipped_in_the_receivers_memory_is_a_counted_mismatch";
    let dev = device(NAME);
    if std::env::var_os("KVCACHE_TEST_CORRUPT_RECEIVE").is_none() {
        // The hook is read once per process: run this test again in a child that sets it.
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([NAME, "--exact", "--include-ignored", "--nocapture"])
            .env("KVCACHE_TEST_CORRUPT_RECEIVE", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "the child run failed:\n{text}"
        );
        return;
    }
    let (prefill, decode, log) = pair(&dev, 1024, 1024);
    let local = scattered(7, 1024, 300);
    let remote = scattered(8, 1024, 300);
    let tag = vec![b't'; 255];
    for layer in [0, 1] {
        settle(&prefill, call(&local, &remote, layer, &tag, SUM))
            .unwrap()
            .unwrap();
    }
    // A call without a checksum is not touched by the hook.
    settle(
        &prefill,
        call(&[3], &[3], 0, b"plain", Integrity::default()),
    )
    .unwrap()
    .unwrap();
    let seen = arrivals(&log, 3);
    for arrival in &seen[..2] {
        assert!(
            matches!(arrival.checksum, ChecksumCheck::Mismatch { expected, actual } if expected != actual),
            "{:?}",
            arrival.checksum
        );
    }
    assert_eq!(seen[2].checksum, ChecksumCheck::Absent);
    assert_eq!(decode.engine.metrics().total.checksum_mismatches, 2);
    prefill.engine.close();
    decode.engine.close();
}

#[test]
#[ignore = "needs an RDMA device: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_a_landing_too_long_for_a_notice_is_refused_and_nothing_is_sent() {
    let dev = device("rdma_a_landing_too_long_for_a_notice_is_refused_and_nothing_is_sent");
    let (prefill, decode, log) = pair(&dev, 4096, 256);
    // 3,000 single-block runs far apart: about three bytes each, past the limit.
    let local = scattered(1, 4096, 3000);
    let remote = scattered(2, 4096, 3000);
    let err = settle(&prefill, call(&local, &remote, 0, b"long", SUM)).unwrap_err();
    assert_eq!(err.code(), "ERR_UNSUPPORTED", "{err}");
    let text = err.to_string();
    assert!(
        text.contains("3000 blocks make 3000 runs")
            && text.contains("a notice carries at most 7650"),
        "{text}"
    );
    // Nothing was written or announced; the link still carries calls.
    std::thread::sleep(Duration::from_millis(200));
    assert!(log.lock().unwrap().is_empty());
    assert!(decode
        .keys
        .iter()
        .chain(&decode.values)
        .all(|r| r.iter().all(|&b| b == 0)));
    let ids: Vec<u32> = (0..4096).collect();
    settle(&prefill, call(&ids, &ids, 0, b"whole", SUM))
        .unwrap()
        .unwrap();
    assert_eq!(arrivals(&log, 1)[0].checksum, ChecksumCheck::Verified);
    assert_written(&prefill, &decode, 0, &ids, &ids);
    prefill.engine.close();
    decode.engine.close();
}

#[test]
#[ignore = "needs an RDMA device: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_checksummed_tensor_parallel_shards_verify() {
    let dev = device("rdma_checksummed_tensor_parallel_shards_verify");
    // (writer tpSize/rank and block bytes, receiver tpSize/rank and block bytes), head- and
    // token-major: a writer with more ranks writes part of each receiver block (per token
    // row), a receiver with more ranks takes part of each writer block.
    let cases = [((2, 1, 512), (1, 0, 1024)), ((1, 0, 1024), (2, 1, 512))];
    for tokens in [0, 16] {
        for ((ws, wr, wb), (vs, vr, vb)) in cases {
            let tp = |size, rank| TpOptions {
                size,
                rank,
                replicated: false,
                order: BlockOrder::from_tokens_per_block(tokens),
            };
            let (log, sink) = arrival_log();
            let spec = |role, bytes: usize, tp| SideSpec {
                scale_block_bytes: 64 * if bytes == 512 { 1 } else { 2 },
                tp,
                ..SideSpec::new(role, 1, 256, bytes).over_rdma(settings(&dev))
            };
            let (prefill, decode) = common::pair(
                spec(Role::Prefill, wb, tp(ws, wr)),
                SideSpec {
                    arrivals: Some(sink),
                    ..spec(Role::Decode, vb, tp(vs, vr))
                },
            );
            let local = scattered(3, 256, 100);
            let remote = scattered(4, 256, 100);
            settle(&prefill, call(&local, &remote, 0, &[b'p'; 255], SUM))
                .unwrap()
                .unwrap();
            let seen = arrivals(&log, 1);
            assert_eq!(
                seen[0].checksum,
                ChecksumCheck::Verified,
                "writer {ws}/{wr}, receiver {vs}/{vr}, {tokens} tokens per block"
            );
            prefill.engine.close();
            decode.engine.close();
        }
    }
}
