//! Warm re-attach on RDMA: the decode side's imported host regions are parked (their
//! registrations released), then swapped for a new shared file at the same addresses and
//! registered again on every rail; the writer takes the new keys over its live link
//! (`Engine::rekey`) and its next writes land byte for byte in the new file, none in the
//! old one. A write while parked fails typed and lands nowhere. Runs in the Soft-RoCE VM
//! (`scripts/rxe-vm/run-rdma-tests.sh`, two rails there); `#[ignore]`d elsewhere, and run
//! with `--ignored` it fails without a device, never passes.

use futures_executor::block_on;
use kvtransfer_engine::{BlockIds, Engine, RdmaSettings, Role, TransportKind};

mod common;
use common::imported::{decode_over, Shared, BLOCKS, BLOCK_BYTES};
use common::{connect_between, hello_between, pattern, rdma, SideSpec};

/// Every device of the VM (`rxe0`, and `rxe1` where it has two), joined as one rail set.
fn settings() -> (RdmaSettings, usize) {
    let device = std::env::var("KVTRANSFER_RDMA_DEVICE")
        .expect("KVTRANSFER_RDMA_DEVICE names the RDMA device (the VM sets it)");
    let (nics, rails) = match std::env::var("KVTRANSFER_RDMA_DEVICE2") {
        Ok(second) => (format!("{device}+{second}"), 2),
        Err(_) => (device, 1),
    };
    let settings = RdmaSettings {
        qps_per_peer: 1,
        ..rdma::settings(&nics)
    };
    (settings, rails)
}

fn write(prefill: &Engine, local: &[u32], remote: &[u32]) -> kvtransfer_engine::Result<()> {
    block_on(prefill.write_cache(
        "decode:1",
        BlockIds::U32(local),
        BlockIds::U32(remote),
        0.0,
        None,
    )?)
    .expect("the call completes")
}

#[test]
#[ignore = "needs an RDMA device (KVTRANSFER_RDMA_DEVICE): runs in the Soft-RoCE VM"]
fn rdma_swapped_regions_are_registered_again_and_the_writer_takes_the_new_keys() {
    let (rdma, rails) = settings();
    let (old, new) = (Shared::new("rdma-old"), Shared::new("rdma-new"));
    let decode = decode_over(&old, "rdma", Some(rdma.clone()));
    assert!(decode.swap_refusal().is_none(), "RDMA follows a swap");
    let prefill = SideSpec {
        with_values: false,
        ..SideSpec::new(Role::Prefill, 1, BLOCKS, BLOCK_BYTES).over_rdma(rdma)
    }
    .build();
    connect_between(&prefill.engine, &decode, "decode:1").unwrap();
    assert_eq!(
        prefill.engine.peer_info("decode:1").unwrap().transport,
        TransportKind::Rdma
    );

    write(&prefill.engine, &[1, 2], &[3, 4]).unwrap();
    assert_eq!(old.block(3), pattern(0, 0, 1, BLOCK_BYTES));
    assert_eq!(old.block(4), pattern(0, 0, 2, BLOCK_BYTES));
    let keys_before = decode.region_keys();
    assert_eq!(keys_before.len(), 1);
    assert_eq!(keys_before[0].0, TransportKind::Rdma);

    // Parked: nothing registered, so there are no keys to hand out.
    decode.park_imports().unwrap();
    assert!(decode.region_keys().is_empty());
    let whole = (BLOCKS * BLOCK_BYTES) as u64;
    decode
        .swap_imports(vec![("localKeyCache", 0, new.spec(whole))])
        .unwrap();
    let keys = decode.region_keys();
    assert_eq!(keys.len(), 1);
    assert_ne!(keys[0].1, keys_before[0].1, "registered again: new keys");

    // Keys that fit no rail of the link are refused typed, and change nothing.
    let err = prefill
        .engine
        .rekey("decode:1", TransportKind::Rdma, &[1, 2, 3])
        .unwrap_err();
    assert_eq!(err.code(), "ERR_PROTOCOL", "{err}");
    assert_eq!(
        prefill
            .engine
            .rekey("decode:1", TransportKind::Tcp, &keys[0].1)
            .unwrap(),
        0,
        "no TCP link to that peer"
    );
    let updated = prefill
        .engine
        .rekey("decode:1", TransportKind::Rdma, &keys[0].1)
        .unwrap();
    assert_eq!(updated, rails, "every rail pair takes the new keys");
    assert!(
        prefill.engine.is_connected("decode:1"),
        "the link stayed up"
    );

    // Enough blocks that every rail carries some (the split follows the rails' speeds).
    let local: Vec<u32> = (0..BLOCKS as u32).collect();
    let remote: Vec<u32> = (0..BLOCKS as u32).rev().collect();
    write(&prefill.engine, &local, &remote).unwrap();
    for (l, r) in local.iter().zip(&remote) {
        assert_eq!(
            new.block(*r as usize),
            pattern(0, 0, *l as usize, BLOCK_BYTES),
            "block {r} in the new file"
        );
    }
    // The old file kept what it had before the park and took nothing after it.
    assert_eq!(old.block(3), pattern(0, 0, 1, BLOCK_BYTES));
    assert_eq!(old.block(4), pattern(0, 0, 2, BLOCK_BYTES));
    for block in (0..BLOCKS).filter(|b| ![3, 4].contains(b)) {
        assert_eq!(old.block(block), vec![0; BLOCK_BYTES], "old block {block}");
    }
    let report = prefill.engine.peer_info("decode:1").unwrap().rails;
    assert_eq!(report.len(), rails);
    assert!(
        report
            .iter()
            .all(|rail| rail.bytes > 0 && rail.failures == 0),
        "{report:?}"
    );

    // Parked again: a write that no fence stopped fails typed (its keys are released) and
    // lands in neither file.
    let before: Vec<Vec<u8>> = (0..BLOCKS).map(|b| new.block(b)).collect();
    decode.park_imports().unwrap();
    let err = write(&prefill.engine, &[9], &[9]).unwrap_err();
    assert_ne!(err.code(), "ERR_INTERNAL", "{err}");
    for (block, was) in before.iter().enumerate() {
        assert_eq!(&new.block(block), was, "new block {block} after the park");
    }
    assert_eq!(old.block(9), vec![0; BLOCK_BYTES]);
    // A connect while parked is refused typed (no keys to offer).
    let again = SideSpec {
        with_values: false,
        ..SideSpec::new(Role::Prefill, 1, BLOCKS, BLOCK_BYTES).over_rdma(settings().0)
    }
    .build();
    let hello = hello_between(&again.engine, &decode, "decode:1").unwrap();
    let err = decode.accept(&hello).unwrap_err();
    assert_eq!(err.code(), "ERR_UNSUPPORTED", "{err}");
    assert!(err.to_string().contains("parked"), "{err}");
    again.engine.close();
    decode.close();
    prefill.engine.close();
}
