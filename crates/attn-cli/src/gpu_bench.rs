//! `attn gpu-bench`: the GPU stages' device time and device memory at several n, as a table
//! and a CSV; `--smoke` instead runs every GPU kernel once on a small problem that uses the
//! whole contract (for compute-sanitizer) and checks it against the CPU.

use std::path::PathBuf;

use attn::core::flops::{backward_flops, forward_flops};
use attn::core::memory::human_bytes;
use attn::core::metrics::compare;
use attn::naive::gpu::DeviceStats;
use attn::{Forward, Grads, Inputs, Mask, Options, Result, Shape, Stage};
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
}

type FwdFn = fn(&Inputs<'_>, &Options) -> Result<(Forward, DeviceStats)>;
type BwdFn =
    fn(&Inputs<'_>, &Options, &Forward, ArrayView4<'_, f32>) -> Result<(Grads, DeviceStats)>;

/// A GPU stage `gpu-bench` times: its name, the element type it computes in, its forward
/// and (where there is one) its backward, each on f32 inputs (the 16-bit stages round them).
struct GpuStage {
    name: &'static str,
    dtype: DtypeArg,
    fwd: FwdFn,
    bwd: Option<BwdFn>,
}

/// An f32 stage.
const fn f32_stage(name: &'static str, fwd: FwdFn, bwd: BwdFn) -> GpuStage {
    GpuStage { name, dtype: DtypeArg::F32, fwd, bwd: Some(bwd) }
}

fn gpu_stages() -> Vec<GpuStage> {
    use attn::flash2::tc;
    use attn::{chunked::gpu as c, flash1::gpu as f1, flash2::gpu as f, naive::gpu as n};
    /// The tensor-core forward `V` on inputs rounded to `T`.
    fn tc_v<T: tc::TcFloat, const V: u32>(
        i: &Inputs<'_>,
        o: &Options,
    ) -> Result<(Forward, DeviceStats)> {
        tc::forward_rounded::<T>(i, o, V)
    }
    /// The tensor-core backward `V` on inputs, O and dO rounded to `T`.
    fn tc_b<T: tc::TcFloat, const V: u32>(
        i: &Inputs<'_>,
        o: &Options,
        fwd: &Forward,
        d_out: ArrayView4<'_, f32>,
    ) -> Result<(Grads, DeviceStats)> {
        tc::backward_rounded::<T>(i, o, fwd, d_out, V)
    }
    /// Forward kernel version `V` instead of the default.
    fn flash2_v<const V: u32>(i: &Inputs<'_>, o: &Options) -> Result<(Forward, DeviceStats)> {
        f::forward_version_with_stats(i, o, V)
    }
    /// dQ in the separate (reproducible) pass instead of by atomic additions.
    fn dq_pass(
        i: &Inputs<'_>,
        o: &Options,
        fwd: &Forward,
        d_out: ArrayView4<'_, f32>,
    ) -> Result<(Grads, DeviceStats)> {
        f::backward_with_stats(i, &o.clone().deterministic(true), fwd, d_out)
    }
    use DtypeArg::{Bf16, F16};
    // A tensor-core stage.
    let tc_stage = |name, dtype, fwd, bwd| GpuStage { name, dtype, fwd, bwd };
    let (fwd_bf16, fwd_f16) =
        (tc_v::<tc::bf16, { tc::TC_FORWARD_VERSION }>, tc_v::<tc::f16, { tc::TC_FORWARD_VERSION }>);
    vec![
        f32_stage("naive", n::forward_with_stats, n::backward_with_stats),
        f32_stage("chunked", c::forward_with_stats, c::backward_with_stats),
        f32_stage("flash1", f1::forward_with_stats, f1::backward_with_stats),
        f32_stage("flash2", f::forward_with_stats, f::backward_with_stats),
        // Every forward kernel version, kept for the book's version table (same backward;
        // `flash2` runs version 8 from sm_80 on, 5 or 7 by head dimension before).
        f32_stage("flash2-v1", flash2_v::<1>, f::backward_with_stats),
        f32_stage("flash2-v2", flash2_v::<2>, f::backward_with_stats),
        f32_stage("flash2-v3", flash2_v::<3>, f::backward_with_stats),
        f32_stage("flash2-v4", flash2_v::<4>, f::backward_with_stats),
        f32_stage("flash2-v5", flash2_v::<5>, f::backward_with_stats),
        f32_stage("flash2-v6", flash2_v::<6>, f::backward_with_stats),
        f32_stage("flash2-v7", flash2_v::<7>, f::backward_with_stats),
        // version 8 (3xTF32 on the tensor cores), forward only: the backward is the stage's
        GpuStage { name: "flash2-v8", dtype: DtypeArg::F32, fwd: flash2_v::<8>, bwd: None },
        f32_stage("flash2-dq-pass", f::forward_with_stats, dq_pass),
        // Tensor cores, inputs rounded to bf16 / fp16: the default versions, the numbered
        // backward versions (after the default forward), and the numbered forward versions
        // without a backward.
        tc_stage(
            "flash2-bf16",
            Bf16,
            fwd_bf16,
            Some(tc_b::<tc::bf16, { tc::TC_BACKWARD_VERSION }>),
        ),
        tc_stage("flash2-f16", F16, fwd_f16, Some(tc_b::<tc::f16, { tc::TC_BACKWARD_VERSION }>)),
        tc_stage("flash2-bf16-bwd1", Bf16, fwd_bf16, Some(tc_b::<tc::bf16, 1>)),
        tc_stage("flash2-bf16-bwd2", Bf16, fwd_bf16, Some(tc_b::<tc::bf16, 2>)),
        tc_stage("flash2-bf16-bwd3", Bf16, fwd_bf16, Some(tc_b::<tc::bf16, 3>)),
        tc_stage("flash2-bf16-bwd4", Bf16, fwd_bf16, Some(tc_b::<tc::bf16, 4>)),
        tc_stage("flash2-bf16-bwd5", Bf16, fwd_bf16, Some(tc_b::<tc::bf16, 5>)),
        tc_stage("flash2-bf16-bwd6", Bf16, fwd_bf16, Some(tc_b::<tc::bf16, 6>)),
        tc_stage("flash2-bf16-bwd7", Bf16, fwd_bf16, Some(tc_b::<tc::bf16, 7>)),
        tc_stage("flash2-f16-bwd7", F16, fwd_f16, Some(tc_b::<tc::f16, 7>)),
        tc_stage("flash2-bf16-v1", Bf16, tc_v::<tc::bf16, 1>, None),
        tc_stage("flash2-bf16-v2", Bf16, tc_v::<tc::bf16, 2>, None),
        tc_stage("flash2-bf16-v3", Bf16, tc_v::<tc::bf16, 3>, None),
        tc_stage("flash2-bf16-v4", Bf16, tc_v::<tc::bf16, 4>, None),
        tc_stage("flash2-bf16-v5", Bf16, tc_v::<tc::bf16, 5>, None),
        tc_stage("flash2-bf16-v6", Bf16, tc_v::<tc::bf16, 6>, None),
        tc_stage("flash2-bf16-v7", Bf16, tc_v::<tc::bf16, 7>, None),
        tc_stage("flash2-bf16-v8", Bf16, tc_v::<tc::bf16, 8>, None),
        tc_stage("flash2-bf16-v9", Bf16, tc_v::<tc::bf16, 9>, None),
        tc_stage("flash2-bf16-v10", Bf16, tc_v::<tc::bf16, 10>, None),
        tc_stage("flash2-bf16-v11", Bf16, tc_v::<tc::bf16, 11>, None),
        tc_stage("flash2-bf16-v12", Bf16, tc_v::<tc::bf16, 12>, None),
        tc_stage("flash2-bf16-v13", Bf16, tc_v::<tc::bf16, 13>, None),
        tc_stage("flash2-bf16-v14", Bf16, tc_v::<tc::bf16, 14>, None),
        tc_stage("flash2-bf16-v15", Bf16, tc_v::<tc::bf16, 15>, None),
        tc_stage("flash2-f16-v5", F16, tc_v::<tc::f16, 5>, None),
        tc_stage("flash2-f16-v6", F16, tc_v::<tc::f16, 6>, None),
        tc_stage("flash2-f16-v8", F16, tc_v::<tc::f16, 8>, None),
        tc_stage("flash2-f16-v10", F16, tc_v::<tc::f16, 10>, None),
        tc_stage("flash2-f16-v11", F16, tc_v::<tc::f16, 11>, None),
        tc_stage("flash2-f16-v12", F16, tc_v::<tc::f16, 12>, None),
        tc_stage("flash2-f16-v13", F16, tc_v::<tc::f16, 13>, None),
        tc_stage("flash2-f16-v14", F16, tc_v::<tc::f16, 14>, None),
        tc_stage("flash2-f16-v15", F16, tc_v::<tc::f16, 15>, None),
    ]
}

fn fail(e: impl std::fmt::Display) -> CliError {
    CliError { code: 1, message: e.to_string() }
}

pub fn gpu_bench(args: &GpuBenchArgs) -> Result<(), CliError> {
    let gpu = attn::cuda::gpu().map_err(|e| CliError::input("--device", e))?;
    let (free, total) = gpu.mem_info().map_err(fail)?;
    println!(
        "{} ({}), {} free of {}",
        gpu.name(),
        gpu.arch(),
        human_bytes(free as u64),
        human_bytes(total as u64)
    );
    if args.smoke {
        return smoke(&args.stages);
    }
    measure(args)?; // writes --csv as it goes
    Ok(())
}

/// Times every GPU stage at every n of `args`, printing a table as it goes; returns the CSV
/// (a comment line naming the device, a header, one row per stage, causal flag and n) and
/// writes it to `--csv`, if given, after every row.
pub fn measure(args: &GpuBenchArgs) -> Result<String, CliError> {
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
    for shape in shapes {
        let n = shape.n_q;
        let (q, k, v) = attn::core::random::qkv(&shape, n as u64);
        let d_out = attn::core::random::normal(shape.q_dims(), 1);
        let inputs = Inputs::new(q.view(), k.view(), v.view());
        for causal in [false, true] {
            let opts = Options::default().causal(causal);
            for GpuStage { name, fwd: fwd_fn, bwd: bwd_fn, .. } in gpu_stages() {
                if !selected(&args.stages, name) {
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
                let ft = forward_flops(&shape, causal) / (fm * 1e-3) / 1e12;
                let bt = backward_flops(&shape, causal) / (bm * 1e-3) / 1e12;
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
    Ok(csv_text(gpu, args, &rows))
}

/// The CSV of `rows`: a comment line naming the device, then the rows (the header first).
fn csv_text(gpu: &attn::cuda::Gpu, args: &GpuBenchArgs, rows: &[String]) -> String {
    let mut csv = format!(
        "# attn gpu-bench on {} ({}); device time of the kernels (CUDA events), median of {} runs; device bytes above the uploaded inputs\n",
        gpu.name(),
        gpu.arch(),
        args.repeats
    );
    for r in rows {
        csv.push_str(r);
        csv.push('\n');
    }
    csv
}

/// Every kernel on a small problem that exercises the whole contract, checked against the
/// CPU's FlashAttention-2 (only `stages` when some are named).
fn smoke(stages: &[String]) -> Result<(), CliError> {
    // The smallest and the largest head dimension: their kernels differ in registers and
    // shared memory.
    let mut worst: f64 = 0.0;
    for d in [32, 128] {
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
        if dtype == DtypeArg::F32 || !selected(stages, name) {
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
        if dtype != DtypeArg::F32 || !selected(stages, name) {
            continue;
        }
        let (fwd, _) = fwd_fn(&inputs, &opts).map_err(fail)?;
        let Some(bwd_fn) = bwd_fn else {
            // a forward-only stage (another forward kernel of a stage)
            let err = compare(fwd.out.view(), want.out.mapv(f64::from).view()).normwise;
            println!("smoke {name} d={d}: out {err:.1e} (vs CPU flash2)");
            worst = worse(worst, err);
            continue;
        };
        let (g, _) = bwd_fn(&inputs, &opts, &fwd, d_out.view()).map_err(fail)?;
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
