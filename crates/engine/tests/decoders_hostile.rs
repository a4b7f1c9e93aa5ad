//! Every decoder of network bytes, fed random and mutated input without nightly or
//! cargo-fuzz (the libFuzzer targets in `fuzz/` go further): errors only, never a panic,
//! and whatever decodes re-encodes to the same bytes.

use kvtransfer_engine::internals::{
    decode_notice, frame, Descriptor, Endpoint, GidCandidate, Landing, Notice, NvlinkEndpoint,
    NvlinkMemoryTable, QpEndpoint, RailEndpoint, RdmaEndpoint, TcpEndpoint,
};
use kvtransfer_engine::internals::{Challenge, Envelope, Response};
use kvtransfer_engine::{BlockOrder, Role, TpOptions, TransportKind};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// A random mutation of `seed`: flips, overwrites with edge values, truncation,
/// extension, duplication of a slice.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = [0x00, 0xff, 0x7f, 0x80][rng.below(4)];
            }
            2 => out.truncate(rng.below(out.len() + 1)),
            3 => {
                let len = rng.below(64);
                let extra = rng.bytes(len);
                out.extend_from_slice(&extra);
            }
            4 if out.len() >= 4 => {
                // A 32-bit field set to an extreme value (lengths, counts).
                let i = rng.below(out.len() - 3);
                let value = [u32::MAX, 0x8000_0000, 0, 65, 257][rng.below(5)];
                out[i..i + 4].copy_from_slice(&value.to_le_bytes());
            }
            _ if !out.is_empty() => {
                let a = rng.below(out.len());
                let b = a + rng.below(out.len() - a);
                let piece = out[a..b].to_vec();
                let at = rng.below(out.len());
                out.splice(at..at, piece);
            }
            _ => {}
        }
    }
    out
}

fn descriptors() -> Vec<Vec<u8>> {
    let mut plain = Descriptor {
        role: Role::Prefill,
        instance_id: 42,
        layers: 3,
        has_value: true,
        block_number: 100,
        block_bytes: 4096,
        scale_block_bytes: 0,
        tp: TpOptions {
            size: 8,
            rank: 5,
            replicated: false,
            order: BlockOrder::TokenMajor {
                tokens_per_block: 16,
            },
        },
        name: "prefill-7:5000".into(),
        endpoints: vec![Endpoint {
            kind: TransportKind::Tcp.code(),
            bytes: TcpEndpoint {
                port: 4000,
                session: 77,
            }
            .encode(),
        }],
        declined: Vec::new(),
    };
    let a = plain.encode();
    let rail = RailEndpoint {
        device: "mlx5_0".into(),
        peer_rail: 0,
        lid: 1,
        gids: vec![GidCandidate {
            gid: [3; 16],
            v2: true,
            prefix: 24,
        }],
        mtu: 3,
        infiniband: false,
        speed_mbps: 100_000,
        qps: vec![QpEndpoint { qp_num: 5, psn: 6 }; 2],
        regions: vec![(0x1000, 9); 6],
        notice_ring: (0x2000, 1, 256),
    };
    let rdma = RdmaEndpoint {
        rails: vec![rail.clone(), rail],
        refused: vec![(2, "no GID reaches the peer".into())],
    };
    plain.endpoints.insert(
        0,
        Endpoint {
            kind: TransportKind::Rdma.code(),
            bytes: rdma.encode(),
        },
    );
    let nvlink = NvlinkEndpoint {
        host: "boot/host".into(),
        netns: 4026531840,
        process: 9,
        gpu: [1; 16],
        gpus: vec![[1; 16], [2; 16]],
        socket: "kvtransfer-nvlink-1-2".into(),
        session: 5,
    };
    plain.endpoints.insert(
        0,
        Endpoint {
            kind: TransportKind::Nvlink.code(),
            bytes: nvlink.encode(),
        },
    );
    vec![a, plain.encode(), rdma.encode(), nvlink.encode()]
}

/// Every transport's endpoint codec: decodes or refuses, and what decodes re-encodes stably.
fn check_endpoint(data: &[u8]) {
    if let Ok(e) = RdmaEndpoint::decode(data) {
        assert_eq!(RdmaEndpoint::decode(&e.encode()).unwrap(), e);
    }
    if let Ok(e) = TcpEndpoint::decode(data) {
        assert_eq!(e.encode(), data);
    }
    if let Ok(e) = NvlinkEndpoint::decode(data) {
        assert_eq!(e.encode(), data);
    }
    if let Ok(t) = NvlinkMemoryTable::decode(data) {
        assert_eq!(t.encode(), data);
    }
}

