//! Two engines in one process, connected over loopback TCP.

use futures_executor::block_on;
use kvtransfer_engine::BlockIds;
use kvtransfer_engine::{Arrival, ChecksumCheck, Cover, Role};
use std::sync::{Arc, Mutex};

mod common;
use common::{assert_written, connect, hello, Side, SideSpec};

fn side(
    role: Role,
    layers: usize,
    block_number: usize,
    block_bytes: usize,
    fill: bool,
    arrivals: Option<kvtransfer_engine::ArrivalSink>,
) -> Side {
    SideSpec {
        fill,
        arrivals,
        ..SideSpec::new(role, layers, block_number, block_bytes)
    }
    .build()
}

/// Writes `local` → `remote` for layers `0..layers` to `decode:1`, tagged, one call at a
/// time, each awaited.
fn write_layers(prefill: &Side, layers: usize, local: &[u32], remote: &[u32], tag: &[u8]) {
    for layer in 0..layers {
        block_on(
            prefill
                .engine
                .write_cache(
                    "decode:1",
                    BlockIds::U32(local),
                    BlockIds::U32(remote),
                    layer as f64,
                    Some(tag.to_vec()),
                )
                .unwrap(),
        )
        .unwrap()
        .unwrap();
    }
}

#[test]
fn writes_exact_bytes_and_leaves_other_blocks_untouched() {
    let block_bytes = 1024;
    let sink_log: Arc<Mutex<Vec<Arrival>>> = Arc::default();
    let log = Arc::clone(&sink_log);
    let prefill = side(Role::Prefill, 3, 64, block_bytes, true, None);
    let decode = side(
        Role::Decode,
        3,
        32,
        block_bytes,
        false,
        Some(Arc::new(move |a| log.lock().unwrap().push(a))),
    );
    connect(&prefill, &decode, "decode:1");
    assert!(prefill.engine.is_connected("decode:1"));
    let local = [5u32, 6, 7, 40, 2];
    let remote = [0u32, 1, 2, 9, 31];
    write_layers(&prefill, 3, &local, &remote, b"req-1");
    for layer in 0..3 {
        assert_written(&prefill, &decode, layer, &local, &remote);
    }
    let arrivals = sink_log.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 3);
    assert_eq!(
        arrivals[2],
        Arrival {
            peer: "prefill-test".into(),
            tag: b"req-1".to_vec(),
            layer: 2,
            blocks: 5,
            cover: Cover::WHOLE,
            checksum: ChecksumCheck::Absent,
        }
    );
    prefill.engine.close();
    decode.engine.close();
}

/// Small blocks: runs of 1, 2, 3 and 5 blocks of 100 bytes (frames of 100 to 500 bytes),
/// both kinds, scattered among untouched blocks, land byte for byte.
#[test]
fn runs_of_small_blocks_land_exactly() {
    let block_bytes = 100;
    let prefill = side(Role::Prefill, 2, 64, block_bytes, true, None);
    let decode = side(Role::Decode, 2, 64, block_bytes, false, None);
    connect(&prefill, &decode, "decode:1");
    let local = [1u32, 10, 11, 20, 21, 22, 30, 31, 32, 33, 34, 50];
    let remote = [60u32, 2, 3, 40, 41, 42, 5, 6, 7, 8, 9, 0];
    write_layers(&prefill, 2, &local, &remote, b"tag");
    for layer in 0..2 {
        assert_written(&prefill, &decode, layer, &local, &remote);
    }
    prefill.engine.close();
    decode.engine.close();
}

#[test]
fn refused_calls_write_nothing() {
    let prefill = side(Role::Prefill, 2, 16, 256, true, None);
    let decode = side(Role::Decode, 2, 8, 256, false, None);
    connect(&prefill, &decode, "d");
    let e = &prefill.engine;
    let codes: Vec<&str> = [
        e.write_cache("d", BlockIds::U32(&[1]), BlockIds::U32(&[8]), 0.0, None),
        e.write_cache("d", BlockIds::U32(&[16]), BlockIds::U32(&[1]), 0.0, None),
        e.write_cache("d", BlockIds::U32(&[1, 2]), BlockIds::U32(&[1]), 0.0, None),
        e.write_cache("d", BlockIds::I32(&[-3]), BlockIds::U32(&[1]), 0.0, None),
        e.write_cache("d", BlockIds::U32(&[1]), BlockIds::U32(&[1]), 2.0, None),
        e.write_cache("other", BlockIds::U32(&[1]), BlockIds::U32(&[1]), 0.0, None),
    ]
    .into_iter()
    .map(|r| r.expect_err("refused").code())
    .collect();
    assert_eq!(
        codes,
        [
            "ERR_BLOCK_ID_OUT_OF_RANGE",
            "ERR_BLOCK_ID_OUT_OF_RANGE",
            "ERR_BLOCK_COUNT_MISMATCH",
            "ERR_INVALID_BLOCK_ID",
            "ERR_LAYER_OUT_OF_RANGE",
            "ERR_NOT_CONNECTED"
        ]
    );
    // A valid call afterwards proves the link is intact, and nothing else landed.
    block_on(
        e.write_cache("d", BlockIds::U32(&[3]), BlockIds::U32(&[4]), 1.0, None)
            .unwrap(),
    )
    .unwrap()
    .unwrap();
    let written: usize = decode
        .keys
        .iter()
        .chain(&decode.values)
        .map(|r| r.iter().filter(|&&b| b != 0).count())
        .sum();
    let expected = prefill.keys[1][3 * 256..4 * 256]
        .iter()
        .chain(&prefill.values[1][3 * 256..4 * 256])
        .filter(|&&b| b != 0)
        .count();
    assert_eq!(written, expected);
    prefill.engine.close();
    assert_eq!(
        e.write_cache("d", BlockIds::U32(&[1]), BlockIds::U32(&[1]), 0.0, None)
            .err()
            .unwrap()
            .code(),
        "ERR_CLOSED"
    );
    decode.engine.close();
}

