//! The NVLink transport between two processes of one host: the test process plays prefill
//! (regions on GPU 0) and spawns `examples/nvlink_peer` as decode (regions on the last GPU,
//! or GPU 0). `#[ignore]`d: run with `--ignored` on a GPU machine (scripts/gpu-tests.sh
//! --run), where a missing GPU, driver or peer binary fails them.

use futures_executor::block_on;
use kvtransfer_engine::{BlockIds, Engine, PeerLeft, Role, TransportKind};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod gpu_support;
mod nvlink_support;
use gpu_support::{engine_options, note, pattern, permutation, require_gpu, Mem};
use nvlink_support::*;

#[test]
#[ignore = "needs an NVIDIA GPU and two processes: run scripts/gpu-tests.sh --run on a GPU machine"]
fn nvlink_cross_process_bytes_exact_for_every_block_size() {
    let gpu = require_gpu("nvlink_cross_process_bytes_exact_for_every_block_size");
    for block_bytes in [1024usize, 1000, 4096, 65536, 262144] {
        let blocks = ((48 << 20) / block_bytes / 4).clamp(16, 1538);
        let prefill = prefill(&gpu, 3, blocks, block_bytes, "auto");
        let mut peer = Peer::spawn(last_gpu(), 3, blocks, block_bytes, "alloc", "pattern");
        connect(&prefill.engine, &mut peer);
        let decision = prefill.engine.transport_decision(KEY).expect("decision");
        assert_eq!(
            decision.transport,
            TransportKind::Nvlink,
            "{}",
            decision.reason
        );
        write_and_verify(&prefill, &mut peer);
        note(&format!(
            "nvlink GPU0→GPU{}: {block_bytes}-byte blocks × {blocks} × 3 layers verified ({})",
            last_gpu(),
            decision.reason
        ));
        prefill.engine.close();
        peer.exit();
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU and two processes: run scripts/gpu-tests.sh --run on a GPU machine"]
fn nvlink_bad_ids_are_refused_before_any_copy() {
    let gpu = require_gpu("nvlink_bad_ids_are_refused_before_any_copy");
    let prefill = prefill(&gpu, 2, 64, 4096, "nvlink");
    let mut peer = Peer::spawn(last_gpu(), 2, 64, 4096, "alloc", "pattern");
    connect(&prefill.engine, &mut peer);
    let err = prefill
        .engine
        .write_cache(
            KEY,
            BlockIds::U32(&[0, 1, 2]),
            BlockIds::U32(&[5, 6, 64]),
            0.0,
            None,
        )
        .expect_err("remote id 64 of 64 blocks");
    assert_eq!(err.code(), "ERR_BLOCK_ID_OUT_OF_RANGE", "{err}");
    let err = prefill
        .engine
        .write_cache(
            KEY,
            BlockIds::U32(&[0, 1]),
            BlockIds::U32(&[5, 6]),
            2.0,
            None,
        )
        .expect_err("layer 2 of 2");
    assert_eq!(err.code(), "ERR_LAYER_OUT_OF_RANGE", "{err}");
    compare(&peer.dump(), &peer.initial(), 4096);
    prefill.engine.close();
    peer.exit();
}

#[test]
#[ignore = "needs an NVIDIA GPU and two processes: run scripts/gpu-tests.sh --run on a GPU machine"]
fn nvlink_cumemcreate_memory_whole_and_over_two_allocations() {
    let gpu = require_gpu("nvlink_cumemcreate_memory_whole_and_over_two_allocations");
    for memory in ["vmm", "split"] {
        let (blocks, block_bytes) = (1538, 4096);
        let prefill = prefill(&gpu, 2, blocks, block_bytes, "nvlink");
        let mut peer = Peer::spawn(last_gpu(), 2, blocks, block_bytes, memory, "pattern");
        connect(&prefill.engine, &mut peer);
        write_and_verify(&prefill, &mut peer);
        note(&format!(
            "nvlink into cuMemCreate memory ({memory}) verified"
        ));
        prefill.engine.close();
        peer.exit();
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU and two processes: run scripts/gpu-tests.sh --run on a GPU machine"]
fn nvlink_same_gpu_between_processes() {
    let gpu = require_gpu("nvlink_same_gpu_between_processes");
    let prefill = prefill(&gpu, 2, 512, 4096, "nvlink");
    let mut peer = Peer::spawn(0, 2, 512, 4096, "alloc", "pattern");
    connect(&prefill.engine, &mut peer);
    write_and_verify(&prefill, &mut peer);
    prefill.engine.close();
    peer.exit();
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu-tests.sh --run on a GPU machine"]
fn nvlink_two_engines_in_one_process() {
    let gpu = require_gpu("nvlink_two_engines_in_one_process");
    let cuda = kvtransfer_cuda::Cuda::get().unwrap();
    let decode_gpu = cuda.gpu(last_gpu()).unwrap();
    let (layers, blocks, block_bytes) = (2, 256, 2048);
    let prefill = prefill(&gpu, layers, blocks, block_bytes, "nvlink");
    let decode_initial: Vec<Vec<u8>> = (0..layers * 2)
        .map(|r| pattern(r, blocks * block_bytes, 99))
        .collect();
    let mut decode_regions: Vec<Mem> = decode_initial
        .iter()
        .map(|c| Mem::new(Some(&decode_gpu), c.clone()))
        .collect();
    let addrs: Vec<u64> = decode_regions.iter_mut().map(Mem::addr).collect();
    let decode = Engine::new(engine_options(
        Role::Decode,
        decode_gpu.ordinal(),
        "nvlink-decode",
        &addrs,
        blocks,
        block_bytes,
        Some("nvlink"),
    ))
    .unwrap();
    let challenge = prefill.engine.auth_challenge(KEY).unwrap();
    let response = decode.auth_respond(&challenge).unwrap();
    let hello = prefill.engine.hello(KEY, &response).unwrap();
    let reply = decode.accept(&hello).unwrap();
    prefill
        .engine
        .finish_connect(KEY, "127.0.0.1", &reply)
        .unwrap();
    let local = permutation(blocks, 3)[..100].to_vec();
    let remote = permutation(blocks, 4)[..100].to_vec();
    block_on(
        prefill
            .engine
            .write_cache(
                KEY,
                BlockIds::U32(&local),
                BlockIds::U32(&remote),
                1.0,
                None,
            )
            .unwrap(),
    )
    .unwrap()
    .unwrap();
    let mut expected = decode_initial.clone();
    apply(
        &mut expected,
        &prefill.initial,
        block_bytes,
        &vec![(1, local, remote)],
    );
    let got: Vec<Vec<u8>> = decode_regions.iter().map(Mem::read).collect();
    compare(&got, &expected, block_bytes);
    prefill.engine.close();
    decode.close();
}

#[test]
#[ignore = "needs an NVIDIA GPU and two processes: run scripts/gpu-tests.sh --run on a GPU machine"]
fn nvlink_peer_death_fails_pending_calls_in_bounded_time() {
    let gpu = require_gpu("nvlink_peer_death_fails_pending_calls_in_bounded_time");
    let (layers, blocks, block_bytes) = (4, 1538, 256 << 10);
    let prefill = prefill(&gpu, layers, blocks, block_bytes, "nvlink");
    let left = Arc::new(std::sync::Mutex::new(Vec::new()));
    prefill.engine.on_peer_left(Some({
        let left = Arc::clone(&left);
        Arc::new(move |report: PeerLeft| left.lock().unwrap().push(report))
    }));
    let mut peer = Peer::spawn(last_gpu(), layers, blocks, block_bytes, "alloc", "zero");
    connect(&prefill.engine, &mut peer);
    let ids: Vec<u32> = permutation(blocks, 5);
    let mut completions = Vec::new();
    for round in 0..16 {
        completions.push(
            prefill
                .engine
                .write_cache(
                    KEY,
                    BlockIds::U32(&ids),
                    BlockIds::U32(&ids),
                    (round % layers) as f64,
                    Some(b"x".to_vec()),
                )
                .unwrap(),
        );
    }
    peer.child.kill().unwrap();
    let killed = Instant::now();
    let _ = peer.child.wait();
    let mut failed = 0;
    for completion in completions {
        if let Err(e) = block_on(completion).unwrap() {
            assert_eq!(e.code(), "ERR_PEER_DISCONNECTED", "{e}");
            failed += 1;
        }
    }
    // The link is known dead within a bounded time; later calls fail at once, typed.
    let deadline = killed + Duration::from_secs(5);
    loop {
        let result = prefill
            .engine
            .write_cache(KEY, BlockIds::U32(&[0]), BlockIds::U32(&[0]), 0.0, None)
            .map(block_on);
        match result {
            Ok(Ok(Ok(()))) => assert!(
                Instant::now() < deadline,
                "calls still succeed 5 s after the peer died"
            ),
            Ok(Ok(Err(e))) | Err(e) => {
                assert!(
                    ["ERR_PEER_DISCONNECTED", "ERR_NOT_CONNECTED"].contains(&e.code()),
                    "{e}"
                );
                break;
            }
            Ok(Err(_)) => panic!("completion dropped"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    note(&format!(
        "nvlink peer killed: {failed} of 16 pending calls failed typed, link dead after {:?}",
        killed.elapsed()
    ));
    // The side channel's end reported the peer as left, once.
    let left = left.lock().unwrap().clone();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(
        (left[0].peer.as_str(), left[0].code),
        (KEY, "ERR_PEER_DISCONNECTED"),
        "{left:?}"
    );
    note(&format!("peer left: {}", left[0].reason));
    prefill.engine.close();
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu-tests.sh --run on a GPU machine"]
fn auto_falls_back_to_tcp_when_a_side_has_host_memory() {
    let gpu = require_gpu("auto_falls_back_to_tcp_when_a_side_has_host_memory");
    let (layers, blocks, block_bytes) = (1, 16, 1024);
    let prefill = prefill(&gpu, layers, blocks, block_bytes, "auto");
    let mut host: Vec<Vec<u8>> = vec![vec![0u8; blocks * block_bytes]; 2];
    let addrs = [host[0].as_mut_ptr() as u64, host[1].as_mut_ptr() as u64];
    let decode = Engine::new(engine_options(
        Role::Decode,
        0,
        "host-decode",
        &addrs,
        blocks,
        block_bytes,
        None,
    ))
    .unwrap();
    assert!(!decode.transports().contains(&TransportKind::Nvlink));
    let challenge = prefill.engine.auth_challenge(KEY).unwrap();
    let response = decode.auth_respond(&challenge).unwrap();
    let hello = prefill.engine.hello(KEY, &response).unwrap();
    let reply = decode.accept(&hello).unwrap();
    prefill
        .engine
        .finish_connect(KEY, "127.0.0.1", &reply)
        .unwrap();
    let decision = prefill.engine.transport_decision(KEY).unwrap();
    assert_eq!(
        decision.transport,
        TransportKind::Tcp,
        "{}",
        decision.reason
    );
    // The reason names NVLink and the acceptor's own account of why it declined it.
    assert!(
        decision.reason.contains("this side offered NVLink (")
            && decision
                .reason
                .contains(") but the peer declined it: nvlink: ")
            && decision.reason.contains("host memory"),
        "{}",
        decision.reason
    );
    block_on(
        prefill
            .engine
            .write_cache(KEY, BlockIds::U32(&[3]), BlockIds::U32(&[9]), 0.0, None)
            .unwrap(),
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        host[0][9 * block_bytes..10 * block_bytes],
        prefill.initial[0][3 * block_bytes..4 * block_bytes]
    );
    note(&format!("host decode: {}", decision.reason));
    prefill.engine.close();
    decode.close();
}

/// Tensor-parallel shards over NVLink (the gathering path: one copy per segment), both
/// directions, two engines in one process: prefill rank 1 of 2 into a decode block twice
/// as large (its second half), and a decode rank 1 of 2 taking the second half of each
/// prefill block. Untouched bytes keep their pattern.
#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu-tests.sh --run on a GPU machine"]
fn nvlink_tensor_parallel_shards_both_directions() {
    let gpu = require_gpu("nvlink_tensor_parallel_shards_both_directions");
    let cuda = kvtransfer_cuda::Cuda::get().unwrap();
    let decode_gpu = cuda.gpu(last_gpu()).unwrap();
    let blocks = 64usize;
    let half = 2048usize;
    // (prefill tp, block bytes), (decode tp, block bytes), the decode byte range per block
    // that receives, and the prefill byte range it comes from.
    let cases = [
        ((2, 1, half), (1, 0, 2 * half), half..2 * half, 0..half),
        ((1, 0, 2 * half), (2, 1, half), 0..half, half..2 * half),
    ];
    for ((p_size, p_rank, p_bytes), (d_size, d_rank, d_bytes), into, from) in cases {
        let p_initial: Vec<Vec<u8>> = (0..2).map(|r| pattern(r, blocks * p_bytes, 5)).collect();
        let d_initial: Vec<Vec<u8>> = (0..2).map(|r| pattern(r, blocks * d_bytes, 77)).collect();
        let mut p_mem: Vec<Mem> = p_initial
            .iter()
            .map(|c| Mem::new(Some(&gpu), c.clone()))
            .collect();
        let mut d_mem: Vec<Mem> = d_initial
            .iter()
            .map(|c| Mem::new(Some(&decode_gpu), c.clone()))
            .collect();
        let p_addrs: Vec<u64> = p_mem.iter_mut().map(Mem::addr).collect();
        let d_addrs: Vec<u64> = d_mem.iter_mut().map(Mem::addr).collect();
        let mut p_opts = engine_options(
            Role::Prefill,
            0,
            "tp-prefill",
            &p_addrs,
            blocks,
            p_bytes,
            Some("nvlink"),
        );
        p_opts.tp = kvtransfer_engine::TpOptions {
            size: p_size,
            rank: p_rank,
            ..Default::default()
        };
        let mut d_opts = engine_options(
            Role::Decode,
            decode_gpu.ordinal(),
            "tp-decode",
            &d_addrs,
            blocks,
            d_bytes,
            Some("nvlink"),
        );
        d_opts.tp = kvtransfer_engine::TpOptions {
            size: d_size,
            rank: d_rank,
            ..Default::default()
        };
        let prefill = Engine::new(p_opts).unwrap();
        let decode = Engine::new(d_opts).unwrap();
        let challenge = prefill.auth_challenge(KEY).unwrap();
        let response = decode.auth_respond(&challenge).unwrap();
        let hello = prefill.hello(KEY, &response).unwrap();
        let reply = decode.accept(&hello).unwrap();
        prefill.finish_connect(KEY, "127.0.0.1", &reply).unwrap();
        let local = permutation(blocks, 8)[..40].to_vec();
        let remote = permutation(blocks, 9)[..40].to_vec();
        block_on(
            prefill
                .write_cache(
                    KEY,
                    BlockIds::U32(&local),
                    BlockIds::U32(&remote),
                    0.0,
                    None,
                )
                .unwrap(),
        )
        .unwrap()
        .unwrap();
        let mut expected = d_initial.clone();
        for kind in 0..2 {
            for (l, m) in local.iter().zip(&remote) {
                let (l, m) = (*l as usize, *m as usize);
                expected[kind][m * d_bytes + into.start..m * d_bytes + into.end].copy_from_slice(
                    &p_initial[kind][l * p_bytes + from.start..l * p_bytes + from.end],
                );
            }
        }
        let got: Vec<Vec<u8>> = d_mem.iter().map(Mem::read).collect();
        compare(&got, &expected, d_bytes);
        note(&format!(
            "nvlink tp {p_size}:{d_size} (prefill rank {p_rank}, decode rank {d_rank}) verified"
        ));
        prefill.close();
        decode.close();
    }
}
