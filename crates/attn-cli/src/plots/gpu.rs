//! The GPU figures: device bytes and TFLOP/s of the GPU stages against n, beside PyTorch's
//! `scaled_dot_product_attention` when its results (benches/compare/sdpa_gpu.py) are given.
//! The numbers come from `attn gpu-bench` — measured here when a device is present, or read
//! from the CSV it wrote on the GPU machine.

use std::path::{Path, PathBuf};

use plotters::prelude::SeriesLabelPosition;
use plotters::style::RGBColor;

use super::draw::{Panel, Series, YAxis, stage_color};
use super::traffic::pass_title;
use super::{PlotsArgs, Stamp, powers_of_two, write_file};
use crate::CliError;

/// One row of an `attn gpu-bench` or `sdpa_gpu.py` CSV.
#[derive(Debug, Clone)]
pub struct GpuRow {
    pub name: String,
    pub causal: bool,
    pub n: usize,
    pub forward_tflops: f64,
    pub backward_tflops: f64,
    pub forward_bytes: f64,
    pub backward_bytes: f64,
}

/// Reads the CSV text; returns its first comment line (which names the device) and the rows.
pub fn parse(text: &str, what: &str) -> Result<(String, Vec<GpuRow>), CliError> {
    let bad = |m: String| CliError::input(what, m);
    let comment = text.lines().find_map(|l| l.strip_prefix("# ")).unwrap_or("").to_string();
    let mut lines = text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty());
    let header: Vec<&str> =
        lines.next().ok_or_else(|| bad("no header line".into()))?.split(',').collect();
    let col = |name: &str| {
        header.iter().position(|h| *h == name).ok_or_else(|| bad(format!("no column {name}")))
    };
    let cols = [
        col("causal")?,
        col("n")?,
        col("forward_tflops")?,
        col("backward_tflops")?,
        col("forward_device_bytes")?,
        col("backward_device_bytes")?,
    ];
    let mut rows = Vec::new();
    for line in lines {
        let cells: Vec<&str> = line.split(',').collect();
        let num = |i: usize| -> Result<f64, CliError> {
            cells
                .get(i)
                .and_then(|c| c.trim().parse::<f64>().ok())
                .filter(|x| x.is_finite())
                .ok_or_else(|| bad(format!("not a number in column {}: {line}", header[i])))
        };
        rows.push(GpuRow {
            name: cells[0].to_string(),
            causal: num(cols[0])? != 0.0,
            n: num(cols[1])? as usize,
            forward_tflops: num(cols[2])?,
            backward_tflops: num(cols[3])?,
            forward_bytes: num(cols[4])?,
            backward_bytes: num(cols[5])?,
        });
    }
    if rows.is_empty() {
        return Err(bad("no data rows".into()));
    }
    Ok((comment, rows))
}

fn label(name: &str, pytorch: bool) -> String {
    if pytorch { format!("PyTorch SDPA {name}") } else { format!("{name} (cuda)") }
}

fn color(name: &str, pytorch: bool) -> RGBColor {
    match (pytorch, name) {
        (true, "math") => RGBColor(148, 103, 189),
        (true, n) if n.starts_with("flash") => RGBColor(188, 189, 34),
        (true, n) if n.starts_with("cudnn") => RGBColor(23, 190, 207),
        (true, _) => RGBColor(140, 86, 75),
        (false, n) if n.ends_with("bf16") || n.ends_with("f16") => RGBColor(227, 119, 194),
        (false, n) => stage_color(n),
    }
}

