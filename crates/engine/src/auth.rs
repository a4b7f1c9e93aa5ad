//! Optional shared-secret authentication of the handshake (`KVCACHE_AUTH_TOKEN` or the
//! `authToken` option): a challenge–response with HMAC-SHA256 over nonces from both sides
//! and the descriptors. The secret never travels; no descriptor (region addresses, rkeys,
//! TCP session tokens) is sent or accepted before the other side proved knowledge of it.
//!
//! Messages (little endian, each starting with `AUTH_MAGIC` and the protocol version):
//!
//! 1. connector → acceptor, `Challenge`: flags (bit 0: the connector has a token), nonce_c.
//! 2. acceptor → connector, `Response`: flags (bit 0: the acceptor has a token), nonce_a,
//!    proof_a = HMAC(token, "kvt-acceptor" ‖ nonce_c ‖ nonce_a) (zero without a token).
//!    The connector checks proof_a before it sends its descriptor.
//! 3. connector → acceptor, `Envelope` (hello): nonce_c, nonce_a,
//!    mac = HMAC(token, "kvt-hello" ‖ nonce_c ‖ nonce_a ‖ descriptor), descriptor. The
//!    acceptor checks that it issued nonce_a for nonce_c (single use) and the mac before it
//!    decodes the descriptor, creates queue pairs or admits a TCP session.
//! 4. acceptor → connector, `Envelope` (reply): the same nonces, mac over "kvt-reply" ‖
//!    nonces ‖ reply descriptor; checked before the connector uses the reply.
//! 5. connector → acceptor, on the fence channel (`listen`): the writer's name, nonce_a and
//!    HMAC(token, "kvt-listen" ‖ nonce_c ‖ nonce_a ‖ name). The acceptor takes it once per
//!    accepted hello, for the name that hello's descriptor carried (`engine/listen_auth.rs`),
//!    so no one without the token can take (and falsely acknowledge) a writer's fences.

use crate::wire::{DecodeError, MAX_DESCRIPTOR_BYTES};
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const AUTH_MAGIC: [u8; 4] = *b"KVTA";
pub const AUTH_VERSION: u16 = 1;
pub const NONCE_BYTES: usize = 32;
pub const MAC_BYTES: usize = 32;
pub const CHALLENGE_BYTES: usize = 4 + 2 + 1 + NONCE_BYTES;
pub const RESPONSE_BYTES: usize = 4 + 2 + 1 + NONCE_BYTES + MAC_BYTES;
pub const ENVELOPE_HEADER_BYTES: usize = 4 + 2 + 1 + 2 * NONCE_BYTES + MAC_BYTES;
/// Largest token accepted (HMAC keys of any length work; this bounds configuration).
pub const MAX_TOKEN_BYTES: usize = 4096;

const FLAG_HAS_TOKEN: u8 = 1;

pub type Nonce = [u8; NONCE_BYTES];
pub type Tag = [u8; MAC_BYTES];

pub fn random_nonce() -> Nonce {
    let mut nonce = [0u8; NONCE_BYTES];
    for chunk in nonce.chunks_mut(8) {
        chunk.copy_from_slice(&crate::util::random_u64().to_le_bytes());
    }
    nonce
}

/// HMAC-SHA256 of `parts` (concatenated) under `token`, prefixed by the domain `label`.
pub fn mac(token: &[u8], label: &str, parts: &[&[u8]]) -> Tag {
    let mut hmac =
        <Hmac<Sha256> as Mac>::new_from_slice(token).expect("HMAC accepts keys of any length");
    hmac.update(label.as_bytes());
    for part in parts {
        hmac.update(part);
    }
    hmac.finalize().into_bytes().into()
}

/// Checks `tag` against the expected MAC in constant time.
pub fn verify(token: &[u8], label: &str, parts: &[&[u8]], tag: &[u8]) -> bool {
    let mut hmac =
        <Hmac<Sha256> as Mac>::new_from_slice(token).expect("HMAC accepts keys of any length");
    hmac.update(label.as_bytes());
    for part in parts {
        hmac.update(part);
    }
    hmac.verify_slice(tag).is_ok()
}

