//! RDMA `delivery: 'acked'` on a real device (Soft-RoCE in the VM): an acked call resolves
//! only after the receiving engine took its notice and answered; to a stopped or killed
//! receiver it fails typed, where a plain call may still resolve (the kernel's NIC
//! acknowledges one-sided WRITEs for a process that no longer runs); an answer that names
//! no waiting call is ignored and counted. The receiver of the process tests is
//! `examples/rdma_peer`. `#[ignore]`d where there is no device; `--ignored` runs them and
//! they fail on any problem, `KVTRANSFER_RDMA_DEVICE` unset included. Run with
//! `bash scripts/rxe-vm/run-rdma-tests.sh`.

mod common;

use common::hex::{hex, unhex};
use common::rdma::{device, settings};
use common::{arrival_log, assert_written, Side, SideSpec};
use kvtransfer_engine::{BlockIds, Integrity, OnDone, RailReport, Role, WriteCall};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BLOCKS: usize = 32;
const BLOCK_BYTES: usize = 16 * 1024;
const ACKED: Integrity = Integrity {
    checksum: false,
    acked: true,
};

/// A side of one layer over RDMA on `device`.
fn side(role: Role, device: &str) -> SideSpec {
    SideSpec::new(role, 1, BLOCKS, BLOCK_BYTES).over_rdma(settings(device))
}

/// Starts a call of `ids` (to the same ids) and returns where its outcome comes.
fn start(
    prefill: &Side,
    peer: &str,
    ids: &[u32],
    tag: Option<&[u8]>,
    integrity: Integrity,
    timeout: Duration,
) -> mpsc::Receiver<kvtransfer_engine::Result<()>> {
    let (sender, outcome) = mpsc::channel();
    prefill
        .engine
        .write(
            WriteCall {
                timeout: Some(timeout),
                integrity,
                ..WriteCall::ids(
                    peer,
                    BlockIds::U32(ids),
                    BlockIds::U32(ids),
                    0.0,
                    tag.map(<[u8]>::to_vec),
                )
            },
            OnDone::Callback(Box::new(move |result| {
                let _ = sender.send(result);
            })),
        )
        .expect("the call is taken");
    outcome
}

fn rails(prefill: &Side, peer: &str) -> Vec<RailReport> {
    prefill.engine.peer_info(peer).expect("connected").rails
}

/// (answers, stray answers) over the link's rails.
fn answers(prefill: &Side, peer: &str) -> (u64, u64) {
    rails(prefill, peer)
        .iter()
        .fold((0, 0), |(a, s), r| (a + r.answers, s + r.stray_answers))
}

#[test]
#[ignore = "needs an RDMA device: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_an_acked_call_resolves_after_the_receivers_arrival() {
    let dev = device("rdma_an_acked_call_resolves_after_the_receivers_arrival");
    let (log, sink) = arrival_log();
    let (prefill, decode) = common::pair(
        side(Role::Prefill, &dev),
        SideSpec {
            arrivals: Some(sink),
            ..side(Role::Decode, &dev)
        },
    );
    let calls = 40u32;
    let (seen, outcomes) = mpsc::channel();
    for i in 0..calls {
        let ids = [i % BLOCKS as u32, (i * 7 + 3) % BLOCKS as u32];
        let tag = format!("req-{i}").into_bytes();
        let log = Arc::clone(&log);
        let seen = seen.clone();
        let expected = tag.clone();
        prefill
            .engine
            .write(
                WriteCall {
                    timeout: Some(Duration::from_secs(30)),
                    integrity: ACKED,
                    ..WriteCall::ids(
                        "decode",
                        BlockIds::U32(&ids),
                        BlockIds::U32(&ids),
                        0.0,
                        Some(tag),
                    )
                },
                OnDone::Callback(Box::new(move |result| {
                    // When the call resolves, the receiver has already handed its arrival
                    // to the sink (it answers only afterwards).
                    let arrived = log.lock().unwrap().iter().any(|a| a.tag == expected);
                    let _ = seen.send((result, arrived));
                })),
            )
            .unwrap();
    }
    for _ in 0..calls {
        let (result, arrived) = outcomes.recv_timeout(Duration::from_secs(60)).unwrap();
        result.unwrap();
        assert!(
            arrived,
            "an acked call resolved before its arrival was delivered"
        );
    }
    // An acked call without a tag: the receiver answers an empty record, reports nothing.
    start(
        &prefill,
        "decode",
        &[5, 6],
        None,
        ACKED,
        Duration::from_secs(30),
    )
    .recv()
    .unwrap()
    .unwrap();
    assert_eq!(log.lock().unwrap().len(), calls as usize);
    // Plain calls stay one-sided: no answer is asked for or counted.
    start(
        &prefill,
        "decode",
        &[7],
        Some(b"plain"),
        Integrity::default(),
        Duration::from_secs(30),
    )
    .recv()
    .unwrap()
    .unwrap();
    assert_eq!(answers(&prefill, "decode"), (u64::from(calls) + 1, 0));
    let ids: Vec<u32> = (0..BLOCKS as u32).collect();
    start(
        &prefill,
        "decode",
        &ids,
        Some(b"all"),
        ACKED,
        Duration::from_secs(30),
    )
    .recv()
    .unwrap()
    .unwrap();
    assert_written(&prefill, &decode, 0, &ids, &ids);
}

/// The decode engine in another process (`examples/rdma_peer`).
struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

