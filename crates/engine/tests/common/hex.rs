//! The hex that the tests and their peer processes (`examples/rdma_peer`,
//! `examples/nvlink_peer`) pass handshake bytes in, one line each over stdin/stdout.

/// `bytes` as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of `text`, lowercase or uppercase hex; panics on anything else.
pub fn unhex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}
