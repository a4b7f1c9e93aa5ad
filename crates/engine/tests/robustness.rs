//! Timeouts and cancellation, authentication, hostile peers and concurrency, over TCP.

use futures_executor::block_on;
use kvtransfer_engine::internals::{frame, Descriptor, Envelope, TcpEndpoint};
use kvtransfer_engine::{BlockIds, Completion, OnDone, Role, TransportKind, WriteCall};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

mod common;
use common::{assert_written, connect, hello, try_connect, Side, SideSpec};

fn side(role: Role, layers: usize, blocks: usize, block_bytes: usize) -> Side {
    SideSpec::new(role, layers, blocks, block_bytes).build()
}

fn authed(role: Role, token: Option<&'static str>) -> Side {
    SideSpec {
        auth_token: token,
        ..SideSpec::new(role, 1, 8, 256)
    }
    .build()
}

fn all(n: usize) -> Vec<u32> {
    (0..n as u32).collect()
}

fn submit(
    prefill: &Side,
    key: &str,
    ids: &[u32],
    layer: u32,
    deadline: Option<Instant>,
) -> Completion {
    prefill
        .engine
        .write_call(WriteCall {
            timeout: deadline.map(|at| at.saturating_duration_since(Instant::now())),
            integrity: Default::default(),
            ..WriteCall::ids(
                key,
                BlockIds::U32(ids),
                BlockIds::U32(ids),
                f64::from(layer),
                None,
            )
        })
        .unwrap()
}

fn settle(completion: Completion) -> kvtransfer_engine::Result<()> {
    block_on(completion).expect("every call completes")
}

/// Connects `prefill` under `key` to a data listener that accepts and never reads: the
/// handshake is a real decode engine's, with its data port replaced by the stalled one.
fn connect_stalled(prefill: &Side, decode: &Side, key: &str) -> TcpListener {
    let stalled = TcpListener::bind("127.0.0.1:0").unwrap();
    let hello = hello(prefill, decode, key).unwrap();
    let mut envelope = Envelope::decode(&decode.engine.accept(&hello).unwrap()).unwrap();
    let mut reply = Descriptor::decode(&envelope.descriptor).unwrap();
    let chosen = &mut reply.endpoints[0];
    assert_eq!(chosen.kind, TransportKind::Tcp.code());
    let mut tcp = TcpEndpoint::decode(&chosen.bytes).unwrap();
    tcp.port = stalled.local_addr().unwrap().port();
    chosen.bytes = tcp.encode();
    envelope.descriptor = reply.encode();
    prefill
        .engine
        .finish_connect(key, "127.0.0.1", &envelope.encode())
        .unwrap();
    stalled
}

/// A prefill side connected to "stalled" (a listener that accepts and never reads; its
/// accepted socket is returned) and to "healthy"; also the real decode side behind
/// "stalled". 32 blocks × 256 KiB × K+V = 16 MiB per call: far more than socket buffers hold.
fn stalled_and_healthy_peers() -> (Side, Side, Side, std::net::TcpStream) {
    let block_bytes = 256 * 1024;
    let prefill = side(Role::Prefill, 1, 32, block_bytes);
    let decode = side(Role::Decode, 1, 32, block_bytes);
    let healthy = side(Role::Decode, 1, 32, block_bytes);
    let stalled = connect_stalled(&prefill, &decode, "stalled");
    connect(&prefill, &healthy, "healthy");
    let (server, _) = stalled.accept().unwrap();
    (prefill, decode, healthy, server)
}

