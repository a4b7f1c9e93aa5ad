//! TCP for GPU regions: payloads move through pinned host staging buffers, with the PCIe
//! copies overlapped with the socket.
//!
//! Sender ([`SendStaging`]): a job whose layer has a device region is cut into chunks of at
//! most [`CHUNK_BYTES`] of device payload. The device→pinned copies of a chunk are queued
//! on a stream with one submission ([`crate::gpu::copy`]: the copy kernel for small
//! blocks, else `cuMemcpyBatchAsync` or one `cuMemcpyAsync` per block) and followed by an
//! event; up to [`SLOTS`] chunks are in flight, so while chunk i is written to the socket
//! (`writev`), chunks i+1.. are being copied. Frames are the ordinary `WRITE`/`COMMIT` frames: the receiver
//! cannot tell. Host regions of the same job go straight from their memory.
//!
//! Receiver ([`RecvStaging`]): payloads for device regions are read from the socket into
//! the current pinned slot, one after the other; when the slot is full its host→device
//! copies are queued (one batch) and the socket is read into the next slot while they
//! run. A slot is reused only after its event has completed. [`RecvStaging::flush`] waits
//! for every copy: the receiver calls it before acknowledging a `COMMIT` (and before the
//! arrival notice), so an ACK still means "every byte is in the destination memory".
//!
//! Nothing here runs for host-only engines: the TCP transport calls in only for regions
//! the table marks as device memory, and CUDA resources are made on first use.

use super::frame::{self, Header};
use super::state::ServerState;
use super::MAX_FRAME_PAYLOAD;
use crate::error::{Error, Result};
use crate::gpu::checksum::{CrcKernel, GpuSummer};
use crate::gpu::copy::{CopyQueue, CopySettings, Descriptors, MAX_COPIES_PER_SUBMIT};
use crate::layout::RegionTable;
use crate::plan::Run;
use crate::shard::Shard;
use crate::transport::{for_each_copy, JobView};
use kvtransfer_cuda::{CudaError, Event, PinnedBuffer};

/// Bytes of device payload per staging slot.
pub const CHUNK_BYTES: usize = 4 << 20;
/// Staging slots per direction and connection (so `SLOTS × CHUNK_BYTES` pinned bytes each).
pub const SLOTS: usize = 4;
/// Frames per chunk at most (two iovecs each, under IOV_MAX with the commit).
const MAX_FRAMES_PER_CHUNK: usize = 500;
/// Copies per slot at most (the receiver closes a slot early when it has this many), so
/// that a slot's copies fit one copy-kernel launch.
const MAX_COPIES_PER_SLOT: usize = MAX_COPIES_PER_SUBMIT;

/// Whether a job of `layer` touches device memory (then it goes through [`SendStaging`]).
#[inline]
pub fn layer_has_device(table: &RegionTable, layer: u32) -> bool {
    if table.gpu().is_none() {
        return false;
    }
    let kinds = table.layout.kinds();
    (0..kinds).any(|kind| table.memory(layer * kinds + kind).is_device())
}

/// One pinned slot and the event that marks the end of its copies.
struct Slot {
    buf: PinnedBuffer,
    /// The copy kernel's descriptors for this slot's submission.
    desc: Descriptors,
    event: Event,
    /// Copies were queued since the slot was last waited for.
    busy: bool,
}

/// Copy queue and slots of one direction of one connection, on gpuIdx's context.
struct Pipe {
    // Field order: slots (pinned memory, events) drop before the queue (stream, context).
    slots: Vec<Slot>,
    copies: CopyQueue,
}

impl Pipe {
    fn new(table: &RegionTable) -> std::result::Result<Pipe, CudaError> {
        let ordinal = table.gpu().unwrap_or(0);
        let gpu = crate::gpu::driver()?.gpu(ordinal)?;
        let copies = CopyQueue::new(gpu, CopySettings::from_env())?;
        let gpu = copies.gpu();
        let mut slots = Vec::with_capacity(SLOTS);
        for _ in 0..SLOTS {
            slots.push(Slot {
                buf: gpu.pinned(CHUNK_BYTES)?,
                desc: copies.descriptors()?,
                event: gpu.event()?,
                busy: false,
            });
        }
        crate::log::debug!(
            "tcp staging: {SLOTS} pinned slots of {CHUNK_BYTES} bytes on GPU {ordinal}"
        );
        crate::log::debug!("tcp staging: copies {}", copies.describe());
        Ok(Pipe { slots, copies })
    }

