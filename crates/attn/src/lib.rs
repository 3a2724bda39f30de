//! # attn — memory-efficient attention, from the formula to FlashAttention-2
//!
//! The facade over the workspace's stages. Each stage computes the same function (the
//! contract in [`attn_core`]) with a different algorithm:
//!
//! | stage | crate | memory | idea |
//! | --- | --- | --- | --- |
//! | 1 naive | [`attn_naive`] | O(n²) | materialise S = QKᵀ and P = softmax(S) |
//! | 2 chunked | [`attn_chunked`] | O(n) | Rabe & Staats: chunk summaries merged by log-sum-exp |
//! | 3 flash1 | [`attn_flash1`] | O(n) | FlashAttention-1: tiles sized for SRAM, counted HBM traffic |
//! | 4 flash2 | [`attn_flash2`] | O(n) | FlashAttention-2: query blocks outside, parallel, fast |
//! | ring | [`attn_ring`] | O(n / ranks) a rank | ring attention: the sequence over ranks, stage 4 on each block |
//!
//! [`Attention`] is the multi-head module the seed project offers — projections, any stage,
//! output projection, forward and backward, cross attention, GQA, cosine similarity — and
//! [`stages`] lists what this build offers, CPU and GPU;
//! [`stage`] finds one by the name the CLI uses.
//!
//! ```
//! use attn::{Inputs, Options, Shape, Stage};
//!
//! let shape = Shape::new(1, 2, 64, 16);
//! let (q, k, v) = attn::core::random::qkv(&shape, 0);
//! let fwd = attn::stage("naive", attn::Device::Cpu)
//!     .unwrap()
//!     .forward(&Inputs::new(q.view(), k.view(), v.view()), &Options::default().causal(true))
//!     .unwrap();
//! assert_eq!(fwd.out.shape(), &[1, 2, 64, 16]);
//! ```

pub use attn_chunked as chunked;
pub mod module;

pub use attn_core as core;
pub use attn_core::{
    AttnError, Device, Dropout, Forward, Grads, Inputs, Mask, Options, Problem, Result, Shape,
    Stage, Window,
};
pub use attn_cuda as cuda;
pub use attn_flash1 as flash1;
pub use attn_flash2 as flash2;
pub use attn_naive as naive;
pub use attn_ring as ring;
pub use module::{Algorithm, Attention, AttentionConfig, Overrides};

/// The stage to use when nothing says otherwise: FlashAttention-2, the fastest.
pub const DEFAULT_STAGE: &str = "flash2";

/// The default stage ([`DEFAULT_STAGE`]) on the CPU.
pub fn default_stage() -> &'static dyn Stage {
    &attn_flash2::Flash2Cpu
}

/// The CPU stages, in the order of the story.
pub fn cpu_stages() -> Vec<&'static dyn Stage> {
    vec![
        &attn_naive::NaiveCpu,
        &attn_chunked::ChunkedCpu,
        &attn_flash1::Flash1Cpu,
        &attn_flash2::Flash2Cpu,
        &attn_ring::RING_CPU,
    ]
}

/// The GPU (CUDA) stages of this build. They are always compiled; running one where there
/// is no CUDA device returns [`AttnError::NoCudaDevice`].
pub fn gpu_stages() -> Vec<&'static dyn Stage> {
    vec![
        &attn_naive::NaiveCuda,
        &attn_chunked::ChunkedCuda,
        &attn_flash1::Flash1Cuda,
        &attn_flash2::Flash2Cuda,
        &attn_ring::RING_CUDA,
    ]
}

/// Every stage this build offers, CPU first, in the order of the story.
pub fn stages() -> Vec<&'static dyn Stage> {
    let mut all = cpu_stages();
    all.extend(gpu_stages());
    all
}

/// The stages that can run here: the CPU stages, and the GPU stages when a CUDA device is
/// present.
pub fn usable_stages() -> Vec<&'static dyn Stage> {
    if attn_cuda::available() { stages() } else { cpu_stages() }
}

/// The names `--algo` accepts, in the order of the story.
pub fn stage_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::new();
    for s in stages() {
        if !names.contains(&s.name()) {
            names.push(s.name());
        }
    }
    names
}

/// The stage called `name` on `device`, if this build has it.
pub fn stage(name: &str, device: Device) -> Option<&'static dyn Stage> {
    stages().into_iter().find(|s| s.name() == name && s.device() == device)
}