#[test]
fn layout_mismatch_is_refused_at_handshake() {
    let prefill = side(Role::Prefill, 2, 16, 256, true, None);
    let decode = side(Role::Decode, 3, 8, 256, false, None);
    let err = decode
        .engine
        .accept(&hello(&prefill, &decode, "d").unwrap())
        .unwrap_err();
    assert_eq!(err.code(), "ERR_LAYOUT_MISMATCH");
    assert!(
        err.to_string()
            .contains("layer count is 3 on decode-test but 2 on prefill-test"),
        "{err}"
    );
    let other = side(Role::Decode, 2, 8, 512, false, None);
    let err = other
        .engine
        .accept(&hello(&prefill, &other, "d").unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("blockBytes"), "{err}");
}

#[test]
fn many_pipelined_calls_and_large_blocks() {
    let block_bytes = 256 * 1024;
    let prefill = side(Role::Prefill, 1, 24, block_bytes, true, None);
    let decode = side(Role::Decode, 1, 24, block_bytes, false, None);
    connect(&prefill, &decode, "d");
    let ids: Vec<u32> = (0..24).rev().collect();
    let pending: Vec<_> = (0..8)
        .map(|_| {
            prefill
                .engine
                .write_cache("d", BlockIds::U32(&ids), BlockIds::U32(&ids), 0.0, None)
                .unwrap()
        })
        .collect();
    for p in pending {
        block_on(p).unwrap().unwrap();
    }
    assert_eq!(decode.keys[0], prefill.keys[0]);
    assert_eq!(decode.values[0], prefill.values[0]);
}

#[test]
fn peer_close_fails_pending_and_marks_disconnected() {
    let prefill = side(Role::Prefill, 1, 64, 64 * 1024, true, None);
    let decode = side(Role::Decode, 1, 64, 64 * 1024, false, None);
    connect(&prefill, &decode, "d");
    decode.engine.close();
    let ids: Vec<u32> = (0..64).collect();
    let mut failures = 0;
    for _ in 0..20 {
        match prefill
            .engine
            .write_cache("d", BlockIds::U32(&ids), BlockIds::U32(&ids), 0.0, None)
        {
            Ok(c) => {
                if block_on(c).unwrap().is_err() {
                    failures += 1;
                }
            }
            Err(e) => {
                assert_eq!(e.code(), "ERR_PEER_DISCONNECTED");
                failures += 1;
            }
        }
    }
    assert!(failures > 0);
    assert!(!prefill.engine.is_connected("d"));
}

/// `checksum`: the receiver sums what landed and reports the arrival verified; a call
/// without a tag cannot carry one (refused, nothing sent); `delivery: 'acked'` is what TCP
/// does anyway (its receiver answers every call), so it is taken.
#[test]
fn checksummed_calls_arrive_verified() {
    use kvtransfer_engine::{Integrity, WriteCall};
    let sink_log: Arc<Mutex<Vec<Arrival>>> = Arc::default();
    let log = Arc::clone(&sink_log);
    let prefill = side(Role::Prefill, 2, 16, 4096, true, None);
    let decode = side(
        Role::Decode,
        2,
        16,
        4096,
        false,
        Some(Arc::new(move |a| log.lock().unwrap().push(a))),
    );
    connect(&prefill, &decode, "decode:1");
    let (local, remote) = ([1u32, 2, 3, 9], [4u32, 5, 0, 15]);
    let call = |tag: Option<&[u8]>, integrity| WriteCall {
        integrity,
        ..WriteCall::ids(
            "decode:1",
            BlockIds::U32(&local),
            BlockIds::U32(&remote),
            1.0,
            tag.map(<[u8]>::to_vec),
        )
    };
    let both = Integrity {
        checksum: true,
        acked: true,
    };
    block_on(prefill.engine.write_call(call(Some(b"sum"), both)).unwrap())
        .unwrap()
        .unwrap();
    assert_written(&prefill, &decode, 1, &local, &remote);
    let untagged = prefill.engine.write_call(call(None, both)).unwrap_err();
    assert_eq!(untagged.code(), "ERR_INVALID_ARGUMENT");
    assert!(untagged.to_string().contains("without a tag"), "{untagged}");
    let arrivals = sink_log.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 1);
    assert_eq!(arrivals[0].checksum, ChecksumCheck::Verified);
    assert_eq!(arrivals[0].cover, Cover::WHOLE);
    prefill.engine.close();
    decode.engine.close();
}