#[test]
fn a_timed_out_call_resets_its_link_first_and_other_peers_keep_working() {
    let (prefill, decode, healthy, server) = stalled_and_healthy_peers();
    let ids = all(32);
    let started = Instant::now();
    let timed = submit(
        &prefill,
        "stalled",
        &ids,
        0,
        Some(started + Duration::from_millis(300)),
    );
    let other = submit(&prefill, "stalled", &ids[..1], 0, None);
    let err = settle(timed).unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(err.code(), "ERR_TIMEOUT", "{err}");
    assert!(err.to_string().contains("torn down"), "{err}");
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    // The reset happened before the rejection: the receiving socket already sees it.
    let reset = kvtransfer_engine::internals::check_not_reset(server.as_raw_fd());
    assert!(
        reset.is_err(),
        "the connection must be reset before the call is rejected"
    );
    let err = settle(other).unwrap_err();
    assert_eq!(err.code(), "ERR_PEER_DISCONNECTED", "{err}");
    assert!(!prefill.engine.is_connected("stalled"));
    assert!(prefill.engine.peer_info("stalled").is_none());
    // New calls to the torn-down peer fail at once; the other peer is unaffected.
    let err = prefill
        .engine
        .write_cache(
            "stalled",
            BlockIds::U32(&[0]),
            BlockIds::U32(&[0]),
            0.0,
            None,
        )
        .unwrap_err();
    assert_eq!(err.code(), "ERR_NOT_CONNECTED");
    settle(submit(
        &prefill,
        "healthy",
        &ids,
        0,
        Some(Instant::now() + Duration::from_secs(30)),
    ))
    .unwrap();
    assert_written(&prefill, &healthy, 0, &ids, &ids);
    // Reconnecting to the real peer works.
    connect(&prefill, &decode, "stalled");
    settle(submit(&prefill, "stalled", &ids[..4], 0, None)).unwrap();
    assert_written(&prefill, &decode, 0, &ids[..4], &ids[..4]);
    eprintln!("timeout rejected after {elapsed:?}");
}

#[test]
fn callback_calls_report_what_completions_report() {
    let (prefill, _decode, healthy, _server) = stalled_and_healthy_peers();
    let ids = all(32);
    let (sender, outcomes) = std::sync::mpsc::channel();
    let call = |key: &'static str, remote: &[u32], timeout: Option<Duration>| {
        let sender = sender.clone();
        prefill.engine.write(
            WriteCall {
                timeout,
                integrity: Default::default(),
                ..WriteCall::ids(key, BlockIds::U32(&ids), BlockIds::U32(remote), 0.0, None)
            },
            OnDone::Callback(Box::new(move |result| {
                let _ = sender.send((key, result));
            })),
        )
    };
    call("healthy", &ids, None).unwrap();
    let (key, result) = outcomes.recv().unwrap();
    assert_eq!(key, "healthy");
    result.unwrap();
    assert_written(&prefill, &healthy, 0, &ids, &ids);
    // A refused call returns its error and never calls back (its callback is dropped).
    let mut out_of_range = ids.clone();
    out_of_range[31] = 32;
    let err = call("healthy", &out_of_range, None).unwrap_err();
    assert_eq!(err.code(), "ERR_BLOCK_ID_OUT_OF_RANGE", "{err}");
    // A timed-out call reports the timeout, not the teardown's own error.
    call("stalled", &ids, Some(Duration::from_millis(300))).unwrap();
    let (key, result) = outcomes.recv().unwrap();
    assert_eq!(key, "stalled");
    let err = result.unwrap_err();
    assert_eq!(err.code(), "ERR_TIMEOUT", "{err}");
    drop(sender);
    assert!(outcomes.recv().is_err(), "no other call was reported");
}

#[test]
fn cancel_peer_aborts_every_pending_call_after_the_teardown() {
    let block_bytes = 256 * 1024;
    let prefill = side(Role::Prefill, 1, 32, block_bytes);
    let decode = side(Role::Decode, 1, 32, block_bytes);
    let stalled = connect_stalled(&prefill, &decode, "p");
    let (server, _) = stalled.accept().unwrap();
    let ids = all(32);
    let calls: Vec<Completion> = (0..4)
        .map(|_| submit(&prefill, "p", &ids, 0, None))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    assert!(prefill
        .engine
        .cancel_peer("p", kvtransfer_engine::Error::Aborted));
    assert!(kvtransfer_engine::internals::check_not_reset(server.as_raw_fd()).is_err());
    for call in calls {
        assert_eq!(settle(call).unwrap_err().code(), "ERR_ABORTED");
    }
    assert!(!prefill
        .engine
        .cancel_peer("p", kvtransfer_engine::Error::Aborted));
    assert!(!prefill.engine.is_connected("p"));
}

