//! `attn plots`: measure every stage and draw what the book shows — peak memory against n
//! (quadratic against linear), throughput against n beside the machine's matmul peak, and
//! "HBM" traffic against n and against the SRAM budget M beside the papers' formulas.
//!
//! Every figure is an SVG written next to the CSV of its numbers; both carry the machine,
//! the date and the command that made them.

mod draw;
mod gpu;
mod sweep;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use attn::core::flops::{backward_flops, forward_flops};
use attn::core::memory::{human_bytes, log_log_slope};
use attn::{Inputs, Options, Shape, Stage};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::CliError;
use draw::{Panel, Series, YAxis, stage_color};
use plotters::prelude::SeriesLabelPosition;
use plotters::style::RGBColor;
use sweep::{RunPoint, TrafficPoint};

#[derive(Debug, Args)]
pub struct PlotsArgs {
    /// Folder the SVGs and CSVs are written to (created if missing).
    #[arg(long, default_value = "book/src/plots")]
    pub out: PathBuf,
    /// Small sizes (n ≤ 4 096), for tests: the same files in seconds.
    #[arg(long)]
    pub quick: bool,
    /// Largest n of the memory sweep (a power of two; default 65 536, or 4 096 with --quick).
    #[arg(long)]
    pub max_seq: Option<usize>,
    /// Workspace limit of naive attention, e.g. 8G (default: the machine's available memory).
    /// Beyond it naive's guard refuses and its predicted need is drawn dashed.
    #[arg(long, value_parser = parse_limit)]
    pub memory_limit: Option<u64>,
    /// Which figures: the CPU sweeps, the GPU figures, or both.
    #[arg(long, value_enum, default_value = "all")]
    pub only: Only,
    /// Draw the GPU figures from this `attn gpu-bench --csv` file (made on the GPU machine)
    /// instead of measuring; without it they are measured when a CUDA device is present.
    #[arg(long)]
    pub gpu_csv: Option<PathBuf>,
    /// PyTorch's results on the same device and shapes (benches/compare/sdpa_gpu.py --csv),
    /// drawn beside the GPU stages.
    #[arg(long)]
    pub sdpa_csv: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    All,
    Cpu,
    Gpu,
}

fn parse_limit(s: &str) -> Result<u64, String> {
    attn::core::memory::parse_bytes(s).ok_or_else(|| format!("'{s}' is not a size like 8G"))
}

/// What is swept.
#[derive(Debug)]
struct Plan {
    heads: usize,
    head_dim: usize,
    /// n of the memory sweep (causal; its timings are the causal throughput).
    memory_lengths: Vec<usize>,
    /// n at which full (non-causal) attention is also timed.
    full_max: usize,
    /// n of the traffic sweep (one head, not causal).
    traffic_lengths: Vec<usize>,
    /// n and M values of the traffic-against-M sweep.
    sram_n: usize,
    srams: Vec<usize>,
    /// Seconds of timing per point below which runs are repeated.
    min_seconds: f64,
    matmul_n: usize,
}

fn powers_of_two(from: usize, to: usize) -> Vec<usize> {
    std::iter::successors(Some(from), |n| Some(n * 2)).take_while(|&n| n <= to).collect()
}

impl Plan {
    fn new(args: &PlotsArgs) -> Self {
        if args.quick {
            let max = args.max_seq.unwrap_or(4096);
            Self {
                heads: 8,
                head_dim: 64,
                memory_lengths: powers_of_two(512, max),
                full_max: 1024,
                traffic_lengths: powers_of_two(256, 1024),
                sram_n: 512,
                srams: powers_of_two(4 << 10, 64 << 10),
                min_seconds: 0.05,
                matmul_n: 512,
            }
        } else {
            Self {
                heads: 8,
                head_dim: 64,
                memory_lengths: powers_of_two(256, args.max_seq.unwrap_or(65_536)),
                full_max: 16_384,
                traffic_lengths: powers_of_two(256, 8192),
                sram_n: 4096,
                srams: powers_of_two(4 << 10, 256 << 10),
                min_seconds: 1.0,
                matmul_n: 1536,
            }
        }
    }
}