    /// Waits for every queued copy (used on every exit path that may leave copies queued).
    fn drain(&mut self) -> std::result::Result<(), CudaError> {
        self.copies.synchronize()?;
        for slot in &mut self.slots {
            slot.busy = false;
        }
        Ok(())
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // No copy may touch a region or a slot after the connection's thread is gone.
        let _ = self.copies.gpu().bind();
        let _ = self.copies.synchronize();
    }
}

/// Where one `WRITE` frame's payload comes from.
#[derive(Clone, Copy)]
enum Source {
    /// Device memory, copied into the chunk's slot at `at`.
    Device { addr: u64, at: usize },
    /// Host memory, sent in place.
    Host { addr: u64 },
}

#[derive(Clone, Copy)]
struct Segment {
    header: [u8; frame::HEADER_BYTES],
    source: Source,
    len: usize,
}

/// Sender side of the staging path; one per TCP link (lives on its writer thread).
#[derive(Default)]
pub struct SendStaging {
    pipe: Option<Pipe>,
    segments: Vec<Segment>,
    /// `segments` index where each chunk ends (exclusive).
    chunk_ends: Vec<usize>,
    commit: [u8; frame::HEADER_BYTES],
    iovecs: Vec<libc::iovec>,
}

// SAFETY: the raw pointers in `iovecs` are scratch rebuilt for every write and point into
// memory owned by this value, the regions, or the job (tag); the value moves with the
// writer thread that owns it.
unsafe impl Send for SendStaging {}

impl SendStaging {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cuts a job into chunks: WRITE segments (device pieces of at most `CHUNK_BYTES`)
    /// grouped so that each chunk's device bytes fit one slot.
    fn plan(&mut self, table: &RegionTable, shard: &Shard, layer: u32, runs: &[Run]) {
        self.segments.clear();
        self.chunk_ends.clear();
        let mut staged = 0usize;
        let mut frames = 0usize;
        let segments = &mut self.segments;
        let chunk_ends = &mut self.chunk_ends;
        for_each_copy(table, shard, layer, runs, |op| {
            let device = table.memory(op.region).is_device();
            let max_piece = if device {
                CHUNK_BYTES as u64
            } else {
                MAX_FRAME_PAYLOAD
            };
            let mut done = 0u64;
            while done < op.len {
                let (local, remote, contiguous) = op.at(done);
                let len = contiguous.min(max_piece) as usize;
                if frames == MAX_FRAMES_PER_CHUNK || (device && staged + len > CHUNK_BYTES) {
                    chunk_ends.push(segments.len());
                    staged = 0;
                    frames = 0;
                }
                let header = Header::write(op.region, remote, len as u32).encode();
                let source = if device {
                    let at = staged;
                    staged += len;
                    Source::Device { addr: local, at }
                } else {
                    Source::Host { addr: local }
                };
                segments.push(Segment {
                    header,
                    source,
                    len,
                });
                frames += 1;
                done += len as u64;
            }
        });
        if chunk_ends.last() != Some(&segments.len()) {
            chunk_ends.push(segments.len());
        }
    }

    /// The `segments` of chunk `chunk`.
    fn chunk_segments(&self, chunk: usize) -> std::ops::Range<usize> {
        let start = match chunk {
            0 => 0,
            _ => self.chunk_ends[chunk - 1],
        };
        start..self.chunk_ends[chunk]
    }

    /// Queues the device→pinned copies of chunk `chunk` into its slot.
    fn issue(&mut self, chunk: usize) -> std::result::Result<(), CudaError> {
        let segments = self.chunk_segments(chunk);
        let Some(pipe) = self.pipe.as_mut() else {
            return Ok(());
        };
        let slot = &mut pipe.slots[chunk % SLOTS];
        if slot.busy {
            slot.event.synchronize()?;
        }
        let base = slot.buf.as_mut_ptr() as u64;
        for segment in &self.segments[segments.clone()] {
            if let Source::Device { addr, at } = segment.source {
                pipe.copies.push(base + at as u64, addr, segment.len);
            }
        }
        // SAFETY: each source lies in a registered device region (planned from the region
        // table, in bounds by the planner), valid until the engine closes; `at + len <=
        // CHUNK_BYTES` by construction of the plan, so each destination lies in this
        // pinned slot, which is not read before its event below has completed.
        unsafe { pipe.copies.submit(&mut slot.desc)? };
        pipe.copies.record(&slot.event)?;
        slot.busy = true;
        Ok(())
    }

