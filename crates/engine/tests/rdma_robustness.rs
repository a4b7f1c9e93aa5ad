//! RDMA: timeouts, cancellation, peer death and authentication on a real device (Soft-RoCE
//! in the VM). `#[ignore]`d where there is no device; run with `--ignored` they need
//! `KVTRANSFER_RDMA_DEVICE`. Run with `bash scripts/rxe-vm/run-rdma-tests.sh`.

mod common;

use common::rdma::{device, settings};
use common::{assert_written, connect, try_connect, Side, SideSpec};
use futures_executor::block_on;
use kvtransfer_engine::BlockIds;
use kvtransfer_engine::RdmaSettings;
use kvtransfer_engine::{Completion, Error, Role, WriteCall};
use std::time::{Duration, Instant};

/// `KVCACHE_IB_TIMEOUT` used here and the retry count the engine sets.
const IB_TIMEOUT: u8 = 14;
const RETRY_CNT: u32 = kvtransfer_engine::internals::TRANSPORT_RETRY_COUNT as u32;

fn side(role: Role, device: &str, token: Option<&'static str>) -> Side {
    SideSpec {
        auth_token: token,
        // The default queue pairs: on Soft-RoCE, chains go through posting threads.
        ..SideSpec::new(role, 1, 32, 64 * 1024).over_rdma(RdmaSettings {
            ib_timeout: IB_TIMEOUT,
            ..settings(device)
        })
    }
    .build()
}

fn submit(prefill: &Side, ids: &[u32], deadline: Option<Instant>) -> Completion {
    prefill
        .engine
        .write_call(WriteCall {
            timeout: deadline.map(|at| at.saturating_duration_since(Instant::now())),
            integrity: Default::default(),
            ..WriteCall::ids("decode", BlockIds::U32(ids), BlockIds::U32(ids), 0.0, None)
        })
        .unwrap()
}

fn settle(completion: Completion) -> kvtransfer_engine::Result<()> {
    block_on(completion).expect("every call completes")
}

/// The transport-level bound on noticing a dead peer: 4.096 µs × 2^timeout × (retry + 1).
fn detection_bound() -> Duration {
    Duration::from_nanos(4096 * (1u64 << IB_TIMEOUT) * u64::from(RETRY_CNT + 1) / 1000 * 1000)
}

#[test]
#[ignore = "needs an RDMA device: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_peer_death_fails_pending_calls_within_the_configured_timeout() {
    let dev = device("rdma_peer_death_fails_pending_calls_within_the_configured_timeout");
    let prefill = side(Role::Prefill, &dev, None);
    let decode = side(Role::Decode, &dev, None);
    let left = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    prefill.engine.on_peer_left(Some({
        let left = std::sync::Arc::clone(&left);
        std::sync::Arc::new(move |report: kvtransfer_engine::PeerLeft| {
            left.lock().unwrap().push(report)
        })
    }));
    connect(&prefill, &decode, "decode");
    let ids: Vec<u32> = (0..32).collect();
    settle(submit(&prefill, &ids, None)).unwrap();
    // The peer dies: its queue pairs vanish (as when its process is killed).
    decode.engine.close();
    // The transport notices by retry exhaustion (ERR_RDMA_COMPLETION) within
    // 4.096 us x 2^timeout x (retry + 1); the call's timeout bounds it in any case.
    let timeout = detection_bound() * 4 + Duration::from_secs(2);
    let started = Instant::now();
    let err = settle(submit(&prefill, &ids, Some(started + timeout))).unwrap_err();
    let took = started.elapsed();
    eprintln!(
        "rdma peer death: pending call failed after {took:?} with {} (retry bound 4.096us x 2^{IB_TIMEOUT} x {} = {:?}, call timeout {timeout:?}): {err}",
        err.code(),
        RETRY_CNT + 1,
        detection_bound()
    );
    assert!(
        matches!(err.code(), "ERR_RDMA_COMPLETION" | "ERR_TIMEOUT"),
        "{err}"
    );
    // The VM shares the repository: keep the measurement where the host can read it.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/rxe-vm");
    if std::path::Path::new(dir).is_dir() {
        let line = format!(
            "rdma peer death: {} after {took:?} (retry bound {:?})\n",
            err.code(),
            detection_bound()
        );
        let _ = std::fs::write(format!("{dir}/rdma-peer-death.txt"), line);
    }
    assert!(took < timeout + Duration::from_secs(2), "{took:?}");
    assert!(!prefill.engine.is_connected("decode"));
    // Reported once as a peer that left, with the code its call failed with.
    let left = left.lock().unwrap().clone();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(
        (left[0].peer.as_str(), left[0].code),
        ("decode", err.code()),
        "{left:?}"
    );
    eprintln!("rdma peer left: {}: {}", left[0].code, left[0].reason);
}

