//! Warm re-attach: the decode side's imported host regions are parked, then swapped for
//! new shared files at the same addresses, while the prefill's TCP link stays up. Writes
//! land byte for byte in the new file and never again in the old one.

use futures_executor::block_on;
use kvtransfer_engine::{BlockIds, Engine, Role, TransportKind};

mod common;
use common::imported::{decode_over, Shared, BLOCKS, BLOCK_BYTES};
use common::{connect_between, pattern, SideSpec};

fn write(prefill: &Engine, local: &[u32], remote: &[u32]) {
    block_on(
        prefill
            .write_cache(
                "decode:1",
                BlockIds::U32(local),
                BlockIds::U32(remote),
                0.0,
                None,
            )
            .unwrap(),
    )
    .unwrap()
    .unwrap();
}

#[test]
fn swapped_regions_take_the_next_writes_and_the_old_file_none() {
    let (old, new) = (Shared::new("old"), Shared::new("new"));
    let decode = decode_over(&old, "tcp", None);
    let prefill = SideSpec {
        with_values: false,
        ..SideSpec::new(Role::Prefill, 1, BLOCKS, BLOCK_BYTES)
    }
    .build();
    connect_between(&prefill.engine, &decode, "decode:1").unwrap();
    assert!(decode.swap_refusal().is_none());

    write(&prefill.engine, &[1, 2], &[3, 4]);
    assert_eq!(old.block(3), pattern(0, 0, 1, BLOCK_BYTES));
    assert_eq!(old.block(4), pattern(0, 0, 2, BLOCK_BYTES));

    // Detached: the region is parked; a write that still reaches it lands in no file.
    decode.park_imports().unwrap();
    write(&prefill.engine, &[5], &[5]);
    assert_eq!(old.block(5), vec![0; BLOCK_BYTES]);

    // A refused swap maps nothing (wrong size, then a second region that is not there).
    let err = decode
        .swap_imports(vec![("localKeyCache", 0, new.spec(BLOCK_BYTES as u64))])
        .unwrap_err();
    assert_eq!(err.code(), "ERR_INVALID_ARGUMENT");
    assert!(err.to_string().contains("bytes 1024 given"), "{err}");
    let whole = (BLOCKS * BLOCK_BYTES) as u64;
    let err = decode
        .swap_imports(vec![
            ("localKeyCache", 0, new.spec(whole)),
            ("localKeyCache", 1, new.spec(whole)),
        ])
        .unwrap_err();
    assert_eq!(err.code(), "ERR_INVALID_ARGUMENT");

    decode
        .swap_imports(vec![("localKeyCache", 0, new.spec(whole))])
        .unwrap();
    assert!(prefill.engine.is_connected("decode:1"));
    // TCP resolves every address at each frame: no keys to hand the writers, none to take.
    assert!(decode.region_keys().is_empty());
    assert_eq!(
        prefill
            .engine
            .rekey("decode:1", TransportKind::Tcp, &[1, 2, 3])
            .unwrap(),
        0
    );
    write(&prefill.engine, &[6, 7, 8], &[6, 7, 3]);
    assert_eq!(new.block(6), pattern(0, 0, 6, BLOCK_BYTES));
    assert_eq!(new.block(7), pattern(0, 0, 7, BLOCK_BYTES));
    assert_eq!(new.block(3), pattern(0, 0, 8, BLOCK_BYTES));
    assert_eq!(
        new.block(5),
        vec![0; BLOCK_BYTES],
        "parked writes stay parked"
    );
    // The old file kept what it had and took nothing after the park.
    for block in [5, 6, 7] {
        assert_eq!(old.block(block), vec![0; BLOCK_BYTES]);
    }
    assert_eq!(old.block(3), pattern(0, 0, 1, BLOCK_BYTES));

    // Regions the engine did not import cannot be swapped.
    let err = prefill.engine.swap_refusal().unwrap();
    assert_eq!(err.code(), "ERR_UNSUPPORTED");
    decode.close();
    prefill.engine.close();
}
