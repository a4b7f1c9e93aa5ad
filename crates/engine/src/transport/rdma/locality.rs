//! Which RDMA devices a communicator with GPU regions writes over when none are named: the
//! ones nearest its GPU. Nearness is read from sysfs ([`read_nics`], [`read_gpu`]: thin
//! readers under a root path) and ranked by a pure function ([`nearest`]): the longest
//! common PCI path (a shared PCIe switch, then a shared host bridge) before the same NUMA
//! node before the rest. Only devices with an active port take part.

use std::cmp::Reverse;
use std::path::{Path, PathBuf};

/// What sysfs says of one RDMA device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NicFacts {
    /// The device's name (`mlx5_0`).
    pub name: String,
    /// Its PCI path from the host bridge down (`pci0000:17`, `0000:17:00.0`, ...,
    /// its own function last); empty when it has no PCI function (Soft-RoCE).
    pub pci_path: Vec<String>,
    /// Its NUMA node; `None` when sysfs says -1 or nothing.
    pub numa: Option<u32>,
    /// Its ports whose state is ACTIVE.
    pub active_ports: Vec<u8>,
}

/// What sysfs says of the GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GpuFacts {
    /// Its PCI bus id as sysfs spells it (`0000:19:00.0`).
    pub bus_id: String,
    /// Its PCI path, as [`NicFacts::pci_path`].
    pub pci_path: Vec<String>,
    /// Its NUMA node.
    pub numa: Option<u32>,
}

/// How near one device is to the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nearness {
    /// They share this many PCI path components: 1 is the host bridge, 2 or more a root
    /// port and the switch below it.
    Pci(usize),
    /// Different PCI hierarchies on the same NUMA node.
    Numa(u32),
    /// Neither.
    Far,
}

impl Nearness {
    /// Smaller is nearer.
    fn key(self) -> (u8, Reverse<usize>) {
        match self {
            Nearness::Pci(shared) => (0, Reverse(shared)),
            Nearness::Numa(_) => (1, Reverse(0)),
            Nearness::Far => (2, Reverse(0)),
        }
    }

    fn describe(self) -> String {
        match self {
            Nearness::Pci(shared) if shared >= 2 => "same PCIe switch".into(),
            Nearness::Pci(_) => "same PCIe host bridge".into(),
            Nearness::Numa(node) => format!("same NUMA node {node}"),
            Nearness::Far => "other NUMA node or PCI hierarchy".into(),
        }
    }
}

/// The devices chosen and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NicChoice {
    /// The nearest devices with an active port, in name order.
    pub devices: Vec<String>,
    /// One sentence: the GPU, the chosen devices and their nearness, the others and theirs.
    pub reason: String,
}

/// How near `nic` is to `gpu`.
pub(crate) fn nearness(gpu: &GpuFacts, nic: &NicFacts) -> Nearness {
    let shared = gpu
        .pci_path
        .iter()
        .zip(&nic.pci_path)
        .take_while(|(a, b)| a == b)
        .count();
    match (shared, gpu.numa, nic.numa) {
        (1.., _, _) => Nearness::Pci(shared),
        (0, Some(a), Some(b)) if a == b => Nearness::Numa(a),
        _ => Nearness::Far,
    }
}