    /// Writes one job's frames (`WRITE`s then `COMMIT`) through `write`, which must write
    /// every byte its iovecs describe. Device payloads are staged; host ones go in place.
    pub fn send(
        &mut self,
        table: &RegionTable,
        job: JobView<'_>,
        call_id: u64,
        write: &mut dyn FnMut(&mut [libc::iovec]) -> std::io::Result<()>,
        peer: &str,
    ) -> Result<()> {
        if self.pipe.is_none() {
            self.pipe = Some(Pipe::new(table)?);
        }
        if let Some(pipe) = &self.pipe {
            pipe.copies.gpu().bind()?;
        }
        self.plan(table, job.shard, job.layer, job.runs);
        let tag = job.notice;
        self.commit = Header {
            kind: frame::COMMIT,
            flags: u8::from(tag.is_some()),
            region: job.blocks,
            offset: call_id,
            len: tag.map_or(0, <[u8]>::len) as u32,
            aux: job.layer,
        }
        .encode();
        let result = self.pump(tag, write, peer);
        if result.is_err() {
            if let Some(pipe) = self.pipe.as_mut() {
                let _ = pipe.drain();
            }
        }
        result
    }

    fn pump(
        &mut self,
        tag: Option<&[u8]>,
        write: &mut dyn FnMut(&mut [libc::iovec]) -> std::io::Result<()>,
        peer: &str,
    ) -> Result<()> {
        let chunks = self.chunk_ends.len();
        for chunk in 0..chunks.min(SLOTS) {
            self.issue(chunk)?;
        }
        for chunk in 0..chunks {
            let segments = self.chunk_segments(chunk);
            let Some(pipe) = self.pipe.as_mut() else {
                return Ok(());
            };
            let slot = &mut pipe.slots[chunk % SLOTS];
            slot.event.synchronize()?;
            slot.busy = false;
            let base = slot.buf.as_ptr();
            self.iovecs.clear();
            for segment in &self.segments[segments.clone()] {
                self.iovecs.push(libc::iovec {
                    iov_base: segment.header.as_ptr() as *mut libc::c_void,
                    iov_len: frame::HEADER_BYTES,
                });
                let payload = match segment.source {
                    // SAFETY: `at + len <= CHUNK_BYTES`: inside the slot.
                    Source::Device { at, .. } => unsafe { base.add(at) },
                    Source::Host { addr } => addr as usize as *const u8,
                };
                self.iovecs.push(libc::iovec {
                    iov_base: payload as *mut libc::c_void,
                    iov_len: segment.len,
                });
            }
            if chunk + 1 == chunks {
                self.push_commit(tag);
            }
            write(&mut self.iovecs).map_err(|e| Error::io(peer, "data write", e))?;
            // The slot's bytes are in the socket: refill it with chunk + SLOTS.
            if chunk + SLOTS < chunks {
                self.issue(chunk + SLOTS)?;
            }
        }
        if chunks == 0 {
            self.iovecs.clear();
            self.push_commit(tag);
            write(&mut self.iovecs).map_err(|e| Error::io(peer, "data write", e))?;
        }
        Ok(())
    }

    fn push_commit(&mut self, tag: Option<&[u8]>) {
        self.iovecs.push(libc::iovec {
            iov_base: self.commit.as_ptr() as *mut libc::c_void,
            iov_len: frame::HEADER_BYTES,
        });
        if let Some(tag) = tag.filter(|t| !t.is_empty()) {
            self.iovecs.push(libc::iovec {
                iov_base: tag.as_ptr() as *mut libc::c_void,
                iov_len: tag.len(),
            });
        }
    }
}

/// Why a staged receive stopped.
#[derive(Debug)]
pub enum RecvError {
    /// Reading the socket failed: the connection is over.
    Io(std::io::Error),
    /// A CUDA call failed: the write cannot complete (the receiver refuses it).
    Gpu(String),
}

impl From<CudaError> for RecvError {
    fn from(e: CudaError) -> Self {
        RecvError::Gpu(format!("GPU staging on the receiver: {e}"))
    }
}

/// Receiver side of the staging path; one per data connection (lives on its thread).
#[derive(Default)]
pub struct RecvStaging {
    pipe: Option<Pipe>,
    /// Slot being filled and the bytes used in it.
    current: usize,
    used: usize,
    /// Copies queued since the last flush.
    dirty: bool,
}

impl RecvStaging {
    pub fn new() -> Self {
        Self::default()
    }

