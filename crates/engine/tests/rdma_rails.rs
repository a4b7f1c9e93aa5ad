//! Several NICs per link (rails) on real devices: the Soft-RoCE VM with two rxe devices on
//! two interfaces (`RXE_VM_RAILS=2`: rxe0 on dummy0 10.77.0.1/24, rxe1 on dummy1 with
//! 10.78.0.1/24 and 10.99.0.1/24). `#[ignore]`d where there is no such VM; run with
//! `bash scripts/rxe-vm/run-rdma-tests.sh`, where they fail on any problem (the second
//! device unset included).

mod common;

use common::rdma::settings;
use common::{assert_written, connect, hello, write, Side, SideSpec};
use futures_executor::block_on;
use kvtransfer_engine::internals::{Descriptor, Envelope, GidCandidate, RdmaEndpoint};
use kvtransfer_engine::{
    BlockIds, RailReport, RdmaSettings, Role, TransportDetails, TransportKind,
};

/// The two devices (`KVTRANSFER_RDMA_DEVICE`, `KVTRANSFER_RDMA_DEVICE2`).
/// The tests take turns: two of them take the second rail's interface down, which the
/// others need up (cargo runs a binary's tests on parallel threads).
static RAILS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    RAILS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn devices(test: &str) -> (String, String) {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{test} needs {name} (run scripts/rxe-vm/run-rdma-tests.sh, RXE_VM_RAILS=2)")
        })
    };
    (
        var("KVTRANSFER_RDMA_DEVICE"),
        var("KVTRANSFER_RDMA_DEVICE2"),
    )
}

fn spec(role: Role, blocks: usize, block_bytes: usize, rdma: RdmaSettings) -> SideSpec {
    SideSpec::new(role, 2, blocks, block_bytes).over_rdma(rdma)
}

fn rails(side: &Side) -> Vec<RailReport> {
    side.engine.peer_info("decode").expect("connected").rails
}

fn v4_gid(a: [u8; 4], prefix: u8) -> GidCandidate {
    let mut gid = [0u8; 16];
    gid[10] = 0xff;
    gid[11] = 0xff;
    gid[12..].copy_from_slice(&a);
    GidCandidate {
        gid,
        v2: true,
        prefix,
    }
}

#[test]
#[ignore = "needs two RDMA devices: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_the_rdma_devices_option_wins_over_kvcache_rdma_nics() {
    let _turn = one_at_a_time();
    let (a, b) = devices("rdma_the_rdma_devices_option_wins_over_kvcache_rdma_nics");
    // KVCACHE_RDMA_NICS names the first device, the option the second: the option's.
    let named = settings(&a)
        .with_devices(Some(vec![b.clone()]))
        .expect("a valid list");
    let chosen = spec(Role::Decode, 4, 1024, named).build();
    let explanation = chosen
        .engine
        .transport_explanation(TransportKind::Rdma)
        .unwrap();
    let TransportDetails::Rdma(details) = explanation.details else {
        panic!("{explanation:?}");
    };
    let names: Vec<&str> = details.rails.iter().map(|r| r.device.as_str()).collect();
    assert_eq!(names, [b.as_str()]);
    assert_eq!(
        details.nics,
        format!(
            "named by rdmaDevices: {b} (KVCACHE_RDMA_NICS is ignored while the option is given)"
        )
    );
    // Without the option, the variable's entry.
    let by_variable = spec(Role::Decode, 4, 1024, settings(&a)).build();
    let explanation = by_variable
        .engine
        .transport_explanation(TransportKind::Rdma)
        .unwrap();
    let TransportDetails::Rdma(details) = explanation.details else {
        panic!("{explanation:?}");
    };
    assert_eq!(details.nics, format!("named by KVCACHE_RDMA_NICS: {a}"));
}

