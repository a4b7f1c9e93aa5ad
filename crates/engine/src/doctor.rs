//! `kvtransfer doctor`: what this host can do, for a user setting it up. The RDMA devices
//! and GPUs as their libraries report them, the `KVCACHE_*` variables (validated by the
//! parsers construction uses, so a malformed one carries the very message a communicator
//! would fail with), and for every transport whether a communicator could use it here:
//! each is opened as a communicator opens it (`transport/registry.rs::probe`), so the
//! device, port and GID it reports are the engine's own choice, not a second opinion.

use crate::config::{self, Settings, VariableReport};
use crate::gpu::inventory::{self as gpu_inventory, GpuInventory};
use crate::layout::RegionTable;
use crate::metrics::Metrics;
use crate::transport::rdma::inventory::{self as rdma_inventory, RdmaInventory};
use crate::transport::{probe, OpenContext, TransportKind};
use std::sync::Arc;

/// Bytes of the host block each probe registers (one layer, K and V, one block each).
const PROBE_BLOCK_BYTES: u64 = 4096;

/// Whether one transport can be used on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportReport {
    /// The transport this report is about.
    pub transport: TransportKind,
    /// Whether a communicator on this host could open it.
    pub usable: bool,
    /// A sentence starting with the transport's name: what it would use, or why not.
    pub reason: String,
    /// What it uses on this side (device, port, gidIndex, gid, mtu, ...), when usable.
    pub details: Vec<(&'static str, String)>,
}

/// Everything `kvtransfer doctor` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    /// The `gpuIdx` the transports were opened for (it selects the RDMA NIC).
    pub gpu_idx: u32,
    /// Every `KVCACHE_*` variable set, in name order.
    pub variables: Vec<VariableReport>,
    /// The error a communicator created now would fail with (the first malformed
    /// variable), if any.
    pub settings_error: Option<String>,
    /// The RDMA devices libibverbs lists, with their ports and GIDs.
    pub rdma: RdmaInventory,
    /// The GPUs the CUDA driver sees.
    pub gpus: GpuInventory,
    /// Every transport this build knows, in the order `auto` prefers them.
    pub transports: Vec<TransportReport>,
}

impl HostReport {
    /// The report of `kind`.
    pub fn transport(&self, kind: TransportKind) -> Option<&TransportReport> {
        self.transports.iter().find(|t| t.transport == kind)
    }
}

/// Looks at this host as a communicator with `gpu_idx` would.
pub fn host_report(gpu_idx: u32) -> HostReport {
    let settings = Settings::from_env();
    let transports = TransportKind::PREFERENCE
        .into_iter()
        .map(|kind| match &settings {
            Err(e) => TransportReport {
                transport: kind,
                usable: false,
                reason: format!(
                    "{}: no communicator can be created while a KVCACHE_* variable is malformed ({e})",
                    kind.name()
                ),
                details: Vec::new(),
            },
            Ok(settings) => probe_one(kind, settings, gpu_idx),
        })
        .collect();
    HostReport {
        gpu_idx,
        variables: config::variables(),
        settings_error: settings.err().map(|e| e.to_string()),
        rdma: rdma_inventory::inventory(gpu_idx),
        gpus: gpu_inventory::inventory(),
        transports,
    }
}

/// Opens `kind` over a small host region, as a communicator with `gpu_idx` would.
fn probe_one(kind: TransportKind, settings: &Settings, gpu_idx: u32) -> TransportReport {
    let mut memory = vec![0u8; 2 * PROBE_BLOCK_BYTES as usize];
    let key = memory.as_mut_ptr() as u64;
    let value = key + PROBE_BLOCK_BYTES;
    let outcome = RegionTable::new(&[key], &[value], 1, PROBE_BLOCK_BYTES)
        .map_err(|e| e.to_string())
        .and_then(|table| {
            let table = Arc::new(table);
            // The regions stay valid until `probe` has closed the transport again.
            probe(
                kind,
                &OpenContext {
                    table: &table,
                    arrivals: &None,
                    gpu_idx,
                    bind_address: settings.bind_address,
                    rdma: &settings.rdma,
                    metrics: &Arc::new(Metrics::default()),
                },
            )
        });
    drop(memory);
    match outcome {
        Ok(explanation) => {
            let details = explanation.fields();
            let uses: Vec<String> = details.iter().map(|(k, v)| format!("{k} {v}")).collect();
            TransportReport {
                transport: kind,
                usable: true,
                reason: format!("{}: usable; {}", kind.name(), uses.join(", ")),
                details,
            }
        }
        Err(why) => TransportReport {
            transport: kind,
            usable: false,
            reason: format!("{}: {why}", kind.name()),
            details: Vec::new(),
        },
    }
}
