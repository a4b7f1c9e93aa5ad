//! Swapping the memory under an imported cuMem (VMM) region, at the same address: the
//! import keeps its reserved range, and what is mapped there changes. Parked, the owner's
//! allocations are unmapped and released (its GPU memory can be freed) and one small
//! engine-owned allocation (one granule) is mapped at every granule of the range, so a
//! stray copy lands harmlessly and never faults the context; swapped, the new worker's
//! segments are mapped back to back where the region needs them.
//!
//! Unlike a host import's `mmap(MAP_FIXED)`, the driver unmaps and maps piece by piece:
//! nothing may copy into or out of the range meanwhile. The sidecar fences every writer
//! and fails this side's own calls before it parks or swaps (`ts/sidecar/warm.ts`).

use super::{ImportSource, ImportSpec};
use crate::error::{Error, Result};
use kvtransfer_cuda::{Allocation, Gpu, Mapping};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, OnceLock};

/// The filler that parked ranges map at every granule (one per importer), and its size;
/// or why it could not be made.
pub(super) type Filler = OnceLock<std::result::Result<(Allocation, usize), String>>;

/// What is mapped under a cuMem import now.
struct Mapped {
    /// Each segment's base here and the owner's descriptor for it (empty while parked).
    segments: Vec<(u64, OwnedFd)>,
    segment_bytes: u64,
}

/// A cuMem import's reserved range and what is mapped there.
pub(super) struct VmmImport {
    gpu: Arc<Gpu>,
    mapping: Mapping,
    /// Where the region starts in the range.
    offset: u64,
    /// The device ordinal whose memory the owner's allocations are (when the driver says).
    device: Option<u32>,
    mapped: Mutex<Mapped>,
    filler: Arc<Filler>,
}

/// A region's new cuMem segments, checked and imported (nothing mapped yet): mapped by
/// [`VmmImport::swap`].
pub(crate) struct DeviceSwap {
    name: &'static str,
    index: usize,
    /// (offset in the range, allocation, descriptor) of each segment the region covers.
    segments: Vec<(u64, Allocation, OwnedFd)>,
    segment_bytes: u64,
}

use crate::util::lock;

impl DeviceSwap {
    /// The region list's name (`localKeyCache`), for errors.
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }
}

impl VmmImport {
    pub(super) fn new(
        gpu: Arc<Gpu>,
        mapping: Mapping,
        offset: u64,
        device: Option<u32>,
        fds: Vec<OwnedFd>,
        segment_bytes: u64,
        filler: Arc<Filler>,
    ) -> VmmImport {
        let segments = fds
            .into_iter()
            .enumerate()
            .map(|(i, fd)| (mapping.ptr() + i as u64 * segment_bytes, fd))
            .collect();
        VmmImport {
            gpu,
            mapping,
            offset,
            device,
            mapped: Mutex::new(Mapped {
                segments,
                segment_bytes,
            }),
            filler,
        }
    }

    /// The segment that holds address `at` here: its base, its size, and a duplicate of
    /// the owner's descriptor.
    pub(super) fn segment_at(&self, at: u64) -> Option<(u64, u64, std::io::Result<OwnedFd>)> {
        let mapped = lock(&self.mapped);
        let bytes = mapped.segment_bytes;
        mapped
            .segments
            .iter()
            .find(|&&(base, _)| base <= at && at - base < bytes)
            .map(|(base, fd)| (*base, bytes, fd.try_clone()))
    }

