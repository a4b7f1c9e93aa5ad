//! Transports move planned runs into a peer's memory. Every transport offers the same shape:
//! a `Link` per connected peer that accepts batched one-sided write jobs and completes each
//! job exactly once, after the peer has every byte (or with the error that stopped it).

mod doorbell;
pub mod gpu_mr;
pub mod rdma;
pub mod sockopt;
pub mod staging;
pub mod tcp;

use crate::error::{Error, Result};
use crate::layout::RegionTable;
use crate::plan::Run;
use futures_channel::oneshot;

/// Resolves when a job's bytes are in the peer's memory.
pub type Completion = oneshot::Receiver<Result<()>>;

/// Receives a call's outcome once, on whichever thread completes the call (a transport
/// thread, the deadline thread, or the caller's when it fails or finishes at once).
pub type CompletionCallback = Box<dyn FnOnce(Result<()>) + Send>;

/// Where a call's outcome goes: a `Completion` to await, or a callback (no task or
/// channel per call for callers that have their own dispatch, like the Node binding).
enum Outcome {
    Channel(oneshot::Sender<Result<()>>),
    Callback(CompletionCallback),
}

impl Outcome {
    fn deliver(self, result: Result<()>) {
        match self {
            Outcome::Channel(sender) => {
                let _ = sender.send(result);
            }
            Outcome::Callback(callback) => callback(result),
        }
    }
}

/// The completing half of a call, shared between the transport (which completes it) and
/// the engine's deadline watchdog (which only watches it, and may set the error a failure
/// is reported with). The first completion wins.
pub struct Done {
    slot: std::sync::Arc<DoneSlot>,
}

pub struct DoneSlot {
    outcome: std::sync::Mutex<Option<Outcome>>,
    /// When set, a failure is reported with this error instead (the call timed out and
    /// its link was torn down because of it).
    failure_override: std::sync::Mutex<Option<Error>>,
}

impl DoneSlot {
    /// Whether the call has not completed yet.
    pub fn is_pending(&self) -> bool {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Makes a later failure report `error` (the transport's own error is dropped).
    pub fn override_failure(&self, error: Error) {
        *self
            .failure_override
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(error);
    }

    /// Completes the call unless it already completed; returns whether this call did.
    pub fn complete(&self, result: Result<()>) -> bool {
        let outcome = self
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(outcome) = outcome else {
            return false;
        };
        let result = match result {
            Ok(()) => Ok(()),
            Err(error) => Err(self
                .failure_override
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or(error)),
        };
        outcome.deliver(result);
        true
    }
}

impl Drop for DoneSlot {
    /// A call dropped without completing fails with `Closed`: a callback is never lost
    /// (its caller may be holding a promise, and the process open, for it).
    fn drop(&mut self) {
        self.complete(Err(Error::Closed));
    }
}

impl std::fmt::Debug for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Done")
    }
}

impl Done {
    /// A fresh call: the transport's half and the caller's `Completion`.
    pub fn new() -> (Done, Completion) {
        let (sender, completion) = oneshot::channel();
        (Done::delivering(Outcome::Channel(sender)), completion)
    }

    /// A fresh call whose outcome is passed to `callback`.
    pub fn with_callback(callback: CompletionCallback) -> Done {
        Done::delivering(Outcome::Callback(callback))
    }

    fn delivering(outcome: Outcome) -> Done {
        let slot = std::sync::Arc::new(DoneSlot {
            outcome: std::sync::Mutex::new(Some(outcome)),
            failure_override: std::sync::Mutex::new(None),
        });
        Done { slot }
    }

    /// A handle for watching the call without owning its completion.
    pub fn watch(&self) -> std::sync::Weak<DoneSlot> {
        std::sync::Arc::downgrade(&self.slot)
    }

    /// Completes the call (same shape as `oneshot::Sender::send`).
    #[allow(clippy::result_unit_err)]
    pub fn send(self, result: Result<()>) -> std::result::Result<(), ()> {
        if self.slot.complete(result) {
            Ok(())
        } else {
            Err(())
        }
    }
}

/// Run buffers kept for reuse, so that a steady stream of calls plans into recycled
/// buffers instead of allocating one per call.
#[derive(Debug, Default)]
pub struct RunPool {
    free: std::sync::Mutex<Vec<Vec<Run>>>,
}

impl RunPool {
    /// Buffers kept at most (one per call in flight is enough).
    const MAX_KEPT: usize = 256;

    /// An empty buffer, recycled when one is free.
    pub fn take(&self) -> Vec<Run> {
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default()
    }

    /// Wraps planned runs so that they return here when the job drops them.
    pub fn pooled(self: &std::sync::Arc<Self>, runs: Vec<Run>) -> PooledRuns {
        PooledRuns {
            runs,
            pool: Some(self.clone()),
        }
    }

    fn put(&self, mut runs: Vec<Run>) {
        runs.clear();
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < Self::MAX_KEPT {
            free.push(runs);
        }
    }
}

/// A job's planned runs; the buffer goes back to its `RunPool` when dropped.
pub struct PooledRuns {
    runs: Vec<Run>,
    pool: Option<std::sync::Arc<RunPool>>,
}

impl From<Vec<Run>> for PooledRuns {
    fn from(runs: Vec<Run>) -> Self {
        PooledRuns { runs, pool: None }
    }
}

impl std::ops::Deref for PooledRuns {
    type Target = [Run];

    fn deref(&self) -> &[Run] {
        &self.runs
    }
}

