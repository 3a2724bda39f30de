//! Packed variable-length batches and the KV cache: the packed call equals one unpacked call
//! with the spans' block-diagonal mask, forward and backward; decoding from a contiguous or
//! paged cache equals the reference over each row's valid keys.

use attn_core::testing::varlen_claims;
use attn_core::tolerance::{F32_BACKWARD, F32_FORWARD};

#[test]
fn a_packed_batch_matches_the_reference_forward_and_backward() {
    varlen_claims::packed_matches_the_reference(
        &attn_flash1::Flash1Cpu,
        (F32_FORWARD, F32_BACKWARD),
    );
}

#[test]
fn a_packed_batch_refuses_spans_that_do_not_describe_it() {
    varlen_claims::packed_refuses_bad_spans(&attn_flash1::Flash1Cpu);
}

#[test]
fn decoding_from_a_contiguous_or_paged_cache_matches_the_reference() {
    varlen_claims::cached_matches_the_reference(&attn_flash1::Flash1Cpu, F32_FORWARD);
}

#[test]
fn appending_writes_the_new_keys_and_bad_caches_are_refused() {
    varlen_claims::append_and_bad_caches(&attn_flash1::Flash1Cpu);
}
