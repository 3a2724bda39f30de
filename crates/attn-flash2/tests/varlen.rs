//! Packed variable-length batches and the KV cache: the packed call equals one unpacked call
//! with the spans' block-diagonal mask, forward and backward; decoding from a contiguous or
//! paged cache, whole or split, equals the reference over each row's valid keys; bad spans,
//! lengths and tables are refused; appending writes in place.

use attn_core::tolerance::{F32_BACKWARD, F32_FORWARD};

#[test]
fn packed_batches_and_kv_caches_match_the_reference() {
    attn_core::testing::varlen_claims::hold(&attn_flash2::Flash2Cpu, (F32_FORWARD, F32_BACKWARD));
}

#[test]
fn the_decode_claims_hold_for_the_cpu_stage_split_or_whole() {
    // the claims a dedicated decode kernel is held to, first held by the CPU stage through
    // attn-core's cached calls: whole rows when the device would choose, else split-KV
    use attn_core::varlen::{forward_cached, forward_cached_split};
    use attn_flash2::cpu;
    attn_core::testing::varlen_claims::decode_matches_the_reference(
        "flash2 (cpu)",
        &|cache, inputs, opts, splits| match splits {
            None => forward_cached(cache, inputs, opts, cpu::forward),
            Some(n) => forward_cached_split(cache, inputs, opts, n, cpu::forward),
        },
        |x| x,
        F32_FORWARD,
    );
}

#[test]
fn the_cpu_decode_path_holds_the_decode_claims() {
    // the GQA group as a tile's rows, each split's parts merged by the log-sum-exp
    attn_core::testing::varlen_claims::decode_matches_the_reference(
        "flash2 (cpu decode)",
        &attn_flash2::cpu::decode::forward_cached,
        |x| x,
        F32_FORWARD,
    );
}