#[test]
fn calls_that_complete_in_time_are_not_affected_by_their_deadline() {
    let prefill = side(Role::Prefill, 2, 64, 4096);
    let decode = side(Role::Decode, 2, 64, 4096);
    connect(&prefill, &decode, "d");
    let ids = all(64);
    for round in 0..200u32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        let len = (round as usize / 2) % 64 + 1;
        settle(submit(
            &prefill,
            "d",
            &ids[..len],
            round % 2,
            Some(deadline),
        ))
        .unwrap();
    }
    assert!(prefill.engine.is_connected("d"));
    assert_written(&prefill, &decode, 0, &ids, &ids);
}

#[test]
fn auth_with_the_same_token_connects_and_writes() {
    let prefill = authed(Role::Prefill, Some("s3cret"));
    let decode = authed(Role::Decode, Some("s3cret"));
    connect(&prefill, &decode, "d");
    settle(submit(&prefill, "d", &[1, 2], 0, None)).unwrap();
    assert_written(&prefill, &decode, 0, &[1, 2], &[1, 2]);
}

#[test]
fn auth_mismatches_are_refused_before_any_descriptor_is_exchanged() {
    for (connector, acceptor, expect) in
        [(Some("a"), None, "has none"), (None, Some("a"), "requires")]
    {
        let prefill = authed(Role::Prefill, connector);
        let decode = authed(Role::Decode, acceptor);
        // The acceptor refuses the challenge itself: nothing else is exchanged.
        let challenge = prefill.engine.auth_challenge("d").unwrap();
        let err = decode.engine.auth_respond(&challenge).unwrap_err();
        assert_eq!(err.code(), "ERR_AUTH", "{err}");
        assert!(err.to_string().contains(expect), "{err}");
        assert!(!prefill.engine.is_connected("d"));
    }
    // Wrong token: the connector detects the acceptor's bad proof and sends nothing.
    let prefill = authed(Role::Prefill, Some("right"));
    let decode = authed(Role::Decode, Some("wrong"));
    let challenge = prefill.engine.auth_challenge("d").unwrap();
    let response = decode.engine.auth_respond(&challenge).unwrap();
    let err = prefill.engine.hello("d", &response).unwrap_err();
    assert_eq!(err.code(), "ERR_AUTH");
    assert!(err.to_string().contains("different auth tokens"), "{err}");
    assert_eq!(
        try_connect(&prefill, &decode, "d").unwrap_err().code(),
        "ERR_AUTH"
    );
}

