//! `kvtransfer doctor` on a host without RDMA or GPUs (this CI host): TCP is usable, RDMA
//! is not and says why, the GPU section says there is no driver or no GPU, and a malformed
//! `KVCACHE_*` variable is reported with the very message construction gives.
//! `rdma_doctor.rs` covers a host with an RDMA device (the Soft-RoCE VM).

mod common;

use common::SideSpec;
use kvtransfer_engine::{host_report, Role, TransportKind};

#[test]
fn tcp_is_usable_and_every_transport_is_reported_in_preference_order() {
    let report = host_report(0);
    let kinds: Vec<TransportKind> = report.transports.iter().map(|t| t.transport).collect();
    assert_eq!(kinds, TransportKind::PREFERENCE);
    let tcp = report.transport(TransportKind::Tcp).unwrap();
    assert!(tcp.usable, "{}", tcp.reason);
    assert!(tcp.reason.starts_with("tcp: usable"), "{}", tcp.reason);
    assert!(tcp.details.iter().any(|(k, _)| *k == "bindAddress"));
    assert_eq!(report.settings_error, None);
}

#[test]
fn rdma_without_a_device_is_unusable_with_the_reason_a_communicator_gets() {
    let report = host_report(0);
    let rdma = report.transport(TransportKind::Rdma).unwrap();
    let active_port = report
        .rdma
        .devices
        .iter()
        .any(|d| d.ports.iter().any(|p| p.state == "ACTIVE"));
    if active_port {
        // A host with RDMA (the VM): rdma_doctor.rs checks it.
        assert!(rdma.usable, "{}", rdma.reason);
        return;
    }
    assert!(!rdma.usable);
    // The reason is the one `transport: 'rdma'` is refused with.
    let mut spec = SideSpec::new(Role::Decode, 1, 4, 64);
    spec.transport = "rdma";
    let refused = spec.try_build().err().expect("rdma cannot open here");
    assert_eq!(refused.code(), "ERR_RDMA_UNAVAILABLE");
    assert_eq!(
        rdma.reason,
        format!("rdma: {refused}"),
        "the doctor and the constructor disagree"
    );
    assert!(
        report.rdma.error.is_some()
            || report
                .rdma
                .devices
                .iter()
                .all(|d| d.ports.iter().all(|p| p.state != "ACTIVE"))
    );
}

#[test]
fn without_a_gpu_the_report_says_so() {
    let report = host_report(0);
    if report.gpus.gpus.is_empty() {
        let error = report.gpus.error.as_deref().unwrap_or_default();
        assert!(
            error.starts_with("no CUDA driver") || error == "no GPUs",
            "{error}"
        );
        assert!(report.gpus.peer_access.is_empty());
    } else {
        let n = report.gpus.gpus.len();
        assert_eq!(report.gpus.peer_access.len(), n);
        assert!((0..n).all(|i| report.gpus.peer_access[i][i]));
        assert!(report.gpus.driver_version.is_some());
    }
}

