//! Wire formats: the handshake descriptor exchanged on the control plane and the TCP data
//! frames. Every decoder is length-checked and bounded: malformed input is an error, never a
//! panic or an unbounded allocation.

use crate::layout::MAX_LAYERS;

/// Magic + version at the start of every descriptor.
pub const DESCRIPTOR_MAGIC: [u8; 4] = *b"KVTX";
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest descriptor accepted (regions of MAX_LAYERS × 2 plus QPs fit well within it).
pub const MAX_DESCRIPTOR_BYTES: usize = 256 * 1024;
pub const MAX_QPS_PER_PEER: usize = 64;
pub const MAX_NAME_BYTES: usize = 255;
pub const MAX_NOTICE_SLOTS: u32 = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Prefill = 0,
    Decode = 1,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "prefill" => Some(Role::Prefill),
            "decode" => Some(Role::Decode),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

/// One RC queue pair's connection data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpEndpoint {
    pub qp_num: u32,
    pub psn: u32,
}

/// Where a peer's memory is and how to reach its queue pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaEndpoint {
    pub lid: u16,
    pub gid: [u8; 16],
    /// ibv_mtu enum value of the port's active MTU.
    pub mtu: u8,
    /// Whether the port is native InfiniBand (route by LID) rather than RoCE (route by GID).
    pub infiniband: bool,
    pub qps: Vec<QpEndpoint>,
    /// (address, rkey) of every region, in region-table order.
    pub regions: Vec<(u64, u32)>,
    /// The acceptor's arrival-notice ring for this peer: address, rkey, slot count
    /// (all zero in a connector's hello).
    pub notice_ring: (u64, u32, u32),
}

/// What one side tells the other during `connect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub role: Role,
    pub instance_id: u64,
    pub layers: u32,
    pub has_value: bool,
    pub block_number: u32,
    pub block_bytes: u64,
    /// The sender's self-chosen name, reported with its arrival notices (at most 255 bytes).
    pub name: String,
    /// Port of the TCP data listener (0: none).
    pub tcp_port: u16,
    /// Token that admits one TCP data connection (set in the acceptor's reply).
    pub session: u64,
    pub rdma: Option<RdmaEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                DecodeError(format!(
                    "truncated descriptor: {what} needs {n} bytes at offset {}, {} left",
                    self.at,
                    self.bytes.len() - self.at
                ))
            })?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }
    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn bool(&mut self, what: &str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError(format!("{what} must be 0 or 1, got {other}"))),
        }
    }
}

