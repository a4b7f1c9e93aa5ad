//! The rounds of the fence tests, over any transport (`fence.rs`: TCP; `rdma_fence.rs`:
//! Soft-RoCE in the VM): each round starts large writes into every block, fences them
//! mid-flight, overwrites the blocks with a canary and checks that the canary survives.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the shared fixtures"
)]

use kvtransfer_engine::{BlockIds, FenceScope, OnDone, Role, WriteCall};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use super::common::{connect, Side, SideSpec};

pub const BLOCKS: usize = 16;
pub const BLOCK_BYTES: usize = 256 * 1024;
const ROUNDS: usize = 12;
const CANARY: u8 = 0xC5;

/// A side of one layer of `BLOCKS` blocks of `BLOCK_BYTES` (tweak the transport in `spec`).
pub fn side(role: Role, spec: impl Fn(SideSpec) -> SideSpec) -> Side {
    spec(SideSpec::new(role, 1, BLOCKS, BLOCK_BYTES)).build()
}

type Outcome = Receiver<kvtransfer_engine::Result<()>>;

/// Writes every block (tagged `tag`) `calls` times over, without waiting.
fn start_writes(prefill: &Side, key: &str, tag: &str, calls: usize) -> Vec<Outcome> {
    let ids: Vec<u32> = (0..BLOCKS as u32).collect();
    (0..calls)
        .map(|_| {
            let (sender, outcome) = channel();
            prefill
                .engine
                .write(
                    WriteCall::ids(
                        key,
                        BlockIds::U32(&ids),
                        BlockIds::U32(&ids),
                        0.0,
                        Some(tag.as_bytes().to_vec()),
                    ),
                    OnDone::Callback(Box::new(move |result| {
                        let _ = sender.send(result);
                    })),
                )
                .unwrap();
            outcome
        })
        .collect()
}

/// Overwrites every block of the decode side with the canary (through the same pointer
/// the engine writes through).
fn paint_canary(decode: &Side) {
    for region in decode.keys.iter().chain(&decode.values) {
        let base = region.as_ptr().cast_mut();
        for i in 0..region.len() {
            // SAFETY: `i` is within the region, which lives as long as `decode`; volatile,
            // because the engine's receiver writes the same memory through its own pointer.
            unsafe { base.add(i).write_volatile(CANARY) };
        }
    }
}

/// Where the decode side is no longer the canary: (region, block, bytes) for each block
/// with bytes changed (regions: keys, then values).
fn overwritten_blocks(decode: &Side) -> Vec<(usize, usize, usize)> {
    let mut found = Vec::new();
    for (index, region) in decode.keys.iter().chain(&decode.values).enumerate() {
        let base = region.as_ptr();
        for block in 0..region.len() / BLOCK_BYTES {
            let changed = (block * BLOCK_BYTES..(block + 1) * BLOCK_BYTES)
                // SAFETY: as in `paint_canary`.
                .filter(|&i| unsafe { base.add(i).read_volatile() } != CANARY)
                .count();
            if changed > 0 {
                found.push((index, block, changed));
            }
        }
    }
    found
}

fn settle_all(outcomes: Vec<Outcome>) -> Vec<Option<&'static str>> {
    outcomes
        .into_iter()
        .map(|o| {
            o.recv_timeout(Duration::from_secs(20))
                .expect("every call settles")
                .err()
                .map(|e| e.code())
        })
        .collect()
}