#[test]
#[ignore = "needs two RDMA devices: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_two_rails_split_a_calls_bytes_and_every_byte_lands() {
    let _turn = one_at_a_time();
    let (a, b) = devices("rdma_two_rails_split_a_calls_bytes_and_every_byte_lands");
    // Unset NICs: every active port is a rail.
    let auto = spec(
        Role::Decode,
        4,
        1024,
        RdmaSettings {
            nics: Vec::new(),
            devices: None,
            ..settings("")
        },
    )
    .build();
    let explanation = auto
        .engine
        .transport_explanation(TransportKind::Rdma)
        .unwrap();
    let TransportDetails::Rdma(details) = explanation.details else {
        panic!("{explanation:?}");
    };
    let names: Vec<&str> = details.rails.iter().map(|r| r.device.as_str()).collect();
    assert!(
        names.contains(&a.as_str()) && names.contains(&b.as_str()),
        "{names:?}"
    );
    // Host memory, nothing named: every active port, and it says so.
    assert_eq!(details.nics, "every active port: no GPU regions");
    drop(auto);

    let both = format!("{a}+{b}");
    let block_bytes = 16 * 1024;
    let (prefill, decode) = common::pair(
        spec(Role::Prefill, 512, block_bytes, settings(&both)),
        spec(Role::Decode, 515, block_bytes, settings(&both)),
    );
    let report = rails(&prefill);
    assert_eq!(report.len(), 2, "{report:?}");
    assert!(report.iter().all(|r| r.state == "healthy"), "{report:?}");
    // NIC resources: each side of the link holds 2 rails × 2 QPs × 3 sets (two spare sets
    // per rail, connected to the peer's at the handshake); each engine 2 CQs per rail.
    let writer = prefill.engine.stats().nic;
    let link = prefill.engine.metrics().peers[0].resources;
    assert_eq!(
        (writer.queue_pairs, writer.completion_queues),
        (12, 4),
        "{writer:?}"
    );
    assert_eq!(link.queue_pairs, 12, "{link:?}");
    assert!(link.registered_bytes > 0 && writer.registered_bytes > link.registered_bytes);
    let receiver = decode.engine.stats().nic;
    assert_eq!(
        (receiver.queue_pairs, receiver.completion_queues),
        (12, 4),
        "{receiver:?}"
    );
    // 40 calls of 48 scattered blocks (K and V): 30 MiB.
    let mut total = 0u64;
    for call in 0..40u32 {
        let local: Vec<u32> = (0..48).map(|i| (i * 7 + call) % 512).collect();
        let mut remote: Vec<u32> = (0..48).map(|i| (i * 11 + call * 3) % 515).collect();
        remote.dedup();
        let local = &local[..remote.len()];
        let layer = (call % 2) as usize;
        write(&prefill, local, &remote, layer, None).unwrap();
        assert_written(&prefill, &decode, layer, local, &remote);
        total += 2 * local.len() as u64 * block_bytes as u64;
        // Clean the layer so the next call's check sees only its own blocks.
        for region in [&decode.keys[layer], &decode.values[layer]] {
            let ptr = region.as_ptr() as *mut u8;
            // SAFETY: (test) no call is in flight; the region is the decode side's own.
            unsafe { std::ptr::write_bytes(ptr, 0, region.len()) };
        }
    }
    let report = rails(&prefill);
    let bytes: Vec<u64> = report.iter().map(|r| r.bytes).collect();
    assert_eq!(bytes.iter().sum::<u64>(), total, "{report:?}");
    for rail in &report {
        assert!(
            rail.bytes * 100 >= total * 30,
            "rail {} carried {} of {total} bytes: {report:?}",
            rail.local,
            rail.bytes
        );
        assert!(rail.wrs > 0 && rail.failures == 0, "{rail:?}");
        assert!(!rail.gid.is_empty() && !rail.remote.is_empty(), "{rail:?}");
        // Port, GID index and why: the dummy interfaces have /24 addresses.
        let index = rail.gid_index.expect("a paired rail has a GID index");
        assert!(rail.port >= 1, "{rail:?}");
        assert!(
            rail.gid_reason.starts_with(&format!("index {index} ("))
                && rail.gid_reason.ends_with("in its subnet"),
            "{rail:?}"
        );
        assert_eq!(
            (rail.quarantines, rail.rejoins, rail.reason.as_deref()),
            (0, 0, None)
        );
    }
    // metrics() carries the same rails under the peer.
    let metrics = prefill.engine.metrics();
    let peer = metrics.peers.iter().find(|p| p.peer == "decode").unwrap();
    assert_eq!(peer.rails, report);
    eprintln!("rails: {report:?}");
    // Closed: the link's queue pairs and buffers are gone; the rails' CQs stay.
    let regions = prefill.engine.stats().nic.registered_bytes - link.registered_bytes;
    prefill.engine.close();
    decode.engine.close();
    for (side, nic) in [
        ("writer", prefill.engine.stats().nic),
        ("receiver", decode.engine.stats().nic),
    ] {
        assert_eq!(nic.queue_pairs, 0, "{side}: {nic:?}");
    }
    assert_eq!(prefill.engine.stats().nic.registered_bytes, regions);
}

