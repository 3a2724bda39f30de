//! `attn gpu-bench`: the GPU stages' device time and device memory at several n, as a table
//! and a CSV; `--smoke` instead runs every GPU kernel once on a small problem that uses the
//! whole contract (for compute-sanitizer) and checks it against the CPU.

use std::path::PathBuf;

use attn::core::flops::{backward_flops_windowed, forward_flops_windowed};
use attn::core::memory::human_bytes;
use attn::core::metrics::compare;
use attn::cuda::DeviceStats;
use attn::{AttnError, Forward, Grads, Inputs, Mask, Options, Result, Shape, Stage};
use clap::Args;
use ndarray::{Array4, ArrayView4};

use crate::CliError;
use crate::run::DtypeArg;

#[derive(Debug, Args)]
pub struct GpuBenchArgs {
    /// Sequence lengths (n_q = n_k).
    #[arg(long, value_delimiter = ',', default_value = "1024,4096,16384")]
    pub seq: Vec<usize>,
    /// Batch size.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Heads.
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// Head dimension.
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    /// Timed runs per point (the median is kept).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Write the numbers as CSV here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// The FlashAttention-2 paper's setting instead of --seq/--batch/--heads/--head-dim:
    /// batch · n = 16 384, hidden 2 048 (heads = 2 048 / d), d ∈ {64, 128}, n from 512 to 16 384.
    #[arg(long)]
    pub paper: bool,
    /// With --paper: only these n (comma-separated; default: all six).
    #[arg(long, value_delimiter = ',', requires = "paper")]
    pub paper_n: Vec<usize>,
    /// With --paper: only these head dimensions (default: 64 and 128).
    #[arg(long, value_delimiter = ',', requires = "paper")]
    pub paper_d: Vec<usize>,
    /// Only these GPU stages (comma-separated; default: all).
    #[arg(long, value_delimiter = ',')]
    pub stages: Vec<String>,
    /// Run every kernel once on a small problem with masks, bias, causal, dropout and GQA,
    /// compare with the CPU, and exit (for compute-sanitizer; --stages narrows it).
    #[arg(long)]
    pub smoke: bool,
    /// Time the causal case only (the default times both).
    #[arg(long)]
    pub causal_only: bool,
    /// Time with a sliding window LEFT,RIGHT (-1: unbounded side); FLOP/s count the kept
    /// pairs.
    #[arg(long, allow_hyphen_values = true)]
    pub window: Option<String>,
    /// Time with logit soft-capping C.
    #[arg(long)]
    pub softcap: Option<f32>,
    /// Instead: a packed batch against a uniform and a padded one on the tensor cores (bf16,
    /// causal, --heads, --head-dim), forward and backward: 16 documents of 128–4 096 tokens
    /// (32 768) in one launch, the same documents launched one by one, 8 × 4 096, and the 16
    /// padded to 4 096 under a key-padding mask; device times, medians of --repeats.
    #[arg(long)]
    pub packed: bool,
}

