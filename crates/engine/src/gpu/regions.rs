//! Which registered regions are device memory: asked of the CUDA driver once, at
//! registration ([`detect_region_memory`]), and recorded in the region table.

use crate::error::{Error, Result};
use crate::layout::{MemoryKind, RegionTable};
use kvtransfer_cuda::{Cuda, CurrentGuard, Gpu, PointerInfo, ERROR_INVALID_CONTEXT};
use std::sync::Arc;

/// The memory kind of every region of `table`, recorded in the table.
///
/// Without a loadable driver or GPU everything stays host memory (no error). With CUDA,
/// each region address is looked up; `known_host(addr)` skips the lookup for addresses the
/// caller knows are host memory (JavaScript buffers). A device region must lie inside one
/// allocation, and `gpu_idx` must name a GPU when any region is device memory.
pub fn detect_region_memory(
    table: &mut RegionTable,
    gpu_idx: u32,
    known_host: &dyn Fn(u64) -> bool,
) -> Result<()> {
    let regions: Vec<(u64, u64)> = table.regions().iter().map(|r| (r.addr, r.len)).collect();
    if regions.iter().all(|&(addr, _)| known_host(addr)) {
        return Ok(());
    }
    let cuda = match Cuda::get() {
        Ok(cuda) => cuda,
        Err(reason) => {
            crate::log::debug!("cuda: {reason}; every region is host memory");
            return Ok(());
        }
    };
    // Lookups of unified addresses need no current context, so none is created for a
    // host-only table; only if the driver answers CUDA_ERROR_INVALID_CONTEXT is gpuIdx's
    // primary context made current (and the caller's restored afterwards).
    let mut scoped: Option<(CurrentGuard, Arc<Gpu>)> = None;
    let gpu_count = cuda.device_count()?;
    let names = |index: usize| {
        let kinds = table.layout.kinds() as usize;
        let name = table.layout.kind_name((index % kinds) as u32);
        (name, index / kinds)
    };
    let mut kinds = Vec::with_capacity(regions.len());
    for (index, &(addr, len)) in regions.iter().enumerate() {
        if known_host(addr) {
            kinds.push(MemoryKind::Host);
            continue;
        }
        let (name, layer) = names(index);
        let info = match cuda.pointer_info(addr) {
            Err(e) if e.code == ERROR_INVALID_CONTEXT && scoped.is_none() => {
                let gpu = cuda.gpu(gpu_idx)?;
                scoped = Some((gpu.scoped()?, gpu));
                cuda.pointer_info(addr)?
            }
            other => other?,
        };
        match info {
            PointerInfo::Unknown | PointerInfo::HostAccessible { .. } => {
                kinds.push(MemoryKind::Host)
            }
            PointerInfo::Device {
                ordinal,
                range_start,
                range_size,
            } => {
                // cuMemCreate memory may map several allocations back to back (PyTorch's
                // expandable segments): the region may go on into the next one of the
                // same GPU (only cuMemCreate memory: cuMemAlloc allocations that happen to
                // be adjacent stay separate).
                let mut range_end = range_start + range_size;
                let spans = addr + len > range_end && cuda.retain_allocation(range_start).is_ok();
                while spans && addr + len > range_end {
                    match cuda.pointer_info(range_end)? {
                        PointerInfo::Device {
                            ordinal: next,
                            range_start: start,
                            range_size: size,
                        } if next == ordinal
                            && start == range_end
                            && size > 0
                            && cuda.retain_allocation(start).is_ok() =>
                        {
                            range_end = start + size;
                        }
                        _ => break,
                    }
                }
                if addr + len > range_end {
                    return Err(Error::invalid(
                        name,
                        format!(
                            "region {layer}: {len} bytes at {addr:#x} pass the end of its GPU allocation ({range_size} bytes at {range_start:#x})"
                        ),
                    ));
                }
                if gpu_idx >= gpu_count {
                    return Err(Error::invalid(
                        "gpuIdx",
                        format!("{gpu_idx} names no GPU ({gpu_count} present), but {name}[{layer}] is device memory of GPU {ordinal}"),
                    ));
                }
                if ordinal != gpu_idx {
                    crate::log::debug!(
                        "cuda: {name}[{layer}] is memory of GPU {ordinal}; copies use gpuIdx {gpu_idx}'s context (unified addressing)"
                    );
                }
                kinds.push(MemoryKind::Device { ordinal });
            }
        }
    }
    let devices = kinds.iter().filter(|k| k.is_device()).count();
    if devices > 0 {
        crate::log::debug!(
            "cuda: {devices} of {} regions are GPU memory (gpuIdx {gpu_idx})",
            kinds.len()
        );
    }
    table.set_memory(kinds, gpu_idx);
    Ok(())
}
