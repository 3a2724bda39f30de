//! What every stage offers, so the CLI, the facade and the benches can run any of them.

use ndarray::{Array3, Array4, ArrayView4};

use crate::error::Result;
use crate::options::{Inputs, Options};
use crate::traffic::Traffic;

/// Where a stage computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

/// A forward pass's results: what the backward needs besides the inputs.
#[derive(Clone, Debug)]
pub struct Forward {
    /// `[batch, heads, n_q, head_dim]`
    pub out: Array4<f32>,
    /// `[batch, heads, n_q]`: natural-log log-sum-exp of each row's scaled, biased scores;
    /// −∞ for a row whose every key is removed.
    pub lse: Array3<f32>,
    /// The bytes the algorithm moved between its full arrays and its tiles, for stages
    /// that count them ([`Traffic`]).
    pub traffic: Option<Traffic>,
}

/// A backward pass's results.
#[derive(Clone, Debug)]
pub struct Grads {
    /// `[batch, heads, n_q, head_dim]`
    pub dq: Array4<f32>,
    /// `[batch, kv_heads, n_k, head_dim]`
    pub dk: Array4<f32>,
    /// `[batch, kv_heads, n_k, head_dim]`
    pub dv: Array4<f32>,
    /// The bias gradient in the bias's shape, when [`crate::Options::bias_grad`] asked for it.
    pub dbias: Option<Array4<f32>>,
    /// The bytes the algorithm moved, for stages that count them.
    pub traffic: Option<Traffic>,
}

// ANCHOR: stage
/// One attention algorithm on one device: forward and backward under the common contract.
pub trait Stage: Sync {
    /// Short name, as the CLI's `--algo` spells it (`naive`, `chunked`, …).
    fn name(&self) -> &'static str;

    /// Where it runs.
    fn device(&self) -> Device;