/// Machine, date and command, for CSV headers and figure footers.
#[derive(Debug)]
struct Stamp {
    machine: String,
    date: String,
    command: String,
}

impl Stamp {
    fn now() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let args: Vec<String> = std::env::args().skip(1).collect();
        Self {
            machine: format!("{} ({threads} threads)", crate::table::cpu_model()),
            date: today(),
            command: format!("attn {}", args.join(" ")),
        }
    }

    fn footer(&self) -> String {
        format!("{} · {} · {}", self.machine, self.date, self.command)
    }

    fn csv_header(&self, what: &str) -> String {
        format!(
            "# {what}\n# machine: {}\n# date: {}\n# command: {}\n",
            self.machine, self.date, self.command
        )
    }
}

/// Today's UTC date as YYYY-MM-DD (civil-from-days, proleptic Gregorian calendar).
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn write_file(path: &Path, text: &str) -> Result<(), CliError> {
    std::fs::write(path, text)
        .map_err(|e| CliError { code: 1, message: format!("cannot write {}: {e}", path.display()) })
}

fn draw_file(path: &Path, panels: &[Panel], cols: usize, stamp: &Stamp) -> Result<(), CliError> {
    draw_file_with_footer(path, panels, cols, &stamp.footer())
}

fn draw_file_with_footer(
    path: &Path,
    panels: &[Panel],
    cols: usize,
    footer: &str,
) -> Result<(), CliError> {
    draw::draw(path, panels, cols, footer)
        .map_err(|e| CliError { code: 1, message: format!("cannot draw {}: {e}", path.display()) })
}

pub fn plots(args: &PlotsArgs) -> Result<(), CliError> {
    if !attn::core::memory::counting_enabled() {
        return Err(CliError {
            code: 1,
            message: "the counting allocator is not installed".into(),
        });
    }
    if let Some(n) = args.max_seq
        && (!n.is_power_of_two() || n < 512)
    {
        return Err(CliError::input("--max-seq", format!("{n} must be a power of two ≥ 512")));
    }
    std::fs::create_dir_all(&args.out).map_err(|e| {
        CliError::input("--out", format!("cannot create {}: {e}", args.out.display()))
    })?;
    let plan = Plan::new(args);
    let stamp = Stamp::now();
    if args.only != Only::Gpu {
        cpu_plots(args, &plan, &stamp)?;
    }
    if args.only != Only::Cpu {
        gpu_plots(args, &stamp)?;
    }
    Ok(())
}

/// The GPU figures, from `--gpu-csv` or measured on the device here.
fn gpu_plots(args: &PlotsArgs, stamp: &Stamp) -> Result<(), CliError> {
    let read = |path: &PathBuf, flag: &str| {
        std::fs::read_to_string(path)
            .map_err(|e| CliError::input(flag, format!("cannot read {}: {e}", path.display())))
    };
    let ours = match &args.gpu_csv {
        Some(path) => read(path, "--gpu-csv")?,
        None if attn::cuda::available() => {
            let lengths =
                if args.quick { vec![256, 512, 1024] } else { powers_of_two(512, 16_384) };
            crate::gpu_bench::measure(&crate::gpu_bench::GpuBenchArgs {
                seq: lengths,
                batch: 1,
                heads: 8,
                head_dim: 64,
                repeats: if args.quick { 2 } else { 5 },
                csv: None,
                smoke: false,
                paper: false,
                paper_n: Vec::new(),
                paper_d: Vec::new(),
                stages: Vec::new(),
            })?
        }
        None => {
            println!(
                "GPU plots: skipped — no CUDA device found here and no --gpu-csv given (run \
                 `attn gpu-bench --csv FILE` on a GPU machine and pass it)."
            );
            return Ok(());
        }
    };
    let (device, rows) = gpu::parse(&ours, "--gpu-csv")?;
    let (sdpa, sdpa_text) = match &args.sdpa_csv {
        Some(path) => {
            let text = read(path, "--sdpa-csv")?;
            (gpu::parse(&text, "--sdpa-csv")?.1, Some(text))
        }
        None => (Vec::new(), None),
    };
    let out = &args.out;
    write_file(&out.join("gpu.csv"), &ours)?;
    if let Some(text) = sdpa_text {
        write_file(&out.join("sdpa-gpu.csv"), &text)?;
    }
    let device = device.split(';').next().unwrap_or("").trim_start_matches("attn gpu-bench on ");
    let footer = format!("{device} · {} · {}", stamp.date, stamp.command);
    gpu::draw(out, &rows, &sdpa, &footer)?;
    println!("wrote {}/{{gpu-memory.svg,gpu-throughput.svg,gpu.csv}} ({device})", out.display());
    Ok(())
}

