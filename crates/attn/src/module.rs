//! The multi-head `Attention` module: what a user of `memory-efficient-attention-pytorch`
//! reaches for, in Rust. Projections in, any stage in the middle, projection out — forward
//! and backward.
//!
//! ```text
//! q = x W_q            [b, n, h·d]  → heads [b, h, n, d]
//! k, v = context W_kv  [b, m, 2·h_kv·d] → first half k, second half v, [b, h_kv, m, d]
//! o = attention(q, k, v; causal, mask, bias, dropout)   (the chosen stage)
//! y = merge_heads(o) W_out            [b, n, dim]
//! ```

use ndarray::{Array2, Array3, Array4, ArrayView2, ArrayView3, ArrayView4, Axis, s};
use ndarray_rand::RandomExt;
use ndarray_rand::rand::{SeedableRng, rngs::StdRng};
use ndarray_rand::rand_distr::Uniform;

use attn_core::{AttnError, Device, Forward, Inputs, Mask, Options, Result, Stage};

/// The attention algorithm a module runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Algorithm {
    Naive,
    Chunked,
    Flash1,
    #[default]
    Flash2,
}

impl Algorithm {
    /// The seed's shorthand: `memory_efficient = true` is chunked attention, `false` naive.
    pub fn memory_efficient(on: bool) -> Self {
        if on { Algorithm::Chunked } else { Algorithm::Naive }
    }

    /// The CPU stage that runs it.
    pub fn stage(self) -> &'static dyn Stage {
        match self {
            Algorithm::Naive => &attn_naive::NaiveCpu,
            Algorithm::Chunked => &attn_chunked::ChunkedCpu,
            Algorithm::Flash1 => &attn_flash1::Flash1Cpu,
            Algorithm::Flash2 => &attn_flash2::Flash2Cpu,
        }
    }
}

/// The seed's knobs.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionConfig {
    /// Model width: x is `[b, n, dim]`.
    pub dim: usize,
    pub heads: usize,
    pub dim_head: usize,
    /// Key/value heads (GQA/MQA); `None` means `heads`.
    pub kv_heads: Option<usize>,
    pub causal: bool,
    /// Dropout on the attention weights (0 = none), and its seed.
    pub dropout: f32,
    pub dropout_seed: u64,
    pub algorithm: Algorithm,
    /// Query rows per block (the seed's `q_bucket_size`); `None` lets the stage choose.
    pub q_bucket_size: Option<usize>,
    /// Key rows per block (the seed's `k_bucket_size`).
    pub k_bucket_size: Option<usize>,
    /// Cosine-similarity attention (Swin Transformer V2, Liu et al. 2021): q and k are
    /// ℓ2-normalised per head and the scores scaled by the fixed `cosine_scale` instead of
    /// 1/√d. Every score then lies in [−scale, scale], so exp(s − scale) can never overflow
    /// and a kernel could drop the running max altogether; our stages keep it, which costs
    /// nothing in accuracy.
    pub cosine_sim: bool,
    /// The fixed scale of cosine-similarity attention.
    pub cosine_scale: f32,
    /// A sliding window over the keys (Mistral, Gemma 2, Longformer).
    pub window: Option<attn_core::Window>,
    /// Logit soft-capping `s ← c·tanh(s/c)` (Gemma 2).
    pub softcap: Option<f32>,
    /// ALiBi slopes, one per head (BLOOM, MPT; [`attn_core::options::alibi_slopes`] gives
    /// the paper's).
    pub alibi: Option<Vec<f32>>,
    /// Where the attention runs. This build has CPU stages only; `Device::Cuda` is refused
    /// with an error until the GPU stages land.
    pub device: Device,
}

impl AttentionConfig {
    /// `dim`, `heads`, `dim_head`; no GQA, not causal, no dropout, FlashAttention-2.
    pub fn new(dim: usize, heads: usize, dim_head: usize) -> Self {
        Self {
            dim,
            heads,
            dim_head,
            kv_heads: None,
            causal: false,
            dropout: 0.0,
            dropout_seed: 0,
            algorithm: Algorithm::default(),
            q_bucket_size: None,
            k_bucket_size: None,
            cosine_sim: false,
            cosine_scale: 16.0,
            window: None,
            softcap: None,
            alibi: None,
            device: Device::Cpu,
        }
    }

    fn kv_heads(&self) -> usize {
        self.kv_heads.unwrap_or(self.heads)
    }
}