#[test]
fn a_malformed_variable_is_reported_with_the_constructors_message() {
    // The environment is process-wide: run the case in a child process.
    if std::env::var("KVT_DOCTOR_CHILD").is_ok() {
        let refused = SideSpec::new(Role::Decode, 1, 4, 64)
            .try_build()
            .err()
            .expect("KVCACHE_IB_TIMEOUT=99 must be refused");
        let report = host_report(0);
        assert_eq!(report.settings_error, Some(refused.to_string()));
        let variable = report
            .variables
            .iter()
            .find(|v| v.name == "KVCACHE_IB_TIMEOUT")
            .expect("the variable is listed");
        assert_eq!(variable.value, "99");
        assert!(variable.known);
        assert_eq!(variable.error, Some(refused.to_string()));
        // A valid one is listed without an error, a typo as unknown.
        let valid = report
            .variables
            .iter()
            .find(|v| v.name == "KVCACHE_RDMA_QPS_PER_PEER")
            .unwrap();
        assert_eq!((valid.value.as_str(), valid.error.as_ref()), ("4", None));
        let typo = report
            .variables
            .iter()
            .find(|v| v.name == "KVCACHE_RDMA_GID_IDX")
            .unwrap();
        assert!(!typo.known);
        // Secrets are not shown.
        let token = report
            .variables
            .iter()
            .find(|v| v.name == "KVCACHE_AUTH_TOKEN")
            .unwrap();
        assert_eq!(token.value, "(6 bytes)");
        // No transport can be had while a variable is malformed.
        for t in &report.transports {
            assert!(
                !t.usable && t.reason.contains("KVCACHE_IB_TIMEOUT"),
                "{}",
                t.reason
            );
        }
        return;
    }
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_malformed_variable_is_reported_with_the_constructors_message",
            "--quiet",
        ])
        .env("KVT_DOCTOR_CHILD", "1")
        .env("KVCACHE_IB_TIMEOUT", "99")
        .env("KVCACHE_RDMA_QPS_PER_PEER", "4")
        .env("KVCACHE_RDMA_GID_IDX", "1")
        .env("KVCACHE_AUTH_TOKEN", "secret")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&child.stdout);
    assert!(
        child.status.success() && out.contains("1 passed"),
        "the doctor's report of KVCACHE_IB_TIMEOUT=99 is wrong: {out}{}",
        String::from_utf8_lossy(&child.stderr)
    );
}

#[test]
#[ignore = "needs a GPU and its driver (scripts/gpu-tests.sh --run)"]
fn gpus_are_listed_with_the_peer_access_matrix() {
    let report = host_report(0);
    eprintln!("{:#?}", report.gpus);
    eprintln!("{:#?}", report.transports);
    let gpus = &report.gpus;
    assert_eq!(gpus.error, None);
    let version = gpus.driver_version.as_deref().expect("a driver version");
    assert!(
        version.split('.').all(|p| p.parse::<u32>().is_ok()),
        "{version}"
    );
    assert!(!gpus.gpus.is_empty());
    for (i, gpu) in gpus.gpus.iter().enumerate() {
        assert_eq!(gpu.ordinal as usize, i);
        assert!(!gpu.name.is_empty());
        assert!(
            gpu.uuid.starts_with("GPU-") && gpu.uuid.len() == 40,
            "{}",
            gpu.uuid
        );
        // domain:bus:device.function, e.g. 0000:19:00.0
        assert_eq!(gpu.pci_bus_id.matches(':').count(), 2, "{}", gpu.pci_bus_id);
        assert!(gpu.total_memory > 1 << 30, "{}", gpu.total_memory);
    }
    let n = gpus.gpus.len();
    assert_eq!(gpus.peer_access.len(), n);
    for (a, row) in gpus.peer_access.iter().enumerate() {
        assert_eq!(row.len(), n);
        assert!(row[a]);
    }
    // A GPU host still reaches its peers over TCP.
    assert!(report.transport(TransportKind::Tcp).unwrap().usable);
    // The NIC choice for GPU regions found GPU 0 in sysfs by the driver's bus id: it names
    // the nearest NICs, or says that no NIC has an active port, never that the GPU's
    // locality is unknown.
    let nics = &report.rdma.gpu_nics;
    eprintln!("NICs for GPU regions on GPU 0: {nics}");
    // bus:device.function, as sysfs spells it (the driver may write upper case).
    let bus_id = gpus.gpus[0].pci_bus_id.to_ascii_lowercase();
    let tail = &bus_id[bus_id.len().saturating_sub(7)..];
    assert!(
        (nics.starts_with("nearest GPU ") && nics.contains(&format!("{tail}: ")))
            || nics.ends_with("(no RDMA device in /sys/class/infiniband has an active port)"),
        "{nics}"
    );
}