/// The CPU sweeps and their figures.
fn cpu_plots(args: &PlotsArgs, plan: &Plan, stamp: &Stamp) -> Result<(), CliError> {
    let cpu: Vec<&dyn Stage> = attn::cpu_stages();

    let jobs = plan.memory_lengths.len() * cpu.len()
        + plan.memory_lengths.iter().filter(|&&n| n <= plan.full_max).count() * cpu.len()
        + plan.traffic_lengths.len() * cpu.len()
        + plan.srams.len() * 2
        + 2;
    let bar = ProgressBar::new(jobs as u64).with_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );

    bar.set_message("fp32 matmul peak");
    let peak = sweep::matmul_peak_gflops(plan.matmul_n);
    bar.inc(1);

    // Memory and throughput: causal at every n, full attention up to `full_max`.
    let mut runs: Vec<RunPoint> = Vec::new();
    for &n in &plan.memory_lengths {
        let shape = Shape::new(1, plan.heads, n, plan.head_dim);
        let (q, k, v) = attn::core::random::qkv(&shape, n as u64);
        let d_out = attn::core::random::normal(shape.q_dims(), 1);
        let inputs = Inputs::new(q.view(), k.view(), v.view());
        for causal in [true, false] {
            if !causal && n > plan.full_max {
                continue;
            }
            let mut opts = Options::default().causal(causal);
            opts.memory_limit = args.memory_limit;
            for stage in &cpu {
                let what = if causal { "causal" } else { "full" };
                bar.set_message(format!("{} {what} n={n}", stage.name()));
                let point =
                    sweep::run_point(*stage, &shape, &inputs, &d_out, &opts, plan.min_seconds)
                        .map_err(|e| CliError {
                            code: 1,
                            message: format!("{}: {e}", stage.name()),
                        })?;
                runs.push(point);
                bar.inc(1);
            }
        }
    }

    // Traffic against n (one head, not causal, default blocks).
    let mut traffic: Vec<TrafficPoint> = Vec::new();
    for &n in &plan.traffic_lengths {
        let shape = Shape::new(1, 1, n, plan.head_dim);
        let (q, k, v) = attn::core::random::qkv(&shape, 3);
        let d_out = attn::core::random::normal(shape.q_dims(), 4);
        let inputs = Inputs::new(q.view(), k.view(), v.view());
        for stage in &cpu {
            bar.set_message(format!("{} traffic n={n}", stage.name()));
            let p = sweep::traffic_point(
                *stage,
                &shape,
                &inputs,
                &d_out,
                &Options::default(),
                None,
                None,
            )
            .map_err(|e| CliError { code: 1, message: format!("{}: {e}", stage.name()) })?;
            traffic.push(p);
            bar.inc(1);
        }
    }

    // Traffic against M: FlashAttention-1's blocks B_c = ⌈M/4d⌉, B_r = min(B_c, d) for both
    // flash stages (flash2 takes them as explicit blocks), and naive once for reference.
    let shape = Shape::new(1, 1, plan.sram_n, plan.head_dim);
    let (q, k, v) = attn::core::random::qkv(&shape, 5);
    let d_out = attn::core::random::normal(shape.q_dims(), 6);
    let inputs = Inputs::new(q.view(), k.view(), v.view());
    let mut by_sram: Vec<TrafficPoint> = Vec::new();
    for &m in &plan.srams {
        let blocks = attn::flash1::block_sizes(&shape, &Options::default().sram(m));
        let f1 = Options::default().sram(m);
        let f2 = Options::default().blocks(blocks.0, blocks.1);
        for (stage, opts) in
            [(&attn::flash1::Flash1Cpu as &dyn Stage, f1), (&attn::flash2::Flash2Cpu, f2)]
        {
            bar.set_message(format!("{} traffic M={m}", stage.name()));
            let p =
                sweep::traffic_point(stage, &shape, &inputs, &d_out, &opts, Some(m), Some(blocks))
                    .map_err(|e| CliError { code: 1, message: format!("{}: {e}", stage.name()) })?;
            by_sram.push(p);
            bar.inc(1);
        }
    }
    let naive_at_sram_n = sweep::traffic_point(
        &attn::naive::NaiveCpu,
        &shape,
        &inputs,
        &d_out,
        &Options::default(),
        None,
        None,
    )
    .map_err(|e| CliError { code: 1, message: format!("naive: {e}") })?;
    bar.inc(1);
    bar.finish_and_clear();

    let out = &args.out;
    write_memory(out, plan, &runs, stamp)?;
    write_throughput(out, plan, &runs, peak, stamp)?;
    write_traffic_vs_n(out, plan, &traffic, stamp)?;
    write_traffic_vs_sram(out, plan, &by_sram, &naive_at_sram_n, stamp)?;

    println!("wrote {}/{{{}}}", out.display(), FILES.join(","));
    println!("fp32 matmul peak {peak:.1} GFLOP/s on {}", stamp.machine);
    for (stage, slope) in memory_slopes(&runs) {
        println!(
            "memory slope (log-log, largest measured n) {stage}: forward {:.2}, forward+backward {:.2}",
            slope.0, slope.1
        );
    }
    Ok(())
}

