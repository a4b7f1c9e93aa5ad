//! Fence registrations with an auth token (`Engine::listen_proof`, `Engine::check_listen`):
//! the writer proves the registration belongs to its own handshake.

use crate::errors::{to_js_error, Code};
use crate::NativeCommunicator;
use napi::bindgen_prelude::*;
use napi_derive::napi;

#[napi]
impl NativeCommunicator {
    /// Writing side: the proof to send with `listen` (its name) to the peer whose handshake
    /// reply is `reply`; empty without an auth token.
    #[napi]
    pub fn listen_proof(&self, reply: Buffer, name: String) -> Result<Buffer, Code> {
        self.engine
            .listen_proof(&reply, &name)
            .map(Buffer::from)
            .map_err(to_js_error)
    }

    /// Receiving side: throws `ERR_AUTH` (naming why) unless `proof` registers writer
    /// `name` for fences under a handshake this side accepted from it (each once).
    #[napi]
    pub fn check_listen(&self, name: String, proof: Buffer) -> Result<(), Code> {
        self.engine.check_listen(&name, &proof).map_err(to_js_error)
    }
}