impl Descriptor {
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
        let name = &self.name.as_bytes()[..self.name.len().min(MAX_NAME_BYTES)];
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&self.tcp_port.to_le_bytes());
        out.extend_from_slice(&self.session.to_le_bytes());
        match &self.rdma {
            None => out.push(0),
            Some(rdma) => {
                out.push(1);
                out.extend_from_slice(&rdma.lid.to_le_bytes());
                out.extend_from_slice(&rdma.gid);
                out.push(rdma.mtu);
                out.push(u8::from(rdma.infiniband));
                out.extend_from_slice(&(rdma.qps.len() as u16).to_le_bytes());
                for qp in &rdma.qps {
                    out.extend_from_slice(&qp.qp_num.to_le_bytes());
                    out.extend_from_slice(&qp.psn.to_le_bytes());
                }
                out.extend_from_slice(&(rdma.regions.len() as u32).to_le_bytes());
                for (addr, rkey) in &rdma.regions {
                    out.extend_from_slice(&addr.to_le_bytes());
                    out.extend_from_slice(&rkey.to_le_bytes());
                }
                out.extend_from_slice(&rdma.notice_ring.0.to_le_bytes());
                out.extend_from_slice(&rdma.notice_ring.1.to_le_bytes());
                out.extend_from_slice(&rdma.notice_ring.2.to_le_bytes());
            }
        }
        let total = out.len() as u32;
        out[6..10].copy_from_slice(&total.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Descriptor, DecodeError> {
        if bytes.len() > MAX_DESCRIPTOR_BYTES {
            return Err(DecodeError(format!(
                "descriptor of {} bytes exceeds the limit of {MAX_DESCRIPTOR_BYTES}",
                bytes.len()
            )));
        }
        let mut r = Reader { bytes, at: 0 };
        if r.array::<4>("magic")? != DESCRIPTOR_MAGIC {
            return Err(DecodeError(
                "not a kvtransfer descriptor (bad magic)".into(),
            ));
        }
        let version = r.u16("version")?;
        if version != PROTOCOL_VERSION {
            return Err(DecodeError(format!("protocol version {version} is not supported (this build speaks {PROTOCOL_VERSION})")));
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
        if block_number == 0 || block_bytes == 0 {
            return Err(DecodeError(
                "blockNumber and blockBytes must be positive".into(),
            ));
        }
        let name_len = r.u8("name length")? as usize;
        let name = String::from_utf8(r.take(name_len, "name")?.to_vec())
            .map_err(|_| DecodeError("peer name is not UTF-8".into()))?;
        let tcp_port = r.u16("tcp port")?;
        let session = r.u64("session")?;
        let rdma = if r.bool("rdma flag")? {
            let lid = r.u16("lid")?;
            let gid = r.array::<16>("gid")?;
            let mtu = r.u8("mtu")?;
            if !(1..=5).contains(&mtu) {
                return Err(DecodeError(format!("mtu code {mtu} outside 1..=5")));
            }
            let infiniband = r.bool("link layer")?;
            let qp_count = r.u16("qp count")? as usize;
            if qp_count == 0 || qp_count > MAX_QPS_PER_PEER {
                return Err(DecodeError(format!(
                    "qp count {qp_count} outside 1..={MAX_QPS_PER_PEER}"
                )));
            }
            let mut qps = Vec::with_capacity(qp_count);
            for _ in 0..qp_count {
                qps.push(QpEndpoint {
                    qp_num: r.u32("qp number")?,
                    psn: r.u32("psn")? & 0x00ff_ffff,
                });
            }
            let region_count = r.u32("region count")? as usize;
            let expected = layers as usize * if has_value { 2 } else { 1 };
            if region_count != expected {
                return Err(DecodeError(format!(
                    "{region_count} regions announced but the layout has {expected}"
                )));
            }
            let mut regions = Vec::with_capacity(region_count);
            for _ in 0..region_count {
                regions.push((r.u64("region address")?, r.u32("rkey")?));
            }
            let notice_ring = (
                r.u64("notice ring address")?,
                r.u32("notice ring rkey")?,
                r.u32("notice ring slots")?,
            );
            if notice_ring.2 > MAX_NOTICE_SLOTS {
                return Err(DecodeError(format!(
                    "{} notice slots exceed {MAX_NOTICE_SLOTS}",
                    notice_ring.2
                )));
            }
            Some(RdmaEndpoint {
                lid,
                gid,
                mtu,
                infiniband,
                qps,
                regions,
                notice_ring,
            })
        } else {
            None
        };
        if r.at != bytes.len() {
            return Err(DecodeError(format!(
                "{} trailing bytes after the descriptor",
                bytes.len() - r.at
            )));
        }
        Ok(Descriptor {
            role,
            instance_id,
            layers,
            has_value,
            block_number,
            block_bytes,
            name,
            tcp_port,
            session,
            rdma,
        })
    }
}

/// TCP data-plane frames. Every frame starts with a fixed header.
pub mod frame {
    pub const HELLO_MAGIC: [u8; 4] = *b"KVTD";
    /// `HELLO_MAGIC`, version u16, reserved u16, session u64.
    pub const HELLO_BYTES: usize = 16;
    pub const HEADER_BYTES: usize = 24;

    /// Frame types sent by the writer.
    pub const WRITE: u8 = 1;
    pub const COMMIT: u8 = 2;
    /// Frame types sent back by the receiver.
    pub const ACK: u8 = 3;
    pub const NACK: u8 = 4;

    /// A decoded frame header. For `WRITE`: `region`, `offset`, `len` bytes of payload follow.
    /// For `COMMIT`/`ACK`/`NACK`: `offset` carries the call id, `len` the byte length of a
    /// trailing detail (notice tag or error text), at most `MAX_DETAIL_BYTES`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Header {
        pub kind: u8,
        pub flags: u8,
        pub region: u32,
        pub offset: u64,
        pub len: u32,
        pub aux: u32,
    }

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

        #[inline]
        pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<Header, super::DecodeError> {
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
                COMMIT | ACK | NACK => Err(super::DecodeError(format!(
                    "frame detail of {} bytes exceeds {MAX_DETAIL_BYTES}",
                    header.len
                ))),
                other => Err(super::DecodeError(format!("unknown frame type {other}"))),
            }
        }
    }

    pub fn encode_hello(session: u64) -> [u8; HELLO_BYTES] {
        let mut out = [0u8; HELLO_BYTES];
        out[..4].copy_from_slice(&HELLO_MAGIC);
        out[4..6].copy_from_slice(&super::PROTOCOL_VERSION.to_le_bytes());
        out[8..16].copy_from_slice(&session.to_le_bytes());
        out
    }

    pub fn decode_hello(bytes: &[u8; HELLO_BYTES]) -> Result<u64, super::DecodeError> {
        if bytes[..4] != HELLO_MAGIC {
            return Err(super::DecodeError(
                "data connection did not start with the kvtransfer hello".into(),
            ));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != super::PROTOCOL_VERSION {
            return Err(super::DecodeError(format!(
                "data protocol version {version} is not supported"
            )));
        }
        Ok(u64::from_le_bytes([
            bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14], bytes[15],
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rdma: bool) -> Descriptor {
        Descriptor {
            role: Role::Decode,
            instance_id: 0x1122_3344_5566_7788,
            layers: 2,
            has_value: true,
            block_number: 1024,
            block_bytes: 4096,
            name: "prefill-0:5000".into(),
            tcp_port: 40000,
            session: 99,
            rdma: rdma.then(|| RdmaEndpoint {
                lid: 0,
                gid: [7; 16],
                mtu: 3,
                infiniband: false,
                qps: vec![QpEndpoint {
                    qp_num: 17,
                    psn: 0x123456,
                }],
                regions: vec![(0x1000, 1), (0x2000, 2), (0x3000, 3), (0x4000, 4)],
                notice_ring: (0x9000, 5, 256),
            }),
        }
    }

    #[test]
    fn round_trips() {
        for rdma in [false, true] {
            let d = sample(rdma);
            assert_eq!(Descriptor::decode(&d.encode()).unwrap(), d);
        }
    }

    #[test]
    fn rejects_every_truncation_and_corruption() {
        let bytes = sample(true).encode();
        for cut in 0..bytes.len() {
            assert!(Descriptor::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = bytes.clone();
        bad[4] = 9;
        assert!(Descriptor::decode(&bad)
            .unwrap_err()
            .0
            .contains("version 9"));
        let mut long = bytes.clone();
        long.push(0);
        assert!(Descriptor::decode(&long).is_err());
    }

    #[test]
    fn frame_headers_round_trip_and_reject_garbage() {
        let h = frame::Header {
            kind: frame::WRITE,
            flags: 0,
            region: 3,
            offset: 1 << 40,
            len: 4096,
            aux: 0,
        };
        assert_eq!(frame::Header::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] = 77;
        assert!(frame::Header::decode(&bad).is_err());
        let big = frame::Header {
            kind: frame::COMMIT,
            len: frame::MAX_DETAIL_BYTES + 1,
            ..h
        };
        assert!(frame::Header::decode(&big.encode()).is_err());
        assert_eq!(frame::decode_hello(&frame::encode_hello(5)).unwrap(), 5);
    }
}
