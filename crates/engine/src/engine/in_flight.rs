//! What a fence looks through: a connection's calls that its link may still be moving,
//! with their tags, and what one fence covers. A leaf of `engine/`: the peer registry keeps
//! an [`InFlight`] per connection, and `fence.rs` fails the calls a [`FenceScope`] covers.

use crate::error::Error;
use crate::transport::DoneSlot;
use crate::util::lock;
use std::sync::{Mutex, Weak};

/// What a fence covers on one writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceScope {
    /// Calls with this tag.
    Tag(Vec<u8>),
    /// Every call.
    All,
}

impl FenceScope {
    pub(super) fn covers(&self, tag: Option<&[u8]>) -> bool {
        match self {
            FenceScope::All => true,
            FenceScope::Tag(fenced) => tag == Some(fenced.as_slice()),
        }
    }

    pub(super) fn describe(&self) -> String {
        match self {
            FenceScope::All => "every call".into(),
            FenceScope::Tag(tag) => format!("tag {}", tag_text(tag)),
        }
    }
}

/// A tag as the TypeScript layer encodes it (a type byte, then a u64 or UTF-8 text), for
/// messages; other bytes are shown in hex.
fn tag_text(tag: &[u8]) -> String {
    match tag {
        [0, rest @ ..] if rest.len() == 8 => {
            let mut le = [0u8; 8];
            le.copy_from_slice(rest);
            format!("{}n", u64::from_le_bytes(le))
        }
        [1, text @ ..] => match std::str::from_utf8(text) {
            Ok(text) => format!("'{}'", text.escape_default()),
            Err(_) => hex(tag),
        },
        _ => hex(tag),
    }
}

fn hex(bytes: &[u8]) -> String {
    let digits: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("0x{digits}")
}

/// A connection's calls that its link may still be moving, with their tags: what a fence
/// looks through. Completed calls are dropped lazily.
#[derive(Default)]
pub(super) struct InFlight {
    calls: Mutex<InFlightCalls>,
}

#[derive(Default)]
struct InFlightCalls {
    calls: Vec<(Weak<DoneSlot>, Option<Vec<u8>>)>,
    /// Length after the last sweep: the next sweep comes when it doubled.
    swept: usize,
}

impl InFlight {
    /// Records a call handed to the link.
    pub fn track(&self, call: Weak<DoneSlot>, tag: Option<&[u8]>) {
        let mut inner = lock(&self.calls);
        if inner.calls.len() >= 64.max(2 * inner.swept) {
            inner
                .calls
                .retain(|(c, _)| c.upgrade().is_some_and(|c| c.is_pending()));
            inner.swept = inner.calls.len();
        }
        inner.calls.push((call, tag.map(<[u8]>::to_vec)));
    }

    /// Fails every pending call that `scope` covers with `error`; returns how many.
    pub(super) fn fail_covered(&self, scope: &FenceScope, error: &Error) -> usize {
        let mut inner = lock(&self.calls);
        let mut failed = 0;
        inner.calls.retain(|(call, tag)| {
            let Some(call) = call.upgrade() else {
                return false;
            };
            if scope.covers(tag.as_deref()) && call.fail_if_pending(error.clone()) {
                failed += 1;
            }
            call.is_pending()
        });
        inner.swept = inner.calls.len();
        failed
    }
}
