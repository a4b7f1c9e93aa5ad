//! Building and posting chains of work requests: WRITE data, the GDR flush READ, the
//! arrival notice; and failing a link on a bad completion or post.

use super::doorbell::Doorbell;
use super::notice::{encode_slot, extension_imm, extension_slots, notice_imm, split_landing};
use super::state::{
    tuning, ActiveJob, Chain, ChainKind, ChainProgress, Phase, RailState, SendRail, SenderLink,
    Shared, CHAIN_BYTES, MAX_WRITE_BYTES, NOTICE_SLOT_BYTES, NOTICE_STAGING_SLOTS,
};
use crate::error::Error;
use crate::layout::RegionTable;
use crate::transport::{copy_op, fail, JobView};
use kvtransfer_verbs::{LocalBuf, MemoryRegion, RemoteBuf, SendBatch};
use std::sync::atomic::Ordering;

/// Moves a job whose posted requests all completed to its next phase: flush read, then
/// notice (a tagged or acked call), then done (an acked call once the receiver answered).
pub(super) fn finish_phase(link: &mut SenderLink, position: usize, gdr_flush: bool) {
    let active = &mut link.jobs[position];
    if active.chains_outstanding > 0 || !active.posted_all {
        return;
    }
    let plan = &active.job.plan;
    let next = match active.phase {
        Phase::Data if gdr_flush => Some(Phase::Flush),
        Phase::Data | Phase::Flush if plan.notice.is_some() || plan.acked => Some(Phase::Notice),
        _ => None,
    };
    match next {
        Some(phase) => {
            active.phase = phase;
            link.control.push_back(active.seq);
        }
        // Its notice landed; the receiving engine has not answered yet.
        None if plan.acked && !active.answered => {}
        None => {
            if let Some(done) = link.jobs.remove(position) {
                let _ = done.job.done.send(Ok(()));
            }
        }
    }
}

/// Fails every job of a broken link: the one whose request failed with `error`, the rest
/// as disconnected; moves its queue pairs to the error state.
pub(super) fn break_link(
    doorbell: &Doorbell,
    link: &mut SenderLink,
    failing_job: Option<u64>,
    error: Error,
    status: &str,
) {
    let reason = format!("the RDMA connection broke: {status}; connect again");
    for rail in &link.rails {
        rail.counters.set_state(RailState::Failed);
        rail.counters.set_reason(Some(reason.clone()));
    }
    let first = link.broken.is_none();
    link.broken = Some(reason.clone());
    link.alive.store(false, Ordering::SeqCst);
    if first {
        (link.on_break)(&error);
    }
    for rail in &link.rails {
        for state in &rail.qps {
            let _ = state.qp.to_error();
        }
    }
    // A chain still waiting in a posting thread must not read a buffer its failed caller
    // may free.
    doorbell.quiesce();
    let mut error = Some(error);
    for active in link.jobs.drain(..) {
        let this = if Some(active.seq) == failing_job || failing_job.is_none() {
            error.take().unwrap_or_else(|| Error::PeerDisconnected {
                peer: link.peer.clone(),
                reason: reason.clone(),
            })
        } else {
            Error::PeerDisconnected {
                peer: link.peer.clone(),
                reason: reason.clone(),
            }
        };
        fail(active.job.done, this);
    }
    link.control.clear();
    link.awaiting.clear();
}