type FwdFn = Box<dyn Fn(&Inputs<'_>, &Options) -> Result<(Forward, DeviceStats)> + Sync>;
type BwdFn = Box<
    dyn Fn(&Inputs<'_>, &Options, &Forward, ArrayView4<'_, f32>) -> Result<(Grads, DeviceStats)>
        + Sync,
>;

/// A GPU stage `gpu-bench` times: its name, the element type it computes in, its forward
/// and (where there is one) its backward, each on f32 inputs (the 16-bit stages round them).
struct GpuStage {
    name: String,
    dtype: DtypeArg,
    fwd: FwdFn,
    bwd: Option<BwdFn>,
}

impl GpuStage {
    fn new(name: impl Into<String>, dtype: DtypeArg, fwd: FwdFn, bwd: Option<BwdFn>) -> Self {
        Self { name: name.into(), dtype, fwd, bwd }
    }
}

/// The tensor-core forward `version` on inputs rounded to `dtype`.
fn tc_forward(dtype: DtypeArg, version: u32) -> FwdFn {
    use attn::flash2::tc;
    Box::new(move |i, o| match dtype {
        DtypeArg::F16 => tc::forward_rounded::<tc::f16>(i, o, version),
        DtypeArg::Bf16 => tc::forward_rounded::<tc::bf16>(i, o, version),
        DtypeArg::F32 => unreachable!("the tensor-core stages are bf16 or fp16"),
    })
}

/// The tensor-core backward `version` on inputs, O and dO rounded to `dtype`.
fn tc_backward(dtype: DtypeArg, version: u32) -> BwdFn {
    use attn::flash2::tc;
    Box::new(move |i, o, fwd, d_out| match dtype {
        DtypeArg::F16 => tc::backward_rounded::<tc::f16>(i, o, fwd, d_out, version),
        DtypeArg::Bf16 => tc::backward_rounded::<tc::bf16>(i, o, fwd, d_out, version),
        DtypeArg::F32 => unreachable!("the tensor-core stages are bf16 or fp16"),
    })
}

/// The stages: every GPU stage as it runs by default, FlashAttention-2's backward with dQ in
/// its separate pass, and every kernel version of stage 4's registry
/// (`attn_flash2::gpu::versions`) — the fp32 and tensor-core forward versions without a
/// backward, the fp32 and tensor-core backward versions after the default forward.
fn gpu_stages() -> Vec<GpuStage> {
    use DtypeArg::{Bf16, F16, F32};
    use attn::flash2::gpu::versions::{Track, VERSIONS};
    use attn::{chunked::gpu as c, flash1::gpu as f1, flash2::gpu as f, naive::gpu as n};
    let f32_stage = |name: &str, fwd: FwdFn, bwd: BwdFn| GpuStage::new(name, F32, fwd, Some(bwd));
    let mut stages = vec![
        f32_stage("naive", Box::new(n::forward_with_stats), Box::new(n::backward_with_stats)),
        f32_stage("chunked", Box::new(c::forward_with_stats), Box::new(c::backward_with_stats)),
        f32_stage("flash1", Box::new(f1::forward_with_stats), Box::new(f1::backward_with_stats)),
        f32_stage("flash2", Box::new(f::forward_with_stats), Box::new(f::backward_with_stats)),
        // dQ in the separate (reproducible) pass instead of by atomic additions.
        f32_stage(
            "flash2-dq-pass",
            Box::new(f::forward_with_stats),
            Box::new(|i, o, fwd, d_out| {
                f::backward_with_stats(i, &o.clone().deterministic(true), fwd, d_out)
            }),
        ),
    ];
    let (tc_fwd, tc_bwd) = (f::tc::forward_version(), f::tc::backward_version());
    for dtype in [Bf16, F16] {
        let t = dtype.name();
        stages.push(GpuStage::new(
            format!("flash2-{t}"),
            dtype,
            tc_forward(dtype, tc_fwd),
            Some(tc_backward(dtype, tc_bwd)),
        ));
    }
    for v in VERSIONS {
        let number = v.number;
        match v.track {
            Track::Fp32Forward => stages.push(GpuStage::new(
                format!("flash2-v{number}"),
                F32,
                Box::new(move |i, o| f::forward_version_with_stats(i, o, number)),
                None,
            )),
            Track::Fp32Backward => stages.push(f32_stage(
                &format!("flash2-bwd{number}"),
                Box::new(f::forward_with_stats),
                Box::new(move |i, o, fwd, d_out| {
                    f::backward_version_with_stats(i, o, fwd, d_out, number)
                }),
            )),
            Track::TcForward => {
                for dtype in [Bf16, F16] {
                    let name = format!("flash2-{}-v{number}", dtype.name());
                    stages.push(GpuStage::new(name, dtype, tc_forward(dtype, number), None));
                }
            }
            Track::TcBackward => {
                for dtype in [Bf16, F16] {
                    let name = format!("flash2-{}-bwd{number}", dtype.name());
                    let (fwd, bwd) = (tc_forward(dtype, tc_fwd), tc_backward(dtype, number));
                    stages.push(GpuStage::new(name, dtype, fwd, Some(bwd)));
                }
            }
        }
    }
    stages
}

/// A `gpu-bench` stage as a [`Stage`], so that attn-core's checks run on it.
struct AsStage<'a>(&'a GpuStage);

