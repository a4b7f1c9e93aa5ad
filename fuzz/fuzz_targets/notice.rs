//! Arrival notices: the RDMA ring-slot decoder never reads past the slot, and the notice
//! decoder refuses what it cannot re-encode byte for byte.
#![no_main]
use kvtransfer_engine::internals::{decode_notice, Notice};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(record) = decode_notice(data) {
        assert!(record.len() + 2 <= data.len());
    }
    if let Ok(notice) = Notice::decode(data) {
        assert_eq!(notice.encode(), data);
    }
});