#[test]
fn an_acceptor_refuses_forged_replayed_and_unsolicited_hellos() {
    let prefill = authed(Role::Prefill, Some("k"));
    let decode = authed(Role::Decode, Some("k"));
    let good = hello(&prefill, &decode, "d").unwrap();
    // A forged MAC (a peer without the token skipping its own checks).
    let mut forged = Envelope::decode(&good).unwrap();
    forged.mac[0] ^= 1;
    let err = decode.engine.accept(&forged.encode()).unwrap_err();
    assert_eq!(err.code(), "ERR_AUTH", "{err}");
    // A forgery does not use up the challenge; the genuine hello is accepted once, and its
    // replay is refused.
    decode.engine.accept(&good).unwrap();
    let err = decode.engine.accept(&good).unwrap_err();
    assert_eq!(err.code(), "ERR_AUTH", "{err}");
    assert!(err.to_string().contains("already used"), "{err}");
    assert_eq!(decode.engine.stats().remembered_hellos, 1);
    // A nonce issued for another challenge does not fit this one.
    let other = hello(&prefill, &decode, "d").unwrap();
    let mut swapped = Envelope::decode(&other).unwrap();
    swapped.nonce_c = Envelope::decode(&good).unwrap().nonce_c;
    let err = decode.engine.accept(&swapped.encode()).unwrap_err();
    assert!(err.to_string().contains("no challenge"), "{err}");
    // A modified descriptor under a valid challenge fails the MAC.
    let good = hello(&prefill, &decode, "d").unwrap();
    let mut tampered = Envelope::decode(&good).unwrap();
    let last = tampered.descriptor.len() - 1;
    tampered.descriptor[last] ^= 0x10;
    assert_eq!(
        decode.engine.accept(&tampered.encode()).unwrap_err().code(),
        "ERR_AUTH"
    );
    // A hello with no challenge at all.
    let unsolicited = Envelope {
        nonce_a: [7; 32],
        ..Envelope::decode(&good).unwrap()
    };
    assert_eq!(
        decode
            .engine
            .accept(&unsolicited.encode())
            .unwrap_err()
            .code(),
        "ERR_AUTH"
    );
    // A tampered reply is refused by the connector.
    let good = hello(&prefill, &decode, "d").unwrap();
    let mut reply = Envelope::decode(&decode.engine.accept(&good).unwrap()).unwrap();
    reply.mac[5] ^= 0x80;
    let err = prefill
        .engine
        .finish_connect("d", "127.0.0.1", &reply.encode())
        .unwrap_err();
    assert_eq!(err.code(), "ERR_AUTH");
    assert!(!prefill.engine.is_connected("d"));
    connect(&prefill, &decode, "d");
    assert!(prefill.engine.is_connected("d"));
}

/// A raw data connection admitted by `decode` (the session token of a real handshake).
fn raw_data_connection(decode: &Side) -> TcpStream {
    let prefill = side(Role::Prefill, 1, 8, 256);
    let hello = hello(&prefill, decode, "d").unwrap();
    let envelope = Envelope::decode(&decode.engine.accept(&hello).unwrap()).unwrap();
    let reply = Descriptor::decode(&envelope.descriptor).unwrap();
    let tcp = TcpEndpoint::decode(reply.endpoint(TransportKind::Tcp.code()).unwrap()).unwrap();
    let mut stream = TcpStream::connect(("127.0.0.1", tcp.port)).unwrap();
    stream.write_all(&frame::encode_hello(tcp.session)).unwrap();
    stream
}

#[test]
fn a_hostile_writer_announcing_huge_frames_is_cut_off_without_harm() {
    let decode = side(Role::Decode, 1, 8, 256);
    let hostile = [
        // COMMIT with a 4 GiB detail: refused by the header decoder, nothing allocated.
        frame::Header {
            kind: frame::COMMIT,
            flags: 1,
            region: 1,
            offset: 1,
            len: u32::MAX,
            aux: 0,
        },
        // WRITE of 4 GiB: outside the region, refused with a NACK, nothing written.
        frame::Header {
            kind: frame::WRITE,
            flags: 0,
            region: 0,
            offset: 0,
            len: u32::MAX,
            aux: 0,
        },
        // WRITE past the end of the region by one byte.
        frame::Header {
            kind: frame::WRITE,
            flags: 0,
            region: 0,
            offset: 8 * 256 - 10,
            len: 11,
            aux: 0,
        },
        // WRITE into a region that does not exist.
        frame::Header {
            kind: frame::WRITE,
            flags: 0,
            region: 99,
            offset: 0,
            len: 1,
            aux: 0,
        },
        // An unknown frame type.
        frame::Header {
            kind: 200,
            flags: 0,
            region: 0,
            offset: 0,
            len: 1,
            aux: 0,
        },
    ];
    for header in hostile {
        let mut stream = raw_data_connection(&decode);
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(&header.encode()).unwrap();
        let _ = stream.write_all(&[0xAB; 4096]);
        // The receiver answers (NACK) or just closes; either way the stream ends.
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    }
    assert!(
        decode.keys[0].iter().all(|&b| b == 0),
        "a hostile frame wrote memory"
    );
    // The receiver still serves honest peers.
    let prefill = side(Role::Prefill, 1, 8, 256);
    connect(&prefill, &decode, "d");
    settle(submit(&prefill, "d", &[3], 0, None)).unwrap();
    assert_written(&prefill, &decode, 0, &[3], &[3]);
}