impl Stage for AsStage<'_> {
    fn name(&self) -> &'static str {
        "gpu-bench stage"
    }

    fn device(&self) -> attn::Device {
        attn::Device::Cuda
    }

    fn forward(&self, inputs: &Inputs<'_>, opts: &Options) -> Result<Forward> {
        (self.0.fwd)(inputs, opts).map(|(f, _)| f)
    }

    fn backward(
        &self,
        inputs: &Inputs<'_>,
        opts: &Options,
        fwd: &Forward,
        d_out: ArrayView4<'_, f32>,
    ) -> Result<Grads> {
        let bwd = self.0.bwd.as_ref().expect("only stages with a backward are checked backward");
        bwd(inputs, opts, fwd, d_out).map(|(g, _)| g)
    }
}

/// The stage checked against the float64 reference before it is timed, at head dimension
/// `d`: the smoke problem (cross attention, GQA, a full mask with a fully masked row, a bias),
/// causal and not, by attn-core's check (the 16-bit stages on their rounded inputs). Returns
/// the worst normwise error as a multiple of DESIGN.md's tolerance for its arithmetic.
fn check_against_reference(stage: &GpuStage, d: usize) -> Result<f64, CliError> {
    use attn::core::testing::{CaseData, check_against_reference};
    use attn::core::tolerance::{F32_BACKWARD, F32_FORWARD, HALF_BACKWARD, HALF_FORWARD};
    let SmokeProblem { shape, q, k, v, mask, bias } = SmokeProblem::new(d);
    let (tol_f, tol_b) = match stage.dtype {
        DtypeArg::F32 => (F32_FORWARD, F32_BACKWARD),
        _ => (HALF_FORWARD, HALF_BACKWARD),
    };
    let round = |a: Array4<f32>| stage.dtype.round(a);
    let mut data = CaseData {
        q: round(q),
        k: round(k),
        v: round(v),
        mask2: None,
        mask4: Some(mask),
        bias: Some(bias),
        alibi: None,
        d_out: round(attn::core::random::normal(shape.q_dims(), 4)),
        opts: Options::default(),
    };
    let mut worst: f64 = 0.0;
    for causal in [false, true] {
        data.opts = Options::default().causal(causal);
        let check = check_against_reference(&AsStage(stage), &data, stage.bwd.is_some());
        worst = worse(worst, check.map_err(fail)?.worst_ratio(tol_f, tol_b));
    }
    Ok(worst)
}

fn fail(e: impl std::fmt::Display) -> CliError {
    CliError { code: 1, message: e.to_string() }
}

pub fn gpu_bench(args: &GpuBenchArgs) -> Result<(), CliError> {
    let gpu = attn::cuda::gpu().map_err(|e| CliError::input("--device", e))?;
    let (free, total) = gpu.mem_info().map_err(fail)?;
    println!(
        "{} ({}), {} free of {}; unfused products on {}",
        gpu.name(),
        gpu.arch(),
        human_bytes(free as u64),
        human_bytes(total as u64),
        gemm_backend(gpu)
    );
    if args.smoke {
        return smoke(&args.stages);
    }
    if args.packed {
        return packed_bench(args);
    }
    measure(args)?; // writes --csv as it goes
    Ok(())
}

