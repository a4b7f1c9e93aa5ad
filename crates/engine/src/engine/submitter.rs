//! The submitting thread: what a call needs after its checks (its completion record, its
//! deadline watch, the hand-off to its link) is done here, not on the caller's thread. A
//! prepared layer call then costs its caller the checks and one queue push: on the device
//! machine, calls 2–60 of a 60-layer request went from 1.66–1.92 µs to 1.38–1.49 µs
//! (CHANGELOG.md, 2026-12-01: the submitting thread).
//!
//! Calls leave the queue in the order they entered it, so a peer's link still gets them in
//! call order. `flush` waits until everything queued so far has been handed off: a cancel
//! or a close then finds every earlier call in its link, as when calls were handed off
//! inline.

use crate::util::{lock, poll_then_recv};
use std::sync::mpsc::{self, Sender};
use std::sync::Mutex;
use std::thread::JoinHandle;

enum Message<T> {
    Item(T),
    /// Answered once every item queued before it has been handled.
    Flush(mpsc::SyncSender<()>),
}

/// A queue of `T` with one thread handling its items in order; started with the first
/// item, stopped for good by `stop`.
pub(super) struct Submitter<T> {
    queue: Mutex<Queue<T>>,
}

struct Queue<T> {
    sender: Option<Sender<Message<T>>>,
    thread: Option<JoinHandle<()>>,
    stopped: bool,
}

impl<T: Send + 'static> Default for Submitter<T> {
    fn default() -> Self {
        Submitter {
            queue: Mutex::new(Queue {
                sender: None,
                thread: None,
                stopped: false,
            }),
        }
    }
}

impl<T: Send + 'static> Submitter<T> {
    /// Queues `item` for the thread (started with `handler` on the first item). Gives the
    /// item back when there is no thread to take it (stopped, or it could not start): the
    /// caller then handles it itself.
    pub(super) fn push<H>(&self, item: T, handler: impl FnOnce() -> H) -> Result<(), T>
    where
        H: FnMut(T) + Send + 'static,
    {
        let mut queue = lock(&self.queue);
        if queue.sender.is_none() {
            if queue.stopped {
                return Err(item);
            }
            let (sender, receiver) = mpsc::channel();
            let mut handler = handler();
            let spawned = std::thread::Builder::new()
                .name("kvt-submit".into())
                .spawn(move || {
                    while let Some(message) = poll_then_recv(&receiver) {
                        match message {
                            Message::Item(item) => handler(item),
                            Message::Flush(reply) => {
                                let _ = reply.send(());
                            }
                        }
                    }
                });
            match spawned {
                Ok(thread) => {
                    queue.sender = Some(sender);
                    queue.thread = Some(thread);
                }
                Err(e) => {
                    crate::log::log_error!("cannot start the submitting thread: {e}");
                    queue.stopped = true;
                    return Err(item);
                }
            }
        }
        match &queue.sender {
            Some(sender) => sender.send(Message::Item(item)).map_err(|e| match e.0 {
                Message::Item(item) => item,
                Message::Flush(_) => unreachable!("an item was sent"),
            }),
            None => Err(item),
        }
    }

    /// Waits until every item queued before this call has been handled (at once on the
    /// thread itself, whose earlier items are handled already).
    pub(super) fn flush(&self) {
        let answered = {
            let queue = lock(&self.queue);
            if queue.on_own_thread() {
                return;
            }
            let Some(sender) = &queue.sender else {
                return;
            };
            let (reply, answered) = mpsc::sync_channel(1);
            if sender.send(Message::Flush(reply)).is_err() {
                return;
            }
            answered
        };
        // An error means the thread is gone: nothing is left to wait for.
        let _ = answered.recv();
    }

    /// Handles what is queued, then stops the thread; later items are given back by `push`.
    pub(super) fn stop(&self) {
        let thread = {
            let mut queue = lock(&self.queue);
            queue.stopped = true;
            queue.sender = None;
            if queue.on_own_thread() {
                return;
            }
            queue.thread.take()
        };
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl<T> Queue<T> {
    fn on_own_thread(&self) -> bool {
        self.thread
            .as_ref()
            .is_some_and(|t| t.thread().id() == std::thread::current().id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn items_are_handled_in_order_and_flush_waits_for_them() {
        let submitter = Submitter::<u32>::default();
        let seen = Arc::new(Mutex::new(Vec::new()));
        for i in 0..1000 {
            let seen = Arc::clone(&seen);
            submitter
                .push(i, move || {
                    move |item| {
                        std::thread::sleep(std::time::Duration::from_micros(1));
                        seen.lock().unwrap().push(item);
                    }
                })
                .unwrap();
        }
        submitter.flush();
        assert_eq!(*seen.lock().unwrap(), (0..1000).collect::<Vec<_>>());
        submitter.stop();
        assert_eq!(
            submitter.push(7, || |_| ()),
            Err(7),
            "a stopped submitter gives items back"
        );
    }
}
