//! Small helpers with no home of their own.

/// A random u64 from the kernel (session tokens, instance ids, PSNs).
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: the destination range lies inside `bytes`.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if n > 0 {
            filled += n as usize;
        }
    }
    u64::from_ne_bytes(bytes)
}
