//! Dropout in packed batches: every CPU stage drops the same weights of every sequence as
//! naive attention does, and one sequence packed is the plain call bit for bit.

use attn::core::testing::varlen_claims;

#[test]
fn every_cpu_stage_drops_the_same_weights_in_a_packed_batch() {
    for stage in attn::cpu_stages() {
        varlen_claims::packed_dropout_agrees(stage, &attn::naive::NaiveCpu);
    }
}