/// Posts what fits of a link's pending work. Returns whether anything was posted.
pub(super) fn post_link(
    shared: &Shared,
    doorbell: &Doorbell,
    link: &mut SenderLink,
    batch: &mut SendBatch,
) -> bool {
    if link.broken.is_some() {
        return false;
    }
    let mut progressed = false;
    // Flush reads and notices first: they finish calls whose data already landed.
    while let Some(&seq) = link.control.front() {
        match post_control(doorbell, link, seq, batch) {
            Ok(true) => {
                link.control.pop_front();
                progressed = true;
            }
            Ok(false) => break,
            Err((job, error, status)) => {
                break_link(doorbell, link, Some(job), error, &status);
                return true;
            }
        }
    }
    let table = &shared.table;
    let mut job_index = 0;
    while job_index < link.jobs.len() {
        if link.jobs[job_index].posted_all {
            job_index += 1;
            continue;
        }
        let Some((rail_index, qp_index)) = pick_qp(link) else {
            break;
        };
        let rail = &link.rails[rail_index];
        let room =
            (rail.qps[qp_index].qp.caps().max_send_wr - rail.qps[qp_index].outstanding) as usize;
        let chain_id = link.next_chain;
        link.next_chain += 1;
        batch.clear();
        let limit = room.min(tuning().chain_wrs);
        let active = &mut link.jobs[job_index];
        let before = active.progress.bytes;
        let finished = fill_chain(
            table,
            &shared.rails[rail.local].region_mrs,
            &rail.remote_regions,
            active,
            batch,
            chain_id,
            limit,
        );
        if batch.is_empty() {
            // Nothing (more) to write: e.g. a notice-only call.
            active.posted_all = true;
            finish_phase(link, job_index, shared.settings.gdr_flush);
            progressed = true;
            continue;
        }
        let bytes = active.progress.bytes - before;
        let count = batch.len() as u32;
        let seq = active.seq;
        let thread = rail_index * rail.qps.len() + qp_index;
        // SAFETY: every request reads a registered local region (lkey of its MR under this
        // rail's device) that stays valid until the engine closes (and its posting threads
        // are joined); remote ranges were bounds-checked by the planner against the peer's
        // layout; `room` keeps outstanding ≤ max_send_wr, counted from the hand-off on.
        let posted = unsafe { doorbell.ring(link.id, seq, thread, &rail.qps[qp_index].qp, batch) };
        if let Err(error) = posted {
            let status = error.to_string();
            break_link(doorbell, link, Some(seq), error, &status);
            return true;
        }
        let active = &mut link.jobs[job_index];
        active.chains_outstanding += 1;
        active.posted_all = finished;
        let rail = &mut link.rails[rail_index];
        rail.posted += bytes;
        let qp_count = rail.qps.len();
        let qp = &mut rail.qps[qp_index];
        qp.outstanding += count;
        qp.chains.push_back(Chain {
            id: chain_id,
            wrs: count,
            bytes,
            job: seq,
            kind: ChainKind::Data,
        });
        rail.next_qp = (qp_index + 1) % qp_count;
        progressed = true;
    }
    progressed
}

/// The queue pair the next data chain goes to: on the healthy rail whose posted bytes are
/// lowest for its weight ([`lightest_rail`]: so a call's bytes split by port speed), its
/// next queue pair with send-queue room (round robin). `None` when no healthy rail has room.
pub(super) fn pick_qp(link: &SenderLink) -> Option<(usize, usize)> {
    let room = |rail: &SendRail| {
        let count = rail.qps.len();
        (0..count)
            .map(|k| (rail.next_qp + k) % count)
            .find(|&i| rail.qps[i].outstanding < rail.qps[i].qp.caps().max_send_wr)
    };
    let r = lightest_rail(link.rails.iter().map(|rail| {
        (rail.counters.state() == RailState::Healthy && room(rail).is_some())
            .then_some((rail.posted, rail.weight))
    }))?;
    Some((r, room(&link.rails[r])?))
}

/// The split of a call's bytes over rails, device-free (also used by the `rdma_rails`
/// criterion bench): of the candidate rails, given as `Some((posted bytes, weight))` (`None`:
/// not eligible now), the index of the one whose posted bytes are lowest for its weight;
/// the first on a tie.
#[inline]
pub fn lightest_rail(loads: impl Iterator<Item = Option<(u64, u64)>>) -> Option<usize> {
    let mut best: Option<(usize, u64, u64)> = None;
    for (r, load) in loads.enumerate() {
        let Some((posted, weight)) = load else {
            continue;
        };
        let better = match best {
            None => true,
            // posted / weight < other_posted / other_weight, without division.
            Some((_, other_posted, other_weight)) => {
                u128::from(posted) * u128::from(other_weight)
                    < u128::from(other_posted) * u128::from(weight)
            }
        };
        if better {
            best = Some((r, posted, weight));
        }
    }
    best.map(|(r, _, _)| r)
}