/// Connects with the connector's rail 1 GIDs replaced by `gids` on the wire (the hello
/// plays a peer whose second NIC has those addresses); returns the reply's RDMA endpoint.
fn connect_with_rail1_gids(prefill: &Side, decode: &Side, gids: Vec<GidCandidate>) -> RdmaEndpoint {
    let hello = hello(prefill, decode, "decode").unwrap();
    let mut envelope = Envelope::decode(&hello).unwrap();
    let mut descriptor = Descriptor::decode(&envelope.descriptor).unwrap();
    let offer = descriptor
        .endpoints
        .iter_mut()
        .find(|e| e.kind == TransportKind::Rdma.code())
        .expect("an RDMA offer");
    let mut rdma = RdmaEndpoint::decode(&offer.bytes).unwrap();
    assert_eq!(rdma.rails.len(), 2);
    rdma.rails[1].gids = gids;
    offer.bytes = rdma.encode();
    envelope.descriptor = descriptor.encode();
    let reply = decode.engine.accept(&envelope.encode()).unwrap();
    let reply_envelope = Envelope::decode(&reply).unwrap();
    let chosen = Descriptor::decode(&reply_envelope.descriptor).unwrap();
    let endpoint = RdmaEndpoint::decode(&chosen.endpoints[0].bytes).unwrap();
    prefill
        .engine
        .finish_connect("decode", "127.0.0.1", &reply)
        .unwrap();
    endpoint
}

#[test]
#[ignore = "needs two RDMA devices: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_a_gid_outside_the_peers_subnet_is_not_chosen() {
    let _turn = one_at_a_time();
    let (a, b) = devices("rdma_a_gid_outside_the_peers_subnet_is_not_chosen");
    let both = format!("{a}+{b}");
    // rxe1 prefers 10.78.0.1 (first IPv4 GID), but the peer's rail is only in 10.99.0.0/24.
    let prefill = spec(Role::Prefill, 16, 1024, settings(&both)).build();
    let decode = spec(Role::Decode, 16, 1024, settings(&both)).build();
    let reply = connect_with_rail1_gids(&prefill, &decode, vec![v4_gid([10, 99, 0, 1], 24)]);
    assert_eq!(reply.rails.len(), 2, "{reply:?}");
    let pair = reply.rails.iter().find(|r| r.peer_rail == 1).unwrap();
    assert_eq!(
        pair.gids[0],
        v4_gid([10, 99, 0, 1], 24),
        "the acceptor's GID"
    );
    write(&prefill, &[1, 2, 3], &[4, 5, 6], 0, None).unwrap();
    assert_written(&prefill, &decode, 0, &[1, 2, 3], &[4, 5, 6]);
    let report = rails(&prefill);
    let second = report.iter().find(|r| r.local == b).unwrap();
    assert!(second.peer_gid.starts_with("10.99.0.1/24"), "{second:?}");
    prefill.engine.close();
    decode.engine.close();

    // The peer's second NIC is in 10.50.0.0/24 only: no GID here reaches it; the rail is
    // refused, the reason is visible, and the link runs on the first rail.
    let prefill = spec(Role::Prefill, 16, 1024, settings(&both)).build();
    let decode = spec(Role::Decode, 16, 1024, settings(&both)).build();
    let reply = connect_with_rail1_gids(&prefill, &decode, vec![v4_gid([10, 50, 0, 1], 24)]);
    assert_eq!(reply.rails.len(), 1, "{reply:?}");
    assert_eq!(reply.refused.len(), 1, "{reply:?}");
    assert!(
        reply.refused[0].1.contains("10.50.0.1/24"),
        "{:?}",
        reply.refused
    );
    let report = rails(&prefill);
    let refused = report
        .iter()
        .find(|r| r.state == "refused")
        .expect("refused rail");
    assert_eq!(refused.local, b);
    let why = refused.reason.clone().unwrap();
    assert!(
        why.contains("subnet") && why.contains("10.50.0.1/24"),
        "{why}"
    );
    for layer in 0..2 {
        write(&prefill, &[7, 8], &[9, 10], layer, None).unwrap();
        assert_written(&prefill, &decode, layer, &[7, 8], &[9, 10]);
    }
    let used = report.iter().find(|r| r.state == "healthy").unwrap();
    assert_eq!(used.local, a);
}

