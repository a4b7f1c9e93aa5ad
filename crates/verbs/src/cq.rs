//! Completion queues and completion channels.
//!
//! # Waiting for completions without spinning
//!
//! The race-free pattern (see `ibv_get_cq_event(3)`):
//!
//! 1. [`CompletionQueue::poll`] until it returns 0 (drain);
//! 2. [`CompletionQueue::request_notify`] (arm: the next completion raises an event);
//! 3. [`CompletionQueue::poll`] again — completions that arrived between 1 and 2
//!    do not raise an event, so re-poll and handle them before sleeping;
//! 4. only if that returned 0, wait for [`CompletionChannel::fd`] to become
//!    readable (`poll(2)`/epoll), call [`CompletionChannel::get_event`] until it
//!    returns `None`, and go to 1.
//!
//! An armed CQ raises at most one event until it is armed again.

use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, RawFd};
use std::os::raw::c_void;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::{ibv_comp_channel, ibv_cq, ibv_poll_cq, ibv_req_notify_cq, ibv_wc, ibv_wc_flags};

use crate::device::Context;
use crate::error::{errno_err, rc_err, Result, VerbsError};

/// A completion channel (`ibv_comp_channel`): an fd that becomes readable
/// when an armed CQ attached to it gets a completion. Non-blocking.
pub struct CompletionChannel {
    ctx: Arc<Context>,
    ch: NonNull<ibv_comp_channel>,
}

// SAFETY: the channel's fd and ibv_get_cq_event are usable from any thread.
unsafe impl Send for CompletionChannel {}
// SAFETY: concurrent reads of the fd each consume whole events (kernel atomic).
unsafe impl Sync for CompletionChannel {}

impl std::fmt::Debug for CompletionChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionChannel")
            .field("fd", &self.fd())
            .finish()
    }
}

/// Identity of a completion queue, as reported by [`CompletionChannel::get_event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CqId(usize);

impl CompletionChannel {
    /// Creates a completion channel and puts its fd in non-blocking mode.
    pub fn new(ctx: &Arc<Context>) -> Result<Arc<CompletionChannel>> {
        // SAFETY: live context.
        let p = unsafe { (ctx.lib().f.create_comp_channel)(ctx.as_ptr()) };
        let ch = NonNull::new(p).ok_or_else(|| errno_err("ibv_create_comp_channel"))?;
        let this = CompletionChannel {
            ctx: Arc::clone(ctx),
            ch,
        };
        let fd = this.fd();
        // SAFETY: fcntl on an fd owned by the live channel.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(errno_err("fcntl(O_NONBLOCK) on completion channel"));
        }
        Ok(Arc::new(this))
    }

    /// The fd to wait on for readability (`POLLIN`). Owned by the channel.
    pub fn fd(&self) -> RawFd {
        // SAFETY: live channel; `fd` is immutable after creation.
        unsafe { self.ch.as_ref() }.fd
    }

    /// Takes one pending event, if any (never blocks).
    ///
    /// Returns the identity of the CQ that fired (compare with
    /// [`CompletionQueue::id`]). The event is acknowledged immediately
    /// (`ibv_ack_cq_events(cq, 1)`), so CQs can always be destroyed without
    /// hanging; the CQ is disarmed until [`CompletionQueue::request_notify`].
    pub fn get_event(&self) -> Result<Option<CqId>> {
        let mut cq: *mut ibv_cq = std::ptr::null_mut();
        let mut cq_ctx: *mut c_void = std::ptr::null_mut();
        let f = &self.ctx.lib().f;
        // SAFETY: live channel; out-pointers are valid. The fd is non-blocking.
        let rc = unsafe { (f.get_cq_event)(self.ch.as_ptr(), &mut cq, &mut cq_ctx) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(VerbsError::Call {
                op: "ibv_get_cq_event",
                source: e,
            });
        }
        // SAFETY: ibv_get_cq_event returned a live CQ (ibv_destroy_cq waits for
        // this event to be acked, so it cannot be freed concurrently).
        unsafe { (f.ack_cq_events)(cq, 1) };
        Ok(Some(CqId(cq as usize)))
    }
}

