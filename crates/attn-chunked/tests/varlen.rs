//! Packed variable-length batches and the KV cache: the packed call equals one unpacked call
//! with the spans' block-diagonal mask, forward and backward; decoding from a contiguous or
//! paged cache, whole or split, equals the reference over each row's valid keys; bad spans,
//! lengths and tables are refused; appending writes in place.

use attn_core::tolerance::{F32_BACKWARD, F32_FORWARD};

#[test]
fn packed_batches_and_kv_caches_match_the_reference() {
    attn_core::testing::varlen_claims::hold(&attn_chunked::ChunkedCpu, (F32_FORWARD, F32_BACKWARD));
}
