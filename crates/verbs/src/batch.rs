//! Send batches: reusable chains of RDMA work requests (WRITE, WRITE WITH IMMEDIATE, SEND
//! WITH IMMEDIATE, READ) with their local and remote buffers, posted by
//! [`QueuePair::post_send`](crate::QueuePair::post_send).

use std::mem::MaybeUninit;
use std::os::raw::c_int;

use rdma_sys::{
    ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wr_opcode, imm_data_invalidated_rkey_union_t, rdma_t,
    wr_t,
};

use crate::error::{Result, VerbsError};

/// A local buffer slice for a work request: `len` bytes at `addr`, covered by
/// the memory region with `lkey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalBuf {
    /// Start address.
    pub addr: u64,
    /// Length in bytes (0 = no data, e.g. an immediate-only notice).
    pub len: u32,
    /// lkey of the region covering the slice.
    pub lkey: u32,
}

/// A remote target for RDMA READ/WRITE: peer address and its region's rkey.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteBuf {
    /// Address in the peer's registration.
    pub addr: u64,
    /// The peer region's rkey.
    pub rkey: u32,
}

fn empty_wr() -> ibv_send_wr {
    ibv_send_wr {
        wr_id: 0,
        next: std::ptr::null_mut(),
        sg_list: std::ptr::null_mut(),
        num_sge: 0,
        opcode: 0,
        send_flags: 0,
        imm_data_invalidated_rkey_union: imm_data_invalidated_rkey_union_t { imm_data: 0 },
        wr: wr_t {
            rdma: rdma_t {
                remote_addr: 0,
                rkey: 0,
            },
        },
        // SAFETY: these unions hold integers and null-able pointers only;
        // all-zero is valid and unused for RC RDMA operations.
        qp_type: unsafe { MaybeUninit::zeroed().assume_init() },
        // SAFETY: as above.
        bind_mw_tso_union: unsafe { MaybeUninit::zeroed().assume_init() },
    }
}

/// A reusable chain of RDMA send work requests with storage fixed at
/// construction: pushing never allocates. One SGE per request.
pub struct SendBatch {
    wrs: Box<[ibv_send_wr]>,
    sges: Box<[ibv_sge]>,
    len: usize,
}

// SAFETY: the raw pointers inside only point into the batch's own heap
// arrays (which move with it); nothing is shared.
unsafe impl Send for SendBatch {}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("len", &self.len)
            .field("capacity", &self.wrs.len())
            .finish()
    }
}

impl SendBatch {
    /// A batch holding up to `capacity` work requests.
    pub fn with_capacity(capacity: usize) -> SendBatch {
        let sge = ibv_sge {
            addr: 0,
            length: 0,
            lkey: 0,
        };
        let mut b = SendBatch {
            wrs: (0..capacity).map(|_| empty_wr()).collect(),
            sges: vec![sge; capacity].into_boxed_slice(),
            len: 0,
        };
        let base = b.sges.as_mut_ptr();
        for (i, w) in b.wrs.iter_mut().enumerate() {
            // `base.wrapping_add(i)` stays inside the sge array (i < capacity).
            w.sg_list = base.wrapping_add(i);
        }
        b
    }

    /// Maximum number of work requests.
    pub fn capacity(&self) -> usize {
        self.wrs.len()
    }

    /// Number of work requests pushed since the last [`clear`](Self::clear).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether no more work requests fit.
    pub fn is_full(&self) -> bool {
        self.len == self.wrs.len()
    }

