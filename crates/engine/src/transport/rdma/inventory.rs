//! What this host offers for RDMA, for `kvtransfer doctor`: every device libibverbs lists,
//! its ports (state, link layer, active MTU, LID) and their GID tables (index, type,
//! address), and the means of registering GPU memory (dma-buf, nvidia-peermem) and of
//! asking for PCIe relaxed ordering. Which device, port and GID the engine picks is not
//! decided here: the doctor opens the transport itself and reports its choice, and asks
//! `locality.rs` which devices GPU regions would get.

use kvtransfer_verbs as verbs;

/// One GID table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidReport {
    /// Its index in the port's GID table (what `KVCACHE_RDMA_GID_INDEX` names).
    pub index: u8,
    /// `RoCE v2`, `RoCE v1`, `IB`, or `unknown` (sysfs gives no type).
    pub kind: &'static str,
    /// As an IPv6 address (`::ffff:10.77.0.1` for an IPv4-mapped RoCE GID).
    pub address: String,
}

/// One port of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaPortReport {
    /// The port number (1-based).
    pub port: u8,
    /// `ACTIVE`, `DOWN`, `INIT`, `ARMED`, `ACTIVE_DEFER` or `NOP`.
    pub state: &'static str,
    /// `RoCE` (Ethernet) or `InfiniBand`.
    pub link_layer: &'static str,
    /// Active MTU in bytes (0: unknown).
    pub active_mtu: u32,
    /// The port's LID (InfiniBand addressing; usually 0 on RoCE).
    pub lid: u16,
    /// The non-zero entries of the GID table.
    pub gids: Vec<GidReport>,
}

/// One device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaDeviceReport {
    /// The device's name (e.g. `mlx5_0`), as `KVCACHE_RDMA_NICS` names it.
    pub name: String,
    /// Soft-RoCE or soft-iWARP: the protocol runs on the CPU.
    pub software: bool,
    /// PCIe relaxed ordering enabled on the device's PCI function (its Device Control
    /// register); `None` when it has no PCI function or the register cannot be read.
    pub pcie_relaxed_ordering: Option<bool>,
    /// Its ports, in port order.
    pub ports: Vec<RdmaPortReport>,
    /// Why the device could not be opened or queried (then `ports` is empty).
    pub error: Option<String>,
}

/// Everything the report says about RDMA on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaInventory {
    /// Why libibverbs could not be loaded or asked for its devices.
    pub error: Option<String>,
    /// Every device libibverbs lists, in its order.
    pub devices: Vec<RdmaDeviceReport>,
    /// `ibv_reg_dmabuf_mr` exists (GPU memory registered through dma-buf).
    pub dmabuf_registration: bool,
    /// `ibv_reg_mr_iova2` exists (the relaxed-ordering access flag reaches the device).
    pub relaxed_ordering_flag: bool,
    /// The loaded kernel module that lets `ibv_reg_mr` take GPU memory (`nvidia_peermem`
    /// or the older `nv_peer_mem`), if any.
    pub peermem_module: Option<&'static str>,
    /// The devices a communicator with GPU regions on the report's gpuIdx writes over when
    /// none are named, and why (nearness to the GPU), as one sentence.
    pub gpu_nics: String,
}

fn port_state(state: u32) -> &'static str {
    match state {
        1 => "DOWN",
        2 => "INIT",
        3 => "ARMED",
        4 => "ACTIVE",
        5 => "ACTIVE_DEFER",
        _ => "NOP",
    }
}

/// The Device Control register's "Enable Relaxed Ordering" bit of `device`'s PCI function,
/// from its configuration space in sysfs (the PCI Express capability, ID 0x10).
fn pcie_relaxed_ordering(device: &str) -> Option<bool> {
    let config = std::fs::read(format!("/sys/class/infiniband/{device}/device/config")).ok()?;
    relaxed_ordering_in(&config)
}

/// The bit in a configuration space image (walking the capability list from 0x34).
fn relaxed_ordering_in(config: &[u8]) -> Option<bool> {
    let byte = |at: usize| config.get(at).copied();
    let mut cap = usize::from(byte(0x34)?) & !3;
    // A capability list is at most 48 entries long in the 256-byte header space.
    for _ in 0..48 {
        if cap < 0x40 {
            return None;
        }
        if byte(cap)? == 0x10 {
            let control = u16::from_le_bytes([byte(cap + 8)?, byte(cap + 9)?]);
            return Some(control & (1 << 4) != 0);
        }
        cap = usize::from(byte(cap + 1)?) & !3;
    }
    None
}