    /// Checks `spec` (cuMem descriptors) as the region's new memory and imports its
    /// segments, without mapping anything: the same length, the same offset within the
    /// granule, segments that fit the reserved range where the region needs them, memory
    /// on the same GPU.
    pub(super) fn check_swap(
        &self,
        name: &'static str,
        index: usize,
        bytes: u64,
        spec: ImportSpec,
    ) -> Result<DeviceSwap> {
        let invalid = |what: String| Error::invalid(name, format!("region {index}: {what}"));
        let ImportSource::CudaVmm { fds, segment_bytes } = spec.source else {
            return Err(invalid("the attached region is cuMem (VMM) GPU memory; a re-attach must share it as cuMem descriptors (cudaVmmFds) too".into()));
        };
        if spec.bytes != bytes {
            return Err(invalid(format!(
                "bytes {} given; the attached region has {bytes} (a re-attach keeps every region's size)",
                spec.bytes
            )));
        }
        let granule = self.gpu.granularity()? as u64;
        if fds.is_empty() || segment_bytes == 0 || !segment_bytes.is_multiple_of(granule) {
            return Err(invalid(format!(
                "{} descriptors of {segment_bytes} bytes given; at least one, each a multiple of the {granule}-byte granularity",
                fds.len()
            )));
        }
        if spec.offset % granule != self.offset % granule {
            return Err(invalid(format!(
                "offset {} is {} bytes into its granule; the attached region's was {} (a re-attach keeps each region's offset within its {granule}-byte granule)",
                spec.offset,
                spec.offset % granule,
                self.offset % granule
            )));
        }
        let size = segment_bytes.saturating_mul(fds.len() as u64);
        let end = spec.offset.saturating_add(spec.bytes);
        if end > size {
            return Err(invalid(format!(
                "offset {} + bytes {} = {end} passes the end of the shared segments ({size} bytes)",
                spec.offset, spec.bytes
            )));
        }
        // The segments the region covers, placed so that it starts where it did.
        let first = spec.offset / segment_bytes;
        let last = (end - 1) / segment_bytes;
        let into_first = spec.offset - first * segment_bytes;
        let range = self.mapping.len() as u64;
        let Some(start) = self.offset.checked_sub(into_first) else {
            return Err(invalid(format!(
                "the region starts {into_first} bytes into its {segment_bytes}-byte segment; at most {} here (where it starts in the attached region's reserved range)",
                self.offset
            )));
        };
        let span = (last - first + 1) * segment_bytes;
        if start + span > range {
            return Err(invalid(format!(
                "its {} segments of {segment_bytes} bytes need {} bytes from offset {start} of the reserved range; it has {range} (a re-attach keeps the segment layout within the attached region's range)",
                last - first + 1,
                start + span
            )));
        }
        let mut segments = Vec::with_capacity((last - first + 1) as usize);
        for (i, fd) in fds.into_iter().enumerate() {
            let i = i as u64;
            if i < first || i > last {
                continue; // not under the region: not mapped, released now
            }
            let allocation = self.gpu.import_allocation(&fd).map_err(|e| {
                invalid(format!(
                    "descriptor {i} is not an exported cuMem allocation ({} {}); the region stays parked",
                    e.op, e.name
                ))
            })?;
            if let (Some(was), Ok(Some(now))) = (self.device, allocation.device_ordinal()) {
                if was != now {
                    return Err(invalid(format!(
                        "descriptor {i} is memory of GPU {now}; the attached region's was on GPU {was} (a re-attach keeps every region on its GPU)"
                    )));
                }
            }
            segments.push((start + (i - first) * segment_bytes, allocation, fd));
        }
        Ok(DeviceSwap {
            name,
            index,
            segments,
            segment_bytes,
        })
    }

    /// Maps a checked swap's segments in the range (the filler, or the old segments,
    /// unmapped first). A failure parks the range again and says so.
    pub(super) fn swap(&self, checked: DeviceSwap) -> Result<()> {
        let pieces: Vec<(usize, &Allocation, usize)> = checked
            .segments
            .iter()
            .map(|(at, allocation, _)| (*at as usize, allocation, checked.segment_bytes as usize))
            .collect();
        // SAFETY: the pieces lie in the range at granule multiples without overlap
        // (`check_swap`); the sidecar fenced every writer and failed this side's calls,
        // so no copy touches the range while it is remapped.
        let mapped = unsafe { self.mapping.remap(&pieces) };
        if let Err(e) = mapped {
            self.park()?;
            return Err(Error::invalid(
                checked.name,
                format!(
                    "region {}: the segments cannot be mapped at the region's address ({} {}); the region stays parked",
                    checked.index, e.op, e.name
                ),
            ));
        }
        let base = self.mapping.ptr();
        *lock(&self.mapped) = Mapped {
            segments: checked
                .segments
                .into_iter()
                .map(|(at, _, fd)| (base + at, fd))
                .collect(),
            segment_bytes: checked.segment_bytes,
        };
        Ok(())
    }

    /// Unmaps the owner's segments (released: its memory can be freed once nothing else
    /// maps it) and maps the filler at every granule of the range, read-write.
    pub(super) fn park(&self) -> Result<()> {
        let internal = |why: String| Error::Internal {
            what: format!("parking an imported GPU region: {why}"),
        };
        let (filler, granule) = self
            .filler
            .get_or_init(|| {
                self.gpu
                    .filler()
                    .map_err(|e| format!("{} {}", e.op, e.name))
            })
            .as_ref()
            .map_err(|e| internal(format!("no filler allocation ({e})")))?;
        let len = self.mapping.len();
        if !len.is_multiple_of(*granule) {
            return Err(internal(format!(
                "its range of {len} bytes is no multiple of the {granule}-byte granularity"
            )));
        }
        let pieces: Vec<(usize, &Allocation, usize)> = (0..len / granule)
            .map(|k| (k * granule, filler, *granule))
            .collect();
        // SAFETY: the pieces tile the range at granule multiples; the sidecar fenced every
        // writer and failed this side's calls, so no copy touches the range meanwhile.
        unsafe { self.mapping.remap(&pieces) }
            .map_err(|e| internal(format!("{} {}", e.op, e.name)))?;
        lock(&self.mapped).segments.clear();
        Ok(())
    }
}
