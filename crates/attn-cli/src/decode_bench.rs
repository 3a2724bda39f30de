//! `attn decode-bench`: decoding from a KV cache, the time of one step and the bandwidth it
//! reaches (the valid K/V bytes read over the time) beside the host's copy bandwidth,
//! measured in the same run.

use std::time::Instant;

use attn::core::varlen::{self, KvCache};
use attn::{Device, Inputs, Options, Stage};
use clap::Args;
use ndarray::Array4;
use rayon::prelude::*;

use crate::CliError;

#[derive(Debug, Args)]
pub struct DecodeBenchArgs {
    /// The stage (CPU).
    #[arg(long, default_value = attn::DEFAULT_STAGE, value_parser = clap::builder::PossibleValuesParser::new(attn::stage_names()))]
    pub algo: String,
    /// Batch sizes (comma-separated).
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Valid cache lengths n_k (comma-separated).
    #[arg(long, default_value = "4096,32768", value_delimiter = ',')]
    pub seq: Vec<usize>,
    /// Query rows per step.
    #[arg(long, default_value_t = 1)]
    pub n_q: usize,
    #[arg(long, default_value_t = 32)]
    pub heads: usize,
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// Split each row's keys into this many parts, merged by the log-sum-exp (split-KV);
    /// 1 runs the stage on the whole row.
    #[arg(long, default_value_t = 1)]
    pub splits: usize,
    /// Timed steps per point (the median is kept).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
}

/// The host's copy bandwidth: bytes read plus written per second by a parallel copy of
/// `bytes`, the best of three.
pub fn copy_bandwidth(bytes: usize) -> f64 {
    let n = bytes / 4;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let chunk = (n / rayon::current_num_threads().max(1)).max(1 << 16);
    (0..3)
        .map(|_| {
            let t = Instant::now();
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s));
            std::hint::black_box(&dst);
            2.0 * bytes as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

pub fn decode_bench(args: &DecodeBenchArgs) -> Result<(), CliError> {
    let stage: &dyn Stage = attn::stage(&args.algo, Device::Cpu)
        .ok_or_else(|| CliError::input("--algo", format!("no CPU stage '{}'", args.algo)))?;
    for (flag, n) in [("--splits", args.splits), ("--repeats", args.repeats), ("--n-q", args.n_q)] {
        if n == 0 {
            return Err(CliError::input(flag, "is 0: it must be at least 1"));
        }
    }
    if args.kv_heads == 0 || !args.heads.is_multiple_of(args.kv_heads) {
        return Err(CliError::input("--kv-heads", "kv_heads must divide heads"));
    }
    let largest = args.batch.iter().max().copied().unwrap_or(1)
        * args.seq.iter().max().copied().unwrap_or(1)
        * args.kv_heads
        * args.head_dim
        * 4;
    let copy = copy_bandwidth(largest.max(1 << 28));
    println!(
        "# attn decode-bench, {} on the CPU ({} threads): n_q {}, heads {}, kv_heads {}, d {}, f32, splits {}; median of {} steps",
        stage.name(),
        rayon::current_num_threads(),
        args.n_q,
        args.heads,
        args.kv_heads,
        args.head_dim,
        args.splits,
        args.repeats
    );
    println!("# copy bandwidth (read + write, parallel copy): {:.3} GB/s", copy / 1e9);
    println!("batch,n_k,step_ms,kv_gb_per_s,share_of_copy");
    for &b in &args.batch {
        for &n in &args.seq {
            eprintln!("decode-bench: batch {b}, n_k {n} …");
            let q = attn::core::random::normal((b, args.heads, args.n_q, args.head_dim), 1);
            let k: Array4<f32> =
                attn::core::random::normal((b, args.kv_heads, n, args.head_dim), 2);
            let v: Array4<f32> =
                attn::core::random::normal((b, args.kv_heads, n, args.head_dim), 3);
            let cache = KvCache::contiguous(&vec![n as i64; b]).map_err(crate::run::lib_error)?;
            let inputs = Inputs::new(q.view(), k.view(), v.view());
            let opts = Options::default().causal(true);
            let step = || {
                let f = if args.splits == 1 {
                    varlen::forward_cached(&cache, &inputs, &opts, |i, o| stage.forward(i, o))
                } else {
                    varlen::forward_cached_split(&cache, &inputs, &opts, args.splits, |i, o| {
                        stage.forward(i, o)
                    })
                };
                f.map_err(crate::run::lib_error)
            };
            step()?; // warm-up
            let mut times: Vec<f64> = (0..args.repeats)
                .map(|_| {
                    let t = Instant::now();
                    step().map(|_| t.elapsed().as_secs_f64())
                })
                .collect::<Result<_, _>>()?;
            times.sort_by(f64::total_cmp);
            let t = times[times.len() / 2];
            let bytes = 2.0 * (b * args.kv_heads * n * args.head_dim * 4) as f64;
            let bw = bytes / t;
            println!("{b},{n},{:.4},{:.4},{:.4}", t * 1e3, bw / 1e9, bw / copy);
        }
    }
    Ok(())
}
