//! The memory table an acceptor sends a writer over the side channel: the allocations behind
//! its regions (legacy IPC handles, or shareable allocations whose file descriptors follow
//! as `SCM_RIGHTS`) and, per region, its address and the allocations it spans. Exported once
//! per engine ([`Exports::of`]), imported per link ([`Imports::open`]).

use crate::error::{Error, Result};
use crate::layout::{MemoryKind, RegionTable};
use crate::wire::{DecodeError, Reader};
use kvtransfer_cuda::{Allocation, Gpu, IpcMapping, Mapping, PointerInfo, IPC_HANDLE_BYTES};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// Allocations one table may list.
const MAX_PIECES: usize = 1 << 16;
/// Regions one table may list (every layer's K, V, K-scale and V-scale).
const MAX_REGIONS: usize = 4 * crate::layout::MAX_LAYERS as usize;

/// How one allocation is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// `cuMemAlloc` memory: its legacy IPC handle.
    Ipc([u8; IPC_HANDLE_BYTES]),
    /// `cuMemCreate` memory: the next file descriptor of those passed with the table.
    Fd,
}

/// One allocation: where it is in the acceptor's address space, and how to open it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub base: u64,
    pub size: u64,
    pub share: Share,
}

/// One region: its address and the allocations it spans, in address order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionSpan {
    pub addr: u64,
    pub len: u64,
    pub pieces: Vec<u32>,
}

/// The acceptor's GPU memory as a writer opens it: its allocations and its regions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemoryTable {
    /// The allocations behind the regions (their `Share::Fd` descriptors follow in order).
    pub pieces: Vec<Piece>,
    /// One span per region, in region-index order; each names its allocations by index
    /// into `pieces`.
    pub regions: Vec<RegionSpan>,
}

impl MemoryTable {
    /// Its wire form (little endian): the allocation list, then the region list.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + 84 * self.pieces.len() + 24 * self.regions.len());
        out.extend_from_slice(&(self.pieces.len() as u32).to_le_bytes());
        for piece in &self.pieces {
            out.extend_from_slice(&piece.base.to_le_bytes());
            out.extend_from_slice(&piece.size.to_le_bytes());
            match &piece.share {
                Share::Ipc(handle) => {
                    out.push(1);
                    out.extend_from_slice(handle);
                }
                Share::Fd => out.push(2),
            }
        }
        out.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for region in &self.regions {
            out.extend_from_slice(&region.addr.to_le_bytes());
            out.extend_from_slice(&region.len.to_le_bytes());
            out.extend_from_slice(&(region.pieces.len() as u32).to_le_bytes());
            for piece in &region.pieces {
                out.extend_from_slice(&piece.to_le_bytes());
            }
        }
        out
    }

    /// Parses a table; refuses more than the bounded number of allocations or regions, an
    /// empty or wrapping allocation, and a region outside the contiguous allocations it names.
    pub fn decode(bytes: &[u8]) -> std::result::Result<MemoryTable, DecodeError> {
        let mut r = Reader::new(bytes);
        let count = r.u32("piece count")? as usize;
        if count > MAX_PIECES {
            return Err(DecodeError(format!(
                "{count} allocations (at most {MAX_PIECES})"
            )));
        }
        let mut pieces = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            let base = r.u64("allocation base")?;
            let size = r.u64("allocation size")?;
            let share = match r.u8("share kind")? {
                1 => Share::Ipc(r.array::<IPC_HANDLE_BYTES>("ipc handle")?),
                2 => Share::Fd,
                other => return Err(DecodeError(format!("unknown share kind {other}"))),
            };
            if size == 0 || base.checked_add(size).is_none() {
                return Err(DecodeError(format!(
                    "allocation of {size} bytes at {base:#x}"
                )));
            }
            pieces.push(Piece { base, size, share });
        }
        let count = r.u32("region count")? as usize;
        if count > MAX_REGIONS {
            return Err(DecodeError(format!(
                "{count} regions (at most {MAX_REGIONS})"
            )));
        }
        let mut regions = Vec::with_capacity(count.min(1024));
        for index in 0..count {
            let addr = r.u64("region address")?;
            let len = r.u64("region length")?;
            let n = r.u32("region piece count")? as usize;
            if n == 0 || n > pieces.len() {
                return Err(DecodeError(format!("region {index} spans {n} allocations")));
            }
            let mut list = Vec::with_capacity(n);
            for _ in 0..n {
                let piece = r.u32("region piece")?;
                if piece as usize >= pieces.len() {
                    return Err(DecodeError(format!(
                        "region {index} names allocation {piece}"
                    )));
                }
                list.push(piece);
            }
            let span = RegionSpan {
                addr,
                len,
                pieces: list,
            };
            span.check(&pieces)
                .map_err(|e| DecodeError(format!("region {index}: {e}")))?;
            regions.push(span);
        }
        r.finish("memory table")?;
        Ok(MemoryTable { pieces, regions })
    }

    /// How many file descriptors come with the table.
    pub fn fds(&self) -> usize {
        self.pieces.iter().filter(|p| p.share == Share::Fd).count()
    }
}

