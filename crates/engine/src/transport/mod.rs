//! Transports move planned runs into a peer's memory. Each is a folder here behind one
//! trait, [`Transport`]: it offers an endpoint (bytes it encodes itself) in the handshake,
//! says whether it can serve a peer (and why not), admits a connecting peer, and opens a
//! [`Link`] to an accepting one. A link takes batched one-sided write jobs and completes each
//! exactly once, after the peer has every byte (or with the error that stopped it).
//!
//! The engine knows transports only through these traits; `registry.rs` is the one place
//! that names the concrete ones.

mod checksum;
mod completion;
mod explanation;
mod job;
mod landing;
pub(crate) mod nvlink;
pub(crate) mod rdma;
mod registry;
pub(crate) mod tcp;

pub use crate::transport_kind::TransportKind;
pub(crate) use checksum::{push_call, source_ranges, sum_call, Landed};
pub(crate) use completion::Accounting;
pub use completion::{
    CallSink, Completion, CompletionCallback, Done, DoneSlot, OnDone, PooledRuns, RunPool,
};
pub use explanation::Explanation;
pub(crate) use job::check_tag;
pub use job::{
    copy_op, fail, for_each_copy, Arrival, ArrivalSink, ChecksumCheck, JobPlan, JobView, WriteJob,
    MAX_TAG_BYTES,
};
pub(crate) use landing::{land, record_landing};
pub use registry::TransportDetails;
pub(crate) use registry::{open_transports, probe, OpenContext, Unusable};

use crate::error::{Error, Result};
use std::sync::Arc;
use std::time::Duration;

/// The connecting peer as the acceptor knows it during the handshake.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AcceptingPeer<'a> {
    /// Its name (what arrival notices report).
    pub name: &'a str,
    /// Its engine's instance id: a reconnect of the same engine replaces its old state.
    pub instance_id: u64,
}

/// Told that a link broke on its own (the peer's process died or closed the connection,
/// the connection was lost, a write failed), with the error its calls fail with. A link
/// calls it when it first marks itself broken; it need not call it for a teardown the
/// engine asked for (`cancel`, `shutdown`), which the engine reports itself. The engine
/// reports each connection once, so a second call does nothing.
pub(crate) type BreakHook = Arc<dyn Fn(&Error) + Send + Sync>;

/// Where the connecting side reaches the acceptor's data path.
#[derive(Clone, Copy)]
pub(crate) struct ConnectTarget<'a> {
    /// `host:port` of the acceptor's control plane: the key the peer is known by.
    pub peer_key: &'a str,
    /// The host part, for transports that open their own connection to it.
    pub host: &'a str,
    /// How long opening the data path may take (`Duration::ZERO`: no bound).
    pub timeout: Duration,
    /// What the link calls when it breaks on its own.
    pub on_break: &'a BreakHook,
}

impl std::fmt::Debug for ConnectTarget<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectTarget")
            .field("peer_key", &self.peer_key)
            .field("host", &self.host)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ConnectTarget<'_> {
    /// The bound on opening the data path, or `None` for none (a zero timeout).
    pub fn bound(&self) -> Option<Duration> {
        (!self.timeout.is_zero()).then_some(self.timeout)
    }
}

