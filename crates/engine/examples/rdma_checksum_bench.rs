//! What `checksum: 'crc32c'` costs over RDMA against plain tagged calls, side by side in
//! one process: two engines on one device (`rdma_checksum_bench <device> [rounds]`), calls
//! of 8 blocks × 64 KiB (K and V: 1 MiB a call), 16 in flight. Each round times,
//! alternately, 300 plain tagged calls then 300 checksummed ones (the writer sums before it
//! posts; the receiver finds the bytes from the landing and sums them before it reports the
//! arrival; the bench waits for every arrival). Blocks are listed scattered (every other
//! block) so each call's landing holds 8 runs. Prints one line per round and the medians;
//! on Soft-RoCE the figures are CPU-bound (the kernel does the NIC's work).

use common::rdma::settings;
use common::SideSpec;
use kvtransfer_engine::{Integrity, Role};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::median;

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

const BLOCKS: usize = 128;
const BLOCK_BYTES: usize = 64 * 1024;
const PER_CALL: usize = 8;
const CALLS: usize = 300;
const DEPTH: usize = 16;

/// The decode side's sink: counts arrivals into `arrived`, and panics on a mismatch.
fn counting(arrived: Arc<AtomicU64>) -> kvtransfer_engine::ArrivalSink {
    Arc::new(move |a: kvtransfer_engine::Arrival| {
        assert!(
            !matches!(
                a.checksum,
                kvtransfer_engine::ChecksumCheck::Mismatch { .. }
            ),
            "a mismatch in the bench"
        );
        arrived.fetch_add(1, Ordering::SeqCst);
    })
}

/// `CALLS` calls with at most `DEPTH` in flight, until every arrival was reported; returns
/// the elapsed time.
fn run(prefill: &common::Side, arrived: &AtomicU64, checksum: bool) -> Duration {
    let integrity = Integrity {
        checksum,
        acked: false,
    };
    let before = arrived.load(Ordering::SeqCst);
    let started = Instant::now();
    support::calls(
        prefill,
        CALLS,
        DEPTH,
        integrity,
        Duration::from_secs(60),
        |i| {
            let first = i * 2 * PER_CALL % BLOCKS;
            (0..PER_CALL).map(|k| (first + 2 * k) as u32).collect()
        },
    );
    while arrived.load(Ordering::SeqCst) < before + CALLS as u64 {
        std::thread::yield_now();
    }
    started.elapsed()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let device = args
        .get(1)
        .expect("usage: rdma_checksum_bench <device> [rounds]");
    let rounds: usize = args.get(2).map_or(5, |r| r.parse().expect("rounds"));
    let arrived = Arc::new(AtomicU64::new(0));
    let spec = |role| SideSpec::new(role, 1, BLOCKS, BLOCK_BYTES).over_rdma(settings(device));
    let (prefill, decode) = common::pair(
        spec(Role::Prefill),
        SideSpec {
            arrivals: Some(counting(Arc::clone(&arrived))),
            ..spec(Role::Decode)
        },
    );
    run(&prefill, &arrived, false); // warm-up
    run(&prefill, &arrived, true);
    let mut out = std::io::stdout().lock();
    let bytes = (CALLS * PER_CALL * 2 * BLOCK_BYTES) as f64;
    let mut rates = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        let mut line = format!("round {round}:");
        for (k, checksum) in [false, true].into_iter().enumerate() {
            let rate = bytes / run(&prefill, &arrived, checksum).as_secs_f64() / 1e6;
            let name = if checksum { "crc32c" } else { "plain" };
            line += &format!(" {name} {rate:.0} MB/s;");
            rates[k].push(rate);
        }
        let ratio = rates[1][round] / rates[0][round];
        writeln!(out, "{line} ratio {ratio:.3}").unwrap();
    }
    let ratios: Vec<f64> = (0..rounds).map(|r| rates[1][r] / rates[0][r]).collect();
    let (plain, sum) = (median(rates[0].clone()), median(rates[1].clone()));
    writeln!(
        out,
        "median of {rounds}: plain {plain:.0} MB/s, crc32c {sum:.0} MB/s; ratio per round, median {:.3} ({:+.1} %)",
        median(ratios.clone()),
        (median(ratios) - 1.0) * 100.0
    )
    .unwrap();
    prefill.engine.close();
    decode.engine.close();
}