/// The acceptor's nonce is self-authenticating, so that issuing one keeps no state (a
/// flood of challenges cannot evict a genuine one): random (8 bytes) ‖ issued at (u64 LE,
/// milliseconds on the acceptor's clock) ‖ the first 16 bytes of
/// HMAC(acceptor key, "kvt-challenge" ‖ nonce_c ‖ random ‖ issued at).
pub fn issue_nonce(acceptor_key: &[u8], nonce_c: &Nonce, issued_ms: u64) -> Nonce {
    let mut nonce = [0u8; NONCE_BYTES];
    nonce[..8].copy_from_slice(&crate::util::random_u64().to_le_bytes());
    nonce[8..16].copy_from_slice(&issued_ms.to_le_bytes());
    let tag = mac(acceptor_key, LABEL_CHALLENGE, &[nonce_c, &nonce[..16]]);
    nonce[16..].copy_from_slice(&tag[..NONCE_BYTES - 16]);
    nonce
}

/// When `nonce_a` was issued by [`issue_nonce`] under `acceptor_key` for `nonce_c`: its
/// issue time (checked in constant time); else `None`.
pub fn nonce_issued_at(acceptor_key: &[u8], nonce_c: &Nonce, nonce_a: &Nonce) -> Option<u64> {
    let mut hmac = <Hmac<Sha256> as Mac>::new_from_slice(acceptor_key)
        .expect("HMAC accepts keys of any length");
    hmac.update(LABEL_CHALLENGE.as_bytes());
    hmac.update(nonce_c);
    hmac.update(&nonce_a[..16]);
    hmac.verify_truncated_left(&nonce_a[16..]).ok()?;
    Some(u64::from_le_bytes(nonce_a[8..16].try_into().ok()?))
}

const LABEL_CHALLENGE: &str = "kvt-challenge";
pub const LABEL_ACCEPTOR: &str = "kvt-acceptor";
pub const LABEL_HELLO: &str = "kvt-hello";
pub const LABEL_REPLY: &str = "kvt-reply";
pub const LABEL_LISTEN: &str = "kvt-listen";

/// Message 1, connector → acceptor: opens an authenticated handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Whether the connector has an auth token (a token on one side only is refused).
    pub has_token: bool,
    /// The connector's fresh random nonce.
    pub nonce_c: Nonce,
}

/// Message 2, acceptor → connector: the acceptor's nonce and its proof of the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Whether the acceptor has an auth token.
    pub has_token: bool,
    /// The acceptor's nonce, issued statelessly by `issue_nonce` for the challenge's nonce.
    pub nonce_a: Nonce,
    /// HMAC(token, "kvt-acceptor" ‖ nonce_c ‖ nonce_a); all zero without a token.
    pub proof: Tag,
}

/// Messages 3 and 4 (hello and reply): an encoded descriptor bound to both nonces by a MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Whether the sender has an auth token.
    pub has_token: bool,
    /// The connector's nonce from the [`Challenge`].
    pub nonce_c: Nonce,
    /// The acceptor's nonce from the [`Response`].
    pub nonce_a: Nonce,
    /// HMAC(token, label ‖ nonce_c ‖ nonce_a ‖ descriptor), the label "kvt-hello" or
    /// "kvt-reply"; all zero without a token.
    pub mac: Tag,
    /// The encoded descriptor it carries (at most `MAX_DESCRIPTOR_BYTES`).
    pub descriptor: Vec<u8>,
}

fn header(out: &mut Vec<u8>, has_token: bool) {
    out.extend_from_slice(&AUTH_MAGIC);
    out.extend_from_slice(&AUTH_VERSION.to_le_bytes());
    out.push(if has_token { FLAG_HAS_TOKEN } else { 0 });
}

/// Checks magic, version and flags; returns the has-token flag.
fn check_header(bytes: &[u8], what: &str) -> Result<bool, DecodeError> {
    if bytes.len() < 7 {
        return Err(DecodeError(format!(
            "{what} of {} bytes is truncated",
            bytes.len()
        )));
    }
    if bytes[..4] != AUTH_MAGIC {
        return Err(DecodeError(format!(
            "{what} is not a kvtransfer auth message (bad magic)"
        )));
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != AUTH_VERSION {
        return Err(DecodeError(format!(
            "{what}: auth protocol version {version} is not supported (this build speaks {AUTH_VERSION})"
        )));
    }
    match bytes[6] {
        0 => Ok(false),
        FLAG_HAS_TOKEN => Ok(true),
        other => Err(DecodeError(format!("{what}: unknown flags {other:#x}"))),
    }
}

fn array<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

impl Challenge {
    /// Its wire form: header (magic, version, flags), then `nonce_c`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CHALLENGE_BYTES);
        header(&mut out, self.has_token);
        out.extend_from_slice(&self.nonce_c);
        out
    }

    /// Parses a challenge; refuses a bad header or a length other than `CHALLENGE_BYTES`.
    pub fn decode(bytes: &[u8]) -> Result<Challenge, DecodeError> {
        let has_token = check_header(bytes, "auth challenge")?;
        if bytes.len() != CHALLENGE_BYTES {
            return Err(DecodeError(format!(
                "auth challenge has {} bytes, expected {CHALLENGE_BYTES}",
                bytes.len()
            )));
        }
        Ok(Challenge {
            has_token,
            nonce_c: array(bytes, 7),
        })
    }
}