/// The writer honours each fence (`fence_writes`): its pending calls of the tag fail
/// `ERR_FENCED`, and no byte of them lands afterwards.
pub fn honoured_rounds(spec: impl Fn(SideSpec) -> SideSpec) {
    let prefill = side(Role::Prefill, &spec);
    let decode = side(Role::Decode, &spec);
    let mut fenced_mid_flight = 0;
    for round in 0..ROUNDS {
        let key = format!("d{round}");
        connect(&prefill, &decode, &key);
        let tag = format!("req-{round}");
        let outcomes = start_writes(&prefill, &key, &tag, 8);
        std::thread::sleep(Duration::from_micros(500 * round as u64));
        let fenced = prefill
            .engine
            .fence_writes(
                &key,
                FenceScope::Tag(tag.as_bytes().to_vec()),
                Duration::from_secs(5),
            )
            .unwrap();
        // The decode's half of the fence (what `fence()` does once a writer answered that
        // it fenced calls in flight): its receivers stop applying that writer's frames. A
        // TCP receive loop descheduled mid-copy would otherwise finish a frame it began
        // before the writer's reset.
        if fenced > 0 {
            let _ = decode
                .engine
                .cut_off(prefill.engine.name(), Duration::from_millis(1));
        }
        paint_canary(&decode);
        let codes = settle_all(outcomes);
        std::thread::sleep(Duration::from_millis(50));
        let landed = overwritten_blocks(&decode);
        assert!(
            landed.is_empty(),
            "round {round}: a fenced write landed ((region, block, bytes): {landed:?}; {fenced} fenced; {codes:?})"
        );
        // Calls still on their way to the link are refused there (nothing sent); `fenced`
        // counts those that were failed while the link had them.
        assert!(
            codes.iter().filter(|c| **c == Some("ERR_FENCED")).count() >= fenced,
            "round {round}: {fenced} fenced, {codes:?}"
        );
        assert!(codes.iter().all(|c| matches!(c, None | Some("ERR_FENCED"))));
        fenced_mid_flight += usize::from(fenced > 0);
        // While held, the fenced tag is refused at once; another tag is not. That write is
        // awaited: left in flight (its submitting thread starved on a loaded host), it
        // would land in block 0 after the next round's canary, through a connection the
        // next round has no reason to fence.
        if prefill.engine.is_connected(&key) {
            assert_eq!(
                write_block_zero(&prefill, &key, &tag).err(),
                Some("ERR_FENCED")
            );
            let other = write_block_zero(&prefill, &key, "other").expect("another tag passes");
            assert_eq!(settle_all(vec![other]), vec![None], "round {round}");
        }
    }
    assert!(fenced_mid_flight > 0, "no round fenced a pending call");
}

/// Writes block 0 with `tag`: its outcome, or the code of its synchronous refusal.
fn write_block_zero(prefill: &Side, key: &str, tag: &str) -> Result<Outcome, &'static str> {
    let (sender, outcome) = channel();
    prefill
        .engine
        .write(
            WriteCall::ids(
                key,
                BlockIds::U32(&[0]),
                BlockIds::U32(&[0]),
                0.0,
                Some(tag.as_bytes().to_vec()),
            ),
            OnDone::Callback(Box::new(move |result| {
                let _ = sender.send(result);
            })),
        )
        .map(|()| outcome)
        .map_err(|e| e.code())
}

/// The receiver cuts the writer off (`cut_off`) while it writes: nothing lands afterwards.
pub fn cut_off_rounds(spec: impl Fn(SideSpec) -> SideSpec) {
    let prefill = side(Role::Prefill, &spec);
    let decode = side(Role::Decode, &spec);
    let mut cut_mid_flight = 0;
    for round in 0..ROUNDS {
        let key = format!("d{round}");
        connect(&prefill, &decode, &key);
        let outcomes = start_writes(&prefill, &key, "late", 8);
        std::thread::sleep(Duration::from_micros(200 * round as u64));
        let cut = decode
            .engine
            .cut_off(prefill.engine.name(), Duration::from_millis(1))
            .unwrap();
        assert!(cut <= 1, "round {round}: one data connection per writer");
        paint_canary(&decode);
        let codes = settle_all(outcomes);
        std::thread::sleep(Duration::from_millis(50));
        let landed = overwritten_blocks(&decode);
        assert!(
            landed.is_empty(),
            "round {round}: a write landed after the cut ((region, block, bytes): {landed:?}; {cut} cut; {codes:?})"
        );
        cut_mid_flight += usize::from(codes.iter().any(Option::is_some));
    }
    assert!(cut_mid_flight > 0, "no round cut a pending call");
}
