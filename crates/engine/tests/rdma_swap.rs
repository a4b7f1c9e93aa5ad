//! Warm re-attach on RDMA: the peers hold rkeys of registrations pinned to the old pages,
//! so the engine refuses to park or swap imported regions (`ERR_UNSUPPORTED`, naming RDMA)
//! and maps nothing. Runs in the Soft-RoCE VM (`scripts/rxe-vm/run-rdma-tests.sh`).

use kvtransfer_engine::RdmaSettings;

mod common;
use common::imported::{decode_over, Shared, BLOCKS, BLOCK_BYTES};

#[test]
#[ignore = "needs an RDMA device (KVTRANSFER_RDMA_DEVICE): runs in the Soft-RoCE VM"]
fn rdma_refuses_to_swap_imported_regions() {
    let device = std::env::var("KVTRANSFER_RDMA_DEVICE")
        .expect("KVTRANSFER_RDMA_DEVICE names the RDMA device (the VM sets it)");
    let (old, new) = (Shared::new("rdma-old"), Shared::new("rdma-new"));
    let rdma = RdmaSettings {
        nics: vec![device],
        devices: None,
        gid_index: None,
        ib_timeout: 14,
        relaxed_ordering: false,
        gdr_flush: false,
        qps_per_peer: 1,
    };
    let decode = decode_over(&old, "rdma", Some(rdma));
    let refusal = decode.swap_refusal().expect("RDMA must refuse a swap");
    assert_eq!(refusal.code(), "ERR_UNSUPPORTED");
    assert!(refusal.to_string().contains("RDMA"), "{refusal}");
    assert_eq!(decode.park_imports().unwrap_err().code(), "ERR_UNSUPPORTED");
    let whole = (BLOCKS * BLOCK_BYTES) as u64;
    let err = decode
        .swap_imports(vec![("localKeyCache", 0, new.spec(whole))])
        .unwrap_err();
    assert_eq!(err.code(), "ERR_UNSUPPORTED");
    decode.close();
}
