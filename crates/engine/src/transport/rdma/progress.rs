//! The progress thread: takes commands, posts chains, reaps completions, delivers notices.

use super::answer;
use super::chain::{break_link, finish_phase, post_link};
use super::doorbell::Doorbell;
use super::health::{
    check_ports, judge, quarantine, rail_of_qp, rejoin, try_rejoin, Verdict, PORT_CHECK,
};
use super::notice::{decode_notice, is_extension, slot_of, wants_answer};
use super::state::{
    batch_capacity, tuning, ActiveJob, ChainKind, ChainProgress, Command, Phase, ReceiverLink,
    SenderLink, Shared, NOTICE_SLOTS, NOTICE_SLOT_BYTES,
};
use super::verify;
use crate::error::Error;
use crate::transport::{fail, Arrival, ChecksumCheck};
use crate::wire::Notice;
use kvtransfer_verbs as verbs;
use kvtransfer_verbs::{CompletionQueue, SendBatch, WorkCompletion};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(super) struct Worker {
    shared: Arc<Shared>,
    senders: HashMap<u64, SenderLink>,
    receivers: Vec<ReceiverLink>,
    /// (local rail, qp_num) → sender link id, its rail index and queue-pair index.
    send_qps: HashMap<(usize, u32), (u64, usize, usize)>,
    /// (local rail, qp_num) → index into `receivers`.
    recv_qps: HashMap<(usize, u32), usize>,
    batch: SendBatch,
    completions: Vec<WorkCompletion>,
    /// When the ports' states were last looked at (rail health).
    last_check: std::time::Instant,
    /// Dropped after the senders (field order): the posting threads are joined while the
    /// eventfd in `shared` is still open.
    doorbell: Doorbell,
}

impl Worker {
    pub(super) fn new(shared: Arc<Shared>, doorbell: Doorbell) -> Worker {
        Worker {
            shared,
            senders: HashMap::new(),
            receivers: Vec::new(),
            send_qps: HashMap::new(),
            recv_qps: HashMap::new(),
            batch: SendBatch::with_capacity(batch_capacity()),
            completions: vec![WorkCompletion::default(); 64],
            last_check: std::time::Instant::now(),
            doorbell,
        }
    }

