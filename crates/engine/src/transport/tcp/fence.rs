//! Cutting one writer off for a fence: its data connections are shut down and their
//! receiver threads joined, so nothing it sent can land afterwards.

use super::lock;
use super::state::ServerState;
use std::net::Shutdown;
use std::thread::ThreadId;

/// Registers the calling receiver thread as receiving from `writer` while it lives.
pub(super) struct WriterGuard<'a> {
    state: &'a ServerState,
    thread: ThreadId,
}

impl<'a> WriterGuard<'a> {
    pub(super) fn new(state: &'a ServerState, writer: &str) -> WriterGuard<'a> {
        let thread = std::thread::current().id();
        lock(&state.writers).insert(thread, writer.to_string());
        WriterGuard { state, thread }
    }
}

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        lock(&self.state.writers).remove(&self.thread);
    }
}

/// Shuts down every data connection of `writer` and joins its receiver threads; also
/// withdraws its unused admissions. Returns how many connections were cut. When this
/// returns, no receiver thread of that writer copies into the regions any more.
pub(super) fn isolate(state: &ServerState, writer: &str) -> usize {
    lock(&state.admissions).retain(|_, admission| admission.peer_name != writer);
    let cut: Vec<_> = {
        let writers = lock(&state.writers);
        let mut connections = lock(&state.connections);
        let (theirs, others) = connections.drain(..).partition(|(_, thread)| {
            writers
                .get(&thread.thread().id())
                .is_some_and(|name| name == writer)
        });
        *connections = others;
        theirs
    };
    for (stream, _) in &cut {
        let _ = stream.shutdown(Shutdown::Both);
    }
    let count = cut.len();
    for (_, thread) in cut {
        let _ = thread.join();
    }
    count
}
