//! TCP data-plane frames. Every frame starts with a fixed header.

/// First bytes a writer sends on a new data connection.
pub const HELLO_MAGIC: [u8; 4] = *b"KVTD";
/// `HELLO_MAGIC`, version u16, reserved u16, session u64.
pub const HELLO_BYTES: usize = 16;
/// Size of every frame header: kind u8, flags u8, 2 reserved bytes, region u32,
/// offset u64, len u32, aux u32 (little endian).
pub const HEADER_BYTES: usize = 24;

/// Frame types sent by the writer.
pub const WRITE: u8 = 1;
/// Ends a call: the receiver acknowledges it once every byte before it has landed.
pub const COMMIT: u8 = 2;
/// Frame types sent back by the receiver.
pub const ACK: u8 = 3;
/// Refuses a frame (the reason as detail): fails the oldest pending call, then the
/// connection is closed.
pub const NACK: u8 = 4;

/// A decoded frame header. For `WRITE`: `region`, `offset`, `len` bytes of payload follow.
/// For `COMMIT`/`ACK`/`NACK`: `offset` carries the call id, `len` the byte length of a
/// trailing detail (notice tag or error text), at most `MAX_DETAIL_BYTES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame type: [`WRITE`], [`COMMIT`], [`ACK`] or [`NACK`].
    pub kind: u8,
    /// `COMMIT`: bit 0 set when the call is tagged (a notice tag follows); else 0.
    pub flags: u8,
    /// `WRITE`: the region index written; `COMMIT`: the call's block count.
    pub region: u32,
    /// `WRITE`: byte offset inside the region; `COMMIT`/`ACK`: the call id (`NACK`: 0, it
    /// fails the oldest pending call).
    pub offset: u64,
    /// `WRITE`: payload bytes; `COMMIT`/`ACK`/`NACK`: bytes of the trailing detail.
    pub len: u32,
    /// `COMMIT`: the call's layer; else 0.
    pub aux: u32,
}

/// Longest detail (notice tag or error text) a `COMMIT`, `ACK` or `NACK` may carry.
pub const MAX_DETAIL_BYTES: u32 = 4096;

impl Header {
    /// The header of a `WRITE` frame of `len` payload bytes at `offset` of `region`.
    #[inline]
    pub fn write(region: u32, offset: u64, len: u32) -> Header {
        Header {
            kind: WRITE,
            flags: 0,
            region,
            offset,
            len,
            aux: 0,
        }
    }

    /// Its [`HEADER_BYTES`] wire form (reserved bytes zero).
    #[inline]
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0] = self.kind;
        out[1] = self.flags;
        out[4..8].copy_from_slice(&self.region.to_le_bytes());
        out[8..16].copy_from_slice(&self.offset.to_le_bytes());
        out[16..20].copy_from_slice(&self.len.to_le_bytes());
        out[20..24].copy_from_slice(&self.aux.to_le_bytes());
        out
    }

    /// Parses a header; refuses an unknown frame type and a detail longer than
    /// [`MAX_DETAIL_BYTES`].
    #[inline]
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<Header, crate::wire::DecodeError> {
        let header = Header {
            kind: bytes[0],
            flags: bytes[1],
            region: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            offset: u64::from_le_bytes([
                bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14],
                bytes[15],
            ]),
            len: u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]),
            aux: u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]),
        };
        match header.kind {
            WRITE => Ok(header),
            COMMIT | ACK | NACK if header.len <= MAX_DETAIL_BYTES => Ok(header),
            COMMIT | ACK | NACK => Err(crate::wire::DecodeError(format!(
                "frame detail of {} bytes exceeds {MAX_DETAIL_BYTES}",
                header.len
            ))),
            other => Err(crate::wire::DecodeError(format!(
                "unknown frame type {other}"
            ))),
        }
    }
}

/// The hello a writer opens a data connection with, naming the `session` it was admitted to.
pub fn encode_hello(session: u64) -> [u8; HELLO_BYTES] {
    let mut out = [0u8; HELLO_BYTES];
    out[..4].copy_from_slice(&HELLO_MAGIC);
    out[4..6].copy_from_slice(&crate::wire::PROTOCOL_VERSION.to_le_bytes());
    out[8..16].copy_from_slice(&session.to_le_bytes());
    out
}

/// The session a hello names; refuses a bad magic or another protocol version.
pub fn decode_hello(bytes: &[u8; HELLO_BYTES]) -> Result<u64, crate::wire::DecodeError> {
    if bytes[..4] != HELLO_MAGIC {
        return Err(crate::wire::DecodeError(
            "data connection did not start with the kvtransfer hello".into(),
        ));
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != crate::wire::PROTOCOL_VERSION {
        return Err(crate::wire::DecodeError(format!(
            "data protocol version {version} is not supported"
        )));
    }
    Ok(u64::from_le_bytes([
        bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14], bytes[15],
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_headers_round_trip_and_reject_garbage() {
        let h = Header {
            kind: WRITE,
            flags: 0,
            region: 3,
            offset: 1 << 40,
            len: 4096,
            aux: 0,
        };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] = 77;
        assert!(Header::decode(&bad).is_err());
        let big = Header {
            kind: COMMIT,
            len: MAX_DETAIL_BYTES + 1,
            ..h
        };
        assert!(Header::decode(&big.encode()).is_err());
        assert_eq!(decode_hello(&encode_hello(5)).unwrap(), 5);
    }
}
