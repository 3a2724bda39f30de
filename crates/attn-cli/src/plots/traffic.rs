//! The traffic figures: the bytes each stage moves between its full arrays and its tiles,
//! against n and against the SRAM budget M, beside the papers' IO complexities
//! (attn_core::traffic).

use std::fmt::Write as _;
use std::path::Path;

use attn::core::memory::human_bytes;
use plotters::prelude::SeriesLabelPosition;
use plotters::style::RGBColor;

use super::draw::{Panel, Series, YAxis, stage_color};
use super::sweep::TrafficPoint;
use super::{Plan, Stamp, draw_file, stage_names, write_file};
use crate::CliError;
use attn::core::traffic::{flash_attention_io, standard_attention_io};
use attn::{Options, Shape};

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
pub(super) fn pass_title(backward: bool, causal: bool) -> String {
    format!(
        "{} — {}",
        if backward { "backward" } else { "forward" },
        if causal { "causal" } else { "full attention" }
    )
}

/// A Θ(·) formula has no constant: the plots scale it to pass through one measured point
/// (`anchor`, at the same x), so that its slope can be compared with the measurements.
fn fitted(model: Vec<(f64, f64)>, anchor: Option<(f64, f64)>) -> Vec<(f64, f64)> {
    let Some((ax, ay)) = anchor else { return model };
    let Some(&(_, my)) = model.iter().find(|(x, _)| *x == ax) else { return model };
    model.into_iter().map(|(x, y)| (x, y * ay / my)).collect()
}

pub(super) fn write_traffic_vs_n(
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
            standard_attention_io(n, d),
            flash_attention_io(n, d, m)
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
            fitted(ns.iter().map(|&n| (n, standard_attention_io(n, d))).collect(), naive_end),
        ));
        series.push(Series::dashed(
            format!(
                "Θ(N²d²/M), FlashAttention, M = {}Ki (fitted at N = {n_max})",
                attn::flash1::DEFAULT_SRAM >> 10
            ),
            stage_color("flash1"),
            fitted(ns.iter().map(|&n| (n, flash_attention_io(n, d, m))).collect(), flash1_end),
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

pub(super) fn write_traffic_vs_sram(
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
            flash_attention_io(n, d, m as f64)
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
            fitted(ms.iter().map(|&m| (m, flash_attention_io(n, d, m))).collect(), flash1_start),
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