/// Times every GPU stage at every n of `args`, printing a table as it goes; returns the CSV
/// (a comment line naming the device, a header, one row per stage, causal flag and n) and
/// writes it to `--csv`, if given, after every row.
pub fn measure(args: &GpuBenchArgs) -> Result<String, CliError> {
    let window = args.window.as_deref().map(crate::run::parse_window).transpose()?;
    let gpu = attn::cuda::gpu().map_err(|e| CliError::input("--device", e))?;
    let mut rows = vec![
        "stage,causal,batch,heads,n,head_dim,forward_ms,forward_tflops,backward_ms,backward_tflops,forward_device_bytes,backward_device_bytes".to_string(),
    ];
    println!(
        "{:<8} {:>6} {:>6} {:<4} {:>10} {:>9} {:>10} {:>9} {:>12} {:>12}",
        "stage",
        "causal",
        "n",
        "d",
        "fwd ms",
        "fwd TF/s",
        "bwd ms",
        "bwd TF/s",
        "fwd device",
        "bwd device"
    );
    let shapes: Vec<Shape> = if args.paper {
        let picked = |list: &[usize], x: usize| list.is_empty() || list.contains(&x);
        [64, 128]
            .into_iter()
            .filter(|&d| picked(&args.paper_d, d))
            .flat_map(|d| {
                [512, 1024, 2048, 4096, 8192, 16_384]
                    .into_iter()
                    .filter(|&n| picked(&args.paper_n, n))
                    .map(move |n| Shape::new(16_384 / n, 2048 / d, n, d))
            })
            .collect()
    } else {
        args.seq.iter().map(|&n| Shape::new(args.batch, args.heads, n, args.head_dim)).collect()
    };
    // Every stage is checked against the float64 reference, at every head dimension it will
    // be timed at, before any timing; one that fails is not timed.
    let mut failed = Vec::new();
    let mut head_dims: Vec<usize> = shapes.iter().map(|s| s.head_dim).collect();
    head_dims.dedup();
    let stages: Vec<GpuStage> =
        gpu_stages().into_iter().filter(|s| selected(&args.stages, &s.name)).collect();
    let mut checked = std::collections::HashSet::new();
    for stage in &stages {
        for &d in &head_dims {
            match check_against_reference(stage, d) {
                Ok(worst) if worst <= 1.0 => {
                    println!("checked {} d={d}: worst error {worst:.2} of its bound", stage.name);
                    checked.insert((stage.name.clone(), d));
                }
                Ok(worst) => {
                    println!(
                        "FAILED {} d={d}: error {worst:.2} times its bound; not timed",
                        stage.name
                    );
                    failed.push(format!("{} d={d}", stage.name));
                }
                Err(e) => println!("{} d={d} refused: {}", stage.name, e.message),
            }
        }
    }
    for shape in shapes {
        let n = shape.n_q;
        let (q, k, v) = attn::core::random::qkv(&shape, n as u64);
        let d_out = attn::core::random::normal(shape.q_dims(), 1);
        let inputs = Inputs::new(q.view(), k.view(), v.view());
        for causal in [false, true] {
            if args.causal_only && !causal {
                continue;
            }
            let opts =
                Options { window, softcap: args.softcap, ..Options::default().causal(causal) };
            for GpuStage { name, fwd: fwd_fn, bwd: bwd_fn, .. } in &stages {
                let bwd_fn = bwd_fn.as_ref();
                if !checked.contains(&(name.clone(), shape.head_dim)) {
                    continue;
                }
                let mut f_ms = Vec::new();
                let mut b_ms = Vec::new();
                let mut peaks = (0, 0);
                let mut refused = None;
                for _ in 0..args.repeats.max(1) + 1 {
                    let (fwd, fs) = match fwd_fn(&inputs, &opts) {
                        Ok(r) => r,
                        Err(e) => {
                            refused = Some(e.to_string());
                            break;
                        }
                    };
                    // A stage without a backward gets NaN there (printed and written as NaN).
                    let bs = match bwd_fn.map(|b| b(&inputs, &opts, &fwd, d_out.view())) {
                        None => DeviceStats { peak_bytes: 0, kernel_ms: f64::NAN },
                        Some(Ok((_, bs))) => bs,
                        Some(Err(e)) => {
                            refused = Some(e.to_string());
                            break;
                        }
                    };
                    f_ms.push(fs.kernel_ms);
                    b_ms.push(bs.kernel_ms);
                    peaks = (fs.peak_bytes, bs.peak_bytes);
                }
                if let Some(why) = refused {
                    println!("{name:<8} {causal:>6} {n:>6} d={} refused: {why}", shape.head_dim);
                    continue;
                }
                // The first run compiles nothing (done before timing) but warms the caches.
                let median = |mut v: Vec<f64>| {
                    v.remove(0);
                    v.sort_by(f64::total_cmp);
                    v[v.len() / 2]
                };
                let (fm, bm) = (median(f_ms), median(b_ms));
                let ft = forward_flops_windowed(&shape, causal, window) / (fm * 1e-3) / 1e12;
                let bt = backward_flops_windowed(&shape, causal, window) / (bm * 1e-3) / 1e12;
                println!(
                    "{name:<8} {causal:>6} {n:>6} d{:<3} {fm:>10.3} {ft:>9.2} {bm:>10.3} {bt:>9.2} {:>12} {:>12}",
                    shape.head_dim,
                    human_bytes(peaks.0),
                    human_bytes(peaks.1)
                );
                rows.push(format!(
                    "{name},{},{},{},{n},{},{fm:.4},{ft:.3},{bm:.4},{bt:.3},{},{}",
                    u8::from(causal),
                    shape.batch,
                    shape.heads,
                    shape.head_dim,
                    peaks.0,
                    peaks.1
                ));
                // Rewritten after every row: a run cut off by a time limit keeps what it measured.
                if let Some(path) = &args.csv {
                    std::fs::write(path, csv_text(gpu, args, &rows)).map_err(fail)?;
                }
            }
        }
    }
    if !failed.is_empty() {
        return Err(fail(format!("failed the check against the reference: {}", failed.join(", "))));
    }
    Ok(csv_text(gpu, args, &rows))
}