/// One way of moving bytes to a peer. Connecting side: `offer` → (acceptor: `check_peer`,
/// `accept`) → `connect`. State `offer` reserves for a peer lives until `connect` or `forget`.
pub(crate) trait Transport: Send + Sync {
    fn kind(&self) -> TransportKind;
    /// Connecting side: the endpoint offered to `peer_key` in the hello.
    fn offer(&self, peer_key: &str) -> Result<Vec<u8>>;
    /// Accepting side: whether this transport can serve the peer that offered `theirs`
    /// (its endpoint of this kind); the error is a sentence a user can act on.
    fn check_peer(&self, theirs: &[u8]) -> std::result::Result<(), String>;
    /// Accepting side: admits the peer; returns this side's endpoint for the reply.
    fn accept(&self, peer: AcceptingPeer<'_>, theirs: &[u8]) -> Result<Vec<u8>>;
    /// Connecting side: opens the link from the acceptor's endpoint.
    fn connect(&self, target: ConnectTarget<'_>, theirs: &[u8]) -> Result<Box<dyn Link>>;
    /// Releases what `offer` reserved for `peer_key` (another transport was chosen, or the
    /// handshake failed).
    fn forget(&self, peer_key: &str);
    /// What this side uses (a summary and typed details) and why `auto` takes it: the
    /// engine's decision sentences and every report are built from it.
    fn explain(&self) -> Explanation;
    /// Why the memory under this side's imported regions cannot be swapped while its
    /// links live (a NIC or GPU holds a translation of the old memory that this transport
    /// cannot renew), or `None` when it follows a swap at the same address
    /// (`Engine::swap_imports`): TCP reads every address from the region table at each
    /// copy; RDMA registers host pages again; NVLink hands its writers the new
    /// descriptors. `device`: some regions are GPU memory.
    fn swap_refusal(&self, _device: bool) -> Option<String> {
        Some(format!(
            "on {}: its peers hold translations of the old memory",
            self.kind().label()
        ))
    }
    /// Follows a park (`parked`) or a swap of the memory under this side's imported
    /// regions (`Engine::park_imports`, `swap_imports`), for a transport whose NIC or
    /// peers hold a translation of it: parked, it releases it (NVLink: its writers drop
    /// their mappings); swapped, it translates the new memory (RDMA: registers it; NVLink:
    /// sends its writers the new memory table and descriptors), and the writers then need
    /// [`Transport::region_keys`]. Others have nothing to do.
    fn follow_pages(&self, _parked: bool) -> Result<()> {
        Ok(())
    }
    /// What this side's writers need to reach its regions again after a swap (RDMA: the
    /// new keys of every rail), for [`Link::rekey`] on their side; `None`: nothing (or
    /// parked).
    fn region_keys(&self) -> Option<Vec<u8>> {
        None
    }
    /// Connections this side receives on (for leak checks).
    fn receivers(&self) -> usize {
        0
    }
    /// The NIC resources this transport holds now (RDMA: queue pairs, completion queues,
    /// registered bytes; none for other transports).
    fn resources(&self) -> Resources {
        Resources::default()
    }
    /// Receiving side: cuts the writer named `peer_name` off, for a fence it did not
    /// acknowledge. When this returns `Ok`, nothing that writer sent over this transport can
    /// land in this engine's regions any more, and the writer's link breaks (it connects
    /// again, as after a timeout); the count is of the connections cut. `Err` (a sentence):
    /// this transport cannot stop the writer from this side; it closed what it could.
    fn isolate(&self, peer_name: &str) -> std::result::Result<usize, String>;
    /// Closes every connection and stops the transport's threads.
    fn shutdown(&self);
}

/// A connection to one peer over which jobs are written.
pub trait Link: Send + Sync {
    /// Queues a job; its `done` is always completed exactly once.
    fn submit(&self, job: WriteJob);
    /// False once the connection broke; new jobs then fail at once.
    fn is_alive(&self) -> bool;
    /// Stops the link: pending jobs fail with `Closed`, and once this returns the link
    /// reads no more local memory.
    fn shutdown(&self);
    /// Tears the connection down because of `error` (a timeout or an abort): when this
    /// returns, no byte of any pending job can still be sent (TCP: the connection was reset
    /// and the writer stopped, and the receiver checks for the reset before every copy into
    /// its regions, so not even a frame it had begun lands afterwards; RDMA: the queue pairs
    /// are destroyed), and every pending job has failed with `error`.
    fn cancel(&self, error: Error);
    fn kind(&self) -> TransportKind;
    /// Takes the peer's new region keys after its warm re-attach swapped its memory (what
    /// its [`Transport::region_keys`] gave): once this returns, no later write uses an old
    /// one. Returns how many rail pairs were updated; 0 where a link reads nothing of the
    /// peer's keys (TCP, NVLink).
    fn rekey(&self, _keys: &[u8]) -> Result<usize> {
        Ok(0)
    }
    /// Longest run one job may carry (the planner splits longer ones).
    fn max_run_bytes(&self) -> u64 {
        u64::MAX
    }
    /// What the receiving side of this link does beyond one-sided delivery: whether it
    /// verifies a notice's checksum against its memory, and whether a call that asks for it
    /// (`JobPlan::acked`) completes only once the receiving engine took the call's notice
    /// and answered.
    fn receiver_checks(&self) -> ReceiverChecks {
        ReceiverChecks::default()
    }
    /// The link's rails (NIC pairs) with their state and counters; empty for transports
    /// without rails.
    fn rails(&self) -> Vec<RailReport> {
        Vec::new()
    }
    /// The NIC resources this link holds (RDMA: its queue pairs, spares included, and
    /// its registered buffers; the completion queues are the transport's, shared by every
    /// link); none for other transports.
    fn resources(&self) -> Resources {
        Resources::default()
    }
}

/// NIC resources held (see [`Transport::resources`], [`Link::resources`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    /// RC queue pairs.
    pub queue_pairs: u64,
    /// Completion queues.
    pub completion_queues: u64,
    /// Bytes registered with the NIC (memory regions).
    pub registered_bytes: u64,
}

/// See [`Link::receiver_checks`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiverChecks {
    /// The receiver verifies checksums of host regions before it reports the arrival.
    pub verifies_checksums: bool,
    /// Checksums of GPU regions too: the receiver sums its GPU memory (the CRC-32C kernel)
    /// before it reports the arrival.
    pub sums_gpu_memory: bool,
    /// The link's writer sums a checksummed call's GPU sources itself (NVLink: on its
    /// stream, behind the copy, filling in the notice's checksum); otherwise the engine
    /// sums them with the kernel before it hands the call over.
    pub link_sums_gpu_sources: bool,
    /// A call with `JobPlan::acked` completes only after the receiving engine answered it
    /// (after it took the notice, for a tagged call). TCP answers every call anyway; RDMA and
    /// NVLink answer only the calls that ask, so a plain call stays one-sided.
    pub answers_acked_calls: bool,
    /// A checksummed call's notice carries its landing (`wire::Landing`: where its bytes
    /// land in the receiver's memory), of at most this many bytes: a one-sided receiver
    /// does not see which bytes a call wrote and finds them from it. `None`: the receiver
    /// records where the bytes land as they come (TCP).
    pub landing_limit: Option<usize>,
}

