//! Arrival notices: the RDMA ring-slot decoder never reads past the slot, the notice
//! decoder refuses what it cannot re-encode byte for byte, and a decoded landing
//! re-encodes to itself.
#![no_main]
use kvtransfer_engine::internals::{decode_notice, Landing, Notice};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(record) = decode_notice(data) {
        assert!(record.len() + 2 <= data.len());
    }
    if let Ok(notice) = Notice::decode(data) {
        assert_eq!(notice.encode(), data);
    }
    if let Ok(landing) = Landing::decode(data) {
        assert_eq!(Landing::decode(&landing.to_bytes()).unwrap(), landing);
    }
});