impl AsRawFd for CompletionChannel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd()
    }
}

impl Drop for CompletionChannel {
    fn drop(&mut self) {
        // SAFETY: CQs attached to the channel hold an Arc to it, so none is alive.
        unsafe { (self.ctx.lib().f.destroy_comp_channel)(self.ch.as_ptr()) };
    }
}

/// One completion, copied out of the CQ.
///
/// For error completions only `wr_id`, `status`, `qp_num` and `vendor_err`
/// are meaningful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkCompletion {
    /// `wr_id` of the completed work request.
    pub wr_id: u64,
    /// `ibv_wc_status` (0 = success).
    pub status: u32,
    /// `ibv_wc_opcode` (e.g. 1 = RDMA WRITE, 2 = RDMA READ, 129 = RECV_RDMA_WITH_IMM).
    pub opcode: u32,
    /// Bytes transferred (receives / reads).
    pub byte_len: u32,
    /// Immediate data (host byte order) of a SEND/WRITE with immediate.
    pub imm_data: Option<u32>,
    /// Local QP number the completion belongs to.
    pub qp_num: u32,
    /// Vendor error syndrome of a failed completion.
    pub vendor_err: u32,
}

/// `IBV_WC_RDMA_WRITE`.
pub const WC_OPCODE_RDMA_WRITE: u32 = 1;
/// `IBV_WC_RDMA_READ`.
pub const WC_OPCODE_RDMA_READ: u32 = 2;
/// `IBV_WC_RECV`.
pub const WC_OPCODE_RECV: u32 = 128;
/// `IBV_WC_RECV_RDMA_WITH_IMM`.
pub const WC_OPCODE_RECV_RDMA_WITH_IMM: u32 = 129;
/// `IBV_WC_REM_ACCESS_ERR`.
pub const WC_STATUS_REM_ACCESS_ERR: u32 = 10;
/// `IBV_WC_WR_FLUSH_ERR`.
pub const WC_STATUS_WR_FLUSH_ERR: u32 = 5;

impl WorkCompletion {
    /// Whether the work request succeeded.
    pub fn is_success(&self) -> bool {
        self.status == 0
    }

    /// Text of `status`, identical to libibverbs' `ibv_wc_status_str`.
    pub fn status_text(&self) -> &'static str {
        wc_status_text(self.status)
    }

    fn from_raw(wc: &ibv_wc) -> WorkCompletion {
        let with_imm = wc.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
        WorkCompletion {
            wr_id: wc.wr_id,
            status: wc.status,
            opcode: wc.opcode,
            byte_len: wc.byte_len,
            imm_data: if with_imm {
                // SAFETY: both union members are plain u32; with IBV_WC_WITH_IMM
                // the provider stored the immediate (network byte order).
                Some(u32::from_be(unsafe {
                    wc.imm_data_invalidated_rkey_union.imm_data
                }))
            } else {
                None
            },
            qp_num: wc.qp_num,
            vendor_err: wc.vendor_err,
        }
    }
}

/// The strings of rdma-core's `ibv_wc_status_str` (fixed by the IB spec).
pub fn wc_status_text(status: u32) -> &'static str {
    const S: [&str; 24] = [
        "success",
        "local length error",
        "local QP operation error",
        "local EE context operation error",
        "local protection error",
        "Work Request Flushed Error",
        "memory management operation error",
        "bad response error",
        "local access error",
        "remote invalid request error",
        "remote access error",
        "remote operation error",
        "transport retry counter exceeded",
        "RNR retry counter exceeded",
        "local RDD violation error",
        "remote invalid RD request",
        "aborted error",
        "invalid EE context number",
        "invalid EE context state",
        "fatal error",
        "response timeout error",
        "general error",
        "TM error",
        "TM software rendezvous",
    ];
    S.get(status as usize).copied().unwrap_or("unknown")
}

/// A completion queue (`ibv_cq`).
pub struct CompletionQueue {
    ctx: Arc<Context>,
    channel: Option<Arc<CompletionChannel>>,
    cq: NonNull<ibv_cq>,
    cqe: u32,
}

