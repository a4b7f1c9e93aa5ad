//! The one place that names the concrete transports: which ones an engine opens, in which
//! order, and why the others are not there.

use super::nvlink::{NvlinkDetails, NvlinkTransport};
use super::rdma::{RdmaDetails, RdmaTransport};
use super::tcp::{TcpDetails, TcpTransport};
use super::{Arrival, ArrivalSink, Explanation, Transport, TransportKind};
use crate::config::{RdmaSettings, TransportChoice};
use crate::error::Result;
use crate::layout::RegionTable;
use crate::metrics::Metrics;
use std::net::IpAddr;
use std::sync::Arc;

/// What each transport uses on this side, typed (`Transport::explain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportDetails {
    /// The TCP transport's details.
    Tcp(TcpDetails),
    /// The RDMA transport's details.
    Rdma(RdmaDetails),
    /// The NVLink transport's details.
    Nvlink(NvlinkDetails),
}

impl TransportDetails {
    /// `(key, value)` pairs for reports (`peerInfo().details`, `doctor`).
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        match self {
            TransportDetails::Tcp(details) => details.fields(),
            TransportDetails::Rdma(details) => details.fields(),
            TransportDetails::Nvlink(details) => details.fields(),
        }
    }
}

/// A transport this side could not open, and why.
#[derive(Debug, Clone)]
pub(crate) struct Unusable {
    pub kind: TransportKind,
    pub reason: String,
    /// False where the transport was never in question for these regions (NVLink over
    /// host memory): explanations leave it out rather than blame it.
    pub in_question: bool,
}

/// What opening a transport needs.
pub(crate) struct OpenContext<'a> {
    pub table: &'a Arc<RegionTable>,
    pub arrivals: &'a Option<ArrivalSink>,
    pub gpu_idx: u32,
    pub bind_address: IpAddr,
    pub rdma: &'a RdmaSettings,
    pub metrics: &'a Arc<Metrics>,
}

/// The arrival sink a transport is given: counts each notice (received, or dropped when no
/// one listens) under the writer's name, and for a one-sided transport (RDMA) the bytes the
/// notice announces (`bytes_per_block` × blocks), then passes it on.
fn counting_sink(
    cx: &OpenContext<'_>,
    kind: TransportKind,
    bytes_per_block: Option<u64>,
) -> Option<ArrivalSink> {
    let inner = cx.arrivals.clone();
    let metrics = Arc::clone(cx.metrics);
    Some(Arc::new(move |arrival: Arrival| {
        let counters = metrics.connected_receiver(&arrival.peer, kind.code());
        if let Some(bytes) = bytes_per_block {
            counters.received(u64::from(arrival.blocks) * bytes);
        }
        if let crate::transport::ChecksumCheck::Mismatch { .. } = arrival.checksum {
            counters.checksum_mismatch();
        }
        match &inner {
            Some(sink) => {
                counters.notice_received();
                sink(arrival);
            }
            None => counters.notice_dropped(),
        }
    }))
}

/// Bytes one block moves across every kind (K, V and the scales), for one-sided transports
/// whose receiver learns of a call only from its notice.
fn bytes_per_block(cx: &OpenContext<'_>) -> u64 {
    let layout = cx.table.layout;
    (0..layout.kinds())
        .map(|kind| layout.kind_block_bytes(kind))
        .sum()
}

/// An engine's transports, most preferred first, and the ones it could not open with why.
pub(crate) struct Transports {
    pub usable: Vec<Box<dyn Transport>>,
    pub unusable: Vec<Unusable>,
}

fn open_one(kind: TransportKind, cx: &OpenContext<'_>) -> Result<Box<dyn Transport>> {
    Ok(match kind {
        TransportKind::Tcp => Box::new(TcpTransport::open(
            cx.bind_address,
            Arc::clone(cx.table),
            counting_sink(cx, kind, None),
            Arc::clone(cx.metrics),
        )?),
        TransportKind::Rdma => Box::new(RdmaTransport::open(
            cx.rdma.clone(),
            cx.gpu_idx,
            Arc::clone(cx.table),
            counting_sink(cx, kind, Some(bytes_per_block(cx))),
        )?),
        TransportKind::Nvlink => Box::new(NvlinkTransport::open(
            cx.gpu_idx,
            Arc::clone(cx.table),
            counting_sink(cx, kind, Some(bytes_per_block(cx))),
        )?),
    })
}

/// `Only(kind)`: that transport or its error. `Auto`: every transport that opens, in order
/// of preference; TCP's failure is an error (it is the one that works anywhere).
pub(crate) fn open_transports(choice: TransportChoice, cx: &OpenContext<'_>) -> Result<Transports> {
    let mut transports = Transports {
        usable: Vec::new(),
        unusable: Vec::new(),
    };
    match choice {
        TransportChoice::Only(kind) => transports.usable.push(open_one(kind, cx)?),
        TransportChoice::Auto => {
            for kind in TransportKind::PREFERENCE {
                match open_one(kind, cx) {
                    Ok(transport) => transports.usable.push(transport),
                    Err(e) if kind != TransportKind::Tcp => {
                        crate::log::debug!("transport 'auto': {} not usable ({e})", kind.name());
                        transports.unusable.push(Unusable {
                            kind,
                            reason: e.to_string(),
                            // NVLink serves GPU memory only.
                            in_question: kind != TransportKind::Nvlink || cx.table.gpu().is_some(),
                        });
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(transports)
}

/// Whether `kind` can be used on this host: opened as a communicator opens it (then closed
/// again), it says what it uses (`explain`), or why it cannot be had. `kvtransfer doctor`
/// asks every kind; a transport whose use depends on more than opening (say, on the memory
/// of the regions) answers for the host in an arm of its own.
pub(crate) fn probe(
    kind: TransportKind,
    cx: &OpenContext<'_>,
) -> std::result::Result<Explanation, String> {
    let opened = |cx: &OpenContext<'_>| {
        let transport = open_one(kind, cx).map_err(|e| e.to_string())?;
        let explanation = transport.explain();
        transport.shutdown();
        Ok(explanation)
    };
    match kind {
        TransportKind::Tcp | TransportKind::Rdma => opened(cx),
        // NVLink serves GPU memory only: opened over one block of K and V in GPU `gpu_idx`.
        TransportKind::Nvlink => {
            const BLOCK: u64 = 4096;
            let memory = crate::gpu::DeviceMemory::alloc(cx.gpu_idx, 2 * BLOCK)
                .map_err(|e| format!("no GPU memory on GPU {} ({e})", cx.gpu_idx))?;
            let base = memory.address();
            let mut table =
                RegionTable::new(&[base], &[base + BLOCK], 1, BLOCK).map_err(|e| e.to_string())?;
            crate::gpu::detect_region_memory(&mut table, cx.gpu_idx, &|_| false)
                .map_err(|e| e.to_string())?;
            // `memory` outlives the transport, which `opened` has closed again.
            opened(&OpenContext {
                table: &Arc::new(table),
                ..*cx
            })
        }
    }
}
