//! What the RDMA benches share (`rdma_acked_bench`, `rdma_checksum_bench`): a run of tagged
//! calls with a bounded number in flight, and the median of a round's figures.

use crate::common::Side;
use kvtransfer_engine::{BlockIds, Integrity, OnDone, WriteCall};
use std::sync::mpsc;
use std::time::Duration;

/// Makes `calls` calls from `prefill` to the peer `"decode"`, call `i` of the blocks
/// `ids(i)` (to the same ids) tagged `c<i>`, each with `timeout` and `integrity`, with at
/// most `depth` in flight; returns when every call resolved, and panics on any failure.
pub fn calls(
    prefill: &Side,
    calls: usize,
    depth: usize,
    integrity: Integrity,
    timeout: Duration,
    ids: impl Fn(usize) -> Vec<u32>,
) {
    let (done, finished) = mpsc::channel::<kvtransfer_engine::Result<()>>();
    let mut in_flight = 0;
    for i in 0..calls {
        if in_flight == depth {
            finished.recv().unwrap().unwrap();
            in_flight -= 1;
        }
        let ids = ids(i);
        let done = done.clone();
        prefill
            .engine
            .write(
                WriteCall {
                    timeout: Some(timeout),
                    integrity,
                    ..WriteCall::ids(
                        "decode",
                        BlockIds::U32(&ids),
                        BlockIds::U32(&ids),
                        0.0,
                        Some(format!("c{i}").into_bytes()),
                    )
                },
                OnDone::Callback(Box::new(move |r| {
                    let _ = done.send(r);
                })),
            )
            .unwrap();
        in_flight += 1;
    }
    for _ in 0..in_flight {
        finished.recv().unwrap().unwrap();
    }
}

/// The median of `v` (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
