//! The handshake: the optional shared-secret authentication (challenge, response, hello,
//! reply), the layout check, and the choice of transport.
//!
//! Connector: `auth_challenge` → (acceptor: `auth_respond`) → `hello` → (acceptor: `accept`)
//! → `finish_connect`. The hello offers an endpoint of every transport the connector has,
//! most preferred first; the acceptor takes the first of its own transports, in its order
//! of preference, that the connector offered and that can serve it, and replies with that
//! one endpoint.

use super::left::LeftReport;
use super::peers::Peer;
use super::{ConnectAuth, Engine};
use crate::auth::{self, Challenge, Envelope, Response};
use crate::config::TransportChoice;
use crate::error::{Error, Result};
use crate::layout::CacheLayout;
use crate::log::debug;
use crate::shard::Shard;
use crate::transport::{AcceptingPeer, ConnectTarget, Link, Transport, TransportKind};
use crate::wire::{Declined, Descriptor, Endpoint};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the connecting side has once the acceptor's reply is checked and its link open.
struct OpenedLink<'e> {
    /// The transport the acceptor chose (it explains the decision).
    transport: &'e dyn Transport,
    remote_layout: CacheLayout,
    shard: Shard,
    link: Box<dyn Link>,
    /// The acceptor's account of the offers it passed over.
    declined: Vec<Declined>,
}

/// How long a challenge stays usable.
const CHALLENGE_LIFETIME: Duration = Duration::from_secs(60);

impl Engine {
    /// Whether this engine requires the shared-secret handshake.
    pub fn has_auth_token(&self) -> bool {
        self.inner.auth_token.is_some()
    }

    /// First handshake message of `connect(peer_key)`: this side's nonce (nothing else is
    /// revealed before the acceptor proved it knows the shared secret).
    pub fn auth_challenge(&self, peer_key: &str) -> Result<Vec<u8>> {
        self.check_open()?;
        let nonce_c = auth::random_nonce();
        crate::util::lock(&self.inner.connecting).insert(
            peer_key.to_string(),
            ConnectAuth {
                nonce_c,
                nonce_a: None,
            },
        );
        Ok(Challenge {
            has_token: self.has_auth_token(),
            nonce_c,
        }
        .encode())
    }

    /// Accepting side, first message: answers a challenge with this side's nonce and its
    /// proof of the shared secret. Refuses (`ERR_AUTH`) when only one side has a token.
    pub fn auth_respond(&self, challenge: &[u8]) -> Result<Vec<u8>> {
        self.check_open()?;
        let challenge =
            Challenge::decode(challenge).map_err(|e| Error::protocol("connecting peer", e.0))?;
        let token = self.inner.auth_token.as_deref();
        self.check_token_presence(challenge.has_token)?;
        let nonce_a = auth::issue_nonce(
            &self.inner.challenge_key,
            &challenge.nonce_c,
            self.clock_ms(),
        );
        let proof = token.map_or([0; auth::MAC_BYTES], |token| {
            auth::mac(token, auth::LABEL_ACCEPTOR, &[&challenge.nonce_c, &nonce_a])
        });
        Ok(Response {
            has_token: token.is_some(),
            nonce_a,
            proof,
        }
        .encode())
    }

    /// Milliseconds since this engine started: the clock of its challenge nonces.
    fn clock_ms(&self) -> u64 {
        self.inner.started.elapsed().as_millis() as u64
    }

    /// A token on one side only is refused before anything else is looked at.
    fn check_token_presence(&self, peer_has_token: bool) -> Result<()> {
        match (self.inner.auth_token.is_some(), peer_has_token) {
            (true, false) => Err(self.refuse_auth(
                "the connecting peer has no auth token but this side requires one (KVCACHE_AUTH_TOKEN / authToken)",
            )),
            (false, true) => Err(self.refuse_auth(
                "the connecting peer uses an auth token but this side has none (KVCACHE_AUTH_TOKEN / authToken)",
            )),
            _ => Ok(()),
        }
    }

