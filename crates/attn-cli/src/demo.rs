//! `attn demo`: the seed project's two README examples, at their full size by default.
//!
//! - autoregressive: `Attention(dim 512, dim_head 64, heads 8, causal)` on x `[1, 65 536, 512]`;
//! - cross attention: the same module, not causal, on x and a context `[1, 65 536, 512]` with
//!   an all-true key-padding mask.
//!
//! The seed ran them with `memory_efficient = True`, `q_bucket_size = 1024`,
//! `k_bucket_size = 2048` (our `--algo chunked`, whose chunks those buckets set); the default
//! here is FlashAttention-2 with its own blocks.

use std::time::{Duration, Instant};

use attn::core::flops::forward_flops_windowed;
use attn::core::memory::{human_bytes, measure_peak};
use attn::{Algorithm, Attention, AttentionConfig, Mask, Overrides, Shape};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::Array2;

use crate::CliError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Example {
    Autoregressive,
    Cross,
    Both,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Sequence length of x (and of the context).
    #[arg(long, default_value_t = 65_536)]
    pub seq: usize,
    /// The stage the module runs.
    #[arg(long, default_value = attn::DEFAULT_STAGE, value_parser = clap::builder::PossibleValuesParser::new(attn::stage_names()))]
    pub algo: String,
    /// Which of the seed's examples.
    #[arg(long, value_enum, default_value = "both")]
    pub example: Example,
    /// A sliding window LEFT,RIGHT on the module's attention (-1: unbounded side).
    #[arg(long, allow_hyphen_values = true)]
    pub window: Option<String>,
    /// Logit soft-capping C on the module's attention.
    #[arg(long, allow_negative_numbers = true)]
    pub softcap: Option<f32>,
    /// ALiBi with the paper's slopes for the module's 8 heads.
    #[arg(long)]
    pub alibi: bool,
}

fn algorithm(name: &str) -> Algorithm {
    match name {
        "naive" => Algorithm::Naive,
        "chunked" => Algorithm::Chunked,
        "flash1" => Algorithm::Flash1,
        _ => Algorithm::Flash2,
    }
}

pub fn demo(args: &DemoArgs) -> Result<(), CliError> {
    if args.seq == 0 {
        return Err(CliError::input("--seq", "must be at least 1"));
    }
    let algo = algorithm(&args.algo);
    let window = args.window.as_deref().map(crate::run::parse_window).transpose()?;
    let examples: &[(&str, bool)] = match args.example {
        Example::Autoregressive => &[("autoregressive", true)],
        Example::Cross => &[("cross attention", false)],
        Example::Both => &[("autoregressive", true), ("cross attention", false)],
    };
    println!(
        "the seed's examples: dim 512, heads 8, dim_head 64, x [1, {}, 512], --algo {}",
        args.seq, args.algo
    );
    for &(name, causal) in examples {
        let mut config = AttentionConfig::new(512, 8, 64);
        config.causal = causal;
        config.algorithm = algo;
        config.window = window;
        config.softcap = args.softcap;
        config.alibi = args.alibi.then(|| attn::core::options::alibi_slopes(8));
        if algo == Algorithm::Chunked {
            // The seed's buckets, as its README sets them.
            config.q_bucket_size = Some(1024);
            config.k_bucket_size = Some(2048);
        }
        let module = Attention::new(config, 0).map_err(|e| CliError::input("--algo", e))?;
        let x = attn::core::random::normal((1, args.seq, 512), 1);
        let context = (!causal).then(|| attn::core::random::normal((1, args.seq, 512), 2));
        let mask = (!causal).then(|| Array2::from_elem((1, args.seq), true));

        let spinner =
            ProgressBar::new_spinner().with_message(format!("{name}: n = {} …", args.seq));
        spinner.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"),
        );
        spinner.enable_steady_tick(Duration::from_millis(200));
        let start = Instant::now();
        let (result, peak) = measure_peak(|| {
            module.infer(
                x.view(),
                context.as_ref().map(|c| c.view()),
                mask.as_ref().map(|m| Mask::KeyPadding(m.view())),
                None,
                Overrides::default(),
            )
        });
        let elapsed = start.elapsed().as_secs_f64();
        spinner.finish_and_clear();
        let y = result.map_err(crate::run::lib_error)?;
        let shape = Shape::new(1, 8, args.seq, 64);
        let flops = forward_flops_windowed(&shape, causal, window);
        println!(
            "{name}: y {:?} in {elapsed:.2} s, attention {:.1} GFLOP/s, peak extra heap {} (x{} not counted)",
            y.shape(),
            flops / elapsed / 1e9,
            human_bytes(peak),
            if causal { "" } else { ", context" },
        );
    }
    Ok(())
}
