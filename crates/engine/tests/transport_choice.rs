//! The transport choice in the handshake, on a host with only TCP: the acceptor takes the
//! first of its transports the connector offered and can serve; otherwise the refusal is
//! typed and says, per transport, why not. Hellos are edited on the wire to play a peer
//! with other transports than this host has.

mod common;

use common::{connect, hello, SideSpec};
use kvtransfer_engine::internals::{
    Declined, Descriptor, Endpoint, Envelope, GidCandidate, QpEndpoint, RailEndpoint, RdmaEndpoint,
};
use kvtransfer_engine::{Role, TransportKind};

fn side(role: Role) -> common::Side {
    SideSpec::new(role, 2, 16, 256).build()
}

/// `transport: 'auto'` on this host: TCP, and RDMA only where a device is up.
fn auto_side(role: Role) -> common::Side {
    let mut spec = SideSpec::new(role, 2, 16, 256);
    spec.transport = "auto";
    spec.build()
}

/// The hello of `prefill` to `decode` with its endpoint list replaced.
fn hello_offering(
    prefill: &common::Side,
    decode: &common::Side,
    endpoints: Vec<Endpoint>,
) -> Vec<u8> {
    let mut envelope = Envelope::decode(&hello(prefill, decode, "d").unwrap()).unwrap();
    let mut descriptor = Descriptor::decode(&envelope.descriptor).unwrap();
    descriptor.endpoints = endpoints;
    envelope.descriptor = descriptor.encode();
    envelope.encode()
}

fn rdma_endpoint() -> Endpoint {
    Endpoint {
        kind: TransportKind::Rdma.code(),
        bytes: RdmaEndpoint {
            rails: vec![RailEndpoint {
                device: "rxe0".into(),
                peer_rail: 0,
                lid: 0,
                gids: vec![GidCandidate {
                    gid: [1; 16],
                    v2: true,
                    prefix: 0,
                }],
                mtu: 3,
                infiniband: false,
                speed_mbps: 1000,
                qps: vec![QpEndpoint { qp_num: 1, psn: 1 }],
                regions: vec![(0x1000, 1); 4],
                notice_ring: (0, 0, 0),
            }],
            refused: Vec::new(),
        }
        .encode(),
    }
}

#[test]
fn the_hello_offers_every_transport_and_the_reply_names_the_chosen_one() {
    let prefill = side(Role::Prefill);
    let decode = side(Role::Decode);
    assert_eq!(prefill.engine.transports(), [TransportKind::Tcp]);
    let offered = Envelope::decode(&hello(&prefill, &decode, "d").unwrap()).unwrap();
    let offered = Descriptor::decode(&offered.descriptor).unwrap();
    let kinds: Vec<u8> = offered.endpoints.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [TransportKind::Tcp.code()]);
    connect(&prefill, &decode, "d");
    let info = prefill.engine.peer_info("d").unwrap();
    assert_eq!(info.transport, TransportKind::Tcp);
}

#[test]
fn an_offer_of_rdma_only_to_a_tcp_acceptor_is_refused_with_the_reason_per_transport() {
    let prefill = side(Role::Prefill);
    let decode = side(Role::Decode);
    let hello = hello_offering(&prefill, &decode, vec![rdma_endpoint()]);
    let err = decode.engine.accept(&hello).unwrap_err();
    assert_eq!(err.code(), "ERR_RDMA_UNAVAILABLE", "{err}");
    let text = err.to_string();
    assert!(
        text.contains("the peer offers rdma; this side has tcp")
            && text.contains("tcp: the peer offers no tcp endpoint"),
        "{text}"
    );
}

#[test]
fn auto_names_the_transports_this_side_could_not_open() {
    let prefill = side(Role::Prefill);
    let decode = auto_side(Role::Decode);
    let hello = hello_offering(
        &prefill,
        &decode,
        vec![Endpoint {
            kind: 200,
            bytes: vec![],
        }],
    );
    let err = decode.engine.accept(&hello).unwrap_err();
    assert_eq!(err.code(), "ERR_TRANSPORT_UNAVAILABLE", "{err}");
    // Without a usable RDMA port here, RDMA is named with why; with one, it is offered.
    let rdma_here = decode.engine.transports().contains(&TransportKind::Rdma);
    let expected = if rdma_here {
        "rdma: the peer offers no rdma endpoint"
    } else {
        "rdma: not usable on this side"
    };
    assert!(err.to_string().contains(expected), "{err}");
}

#[test]
fn unknown_kinds_are_skipped_and_the_known_one_is_chosen() {
    let prefill = side(Role::Prefill);
    let decode = side(Role::Decode);
    let mut envelope = Envelope::decode(&hello(&prefill, &decode, "d").unwrap()).unwrap();
    let mut descriptor = Descriptor::decode(&envelope.descriptor).unwrap();
    // A newer peer's transport this build does not know, offered first.
    descriptor.endpoints.insert(
        0,
        Endpoint {
            kind: 200,
            bytes: vec![1, 2, 3],
        },
    );
    envelope.descriptor = descriptor.encode();
    let reply = decode.engine.accept(&envelope.encode()).unwrap();
    prefill
        .engine
        .finish_connect("d", "127.0.0.1", &reply)
        .unwrap();
    assert!(prefill.engine.is_connected("d"));
}