    fn refuse_auth(&self, reason: &str) -> Error {
        crate::log::log_error!(
            "engine {}: refused a connecting peer: authentication failed: {reason}",
            self.inner.name()
        );
        Error::Auth {
            peer: "connecting peer".into(),
            reason: reason.into(),
        }
    }

    /// Second message of `connect(peer_key)`, after the acceptor's `response`: checks the
    /// acceptor's proof (when a token is set), then returns this side's descriptor (with
    /// fresh queue pairs for the peer when RDMA is available) in an authenticated envelope.
    pub fn hello(&self, peer_key: &str, response: &[u8]) -> Result<Vec<u8>> {
        self.check_open()?;
        let response = Response::decode(response).map_err(|e| Error::protocol(peer_key, e.0))?;
        let nonce_c = {
            let mut connecting = crate::util::lock(&self.inner.connecting);
            let state = connecting.get_mut(peer_key).ok_or_else(|| {
                Error::protocol(
                    peer_key,
                    "no challenge was sent to this peer (call auth_challenge first)",
                )
            })?;
            state.nonce_a = Some(response.nonce_a);
            state.nonce_c
        };
        let auth_error = |reason: &str| Error::Auth {
            peer: peer_key.to_string(),
            reason: reason.to_string(),
        };
        let token = self.inner.auth_token.as_deref();
        match (token, response.has_token) {
            (Some(_), false) => return Err(auth_error("the peer has no auth token but this side requires one (KVCACHE_AUTH_TOKEN / authToken); nothing was sent")),
            (None, true) => return Err(auth_error("the peer requires an auth token but this side has none (set KVCACHE_AUTH_TOKEN or the authToken option)")),
            (Some(token), true) => {
                if !auth::verify(
                    token,
                    auth::LABEL_ACCEPTOR,
                    &[&nonce_c, &response.nonce_a],
                    &response.proof,
                ) {
                    return Err(auth_error("the peer's proof of the shared secret does not match: the two sides have different auth tokens; nothing was sent"));
                }
            }
            (None, false) => {}
        }
        let mut endpoints = Vec::with_capacity(self.inner.transports.len());
        for transport in &self.inner.transports {
            match transport.offer(peer_key) {
                Ok(bytes) => endpoints.push(Endpoint {
                    kind: transport.kind().code(),
                    bytes,
                }),
                Err(e) => {
                    self.forget_offers(peer_key);
                    return Err(e);
                }
            }
        }
        let descriptor = self.descriptor(endpoints).encode();
        let mac = token.map_or([0; auth::MAC_BYTES], |token| {
            auth::mac(
                token,
                auth::LABEL_HELLO,
                &[&nonce_c, &response.nonce_a, &descriptor],
            )
        });
        Ok(Envelope {
            has_token: token.is_some(),
            nonce_c,
            nonce_a: response.nonce_a,
            mac,
            descriptor,
        }
        .encode())
    }