// SAFETY: CQ verbs are thread-safe in libibverbs (providers lock the CQ).
unsafe impl Send for CompletionQueue {}
// SAFETY: as above; polling from several threads is allowed (each completion
// is returned once).
unsafe impl Sync for CompletionQueue {}

impl std::fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("cqe", &self.cqe)
            .field("channel", &self.channel.as_ref().map(|c| c.fd()))
            .finish()
    }
}

impl CompletionQueue {
    /// Creates a CQ of at least `cqe` entries, attached to `channel` if given.
    pub fn new(
        ctx: &Arc<Context>,
        cqe: u32,
        channel: Option<&Arc<CompletionChannel>>,
    ) -> Result<Arc<CompletionQueue>> {
        let n = i32::try_from(cqe).map_err(|_| VerbsError::InvalidArgument {
            what: "cqe",
            reason: format!("{cqe} too large"),
        })?;
        let ch = channel.map_or(std::ptr::null_mut(), |c| c.ch.as_ptr());
        // SAFETY: live context; `ch` is null or a live channel of the same
        // context that outlives the CQ (we keep an Arc to it).
        let p = unsafe { (ctx.lib().f.create_cq)(ctx.as_ptr(), n, std::ptr::null_mut(), ch, 0) };
        let cq = NonNull::new(p).ok_or_else(|| errno_err("ibv_create_cq"))?;
        // SAFETY: freshly created CQ; `cqe` holds the actual size.
        let actual = unsafe { cq.as_ref() }.cqe;
        Ok(Arc::new(CompletionQueue {
            ctx: Arc::clone(ctx),
            channel: channel.cloned(),
            cq,
            cqe: u32::try_from(actual).unwrap_or(cqe),
        }))
    }

    /// Identity compared against [`CompletionChannel::get_event`]'s result.
    pub fn id(&self) -> CqId {
        CqId(self.cq.as_ptr() as usize)
    }

    /// Actual number of entries (may exceed the requested size).
    pub fn capacity(&self) -> u32 {
        self.cqe
    }

    /// The completion channel this CQ reports to, if any.
    pub fn channel(&self) -> Option<&Arc<CompletionChannel>> {
        self.channel.as_ref()
    }

    pub(crate) fn as_ptr(&self) -> *mut ibv_cq {
        self.cq.as_ptr()
    }

    /// Moves up to `out.len()` completions into `out`; returns how many.
    pub fn poll(&self, out: &mut [WorkCompletion]) -> Result<usize> {
        const CHUNK: usize = 32;
        let mut raw = [const { MaybeUninit::<ibv_wc>::uninit() }; CHUNK];
        let mut done = 0;
        while done < out.len() {
            let want = (out.len() - done).min(CHUNK);
            // SAFETY: live CQ; `raw` has room for `want` (<= 32) entries.
            let n = unsafe { ibv_poll_cq(self.as_ptr(), want as i32, raw.as_mut_ptr().cast()) };
            if n < 0 {
                return Err(rc_err("ibv_poll_cq", -n));
            }
            let n = n as usize;
            for (dst, src) in out[done..done + n].iter_mut().zip(&raw[..n]) {
                // SAFETY: ibv_poll_cq initialised the first `n` entries.
                *dst = WorkCompletion::from_raw(unsafe { src.assume_init_ref() });
            }
            done += n;
            if n < want {
                break;
            }
        }
        Ok(done)
    }

    /// Arms the CQ: the next completion raises one event on its channel.
    pub fn request_notify(&self) -> Result<()> {
        self.request_notify_inner(false)
    }

    /// Arms the CQ for solicited completions only.
    pub fn request_notify_solicited(&self) -> Result<()> {
        self.request_notify_inner(true)
    }

    fn request_notify_inner(&self, solicited_only: bool) -> Result<()> {
        // SAFETY: live CQ.
        let rc = unsafe { ibv_req_notify_cq(self.as_ptr(), i32::from(solicited_only)) };
        if rc != 0 {
            return Err(rc_err("ibv_req_notify_cq", rc));
        }
        Ok(())
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: QPs using this CQ hold an Arc to it, so none is alive; all
        // channel events were acked by `get_event`.
        unsafe { (self.ctx.lib().f.destroy_cq)(self.cq.as_ptr()) };
    }
}
