//! Prepared block lists over loopback TCP: a list keeps the connection it was planned
//! against and skips the peer lookup while that connection stays registered; once it is
//! gone (cancelled, replaced by a reconnect) every call looks the peer up again and is
//! refused, typed and writing nothing, when there is none or the plan no longer fits it.

use kvtransfer_engine::{BlockIds, CallBlocks, CallPeer, PreparedBlocks, Role, WriteCall};

mod common;
use common::{assert_written, connect, settle, Side, SideSpec};

const KEY: &str = "decode";

fn side(role: Role, blocks: usize) -> Side {
    SideSpec::new(role, 3, blocks, 512).build()
}

/// Writes `prepared` for `layer` from `prefill` and waits for the outcome (`settle`).
fn write(
    prefill: &Side,
    prepared: &PreparedBlocks,
    layer: u32,
) -> kvtransfer_engine::Result<kvtransfer_engine::Result<()>> {
    settle(
        prefill,
        WriteCall {
            peer: CallPeer::Key(KEY),
            blocks: CallBlocks::Prepared(prepared),
            layer: f64::from(layer),
            tag: None,
            timeout: None,
            integrity: Default::default(),
        },
    )
}

#[test]
fn a_prepared_list_follows_its_peer_across_cancel_and_reconnect() {
    let prefill = side(Role::Prefill, 16);
    let decode = side(Role::Decode, 24);
    connect(&prefill, &decode, KEY);
    let local = [3u32, 4, 5, 15, 0];
    let remote = [20u32, 21, 22, 1, 9];
    let prepared = prefill
        .engine
        .prepare_blocks(KEY, BlockIds::U32(&local), BlockIds::U32(&remote))
        .unwrap();
    write(&prefill, &prepared, 0).unwrap().unwrap();
    assert_written(&prefill, &decode, 0, &local, &remote);

    // Cancelled: the connection it was planned against is gone, and so is the peer.
    assert!(prefill
        .engine
        .cancel_peer(KEY, kvtransfer_engine::Error::Closed));
    let refused = write(&prefill, &prepared, 1).unwrap_err();
    assert_eq!(refused.code(), "ERR_NOT_CONNECTED", "{refused}");
    assert_written(&prefill, &decode, 1, &[], &[]);

    // Reconnected with the same layout: the plan fits the new connection.
    connect(&prefill, &decode, KEY);
    write(&prefill, &prepared, 1).unwrap().unwrap();
    assert_written(&prefill, &decode, 1, &local, &remote);

    // Replaced by a connection to a peer with fewer blocks: refused, nothing written.
    let smaller = side(Role::Decode, 22);
    connect(&prefill, &smaller, KEY);
    let refused = write(&prefill, &prepared, 2).unwrap_err();
    assert_eq!(refused.code(), "ERR_LAYOUT_MISMATCH", "{refused}");
    assert!(refused.to_string().contains("24"), "{refused}");
    for layer in 0..3 {
        assert_written(&prefill, &smaller, layer, &[], &[]);
    }
    assert_written(&prefill, &decode, 2, &[], &[]);
    // Prepared again for the new peer, it is written there.
    let again = prefill
        .engine
        .prepare_blocks(KEY, BlockIds::U32(&local[..3]), BlockIds::U32(&[0, 1, 2]))
        .unwrap();
    write(&prefill, &again, 2).unwrap().unwrap();
    assert_written(&prefill, &smaller, 2, &local[..3], &[0, 1, 2]);
}

#[test]
fn a_prepared_list_is_refused_by_another_engine() {
    let first = side(Role::Prefill, 16);
    let second = side(Role::Prefill, 16);
    let decode = side(Role::Decode, 16);
    connect(&first, &decode, KEY);
    connect(&second, &decode, KEY);
    let prepared = first
        .engine
        .prepare_blocks(KEY, BlockIds::U32(&[1, 2]), BlockIds::U32(&[3, 4]))
        .unwrap();
    let refused = write(&second, &prepared, 0).unwrap_err();
    assert_eq!(refused.code(), "ERR_INVALID_ARGUMENT", "{refused}");
    assert!(
        refused.to_string().contains("another communicator"),
        "{refused}"
    );
    assert_written(&second, &decode, 0, &[], &[]);
    // Its own engine writes it.
    write(&first, &prepared, 0).unwrap().unwrap();
    assert_written(&first, &decode, 0, &[1, 2], &[3, 4]);
}
