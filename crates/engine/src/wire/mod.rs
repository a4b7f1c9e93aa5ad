//! Wire formats shared by the engine and its transports: the handshake descriptor exchanged
//! on the control plane, the arrival notice, a checksummed call's landing, and a bounded
//! reader for every decoder. Every decoder is
//! length-checked: malformed input is an error, never a panic or an unbounded allocation.
//! Each transport encodes its own endpoint (`transport/*/endpoint.rs`).

mod descriptor;
mod landing;
mod notice;

pub use descriptor::{Declined, Descriptor, Endpoint};
pub use landing::{Landing, Reach};
pub use notice::{
    notice_has_checksum, notice_tag, set_checksum, Notice, MAX_NOTICE_BYTES, MAX_NOTICE_TAG_BYTES,
};

/// Magic + version at the start of every descriptor.
pub const DESCRIPTOR_MAGIC: [u8; 4] = *b"KVTX";
/// 2: a list of (transport kind, endpoint) instead of fixed per-transport fields; 3: the
/// scale block size; 4: the tensor-parallel fields (size, rank, replication, block order);
/// 5: the acceptor's declined offers as a typed list (no longer a note endpoint); 6: either
/// RDMA endpoints with rails or arrival notices with the writer's shard cover (two
/// incompatible 6s, never released together); 7: both, RDMA endpoints carry rails (several
/// NICs, each with its GID candidates and port speed) and arrival notices carry the writer's
/// shard cover and an optional checksum (`notice.rs`); 8: the NVLink side channel's messages
/// carry their kind, and acked calls are answered (`transport/nvlink/message.rs`); 9: an RDMA
/// checksummed notice carries the call's landing (`landing.rs`) and may span several ring
/// slots (`transport/rdma/notice.rs`); 10: the NVLink side channel's notices carry their
/// length and a checksummed call's landing (`transport/nvlink/message.rs`); 11: the NVLink
/// side channel carries the acceptor's warm re-attach (release, a new memory table and its
/// descriptors; `transport/nvlink/message.rs`).
pub const PROTOCOL_VERSION: u16 = 11;
/// Largest descriptor accepted (regions of MAX_LAYERS × 2 plus QPs fit well within it).
pub const MAX_DESCRIPTOR_BYTES: usize = 256 * 1024;
/// Endpoints one descriptor may offer (one per transport kind).
pub const MAX_ENDPOINTS: usize = 8;
/// Longest name a side may give itself (bytes).
pub const MAX_NAME_BYTES: usize = 255;
/// What a name may be, as error messages state it.
pub const NAME_RULE: &str = "at most 255 bytes of visible ASCII (0x21-0x7E: letters, digits, \
     punctuation) other than the double quote, the single quote and the backslash";

/// Longest reason the acceptor gives for an offer it declined.
pub const MAX_NOTE_BYTES: usize = 1024;

/// Checks a side's name against [`NAME_RULE`]: where it is set (construction, `set_name`)
/// and where a peer's arrives (the handshake descriptor). A writer's name becomes the peer
/// label of the receiver's metrics, the `peer` of its arrivals and a part of its log lines,
/// so it holds no spaces, quotes, backslashes, control or non-ASCII characters. Empty is
/// allowed (peers then see the instance id). The error names the value, escaped.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "{} bytes given; at most {MAX_NAME_BYTES}",
            name.len()
        ));
    }
    let allowed = |c: char| c.is_ascii_graphic() && !matches!(c, '"' | '\'' | '\\');
    match name.char_indices().find(|&(_, c)| !allowed(c)) {
        None => Ok(()),
        Some((at, c)) => Err(format!(
            "'{}' has {c:?} at byte {at}; a name is {NAME_RULE}",
            name.escape_debug()
        )),
    }
}

/// Which half of a disaggregated deployment an engine serves; sent in the descriptor and
/// logged, it does not change what the engine does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A prefill engine (typically the writer of KV blocks).
    Prefill = 0,
    /// A decode engine (typically the receiver).
    Decode = 1,
}

impl Role {
    /// `"prefill"` or `"decode"`; anything else is `None`.
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "prefill" => Some(Role::Prefill),
            "decode" => Some(Role::Decode),
            _ => None,
        }
    }

    /// Its name: `"prefill"` or `"decode"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Reads little-endian fields, naming the field when the input is too short.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    /// Fails unless every byte was consumed.
    pub(crate) fn finish(&self, what: &str) -> Result<(), DecodeError> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(DecodeError(format!(
                "{} trailing bytes after the {what}",
                self.bytes.len() - self.at
            )))
        }
    }

    pub(crate) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                DecodeError(format!(
                    "truncated message: {what} needs {n} bytes at offset {}, {} left",
                    self.at,
                    self.bytes.len() - self.at
                ))
            })?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    pub(crate) fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }
    pub(crate) fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }
    pub(crate) fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn bool(&mut self, what: &str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError(format!("{what} must be 0 or 1, got {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_visible_ascii_without_quotes_or_backslashes() {
        for good in [
            "",
            "prefill-7:5000",
            "host.example.com:5555",
            "a!#$%&()*+,-./:;<=>?@[]^_`{|}~z",
        ] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        assert_eq!(check_name(&"n".repeat(255)), Ok(()));
        let long = check_name(&"n".repeat(256)).unwrap_err();
        assert!(long.contains("256 bytes") && long.contains("255"), "{long}");
        for (bad, shown) in [
            ("a b", "' '"),
            ("a\"b", "'\"'"),
            ("a'b", "'\\''"),
            ("a\\b", "'\\\\'"),
            ("line\nbreak", "'\\n'"),
            ("esc\u{1b}[31m", "'\\u{1b}'"),
            ("caf\u{e9}", "'\u{e9}'"),
            ("tab\t", "'\\t'"),
        ] {
            let err = check_name(bad).unwrap_err();
            assert!(
                err.contains(shown) && err.contains(NAME_RULE),
                "{bad:?}: {err}"
            );
            assert!(!err.chars().any(char::is_control), "{bad:?}: {err}");
        }
    }
}
