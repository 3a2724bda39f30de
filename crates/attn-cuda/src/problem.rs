//! The contract's operands on the device: a validated problem's Q, K, V, its score modifiers
//! (bias, masks, causal) and dropout parameters, laid out as the kernels' argument structs
//! (`ScoreMods`, `Dropout` in contract.cuh; `FlashArgs` in tiles.cuh).

use attn_core::problem::Problem;
use attn_core::{AttnError, Result, Shape};

use crate::{DeviceBuffer, DeviceRepr, Gpu};

/// The score modifiers (`struct ScoreMods` in contract.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ScoreMods {
    bias: u64,
    bias_stride: [i64; 4],
    mask: u64,
    mask_stride: [i64; 4],
    causal: i32,
    n_q: i32,
    n_k: i32,
    heads: i32,
}
// SAFETY: plain old data, laid out as `struct ScoreMods` in contract.cuh.
unsafe impl DeviceRepr for ScoreMods {}

/// Dropout parameters (`struct Dropout` in contract.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DropoutArg {
    seed: u64,
    threshold: u32,
    keep_scale: f32,
    enabled: i32,
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

/// Refuses, before the device is touched, the options the GPU kernels do not take yet (a
/// sliding window, softcap, ALiBi, the bias gradient), naming the option.
pub fn require_gpu_modifiers(p: &Problem<'_>) -> Result<()> {
    match p.modifier_beyond_masks() {
        None => Ok(()),
        Some(what) => Err(AttnError::Unsupported {
            stage: "the GPU variant",
            what,
            advice: "run it on the CPU (--device cpu), where every stage takes every score modifier",
        }),
    }
}

/// A validated problem with its tensors in device memory.
#[derive(Debug)]
pub struct DeviceProblem {
    pub shape: Shape,
    pub scale: f32,
    pub causal: bool,
    has_mods: bool,
    pub q: DeviceBuffer<f32>,
    pub k: DeviceBuffer<f32>,
    pub v: DeviceBuffer<f32>,
    _bias: Option<DeviceBuffer<f32>>,
    _mask: Option<DeviceBuffer<u8>>,
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
}

impl ScoreInputs {
    pub fn upload(gpu: &Gpu, p: &Problem<'_>) -> Result<Self> {
        let sh = p.shape;
        let bias = p.bias.map(|b| gpu.upload_array(b)).transpose()?;
        let mask = p.mask.map(|m| gpu.upload_array(m.mapv(u8::from).view())).transpose()?;
        let mods = ScoreMods {
            bias: bias.as_ref().map_or(0, |b| gpu.ptr(b)),
            bias_stride: p.bias.map_or([0; 4], |b| broadcast_strides(b.shape())),
            mask: mask.as_ref().map_or(0, |m| gpu.ptr(m)),
            mask_stride: p.mask.map_or([0; 4], |m| broadcast_strides(m.shape())),
            causal: p.causal.into(),
            n_q: sh.n_q as i32,
            n_k: sh.n_k as i32,
            heads: sh.heads as i32,
        };
        let dropout = p.dropout.map_or(DropoutArg::default(), |d| DropoutArg {
            seed: d.seed,
            threshold: d.threshold,
            keep_scale: d.keep_scale,
            enabled: 1,
            pad_: 0,
        });
        Ok(Self { mods, dropout, bias, mask })
    }
}

impl DeviceProblem {
    /// Uploads Q, K, V, the mask (as bytes) and the bias of a validated problem.
    pub fn upload(gpu: &Gpu, p: &Problem<'_>) -> Result<Self> {
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
        let ScoreInputs { mods, dropout, bias, mask } = ScoreInputs::upload(gpu, p)?;
        Ok(Self {
            shape: sh,
            scale: p.scale,
            causal: p.causal,
            has_mods: p.bias.is_some() || p.mask.is_some(),
            q: gpu.upload_array(p.q)?,
            k: gpu.upload_array(p.k)?,
            v: gpu.upload_array(p.v)?,
            _bias: bias,
            _mask: mask,
            mods,
            dropout,
        })
    }

    /// Query rows `i0 .. i_end` see no key at or after `j0` (a window causal masking hides).
    pub fn window_hidden(&self, i_end: usize, j0: usize) -> bool {
        i_end == 0 || j0 >= self.shape.key_end(self.causal, i_end - 1)
    }

    /// Whether the problem has a bias or a mask (kernels without them are leaner).
    pub fn has_bias_or_mask(&self) -> bool {
        self.has_mods
    }

    /// Whether a window's scores need `modify_scores`: a bias or mask, or causal masking
    /// that reaches into it.
    pub fn window_needs_mods(&self, i0: usize, j0: usize, cols: usize) -> bool {
        self.has_mods || (self.causal && j0 + cols > self.shape.key_end(true, i0))
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
