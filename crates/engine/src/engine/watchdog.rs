//! The deadline watchdog: one thread per engine, started with the first timed call, that
//! fails calls whose deadline passed. It first tears their link down (no byte of them can
//! land afterwards), then reports `ERR_TIMEOUT`.

use super::peers::Peer;
use super::EngineInner;
use crate::error::Error;
use crate::transport::{Done, DoneSlot};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Instant;

/// A call with a deadline, watched by the engine's watchdog thread.
struct Timed {
    deadline: Instant,
    seq: u64,
    /// The peer's own key (shared: watching a call copies no string).
    peer_key: Arc<str>,
    peer: Weak<Peer>,
    call: Weak<DoneSlot>,
    ms: u64,
}

impl PartialEq for Timed {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.seq) == (other.deadline, other.seq)
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.deadline, self.seq).cmp(&(other.deadline, other.seq))
    }
}

#[derive(Default)]
struct WatchState {
    heap: BinaryHeap<Reverse<Timed>>,
    next_seq: u64,
    next_sweep: usize,
    stop: bool,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Fails calls whose deadline passed: first tears their link down (no byte of them can
/// land afterwards), then reports `ERR_TIMEOUT`.
#[derive(Default)]
pub(super) struct Watchdog {
    state: Mutex<WatchState>,
    wake: Condvar,
}

impl Watchdog {
    /// Watches `done` until `deadline`: if it is still pending then, its link to `peer`
    /// is torn down and it fails with `ERR_TIMEOUT`.
    pub(super) fn watch(
        self: &Arc<Self>,
        engine: &Arc<EngineInner>,
        peer: &Arc<Peer>,
        done: &Done,
        deadline: Instant,
    ) {
        let watchdog = self;
        let mut state = watchdog.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.stop {
            return;
        }
        if state.thread.is_none() {
            let engine = Arc::downgrade(engine);
            let dog = Arc::clone(watchdog);
            match std::thread::Builder::new()
                .name("kvt-deadline".into())
                .spawn(move || run_watchdog(&dog, &engine))
            {
                Ok(thread) => state.thread = Some(thread),
                Err(e) => crate::log_error!("cannot start the deadline thread: {e}"),
            }
        }
        if state.heap.len() >= state.next_sweep.max(1024) {
            state
                .heap
                .retain(|Reverse(t)| t.call.upgrade().is_some_and(|c| c.is_pending()));
            state.next_sweep = state.heap.len() * 2;
        }
        state.next_seq += 1;
        let seq = state.next_seq;
        let ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis()
            .try_into()
            .unwrap_or(u64::MAX);
        state.heap.push(Reverse(Timed {
            deadline,
            seq,
            peer_key: Arc::clone(&peer.key),
            peer: Arc::downgrade(peer),
            call: done.watch(),
            ms,
        }));
        // The deadline thread sleeps until the earliest deadline: wake it only when this
        // one is the new earliest (a futex wake per call cost ~1 µs of the call's overhead).
        let earliest = state.heap.peek().is_some_and(|Reverse(top)| top.seq == seq);
        drop(state);
        if earliest {
            watchdog.wake.notify_one();
        }
    }

    /// Stops the thread and forgets every watched call (the engine is closing).
    pub(super) fn stop(&self) {
        let thread = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.stop = true;
            state.heap.clear();
            state.thread.take()
        };
        self.wake.notify_all();
        if let Some(thread) = thread {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }

    /// Calls with a deadline still tracked (completed ones are swept lazily).
    pub(super) fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .heap
            .len()
    }
}

fn run_watchdog(dog: &Watchdog, engine: &Weak<EngineInner>) {
    let mut state = dog.state.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if state.stop {
            return;
        }
        let now = Instant::now();
        let wait = match state.heap.peek() {
            None => None,
            Some(Reverse(top)) if top.deadline > now => Some(top.deadline - now),
            Some(_) => {
                let Some(Reverse(timed)) = state.heap.pop() else {
                    continue;
                };
                drop(state);
                expire(&timed, engine);
                state = dog.state.lock().unwrap_or_else(|p| p.into_inner());
                continue;
            }
        };
        state = match wait {
            None => dog.wake.wait(state).unwrap_or_else(|p| p.into_inner()),
            Some(wait) => {
                dog.wake
                    .wait_timeout(state, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        };
    }
}

/// A call's deadline passed: tear its link down, then fail it with `ERR_TIMEOUT`.
fn expire(timed: &Timed, engine: &Weak<EngineInner>) {
    let Some(call) = timed.call.upgrade() else {
        return;
    };
    if !call.is_pending() {
        return;
    }
    let peer_key = &timed.peer_key;
    let timeout = || {
        Error::Timeout {
        ms: timed.ms,
        what: format!("writeCache to {peer_key} was not acknowledged; the connection was torn down first, so none of its bytes can land any more"),
    }
    };
    call.override_failure(timeout());
    if let Some(peer) = timed.peer.upgrade() {
        if let Some(inner) = engine.upgrade() {
            inner.peers.remove_if_same(peer_key, &peer);
        }
        crate::log_error!(
            "writeCache to {peer_key} timed out after {} ms: tearing the connection down",
            timed.ms
        );
        peer.link.cancel(Error::PeerDisconnected {
            peer: peer_key.to_string(),
            reason: format!(
                "the connection was torn down because a call to this peer timed out after {} ms; connect again",
                timed.ms
            ),
        });
    }
    // Normally already failed by the teardown; covers a link that was closed meanwhile.
    call.complete(Err(timeout()));
}
