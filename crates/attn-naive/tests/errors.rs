//! Every bad input gets its typed error, never a panic and never a wrong answer.

use attn_core::{AttnError, Inputs, Mask, Options, Shape, Stage};
use attn_naive::NaiveCpu;
use ndarray::{Array2, Array4};

fn qkv(shape: Shape) -> (Array4<f32>, Array4<f32>, Array4<f32>) {
    attn_core::random::qkv(&shape, 1)
}

fn run(inputs: Inputs<'_>, opts: &Options) -> AttnError {
    NaiveCpu.forward(&inputs, opts).expect_err("bad input was accepted")
}

#[test]
fn mismatched_head_dims_name_k() {
    let (q, _, _) = qkv(Shape::new(1, 2, 4, 16));
    let (_, k, v) = qkv(Shape::new(1, 2, 4, 12));
    let e = run(Inputs::new(q.view(), k.view(), v.view()), &Options::default());
    assert!(matches!(e, AttnError::ShapeMismatch { arg: "k", .. }), "{e}");
    assert!(e.to_string().contains("[1, kv_heads, n_k, 16]"), "{e}");
}

#[test]
fn mismatched_batch_and_value_shapes_are_refused() {
    let (q, _, _) = qkv(Shape::new(2, 2, 4, 8));
    let (_, k, v) = qkv(Shape::new(1, 2, 4, 8));
    assert!(matches!(
        run(Inputs::new(q.view(), k.view(), v.view()), &Options::default()),
        AttnError::ShapeMismatch { arg: "k", .. }
    ));
    let (q, k, _) = qkv(Shape::new(1, 2, 4, 8));
    let (_, _, v) = qkv(Shape::new(1, 2, 5, 8));
    assert!(matches!(
        run(Inputs::new(q.view(), k.view(), v.view()), &Options::default()),
        AttnError::ShapeMismatch { arg: "v", .. }
    ));
}

#[test]
fn heads_not_divisible_by_kv_heads() {
    let (q, k, v) = qkv(Shape::new(1, 3, 4, 8).with_kv_heads(2));
    let e = run(Inputs::new(q.view(), k.view(), v.view()), &Options::default());
    assert_eq!(e, AttnError::HeadsNotDivisible { heads: 3, kv_heads: 2 });
}

#[test]
fn empty_axes_are_refused() {
    let (q, k, v) = qkv(Shape::new(1, 2, 0, 8));
    assert!(matches!(
        run(Inputs::new(q.view(), k.view(), v.view()), &Options::default()),
        AttnError::EmptyAxis { arg: "q", .. }
    ));
}

#[test]
fn nan_and_inf_in_q_k_v_name_the_tensor_and_index() {
    for (which, value) in [(0, f32::NAN), (1, f32::INFINITY), (2, f32::NEG_INFINITY)] {
        let (mut q, mut k, mut v) = qkv(Shape::new(1, 2, 4, 8));
        [&mut q, &mut k, &mut v][which][[0, 1, 2, 3]] = value;
        let e = run(Inputs::new(q.view(), k.view(), v.view()), &Options::default());
        let AttnError::NonFinite { arg, index, .. } = e else { panic!("{e}") };
        assert_eq!(arg, ["q", "k", "v"][which]);
        assert_eq!(index, vec![0, 1, 2, 3]);
    }
}

#[test]
fn nan_or_plus_infinity_in_the_bias_is_refused_but_minus_infinity_is_a_mask() {
    let (q, k, v) = qkv(Shape::new(1, 2, 4, 8));
    for bad in [f32::NAN, f32::INFINITY] {
        let mut bias = Array4::<f32>::zeros((1, 1, 4, 4));
        bias[[0, 0, 1, 2]] = bad;
        let e = run(
            Inputs::new(q.view(), k.view(), v.view()).with_bias(bias.view()),
            &Options::default(),
        );
        assert!(
            matches!(e, AttnError::InvalidBias { ref index, .. } if *index == vec![0, 0, 1, 2]),
            "{e}"
        );
    }
    let mut bias = Array4::<f32>::zeros((1, 1, 4, 4));
    bias[[0, 0, 1, 2]] = f32::NEG_INFINITY;
    assert!(
        NaiveCpu
            .forward(
                &Inputs::new(q.view(), k.view(), v.view()).with_bias(bias.view()),
                &Options::default()
            )
            .is_ok()
    );
}