/// Fills `batch` with up to `limit` WRITE requests of `active` from its cursor; the last
/// one is signaled. Returns true when the job has no more data to post.
pub(super) fn fill_chain(
    table: &RegionTable,
    mrs: &[MemoryRegion],
    remote_regions: &[(u64, u32)],
    active: &mut ActiveJob,
    batch: &mut SendBatch,
    chain_id: u64,
    limit: usize,
) -> bool {
    fill_write_chain(
        table,
        active.job.plan.view(),
        &ChainTarget {
            lkey: |region| mrs[region].lkey(),
            remote_regions,
        },
        &mut active.progress,
        batch,
        chain_id,
        limit,
    )
}

/// Where a job's WRITEs go: the local key of region `r` is `lkey(r)`, the peer's region
/// `r` is `remote_regions[r]` (address, rkey).
pub struct ChainTarget<'a, K: Fn(usize) -> u32> {
    /// The local memory region key of region `r`.
    pub lkey: K,
    /// The peer's regions, by region index: (base address, rkey).
    pub remote_regions: &'a [(u64, u32)],
}

/// The device-free core of [`fill_chain`] (also used by the `rdma_chain` criterion bench):
/// appends up to `limit` WRITE requests for `runs` of `layer` from `cursor` (the local key
/// of region `r` is `lkey(r)`, the peer's region `r` is `remote_regions[r]` = (address,
/// rkey)), signals the last one, and records the last written remote range in
/// `last_write`. Returns true when no data is left to post.
#[inline]
pub fn fill_write_chain<K: Fn(usize) -> u32>(
    table: &RegionTable,
    job: JobView<'_>,
    target: &ChainTarget<'_, K>,
    progress: &mut ChainProgress,
    batch: &mut SendBatch,
    chain_id: u64,
    limit: usize,
) -> bool {
    let (shard, layer, runs) = (job.shard, job.layer, job.runs);
    let ChainTarget {
        lkey,
        remote_regions,
    } = target;
    let layout = table.layout;
    let kinds = layout.kinds();
    let (mut kind, mut run_index, mut offset) = progress.cursor;
    let mut finished = false;
    let mut chain_bytes = 0;
    while batch.len() < limit && chain_bytes < CHAIN_BYTES {
        // `while`, not `if`: a call with no runs (an empty tagged call) skips every kind.
        while run_index >= runs.len() && kind < kinds {
            kind += 1;
            run_index = 0;
            offset = 0;
        }
        if kind >= kinds {
            finished = true;
            break;
        }
        let op = copy_op(table, shard, layer, kind, &runs[run_index]);
        let (local_addr, remote_offset, contiguous) = op.at(offset);
        let len = contiguous.min(MAX_WRITE_BYTES);
        let (remote_base, rkey) = remote_regions[op.region as usize];
        let remote_addr = remote_base + remote_offset;
        let local = LocalBuf {
            addr: local_addr,
            len: len as u32,
            lkey: lkey(op.region as usize),
        };
        let remote = RemoteBuf {
            addr: remote_addr,
            rkey,
        };
        if batch.push_write(chain_id, local, remote, false).is_err() {
            break;
        }
        progress.last_write = (remote_addr, rkey, len);
        progress.bytes += len;
        chain_bytes += len;
        offset += len;
        if offset >= op.len {
            run_index += 1;
            offset = 0;
        }
    }
    if !finished && run_index >= runs.len() && kind + 1 >= kinds {
        finished = true;
    }
    progress.cursor = (kind, run_index, offset);
    batch.signal_last();
    finished
}

