//! Arrival notice records: what a tagged call's WRITE WITH IMMEDIATE puts in the peer's
//! notice ring.

pub(super) fn encode_notice(out: &mut [u8], layer: u32, blocks: u32, tag: &[u8]) -> usize {
    out[0..4].copy_from_slice(&layer.to_le_bytes());
    out[4..8].copy_from_slice(&blocks.to_le_bytes());
    out[8] = tag.len() as u8;
    out[9..9 + tag.len()].copy_from_slice(tag);
    9 + tag.len()
}

/// Parses a notice slot; `None` when its tag length runs past the slot.
pub fn decode_notice(record: &[u8]) -> Option<(u32, u32, &[u8])> {
    if record.len() < 9 {
        return None;
    }
    let layer = u32::from_le_bytes(record[0..4].try_into().ok()?);
    let blocks = u32::from_le_bytes(record[4..8].try_into().ok()?);
    let len = record[8] as usize;
    let tag = record.get(9..9 + len)?;
    Some((layer, blocks, tag))
}
