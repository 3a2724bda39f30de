//! What every GPU stage does around its kernels: validate, upload, time with events, count
//! device memory, download.

use attn_core::problem::Problem;
use attn_core::{Forward, Grads, Inputs, Options, Result, Shape};
use ndarray::ArrayView4;

use crate::{DeviceBuffer, DevicePeak, DeviceProblem, DeviceSaved, FlashArgs, Gpu, Kernels, gpu};

/// What a GPU stage reports besides its results: device bytes it allocated above the
/// uploaded inputs, and device milliseconds of its kernels.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeviceStats {
    pub peak_bytes: u64,
    pub kernel_ms: f64,
}

/// Runs `kernels` between CUDA events and a device-memory meter: their result with the device
/// time and the device bytes they allocated above what was live before (the uploaded inputs).
pub fn measured<R>(gpu: &Gpu, kernels: impl FnOnce() -> Result<R>) -> Result<(R, DeviceStats)> {
    let meter = DevicePeak::start(gpu);
    let timer = crate::Timer::start(gpu)?;
    let r = kernels()?;
    let kernel_ms = timer.stop(gpu)?;
    Ok((r, DeviceStats { peak_bytes: meter.peak(gpu), kernel_ms }))
}

/// Device results of a forward: (O `[b, h, n_q, d]`, lse `[b, h, n_q]`).
pub type DeviceForward = (DeviceBuffer<f32>, DeviceBuffer<f32>);

/// What every GPU stage's forward does around its kernels: validate, upload, run `kernels`
/// (timed with events, device bytes measured above the uploaded inputs), download.
pub fn forward_on_device(
    inputs: &Inputs<'_>,
    opts: &Options,
    kernels: impl FnOnce(&'static Gpu, &DeviceProblem) -> Result<DeviceForward>,
) -> Result<(Forward, DeviceStats)> {
    let p = Problem::new(inputs, opts)?;
    let gpu = gpu()?;
    let dev = DeviceProblem::upload(gpu, &p)?;
    let ((out, lse), stats) = measured(gpu, || kernels(gpu, &dev))?;
    let sh = p.shape;
    Ok((
        Forward {
            out: gpu.download_array(&out, sh.q_dims())?,
            lse: gpu.download_array(&lse, sh.lse_dims())?,
            traffic: None,
        },
        stats,
    ))
}

/// What every GPU stage's backward does around its kernels (see [`forward_on_device`]);
/// `kernels` returns dQ, dK, dV, and dBias comes from the buffer they added into
/// ([`DeviceProblem::upload_for_backward`]).
pub fn backward_on_device(
    inputs: &Inputs<'_>,
    opts: &Options,
    fwd: &Forward,
    d_out: ArrayView4<'_, f32>,
    kernels: impl FnOnce(&'static Gpu, &DeviceProblem, &DeviceSaved) -> Result<[DeviceBuffer<f32>; 3]>,
) -> Result<(Grads, DeviceStats)> {
    let p = Problem::for_backward(inputs, opts, fwd, d_out)?;
    let gpu = gpu()?;
    let sh = p.shape;
    let dev = DeviceProblem::upload_for_backward(gpu, &p)?;
    let saved = DeviceSaved {
        out: gpu.upload_array(fwd.out.view())?,
        lse: gpu.upload_array(fwd.lse.view())?,
        d_out: gpu.upload_array(d_out)?,
    };
    let ([dq, dk, dv], stats) = measured(gpu, || kernels(gpu, &dev, &saved))?;
    Ok((
        Grads {
            dq: gpu.download_array(&dq, sh.q_dims())?,
            dk: gpu.download_array(&dk, sh.kv_dims())?,
            dv: gpu.download_array(&dv, sh.kv_dims())?,
            dbias: dev.download_dbias(gpu, &p)?,
            traffic: None,
        },
        stats,
    ))
}

/// What a fused backward (FlashAttention-1 or -2) works on: D = rowsum(dO ∘ O) computed,
/// dQ (zeroed when the kernels add into it), dK and dV per *query* head, and the kernels'
/// arguments pointing at all of them. [`FusedBackward::finish`] sums dK and dV over each GQA
/// group.
#[derive(Debug)]
pub struct FusedBackward {
    pub args: FlashArgs,
    pub dq: DeviceBuffer<f32>,
    pub dk_h: DeviceBuffer<f32>,
    pub dv_h: DeviceBuffer<f32>,
    /// D, one number per query row.
    pub dvec: DeviceBuffer<f32>,
    kernels: Kernels,
}

impl FusedBackward {
    /// Allocates the gradients and computes D; `zero_dq` where the kernels accumulate into dQ
    /// (in place or by atomics) rather than write every element once.
    pub fn new(
        gpu: &'static Gpu,
        dev: &DeviceProblem,
        saved: &DeviceSaved,
        zero_dq: bool,
    ) -> Result<Self> {
        let Shape { batch, heads, n_q, n_k, head_dim: d, .. } = dev.shape;
        let z = batch * heads;
        let kernels = Kernels::new(gpu)?;
        let dvec = gpu.uninit_f32(z * n_q)?;
        kernels.row_dot(&saved.d_out, &saved.out, &dvec, (z * n_q, d))?; // D = rowsum(dO ∘ O)
        let dq =
            if zero_dq { gpu.zeros::<f32>(z * n_q * d)? } else { gpu.uninit_f32(z * n_q * d)? };
        let dk_h = gpu.uninit_f32(z * n_k * d)?;
        let dv_h = gpu.uninit_f32(z * n_k * d)?;
        let args = FlashArgs {
            o: gpu.ptr(&saved.out),
            lse: gpu.ptr(&saved.lse),
            d_out: gpu.ptr(&saved.d_out),
            dvec: gpu.ptr(&dvec),
            dq: gpu.ptr(&dq),
            dk: gpu.ptr(&dk_h),
            dv: gpu.ptr(&dv_h),
            dbias: dev.dbias_ptr(gpu),
            ..FlashArgs::of(gpu, dev)
        };
        Ok(Self { args, dq, dk_h, dv_h, dvec, kernels })
    }

    /// dQ, dK, dV, with dK and dV summed over each group of query heads sharing a key/value
    /// head (a fixed order: reproducible).
    pub fn finish(self, dev: &DeviceProblem) -> Result<[DeviceBuffer<f32>; 3]> {
        let Shape { batch, heads, kv_heads, n_k, head_dim: d, .. } = dev.shape;
        if heads == kv_heads {
            return Ok([self.dq, self.dk_h, self.dv_h]);
        }
        let dims = (batch, heads, kv_heads, n_k, d);
        let (dk, dv) =
            (self.kernels.group_sum(&self.dk_h, dims)?, self.kernels.group_sum(&self.dv_h, dims)?);
        Ok([self.dq, dk, dv])
    }
}
