//! Cutting one writer off for a fence: the receive loop closes that writer's data
//! connections between two turns (no copy is under way then), so nothing it sent can land
//! afterwards.

use super::lock;
use super::state::{Isolation, ServerState};
use mio::Waker;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

/// Withdraws `writer`'s unused admissions and has the receive loop close its data
/// connections. Returns how many were cut; when it returns, nothing from that writer is
/// copied into the regions any more.
pub(super) fn isolate(state: &ServerState, waker: &Waker, writer: &str) -> usize {
    lock(&state.admissions).retain(|_, admission| admission.peer_name != writer);
    let (done, cut) = mpsc::channel();
    lock(&state.isolations).push(Isolation {
        writer: writer.to_string(),
        done,
    });
    let _ = waker.wake();
    loop {
        match cut.recv_timeout(Duration::from_millis(50)) {
            Ok(count) => return count,
            Err(mpsc::RecvTimeoutError::Disconnected) => return 0,
            // A loop that has ended has closed every connection.
            Err(mpsc::RecvTimeoutError::Timeout) if state.loop_ended.load(Ordering::SeqCst) => {
                return 0
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}
