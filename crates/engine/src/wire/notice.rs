//! The arrival notice every transport carries after a tagged call's bytes: the call's
//! layer, block count and tag, which shard the writer covers (its tpRank/tpSize and the part
//! of the receiver's blocks the shard rules give it), and, for a checksummed call, the CRC-32C
//! of the bytes it moved. Transports carry the encoded notice as it is; the receiver decodes
//! it here, every field bounded.

use super::{DecodeError, Reader};
use crate::shard::{Cover, MAX_TP_SIZE};

/// Longest tag a notice carries.
pub const MAX_NOTICE_TAG_BYTES: usize = 255;
/// Bytes of a notice before its tag.
const FIXED_BYTES: usize = 4 + 4 + 2 * 4 + 1 + 4 + 1;
/// Longest encoded notice.
pub const MAX_NOTICE_BYTES: usize = FIXED_BYTES + MAX_NOTICE_TAG_BYTES;
/// Flag: the checksum field holds the CRC-32C of the call's bytes.
const HAS_CHECKSUM: u8 = 1;
/// Where the flags byte is (the checksum follows it).
const FLAGS_AT: usize = 16;

/// A decoded notice (borrowing its tag from the record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notice<'a> {
    /// The layer the call wrote.
    pub layer: u32,
    /// Blocks in the call.
    pub blocks: u32,
    /// The writer and the part of the receiver's blocks it writes.
    pub cover: Cover,
    /// CRC-32C (Castagnoli) of every byte the call moved, in the order it moved them.
    pub checksum: Option<u32>,
    /// The call's request tag.
    pub tag: &'a [u8],
}

impl Notice<'_> {
    /// Its wire form (little endian): layer u32, blocks u32, writer rank, writer size, part,
    /// parts (u16 each), flags u8, checksum u32 (0 without one), tag length u8, the tag.
    /// The tag was checked against [`MAX_NOTICE_TAG_BYTES`] by the caller.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_BYTES + self.tag.len());
        out.extend_from_slice(&self.layer.to_le_bytes());
        out.extend_from_slice(&self.blocks.to_le_bytes());
        let c = &self.cover;
        for value in [c.writer_rank, c.writer_size, c.part, c.parts] {
            out.extend_from_slice(&(value as u16).to_le_bytes());
        }
        out.push(if self.checksum.is_some() {
            HAS_CHECKSUM
        } else {
            0
        });
        out.extend_from_slice(&self.checksum.unwrap_or(0).to_le_bytes());
        out.push(self.tag.len() as u8);
        out.extend_from_slice(self.tag);
        out
    }

    /// Parses a notice, refusing truncation, trailing bytes, unknown flags and a cover the
    /// shard rules cannot produce (rank ≥ size, part ≥ parts, sizes beyond the limit).
    pub fn decode(record: &[u8]) -> Result<Notice<'_>, DecodeError> {
        let mut r = Reader::new(record);
        let layer = r.u32("notice layer")?;
        let blocks = r.u32("notice block count")?;
        let writer_rank = u32::from(r.u16("notice writer rank")?);
        let writer_size = u32::from(r.u16("notice writer size")?);
        let part = u32::from(r.u16("notice part")?);
        let parts = u32::from(r.u16("notice parts")?);
        let bad_cover = writer_size == 0
            || writer_size > MAX_TP_SIZE
            || writer_rank >= writer_size
            || parts == 0
            || parts > MAX_TP_SIZE
            || part >= parts;
        if bad_cover {
            return Err(DecodeError(format!(
                "notice names writer rank {writer_rank} of {writer_size} covering part {part} of {parts}: not a shard the rules produce"
            )));
        }
        let flags = r.u8("notice flags")?;
        if flags & !HAS_CHECKSUM != 0 {
            return Err(DecodeError(format!("notice flags {flags:#x} are unknown")));
        }
        let checksum = r.u32("notice checksum")?;
        if flags & HAS_CHECKSUM == 0 && checksum != 0 {
            return Err(DecodeError(format!(
                "notice carries checksum {checksum:#x} without its flag"
            )));
        }
        let tag_len = r.u8("notice tag length")?;
        let tag = r.take(tag_len.into(), "notice tag")?;
        r.finish("notice")?;
        Ok(Notice {
            layer,
            blocks,
            cover: Cover {
                writer_rank,
                writer_size,
                part,
                parts,
            },
            checksum: (flags & HAS_CHECKSUM != 0).then_some(checksum),
            tag,
        })
    }
}

/// The tag of an encoded notice made by [`Notice::encode`] (it is the notice's last field).
pub fn notice_tag(encoded: &[u8]) -> &[u8] {
    encoded.get(FIXED_BYTES..).unwrap_or(&[])
}

/// Whether an encoded notice made by [`Notice::encode`] asks for a checksum (its flag is
/// set; the sum may still be the placeholder).
pub fn notice_has_checksum(encoded: &[u8]) -> bool {
    encoded
        .get(FLAGS_AT)
        .is_some_and(|flags| flags & HAS_CHECKSUM != 0)
}

/// Writes `checksum` into an encoded notice (made with a placeholder before the bytes were
/// summed).
pub fn set_checksum(encoded: &mut [u8], checksum: u32) {
    encoded[FLAGS_AT] |= HAS_CHECKSUM;
    encoded[FLAGS_AT + 1..FLAGS_AT + 5].copy_from_slice(&checksum.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(tag: &[u8], checksum: Option<u32>) -> Notice<'_> {
        Notice {
            layer: 7,
            blocks: 1538,
            cover: Cover {
                writer_rank: 3,
                writer_size: 4,
                part: 1,
                parts: 2,
            },
            checksum,
            tag,
        }
    }

    #[test]
    fn notices_round_trip() {
        for checksum in [None, Some(0), Some(0xDEAD_BEEF)] {
            let n = notice(b"req-7", checksum);
            assert_eq!(Notice::decode(&n.encode()).unwrap(), n);
            assert_eq!(notice_tag(&n.encode()), b"req-7");
        }
        let long = [b'x'; MAX_NOTICE_TAG_BYTES];
        let encoded = notice(&long, None).encode();
        assert_eq!(encoded.len(), MAX_NOTICE_BYTES);
        assert_eq!(notice_tag(&encoded), &long[..]);
        assert_eq!(notice_tag(&notice(b"", None).encode()), b"");
        let mut late = notice(b"t", None).encode();
        set_checksum(&mut late, 42);
        assert_eq!(Notice::decode(&late).unwrap().checksum, Some(42));
    }

    #[test]
    fn bad_notices_are_refused() {
        let good = notice(b"req", Some(1)).encode();
        for cut in 0..good.len() {
            assert!(Notice::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(Notice::decode(&trailing).is_err());
        let mut flags = good.clone();
        flags[FLAGS_AT] = 0x80;
        assert!(Notice::decode(&flags).is_err());
        flags[FLAGS_AT] = 0;
        assert!(
            Notice::decode(&flags).is_err(),
            "a checksum without its flag"
        );
        for (at, value) in [(8, 4u16), (12, 2), (14, 0), (10, 0)] {
            let mut bad = good.clone();
            bad[at..at + 2].copy_from_slice(&value.to_le_bytes());
            let err = Notice::decode(&bad).unwrap_err().0;
            assert!(err.contains("not a shard"), "{err}");
        }
    }
}
