//! The contract's operands on the device: a validated problem's Q, K, V, its score modifiers
//! (bias, masks, causal) and dropout parameters, laid out as the kernels' argument structs
//! (`ScoreMods`, `Dropout` in contract.cuh; `FlashArgs` in tiles.cuh).

use attn_core::problem::Problem;
use attn_core::{AttnError, Result, Shape};
use ndarray::Array4;

use crate::{DeviceBuffer, DeviceRepr, Gpu};

/// The score modifiers (`struct ScoreMods` in contract.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ScoreMods {
    bias: u64,
    bias_stride: [i64; 4],
    mask: u64,
    mask_stride: [i64; 4],
    alibi: u64,
    alibi_stride_b: i32,
    diag: i32,
    causal: i32,
    n_q: i32,
    n_k: i32,
    heads: i32,
    left: i32,
    right: i32,
    softcap: f32,
    inv_softcap: f32,
}
// SAFETY: plain old data, laid out as `struct ScoreMods` in contract.cuh.
unsafe impl DeviceRepr for ScoreMods {}
// At most 128 bytes: a larger kernel parameter made NVRTC address it through a pointer and
// reload its fields inside the tensor-core forward's key loop (notes/gpu.md, 2026-12-04).
const _: () = assert!(std::mem::size_of::<ScoreMods>() == 128);

/// Dropout parameters (`struct Dropout` in contract.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DropoutArg {
    seed: u64,
    threshold: u32,
    keep_scale: f32,
    enabled: i32,
    q_off: u32,
    k_off: u32,
    pad_: i32,
}
// SAFETY: plain old data, laid out as `struct Dropout` in contract.cuh.
unsafe impl DeviceRepr for DropoutArg {}

impl DropoutArg {
    /// Whether dropout is on.
    pub fn enabled(&self) -> bool {
        self.enabled != 0
    }
}

/// Whether a sliding window, the softcap or ALiBi changes `p`'s scores (the shipped
/// tensor-core forward keeps those in kernels of their own).
pub fn needs_cut_kernel(p: &Problem<'_>) -> bool {
    let plain_keys = attn_core::KeyRange::new(p.shape.n_q, p.shape.n_k, p.causal, None);
    p.softcap.is_some() || p.alibi.is_some() || p.keys != plain_keys
}

/// Whether `p` needs the fused kernels' `_mods` variants, which read a bias, a mask or ALiBi
/// slopes per score. The lean variants cut each row to its key range (causal masking, the
/// window) and apply the softcap themselves.
pub fn needs_mods_kernel(p: &Problem<'_>) -> bool {
    p.bias.is_some() || p.mask.is_some() || p.alibi.is_some()
}

/// A validated problem with its tensors in device memory.
#[derive(Debug)]
pub struct DeviceProblem {
    pub shape: Shape,
    pub scale: f32,
    /// The keys each query sees (causal masking and the window).
    pub keys: attn_core::KeyRange,
    /// A bias, mask or ALiBi ([`needs_mods_kernel`]).
    has_mods: bool,
    has_softcap: bool,
    pub q: DeviceBuffer<f32>,
    pub k: DeviceBuffer<f32>,
    pub v: DeviceBuffer<f32>,
    /// The device buffers `mods` points at (dBias among them).
    score: ScoreInputs,
    pub mods: ScoreMods,
    pub dropout: DropoutArg,
}

/// Row-major strides of an array of `dims`, 0 on axes of length 1 (broadcast).
fn broadcast_strides(dims: &[usize]) -> [i64; 4] {
    let mut strides = [0i64; 4];
    let mut s = 1i64;
    for a in (0..4).rev() {
        strides[a] = if dims[a] == 1 { 0 } else { s };
        s *= dims[a] as i64;
    }
    strides
}

/// What modifies the scores of a validated problem, in device memory: the bias, the mask (as
/// bytes), the kernels' argument that points at them, and the dropout parameters.
#[derive(Debug)]
pub struct ScoreInputs {
    pub mods: ScoreMods,
    pub dropout: DropoutArg,
    pub bias: Option<DeviceBuffer<f32>>,
    pub mask: Option<DeviceBuffer<u8>>,
    pub alibi: Option<DeviceBuffer<f32>>,
    /// dBias in the bias's shape (the bias's strides in `mods`), zeroed, when a backward asks
    /// for it: the kernels add into it ([`ScoreInputs::dbias_ptr`]).
    pub dbias: Option<DeviceBuffer<f32>>,
}

