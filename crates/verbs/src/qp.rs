//! Reliable-connected queue pairs and shared receive queues.

use std::mem::MaybeUninit;
use std::os::raw::c_int;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::{
    ibv_ah_attr, ibv_gid, ibv_global_route, ibv_post_recv, ibv_post_send, ibv_post_srq_recv,
    ibv_qp, ibv_qp_attr, ibv_qp_attr_mask, ibv_qp_cap, ibv_qp_init_attr, ibv_qp_state, ibv_qp_type,
    ibv_recv_wr, ibv_send_wr, ibv_srq, ibv_srq_attr, ibv_srq_init_attr,
};

use crate::batch::{LocalBuf, SendBatch};
use crate::cq::CompletionQueue;
use crate::device::ProtectionDomain;
use crate::error::{errno_err, rc_err, PostError, Result};
use crate::mr::Access;

/// A shared receive queue (`ibv_srq`) of zero-byte receives.
///
/// Used to catch RDMA WRITE WITH IMMEDIATE notices: each such write consumes
/// one receive and produces a `RECV_RDMA_WITH_IMM` completion carrying the
/// immediate value.
pub struct SharedReceiveQueue {
    pd: Arc<ProtectionDomain>,
    srq: NonNull<ibv_srq>,
    max_wr: u32,
}

// SAFETY: SRQ verbs are thread-safe (providers lock the SRQ when posting).
unsafe impl Send for SharedReceiveQueue {}
// SAFETY: as above.
unsafe impl Sync for SharedReceiveQueue {}

impl std::fmt::Debug for SharedReceiveQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedReceiveQueue")
            .field("max_wr", &self.max_wr)
            .finish()
    }
}

impl SharedReceiveQueue {
    /// Creates an SRQ holding up to `max_wr` receives (one SGE each at most).
    pub fn new(pd: &Arc<ProtectionDomain>, max_wr: u32) -> Result<Arc<SharedReceiveQueue>> {
        let mut init = ibv_srq_init_attr {
            srq_context: std::ptr::null_mut(),
            attr: ibv_srq_attr {
                max_wr,
                max_sge: 1,
                srq_limit: 0,
            },
        };
        // SAFETY: live PD; `init` is a valid init struct (updated in place).
        let p = unsafe { (pd.context().lib().f.create_srq)(pd.as_ptr(), &mut init) };
        let srq = NonNull::new(p).ok_or_else(|| errno_err("ibv_create_srq"))?;
        Ok(Arc::new(SharedReceiveQueue {
            pd: Arc::clone(pd),
            srq,
            max_wr: init.attr.max_wr.max(max_wr),
        }))
    }

    /// Capacity in receives.
    pub fn max_wr(&self) -> u32 {
        self.max_wr
    }

    /// Posts one zero-byte receive (no scatter/gather entries) with `wr_id`.
    ///
    /// This is a safe function: a zero-byte receive references no memory.
    /// An incoming SEND with payload to it completes with a local length error;
    /// posting more than [`max_wr`](Self::max_wr) outstanding receives fails with `ENOMEM`.
    pub fn post_recv(&self, wr_id: u64) -> Result<(), PostError> {
        let mut wr = zero_byte_recv(wr_id);
        let mut bad: *mut ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: live SRQ; the WR references no memory and is copied by the
        // provider before returning.
        let rc = unsafe { ibv_post_srq_recv(self.srq.as_ptr(), &mut wr, &mut bad) };
        post_result("ibv_post_srq_recv", rc, 0, 1)
    }
}

/// A receive work request with no scatter/gather entries (it references no memory).
fn zero_byte_recv(wr_id: u64) -> ibv_recv_wr {
    ibv_recv_wr {
        wr_id,
        next: std::ptr::null_mut(),
        sg_list: std::ptr::null_mut(),
        num_sge: 0,
    }
}

impl Drop for SharedReceiveQueue {
    fn drop(&mut self) {
        // SAFETY: QPs attached to the SRQ hold an Arc to it, so none is alive.
        unsafe { (self.pd.context().lib().f.destroy_srq)(self.srq.as_ptr()) };
    }
}

fn post_result(op: &'static str, rc: c_int, index: usize, count: usize) -> Result<(), PostError> {
    if rc == 0 {
        return Ok(());
    }
    let source = if rc > 0 {
        std::io::Error::from_raw_os_error(rc)
    } else {
        std::io::Error::last_os_error()
    };
    Err(PostError {
        op,
        index,
        count,
        source,
    })
}