    /// Forgets all pushed work requests.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    fn push(
        &mut self,
        opcode: u32,
        wr_id: u64,
        local: LocalBuf,
        remote: RemoteBuf,
        imm: u32,
        signaled: bool,
    ) -> Result<()> {
        let i = self.len;
        if i == self.wrs.len() {
            return Err(VerbsError::BatchFull {
                capacity: self.wrs.len(),
            });
        }
        self.sges[i] = ibv_sge {
            addr: local.addr,
            length: local.len,
            lkey: local.lkey,
        };
        let w = &mut self.wrs[i];
        w.wr_id = wr_id;
        w.opcode = opcode;
        w.num_sge = c_int::from(local.len != 0);
        w.send_flags = if signaled {
            ibv_send_flags::IBV_SEND_SIGNALED.0
        } else {
            0
        };
        w.imm_data_invalidated_rkey_union = imm_data_invalidated_rkey_union_t {
            imm_data: imm.to_be(),
        };
        w.wr = wr_t {
            rdma: rdma_t {
                remote_addr: remote.addr,
                rkey: remote.rkey,
            },
        };
        self.len = i + 1;
        Ok(())
    }

    /// Appends an RDMA WRITE of `local` to `remote`.
    pub fn push_write(
        &mut self,
        wr_id: u64,
        local: LocalBuf,
        remote: RemoteBuf,
        signaled: bool,
    ) -> Result<()> {
        self.push(
            ibv_wr_opcode::IBV_WR_RDMA_WRITE,
            wr_id,
            local,
            remote,
            0,
            signaled,
        )
    }

    /// Appends an RDMA WRITE WITH IMMEDIATE: like [`push_write`](Self::push_write),
    /// and the peer gets a `RECV_RDMA_WITH_IMM` completion carrying `imm`
    /// (consuming one posted receive). `local.len` may be 0.
    pub fn push_write_with_imm(
        &mut self,
        wr_id: u64,
        local: LocalBuf,
        remote: RemoteBuf,
        imm: u32,
        signaled: bool,
    ) -> Result<()> {
        self.push(
            ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM,
            wr_id,
            local,
            remote,
            imm,
            signaled,
        )
    }

    /// Appends a SEND WITH IMMEDIATE of `local` (`local.len` may be 0): the peer gets a
    /// `RECV` completion carrying `imm`, consuming one posted receive (the receive's
    /// buffer must hold `local.len` bytes; a zero-byte send fits a zero-byte receive).
    pub fn push_send_with_imm(
        &mut self,
        wr_id: u64,
        local: LocalBuf,
        imm: u32,
        signaled: bool,
    ) -> Result<()> {
        self.push(
            ibv_wr_opcode::IBV_WR_SEND_WITH_IMM,
            wr_id,
            local,
            RemoteBuf { addr: 0, rkey: 0 },
            imm,
            signaled,
        )
    }

    /// Appends an RDMA READ of `remote` into `local`.
    pub fn push_read(
        &mut self,
        wr_id: u64,
        local: LocalBuf,
        remote: RemoteBuf,
        signaled: bool,
    ) -> Result<()> {
        self.push(
            ibv_wr_opcode::IBV_WR_RDMA_READ,
            wr_id,
            local,
            remote,
            0,
            signaled,
        )
    }

    /// Links the pushed work requests with `next` (what [`QueuePair::post_send`]
    /// does before ringing the doorbell) and returns the head of the chain, or
    /// `None` when empty. Exposed so chain construction can be benchmarked
    /// without posting.
    pub fn link(&mut self) -> Option<*mut ibv_send_wr> {
        let n = self.len;
        if n == 0 {
            return None;
        }
        let base = self.wrs.as_mut_ptr();
        for (i, w) in self.wrs[..n].iter_mut().enumerate() {
            w.next = if i + 1 < n {
                base.wrapping_add(i + 1)
            } else {
                std::ptr::null_mut()
            };
        }
        Some(base)
    }

    /// Marks the last pushed work request as signaled (selective signaling: a chain
    /// built without knowing its length up front signals only its tail).
    pub fn signal_last(&mut self) {
        if let Some(last) = self.len.checked_sub(1) {
            self.wrs[last].send_flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
        }
    }

    /// Work request ids in chain order (for bookkeeping / tests).
    pub fn wr_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.wrs[..self.len].iter().map(|w| w.wr_id)
    }
}
