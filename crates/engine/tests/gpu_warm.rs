//! Warm re-attach of GPU regions: the decode process (`examples/nvlink_peer`, memory
//! `imported`) owns cuMem memory as a sidecar's worker would and its engine imports it from
//! POSIX fds; the test process plays prefill (GPU 0). Written, parked (the engine maps a
//! filler granule over each region; NVLink writers drop their mappings), written to while
//! parked (refused typed over NVLink; over TCP it lands in the filler), swapped for new
//! worker memory at the same addresses (NVLink writers reopen the new table over the side
//! channel, `rekey`), written again: every byte is checked in the new memory, and the old
//! memory took nothing after the park. Legacy IPC regions are refused typed.
//! `#[ignore]`d: run with `--ignored` on a GPU machine (scripts/gpu-tests.sh --run).

use futures_executor::block_on;
use kvtransfer_engine::{BlockIds, Engine, TransportKind};
use std::io::BufReader;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod gpu_support;
mod nvlink_support;
use gpu_support::hex::{hex, unhex};
use gpu_support::{note, permutation, require_gpu};
use nvlink_support::*;

const LAYERS: usize = 2;
const BLOCKS: usize = 64;
/// 64 × 64 KiB = 4 MiB a region: two 2 MiB granules, so a region can be swapped for two
/// allocations mapped back to back.
const BLOCK_BYTES: usize = 65536;

/// The decode process over imported cuMem memory, on `transport`.
fn spawn(transport: &str) -> Peer {
    let mut child = Command::new(peer_binary())
        .args([
            last_gpu().to_string(),
            LAYERS.to_string(),
            BLOCKS.to_string(),
            BLOCK_BYTES.to_string(),
            "imported".into(),
            "pattern".into(),
        ])
        .env("KVT_PEER_TRANSPORT", transport)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn nvlink_peer");
    let stdin = child.stdin.take().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut peer = Peer {
        child,
        stdin,
        stdout,
        layers: LAYERS,
        blocks: BLOCKS,
        block_bytes: BLOCK_BYTES,
    };
    assert_eq!(peer.line(), "ready");
    peer
}

fn write(
    engine: &Engine,
    layer: usize,
    local: &[u32],
    remote: &[u32],
) -> kvtransfer_engine::Result<()> {
    let completion = engine.write_cache(
        KEY,
        BlockIds::U32(local),
        BlockIds::U32(remote),
        layer as f64,
        None,
    )?;
    block_on(completion).expect("completed")
}

/// Scattered calls on every layer, each awaited; returns what they wrote where.
fn write_layers(prefill: &Prefill, seed: u64) -> Calls {
    let mut calls: Calls = Vec::new();
    for layer in 0..LAYERS {
        let count = BLOCKS / 2;
        let local = permutation(BLOCKS, seed + layer as u64)[..count].to_vec();
        let remote = permutation(BLOCKS, seed + 100 + layer as u64)[..count].to_vec();
        write(&prefill.engine, layer, &local, &remote).expect("write");
        calls.push((layer, local, remote));
    }
    calls
}

fn dump_old(peer: &mut Peer) -> Vec<Vec<u8>> {
    let path = std::env::temp_dir().join(format!("kvt-warm-old-{}", std::process::id()));
    assert_eq!(peer.ask(&format!("dumpold {}", path.display())), "ok");
    let all = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    all.chunks(BLOCKS * BLOCK_BYTES)
        .map(<[u8]>::to_vec)
        .collect()
}

