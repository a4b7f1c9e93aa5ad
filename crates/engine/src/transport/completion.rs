//! A call's completion: delivered exactly once, to a `Completion` future or a callback,
//! and the recycled buffers its planned runs live in.

use crate::error::{Error, Result};
use crate::metrics::CallCounters;
use crate::plan::Run;
use futures_channel::oneshot;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

/// Resolves when a job's bytes are in the peer's memory.
pub type Completion = oneshot::Receiver<Result<()>>;

/// Receives a call's outcome once, on whichever thread completes the call (a transport
/// thread, the deadline thread, or the caller's when it fails or finishes at once).
pub type CompletionCallback = Box<dyn FnOnce(Result<()>) + Send>;

/// Receives the outcomes of many calls, each named by the id its caller gave it: one
/// shared sink instead of a boxed callback per call (the Node binding's dispatch).
pub trait CallSink: Send + Sync {
    /// Call `call` completed with `result` (called once per call, on any thread).
    fn settled(&self, call: u64, result: Result<()>);
}

/// Where a call's outcome goes, for callers with their own dispatch.
pub enum OnDone {
    /// A callback of its own.
    Callback(CompletionCallback),
    /// `sink.settled(call, outcome)`.
    Sink(Arc<dyn CallSink>, u64),
}

impl From<CompletionCallback> for OnDone {
    fn from(callback: CompletionCallback) -> Self {
        OnDone::Callback(callback)
    }
}

impl OnDone {
    /// Passes a call's outcome to where the caller wants it (no task or channel per call
    /// for callers that have their own dispatch).
    fn deliver(self, result: Result<()>) {
        match self {
            OnDone::Callback(callback) => callback(result),
            OnDone::Sink(sink, call) => sink.settled(call, result),
        }
    }
}

/// What a call adds to its peer's counters when it completes: bytes (every kind of every
/// block), blocks, and its latency from `started`.
pub(crate) struct Accounting {
    pub counters: Arc<CallCounters>,
    pub bytes: u64,
    pub blocks: u64,
    pub started: Instant,
    pub tagged: bool,
}

impl Accounting {
    fn count(self, result: &Result<()>) {
        match result {
            Ok(()) => self.counters.succeeded(
                self.bytes,
                self.blocks,
                self.started.elapsed(),
                self.tagged,
            ),
            Err(error) => self.counters.failed(error),
        }
    }
}

/// A call not completed yet: where its outcome goes and what it counts.
struct Pending {
    outcome: OnDone,
    accounting: Option<Accounting>,
}

/// The completing half of a call, shared between the transport (which completes it) and
/// the engine's deadline watchdog (which only watches it, and may set the error a failure
/// is reported with). The first completion wins.
pub struct Done {
    slot: Arc<DoneSlot>,
}

pub struct DoneSlot {
    pending: Mutex<Option<Pending>>,
    /// When set, a failure is reported with this error instead (the call timed out and
    /// its link was torn down because of it).
    failure_override: Mutex<Option<Error>>,
    /// When set, the call fails with this error whatever its transport reports, success
    /// included (`fail_if_pending`: it was aborted while pending).
    forced_failure: Mutex<Option<Error>>,
}

use crate::util::lock;

impl DoneSlot {
    /// Whether the call has not completed yet.
    pub fn is_pending(&self) -> bool {
        lock(&self.pending).is_some()
    }

    /// Makes a later failure report `error` (the transport's own error is dropped).
    pub fn override_failure(&self, error: Error) {
        *lock(&self.failure_override) = Some(error);
    }

    /// Decides, at one instant, that the call fails with `error`: returns false (and
    /// changes nothing) when it had already completed; else every later completion reports
    /// `error`, even a success that races with the decision. The caller then tears its
    /// link down, so that the failure is also true of its bytes.
    pub fn fail_if_pending(&self, error: Error) -> bool {
        let pending = lock(&self.pending);
        if pending.is_none() {
            return false;
        }
        *lock(&self.forced_failure) = Some(error);
        true
    }

