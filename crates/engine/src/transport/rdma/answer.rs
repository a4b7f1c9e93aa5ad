//! Acknowledged delivery (`delivery: 'acked'`) over RDMA: the receiver answers an acked
//! call's notice with a zero-byte SEND WITH IMMEDIATE on the queue pair it came in on (RC
//! queue pairs carry both ways), after it handed the arrival to its sink; the writer, whose
//! queue pairs take receives from the rail's shared receive queue like every other, finds
//! the call waiting for that immediate and completes it. The immediate layout is in
//! `notice.rs`. A writer's call whose answer does not come fails by its timeout, which
//! destroys the queue pairs first (as every timeout does): nothing lands afterwards.

use super::chain::finish_phase;
use super::notice::ANSWER_WANTED;
use super::state::{ReceiverLink, SenderLink};
use kvtransfer_verbs as verbs;
use kvtransfer_verbs::WorkCompletion;
use std::sync::atomic::Ordering;

/// `wr_id` of an answer (its completion is matched by queue pair, not by id).
const ANSWER_WR_ID: u64 = u64::MAX;

/// Writer side: an answer `wc` came in on rail `rail` of `link`. Completes the call that
/// waits for its immediate; anything else (no immediate, not a SEND, a call that no longer
/// waits) is ignored and counted as stray on the rail.
pub(super) fn take_answer(
    link: &mut SenderLink,
    rail: usize,
    wc: &WorkCompletion,
    gdr_flush: bool,
) {
    if link.broken.is_some() {
        return; // every call already failed
    }
    let waiting = match (wc.opcode, wc.imm_data) {
        (verbs::WC_OPCODE_RECV, Some(imm)) => link.awaiting.remove(&imm),
        _ => None,
    };
    let counters = &link.rails[rail].counters;
    let Some(seq) = waiting else {
        counters.stray_answers.fetch_add(1, Ordering::Relaxed);
        crate::log::log_warn!(
            "rdma: {} sent an answer (opcode {}, immediate {:?}) that no call waits for; ignored",
            link.peer,
            wc.opcode,
            wc.imm_data
        );
        return;
    };
    counters.answers.fetch_add(1, Ordering::Relaxed);
    if let Some(position) = link.jobs.iter().position(|j| j.seq == seq) {
        link.jobs[position].answered = true;
        finish_phase(link, position, gdr_flush);
    }
}

/// Receiver side: answers the acked call whose notice (immediate `imm`) came in on queue
/// pair `qp` (index into `receiver.qps`), or queues the answer while that queue pair's send
/// queue is full.
pub(super) fn answer(receiver: &mut ReceiverLink, qp: usize, imm: u32) {
    let imm = if crate::config::process().test_wrong_answer {
        // Tests only: an immediate no writer waits for (it lacks the answer flag).
        imm & !ANSWER_WANTED
    } else {
        imm
    };
    if !receiver.unsent.is_empty() || !post(receiver, qp, imm) {
        receiver.unsent.push_back((qp, imm));
    }
}

/// Receiver side: an answer posted on queue pair `qp` completed; posts queued ones.
pub(super) fn answer_sent(receiver: &mut ReceiverLink, qp: usize, wc: &WorkCompletion) {
    receiver.answering[qp] = receiver.answering[qp].saturating_sub(1);
    if !wc.is_success() && wc.status != verbs::WC_STATUS_WR_FLUSH_ERR {
        // The writer's call then fails by its timeout.
        crate::log::log_error!(
            "rdma: an answer to {} failed: {}",
            receiver.peer_name,
            verbs::wc_status_text(wc.status)
        );
    }
    while let Some(&(qp, imm)) = receiver.unsent.front() {
        if !post(receiver, qp, imm) {
            break;
        }
        receiver.unsent.pop_front();
    }
}

/// Posts one answer if `qp`'s send queue has room; false when it has none (or the post
/// failed: logged, the writer's call then fails by its timeout).
fn post(receiver: &mut ReceiverLink, qp: usize, imm: u32) -> bool {
    let pair = &receiver.qps[qp].1;
    if receiver.answering[qp] >= pair.caps().max_send_wr {
        return false;
    }
    // Every answer is signaled: its completion frees its send-queue entry.
    match pair.post_send_zero_with_imm(ANSWER_WR_ID, imm, true) {
        Ok(()) => receiver.answering[qp] += 1,
        Err(e) => crate::log::log_error!("rdma: cannot answer {}: {e}", receiver.peer_name),
    }
    true
}