/// Posts the flush read or the notice of job `seq`. Ok(false): no send-queue room yet.
pub(super) fn post_control(
    doorbell: &Doorbell,
    link: &mut SenderLink,
    seq: u64,
    batch: &mut SendBatch,
) -> std::result::Result<bool, (u64, Error, String)> {
    let Some(position) = link.jobs.iter().position(|j| j.seq == seq) else {
        return Ok(true);
    };
    // Flush and notice go on queue pair 0 of the control rail (ordering with data is given
    // by waiting for it).
    let rail_index = link.control_rail();
    let qp_index = 0;
    let phase = link.jobs[position].phase;
    // A notice's slots: its head, and the extension slots of a long landing (`notice.rs`).
    let slots = match (phase, &link.jobs[position].job.plan) {
        (Phase::Notice, plan) => match (&plan.notice, &plan.landing) {
            (Some(notice), Some(landing)) => {
                1 + extension_slots(split_landing(notice.len(), landing).0).len()
            }
            _ => 1,
        },
        _ => 1,
    };
    {
        let qp = &link.rails[rail_index].qps[qp_index];
        if qp.outstanding as usize + slots > qp.qp.caps().max_send_wr as usize {
            return Ok(false);
        }
    }
    let (staging_lkey, scratch_lkey) = {
        let rail = &link.rails[rail_index];
        (rail.staging_mr.lkey(), rail.scratch_mr.lkey())
    };
    let notice_ring = link.rails[rail_index].notice_ring;
    let chain_id = link.next_chain;
    batch.clear();
    let kind = match phase {
        Phase::Flush => {
            let (remote_addr, rkey, len) = link.jobs[position].progress.last_write;
            let read_len = len.min(8);
            let local = LocalBuf {
                addr: link.scratch.as_ptr() as u64,
                len: read_len as u32,
                lkey: scratch_lkey,
            };
            let remote = RemoteBuf {
                addr: remote_addr + len - read_len,
                rkey,
            };
            let _ = batch.push_read(chain_id, local, remote, true);
            ChainKind::Flush
        }
        Phase::Notice => {
            let acked = link.jobs[position].job.plan.acked;
            if notice_ring.2 == 0 {
                // A peer without a notice ring cannot be told; the data is there: finish,
                // unless the call waits for an answer it cannot get.
                if let Some(active) = link.jobs.remove(position) {
                    let outcome = match acked {
                        false => Ok(()),
                        true => Err(Error::protocol(
                            link.peer.clone(),
                            "its RDMA endpoint has no notice ring, so it cannot answer an acked call",
                        )),
                    };
                    let _ = active.job.done.send(outcome);
                }
                return Ok(true);
            }
            if link.notices_in_flight + slots > NOTICE_STAGING_SLOTS {
                return Ok(false);
            }
            let ring_slot = |number: u64| (number % u64::from(notice_ring.2)) as u32;
            let head = link.next_notice + slots as u64 - 1;
            let imm = notice_imm(ring_slot(head), head, acked);
            if acked && link.awaiting.contains_key(&imm) {
                // The call 2^15 notices back still waits for the same answer: hold this one.
                return Ok(false);
            }
            let plan = &link.jobs[position].job.plan;
            // An acked call without a tag sends an empty record: the receiver only answers.
            let notice = plan.notice.as_deref().unwrap_or(&[]);
            let (extension, tail) = match plan.landing.as_deref() {
                Some(landing) => {
                    let (extension, tail) = split_landing(notice.len(), landing);
                    (extension, Some(tail))
                }
                None => (&[][..], None),
            };
            let mut staging = StagingSlots {
                bytes: &mut link.staging,
                lkey: staging_lkey,
                ring: notice_ring,
            };
            for (i, part) in extension_slots(extension).enumerate() {
                let number = link.next_notice + i as u64;
                let slot = (part, None, extension_imm(ring_slot(number)), false);
                staging.push(number, slot, chain_id, batch);
            }
            staging.push(head, (notice, tail, imm, true), chain_id, batch);
            link.next_notice += slots as u64;
            link.notices_in_flight += slots;
            if acked {
                link.awaiting.insert(imm, seq);
            }
            ChainKind::Notice { slots }
        }
        Phase::Data => return Ok(true),
    };
    link.next_chain += 1;
    let thread = rail_index * link.rails[rail_index].qps.len() + qp_index;
    // SAFETY: the scratch and staging buffers are registered (under this rail's device)
    // and owned by the link, which outlives its queue pairs' requests (dropped together,
    // after the QPs are destroyed and the posting threads quiesced); the remote range is
    // the tail of a range just written, or a notice slot of the ring the peer announced
    // under this rail's device; room was checked above.
    let posted = unsafe {
        doorbell.ring(
            link.id,
            seq,
            thread,
            &link.rails[rail_index].qps[qp_index].qp,
            batch,
        )
    };
    if let Err(error) = posted {
        let status = error.to_string();
        return Err((seq, error, status));
    }
    let qp = &mut link.rails[rail_index].qps[qp_index];
    qp.outstanding += slots as u32;
    qp.chains.push_back(Chain {
        id: chain_id,
        wrs: slots as u32,
        bytes: 0,
        job: seq,
        kind,
    });
    link.jobs[position].chains_outstanding += 1;
    Ok(true)
}

