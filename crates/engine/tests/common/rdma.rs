//! The RDMA part of the shared fixtures, for the tests that run in the Soft-RoCE VM
//! (`scripts/rxe-vm/run-rdma-tests.sh`) and the RDMA examples: the device the VM names, the
//! settings every RDMA side starts from, and a side's spec over RDMA.

use super::SideSpec;
use kvtransfer_engine::RdmaSettings;

/// The RDMA device named by `KVTRANSFER_RDMA_DEVICE`. The tests that need one are
/// `#[ignore]`d; run explicitly (`--ignored`) without a device they fail, never pass.
pub fn device(test: &str) -> String {
    std::env::var("KVTRANSFER_RDMA_DEVICE").unwrap_or_else(|_| {
        panic!(
            "{test} needs an RDMA device but KVTRANSFER_RDMA_DEVICE is unset \
             (run scripts/rxe-vm/run-rdma-tests.sh)"
        )
    })
}

/// Settings over `nics` (one `KVCACHE_RDMA_NICS` entry: a device, or devices joined by `+`,
/// one rail each): the engine picks the GID (index 1, RoCE v2, on the VM's rxe devices), the
/// least ACK timeout (14), no relaxed ordering, no GDR flush, the default queue pairs per
/// peer. A test changes a field with `RdmaSettings { field, ..settings(nics) }`.
pub fn settings(nics: &str) -> RdmaSettings {
    RdmaSettings {
        nics: vec![nics.to_string()],
        devices: None,
        gid_index: None,
        ib_timeout: 14,
        relaxed_ordering: false,
        gdr_flush: false,
        qps_per_peer: kvtransfer_engine::DEFAULT_QPS_PER_PEER,
    }
}

impl SideSpec {
    /// This side over RDMA with `rdma` (and no other transport).
    pub fn over_rdma(self, rdma: RdmaSettings) -> SideSpec {
        SideSpec {
            transport: "rdma",
            rdma: Some(rdma),
            ..self
        }
    }
}
