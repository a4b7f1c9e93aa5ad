//! Swapping the memory under an imported host region, at the same address: a worker that
//! restarts shares a new object, and the region table (which every transport thread
//! reads) keeps its addresses. The new pages replace the old with one `mmap(MAP_FIXED)`,
//! atomically for every thread: a store before it lands in the old pages, a store after
//! it in the new ones. While no worker owns the region, it is parked on private anonymous
//! pages, so nothing can land in the memory of a worker that is gone. cuMem (VMM) GPU
//! imports swap what is mapped under their reserved range instead (`device_swap.rs`);
//! legacy CUDA IPC imports cannot (the driver maps a handle where it chooses).

use super::{ImportSource, ImportSpec, ImportedMemory};
use crate::error::{Error, Result};
use std::os::fd::AsRawFd;

/// The page-aligned range a host import's mapping covers.
#[derive(Clone, Copy, Debug)]
pub(super) struct HostPages {
    /// Where the mapping starts (the region's address less `slack`).
    pub base: u64,
    /// Its length, from `base`.
    pub len: usize,
    /// The region's offset in its shared object, modulo the page size.
    pub slack: u64,
}

/// A region's new memory, checked: mapped by [`ImportedMemory::swap`].
pub(crate) enum CheckedSwap {
    Host(HostSwap),
    Device(super::device_swap::DeviceSwap),
}

/// A host region's new descriptor, checked.
pub(crate) struct HostSwap {
    name: &'static str,
    index: usize,
    file: std::fs::File,
    file_offset: libc::off_t,
}

/// The system's page size.
pub(super) fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).unwrap_or(4096).max(1)
}

impl ImportedMemory {
    /// The pages of a host import; `Unsupported` for a legacy CUDA IPC import (the driver
    /// maps a handle at an address of its choosing, so it cannot be swapped in place).
    fn host_pages(&self, name: &'static str, index: usize) -> Result<HostPages> {
        self.host_pages
            .ok_or_else(|| ipc_refusal(&format!("{name} region {index}")))
    }

    /// Checks `spec` as this region's new memory without mapping anything: a host
    /// descriptor (same length, same offset within its page, inside its object), or cuMem
    /// descriptors for a cuMem import (`device_swap.rs`).
    pub(crate) fn check_swap(
        &self,
        name: &'static str,
        index: usize,
        spec: ImportSpec,
    ) -> Result<CheckedSwap> {
        if let Some(vmm) = &self.vmm {
            return vmm
                .check_swap(name, index, self.bytes, spec)
                .map(CheckedSwap::Device);
        }
        let pages = self.host_pages(name, index)?;
        let ImportSource::HostFd(fd) = spec.source else {
            return Err(Error::invalid(
                name,
                format!("region {index}: the attached region is host memory; a re-attach must share it as a host-memory descriptor (fd) too"),
            ));
        };
        if spec.bytes != self.bytes {
            return Err(Error::invalid(
                name,
                format!(
                    "region {index}: bytes {} given; the attached region has {} (a re-attach keeps every region's size)",
                    spec.bytes, self.bytes
                ),
            ));
        }
        let page = page_size();
        if spec.offset % page != pages.slack {
            return Err(Error::invalid(
                name,
                format!(
                    "region {index}: offset {} is {} bytes into its page; the attached region's was {} (a re-attach keeps each region's offset within its {page}-byte page)",
                    spec.offset,
                    spec.offset % page,
                    pages.slack
                ),
            ));
        }
        let end = spec.offset.saturating_add(spec.bytes);
        let file = std::fs::File::from(fd);
        let size = super::shared_file_size(&file, name, index)?;
        if end > size {
            return Err(Error::invalid(
                name,
                format!(
                    "region {index}: offset {} + bytes {} = {end} passes the end of the shared file ({size} bytes)",
                    spec.offset, spec.bytes
                ),
            ));
        }
        let file_offset = libc::off_t::try_from(spec.offset - pages.slack).map_err(|_| {
            Error::invalid(
                name,
                format!("region {index}: offset {} is too large", spec.offset),
            )
        })?;
        Ok(CheckedSwap::Host(HostSwap {
            name,
            index,
            file,
            file_offset,
        }))
    }

    /// Maps a checked swap under this region, at the same address.
    pub(crate) fn swap(&self, checked: CheckedSwap) -> Result<()> {
        let checked = match (checked, &self.vmm) {
            (CheckedSwap::Device(checked), Some(vmm)) => return vmm.swap(checked),
            (CheckedSwap::Host(checked), None) => checked,
            (CheckedSwap::Device(checked), None) => {
                return Err(Error::invalid(checked.name(), "not a GPU region"))
            }
            (CheckedSwap::Host(checked), Some(_)) => {
                return Err(Error::invalid(checked.name, "not a host region"))
            }
        };
        let Some(pages) = self.host_pages else {
            return Err(Error::invalid(checked.name, "not a host region"));
        };
        // SAFETY: `base..base + len` is exactly the range this import mapped (and still
        // owns: its `Keep` unmaps it on drop), so MAP_FIXED replaces only our own pages;
        // the engine moves bytes through it by address and never holds references into it.
        let mapped = unsafe {
            libc::mmap(
                pages.base as *mut libc::c_void,
                pages.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                checked.file.as_raw_fd(),
                checked.file_offset,
            )
        };
        if mapped == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            // The old pages may be gone already: never leave the range unmapped.
            self.park()?;
            return Err(Error::invalid(
                checked.name,
                format!(
                    "region {}: the descriptor cannot be mapped shared read-write ({e}); the region stays parked",
                    checked.index
                ),
            ));
        }
        Ok(())
    }

    /// Replaces this host region's pages with private anonymous ones (zeros), at the same
    /// address: the owner's memory is released, and a late store lands nowhere it could
    /// be seen. A cuMem import maps one filler granule all over its range instead; a legacy
    /// CUDA IPC import is left as it is (`Unsupported`).
    pub(crate) fn park(&self) -> Result<()> {
        if let Some(vmm) = &self.vmm {
            return vmm.park();
        }
        let Some(pages) = self.host_pages else {
            return Err(ipc_refusal("a region"));
        };
        // SAFETY: as in `swap`: our own mapping's exact range, replaced in place.
        let mapped = unsafe {
            libc::mmap(
                pages.base as *mut libc::c_void,
                pages.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(Error::Internal {
                what: format!(
                    "parking an imported region: {}",
                    std::io::Error::last_os_error()
                ),
            });
        }
        Ok(())
    }
}

/// Why a region imported from a legacy CUDA IPC handle (`what`) cannot be parked or
/// swapped, and what to do instead.
pub(crate) fn ipc_refusal(what: &str) -> Error {
    Error::Unsupported {
        what: "a warm re-attach",
        reason: format!(
            "for {what}: it was shared as a legacy CUDA IPC handle, which the driver maps only at an address of its choosing, so its memory cannot be swapped in place; share the cache as cuMem descriptors (cudaVmmFds; PyTorch: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True) or attach anew"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::ipc_refusal;

    #[test]
    fn a_legacy_ipc_region_is_refused_saying_why_and_what_to_do() {
        let error = ipc_refusal("localKeyCache region 3");
        assert_eq!(error.code(), "ERR_UNSUPPORTED");
        let text = error.to_string();
        for needle in [
            "localKeyCache region 3",
            "legacy CUDA IPC handle",
            "an address of its choosing",
            "cudaVmmFds",
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
            "attach anew",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
    }
}