/// Sets the second device's interface down or up (root, in the VM).
fn link_set(state: &str) {
    let netdev = std::env::var("KVTRANSFER_RDMA_NETDEV2").expect("KVTRANSFER_RDMA_NETDEV2");
    let status = std::process::Command::new("ip")
        .args(["link", "set", &netdev, state])
        .status()
        .expect("ip");
    assert!(status.success(), "ip link set {netdev} {state}");
}

/// Sets the interface up again when dropped (a failing test leaves it up for the next).
struct UpAgain;

impl Drop for UpAgain {
    fn drop(&mut self) {
        link_set("up");
    }
}

/// Fails the test (instead of hanging) if it runs longer than `secs`.
fn watchdog(secs: u64) {
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(secs));
        eprintln!("a call hung for {secs} s");
        std::process::exit(3);
    });
}

fn block_equal(prefill: &Side, decode: &Side, layer: usize, local: u32, remote: u32) -> bool {
    let bb = prefill.block_bytes;
    let (l, r) = (local as usize * bb, remote as usize * bb);
    decode.keys[layer][r..r + bb] == prefill.keys[layer][l..l + bb]
        && decode.values[layer][r..r + bb] == prefill.values[layer][l..l + bb]
}

/// 200 calls in flight (4 blocks each, every call to its own remote blocks, every tenth
/// tagged), the second device's interface taken down after the first call: each call
/// resolves with its bytes verified or rejects typed. Returns (succeeded, failed).
fn calls_across_a_link_down(prefill: &Side, decode: &Side) -> (usize, usize) {
    let mut pending = Vec::new();
    let mut refused = 0;
    for call in 0..200u32 {
        let local: Vec<u32> = (0..4).map(|i| (call * 4 + i) % 256).collect();
        let remote: Vec<u32> = (0..4).map(|i| call * 4 + i).collect();
        let tag = (call % 10 == 0).then(|| format!("req-{call}").into_bytes());
        let submitted = prefill.engine.write_cache(
            "decode",
            BlockIds::U32(&local),
            BlockIds::U32(&remote),
            0.0,
            tag,
        );
        match submitted {
            Ok(completion) => pending.push((local, remote, completion)),
            // Refused at once: the link already broke (one rail).
            Err(e) => {
                assert_eq!(e.code(), "ERR_PEER_DISCONNECTED", "untyped refusal: {e}");
                refused += 1;
            }
        }
        if call == 0 {
            link_set("down");
        }
    }
    let (mut ok, mut failed) = (0, refused);
    for (local, remote, completion) in pending {
        match block_on(completion).expect("completion dropped") {
            Ok(()) => {
                for (l, r) in local.iter().zip(&remote) {
                    assert!(
                        block_equal(prefill, decode, 0, *l, *r),
                        "a call succeeded but remote block {r} is not local block {l}"
                    );
                }
                ok += 1;
            }
            Err(e) => {
                assert!(
                    ["ERR_RDMA_COMPLETION", "ERR_PEER_DISCONNECTED"].contains(&e.code()),
                    "untyped failure: {e}"
                );
                failed += 1;
            }
        }
    }
    (ok, failed)
}