/// Every file `attn plots` writes.
pub const FILES: [&str; 8] = [
    "memory.svg",
    "memory.csv",
    "throughput.svg",
    "throughput.csv",
    "traffic-vs-n.svg",
    "traffic-vs-n.csv",
    "traffic-vs-sram.svg",
    "traffic-vs-sram.csv",
];

/// Per stage: the memory slopes (forward, forward + backward) fitted on the three largest
/// measured n of the causal sweep.
fn memory_slopes(runs: &[RunPoint]) -> Vec<(&'static str, (f64, f64))> {
    stage_names(runs.iter().map(|r| r.stage))
        .into_iter()
        .map(|name| {
            let measured = |both: bool| {
                let pts: Vec<(f64, f64)> = runs
                    .iter()
                    .filter(|r| r.stage == name && r.causal)
                    .filter(|r| if both { r.backward_measured } else { r.forward_measured })
                    .map(|r| {
                        (r.n as f64, (if both { r.both_bytes } else { r.forward_bytes }) as f64)
                    })
                    .collect();
                log_log_slope(&pts[pts.len().saturating_sub(3)..])
            };
            (name, (measured(false), measured(true)))
        })
        .collect()
}

fn stage_names(runs: impl Iterator<Item = &'static str>) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::new();
    for n in runs {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names
}

fn write_memory(out: &Path, plan: &Plan, runs: &[RunPoint], stamp: &Stamp) -> Result<(), CliError> {
    let mut csv = stamp.csv_header(&format!(
        "peak heap above the inputs (bytes), b=1 h={} d={}, causal; measured=0: naive's guard refused and the bytes are its prediction",
        plan.heads, plan.head_dim
    ));
    csv.push_str(
        "stage,n,forward_bytes,forward_backward_bytes,forward_measured,backward_measured\n",
    );
    for r in runs.iter().filter(|r| r.causal) {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{}",
            r.stage,
            r.n,
            r.forward_bytes,
            r.both_bytes,
            u8::from(r.forward_measured),
            u8::from(r.backward_measured)
        );
    }
    write_file(&out.join("memory.csv"), &csv)?;

    let panel = |both: bool| {
        let mut series = Vec::new();
        for name in stage_names(runs.iter().map(|r| r.stage)) {
            let rows: Vec<&RunPoint> =
                runs.iter().filter(|r| r.stage == name && r.causal).collect();
            let measured =
                |r: &RunPoint| if both { r.backward_measured } else { r.forward_measured };
            let bytes = |r: &RunPoint| (if both { r.both_bytes } else { r.forward_bytes }) as f64;
            let solid: Vec<(f64, f64)> =
                rows.iter().filter(|r| measured(r)).map(|r| (r.n as f64, bytes(r))).collect();
            series.push(Series::solid(name, stage_color(name), solid.clone()));
            // The guard's prediction, joined to the last measured point.
            let predicted: Vec<(f64, f64)> = solid
                .last()
                .into_iter()
                .copied()
                .chain(rows.iter().filter(|r| !measured(r)).map(|r| (r.n as f64, bytes(r))))
                .collect();
            if predicted.len() > 1 {
                series.push(Series::dashed(
                    format!("{name}: need predicted by its guard (refused)"),
                    stage_color(name),
                    predicted,
                ));
            }
        }
        Panel {
            title: if both { "forward + backward".into() } else { "forward".into() },
            x_desc: "sequence length n".into(),
            y_desc: "peak heap above the inputs".into(),
            y_axis: YAxis::LogBytes,
            series,
            legend: SeriesLabelPosition::UpperLeft,
        }
    };
    draw_file(&out.join("memory.svg"), &[panel(false), panel(true)], 2, stamp)
}