/// The whole cycle over `transport` (`nvlink` or `tcp`).
fn warm_cycle(transport: &str) {
    let gpu = require_gpu("warm_cycle");
    let prefill = prefill(&gpu, LAYERS, BLOCKS, BLOCK_BYTES, transport);
    let mut peer = spawn(transport);
    connect(&prefill.engine, &mut peer);
    let decision = prefill.engine.transport_decision(KEY).expect("decision");
    assert_eq!(decision.transport.name(), transport, "{}", decision.reason);
    assert_eq!(peer.ask("refusal"), "none", "cuMem regions can be swapped");

    // The first worker's memory takes the writes.
    let calls = write_layers(&prefill, 7);
    let mut expected = peer.initial();
    apply(&mut expected, &prefill.initial, BLOCK_BYTES, &calls);
    compare(&peer.dump(), &expected, BLOCK_BYTES);

    // Parked. Over NVLink the writer's link drops its mappings once the release came over
    // the side channel: its writes fail typed from then on. Over TCP a write lands in the
    // filler granule the decode engine mapped over the region.
    assert_eq!(peer.ask("park"), "ok");
    let stray_local: Vec<u32> = (0..8).collect();
    let stray_remote: Vec<u32> = (40..48).collect();
    if transport == "nvlink" {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match write(&prefill.engine, 0, &stray_local, &stray_remote) {
                Err(e) => {
                    assert_eq!(e.code(), "ERR_FENCED", "{e}");
                    assert!(e.to_string().contains("parked"), "{e}");
                    break;
                }
                Ok(()) => {
                    assert!(
                        Instant::now() < deadline,
                        "writes still land 5 s after the park"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    } else {
        write(&prefill.engine, 0, &stray_local, &stray_remote).expect("lands in the filler");
        write(&prefill.engine, 1, &stray_local, &stray_remote).expect("lands in the filler");
    }
    // From here on nothing may reach the old worker's memory.
    let old_at_park = peer.dump();
    if transport == "nvlink" {
        let err = write(&prefill.engine, 1, &stray_local, &stray_remote).unwrap_err();
        assert_eq!(err.code(), "ERR_FENCED", "{err}");
    }

    // A swap that does not fit is refused, maps nothing, and leaves the regions parked.
    let refused = peer.ask("swap zero short");
    assert!(
        refused.starts_with("error ERR_INVALID_ARGUMENT") && refused.contains("bytes"),
        "{refused}"
    );
    if transport == "nvlink" {
        let err = write(&prefill.engine, 0, &stray_local, &stray_remote).unwrap_err();
        assert_eq!(err.code(), "ERR_FENCED", "still parked: {err}");
    }

    // The new worker: each region over two allocations, zeroed.
    assert_eq!(peer.ask("swap zero split"), "ok");
    let keys = peer.ask("keys");
    if transport == "nvlink" {
        assert_ne!(keys, "none", "NVLink hands its writers a new table");
        let updated = prefill
            .engine
            .rekey(KEY, TransportKind::Nvlink, &unhex(&keys))
            .expect("the writer reopened the new memory");
        assert_eq!(updated, 1);
        let err = prefill
            .engine
            .rekey(KEY, TransportKind::Nvlink, &[1, 2, 3])
            .unwrap_err();
        assert_eq!(err.code(), "ERR_PROTOCOL", "{err}");
    } else {
        assert_eq!(keys, "none", "TCP needs nothing");
    }
    assert!(
        prefill.engine.is_connected(KEY),
        "the prefill never reconnected"
    );

    let calls = write_layers(&prefill, 77);
    let mut expected: Vec<Vec<u8>> = vec![vec![0u8; BLOCKS * BLOCK_BYTES]; LAYERS * 2];
    apply(&mut expected, &prefill.initial, BLOCK_BYTES, &calls);
    compare(&peer.dump(), &expected, BLOCK_BYTES);
    compare(&dump_old(&mut peer), &old_at_park, BLOCK_BYTES);
    // And once more parked and swapped (back to one allocation a region).
    assert_eq!(peer.ask("park"), "ok");
    assert_eq!(peer.ask("swap pattern"), "ok");
    if transport == "nvlink" {
        let keys = unhex(&peer.ask("keys"));
        assert_eq!(
            prefill
                .engine
                .rekey(KEY, TransportKind::Nvlink, &keys)
                .unwrap(),
            1
        );
    }
    let calls = write_layers(&prefill, 177);
    let mut expected: Vec<Vec<u8>> = (0..LAYERS * 2)
        .map(|r| gpu_support::pattern(r, BLOCKS * BLOCK_BYTES, 55))
        .collect();
    apply(&mut expected, &prefill.initial, BLOCK_BYTES, &calls);
    compare(&peer.dump(), &expected, BLOCK_BYTES);
    note(&format!(
        "warm re-attach over {transport} (GPU0→GPU{}): parked, swapped twice, every byte in the new memory",
        last_gpu()
    ));
    prefill.engine.close();
    peer.exit();
}

#[test]
#[ignore = "needs an NVIDIA GPU and two processes: run scripts/gpu-tests.sh --run on a GPU machine"]
fn nvlink_writer_follows_a_warm_reattach_of_cumem_regions() {
    warm_cycle("nvlink");
}

#[test]
#[ignore = "needs an NVIDIA GPU and two processes: run scripts/gpu-tests.sh --run on a GPU machine"]
fn tcp_writes_follow_a_warm_reattach_of_cumem_regions() {
    warm_cycle("tcp");
}

#[test]
#[ignore = "needs an NVIDIA GPU and two processes: run scripts/gpu-tests.sh --run on a GPU machine"]
fn legacy_ipc_regions_are_refused_typed() {
    let gpu = require_gpu("legacy_ipc_regions_are_refused_typed");
    let len = BLOCKS * BLOCK_BYTES;
    let buffer = gpu.alloc(len).expect("cuMemAlloc");
    let handle = kvtransfer_cuda::Cuda::get()
        .unwrap()
        .ipc_handle(buffer.ptr())
        .expect("IPC handle");
    let mut peer = spawn("tcp");
    let answer = peer.ask(&format!("ipc {} {len}", hex(&handle)));
    assert!(answer.starts_with("error ERR_UNSUPPORTED"), "{answer}");
    for needle in [
        "legacy CUDA IPC handle",
        "expandable_segments:True",
        "attach anew",
    ] {
        assert!(answer.contains(needle), "{needle}: {answer}");
    }
    peer.exit();
}
