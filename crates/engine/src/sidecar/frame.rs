//! Frames of the sidecar protocol: a 4-byte little-endian length of the rest, a 4-byte
//! little-endian request id, then the body.

/// The largest frame (length field included) either side accepts.
pub const MAX_FRAME_BYTES: usize = 16 << 20;
/// The most descriptors one `sendmsg` may carry (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS_PER_FRAME: usize = 253;

/// Bytes before the body: length, then request id.
pub(crate) const HEADER_BYTES: usize = 8;

/// The frame carrying `body` as request `id`.
pub(crate) fn encode(id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(&((4 + body.len()) as u32).to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// What the front of a receive buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// A whole frame of `len` bytes (header included): its id and body range.
    Frame { len: usize, id: u32 },
    /// Not yet a whole frame.
    Partial,
    /// A length no frame may have.
    TooLong(usize),
}

/// Parses the frame at the front of `buf`.
pub(crate) fn parse(buf: &[u8]) -> Parsed {
    if buf.len() < HEADER_BYTES {
        return Parsed::Partial;
    }
    let rest = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let len = 4 + rest;
    if rest < 4 || len > MAX_FRAME_BYTES {
        return Parsed::TooLong(len);
    }
    if buf.len() < len {
        return Parsed::Partial;
    }
    let id = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    Parsed::Frame { len, id }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_wait_for_their_bytes() {
        let frame = encode(7, b"{\"op\":\"hello\"}");
        assert_eq!(parse(&frame[..5]), Parsed::Partial);
        assert_eq!(parse(&frame[..frame.len() - 1]), Parsed::Partial);
        assert_eq!(
            parse(&frame),
            Parsed::Frame {
                len: frame.len(),
                id: 7
            }
        );
        assert_eq!(&frame[HEADER_BYTES..], b"{\"op\":\"hello\"}");
    }

    #[test]
    fn lengths_beyond_the_limit_or_below_the_id_are_refused() {
        let mut frame = encode(1, b"x");
        frame[..4].copy_from_slice(&(MAX_FRAME_BYTES as u32).to_le_bytes());
        assert!(matches!(parse(&frame), Parsed::TooLong(_)));
        frame[..4].copy_from_slice(&2u32.to_le_bytes());
        assert!(matches!(parse(&frame), Parsed::TooLong(6)));
    }
}
