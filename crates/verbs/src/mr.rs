//! Memory registration.

use std::os::fd::RawFd;
use std::os::raw::{c_int, c_uint, c_void};
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::ibv_mr;

use crate::device::ProtectionDomain;
use crate::error::{errno_err, Result, VerbsError};

/// Access rights of a memory region or queue pair (`ibv_access_flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Access(u32);

impl Access {
    /// No remote access; the HCA may only read the memory (send side).
    pub const NONE: Access = Access(0);
    /// The HCA may write the memory (receives, RDMA READ destinations).
    pub const LOCAL_WRITE: Access = Access(1);
    /// Peers may RDMA WRITE into it (requires `LOCAL_WRITE`).
    pub const REMOTE_WRITE: Access = Access(1 << 1);
    /// Peers may RDMA READ from it.
    pub const REMOTE_READ: Access = Access(1 << 2);
    /// Peers may perform atomics on it (requires `LOCAL_WRITE`).
    pub const REMOTE_ATOMIC: Access = Access(1 << 3);
    /// PCIe relaxed ordering (optional flag: silently ignored where unsupported).
    pub const RELAXED_ORDERING: Access = Access(1 << 20);
    /// `IBV_ACCESS_OPTIONAL_RANGE`: flags a device may ignore.
    const OPTIONAL_RANGE: u32 = 0x3ff0_0000;

    /// Raw `ibv_access_flags` bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// From raw `ibv_access_flags` bits.
    pub const fn from_bits(bits: u32) -> Access {
        Access(bits)
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any optional flag (e.g. `RELAXED_ORDERING`) is set.
    pub const fn has_optional(self) -> bool {
        self.0 & Self::OPTIONAL_RANGE != 0
    }

    /// The flags without the optional ones.
    pub const fn without_optional(self) -> Access {
        Access(self.0 & !Self::OPTIONAL_RANGE)
    }
}

impl std::ops::BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        Access(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Access {
    fn bitor_assign(&mut self, rhs: Access) {
        self.0 |= rhs.0;
    }
}

/// A registered memory region (`ibv_mr`); deregistered on drop.
pub struct MemoryRegion {
    pd: Arc<ProtectionDomain>,
    mr: NonNull<ibv_mr>,
    addr: u64,
    len: usize,
    lkey: u32,
    rkey: u32,
}

// SAFETY: an MR is immutable after registration; deregistration happens once
// in Drop, and libibverbs allows it from any thread.
unsafe impl Send for MemoryRegion {}
// SAFETY: `&MemoryRegion` only reads the cached keys.
unsafe impl Sync for MemoryRegion {}

impl std::fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("lkey", &format_args!("{:#x}", self.lkey))
            .field("rkey", &format_args!("{:#x}", self.rkey))
            .finish()
    }
}

impl MemoryRegion {
    /// Registers `len` bytes at `addr` with `access`.
    ///
    /// With optional flags (e.g. [`Access::RELAXED_ORDERING`]) set, uses
    /// `ibv_reg_mr_iova2` with `iova = addr` so devices that do not support a
    /// flag ignore it (without `ibv_reg_mr_iova2` the optional flags are dropped).
    ///
    /// # Safety
    /// `addr..addr + len` must be valid, mapped memory of this process that stays
    /// mapped (not freed, unmapped or remapped) until this `MemoryRegion` drops.
    /// The HCA reads and — with `LOCAL_WRITE`/`REMOTE_WRITE` — writes it
    /// asynchronously; the caller is responsible for not racing Rust references
    /// with those accesses.
    pub unsafe fn register(
        pd: &Arc<ProtectionDomain>,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<MemoryRegion> {
        let f = &pd.context().lib().f;
        let p = match (access.has_optional(), f.reg_mr_iova2) {
            // SAFETY: live PD; the memory contract is forwarded to our caller.
            (true, Some(iova2)) => unsafe {
                iova2(
                    pd.as_ptr(),
                    addr.cast::<c_void>(),
                    len,
                    addr as u64,
                    access.bits() as c_uint,
                )
            },
            // SAFETY: as above.
            _ => unsafe {
                (f.reg_mr)(
                    pd.as_ptr(),
                    addr.cast::<c_void>(),
                    len,
                    access.without_optional().bits() as c_int,
                )
            },
        };
        let op = if access.has_optional() && f.reg_mr_iova2.is_some() {
            "ibv_reg_mr_iova2"
        } else {
            "ibv_reg_mr"
        };
        Self::wrap(pd, p, op)
    }

    /// Registers `len` bytes at `offset` of the dma-buf `fd` (GPU memory),
    /// addressed by peers as `iova..iova + len`.
    ///
    /// Fails with [`VerbsError::Unsupported`] when libibverbs lacks
    /// `ibv_reg_dmabuf_mr` (rdma-core < 34).
    ///
    /// # Safety
    /// `fd` must be a dma-buf whose `offset..offset + len` range stays
    /// allocated until this region drops (the exporter keeps its pages pinned
    /// for the registration); the same aliasing caveats as
    /// [`MemoryRegion::register`] apply to the underlying memory.
    pub unsafe fn register_dmabuf(
        pd: &Arc<ProtectionDomain>,
        offset: u64,
        len: usize,
        iova: u64,
        fd: RawFd,
        access: Access,
    ) -> Result<MemoryRegion> {
        let Some(reg) = pd.context().lib().f.reg_dmabuf_mr else {
            return Err(VerbsError::Unsupported {
                op: "ibv_reg_dmabuf_mr",
                reason: "libibverbs.so.1 lacks the symbol (rdma-core >= 34 needed)".into(),
            });
        };
        // SAFETY: live PD; the dma-buf contract is forwarded to our caller.
        let p = unsafe { reg(pd.as_ptr(), offset, len, iova, fd, access.bits() as c_int) };
        Self::wrap(pd, p, "ibv_reg_dmabuf_mr")
    }

    fn wrap(pd: &Arc<ProtectionDomain>, p: *mut ibv_mr, op: &'static str) -> Result<MemoryRegion> {
        let mr = NonNull::new(p).ok_or_else(|| errno_err(op))?;
        // SAFETY: a successfully registered ibv_mr; its fields are immutable.
        let m = unsafe { mr.as_ref() };
        Ok(MemoryRegion {
            pd: Arc::clone(pd),
            mr,
            addr: m.addr as u64,
            len: m.length,
            lkey: m.lkey,
            rkey: m.rkey,
        })
    }

    /// Local key: put into scatter/gather entries of local work requests.
    pub fn lkey(&self) -> u32 {
        self.lkey
    }

    /// Remote key: give to peers so they can RDMA READ/WRITE this region.
    pub fn rkey(&self) -> u32 {
        self.rkey
    }

    /// Start address (the iova peers use; equals the virtual address for `register`).
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is zero bytes long.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The protection domain it belongs to.
    pub fn pd(&self) -> &Arc<ProtectionDomain> {
        &self.pd
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered MR, deregistered exactly once.
        unsafe { (self.pd.context().lib().f.dereg_mr)(self.mr.as_ptr()) };
    }
}