    /// Answers a peer's hello: checks its layout and admits its data connection (RDMA
    /// queue pairs connected to the peer's when both sides have RDMA, else a TCP session).
    pub fn accept(&self, hello: &[u8]) -> Result<Vec<u8>> {
        self.check_open()?;
        let envelope =
            Envelope::decode(hello).map_err(|e| Error::protocol("connecting peer", e.0))?;
        let token = self.inner.auth_token.as_deref();
        self.check_token_presence(envelope.has_token)?;
        // Both sides have a token here (presence was checked above).
        if let Some(token) = token {
            let issued_ms = auth::nonce_issued_at(
                &self.inner.challenge_key,
                &envelope.nonce_c,
                &envelope.nonce_a,
            );
            let lifetime_ms = CHALLENGE_LIFETIME.as_millis() as u64;
            let expired_or_foreign =
                issued_ms.is_none_or(|ms| self.clock_ms().saturating_sub(ms) >= lifetime_ms);
            if expired_or_foreign {
                return Err(self.refuse_auth(
                    "the hello answers no challenge this side issued (unknown or expired nonce)",
                ));
            }
            if !auth::verify(
                token,
                auth::LABEL_HELLO,
                &[&envelope.nonce_c, &envelope.nonce_a, &envelope.descriptor],
                &envelope.mac,
            ) {
                return Err(self.refuse_auth(
                        "the hello's MAC does not match: the connecting peer does not know this side's auth token",
                    ));
            }
            let mut used = crate::util::lock(&self.inner.used_nonces);
            used.retain(|_, at| at.elapsed() < CHALLENGE_LIFETIME);
            if used.insert(envelope.nonce_a, Instant::now()).is_some() {
                return Err(self.refuse_auth(
                    "the hello answers a challenge that was already used (a replayed hello)",
                ));
            }
        }
        let remote = Descriptor::decode(&envelope.descriptor)
            .map_err(|e| Error::protocol("connecting peer", e.0))?;
        let peer_name = if remote.name.is_empty() {
            format!("{:016x}", remote.instance_id)
        } else {
            remote.name.clone()
        };
        let remote_layout = self.check_compatible(&peer_name, &remote)?;
        self.plan_shards(&peer_name, &remote, &remote_layout, false, None)?;
        let (transport, theirs, declined) = self.choose_transport(&peer_name, &remote)?;
        let ours = transport.accept(
            AcceptingPeer {
                name: &peer_name,
                instance_id: remote.instance_id,
            },
            theirs,
        )?;
        let mut reply = self.descriptor(vec![Endpoint {
            kind: transport.kind().code(),
            bytes: ours,
        }]);
        reply.declined = self.declined_offers(transport.kind(), &remote, &declined);
        debug!(
            "accepted hello from {peer_name} ({}) over {}",
            remote.role.as_str(),
            transport.kind().name()
        );
        let reply = reply.encode();
        self.grant_listen(envelope.nonce_c, envelope.nonce_a, &peer_name);
        let mac = token.map_or([0; auth::MAC_BYTES], |token| {
            auth::mac(
                token,
                auth::LABEL_REPLY,
                &[&envelope.nonce_c, &envelope.nonce_a, &reply],
            )
        });
        Ok(Envelope {
            has_token: token.is_some(),
            nonce_c: envelope.nonce_c,
            nonce_a: envelope.nonce_a,
            mac,
            descriptor: reply,
        }
        .encode())
    }

    /// Completes `connect(host, port)` with the acceptor's reply: opens the data path and
    /// registers the peer under `peer_key` (replacing an earlier connection).
    pub fn finish_connect(&self, peer_key: &str, host: &str, reply: &[u8]) -> Result<()> {
        self.finish_connect_expecting(peer_key, host, reply, None)
    }

