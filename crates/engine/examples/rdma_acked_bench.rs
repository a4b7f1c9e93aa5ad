//! What `delivery: 'acked'` costs per call over RDMA, against plain (one-sided) calls,
//! side by side in one process: two engines on one device (`rdma_acked_bench <device>
//! [rounds]`), tagged calls of 4 blocks × 16 KiB (K and V: 128 KiB a call). Each round
//! times, alternately, plain then acked: 200 calls one at a time (the latency of a call)
//! and 2,000 calls with up to 16 in flight (calls per second). Prints one line per round
//! and the medians; on Soft-RoCE the figures are CPU-bound (the kernel does the NIC's work).

use common::rdma::settings;
use common::SideSpec;
use kvtransfer_engine::{Integrity, Role};
use std::io::Write;
use std::time::{Duration, Instant};
use support::median;

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

const BLOCKS: usize = 64;
const BLOCK_BYTES: usize = 16 * 1024;

/// `calls` calls of 4 blocks with at most `depth` in flight; returns the elapsed time.
fn run(prefill: &common::Side, acked: bool, calls: usize, depth: usize) -> Duration {
    let integrity = Integrity {
        checksum: false,
        acked,
    };
    let started = Instant::now();
    support::calls(
        prefill,
        calls,
        depth,
        integrity,
        Duration::from_secs(30),
        |i| {
            let base = (i * 4 % BLOCKS) as u32;
            vec![base, base + 1, base + 2, base + 3]
        },
    );
    started.elapsed()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let device = args
        .get(1)
        .expect("usage: rdma_acked_bench <device> [rounds]");
    let rounds: usize = args.get(2).map_or(5, |r| r.parse().expect("rounds"));
    let spec = |role| SideSpec::new(role, 1, BLOCKS, BLOCK_BYTES).over_rdma(settings(device));
    let (prefill, decode) = common::pair(spec(Role::Prefill), spec(Role::Decode));
    run(&prefill, false, 200, 16); // warm-up
    run(&prefill, true, 200, 16);
    let mut out = std::io::stdout().lock();
    let (mut lat, mut rate) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for round in 0..rounds {
        let mut line = format!("round {round}:");
        for (k, acked) in [false, true].into_iter().enumerate() {
            let one = run(&prefill, acked, 200, 1).as_secs_f64() * 1e6 / 200.0;
            let many = 2000.0 / run(&prefill, acked, 2000, 16).as_secs_f64();
            let name = if acked { "acked" } else { "plain" };
            line += &format!(" {name} {one:.1} us/call (1 in flight), {many:.0} calls/s (16);");
            lat[k].push(one);
            rate[k].push(many);
        }
        writeln!(out, "{line}").unwrap();
    }
    let (lp, la) = (median(lat[0].clone()), median(lat[1].clone()));
    let (rp, ra) = (median(rate[0].clone()), median(rate[1].clone()));
    writeln!(
        out,
        "median of {rounds}: 1 in flight: plain {lp:.1} us, acked {la:.1} us (+{:.1} us, {:.2}x); 16 in flight: plain {rp:.0} calls/s, acked {ra:.0} calls/s ({:.2}x)",
        la - lp,
        la / lp,
        ra / rp
    )
    .unwrap();
    prefill.engine.close();
    decode.engine.close();
}
