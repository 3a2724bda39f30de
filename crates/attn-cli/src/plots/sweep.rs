//! The measurements behind the plots: one forward-then-backward run per (stage, n, causal)
//! gives peak memory and time; traffic counts come from the stages' own counters.

use std::time::Instant;

use attn::core::memory::PeakMeter;
use attn::{AttnError, Inputs, Options, Shape, Stage};
use ndarray::{Array2, Axis};

/// One (stage, n, causal) run.
#[derive(Debug, Clone)]
pub struct RunPoint {
    pub stage: &'static str,
    pub n: usize,
    pub causal: bool,
    /// Peak heap above the inputs during the forward, and during forward + backward
    /// (the forward's outputs kept for the backward, as in training).
    pub forward_bytes: u64,
    pub both_bytes: u64,
    /// False where the stage refused to run and the bytes are its guard's prediction.
    pub forward_measured: bool,
    pub backward_measured: bool,
    /// Median seconds (NaN where not measured).
    pub forward_s: f64,
    pub backward_s: f64,
}

/// The bytes naive attention's guard predicts it needs: forward, its workspace (S/P) plus the
/// outputs (O, lse); forward then backward, the larger of that and the backward's peak — the
/// forward's S/P is freed when it returns, and the backward holds the outputs, its workspace
/// (P and dP) and the gradients.
pub fn naive_prediction(shape: &Shape) -> (u64, u64) {
    let q_elems = (shape.batch * shape.heads * shape.n_q * shape.head_dim) as u64;
    let kv_elems = (shape.batch * shape.kv_heads * shape.n_k * shape.head_dim) as u64;
    let lse = (shape.batch * shape.heads * shape.n_q) as u64;
    let outputs = 4 * (q_elems + lse);
    let fwd = attn::naive::forward_workspace_bytes(shape) + outputs;
    let bwd = outputs + attn::naive::backward_workspace_bytes(shape) + 4 * (q_elems + 2 * kv_elems);
    (fwd, fwd.max(bwd))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Runs `stage` forward then backward once with a peak meter, then repeats the timing
/// until about `min_seconds` were spent (at most 5 more runs) and keeps the median.
pub fn run_point(
    stage: &dyn Stage,
    shape: &Shape,
    inputs: &Inputs<'_>,
    d_out: &ndarray::Array4<f32>,
    opts: &Options,
    min_seconds: f64,
) -> Result<RunPoint, AttnError> {
    let mut point = RunPoint {
        stage: stage.name(),
        n: shape.n_q,
        causal: opts.causal,
        forward_bytes: 0,
        both_bytes: 0,
        forward_measured: true,
        backward_measured: true,
        forward_s: f64::NAN,
        backward_s: f64::NAN,
    };
    let (predicted_fwd, predicted_both) = naive_prediction(shape);
    // ANCHOR: measure_one
    let meter = PeakMeter::start();
    let t = Instant::now();
    let fwd = match stage.forward(inputs, opts) {
        Ok(f) => f,
        Err(AttnError::WorkspaceTooLarge { .. }) => {
            point.forward_bytes = predicted_fwd;
            point.both_bytes = predicted_both;
            point.forward_measured = false;
            point.backward_measured = false;
            return Ok(point);
        }
        Err(e) => return Err(e),
    };
    let t_fwd = t.elapsed().as_secs_f64();
    point.forward_bytes = meter.peak();
    let t = Instant::now();
    match stage.backward(inputs, opts, &fwd, d_out.view()) {
        Ok(grads) => drop(grads),
        Err(AttnError::WorkspaceTooLarge { .. }) => {
            point.both_bytes = predicted_both;
            point.backward_measured = false;
            point.forward_s = t_fwd;
            return Ok(point);
        }
        Err(e) => return Err(e),
    }
    let t_bwd = t.elapsed().as_secs_f64();
    point.both_bytes = meter.peak();
    drop(fwd);
    // ANCHOR_END: measure_one

    // More timed runs where one was quick (the first run also pays for first-touch pages).
    let extra = if t_fwd + t_bwd < min_seconds {
        ((min_seconds / (t_fwd + t_bwd).max(1e-6)).ceil() as usize).clamp(1, 5)
    } else {
        0
    };
    let (mut fwd_times, mut bwd_times) = (vec![t_fwd], vec![t_bwd]);
    if extra > 0 {
        (fwd_times, bwd_times) = (Vec::new(), Vec::new());
    }
    for _ in 0..extra {
        let t = Instant::now();
        let fwd = stage.forward(inputs, opts)?;
        fwd_times.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        std::hint::black_box(stage.backward(inputs, opts, &fwd, d_out.view())?);
        bwd_times.push(t.elapsed().as_secs_f64());
    }
    point.forward_s = median(fwd_times);
    point.backward_s = median(bwd_times);
    Ok(point)
}

/// The bytes one stage moved between its full arrays and its tiles.
#[derive(Debug, Clone)]
pub struct TrafficPoint {
    pub stage: &'static str,
    pub n: usize,
    /// SRAM budget M (f32 elements) the blocks were derived from, where it applies.
    pub sram: Option<usize>,
    pub blocks: Option<(usize, usize)>,
    pub forward_bytes: u64,
    pub backward_bytes: u64,
}

pub fn traffic_point(
    stage: &dyn Stage,
    shape: &Shape,
    inputs: &Inputs<'_>,
    d_out: &ndarray::Array4<f32>,
    opts: &Options,
    sram: Option<usize>,
    blocks: Option<(usize, usize)>,
) -> Result<TrafficPoint, AttnError> {
    let fwd = stage.forward(inputs, opts)?;
    let grads = stage.backward(inputs, opts, &fwd, d_out.view())?;
    Ok(TrafficPoint {
        stage: stage.name(),
        n: shape.n_q,
        sram,
        blocks,
        forward_bytes: fwd.traffic.map_or(0, |t| t.total()),
        backward_bytes: grads.traffic.map_or(0, |t| t.total()),
    })
}

/// The machine's fp32 matrix-product peak in GFLOP/s: the best of five `n × n × n` products
/// through the same `gemm` kernels as FlashAttention-2's tiles, rows split over every thread.
pub fn matmul_peak_gflops(n: usize) -> f64 {
    use ndarray::parallel::prelude::*;
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let a: Array2<f32> = attn::core::random::normal((n, n), 11);
    let b: Array2<f32> = attn::core::random::normal((n, n), 12);
    let mut c = Array2::<f32>::zeros((n, n));
    let rows = n.div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..6 {
        let t = Instant::now();
        a.axis_chunks_iter(Axis(0), rows)
            .into_par_iter()
            .zip(c.axis_chunks_iter_mut(Axis(0), rows).into_par_iter())
            .for_each(|(a, mut c)| attn::core::simd::matmul(1.0, &a, &b.view(), 0.0, &mut c));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    2.0 * (n as f64).powi(3) / best / 1e9
}