/// The devices nearest `gpu` among those with an active port (every one equally near
/// is chosen); `None` when no device has an active port.
pub(crate) fn nearest(gpu: &GpuFacts, nics: &[NicFacts]) -> Option<NicChoice> {
    let mut ranked: Vec<(&NicFacts, Nearness)> = nics
        .iter()
        .filter(|n| !n.active_ports.is_empty())
        .map(|n| (n, nearness(gpu, n)))
        .collect();
    ranked.sort_by(|a, b| (a.1.key(), &a.0.name).cmp(&(b.1.key(), &b.0.name)));
    let best = ranked.first()?.1.key();
    let (chosen, others): (Vec<_>, Vec<_>) = ranked.iter().partition(|(_, n)| n.key() == best);
    let list = |items: &[&(&NicFacts, Nearness)]| {
        items
            .iter()
            .map(|(n, near)| format!("{} ({})", n.name, near.describe()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut reason = format!("nearest GPU {}: {}", gpu.bus_id, list(&chosen));
    if !others.is_empty() {
        reason.push_str(&format!("; farther: {}", list(&others)));
    }
    let inactive: Vec<&str> = nics
        .iter()
        .filter(|n| n.active_ports.is_empty())
        .map(|n| n.name.as_str())
        .collect();
    if !inactive.is_empty() {
        reason.push_str(&format!("; no active port: {}", inactive.join(", ")));
    }
    Some(NicChoice {
        devices: chosen.iter().map(|(n, _)| n.name.clone()).collect(),
        reason,
    })
}

/// A PCI bus id as sysfs spells it: lower case, a 4-digit domain (`cuDeviceGetPCIBusId`
/// may give upper case; nvidia-smi gives an 8-digit domain).
pub(crate) fn sysfs_bus_id(bus_id: &str) -> String {
    let id = bus_id.trim().to_ascii_lowercase();
    match id.split_once(':') {
        Some((domain, rest)) if domain.len() > 4 => {
            format!("{}:{rest}", &domain[domain.len() - 4..])
        }
        _ => id,
    }
}

/// The PCI path of a sysfs device directory: its resolved path from the first `pciDDDD:BB`
/// component on; empty when it does not resolve or lies under no PCI host bridge.
fn pci_path(dir: &Path) -> Vec<String> {
    let Ok(resolved) = std::fs::canonicalize(dir) else {
        return Vec::new();
    };
    let parts: Vec<String> = resolved
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    match parts
        .iter()
        .position(|p| p.starts_with("pci") && p.contains(':'))
    {
        Some(at) => parts[at..].to_vec(),
        None => Vec::new(),
    }
}

fn numa_node(dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join("numa_node")).ok()?;
    u32::try_from(text.trim().parse::<i64>().ok()?).ok()
}

fn sorted_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Every RDMA device under `root`/sys/class/infiniband, with its PCI path, NUMA node and
/// active ports (a port's `state` reads `4: ACTIVE`).
pub(crate) fn read_nics(root: &Path) -> Vec<NicFacts> {
    let class: PathBuf = root.join("sys/class/infiniband");
    sorted_entries(&class)
        .into_iter()
        .map(|name| {
            let dir = class.join(&name);
            let device = dir.join("device");
            let ports = dir.join("ports");
            let mut active_ports: Vec<u8> = sorted_entries(&ports)
                .into_iter()
                .filter(|port| {
                    std::fs::read_to_string(ports.join(port).join("state"))
                        .is_ok_and(|s| s.contains("ACTIVE"))
                })
                .filter_map(|port| port.parse().ok())
                .collect();
            active_ports.sort_unstable();
            NicFacts {
                pci_path: pci_path(&device),
                numa: numa_node(&device),
                active_ports,
                name,
            }
        })
        .collect()
}

/// The GPU at `bus_id` under `root`/sys/bus/pci/devices; `None` when sysfs lacks it.
pub(crate) fn read_gpu(root: &Path, bus_id: &str) -> Option<GpuFacts> {
    let bus_id = sysfs_bus_id(bus_id);
    let dir = root.join("sys/bus/pci/devices").join(&bus_id);
    let path = pci_path(&dir);
    if path.is_empty() {
        return None;
    }
    Some(GpuFacts {
        numa: numa_node(&dir),
        pci_path: path,
        bus_id,
    })
}

/// What the automatic choice says when the GPU's locality cannot be read.
pub(crate) fn unknown_locality(why: &str) -> String {
    format!("every active port: the GPU's locality is unknown ({why})")
}

/// The automatic choice for GPU regions on CUDA device `ordinal`, as one sentence (what
/// `kvtransfer doctor` shows; the transport opened over host memory cannot say it).
pub(crate) fn explain_for_gpu(ordinal: u32) -> String {
    match nearest_to_gpu(ordinal) {
        Ok(choice) => choice.reason,
        Err(why) => unknown_locality(&why),
    }
}

/// The devices nearest CUDA device `ordinal` on this host, or why there is no such choice.
pub(crate) fn nearest_to_gpu(ordinal: u32) -> Result<NicChoice, String> {
    let cuda = kvtransfer_cuda::Cuda::get().map_err(|e| format!("no CUDA driver ({e})"))?;
    let bus_id = cuda
        .gpu(ordinal)
        .and_then(|gpu| gpu.pci_bus_id())
        .map_err(|e| format!("GPU {ordinal}'s PCI bus id is unknown ({e})"))?;
    let root = Path::new("/");
    let gpu = read_gpu(root, &bus_id)
        .ok_or_else(|| format!("GPU {bus_id} is not in /sys/bus/pci/devices"))?;
    nearest(&gpu, &read_nics(root))
        .ok_or_else(|| "no RDMA device in /sys/class/infiniband has an active port".into())
}

#[cfg(test)]
mod tests;
