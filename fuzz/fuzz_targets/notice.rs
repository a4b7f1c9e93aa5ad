//! The RDMA arrival-notice record decoder: never reads past the record.
#![no_main]
use kvtransfer_engine::internals::decode_notice;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((_, _, tag)) = decode_notice(data) {
        assert!(tag.len() + 9 <= data.len());
    }
});
