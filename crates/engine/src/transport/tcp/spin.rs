//! Busy polling: an event loop that just handled bytes polls without waiting, yielding
//! the CPU between polls, a bounded number of times before it blocks in `epoll_wait`.
//! The next call's bytes then usually find the loop awake (a blocked loop costs a wake-up
//! per call, which on a VM is a halted vCPU to wake); an idle loop stops after
//! [`SPIN_POLLS`] polls and takes no CPU.

use std::time::Duration;

/// Polls without waiting after the last bytes handled (as `util::poll_then_recv`).
const SPIN_POLLS: u32 = 64;

/// How many more polls without waiting are left before the loop blocks.
pub(super) struct Spin {
    left: u32,
}

impl Spin {
    pub fn new() -> Spin {
        Spin { left: 0 }
    }

    /// Bytes were handled now.
    pub fn busy(&mut self) {
        self.left = SPIN_POLLS;
    }

    /// The timeout of the next poll: zero (after yielding the CPU) while polls are left,
    /// else `otherwise`.
    pub fn timeout(&mut self, otherwise: Option<Duration>) -> Option<Duration> {
        if self.left == 0 {
            return otherwise;
        }
        self.left -= 1;
        std::thread::yield_now();
        Some(Duration::ZERO)
    }
}