impl RegionSpan {
    /// The pieces follow each other in the address space and cover the region; only
    /// shareable allocations may be combined.
    fn check(&self, pieces: &[Piece]) -> std::result::Result<(), String> {
        let first = pieces[self.pieces[0] as usize];
        let mut end = first.base;
        for &index in &self.pieces {
            let piece = pieces[index as usize];
            if piece.base != end {
                return Err(format!(
                    "allocation {index} at {:#x} does not follow {end:#x}",
                    piece.base
                ));
            }
            if self.pieces.len() > 1 && piece.share != Share::Fd {
                return Err("a region over several allocations must be cuMemCreate memory".into());
            }
            end = piece.base + piece.size;
        }
        let region_end = self.addr.checked_add(self.len).ok_or("region overflows")?;
        if self.addr < first.base || region_end > end {
            return Err(format!(
                "{} bytes at {:#x} lie outside its allocations ({:#x}..{end:#x})",
                self.len, self.addr, first.base
            ));
        }
        Ok(())
    }
}

/// `localKeyCache[3]` for region index 6 of a K/V table.
fn region_name(table: &RegionTable, index: usize) -> String {
    let kinds = table.layout.kinds() as usize;
    format!(
        "{}[{}]",
        table.layout.kind_name((index % kinds) as u32),
        index / kinds
    )
}

/// What an acceptor shares: its memory table, the descriptors that go with it, and the
/// GPUs that hold its regions.
pub(crate) struct Exports {
    pub table: MemoryTable,
    pub fds: Vec<OwnedFd>,
    pub gpus: Vec<[u8; 16]>,
}

impl Exports {
    /// Exports every region of `table` (all device memory); the error names the region
    /// and says what to do.
    pub fn of(table: &RegionTable) -> std::result::Result<Exports, String> {
        let cuda = crate::gpu::driver().map_err(|e| e.to_string())?;
        let mut out = Exports {
            table: MemoryTable::default(),
            fds: Vec::new(),
            gpus: Vec::new(),
        };
        let mut by_base: HashMap<u64, u32> = HashMap::new();
        for (index, region) in table.regions().iter().enumerate() {
            let name = region_name(table, index);
            let MemoryKind::Device { ordinal } = table.memory(index as u32) else {
                return Err(format!("{name} is host memory"));
            };
            let uuid = cuda
                .gpu(ordinal)
                .and_then(|gpu| gpu.uuid())
                .map_err(|e| format!("GPU {ordinal} of {name}: {e}"))?;
            if !out.gpus.contains(&uuid) {
                out.gpus.push(uuid);
            }
            let end = region.addr + region.len;
            let mut at = region.addr;
            let mut list = Vec::new();
            while at < end {
                // An imported cuMem segment is one piece, shared as its owner's descriptor.
                let imported = table.imported_segment_at(at);
                let (base, size) = match &imported {
                    Some((base, bytes, _)) => (*base, *bytes as usize),
                    None => cuda
                        .address_range(at)
                        .map_err(|e| format!("{name}: the allocation at {at:#x}: {e}"))?,
                };
                let piece = match by_base.get(&base) {
                    Some(&piece) => piece,
                    None => {
                        // Memory imported from another process's IPC handle cannot be
                        // exported again: that handle is passed on instead.
                        let share = match (
                            cuda.retain_allocation(at),
                            table.imported_ipc_handle(base),
                        ) {
                            (Ok(allocation), _) => {
                                // Memory imported from another process's descriptor
                                // cannot be exported again: that descriptor is passed on.
                                let fd = match (allocation.export_fd(), imported) {
                                    (Ok(fd), _) => fd,
                                    (Err(_), Some((_, _, shared))) => shared.map_err(|e| {
                                        format!("{name}: the descriptor shared for its allocation at {base:#x} cannot be duplicated ({e})")
                                    })?,
                                    (Err(e), None) => return Err(format!("{name} is cuMemCreate memory that cannot be shared as a POSIX file descriptor ({e}); create it with CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR among requestedHandleTypes (PyTorch's expandable segments do)")),
                                };
                                out.fds.push(fd);
                                Share::Fd
                            }
                            (Err(_), Some(handle)) => Share::Ipc(handle),
                            (Err(_), None) => Share::Ipc(cuda.ipc_handle(base).map_err(|e| {
                                format!(
                                    "{name}: no IPC handle for its allocation at {base:#x} ({e})"
                                )
                            })?),
                        };
                        let piece = out.table.pieces.len() as u32;
                        out.table.pieces.push(Piece {
                            base,
                            size: size as u64,
                            share,
                        });
                        by_base.insert(base, piece);
                        piece
                    }
                };
                list.push(piece);
                at = base + size as u64;
            }
            let span = RegionSpan {
                addr: region.addr,
                len: region.len,
                pieces: list,
            };
            span.check(&out.table.pieces)
                .map_err(|e| format!("{name} cannot be shared: {e}"))?;
            out.table.regions.push(span);
        }
        Ok(out)
    }
}

