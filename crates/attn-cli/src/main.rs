//! `attn`: run any attention stage on your own tensors, or compare every stage on one problem.
//!
//! ```text
//! attn                      # every stage on a default problem: error, time, GFLOP/s, memory
//! attn plots [--quick]     # measure and draw the book's plots into book/src/plots
//! attn trace --causal      # every step of FlashAttention-2's loops on a small problem, as CSV
//! attn decode-bench        # a decode step from a KV cache: time, bandwidth, the host's copy bandwidth
//! attn run --algo naive --q Q.npy --k K.npy --v V.npy --out O.npy [...]
//! ```
//!
//! Invalid input exits with status 2 and one line on stderr that names the flag; nothing
//! is written unless everything succeeded.

mod decode_bench;
mod demo;
mod gpu_bench;
mod npy;
mod plots;
mod run;
mod table;
mod trace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOC: attn::core::memory::CountingAllocator = attn::core::memory::CountingAllocator;

/// Memory-efficient attention, from naive to FlashAttention-2.
#[derive(Debug, Parser)]
#[command(name = "attn", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one stage on .npy tensors: forward, and backward when --grad-out is given.
    Run(Box<run::RunArgs>),
    /// Run every stage on one problem and print a table: error against the float64
    /// reference, time, GFLOP/s, peak extra memory, HBM traffic (the default command).
    #[command(visible_alias = "compare")]
    Table(table::TableArgs),
    /// Run the seed project's two examples (autoregressive and cross attention) at
    /// n = 65 536 through the multi-head Attention module: time, GFLOP/s, peak memory.
    Demo(demo::DemoArgs),
    /// Measure every stage and write the book's plots (SVG) and their numbers (CSV): peak
    /// memory, throughput and HBM traffic against n, traffic against the SRAM budget M.
    Plots(plots::PlotsArgs),
    /// Print every step of a tiled stage's CPU forward on a small seeded problem as CSV:
    /// the tile, its kind, and m_i, ℓ_i and the accumulator of each row after the step.
    Trace(trace::TraceArgs),
    /// Time the GPU stages (device time and device memory) at several n, or with --smoke
    /// run every GPU kernel once on a small problem (for compute-sanitizer).
    GpuBench(gpu_bench::GpuBenchArgs),
    /// Decoding from a KV cache on the CPU: the time of one step and the K/V bandwidth it
    /// reaches, beside the host's copy bandwidth measured in the same run.
    DecodeBench(decode_bench::DecodeBenchArgs),
    /// The host's fp32 matrix-product peak through the tile products the CPU stages use (the
    /// `gemm` crate, every thread): the ceiling their GFLOP/s are compared with.
    MatmulPeak {
        /// The size n of the n × n × n product.
        #[arg(long, default_value_t = 1536)]
        size: usize,
    },
}

/// An error for the user: which flag, and what to change.
#[derive(Debug)]
pub struct CliError {
    /// 2 for invalid input, 1 for a failure to write results.
    pub code: u8,
    pub message: String,
}

impl CliError {
    /// Invalid input given to `flag`.
    pub fn input(flag: &str, message: impl std::fmt::Display) -> Self {
        Self { code: 2, message: format!("{flag}: {message}") }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print(); // --help, --version
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's message, folded onto one line: what is wrong and with which flag.
            let text = e.render().to_string();
            let line: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| {
                    !l.is_empty()
                        && !l.starts_with("Usage:")
                        && !l.starts_with("For more information")
                })
                .collect();
            eprintln!("{}", line.join(" "));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Some(Command::Run(args)) => run::run(&args),
        Some(Command::Table(args)) => table::table(&args),
        Some(Command::Demo(args)) => demo::demo(&args),
        Some(Command::Plots(args)) => plots::plots(&args),
        Some(Command::Trace(args)) => trace::trace(&args),
        Some(Command::GpuBench(args)) => gpu_bench::gpu_bench(&args),
        Some(Command::DecodeBench(args)) => decode_bench::decode_bench(&args),
        Some(Command::MatmulPeak { size }) => {
            let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
            let peak = plots::matmul_peak_gflops(size.max(64));
            println!(
                "fp32 matmul peak: {peak:.1} GFLOP/s ({size}x{size}x{size}, gemm, {threads} threads)"
            );
            Ok(())
        }
        None => table::table(&table::TableArgs::default()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the message holds.
            eprintln!("error: {}", e.message.replace('\n', " "));
            ExitCode::from(e.code)
        }
    }
}
