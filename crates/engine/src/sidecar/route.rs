//! The native path of a worker's `write` requests. Once the serving layer has routed a
//! worker (its peers and prepared lists, as the TS API made them), a `write` naming them
//! is handed to the engine from the connection's reader thread, and its answer is sent
//! from the thread that completes it: no hop through JavaScript, which would cost two
//! event-loop wake-ups per call. Anything else, and any `write` this path does not know
//! (an unrouted peer or list, a malformed field), goes to the serving layer, which answers
//! it (with the typed error, when it is one).

use crate::engine::{CallBlocks, CallPeer, Engine, PeerHandle, PreparedBlocks, WriteCall};
use crate::transport::{CallSink, OnDone};
use crate::util::lock;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// Longest string tag (UTF-8 bytes) the native path encodes; longer ones go to the serving
/// layer, which refuses them (the TS API's limit).
const MAX_STRING_TAG_BYTES: usize = 254;

/// Where a routed call's answer goes: the worker's connection (a trait, so that this file
/// does not name the connection that holds the route).
pub(crate) trait Replies: Send + Sync {
    /// Sends `body` as the answer to request `id`; a connection that is gone drops it.
    fn reply(&self, id: u32, body: &[u8]);
}

/// A worker's routed peers and prepared lists, and its engine.
pub(crate) struct WorkerRoute {
    engine: Engine,
    /// The call timeout when a request gives none (the communicator's `writeTimeoutMs`).
    default_timeout: Option<Duration>,
    peers: Mutex<HashMap<String, PeerHandle>>,
    prepared: Mutex<HashMap<u32, Arc<PreparedBlocks>>>,
}

impl WorkerRoute {
    pub(crate) fn new(engine: Engine, default_timeout: Option<Duration>) -> WorkerRoute {
        WorkerRoute {
            engine,
            default_timeout,
            peers: Mutex::default(),
            prepared: Mutex::default(),
        }
    }

    pub(crate) fn add_peer(&self, key: String, peer: PeerHandle) {
        lock(&self.peers).insert(key, peer);
    }

    pub(crate) fn add_prepared(&self, handle: u32, list: Arc<PreparedBlocks>) {
        lock(&self.prepared).insert(handle, list);
    }

    pub(crate) fn remove_prepared(&self, handle: u32) {
        lock(&self.prepared).remove(&handle);
    }

    /// Hands `body` to the engine when it is a routed `write`; false: the serving layer
    /// answers it.
    pub(crate) fn try_write(&self, replies: Weak<dyn Replies>, id: u32, body: &[u8]) -> bool {
        let Ok(request) = serde_json::from_slice::<WriteRequest>(body) else {
            return false;
        };
        if request.op != "write" || id == 0 {
            return false;
        }
        let Some(peer) = lock(&self.peers).get(&request.peer).cloned() else {
            return false;
        };
        let tag = match &request.tag {
            None => None,
            Some(tag) => match tag.encode() {
                Some(bytes) => Some(bytes),
                None => return false,
            },
        };
        let timeout = match request.timeout_ms {
            None => self.default_timeout,
            Some(0.0) => None,
            Some(ms) if ms.is_finite() && ms > 0.0 => {
                Some(Duration::from_secs_f64(ms.min(3.1e10) / 1000.0))
            }
            Some(_) => return false,
        };
        let prepared;
        let blocks = match (&request.prepared, &request.local, &request.remote) {
            (Some(handle), None, None) => match lock(&self.prepared).get(handle).cloned() {
                Some(list) => {
                    prepared = list;
                    CallBlocks::Prepared(&prepared)
                }
                None => return false,
            },
            (None, Some(local), Some(remote)) => CallBlocks::Ids {
                local: crate::plan::BlockIds::U32(local),
                remote: crate::plan::BlockIds::U32(remote),
            },
            _ => return false,
        };
        let sink: Arc<dyn CallSink> = Arc::new(Answer(replies));
        let call = WriteCall {
            peer: CallPeer::Handle(&peer),
            blocks,
            layer: request.layer,
            tag,
            timeout,
            integrity: Default::default(),
        };
        if let Err(error) = self
            .engine
            .write(call, OnDone::Sink(Arc::clone(&sink), u64::from(id)))
        {
            sink.settled(u64::from(id), Err(error));
        }
        true
    }
}

/// A `write` request's fields (docs/sidecar.md).
#[derive(Deserialize)]
struct WriteRequest {
    op: String,
    peer: String,
    layer: f64,
    prepared: Option<u32>,
    local: Option<Vec<u32>>,
    remote: Option<Vec<u32>>,
    tag: Option<TagField>,
    #[serde(rename = "timeoutMs")]
    timeout_ms: Option<f64>,
}

/// `{"s": text}` or `{"u": "decimal u64"}`.
#[derive(Deserialize)]
struct TagField {
    s: Option<String>,
    u: Option<String>,
}

impl TagField {
    /// The bytes arrival notices carry (the TS API's `encodeTag`: a type byte, then the
    /// u64 little-endian or the UTF-8 text); None for anything to refuse.
    fn encode(&self) -> Option<Vec<u8>> {
        match (&self.s, &self.u) {
            (Some(text), None) if text.len() <= MAX_STRING_TAG_BYTES => {
                let mut out = Vec::with_capacity(1 + text.len());
                out.push(1);
                out.extend_from_slice(text.as_bytes());
                Some(out)
            }
            (None, Some(decimal)) if decimal.bytes().all(|b| b.is_ascii_digit()) => {
                let value: u64 = decimal.parse().ok()?;
                let mut out = vec![0];
                out.extend_from_slice(&value.to_le_bytes());
                Some(out)
            }
            _ => None,
        }
    }
}

/// Sends each call's answer on the worker's connection (gone: nothing to answer).
struct Answer(Weak<dyn Replies>);

impl CallSink for Answer {
    fn settled(&self, call: u64, result: crate::error::Result<()>) {
        let Some(replies) = self.0.upgrade() else {
            return;
        };
        let body = match result {
            Ok(()) => br#"{"ok":{}}"#.to_vec(),
            Err(error) => serde_json::to_vec(&serde_json::json!({
                "error": { "code": error.code(), "message": error.to_string() }
            }))
            .unwrap_or_default(),
        };
        replies.reply(call as u32, &body);
    }
}
