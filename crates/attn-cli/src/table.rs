//! `attn table` (the default command): every stage on one problem, side by side.

use std::time::Instant;

use attn::core::flops::{backward_flops_windowed, forward_flops_windowed};
use attn::core::memory::{human_bytes, measure_peak};
use attn::core::metrics::compare;
use attn::core::reference::RefProblem;
use attn::{Inputs, Options, Shape};
use clap::Args;

use crate::CliError;

#[derive(Debug, Args)]
pub struct TableArgs {
    /// Batch size.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Query heads.
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// Key/value heads (default: as many as query heads).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Query length n_q.
    #[arg(long, default_value_t = 1024)]
    pub seq: usize,
    /// Key/value length n_k (default: n_q).
    #[arg(long)]
    pub seq_k: Option<usize>,
    /// Head dimension.
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    /// Causal masking.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub causal: bool,
    /// Timed runs per stage (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Skip the float64 reference (for sizes where it is slow).
    #[arg(long)]
    pub no_check: bool,
    /// Only these stages (comma-separated names); default: every stage.
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(attn::stage_names()))]
    pub stages: Vec<String>,
    /// SRAM budget M of the tiled stages, in f32 elements.
    #[arg(long)]
    pub sram: Option<usize>,
    /// Query rows per block of the tiled stages.
    #[arg(long)]
    pub q_block: Option<usize>,
    /// Key/value rows per block of the tiled stages.
    #[arg(long)]
    pub k_block: Option<usize>,
    /// Sliding window LEFT,RIGHT (-1: unbounded side); GFLOP/s count the kept pairs.
    #[arg(long, allow_hyphen_values = true)]
    pub window: Option<String>,
    /// Logit soft-capping C.
    #[arg(long)]
    pub softcap: Option<f32>,
}

impl Default for TableArgs {
    fn default() -> Self {
        Self {
            batch: 1,
            heads: 8,
            kv_heads: None,
            seq: 1024,
            seq_k: None,
            head_dim: 64,
            causal: true,
            repeats: 5,
            no_check: false,
            stages: Vec::new(),
            sram: None,
            q_block: None,
            k_block: None,
            window: None,
            softcap: None,
        }
    }
}

fn median_secs(repeats: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let mut times: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

pub fn table(args: &TableArgs) -> Result<(), CliError> {
    let shape = Shape::new(args.batch, args.heads, args.seq, args.head_dim)
        .with_n_k(args.seq_k.unwrap_or(args.seq))
        .with_kv_heads(args.kv_heads.unwrap_or(args.heads));
    let (q, k, v) = attn::core::random::qkv(&shape, 0);
    let d_out = attn::core::random::normal(shape.q_dims(), 1);
    let inputs = Inputs::new(q.view(), k.view(), v.view());
    for (flag, v) in
        [("--sram", args.sram), ("--q-block", args.q_block), ("--k-block", args.k_block)]
    {
        if v == Some(0) {
            return Err(CliError::input(flag, "must be at least 1"));
        }
    }
    let window = args.window.as_deref().map(crate::run::parse_window).transpose()?;
    let opts = Options {
        causal: args.causal,
        sram: args.sram,
        q_block: args.q_block,
        k_block: args.k_block,
        window,
        softcap: args.softcap,
        ..Options::default()
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mods = window.map_or(String::new(), |w| format!(" window=({},{})", w.left, w.right))
        + &args.softcap.map_or(String::new(), |c| format!(" softcap={c}"));
    println!(
        "attention {shape} causal={}{mods} on {} ({threads} threads)",
        args.causal,
        cpu_model()
    );

    let reference = if args.no_check {
        None
    } else {
        let r = RefProblem::from_inputs(&inputs, &opts).map_err(crate::run::lib_error)?;
        let fwd = r.forward();
        let grads = r.backward(&d_out.mapv(f64::from));
        Some((fwd, grads))
    };

    let header = [
        "stage",
        "device",
        "fwd err",
        "bwd err",
        "fwd ms",
        "fwd GFLOP/s",
        "bwd ms",
        "bwd GFLOP/s",
        "fwd peak",
        "bwd peak",
        "fwd HBM",
        "bwd HBM",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    let chosen = attn::usable_stages()
        .into_iter()
        .filter(|s| args.stages.is_empty() || args.stages.iter().any(|n| n == s.name()));
    for stage in chosen {
        let fwd = match stage.forward(&inputs, &opts) {
            Ok(f) => f,
            Err(e) => {
                rows.push(vec![
                    stage.name().into(),
                    stage.device().to_string(),
                    format!("skipped: {e}"),
                ]);
                continue;
            }
        };
        let grads =
            stage.backward(&inputs, &opts, &fwd, d_out.view()).map_err(crate::run::lib_error)?;
        let (fwd_err, bwd_err) = match &reference {
            Some((rf, rg)) => {
                let f = compare(fwd.out.view(), rf.out.view()).normwise;
                let b = [
                    compare(grads.dq.view(), rg.dq.view()).normwise,
                    compare(grads.dk.view(), rg.dk.view()).normwise,
                    compare(grads.dv.view(), rg.dv.view()).normwise,
                ]
                .into_iter()
                .fold(0.0, f64::max);
                (format!("{f:.1e}"), format!("{b:.1e}"))
            }
            None => ("-".into(), "-".into()),
        };
        let t_fwd = median_secs(args.repeats, || {
            std::hint::black_box(stage.forward(&inputs, &opts).unwrap());
        });
        let t_bwd = median_secs(args.repeats, || {
            std::hint::black_box(stage.backward(&inputs, &opts, &fwd, d_out.view()).unwrap());
        });
        let (_, fwd_peak) = measure_peak(|| stage.forward(&inputs, &opts).unwrap());
        let (_, bwd_peak) =
            measure_peak(|| stage.backward(&inputs, &opts, &fwd, d_out.view()).unwrap());
        rows.push(vec![
            stage.name().into(),
            stage.device().to_string(),
            fwd_err,
            bwd_err,
            format!("{:.2}", t_fwd * 1e3),
            format!("{:.1}", forward_flops_windowed(&shape, args.causal, window) / t_fwd / 1e9),
            format!("{:.2}", t_bwd * 1e3),
            format!("{:.1}", backward_flops_windowed(&shape, args.causal, window) / t_bwd / 1e9),
            human_bytes(fwd_peak),
            human_bytes(bwd_peak),
            fwd.traffic.map_or("-".into(), |t| human_bytes(t.total())),
            grads.traffic.map_or("-".into(), |t| human_bytes(t.total())),
        ]);
    }
    print_table(&rows);
    println!(
        "errors: normwise relative vs the float64 reference (backward: worst of dQ, dK, dV); \
         peak: heap above the inputs; HBM: bytes moved between full arrays and tiles"
    );
    Ok(())
}

fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    for (i, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, s)| {
                if c < 2 {
                    format!("{s:<w$}", w = widths[c])
                } else {
                    format!("{s:>w$}", w = widths[c])
                }
            })
            .collect();
        println!("{}", line.join("  ").trim_end());
        if i == 0 {
            println!("{}", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  "));
        }
    }
}