/// Per-call overrides of the configuration, as the seed's `forward` allows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    pub algorithm: Option<Algorithm>,
    pub q_bucket_size: Option<usize>,
    pub k_bucket_size: Option<usize>,
}

/// Multi-head attention with its three projections (no biases, as in the seed).
#[derive(Clone, Debug)]
pub struct Attention {
    pub config: AttentionConfig,
    /// `[dim, heads·dim_head]`
    pub to_q: Array2<f32>,
    /// `[dim, 2·kv_heads·dim_head]`: the key half first, then the value half.
    pub to_kv: Array2<f32>,
    /// `[heads·dim_head, dim]`
    pub to_out: Array2<f32>,
}

/// What the backward needs from a forward call.
#[derive(Clone, Debug)]
pub struct Cache {
    x: Array3<f32>,
    context: Option<Array3<f32>>,
    q: Array4<f32>,
    k: Array4<f32>,
    v: Array4<f32>,
    mask: Option<OwnedMask>,
    bias: Option<Array4<f32>>,
    alibi: Option<Array2<f32>>,
    fwd: Forward,
    options: Options,
    algorithm: Algorithm,
    /// With cosine similarity: the norms ‖q‖ `[b, h, n]` and ‖k‖ `[b, h_kv, m]` that q and k
    /// were divided by.
    norms: Option<(Array3<f32>, Array3<f32>)>,
}

#[derive(Clone, Debug)]
enum OwnedMask {
    KeyPadding(Array2<bool>),
    Full(Array4<bool>),
}

/// The gradients of a backward call.
#[derive(Clone, Debug)]
pub struct ModuleGrads {
    /// `[b, n, dim]`
    pub dx: Array3<f32>,
    /// `[b, m, dim]` for cross attention; `None` for self-attention (it is part of `dx`).
    pub dcontext: Option<Array3<f32>>,
    pub d_to_q: Array2<f32>,
    pub d_to_kv: Array2<f32>,
    pub d_to_out: Array2<f32>,
}

fn check_width(arg: &'static str, t: &ArrayView3<'_, f32>, dim: usize) -> Result<()> {
    if t.dim().2 != dim || t.is_empty() {
        return Err(AttnError::ShapeMismatch {
            arg,
            got: t.shape().to_vec(),
            expected: format!("it must be [batch, seq, dim] with dim = {dim} (and no empty axis)"),
        });
    }
    Ok(())
}

/// `[b, n, h·d]` → `[b, h, n, d]`, standard layout.
fn split_heads(t: ArrayView3<'_, f32>, heads: usize) -> Array4<f32> {
    let (b, n, hd) = t.dim();
    let t = t.as_standard_layout();
    let t4 = t.view().into_shape_with_order((b, n, heads, hd / heads)).expect("standard layout");
    t4.permuted_axes([0, 2, 1, 3]).as_standard_layout().into_owned()
}

/// `[b, h, n, d]` → `[b, n, h·d]`.
fn merge_heads(t: ArrayView4<'_, f32>) -> Array3<f32> {
    let (b, h, n, d) = t.dim();
    t.permuted_axes([0, 2, 1, 3])
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((b, n, h * d))
        .expect("standard layout")
}

/// q, k, v in head layout and, with cosine similarity, the norms of q and k.
type ProjectedHeads = (Array4<f32>, Array4<f32>, Array4<f32>, Option<(Array3<f32>, Array3<f32>)>);

/// Divides every row (last axis) of `t` by its ℓ2 norm in place and returns the norms.
fn l2_normalize(t: &mut Array4<f32>) -> Array3<f32> {
    let norms = t.map_axis(Axis(3), |r| r.dot(&r).sqrt().max(1e-12));
    ndarray::Zip::from(t.lanes_mut(Axis(3))).and(&norms).for_each(|mut r, &n| r /= n);
    norms
}

/// The gradient through `t̂ = t / ‖t‖`: dt = (dt̂ − t̂ (t̂ · dt̂)) / ‖t‖, in place of `dt̂`.
fn l2_normalize_backward(d: &mut Array4<f32>, t_hat: &Array4<f32>, norms: &Array3<f32>) {
    ndarray::Zip::from(d.lanes_mut(Axis(3))).and(t_hat.lanes(Axis(3))).and(norms).for_each(
        |mut dr, tr, &n| {
            let proj = dr.dot(&tr);
            dr.zip_mut_with(&tr, |x, &t| *x = (*x - t * proj) / n);
        },
    );
}

