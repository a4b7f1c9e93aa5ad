//! How filled work-request chains reach the device.
//!
//! On a NIC, `ibv_post_send` copies the chain into the send queue and rings a doorbell (an
//! MMIO write): the progress thread posts inline. A software provider (Soft-RoCE, soft-iWARP)
//! instead runs the whole transport protocol inside `ibv_post_send` on the calling thread
//! (packet building, checksums, the copy, and on loopback the receive side too), so one
//! posting thread caps the rate at one CPU. There, one posting thread per queue-pair index
//! lets the queue pairs of a peer progress on separate CPUs.

use super::state::rdma_err;
use crate::error::Error;
use kvtransfer_verbs::{QueuePair, SendBatch};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

/// A chain a posting thread failed to post.
pub(super) struct PostFailure {
    pub(super) link: u64,
    /// The job sequence of the chain (0 for a probe).
    pub(super) job: u64,
    /// The queue pair it was to be posted on (names the rail).
    pub(super) qp_num: u32,
    pub(super) error: Error,
}

/// Rings doorbells either inline or through posting threads.
pub(super) enum Doorbell {
    Inline,
    Threads(PostingThreads),
}

impl Doorbell {
    /// Posts `batch` on `qp` now (inline) or hands it to queue-pair index `qp_index`'s
    /// posting thread, leaving an empty batch in its place. A hand-off cannot fail here: a
    /// failed post is reported later by [`Doorbell::take_failures`].
    ///
    /// # Safety
    /// The contract of [`QueuePair::post_send`] for every request in `batch`, where "until
    /// the completion has been polled" also covers the hand-off: the memory the requests
    /// read or write (the link's registered regions and buffers) stays valid until
    /// [`Doorbell::quiesce`] has returned after the queue pair was moved to ERROR.
    pub(super) unsafe fn ring(
        &self,
        link: u64,
        job: u64,
        qp_index: usize,
        qp: &Arc<QueuePair>,
        batch: &mut SendBatch,
    ) -> Result<(), Error> {
        match self {
            Doorbell::Inline => {
                // SAFETY: forwarded from this function's contract.
                let posted = unsafe { qp.post_send(batch) };
                posted.map_err(|e| rdma_err("ibv_post_send", e))
            }
            Doorbell::Threads(threads) => {
                let batch = std::mem::replace(batch, threads.spare_batch());
                threads.hand_off(
                    qp_index,
                    Item::Post {
                        link,
                        job,
                        qp: Arc::clone(qp),
                        batch,
                    },
                );
                Ok(())
            }
        }
    }

    /// Waits until every chain handed off so far has been posted (or has failed): after
    /// this no posting thread touches a queue pair or buffer of a removed link.
    pub(super) fn quiesce(&self) {
        if let Doorbell::Threads(threads) = self {
            threads.quiesce();
        }
    }

    /// Failed hand-offs since the last call (none inline: there the error is returned).
    pub(super) fn take_failures(&self) -> Vec<PostFailure> {
        match self {
            Doorbell::Inline => Vec::new(),
            Doorbell::Threads(threads) => threads.take_failures(),
        }
    }
}

enum Item {
    Post {
        link: u64,
        job: u64,
        qp: Arc<QueuePair>,
        batch: SendBatch,
    },
    Barrier(mpsc::SyncSender<()>),
}

/// What the posting threads hand back to the progress thread.
struct Returns {
    /// Posted batches, cleared, for reuse (no allocation per chain in the steady state).
    batches: Mutex<Vec<SendBatch>>,
    failures: Mutex<Vec<PostFailure>>,
    any_failure: AtomicBool,
    /// The progress thread's eventfd: a failure must wake it.
    wake_fd: libc::c_int,
}

pub(super) struct PostingThreads {
    queues: Vec<mpsc::Sender<Item>>,
    threads: Vec<JoinHandle<()>>,
    returns: Arc<Returns>,
    chain_capacity: usize,
}

impl PostingThreads {
    /// Starts `count` posting threads. `wake_fd` (an eventfd owned by the caller, open
    /// until these threads are joined) is signaled when a post fails.
    pub(super) fn start(
        count: usize,
        chain_capacity: usize,
        wake_fd: libc::c_int,
    ) -> Result<PostingThreads, Error> {
        let returns = Arc::new(Returns {
            batches: Mutex::new(Vec::new()),
            failures: Mutex::new(Vec::new()),
            any_failure: AtomicBool::new(false),
            wake_fd,
        });
        let mut queues = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let (queue, items) = mpsc::channel();
            let returns = Arc::clone(&returns);
            let thread = std::thread::Builder::new()
                .name(format!("kvt-rdma-post{index}"))
                .spawn(move || post_items(items, &returns))
                .map_err(|e| rdma_err("thread spawn", e))?;
            queues.push(queue);
            threads.push(thread);
        }
        Ok(PostingThreads {
            queues,
            threads,
            returns,
            chain_capacity,
        })
    }

    /// An empty batch for the next chain: a posted one handed back, else a new one.
    fn spare_batch(&self) -> SendBatch {
        crate::util::lock(&self.returns.batches)
            .pop()
            .unwrap_or_else(|| SendBatch::with_capacity(self.chain_capacity))
    }

    /// Queues `item` for queue-pair index `qp_index`'s posting thread.
    fn hand_off(&self, qp_index: usize, item: Item) {
        if let Err(mpsc::SendError(Item::Post { link, job, qp, .. })) =
            self.queues[qp_index % self.queues.len()].send(item)
        {
            // Only after a posting thread panicked.
            self.returns.fail(PostFailure {
                link,
                job,
                qp_num: qp.qp_num(),
                error: rdma_err("ibv_post_send", "the posting thread is gone"),
            });
        }
    }

    fn quiesce(&self) {
        let waits: Vec<mpsc::Receiver<()>> = self
            .queues
            .iter()
            .map(|queue| {
                let (passed, wait) = mpsc::sync_channel(1);
                let _ = queue.send(Item::Barrier(passed));
                wait
            })
            .collect();
        for wait in waits {
            // Err: the thread is gone, so it posts nothing either.
            let _ = wait.recv();
        }
    }

    fn take_failures(&self) -> Vec<PostFailure> {
        if !self.returns.any_failure.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *crate::util::lock(&self.returns.failures))
    }
}

impl Drop for PostingThreads {
    fn drop(&mut self) {
        self.queues.clear(); // closes the queues: each thread ends after its last item
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Returns {
    fn fail(&self, failure: PostFailure) {
        crate::util::lock(&self.failures).push(failure);
        self.any_failure.store(true, Ordering::Release);
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a live u64 to the progress thread's eventfd, which
        // stays open until the posting threads are joined (`PostingThreads::start`).
        unsafe { libc::write(self.wake_fd, (&one as *const u64).cast(), 8) };
    }
}

fn post_items(items: mpsc::Receiver<Item>, returns: &Returns) {
    while let Ok(item) = items.recv() {
        match item {
            Item::Post {
                link,
                job,
                qp,
                mut batch,
            } => {
                // SAFETY: `Doorbell::ring`'s caller upheld `post_send`'s contract for this
                // batch and keeps its memory valid until a later `quiesce`, which waits for
                // this post to return.
                if let Err(e) = unsafe { qp.post_send(&mut batch) } {
                    returns.fail(PostFailure {
                        link,
                        job,
                        qp_num: qp.qp_num(),
                        error: rdma_err("ibv_post_send", e),
                    });
                }
                drop(qp);
                batch.clear();
                crate::util::lock(&returns.batches).push(batch);
            }
            Item::Barrier(passed) => {
                let _ = passed.send(());
            }
        }
    }
}
