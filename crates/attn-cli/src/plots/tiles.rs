//! `attn plots --only tiles`: the tile grids of the tiled stages, drawn from their traces
//! (`forward_traced`): which tiles each loop visits and in what order, which causal masking
//! and the window skip or cut, and how the GPU's thread blocks share out the query blocks;
//! and the book's worked example (n = 4, d = 2, blocks of 2), every number from a trace.

use std::fmt::Write as _;
use std::path::Path;

use attn::core::trace::{StepKind, TileFate, Trace};
use attn::{Inputs, Options, Shape, Window};
use ndarray::Array4;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{Stamp, write_file};
use crate::CliError;

type Traced = fn(&Inputs<'_>, &Options) -> attn::Result<(attn::Forward, Trace)>;

/// What the number in a visited tile says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Label {
    /// Its step in the loops, from 1, one head's loops run one after another.
    Step,
    /// The thread block that computes it (one per query block of a head) and, after the
    /// dot, its step inside that block.
    ThreadBlock,
}

/// One grid of a figure.
struct TilePanel {
    /// The panel's name in the CSV.
    slug: &'static str,
    title: String,
    trace: Trace,
    label: Label,
}

fn trace_of(traced: Traced, shape: Shape, opts: &Options) -> Result<Trace, CliError> {
    let (q, k, v) = attn::core::random::qkv(&shape, 7);
    let inputs = Inputs::new(q.view(), k.view(), v.view());
    traced(&inputs, opts)
        .map(|(_, t)| t)
        .map_err(|e| CliError { code: 1, message: format!("tracing: {e}") })
}

fn blocks(opts: Options, (b_r, b_c): (usize, usize)) -> Options {
    Options { q_block: Some(b_r), k_block: Some(b_c), ..opts }
}

/// Every tile figure and the worked example, into `out`.
pub fn tile_plots(out: &Path, stamp: &Stamp) -> Result<(), CliError> {
    let causal = blocks(Options::default().causal(true), (8, 8));
    let window = Options { window: Some(Window::new(20, 0)), ..causal.clone() };
    let grid = Shape::new(1, 1, 64, 4);
    let (chunked, flash1, flash2): (Traced, Traced, Traced) = (
        attn::chunked::cpu::forward_traced,
        attn::flash1::cpu::forward_traced,
        attn::flash2::cpu::forward_traced,
    );
    let panel = |slug, title: &str, traced, shape, opts: &Options| -> Result<TilePanel, CliError> {
        let trace = trace_of(traced, shape, opts)?;
        Ok(TilePanel { slug, title: title.into(), trace, label: Label::Step })
    };
    let figures: Vec<(&str, Vec<TilePanel>)> = vec![
        (
            "tiles-chunked",
            vec![panel(
                "chunked-causal",
                "chunked: query chunks outside, causal",
                chunked,
                grid,
                &causal,
            )?],
        ),
        (
            "tiles-flash1",
            vec![panel(
                "flash1-causal",
                "FlashAttention-1: K/V blocks outside, causal",
                flash1,
                grid,
                &causal,
            )?],
        ),
        (
            "tiles-flash2",
            vec![
                panel(
                    "flash2-causal",
                    "FlashAttention-2: query blocks outside, causal",
                    flash2,
                    grid,
                    &causal,
                )?,
                panel("flash2-window", "sliding window (20, 0), causal", flash2, grid, &window)?,
                panel(
                    "flash2-cross",
                    "causal, n_q = 40 < n_k = 64 (bottom-right)",
                    flash2,
                    Shape::new(1, 1, 40, 4).with_n_k(64),
                    &causal,
                )?,
            ],
        ),
        ("tiles-gpu", vec![gpu_panel()?]),
    ];
    for (name, panels) in &figures {
        draw(&out.join(format!("{name}.svg")), panels, stamp)
            .map_err(|e| CliError { code: 1, message: format!("cannot draw {name}.svg: {e}") })?;
        write_file(&out.join(format!("{name}.csv")), &csv(name, panels, stamp))?;
    }
    super::worked::worked_examples(out)
}

/// FlashAttention-2 on the GPU at d = 64: one thread block per query block of the shipped
/// tensor-core forward, its keys in steps of the kernel's key tile.
fn gpu_panel() -> Result<TilePanel, CliError> {
    let d = 64;
    let (rows, keys) = attn::flash2::tc::forward_block_tile(d);
    let n = 8 * rows;
    let opts = blocks(Options::default().causal(true), (rows, keys));
    Ok(TilePanel {
        slug: "gpu-causal",
        title: format!("GPU: a thread block per {rows} query rows, {keys} keys a step, causal"),
        trace: trace_of(attn::flash2::cpu::forward_traced, Shape::new(1, 1, n, d), &opts)?,
        label: Label::ThreadBlock,
    })
}

const FULL: RGBColor = RGBColor(120, 170, 220);
const CUT: RGBColor = RGBColor(250, 190, 110);
const SKIPPED: RGBColor = RGBColor(238, 238, 238);
/// Thread blocks, by query block (the GPU picture).
const BLOCKS: [RGBColor; 4] = [
    RGBColor(120, 170, 220),
    RGBColor(150, 205, 150),
    RGBColor(205, 170, 220),
    RGBColor(240, 200, 120),
];

