//! Replacing what is mapped under a reserved range, in place (warm re-attach of imported
//! cuMem memory): the range keeps its address while its allocations are swapped for
//! others ([`Mapping::remap`]), or for one small filler allocation mapped at every granule
//! ([`Gpu::filler`]), so a stray copy lands harmlessly and never faults the context.

use crate::context::Gpu;
use crate::error::CudaError;
use crate::sharing::{device_prop, Allocation, Mapping};
use crate::sys::{
    MemAccessDesc, MemAllocationProp, MemHandle, MemLocation, CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    CU_MEM_LOCATION_TYPE_DEVICE,
};
use std::os::raw::c_int;

impl Gpu {
    /// The minimum granularity of device allocations on this GPU
    /// (`cuMemGetAllocationGranularity`): sizes and mapped offsets are multiples of it.
    pub fn granularity(&self) -> Result<usize, CudaError> {
        let api = self.cuda.sharing()?;
        let prop = device_prop(self.ordinal(), 0);
        let mut granularity: usize = 0;
        // SAFETY: valid out-pointer and property struct; option 0 = minimum granularity.
        self.cuda.check("cuMemGetAllocationGranularity", unsafe {
            (api.mem_get_allocation_granularity)(&mut granularity, &prop, 0)
        })?;
        Ok(granularity.max(1))
    }

    /// One granule of device memory on this GPU (`cuMemCreate`, not shareable) and its
    /// size: the filler a parked range maps at every granule.
    pub fn filler(&self) -> Result<(Allocation, usize), CudaError> {
        let api = self.cuda.sharing()?;
        let _current = self.scoped()?;
        let size = self.granularity()?;
        let prop = device_prop(self.ordinal(), 0);
        let mut handle: MemHandle = 0;
        // SAFETY: valid out-pointer and property struct; size is one granule.
        self.cuda.check("cuMemCreate", unsafe {
            (api.mem_create)(&mut handle, size, &prop, 0)
        })?;
        Ok((
            Allocation {
                cuda: self.cuda,
                handle,
            },
            size,
        ))
    }
}

impl Allocation {
    /// The device ordinal (in this process) whose memory the allocation is
    /// (`cuMemGetAllocationPropertiesFromHandle`); `None` for memory not on a device.
    pub fn device_ordinal(&self) -> Result<Option<u32>, CudaError> {
        let api = self.cuda.sharing()?;
        let mut prop: MemAllocationProp = device_prop(0, 0);
        // SAFETY: valid out-pointer to a property struct the driver fills; live handle.
        let rc = unsafe { (api.mem_get_allocation_properties_from_handle)(&mut prop, self.handle) };
        self.cuda
            .check("cuMemGetAllocationPropertiesFromHandle", rc)?;
        Ok((prop.location.kind == CU_MEM_LOCATION_TYPE_DEVICE)
            .then(|| u32::try_from(prop.location.id).ok())
            .flatten())
    }
}

impl Mapping {
    /// Unmaps everything mapped in the range and maps `pieces` (offset into the range,
    /// allocation, bytes) instead, in the given order, readable and writable by the
    /// mapping's GPU. The allocations may be released afterwards (the mapping keeps their
    /// memory alive); the same allocation may be mapped at several offsets. On an error
    /// the range may be partly mapped: map it again (e.g. with the filler) before use.
    ///
    /// # Safety
    /// No work on any stream may read or write the range while this runs (the driver
    /// unmaps and maps it piece by piece: a copy in between would fault the context), and
    /// every piece must lie inside the range, at a granularity multiple, without overlap.
    pub unsafe fn remap(&self, pieces: &[(usize, &Allocation, usize)]) -> Result<(), CudaError> {
        let api = self.gpu.cuda.sharing()?;
        let _current = self.gpu.scoped()?;
        let mut chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        for (offset, bytes) in chunks.drain(..) {
            // SAFETY: a chunk mapped earlier in this range, unmapped whole and once; no
            // work touches it (the caller's contract).
            self.gpu.cuda.check("cuMemUnmap", unsafe {
                (api.mem_unmap)(self.ptr + offset as u64, bytes)
            })?;
        }
        for &(offset, allocation, bytes) in pieces {
            if offset.checked_add(bytes).is_none_or(|end| end > self.len) {
                return Err(CudaError::other(
                    "cuMemMap",
                    format!(
                        "{bytes} bytes at offset {offset} pass the end of the {}-byte range",
                        self.len
                    ),
                ));
            }
            // SAFETY: the target lies inside the reserved range (checked just above) and
            // is unmapped (everything was unmapped above; pieces do not overlap, the
            // caller's contract); the handle is live.
            self.gpu.cuda.check("cuMemMap", unsafe {
                (api.mem_map)(self.ptr + offset as u64, bytes, 0, allocation.handle, 0)
            })?;
            chunks.push((offset, bytes));
        }
        chunks.sort_unstable();
        let access = MemAccessDesc {
            location: MemLocation {
                kind: CU_MEM_LOCATION_TYPE_DEVICE,
                id: self.gpu.ordinal() as c_int,
            },
            flags: CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // One cuMemSetAccess per run of adjacent chunks (holes are not mapped).
        let mut at = 0;
        while at < chunks.len() {
            let start = chunks[at].0;
            let mut end = start + chunks[at].1;
            at += 1;
            while at < chunks.len() && chunks[at].0 == end {
                end += chunks[at].1;
                at += 1;
            }
            // SAFETY: `start..end` is mapped (adjacent chunks mapped above); one
            // access descriptor.
            self.gpu.cuda.check("cuMemSetAccess", unsafe {
                (api.mem_set_access)(self.ptr + start as u64, end - start, &access, 1)
            })?;
        }
        Ok(())
    }
}
