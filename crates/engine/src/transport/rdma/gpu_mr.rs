//! RDMA registration of the cache regions, GPU memory included.
//!
//! Host regions: `ibv_reg_mr`, as always. Device regions (see `gpu::detect_region_memory`):
//! 1. dma-buf: `cuMemGetHandleForAddressRange` exports the page-aligned range around the
//!    region as a dma-buf fd, and `ibv_reg_dmabuf_mr` registers the region inside it with
//!    `iova` = the device address (so peers address it exactly like a host region);
//! 2. else plain `ibv_reg_mr` on the device address, which works where the nvidia-peermem
//!    kernel module is loaded;
//! 3. else a typed error naming both attempts and why each failed.
//!
//! The decision is written against the [`Registrar`] trait so that it can be tested without
//! a GPU or an RDMA device (no machine here has both).

use crate::error::{Error, Result};
use crate::layout::{MemoryKind, Region, RegionTable};
use kvtransfer_cuda::Cuda;
use kvtransfer_verbs::{Access, MemoryRegion, ProtectionDomain};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// Host page size assumed for dma-buf ranges (`cuMemGetHandleForAddressRange` wants the
/// address and size aligned to it).
const PAGE: u64 = 4096;

/// The registration calls the decision needs.
pub trait Registrar {
    type Mr;
    /// `ibv_reg_mr` of `len` bytes at `addr`.
    fn register(&self, addr: u64, len: u64) -> std::result::Result<Self::Mr, String>;
    /// A dma-buf for the device range `start..start+len` (page-aligned).
    fn export_dmabuf(&self, start: u64, len: u64) -> std::result::Result<OwnedFd, String>;
    /// `ibv_reg_dmabuf_mr` of `len` bytes at `offset` of `fd`, addressed as `iova`.
    fn register_dmabuf(
        &self,
        fd: &OwnedFd,
        offset: u64,
        len: u64,
        iova: u64,
    ) -> std::result::Result<Self::Mr, String>;
}

/// How a device region was registered (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Host,
    Dmabuf,
    PeerMem,
}

/// Registers region `index` of kind `kind` with `registrar`, trying dma-buf, then peermem
/// for device memory.
pub fn register_region<R: Registrar>(
    registrar: &R,
    index: usize,
    region: Region,
    kind: MemoryKind,
) -> Result<(R::Mr, Method)> {
    let MemoryKind::Device { ordinal } = kind else {
        return registrar
            .register(region.addr, region.len)
            .map(|mr| (mr, Method::Host))
            .map_err(|e| Error::Rdma {
                op: "ibv_reg_mr",
                reason: format!(
                    "region {index} ({} bytes at {:#x}): {e}",
                    region.len, region.addr
                ),
            });
    };
    let start = region.addr / PAGE * PAGE;
    let end = (region.addr + region.len).div_ceil(PAGE) * PAGE;
    let dmabuf = registrar
        .export_dmabuf(start, end - start)
        .map_err(|e| format!("export: {e}"))
        .and_then(|fd| {
            registrar
                .register_dmabuf(&fd, region.addr - start, region.len, region.addr)
                .map_err(|e| format!("ibv_reg_dmabuf_mr: {e}"))
        });
    let dmabuf_error = match dmabuf {
        Ok(mr) => return Ok((mr, Method::Dmabuf)),
        Err(e) => e,
    };
    match registrar.register(region.addr, region.len) {
        Ok(mr) => {
            crate::log::debug!(
                "rdma: region {index} (GPU {ordinal}) registered through nvidia-peermem; dma-buf was not usable ({dmabuf_error})"
            );
            Ok((mr, Method::PeerMem))
        }
        Err(peermem_error) => Err(Error::Rdma {
            op: "register GPU memory",
            reason: format!(
                "region {index} ({} bytes of GPU {ordinal} memory at {:#x}) could not be registered: dma-buf ({dmabuf_error}); ibv_reg_mr through nvidia-peermem ({peermem_error})",
                region.len, region.addr
            ),
        }),
    }
}

