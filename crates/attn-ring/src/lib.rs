//! # attn-ring — ring attention: one sequence over several ranks
//!
//! Where one device's memory ends, the sequence is sharded: each of R ranks holds a share of
//! the rows of Q, K and V (Liu, Zaharia and Abbeel, "Ring Attention with Blockwise
//! Transformers", 2023). The queries stay where they are; the K/V shares travel round a ring,
//! one hop a step, and each rank folds every share that arrives into its running (O, lse) —
//! the online softmax's merge once more, with whole shares of keys for tiles. After R steps
//! every query has met every key, and no rank ever held more than two shares of K and V.
//!
//! - [`layout`]: the zigzag layout, rank r holding chunks r and 2R − 1 − r, so causal work is
//!   even across ranks; blocks that causal masking or the window hide entirely are skipped.
//! - [`transport`]: the two calls the algorithm needs of its neighbours (send to the next
//!   rank, receive from the previous), and [`transport::Channels`], ranks as threads.
//! - [`cpu`]: forward and backward, ranks as threads, each rank running FlashAttention-2
//!   ([`attn_flash2`]) on its blocks, on the CPU ([`RingCpu`]) or the GPU ([`RingCuda`]). The
//!   backward sends dK, dV behind their chunks, home after the last step.
//!
//! Every block runs with its [`attn_core::Placement`] in the whole problem, so causal masking
//! (bottom-right), the window, ALiBi and dropout are the whole problem's and the ring gives
//! the single-device answer, option for option, to rounding.
//!
//! Unlike the stages 1–4 this crate depends on a stage: it is a composition of stage 4, as
//! DESIGN.md lays it out.

pub mod cpu;
pub mod layout;
pub mod transport;

pub use cpu::{DEFAULT_RANKS, RingStats, backward_with, forward_with};

/// A ring as a [`attn_core::Stage`]: the type, its device, the stage that computes each block,
/// and the static of [`DEFAULT_RANKS`] ranks the stage lists hold.
macro_rules! ring_stage {
    ($(#[$doc:meta])* $name:ident, $stat:ident, $device:ident, $block:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug)]
        pub struct $name {
            pub ranks: usize,
        }

        impl $name {
            pub const fn new(ranks: usize) -> Self {
                Self { ranks }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new(DEFAULT_RANKS)
            }
        }

        #[doc = concat!("The [`", stringify!($name), "`] of [`DEFAULT_RANKS`] ranks, which the stage lists hold.")]
        pub static $stat: $name = $name::new(DEFAULT_RANKS);

        impl attn_core::Stage for $name {
            fn name(&self) -> &'static str {
                cpu::NAME
            }

            fn device(&self) -> attn_core::Device {
                attn_core::Device::$device
            }

            fn forward(
                &self,
                inputs: &attn_core::Inputs<'_>,
                opts: &attn_core::Options,
            ) -> attn_core::Result<attn_core::Forward> {
                cpu::forward_with($block, inputs, opts, self.ranks).map(|(f, _)| f)
            }

            fn backward(
                &self,
                inputs: &attn_core::Inputs<'_>,
                opts: &attn_core::Options,
                fwd: &attn_core::Forward,
                d_out: ndarray::ArrayView4<'_, f32>,
            ) -> attn_core::Result<attn_core::Grads> {
                cpu::backward_with($block, inputs, opts, fwd, d_out, self.ranks).map(|(g, _)| g)
            }
        }
    };
}

ring_stage!(
    /// Ring attention on CPU threads: `ranks` ranks, each running FlashAttention-2 on the CPU
    /// ([`attn_flash2::Flash2Cpu`]) for its blocks.
    RingCpu,
    RING_CPU,
    Cpu,
    &attn_flash2::Flash2Cpu
);

ring_stage!(
    /// Ring attention with each block on the GPU: `ranks` ranks as threads, every one running
    /// FlashAttention-2 on the GPU ([`attn_flash2::Flash2Cuda`], f32) for its blocks with
    /// their placement, the chunks passed between the threads through host memory. With one
    /// device the ranks share it; the schedule, the placements and the folds are those a rank
    /// a GPU runs.
    RingCuda,
    RING_CUDA,
    Cuda,
    &attn_flash2::Flash2Cuda
);
