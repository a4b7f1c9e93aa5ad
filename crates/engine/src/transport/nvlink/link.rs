//! The writer's link: each job becomes one submission on the link's own stream (the copy
//! kernel for small blocks, else the copy engines; `gpu::copy`) straight into the
//! acceptor's imported memory, followed by an event. A completion thread waits for the
//! events in order, sends the arrival notice only after the bytes have landed, and
//! completes the job; a job that asks for an answer (`delivery: 'acked'`) waits for the
//! acceptor's instead. A watch thread reads the side channel: answers complete their jobs,
//! and its end means the acceptor's process is gone, and then pending jobs fail and the
//! imports are released.
//!
//! A checksummed call (`checksum: 'crc32c'`) also launches the CRC-32C kernel over its
//! source bytes on the same stream, behind its copy: when the event has passed, the sum
//! is in the slot's result word, and the completion thread writes it into the notice
//! before sending it.
//!
//! Up to [`SLOTS`] jobs are in flight (one descriptor table and event each), so layer-wise
//! calls pipeline; a further submit waits for the oldest.
//!
//! The acceptor's warm re-attach reaches the link over the side channel (`reopen.rs`): at
//! its park the link drops its mappings (writes fail `ERR_FENCED` meanwhile), and after
//! its swap it opens the new memory table, which [`Link::rekey`] waits for.

use super::memory::Imports;
use super::message::Message;
use super::socket;
use crate::error::Error;
use crate::gpu::checksum::CrcKernel;
use crate::gpu::copy::{CopyQueue, CopySettings, Descriptors};
use crate::layout::RegionTable;
use crate::transport::{
    fail, for_each_copy, push_call, BreakHook, Done, Link, TransportKind, WriteJob,
};
use crate::wire::{notice_has_checksum, set_checksum};
use kvtransfer_cuda::{Crc32cSum, Event, Gpu, RunKinds};
use std::collections::{HashMap, VecDeque};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

mod reopen;

/// Jobs in flight per link at most.
pub(crate) const SLOTS: usize = 8;
/// Calls whose copies average fewer bytes go through the copy kernel (one launch, SMs
/// move the bytes over NVLink), larger ones to the copy engines (one cuMemcpyBatchAsync).
/// Peer copies reach the link's rate with the kernel at sizes where host↔device
/// copies do better on the copy engines (docs/performance.md, NVLink).
const KERNEL_BELOW_AVERAGE_BYTES: usize = usize::MAX;

use crate::util::lock;

struct Slot {
    desc: Descriptors,
    event: Event,
    /// The CRC-32C kernel's buffers, made for the slot's first checksummed call.
    sum: Option<Crc32cSum>,
}

struct Pending {
    slot: Slot,
    done: Done,
    /// The call's encoded arrival notice (`wire::Notice`), sent once its bytes landed.
    tag: Option<Vec<u8>>,
    /// Completes on the acceptor's answer, not when the bytes landed.
    acked: bool,
    /// The slot's sum holds the call's checksum once its event passed.
    summed: bool,
    /// A checksummed call's landing (`wire::Landing`), sent with its notice; else empty.
    landing: Vec<u8>,
}

struct Submitter {
    copies: CopyQueue,
    free: Vec<Slot>,
    /// The acceptor's regions as mapped here, per region; `None` while its memory is
    /// parked (warm re-attach): calls then fail unsent.
    bases: Option<Arc<[u64]>>,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Pending>,
    /// Submitted and not completed yet (queued or being completed).
    in_flight: usize,
}