    /// Lands `len` payload bytes, read by `read(slice)` (which fills the slice from the
    /// socket), in device memory at `dst`: socket → pinned slot → async copy.
    /// `still_wanted()` is asked before a full slot's copies are queued: an error (the
    /// writer reset the connection) queues nothing more into device memory.
    ///
    /// # Safety
    /// `dst..dst+len` must lie inside a registered device region.
    pub unsafe fn receive(
        &mut self,
        table: &RegionTable,
        dst: u64,
        len: usize,
        read: &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>,
        still_wanted: &mut dyn FnMut() -> std::io::Result<()>,
    ) -> std::result::Result<(), RecvError> {
        if self.pipe.is_none() {
            self.pipe = Some(Pipe::new(table)?);
            self.current = 0;
            self.used = 0;
        }
        let Some(pipe) = self.pipe.as_mut() else {
            return Ok(());
        };
        if !self.dirty {
            pipe.copies.gpu().bind()?;
        }
        let mut done = 0;
        while done < len {
            if self.used == CHUNK_BYTES || pipe.copies.pending() == MAX_COPIES_PER_SLOT {
                still_wanted().map_err(RecvError::Io)?;
                // Close the slot (queue its copies) and move to the next one, waiting for
                // that one's earlier copies.
                let slot = &mut pipe.slots[self.current];
                // SAFETY: gathered copies go from this pinned slot (filled, not touched
                // again before its event) into device regions (the caller's contract);
                // the slot's descriptors are free (its last use was waited for).
                unsafe { pipe.copies.submit(&mut slot.desc)? };
                pipe.copies.record(&slot.event)?;
                slot.busy = true;
                self.current = (self.current + 1) % SLOTS;
                let next = &mut pipe.slots[self.current];
                if next.busy {
                    next.event.synchronize()?;
                    next.busy = false;
                }
                self.used = 0;
            }
            let n = (len - done).min(CHUNK_BYTES - self.used);
            let slot = &mut pipe.slots[self.current];
            // SAFETY: used + n <= CHUNK_BYTES: inside the slot, whose earlier copies out of
            // this range have completed (a slot is reused only after its event), so nothing
            // else reads or writes it while the slice lives.
            let staging = unsafe { slot.buf.as_mut_ptr().add(self.used) };
            // SAFETY: as above: `n` bytes from `staging` lie in the slot and are not aliased.
            read(unsafe { std::slice::from_raw_parts_mut(staging, n) }).map_err(RecvError::Io)?;
            // Queued with the slot's other copies when it closes, or at the flush.
            pipe.copies.push(dst + done as u64, staging as u64, n);
            self.dirty = true;
            self.used += n;
            done += n;
        }
        Ok(())
    }

    /// Waits until every queued copy has landed in device memory (before an ACK).
    /// Free when nothing was staged since the last flush.
    pub fn flush(&mut self) -> std::result::Result<(), RecvError> {
        if !self.dirty {
            return Ok(());
        }
        if let Some(pipe) = self.pipe.as_mut() {
            let slot = &mut pipe.slots[self.current];
            // SAFETY: as at a slot's close: pinned sources untouched until the drain, and
            // the slot's descriptors are free (every earlier launch was drained or closed
            // the slot, whose event is waited for before the slot is used again).
            unsafe { pipe.copies.submit(&mut slot.desc)? };
            pipe.drain()?;
        }
        self.dirty = false;
        Ok(())
    }
}

/// CRC-32C of a call's landed `ranges` of device regions, with the CRC-32C kernel of the
/// GPU whose context copies them (`state.crc`, loaded once per transport; `summer` once
/// per connection), after flipping one byte when `corrupt` (the test hook). Call it after
/// [`RecvStaging::flush`]: the staged copies have landed.
pub(super) fn sum_landed(
    state: &ServerState,
    summer: &mut Option<GpuSummer>,
    ranges: &[(u64, u64)],
    corrupt: bool,
) -> Result<u32, String> {
    if summer.is_none() {
        let kernel = state.crc.get_or_init(|| {
            let ordinal = state.table.gpu().unwrap_or(0);
            let gpu = crate::gpu::driver()
                .and_then(|cuda| cuda.gpu(ordinal))
                .map_err(|e| e.to_string())?;
            Ok(std::sync::Arc::new(CrcKernel::new(gpu)))
        });
        let kernel = kernel.as_ref().map_err(Clone::clone)?;
        *summer = Some(GpuSummer::new(kernel).map_err(|e| e.to_string())?);
    }
    let Some(summer) = summer.as_mut() else {
        return Err("no GPU summer".into());
    };
    if corrupt {
        if let Some(&(addr, _)) = ranges.iter().find(|(_, len)| *len > 0) {
            // SAFETY: a byte of a registered device region this call just wrote (its frame
            // was checked against the region table before it landed).
            unsafe { summer.flip_byte(addr) }.map_err(|e| e.to_string())?;
        }
    }
    // SAFETY: every range was checked against this side's registered device regions before
    // its bytes landed; the engine keeps them valid while the transport lives; only read.
    unsafe { summer.sum(ranges.iter().copied()) }.map_err(|e| e.to_string())
}