/// A link's notice staging slots, registered under `lkey`, and the peer's ring they are
/// written to: (address, rkey, slots).
struct StagingSlots<'a> {
    bytes: &'a mut [u8],
    lkey: u32,
    ring: (u64, u32, u32),
}

impl StagingSlots<'_> {
    /// Stages notice slot `number` (`record` and `tail` as `notice::encode_slot` takes them)
    /// and appends its WRITE WITH IMMEDIATE `imm` to the ring slot the number maps to.
    fn push(
        &mut self,
        number: u64,
        (record, tail, imm, signaled): (&[u8], Option<&[u8]>, u32, bool),
        chain_id: u64,
        batch: &mut SendBatch,
    ) {
        // Free: at most NOTICE_STAGING_SLOTS slots are in flight, each until its chain's
        // completion.
        let start = (number % NOTICE_STAGING_SLOTS as u64) as usize * NOTICE_SLOT_BYTES;
        let len = encode_slot(
            &mut self.bytes[start..start + NOTICE_SLOT_BYTES],
            record,
            tail,
        );
        let local = LocalBuf {
            addr: self.bytes.as_ptr() as u64 + start as u64,
            len: len as u32,
            lkey: self.lkey,
        };
        let slot = number % u64::from(self.ring.2);
        let remote = RemoteBuf {
            addr: self.ring.0 + slot * NOTICE_SLOT_BYTES as u64,
            rkey: self.ring.1,
        };
        // The batch holds MAX_NOTICE_SLOTS requests (`Worker::new`).
        let _ = batch.push_write_with_imm(chain_id, local, remote, imm, signaled);
    }
}

#[cfg(test)]
mod tests {
    use super::lightest_rail;

    /// Posts `chains` chains of `bytes` each, every one to the lightest eligible rail.
    fn split(weights: &[u64], eligible: &[bool], chains: usize, bytes: u64) -> Vec<u64> {
        let mut posted = vec![0u64; weights.len()];
        for _ in 0..chains {
            let loads = (0..weights.len()).map(|r| eligible[r].then_some((posted[r], weights[r])));
            let r = lightest_rail(loads).unwrap();
            posted[r] += bytes;
        }
        posted
    }

    #[test]
    fn a_calls_bytes_split_by_port_speed_over_the_eligible_rails() {
        assert_eq!(split(&[100, 100], &[true, true], 10, 64), [320, 320]);
        // A 200 Gb/s port takes twice what a 100 Gb/s one takes.
        assert_eq!(split(&[200, 100], &[true, true], 9, 64), [384, 192]);
        // A rail not eligible (quarantined, or no send-queue room) takes nothing.
        assert_eq!(split(&[100, 100], &[false, true], 4, 64), [0, 256]);
        assert_eq!(lightest_rail([None, None].into_iter()), None);
        // Ties go to the first rail.
        assert_eq!(
            lightest_rail([Some((0, 1)), Some((0, 1))].into_iter()),
            Some(0)
        );
    }
}
