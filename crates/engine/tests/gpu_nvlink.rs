//! The NVLink transport between two processes of one host: the test process plays prefill
//! (regions on GPU 0) and spawns `examples/nvlink_peer` as decode (regions on the last GPU,
//! or GPU 0). `#[ignore]`d: run with `--ignored` on a GPU machine (scripts/gpu-tests.sh
//! --run), where a missing GPU, driver or peer binary fails them.

use futures_executor::block_on;
use kvtransfer_engine::{
    BlockIds, CallBlocks, CallPeer, Engine, OnDone, PeerLeft, Role, TransportKind, WriteCall,
};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod gpu_support;
use gpu_support::{engine_options, hex, note, pattern, permutation, require_gpu, unhex, Mem};

const KEY: &str = "decode:0";

/// The decode process.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    layers: usize,
    blocks: usize,
    block_bytes: usize,
}

fn peer_binary() -> std::path::PathBuf {
    if let Ok(path) = std::env::var("KVT_NVLINK_PEER") {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    for candidate in [dir.join("nvlink_peer"), dir.join("../examples/nvlink_peer")] {
        if candidate.exists() {
            return candidate;
        }
    }
    panic!("the NVLink tests need examples/nvlink_peer next to the test binary (scripts/gpu-tests.sh builds it) or KVT_NVLINK_PEER");
}

impl Peer {
    fn spawn(
        gpu: u32,
        layers: usize,
        blocks: usize,
        block_bytes: usize,
        memory: &str,
        init: &str,
    ) -> Peer {
        let mut child = Command::new(peer_binary())
            .args([
                gpu.to_string(),
                layers.to_string(),
                blocks.to_string(),
                block_bytes.to_string(),
                memory.to_string(),
                init.to_string(),
            ])
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
            layers,
            blocks,
            block_bytes,
        };
        assert_eq!(peer.line(), "ready");
        peer
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read from nvlink_peer");
        assert!(!line.is_empty(), "nvlink_peer exited");
        line.trim_end().to_string()
    }

    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        self.line()
    }

    fn handshake(&mut self, command: &str, bytes: &[u8]) -> Vec<u8> {
        let answer = self.ask(&format!("{command} {}", hex(bytes)));
        assert!(!answer.starts_with("error"), "{command}: {answer}");
        unhex(&answer)
    }

    /// Every region, in order.
    fn dump(&mut self) -> Vec<Vec<u8>> {
        let path = std::env::temp_dir().join(format!("kvt-nvlink-dump-{}", std::process::id()));
        assert_eq!(self.ask(&format!("dump {}", path.display())), "ok");
        let all = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let len = self.blocks * self.block_bytes;
        assert_eq!(all.len(), self.layers * 2 * len);
        all.chunks(len).map(<[u8]>::to_vec).collect()
    }

    fn initial(&self) -> Vec<Vec<u8>> {
        (0..self.layers * 2)
            .map(|r| pattern(r, self.blocks * self.block_bytes, 99))
            .collect()
    }

    fn exit(mut self) {
        writeln!(self.stdin, "exit").unwrap();
        let _ = self.stdin.flush();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "nvlink_peer exited with {status}");
    }
}

/// The prefill side in this process: patterned regions on `gpu`.
struct Prefill {
    engine: Engine,
    _regions: Vec<Mem>,
    initial: Vec<Vec<u8>>,
}

fn prefill(
    gpu: &Arc<kvtransfer_cuda::Gpu>,
    layers: usize,
    blocks: usize,
    block_bytes: usize,
    transport: &str,
) -> Prefill {
    let initial: Vec<Vec<u8>> = (0..layers * 2)
        .map(|r| pattern(r, blocks * block_bytes, 7))
        .collect();
    let mut regions: Vec<Mem> = initial
        .iter()
        .map(|c| Mem::new(Some(gpu), c.clone()))
        .collect();
    let addrs: Vec<u64> = regions.iter_mut().map(Mem::addr).collect();
    let engine = Engine::new(engine_options(
        Role::Prefill,
        gpu.ordinal(),
        "nvlink-prefill",
        &addrs,
        blocks,
        block_bytes,
        Some(transport),
    ))
    .expect("prefill engine");
    Prefill {
        engine,
        _regions: regions,
        initial,
    }
}

