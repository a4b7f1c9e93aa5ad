//! fp8 scale caches over loopback TCP: K, V, K-scale and V-scale of every listed block
//! land byte for byte in one call; unlisted blocks stay zero; layouts that differ in the
//! scales are refused at the handshake.

use futures_executor::block_on;
use kvtransfer_engine::{BlockIds, CallBlocks, CallPeer, OnDone, Role, WriteCall};

mod common;
use common::{assert_written, connect, try_connect, Side, SideSpec};

fn side(role: Role, blocks: usize, scale_block_bytes: usize, with_values: bool) -> Side {
    SideSpec {
        scale_block_bytes,
        with_values,
        ..SideSpec::new(role, 3, blocks, 1024)
    }
    .build()
}

fn write(prefill: &Side, local: &[u32], remote: &[u32], layer: usize) {
    block_on(
        prefill
            .engine
            .write_cache(
                "decode",
                BlockIds::U32(local),
                BlockIds::U32(remote),
                layer as f64,
                Some(b"scales".to_vec()),
            )
            .unwrap(),
    )
    .unwrap()
    .unwrap();
}

#[test]
fn key_value_and_scale_blocks_arrive_byte_for_byte() {
    for (scale_block_bytes, with_values) in [(32, true), (1, true), (4096, true), (64, false)] {
        let prefill = side(Role::Prefill, 64, scale_block_bytes, with_values);
        let decode = side(Role::Decode, 40, scale_block_bytes, with_values);
        assert_eq!(
            prefill.engine.layout().kinds(),
            if with_values { 4 } else { 2 }
        );
        connect(&prefill, &decode, "decode");
        let local = [5u32, 6, 7, 63, 0, 12];
        let remote = [10u32, 11, 12, 39, 0, 3];
        write(&prefill, &local, &remote, 0);
        write(&prefill, &local[..2], &remote[..2], 2);
        assert_written(&prefill, &decode, 0, &local, &remote);
        assert_written(&prefill, &decode, 1, &[], &[]);
        assert_written(&prefill, &decode, 2, &local[..2], &remote[..2]);
        // Prepared lists carry the scales too.
        let prepared = prefill
            .engine
            .prepare_blocks("decode", BlockIds::U32(&[1, 2]), BlockIds::U32(&[20, 21]))
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        prefill
            .engine
            .write(
                WriteCall {
                    peer: CallPeer::Key("decode"),
                    blocks: CallBlocks::Prepared(&prepared),
                    layer: 1.0,
                    tag: None,
                    timeout: None,
                    integrity: Default::default(),
                },
                OnDone::Callback(Box::new(move |r| tx.send(r).unwrap())),
            )
            .unwrap();
        rx.recv().unwrap().unwrap();
        assert_written(&prefill, &decode, 1, &[1, 2], &[20, 21]);
        prefill.engine.close();
        decode.engine.close();
    }
}

#[test]
fn scale_layouts_that_differ_are_refused_at_the_handshake() {
    for (here, there, what) in [
        (32, 0, "scale cache regions"),
        (0, 32, "scale cache regions"),
        (
            32,
            16,
            "scaleBlockBytes is 16 on decode-test but 32 on prefill-test",
        ),
    ] {
        let prefill = side(Role::Prefill, 8, here, true);
        let decode = side(Role::Decode, 8, there, true);
        let err = try_connect(&prefill, &decode, "decode").unwrap_err();
        assert_eq!(err.code(), "ERR_LAYOUT_MISMATCH", "{err}");
        assert!(err.to_string().contains(what), "{err}");
        assert!(!prefill.engine.is_connected("decode"));
        assert!(decode.keys.iter().all(|r| r.iter().all(|&b| b == 0)));
    }
}

#[test]
fn scale_regions_are_checked_against_the_cache_regions() {
    let keys = [0x10000u64, 0x20000];
    let err = kvtransfer_engine::internals::RegionTable::with_scales(
        &keys,
        &[0x30000, 0x40000],
        &[0x50000, 0x60000],
        &[],
        8,
        64,
        4,
    )
    .unwrap_err();
    assert_eq!(err.code(), "ERR_INVALID_ARGUMENT");
    assert!(
        err.to_string()
            .contains("valueScaleCache: 0 regions given but localValueCache has 2"),
        "{err}"
    );
}