struct Shared {
    peer: String,
    table: Arc<RegionTable>,
    gpu: Arc<Gpu>,
    /// The acceptor runs in this process (its addresses are used as they are).
    same_process: bool,
    /// The CRC-32C kernel of `gpu`, loaded for the first checksummed call.
    crc: Arc<CrcKernel>,
    submitter: Mutex<Submitter>,
    slot_freed: Condvar,
    queue: Mutex<Queue>,
    queue_changed: Condvar,
    /// Set once the link is broken, cancelled or shut: every later completion fails so.
    failure: Mutex<Option<Error>>,
    closing: AtomicBool,
    socket: UnixStream,
    imports: Mutex<Option<Imports>>,
    /// Acked jobs whose bytes landed and whose answer has not come yet, by sequence number.
    awaiting: Mutex<HashMap<u64, Done>>,
    next_seq: AtomicU64,
    /// Told when the link breaks on its own (the peer's process went away, a copy failed).
    on_break: BreakHook,
    /// The number of the last memory table opened after a warm re-attach of the acceptor
    /// (0: the handshake's), which `rekey` waits for.
    reopened: Mutex<u64>,
    reopened_changed: Condvar,
}

pub(crate) struct NvlinkLink {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl NvlinkLink {
    pub fn start(
        peer: &str,
        table: Arc<RegionTable>,
        gpu: Arc<Gpu>,
        imports: Imports,
        socket: UnixStream,
        crc: Arc<CrcKernel>,
        on_break: BreakHook,
    ) -> crate::error::Result<NvlinkLink> {
        let _current = gpu.scoped()?;
        let copies = CopyQueue::new(
            Arc::clone(&gpu),
            CopySettings::from_env().kernel_below(KERNEL_BELOW_AVERAGE_BYTES),
        )?;
        crate::log::debug!("nvlink to {peer}: copies {}", copies.describe());
        let mut free = Vec::with_capacity(SLOTS);
        for _ in 0..SLOTS {
            free.push(Slot {
                desc: copies.descriptors()?,
                event: gpu.event()?,
                sum: None,
            });
        }
        let watch_socket = socket
            .try_clone()
            .map_err(|e| Error::io(peer, "clone the side channel", e))?;
        let shared = Arc::new(Shared {
            peer: peer.to_string(),
            table,
            same_process: imports.same_process,
            gpu,
            crc,
            submitter: Mutex::new(Submitter {
                copies,
                free,
                bases: Some(Arc::clone(&imports.bases)),
            }),
            slot_freed: Condvar::new(),
            queue: Mutex::new(Queue::default()),
            queue_changed: Condvar::new(),
            failure: Mutex::new(None),
            closing: AtomicBool::new(false),
            socket,
            imports: Mutex::new(Some(imports)),
            awaiting: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(0),
            on_break,
            reopened: Mutex::new(0),
            reopened_changed: Condvar::new(),
        });
        let spawn = |name: &str, body: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(body)
                .map_err(|e| Error::io(peer, "spawn an nvlink thread", e))
        };
        let completer = {
            let shared = Arc::clone(&shared);
            spawn("kvt-nvlink-done", Box::new(move || complete_loop(&shared)))?
        };
        let watcher = {
            let shared = Arc::clone(&shared);
            spawn(
                "kvt-nvlink-watch",
                Box::new(move || watch(&shared, watch_socket)),
            )?
        };
        Ok(NvlinkLink {
            shared,
            threads: Mutex::new(vec![completer, watcher]),
        })
    }
}

impl Shared {
    fn failure(&self) -> Option<Error> {
        lock(&self.failure).clone()
    }

    /// Marks the link broken with `error` (the first error stays unless `replace`).
    /// A break the link found itself (not `cancel`'s, which replaces, nor one while it
    /// closes) is reported to `on_break`.
    fn break_with(&self, error: Error, replace: bool) {
        let first = {
            let mut failure = lock(&self.failure);
            let first = failure.is_none();
            if first || replace {
                *failure = Some(error.clone());
            }
            first
        };
        if first && !replace && !self.closing.load(Ordering::SeqCst) {
            (self.on_break)(&error);
        }
        // Submitters waiting for a slot, and `rekey` waiting for a table, see the failure.
        self.slot_freed.notify_all();
        drop(lock(&self.reopened));
        self.reopened_changed.notify_all();
        // No answer can come any more.
        let failure = self.failure().unwrap_or(error);
        let waiting: Vec<Done> = lock(&self.awaiting).drain().map(|(_, done)| done).collect();
        for done in waiting {
            fail(done, failure.clone());
        }
    }