    /// Output and log-sum-exp.
    fn forward(&self, inputs: &Inputs<'_>, opts: &Options) -> Result<Forward>;

    /// dQ, dK, dV for the upstream gradient `d_out`, given the forward's results.
    fn backward(
        &self,
        inputs: &Inputs<'_>,
        opts: &Options,
        fwd: &Forward,
        d_out: ArrayView4<'_, f32>,
    ) -> Result<Grads>;

    /// The forward of a packed batch ([`crate::varlen::SeqLens`]): by default
    /// [`crate::varlen::forward_packed`], the stage once per sequence; a stage with a native
    /// packed path overrides it (one parallel pass over every sequence's tiles).
    fn forward_packed(
        &self,
        seqs: &crate::varlen::SeqLens,
        inputs: &Inputs<'_>,
        opts: &Options,
    ) -> Result<Forward> {
        crate::varlen::forward_packed(seqs, inputs, opts, |i, o| self.forward(i, o))
    }

    /// The backward of a packed batch: by default [`crate::varlen::backward_packed`].
    fn backward_packed(
        &self,
        seqs: &crate::varlen::SeqLens,
        inputs: &Inputs<'_>,
        opts: &Options,
        fwd: &Forward,
        d_out: ArrayView4<'_, f32>,
    ) -> Result<Grads> {
        crate::varlen::backward_packed(seqs, inputs, opts, fwd, d_out, |i, o, f, d| {
            self.backward(i, o, f, d)
        })
    }

    /// Decoding from a KV cache ([`crate::varlen::KvCache`]), each row's keys whole or cut
    /// into `splits` parts merged by the log-sum-exp: by default the stage on each batch row
    /// ([`crate::varlen::forward_cached`], [`crate::varlen::forward_cached_split`]); a stage
    /// with a decode path of its own overrides it.
    fn forward_cached(
        &self,
        cache: &crate::varlen::KvCache<'_>,
        inputs: &Inputs<'_>,
        opts: &Options,
        splits: Option<usize>,
    ) -> Result<Forward> {
        let run = |i: &Inputs<'_>, o: &Options| self.forward(i, o);
        match splits {
            None | Some(1) => crate::varlen::forward_cached(cache, inputs, opts, run),
            Some(n) => crate::varlen::forward_cached_split(cache, inputs, opts, n, run),
        }
    }
}
// ANCHOR_END: stage

/// Declares a unit struct that is a CPU [`Stage`] whose module `$module` has `NAME`,
/// `forward(inputs, opts)` and `backward(inputs, opts, fwd, d_out)`.
///
/// ```ignore
/// attn_core::cpu_stage!(
///     /// Naive attention on the CPU, as a [`Stage`].
///     NaiveCpu, cpu
/// );
/// ```
#[macro_export]
macro_rules! cpu_stage {
    ($(#[$meta:meta])* $ty:ident, $module:ident) => {
        $crate::__stage!($(#[$meta])* $ty, Cpu, $module::NAME, $module::forward, $module::backward, [],);
    };
    // a stage whose module also has `packed::{forward, backward}` and
    // `decode::forward_cached`: its native packed and decode paths
    ($(#[$meta:meta])* $ty:ident, $module:ident, native) => {
        $crate::__stage!(
            $(#[$meta])* $ty, Cpu, $module::NAME, $module::forward, $module::backward,
            [
                fn forward_packed(
                    &self,
                    seqs: &$crate::varlen::SeqLens,
                    inputs: &$crate::Inputs<'_>,
                    opts: &$crate::Options,
                ) -> $crate::Result<$crate::Forward> {
                    $module::packed::forward(seqs, inputs, opts)
                }

                fn backward_packed(
                    &self,
                    seqs: &$crate::varlen::SeqLens,
                    inputs: &$crate::Inputs<'_>,
                    opts: &$crate::Options,
                    fwd: &$crate::Forward,
                    d_out: $crate::ndarray::ArrayView4<'_, f32>,
                ) -> $crate::Result<$crate::Grads> {
                    $module::packed::backward(seqs, inputs, opts, fwd, d_out)
                }

                fn forward_cached(
                    &self,
                    cache: &$crate::varlen::KvCache<'_>,
                    inputs: &$crate::Inputs<'_>,
                    opts: &$crate::Options,
                    splits: Option<usize>,
                ) -> $crate::Result<$crate::Forward> {
                    $module::decode::forward_cached(cache, inputs, opts, splits)
                }
            ],
        );
    };
}

/// Declares a unit struct that is a CUDA [`Stage`] whose module `$module` has `NAME`,
/// `forward_with_stats(inputs, opts)` and `backward_with_stats(inputs, opts, fwd, d_out)`
/// returning the results with their device statistics (dropped here).
#[macro_export]
macro_rules! cuda_stage {
    ($(#[$meta:meta])* $ty:ident, $module:ident) => {
        $crate::__stage!(
            $(#[$meta])* $ty,
            Cuda,
            $module::NAME,
            $module::forward_with_stats,
            $module::backward_with_stats,
            [],
            .map(|(results, _stats)| results)
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __stage {
    ($(#[$meta:meta])* $ty:ident, $device:ident, $name:path, $fwd:path, $bwd:path, [$($extra:tt)*], $($unwrap:tt)*) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Default)]
        pub struct $ty;

        impl $crate::Stage for $ty {
            fn name(&self) -> &'static str {
                $name
            }

            fn device(&self) -> $crate::Device {
                $crate::Device::$device
            }

            fn forward(&self, inputs: &$crate::Inputs<'_>, opts: &$crate::Options) -> $crate::Result<$crate::Forward> {
                $fwd(inputs, opts) $($unwrap)*
            }

            fn backward(
                &self,
                inputs: &$crate::Inputs<'_>,
                opts: &$crate::Options,
                fwd: &$crate::Forward,
                d_out: $crate::ndarray::ArrayView4<'_, f32>,
            ) -> $crate::Result<$crate::Grads> {
                $bwd(inputs, opts, fwd, d_out) $($unwrap)*
            }

            $($extra)*
        }
    };
}