impl ScoreInputs {
    pub fn upload(gpu: &Gpu, p: &Problem<'_>) -> Result<Self> {
        let sh = p.shape;
        // a block of a larger problem (a placement): causal masking, the window and ALiBi
        // measure from the whole problem's diagonal, dropout hashes its positions
        let diag = i32::try_from(p.keys.diagonal).map_err(|_| AttnError::InvalidLengths {
            arg: "placement",
            reason: format!(
                "the block's diagonal ({}) is beyond the GPU kernels' 32-bit positions",
                p.keys.diagonal
            ),
        })?;
        let (q_off, k_off) =
            p.placement.map_or((0, 0), |pl| (pl.q_start as u32, pl.k_start as u32));
        let bias = p.bias.map(|b| gpu.upload_array(b)).transpose()?;
        let mask = p.mask.map(|m| gpu.upload_array(m.mapv(u8::from).view())).transpose()?;
        let alibi = p.alibi.map(|a| gpu.upload_array(a.as_standard_layout().view())).transpose()?;
        let side = |s: Option<usize>| s.map_or(-1, |s| s.min(i32::MAX as usize) as i32);
        let mods = ScoreMods {
            bias: bias.as_ref().map_or(0, |b| gpu.ptr(b)),
            bias_stride: p.bias.map_or([0; 4], |b| broadcast_strides(b.shape())),
            mask: mask.as_ref().map_or(0, |m| gpu.ptr(m)),
            mask_stride: p.mask.map_or([0; 4], |m| broadcast_strides(m.shape())),
            alibi: alibi.as_ref().map_or(0, |a| gpu.ptr(a)),
            alibi_stride_b: p.alibi.map_or(0, |a| if a.nrows() == 1 { 0 } else { sh.heads as i32 }),
            causal: p.causal.into(),
            n_q: sh.n_q as i32,
            n_k: sh.n_k as i32,
            heads: sh.heads as i32,
            left: side(p.keys.left),
            right: side(p.keys.right),
            softcap: p.softcap.unwrap_or(0.0),
            inv_softcap: p.softcap.map_or(0.0, |c| 1.0 / c),
            diag,
        };
        let dropout = p.dropout.map_or(DropoutArg::default(), |d| DropoutArg {
            seed: d.seed,
            threshold: d.threshold,
            keep_scale: d.keep_scale,
            enabled: 1,
            q_off,
            k_off,
            pad_: 0,
        });
        Ok(Self { mods, dropout, bias, mask, alibi, dbias: None })
    }

    /// [`ScoreInputs::upload`] for a backward: with the zeroed dBias buffer the kernels add
    /// into when `p` asks for the bias gradient.
    pub fn upload_for_backward(gpu: &Gpu, p: &Problem<'_>) -> Result<Self> {
        let mut s = Self::upload(gpu, p)?;
        if let Some(bias) = p.bias.filter(|_| p.bias_grad) {
            s.dbias = Some(gpu.zeros::<f32>(bias.len())?);
        }
        Ok(s)
    }

    /// The device address of dBias for the kernels' arguments (`FlashArgs::dbias`, the
    /// window kernels' `dbias`): 0 when it was not asked for.
    pub fn dbias_ptr(&self, gpu: &Gpu) -> u64 {
        self.dbias.as_ref().map_or(0, |b| gpu.ptr(b))
    }

    /// dBias in the bias's shape, when it was asked for.
    pub fn download_dbias(&self, gpu: &Gpu, p: &Problem<'_>) -> Result<Option<Array4<f32>>> {
        match (&self.dbias, p.bias) {
            (Some(buf), Some(bias)) => Ok(Some(gpu.download_array(buf, bias.dim())?)),
            _ => Ok(None),
        }
    }
}

impl DeviceProblem {
    /// Uploads Q, K, V, the mask (as bytes) and the bias of a validated problem, for a
    /// forward.
    pub fn upload(gpu: &Gpu, p: &Problem<'_>) -> Result<Self> {
        Self::upload_as(gpu, p, false)
    }

    /// [`DeviceProblem::upload`] for a backward: with the zeroed dBias buffer when `p` asks
    /// for it.
    pub fn upload_for_backward(gpu: &Gpu, p: &Problem<'_>) -> Result<Self> {
        Self::upload_as(gpu, p, true)
    }