    /// Sends `message` on the side channel; a failure breaks the link.
    fn send(&self, message: Message<'_>) -> Result<(), Error> {
        socket::send(&self.socket, &message.encode(), &[]).map_err(|e| {
            let error = Error::PeerDisconnected {
                peer: self.peer.clone(),
                reason: format!("the arrival notice could not be sent over the NVLink side channel ({e}); the bytes were written"),
            };
            self.break_with(error.clone(), false);
            error
        })
    }

    /// Asks the acceptor to answer a job whose bytes landed; `done` completes on the answer
    /// (the watch thread) or with the link's failure.
    fn ask_answer(&self, done: Done, notice: Option<&[u8]>, landing: &[u8]) {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        lock(&self.awaiting).insert(seq, done);
        let sent = self.send(Message::Acked {
            seq,
            notice,
            landing,
        });
        // A break that came before the insert did not sweep this job: fail it here (unless
        // a later sweep already did).
        if let Some(error) = sent.err().or_else(|| self.failure()) {
            if let Some(done) = lock(&self.awaiting).remove(&seq) {
                fail(done, error);
            }
        }
    }

    /// The acceptor answered job `seq`.
    fn answered(&self, seq: u64) {
        match lock(&self.awaiting).remove(&seq) {
            Some(done) => {
                let _ = done.send(Ok(()));
            }
            None => crate::log::debug!(
                "nvlink to {}: an answer to call {seq}, which waits for none; ignored",
                self.peer
            ),
        }
    }

    /// Waits until no job is in flight. Taking the submit lock first means no submission
    /// is half done: after a failure was set, none can start either.
    fn drain(&self) {
        drop(lock(&self.submitter));
        let mut queue = lock(&self.queue);
        while queue.in_flight > 0 {
            queue = crate::util::wait(&self.queue_changed, queue);
        }
    }

    /// Once nothing is in flight any more, unmaps the acceptor's memory.
    fn release_imports(&self) {
        self.drain();
        let imports = lock(&self.imports).take();
        if imports.is_some() {
            let _current = self.gpu.scoped();
            drop(imports);
            crate::log::debug!("nvlink to {}: imports released", self.peer);
        }
    }
}

fn complete_loop(shared: &Shared) {
    let _ = shared.gpu.bind();
    loop {
        let pending = {
            let mut queue = lock(&shared.queue);
            loop {
                if let Some(pending) = queue.jobs.pop_front() {
                    break pending;
                }
                if shared.closing.load(Ordering::SeqCst) {
                    return;
                }
                queue = crate::util::wait(&shared.queue_changed, queue);
            }
        };
        let landed = pending.slot.event.synchronize();
        let Pending {
            slot,
            done,
            mut tag,
            acked,
            summed,
            landing,
        } = pending;
        if let (true, Ok(()), Some(notice), Some(sum)) = (summed, &landed, &mut tag, &slot.sum) {
            set_checksum(notice, sum.value());
        }
        lock(&shared.submitter).free.push(slot);
        shared.slot_freed.notify_one();
        let landed = match (landed, shared.failure()) {
            (_, Some(error)) => Err(error),
            (Err(e), None) => {
                let error = Error::from(e);
                shared.break_with(error.clone(), false);
                Err(error)
            }
            (Ok(()), None) => Ok(()),
        };
        match (landed, tag) {
            (Err(error), _) => fail(done, error),
            (Ok(()), tag) if acked => shared.ask_answer(done, tag.as_deref(), &landing),
            (Ok(()), None) => {
                let _ = done.send(Ok(()));
            }
            (Ok(()), Some(notice)) => match shared.send(Message::Notice {
                notice: &notice,
                landing: &landing,
            }) {
                Ok(()) => {
                    let _ = done.send(Ok(()));
                }
                Err(error) => fail(done, error),
            },
        }
        lock(&shared.queue).in_flight -= 1;
        shared.queue_changed.notify_all();
    }
}