fn peermem_module() -> Option<&'static str> {
    ["nvidia_peermem", "nv_peer_mem"]
        .into_iter()
        .find(|name| std::path::Path::new(&format!("/sys/module/{name}")).exists())
}

fn port_report(context: &verbs::Context, port: u8) -> Result<RdmaPortReport, String> {
    let info = context.query_port(port).map_err(|e| e.to_string())?;
    let infiniband = info.link_layer_is_infiniband;
    let entries = info.gid_table_len.min(256);
    let gids = (0..entries)
        .filter_map(|index| {
            let index = index as u8;
            let gid = context.query_gid(port, index).ok()?;
            (gid != [0; 16]).then(|| GidReport {
                index,
                kind: match (infiniband, context.gid_type(port, index)) {
                    (true, _) => "IB",
                    (false, Some(verbs::GidType::RoceV2)) => "RoCE v2",
                    (false, Some(verbs::GidType::IbRoceV1)) => "RoCE v1",
                    (false, None) => "unknown",
                },
                address: std::net::Ipv6Addr::from(gid).to_string(),
            })
        })
        .collect();
    Ok(RdmaPortReport {
        port,
        state: port_state(info.state),
        link_layer: if infiniband { "InfiniBand" } else { "RoCE" },
        active_mtu: verbs::mtu_bytes(info.active_mtu),
        lid: info.lid,
        gids,
    })
}

fn device_report(library: &std::sync::Arc<verbs::Library>, name: String) -> RdmaDeviceReport {
    let mut report = RdmaDeviceReport {
        software: false,
        pcie_relaxed_ordering: pcie_relaxed_ordering(&name),
        ports: Vec::new(),
        error: None,
        name,
    };
    let context = match verbs::Context::open(library, &report.name) {
        Ok(context) => context,
        Err(e) => {
            report.error = Some(e.to_string());
            return report;
        }
    };
    report.software = context.attrs().is_software_provider();
    for port in 1..=context.attrs().phys_port_cnt {
        match port_report(&context, port) {
            Ok(port) => report.ports.push(port),
            Err(e) => {
                report.error = Some(format!("port {port}: {e}"));
                break;
            }
        }
    }
    report
}

/// Lists what libibverbs sees on this host, and the devices GPU regions on `gpu_idx` get.
pub fn inventory(gpu_idx: u32) -> RdmaInventory {
    let mut report = RdmaInventory {
        gpu_nics: super::locality::explain_for_gpu(gpu_idx),
        error: None,
        devices: Vec::new(),
        dmabuf_registration: false,
        relaxed_ordering_flag: false,
        peermem_module: peermem_module(),
    };
    let library = match verbs::Library::load() {
        Ok(library) => library,
        Err(e) => {
            report.error = Some(e.to_string());
            return report;
        }
    };
    report.dmabuf_registration = library.has_dmabuf();
    report.relaxed_ordering_flag = library.has_optional_access();
    match verbs::list_devices(&library) {
        Ok(devices) => {
            report.devices = devices
                .into_iter()
                .map(|d| device_report(&library, d.name))
                .collect();
            if report.devices.is_empty() {
                report.error = Some("no RDMA device found (libibverbs lists none)".into());
            }
        }
        Err(e) => report.error = Some(e.to_string()),
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_states_are_named_as_ibv_devinfo_does() {
        assert_eq!(port_state(4), "ACTIVE");
        assert_eq!(port_state(1), "DOWN");
        assert_eq!(port_state(0), "NOP");
    }

    #[test]
    fn relaxed_ordering_is_read_from_the_pci_express_capability() {
        // Capability list: 0x40 (power management, ID 1) → 0x60 (PCI Express, ID 0x10).
        let mut config = vec![0u8; 256];
        config[0x34] = 0x40;
        config[0x40] = 0x01;
        config[0x41] = 0x60;
        config[0x60] = 0x10;
        config[0x68] = 0b0001_0000;
        assert_eq!(relaxed_ordering_in(&config), Some(true));
        config[0x68] = 0b0000_1111;
        assert_eq!(relaxed_ordering_in(&config), Some(false));
        // No PCI Express capability; a truncated image; a device with no PCI function.
        config[0x60] = 0x05;
        assert_eq!(relaxed_ordering_in(&config), None);
        assert_eq!(relaxed_ordering_in(&config[..0x30]), None);
        assert_eq!(pcie_relaxed_ordering("no-such-device0"), None);
    }
}