#[test]
fn nothing_usable_offered_is_a_typed_refusal_and_nothing_is_admitted() {
    let prefill = side(Role::Prefill);
    let decode = side(Role::Decode);
    let hello = hello_offering(
        &prefill,
        &decode,
        vec![Endpoint {
            kind: 200,
            bytes: vec![],
        }],
    );
    let err = decode.engine.accept(&hello).unwrap_err();
    assert_eq!(err.code(), "ERR_TRANSPORT_UNAVAILABLE", "{err}");
    assert!(err.to_string().contains("the peer offers none"), "{err}");
    // A malformed TCP endpoint is the peer's fault, said as such.
    let hello = hello_offering(
        &prefill,
        &decode,
        vec![Endpoint {
            kind: TransportKind::Tcp.code(),
            bytes: vec![1],
        }],
    );
    let err = decode.engine.accept(&hello).unwrap_err();
    assert!(
        err.to_string()
            .contains("the peer's TCP endpoint is malformed"),
        "{err}"
    );
    assert_eq!(decode.engine.stats().receivers, 0);
}

#[test]
fn a_reply_choosing_a_transport_that_was_not_offered_is_a_protocol_error() {
    let prefill = side(Role::Prefill);
    let decode = side(Role::Decode);
    let hello = hello(&prefill, &decode, "d").unwrap();
    let mut envelope = Envelope::decode(&decode.engine.accept(&hello).unwrap()).unwrap();
    let mut reply = Descriptor::decode(&envelope.descriptor).unwrap();
    reply.endpoints = vec![rdma_endpoint()];
    envelope.descriptor = reply.encode();
    let err = prefill
        .engine
        .finish_connect("d", "127.0.0.1", &envelope.encode())
        .unwrap_err();
    assert_eq!(err.code(), "ERR_PROTOCOL", "{err}");
    assert!(err.to_string().contains("did not offer"), "{err}");
    assert!(!prefill.engine.is_connected("d"));
}

#[test]
fn malformed_settings_are_refused_at_construction_naming_the_variable() {
    // The environment is process-wide: run the case in a child process.
    if std::env::var("KVT_CHOICE_CHILD").is_ok() {
        let err = SideSpec::new(Role::Decode, 1, 4, 64)
            .try_build()
            .err()
            .expect("a malformed KVCACHE_IB_TIMEOUT must be refused");
        assert_eq!(err.code(), "ERR_INVALID_ARGUMENT");
        assert!(err.to_string().contains("KVCACHE_IB_TIMEOUT"), "{err}");
        assert!(err.to_string().contains("'99'"), "{err}");
        return;
    }
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "malformed_settings_are_refused_at_construction_naming_the_variable",
            "--quiet",
        ])
        .env("KVT_CHOICE_CHILD", "1")
        .env("KVCACHE_IB_TIMEOUT", "99")
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the engine took KVCACHE_IB_TIMEOUT=99");
}

#[test]
fn the_reply_carries_the_acceptors_reason_and_peer_info_names_it() {
    // The connector offers rdma (edited in: this host may have none) and tcp; the acceptor
    // uses only tcp, so it declines rdma and says why in its reply.
    let prefill = side(Role::Prefill);
    let decode = side(Role::Decode);
    let mut envelope = Envelope::decode(&hello(&prefill, &decode, "d").unwrap()).unwrap();
    let mut descriptor = Descriptor::decode(&envelope.descriptor).unwrap();
    descriptor.endpoints.insert(0, rdma_endpoint());
    envelope.descriptor = descriptor.encode();
    let reply = decode.engine.accept(&envelope.encode()).unwrap();
    let carried = Descriptor::decode(&Envelope::decode(&reply).unwrap().descriptor).unwrap();
    assert_eq!(
        carried.declined,
        vec![Declined {
            kind: TransportKind::Rdma.code(),
            reason: "the acceptor uses only tcp (its transport option or KVCACHE_TRANSPORT)".into()
        }]
    );
    let note = "rdma: the acceptor uses only tcp (its transport option or KVCACHE_TRANSPORT)";
    prefill
        .engine
        .finish_connect("d", "127.0.0.1", &reply)
        .unwrap();
    let decision = prefill.engine.transport_decision("d").unwrap();
    assert_eq!(decision.transport, TransportKind::Tcp);
    assert!(decision.reason.starts_with("tcp: "), "{}", decision.reason);
    assert!(decision.reason.contains(note), "{}", decision.reason);
}

#[test]
fn a_reply_with_nothing_passed_over_declines_nothing() {
    let prefill = side(Role::Prefill);
    let decode = side(Role::Decode);
    let reply = decode
        .engine
        .accept(&hello(&prefill, &decode, "d").unwrap())
        .unwrap();
    let carried = Descriptor::decode(&Envelope::decode(&reply).unwrap().descriptor).unwrap();
    assert_eq!(carried.endpoints.len(), 1);
    assert!(carried.declined.is_empty());
}
