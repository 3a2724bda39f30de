//! The trace of the loops: the traced forward gives the forward's bits and records every tile,
//! in the stage's loop order.

use attn_core::testing::trace_claims::{Outer, hold};

#[test]
fn the_traced_forward_is_the_forward_and_records_its_loops() {
    hold(attn_flash1::cpu::forward, attn_flash1::cpu::forward_traced, Outer::KeyBlocks);
}
