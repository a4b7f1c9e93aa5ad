//! The handshake descriptor decoder and every transport's endpoint decoder: never panic;
//! what decodes re-encodes stably.
#![no_main]
use kvtransfer_engine::internals::{
    Descriptor, NvlinkEndpoint, NvlinkMemoryTable, RdmaEndpoint, TcpEndpoint,
};
use libfuzzer_sys::fuzz_target;

fn endpoint(bytes: &[u8]) {
    if let Ok(e) = RdmaEndpoint::decode(bytes) {
        // Not always byte-identical (PSNs are masked to 24 bits), but stable.
        assert_eq!(RdmaEndpoint::decode(&e.encode()).unwrap(), e);
    }
    if let Ok(e) = TcpEndpoint::decode(bytes) {
        assert_eq!(e.encode(), bytes);
    }
    if let Ok(e) = NvlinkEndpoint::decode(bytes) {
        assert_eq!(e.encode(), bytes);
    }
    if let Ok(t) = NvlinkMemoryTable::decode(bytes) {
        assert_eq!(t.encode(), bytes);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(descriptor) = Descriptor::decode(data) {
        assert_eq!(Descriptor::decode(&descriptor.encode()).unwrap(), descriptor);
        for e in &descriptor.endpoints {
            endpoint(&e.bytes);
        }
    }
    endpoint(data);
});