#[test]
#[ignore = "needs an RDMA device: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_a_timed_out_call_destroys_the_queue_pairs_first() {
    let dev = device("rdma_a_timed_out_call_destroys_the_queue_pairs_first");
    let prefill = side(Role::Prefill, &dev, None);
    let decode = side(Role::Decode, &dev, None);
    connect(&prefill, &decode, "decode");
    let ids: Vec<u32> = (0..32).collect();
    decode.engine.close();
    // The peer no longer answers: the call can only end by its deadline (before the
    // retry bound of ~0.5 s).
    let started = Instant::now();
    let err = settle(submit(
        &prefill,
        &ids,
        Some(started + Duration::from_millis(100)),
    ))
    .unwrap_err();
    eprintln!("rdma timeout rejected after {:?}: {err}", started.elapsed());
    assert_eq!(err.code(), "ERR_TIMEOUT", "{err}");
    assert!(
        prefill.engine.peer_info("decode").is_none(),
        "the link is removed"
    );
    // Reconnecting to a live peer works.
    let fresh = side(Role::Decode, &dev, None);
    connect(&prefill, &fresh, "decode");
    settle(submit(
        &prefill,
        &ids[..4],
        Some(Instant::now() + Duration::from_secs(30)),
    ))
    .unwrap();
    assert_written(&prefill, &fresh, 0, &ids[..4], &ids[..4]);
}

#[test]
#[ignore = "needs an RDMA device: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_cancel_peer_fails_pending_calls_with_aborted() {
    let dev = device("rdma_cancel_peer_fails_pending_calls_with_aborted");
    let prefill = side(Role::Prefill, &dev, None);
    let decode = side(Role::Decode, &dev, None);
    connect(&prefill, &decode, "decode");
    let ids: Vec<u32> = (0..32).collect();
    decode.engine.close();
    let calls: Vec<Completion> = (0..4).map(|_| submit(&prefill, &ids, None)).collect();
    assert!(prefill.engine.cancel_peer("decode", Error::Aborted));
    for call in calls {
        assert_eq!(settle(call).unwrap_err().code(), "ERR_ABORTED");
    }
    assert!(!prefill.engine.is_connected("decode"));
}

#[test]
#[ignore = "needs an RDMA device: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_auth_token_checks() {
    let dev = device("rdma_auth_token_checks");
    let prefill = side(Role::Prefill, &dev, Some("k1"));
    let decode = side(Role::Decode, &dev, Some("k1"));
    connect(&prefill, &decode, "decode");
    let ids: Vec<u32> = (0..8).collect();
    settle(submit(&prefill, &ids, None)).unwrap();
    assert_written(&prefill, &decode, 0, &ids, &ids);
    let stranger = side(Role::Decode, &dev, Some("k2"));
    let err = try_connect(&prefill, &stranger, "other").unwrap_err();
    assert_eq!(err.code(), "ERR_AUTH", "{err}");
    let open = side(Role::Decode, &dev, None);
    assert_eq!(
        try_connect(&prefill, &open, "open").unwrap_err().code(),
        "ERR_AUTH"
    );
}
