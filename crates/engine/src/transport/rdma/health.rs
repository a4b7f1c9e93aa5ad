//! Rail health: a rail whose work request fails, or whose port goes down, is quarantined
//! while the link's other rails carry on; its unfinished work is posted again on them.
//! After a cooldown that doubles with every quarantine and every failed try, a probe on
//! the rail's next set of queue pairs lets it rejoin.
//!
//! Why no call resolves early: a quarantined rail's chains are dropped from their calls'
//! counts, and every call that had a data chain there starts its data over (cursor back to
//! the start, `posted_all` false); the WRITEs already done on healthy rails are idempotent
//! (the same bytes to the same place). A call completes only once all its data has been
//! posted again and every chain of it has completed, so its flush read and its arrival
//! notice still follow all of its bytes. A call whose notice was in flight on the failed
//! rail fails typed instead (the notice may or may not have arrived: it is not sent twice).

use super::doorbell::Doorbell;
use super::state::{ChainKind, Phase, QpState, RailState, SenderLink, Shared};
use crate::error::Error;
use crate::transport::fail;
use kvtransfer_verbs::{LocalBuf, RemoteBuf, SendBatch};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// First cooldown of a quarantined rail; doubled per quarantine and per failed try.
pub(super) const BASE_COOLDOWN: Duration = Duration::from_millis(250);
/// Longest cooldown.
pub(super) const MAX_COOLDOWN: Duration = Duration::from_secs(30);
/// How often the progress thread looks at the ports' states.
pub(super) const PORT_CHECK: Duration = Duration::from_millis(100);

/// The map from (local rail, qp_num) to (link, its rail index, queue-pair index).
pub(super) type QpMap = HashMap<(usize, u32), (u64, usize, usize)>;

/// What a failed work request or post on a rail does to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Out of service for a (doubled) cooldown; its work goes to the healthy rails.
    Quarantine,
    /// Nothing more: the rail is out of service already and its work was moved (a late
    /// report of a request posted before its quarantine).
    Ignore,
    /// The link breaks: no other rail is healthy (every call fails typed, as with one NIC).
    Break,
}

/// The verdict on a failure on a rail in `state`, where `probing` says whether the failed
/// request (or post) was the probe of a quarantined rail and `healthy` counts the link's
/// healthy rails. A failed probe quarantines the rail again, so its cooldown keeps
/// doubling.
pub(super) fn verdict(state: RailState, probing: bool, healthy: usize) -> Verdict {
    match state {
        RailState::Quarantined if probing => Verdict::Quarantine,
        RailState::Quarantined | RailState::Failed => Verdict::Ignore,
        RailState::Healthy if healthy > 1 => Verdict::Quarantine,
        RailState::Healthy => Verdict::Break,
    }
}

/// The cooldown after a rail's `episodes`-th quarantine: `BASE_COOLDOWN` doubled per
/// earlier one, at most `MAX_COOLDOWN`.
pub(super) fn cooldown(episodes: u64) -> Duration {
    let doublings = episodes.clamp(1, 16) as u32 - 1;
    (BASE_COOLDOWN * (1 << doublings)).min(MAX_COOLDOWN)
}

/// The verdict on a failure on rail `r` of `link` (see [`verdict`]).
pub(super) fn judge(link: &SenderLink, r: usize) -> Verdict {
    let rail = &link.rails[r];
    let probing = rail
        .qps
        .iter()
        .any(|q| q.chains.iter().any(|c| matches!(c.kind, ChainKind::Probe)));
    verdict(rail.counters.state(), probing, healthy(link))
}

/// The rail of `link` whose current queue pairs include `qp_num`.
pub(super) fn rail_of_qp(link: &SenderLink, qp_num: u32) -> Option<usize> {
    link.rails
        .iter()
        .position(|r| r.qps.iter().any(|q| q.qp.qp_num() == qp_num))
}

fn healthy(link: &SenderLink) -> usize {
    link.rails
        .iter()
        .filter(|r| r.counters.state() == RailState::Healthy)
        .count()
}

