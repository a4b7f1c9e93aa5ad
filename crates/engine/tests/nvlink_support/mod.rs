//! The NVLink tests' two processes (`gpu_nvlink.rs`, `gpu_nvlink_bench.rs`): the test
//! process plays prefill (regions on GPU 0) and drives `examples/nvlink_peer` as decode
//! (regions on the last GPU, or GPU 0) over its stdin and stdout.
#![allow(
    dead_code,
    reason = "each NVLink test binary uses a different part of the shared fixtures"
)]

use crate::gpu_support::hex::{hex, unhex};
use crate::gpu_support::{engine_options, pattern, permutation, Mem};
use futures_executor::block_on;
use kvtransfer_engine::{BlockIds, Engine, Role};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const KEY: &str = "decode:0";

/// The decode process.
pub struct Peer {
    pub child: Child,
    pub stdin: ChildStdin,
    pub stdout: BufReader<ChildStdout>,
    pub layers: usize,
    pub blocks: usize,
    pub block_bytes: usize,
}

pub fn peer_binary() -> std::path::PathBuf {
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
    pub fn spawn(
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

    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read from nvlink_peer");
        assert!(!line.is_empty(), "nvlink_peer exited");
        line.trim_end().to_string()
    }

    pub fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        self.line()
    }

    pub fn handshake(&mut self, command: &str, bytes: &[u8]) -> Vec<u8> {
        let answer = self.ask(&format!("{command} {}", hex(bytes)));
        assert!(!answer.starts_with("error"), "{command}: {answer}");
        unhex(&answer)
    }

    /// Every region, in order.
    pub fn dump(&mut self) -> Vec<Vec<u8>> {
        let path = std::env::temp_dir().join(format!("kvt-nvlink-dump-{}", std::process::id()));
        assert_eq!(self.ask(&format!("dump {}", path.display())), "ok");
        let all = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let len = self.blocks * self.block_bytes;
        assert_eq!(all.len(), self.layers * 2 * len);
        all.chunks(len).map(<[u8]>::to_vec).collect()
    }

    pub fn initial(&self) -> Vec<Vec<u8>> {
        (0..self.layers * 2)
            .map(|r| pattern(r, self.blocks * self.block_bytes, 99))
            .collect()
    }

    pub fn exit(mut self) {
        writeln!(self.stdin, "exit").unwrap();
        let _ = self.stdin.flush();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "nvlink_peer exited with {status}");
    }
}

/// The prefill side in this process: patterned regions on `gpu`.
pub struct Prefill {
    pub engine: Engine,
    pub _regions: Vec<Mem>,
    pub initial: Vec<Vec<u8>>,
}

pub fn prefill(
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

pub fn connect(prefill: &Engine, peer: &mut Peer) {
    let challenge = prefill.auth_challenge(KEY).unwrap();
    let response = peer.handshake("respond", &challenge);
    let hello = prefill.hello(KEY, &response).unwrap();
    let reply = peer.handshake("accept", &hello);
    prefill.finish_connect(KEY, "127.0.0.1", &reply).unwrap();
}

pub fn last_gpu() -> u32 {
    kvtransfer_cuda::Cuda::get()
        .unwrap()
        .device_count()
        .unwrap()
        - 1
}

pub type Calls = Vec<(usize, Vec<u32>, Vec<u32>)>;

/// `expected` with every call's blocks copied from the prefill content, in order.
pub fn apply(expected: &mut [Vec<u8>], source: &[Vec<u8>], block_bytes: usize, calls: &Calls) {
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

pub fn compare(got: &[Vec<u8>], want: &[Vec<u8>], block_bytes: usize) {
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
pub fn write_and_verify(prefill: &Prefill, peer: &mut Peer) {
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