#[test]
#[ignore = "needs two RDMA devices: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_a_rail_whose_interface_goes_down_is_quarantined_and_rejoins() {
    let _turn = one_at_a_time();
    let (a, b) = devices("rdma_a_rail_whose_interface_goes_down_is_quarantined_and_rejoins");
    watchdog(240);
    let both = format!("{a}+{b}");
    let (prefill, decode) = common::pair(
        spec(Role::Prefill, 256, 8192, settings(&both)),
        spec(Role::Decode, 800, 8192, settings(&both)),
    );
    let _up = UpAgain;
    let (ok, failed) = calls_across_a_link_down(&prefill, &decode);
    eprintln!("two rails, interface down: {ok} verified, {failed} failed typed");
    assert_eq!(ok + failed, 200);
    // Another rail was healthy: every call's work moved there, none failed.
    assert_eq!(failed, 0, "calls failed although a rail was healthy");
    let report = rails(&prefill);
    let second = report.iter().find(|r| r.local == b).unwrap().clone();
    assert_eq!(second.state, "quarantined", "{report:?}");
    assert!(
        second.quarantines >= 1 && second.reason.is_some(),
        "{second:?}"
    );
    // Later calls run on the remaining rail.
    for call in 0..20u32 {
        write(&prefill, &[call], &[call + 1], 1, None).unwrap();
        assert!(block_equal(&prefill, &decode, 1, call, call + 1));
    }
    let after = rails(&prefill);
    let second_after = after.iter().find(|r| r.local == b).unwrap();
    assert_eq!(
        second_after.bytes, second.bytes,
        "a quarantined rail carried bytes"
    );
    // The interface comes back: after its cooldown a probe lets the rail rejoin.
    link_set("up");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while rails(&prefill).iter().any(|r| r.state != "healthy") {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            rails(&prefill)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let before = rails(&prefill).iter().find(|r| r.local == b).unwrap().bytes;
    for call in 0..40u32 {
        let local: Vec<u32> = (0..16).map(|i| (call * 16 + i) % 256).collect();
        let remote: Vec<u32> = (0..16).map(|i| 400 + i).collect();
        write(&prefill, &local, &remote, 1, None).unwrap();
        for (l, r) in local.iter().zip(&remote) {
            assert!(block_equal(&prefill, &decode, 1, *l, *r));
        }
    }
    let report = rails(&prefill);
    let second = report.iter().find(|r| r.local == b).unwrap();
    assert!(second.rejoins >= 1, "{second:?}");
    assert!(
        second.bytes > before,
        "the rejoined rail carries bytes again: {report:?}"
    );
}

#[test]
#[ignore = "needs two RDMA devices: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_one_rail_whose_interface_goes_down_fails_typed_and_reconnects() {
    let _turn = one_at_a_time();
    let (_, b) = devices("rdma_one_rail_whose_interface_goes_down_fails_typed_and_reconnects");
    watchdog(240);
    let (prefill, decode) = common::pair(
        spec(Role::Prefill, 256, 8192, settings(&b)),
        spec(Role::Decode, 800, 8192, settings(&b)),
    );
    let _up = UpAgain;
    let (ok, failed) = calls_across_a_link_down(&prefill, &decode);
    eprintln!("one rail, interface down: {ok} verified, {failed} failed typed");
    assert_eq!(ok + failed, 200);
    link_set("up");
    // As before rails: a broken link stays broken; connecting again works.
    if !prefill.engine.is_connected("decode") {
        connect(&prefill, &decode, "decode");
    }
    write(&prefill, &[1, 2], &[3, 4], 1, None).unwrap();
    assert!(block_equal(&prefill, &decode, 1, 1, 3) && block_equal(&prefill, &decode, 1, 2, 4));
}