/// Quarantines rail `r` of `link` (the link's other rails are healthy: else the caller
/// breaks the link). Its queue pairs go to the error state and out of `map`, their chains
/// are dropped from their calls, and those calls start their data over.
pub(super) fn quarantine(
    doorbell: &Doorbell,
    map: &mut QpMap,
    link: &mut SenderLink,
    r: usize,
    reason: &str,
) {
    let peer = link.peer.clone();
    let rail = &mut link.rails[r];
    let counters = &rail.counters;
    counters.quarantines.fetch_add(1, Ordering::Relaxed);
    counters.set_state(RailState::Quarantined);
    counters.set_reason(Some(reason.to_string()));
    rail.cooldown = cooldown(counters.quarantines.load(Ordering::Relaxed));
    rail.retry_at = Instant::now() + rail.cooldown;
    crate::log::log_warn!(
        "rdma: {peer}: rail {} quarantined for {} ms: {reason}",
        r,
        rail.cooldown.as_millis()
    );
    for state in &rail.qps {
        let _ = state.qp.to_error();
        map.remove(&(rail.local, state.qp.qp_num()));
    }
    // No posting thread may post on them after this (the posts would be flushed anyway).
    doorbell.quiesce();
    let mut dropped = Vec::new();
    for state in &mut rail.qps {
        dropped.extend(state.chains.drain(..));
        state.outstanding = 0;
    }
    for chain in dropped {
        if let ChainKind::Notice { slots } = chain.kind {
            link.notices_in_flight -= slots;
        }
        let Some(position) = link.jobs.iter().position(|j| j.seq == chain.job) else {
            continue;
        };
        let active = &mut link.jobs[position];
        active.chains_outstanding -= 1;
        match chain.kind {
            ChainKind::Data => {
                active.progress = Default::default();
                active.posted_all = false;
                active.phase = Phase::Data;
            }
            ChainKind::Flush => link.control.push_back(active.seq),
            ChainKind::Notice { .. } => {
                if let Some(failed) = link.jobs.remove(position) {
                    fail(
                        failed.job.done,
                        Error::RdmaCompletion {
                            peer: peer.clone(),
                            status: format!(
                                "its arrival notice was in flight on a rail that failed ({reason}); its data landed, the notice may not have"
                            ),
                            status_code: 0,
                            vendor_err: 0,
                        },
                    );
                }
            }
            ChainKind::Probe => {}
        }
    }
    // Nothing is finished here: a rewound call has `posted_all` false, a dropped flush is
    // queued again, and every other call keeps its phase (advancing a call waiting in
    // `control` would skip its notice).
}

/// Quarantines the healthy rails of `link` whose local port is not active.
pub(super) fn check_ports(
    shared: &Shared,
    doorbell: &Doorbell,
    map: &mut QpMap,
    link: &mut SenderLink,
    down: &[bool],
) {
    for r in 0..link.rails.len() {
        let local = link.rails[r].local;
        if !down[local] || link.rails[r].counters.state() != RailState::Healthy {
            continue;
        }
        link.rails[r]
            .counters
            .failures
            .fetch_add(1, Ordering::Relaxed);
        let reason = format!(
            "port {} of {} is down",
            shared.rails[local].port,
            shared.rails[local].name()
        );
        if healthy(link) > 1 {
            quarantine(doorbell, map, link, r, &reason);
        } else {
            // The last rail: its requests will fail (and break the link, as with one NIC).
            link.rails[r].counters.set_reason(Some(reason));
        }
    }
}

