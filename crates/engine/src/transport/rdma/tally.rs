//! The verbs resources the transport holds: each holder (a rail, a connect in progress, a
//! sending or receiving link) counts what it created into the transport's live totals, and
//! takes it back out when it is dropped (after its queue pairs and registrations are).

use crate::transport::Resources;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The live totals of one transport.
#[derive(Debug, Default)]
pub(crate) struct Live {
    queue_pairs: AtomicU64,
    completion_queues: AtomicU64,
    registered_bytes: AtomicU64,
}

impl Live {
    pub(crate) fn snapshot(&self) -> Resources {
        Resources {
            queue_pairs: self.queue_pairs.load(Ordering::Relaxed),
            completion_queues: self.completion_queues.load(Ordering::Relaxed),
            registered_bytes: self.registered_bytes.load(Ordering::Relaxed),
        }
    }
}

/// What one holder created; counted in `live` from `new` until dropped.
#[derive(Debug)]
pub(crate) struct Tally {
    live: Arc<Live>,
    held: Resources,
}

impl Tally {
    pub(crate) fn new(live: &Arc<Live>, held: Resources) -> Tally {
        live.queue_pairs
            .fetch_add(held.queue_pairs, Ordering::Relaxed);
        live.completion_queues
            .fetch_add(held.completion_queues, Ordering::Relaxed);
        live.registered_bytes
            .fetch_add(held.registered_bytes, Ordering::Relaxed);
        Tally {
            live: Arc::clone(live),
            held,
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        let live = &self.live;
        live.queue_pairs
            .fetch_sub(self.held.queue_pairs, Ordering::Relaxed);
        live.completion_queues
            .fetch_sub(self.held.completion_queues, Ordering::Relaxed);
        live.registered_bytes
            .fetch_sub(self.held.registered_bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_counts_until_it_is_dropped() {
        let live = Arc::new(Live::default());
        let r = |q, c, b| Resources {
            queue_pairs: q,
            completion_queues: c,
            registered_bytes: b,
        };
        let rail = Tally::new(&live, r(0, 2, 4096));
        let link = Tally::new(&live, r(6, 0, 100));
        assert_eq!(live.snapshot(), r(6, 2, 4196));
        drop(link);
        assert_eq!(live.snapshot(), r(0, 2, 4096));
        drop(rail);
        assert_eq!(live.snapshot(), r(0, 0, 0));
    }
}