/// The real registrar: verbs on `pd`, CUDA for the dma-buf export.
pub struct VerbsRegistrar<'a> {
    pub pd: &'a Arc<ProtectionDomain>,
    pub access: Access,
    pub gpu_idx: Option<u32>,
}

impl Registrar for VerbsRegistrar<'_> {
    type Mr = MemoryRegion;

    fn register(&self, addr: u64, len: u64) -> std::result::Result<MemoryRegion, String> {
        // SAFETY: the engine's contract: every region stays valid until the engine is
        // closed, and the device (with these MRs) is dropped at close.
        unsafe {
            MemoryRegion::register(self.pd, addr as usize as *mut u8, len as usize, self.access)
        }
        .map_err(|e| e.to_string())
    }

    fn export_dmabuf(&self, start: u64, len: u64) -> std::result::Result<OwnedFd, String> {
        let cuda = Cuda::get().map_err(|e| e.to_string())?;
        let gpu = cuda
            .gpu(self.gpu_idx.unwrap_or(0))
            .map_err(|e| e.to_string())?;
        gpu.dmabuf_fd(start, len as usize)
            .map_err(|e| e.to_string())
    }

    fn register_dmabuf(
        &self,
        fd: &OwnedFd,
        offset: u64,
        len: u64,
        iova: u64,
    ) -> std::result::Result<MemoryRegion, String> {
        // SAFETY: the dma-buf covers the region, which stays allocated until the engine is
        // closed (its contract); the registration keeps the exported pages pinned, and the
        // fd may be closed once it exists.
        unsafe {
            MemoryRegion::register_dmabuf(
                self.pd,
                offset,
                len as usize,
                iova,
                fd.as_raw_fd(),
                self.access,
            )
        }
        .map_err(|e| e.to_string())
    }
}

