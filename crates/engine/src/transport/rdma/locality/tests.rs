//! The choice over sysfs trees shaped as a real host's (directories, the kernel's relative
//! symlinks, `numa_node` and port `state` files) written into a temporary directory.

use super::*;
use std::os::unix::fs::symlink;
use std::sync::atomic::{AtomicU32, Ordering};

/// A temporary root, removed on drop.
struct Root(PathBuf);

impl Root {
    fn new() -> Root {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kvt-sysfs-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(dir.join("sys/bus/pci/devices")).unwrap();
        std::fs::create_dir_all(dir.join("sys/class/infiniband")).unwrap();
        Root(dir)
    }

    /// A PCI function at `path` (below sys/devices) on `numa` (-1: none), listed in
    /// sys/bus/pci/devices as the kernel does.
    fn pci(&self, path: &str, numa: i32) {
        let dir = self.0.join("sys/devices").join(path);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("numa_node"), format!("{numa}\n")).unwrap();
        let bdf = path.rsplit('/').next().unwrap();
        symlink(
            format!("../../../devices/{path}"),
            self.0.join("sys/bus/pci/devices").join(bdf),
        )
        .unwrap();
    }

    /// RDMA device `name` of the PCI function at `path` (None: a virtual device, as
    /// Soft-RoCE's), its port 1 in `state`.
    fn nic(&self, name: &str, path: Option<&str>, numa: i32, state: &str) {
        let dir = match path {
            Some(path) => {
                self.pci(path, numa);
                let dir = self
                    .0
                    .join("sys/devices")
                    .join(path)
                    .join("infiniband")
                    .join(name);
                std::fs::create_dir_all(&dir).unwrap();
                let bdf = path.rsplit('/').next().unwrap();
                symlink(format!("../../../{bdf}"), dir.join("device")).unwrap();
                symlink(
                    format!("../../devices/{path}/infiniband/{name}"),
                    self.0.join("sys/class/infiniband").join(name),
                )
                .unwrap();
                dir
            }
            None => {
                let dir = self.0.join("sys/devices/virtual/infiniband").join(name);
                std::fs::create_dir_all(&dir).unwrap();
                symlink(
                    format!("../../devices/virtual/infiniband/{name}"),
                    self.0.join("sys/class/infiniband").join(name),
                )
                .unwrap();
                dir
            }
        };
        std::fs::create_dir_all(dir.join("ports/1")).unwrap();
        std::fs::write(dir.join("ports/1/state"), format!("{state}\n")).unwrap();
    }

    fn set_state(&self, name: &str, state: &str) {
        let file = self
            .0
            .join("sys/class/infiniband")
            .join(name)
            .join("ports/1/state");
        std::fs::write(file, format!("{state}\n")).unwrap();
    }

    fn choose(&self, gpu: &str) -> NicChoice {
        let gpu = read_gpu(&self.0, gpu).expect("the GPU is in the fixture");
        nearest(&gpu, &read_nics(&self.0)).expect("a device has an active port")
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const ACTIVE: &str = "4: ACTIVE";
const DOWN: &str = "1: DOWN";
/// Host bridge pci0000:17 → root port 17:00.0 → switch 18:00.0 → ports 19:00.0 / 19:01.0.
const SWITCH: &str = "pci0000:17/0000:17:00.0/0000:18:00.0";

/// Two NUMA nodes: on node 0 a GPU and mlx5_0 behind one switch, mlx5_1 behind another
/// root port of the same host bridge, mlx5_2 on another host bridge; on node 1 a GPU and
/// mlx5_3; and a Soft-RoCE device.
fn host() -> Root {
    let root = Root::new();
    root.pci(&format!("{SWITCH}/0000:19:00.0/0000:1a:00.0"), 0);
    root.nic(
        "mlx5_0",
        Some(&format!("{SWITCH}/0000:19:01.0/0000:1b:00.0")),
        0,
        ACTIVE,
    );
    root.nic(
        "mlx5_1",
        Some("pci0000:17/0000:17:02.0/0000:1c:00.0"),
        0,
        ACTIVE,
    );
    root.nic(
        "mlx5_2",
        Some("pci0000:3a/0000:3a:00.0/0000:3b:00.0"),
        0,
        ACTIVE,
    );
    root.pci("pci0000:ae/0000:ae:00.0/0000:af:00.0", 1);
    root.nic(
        "mlx5_3",
        Some("pci0000:c9/0000:c9:00.0/0000:ca:00.0"),
        1,
        ACTIVE,
    );
    root.nic("rxe0", None, -1, ACTIVE);
    root
}

#[test]
fn sysfs_is_read_through_the_kernels_links() {
    let root = host();
    let nics = read_nics(&root.0);
    let names: Vec<&str> = nics.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3", "rxe0"]);
    assert_eq!(
        nics[0].pci_path,
        [
            "pci0000:17",
            "0000:17:00.0",
            "0000:18:00.0",
            "0000:19:01.0",
            "0000:1b:00.0"
        ]
    );
    assert_eq!((nics[0].numa, nics[3].numa), (Some(0), Some(1)));
    assert_eq!(nics[0].active_ports, [1]);
    // Soft-RoCE: no PCI function, no NUMA node.
    assert!(nics[4].pci_path.is_empty());
    assert_eq!(nics[4].numa, None);
    let gpu = read_gpu(&root.0, "0000:1A:00.0").unwrap();
    assert_eq!(gpu.bus_id, "0000:1a:00.0");
    assert_eq!(gpu.pci_path.len(), 5);
    assert_eq!(read_gpu(&root.0, "0000:99:00.0"), None);
}

#[test]
fn the_nic_behind_the_gpus_switch_is_chosen_over_nearer_numa_ones() {
    let root = host();
    let choice = root.choose("0000:1a:00.0");
    assert_eq!(choice.devices, ["mlx5_0"]);
    assert_eq!(
        choice.reason,
        "nearest GPU 0000:1a:00.0: mlx5_0 (same PCIe switch); farther: \
         mlx5_1 (same PCIe host bridge), mlx5_2 (same NUMA node 0), \
         mlx5_3 (other NUMA node or PCI hierarchy), rxe0 (other NUMA node or PCI hierarchy)"
    );
}

#[test]
fn a_nic_whose_ports_are_down_gives_way_to_the_next_nearest() {
    let root = host();
    root.set_state("mlx5_0", DOWN);
    let choice = root.choose("0000:1a:00.0");
    assert_eq!(choice.devices, ["mlx5_1"]);
    assert!(choice.reason.contains("mlx5_1 (same PCIe host bridge)"));
    assert!(choice.reason.ends_with("; no active port: mlx5_0"));
    root.set_state("mlx5_1", DOWN);
    assert_eq!(root.choose("0000:1a:00.0").devices, ["mlx5_2"]);
}

#[test]
fn every_nic_of_the_gpus_numa_node_is_chosen_when_none_shares_its_pci_hierarchy() {
    let root = host();
    // A GPU on host bridge pci0000:ae, NUMA node 1: mlx5_3 is on node 1 too.
    assert_eq!(root.choose("0000:af:00.0").devices, ["mlx5_3"]);
    // A GPU alone on its host bridge on node 0: the three node-0 NICs are equally near.
    root.pci("pci0000:5d/0000:5d:00.0/0000:5e:00.0", 0);
    let choice = root.choose("0000:5e:00.0");
    assert_eq!(choice.devices, ["mlx5_0", "mlx5_1", "mlx5_2"]);
    assert!(choice
        .reason
        .contains("mlx5_2 (same NUMA node 0); farther: mlx5_3"));
}

#[test]
fn with_no_locality_known_every_active_nic_is_as_far() {
    let root = host();
    // No NUMA information (single-socket hosts report -1) and a hierarchy of its own.
    root.pci("pci0000:80/0000:80:00.0/0000:81:00.0", -1);
    let choice = root.choose("0000:81:00.0");
    assert_eq!(
        choice.devices,
        ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3", "rxe0"]
    );
    // No device with an active port: no choice.
    for name in ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3", "rxe0"] {
        root.set_state(name, DOWN);
    }
    let gpu = read_gpu(&root.0, "0000:81:00.0").unwrap();
    assert_eq!(nearest(&gpu, &read_nics(&root.0)), None);
}

