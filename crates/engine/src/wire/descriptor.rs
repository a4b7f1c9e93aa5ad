//! The handshake descriptor: the cache layout and identity of one side, and the endpoint of
//! every transport it offers, in its order of preference. The engine reads the layout;
//! each endpoint is opaque bytes that only its transport encodes and decodes.

use super::{
    check_name, DecodeError, Reader, Role, DESCRIPTOR_MAGIC, MAX_DESCRIPTOR_BYTES, MAX_ENDPOINTS,
    MAX_NAME_BYTES, MAX_NOTE_BYTES, PROTOCOL_VERSION,
};
use crate::layout::MAX_LAYERS;
use crate::shard::{BlockOrder, TpOptions, MAX_TP_SIZE};

/// One transport's endpoint: its kind code (`TransportKind::code`) and its own bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The transport's kind code.
    pub kind: u8,
    /// The endpoint as that transport encodes it (opaque to the engine).
    pub bytes: Vec<u8>,
}

/// The acceptor's account of one offer it passed over: the kind, and why (a sentence a user
/// can act on, at most [`MAX_NOTE_BYTES`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declined {
    /// The kind code of the offer passed over.
    pub kind: u8,
    /// Why it was passed over.
    pub reason: String,
}

/// What one side tells the other during `connect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// The sender's role (informational: logged by the acceptor).
    pub role: Role,
    /// A random id of the sender's engine: a reconnect of the same engine replaces its old
    /// state; it also names a sender that gave no name.
    pub instance_id: u64,
    /// The sender's layer count (1..=`MAX_LAYERS`); must equal this side's.
    pub layers: u32,
    /// Whether the sender's cache has value regions; must match this side's.
    pub has_value: bool,
    /// The sender's blocks per region (may differ from this side's).
    pub block_number: u32,
    /// The sender's bytes per key/value block.
    pub block_bytes: u64,
    /// Bytes per block of the fp8 scale regions (K-scale, V-scale); 0: none.
    pub scale_block_bytes: u64,
    /// The sender's tensor-parallel setting (size, rank, replication, block order).
    pub tp: TpOptions,
    /// The sender's self-chosen name, reported with its arrival notices (at most 255 bytes).
    pub name: String,
    /// Connector: every transport it can use, most preferred first. Acceptor's reply: the
    /// one transport it chose. Kinds are unique; kinds this build does not know are kept
    /// (and never chosen), so a newer peer may offer more.
    pub endpoints: Vec<Endpoint>,
    /// Acceptor's reply: each offer of the connector, more preferred than the one chosen,
    /// that it passed over and why (so the connector can explain its transport). Empty in
    /// a hello. One per kind, at most [`MAX_ENDPOINTS`].
    pub declined: Vec<Declined>,
}