fn write_throughput(
    out: &Path,
    plan: &Plan,
    runs: &[RunPoint],
    peak: f64,
    stamp: &Stamp,
) -> Result<(), CliError> {
    let shape = |n| Shape::new(1, plan.heads, n, plan.head_dim);
    let gflops = |r: &RunPoint, backward: bool| {
        let (flops, s) = if backward {
            (backward_flops(&shape(r.n), r.causal), r.backward_s)
        } else {
            (forward_flops(&shape(r.n), r.causal), r.forward_s)
        };
        flops / s / 1e9
    };
    let mut csv = stamp.csv_header(&format!(
        "median time and GFLOP/s (FLOPs as in the FlashAttention-2 paper), b=1 h={} d={}; fp32 matmul peak {peak:.1} GFLOP/s ({n}x{n}x{n} gemm, every thread)",
        plan.heads,
        plan.head_dim,
        n = plan.matmul_n
    ));
    csv.push_str(
        "stage,causal,n,forward_s,forward_gflops,backward_s,backward_gflops,matmul_peak_gflops\n",
    );
    for r in runs.iter().filter(|r| r.forward_measured && r.backward_measured) {
        let _ = writeln!(
            csv,
            "{},{},{},{:.6},{:.2},{:.6},{:.2},{peak:.2}",
            r.stage,
            u8::from(r.causal),
            r.n,
            r.forward_s,
            gflops(r, false),
            r.backward_s,
            gflops(r, true)
        );
    }
    write_file(&out.join("throughput.csv"), &csv)?;

    let panel = |backward: bool, causal: bool| {
        let mut series = Vec::new();
        let mut x_max = 0.0f64;
        for name in stage_names(runs.iter().map(|r| r.stage)) {
            let pts: Vec<(f64, f64)> = runs
                .iter()
                .filter(|r| r.stage == name && r.causal == causal)
                .filter(|r| r.forward_measured && r.backward_measured)
                .map(|r| (r.n as f64, gflops(r, backward)))
                .collect();
            x_max = pts.iter().fold(x_max, |m, p| m.max(p.0));
            series.push(Series::solid(name, stage_color(name), pts));
        }
        let x_min = plan.memory_lengths[0] as f64;
        series.push(Series::dashed(
            format!("fp32 matmul peak {peak:.0} GFLOP/s"),
            plotters::style::RGBColor(0, 0, 0),
            vec![(x_min, peak), (x_max, peak)],
        ));
        Panel {
            title: pass_title(backward, causal),
            x_desc: "sequence length n".into(),
            y_desc: "GFLOP/s".into(),
            y_axis: YAxis::Linear,
            series,
            legend: SeriesLabelPosition::LowerRight,
        }
    };
    draw_file(
        &out.join("throughput.svg"),
        &[panel(false, false), panel(false, true), panel(true, false), panel(true, true)],
        2,
        stamp,
    )
}