#[test]
fn masks_and_biases_that_do_not_broadcast_are_refused() {
    let (q, k, v) = qkv(Shape::new(2, 2, 4, 8).with_n_k(6));
    let base = Inputs::new(q.view(), k.view(), v.view());
    let pad = Array2::from_elem((2, 5), true);
    assert!(matches!(
        run(base.with_mask(Mask::KeyPadding(pad.view())), &Options::default()),
        AttnError::ShapeMismatch { arg: "mask", .. }
    ));
    let full = Array4::from_elem((2, 3, 4, 6), true);
    assert!(matches!(
        run(base.with_mask(Mask::Full(full.view())), &Options::default()),
        AttnError::ShapeMismatch { arg: "mask", .. }
    ));
    let bias = Array4::<f32>::zeros((1, 1, 6, 4));
    let e = run(base.with_bias(bias.view()), &Options::default());
    assert!(matches!(e, AttnError::ShapeMismatch { arg: "bias", .. }), "{e}");
    assert!(e.to_string().contains("[2, 2, 4, 6]"), "{e}");
}

#[test]
fn bad_dropout_scale_and_block_sizes_are_refused() {
    let (q, k, v) = qkv(Shape::new(1, 1, 4, 8));
    let inputs = Inputs::new(q.view(), k.view(), v.view());
    for p in [-0.5f32, 1.0, f32::NAN] {
        assert!(matches!(
            run(inputs, &Options::default().dropout(p, 0)),
            AttnError::InvalidDropout(_)
        ));
    }
    for scale in [0.0f32, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            run(inputs, &Options::default().scale(scale)),
            AttnError::InvalidScale(_)
        ));
    }
    let e = run(inputs, &Options { q_block: Some(0), ..Options::default() });
    assert_eq!(e, AttnError::ZeroBlockSize { arg: "q_block" });
    let e = run(inputs, &Options { k_block: Some(0), ..Options::default() });
    assert_eq!(e, AttnError::ZeroBlockSize { arg: "k_block" });
}

#[test]
fn naive_refuses_n_65536_before_allocating_and_names_the_alternative() {
    // b = 1, h = 8, n = 65 536, d = 64: S/P need 128 GiB. The inputs are broadcast views of
    // one row, so the test itself allocates almost nothing.
    let shape = Shape::new(1, 8, 65_536, 64);
    let row = Array4::<f32>::ones((1, 1, 1, 64));
    let q = row.broadcast(shape.q_dims()).unwrap();
    let k = row.broadcast(shape.kv_dims()).unwrap();
    let opts = Options::default().memory_limit(16 << 30);
    let e = run(Inputs::new(q, k, k), &opts);
    let AttnError::WorkspaceTooLarge { needed_bytes, limit_bytes, .. } = e else { panic!("{e}") };
    assert_eq!(needed_bytes, 128 << 30);
    assert_eq!(limit_bytes, 16 << 30);
    let msg = e.to_string();
    assert!(msg.contains("128.0 GiB") && msg.contains("flash2"), "{msg}");
}

#[test]
fn backward_checks_its_extra_arguments() {
    let (q, k, v) = qkv(Shape::new(1, 2, 4, 8));
    let inputs = Inputs::new(q.view(), k.view(), v.view());
    let fwd = NaiveCpu.forward(&inputs, &Options::default()).unwrap();
    let bad_grad = Array4::<f32>::zeros((1, 2, 5, 8));
    let e = NaiveCpu.backward(&inputs, &Options::default(), &fwd, bad_grad.view()).unwrap_err();
    assert!(matches!(e, AttnError::ShapeMismatch { arg: "d_out", .. }), "{e}");
    let mut nan_grad = Array4::<f32>::zeros((1, 2, 4, 8));
    nan_grad[[0, 0, 0, 0]] = f32::NAN;
    let e = NaiveCpu.backward(&inputs, &Options::default(), &fwd, nan_grad.view()).unwrap_err();
    assert!(matches!(e, AttnError::NonFinite { arg: "d_out", .. }), "{e}");
}

#[test]
fn scores_that_would_overflow_float32_are_refused() {
    let (mut q, k, v) = qkv(Shape::new(1, 1, 4, 8));
    q[[0, 0, 2, 0]] = 1e36;
    let e = run(Inputs::new(q.view(), k.view(), v.view()), &Options::default());
    assert!(matches!(e, AttnError::ScoreOverflow { bound } if bound > 1e30), "{e}");
    // Large but safe logits are fine.
    q[[0, 0, 2, 0]] = 1e4;
    assert!(
        NaiveCpu.forward(&Inputs::new(q.view(), k.view(), v.view()), &Options::default()).is_ok()
    );
}
