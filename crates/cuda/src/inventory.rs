//! What the driver says about one GPU, for `kvtransfer doctor`: name, UUID, PCI bus id,
//! memory and dma-buf support ([`Gpu::report`]). The identity calls are `sharing.rs`'s;
//! only `cuDeviceTotalMem` is resolved here, when asked (a report is rare), so a driver that
//! lacks it only loses that line of the report.

use crate::context::Gpu;
use crate::error::CudaError;
use crate::library::Cuda;
use crate::sys::{CUdevice, CUresult};

/// One GPU as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceReport {
    pub ordinal: u32,
    /// `cuDeviceGetName`, e.g. `NVIDIA H200`.
    pub name: String,
    /// `cuDeviceGetUuid` as `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (as nvidia-smi).
    pub uuid: String,
    /// `cuDeviceGetPCIBusId`, e.g. `0000:19:00.0`.
    pub pci_bus_id: String,
    /// `cuDeviceTotalMem`, bytes.
    pub total_memory: u64,
    /// `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED` and the export entry point are present.
    pub dmabuf: bool,
}

type DeviceTotalMemFn = unsafe extern "C" fn(*mut usize, CUdevice) -> CUresult;

/// A GPU UUID as `nvidia-smi` prints it: `GPU-` and the 16 bytes in the 8-4-4-4-12
/// grouping.
pub fn uuid_text(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

impl Cuda {
    /// `cuDeviceTotalMem_v2`, resolved when asked.
    fn device_total_mem(&self) -> Result<DeviceTotalMemFn, CudaError> {
        // SAFETY: the signature of cuDeviceTotalMem_v2 (cuda.h); the library stays loaded
        // for the process (`Api::_lib`).
        unsafe {
            self.api
                ._lib
                .get::<DeviceTotalMemFn>(b"cuDeviceTotalMem_v2\0")
        }
        .map(|f| *f)
        .map_err(|_| CudaError::other("cuDeviceTotalMem_v2", "the driver lacks this entry point"))
    }
}

impl Gpu {
    /// `cuDeviceTotalMem`: the GPU's memory in bytes.
    pub fn total_memory(&self) -> Result<u64, CudaError> {
        let total_mem = self.cuda.device_total_mem()?;
        let mut bytes: usize = 0;
        // SAFETY: valid out-pointer and device handle.
        self.cuda.check("cuDeviceTotalMem", unsafe {
            total_mem(&mut bytes, self.device)
        })?;
        Ok(bytes as u64)
    }

    /// Name, UUID, PCI bus id, memory and dma-buf support of this GPU.
    pub fn report(&self) -> Result<DeviceReport, CudaError> {
        Ok(DeviceReport {
            ordinal: self.ordinal(),
            name: self.name()?,
            uuid: uuid_text(&self.uuid()?),
            pci_bus_id: self.pci_bus_id()?,
            total_memory: self.total_memory()?,
            dmabuf: self.dmabuf_supported(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_spelled_as_nvidia_smi_does() {
        let bytes = [
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ];
        assert_eq!(
            uuid_text(&bytes),
            "GPU-12345678-9abc-def0-0123-456789abcdef"
        );
    }
}