impl Descriptor {
    /// The endpoint offered for `kind`, if any.
    pub fn endpoint(&self, kind: u8) -> Option<&[u8]> {
        self.endpoints
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.bytes.as_slice())
    }

    /// Its wire form (little endian): magic, version, total length, the layout and
    /// identity, then the endpoint and declined lists. The name, the lists and the reasons
    /// are cut to their limits.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&DESCRIPTOR_MAGIC);
        out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]); // total length, patched below
        out.push(self.role as u8);
        out.extend_from_slice(&self.instance_id.to_le_bytes());
        out.extend_from_slice(&self.layers.to_le_bytes());
        out.push(u8::from(self.has_value));
        out.extend_from_slice(&self.block_number.to_le_bytes());
        out.extend_from_slice(&self.block_bytes.to_le_bytes());
        out.extend_from_slice(&self.scale_block_bytes.to_le_bytes());
        out.extend_from_slice(&self.tp.size.to_le_bytes());
        out.extend_from_slice(&self.tp.rank.to_le_bytes());
        out.push(u8::from(self.tp.replicated));
        out.extend_from_slice(&self.tp.order.tokens_per_block().to_le_bytes());
        let name = &self.name.as_bytes()[..self.name.len().min(MAX_NAME_BYTES)];
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        let endpoints = &self.endpoints[..self.endpoints.len().min(MAX_ENDPOINTS)];
        out.push(endpoints.len() as u8);
        for endpoint in endpoints {
            out.push(endpoint.kind);
            out.extend_from_slice(&(endpoint.bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(&endpoint.bytes);
        }
        let declined = &self.declined[..self.declined.len().min(MAX_ENDPOINTS)];
        out.push(declined.len() as u8);
        for entry in declined {
            let reason = truncated(&entry.reason, MAX_NOTE_BYTES);
            out.push(entry.kind);
            out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
            out.extend_from_slice(reason.as_bytes());
        }
        let total = out.len() as u32;
        out[6..10].copy_from_slice(&total.to_le_bytes());
        out
    }

    /// Parses a descriptor, checking every field and bound: a wrong magic, protocol version
    /// or length, an invalid layout or tensor-parallel setting, duplicate kinds, and
    /// trailing bytes are refused.
    pub fn decode(bytes: &[u8]) -> Result<Descriptor, DecodeError> {
        if bytes.len() > MAX_DESCRIPTOR_BYTES {
            return Err(DecodeError(format!(
                "descriptor of {} bytes exceeds the limit of {MAX_DESCRIPTOR_BYTES}",
                bytes.len()
            )));
        }
        let mut r = Reader::new(bytes);
        if r.array::<4>("magic")? != DESCRIPTOR_MAGIC {
            return Err(DecodeError(
                "not a kvtransfer descriptor (bad magic)".into(),
            ));
        }
        let version = r.u16("version")?;
        if version != PROTOCOL_VERSION {
            let older = if version < PROTOCOL_VERSION {
                "the peer runs an older kvtransfer: upgrade it"
            } else {
                "the peer runs a newer kvtransfer: upgrade this side"
            };
            return Err(DecodeError(format!("protocol version {version} is not supported (this build speaks {PROTOCOL_VERSION}); {older}, both sides must speak the same protocol")));
        }
        let total = r.u32("length")? as usize;
        if total != bytes.len() {
            return Err(DecodeError(format!(
                "descriptor length field says {total} bytes but {} arrived",
                bytes.len()
            )));
        }
        let role = match r.u8("role")? {
            0 => Role::Prefill,
            1 => Role::Decode,
            other => return Err(DecodeError(format!("unknown role {other}"))),
        };
        let instance_id = r.u64("instance id")?;
        let layers = r.u32("layers")?;
        if layers == 0 || layers > MAX_LAYERS {
            return Err(DecodeError(format!(
                "layer count {layers} outside 1..={MAX_LAYERS}"
            )));
        }
        let has_value = r.bool("value flag")?;
        let block_number = r.u32("blockNumber")?;
        let block_bytes = r.u64("blockBytes")?;
        let scale_block_bytes = r.u64("scaleBlockBytes")?;
        if block_number == 0 || block_bytes == 0 {
            return Err(DecodeError(
                "blockNumber and blockBytes must be positive".into(),
            ));
        }
        let tp = decode_tp(&mut r)?;
        let name_len = r.u8("name length")? as usize;
        let name = String::from_utf8(r.take(name_len, "name")?.to_vec())
            .map_err(|_| DecodeError("peer name is not UTF-8".into()))?;
        check_name(&name).map_err(|reason| DecodeError(format!("peer name {reason}")))?;
        let count = r.u8("endpoint count")? as usize;
        if count > MAX_ENDPOINTS {
            return Err(DecodeError(format!(
                "{count} endpoints offered; at most {MAX_ENDPOINTS}"
            )));
        }
        let mut endpoints: Vec<Endpoint> = Vec::with_capacity(count);
        for _ in 0..count {
            let kind = r.u8("endpoint kind")?;
            if endpoints.iter().any(|e| e.kind == kind) {
                return Err(DecodeError(format!(
                    "transport kind {kind} is offered twice"
                )));
            }
            // Bounded by the descriptor's own length, checked above.
            let len = r.u32("endpoint length")? as usize;
            let bytes = r.take(len, "endpoint")?.to_vec();
            endpoints.push(Endpoint { kind, bytes });
        }
        let count = r.u8("declined count")? as usize;
        if count > MAX_ENDPOINTS {
            return Err(DecodeError(format!(
                "{count} declined offers listed; at most {MAX_ENDPOINTS}"
            )));
        }
        let mut declined: Vec<Declined> = Vec::with_capacity(count);
        for _ in 0..count {
            let kind = r.u8("declined kind")?;
            if declined.iter().any(|d| d.kind == kind) {
                return Err(DecodeError(format!(
                    "transport kind {kind} is declined twice"
                )));
            }
            let len = r.u16("declined reason length")? as usize;
            if len > MAX_NOTE_BYTES {
                return Err(DecodeError(format!(
                    "a declined reason of {len} bytes exceeds the limit of {MAX_NOTE_BYTES}"
                )));
            }
            let reason = String::from_utf8(r.take(len, "declined reason")?.to_vec())
                .map_err(|_| DecodeError("a declined reason is not UTF-8".into()))?;
            declined.push(Declined { kind, reason });
        }
        r.finish("descriptor")?;
        Ok(Descriptor {
            role,
            instance_id,
            layers,
            has_value,
            block_number,
            block_bytes,
            scale_block_bytes,
            tp,
            name,
            endpoints,
            declined,
        })
    }
}