/// Tries the quarantined rails of `link` whose cooldown passed: with the port active and a
/// spare set of queue pairs, posts a probe READ on that set (the rail rejoins when it
/// completes); else waits a doubled cooldown, or gives up when no set is left.
pub(super) fn try_rejoin(
    doorbell: &Doorbell,
    map: &mut QpMap,
    link: &mut SenderLink,
    down: &[bool],
    batch: &mut SendBatch,
    now: Instant,
) {
    for r in 0..link.rails.len() {
        let rail = &mut link.rails[r];
        if rail.counters.state() != RailState::Quarantined || now < rail.retry_at {
            continue;
        }
        if rail.qps.iter().any(|q| !q.chains.is_empty()) {
            continue; // a probe is in flight
        }
        if down[rail.local] {
            rail.cooldown = (rail.cooldown * 2).min(MAX_COOLDOWN);
            rail.retry_at = now + rail.cooldown;
            continue;
        }
        let Some(next) = rail.spares.pop_front() else {
            rail.counters.set_state(RailState::Failed);
            rail.counters.set_reason(Some(
                "no spare queue pairs left to rejoin on; connect again to use this rail".into(),
            ));
            continue;
        };
        for (q, state) in next.iter().enumerate() {
            map.insert((rail.local, state.qp.qp_num()), (link.id, r, q));
        }
        rail.qps = next;
        rail.next_qp = 0;
        let chain_id = link.next_chain;
        link.next_chain += 1;
        let rail = &mut link.rails[r];
        let (remote_addr, rkey) = rail.remote_regions[0];
        batch.clear();
        let local = LocalBuf {
            addr: link.scratch.as_ptr() as u64,
            len: 8,
            lkey: rail.scratch_mr.lkey(),
        };
        let remote = RemoteBuf {
            addr: remote_addr,
            rkey,
        };
        let _ = batch.push_read(chain_id, local, remote, true);
        let thread = r * rail.qps.len();
        // SAFETY: the probe reads 8 bytes of the peer's first region (registered, at
        // least one block long) into the link's scratch buffer, registered under this
        // rail's device and alive until the link is dropped after its queue pairs.
        let posted = unsafe { doorbell.ring(link.id, 0, thread, &rail.qps[0].qp, batch) };
        match posted {
            Ok(()) => {
                let qp = &mut rail.qps[0];
                qp.outstanding += 1;
                qp.chains.push_back(super::state::Chain {
                    id: chain_id,
                    wrs: 1,
                    bytes: 0,
                    job: 0,
                    kind: ChainKind::Probe,
                });
            }
            Err(e) => {
                let reason = format!("the probe could not be posted: {e}");
                quarantine(doorbell, map, link, r, &reason);
            }
        }
    }
}

/// A probe completed: the rail is healthy again; its share starts level with the others.
pub(super) fn rejoin(link: &mut SenderLink, r: usize) {
    let level = link
        .rails
        .iter()
        .filter(|x| x.counters.state() == RailState::Healthy)
        .map(|x| x.posted as f64 / x.weight as f64)
        .fold(0.0, f64::max);
    let rail = &mut link.rails[r];
    rail.posted = (level * rail.weight as f64) as u64;
    rail.counters.rejoins.fetch_add(1, Ordering::Relaxed);
    rail.counters.set_reason(None);
    rail.counters.set_state(RailState::Healthy);
    crate::log::log_info!("rdma: {}: rail {r} rejoined", link.peer);
}

/// The sets of queue pairs of a rail: the first in use, the rest spares.
pub(super) fn split_sets(
    qps: Vec<QpState>,
    per_set: usize,
) -> (Vec<QpState>, std::collections::VecDeque<Vec<QpState>>) {
    let mut sets = std::collections::VecDeque::new();
    let mut current = Vec::new();
    for state in qps {
        current.push(state);
        if current.len() == per_set {
            sets.push_back(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        sets.push_back(current);
    }
    let first = sets.pop_front().unwrap_or_default();
    (first, sets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_probe_quarantines_again_and_a_late_report_is_ignored() {
        // A probe whose post or request failed: quarantined again, whatever the others.
        assert_eq!(
            verdict(RailState::Quarantined, true, 1),
            Verdict::Quarantine
        );
        assert_eq!(
            verdict(RailState::Quarantined, true, 0),
            Verdict::Quarantine
        );
        // A request posted before the quarantine, reported after it: its work moved already.
        assert_eq!(verdict(RailState::Quarantined, false, 1), Verdict::Ignore);
        assert_eq!(verdict(RailState::Failed, false, 1), Verdict::Ignore);
        // A healthy rail: quarantined while another is healthy, else the link breaks.
        assert_eq!(verdict(RailState::Healthy, false, 2), Verdict::Quarantine);
        assert_eq!(verdict(RailState::Healthy, false, 1), Verdict::Break);
    }

    #[test]
    fn the_cooldown_doubles_per_quarantine_up_to_the_cap() {
        let ms = |episodes| cooldown(episodes).as_millis();
        assert_eq!(
            (1..=8).map(ms).collect::<Vec<_>>(),
            [250, 500, 1000, 2000, 4000, 8000, 16000, 30000]
        );
        assert_eq!(ms(1000), 30000);
        assert_eq!(ms(0), 250);
    }
}
