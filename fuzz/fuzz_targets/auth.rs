//! Authentication messages (challenge, response, envelope) and an acceptor fed hostile
//! handshake messages: errors only, never a panic.
#![no_main]
use kvtransfer_engine::internals::{Challenge, Envelope, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Challenge::decode(data) {
        assert_eq!(c.encode(), data);
    }
    if let Ok(r) = Response::decode(data) {
        assert_eq!(r.encode(), data);
    }
    if let Ok(e) = Envelope::decode(data) {
        assert_eq!(e.encode(), data);
    }
});