/// The acceptor's regions as this process sees them: one base address per region, and
/// the mappings that keep them valid (released on drop, after the caller has synchronized
/// every copy into them).
pub(crate) struct Imports {
    pub bases: Arc<[u64]>,
    /// The acceptor runs in this process (its addresses are used as they are).
    pub same_process: bool,
    // Field order: mappings are unmapped before the allocations are released.
    _mappings: Vec<Mapping>,
    _allocations: Vec<Allocation>,
    _ipc: Vec<IpcMapping>,
}

impl Imports {
    /// Opens the acceptor's `table` on `gpu` (the GPU that runs the copies). In the same
    /// process the addresses are used as they are (peer access enabled where needed).
    pub fn open(
        peer: &str,
        gpu: &Arc<Gpu>,
        table: &MemoryTable,
        fds: Vec<OwnedFd>,
        same_process: bool,
    ) -> Result<Imports> {
        let mut imports = Imports {
            bases: Arc::from(Vec::new()),
            same_process,
            _mappings: Vec::new(),
            _allocations: Vec::new(),
            _ipc: Vec::new(),
        };
        if same_process {
            let cuda = gpu.cuda();
            for region in &table.regions {
                if let PointerInfo::Device { ordinal, .. } = cuda.pointer_info(region.addr)? {
                    gpu.enable_peer_access(&*cuda.gpu(ordinal)?)?;
                }
            }
            imports.bases = table.regions.iter().map(|r| r.addr).collect();
            return Ok(imports);
        }
        if fds.len() != table.fds() {
            return Err(Error::protocol(
                peer,
                format!(
                    "{} file descriptors came with a table that shares {}",
                    fds.len(),
                    table.fds()
                ),
            ));
        }
        // Each piece opened once: a local address (IPC) or an allocation (fd).
        let mut opened: Vec<Option<u64>> = Vec::with_capacity(table.pieces.len());
        let mut allocation_of: HashMap<u32, usize> = HashMap::new();
        let mut fds = fds.into_iter();
        for (index, piece) in table.pieces.iter().enumerate() {
            match &piece.share {
                Share::Ipc(handle) => {
                    let mapping = gpu.open_ipc(handle)?;
                    opened.push(Some(mapping.ptr()));
                    imports._ipc.push(mapping);
                }
                Share::Fd => {
                    let fd = fds.next().expect("counted above");
                    allocation_of.insert(index as u32, imports._allocations.len());
                    imports._allocations.push(gpu.import_allocation(&fd)?);
                    opened.push(None);
                }
            }
        }
        let mut mapped: HashMap<Vec<u32>, u64> = HashMap::new();
        let mut bases = Vec::with_capacity(table.regions.len());
        for region in &table.regions {
            let first = table.pieces[region.pieces[0] as usize];
            let local = match opened[region.pieces[0] as usize] {
                Some(ptr) => ptr,
                None => match mapped.get(&region.pieces) {
                    Some(&ptr) => ptr,
                    None => {
                        let pieces: Vec<(&Allocation, usize)> = region
                            .pieces
                            .iter()
                            .map(|p| {
                                (
                                    &imports._allocations[allocation_of[p]],
                                    table.pieces[*p as usize].size as usize,
                                )
                            })
                            .collect();
                        let mapping = gpu.map_allocations(&pieces)?;
                        let ptr = mapping.ptr();
                        imports._mappings.push(mapping);
                        mapped.insert(region.pieces.clone(), ptr);
                        ptr
                    }
                },
            };
            bases.push(local + (region.addr - first.base));
        }
        imports.bases = bases.into();
        Ok(imports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MemoryTable {
        MemoryTable {
            pieces: vec![
                Piece {
                    base: 0x1000_0000,
                    size: 0x20_0000,
                    share: Share::Ipc([3; 64]),
                },
                Piece {
                    base: 0x4000_0000,
                    size: 0x20_0000,
                    share: Share::Fd,
                },
                Piece {
                    base: 0x4020_0000,
                    size: 0x20_0000,
                    share: Share::Fd,
                },
            ],
            regions: vec![
                RegionSpan {
                    addr: 0x1000_1000,
                    len: 0x1000,
                    pieces: vec![0],
                },
                RegionSpan {
                    addr: 0x401f_f000,
                    len: 0x2000,
                    pieces: vec![1, 2],
                },
            ],
        }
    }

    #[test]
    fn table_round_trips_and_rejects_truncation() {
        let table = sample();
        let bytes = table.encode();
        assert_eq!(MemoryTable::decode(&bytes).unwrap(), table);
        assert_eq!(table.fds(), 2);
        for cut in 0..bytes.len() {
            assert!(MemoryTable::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn regions_outside_or_across_unrelated_allocations_are_refused() {
        let mut table = sample();
        table.regions[0].len = 0x20_0000; // past the IPC allocation's end
        assert!(MemoryTable::decode(&table.encode()).is_err());
        let mut table = sample();
        table.regions[1].pieces = vec![2, 1]; // not in address order
        assert!(MemoryTable::decode(&table.encode()).is_err());
        let mut table = sample();
        table.pieces[1].share = Share::Ipc([0; 64]); // legacy memory cannot be combined
        assert!(MemoryTable::decode(&table.encode()).is_err());
    }
}
