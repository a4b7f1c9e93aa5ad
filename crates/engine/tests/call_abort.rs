//! Aborting one call (`Engine::write_abortable`, `CallAbort::abort`) and the reports of
//! peers that left (`Engine::on_peer_left`), over TCP.

use kvtransfer_engine::internals::{Descriptor, Envelope, TcpEndpoint};
use kvtransfer_engine::{
    BlockIds, CallAbort, OnDone, PeerLeft, PeerLeftSink, Role, TransportKind, WriteCall,
};
use std::net::TcpListener;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;
use common::{assert_written, connect, hello, Side, SideSpec};

fn side(role: Role, blocks: usize, block_bytes: usize) -> Side {
    SideSpec::new(role, 1, blocks, block_bytes).build()
}

/// Every peer-left report of `side`'s engine, in order.
fn watch_left(side: &Side) -> Arc<Mutex<Vec<PeerLeft>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink: PeerLeftSink = {
        let seen = Arc::clone(&seen);
        Arc::new(move |left| seen.lock().unwrap().push(left))
    };
    side.engine.on_peer_left(Some(sink));
    seen
}

/// An abortable call of `ids` to `key` and the receiver of its outcome.
fn abortable(
    prefill: &Side,
    key: &str,
    ids: &[u32],
) -> (CallAbort, Receiver<kvtransfer_engine::Result<()>>) {
    let (sender, outcome) = channel();
    let abort = prefill
        .engine
        .write_abortable(
            WriteCall::ids(key, BlockIds::U32(ids), BlockIds::U32(ids), 0.0, None),
            OnDone::Callback(Box::new(move |result| {
                let _ = sender.send(result);
            })),
        )
        .unwrap();
    (abort, outcome)
}

fn plain(prefill: &Side, key: &str, ids: &[u32]) -> Receiver<kvtransfer_engine::Result<()>> {
    let (sender, outcome) = channel();
    prefill
        .engine
        .write(
            WriteCall::ids(key, BlockIds::U32(ids), BlockIds::U32(ids), 0.0, None),
            OnDone::Callback(Box::new(move |result| {
                let _ = sender.send(result);
            })),
        )
        .unwrap();
    outcome
}

fn outcome(receiver: &Receiver<kvtransfer_engine::Result<()>>) -> kvtransfer_engine::Result<()> {
    receiver
        .recv_timeout(Duration::from_secs(10))
        .expect("the call settles")
}

/// Connects `prefill` under `key` to a data listener that accepts and never reads.
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

#[test]
fn an_abort_after_the_call_completed_changes_nothing() {
    let prefill = side(Role::Prefill, 8, 4096);
    let decode = side(Role::Decode, 8, 4096);
    let left = watch_left(&prefill);
    connect(&prefill, &decode, "d");
    let (abort, done) = abortable(&prefill, "d", &[1, 2]);
    outcome(&done).unwrap();
    assert!(!abort.abort(), "the call had completed");
    assert!(!abort.abort(), "still nothing");
    assert!(prefill.engine.is_connected("d"), "the link is left alone");
    outcome(&plain(&prefill, "d", &[3])).unwrap();
    assert_written(&prefill, &decode, 0, &[1, 2, 3], &[1, 2, 3]);
    assert!(left.lock().unwrap().is_empty(), "no peer left");
}

#[test]
fn an_abort_of_a_pending_call_tears_its_link_down_and_reports_the_peer_left_once() {
    let block_bytes = 256 * 1024;
    let prefill = side(Role::Prefill, 32, block_bytes);
    let decode = side(Role::Decode, 32, block_bytes);
    let left = watch_left(&prefill);
    let stalled = connect_stalled(&prefill, &decode, "p");
    let (_server, _) = stalled.accept().unwrap();
    let ids: Vec<u32> = (0..32).collect();
    let (abort, aborted) = abortable(&prefill, "p", &ids);
    let bystander = plain(&prefill, "p", &ids);
    std::thread::sleep(Duration::from_millis(100));
    assert!(abort.abort(), "the call was pending");
    assert!(!abort.abort(), "a second abort finds it settled");
    assert_eq!(outcome(&aborted).unwrap_err().code(), "ERR_ABORTED");
    assert_eq!(outcome(&bystander).unwrap_err().code(), "ERR_ABORTED");
    assert!(!prefill.engine.is_connected("p"));
    let left = left.lock().unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!((left[0].peer.as_str(), left[0].code), ("p", "ERR_ABORTED"));
    assert!(left[0].reason.contains("aborted"), "{left:?}");
}

