//! A peer HOST that vanishes silently (no FIN, no RST): two network namespaces joined by a
//! veth pair; the decode engine lives in one, the prefill engine in the other; then the
//! decode side's link is set down. With default settings (`TCP_USER_TIMEOUT` 3 s, keepalive
//! 1 s idle / 1 s interval) a pending call must fail within 3 s, and an idle link must turn
//! disconnected within about 3 s (keepalive), measured here.
//!
//! Needs root and `ip netns` (skips otherwise, or fails with KVTRANSFER_REQUIRE_NETNS=1).
//! Only addresses inside the two namespaces it creates are used; they are deleted at the end.

use futures_executor::block_on;
use kvtransfer_engine::internals::{Descriptor, Envelope, TcpEndpoint};
use kvtransfer_engine::{BlockIds, Role, TransportKind};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{Side, SideSpec};

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn tc(ns: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "tc"])
        .args(args)
        .output()
        .map_err(|e| format!("tc: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "tc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two namespaces `a` and `b` joined by a veth pair (10.250.0.1 in a, 10.250.0.2 in b).
struct Namespaces {
    a: String,
    b: String,
}

impl Namespaces {
    fn create() -> Result<Namespaces, String> {
        let id = std::process::id() % 100_000;
        let ns = Namespaces {
            a: format!("kvt-a-{id}"),
            b: format!("kvt-b-{id}"),
        };
        let (va, vb) = (format!("kva{id}"), format!("kvb{id}"));
        ip(&["netns", "add", &ns.a])?;
        ip(&["netns", "add", &ns.b])?;
        ip(&[
            "link", "add", &va, "netns", &ns.a, "type", "veth", "peer", "name", &vb, "netns", &ns.b,
        ])?;
        ip(&["-n", &ns.a, "addr", "add", "10.250.0.1/24", "dev", &va])?;
        ip(&["-n", &ns.b, "addr", "add", "10.250.0.2/24", "dev", &vb])?;
        for (n, dev) in [(&ns.a, &va), (&ns.b, &vb)] {
            ip(&["-n", n, "link", "set", "lo", "up"])?;
            ip(&["-n", n, "link", "set", dev, "up"])?;
        }
        Ok(ns)
    }

    /// The peer host vanishes silently (links stay up; no ICMP, no FIN, no RST): host b
    /// loses its address, so it drops what arrives for it without a word (forwarding is
    /// off in a fresh namespace), and a root FIFO of length 0 drops everything it would
    /// send. Host a is untouched: its keepalive probes leave normally and go unanswered.
    fn blackhole_b(&self) -> Result<(), String> {
        let dev = format!("kvb{}", std::process::id() % 100_000);
        tc(
            &self.b,
            &[
                "qdisc", "replace", "dev", &dev, "root", "pfifo", "limit", "0",
            ],
        )?;
        ip(&["-n", &self.b, "addr", "flush", "dev", &dev])
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

/// Runs `f` on a thread inside network namespace `ns` (sockets it creates live there).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on an open namespace file descriptor; it only changes this thread's
        // network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

fn usable() -> Option<Namespaces> {
    let required = std::env::var("KVTRANSFER_REQUIRE_NETNS").is_ok_and(|v| v == "1");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let made = if root {
        Namespaces::create()
    } else {
        Err("not root".into())
    };
    match made {
        Ok(ns) => Some(ns),
        Err(e) if required => panic!("network namespaces unavailable: {e}"),
        Err(e) => {
            eprintln!("SKIP netns_silent_peer: {e}");
            None
        }
    }
}

fn connect_from(ns: &str, prefill: &Side, decode: &Side, key: &'static str) {
    let hello = common::hello(prefill, decode, key).unwrap();
    let reply = decode.engine.accept(&hello).unwrap();
    // The data connection must be opened from inside namespace a.
    let engine = prefill.engine.clone();
    let descriptor = Descriptor::decode(&Envelope::decode(&reply).unwrap().descriptor).unwrap();
    let tcp = descriptor
        .endpoint(TransportKind::Tcp.code())
        .expect("the reply chose TCP");
    let port = TcpEndpoint::decode(tcp).unwrap().port;
    assert_ne!(port, 0);
    in_netns(ns, move || engine.finish_connect(key, "10.250.0.2", &reply)).unwrap();
}

#[test]
fn a_silently_vanished_peer_host_fails_pending_calls_within_the_user_timeout() {
    let Some(ns) = usable() else { return };
    let block_bytes = 64 * 1024;
    let build = move |role| SideSpec::new(role, 1, 64, block_bytes).build();
    let decode = in_netns(&ns.b, move || build(Role::Decode));
    let prefill = in_netns(&ns.a, move || build(Role::Prefill));
    let idle = in_netns(&ns.a, move || build(Role::Prefill));
    connect_from(&ns.a, &prefill, &decode, "busy");
    connect_from(&ns.a, &idle, &decode, "idle");
    let ids: Vec<u32> = (0..64).collect();
    let write = |side: &Side, key: &str| {
        side.engine
            .write_cache(key, BlockIds::U32(&ids), BlockIds::U32(&ids), 0.0, None)
            .unwrap()
    };
    block_on(write(&prefill, "busy")).unwrap().unwrap();
    block_on(write(&idle, "idle")).unwrap().unwrap();
    ns.blackhole_b().unwrap();
    let vanished = Instant::now();
    // A call sent into the void: no FIN, no RST, no ACK will ever come.
    let result = block_on(write(&prefill, "busy")).unwrap();
    let busy_after = vanished.elapsed();
    let err = result.unwrap_err();
    assert!(
        matches!(err.code(), "ERR_PEER_DISCONNECTED" | "ERR_IO"),
        "{err}"
    );
    assert!(!prefill.engine.is_connected("busy"));
    // The idle link is found dead by keepalive.
    while idle.engine.is_connected("idle") && vanished.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let idle_after = vanished.elapsed();
    eprintln!(
        "silent peer death: pending call rejected after {busy_after:?} ({err}); idle link disconnected after {idle_after:?}"
    );
    assert!(
        busy_after <= Duration::from_millis(3000),
        "pending call took {busy_after:?}"
    );
    assert!(
        idle_after <= Duration::from_millis(4500),
        "idle link took {idle_after:?}"
    );
    prefill.engine.close();
    idle.engine.close();
    decode.engine.close();
}