    fn upload_as(gpu: &Gpu, p: &Problem<'_>, backward: bool) -> Result<Self> {
        let sh = p.shape;
        if sh.batch * sh.heads > 65_535 {
            return Err(AttnError::Cuda {
                context: "planning the launch".into(),
                message: format!(
                    "batch × heads = {} exceeds the 65 535 heads one launch can cover; split the batch",
                    sh.batch * sh.heads
                ),
            });
        }
        let score = if backward {
            ScoreInputs::upload_for_backward(gpu, p)?
        } else {
            ScoreInputs::upload(gpu, p)?
        };
        let (mods, dropout) = (score.mods, score.dropout);
        Ok(Self {
            shape: sh,
            scale: p.scale,
            keys: p.keys,
            has_mods: needs_mods_kernel(p),
            has_softcap: p.softcap.is_some(),
            q: gpu.upload_array(p.q)?,
            k: gpu.upload_array(p.k)?,
            v: gpu.upload_array(p.v)?,
            score,
            mods,
            dropout,
        })
    }

    /// Query rows `i0 .. i0 + rows` see none of the keys `j0 .. j0 + cols` (a window of
    /// scores causal masking and the sliding window hide).
    pub fn window_hidden(&self, (i0, rows): (usize, usize), (j0, cols): (usize, usize)) -> bool {
        self.keys.tile_hidden((i0, i0 + rows), (j0, cols))
    }

    /// Whether the fused kernels' `_mods` variants are needed ([`needs_mods_kernel`]).
    pub fn has_score_mods(&self) -> bool {
        self.has_mods
    }

    /// Whether the scores are softcapped.
    pub fn has_softcap(&self) -> bool {
        self.has_softcap
    }

    /// Whether a backward's dS needs `score_grad` (contract.cuh): the softcap's slope, or
    /// the bias gradient.
    pub fn has_score_grads(&self) -> bool {
        self.has_softcap || self.score.dbias.is_some()
    }

    /// The device address of dBias, 0 when it was not asked for ([`ScoreInputs::dbias_ptr`]).
    pub fn dbias_ptr(&self, gpu: &Gpu) -> u64 {
        self.score.dbias_ptr(gpu)
    }

    /// dBias in the bias's shape, when the backward was asked for it.
    pub fn download_dbias(&self, gpu: &Gpu, p: &Problem<'_>) -> Result<Option<Array4<f32>>> {
        self.score.download_dbias(gpu, p)
    }

    /// Whether a window's scores need `modify_scores`: a modifier (softcap, bias, ALiBi,
    /// mask), or causal masking or the sliding window cutting into it.
    pub fn window_needs_mods(
        &self,
        (i0, rows): (usize, usize),
        (j0, cols): (usize, usize),
    ) -> bool {
        self.has_mods || self.has_softcap || self.keys.tile_cut((i0, i0 + rows), (j0, cols))
    }
}

/// The arguments of the fused kernels (`struct FlashArgs` in tiles.cuh): device pointers and
/// sizes. Unused pointers stay 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FlashArgs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub lse: u64,
    pub d_out: u64,
    pub dvec: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub n_q: i32,
    pub n_k: i32,
    pub heads: i32,
    pub kv_heads: i32,
    pub scale: f32,
    pub pad_: i32,
    /// dBias, which the backward adds into when it is asked for (0: not asked for).
    pub dbias: u64,
}
// SAFETY: plain old data, laid out as `struct FlashArgs` in tiles.cuh.
unsafe impl DeviceRepr for FlashArgs {}

impl FlashArgs {
    /// Q, K, V and the sizes of an uploaded problem.
    pub fn of(gpu: &Gpu, dev: &DeviceProblem) -> Self {
        Self {
            q: gpu.ptr(&dev.q),
            k: gpu.ptr(&dev.k),
            v: gpu.ptr(&dev.v),
            ..Self::new(&dev.shape, dev.scale)
        }
    }

    /// The sizes and scale of a problem, every pointer 0.
    pub fn new(shape: &Shape, scale: f32) -> Self {
        let Shape { heads, kv_heads, n_q, n_k, .. } = *shape;
        Self {
            n_q: n_q as i32,
            n_k: n_k as i32,
            heads: heads as i32,
            kv_heads: kv_heads as i32,
            scale,
            ..Self::default()
        }
    }
}

/// The saved forward results and the upstream gradient on the device: (O, lse, dO).
#[derive(Debug)]
pub struct DeviceSaved {
    pub out: DeviceBuffer<f32>,
    pub lse: DeviceBuffer<f32>,
    pub d_out: DeviceBuffer<f32>,
}