impl std::fmt::Debug for PooledRuns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.runs.fmt(f)
    }
}

impl Drop for PooledRuns {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.put(std::mem::take(&mut self.runs));
        }
    }
}

/// Largest request tag carried with an arrival notice.
pub const MAX_TAG_BYTES: usize = 255;

/// One `writeCache` call, planned and owned by the transport until it completes.
#[derive(Debug)]
pub struct WriteJob {
    pub runs: PooledRuns,
    pub layer: u32,
    /// Blocks in the call (before coalescing), reported with the arrival notice.
    pub blocks: u32,
    /// Request tag: when present the receiver gets an arrival notice after the bytes.
    pub tag: Option<Vec<u8>>,
    pub done: Done,
}

/// What the receiving side learns when a tagged call has landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    pub peer: String,
    pub tag: Vec<u8>,
    pub layer: u32,
    pub blocks: u32,
}

/// Called on a transport thread for each arrival; must not block for long.
pub type ArrivalSink = std::sync::Arc<dyn Fn(Arrival) + Send + Sync>;

/// A connection to one peer over which jobs are written.
pub trait Link: Send + Sync {
    /// Queues a job; its `done` is always completed exactly once.
    fn submit(&self, job: WriteJob);
    /// False once the connection broke; new jobs then fail at once.
    fn is_alive(&self) -> bool;
    /// Stops the link: pending jobs fail with `Closed`, and once this returns the link
    /// reads no more local memory.
    fn shutdown(&self);
    /// Tears the connection down because of `error` (a timeout or an abort): when this
    /// returns, no byte of any pending job can still be sent (TCP: the connection was reset
    /// and the writer stopped; RDMA: the queue pairs are destroyed), and every pending job
    /// has failed with `error`.
    fn cancel(&self, error: Error);
    /// "tcp" or "rdma".
    fn transport_name(&self) -> &'static str;
}

/// One contiguous copy: `len` bytes from `local_addr` to `remote_offset` of region `region`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOp {
    pub region: u32,
    pub local_addr: u64,
    pub remote_offset: u64,
    pub len: u64,
}

/// The copy of `run` for `kind` (0 = K, 1 = V) of `layer`. Offsets are in bounds because
/// the planner checked ids against both sides' block counts.
#[inline]
pub fn copy_op(table: &RegionTable, layer: u32, kind: u32, run: &Run) -> CopyOp {
    let layout = table.layout;
    let region = layer * layout.kinds() + kind;
    let block_bytes = layout.block_bytes;
    CopyOp {
        region,
        local_addr: table.regions()[region as usize].addr
            + u64::from(run.local_block) * block_bytes,
        remote_offset: u64::from(run.remote_block) * block_bytes,
        len: u64::from(run.blocks) * block_bytes,
    }
}

/// Expands runs of one layer into copy operations: K for every run, then V when present.
#[inline]
pub fn for_each_copy(table: &RegionTable, layer: u32, runs: &[Run], mut visit: impl FnMut(CopyOp)) {
    for kind in 0..table.layout.kinds() {
        for run in runs {
            visit(copy_op(table, layer, kind, run));
        }
    }
}

/// Fails a job's completion (the receiver may be gone; that is fine).
pub fn fail(done: Done, error: Error) {
    let _ = done.send(Err(error));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callback_gets_the_overridden_failure_once_and_a_dropped_call_fails_closed() {
        let (sender, outcomes) = std::sync::mpsc::channel();
        let report = |sender: std::sync::mpsc::Sender<Result<()>>| -> CompletionCallback {
            Box::new(move |result| {
                let _ = sender.send(result);
            })
        };
        let done = Done::with_callback(report(sender.clone()));
        let watched = done.watch().upgrade().unwrap();
        watched.override_failure(Error::Aborted);
        assert!(done.send(Err(Error::Closed)).is_ok());
        assert!(!watched.complete(Ok(())), "a call completes once");
        drop(watched);
        drop(Done::with_callback(report(sender)));
        let codes: Vec<_> = outcomes.iter().map(|r| r.unwrap_err().code()).collect();
        assert_eq!(codes, ["ERR_ABORTED", "ERR_CLOSED"]);
    }

    #[test]
    fn run_buffers_are_recycled_when_a_job_drops_them() {
        let pool = std::sync::Arc::new(RunPool::default());
        let mut runs = pool.take();
        runs.extend((0..1538).map(|i| Run {
            local_block: i,
            remote_block: i,
            blocks: 1,
        }));
        let (ptr, capacity) = (runs.as_ptr(), runs.capacity());
        drop(pool.pooled(runs));
        let again = pool.take();
        assert_eq!(
            (again.as_ptr(), again.capacity(), again.len()),
            (ptr, capacity, 0)
        );
        assert!(pool.take().is_empty(), "a second take gets a fresh buffer");
    }

    #[test]
    fn expands_key_then_value() {
        let table = RegionTable::new(&[0x10000, 0x30000], &[0x20000, 0x40000], 8, 256).unwrap();
        let runs = [Run {
            local_block: 1,
            remote_block: 3,
            blocks: 2,
        }];
        let mut ops = Vec::new();
        for_each_copy(&table, 1, &runs, |op| ops.push(op));
        assert_eq!(
            ops,
            vec![
                CopyOp {
                    region: 2,
                    local_addr: 0x30100,
                    remote_offset: 768,
                    len: 512
                },
                CopyOp {
                    region: 3,
                    local_addr: 0x40100,
                    remote_offset: 768,
                    len: 512
                },
            ]
        );
    }
}
