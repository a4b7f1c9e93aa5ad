//! Fences over RDMA (Soft-RoCE in the VM: `bash scripts/rxe-vm/run-rdma-tests.sh`): the
//! writer honours a fence (its queue pairs to the receiver are destroyed before its fenced
//! calls fail), and a receiver that cuts a writer off moves its own queue pairs with it to
//! the error state, so incoming WRITEs fail. `#[ignore]`d where there is no device; run
//! with `--ignored` they fail without one (`KVTRANSFER_RDMA_DEVICE` unset), never pass.

mod common;
mod fence_support;

use kvtransfer_engine::RdmaSettings;

fn rdma(spec: common::SideSpec) -> common::SideSpec {
    let device = std::env::var("KVTRANSFER_RDMA_DEVICE")
        .expect("needs an RDMA device: KVTRANSFER_RDMA_DEVICE is unset (run scripts/rxe-vm/run-rdma-tests.sh)");
    common::SideSpec {
        transport: "rdma",
        rdma: Some(RdmaSettings {
            nics: vec![device],
            devices: None,
            gid_index: None,
            ib_timeout: 14,
            relaxed_ordering: false,
            gdr_flush: false,
            qps_per_peer: 2,
        }),
        ..spec
    }
}

#[test]
#[ignore = "needs an RDMA device (Soft-RoCE VM: scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_a_fence_honoured_by_the_writer_leaves_no_byte_of_the_fenced_writes() {
    fence_support::honoured_rounds(rdma);
}

#[test]
#[ignore = "needs an RDMA device (Soft-RoCE VM: scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_a_writer_cut_off_by_the_receiver_lands_nothing_afterwards() {
    fence_support::cut_off_rounds(rdma);
}