impl Response {
    /// Its wire form: header, then `nonce_a` and `proof`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RESPONSE_BYTES);
        header(&mut out, self.has_token);
        out.extend_from_slice(&self.nonce_a);
        out.extend_from_slice(&self.proof);
        out
    }

    /// Parses a response; refuses a bad header or a length other than `RESPONSE_BYTES`.
    pub fn decode(bytes: &[u8]) -> Result<Response, DecodeError> {
        let has_token = check_header(bytes, "auth response")?;
        if bytes.len() != RESPONSE_BYTES {
            return Err(DecodeError(format!(
                "auth response has {} bytes, expected {RESPONSE_BYTES}",
                bytes.len()
            )));
        }
        Ok(Response {
            has_token,
            nonce_a: array(bytes, 7),
            proof: array(bytes, 7 + NONCE_BYTES),
        })
    }
}

impl Envelope {
    /// Its wire form: header, `nonce_c`, `nonce_a`, `mac`, then the descriptor bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENVELOPE_HEADER_BYTES + self.descriptor.len());
        header(&mut out, self.has_token);
        out.extend_from_slice(&self.nonce_c);
        out.extend_from_slice(&self.nonce_a);
        out.extend_from_slice(&self.mac);
        out.extend_from_slice(&self.descriptor);
        out
    }

    /// Parses an envelope; refuses a bad header, a truncated one, or a descriptor longer
    /// than `MAX_DESCRIPTOR_BYTES`. The MAC is not checked here.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        let has_token = check_header(bytes, "handshake envelope")?;
        if bytes.len() < ENVELOPE_HEADER_BYTES {
            return Err(DecodeError(format!(
                "handshake envelope of {} bytes is shorter than its {ENVELOPE_HEADER_BYTES}-byte header",
                bytes.len()
            )));
        }
        if bytes.len() > ENVELOPE_HEADER_BYTES + MAX_DESCRIPTOR_BYTES {
            return Err(DecodeError(format!(
                "handshake envelope of {} bytes exceeds the limit",
                bytes.len()
            )));
        }
        Ok(Envelope {
            has_token,
            nonce_c: array(bytes, 7),
            nonce_a: array(bytes, 7 + NONCE_BYTES),
            mac: array(bytes, 7 + 2 * NONCE_BYTES),
            descriptor: bytes[ENVELOPE_HEADER_BYTES..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_reject_truncation() {
        let c = Challenge {
            has_token: true,
            nonce_c: random_nonce(),
        };
        assert_eq!(Challenge::decode(&c.encode()).unwrap(), c);
        let r = Response {
            has_token: false,
            nonce_a: random_nonce(),
            proof: [9; 32],
        };
        assert_eq!(Response::decode(&r.encode()).unwrap(), r);
        let e = Envelope {
            has_token: true,
            nonce_c: [1; 32],
            nonce_a: [2; 32],
            mac: [3; 32],
            descriptor: vec![4; 100],
        };
        let bytes = e.encode();
        assert_eq!(Envelope::decode(&bytes).unwrap(), e);
        for cut in 0..ENVELOPE_HEADER_BYTES {
            assert!(Envelope::decode(&bytes[..cut]).is_err());
        }
        for cut in 0..CHALLENGE_BYTES {
            assert!(Challenge::decode(&c.encode()[..cut]).is_err());
        }
    }

    #[test]
    fn macs_bind_key_label_and_data() {
        let tag = mac(b"secret", LABEL_HELLO, &[b"a", b"bc"]);
        assert!(verify(b"secret", LABEL_HELLO, &[b"ab", b"c"], &tag));
        assert!(!verify(b"secret2", LABEL_HELLO, &[b"abc"], &tag));
        assert!(!verify(b"secret", LABEL_REPLY, &[b"abc"], &tag));
        assert!(!verify(b"secret", LABEL_HELLO, &[b"abd"], &tag));
        assert!(!verify(b"secret", LABEL_HELLO, &[b"abc"], &tag[..31]));
    }
}
