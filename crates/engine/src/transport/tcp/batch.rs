//! Frame construction of the sending side: a job's `WRITE` headers and payload iovecs,
//! then its `COMMIT`, in buffers reused from call to call.

use super::frame::{self, Header};
use super::MAX_FRAME_PAYLOAD;
use crate::layout::RegionTable;
use crate::transport::{for_each_copy, JobView};

/// Reused per-link scratch: frame headers and the iovecs that point at them.
///
/// Exported through `internals` so that `benches/planning.rs` and `tests/alloc_free.rs` can
/// measure the per-block cost of frame construction and prove it does not allocate once warm.
pub struct FrameBatch {
    headers: Vec<[u8; frame::HEADER_BYTES]>,
    pub(super) iovecs: Vec<libc::iovec>,
}

impl Default for FrameBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameBatch {
    /// An empty batch; its buffers grow on the first builds and are then reused.
    pub fn new() -> Self {
        FrameBatch {
            headers: Vec::new(),
            iovecs: Vec::new(),
        }
    }

    /// Fills headers and iovecs for a job (no allocation once capacities settle).
    /// `WRITE` frames for every run of the plan's layer (K, then V), then the `COMMIT`
    /// frame carrying `call_id` and the optional encoded notice.
    pub fn build(&mut self, table: &RegionTable, job: JobView<'_>, call_id: u64) {
        let JobView {
            runs,
            layer,
            blocks,
            shard,
            notice: tag,
        } = job;
        self.headers.clear();
        self.iovecs.clear();
        // One pass: headers and iovecs together; header iovecs get their address in a
        // second, cheap pass below because `headers` may still grow (and move) here.
        for_each_copy(table, shard, layer, runs, |op| {
            if op.len == 0 {
                return;
            }
            let mut done = 0;
            loop {
                let (local, remote, contiguous) = op.at(done);
                let len = contiguous.min(MAX_FRAME_PAYLOAD);
                let header = Header::write(op.region, remote, len as u32);
                self.headers.push(header.encode());
                self.iovecs.push(libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: frame::HEADER_BYTES,
                });
                self.iovecs.push(libc::iovec {
                    iov_base: local as usize as *mut libc::c_void,
                    iov_len: len as usize,
                });
                done += len;
                if done >= op.len {
                    break;
                }
            }
        });
        let tag_len = tag.map_or(0, <[u8]>::len);
        let commit = Header {
            kind: frame::COMMIT,
            flags: u8::from(tag.is_some()),
            region: blocks,
            offset: call_id,
            len: tag_len as u32,
            aux: layer,
        };
        self.headers.push(commit.encode());
        self.iovecs.push(libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: frame::HEADER_BYTES,
        });
        if let Some(tag) = tag {
            self.iovecs.push(libc::iovec {
                iov_base: tag.as_ptr() as *mut libc::c_void,
                iov_len: tag.len(),
            });
        }
        // `headers` no longer moves: point every header iovec (even slots) at its header.
        for (iov, header) in self.iovecs.iter_mut().step_by(2).zip(&self.headers) {
            iov.iov_base = header.as_ptr() as *mut libc::c_void;
        }
    }

    /// The iovecs of the last build: header, payload, header, payload, ..., commit[, tag].
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }

    /// Frames (WRITE and COMMIT) of the last build.
    pub fn frames(&self) -> usize {
        self.headers.len()
    }
}

// SAFETY: the raw pointers in `iovecs` point into `headers` (heap memory owned by this
// value, which does not move when the value does), into registered regions (valid while
// the link is open: the engine's region contract), or into the tag of the job the batch
// was built for, which is kept next to the batch while it is queued. Nothing is shared:
// the batch is only touched under its link's outbox lock.
unsafe impl Send for FrameBatch {}