#[test]
fn many_concurrent_calls_to_several_peers_keep_data_exact() {
    let peers = 3;
    let blocks = 128;
    let prefill = side(Role::Prefill, 2, blocks, 2048);
    let decodes: Vec<Side> = (0..peers)
        .map(|_| side(Role::Decode, 2, blocks, 2048))
        .collect();
    for (i, d) in decodes.iter().enumerate() {
        connect(&prefill, d, &format!("d{i}"));
    }
    let ids = all(blocks);
    // Each call writes a disjoint block range; all are in flight at once.
    let mut calls = Vec::new();
    for round in 0..4 {
        for (i, _) in decodes.iter().enumerate() {
            for layer in 0..2u32 {
                let chunk = &ids[round * 32..(round + 1) * 32];
                let deadline = Some(Instant::now() + Duration::from_secs(60));
                calls.push(submit(&prefill, &format!("d{i}"), chunk, layer, deadline));
            }
        }
    }
    for call in calls {
        settle(call).unwrap();
    }
    for d in &decodes {
        for layer in 0..2 {
            assert_written(&prefill, d, layer, &ids, &ids);
        }
    }
    let stats = prefill.engine.stats();
    assert_eq!((stats.peers, stats.live_links), (peers, peers));
}

/// A peer that died and comes back elsewhere (a restarted process on a new port) is never
/// connected under its old key again: its broken link must not keep its threads and
/// sockets. The next connect releases it; calls by its key still fail as disconnected.
#[test]
fn broken_links_of_dead_peers_are_released_at_the_next_connect() {
    let prefill = side(Role::Prefill, 1, 8, 256);
    for i in 0..4 {
        let decode = side(Role::Decode, 1, 8, 256);
        let key = format!("gone{i}");
        connect(&prefill, &decode, &key);
        settle(submit(&prefill, &key, &[1], 0, None)).unwrap();
        decode.engine.close();
        let deadline = Instant::now() + Duration::from_secs(10);
        while prefill.engine.peer_info(&key).is_some_and(|p| p.alive) {
            assert!(
                Instant::now() < deadline,
                "the link to {key} never noticed its peer left"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let live = side(Role::Decode, 1, 8, 256);
    connect(&prefill, &live, "live");
    let stats = prefill.engine.stats();
    assert_eq!((stats.peers, stats.live_links), (1, 1), "{stats:?}");
    settle(submit(&prefill, "live", &[2], 0, None)).unwrap();
    assert_written(&prefill, &live, 0, &[2], &[2]);
    let call = WriteCall::ids("gone0", BlockIds::U32(&[1]), BlockIds::U32(&[1]), 0.0, None);
    let error = prefill
        .engine
        .write_call(call)
        .and_then(settle)
        .unwrap_err();
    assert_eq!(error.code(), "ERR_PEER_DISCONNECTED", "{error}");
}

#[test]
fn connect_close_cycles_release_threads_and_connections() {
    let decode = side(Role::Decode, 1, 8, 256);
    let baseline = decode.engine.stats().process_threads;
    for _ in 0..30 {
        let prefill = side(Role::Prefill, 1, 8, 256);
        connect(&prefill, &decode, "d");
        settle(submit(
            &prefill,
            "d",
            &[1],
            0,
            Some(Instant::now() + Duration::from_secs(30)),
        ))
        .unwrap();
        prefill.engine.close();
    }
    std::thread::sleep(Duration::from_millis(200));
    let stats = decode.engine.stats();
    assert_eq!(stats.receivers, 0, "{stats:?}");
    // Other tests of this binary run concurrently: allow their threads, not 30 cycles' worth.
    assert!(
        stats.process_threads < baseline + 40,
        "{stats:?} vs baseline {baseline}"
    );
}

#[test]
fn a_hostile_receiver_cannot_make_the_writer_allocate_or_hang() {
    // A "receiver" that answers the first call with a WRITE header announcing 4 GiB.
    let prefill = side(Role::Prefill, 1, 8, 256);
    let decode = side(Role::Decode, 1, 8, 256);
    let fake = connect_stalled(&prefill, &decode, "evil");
    let (mut server, _) = fake.accept().unwrap();
    let call = submit(&prefill, "evil", &[1], 0, None);
    let mut hello = [0u8; frame::HELLO_BYTES];
    server.read_exact(&mut hello).unwrap();
    let evil = frame::Header {
        kind: frame::WRITE,
        flags: 0,
        region: 0,
        offset: 1,
        len: u32::MAX,
        aux: 0,
    };
    server.write_all(&evil.encode()).unwrap();
    let err = settle(call).unwrap_err();
    assert!(
        matches!(err.code(), "ERR_PROTOCOL" | "ERR_PEER_DISCONNECTED"),
        "{err}"
    );
    assert!(!prefill.engine.is_connected("evil"));
}

#[test]
fn a_flood_of_challenges_does_not_crowd_out_a_genuine_connect() {
    let prefill = authed(Role::Prefill, Some("k"));
    let decode = authed(Role::Decode, Some("k"));
    // A genuine connect gets its challenge answered first...
    let challenge = prefill.engine.auth_challenge("d").unwrap();
    let response = decode.engine.auth_respond(&challenge).unwrap();
    // ...then someone without the token asks for many more before the hello arrives.
    let intruder = authed(Role::Prefill, Some("a guess"));
    for _ in 0..5000 {
        let flood = intruder.engine.auth_challenge("x").unwrap();
        decode.engine.auth_respond(&flood).unwrap();
    }
    assert_eq!(
        decode.engine.stats().remembered_hellos,
        0,
        "challenges keep no state"
    );
    let hello = prefill.engine.hello("d", &response).unwrap();
    let reply = decode.engine.accept(&hello).unwrap();
    prefill
        .engine
        .finish_connect("d", "127.0.0.1", &reply)
        .unwrap();
    assert!(prefill.engine.is_connected("d"));
}

#[test]
fn a_fence_registration_is_taken_once_for_the_writer_whose_handshake_it_was() {
    let prefill = authed(Role::Prefill, Some("k"));
    let decode = authed(Role::Decode, Some("k"));
    let hello = hello(&prefill, &decode, "d").unwrap();
    let reply = decode.engine.accept(&hello).unwrap();
    assert_eq!(decode.engine.stats().open_fence_grants, 1);
    let proof = prefill.engine.listen_proof(&reply, "prefill-test").unwrap();
    // Another name with this handshake's proof: refused, and the grant stays for the writer.
    let err = decode.engine.check_listen("intruder", &proof).unwrap_err();
    assert_eq!(err.code(), "ERR_AUTH");
    assert!(
        err.to_string().contains("came from \"prefill-test\""),
        "{err}"
    );
    // A proof made without the token.
    let wrong = authed(Role::Prefill, Some("guess"));
    let forged = wrong.engine.listen_proof(&reply, "prefill-test").unwrap();
    let err = decode
        .engine
        .check_listen("prefill-test", &forged)
        .unwrap_err();
    assert!(err.to_string().contains("MAC does not match"), "{err}");
    // The genuine one, once; its replay is refused.
    decode.engine.check_listen("prefill-test", &proof).unwrap();
    assert_eq!(decode.engine.stats().open_fence_grants, 0);
    let err = decode
        .engine
        .check_listen("prefill-test", &proof)
        .unwrap_err();
    assert!(err.to_string().contains("already used"), "{err}");
    // Without a token there is nothing to prove.
    let open = side(Role::Decode, 1, 8, 256);
    assert!(prefill.engine.listen_proof(&reply, "x").unwrap().len() == 64);
    open.engine.check_listen("anyone", &[]).unwrap();
}