/// Requested queue sizes of a QP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCaps {
    /// Outstanding send work requests.
    pub max_send_wr: u32,
    /// Outstanding receives (ignored with an SRQ).
    pub max_recv_wr: u32,
    /// Scatter/gather entries per send work request.
    pub max_send_sge: u32,
    /// Bytes of inline data per send work request (0 = none).
    pub max_inline: u32,
}

/// Where the peer QP is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// RoCE (or routed IB): the peer's GID, and our GID index to send from.
    Gid {
        /// The peer's 16-byte GID.
        gid: [u8; 16],
        /// Index of our source GID (e.g. [`Context::find_roce_v2_ipv4_gid`](crate::Context::find_roce_v2_ipv4_gid)).
        sgid_index: u8,
    },
    /// InfiniBand: the peer port's LID.
    Lid(u16),
}

/// Parameters of the INIT → RTR transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtrParams {
    /// Peer QP number.
    pub remote_qpn: u32,
    /// Peer's initial send PSN (24 bits).
    pub remote_psn: u32,
    /// Path MTU as an `ibv_mtu` code (use the smaller active MTU of both ports).
    pub path_mtu: u32,
    /// Peer address.
    pub dest: Dest,
    /// Local port number (1-based).
    pub port: u8,
    /// RNR NAK timer code (0..=31; 12 = 0.64 ms).
    pub min_rnr_timer: u8,
    /// Outstanding RDMA READs the peer may have against us.
    pub max_dest_rd_atomic: u8,
}

/// Parameters of the RTR → RTS transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtsParams {
    /// Our initial send PSN (24 bits; must equal the peer's `remote_psn`).
    pub psn: u32,
    /// Local ACK timeout code: 4.096 µs × 2^timeout (14 ≈ 67 ms; 0 = infinite).
    pub timeout: u8,
    /// Transport retries (0..=7).
    pub retry_cnt: u8,
    /// RNR retries (0..=7; 7 = infinite).
    pub rnr_retry: u8,
    /// Outstanding RDMA READs we may initiate.
    pub max_rd_atomic: u8,
}

/// A reliable-connected queue pair (`ibv_qp` of type RC).
pub struct QueuePair {
    pd: Arc<ProtectionDomain>,
    send_cq: Arc<CompletionQueue>,
    recv_cq: Arc<CompletionQueue>,
    srq: Option<Arc<SharedReceiveQueue>>,
    qp: NonNull<ibv_qp>,
    caps: QpCaps,
}

// SAFETY: QP verbs are thread-safe; providers serialise posting on one QP.
unsafe impl Send for QueuePair {}
// SAFETY: as above.
unsafe impl Sync for QueuePair {}

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("qp_num", &self.qp_num())
            .field("caps", &self.caps)
            .field("srq", &self.srq.is_some())
            .finish()
    }
}

const PSN_MASK: u32 = 0x00ff_ffff;

