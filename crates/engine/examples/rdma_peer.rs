//! The other process of the acked-delivery RDMA tests (`tests/rdma_acked.rs`): a decode
//! engine over RDMA with zeroed host regions, driven over stdin/stdout by the test, which
//! plays prefill and stops or kills this process to see what its calls do then.
//!
//! `rdma_peer <device> <blocks> <block_bytes>` (one layer, K and V). Prints `ready`, then
//! answers one line per command: `respond <hex>` and `accept <hex>` (the handshake; hex, or
//! `error <code> <message>`), `arrivals` (the count so far), `exit`.

use common::hex::{hex, unhex};
use common::rdma::settings;
use common::SideSpec;
use kvtransfer_engine::Role;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[path = "../tests/common/mod.rs"]
mod common;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, device, blocks, block_bytes] = args.as_slice() else {
        panic!("usage: rdma_peer <device> <blocks> <block_bytes>");
    };
    let arrivals = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&arrivals);
    let side = SideSpec {
        arrivals: Some(Arc::new(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        })),
        name: Some("rdma-peer".into()),
        ..SideSpec::new(
            Role::Decode,
            1,
            blocks.parse().expect("blocks"),
            block_bytes.parse().expect("block_bytes"),
        )
        .over_rdma(settings(device))
    }
    .build();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let (command, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let answer = match command {
            "respond" => match side.engine.auth_respond(&unhex(rest)) {
                Ok(bytes) => hex(&bytes),
                Err(e) => format!("error {} {e}", e.code()),
            },
            "accept" => match side.engine.accept(&unhex(rest)) {
                Ok(bytes) => hex(&bytes),
                Err(e) => format!("error {} {e}", e.code()),
            },
            "arrivals" => arrivals.load(Ordering::SeqCst).to_string(),
            "exit" => break,
            other => format!("error unknown command {other}"),
        };
        writeln!(out, "{answer}").unwrap();
        out.flush().unwrap();
    }
    side.engine.close();
}
