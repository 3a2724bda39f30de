//! `attn plots`: measure every stage and draw what the book shows — peak memory against n
//! (quadratic against linear), throughput against n beside the machine's matmul peak, and
//! "HBM" traffic against n and against the SRAM budget M beside the papers' formulas.
//!
//! Every figure is an SVG written next to the CSV of its numbers; both carry the machine,
//! the date and the command that made them.

mod draw;
mod gpu;
mod memory;
mod sweep;
mod throughput;
mod tiles;
mod traffic;
pub mod worked;

use std::path::{Path, PathBuf};

use attn::{Inputs, Options, Shape, Stage};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::CliError;
use draw::Panel;
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
    /// Which figures: the CPU sweeps, the GPU figures, the tile grids and worked example
    /// (drawn from traces of the tiled stages, in seconds), or all of them.
    #[arg(long, value_enum, default_value = "all")]
    pub only: Only,
    /// Draw the GPU figures from this `attn gpu-bench --csv` file (made on the GPU machine)
    /// instead of measuring; without it they are measured when a CUDA device is present.
    #[arg(long)]
    pub gpu_csv: Option<PathBuf>,
    /// PyTorch's results on the same device and shapes (benches/compare/sdpa_gpu.py --csv),
    /// drawn beside the GPU stages; repeat it for several dtypes (f32, bf16).
    #[arg(long)]
    pub sdpa_csv: Vec<PathBuf>,
    /// Redraw the memory figure from this `memory.csv` of an earlier run instead of measuring
    /// (with --only cpu: nothing else is measured); the points naive attention's guard refused
    /// are its prediction again, recomputed. The figure keeps the run's machine, date and
    /// command.
    #[arg(long)]
    pub memory_csv: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    All,
    Cpu,
    Gpu,
    Tiles,
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
pub(super) struct Stamp {
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
    if let Some(path) = &args.memory_csv {
        return memory::redraw(&args.out, &plan, path);
    }
    if matches!(args.only, Only::All | Only::Tiles) {
        tiles::tile_plots(&args.out, &stamp)?;
    }
    if matches!(args.only, Only::All | Only::Cpu) {
        cpu_plots(args, &plan, &stamp)?;
    }
    if matches!(args.only, Only::All | Only::Gpu) {
        gpu::gpu_plots(args, &stamp)?;
    }
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
    memory::write_memory(out, plan, &runs, stamp)?;
    throughput::write_throughput(out, plan, &runs, peak, stamp)?;
    traffic::write_traffic_vs_n(out, plan, &traffic, stamp)?;
    traffic::write_traffic_vs_sram(out, plan, &by_sram, &naive_at_sram_n, stamp)?;

    println!("wrote {}/{{{}}}", out.display(), FILES.join(","));
    println!("fp32 matmul peak {peak:.1} GFLOP/s on {}", stamp.machine);
    for (stage, slope) in memory::memory_slopes(&runs) {
        println!(
            "memory slope (log-log, largest measured n) {stage}: forward {:.2}, forward+backward {:.2}",
            slope.0, slope.1
        );
    }
    Ok(())
}

pub use sweep::matmul_peak_gflops;

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

fn stage_names(runs: impl Iterator<Item = &'static str>) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::new();
    for n in runs {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names
}
