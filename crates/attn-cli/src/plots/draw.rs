//! Line charts as SVG (plotters): log-scaled n on x, one line per stage, dashed lines for
//! models and predictions, the machine/date/command stamp under every figure.

use std::path::Path;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::prelude::*;

/// One line of a panel.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    pub dashed: bool,
}

impl Series {
    pub fn solid(label: impl Into<String>, color: RGBColor, points: Vec<(f64, f64)>) -> Self {
        Self { label: label.into(), points, color, dashed: false }
    }

    pub fn dashed(label: impl Into<String>, color: RGBColor, points: Vec<(f64, f64)>) -> Self {
        Self { label: label.into(), points, color, dashed: true }
    }
}

/// How a y axis is scaled and labelled.
#[derive(Debug, Clone, Copy)]
pub enum YAxis {
    /// Logarithmic, labelled as bytes (KiB, MiB, …).
    LogBytes,
    /// Linear from 0, labelled as numbers.
    Linear,
}

/// One chart: a title, axis descriptions and its lines.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub y_axis: YAxis,
    pub series: Vec<Series>,
    /// Where the legend sits (where the lines are not).
    pub legend: SeriesLabelPosition,
}

/// Powers of two from `lo` to `hi`, every `2^k`-th one so that at most `max` remain.
fn power_of_two_ticks(lo: f64, hi: f64, max: usize) -> Vec<f64> {
    let (a, b) = (lo.log2().ceil() as i32, hi.log2().floor() as i32);
    let mut step = 1;
    while (b - a) / step + 1 > max as i32 {
        step *= 2;
    }
    (a..=b).step_by(step as usize).map(|e| 2f64.powi(e)).collect()
}

/// The colour of each stage (and of the models drawn beside them).
pub fn stage_color(name: &str) -> RGBColor {
    match name {
        "naive" => RGBColor(214, 39, 40),
        "chunked" => RGBColor(255, 127, 14),
        "flash1" => RGBColor(31, 119, 180),
        "flash2" => RGBColor(44, 160, 44),
        "pytorch" => RGBColor(148, 103, 189),
        _ => RGBColor(90, 90, 90),
    }
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Draws `panels` on a grid of `cols` columns into the SVG file `path`, with `stamp` under it.
pub fn draw(path: &Path, panels: &[Panel], cols: usize, stamp: &str) -> DrawResult {
    let rows = panels.len().div_ceil(cols);
    let (w, h) = (560 * cols as u32, 420 * rows as u32 + 30);
    let root = SVGBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE)?;
    let (body, footer) = root.split_vertically(h - 30);
    for (area, panel) in body.split_evenly((rows, cols)).iter().zip(panels) {
        draw_panel(area, panel)?;
    }
    footer.draw_text(
        stamp,
        &("sans-serif", 13).into_font().color(&RGBColor(80, 80, 80)),
        (12, 8),
    )?;
    root.present()?;
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, panel: &Panel) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let points = panel.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points.filter(|(x, y)| x.is_finite() && y.is_finite() && *y > 0.0) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        return Ok(()); // nothing measured
    }
    let (x0, x1) = (x0 / 1.15, x1 * 1.15);
    let x_range = (x0..x1).log_scale().with_key_points(power_of_two_ticks(x0, x1, 9));
    match panel.y_axis {
        YAxis::LogBytes => {
            let (y0, y1) = (y0 / 1.5, y1 * 1.5);
            let y_range = (y0..y1).log_scale().with_key_points(power_of_two_ticks(y0, y1, 9));
            let label =
                |y: &f64| attn::core::memory::human_bytes(y.round() as u64).replace(".0 ", " ");
            chart(area, panel, x_range, y_range, &label)
        }
        YAxis::Linear => {
            let label = |y: &f64| format!("{y:.0}");
            chart(area, panel, x_range, 0.0..y1 * 1.1, &label)
        }
    }
}

fn chart<DB, X, Y>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    x: X,
    y: Y,
    y_label: &dyn Fn(&f64) -> String,
) -> DrawResult
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
    <X::CoordDescType as Ranged>::ValueType: Clone,
{
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(72)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc(&panel.x_desc)
        .y_desc(&panel.y_desc)
        .x_label_formatter(&|x| format!("{}", x.round() as u64))
        .y_label_formatter(&|v| y_label(v))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for s in &panel.series {
        let color = s.color;
        let style = color.stroke_width(2);
        let pts = s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite());
        let anno = if s.dashed {
            chart.draw_series(DashedLineSeries::new(pts.clone(), 7, 5, style))?
        } else {
            chart.draw_series(LineSeries::new(pts.clone(), style))?;
            chart.draw_series(pts.map(|p| Circle::new(p, 3, color.filled())))?
        };
        anno.label(&s.label).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(2))
        });
    }
    chart
        .configure_series_labels()
        .position(panel.legend.clone())
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}