/// Registers every region of `table` on `pd` (the hook of `RdmaDevice::open`).
pub fn register_regions(
    pd: &Arc<ProtectionDomain>,
    table: &RegionTable,
    access: Access,
) -> Result<Vec<MemoryRegion>> {
    let registrar = VerbsRegistrar {
        pd,
        access,
        gpu_idx: table.gpu(),
    };
    let mut mrs = Vec::with_capacity(table.regions().len());
    for (index, region) in table.regions().iter().enumerate() {
        let (mr, method) = register_region(&registrar, index, *region, table.memory(index as u32))?;
        if method == Method::Dmabuf {
            crate::log::debug!("rdma: region {index} (GPU memory) registered through dma-buf");
        }
        mrs.push(mr);
    }
    Ok(mrs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Scripted outcomes; records the calls made.
    struct Fake {
        export: std::result::Result<(), &'static str>,
        dmabuf: std::result::Result<(), &'static str>,
        plain: std::result::Result<(), &'static str>,
        calls: RefCell<Vec<String>>,
    }

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    impl Registrar for Fake {
        type Mr = &'static str;
        fn register(&self, addr: u64, len: u64) -> std::result::Result<&'static str, String> {
            self.calls
                .borrow_mut()
                .push(format!("reg_mr {addr:#x} {len}"));
            self.plain.map(|()| "plain").map_err(str::to_string)
        }
        fn export_dmabuf(&self, start: u64, len: u64) -> std::result::Result<OwnedFd, String> {
            self.calls
                .borrow_mut()
                .push(format!("export {start:#x} {len}"));
            self.export.map(|()| fd()).map_err(str::to_string)
        }
        fn register_dmabuf(
            &self,
            _fd: &OwnedFd,
            offset: u64,
            len: u64,
            iova: u64,
        ) -> std::result::Result<&'static str, String> {
            self.calls
                .borrow_mut()
                .push(format!("reg_dmabuf_mr {offset} {len} {iova:#x}"));
            self.dmabuf.map(|()| "dmabuf").map_err(str::to_string)
        }
    }

    fn fake(
        export: std::result::Result<(), &'static str>,
        dmabuf: std::result::Result<(), &'static str>,
        plain: std::result::Result<(), &'static str>,
    ) -> Fake {
        Fake {
            export,
            dmabuf,
            plain,
            calls: RefCell::default(),
        }
    }

    const REGION: Region = Region {
        addr: 0x7f00_0000_1100,
        len: 8192,
    };
    const DEVICE: MemoryKind = MemoryKind::Device { ordinal: 3 };

    #[test]
    fn host_regions_use_plain_registration_only() {
        let f = fake(Err("x"), Err("x"), Ok(()));
        let (mr, method) = register_region(&f, 0, REGION, MemoryKind::Host).unwrap();
        assert_eq!((mr, method), ("plain", Method::Host));
        assert_eq!(*f.calls.borrow(), vec!["reg_mr 0x7f0000001100 8192"]);
        let f = fake(Ok(()), Ok(()), Err("Bad address"));
        let err = register_region(&f, 2, REGION, MemoryKind::Host).unwrap_err();
        assert_eq!(err.code(), "ERR_RDMA");
        assert!(err
            .to_string()
            .contains("region 2 (8192 bytes at 0x7f0000001100): Bad address"));
    }

    #[test]
    fn device_regions_prefer_dmabuf_with_page_aligned_range_and_iova() {
        let f = fake(Ok(()), Ok(()), Ok(()));
        let (mr, method) = register_region(&f, 0, REGION, DEVICE).unwrap();
        assert_eq!((mr, method), ("dmabuf", Method::Dmabuf));
        // 0x...1100 + 8192 spans pages 0x...1000..0x...4000: offset 0x100 into the dma-buf.
        assert_eq!(
            *f.calls.borrow(),
            vec![
                "export 0x7f0000001000 12288",
                "reg_dmabuf_mr 256 8192 0x7f0000001100"
            ]
        );
    }

    #[test]
    fn device_regions_fall_back_to_peermem() {
        for f in [
            fake(
                Err("cuMemGetHandleForAddressRange failed with CUDA_ERROR_NOT_SUPPORTED (801)"),
                Ok(()),
                Ok(()),
            ),
            fake(Ok(()), Err("Operation not supported"), Ok(())),
        ] {
            let (mr, method) = register_region(&f, 0, REGION, DEVICE).unwrap();
            assert_eq!((mr, method), ("plain", Method::PeerMem));
            assert_eq!(
                f.calls.borrow().last().unwrap(),
                "reg_mr 0x7f0000001100 8192"
            );
        }
    }

    #[test]
    fn device_regions_fail_naming_both_attempts() {
        let f = fake(Ok(()), Err("Operation not supported"), Err("Bad address"));
        let err = register_region(&f, 5, REGION, DEVICE).unwrap_err();
        assert_eq!(err.code(), "ERR_RDMA");
        let text = err.to_string();
        assert!(text.contains("register GPU memory"), "{text}");
        assert!(
            text.contains("region 5 (8192 bytes of GPU 3 memory at 0x7f0000001100)"),
            "{text}"
        );
        assert!(
            text.contains("dma-buf (ibv_reg_dmabuf_mr: Operation not supported)"),
            "{text}"
        );
        assert!(
            text.contains("ibv_reg_mr through nvidia-peermem (Bad address)"),
            "{text}"
        );
        let f = fake(
            Err("libcuda.so.1 lacks cuMemGetHandleForAddressRange"),
            Ok(()),
            Err("Bad address"),
        );
        let text = register_region(&f, 0, REGION, DEVICE)
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("dma-buf (export: libcuda.so.1 lacks"),
            "{text}"
        );
        assert_eq!(
            f.calls.borrow().len(),
            2,
            "no dma-buf registration without an fd"
        );
    }
}
