//! Notice ring slots: what a tagged call's WRITE WITH IMMEDIATE puts in the peer's notice
//! ring: the encoded arrival notice (`wire::Notice`) behind its length (u16).

/// Writes `notice` into `slot` behind its length; returns the bytes used. The notice fits:
/// `wire::MAX_NOTICE_BYTES` + 2 is below the slot size (a test in `state.rs` checks it).
pub(super) fn encode_slot(slot: &mut [u8], notice: &[u8]) -> usize {
    slot[0..2].copy_from_slice(&(notice.len() as u16).to_le_bytes());
    slot[2..2 + notice.len()].copy_from_slice(notice);
    2 + notice.len()
}

/// The encoded notice in a slot; `None` when its length runs past the slot.
pub fn decode_notice(slot: &[u8]) -> Option<&[u8]> {
    let len = u16::from_le_bytes([*slot.first()?, *slot.get(1)?]) as usize;
    slot.get(2..2 + len)
}