/// Draws gpu-memory.svg and gpu-throughput.svg into `out`.
pub fn draw(out: &Path, ours: &[GpuRow], sdpa: &[GpuRow], footer: &str) -> Result<(), CliError> {
    let groups = |rows: &[GpuRow]| {
        let mut names: Vec<String> = Vec::new();
        for r in rows {
            if !names.contains(&r.name) {
                names.push(r.name.clone());
            }
        }
        names
    };
    let series = |rows: &[GpuRow], pytorch: bool, causal: bool, y: &dyn Fn(&GpuRow) -> f64| {
        groups(rows)
            .into_iter()
            .map(|name| {
                let pts = rows
                    .iter()
                    .filter(|r| r.name == name && r.causal == causal)
                    .map(|r| (r.n as f64, y(r)))
                    .collect();
                let s = Series::solid(label(&name, pytorch), color(&name, pytorch), pts);
                if pytorch { Series { dashed: true, ..s } } else { s }
            })
            .collect::<Vec<_>>()
    };
    let memory = |backward: bool| {
        let y = move |r: &GpuRow| if backward { r.backward_bytes } else { r.forward_bytes };
        let mut s = series(ours, false, false, &y);
        s.extend(series(sdpa, true, false, &y));
        Panel {
            title: format!("{} — device bytes", if backward { "backward" } else { "forward" }),
            x_desc: "sequence length n".into(),
            y_desc: "device memory above the inputs".into(),
            y_axis: YAxis::LogBytes,
            series: s,
            legend: SeriesLabelPosition::UpperLeft,
        }
    };
    super::draw_file_with_footer(
        &out.join("gpu-memory.svg"),
        &[memory(false), memory(true)],
        2,
        footer,
    )?;
    let speed = |backward: bool, causal: bool| {
        let y = move |r: &GpuRow| if backward { r.backward_tflops } else { r.forward_tflops };
        let mut s = series(ours, false, causal, &y);
        s.extend(series(sdpa, true, causal, &y));
        Panel {
            title: pass_title(backward, causal),
            x_desc: "sequence length n".into(),
            y_desc: "TFLOP/s".into(),
            y_axis: YAxis::Linear,
            series: s,
            legend: SeriesLabelPosition::UpperLeft,
        }
    };
    super::draw_file_with_footer(
        &out.join("gpu-throughput.svg"),
        &[speed(false, false), speed(false, true), speed(true, false), speed(true, true)],
        2,
        footer,
    )
}

/// The GPU figures, from `--gpu-csv` or measured on the device here.
pub(super) fn gpu_plots(args: &PlotsArgs, stamp: &Stamp) -> Result<(), CliError> {
    let read = |path: &PathBuf, flag: &str| {
        std::fs::read_to_string(path)
            .map_err(|e| CliError::input(flag, format!("cannot read {}: {e}", path.display())))
    };
    let ours = match &args.gpu_csv {
        Some(path) => read(path, "--gpu-csv")?,
        None if attn::cuda::available() => {
            let lengths =
                if args.quick { vec![256, 512, 1024] } else { powers_of_two(512, 16_384) };
            crate::gpu_bench::measure(&crate::gpu_bench::GpuBenchArgs {
                seq: lengths,
                batch: 1,
                heads: 8,
                head_dim: 64,
                repeats: if args.quick { 2 } else { 5 },
                csv: None,
                smoke: false,
                causal_only: false,
                paper: false,
                paper_n: Vec::new(),
                paper_d: Vec::new(),
                window: None,
                softcap: None,
                packed: false,
                // the stages as they run by default, not every kernel version
                stages: ["naive", "chunked", "flash1", "flash2", "flash2-bf16"]
                    .map(String::from)
                    .to_vec(),
            })?
        }
        None => {
            println!(
                "GPU plots: skipped — no CUDA device found here and no --gpu-csv given (run \
                 `attn gpu-bench --csv FILE` on a GPU machine and pass it)."
            );
            return Ok(());
        }
    };
    let (device, rows) = parse(&ours, "--gpu-csv")?;
    let out = &args.out;
    write_file(&out.join("gpu.csv"), &ours)?;
    let mut sdpa = Vec::new();
    for (i, path) in args.sdpa_csv.iter().enumerate() {
        let text = read(path, "--sdpa-csv")?;
        let (comment, mut rows) = parse(&text, "--sdpa-csv")?;
        // A 16-bit run's backends are named with their dtype ("flash bf16").
        let dtype = ["bf16", "f16"].into_iter().find(|t| comment.contains(&format!(", {t};")));
        if let Some(t) = dtype {
            rows.iter_mut().for_each(|r| r.name = format!("{} {t}", r.name));
        }
        sdpa.extend(rows);
        let name = match (dtype, i) {
            (Some(t), _) => format!("sdpa-gpu-{t}.csv"),
            (None, 0) => "sdpa-gpu.csv".to_string(),
            (None, _) => format!("sdpa-gpu-{i}.csv"),
        };
        write_file(&out.join(name), &text)?;
    }
    let device = device.split(';').next().unwrap_or("").trim_start_matches("attn gpu-bench on ");
    let footer = format!("{device} · {} · {}", stamp.date, stamp.command);
    draw(out, &rows, &sdpa, &footer)?;
    println!("wrote {}/{{gpu-memory.svg,gpu-throughput.svg,gpu.csv}} ({device})", out.display());
    Ok(())
}