impl QueuePair {
    /// Creates an RC QP (state RESET). Only work requests pushed with
    /// `signaled = true` produce send completions.
    pub fn new_rc(
        pd: &Arc<ProtectionDomain>,
        send_cq: &Arc<CompletionQueue>,
        recv_cq: &Arc<CompletionQueue>,
        srq: Option<&Arc<SharedReceiveQueue>>,
        caps: QpCaps,
    ) -> Result<QueuePair> {
        let mut init = ibv_qp_init_attr {
            qp_context: std::ptr::null_mut(),
            send_cq: send_cq.as_ptr(),
            recv_cq: recv_cq.as_ptr(),
            srq: srq.map_or(std::ptr::null_mut(), |s| s.srq.as_ptr()),
            cap: ibv_qp_cap {
                max_send_wr: caps.max_send_wr,
                max_recv_wr: if srq.is_some() { 0 } else { caps.max_recv_wr },
                max_send_sge: caps.max_send_sge,
                max_recv_sge: if srq.is_some() { 0 } else { 1 },
                max_inline_data: caps.max_inline,
            },
            qp_type: ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: live PD; CQs/SRQ are live objects of the same context, kept
        // alive by the Arcs stored in the QP.
        let p = unsafe { (pd.context().lib().f.create_qp)(pd.as_ptr(), &mut init) };
        let qp = NonNull::new(p).ok_or_else(|| errno_err("ibv_create_qp"))?;
        Ok(QueuePair {
            pd: Arc::clone(pd),
            send_cq: Arc::clone(send_cq),
            recv_cq: Arc::clone(recv_cq),
            srq: srq.cloned(),
            qp,
            caps: QpCaps {
                max_send_wr: init.cap.max_send_wr,
                max_recv_wr: init.cap.max_recv_wr,
                max_send_sge: init.cap.max_send_sge,
                max_inline: init.cap.max_inline_data,
            },
        })
    }

    /// QP number to give to the peer.
    pub fn qp_num(&self) -> u32 {
        // SAFETY: live QP; `qp_num` is immutable.
        unsafe { self.qp.as_ref() }.qp_num
    }

    /// Actual capacities granted by the device (≥ requested).
    pub fn caps(&self) -> QpCaps {
        self.caps
    }

    /// The send completion queue.
    pub fn send_cq(&self) -> &Arc<CompletionQueue> {
        &self.send_cq
    }

    /// The receive completion queue.
    pub fn recv_cq(&self) -> &Arc<CompletionQueue> {
        &self.recv_cq
    }

    /// The protection domain.
    pub fn pd(&self) -> &Arc<ProtectionDomain> {
        &self.pd
    }

    fn modify(
        &self,
        attr: &mut ibv_qp_attr,
        mask: ibv_qp_attr_mask,
        op: &'static str,
    ) -> Result<()> {
        // SAFETY: live QP; `attr` is a fully initialised attribute struct.
        let rc = unsafe {
            (self.pd.context().lib().f.modify_qp)(self.qp.as_ptr(), attr, mask.0 as c_int)
        };
        if rc != 0 {
            return Err(rc_err(op, rc));
        }
        Ok(())
    }

    fn zeroed_attr() -> ibv_qp_attr {
        // SAFETY: ibv_qp_attr is plain data (integers, unions of integers and
        // a null-able pointer-free GID); all-zero is a valid value.
        unsafe { MaybeUninit::<ibv_qp_attr>::zeroed().assume_init() }
    }

    /// RESET → INIT on `port`, allowing `access` from the peer
    /// (e.g. `REMOTE_WRITE | REMOTE_READ`).
    pub fn to_init(&self, port: u8, access: Access) -> Result<()> {
        let mut a = Self::zeroed_attr();
        a.qp_state = ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = port;
        a.qp_access_flags = access.without_optional().bits();
        let m = ibv_qp_attr_mask::IBV_QP_STATE.0
            | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX.0
            | ibv_qp_attr_mask::IBV_QP_PORT.0
            | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS.0;
        self.modify(&mut a, ibv_qp_attr_mask(m), "ibv_modify_qp(INIT)")
    }

    /// INIT → RTR: connect to the peer.
    pub fn to_rtr(&self, p: &RtrParams) -> Result<()> {
        let mut a = Self::zeroed_attr();
        a.qp_state = ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = p.path_mtu;
        a.dest_qp_num = p.remote_qpn;
        a.rq_psn = p.remote_psn & PSN_MASK;
        a.max_dest_rd_atomic = p.max_dest_rd_atomic;
        a.min_rnr_timer = p.min_rnr_timer;
        a.ah_attr = match p.dest {
            Dest::Gid { gid, sgid_index } => ibv_ah_attr {
                grh: ibv_global_route {
                    dgid: ibv_gid { raw: gid },
                    flow_label: 0,
                    sgid_index,
                    hop_limit: 64,
                    traffic_class: 0,
                },
                dlid: 0,
                sl: 0,
                src_path_bits: 0,
                static_rate: 0,
                is_global: 1,
                port_num: p.port,
            },
            Dest::Lid(lid) => ibv_ah_attr {
                grh: ibv_global_route {
                    dgid: ibv_gid { raw: [0; 16] },
                    flow_label: 0,
                    sgid_index: 0,
                    hop_limit: 0,
                    traffic_class: 0,
                },
                dlid: lid,
                sl: 0,
                src_path_bits: 0,
                static_rate: 0,
                is_global: 0,
                port_num: p.port,
            },
        };
        let m = ibv_qp_attr_mask::IBV_QP_STATE.0
            | ibv_qp_attr_mask::IBV_QP_AV.0
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU.0
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN.0
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN.0
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC.0
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER.0;
        self.modify(&mut a, ibv_qp_attr_mask(m), "ibv_modify_qp(RTR)")
    }

    /// RTR → RTS: ready to send.
    pub fn to_rts(&self, p: &RtsParams) -> Result<()> {
        let mut a = Self::zeroed_attr();
        a.qp_state = ibv_qp_state::IBV_QPS_RTS;
        a.sq_psn = p.psn & PSN_MASK;
        a.timeout = p.timeout;
        a.retry_cnt = p.retry_cnt;
        a.rnr_retry = p.rnr_retry;
        a.max_rd_atomic = p.max_rd_atomic;
        let m = ibv_qp_attr_mask::IBV_QP_STATE.0
            | ibv_qp_attr_mask::IBV_QP_SQ_PSN.0
            | ibv_qp_attr_mask::IBV_QP_TIMEOUT.0
            | ibv_qp_attr_mask::IBV_QP_RETRY_CNT.0
            | ibv_qp_attr_mask::IBV_QP_RNR_RETRY.0
            | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC.0;
        self.modify(&mut a, ibv_qp_attr_mask(m), "ibv_modify_qp(RTS)")
    }

    /// Any state → ERROR: outstanding work requests complete with
    /// `WR_FLUSH_ERR` (drain before dropping memory they reference).
    pub fn to_error(&self) -> Result<()> {
        let mut a = Self::zeroed_attr();
        a.qp_state = ibv_qp_state::IBV_QPS_ERR;
        self.modify(&mut a, ibv_qp_attr_mask::IBV_QP_STATE, "ibv_modify_qp(ERR)")
    }

    /// Posts every work request of `batch` with one `ibv_post_send` (one
    /// doorbell), linked in push order. The batch is left unchanged (call
    /// [`SendBatch::clear`] to reuse it).
    ///
    /// On failure, requests before [`PostError::index`] were posted.
    ///
    /// # Safety
    /// For every work request in `batch`:
    /// - the local range `addr..addr + len` lies inside a live
    ///   [`MemoryRegion`](crate::MemoryRegion) of this QP's PD whose lkey was
    ///   given, and that memory stays valid (and, for READ destinations, is not
    ///   accessed through Rust references) until the request's completion — or
    ///   the completion of a later *signaled* request on this QP — has been
    ///   polled, or the QP was moved to ERROR and its flushes drained;
    /// - the remote range lies inside a registration of the peer with that
    ///   rkey (a violation is reported as a `REM_ACCESS_ERR` completion and
    ///   breaks the connection, it is not memory-unsafe locally);
    /// - the caller keeps the number of outstanding (not yet completed) send
    ///   requests ≤ [`QpCaps::max_send_wr`], and signals at least one request
    ///   every `max_send_wr` so the send queue can be reclaimed.
    pub unsafe fn post_send(&self, batch: &mut SendBatch) -> Result<(), PostError> {
        let count = batch.len();
        let Some(head) = batch.link() else {
            return Ok(());
        };
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        // SAFETY: live QP; `head` starts a chain of `count` initialised WRs whose
        // SGEs point into `batch` (alive for the call; the provider copies
        // WRs before returning). Memory validity is the caller's contract.
        let rc = unsafe { ibv_post_send(self.qp.as_ptr(), head, &mut bad) };
        let index = if rc != 0 && !bad.is_null() {
            // SAFETY: on failure `bad` points to an element of the same array.
            usize::try_from(unsafe { bad.offset_from(head) }).unwrap_or(0)
        } else {
            0
        };
        post_result("ibv_post_send", rc, index, count)
    }

    /// Posts one zero-byte SEND WITH IMMEDIATE carrying `imm` (the peer gets a `RECV`
    /// completion with it, consuming one posted receive). Safe: the request references
    /// no memory. The caller keeps outstanding send requests ≤ [`QpCaps::max_send_wr`]
    /// (else the post fails) and signals at least every `max_send_wr`.
    pub fn post_send_zero_with_imm(
        &self,
        wr_id: u64,
        imm: u32,
        signaled: bool,
    ) -> Result<(), PostError> {
        let mut batch = SendBatch::with_capacity(1);
        let none = LocalBuf {
            addr: 0,
            len: 0,
            lkey: 0,
        };
        if let Err(e) = batch.push_send_with_imm(wr_id, none, imm, signaled) {
            unreachable!("a batch of one takes one request: {e}");
        }
        // SAFETY: the one request carries no scatter entry (length 0): it reads no local
        // memory and names no remote range.
        unsafe { self.post_send(&mut batch) }
    }

    /// Posts one zero-byte receive to this QP's own receive queue (QPs
    /// created without an SRQ). Safe: the receive references no memory.
    pub fn post_recv_zero(&self, wr_id: u64) -> Result<(), PostError> {
        if self.srq.is_some() {
            return Err(PostError {
                op: "ibv_post_recv",
                index: 0,
                count: 1,
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        let mut wr = zero_byte_recv(wr_id);
        let mut bad: *mut ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: live QP; the WR references no memory.
        let rc = unsafe { ibv_post_recv(self.qp.as_ptr(), &mut wr, &mut bad) };
        post_result("ibv_post_recv", rc, 0, 1)
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: the QP is destroyed exactly once; its CQs, SRQ and PD are
        // still alive (Arcs in this struct are released after this runs).
        unsafe { (self.pd.context().lib().f.destroy_qp)(self.qp.as_ptr()) };
    }
}