/// One rail of a link: a local NIC paired with one of the peer's, or a local NIC that the
/// handshake left out (state `refused`, with the reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RailReport {
    /// The local device (e.g. `mlx5_0`).
    pub local: String,
    /// The local device's port (1-based).
    pub port: u8,
    /// The peer's device it is paired with (empty when refused).
    pub remote: String,
    /// `healthy`, `quarantined` (failed; waiting out its cooldown), `failed` (no more
    /// rejoins on this connection) or `refused` (never paired).
    pub state: &'static str,
    /// The source GID used and the peer's GID reached (addresses), or empty.
    pub gid: String,
    /// The peer's GID this rail writes to.
    pub peer_gid: String,
    /// The local GID table index used (none when refused).
    pub gid_index: Option<u8>,
    /// Why that GID was chosen for this peer (empty when refused).
    pub gid_reason: String,
    /// Active speed of the slower port of the pair, Mb/s (the weight of its share).
    pub speed_mbps: u32,
    /// Bytes written on this rail (completed WRITEs).
    pub bytes: u64,
    /// Work requests completed on this rail.
    pub wrs: u64,
    /// Failed work requests (and ports seen down) on this rail.
    pub failures: u64,
    /// Times this rail was quarantined.
    pub quarantines: u64,
    /// Times it came back after a quarantine.
    pub rejoins: u64,
    /// Answers to acked calls (`delivery: 'acked'`) received on this rail.
    pub answers: u64,
    /// Answers received on this rail that named no call waiting for one (ignored).
    pub stray_answers: u64,
    /// Why it is refused or quarantined, if it is.
    pub reason: Option<String>,
}
