//! Fences over TCP: after `fence_writes` (the writer honours a fence) or `cut_off` (the
//! receiver cuts a silent writer off) returns, not one byte of the fenced writes lands
//! (`fence_support`: the rounds).

mod common;
mod fence_support;

#[test]
fn a_fence_honoured_by_the_writer_leaves_no_byte_of_the_fenced_writes() {
    fence_support::honoured_rounds(|spec| spec);
}

#[test]
fn a_writer_cut_off_by_the_receiver_lands_nothing_afterwards() {
    fence_support::cut_off_rounds(|spec| spec);
}