/// One line per stage of the bytes moved (forward or backward) against `x` of each point.
fn traffic_series(
    points: &[TrafficPoint],
    backward: bool,
    x: impl Fn(&TrafficPoint) -> f64,
) -> Vec<Series> {
    stage_names(points.iter().map(|p| p.stage))
        .into_iter()
        .map(|name| {
            let pts = points
                .iter()
                .filter(|p| p.stage == name)
                .map(|p| (x(p), (if backward { p.backward_bytes } else { p.forward_bytes }) as f64))
                .collect();
            Series::solid(name, stage_color(name), pts)
        })
        .collect()
}

/// "forward — full attention", "backward — causal", …
fn pass_title(backward: bool, causal: bool) -> String {
    format!(
        "{} — {}",
        if backward { "backward" } else { "forward" },
        if causal { "causal" } else { "full attention" }
    )
}

/// The papers' IO complexities (Dao et al. 2022, Theorem 2), drawn with constant 1 in f32
/// elements: standard attention Θ(Nd + N²), FlashAttention Θ(N²d²/M).
fn standard_model(n: f64, d: f64) -> f64 {
    4.0 * (n * d + n * n)
}

fn flash_model(n: f64, d: f64, m: f64) -> f64 {
    4.0 * n * n * d * d / m
}

/// A Θ(·) formula has no constant: the plots scale it to pass through one measured point
/// (`anchor`, at the same x), so that its slope can be compared with the measurements.
fn fitted(model: Vec<(f64, f64)>, anchor: Option<(f64, f64)>) -> Vec<(f64, f64)> {
    let Some((ax, ay)) = anchor else { return model };
    let Some(&(_, my)) = model.iter().find(|(x, _)| *x == ax) else { return model };
    model.into_iter().map(|(x, y)| (x, y * ay / my)).collect()
}

fn write_traffic_vs_n(
    out: &Path,
    plan: &Plan,
    points: &[TrafficPoint],
    stamp: &Stamp,
) -> Result<(), CliError> {
    let d = plan.head_dim as f64;
    let m = attn::flash1::DEFAULT_SRAM as f64;
    let mut csv = stamp.csv_header(&format!(
        "bytes moved between full arrays and tiles, b=1 h=1 d={}, not causal, default blocks; models with constant 1 in f32 elements (Dao et al. 2022, Thm 2) at M={}",
        plan.head_dim,
        attn::flash1::DEFAULT_SRAM
    ));
    csv.push_str("stage,n,forward_bytes,backward_bytes,standard_model_bytes,flash_model_bytes\n");
    for p in points {
        let n = p.n as f64;
        let _ = writeln!(
            csv,
            "{},{},{},{},{:.0},{:.0}",
            p.stage,
            p.n,
            p.forward_bytes,
            p.backward_bytes,
            standard_model(n, d),
            flash_model(n, d, m)
        );
    }
    write_file(&out.join("traffic-vs-n.csv"), &csv)?;

    let panel = |backward: bool| {
        let mut series = traffic_series(points, backward, |p| p.n as f64);
        let ns: Vec<f64> = plan.traffic_lengths.iter().map(|&n| n as f64).collect();
        let n_max = ns[ns.len() - 1];
        let measured_at = |stage: &str| {
            series
                .iter()
                .find(|s: &&Series| s.label == stage)
                .and_then(|s| s.points.last().copied())
        };
        let (naive_end, flash1_end) = (measured_at("naive"), measured_at("flash1"));
        series.push(Series::dashed(
            format!("Θ(Nd + N²), standard attention (fitted at N = {n_max})"),
            stage_color("naive"),
            fitted(ns.iter().map(|&n| (n, standard_model(n, d))).collect(), naive_end),
        ));
        series.push(Series::dashed(
            format!(
                "Θ(N²d²/M), FlashAttention, M = {}Ki (fitted at N = {n_max})",
                attn::flash1::DEFAULT_SRAM >> 10
            ),
            stage_color("flash1"),
            fitted(ns.iter().map(|&n| (n, flash_model(n, d, m))).collect(), flash1_end),
        ));
        Panel {
            title: format!(
                "{} HBM traffic (d = {}, one head)",
                if backward { "backward" } else { "forward" },
                plan.head_dim
            ),
            x_desc: "sequence length N".into(),
            y_desc: "bytes moved".into(),
            y_axis: YAxis::LogBytes,
            series,
            legend: SeriesLabelPosition::UpperLeft,
        }
    };
    draw_file(&out.join("traffic-vs-n.svg"), &[panel(false), panel(true)], 2, stamp)
}

