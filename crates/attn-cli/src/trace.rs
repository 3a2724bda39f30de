//! `attn trace`: every step of a tiled stage's forward loops on a small seeded problem, as
//! CSV on stdout — the numbers the book's step-through shows, from the native build.

use std::fmt::Write as _;

use attn::core::trace::Trace;
use attn::core::{Shape, random};
use attn::{Inputs, Options};
use clap::{Args, ValueEnum};

use crate::CliError;

/// The largest problem `attn trace` takes: a trace keeps every row of every step.
const MAX_ELEMENTS: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TracedStage {
    Chunked,
    Flash1,
    Flash2,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The tiled stage whose CPU forward is traced.
    #[arg(long, value_enum, default_value = "flash2")]
    pub stage: TracedStage,
    /// Query rows n_q.
    #[arg(long, default_value_t = 8)]
    pub seq_q: usize,
    /// Keys n_k (default: n_q).
    #[arg(long)]
    pub seq_k: Option<usize>,
    #[arg(long, default_value_t = 4)]
    pub head_dim: usize,
    /// Query rows per block B_r.
    #[arg(long, default_value_t = 4)]
    pub q_block: usize,
    /// Keys per block B_c.
    #[arg(long, default_value_t = 4)]
    pub k_block: usize,
    #[arg(long)]
    pub causal: bool,
    /// Sliding window LEFT,RIGHT (-1: unbounded side).
    #[arg(long, allow_hyphen_values = true)]
    pub window: Option<String>,
    /// Logit soft-capping c: scores become c·tanh(s/c).
    #[arg(long)]
    pub softcap: Option<f32>,
    /// Q from this seed, K and V from seed + 1 and seed + 2 (one batch, one head).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn trace(args: &TraceArgs) -> Result<(), CliError> {
    print!("{}", csv(args)?);
    Ok(())
}

/// The trace as CSV: one line per (step, row), steps in the loops' order from 0.
pub fn csv(args: &TraceArgs) -> Result<String, CliError> {
    let n_k = args.seq_k.unwrap_or(args.seq_q);
    let shape = Shape::new(1, 1, args.seq_q, args.head_dim).with_n_k(n_k);
    let elements = (args.seq_q * n_k).max(args.seq_q * args.head_dim);
    if elements > MAX_ELEMENTS {
        return Err(CliError::input(
            "--seq-q",
            format!(
                "{} × {n_k} is too large to trace; keep n_q · n_k ≤ {MAX_ELEMENTS}",
                args.seq_q
            ),
        ));
    }
    let window = args.window.as_deref().map(crate::run::parse_window).transpose()?;
    let opts = Options {
        q_block: Some(args.q_block),
        k_block: Some(args.k_block),
        window,
        softcap: args.softcap,
        ..Options::default().causal(args.causal)
    };
    let (q, k, v) = random::qkv(&shape, args.seed);
    let inputs = Inputs::new(q.view(), k.view(), v.view());
    let run = match args.stage {
        TracedStage::Chunked => attn::chunked::cpu::forward_traced,
        TracedStage::Flash1 => attn::flash1::cpu::forward_traced,
        TracedStage::Flash2 => attn::flash2::cpu::forward_traced,
    };
    let (_, trace) = run(&inputs, &opts).map_err(|e| CliError::input("the problem", e))?;
    Ok(write_csv(&trace))
}

fn write_csv(trace: &Trace) -> String {
    let d = trace.grid.head_dim;
    let mut text = String::from("step,kind,i0,rows,j0,cols,row,m,ell");
    for c in 0..d {
        let _ = write!(text, ",acc{c}");
    }
    text.push('\n');
    for (n, s) in trace.steps.iter().enumerate() {
        for r in 0..s.rows.1 {
            let _ = write!(
                text,
                "{n},{},{},{},{},{},{},{:e},{:e}",
                s.kind.name(),
                s.rows.0,
                s.rows.1,
                s.cols.0,
                s.cols.1,
                s.rows.0 + r,
                s.m[r],
                s.ell[r]
            );
            for x in &s.acc[r * d..(r + 1) * d] {
                let _ = write!(text, ",{x:e}");
            }
            text.push('\n');
        }
    }
    text
}
