//! The trace of the loops: the traced forward gives the forward's bits and records every key chunk's summary and every merge,
//! in the stage's loop order.

use attn_core::testing::trace_claims::{Outer, hold};

#[test]
fn the_traced_forward_is_the_forward_and_records_its_loops() {
    hold(attn_chunked::cpu::forward, attn_chunked::cpu::forward_traced, Outer::QueryBlocks);
}
