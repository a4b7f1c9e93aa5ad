//! Fences over RDMA (Soft-RoCE in the VM: `bash scripts/rxe-vm/run-rdma-tests.sh`): the
//! writer honours a fence (its queue pairs to the receiver are destroyed before its fenced
//! calls fail), and a receiver that cuts a writer off moves its own queue pairs with it to
//! the error state, so incoming WRITEs fail. `#[ignore]`d where there is no device; run
//! with `--ignored` they fail without one (`KVTRANSFER_RDMA_DEVICE` unset), never pass.

mod common;
mod fence_support;

use common::rdma::{device, settings};

fn rdma(spec: common::SideSpec) -> common::SideSpec {
    spec.over_rdma(settings(&device("the RDMA fence tests")))
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
