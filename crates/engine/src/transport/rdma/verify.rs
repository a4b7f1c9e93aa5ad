//! The receiving side of a checksummed notice: its extension slots collected per queue pair
//! as they come, its landing put together at its head (`notice.rs`), the call's bytes found
//! in this side's memory from it (`transport::land`) and summed (CRC-32C) before the arrival
//! is reported. A landing that cannot be read or names bytes outside this side's regions is
//! reported as a mismatch (no byte was summed), with the reason in the log.

use super::notice::{decode_notice, decode_tail, MAX_LANDING_BYTES};
use super::state::ReceiverLink;
use crate::layout::RegionTable;
use crate::transport::{record_landing, ChecksumCheck, Landed};
use crate::wire::{Landing, Notice};

/// Keeps the landing bytes of the extension slot `record` that came in on queue pair `qp`
/// of `receiver` (bounded: past [`MAX_LANDING_BYTES`] they are dropped, and the head's
/// check fails).
pub(super) fn take_extension(receiver: &mut ReceiverLink, qp: usize, record: &[u8]) {
    let Some(assembly) = receiver.assembly.get_mut(qp) else {
        return;
    };
    match decode_notice(record) {
        Some(part) if assembly.len() <= MAX_LANDING_BYTES => assembly.extend_from_slice(part),
        Some(_) => {}
        None => {
            crate::log::log_error!(
                "rdma: malformed notice extension slot from {}",
                receiver.peer_name
            );
            // Poison the landing: the head's check fails rather than reading a short one.
            assembly.resize(MAX_LANDING_BYTES + 1, 0);
        }
    }
}

/// Checks the call of `notice` (its head slot `record`, from queue pair `qp` of `receiver`)
/// against this side's memory in `table`. A notice without a checksum only drops stray
/// extension bytes.
pub(super) fn check(
    table: &RegionTable,
    receiver: &mut ReceiverLink,
    qp: usize,
    notice: &Notice<'_>,
    record: &[u8],
) -> ChecksumCheck {
    let Some(mut bytes) = receiver.assembly.get_mut(qp).map(std::mem::take) else {
        return refuse(receiver, notice, "it came on an unknown queue pair");
    };
    let Some(expected) = notice.checksum else {
        if !bytes.is_empty() {
            crate::log::log_error!(
                "rdma: {} landing bytes from {} came before a notice without a checksum; dropped",
                bytes.len(),
                receiver.peer_name
            );
        }
        return ChecksumCheck::Absent;
    };
    let check = match decode_tail(record) {
        None => Err("its head slot holds no landing".to_string()),
        Some(tail) => {
            bytes.extend_from_slice(tail);
            verify(table, notice, &bytes, expected)
        }
    };
    bytes.clear();
    receiver.assembly[qp] = bytes;
    check.unwrap_or_else(|reason| refuse(receiver, notice, &reason))
}

/// Sums the bytes `landing` names in `table` against `expected`.
fn verify(
    table: &RegionTable,
    notice: &Notice<'_>,
    landing: &[u8],
    expected: u32,
) -> Result<ChecksumCheck, String> {
    if landing.len() > MAX_LANDING_BYTES {
        return Err(format!(
            "its landing takes {} bytes; at most {MAX_LANDING_BYTES}",
            landing.len()
        ));
    }
    let landing = Landing::decode(landing).map_err(|e| e.0)?;
    if landing.blocks() != u64::from(notice.blocks) {
        return Err(format!(
            "its landing names {} blocks but the notice {}",
            landing.blocks(),
            notice.blocks
        ));
    }
    let mut landed = Landed::default();
    record_landing(table, notice.layer, &landing, &mut landed)?;
    Ok(landed.check(Some(expected)))
}

/// A checksummed notice whose landing this side cannot follow: a mismatch (nothing summed,
/// so the sum this side holds is CRC-32C of no bytes, 0), logged with why.
fn refuse(receiver: &ReceiverLink, notice: &Notice<'_>, reason: &str) -> ChecksumCheck {
    crate::log::log_error!(
        "rdma: checksummed notice from {} for layer {} ({} blocks): {reason}; reported as a checksum mismatch",
        receiver.peer_name,
        notice.layer,
        notice.blocks
    );
    ChecksumCheck::Mismatch {
        expected: notice.checksum.unwrap_or(0),
        actual: 0,
    }
}
