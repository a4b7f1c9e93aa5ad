//! `nativeDoctor()`: the engine's report of what this host can do (`kvtransfer doctor`),
//! converted field by field into plain JS objects. Nothing is probed here.

use kvtransfer_engine::{host_report, GpuReport, RdmaDeviceReport, TransportReport};
use napi::bindgen_prelude::Result;
use napi_derive::napi;
use std::collections::HashMap;

#[napi(object)]
pub struct NativeDoctorGid {
    pub index: u32,
    /// `RoCE v2`, `RoCE v1`, `IB` or `unknown`.
    pub kind: String,
    pub address: String,
}

#[napi(object)]
pub struct NativeDoctorPort {
    pub port: u32,
    pub state: String,
    pub link_layer: String,
    /// Bytes (0: unknown).
    pub active_mtu: u32,
    pub lid: u32,
    pub gids: Vec<NativeDoctorGid>,
}

#[napi(object)]
pub struct NativeDoctorRdmaDevice {
    pub name: String,
    pub software: bool,
    pub pcie_relaxed_ordering: Option<bool>,
    pub ports: Vec<NativeDoctorPort>,
    pub error: Option<String>,
}

#[napi(object)]
pub struct NativeDoctorRdma {
    pub error: Option<String>,
    pub devices: Vec<NativeDoctorRdmaDevice>,
    pub dmabuf_registration: bool,
    pub relaxed_ordering_flag: bool,
    pub peermem_module: Option<String>,
    /// The devices GPU regions on gpuIdx get when none are named, and why.
    pub gpu_nics: String,
}

#[napi(object)]
pub struct NativeDoctorGpu {
    pub ordinal: u32,
    pub name: String,
    pub uuid: String,
    pub pci_bus_id: String,
    /// Bytes.
    pub total_memory: f64,
    pub dmabuf: bool,
}

#[napi(object)]
pub struct NativeDoctorGpus {
    pub error: Option<String>,
    pub driver_version: Option<String>,
    pub gpus: Vec<NativeDoctorGpu>,
    pub peer_access: Vec<Vec<bool>>,
}

#[napi(object)]
pub struct NativeDoctorVariable {
    pub name: String,
    pub value: String,
    pub meaning: String,
    pub known: bool,
    pub error: Option<String>,
}

#[napi(object)]
pub struct NativeDoctorTransport {
    pub name: String,
    pub usable: bool,
    pub reason: String,
    pub details: HashMap<String, String>,
}

#[napi(object)]
pub struct NativeDoctorReport {
    pub gpu_idx: u32,
    pub variables: Vec<NativeDoctorVariable>,
    pub settings_error: Option<String>,
    pub rdma: NativeDoctorRdma,
    pub gpus: NativeDoctorGpus,
    pub transports: Vec<NativeDoctorTransport>,
}

fn rdma_device(d: RdmaDeviceReport) -> NativeDoctorRdmaDevice {
    NativeDoctorRdmaDevice {
        name: d.name,
        software: d.software,
        pcie_relaxed_ordering: d.pcie_relaxed_ordering,
        ports: d
            .ports
            .into_iter()
            .map(|p| NativeDoctorPort {
                port: p.port.into(),
                state: p.state.into(),
                link_layer: p.link_layer.into(),
                active_mtu: p.active_mtu,
                lid: p.lid.into(),
                gids: p
                    .gids
                    .into_iter()
                    .map(|g| NativeDoctorGid {
                        index: g.index.into(),
                        kind: g.kind.into(),
                        address: g.address,
                    })
                    .collect(),
            })
            .collect(),
        error: d.error,
    }
}

fn gpu(g: GpuReport) -> NativeDoctorGpu {
    NativeDoctorGpu {
        ordinal: g.ordinal,
        name: g.name,
        uuid: g.uuid,
        pci_bus_id: g.pci_bus_id,
        total_memory: g.total_memory as f64,
        dmabuf: g.dmabuf,
    }
}

fn transport(t: TransportReport) -> NativeDoctorTransport {
    NativeDoctorTransport {
        name: t.transport.name().into(),
        usable: t.usable,
        reason: t.reason,
        details: t
            .details
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    }
}

/// What this host can do for a communicator with `gpuIdx` (default 0): RDMA devices, GPUs,
/// `KVCACHE_*` variables, and whether each transport can be used (each is opened and closed
/// again, as a communicator would).
#[napi]
pub fn native_doctor(gpu_idx: Option<f64>) -> Result<NativeDoctorReport, crate::Code> {
    let gpu_idx = gpu_idx
        .map(|idx| crate::whole_number("gpuIdx", idx))
        .transpose()?;
    let report = host_report(gpu_idx.unwrap_or(0));
    Ok(NativeDoctorReport {
        gpu_idx: report.gpu_idx,
        variables: report
            .variables
            .into_iter()
            .map(|v| NativeDoctorVariable {
                name: v.name,
                value: v.value,
                meaning: v.meaning.into(),
                known: v.known,
                error: v.error,
            })
            .collect(),
        settings_error: report.settings_error,
        rdma: NativeDoctorRdma {
            error: report.rdma.error,
            devices: report.rdma.devices.into_iter().map(rdma_device).collect(),
            dmabuf_registration: report.rdma.dmabuf_registration,
            relaxed_ordering_flag: report.rdma.relaxed_ordering_flag,
            peermem_module: report.rdma.peermem_module.map(String::from),
            gpu_nics: report.rdma.gpu_nics,
        },
        gpus: NativeDoctorGpus {
            error: report.gpus.error,
            driver_version: report.gpus.driver_version,
            gpus: report.gpus.gpus.into_iter().map(gpu).collect(),
            peer_access: report.gpus.peer_access,
        },
        transports: report.transports.into_iter().map(transport).collect(),
    })
}
