//! The throughput figure: GFLOP/s of every stage against n, full and causal, forward and
//! backward, beside the machine's fp32 matmul peak.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::SeriesLabelPosition;

use super::draw::{Panel, Series, YAxis, stage_color};
use super::sweep::RunPoint;
use super::traffic::pass_title;
use super::{Plan, Stamp, draw_file, stage_names, write_file};
use crate::CliError;
use attn::Shape;
use attn::core::flops::{backward_flops, forward_flops};

pub(super) fn write_throughput(
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