    /// [`Engine::finish_connect`] that also refuses (`ERR_TP_MISMATCH`, nothing opened) a
    /// peer whose tensor-parallel size is not `peer_tp_size` (the seed's `dst_tp_size`).
    pub fn finish_connect_expecting(
        &self,
        peer_key: &str,
        host: &str,
        reply: &[u8],
        peer_tp_size: Option<u32>,
    ) -> Result<()> {
        self.check_open()?;
        let envelope = Envelope::decode(reply).map_err(|e| Error::protocol(peer_key, e.0))?;
        let state = crate::util::lock(&self.inner.connecting).remove(peer_key);
        if let Some(token) = self.inner.auth_token.as_deref() {
            let matches = state.is_some_and(|state| {
                state.nonce_c == envelope.nonce_c && state.nonce_a == Some(envelope.nonce_a)
            });
            if !envelope.has_token
                || !matches
                || !auth::verify(
                    token,
                    auth::LABEL_REPLY,
                    &[&envelope.nonce_c, &envelope.nonce_a, &envelope.descriptor],
                    &envelope.mac,
                )
            {
                self.forget_offers(peer_key);
                return Err(Error::Auth {
                    peer: peer_key.to_string(),
                    reason: "the peer's reply is not authenticated by the shared secret".into(),
                });
            }
        }
        // Made before the link: the link reports a break of its own through it.
        let left = LeftReport::new(peer_key, &self.inner.peer_left);
        let link = self.open_link(peer_key, host, &envelope.descriptor, peer_tp_size, &left);
        self.forget_offers(peer_key);
        if link.is_err() {
            left.silence();
        }
        let OpenedLink {
            transport: chosen,
            remote_layout,
            shard,
            link,
            declined,
        } = link?;
        let transport = link.kind().name();
        let counters = Arc::new(self.inner.metrics.connected(peer_key, link.kind().code()));
        self.record_decision(peer_key, chosen, &declined);
        let peer = Arc::new(Peer::new(
            peer_key,
            remote_layout,
            shard,
            link,
            counters,
            left,
        ));
        let replaced = {
            let _guard = crate::util::lock(&self.inner.close_lock);
            if self.inner.closed.load(Ordering::SeqCst) {
                peer.left.silence();
                peer.link.shutdown();
                return Err(Error::Closed);
            }
            self.inner.peers.insert(peer_key, peer)
        };
        if let Some(old) = replaced {
            // Replaced by this connection: the peer did not leave.
            old.left.silence();
            old.link.shutdown();
        }
        debug!("connected to {peer_key} over {transport}");
        Ok(())
    }

    /// This side's descriptor with `endpoints`.
    fn descriptor(&self, endpoints: Vec<Endpoint>) -> Descriptor {
        let layout = self.inner.table.layout;
        Descriptor {
            role: self.inner.role,
            instance_id: self.inner.instance_id,
            layers: layout.layers,
            has_value: layout.has_value,
            block_number: layout.block_number,
            block_bytes: layout.block_bytes,
            scale_block_bytes: layout.scale_block_bytes,
            tp: self.inner.tp,
            name: self.inner.name().to_string(),
            endpoints,
            declined: Vec::new(),
        }
    }

    /// Layer count, K/V presence and the presence of scale regions must match; blockNumber
    /// may differ; blockBytes and scaleBlockBytes are checked with the tensor-parallel
    /// shards (`tp.rs`).
    fn check_compatible(&self, peer: &str, remote: &Descriptor) -> Result<CacheLayout> {
        let local = self.inner.table.layout;
        let mismatch = |what, local: u64, remote: u64| Error::LayoutMismatch {
            here: self.inner.name().to_string(),
            peer: peer.to_string(),
            what,
            local,
            remote,
        };
        if remote.layers != local.layers {
            return Err(mismatch(
                "layer count",
                local.layers.into(),
                remote.layers.into(),
            ));
        }
        if remote.has_value != local.has_value {
            return Err(mismatch(
                "value cache regions per layer",
                local.has_value.into(),
                remote.has_value.into(),
            ));
        }
        if (remote.scale_block_bytes == 0) != (local.scale_block_bytes == 0) {
            return Err(mismatch(
                "scale cache regions (keyScaleCache/valueScaleCache) present; scaleBlockBytes",
                local.scale_block_bytes,
                remote.scale_block_bytes,
            ));
        }
        CacheLayout::new(
            remote.layers,
            remote.has_value,
            remote.block_number,
            remote.block_bytes,
        )?
        .with_scales(remote.scale_block_bytes)
    }

