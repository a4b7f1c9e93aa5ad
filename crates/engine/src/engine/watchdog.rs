//! The deadline watchdog: one thread per engine, started with the first timed call, that
//! fails calls whose deadline passed. It first tears their link down (no byte of them can
//! land afterwards), then reports `ERR_TIMEOUT`.
//!
//! Watching is on every timed call's path, so it is a push onto a queue under a lock the
//! caller's thread alone takes in the steady state: calls come with one timeout, so their
//! deadlines arrive in order and a FIFO holds them (a heap only for a deadline earlier than
//! the last). Completed calls are dropped from the queues by the watchdog thread, which
//! wakes for that every `PRUNE_INTERVAL` while calls are watched: the caller never touches
//! a completed call's slot, which another thread wrote last.

use super::peers::{Peer, PeerRegistry};
use crate::error::Error;
use crate::transport::{Done, DoneSlot};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// How often the watchdog drops completed calls from its queues while calls are watched.
const PRUNE_INTERVAL: Duration = Duration::from_millis(20);

/// Calls looked at per hold of the lock while pruning (the callers' pushes wait meanwhile).
const PRUNE_STEP: usize = 256;

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

impl Timed {
    /// Whether the call completed and its transport let go of it.
    fn finished(&self) -> bool {
        self.call.strong_count() == 0
    }
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
    /// Calls in deadline order (each deadline no earlier than the one before).
    in_order: VecDeque<Timed>,
    /// Calls whose deadline came earlier than the last one in `in_order`.
    out_of_order: BinaryHeap<Reverse<Timed>>,
    next_seq: u64,
    stop: bool,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WatchState {
    /// Queues a call: at the FIFO's end when its deadline is not earlier than the last
    /// one there, else in the heap.
    fn push(&mut self, timed: Timed) {
        if self
            .in_order
            .back()
            .is_none_or(|last| last.deadline <= timed.deadline)
        {
            self.in_order.push_back(timed);
        } else {
            self.out_of_order.push(Reverse(timed));
        }
    }

    fn earliest(&self) -> Option<Instant> {
        let fifo = self.in_order.front().map(|t| t.deadline);
        let heap = self.out_of_order.peek().map(|Reverse(t)| t.deadline);
        match (fifo, heap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The call whose deadline is earliest, when it is at or before `now`.
    fn pop_expired(&mut self, now: Instant) -> Option<Timed> {
        let fifo = self.in_order.front().map(|t| (t.deadline, t.seq));
        let heap = self
            .out_of_order
            .peek()
            .map(|Reverse(t)| (t.deadline, t.seq));
        match (fifo, heap) {
            (Some(a), Some(b)) if b < a => (b.0 <= now)
                .then(|| self.out_of_order.pop().map(|Reverse(t)| t))
                .flatten(),
            (Some(a), _) => (a.0 <= now).then(|| self.in_order.pop_front()).flatten(),
            (None, Some(b)) => (b.0 <= now)
                .then(|| self.out_of_order.pop().map(|Reverse(t)| t))
                .flatten(),
            (None, None) => None,
        }
    }

    fn tracked(&self) -> usize {
        self.in_order.len() + self.out_of_order.len()
    }
}

/// Fails calls whose deadline passed: first tears their link down (no byte of them can
/// land afterwards), then reports `ERR_TIMEOUT`.
#[derive(Default)]
pub(super) struct Watchdog {
    state: Mutex<WatchState>,
    wake: Condvar,
}

impl Watchdog {
    fn state(&self) -> MutexGuard<'_, WatchState> {
        crate::util::lock(&self.state)
    }

    /// Watches `done` (a call made at `started`) for `timeout`: if it is still pending
    /// then, its link to `peer` is torn down and it fails with `ERR_TIMEOUT`. A deadline
    /// beyond the clock's range is not watched.
    pub(super) fn watch(
        self: &Arc<Self>,
        peers: &Weak<PeerRegistry>,
        peer: &Arc<Peer>,
        done: &Done,
        started: Instant,
        timeout: Duration,
    ) {
        let Some(deadline) = started.checked_add(timeout) else {
            return;
        };
        let watchdog = self;
        let mut state = watchdog.state();
        if state.stop {
            return;
        }
        if state.thread.is_none() {
            let peers = Weak::clone(peers);
            let dog = Arc::clone(watchdog);
            match std::thread::Builder::new()
                .name("kvt-deadline".into())
                .spawn(move || run_watchdog(&dog, &peers))
            {
                Ok(thread) => state.thread = Some(thread),
                Err(e) => crate::log::log_error!("cannot start the deadline thread: {e}"),
            }
        }
        let was_idle = state.tracked() == 0;
        let earliest = state.earliest();
        state.next_seq += 1;
        let timed = Timed {
            deadline,
            seq: state.next_seq,
            peer_key: Arc::clone(&peer.key),
            peer: Arc::downgrade(peer),
            call: done.watch(),
            // The timeout the caller gave, in whole ms (it came from JS as a float).
            ms: u64::try_from((timeout.as_micros() + 500) / 1000).unwrap_or(u64::MAX),
        };
        state.push(timed);
        drop(state);
        // The thread sleeps until the earliest deadline (or the next prune while calls are
        // watched): wake it only when it must wake sooner (a futex wake per call cost
        // ~1 µs of the call's overhead).
        if was_idle || earliest.is_some_and(|e| deadline < e) {
            watchdog.wake.notify_one();
        }
    }

    /// Stops the thread and forgets every watched call (the engine is closing).
    pub(super) fn stop(&self) {
        let thread = {
            let mut state = self.state();
            state.stop = true;
            state.in_order.clear();
            state.out_of_order.clear();
            state.thread.take()
        };
        self.wake.notify_all();
        if let Some(thread) = thread {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }

    /// Calls with a deadline still tracked (completed ones are dropped within about
    /// `PRUNE_INTERVAL`).
    pub(super) fn tracked(&self) -> usize {
        self.state().tracked()
    }

    /// Drops completed calls from the queues, `PRUNE_STEP` at a time between holds of the
    /// lock. The FIFO is pruned from its front and stops at the first call still pending
    /// (the calls behind it are dropped once it completes); the heap is rebuilt when more
    /// than half of it is done.
    fn prune(&self) {
        loop {
            let mut state = self.state();
            let mut looked = 0;
            while looked < PRUNE_STEP && state.in_order.front().is_some_and(Timed::finished) {
                state.in_order.pop_front();
                looked += 1;
            }
            if looked < PRUNE_STEP {
                let heap = &mut state.out_of_order;
                if heap.iter().filter(|Reverse(t)| t.finished()).count() * 2 > heap.len() {
                    heap.retain(|Reverse(t)| !t.finished());
                }
                return;
            }
        }
    }
}

fn run_watchdog(dog: &Watchdog, peers: &Weak<PeerRegistry>) {
    let mut next_prune = Instant::now() + PRUNE_INTERVAL;
    let mut state = dog.state();
    loop {
        if state.stop {
            return;
        }
        let now = Instant::now();
        if let Some(timed) = state.pop_expired(now) {
            drop(state);
            expire(&timed, peers);
            state = dog.state();
            continue;
        }
        if now >= next_prune {
            drop(state);
            dog.prune();
            next_prune = now + PRUNE_INTERVAL;
            state = dog.state();
            continue;
        }
        state = match state.earliest() {
            // Nothing watched: sleep until a call is.
            None => crate::util::wait(&dog.wake, state),
            Some(deadline) => {
                crate::util::wait_timeout(&dog.wake, state, deadline.min(next_prune) - now)
            }
        };
    }
}

/// A call's deadline passed: tear its link down, then fail it with `ERR_TIMEOUT`.
fn expire(timed: &Timed, peers: &Weak<PeerRegistry>) {
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
        if let Some(peers) = peers.upgrade() {
            peers.remove_if_same(peer_key, &peer);
        }
        crate::log::log_error!(
            "writeCache to {peer_key} timed out after {} ms: tearing the connection down",
            timed.ms
        );
        peer.left.report(
            "ERR_TIMEOUT",
            format!(
                "a writeCache to {peer_key} timed out after {} ms: the connection was torn down",
                timed.ms
            ),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn timed(state: &mut WatchState, deadline: Instant, call: &Done) {
        state.next_seq += 1;
        let timed = Timed {
            deadline,
            seq: state.next_seq,
            peer_key: Arc::from("peer"),
            peer: Weak::new(),
            call: call.watch(),
            ms: 0,
        };
        state.push(timed);
    }

    #[test]
    fn deadlines_expire_earliest_first_across_the_fifo_and_the_heap() {
        let t = Instant::now();
        let at = |ms| t + Duration::from_millis(ms);
        let calls: Vec<Done> = (0..4)
            .map(|_| Done::with_callback(Box::new(|_| ())))
            .collect();
        let mut state = WatchState::default();
        for (ms, call) in [30, 10, 40, 30].into_iter().zip(&calls) {
            timed(&mut state, at(ms), call);
        }
        // 30 and 40 arrive in order; 10 and the second 30 each come after a later one.
        assert_eq!((state.in_order.len(), state.out_of_order.len()), (2, 2));
        assert_eq!(state.earliest(), Some(at(10)));
        assert!(state.pop_expired(at(9)).is_none(), "nothing is due yet");
        let due: Vec<u64> = std::iter::from_fn(|| state.pop_expired(at(35)))
            .map(|t| t.seq)
            .collect();
        assert_eq!(
            due,
            [2, 1, 4],
            "the 10 ms call first, then both 30 ms calls in order"
        );
        assert_eq!(state.earliest(), Some(at(40)));
        assert_eq!(state.tracked(), 1);
    }

    #[test]
    fn completed_calls_are_pruned_from_the_front_up_to_the_first_pending_one() {
        let t = Instant::now();
        let dog = Watchdog::default();
        let calls: Vec<Done> = (0..5)
            .map(|_| Done::with_callback(Box::new(|_| ())))
            .collect();
        {
            let mut state = dog.state();
            for (i, call) in calls.iter().enumerate() {
                timed(&mut state, t + Duration::from_secs(i as u64), call);
            }
        }
        let mut calls = calls.into_iter();
        let (first, second, third) = (calls.next(), calls.next(), calls.next());
        drop((first, second));
        let _ = calls.next().map(|done| done.send(Ok(())));
        dog.prune();
        assert_eq!(
            dog.tracked(),
            3,
            "the two completed calls at the front went; the one behind the pending third stays"
        );
        drop(third);
        dog.prune();
        assert_eq!(dog.tracked(), 1, "the last call is still pending");
    }
}
