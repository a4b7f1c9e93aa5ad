//! The sending side's event loop: one thread per transport, whatever the number of links,
//! waits (epoll, through `mio`) on every link's socket, reads the acknowledgements that
//! come back and continues writes that found the send buffer full.
//!
//! Writes begin on the submitting thread (`link.rs`); this loop only sees a link's socket
//! again when bytes arrive or room frees up.

use super::lock;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// What the loop tells a registered socket's owner.
pub(super) trait Readiness: Send + Sync {
    /// Bytes (or the end of the stream, or an error) can be read.
    fn readable(&self);
    /// Room freed up in the send buffer (or the socket is in error).
    fn writable(&self);
}

type Sources = Arc<Mutex<HashMap<usize, Arc<dyn Readiness>>>>;

const WAKER: Token = Token(0);

/// One event-loop thread and the sockets registered with it.
pub(super) struct SendLoop {
    registry: Registry,
    waker: Waker,
    sources: Sources,
    next: AtomicUsize,
    closed: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl SendLoop {
    pub fn start() -> std::io::Result<SendLoop> {
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let sources: Sources = Arc::new(Mutex::new(HashMap::new()));
        let closed = Arc::new(AtomicBool::new(false));
        let thread = {
            let sources = Arc::clone(&sources);
            let closed = Arc::clone(&closed);
            std::thread::Builder::new()
                .name("kvt-tcp-send".into())
                .spawn(move || run(poll, &sources, &closed))?
        };
        Ok(SendLoop {
            registry,
            waker,
            sources,
            next: AtomicUsize::new(1),
            closed,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Registers `fd` (readable and writable, edge-triggered); returns its token.
    pub fn add(&self, fd: libc::c_int, owner: Arc<dyn Readiness>) -> std::io::Result<usize> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.sources).insert(token, owner);
        let registered = self.registry.register(
            &mut SourceFd(&fd),
            Token(token),
            Interest::READABLE | Interest::WRITABLE,
        );
        if let Err(e) = registered {
            lock(&self.sources).remove(&token);
            return Err(e);
        }
        Ok(token)
    }

    /// Forgets `fd` (idempotent): no event of it reaches its owner once the loop has
    /// finished the event it may be handling now (the owner's own lock orders that).
    pub fn remove(&self, fd: libc::c_int, token: usize) {
        if lock(&self.sources).remove(&token).is_some() {
            let _ = self.registry.deregister(&mut SourceFd(&fd));
        }
    }

    /// Stops the thread (links still registered get no more events).
    pub fn stop(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

fn run(mut poll: Poll, sources: &Sources, closed: &AtomicBool) {
    let mut events = Events::with_capacity(256);
    let mut spin = super::spin::Spin::new();
    while !closed.load(Ordering::SeqCst) {
        if let Err(e) = poll.poll(&mut events, spin.timeout(None)) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            crate::log::log_error!("tcp send loop: poll failed: {e}");
            return;
        }
        for event in events.iter() {
            if event.token() == WAKER {
                continue;
            }
            let Some(owner) = lock(sources).get(&event.token().0).map(Arc::clone) else {
                continue;
            };
            if event.is_readable() || event.is_read_closed() || event.is_error() {
                spin.busy();
                owner.readable();
            }
            if event.is_writable() || event.is_error() {
                owner.writable();
            }
        }
    }
}