/// The CSV of `rows`: a comment line naming the device, then the rows (the header first).
fn csv_text(gpu: &'static attn::cuda::Gpu, args: &GpuBenchArgs, rows: &[String]) -> String {
    let mut csv = format!(
        "# attn gpu-bench on {} ({}); unfused products on {}; device time of the kernels (CUDA events), median of {} runs; device bytes above the uploaded inputs{}{}\n",
        gpu.name(),
        gpu.arch(),
        gemm_backend(gpu),
        args.repeats,
        args.window.as_ref().map_or(String::new(), |w| format!("; window {w}")),
        args.softcap.map_or(String::new(), |c| format!("; softcap {c}")),
    );
    for r in rows {
        csv.push_str(r);
        csv.push('\n');
    }
    csv
}

/// What runs the unfused stages' products: "cublas" or "own" (or why cuBLAS did not open).
fn gemm_backend(gpu: &'static attn::cuda::Gpu) -> String {
    attn::cuda::blas::backend(gpu).map_or_else(|e| format!("(none: {e})"), |b| b.name().to_string())
}

/// Every kernel on a small problem that exercises the whole contract, checked against the
/// CPU's FlashAttention-2 (only `stages` when some are named).
fn smoke(stages: &[String]) -> Result<(), CliError> {
    // The smallest head dimension, the largest of the CUDA-core kernels and 256: their
    // kernels differ in registers and shared memory.
    let mut worst: f64 = 0.0;
    for d in [32, 128, 256] {
        worst = worse(worst, smoke_at(d, stages)?);
    }
    if worst.is_nan() || worst > 1e-3 {
        return Err(fail(format!("smoke run disagrees with the CPU: worst error {worst:.2e}")));
    }
    let mut worst_tc: f64 = 0.0;
    for d in attn::flash2::tc::TC_HEAD_DIMS {
        worst_tc = worse(worst_tc, smoke_tc(d, stages)?);
    }
    if worst_tc.is_nan() || worst_tc > 1.0 {
        return Err(fail(format!(
            "smoke run of the tensor-core stages disagrees with the CPU: worst error {worst_tc:.2} times its bound"
        )));
    }
    Ok(())
}