#[test]
fn the_longest_shared_pci_path_wins() {
    let gpu = GpuFacts {
        bus_id: "0000:1a:00.0".into(),
        pci_path: [
            "pci0000:17",
            "0000:17:00.0",
            "0000:18:00.0",
            "0000:19:00.0",
            "0000:1a:00.0",
        ]
        .map(String::from)
        .to_vec(),
        numa: Some(0),
    };
    let nic = |name: &str, path: &[&str]| NicFacts {
        name: name.into(),
        pci_path: path.iter().map(|p| p.to_string()).collect(),
        numa: Some(0),
        active_ports: vec![1],
    };
    // Two switch levels: mlx5_9 shares the lower one with the GPU, mlx5_8 only the upper.
    let nics = [
        nic("mlx5_8", &["pci0000:17", "0000:17:00.0", "0000:20:00.0"]),
        nic(
            "mlx5_9",
            &[
                "pci0000:17",
                "0000:17:00.0",
                "0000:18:00.0",
                "0000:19:04.0",
                "0000:21:00.0",
            ],
        ),
    ];
    assert_eq!(nearness(&gpu, &nics[0]), Nearness::Pci(2));
    assert_eq!(nearness(&gpu, &nics[1]), Nearness::Pci(3));
    assert_eq!(nearest(&gpu, &nics).unwrap().devices, ["mlx5_9"]);
}

#[test]
fn bus_ids_are_spelled_as_sysfs_does() {
    assert_eq!(sysfs_bus_id("0000:1A:00.0"), "0000:1a:00.0");
    assert_eq!(sysfs_bus_id("00000000:3B:00.0"), "0000:3b:00.0");
    assert_eq!(sysfs_bus_id(" 0001:c9:00.1\n"), "0001:c9:00.1");
}
