//! Typed errors. Every message names the offending argument and what to change.

use thiserror::Error;

/// Everything that can be wrong with an attention call. Stages never panic on bad input and
/// never return a silently wrong answer: they return one of these.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum AttnError {
    /// A tensor does not have the rank the contract asks for.
    #[error("{arg} must be a {expected}-D tensor {layout}, but it has shape {got:?}")]
    Rank { arg: &'static str, expected: usize, layout: &'static str, got: Vec<usize> },

    /// A tensor has a zero-length axis.
    #[error("{arg} has shape {shape:?}: every axis must be at least 1 long")]
    EmptyAxis { arg: &'static str, shape: Vec<usize> },

    /// Two tensors disagree on an axis.
    #[error("{arg} has shape {got:?} but {expected}")]
    ShapeMismatch { arg: &'static str, got: Vec<usize>, expected: String },

    /// Query heads are not a multiple of key/value heads (GQA/MQA needs heads % kv_heads == 0).
    #[error(
        "q has {heads} heads but k/v have {kv_heads}: the query heads must be a multiple of the key/value heads (GQA/MQA)"
    )]
    HeadsNotDivisible { heads: usize, kv_heads: usize },

    /// Q, K or V holds a NaN or an infinity.
    #[error("{arg} holds {value} at index {index:?}: q, k and v must be finite")]
    NonFinite { arg: &'static str, index: Vec<usize>, value: f32 },

    /// The bias holds NaN or +∞ (−∞ is allowed: it acts as a mask).
    #[error(
        "bias holds {value} at index {index:?}: the bias may hold finite values and -inf (a mask), never NaN or +inf"
    )]
    InvalidBias { index: Vec<usize>, value: f32 },

    /// Scores could overflow float32: |scale|·max‖q_i‖·max‖k_j‖ (+ max |bias|) is too large.
    #[error(
        "scores could reach {bound:.3e} (|scale|·max‖q_i‖·max‖k_j‖ + max|bias|), beyond float32's range; scale q or k down"
    )]
    ScoreOverflow { bound: f64 },

    /// The scale is NaN, infinite or zero.
    #[error("scale is {0}: it must be finite and non-zero")]
    InvalidScale(f32),

    /// Dropout probability outside [0, 1).
    #[error("dropout probability is {0}: it must lie in [0, 1)")]
    InvalidDropout(f32),

    /// A sliding-window side below −1.
    #[error(
        "window is ({left}, {right}): each side must be -1 (unbounded) or a number of keys >= 0"
    )]
    InvalidWindow { left: i64, right: i64 },

    /// A softcap that is not a finite positive number.
    #[error("softcap is {0}: it must be finite and > 0")]
    InvalidSoftcap(f32),

    /// The bias gradient was asked for without a bias.
    #[error("the bias gradient (dbias) was asked for, but there is no bias: pass a bias")]
    BiasGradWithoutBias,

    /// A block (chunk, tile) size, or the SRAM budget, of zero.
    #[error("{arg} is 0: block sizes and the SRAM budget must be at least 1")]
    ZeroBlockSize { arg: &'static str },

    /// A head dimension a (GPU) kernel does not support.
    #[error("{stage} does not support head_dim {head_dim}; supported: {supported}")]
    UnsupportedHeadDim { stage: &'static str, head_dim: usize, supported: String },

    /// An option or input a stage does not implement (e.g. dropout in the tensor-core
    /// kernels), with what to do instead.
    #[error("{stage} does not support {what}; {advice}")]
    Unsupported { stage: &'static str, what: &'static str, advice: &'static str },

    /// A device this build has no stage for.
    #[error("device {device} is not available in this build: use the CPU")]
    UnsupportedDevice { device: String },

    /// A CUDA stage was asked for where no CUDA driver or device is present.
    #[error(
        "no CUDA device found ({reason}); run on the CPU (--device cpu) or on a machine with an NVIDIA GPU and its driver"
    )]
    NoCudaDevice { reason: String },

    /// The CUDA driver or NVRTC reported an error.
    #[error("CUDA error while {context}: {message}")]
    Cuda { context: String, message: String },

    /// Sequence lengths that do not describe the tensors: `cu_seqlens_q` / `cu_seqlens_k` of
    /// a packed batch, `cache_seqlens` or `block_table` of a KV cache.
    #[error("{arg} {reason}")]
    InvalidLengths { arg: &'static str, reason: String },

    /// The stage's workspace would not fit in the memory limit. Raised before allocating.
    #[error(
        "{stage} needs {} for its {what} but the memory limit is {}; {advice}",
        crate::memory::human_bytes(*needed_bytes),
        crate::memory::human_bytes(*limit_bytes)
    )]
    WorkspaceTooLarge {
        stage: &'static str,
        what: &'static str,
        needed_bytes: u64,
        limit_bytes: u64,
        advice: &'static str,
    },
}

/// Result type of every fallible call in the workspace.
pub type Result<T, E = AttnError> = std::result::Result<T, E>;
