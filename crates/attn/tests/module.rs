//! The `Attention` module, tested as the seed tests its own: every algorithm gives naive's
//! output and gradients; cross attention; gradients against finite differences.

use attn::core::metrics::compare;
use attn::{Algorithm, Attention, AttentionConfig, Mask, Overrides};
use ndarray::{Array2, Array3};

const ALGORITHMS: [Algorithm; 4] =
    [Algorithm::Naive, Algorithm::Chunked, Algorithm::Flash1, Algorithm::Flash2];

fn assert_close(name: &str, x: &Array3<f32>, y: &Array3<f32>, tol: f64) {
    let e = compare(x.view(), y.mapv(f64::from).view());
    assert!(e.normwise <= tol, "{name}: normwise difference {:e}", e.normwise);
}

fn assert_close2(name: &str, x: &Array2<f32>, y: &Array2<f32>, tol: f64) {
    let e = compare(x.view(), y.mapv(f64::from).view());
    assert!(e.normwise <= tol, "{name}: normwise difference {:e}", e.normwise);
}

#[test]
fn every_algorithm_matches_naive_at_the_seeds_test_size() {
    // The seed's test: dim 512, heads 8, dim_head 64, buckets 64, causal, x [2, 2048, 512],
    // an all-true key-padding mask.
    let mut config = AttentionConfig::new(512, 8, 64);
    config.causal = true;
    config.q_bucket_size = Some(64);
    config.k_bucket_size = Some(64);
    let module = Attention::new(config, 0).unwrap();
    let x = attn::core::random::normal((2, 2048, 512), 1);
    let dy = attn::core::random::normal((2, 2048, 512), 2);
    let mask = Array2::from_elem((2, 2048), true);
    let run = |algorithm| {
        let over = Overrides { algorithm: Some(algorithm), ..Overrides::default() };
        let (y, cache) = module
            .forward(x.view(), None, Some(Mask::KeyPadding(mask.view())), None, over)
            .unwrap();
        let g = module.backward(&cache, dy.view()).unwrap();
        (y, g)
    };
    let (y0, g0) = run(Algorithm::Naive);
    for algorithm in &ALGORITHMS[1..] {
        let (y, g) = run(*algorithm);
        let name = format!("{algorithm:?}");
        assert_close(&format!("{name} y"), &y, &y0, 2e-5);
        assert_close(&format!("{name} dx"), &g.dx, &g0.dx, 2e-4);
        assert_close2(&format!("{name} d_to_q"), &g.d_to_q, &g0.d_to_q, 2e-4);
        assert_close2(&format!("{name} d_to_kv"), &g.d_to_kv, &g0.d_to_kv, 2e-4);
        assert_close2(&format!("{name} d_to_out"), &g.d_to_out, &g0.d_to_out, 2e-4);
    }
}

#[test]
fn cross_attention_with_gqa_matches_naive() {
    let mut config = AttentionConfig::new(48, 4, 16);
    config.kv_heads = Some(2);
    let module = Attention::new(config, 3).unwrap();
    let x = attn::core::random::normal((2, 37, 48), 4);
    let ctx = attn::core::random::normal((2, 53, 48), 5);
    let dy = attn::core::random::normal((2, 37, 48), 6);
    let run = |algorithm| {
        let over = Overrides {
            algorithm: Some(algorithm),
            q_bucket_size: Some(7),
            k_bucket_size: Some(11),
        };
        let (y, cache) = module.forward(x.view(), Some(ctx.view()), None, None, over).unwrap();
        (y, module.backward(&cache, dy.view()).unwrap())
    };
    let (y0, g0) = run(Algorithm::Naive);
    assert!(g0.dcontext.is_some());
    for algorithm in &ALGORITHMS[1..] {
        let (y, g) = run(*algorithm);
        assert_close("cross y", &y, &y0, 2e-5);
        assert_close("cross dx", &g.dx, &g0.dx, 2e-4);
        assert_close(
            "cross dcontext",
            g.dcontext.as_ref().unwrap(),
            g0.dcontext.as_ref().unwrap(),
            2e-4,
        );
    }
}

#[test]
fn module_gradients_match_finite_differences() {
    for (cosine_sim, mods) in [(false, false), (true, false), (false, true)] {
        module_gradients_match_finite_differences_with(cosine_sim, mods);
    }
}

