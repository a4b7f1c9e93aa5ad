//! What the CUDA driver says about this host's GPUs, for `kvtransfer doctor`: the driver
//! version, every GPU (name, UUID, PCI bus id, memory, dma-buf export) and the peer-access
//! matrix. Each GPU's primary context is retained while it is described; no memory is
//! allocated.

use kvtransfer_cuda::{Cuda, DeviceReport};

/// The GPUs of this host as the driver reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInventory {
    /// `no CUDA driver: ...` when libcuda is missing or unusable, `no GPUs` when it sees
    /// none, or the driver call that failed.
    pub error: Option<String>,
    /// `cuDriverGetVersion` as `major.minor` (e.g. `12.4`).
    pub driver_version: Option<String>,
    /// One report per GPU, in driver ordinal order.
    pub gpus: Vec<DeviceReport>,
    /// `peer_access[a][b]`: GPU `a` can access GPU `b`'s memory (`cuDeviceCanAccessPeer`;
    /// the diagonal is true: a GPU reaches its own memory).
    pub peer_access: Vec<Vec<bool>>,
}

/// Asks the driver (loaded at run time; absent → said so).
pub fn inventory() -> GpuInventory {
    let mut report = GpuInventory {
        error: None,
        driver_version: None,
        gpus: Vec::new(),
        peer_access: Vec::new(),
    };
    let cuda = match Cuda::get() {
        Ok(cuda) => cuda,
        Err(e) => {
            report.error = Some(format!("no CUDA driver: {e}"));
            return report;
        }
    };
    if let Err(e) = describe(cuda, &mut report) {
        report.error = Some(e.to_string());
    } else if report.gpus.is_empty() {
        report.error = Some("no GPUs".into());
    }
    report
}

fn describe(
    cuda: &'static Cuda,
    report: &mut GpuInventory,
) -> Result<(), kvtransfer_cuda::CudaError> {
    let version = cuda.driver_version()?;
    report.driver_version = Some(format!("{}.{}", version / 1000, version % 1000 / 10));
    // Each GPU's primary context is retained while it is described (as a communicator's).
    let gpus = (0..cuda.device_count()?)
        .map(|ordinal| cuda.gpu(ordinal))
        .collect::<Result<Vec<_>, _>>()?;
    for gpu in &gpus {
        report.gpus.push(gpu.report()?);
    }
    for a in &gpus {
        let row = gpus
            .iter()
            .map(|b| a.can_access_peer(b))
            .collect::<Result<Vec<bool>, _>>()?;
        report.peer_access.push(row);
    }
    Ok(())
}
