//! The memory figure: peak heap above the inputs against n, forward and forward + backward,
//! with each stage's log-log slope; naive attention's guard prediction dashed where it
//! refused.

use std::fmt::Write as _;
use std::path::Path;

use attn::core::memory::log_log_slope;
use plotters::prelude::SeriesLabelPosition;

use super::draw::{Panel, Series, YAxis, stage_color};
use super::sweep::RunPoint;
use super::{Plan, Stamp, draw_file, stage_names, write_file};
use crate::CliError;

/// Per stage: the memory slopes (forward, forward + backward) fitted on the three largest
/// measured n of the causal sweep.
pub(super) fn memory_slopes(runs: &[RunPoint]) -> Vec<(&'static str, (f64, f64))> {
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

pub(super) fn write_memory(
    out: &Path,
    plan: &Plan,
    runs: &[RunPoint],
    stamp: &Stamp,
) -> Result<(), CliError> {
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

/// The memory figure drawn again from a `memory.csv` that `attn plots` wrote: the measured
/// points as they are, naive attention's refused points recomputed from its guard.
pub(super) fn redraw(out: &Path, plan: &Plan, csv: &Path) -> Result<(), CliError> {
    let bad = |what: String| CliError::input("--memory-csv", what);
    let text = std::fs::read_to_string(csv)
        .map_err(|e| bad(format!("cannot read {}: {e}", csv.display())))?;
    let header = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
            .map(str::to_string)
            .ok_or_else(|| bad(format!("no '# {key}:' line")))
    };
    let stamp = Stamp {
        machine: header("machine")?,
        date: header("date")?,
        command: format!("{} (redrawn: attn plots --memory-csv)", header("command")?),
    };
    let names = attn::stage_names();
    let mut runs = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.starts_with("stage,")) {
        let f: Vec<&str> = line.split(',').collect();
        let num = |i: usize| -> Result<u64, CliError> {
            f.get(i).and_then(|x| x.parse().ok()).ok_or_else(|| bad(format!("bad row '{line}'")))
        };
        let stage = names
            .iter()
            .copied()
            .find(|s| f.first() == Some(s))
            .ok_or_else(|| bad(format!("unknown stage in '{line}'")))?;
        let n = num(1)? as usize;
        let mut point = RunPoint {
            stage,
            n,
            causal: true,
            forward_bytes: num(2)?,
            both_bytes: num(3)?,
            forward_measured: num(4)? == 1,
            backward_measured: num(5)? == 1,
            forward_s: f64::NAN,
            backward_s: f64::NAN,
        };
        if stage == "naive" && !(point.forward_measured && point.backward_measured) {
            let (fwd, both) =
                super::sweep::naive_prediction(&attn::Shape::new(1, plan.heads, n, plan.head_dim));
            if !point.forward_measured {
                point.forward_bytes = fwd;
            }
            point.both_bytes = both;
        }
        runs.push(point);
    }
    write_memory(out, plan, &runs, &stamp)?;
    println!("redrew {}/memory.svg and memory.csv from {}", out.display(), csv.display());
    Ok(())
}
