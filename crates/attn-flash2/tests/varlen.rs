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

#[test]
fn the_native_packed_path_holds_on_one_thread_and_equals_the_stage_per_sequence() {
    // on one thread the native backward takes every case without a bias gradient (on more,
    // the coarse ones fall back to the stage per sequence); its tiles are those of the stage
    // per sequence, in the same order, so the bits agree
    use attn_core::varlen::{SeqLens, backward_packed, forward_packed};
    use attn_core::{Inputs, Options, Stage, random};
    use attn_flash2::{Flash2Cpu, cpu};
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    one.install(|| {
        attn_core::testing::varlen_claims::hold(&Flash2Cpu, (F32_FORWARD, F32_BACKWARD));
        let seqs = SeqLens::from_lengths(&[40, 3, 17, 0, 29], &[33, 8, 17, 5, 41]);
        let (tq, tk) = seqs.totals();
        let q = random::normal((1, 6, tq, 24), 1);
        let k = random::normal((1, 2, tk, 24), 2);
        let v = random::normal((1, 2, tk, 24), 3);
        let d_out = random::normal((1, 6, tq, 24), 4);
        let inputs = Inputs::new(q.view(), k.view(), v.view());
        let opts = Options::default().causal(true).blocks(8, 16).dropout(0.2, 9);
        let native = Flash2Cpu.forward_packed(&seqs, &inputs, &opts).unwrap();
        let each = forward_packed(&seqs, &inputs, &opts, cpu::forward).unwrap();
        assert_eq!(native.out, each.out);
        assert_eq!(native.lse, each.lse);
        let g = Flash2Cpu.backward_packed(&seqs, &inputs, &opts, &native, d_out.view()).unwrap();
        let e = backward_packed(&seqs, &inputs, &opts, &each, d_out.view(), cpu::backward).unwrap();
        assert_eq!(g.dq, e.dq);
        assert_eq!(g.dk, e.dk);
        assert_eq!(g.dv, e.dv);
        assert!(g.dq.iter().any(|&x| x != 0.0) && g.dk.iter().any(|&x| x != 0.0));
    });
}