/// Reads the side channel until it ends: after its table the acceptor sends answers to
/// acked jobs and, at a warm re-attach, `Release` and a new `Table`; the end (or an error,
/// or another message) means its process is gone (or it closed the connection).
fn watch(shared: &Shared, socket: UnixStream) {
    let ended = loop {
        let Ok(Some((bytes, _))) = socket::receive(&socket) else {
            break None;
        };
        match Message::decode(&bytes) {
            Some(Message::Answer { seq }) => shared.answered(seq),
            Some(Message::Release) => shared.park(),
            Some(Message::Table { generation, table }) => {
                if let Err(error) = shared.reopen(&socket, generation, table) {
                    break Some(error);
                }
            }
            _ => {
                crate::log::debug!(
                    "nvlink to {}: a side-channel message that is no answer",
                    shared.peer
                );
                break None;
            }
        }
    };
    if shared.closing.load(Ordering::SeqCst) {
        return;
    }
    crate::log::debug!(
        "nvlink to {}: the peer closed its side channel",
        shared.peer
    );
    shared.break_with(
        ended.unwrap_or_else(|| Error::PeerDisconnected {
            peer: shared.peer.clone(),
            reason: "the peer's process closed the NVLink side channel (it exited or closed its communicator); its memory is no longer written".into(),
        }),
        false,
    );
    let _ = socket.shutdown(std::net::Shutdown::Both);
    shared.release_imports();
}

impl Link for NvlinkLink {
    fn submit(&self, job: WriteJob) {
        let shared = &self.shared;
        let mut submitter = lock(&shared.submitter);
        let mut slot = loop {
            if let Some(error) = shared.failure() {
                drop(submitter);
                return fail(job.done, error);
            }
            if submitter.bases.is_none() {
                drop(submitter);
                return fail(job.done, reopen::parked(&shared.peer));
            }
            if let Some(slot) = submitter.free.pop() {
                break slot;
            }
            submitter = crate::util::wait(&shared.slot_freed, submitter);
        };
        // The copy contract of both paths below: the sources are this engine's registered
        // device regions (valid while it lives) and the destinations lie in the acceptor's
        // imported regions (the planner checked every id against both sides' block
        // counts), which stay mapped until every job in flight has completed
        // (`release_imports` drains first); sources and destinations do not overlap
        // (different allocations, or distinct blocks). The slot's table is free: its
        // previous launch's event completed before the slot was returned. The context is
        // current.
        let summed = job.plan.notice.as_deref().is_some_and(notice_has_checksum);
        let submitted = (|| {
            let _current = shared.gpu.scoped()?;
            let bases = Arc::clone(submitter.bases.as_ref().expect("checked above"));
            let copies = &mut submitter.copies;
            let table = &shared.table;
            let kinds = table.layout.kinds();
            // Tensor-parallel shards that are not whole blocks take the gathering path:
            // one copy per segment (`CopyOp::at`).
            let whole = job.plan.shard.kv.is_whole() && job.plan.shard.scale.is_whole();
            if whole && copies.takes_runs(job.plan.runs.len(), kinds) {
                // The hot path: the planned runs go to the kernel as they are, with where
                // each kind of this layer is on both sides.
                let mut places = RunKinds::default();
                for kind in 0..kinds {
                    let region = (job.plan.layer * kinds + kind) as usize;
                    let k = kind as usize;
                    places.local[k] = table.regions()[region].addr;
                    places.remote[k] = bases[region];
                    places.block_bytes[k] = table.layout.kind_block_bytes(kind);
                }
                // SAFETY: the copy contract above.
                unsafe { copies.launch_runs(&mut slot.desc, &job.plan.runs, kinds, &places) }?;
            } else {
                for_each_copy(
                    table,
                    &job.plan.shard,
                    job.plan.layer,
                    &job.plan.runs,
                    |op| {
                        let mut done = 0;
                        while done < op.len {
                            let (local, remote, contiguous) = op.at(done);
                            copies.push(
                                bases[op.region as usize] + remote,
                                local,
                                contiguous as usize,
                            );
                            done += contiguous;
                        }
                    },
                );
                // SAFETY: the copy contract above.
                unsafe { copies.submit(&mut slot.desc) }?;
            }
            if summed {
                let kernel = shared.crc.get()?;
                let sum = match &mut slot.sum {
                    Some(sum) => sum,
                    empty => empty.insert(kernel.sum_buffers()?),
                };
                push_call(sum, table, &job.plan)?;
                // SAFETY: the sources are this engine's registered device regions (valid
                // while it lives, only read); the slot's sum is refilled only after its
                // event passed; the stream is the kernel's GPU's, whose context is current.
                unsafe { kernel.launch(copies.stream(), sum) }?;
            }
            copies.record(&slot.event)
        })();
        match submitted {
            Ok(()) => {
                let mut queue = lock(&shared.queue);
                queue.jobs.push_back(Pending {
                    slot,
                    done: job.done,
                    tag: job.plan.notice,
                    acked: job.plan.acked,
                    summed,
                    landing: job.plan.landing.unwrap_or_default(),
                });
                queue.in_flight += 1;
                drop(queue);
                shared.queue_changed.notify_all();
            }
            Err(e) => {
                submitter.free.push(slot);
                drop(submitter);
                fail(job.done, Error::from(e));
            }
        }
    }