    /// Completes the call unless it already completed; returns whether this call did.
    pub fn complete(&self, result: Result<()>) -> bool {
        let Some(pending) = lock(&self.pending).take() else {
            return false;
        };
        let result = match (lock(&self.forced_failure).take(), result) {
            (Some(forced), _) => Err(forced),
            (None, Ok(())) => Ok(()),
            (None, Err(error)) => Err(lock(&self.failure_override).take().unwrap_or(error)),
        };
        // Counted before the caller hears of it: its metrics include the call it awaited.
        if let Some(accounting) = pending.accounting {
            accounting.count(&result);
        }
        pending.outcome.deliver(result);
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
    /// A fresh call whose outcome is passed to `callback` (tests: uncounted).
    #[cfg(test)]
    pub(crate) fn with_callback(callback: CompletionCallback) -> Done {
        Done::delivering(OnDone::Callback(callback), None)
    }

    /// A fresh call whose outcome is counted by `accounting`, then passed to `on_done`.
    pub(crate) fn counted(on_done: OnDone, accounting: Accounting) -> Done {
        Done::delivering(on_done, Some(accounting))
    }

    fn delivering(outcome: OnDone, accounting: Option<Accounting>) -> Done {
        let slot = Arc::new(DoneSlot {
            pending: Mutex::new(Some(Pending {
                outcome,
                accounting,
            })),
            failure_override: Mutex::new(None),
            forced_failure: Mutex::new(None),
        });
        Done { slot }
    }

    /// A handle for watching the call without owning its completion.
    pub fn watch(&self) -> Weak<DoneSlot> {
        Arc::downgrade(&self.slot)
    }

    /// Completes the call (same shape as `oneshot::Sender::send`).
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
    free: Mutex<Vec<Vec<Run>>>,
}

impl RunPool {
    /// Buffers kept at most (one per call in flight is enough).
    const MAX_KEPT: usize = 256;

    /// An empty buffer, recycled when one is free.
    pub fn take(&self) -> Vec<Run> {
        crate::util::lock(&self.free).pop().unwrap_or_default()
    }

    /// Wraps planned runs so that they return here when the job drops them.
    pub fn pooled(self: &Arc<Self>, runs: Vec<Run>) -> PooledRuns {
        PooledRuns {
            runs,
            pool: Some(Arc::clone(self)),
            shared: None,
        }
    }

    fn put(&self, mut runs: Vec<Run>) {
        runs.clear();
        let mut free = crate::util::lock(&self.free);
        if free.len() < Self::MAX_KEPT {
            free.push(runs);
        }
    }
}

/// A job's planned runs: a buffer that goes back to its `RunPool` when dropped, or the
/// shared runs of a prepared block list (reused by every layer's call, never copied).
pub struct PooledRuns {
    runs: Vec<Run>,
    pool: Option<Arc<RunPool>>,
    shared: Option<Arc<[Run]>>,
}

impl From<Vec<Run>> for PooledRuns {
    fn from(runs: Vec<Run>) -> Self {
        PooledRuns {
            runs,
            pool: None,
            shared: None,
        }
    }
}

impl From<Arc<[Run]>> for PooledRuns {
    fn from(runs: Arc<[Run]>) -> Self {
        PooledRuns {
            runs: Vec::new(),
            pool: None,
            shared: Some(runs),
        }
    }
}

impl std::ops::Deref for PooledRuns {
    type Target = [Run];

    #[inline]
    fn deref(&self) -> &[Run] {
        match &self.shared {
            Some(shared) => shared,
            None => &self.runs,
        }
    }
}

impl std::fmt::Debug for PooledRuns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl Drop for PooledRuns {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.put(std::mem::take(&mut self.runs));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Run;

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
    fn a_call_failed_while_pending_reports_that_failure_even_over_a_success() {
        let (sender, outcomes) = std::sync::mpsc::channel();
        let report = |sender: std::sync::mpsc::Sender<Result<()>>| -> CompletionCallback {
            Box::new(move |result| {
                let _ = sender.send(result);
            })
        };
        let aborted = Done::with_callback(report(sender.clone()));
        let slot = aborted.watch().upgrade().unwrap();
        assert!(slot.fail_if_pending(Error::Aborted));
        assert!(
            aborted.send(Ok(())).is_ok(),
            "the success arrives after the decision"
        );
        let finished = Done::with_callback(report(sender));
        let slot = finished.watch().upgrade().unwrap();
        assert!(finished.send(Ok(())).is_ok());
        assert!(
            !slot.fail_if_pending(Error::Aborted),
            "too late: nothing changes"
        );
        let codes: Vec<_> = outcomes.iter().map(|r| r.err().map(|e| e.code())).collect();
        assert_eq!(codes, [Some("ERR_ABORTED"), None]);
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
}