/// `[b, n, c] · [c, heads·d]` straight into heads `[b, heads, n, d]`, one product per
/// (batch, head), without the merged intermediate.
fn project_heads(t: ArrayView3<'_, f32>, w: ArrayView2<'_, f32>, heads: usize) -> Array4<f32> {
    let (b, n, _) = t.dim();
    let d = w.ncols() / heads;
    let mut out = Array4::<f32>::zeros((b, heads, n, d));
    ndarray::Zip::indexed(out.outer_iter_mut()).par_for_each(|bi, mut out_b| {
        for (h, mut out_bh) in out_b.outer_iter_mut().enumerate() {
            let w_h = w.slice(s![.., h * d..(h + 1) * d]);
            ndarray::linalg::general_mat_mul(
                1.0,
                &t.index_axis(Axis(0), bi),
                &w_h,
                0.0,
                &mut out_bh,
            );
        }
    });
    out
}

/// `merge_heads(o) · w` for o `[b, heads, n, d]`, w `[heads·d, e]`, summing head by head
/// without the merged intermediate.
fn project_from_heads(o: ArrayView4<'_, f32>, w: ArrayView2<'_, f32>) -> Array3<f32> {
    let (b, heads, n, d) = o.dim();
    let mut y = Array3::<f32>::zeros((b, n, w.ncols()));
    ndarray::Zip::indexed(y.outer_iter_mut()).par_for_each(|bi, mut y_b| {
        for h in 0..heads {
            let w_h = w.slice(s![h * d..(h + 1) * d, ..]);
            ndarray::linalg::general_mat_mul(1.0, &o.slice(s![bi, h, .., ..]), &w_h, 1.0, &mut y_b);
        }
    });
    y
}

/// `[b, n, c] · [c, e]` → `[b, n, e]`.
fn project(t: ArrayView3<'_, f32>, w: ArrayView2<'_, f32>) -> Array3<f32> {
    let (b, n, c) = t.dim();
    let flat = t.as_standard_layout();
    let y = flat.view().into_shape_with_order((b * n, c)).expect("standard layout").dot(&w);
    y.into_shape_with_order((b, n, w.ncols())).expect("standard layout")
}

/// `Σ_b tᵀ g` for `t [b, n, c]`, `g [b, n, e]` → `[c, e]` (a weight gradient).
fn weight_grad(t: ArrayView3<'_, f32>, g: ArrayView3<'_, f32>) -> Array2<f32> {
    let (b, n, c) = t.dim();
    let t = t.as_standard_layout();
    let g = g.as_standard_layout();
    let t2 = t.view().into_shape_with_order((b * n, c)).expect("standard layout");
    let g2 = g.view().into_shape_with_order((b * n, g.dim().2)).expect("standard layout");
    t2.t().dot(&g2)
}