    fn is_alive(&self) -> bool {
        lock(&self.shared.failure).is_none()
    }

    fn shutdown(&self) {
        let shared = &self.shared;
        if shared.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        shared.break_with(Error::Closed, false);
        shared.drain();
        let _ = shared.socket.shutdown(std::net::Shutdown::Both);
        shared.queue_changed.notify_all();
        for thread in std::mem::take(&mut *lock(&self.threads)) {
            let _ = thread.join();
        }
        shared.release_imports();
    }

    fn cancel(&self, error: Error) {
        let shared = &self.shared;
        shared.break_with(error, true);
        {
            // No byte lands after this returns: the stream has finished every queued copy.
            let submitter = lock(&shared.submitter);
            let _current = shared.gpu.scoped();
            let _ = submitter.copies.synchronize();
        }
        shared.drain();
        shared.release_imports();
        shared.closing.store(true, Ordering::SeqCst);
        let _ = shared.socket.shutdown(std::net::Shutdown::Both);
        shared.queue_changed.notify_all();
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Nvlink
    }

    /// `keys`: the number of the acceptor's memory table after its warm re-attach (its
    /// `region_keys`); returns once this link opened that table (1), or fails typed: the
    /// link broke (it could not open it, or the acceptor went away), or it did not come in
    /// time (the link then breaks, and the writer connects again).
    fn rekey(&self, keys: &[u8]) -> crate::error::Result<usize> {
        self.shared.wait_reopened(keys)
    }

    fn receiver_checks(&self) -> crate::transport::ReceiverChecks {
        crate::transport::ReceiverChecks {
            verifies_checksums: true,
            sums_gpu_memory: true,
            link_sums_gpu_sources: true,
            answers_acked_calls: true,
            landing_limit: Some(super::message::MAX_LANDING_BYTES),
        }
    }
}

impl Drop for NvlinkLink {
    fn drop(&mut self) {
        self.shutdown();
        for thread in std::mem::take(&mut *lock(&self.threads)) {
            let _ = thread.join();
        }
    }
}