fn write_traffic_vs_sram(
    out: &Path,
    plan: &Plan,
    points: &[TrafficPoint],
    naive: &TrafficPoint,
    stamp: &Stamp,
) -> Result<(), CliError> {
    let (n, d) = (plan.sram_n as f64, plan.head_dim as f64);
    let shape = Shape::new(1, 1, plan.sram_n, plan.head_dim);
    let mut csv = stamp.csv_header(&format!(
        "bytes moved against the SRAM budget M (f32 elements), b=1 h=1 N={} d={}, not causal; blocks B_c=ceil(M/4d), B_r=min(B_c,d) for both stages; naive moves {} B forward, {} B backward whatever M",
        plan.sram_n, plan.head_dim, naive.forward_bytes, naive.backward_bytes
    ));
    csv.push_str("stage,sram,block_rows,block_cols,forward_bytes,backward_bytes,flash1_exact_model_bytes,flash_model_bytes\n");
    for p in points {
        let m = p.sram.unwrap_or(0);
        let (b_r, b_c) = p.blocks.unwrap_or((0, 0));
        let _ = writeln!(
            csv,
            "{},{m},{b_r},{b_c},{},{},{},{:.0}",
            p.stage,
            p.forward_bytes,
            p.backward_bytes,
            attn::flash1::forward_traffic_model(&shape, (b_r, b_c)),
            flash_model(n, d, m as f64)
        );
    }
    write_file(&out.join("traffic-vs-sram.csv"), &csv)?;

    let ms: Vec<f64> = plan.srams.iter().map(|&m| m as f64).collect();
    let panel = |backward: bool| {
        let mut series = traffic_series(points, backward, |p| p.sram.unwrap_or(0) as f64);
        let naive_bytes =
            (if backward { naive.backward_bytes } else { naive.forward_bytes }) as f64;
        series.push(Series::dashed(
            format!("naive: {} whatever M", human_bytes(naive_bytes as u64)),
            stage_color("naive"),
            vec![(ms[0], naive_bytes), (ms[ms.len() - 1], naive_bytes)],
        ));
        if !backward {
            series.push(Series::dashed(
                "flash1: exact count of Algorithm 1",
                RGBColor(0, 0, 0),
                plan.srams
                    .iter()
                    .map(|&m| {
                        let b = attn::flash1::block_sizes(&shape, &Options::default().sram(m));
                        (m as f64, attn::flash1::forward_traffic_model(&shape, b) as f64)
                    })
                    .collect(),
            ));
        }
        let flash1_start =
            series.iter().find(|s| s.label == "flash1").and_then(|s| s.points.first().copied());
        series.push(Series::dashed(
            format!("Θ(N²d²/M), Dao et al. 2022 Thm 2 (fitted at M = {})", plan.srams[0]),
            stage_color("flash1"),
            fitted(ms.iter().map(|&m| (m, flash_model(n, d, m))).collect(), flash1_start),
        ));
        Panel {
            title: format!(
                "{} HBM traffic at N = {}, d = {}",
                if backward { "backward" } else { "forward" },
                plan.sram_n,
                plan.head_dim
            ),
            x_desc: "SRAM budget M (f32 elements)".into(),
            y_desc: "bytes moved".into(),
            y_axis: YAxis::LogBytes,
            series,
            legend: SeriesLabelPosition::LowerLeft,
        }
    };
    draw_file(&out.join("traffic-vs-sram.svg"), &[panel(false), panel(true)], 2, stamp)
}