/// A colour halfway to white: a cut tile of a thread block.
fn paler(c: RGBColor) -> RGBColor {
    let half = |x: u8| ((u16::from(x) + 255) / 2) as u8;
    RGBColor(half(c.0), half(c.1), half(c.2))
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(path: &Path, panels: &[TilePanel], stamp: &Stamp) -> DrawResult {
    let (pw, ph) = (420u32, 470u32);
    let (w, h) = (pw * panels.len() as u32, ph + 60);
    let root = SVGBackend::new(path, (w.max(620), h)).into_drawing_area();
    root.fill(&WHITE)?;
    let (body, footer) = root.split_vertically(h - 30);
    let (body, legend) = body.split_vertically(ph);
    for (i, panel) in panels.iter().enumerate() {
        let area = body.margin(0, 0, i as u32 * pw, 0);
        draw_grid(&area, panel, pw)?;
    }
    let small = ("sans-serif", 13).into_font();
    let mut x = 12;
    let legend_items = if panels.iter().any(|p| p.label == Label::ThreadBlock) {
        [
            (BLOCKS[0], "thread block 1 (colour: block; label: block·step)"),
            (paler(BLOCKS[0]), "paler: cut by causal masking"),
            (SKIPPED, "skipped (never visited)"),
        ]
    } else {
        [
            (FULL, "full tile"),
            (CUT, "cut by causal masking or the window"),
            (SKIPPED, "skipped (never visited)"),
        ]
    };
    for (color, what) in legend_items {
        legend.draw(&Rectangle::new([(x, 6), (x + 14, 20)], color.filled()))?;
        legend.draw_text(what, &small.color(&BLACK), (x + 20, 7))?;
        x += 30 + 7 * what.chars().count() as i32;
    }
    footer.draw_text(&stamp.footer(), &small.color(&RGBColor(80, 80, 80)), (12, 8))?;
    root.present()?;
    Ok(())
}

fn draw_grid<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    panel: &TilePanel,
    width: u32,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let trace = &panel.trace;
    let (t_r, t_c) = trace.grid.tiles();
    let (left, top) = (44i32, 54i32);
    let cell = ((width as i32 - left - 16) / t_c as i32).min((400 - top) / t_r as i32);
    area.draw_text(&panel.title, &("sans-serif", 14).into_font().color(&BLACK), (10, 8))?;
    let (b_r, b_c) = trace.grid.blocks;
    let sub =
        format!("n_q = {}, n_k = {}, B_r = {b_r}, B_c = {b_c}", trace.grid.n_q, trace.grid.n_k);
    area.draw_text(&sub, &("sans-serif", 12).into_font().color(&RGBColor(90, 90, 90)), (10, 26))?;
    let centred = |size| {
        ("sans-serif", size).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Center))
    };
    let label_size = if cell >= 36 { 13 } else { 10 };
    for j in 0..t_c {
        let x = left + j as i32 * cell + cell / 2;
        area.draw_text(&format!("K{}", j + 1), &centred(11), (x, top - 9))?;
    }
    let fates = trace.fates(0, 0);
    for (i, row) in fates.iter().enumerate() {
        let y = top + i as i32 * cell;
        area.draw_text(&format!("Q{}", i + 1), &centred(11), (left - 16, y + cell / 2))?;
        let mut inside_block = 0;
        for (j, fate) in row.iter().enumerate() {
            let x = left + j as i32 * cell;
            let (color, text) = match (*fate, panel.label) {
                (TileFate::Skipped, _) => (SKIPPED, String::new()),
                (TileFate::Visited { n, kind }, Label::Step) => {
                    (if kind == StepKind::Cut { CUT } else { FULL }, (n + 1).to_string())
                }
                (TileFate::Visited { kind, .. }, Label::ThreadBlock) => {
                    inside_block += 1;
                    let base = BLOCKS[i % BLOCKS.len()];
                    let color = if kind == StepKind::Cut { paler(base) } else { base };
                    (color, format!("{}·{inside_block}", i + 1))
                }
            };
            area.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], color.filled()))?;
            area.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], WHITE.stroke_width(1)))?;
            if !text.is_empty() {
                area.draw_text(&text, &centred(label_size), (x + cell / 2, y + cell / 2))?;
            }
        }
    }
    Ok(())
}

/// The figure's numbers: one line per tile of every panel.
fn csv(name: &str, panels: &[TilePanel], stamp: &Stamp) -> String {
    let mut text = stamp.csv_header(&format!("{name}: the tile grids of the tiled stages' loops"));
    text.push_str("panel,n_q,n_k,b_r,b_c,q_block,k_block,fate,step\n");
    for p in panels {
        let g = p.trace.grid;
        for (i, row) in p.trace.fates(0, 0).iter().enumerate() {
            for (j, fate) in row.iter().enumerate() {
                let (fate, step) = match fate {
                    TileFate::Skipped => ("skipped", String::new()),
                    TileFate::Visited { n, kind } => (kind.name(), (n + 1).to_string()),
                };
                let (b_r, b_c) = g.blocks;
                let _ = writeln!(
                    text,
                    "{},{},{},{b_r},{b_c},{},{},{fate},{step}",
                    p.slug,
                    g.n_q,
                    g.n_k,
                    i + 1,
                    j + 1
                );
            }
        }
    }
    text
}

/// The worked example's problem: n = 4, d = 2, blocks of 2, scale 1, small integers.
pub(super) fn worked_problem() -> (Array4<f32>, Array4<f32>, Array4<f32>) {
    let q = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]];
    let k = [[1.0, 1.0], [2.0, 0.0], [0.0, 1.0], [1.0, -1.0]];
    let v = [[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 3.0]];
    let four = |x: [[f32; 2]; 4]| Array4::from_shape_fn((1, 1, 4, 2), |(_, _, i, c)| x[i][c]);
    (four(q), four(k), four(v))
}
