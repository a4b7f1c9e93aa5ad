//! `kvtransfer doctor` on a host with an RDMA device (the Soft-RoCE VM: rxe0, port 1, RoCE
//! v2 GID at index 1, `KVTRANSFER_RDMA_DEVICE` / `KVTRANSFER_GID_INDEX` say which): RDMA is
//! usable, the port is listed ACTIVE with its GIDs typed, and the GID the engine picks (its
//! own choice, made by opening the transport) is the RoCE v2 one.

use kvtransfer_engine::{host_report, TransportKind};

fn expected() -> (String, u8) {
    let device = std::env::var("KVTRANSFER_RDMA_DEVICE").unwrap_or_else(|_| "rxe0".into());
    let gid = std::env::var("KVTRANSFER_GID_INDEX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    (device, gid)
}

#[test]
#[ignore = "needs an RDMA device (run in the Soft-RoCE VM: scripts/rxe-vm/run-rdma-tests.sh)"]
fn rdma_is_usable_and_the_picked_gid_is_the_roce_v2_one() {
    let (device, gid_index) = expected();
    let report = host_report(0);
    assert_eq!(report.rdma.error, None);
    let listed = report
        .rdma
        .devices
        .iter()
        .find(|d| d.name == device)
        .unwrap_or_else(|| panic!("{device} not listed: {:?}", report.rdma.devices));
    let port = listed.ports.iter().find(|p| p.port == 1).expect("port 1");
    assert_eq!(port.state, "ACTIVE");
    assert_eq!(port.link_layer, "RoCE");
    assert!(port.active_mtu >= 256, "{}", port.active_mtu);
    let gid = port
        .gids
        .iter()
        .find(|g| g.index == gid_index)
        .unwrap_or_else(|| panic!("GID {gid_index} not listed: {:?}", port.gids));
    assert_eq!(gid.kind, "RoCE v2");
    assert!(gid.address.starts_with("::ffff:"), "{}", gid.address);
    if listed.software {
        assert_eq!(
            listed.pcie_relaxed_ordering, None,
            "rxe has no PCI function"
        );
    }
    let rdma = report.transport(TransportKind::Rdma).unwrap();
    assert!(rdma.usable, "{}", rdma.reason);
    let detail = |key: &str| {
        rdma.details
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(detail("device"), device, "{}", rdma.reason);
    assert_eq!(detail("port"), "1");
    assert_eq!(detail("gidIndex"), gid_index.to_string(), "{}", rdma.reason);
    assert_eq!(
        format!("::ffff:{}", detail("gid")),
        gid.address,
        "the picked GID's address"
    );
    assert!(report.transport(TransportKind::Tcp).unwrap().usable);
}
