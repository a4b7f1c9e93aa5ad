//! Every listening socket of an engine binds the `host` option's address, else the documented
//! default (`KVCACHE_SOCKET_IFNAME`'s IPv4 address, else all interfaces), checked with `ss`
//! as an operator would. `ss` sees the whole process: this binary holds one test, so that no
//! other engine listens meanwhile.

use futures_executor::block_on;
use kvtransfer_engine::{BlockIds, Role};
use std::process::Command;

mod common;
use common::{assert_written, connect, Side, SideSpec};

/// Local addresses (`addr:port`) of this process's listening TCP sockets.
fn listeners() -> Vec<String> {
    let out = Command::new("ss")
        .args(["-ltnpH"])
        .output()
        .expect("ss (iproute2) runs");
    assert!(out.status.success(), "ss failed: {out:?}");
    let owner = format!("pid={},", std::process::id());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains(&owner))
        .map(|line| {
            // State, Recv-Q, Send-Q, Local Address:Port, Peer Address:Port, Process.
            line.split_whitespace()
                .nth(3)
                .expect("a local address")
                .to_string()
        })
        .collect()
}

fn side(role: Role, host: Option<&'static str>) -> Side {
    SideSpec {
        host,
        ..SideSpec::new(role, 1, 8, 256)
    }
    .build()
}

/// Builds an engine with `host`, and asserts that each listener it adds is on `expected`.
fn assert_listens_on(host: Option<&'static str>, expected: &str) {
    let before = listeners();
    let engine = side(Role::Decode, host);
    let added: Vec<String> = listeners()
        .into_iter()
        .filter(|l| !before.contains(l))
        .collect();
    assert_eq!(
        added.len(),
        1,
        "host {host:?}: one data listener: {added:?}"
    );
    for listener in &added {
        assert!(
            listener.starts_with(&format!("{expected}:")),
            "host {host:?}: {listener} is not on {expected}"
        );
    }
    engine.engine.close();
    drop(engine);
    assert_eq!(listeners(), before, "host {host:?}: the listener is closed");
}

#[test]
fn every_listener_binds_the_host_option_else_the_documented_default() {
    // The default under test is the one without KVCACHE_SOCKET_IFNAME (set below where used).
    std::env::remove_var("KVCACHE_SOCKET_IFNAME");
    assert!(
        listeners().is_empty(),
        "nothing listens before: {:?}",
        listeners()
    );

    // host 127.0.0.1 on both sides: every listener is on loopback, and a write still
    // reaches the decode side's data listener there.
    let prefill = SideSpec {
        host: Some("127.0.0.1"),
        ..SideSpec::new(Role::Prefill, 1, 8, 256)
    }
    .build();
    let decode = side(Role::Decode, Some("127.0.0.1"));
    let bound = listeners();
    assert_eq!(bound.len(), 2, "one data listener per engine: {bound:?}");
    assert!(
        bound.iter().all(|l| l.starts_with("127.0.0.1:")),
        "every listener on 127.0.0.1: {bound:?}"
    );
    connect(&prefill, &decode, "decode:1");
    block_on(
        prefill
            .engine
            .write_cache(
                "decode:1",
                BlockIds::U32(&[1]),
                BlockIds::U32(&[2]),
                0.0,
                None,
            )
            .unwrap(),
    )
    .unwrap()
    .unwrap();
    assert_written(&prefill, &decode, 0, &[1], &[2]);
    prefill.engine.close();
    decode.engine.close();
    drop((prefill, decode));
    assert!(listeners().is_empty(), "closed: {:?}", listeners());

    // The other forms of host, as ZeroMQ's bind reads the control socket's.
    assert_listens_on(Some("lo"), "127.0.0.1");
    assert_listens_on(Some("*"), "0.0.0.0");
    assert_listens_on(Some("0.0.0.0"), "0.0.0.0");
    // Control: without host, all interfaces (as the README says) ...
    assert_listens_on(None, "0.0.0.0");
    // ... or KVCACHE_SOCKET_IFNAME's address when it is set, unless host says otherwise.
    std::env::set_var("KVCACHE_SOCKET_IFNAME", "lo");
    assert_listens_on(None, "127.0.0.1");
    assert_listens_on(Some("0.0.0.0"), "0.0.0.0");
    std::env::remove_var("KVCACHE_SOCKET_IFNAME");

    // A host a bind cannot take is refused at construction, typed, naming it.
    let err = SideSpec {
        host: Some("localhost"),
        ..SideSpec::new(Role::Decode, 1, 8, 256)
    }
    .try_build()
    .err()
    .expect("host 'localhost' is refused");
    assert_eq!(err.code(), "ERR_INVALID_ARGUMENT");
    assert!(err.to_string().contains("'localhost'"), "{err}");
    assert!(listeners().is_empty(), "nothing left listening");
}
