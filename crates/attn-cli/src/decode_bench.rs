//! `attn decode-bench`: decoding from a KV cache, the time of one step and the bandwidth it
//! reaches (the valid K/V bytes read over the time) beside the machine's copy bandwidth,
//! measured in the same run: the host's for a CPU stage (and its read bandwidth, the ceiling
//! of a step that only reads), the device's for the GPU decode kernel (`--device cuda`, FlashAttention-2's split-KV kernel in f32, bf16 or fp16).

use std::time::Instant;

use attn::core::varlen::KvCache;
use attn::{Device, Inputs, Options, Stage};
use clap::Args;
use ndarray::Array4;
use rayon::prelude::*;

use crate::CliError;
use crate::run::{DeviceArg, DtypeArg};

#[derive(Debug, Args)]
pub struct DecodeBenchArgs {
    /// cpu: the stage `--algo` through attn-core's cached calls; cuda: the decode kernel.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// The caches' element type (bf16 and f16 on cuda only).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
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
    /// 1 runs on the whole row. A list measures each; left out: 1 on the CPU, the kernel's
    /// own choice from the problem and the SM count on cuda.
    #[arg(long, value_delimiter = ',')]
    pub splits: Vec<usize>,
    /// On cuda: the tensor-core kernel's pipeline stages (2 to 4) instead of its own choice.
    #[arg(long)]
    pub stages: Option<usize>,
    /// On cuda: the CUDA-core kernel even where the tensor cores would run the call.
    #[arg(long)]
    pub cuda_cores: bool,
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

/// The host's read bandwidth: bytes per second a parallel sum over `bytes` reads, the best of
/// three — what a decode step, which only reads its cache, can at most reach.
pub fn read_bandwidth(bytes: usize) -> f64 {
    let src = vec![1.0f32; bytes / 4];
    let chunk = (src.len() / rayon::current_num_threads().max(1)).max(1 << 16);
    (0..3)
        .map(|_| {
            let t = Instant::now();
            let sum: f32 = src
                .par_chunks(chunk)
                .map(|c| {
                    // sixteen independent lanes, so the adds are not one dependency chain
                    let (lanes, _) = c.as_chunks::<16>();
                    let acc = lanes.iter().fold([0.0f32; 16], |mut a, x| {
                        for i in 0..16 {
                            a[i] += x[i];
                        }
                        a
                    });
                    acc.iter().sum::<f32>()
                })
                .sum();
            std::hint::black_box(sum);
            bytes as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

pub fn decode_bench(args: &DecodeBenchArgs) -> Result<(), CliError> {
    let splits = args.splits.iter().copied().min().unwrap_or(1);
    for (flag, n) in [("--splits", splits), ("--repeats", args.repeats), ("--n-q", args.n_q)] {
        if n == 0 {
            return Err(CliError::input(flag, "is 0: it must be at least 1"));
        }
    }
    if args.kv_heads == 0 || !args.heads.is_multiple_of(args.kv_heads) {
        return Err(CliError::input("--kv-heads", "kv_heads must divide heads"));
    }
    match (args.device, args.dtype) {
        (DeviceArg::Cuda, DtypeArg::F32) => return gpu_bench::<f32>(args),
        (DeviceArg::Cuda, DtypeArg::Bf16) => return gpu_bench::<attn::flash2::tc::bf16>(args),
        (DeviceArg::Cuda, DtypeArg::F16) => return gpu_bench::<attn::flash2::tc::f16>(args),
        (DeviceArg::Cpu, DtypeArg::F32) => {}
        (DeviceArg::Cpu, _) => {
            return Err(CliError::input("--dtype", "bf16 and f16 caches decode on --device cuda"));
        }
    }
    let stage: &dyn Stage = attn::stage(&args.algo, Device::Cpu)
        .ok_or_else(|| CliError::input("--algo", format!("no CPU stage '{}'", args.algo)))?;
    let splits = if args.splits.is_empty() { vec![1] } else { args.splits.clone() };
    let largest = args.batch.iter().max().copied().unwrap_or(1)
        * args.seq.iter().max().copied().unwrap_or(1)
        * args.kv_heads
        * args.head_dim
        * 4;
    let copy = copy_bandwidth(largest.max(1 << 28));
    let read = read_bandwidth(largest.max(1 << 28));
    println!(
        "# attn decode-bench, {} on the CPU ({} threads): n_q {}, heads {}, kv_heads {}, d {}, f32, splits {}; median of {} steps",
        stage.name(),
        rayon::current_num_threads(),
        args.n_q,
        args.heads,
        args.kv_heads,
        args.head_dim,
        list(&splits),
        args.repeats
    );
    println!("# copy bandwidth (read + write, parallel copy): {:.3} GB/s", copy / 1e9);
    println!("# read bandwidth (parallel sum): {:.3} GB/s", read / 1e9);
    println!("{HEADER},share_of_read");
    for &b in &args.batch {
        for &n in &args.seq {
            for &splits in &splits {
                eprintln!("decode-bench: batch {b}, n_k {n} …");
                let q = attn::core::random::normal((b, args.heads, args.n_q, args.head_dim), 1);
                let k: Array4<f32> =
                    attn::core::random::normal((b, args.kv_heads, n, args.head_dim), 2);
                let v: Array4<f32> =
                    attn::core::random::normal((b, args.kv_heads, n, args.head_dim), 3);
                let cache =
                    KvCache::contiguous(&vec![n as i64; b]).map_err(crate::run::lib_error)?;
                let inputs = Inputs::new(q.view(), k.view(), v.view());
                let opts = Options::default().causal(true);
                // the stage's cached call: flash2's decode path, else the stage per row
                let step = || {
                    stage
                        .forward_cached(&cache, &inputs, &opts, Some(splits))
                        .map_err(crate::run::lib_error)
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
                println!(
                    "{b},{n},{splits},{:.4},{:.4},{:.4},{:.4}",
                    t * 1e3,
                    bw / 1e9,
                    bw / copy,
                    bw / read
                );
            }
        }
    }
    Ok(())
}

/// Decode steps a GPU sample times back to back.
const STEPS: usize = 20;

const HEADER: &str = "batch,n_k,splits,step_ms,kv_gb_per_s,share_of_copy";

fn list(xs: &[usize]) -> String {
    xs.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

/// The decode kernel on the GPU, on synthetic caches made there: the median of `repeats`
/// steps timed with CUDA events, beside the device's copy bandwidth.
fn gpu_bench<T: attn::flash2::gpu::decode::DecodeFloat>(
    args: &DecodeBenchArgs,
) -> Result<(), CliError> {
    use attn::cuda::Timer;
    use attn::flash2::gpu::decode::DeviceDecode;
    let gpu = attn::cuda::gpu().map_err(|e| CliError::input("--device", e))?;
    let lib = crate::run::lib_error;
    let copy = gpu.copy_bandwidth(1 << 31).map_err(lib)?;
    println!(
        "# attn decode-bench, the decode kernel (flash2) on {} ({} SMs): n_q {}, heads {}, kv_heads {}, d {}, {}, causal, splits {}; median of {} samples of {STEPS} steps",
        gpu.name(),
        gpu.multiprocessors(),
        args.n_q,
        args.heads,
        args.kv_heads,
        args.head_dim,
        args.dtype.name(),
        if args.splits.is_empty() {
            "chosen by the kernel".to_string()
        } else {
            list(&args.splits)
        },
        args.repeats
    );
    println!(
        "# copy bandwidth (read + write, device-to-device copy of 2 GiB): {:.1} GB/s",
        copy / 1e9
    );
    println!("{HEADER}");
    let opts = Options::default().causal(true);
    for &b in &args.batch {
        for &n in &args.seq {
            eprintln!("decode-bench: batch {b}, n_k {n} …");
            let dims = (b, args.heads, args.n_q, args.head_dim);
            let dev = DeviceDecode::<T>::synthetic(gpu, dims, args.kv_heads, &vec![n; b], &opts)
                .map_err(lib)?;
            let dev = if args.cuda_cores { dev.on_cuda_cores(gpu).map_err(lib)? } else { dev };
            let dev = match args.stages {
                Some(n) => dev.with_stages(gpu, n).map_err(lib)?,
                None => dev,
            };
            eprintln!(
                "decode-bench: on the {}",
                if dev.uses_tensor_cores() { "tensor cores" } else { "CUDA cores" }
            );
            let splits = if args.splits.is_empty() {
                vec![dev.default_splits(gpu)]
            } else {
                args.splits.clone()
            };
            for &splits in &splits {
                let w = dev.workspace(gpu, splits).map_err(lib)?;
                dev.run_in(gpu, &w).map_err(lib)?; // warm-up
                // STEPS steps back to back a sample, so that a step of a few microseconds is
                // not its launch latency
                let mut times = (0..args.repeats)
                    .map(|_| {
                        let t = Timer::start(gpu)?;
                        for _ in 0..STEPS {
                            dev.run_in(gpu, &w)?;
                        }
                        Ok(t.stop(gpu)? * 1e-3 / STEPS as f64)
                    })
                    .collect::<attn::Result<Vec<f64>>>()
                    .map_err(lib)?;
                times.sort_by(f64::total_cmp);
                let t = times[times.len() / 2];
                let bw = dev.kv_bytes() as f64 / t;
                println!("{b},{n},{splits},{:.4},{:.1},{:.4}", t * 1e3, bw / 1e9, bw / copy);
            }
        }
    }
    Ok(())
}