/// The tensor-core stages once at head dimension `d` (causal, GQA, a full mask with a fully
/// masked row, bias; no dropout), against CPU flash2 on the same rounded inputs: the worst
/// error as a multiple of its bound (1e-2 for O, 2e-2 for the gradients).
fn smoke_tc(d: usize, stages: &[String]) -> Result<f64, CliError> {
    let SmokeProblem { shape, q, k, v, mask, bias } = SmokeProblem::new(d);
    let mut worst: f64 = 0.0;
    for GpuStage { name, dtype, fwd: fwd_fn, bwd: bwd_fn } in gpu_stages() {
        if dtype == DtypeArg::F32 || !selected(stages, &name) {
            continue;
        }
        // Rounded as the stage rounds them (bf16 or fp16), widened for the CPU.
        let round = |a: &Array4<f32>| dtype.round(a.clone());
        let (qr, kr, vr) = (round(&q), round(&k), round(&v));
        let inputs = Inputs::new(qr.view(), kr.view(), vr.view())
            .with_mask(Mask::Full(mask.view()))
            .with_bias(bias.view());
        let opts = Options::default().causal(true);
        let want = attn::flash2::Flash2Cpu.forward(&inputs, &opts).map_err(fail)?;
        let (fwd, _) = fwd_fn(&inputs, &opts).map_err(fail)?;
        let err = compare(fwd.out.view(), want.out.mapv(f64::from).view()).normwise;
        println!("smoke {name} d={d}: out {err:.1e} (vs CPU flash2 on the rounded inputs)");
        worst = worse(worst, err / 1e-2);
        if let Some(bwd_fn) = bwd_fn {
            // dO rounded as the stage rounds it, so that both sides see the same values.
            let d_out = round(&attn::core::random::normal(shape.q_dims(), 4));
            let cpu = attn::flash2::Flash2Cpu.backward(&inputs, &opts, &want, d_out.view());
            let want_g = cpu.map_err(fail)?;
            let (g, _) = bwd_fn(&inputs, &opts, &fwd, d_out.view()).map_err(fail)?;
            let errs = [(&g.dq, &want_g.dq), (&g.dk, &want_g.dk), (&g.dv, &want_g.dv)]
                .map(|(x, r)| compare(x.view(), r.mapv(f64::from).view()).normwise);
            println!(
                "smoke {name} d={d}: dQ {:.1e} dK {:.1e} dV {:.1e} (vs CPU flash2, bound 2e-2)",
                errs[0], errs[1], errs[2]
            );
            worst = errs.iter().fold(worst, |a, &b| worse(a, b / 2e-2));
        }
    }
    Ok(worst)
}

/// The smoke runs' problem at head dimension `d`: cross attention with GQA (4 query heads, 2
/// key/value heads), a full mask with one fully masked row, a per-head bias.
struct SmokeProblem {
    shape: Shape,
    q: Array4<f32>,
    k: Array4<f32>,
    v: Array4<f32>,
    mask: Array4<bool>,
    bias: Array4<f32>,
}

impl SmokeProblem {
    fn new(d: usize) -> Self {
        let shape = Shape::new(2, 4, 70, d).with_n_k(90).with_kv_heads(2);
        let (q, k, v) = attn::core::random::qkv(&shape, 3);
        let mut mask = Array4::from_elem((2, 1, 70, 90), true);
        mask.slice_mut(ndarray::s![1, 0, 5, ..]).fill(false);
        mask[[0, 0, 3, 7]] = false;
        let bias = attn::core::random::normal((1, 4, 70, 90), 5);
        Self { shape, q, k, v, mask, bias }
    }
}

/// Whether `name` is among the stages asked for (all when none are named).
fn selected(stages: &[String], name: &str) -> bool {
    stages.is_empty() || stages.iter().any(|s| s == name)
}

/// The larger error, NaN winning (`f64::max` would drop it).
fn worse(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() { f64::NAN } else { a.max(b) }
}