fn peer_binary() -> std::path::PathBuf {
    if let Ok(path) = std::env::var("KVT_RDMA_PEER") {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    for candidate in [dir.join("rdma_peer"), dir.join("../examples/rdma_peer")] {
        if candidate.exists() {
            return candidate;
        }
    }
    panic!("the acked RDMA tests need examples/rdma_peer next to the test binary (cargo test builds it) or KVT_RDMA_PEER");
}

impl Peer {
    fn spawn(device: &str, env: &[(&str, &str)]) -> Peer {
        let mut child = Command::new(peer_binary())
            .args([device, &BLOCKS.to_string(), &BLOCK_BYTES.to_string()])
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn rdma_peer");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut peer = Peer {
            child,
            stdin,
            stdout,
        };
        assert_eq!(peer.line(), "ready");
        peer
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read from rdma_peer");
        assert!(!line.is_empty(), "rdma_peer exited");
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

    /// `prefill` connects to this process as `key`.
    fn connect(&mut self, prefill: &Side, key: &str) {
        let challenge = prefill.engine.auth_challenge(key).unwrap();
        let response = self.handshake("respond", &challenge);
        let hello = prefill.engine.hello(key, &response).unwrap();
        let reply = self.handshake("accept", &hello);
        prefill
            .engine
            .finish_connect(key, "127.0.0.1", &reply)
            .unwrap();
    }

    /// Sends `signal` (`STOP`, `CONT`, `KILL`) with kill(1).
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal}: {status}");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a call to a receiver that no longer runs may fail with: never OK.
const DEAD_RECEIVER_CODES: [&str; 3] = [
    "ERR_TIMEOUT",
    "ERR_RDMA_COMPLETION",
    "ERR_PEER_DISCONNECTED",
];

#[test]
#[ignore = "needs an RDMA device: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_an_acked_call_to_a_stopped_or_killed_receiver_fails_typed() {
    let dev = device("rdma_an_acked_call_to_a_stopped_or_killed_receiver_fails_typed");
    let prefill = side(Role::Prefill, &dev).build();
    let ids: Vec<u32> = (0..8).collect();
    let timeout = Duration::from_millis(1500);

    // SIGSTOP: the process holds its queue pairs and memory but takes nothing.
    let mut stopped = Peer::spawn(&dev, &[]);
    stopped.connect(&prefill, "stopped");
    start(&prefill, "stopped", &ids, Some(b"warm"), ACKED, timeout)
        .recv()
        .unwrap()
        .unwrap();
    assert_eq!(stopped.ask("arrivals"), "1");
    stopped.signal("STOP");
    // One-sided: the kernel's NIC acknowledges the WRITEs into the stopped process.
    let plain = start(
        &prefill,
        "stopped",
        &ids,
        Some(b"plain"),
        Integrity::default(),
        timeout,
    )
    .recv()
    .unwrap();
    eprintln!("plain call to a SIGSTOPped receiver: {plain:?}");
    plain.expect("a plain call to a stopped process resolves (one-sided)");
    let started = Instant::now();
    let acked = start(&prefill, "stopped", &ids, Some(b"acked"), ACKED, timeout)
        .recv()
        .unwrap();
    eprintln!(
        "acked call to a SIGSTOPped receiver after {:?}: {acked:?}",
        started.elapsed()
    );
    let err = acked.expect_err("an acked call to a stopped process must not resolve");
    assert_eq!(err.code(), "ERR_TIMEOUT", "{err}");
    assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
    stopped.signal("CONT");
    drop(stopped);

    // SIGKILL, and the calls issued at once, before the kernel tore the process down.
    let mut killed = Peer::spawn(&dev, &[]);
    killed.connect(&prefill, "killed");
    start(&prefill, "killed", &ids, Some(b"warm"), ACKED, timeout)
        .recv()
        .unwrap()
        .unwrap();
    killed.signal("KILL");
    let plain = start(
        &prefill,
        "killed",
        &ids,
        Some(b"plain"),
        Integrity::default(),
        timeout,
    );
    let acked = start(&prefill, "killed", &ids, Some(b"acked"), ACKED, timeout);
    let (plain, acked) = (plain.recv().unwrap(), acked.recv().unwrap());
    eprintln!("calls issued right after SIGKILL: plain {plain:?}, acked {acked:?}");
    if let Err(e) = &plain {
        assert!(DEAD_RECEIVER_CODES.contains(&e.code()), "{e}");
    }
    let err = acked.expect_err("an acked call to a killed process must not resolve");
    assert!(DEAD_RECEIVER_CODES.contains(&err.code()), "{err}");
}

#[test]
#[ignore = "needs an RDMA device: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_a_wrong_answer_is_ignored_and_counted() {
    let dev = device("rdma_a_wrong_answer_is_ignored_and_counted");
    let prefill = side(Role::Prefill, &dev).build();
    let ids: Vec<u32> = (0..8).collect();
    // A receiver that answers every acked call with a call number no one waits for.
    let mut peer = Peer::spawn(&dev, &[("KVCACHE_TEST_WRONG_ANSWER", "1")]);
    peer.connect(&prefill, "wrong");
    start(
        &prefill,
        "wrong",
        &ids,
        Some(b"plain"),
        Integrity::default(),
        Duration::from_secs(30),
    )
    .recv()
    .unwrap()
    .unwrap();
    assert_eq!(answers(&prefill, "wrong"), (0, 0));
    let timeout = Duration::from_secs(3);
    let started = Instant::now();
    let acked = start(&prefill, "wrong", &ids, Some(b"acked"), ACKED, timeout);
    // The wrong answer comes and is counted while the call still waits.
    while answers(&prefill, "wrong").1 == 0 {
        assert!(started.elapsed() < timeout, "no stray answer was counted");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(answers(&prefill, "wrong"), (0, 1));
    assert!(
        acked.try_recv().is_err(),
        "a wrong answer must not complete the call"
    );
    let err = acked.recv().unwrap().expect_err("never answered right");
    assert_eq!(err.code(), "ERR_TIMEOUT", "{err}");
    assert_eq!(peer.ask("arrivals"), "2", "the receiver took both notices");
}