    /// Accepting side: the first of this side's transports, in order of preference, that
    /// the connector offered and that can serve it; else a typed error with every reason.
    /// Also returns why each transport the peer offered was declined before the chosen one.
    #[expect(
        clippy::type_complexity,
        reason = "the chosen transport, its endpoint and the declined offers, used once"
    )]
    fn choose_transport<'d>(
        &self,
        peer_name: &str,
        remote: &'d Descriptor,
    ) -> Result<(&dyn Transport, &'d [u8], Vec<(TransportKind, String)>)> {
        let mut reasons = Vec::new();
        let mut declined = Vec::new();
        for transport in &self.inner.transports {
            let kind = transport.kind();
            match remote.endpoint(kind.code()) {
                None => reasons.push(format!(
                    "{}: the peer offers no {} endpoint",
                    kind.name(),
                    kind.name()
                )),
                Some(theirs) => match transport.check_peer(theirs) {
                    Ok(()) => return Ok((transport.as_ref(), theirs, declined)),
                    Err(reason) => {
                        reasons.push(format!("{}: {reason}", kind.name()));
                        declined.push((kind, reason));
                    }
                },
            }
        }
        for unusable in &self.inner.unusable {
            reasons.push(format!(
                "{}: not usable on this side ({})",
                unusable.kind.name(),
                unusable.reason
            ));
        }
        let offered: Vec<&str> = remote
            .endpoints
            .iter()
            .filter_map(|e| crate::transport::TransportKind::from_code(e.kind).map(|k| k.name()))
            .collect();
        let reason = format!(
            "no transport both {} and {peer_name} can use (the peer offers {}; this side has {}): {}",
            self.inner.name(),
            if offered.is_empty() { "none".to_string() } else { offered.join(", ") },
            self.transport_names().join(", "),
            reasons.join("; ")
        );
        crate::log::log_error!(
            "engine {}: refused a connecting peer: {reason}",
            self.inner.name()
        );
        // The error names the transport that was insisted on: the connector's only offer
        // (its user chose it), else this side's explicit choice.
        let insisted = match (offered.as_slice(), self.inner.choice) {
            ([only], _) => crate::transport::TransportKind::parse(only),
            (_, TransportChoice::Only(kind)) => Some(kind),
            (_, TransportChoice::Auto) => None,
        };
        Err(match insisted {
            Some(kind) => kind.unavailable(reason),
            None => Error::TransportUnavailable {
                transport: "auto",
                reason,
            },
        })
    }

    /// Connecting side: checks the acceptor's reply and opens the link it chose.
    fn open_link(
        &self,
        peer_key: &str,
        host: &str,
        reply: &[u8],
        peer_tp_size: Option<u32>,
        left: &Arc<LeftReport>,
    ) -> Result<OpenedLink<'_>> {
        let remote = Descriptor::decode(reply).map_err(|e| Error::protocol(peer_key, e.0))?;
        let remote_layout = self.check_compatible(peer_key, &remote)?;
        let shard = self.plan_shards(peer_key, &remote, &remote_layout, true, peer_tp_size)?;
        let [chosen] = remote.endpoints.as_slice() else {
            return Err(Error::protocol(
                peer_key,
                format!(
                    "the reply carries {} endpoints; exactly one expected",
                    remote.endpoints.len()
                ),
            ));
        };
        let transport = self
            .inner
            .transports
            .iter()
            .find(|t| t.kind().code() == chosen.kind)
            .ok_or_else(|| {
                Error::protocol(
                    peer_key,
                    format!(
                        "the reply chose transport kind {}, which this side did not offer",
                        chosen.kind
                    ),
                )
            })?;
        let link = transport.connect(
            ConnectTarget {
                peer_key,
                host,
                timeout: self.inner.connect_timeout,
                on_break: &left.hook(),
            },
            &chosen.bytes,
        )?;
        Ok(OpenedLink {
            transport: transport.as_ref(),
            remote_layout,
            shard,
            link,
            declined: remote.declined,
        })
    }

    /// Releases what every transport reserved for `peer_key` in `hello`.
    fn forget_offers(&self, peer_key: &str) {
        for transport in &self.inner.transports {
            transport.forget(peer_key);
        }
    }
}