/// `text` cut to at most `limit` bytes, on a character boundary.
fn truncated(text: &str, limit: usize) -> &str {
    let mut end = text.len().min(limit);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The tensor-parallel fields: size in 1..=MAX_TP_SIZE, rank below it, a 0/1 flag, tokens
/// per block (0: head-major).
fn decode_tp(r: &mut Reader<'_>) -> Result<TpOptions, DecodeError> {
    let size = r.u32("tpSize")?;
    let rank = r.u32("tpRank")?;
    let replicated = r.bool("kvReplicated")?;
    let tokens = r.u32("tokensPerBlock")?;
    if size == 0 || size > MAX_TP_SIZE || rank >= size {
        return Err(DecodeError(format!(
            "tpSize {size} / tpRank {rank}: the size must be in 1..={MAX_TP_SIZE} and the rank below it"
        )));
    }
    Ok(TpOptions {
        size,
        rank,
        replicated,
        order: BlockOrder::from_tokens_per_block(tokens),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(endpoints: usize) -> Descriptor {
        Descriptor {
            role: Role::Decode,
            instance_id: 0x1122_3344_5566_7788,
            layers: 2,
            has_value: true,
            block_number: 1024,
            block_bytes: 4096,
            scale_block_bytes: 64,
            tp: TpOptions {
                size: 4,
                rank: 3,
                replicated: true,
                order: BlockOrder::TokenMajor {
                    tokens_per_block: 64,
                },
            },
            name: "prefill-0:5000".into(),
            endpoints: (0..endpoints)
                .map(|i| Endpoint {
                    kind: i as u8 + 1,
                    bytes: vec![i as u8; 3 + i],
                })
                .collect(),
            declined: Vec::new(),
        }
    }

    #[test]
    fn a_name_outside_the_rule_is_refused() {
        for bad in ["a\nb", "say \"hi\"", "back\\slash", "\u{1b}[2J"] {
            let mut d = sample(1);
            d.name = bad.into();
            let err = Descriptor::decode(&d.encode()).unwrap_err().0;
            assert!(
                err.starts_with("peer name '") && err.contains(super::super::NAME_RULE),
                "{err}"
            );
            assert!(!err.chars().any(char::is_control), "{err}");
        }
    }

    #[test]
    fn round_trips_with_any_number_of_endpoints() {
        for n in [0, 1, 2, MAX_ENDPOINTS] {
            let d = sample(n);
            assert_eq!(Descriptor::decode(&d.encode()).unwrap(), d);
        }
        assert_eq!(sample(2).endpoint(2), Some(&[1u8; 4][..]));
        assert_eq!(sample(2).endpoint(7), None);
    }

    #[test]
    fn round_trips_declined_offers_and_cuts_long_reasons() {
        let mut d = sample(1);
        d.declined = vec![
            Declined {
                kind: 3,
                reason: "nvlink: the peer's GPU is not reachable".into(),
            },
            Declined {
                kind: 2,
                reason: "é".repeat(MAX_NOTE_BYTES),
            },
        ];
        let back = Descriptor::decode(&d.encode()).unwrap();
        assert_eq!(back.declined[0], d.declined[0]);
        assert_eq!(back.declined[1].reason.len(), MAX_NOTE_BYTES);
        assert!(d.declined[1].reason.starts_with(&back.declined[1].reason));
        let mut twice = sample(1);
        twice.declined = vec![d.declined[0].clone(), d.declined[0].clone()];
        let err = Descriptor::decode(&twice.encode()).unwrap_err();
        assert!(err.0.contains("declined twice"), "{err}");
    }

    #[test]
    fn refuses_an_older_peer_by_its_version() {
        let mut bytes = sample(1).encode();
        bytes[4..6].copy_from_slice(&(PROTOCOL_VERSION - 1).to_le_bytes());
        let err = Descriptor::decode(&bytes).unwrap_err();
        assert!(
            err.0
                .contains(&format!("protocol version {}", PROTOCOL_VERSION - 1))
                && err.0.contains("older kvtransfer"),
            "{err}"
        );
    }

    #[test]
    fn rejects_every_truncation_and_corruption() {
        let bytes = sample(2).encode();
        for cut in 0..bytes.len() {
            assert!(Descriptor::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = bytes.clone();
        let newer = PROTOCOL_VERSION + 1;
        bad[4..6].copy_from_slice(&newer.to_le_bytes());
        assert!(Descriptor::decode(&bad)
            .unwrap_err()
            .0
            .contains(&format!("version {newer}")));
        let mut long = bytes.clone();
        long.push(0);
        assert!(Descriptor::decode(&long).is_err());
    }

    #[test]
    fn refuses_tp_fields_out_of_range() {
        for (size, rank) in [(0, 0), (MAX_TP_SIZE + 1, 0), (2, 2)] {
            let mut d = sample(1);
            d.tp.size = size;
            d.tp.rank = rank;
            let err = Descriptor::decode(&d.encode()).unwrap_err();
            assert!(err.0.contains("tpSize"), "{err}");
        }
    }

    #[test]
    fn refuses_duplicate_kinds_and_too_many_endpoints() {
        let mut twice = sample(2);
        twice.endpoints[1].kind = twice.endpoints[0].kind;
        let err = Descriptor::decode(&twice.encode()).unwrap_err();
        assert!(err.0.contains("offered twice"), "{err}");
        let mut bytes = sample(0).encode();
        // The endpoint count, before the (empty) declined list's count.
        let count_at = bytes.len() - 2;
        bytes[count_at] = MAX_ENDPOINTS as u8 + 1;
        let err = Descriptor::decode(&bytes).unwrap_err();
        assert!(err.0.contains("at most"), "{err}");
    }
}
