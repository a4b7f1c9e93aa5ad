//! Who may take a writer's fences. A writer registers on the acceptor's fence channel
//! (`listen`, then fence requests go to that connection and it acknowledges them). With an
//! auth token, the registration carries a proof from the writer's own handshake, taken once,
//! for the name that handshake's descriptor carried: no one without the token can take the
//! fences meant for a writer, and acknowledge them while that writer's bytes still land.

use super::Engine;
use crate::auth::{self, Envelope, Nonce, MAC_BYTES, NONCE_BYTES};
use crate::error::{Error, Result};

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an accepted hello's registration stays open (the writer registers right after
/// its data path opened; this bounds a slow one).
const GRANT_LIFETIME: Duration = Duration::from_secs(300);

/// Accepting side: the registration each accepted hello may still make, by its nonce_a.
/// Only hellos with a valid MAC get here, so only token holders fill it.
#[derive(Default)]
pub(super) struct Grants(Mutex<HashMap<Nonce, Grant>>);

struct Grant {
    nonce_c: Nonce,
    writer: String,
    at: Instant,
}

impl Grants {
    /// How many are open (for the leak counters).
    pub(super) fn len(&self) -> usize {
        crate::util::lock(&self.0).len()
    }
}

impl Engine {
    /// Accepting side: the hello with these nonces, from `writer`, was accepted; its writer
    /// may register for fences once.
    pub(super) fn grant_listen(&self, nonce_c: Nonce, nonce_a: Nonce, writer: &str) {
        if self.inner.auth_token.is_none() {
            return;
        }
        let mut grants = crate::util::lock(&self.inner.listen_grants.0);
        grants.retain(|_, grant| grant.at.elapsed() < GRANT_LIFETIME);
        grants.insert(
            nonce_a,
            Grant {
                nonce_c,
                writer: writer.to_string(),
                at: Instant::now(),
            },
        );
    }

    /// Connecting side: the proof that registers this writer, `name`, for the fences of the
    /// peer whose handshake `reply` (its welcome envelope) this is: nonce_a and
    /// HMAC(token, "kvt-listen" ‖ nonce_c ‖ nonce_a ‖ name). Empty without a token.
    pub fn listen_proof(&self, reply: &[u8], name: &str) -> Result<Vec<u8>> {
        let Some(token) = self.inner.auth_token.as_deref() else {
            return Ok(Vec::new());
        };
        let envelope =
            Envelope::decode(reply).map_err(|e| Error::protocol("fence channel", e.0))?;
        let mac = auth::mac(
            token,
            auth::LABEL_LISTEN,
            &[&envelope.nonce_c, &envelope.nonce_a, name.as_bytes()],
        );
        Ok([&envelope.nonce_a[..], &mac[..]].concat())
    }

    /// Accepting side: checks the `listen` of writer `name` with `proof`; `ERR_AUTH` naming
    /// why when it is not the registration of a hello this side accepted from that writer
    /// (each is taken once). Without a token anyone may register, as anyone may connect.
    pub fn check_listen(&self, name: &str, proof: &[u8]) -> Result<()> {
        let Some(token) = self.inner.auth_token.as_deref() else {
            return Ok(());
        };
        let refuse = |reason: String| {
            crate::log::log_error!(
                "engine {}: refused a fence registration: {reason}",
                self.inner.name()
            );
            Error::Auth {
                peer: format!("writer {name:?}"),
                reason,
            }
        };
        let expected = NONCE_BYTES + MAC_BYTES;
        if proof.len() != expected {
            return Err(refuse(format!(
                "its fence registration carries a {}-byte proof; this side has an auth token and takes only the {expected}-byte proof of a handshake it accepted (is the writer's kvtransfer older?)",
                proof.len()
            )));
        }
        let (nonce_a, mac) = proof.split_at(NONCE_BYTES);
        let nonce_a: Nonce = nonce_a.try_into().expect("split at NONCE_BYTES");
        let mut grants = crate::util::lock(&self.inner.listen_grants.0);
        grants.retain(|_, grant| grant.at.elapsed() < GRANT_LIFETIME);
        let Some(grant) = grants.get(&nonce_a) else {
            return Err(refuse(
                "its fence registration answers no handshake this side accepted (unknown, expired, or already used)".into(),
            ));
        };
        if grant.writer != name {
            return Err(refuse(format!(
                "its fence registration names writer {name:?}, but that handshake came from {:?}",
                grant.writer
            )));
        }
        if !auth::verify(
            token,
            auth::LABEL_LISTEN,
            &[&grant.nonce_c, &nonce_a, name.as_bytes()],
            mac,
        ) {
            return Err(refuse(
                "its fence registration's MAC does not match: the registering process does not know this side's auth token".into(),
            ));
        }
        grants.remove(&nonce_a);
        Ok(())
    }
}