#[test]
fn an_abort_racing_the_completion_either_aborts_the_call_or_changes_nothing() {
    let prefill = side(Role::Prefill, 8, 64 * 1024);
    let decode = side(Role::Decode, 8, 64 * 1024);
    let left = watch_left(&prefill);
    connect(&prefill, &decode, "d");
    let (mut in_queue, mut torn_down, mut too_late) = (0, 0, 0);
    for round in 0..300u32 {
        let (abort, done) = abortable(&prefill, "d", &[round % 8]);
        let bystander = plain(&prefill, "d", &[(round + 1) % 8]);
        // Spin for a varying while, so that the abort lands before, around and after the
        // completion.
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_micros(u64::from(round % 40) * 5) {
            std::hint::spin_loop();
        }
        let was_pending = abort.abort();
        let result = outcome(&done);
        let other = outcome(&bystander);
        if was_pending {
            assert_eq!(result.unwrap_err().code(), "ERR_ABORTED", "round {round}");
            if prefill.engine.is_connected("d") {
                // Aborted before it reached its link: nothing was sent, nothing torn down.
                in_queue += 1;
                other.unwrap_or_else(|e| panic!("round {round}: a bystander failed: {e}"));
            } else {
                torn_down += 1;
                connect(&prefill, &decode, "d");
            }
        } else {
            too_late += 1;
            result
                .unwrap_or_else(|e| panic!("round {round}: a too-late abort failed the call: {e}"));
            other.unwrap_or_else(|e| {
                panic!("round {round}: a too-late abort hurt a bystander: {e}")
            });
            assert!(prefill.engine.is_connected("d"), "round {round}");
        }
    }
    eprintln!("aborted {in_queue} in the queue and {torn_down} on their link; {too_late} too late");
    assert_eq!(
        left.lock().unwrap().len(),
        torn_down,
        "one report per torn-down link"
    );
}

#[test]
fn a_peer_whose_engine_closed_is_reported_once_and_this_sides_own_endings_are_not() {
    let prefill = side(Role::Prefill, 8, 4096);
    let decode = side(Role::Decode, 8, 4096);
    let replaced = side(Role::Decode, 8, 4096);
    let left = watch_left(&prefill);
    connect(&prefill, &decode, "d");
    connect(&prefill, &replaced, "r");
    // A reconnect replaces the link: the peer did not leave.
    connect(&prefill, &replaced, "r");
    outcome(&plain(&prefill, "d", &[1])).unwrap();
    decode.engine.close();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while left.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    {
        let left = left.lock().unwrap();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(
            (left[0].peer.as_str(), left[0].code),
            ("d", "ERR_PEER_DISCONNECTED")
        );
    }
    assert!(!prefill.engine.is_connected("d"));
    // A cancel of the broken link does not report it again.
    assert!(prefill
        .engine
        .cancel_peer("d", kvtransfer_engine::Error::Aborted));
    // A connect given up on is not reported; closing this side reports nothing either.
    assert!(prefill
        .engine
        .abandon_connect("r", kvtransfer_engine::Error::Aborted));
    connect(&prefill, &replaced, "r");
    prefill.engine.close();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(left.lock().unwrap().len(), 1, "{:?}", left.lock().unwrap());
}

#[test]
fn a_timed_out_call_reports_its_peer_left_with_err_timeout() {
    let block_bytes = 256 * 1024;
    let prefill = side(Role::Prefill, 32, block_bytes);
    let decode = side(Role::Decode, 32, block_bytes);
    let left = watch_left(&prefill);
    let stalled = connect_stalled(&prefill, &decode, "p");
    let (_server, _) = stalled.accept().unwrap();
    let ids: Vec<u32> = (0..32).collect();
    let (sender, done) = channel();
    prefill
        .engine
        .write(
            WriteCall {
                timeout: Some(Duration::from_millis(200)),
                integrity: Default::default(),
                ..WriteCall::ids("p", BlockIds::U32(&ids), BlockIds::U32(&ids), 0.0, None)
            },
            OnDone::Callback(Box::new(move |result| {
                let _ = sender.send(result);
            })),
        )
        .unwrap();
    assert_eq!(outcome(&done).unwrap_err().code(), "ERR_TIMEOUT");
    let left = left.lock().unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!((left[0].peer.as_str(), left[0].code), ("p", "ERR_TIMEOUT"));
    assert!(left[0].reason.contains("200 ms"), "{left:?}");
}