/// With `mods`: a window of one key back (and causal), a softcap and the paper's ALiBi slopes.
fn module_gradients_match_finite_differences_with(cosine_sim: bool, mods: bool) {
    let mut config = AttentionConfig::new(6, 2, 3);
    config.causal = true;
    config.cosine_sim = cosine_sim;
    config.cosine_scale = 4.0;
    if mods {
        config.window = Some(attn::Window::new(1, -1));
        config.softcap = Some(0.7);
        config.alibi = Some(attn::core::options::alibi_slopes(2));
    }
    let module = Attention::new(config, 7).unwrap();
    let x = attn::core::random::normal((1, 4, 6), 8);
    let ctx = attn::core::random::normal((1, 5, 6), 9);
    let dy = attn::core::random::normal((1, 4, 6), 10);
    let loss = |m: &Attention, x: &Array3<f32>, ctx: &Array3<f32>| -> f64 {
        let (y, _) =
            m.forward(x.view(), Some(ctx.view()), None, None, Overrides::default()).unwrap();
        y.iter().zip(&dy).map(|(&a, &b)| a as f64 * b as f64).sum()
    };
    let (_, cache) =
        module.forward(x.view(), Some(ctx.view()), None, None, Overrides::default()).unwrap();
    let g = module.backward(&cache, dy.view()).unwrap();
    // Central differences in f32: truncation error ~ eps² (large where the ℓ2 normalisation
    // of a short q or k curves sharply), rounding ~ 1e-7 / eps. 1e-3 balances both here.
    let eps = 1e-3f32;
    let mut worst = 0.0f64;
    let mut check = |analytic: f32, plus: f64, minus: f64| {
        let numeric = (plus - minus) / (2.0 * eps as f64);
        worst = worst.max((numeric - analytic as f64).abs() / (1.0 + numeric.abs()));
    };
    for i in 0..x.len() {
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp.as_slice_mut().unwrap()[i] += eps;
        xm.as_slice_mut().unwrap()[i] -= eps;
        check(g.dx.as_slice().unwrap()[i], loss(&module, &xp, &ctx), loss(&module, &xm, &ctx));
    }
    for i in 0..ctx.len() {
        let (mut cp, mut cm) = (ctx.clone(), ctx.clone());
        cp.as_slice_mut().unwrap()[i] += eps;
        cm.as_slice_mut().unwrap()[i] -= eps;
        check(
            g.dcontext.as_ref().unwrap().as_slice().unwrap()[i],
            loss(&module, &x, &cp),
            loss(&module, &x, &cm),
        );
    }
    for w in 0..3 {
        let len = [module.to_q.len(), module.to_kv.len(), module.to_out.len()][w];
        for i in 0..len {
            let bump = |delta: f32| {
                let mut m = module.clone();
                let t = [&mut m.to_q, &mut m.to_kv, &mut m.to_out][w].as_slice_mut().unwrap();
                t[i] += delta;
                loss(&m, &x, &ctx)
            };
            let analytic = [&g.d_to_q, &g.d_to_kv, &g.d_to_out][w].as_slice().unwrap()[i];
            check(analytic, bump(eps), bump(-eps));
        }
    }
    assert!(
        worst < 2e-3,
        "cosine_sim {cosine_sim} mods {mods}: finite differences differ by {worst:e}"
    );
}

#[test]
fn weights_round_trip_through_npy_files() {
    let module = Attention::new(AttentionConfig::new(16, 2, 4), 11).unwrap();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("module-weights");
    module.save(&dir).unwrap();
    let loaded = Attention::load(module.config.clone(), &dir).unwrap();
    assert_eq!(
        (loaded.to_q, loaded.to_kv, loaded.to_out),
        (module.to_q, module.to_kv, module.to_out)
    );
    let err = Attention::load(AttentionConfig::new(16, 4, 4), &dir).unwrap_err();
    assert!(err.contains("to_q.npy"), "{err}");
}

