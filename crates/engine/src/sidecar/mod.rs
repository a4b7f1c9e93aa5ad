//! The sidecar's socket: a Unix domain socket that workers on this host attach to
//! (`kvtransfer serve`). This layer admits connections (`SO_PEERCRED`), frames messages,
//! receives file descriptors (`SCM_RIGHTS`) and sends answers without ever blocking the
//! caller; what the messages mean is the serving layer's (the TypeScript `serve`), which
//! gets them as [`SidecarEvent`]s. The protocol is in docs/sidecar.md.

mod connection;
mod frame;
mod listener;
mod route;

pub use frame::{MAX_FDS_PER_FRAME, MAX_FRAME_BYTES};
pub use listener::{SidecarOptions, SidecarServer};

use std::os::fd::OwnedFd;

/// What happens on the sidecar's socket, in order per connection.
#[derive(Debug)]
pub enum SidecarEvent {
    /// A worker connected and was admitted.
    Connected {
        /// The connection's number (never reused within a server).
        conn: u64,
        /// The worker's process id, user id and group id, as the kernel reports them.
        pid: i32,
        /// The worker's user id.
        uid: u32,
    },
    /// A whole frame arrived.
    Message {
        /// The connection it arrived on.
        conn: u64,
        /// The request id (0: not a request).
        id: u32,
        /// The frame's body (JSON by the protocol; not checked here).
        body: Vec<u8>,
        /// Descriptors received since the previous frame, in order.
        fds: Vec<OwnedFd>,
    },
    /// The connection ended (the worker disconnected or died, or it was closed here).
    Closed {
        /// The connection.
        conn: u64,
        /// Why, in words.
        reason: String,
    },
}
