//! The cases the CPU and the GPU ring are both held to.

use attn_core::testing::{BiasKind, Case, MaskKind, check_against_reference};
use attn_core::{Shape, Stage};

/// Every rank count 1–8, causal, on `shape` (GQA), with three mask and bias kinds and the
/// bias's gradient, forward and backward against the float64 reference.
pub fn every_rank_count_matches_the_reference<S: Stage>(ring: impl Fn(usize) -> S, shape: Shape) {
    for ranks in 1..=8 {
        for (mask, bias) in [
            (MaskKind::KeyPadding, BiasKind::None),
            (MaskKind::Full, BiasKind::NegInf),
            (MaskKind::Broadcast, BiasKind::PerKey),
        ] {
            let case = Case {
                causal: true,
                mask,
                bias,
                bias_grad: bias != BiasKind::None,
                ..Case::new(shape, ranks as u64)
            };
            check_against_reference(&ring(ranks), &case.build(), true)
                .unwrap()
                .assert_f32(&format!("ranks {ranks} {mask:?} {bias:?}"));
        }
    }
}