#[test]
fn seed_shorthand_and_bad_input() {
    assert_eq!(Algorithm::memory_efficient(true), Algorithm::Chunked);
    assert_eq!(Algorithm::memory_efficient(false), Algorithm::Naive);
    let module = Attention::new(AttentionConfig::new(8, 2, 4), 0).unwrap();
    let x = Array3::<f32>::zeros((1, 3, 7));
    let e = module.forward(x.view(), None, None, None, Overrides::default()).unwrap_err();
    assert!(e.to_string().contains("dim = 8"), "{e}");
    let mut bad = AttentionConfig::new(8, 3, 4);
    bad.kv_heads = Some(2);
    assert!(Attention::new(bad, 0).is_err());
    let mut gpu = AttentionConfig::new(8, 2, 4);
    gpu.device = attn::Device::Cuda;
    let e = Attention::new(gpu, 0).unwrap_err();
    assert!(e.to_string().contains("cuda"), "{e}");
}

#[test]
fn cosine_sim_attention_matches_the_float64_reference() {
    // y = merge(attention(q̂, k̂, v; scale 16)) W_out with q̂, k̂ the ℓ2-normalised heads,
    // computed here in float64 from the module's own weights.
    use ndarray::{Array4, Axis, s};
    let (b, n, dim, heads, d) = (2, 19, 32, 4, 8);
    let mut config = AttentionConfig::new(dim, heads, d);
    config.cosine_sim = true;
    config.causal = true;
    let module = Attention::new(config, 12).unwrap();
    let x = attn::core::random::normal((b, n, dim), 13);
    let x64 = x.mapv(f64::from);
    // Columns `first..first + heads·d` of x W, split into heads, optionally ℓ2-normalised.
    let heads_of = |w: &Array2<f32>, first: usize, normalise: bool| {
        let w64 = w.mapv(f64::from);
        let mut t = Array4::<f64>::zeros((b, heads, n, d));
        for bi in 0..b {
            let p = x64.index_axis(Axis(0), bi).dot(&w64);
            for h in 0..heads {
                for i in 0..n {
                    let mut row = p.slice(s![i, first + h * d..first + (h + 1) * d]).to_owned();
                    if normalise {
                        row /= row.dot(&row).sqrt();
                    }
                    t.slice_mut(s![bi, h, i, ..]).assign(&row);
                }
            }
        }
        t
    };
    let (q, k, v) = (
        heads_of(&module.to_q, 0, true),
        heads_of(&module.to_kv, 0, true),
        heads_of(&module.to_kv, heads * d, false),
    );
    let r = attn::core::reference::RefProblem {
        q,
        k,
        v,
        mask: None,
        bias: None,
        scale: 16.0,
        causal: true,
        window: None,
        softcap: None,
        alibi: None,
        dropout: None,
        placement: None,
    }
    .forward();
    let w_out = module.to_out.mapv(f64::from);
    let mut y_ref = Array3::<f64>::zeros((b, n, dim));
    for bi in 0..b {
        let mut merged = Array2::<f64>::zeros((n, heads * d));
        for h in 0..heads {
            merged.slice_mut(s![.., h * d..(h + 1) * d]).assign(&r.out.slice(s![bi, h, .., ..]));
        }
        y_ref.index_axis_mut(Axis(0), bi).assign(&merged.dot(&w_out));
    }
    for algorithm in ALGORITHMS {
        let over = Overrides { algorithm: Some(algorithm), ..Overrides::default() };
        let (y, _) = module.forward(x.view(), None, None, None, over).unwrap();
        let e = compare(y.view(), y_ref.view());
        assert!(e.normwise <= 1e-5, "{algorithm:?}: cosine-sim output error {:e}", e.normwise);
    }
}

#[test]
fn inference_gives_the_forward_output() {
    let mut config = AttentionConfig::new(40, 4, 10);
    config.causal = true;
    config.cosine_sim = true;
    let module = Attention::new(config, 14).unwrap();
    let x = attn::core::random::normal((2, 33, 40), 15);
    let ctx = attn::core::random::normal((2, 21, 40), 16);
    let mask = Array2::from_elem((2, 21), true);
    let over = Overrides::default();
    let (y, _) = module
        .forward(x.view(), Some(ctx.view()), Some(Mask::KeyPadding(mask.view())), None, over)
        .unwrap();
    let y2 = module
        .infer(x.view(), Some(ctx.view()), Some(Mask::KeyPadding(mask.view())), None, over)
        .unwrap();
    assert_eq!(y, y2);
}