    pub(super) fn run(mut self) {
        let mut idle = 0u32;
        loop {
            let commands = self.shared.take_commands();
            let mut progressed = !commands.is_empty();
            for command in commands {
                if !self.handle(command) {
                    self.stop();
                    return;
                }
            }
            progressed |= self.break_failed_posts();
            self.check_health();
            progressed |= self.post_all();
            progressed |= self.poll_send();
            progressed |= self.poll_recv();
            if progressed {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle < tuning().idle_spins {
                std::thread::yield_now();
                continue;
            }
            self.block();
            idle = 0;
        }
    }

    /// Arms every rail's CQs, re-polls, then sleeps until a completion or a command
    /// arrives (or 100 ms pass: rail health is checked then).
    fn block(&mut self) {
        for rail in &self.shared.rails {
            let armed = rail
                .send_cq
                .request_notify()
                .and_then(|()| rail.recv_cq.request_notify());
            if let Err(e) = armed {
                crate::log::log_error!(
                    "rdma: cannot arm completion queues of {}: {e}",
                    rail.name()
                );
            }
        }
        if self.poll_send() | self.poll_recv() {
            return;
        }
        if !crate::util::lock(&self.shared.commands).is_empty() {
            return;
        }
        let mut fds = vec![libc::pollfd {
            fd: self.shared.wake_fd,
            events: libc::POLLIN,
            revents: 0,
        }];
        for rail in &self.shared.rails {
            fds.push(libc::pollfd {
                fd: rail.channel.fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structs.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        let mut counter = 0u64;
        // SAFETY: reading 8 bytes into a live u64 from our non-blocking eventfd.
        unsafe { libc::read(self.shared.wake_fd, (&mut counter as *mut u64).cast(), 8) };
        for rail in &self.shared.rails {
            while let Ok(Some(_)) = rail.channel.get_event() {}
        }
    }

    /// Returns false on shutdown.
    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::AddSender(link) => {
                for (r, rail) in link.rails.iter().enumerate() {
                    for (index, state) in rail.qps.iter().enumerate() {
                        self.send_qps
                            .insert((rail.local, state.qp.qp_num()), (link.id, r, index));
                    }
                }
                self.senders.insert(link.id, *link);
            }
            Command::AddReceiver(link) => {
                // A peer that reconnects replaces its previous queue pairs and ring.
                if let Some(old) = self
                    .receivers
                    .iter()
                    .position(|r| r.instance == link.instance)
                {
                    self.receivers.swap_remove(old);
                }
                self.receivers.push(*link);
                self.index_receivers();
            }
            Command::Submit(id, job) => match self.senders.get_mut(&id) {
                Some(link) if link.broken.is_none() => {
                    let seq = link.next_job;
                    link.next_job += 1;
                    link.jobs.push_back(ActiveJob {
                        seq,
                        job,
                        progress: ChainProgress::default(),
                        posted_all: false,
                        chains_outstanding: 0,
                        phase: Phase::Data,
                        answered: false,
                    });
                }
                Some(link) => fail(
                    job.done,
                    Error::PeerDisconnected {
                        peer: link.peer.clone(),
                        reason: link.broken.clone().unwrap_or_default(),
                    },
                ),
                None => fail(job.done, Error::Closed),
            },
            Command::RemoveSender(id, error, done) => {
                if let Some(mut link) = self.senders.remove(&id) {
                    for rail in &link.rails {
                        for state in &rail.qps {
                            let _ = state.qp.to_error();
                            self.send_qps.remove(&(rail.local, state.qp.qp_num()));
                        }
                    }
                    link.alive.store(false, Ordering::SeqCst);
                    let jobs: Vec<ActiveJob> = link.jobs.drain(..).collect();
                    // Dropping the link destroys its queue pairs: no DMA after this, so
                    // only now may its jobs fail (once no posting thread holds them).
                    self.doorbell.quiesce();
                    drop(link);
                    for active in jobs {
                        fail(
                            active.job.done,
                            error.as_ref().map_or(Error::Closed, Error::clone),
                        );
                    }
                }
                let _ = done.send(());
            }
            Command::Isolate(writer, done) => {
                let _ = done.send(self.isolate(&writer));
            }
            Command::Shutdown => return false,
        }
        true
    }

    /// Cuts the writer named `writer` off: its receiving queue pairs go to the error state
    /// (incoming WRITEs then fail) and are destroyed with their links (no DMA after that).
    fn isolate(&mut self, writer: &str) -> usize {
        let before = self.receivers.len();
        self.receivers.retain(|receiver| {
            if receiver.peer_name != writer {
                return true;
            }
            for (_, qp) in &receiver.qps {
                let _ = qp.to_error();
            }
            false
        });
        self.index_receivers();
        before - self.receivers.len()
    }

    fn index_receivers(&mut self) {
        self.recv_qps.clear();
        for (index, receiver) in self.receivers.iter().enumerate() {
            for (rail, qp) in &receiver.qps {
                self.recv_qps.insert((*rail, qp.qp_num()), index);
            }
        }
    }

    fn stop(&mut self) {
        for link in self.senders.values() {
            for rail in &link.rails {
                for state in &rail.qps {
                    let _ = state.qp.to_error();
                }
            }
        }
        self.doorbell.quiesce();
        for (_, mut link) in self.senders.drain() {
            for active in link.jobs.drain(..) {
                fail(active.job.done, Error::Closed);
            }
            link.alive.store(false, Ordering::SeqCst);
        }
        self.receivers.clear();
        // Fail commands that raced with the shutdown.
        let rest = self.shared.take_commands();
        for command in rest {
            match command {
                Command::Submit(_, job) => fail(job.done, Error::Closed),
                Command::RemoveSender(_, _, done) => {
                    let _ = done.send(());
                }
                Command::Isolate(_, done) => {
                    let _ = done.send(0);
                }
                _ => {}
            }
        }
    }

    /// Every `PORT_CHECK`, when a link has several rails: quarantines rails whose port went
    /// down, and tries quarantined ones whose cooldown passed.
    fn check_health(&mut self) {
        let now = std::time::Instant::now();
        if now.duration_since(self.last_check) < PORT_CHECK {
            return;
        }
        self.last_check = now;
        if self.senders.values().all(|link| link.rails.len() < 2) {
            return;
        }
        let down: Vec<bool> = self
            .shared
            .rails
            .iter()
            .map(|rail| {
                !rail
                    .context
                    .query_port(rail.port)
                    .is_ok_and(|p| p.state_active)
            })
            .collect();
        for link in self.senders.values_mut() {
            if link.rails.len() < 2 || link.broken.is_some() {
                continue;
            }
            check_ports(
                &self.shared,
                &self.doorbell,
                &mut self.send_qps,
                link,
                &down,
            );
            try_rejoin(
                &self.doorbell,
                &mut self.send_qps,
                link,
                &down,
                &mut self.batch,
                now,
            );
        }
    }

    /// Handles the chains a posting thread failed to post: the rail is quarantined while
    /// another is healthy (a failed probe quarantines it again), else the link breaks.
    fn break_failed_posts(&mut self) -> bool {
        let failures = self.doorbell.take_failures();
        let any = !failures.is_empty();
        for failure in failures {
            let Some(link) = self.senders.get_mut(&failure.link) else {
                continue;
            };
            if link.broken.is_some() {
                continue;
            }
            let status = failure.error.to_string();
            let rail = rail_of_qp(link, failure.qp_num);
            match rail.map(|r| (r, judge(link, r))) {
                Some((_, Verdict::Ignore)) => {}
                Some((r, Verdict::Quarantine)) => {
                    link.rails[r]
                        .counters
                        .failures
                        .fetch_add(1, Ordering::Relaxed);
                    let reason = format!("a post failed: {status}");
                    quarantine(&self.doorbell, &mut self.send_qps, link, r, &reason);
                }
                Some((_, Verdict::Break)) | None => {
                    break_link(
                        &self.doorbell,
                        link,
                        Some(failure.job),
                        failure.error,
                        &status,
                    );
                }
            }
        }
        any
    }

    fn post_all(&mut self) -> bool {
        let mut progressed = false;
        for link in self.senders.values_mut() {
            progressed |= post_link(&self.shared, &self.doorbell, link, &mut self.batch);
        }
        progressed
    }

    fn poll_send(&mut self) -> bool {
        let mut any = false;
        for rail in 0..self.shared.rails.len() {
            let cq = Arc::clone(&self.shared.rails[rail].send_cq);
            any |= self.drain(rail, &cq, "send", Self::on_send_completion);
        }
        any
    }

    /// Polls `cq` (of local rail `rail`) until it is empty, handing every completion to
    /// `handle`. Returns whether there was any.
    fn drain(
        &mut self,
        rail: usize,
        cq: &CompletionQueue,
        which: &str,
        handle: fn(&mut Self, usize, &WorkCompletion),
    ) -> bool {
        let mut any = false;
        loop {
            let n = match cq.poll(&mut self.completions) {
                Ok(n) => n,
                Err(e) => {
                    crate::log::log_error!("rdma: ibv_poll_cq ({which}) failed: {e}");
                    return any;
                }
            };
            if n == 0 {
                return any;
            }
            any = true;
            for i in 0..n {
                let wc = self.completions[i];
                handle(self, rail, &wc);
            }
        }
    }

    fn on_send_completion(&mut self, local_rail: usize, wc: &WorkCompletion) {
        let Some(&(link_id, rail_index, qp_index)) = self.send_qps.get(&(local_rail, wc.qp_num))
        else {
            return self.answer_sent(local_rail, wc);
        };
        let Some(link) = self.senders.get_mut(&link_id) else {
            return;
        };
        if link.broken.is_some() {
            return; // every job already failed
        }
        if !wc.is_success() {
            let status = verbs::wc_status_text(wc.status).to_string();
            let verdict = judge(link, rail_index);
            if verdict == Verdict::Ignore {
                return;
            }
            if verdict == Verdict::Quarantine {
                link.rails[rail_index]
                    .counters
                    .failures
                    .fetch_add(1, Ordering::Relaxed);
                let reason = format!("a work request failed: {status}");
                quarantine(
                    &self.doorbell,
                    &mut self.send_qps,
                    link,
                    rail_index,
                    &reason,
                );
                return;
            }
            let error = Error::RdmaCompletion {
                peer: link.peer.clone(),
                status: status.clone(),
                status_code: wc.status,
                vendor_err: wc.vendor_err,
            };
            crate::log::log_error!("{error}");
            // The failing request's chain names the call it belongs to.
            link.rails[rail_index]
                .counters
                .failures
                .fetch_add(1, Ordering::Relaxed);
            let failing_job = link.rails[rail_index].qps[qp_index]
                .chains
                .iter()
                .find(|c| c.id == wc.wr_id)
                .map(|c| c.job);
            break_link(&self.doorbell, link, failing_job, error, &status);
            return;
        }
        let rail = &mut link.rails[rail_index];
        let qp = &mut rail.qps[qp_index];
        let Some(chain) = qp.chains.pop_front() else {
            let reason = "completion for no posted chain".to_string();
            let error = Error::protocol(link.peer.clone(), reason.clone());
            break_link(&self.doorbell, link, None, error, &reason);
            return;
        };
        if chain.id != wc.wr_id {
            let reason = format!(
                "completion {} out of order (expected {})",
                wc.wr_id, chain.id
            );
            let error = Error::protocol(link.peer.clone(), reason.clone());
            break_link(&self.doorbell, link, None, error, &reason);
            return;
        }
        qp.outstanding -= chain.wrs;
        rail.counters
            .bytes
            .fetch_add(chain.bytes, Ordering::Relaxed);
        rail.counters
            .wrs
            .fetch_add(u64::from(chain.wrs), Ordering::Relaxed);
        match chain.kind {
            ChainKind::Notice { slots } => link.notices_in_flight -= slots,
            ChainKind::Probe => return rejoin(link, rail_index),
            _ => {}
        }
        let Some(position) = link.jobs.iter().position(|j| j.seq == chain.job) else {
            return;
        };
        link.jobs[position].chains_outstanding -= 1;
        finish_phase(link, position, self.shared.settings.gdr_flush);
    }

    /// An answer to an acked call came in on a queue pair of sending link `link`.
    fn take_answer(&mut self, link: u64, rail: usize, wc: &WorkCompletion) {
        if let Some(link) = self.senders.get_mut(&link) {
            answer::take_answer(link, rail, wc, self.shared.settings.gdr_flush);
        }
    }

    /// Answers the acked call whose notice came in on queue pair `qp_num` of local rail
    /// `rail`, from receiver `index`.
    fn answer(&mut self, rail: usize, index: usize, qp_num: u32, imm: u32) {
        let receiver = &mut self.receivers[index];
        let position = receiver
            .qps
            .iter()
            .position(|(r, qp)| *r == rail && qp.qp_num() == qp_num);
        if let Some(qp) = position {
            answer::answer(receiver, qp, imm);
        }
    }

    /// A send completion of no sending link: an answer this side posted as a receiver.
    fn answer_sent(&mut self, rail: usize, wc: &WorkCompletion) {
        let Some(&index) = self.recv_qps.get(&(rail, wc.qp_num)) else {
            return;
        };
        let receiver = &mut self.receivers[index];
        let position = receiver
            .qps
            .iter()
            .position(|(r, qp)| *r == rail && qp.qp_num() == wc.qp_num);
        if let Some(qp) = position {
            answer::answer_sent(receiver, qp, wc);
        }
    }

    fn poll_recv(&mut self) -> bool {
        let mut any = false;
        for rail in 0..self.shared.rails.len() {
            let cq = Arc::clone(&self.shared.rails[rail].recv_cq);
            any |= self.drain(rail, &cq, "receive", Self::on_recv_completion);
        }
        any
    }

    fn on_recv_completion(&mut self, rail: usize, wc: &WorkCompletion) {
        if wc.status == verbs::WC_STATUS_WR_FLUSH_ERR {
            return; // a receive queue being torn down
        }
        if wc.is_success() {
            if let Some(&(link, rail_index, _)) = self.send_qps.get(&(rail, wc.qp_num)) {
                // On a queue pair this side writes through: the receiver's answer.
                self.take_answer(link, rail_index, wc);
            } else if let Some((receiver, imm)) = self.deliver_notice(rail, wc) {
                self.answer(rail, receiver, wc.qp_num, imm);
            }
        } else {
            crate::log::log_error!(
                "rdma: notice receive failed: {} (status {})",
                verbs::wc_status_text(wc.status),
                wc.status
            );
        }
        // Repost only after the slot was read: until then the sender cannot reuse it.
        if let Err(e) = self.shared.rails[rail].srq.post_recv(wc.wr_id) {
            crate::log::log_error!("rdma: cannot repost a notice receive: {e}");
        }
    }

    /// Hands a notice's arrival to the sink, after checking a checksummed call's bytes
    /// (`verify.rs`), or keeps an extension slot's part of a landing; returns (receiver
    /// index, immediate) when the writer waits for an answer (an acked call: its notice, or
    /// its empty record when it has no tag, was taken).
    fn deliver_notice(&mut self, rail: usize, wc: &WorkCompletion) -> Option<(usize, u32)> {
        let &index = self.recv_qps.get(&(rail, wc.qp_num))?;
        let imm = wc.imm_data?;
        let slot = slot_of(imm);
        let receiver = &mut self.receivers[index];
        if slot >= NOTICE_SLOTS {
            crate::log::log_error!(
                "rdma: notice from {} names slot {slot} outside its ring",
                receiver.peer_name
            );
            return None;
        }
        let mut record = [0u8; NOTICE_SLOT_BYTES];
        // SAFETY: the slot lies inside the ring (slot < NOTICE_SLOTS); the NIC finished
        // writing it before raising this completion and cannot write it again until the
        // receive is reposted, so copying it through a raw pointer races with nothing.
        unsafe {
            std::ptr::copy_nonoverlapping(
                receiver
                    .ring
                    .bytes
                    .as_ptr()
                    .add(slot as usize * NOTICE_SLOT_BYTES),
                record.as_mut_ptr(),
                NOTICE_SLOT_BYTES,
            )
        };
        // The queue pair's index in the receiver (its extension slots are kept per pair).
        let qp = || {
            receiver
                .qps
                .iter()
                .position(|(r, qp)| *r == rail && qp.qp_num() == wc.qp_num)
                .unwrap_or(usize::MAX)
        };
        if is_extension(imm) {
            let qp = qp();
            verify::take_extension(receiver, qp, &record);
            return None;
        }
        let answer = wants_answer(imm).then_some((index, imm));
        match decode_notice(&record) {
            // An acked call without a tag: nothing to deliver, only to answer.
            Some([]) if answer.is_some() => return answer,
            _ => {}
        }
        match decode_notice(&record).map(Notice::decode) {
            Some(Ok(notice)) => {
                // A plain notice costs nothing more; a checksummed one has its bytes summed
                // here, before anyone learns of the arrival.
                let check = match notice.checksum {
                    None if receiver.assembly.iter().all(Vec::is_empty) => ChecksumCheck::Absent,
                    _ => {
                        let qp = qp();
                        verify::check(&self.shared.table, receiver, qp, &notice, &record)
                    }
                };
                if let Some(sink) = &self.shared.arrivals {
                    sink(Arrival::of(&receiver.peer_name, &notice, check));
                }
                answer
            }
            _ => {
                // Not answered: the writer's call fails by its timeout, never resolves OK.
                crate::log::log_error!("rdma: malformed notice from {}", receiver.peer_name);
                None
            }
        }
    }
}