impl Attention {
    /// Weights drawn like PyTorch's `nn.Linear` default: uniform in ±1/√fan_in, from `seed`.
    pub fn new(config: AttentionConfig, seed: u64) -> Result<Self> {
        let (dim, inner, kv_inner) =
            (config.dim, config.heads * config.dim_head, config.kv_heads() * config.dim_head);
        if dim == 0 || inner == 0 {
            return Err(AttnError::EmptyAxis {
                arg: "config",
                shape: vec![dim, config.heads, config.dim_head],
            });
        }
        if config.device != Device::Cpu {
            return Err(AttnError::UnsupportedDevice { device: config.device.to_string() });
        }
        if config.kv_heads() == 0 || !config.heads.is_multiple_of(config.kv_heads()) {
            return Err(AttnError::HeadsNotDivisible {
                heads: config.heads,
                kv_heads: config.kv_heads(),
            });
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut init = |rows: usize, cols: usize| {
            let bound = 1.0 / (rows as f32).sqrt();
            Array2::random_using(
                (rows, cols),
                Uniform::new(-bound, bound).expect("bound > 0"),
                &mut rng,
            )
        };
        Ok(Self {
            to_q: init(dim, inner),
            to_kv: init(dim, 2 * kv_inner),
            to_out: init(inner, dim),
            config,
        })
    }

    /// y = Attention(x, context) for x `[b, n, dim]`, context `[b, m, dim]` (default: x), an
    /// optional mask (key padding `[b, m]` or 4-D broadcastable) and bias (broadcastable to
    /// `[b, heads, n, m]`), with per-call overrides. Returns y `[b, n, dim]` and what the
    /// backward needs.
    pub fn forward(
        &self,
        x: ArrayView3<'_, f32>,
        context: Option<ArrayView3<'_, f32>>,
        mask: Option<Mask<'_>>,
        bias: Option<ArrayView4<'_, f32>>,
        overrides: Overrides,
    ) -> Result<(Array3<f32>, Cache)> {
        let c = &self.config;
        let (q, k, v, norms) = self.project_qkv(x, context)?;
        let algorithm = overrides.algorithm.unwrap_or(c.algorithm);
        let options = self.options(overrides);
        let owned_mask = mask.map(|m| match m {
            Mask::KeyPadding(m) => OwnedMask::KeyPadding(m.to_owned()),
            Mask::Full(m) => OwnedMask::Full(m.to_owned()),
        });
        let mut cache = Cache {
            x: x.to_owned(),
            context: context.map(|c| c.to_owned()),
            q,
            k,
            v,
            mask: owned_mask,
            bias: bias.map(|b| b.to_owned()),
            alibi: self.alibi(),
            fwd: Forward {
                out: Array4::zeros((0, 0, 0, 0)),
                lse: Array3::zeros((0, 0, 0)),
                traffic: None,
            },
            options,
            algorithm,
            norms,
        };
        cache.fwd = algorithm.stage().forward(&cache.inputs(), &cache.options)?;
        let y = project_from_heads(cache.fwd.out.view(), self.to_out.view());
        Ok((y, cache))
    }

    /// [`Attention::forward`] without keeping anything for a backward: each intermediate is
    /// dropped as soon as it is used, so the peak is about q, k, v and the attention output
    /// (four `[b, n, heads·dim_head]` tensors) plus the stage's own workspace.
    pub fn infer(
        &self,
        x: ArrayView3<'_, f32>,
        context: Option<ArrayView3<'_, f32>>,
        mask: Option<Mask<'_>>,
        bias: Option<ArrayView4<'_, f32>>,
        overrides: Overrides,
    ) -> Result<Array3<f32>> {
        let c = &self.config;
        let (q, k, v, _) = self.project_qkv(x, context)?;
        let options = self.options(overrides);
        let algorithm = overrides.algorithm.unwrap_or(c.algorithm);
        let alibi = self.alibi();
        let out = {
            let mut inputs = Inputs::new(q.view(), k.view(), v.view());
            if let Some(a) = &alibi {
                inputs = inputs.with_alibi(a.view());
            }
            if let Some(m) = &mask {
                inputs = inputs.with_mask(match m {
                    Mask::KeyPadding(m) => Mask::KeyPadding(m.view()),
                    Mask::Full(m) => Mask::Full(m.view()),
                });
            }
            if let Some(b) = &bias {
                inputs = inputs.with_bias(b.view());
            }
            algorithm.stage().forward(&inputs, &options)?.out
        };
        drop((q, k, v));
        Ok(project_from_heads(out.view(), self.to_out.view()))
    }

    /// q = x W_q, k and v from context W_kv (context defaults to x), in head layout; with
    /// cosine similarity q and k ℓ2-normalised, and their norms returned for the backward.
    fn project_qkv(
        &self,
        x: ArrayView3<'_, f32>,
        context: Option<ArrayView3<'_, f32>>,
    ) -> Result<ProjectedHeads> {
        let c = &self.config;
        check_width("x", &x, c.dim)?;
        if let Some(ctx) = &context {
            check_width("context", ctx, c.dim)?;
        }
        let ctx = context.unwrap_or(x);
        let kv_inner = c.kv_heads() * c.dim_head;
        let mut q = project_heads(x, self.to_q.view(), c.heads);
        let mut k = project_heads(ctx, self.to_kv.slice(s![.., ..kv_inner]), c.kv_heads());
        let v = project_heads(ctx, self.to_kv.slice(s![.., kv_inner..]), c.kv_heads());
        let norms = c.cosine_sim.then(|| (l2_normalize(&mut q), l2_normalize(&mut k)));
        Ok((q, k, v, norms))
    }

    fn options(&self, overrides: Overrides) -> Options {
        let c = &self.config;
        Options {
            scale: c.cosine_sim.then_some(c.cosine_scale),
            causal: c.causal,
            dropout: (c.dropout > 0.0).then(|| attn_core::Dropout::new(c.dropout, c.dropout_seed)),
            q_block: overrides.q_bucket_size.or(c.q_bucket_size),
            k_block: overrides.k_bucket_size.or(c.k_bucket_size),
            window: c.window,
            softcap: c.softcap,
            ..Options::default()
        }
    }

    /// The configured ALiBi slopes as the stages take them, `[1, heads]`.
    fn alibi(&self) -> Option<Array2<f32>> {
        let slopes = self.config.alibi.clone()?;
        Some(Array2::from_shape_vec((1, slopes.len()), slopes).expect("one row"))
    }

    /// The gradients of `sum(y ∘ dy)` with respect to x (and context) and the three weights.
    pub fn backward(&self, cache: &Cache, dy: ArrayView3<'_, f32>) -> Result<ModuleGrads> {
        let c = &self.config;
        let y_dims = (cache.x.dim().0, cache.x.dim().1, c.dim);
        if dy.dim() != y_dims {
            return Err(AttnError::ShapeMismatch {
                arg: "dy",
                got: dy.shape().to_vec(),
                expected: format!(
                    "it must have the shape of y, {:?}",
                    [y_dims.0, y_dims.1, y_dims.2]
                ),
            });
        }
        let o_merged = merge_heads(cache.fwd.out.view());
        let d_to_out = weight_grad(o_merged.view(), dy);
        let d_o = split_heads(project(dy, self.to_out.t()).view(), c.heads);
        let mut g = cache.algorithm.stage().backward(
            &cache.inputs(),
            &cache.options,
            &cache.fwd,
            d_o.view(),
        )?;
        if let Some((q_norms, k_norms)) = &cache.norms {
            l2_normalize_backward(&mut g.dq, &cache.q, q_norms);
            l2_normalize_backward(&mut g.dk, &cache.k, k_norms);
        }
        let dq = merge_heads(g.dq.view());
        let dkv = ndarray::concatenate(
            Axis(2),
            &[merge_heads(g.dk.view()).view(), merge_heads(g.dv.view()).view()],
        )
        .expect("same batch and length");
        let ctx = cache.context.as_ref().unwrap_or(&cache.x);
        let d_to_q = weight_grad(cache.x.view(), dq.view());
        let d_to_kv = weight_grad(ctx.view(), dkv.view());
        let mut dx = project(dq.view(), self.to_q.t());
        let d_ctx = project(dkv.view(), self.to_kv.t());
        let dcontext = if cache.context.is_some() {
            Some(d_ctx)
        } else {
            dx += &d_ctx;
            None
        };
        Ok(ModuleGrads { dx, dcontext, d_to_q, d_to_kv, d_to_out })
    }

    /// Saves the three weights as `to_q.npy`, `to_kv.npy`, `to_out.npy` in `dir` (float32,
    /// `[in, out]`: a PyTorch `nn.Linear` weight transposed).
    pub fn save(&self, dir: &std::path::Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for (name, w) in [("to_q", &self.to_q), ("to_kv", &self.to_kv), ("to_out", &self.to_out)] {
            ndarray_npy::write_npy(dir.join(format!("{name}.npy")), w)
                .map_err(std::io::Error::other)?;
        }
        Ok(())
    }

    /// Loads weights saved by [`Attention::save`] (or from PyTorch: `np.save("to_q.npy",
    /// layer.to_q.weight.T.numpy())`), checking their shapes against `config`.
    pub fn load(
        config: AttentionConfig,
        dir: &std::path::Path,
    ) -> std::result::Result<Self, String> {
        let mut m = Attention::new(config, 0).map_err(|e| e.to_string())?;
        for (name, w) in [("to_q", &mut m.to_q), ("to_kv", &mut m.to_kv), ("to_out", &mut m.to_out)]
        {
            let path = dir.join(format!("{name}.npy"));
            let loaded: Array2<f32> =
                ndarray_npy::read_npy(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            if loaded.dim() != w.dim() {
                return Err(format!(
                    "{}: shape {:?}, the config needs {:?}",
                    path.display(),
                    loaded.shape(),
                    w.shape()
                ));
            }
            *w = loaded;
        }
        Ok(m)
    }
}

impl Cache {
    fn inputs(&self) -> Inputs<'_> {
        let mut inputs = Inputs::new(self.q.view(), self.k.view(), self.v.view());
        match &self.mask {
            Some(OwnedMask::KeyPadding(m)) => inputs = inputs.with_mask(Mask::KeyPadding(m.view())),
            Some(OwnedMask::Full(m)) => inputs = inputs.with_mask(Mask::Full(m.view())),
            None => {}
        }
        if let Some(b) = &self.bias {
            inputs = inputs.with_bias(b.view());
        }
        if let Some(a) = &self.alibi {
            inputs = inputs.with_alibi(a.view());
        }
        inputs
    }
}
