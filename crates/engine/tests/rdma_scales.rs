//! fp8 scale caches over RDMA on a real device (Soft-RoCE in the VM): the scale regions
//! are registered like K/V, every call's K, V, K-scale and V-scale WRITEs land byte for
//! byte, unlisted blocks stay zero, and the GDR flush (whose READ targets the call's last
//! WRITE, a scale block here) completes. Skips when `KVTRANSFER_RDMA_DEVICE` is unset;
//! run with `bash scripts/rxe-vm/run-rdma-tests.sh`.

mod common;

use common::rdma;
use common::{assert_written, try_connect, SideSpec};
use futures_executor::block_on;
use kvtransfer_engine::{BlockIds, RdmaSettings, Role};

fn spec(role: Role, blocks: usize, scale_block_bytes: usize, rdma: RdmaSettings) -> SideSpec {
    SideSpec {
        scale_block_bytes,
        ..SideSpec::new(role, 3, blocks, 2048).over_rdma(rdma)
    }
}

/// Settings over `device` with the GDR flush on or off and `qps_per_peer` queue pairs.
fn settings(device: &str, gdr_flush: bool, qps_per_peer: u16) -> RdmaSettings {
    RdmaSettings {
        gdr_flush,
        qps_per_peer,
        ..rdma::settings(device)
    }
}

#[test]
fn rdma_writes_key_value_and_scale_blocks_byte_for_byte() {
    let Ok(dev) = std::env::var("KVTRANSFER_RDMA_DEVICE") else {
        eprintln!("SKIP rdma_writes_key_value_and_scale_blocks_byte_for_byte: KVTRANSFER_RDMA_DEVICE is unset");
        return;
    };
    for (flush, qps, scale_block_bytes) in [(true, 1, 64), (false, 2, 16), (true, 3, 4096)] {
        let rdma = settings(&dev, flush, qps);
        let (prefill, decode) = common::pair(
            spec(Role::Prefill, 300, scale_block_bytes, rdma.clone()),
            spec(Role::Decode, 310, scale_block_bytes, rdma),
        );
        assert_eq!(prefill.engine.transport_name(), "rdma");
        let local: Vec<u32> = (0..250).map(|i| (i * 7) % 300).collect();
        let remote: Vec<u32> = (0..250).map(|i| (i * 11 + 3) % 310).collect();
        let pending: Vec<_> = (0..2)
            .map(|layer| {
                prefill
                    .engine
                    .write_cache(
                        "decode",
                        BlockIds::U32(&local),
                        BlockIds::U32(&remote),
                        f64::from(layer),
                        Some(b"scales".to_vec()),
                    )
                    .unwrap()
            })
            .collect();
        for p in pending {
            block_on(p).unwrap().unwrap();
        }
        for layer in 0..2 {
            assert_written(&prefill, &decode, layer, &local, &remote);
        }
        assert_written(&prefill, &decode, 2, &[], &[]);
        prefill.engine.close();
        decode.engine.close();
    }
    // Scales on one side only: refused at the handshake, nothing registered is written.
    let prefill = spec(Role::Prefill, 8, 32, settings(&dev, false, 1)).build();
    let decode = spec(Role::Decode, 8, 0, settings(&dev, false, 1)).build();
    let err = try_connect(&prefill, &decode, "decode").unwrap_err();
    assert_eq!(err.code(), "ERR_LAYOUT_MISMATCH", "{err}");
    assert!(err.to_string().contains("scaleBlockBytes"), "{err}");
}
