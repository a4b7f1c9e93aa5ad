//! No heap allocation per call in the steady state of the sending side's software path:
//! planning 1538 scattered (or contiguous) ids into a reused `Vec<Run>` and building the TCP
//! frames of the call into a reused `FrameBatch` allocate nothing after one warm-up call.
//!
//! A counting global allocator counts allocations made by the current thread only (the
//! test harness runs other tests on other threads at the same time).

use kvtransfer_engine::internals::scattered_ids;
use kvtransfer_engine::internals::{plan_runs, PlanLimits, Run};
use kvtransfer_engine::internals::{FrameBatch, MAX_FRAME_PAYLOAD};
use kvtransfer_engine::internals::{JobView, RegionTable, Shard};
use kvtransfer_engine::BlockIds;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: the thread-local may already be gone while a thread shuts down.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every method forwards to the system allocator unchanged; counting touches only a
// const-initialized thread-local `Cell` without destructor, which never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's layout, which meets `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: ptr/layout come from this allocator (i.e. from System), per the contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr/layout come from this allocator (i.e. from System), per the contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

const BATCH: u32 = 1538;

fn steady_state_allocations(
    local: &[u32],
    remote: &[u32],
    block_bytes: u64,
    tag: Option<&[u8]>,
) -> (u64, usize) {
    let region = u64::from(BATCH) * block_bytes;
    let keys = [0x1000_0000, 0x1000_0000 + 2 * region];
    let values = [keys[0] + region, keys[1] + region];
    let table = RegionTable::new(&keys, &values, BATCH, block_bytes).unwrap();
    let limits = PlanLimits::new(BATCH, BATCH, block_bytes, MAX_FRAME_PAYLOAD);
    let mut runs: Vec<Run> = Vec::new();
    let mut batch = FrameBatch::new();
    // Warm-up: capacities settle.
    plan_runs(
        BlockIds::U32(local),
        BlockIds::U32(remote),
        limits,
        &mut runs,
    )
    .unwrap();
    batch.build(
        &table,
        JobView {
            runs: &runs,
            layer: 1,
            blocks: BATCH,
            shard: &Shard::whole(&table.layout),
            notice: tag,
        },
        1,
    );
    let before = allocations();
    for call in 0..100u64 {
        plan_runs(
            BlockIds::U32(local),
            BlockIds::U32(remote),
            limits,
            &mut runs,
        )
        .unwrap();
        batch.build(
            &table,
            JobView {
                runs: &runs,
                layer: (call % 2) as u32,
                blocks: BATCH,
                shard: &Shard::whole(&table.layout),
                notice: tag,
            },
            call + 2,
        );
    }
    (allocations() - before, batch.frames())
}

#[test]
fn counting_allocator_counts() {
    let before = allocations();
    let v: Vec<u8> = Vec::with_capacity(64);
    std::hint::black_box(&v);
    assert_eq!(allocations() - before, 1);
}

#[test]
fn planning_and_frame_building_of_scattered_ids_do_not_allocate() {
    let (local, remote) = (scattered_ids(BATCH, 7), scattered_ids(BATCH, 11));
    let (allocs, frames) = steady_state_allocations(&local, &remote, 1024, None);
    assert_eq!(
        frames,
        2 * BATCH as usize + 1,
        "scattered ids must not coalesce"
    );
    assert_eq!(
        allocs, 0,
        "steady-state planning + frame building allocated"
    );
    let (allocs, _) = steady_state_allocations(&local, &remote, 65536, Some(b"request-17"));
    assert_eq!(
        allocs, 0,
        "steady-state planning + frame building with a tag allocated"
    );
}

#[test]
fn planning_and_frame_building_of_contiguous_ids_do_not_allocate() {
    let ids: Vec<u32> = (0..BATCH).collect();
    let (allocs, frames) = steady_state_allocations(&ids, &ids, 4096, None);
    assert_eq!(
        frames, 3,
        "contiguous ids coalesce into one K and one V frame"
    );
    assert_eq!(allocs, 0);
}