/// Every GPU stage once at head dimension `d`; the worst normwise error against CPU flash2.
fn smoke_at(d: usize, stages: &[String]) -> Result<f64, CliError> {
    let SmokeProblem { shape, q, k, v, mask, bias } = SmokeProblem::new(d);
    let d_out = attn::core::random::normal(shape.q_dims(), 4);
    let inputs = Inputs::new(q.view(), k.view(), v.view())
        .with_mask(Mask::Full(mask.view()))
        .with_bias(bias.view());
    let opts = Options::default().causal(true).dropout(0.2, 11).blocks(32, 40);
    let cpu = &attn::flash2::Flash2Cpu;
    let want = cpu.forward(&inputs, &opts).map_err(fail)?;
    let want_g = cpu.backward(&inputs, &opts, &want, d_out.view()).map_err(fail)?;
    let mut worst: f64 = 0.0;
    for GpuStage { name, dtype, fwd: fwd_fn, bwd: bwd_fn } in gpu_stages() {
        // The tensor-core stages (no dropout, head dims 64 and 128) have their own smoke run.
        if dtype != DtypeArg::F32 || !selected(stages, &name) {
            continue;
        }
        let (fwd, _) = match fwd_fn(&inputs, &opts) {
            // a step of a ladder built for head dimensions up to 128 only
            Err(AttnError::UnsupportedHeadDim { .. }) if d > 128 => {
                println!("smoke {name} d={d}: not built for this head dimension");
                continue;
            }
            other => other.map_err(fail)?,
        };
        let Some(bwd_fn) = bwd_fn else {
            // a forward-only stage (another forward kernel of a stage)
            let err = compare(fwd.out.view(), want.out.mapv(f64::from).view()).normwise;
            println!("smoke {name} d={d}: out {err:.1e} (vs CPU flash2)");
            worst = worse(worst, err);
            continue;
        };
        let (g, _) = match bwd_fn(&inputs, &opts, &fwd, d_out.view()) {
            // a backward step of the ladder built for head dimensions up to 128 only
            Err(AttnError::UnsupportedHeadDim { .. }) if d > 128 => {
                let err = compare(fwd.out.view(), want.out.mapv(f64::from).view()).normwise;
                println!(
                    "smoke {name} d={d}: out {err:.1e}; backward not built for this head dimension"
                );
                worst = worse(worst, err);
                continue;
            }
            other => other.map_err(fail)?,
        };
        let errs = [
            compare(fwd.out.view(), want.out.mapv(f64::from).view()).normwise,
            compare(g.dq.view(), want_g.dq.mapv(f64::from).view()).normwise,
            compare(g.dk.view(), want_g.dk.mapv(f64::from).view()).normwise,
            compare(g.dv.view(), want_g.dv.mapv(f64::from).view()).normwise,
        ];
        println!(
            "smoke {name} d={d}: out {:.1e} dQ {:.1e} dK {:.1e} dV {:.1e} (vs CPU flash2)",
            errs[0], errs[1], errs[2], errs[3]
        );
        worst = errs.iter().fold(worst, |a, &b| worse(a, b));
    }
    Ok(worst)
}

/// The document lengths of `--packed` (those of `benches/compare/packed_cpu.py`).
const PACKED_LENGTHS: [usize; 16] =
    [4096, 4096, 4096, 3584, 3072, 2560, 2304, 2048, 1792, 1536, 1280, 1024, 512, 384, 256, 128];

