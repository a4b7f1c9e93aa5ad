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
//!
//! A checksummed call's notice carries its landing (`wire::Landing`): behind the notice in
//! the head slot, after its length (u16), what fits there; the bytes before that in up to
//! [`MAX_NOTICE_SLOTS`] − 1 extension slots, each its part of the landing behind its length.
//! The extension slots are WRITEs WITH IMMEDIATE too (bit 30 set, bit 31 clear, and the
//! slot), posted in one chain before the head on the same queue pair, so RC delivers them
//! first and each takes a receive: the receiver copies each out before it reposts that
//! receive, which keeps the ring's flow control per slot (`state.rs`).

use super::state::{MAX_NOTICE_SLOTS, NOTICE_SLOT_BYTES};

/// Bit 31 of a notice's immediate: the writer waits for the receiver's answer.
pub(super) const ANSWER_WANTED: u32 = 1 << 31;
/// Bit 30 of an immediate without [`ANSWER_WANTED`]: an extension slot of the notice that
/// follows on the same queue pair.
const EXTENSION: u32 = 1 << 30;
/// Landing bytes one extension slot carries (behind their length).
const EXTENSION_BYTES: usize = NOTICE_SLOT_BYTES - 2;
/// Longest landing a notice carries: what its extension slots hold. The head's room after
/// the notice is used first but not counted, so the limit does not depend on the tag.
pub const MAX_LANDING_BYTES: usize = (MAX_NOTICE_SLOTS - 1) * EXTENSION_BYTES;
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

/// The immediate of an extension slot in ring slot `slot`.
pub(super) fn extension_imm(slot: u32) -> u32 {
    EXTENSION | (slot & 0xffff)
}

/// Whether an immediate names an extension slot (not a notice's head).
pub(super) fn is_extension(imm: u32) -> bool {
    imm & ANSWER_WANTED == 0 && imm & EXTENSION != 0
}

/// Cuts `landing` for a notice of `notice_len` bytes: the bytes for the extension slots
/// (their count is [`extension_slots`]), and the rest, which stays in the head behind the
/// notice.
pub(super) fn split_landing(notice_len: usize, landing: &[u8]) -> (&[u8], &[u8]) {
    let room = NOTICE_SLOT_BYTES.saturating_sub(2 + notice_len + 2);
    landing.split_at(landing.len().saturating_sub(room))
}

/// Extension slots that carry `bytes` of a landing, [`EXTENSION_BYTES`] each.
pub(super) fn extension_slots(bytes: &[u8]) -> impl ExactSizeIterator<Item = &[u8]> {
    bytes.chunks(EXTENSION_BYTES)
}

/// Writes `record` into `slot` behind its length and, for a checksummed notice, the
/// landing's `tail` behind its own; returns the bytes used. The notice fits:
/// `wire::MAX_NOTICE_BYTES` + 4 is below the slot size (a test in `state.rs` checks it) and
/// [`split_landing`] leaves no more tail than the room after it. An empty notice (length
/// 0) is an acked call without a tag: the receiver only answers. An extension slot is its
/// part of the landing as the record, without a tail.
pub(super) fn encode_slot(slot: &mut [u8], record: &[u8], tail: Option<&[u8]>) -> usize {
    slot[0..2].copy_from_slice(&(record.len() as u16).to_le_bytes());
    slot[2..2 + record.len()].copy_from_slice(record);
    let mut used = 2 + record.len();
    if let Some(tail) = tail {
        slot[used..used + 2].copy_from_slice(&(tail.len() as u16).to_le_bytes());
        slot[used + 2..used + 2 + tail.len()].copy_from_slice(tail);
        used += 2 + tail.len();
    }
    used
}

/// The encoded notice (or an extension's part of a landing) in a slot; `None` when its
/// length runs past the slot.
pub fn decode_notice(slot: &[u8]) -> Option<&[u8]> {
    let len = u16::from_le_bytes([*slot.first()?, *slot.get(1)?]) as usize;
    slot.get(2..2 + len)
}

/// The landing's tail behind the notice in a checksummed notice's head slot; `None` when a
/// length runs past the slot.
pub(super) fn decode_tail(slot: &[u8]) -> Option<&[u8]> {
    let after = 2 + decode_notice(slot)?.len();
    decode_notice(slot.get(after..)?)
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
        // Extension slots are told apart from every head, acked or not.
        let ext = extension_imm(200);
        assert!(is_extension(ext) && !wants_answer(ext));
        assert_eq!(slot_of(ext), 200);
        for number in [0, 1 << 14, (1 << 15) - 1] {
            assert!(!is_extension(notice_imm(7, number, true)));
            assert!(!is_extension(notice_imm(7, number, false)));
        }
    }

    #[test]
    fn a_landing_fills_the_head_first_then_extension_slots() {
        let notice = vec![9u8; 275];
        let landing: Vec<u8> = (0..MAX_LANDING_BYTES as u32).map(|i| i as u8).collect();
        for len in [0, 1, 233, 234, 743, 744, MAX_LANDING_BYTES] {
            let landing = &landing[..len];
            let (extension, tail) = split_landing(notice.len(), landing);
            let chunks: Vec<&[u8]> = extension_slots(extension).collect();
            assert!(chunks.len() < MAX_NOTICE_SLOTS, "{len}");
            assert_eq!(chunks.len(), len.saturating_sub(233).div_ceil(510), "{len}");
            let mut head = [0u8; NOTICE_SLOT_BYTES];
            let used = encode_slot(&mut head, &notice, Some(tail));
            assert!(used <= NOTICE_SLOT_BYTES);
            assert_eq!(decode_notice(&head), Some(&notice[..]));
            let mut whole = Vec::new();
            for chunk in chunks {
                let mut slot = [0u8; NOTICE_SLOT_BYTES];
                encode_slot(&mut slot, chunk, None);
                whole.extend_from_slice(decode_notice(&slot).unwrap());
            }
            whole.extend_from_slice(decode_tail(&head).unwrap());
            assert_eq!(whole, landing);
        }
        // A length past the slot is refused, not read past.
        let mut bad = [0u8; NOTICE_SLOT_BYTES];
        bad[0..2].copy_from_slice(&600u16.to_le_bytes());
        assert_eq!(decode_notice(&bad), None);
        let used = encode_slot(&mut bad, b"n", None);
        bad[used..used + 2].copy_from_slice(&600u16.to_le_bytes());
        assert_eq!(decode_tail(&bad), None);
    }
}