fn connect(prefill: &Engine, peer: &mut Peer) {
    let challenge = prefill.auth_challenge(KEY).unwrap();
    let response = peer.handshake("respond", &challenge);
    let hello = prefill.hello(KEY, &response).unwrap();
    let reply = peer.handshake("accept", &hello);
    prefill.finish_connect(KEY, "127.0.0.1", &reply).unwrap();
}

fn last_gpu() -> u32 {
    kvtransfer_cuda::Cuda::get()
        .unwrap()
        .device_count()
        .unwrap()
        - 1
}

type Calls = Vec<(usize, Vec<u32>, Vec<u32>)>;

/// `expected` with every call's blocks copied from the prefill content, in order.
fn apply(expected: &mut [Vec<u8>], source: &[Vec<u8>], block_bytes: usize, calls: &Calls) {
    for (layer, local, remote) in calls {
        for kind in 0..2 {
            let r = layer * 2 + kind;
            for (l, m) in local.iter().zip(remote) {
                let (l, m) = (*l as usize * block_bytes, *m as usize * block_bytes);
                expected[r][m..m + block_bytes].copy_from_slice(&source[r][l..l + block_bytes]);
            }
        }
    }
}

fn compare(got: &[Vec<u8>], want: &[Vec<u8>], block_bytes: usize) {
    for (r, (got, want)) in got.iter().zip(want).enumerate() {
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            let blocks: Vec<usize> = got
                .chunks(block_bytes)
                .zip(want.chunks(block_bytes))
                .enumerate()
                .filter(|(_, (g, w))| g != w)
                .map(|(b, _)| b)
                .collect();
            let block = at / block_bytes;
            let bytes = |v: &[u8]| v[block * block_bytes..][..16.min(block_bytes)].to_vec();
            panic!(
                "region {r} differs first at byte {at} (block {block}); {} blocks differ \
                 (first: {:?}); block {block} starts {:?}, expected {:?}",
                blocks.len(),
                &blocks[..blocks.len().min(8)],
                bytes(got),
                bytes(want)
            );
        }
    }
}