/// `gpu-bench --packed`: see [`GpuBenchArgs::packed`].
fn packed_bench(args: &GpuBenchArgs) -> Result<(), CliError> {
    use attn::core::varlen::{self, SeqLens};
    use attn::core::{Mask, random};
    use attn::flash2::tc;
    let (h, d) = (args.heads, args.head_dim);
    let n = 4096;
    let opts = Options::default().causal(true);
    let seqs = SeqLens::from_lengths(&PACKED_LENGTHS, &PACKED_LENGTHS);
    let total: usize = PACKED_LENGTHS.iter().sum();
    let batch = total / n;
    let pairs_packed = seqs.visible_pairs(&opts) as f64;
    let pairs_uniform = (batch * n * (n + 1) / 2) as f64;
    let (pq, pk, pv) = (
        random::normal((1, h, total, d), 1),
        random::normal((1, h, total, d), 2),
        random::normal((1, h, total, d), 3),
    );
    let (uq, uk, uv) = (
        random::normal((batch, h, n, d), 4),
        random::normal((batch, h, n, d), 5),
        random::normal((batch, h, n, d), 6),
    );
    let docs = PACKED_LENGTHS.len();
    let (dq, dk, dv) = (
        random::normal((docs, h, n, d), 7),
        random::normal((docs, h, n, d), 8),
        random::normal((docs, h, n, d), 9),
    );
    let pad = ndarray::Array2::from_shape_fn((docs, n), |(b, j)| j < PACKED_LENGTHS[b]);
    let packed = Inputs::new(pq.view(), pk.view(), pv.view());
    let uniform = Inputs::new(uq.view(), uk.view(), uv.view());
    let padded =
        Inputs::new(dq.view(), dk.view(), dv.view()).with_mask(Mask::KeyPadding(pad.view()));
    let (version, bwd_version) = (tc::forward_version(), tc::backward_version());
    let median = |f: &dyn Fn() -> Result<f64>| -> Result<f64, CliError> {
        f().map_err(fail)?; // warm-up (and the kernels' compilation)
        let mut t: Vec<f64> =
            (0..args.repeats.max(1)).map(|_| f()).collect::<Result<_>>().map_err(fail)?;
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    };
    type Bf16 = tc::bf16;
    let d_out = |shape: (usize, usize, usize, usize)| random::normal(shape, 10);
    let (pdo, udo, ddo) =
        (d_out((1, h, total, d)), d_out((batch, h, n, d)), d_out((docs, h, n, d)));
    // forward and backward, each the median of its device times
    let plain = |i: &Inputs<'_>, d_o: &ndarray::Array4<f32>| -> Result<(f64, f64), CliError> {
        let f = median(&|| tc::forward_rounded::<Bf16>(i, &opts, version).map(|f| f.1.kernel_ms))?;
        let fwd = tc::forward_rounded::<Bf16>(i, &opts, version).map_err(fail)?.0;
        let b = median(&|| {
            tc::backward_rounded::<Bf16>(i, &opts, &fwd, d_o.view(), bwd_version)
                .map(|g| g.1.kernel_ms)
        })?;
        Ok((f, b))
    };
    let one_launch = {
        let f = median(&|| {
            tc::forward_packed_rounded::<Bf16>(&seqs, &packed, &opts).map(|f| f.1.kernel_ms)
        })?;
        let fwd = tc::forward_packed_rounded::<Bf16>(&seqs, &packed, &opts).map_err(fail)?.0;
        let b = median(&|| {
            tc::backward_packed_rounded::<Bf16>(&seqs, &packed, &opts, &fwd, pdo.view())
                .map(|g| g.1.kernel_ms)
        })?;
        (f, b)
    };
    let one_by_one = {
        let f = median(&|| {
            let mut ms = 0.0;
            varlen::forward_packed(&seqs, &packed, &opts, |i, o| {
                let (f, stats) = tc::forward_rounded::<Bf16>(i, o, version)?;
                ms += stats.kernel_ms;
                Ok(f)
            })?;
            Ok(ms)
        })?;
        let fwd = tc::forward_packed_rounded::<Bf16>(&seqs, &packed, &opts).map_err(fail)?.0;
        let b = median(&|| {
            let mut ms = 0.0;
            varlen::backward_packed(&seqs, &packed, &opts, &fwd, pdo.view(), |i, o, f, d_o| {
                let (g, stats) = tc::backward_rounded::<Bf16>(i, o, f, d_o, bwd_version)?;
                ms += stats.kernel_ms;
                Ok(g)
            })?;
            Ok(ms)
        })?;
        (f, b)
    };
    let uni = plain(&uniform, &udo)?;
    let pad_ms = plain(&padded, &ddo)?;
    // FLOPs: 4·h·d a visible pair forward, 2.5 times that backward
    let tflops = |pairs: f64, ms: f64| 4.0 * (h * d) as f64 * pairs / (ms * 1e-3) / 1e12;
    println!(
        "# packed batch: {docs} documents of 128-4096 tokens ({total}), h {h}, d {d}, bf16, causal, flash2 on the tensor cores; device ms, median of {}",
        args.repeats
    );
    println!("layout,forward_ms,forward_tflops,backward_ms,backward_tflops");
    let row = |name: &str, pairs: f64, (f, b): (f64, f64)| {
        println!("{name},{f:.4},{:.1},{b:.4},{:.1}", tflops(pairs, f), 2.5 * tflops(pairs, b));
    };
    row("packed_one_launch", pairs_packed, one_launch);
    row("packed_per_sequence", pairs_packed, one_by_one);
    row(&format!("uniform_{batch}x{n}"), pairs_uniform, uni);
    row(&format!("padded_{docs}x{n}"), pairs_packed, pad_ms);
    let rate = |(f, b): (f64, f64), (uf, ub): (f64, f64)| {
        ((pairs_packed / f) / (pairs_uniform / uf), (pairs_packed / b) / (pairs_uniform / ub))
    };
    let (one, per) = (rate(one_launch, uni), rate(one_by_one, uni));
    println!(
        "# packed over uniform TFLOP/s: forward {:.2}, backward {:.2} (one launch); {:.2}, {:.2} (per sequence); padded over packed time: forward {:.2}, backward {:.2}",
        one.0,
        one.1,
        per.0,
        per.1,
        pad_ms.0 / one_launch.0,
        pad_ms.1 / one_launch.1
    );
    Ok(())
}
