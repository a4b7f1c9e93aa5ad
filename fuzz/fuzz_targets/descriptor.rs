//! The handshake descriptor decoder: never panics; what decodes re-encodes stably.
#![no_main]
use kvtransfer_engine::wire::Descriptor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(descriptor) = Descriptor::decode(data) {
        // Not always byte-identical (PSNs are masked to 24 bits), but stable.
        assert_eq!(Descriptor::decode(&descriptor.encode()).unwrap(), descriptor);
    }
});
