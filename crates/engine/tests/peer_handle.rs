//! Peer handles over loopback TCP: calls through a handle write like calls by key; a
//! handle outlives a reconnect (it finds the new connection by key); a handle is refused,
//! typed and writing nothing, where its peer is gone or by another engine.

use kvtransfer_engine::{
    BlockIds, CallBlocks, CallPeer, PeerHandle, PreparedBlocks, Role, WriteCall,
};

mod common;
use common::{assert_written, connect, settle, Side, SideSpec};

const KEY: &str = "decode";

fn side(role: Role) -> Side {
    SideSpec::new(role, 2, 16, 512).build()
}

/// Writes `local` → `remote` of `layer` through `handle` and waits for the outcome.
fn write(
    side: &Side,
    handle: &PeerHandle,
    local: &[u32],
    remote: &[u32],
    layer: u32,
) -> kvtransfer_engine::Result<kvtransfer_engine::Result<()>> {
    let call = WriteCall::ids(
        handle,
        BlockIds::U32(local),
        BlockIds::U32(remote),
        f64::from(layer),
        None,
    );
    settle(side, call)
}

/// Writes `prepared` for layer 0 through `handle` and waits for the outcome.
fn write_prepared(
    side: &Side,
    handle: &PeerHandle,
    prepared: &PreparedBlocks,
) -> kvtransfer_engine::Result<kvtransfer_engine::Result<()>> {
    settle(
        side,
        WriteCall {
            peer: CallPeer::Handle(handle),
            blocks: CallBlocks::Prepared(prepared),
            layer: 0.0,
            tag: None,
            timeout: None,
            integrity: Default::default(),
        },
    )
}

#[test]
fn a_handle_writes_and_follows_its_peer_across_a_reconnect() {
    let prefill = side(Role::Prefill);
    let decode = side(Role::Decode);
    let refused = prefill.engine.peer(KEY).unwrap_err();
    assert_eq!(refused.code(), "ERR_NOT_CONNECTED", "{refused}");
    connect(&prefill, &decode, KEY);
    let handle = prefill.engine.peer(KEY).unwrap();
    assert_eq!(handle.key(), KEY);
    write(&prefill, &handle, &[1, 2], &[3, 4], 0)
        .unwrap()
        .unwrap();
    assert_written(&prefill, &decode, 0, &[1, 2], &[3, 4]);

    // Gone: refused, nothing written.
    assert!(prefill
        .engine
        .cancel_peer(KEY, kvtransfer_engine::Error::Closed));
    let refused = write(&prefill, &handle, &[5], &[6], 1).unwrap_err();
    assert_eq!(refused.code(), "ERR_NOT_CONNECTED", "{refused}");
    assert_written(&prefill, &decode, 1, &[], &[]);

    // Reconnected: the old handle finds the new connection by its key.
    connect(&prefill, &decode, KEY);
    write(&prefill, &handle, &[5], &[6], 1).unwrap().unwrap();
    assert_written(&prefill, &decode, 1, &[5], &[6]);

    // A prepared list goes through a handle as well.
    let prepared = prefill
        .engine
        .prepare_blocks(&handle, BlockIds::U32(&[7]), BlockIds::U32(&[8]))
        .unwrap();
    write_prepared(&prefill, &handle, &prepared)
        .unwrap()
        .unwrap();
    assert_written(&prefill, &decode, 0, &[1, 2, 7], &[3, 4, 8]);
}

#[test]
fn a_handle_is_refused_by_another_engine() {
    let first = side(Role::Prefill);
    let second = side(Role::Prefill);
    let decode = side(Role::Decode);
    connect(&first, &decode, KEY);
    connect(&second, &decode, KEY);
    let handle = first.engine.peer(KEY).unwrap();
    let refused = write(&second, &handle, &[1], &[2], 0).unwrap_err();
    assert_eq!(refused.code(), "ERR_INVALID_ARGUMENT", "{refused}");
    // The TypeScript layer refuses another communicator's `Peer` first, in these words
    // (__test__/peer-handle.spec.ts checks the same sentence).
    assert_eq!(
        refused.to_string(),
        "invalid peer: the handle on decode belongs to another communicator; use the one its connect returned"
    );
    let prepared = second
        .engine
        .prepare_blocks(KEY, BlockIds::U32(&[1]), BlockIds::U32(&[2]))
        .unwrap();
    let refused = write_prepared(&second, &handle, &prepared).unwrap_err();
    assert_eq!(refused.code(), "ERR_INVALID_ARGUMENT", "{refused}");
    assert_written(&second, &decode, 0, &[], &[]);
    write(&first, &handle, &[1], &[2], 0).unwrap().unwrap();
    assert_written(&first, &decode, 0, &[1], &[2]);
}
