//! Notice ring slots and answers: what a tagged (or acked) call's WRITE WITH IMMEDIATE puts
//! in the peer's notice ring: the encoded arrival notice (`wire::Notice`) behind its length
//! (u16); what its immediate says; and the receiver's answer to an acked call.
//!
//! The immediate of a notice: bits 0..16 the ring slot; for an acked call also bits 16..31
//! the writer's notice number (15 bits, wrapping) and bit 31, set: the writer waits for an
//! answer (a plain call's immediate is its slot alone, as before answers existed). The receiver
//! answers an acked call, after it handed the arrival to its sink, with a zero-byte SEND
//! WITH IMMEDIATE on the queue pair the notice came in on, carrying the notice's immediate
//! back: the writer completes the call waiting for exactly that immediate, on any rail.

/// Bit 31 of a notice's immediate: the writer waits for the receiver's answer.
pub(super) const ANSWER_WANTED: u32 = 1 << 31;
/// Notice numbers carried in an immediate (bits 16..31).
const NUMBER_BITS: u32 = 15;

/// The immediate of notice `number` (the writer's count of notices on its link) in ring
/// slot `slot` (< 2^16): with `answer`, the slot, the number and the answer flag; without,
/// the slot alone.
pub(super) fn notice_imm(slot: u32, number: u64, answer: bool) -> u32 {
    if !answer {
        return slot & 0xffff;
    }
    let number = (number & ((1 << NUMBER_BITS) - 1)) as u32;
    ANSWER_WANTED | number << 16 | (slot & 0xffff)
}

/// The ring slot a notice's immediate names.
pub(super) fn slot_of(imm: u32) -> u32 {
    imm & 0xffff
}

/// Whether a notice's immediate asks for an answer.
pub(super) fn wants_answer(imm: u32) -> bool {
    imm & ANSWER_WANTED != 0
}

/// Writes `notice` into `slot` behind its length; returns the bytes used. The notice fits:
/// `wire::MAX_NOTICE_BYTES` + 2 is below the slot size (a test in `state.rs` checks it).
/// An empty notice (length 0) is an acked call without a tag: the receiver only answers.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_immediate_carries_slot_number_and_the_answer_flag() {
        let imm = notice_imm(255, 40_000, true);
        assert_eq!(slot_of(imm), 255);
        assert!(wants_answer(imm));
        assert_eq!(imm >> 16 & 0x7fff, (40_000 % 32_768) as u32);
        let plain = notice_imm(3, 3, false);
        assert_eq!((plain, slot_of(plain), wants_answer(plain)), (3, 3, false));
        // Numbers a full wrap apart give the same immediate; the writer never has two
        // such calls waiting (it holds the later notice back).
        assert_eq!(notice_imm(0, 0, true), notice_imm(0, 1 << 15, true));
        assert_ne!(notice_imm(0, 0, true), notice_imm(0, 256, true));
    }
}