fn check_all(data: &[u8]) {
    if let Ok(d) = Descriptor::decode(data) {
        // Not always byte-identical (PSNs are masked to 24 bits), but stable.
        assert_eq!(Descriptor::decode(&d.encode()).unwrap(), d);
        for endpoint in &d.endpoints {
            check_endpoint(&endpoint.bytes);
        }
    }
    check_endpoint(data);
    if let Ok(c) = Challenge::decode(data) {
        assert_eq!(c.encode(), data);
    }
    if let Ok(r) = Response::decode(data) {
        assert_eq!(r.encode(), data);
    }
    if let Ok(e) = Envelope::decode(data) {
        assert_eq!(e.encode(), data);
    }
    if let Some(record) = decode_notice(data) {
        assert!(2 + record.len() <= data.len());
    }
    if let Ok(notice) = Notice::decode(data) {
        assert_eq!(notice.encode(), data);
    }
    if let Ok(landing) = Landing::decode(data) {
        // Varints may come overlong: stable, not always byte-identical.
        assert_eq!(Landing::decode(&landing.to_bytes()).unwrap(), landing);
        assert!(landing.runs.len() <= data.len() / 2);
    }
    for chunk in data.chunks_exact(frame::HEADER_BYTES) {
        let bytes: &[u8; frame::HEADER_BYTES] = chunk.try_into().unwrap();
        if let Ok(h) = frame::Header::decode(bytes) {
            assert!(h.kind == frame::WRITE || h.len <= frame::MAX_DETAIL_BYTES);
        }
    }
    if let Some(bytes) = data.get(..frame::HELLO_BYTES) {
        let _ = frame::decode_hello(bytes.try_into().unwrap());
    }
}

#[test]
fn random_bytes_never_panic_any_decoder() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for _ in 0..20_000 {
        let len = rng.below(700);
        let data = rng.bytes(len);
        check_all(&data);
    }
}

#[test]
fn mutated_valid_messages_never_panic_any_decoder() {
    let mut rng = Rng(0x0bad_5eed_0bad_5eed);
    let mut seeds = descriptors();
    seeds.push(
        Challenge {
            has_token: true,
            nonce_c: [1; 32],
        }
        .encode(),
    );
    seeds.push(
        Response {
            has_token: true,
            nonce_a: [2; 32],
            proof: [3; 32],
        }
        .encode(),
    );
    seeds.push(
        Envelope {
            has_token: false,
            nonce_c: [4; 32],
            nonce_a: [5; 32],
            mac: [6; 32],
            descriptor: descriptors().remove(1),
        }
        .encode(),
    );
    seeds.push(
        frame::Header {
            kind: frame::COMMIT,
            flags: 1,
            region: 3,
            offset: 9,
            len: 12,
            aux: 1,
        }
        .encode()
        .to_vec(),
    );
    seeds.push(frame::encode_hello(99).to_vec());
    let mut notice = vec![0u8; 512];
    notice[0] = 20;
    seeds.push(notice);
    seeds.push(
        Notice {
            layer: 1,
            blocks: 2,
            cover: kvtransfer_engine::Cover::WHOLE,
            checksum: Some(7),
            tag: b"req",
        }
        .encode(),
    );
    let mut landing = vec![2u8, 0, 128, 2, 1, 128, 2, 0, 8, 1, 8, 3];
    landing.extend([14, 0, 5, 2, 1, 0]);
    assert!(Landing::decode(&landing).is_ok());
    seeds.push(landing);
    for seed in &seeds {
        check_all(seed);
        for _ in 0..5_000 {
            check_all(&mutate(&mut rng, seed));
        }
    }
}

#[test]
fn descriptor_count_fields_cannot_force_big_allocations() {
    // A descriptor claiming 2^32-1 regions or 65535 queue pairs within a small message
    // must be refused by the length checks, not by an allocation failure.
    for bytes in descriptors().into_iter().skip(1) {
        for at in 0..bytes.len().saturating_sub(4) {
            let mut evil = bytes.clone();
            evil[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            let _ = Descriptor::decode(&evil);
            let _ = RdmaEndpoint::decode(&evil);
            let _ = NvlinkEndpoint::decode(&evil);
            let _ = NvlinkMemoryTable::decode(&evil);
        }
    }
}