/// Scattered tagged calls on every layer, all in flight; bytes and notices checked.
fn write_and_verify(prefill: &Prefill, peer: &mut Peer) {
    let (blocks, block_bytes) = (peer.blocks, peer.block_bytes);
    let mut calls: Calls = Vec::new();
    let mut completions = Vec::new();
    for layer in 0..peer.layers {
        let count = blocks * 3 / 4;
        let local = permutation(blocks, 7 + layer as u64)[..count].to_vec();
        let remote = permutation(blocks, 1000 + layer as u64)[..count].to_vec();
        completions.push(
            prefill
                .engine
                .write_cache(
                    KEY,
                    BlockIds::U32(&local),
                    BlockIds::U32(&remote),
                    layer as f64,
                    Some(format!("t{layer}").into_bytes()),
                )
                .unwrap(),
        );
        calls.push((layer, local, remote));
    }
    for completion in completions {
        block_on(completion).unwrap().unwrap();
    }
    // Notices are sent after the bytes landed; the peer sees them shortly after.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let arrivals = peer.ask("arrivals");
        if arrivals.starts_with(&format!("{} ", peer.layers)) {
            break;
        }
        assert!(Instant::now() < deadline, "arrivals: {arrivals}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut expected = peer.initial();
    apply(&mut expected, &prefill.initial, block_bytes, &calls);
    compare(&peer.dump(), &expected, block_bytes);
}

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

/// Calls issued by `issue(i)` (call i writes layer i % layers), `depth` in flight, for at
/// least ~0.3 s after 8 untimed ones: GB/s of `bytes_per_call`, µs per call, and µs per
/// call spent in `issue` itself (the synchronous part: checks, planning, the launch).
fn measure(
    issue: impl Fn(usize) -> kvtransfer_engine::Completion,
    depth: usize,
    bytes_per_call: f64,
) -> (f64, f64, f64) {
    let in_call = std::cell::Cell::new(Duration::ZERO);
    let timed = |i: usize| {
        let started = Instant::now();
        let completion = issue(i);
        in_call.set(in_call.get() + started.elapsed());
        completion
    };
    for i in 0..8 {
        block_on(timed(i)).unwrap().unwrap();
    }
    in_call.set(Duration::ZERO);
    let mut pending = std::collections::VecDeque::new();
    let started = Instant::now();
    let mut calls = 0usize;
    while started.elapsed() < Duration::from_millis(300) || calls < 20 {
        while pending.len() < depth {
            pending.push_back(timed(calls));
            calls += 1;
        }
        block_on(pending.pop_front().unwrap()).unwrap().unwrap();
    }
    for completion in pending {
        block_on(completion).unwrap().unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    (
        calls as f64 * bytes_per_call / seconds / 1e9,
        seconds / calls as f64 * 1e6,
        in_call.get().as_secs_f64() / calls as f64 * 1e6,
    )
}

#[test]
#[ignore = "benchmark; needs an NVIDIA GPU and two processes: scripts/gpu-tests.sh --run"]
fn nvlink_bench_grid() {
    let gpu = require_gpu("nvlink_bench_grid");
    let peer_gpu = last_gpu();
    let mode = match (
        std::env::var("KVCACHE_CUDA_COPY_KERNEL").as_deref(),
        std::env::var("KVCACHE_CUDA_BATCH_COPY").as_deref(),
    ) {
        (Ok("0"), Ok("0")) => "one cuMemcpyAsync per block (FastDeploy's way)",
        (Ok("0"), _) => "copy engines, one cuMemcpyBatchAsync per call",
        _ => "kvtransfer default (one copy-kernel launch per call)",
    };
    // The link ceiling: one 512 MiB device-to-device copy (what the bench CLI uses too).
    let ceiling = kvtransfer_engine::peer_copy_gbps(0, peer_gpu, 512 << 20, 10).unwrap();
    let (layers, blocks) = (4usize, 1538usize);
    let mut table = format!(
        "### NVLink GPU 0 → GPU {peer_gpu}: {mode}\n\nbatch {blocks} scattered blocks (random ids both sides), K+V, one layer per call; link ceiling (one 512 MiB copy) {ceiling:.1} GB/s\n\n| block | 1 in flight GB/s | µs/call (in writeCache) | 4 in flight GB/s | µs/call (in writeCache) | 4 in flight / ceiling |\n| --- | --- | --- | --- | --- | --- |\n"
    );
    let mut prepared = String::from("\nThe same calls with the block list prepared once (`prepareBlocks`), one call per layer:\n\n| block | 1 in flight GB/s | µs/call | 4 in flight GB/s | µs/call |\n| --- | --- | --- | --- | --- |\n");
    for block_bytes in [1usize << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10] {
        let mut regions = Vec::new();
        for _ in 0..layers * 2 {
            let buffer = gpu.alloc(blocks * block_bytes).unwrap();
            buffer.fill(1).unwrap();
            regions.push(buffer);
        }
        let addrs: Vec<u64> = regions.iter().map(|b| b.ptr()).collect();
        let engine = Engine::new(engine_options(
            Role::Prefill,
            0,
            "nvlink-bench",
            &addrs,
            blocks,
            block_bytes,
            Some("nvlink"),
        ))
        .unwrap();
        let mut peer = Peer::spawn(peer_gpu, layers, blocks, block_bytes, "alloc", "zero");
        connect(&engine, &mut peer);
        let local = permutation(blocks, 11);
        let remote = permutation(blocks, 12);
        let bytes = (2 * blocks * block_bytes) as f64;
        let plain = |i: usize| {
            engine
                .write_cache(
                    KEY,
                    BlockIds::U32(&local),
                    BlockIds::U32(&remote),
                    (i % layers) as f64,
                    None,
                )
                .unwrap()
        };
        // The block list prepared once (`prepare_blocks`) and written per layer, as
        // FastDeploy's cache messager does (the same ids for every layer of a request).
        let list = engine
            .prepare_blocks(KEY, BlockIds::U32(&local), BlockIds::U32(&remote))
            .unwrap();
        let prepared_call = |i: usize| {
            let (sender, completion) = futures_channel::oneshot::channel();
            engine
                .write(
                    WriteCall {
                        peer: CallPeer::Key(KEY),
                        blocks: CallBlocks::Prepared(&list),
                        layer: (i % layers) as f64,
                        tag: None,
                        timeout: None,
                        integrity: Default::default(),
                    },
                    OnDone::Callback(Box::new(move |result| {
                        let _ = sender.send(result);
                    })),
                )
                .unwrap();
            completion
        };
        let (one, one_us, one_sync) = measure(plain, 1, bytes);
        let (four, four_us, four_sync) = measure(plain, 4, bytes);
        table.push_str(&format!(
            "| {} KiB | {one:.1} | {one_us:.1} ({one_sync:.1}) | {four:.1} | {four_us:.1} ({four_sync:.1}) | {:.2} |\n",
            block_bytes >> 10,
            four / ceiling
        ));
        let (p_one, p_one_us, _) = measure(prepared_call, 1, bytes);
        let (p_four, p_four_us, _) = measure(prepared_call, 4, bytes);
        prepared.push_str(&format!(
            "| {} KiB | {p_one:.1} | {p_one_us:.1} | {p_four:.1} | {p_four_us:.1} |\n",
            block_bytes >> 10
        ));
        engine.close();
        peer.exit();
    }
    table.push_str(&prepared);
    note(&table);
    if let Ok(path) = std::env::var("KVT_GPU_BENCH_OUT") {
        let path = format!("{}-nvlink.md", path.trim_end_matches(".md"));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        writeln!(file, "{table}").unwrap();
    }
}

/// The copy kernel alone (no engine): one launch moves 1538 scattered K and V blocks from
/// GPU 0 into the last GPU's memory; µs per launch waiting for each, and pipelined. Shows
/// how much of a call's time is the GPU's. `KVT_PTX_VARIANTS=path:threads:segments,...`
/// adds variants of the kernel to compare.
#[test]
#[ignore = "benchmark; needs an NVIDIA GPU: scripts/gpu-tests.sh --run"]
fn nvlink_copy_kernel_alone() {
    let gpu = require_gpu("nvlink_copy_kernel_alone");
    let cuda = kvtransfer_cuda::Cuda::get().unwrap();
    let peer = cuda.gpu(last_gpu()).unwrap();
    gpu.enable_peer_access(&peer).unwrap();
    let blocks = 1538usize;
    let mut variants = vec![("embedded".to_string(), gpu.copy_kernel().unwrap())];
    if let Ok(list) = std::env::var("KVT_PTX_VARIANTS") {
        for item in list.split(',').filter(|s| !s.is_empty()) {
            let parts: Vec<&str> = item.split(':').collect();
            let ptx = std::fs::read_to_string(parts[0]).unwrap();
            let kernel = gpu
                .copy_kernel_from(&ptx, parts[1].parse().unwrap(), parts[2].parse().unwrap())
                .unwrap();
            variants.push((item.to_string(), kernel));
        }
    }
    let mut report = String::from("| kernel | block | µs/launch (waited) | µs/launch (pipelined) | GB/s pipelined |\n| --- | --- | --- | --- | --- |\n");
    for block_bytes in [1usize << 10, 4 << 10] {
        let src: Vec<_> = (0..2)
            .map(|_| gpu.alloc(blocks * block_bytes).unwrap())
            .collect();
        let dst: Vec<_> = (0..2)
            .map(|_| peer.alloc(blocks * block_bytes).unwrap())
            .collect();
        let local = permutation(blocks, 21);
        let remote = permutation(blocks, 22);
        let n = 2 * blocks;
        let mut desc = gpu.pinned(3 * 8 * n).unwrap();
        let base = desc.as_mut_ptr().cast::<u64>();
        for kind in 0..2 {
            for i in 0..blocks {
                let at = kind * blocks + i;
                // SAFETY: `desc` holds 3n u64 and at < n.
                unsafe {
                    *base.add(at) = dst[kind].ptr() + (remote[i] as usize * block_bytes) as u64;
                    *base.add(n + at) = src[kind].ptr() + (local[i] as usize * block_bytes) as u64;
                    *base.add(2 * n + at) = block_bytes as u64;
                }
            }
        }
        // What filling such a table costs on this host: pinned (mapped) memory vs the heap.
        let fill = |out: *mut u64| {
            let started = Instant::now();
            for _ in 0..100 {
                for i in 0..3 * n {
                    // SAFETY: both targets hold 3n u64.
                    unsafe { out.add(i).write_volatile(i as u64) };
                }
            }
            started.elapsed().as_secs_f64() / 100.0 * 1e6
        };
        let mut heap = vec![0u64; 3 * n];
        let restore: Vec<u64> = (0..3 * n)
            .map(|i| {
                // SAFETY: i < 3n.
                unsafe { *base.add(i) }
            })
            .collect();
        let (pinned_us, heap_us) = (fill(base), fill(heap.as_mut_ptr()));
        for (i, v) in restore.iter().enumerate() {
            // SAFETY: i < 3n.
            unsafe { *base.add(i) = *v };
        }
        note(&format!(
            "{} KiB: writing the {}-byte descriptor table: {pinned_us:.1} µs into pinned memory, {heap_us:.1} µs into the heap",
            block_bytes >> 10,
            24 * n
        ));
        let at = base as u64;
        let stream = gpu.stream().unwrap();
        for (name, kernel) in &variants {
            // SAFETY: descriptors of n segments in mapped pinned memory, every range live
            // device memory (peer access enabled), not overlapping; synchronized before
            // anything is freed.
            let launch = || unsafe {
                kernel
                    .launch(&stream, at, at + 8 * n as u64, at + 16 * n as u64, n as u32)
                    .unwrap()
            };
            for _ in 0..20 {
                launch();
            }
            stream.synchronize().unwrap();
            let reps = 300;
            let started = Instant::now();
            for _ in 0..reps {
                launch();
                stream.synchronize().unwrap();
            }
            let waited = started.elapsed().as_secs_f64() / reps as f64 * 1e6;
            let started = Instant::now();
            for _ in 0..reps {
                launch();
            }
            stream.synchronize().unwrap();
            let pipelined = started.elapsed().as_secs_f64() / reps as f64 * 1e6;
            // The launch call alone (host side), queued behind the previous ones.
            let started = Instant::now();
            for _ in 0..reps {
                launch();
            }
            let launch_us = started.elapsed().as_secs_f64() / reps as f64 * 1e6;
            stream.synchronize().unwrap();
            note(&format!("{name}: cuLaunchKernel call {launch_us:.2} µs"));
            report.push_str(&format!(
                "| {name} | {} KiB | {waited:.1} | {pipelined:.1} | {:.1} |\n",
                block_bytes >> 10,
                (n * block_bytes) as f64 / pipelined / 1e3
            ));
        }
    }
    note(&report);
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
