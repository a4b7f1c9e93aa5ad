//! TCP data-plane decoders: the 24-byte frame header and the 16-byte connection hello.
#![no_main]
use kvtransfer_engine::internals::frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for chunk in data.chunks(frame::HEADER_BYTES) {
        if let Ok(bytes) = <&[u8; frame::HEADER_BYTES]>::try_from(chunk) {
            if let Ok(header) = frame::Header::decode(bytes) {
                // Detail lengths are bounded for every frame type that carries one.
                if header.kind != frame::WRITE {
                    assert!(header.len <= frame::MAX_DETAIL_BYTES);
                }
                assert_eq!(&header.encode()[..2], &bytes[..2]);
            }
        }
    }
    if let Ok(bytes) = <&[u8; frame::HELLO_BYTES]>::try_from(data.get(..frame::HELLO_BYTES).unwrap_or(&[])) {
        let _ = frame::decode_hello(bytes);
    }
});
