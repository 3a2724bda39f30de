//! What the notebooks in `notebooks/` share, so that each notebook shows attention and not
//! plumbing: charts that the evcxr Jupyter kernel shows inline ([`Figure`], plotters' evcxr
//! support),
//! the peak memory a call adds to the process ([`peak_rss`]) and the rows of the project's
//! measurement CSVs ([`read_csv`]). (Log-log slopes: `attn::core::memory::log_log_slope`.)

use std::collections::HashMap;
use std::error::Error;

use ndarray::ArrayView2;
use plotters::prelude::*;

/// An SVG chart: plotters' evcxr wrapper, which a notebook cell shows inline when it ends
/// with one (its `Debug` text is what the kernel displays).
pub use plotters::evcxr::SVGWrapper as Figure;

/// A chart of `size` pixels on a white background, drawn by `f`.
fn draw(
    size: (u32, u32),
    f: impl FnOnce(DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> Result<(), Box<dyn Error>>,
) -> Figure {
    plotters::evcxr::evcxr_figure(size, |root| {
        root.fill(&WHITE)?;
        f(root)
    })
}

/// A line chart of named series of (x, y) points, each axis linear or logarithmic.
pub fn lines(
    title: &str,
    (x_label, y_label): (&str, &str),
    (log_x, log_y): (bool, bool),
    series: &[(&str, Vec<(f64, f64)>)],
) -> Figure {
    let pts = series.iter().flat_map(|(_, p)| p.iter().copied());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in pts.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    let pad = |lo: f64, hi: f64, log: bool| {
        if log {
            (lo / 1.5, hi * 1.5)
        } else {
            let m = 0.05 * (hi - lo).max(1e-12);
            (lo - m, hi + m)
        }
    };
    let ((x0, x1), (y0, y1)) = (pad(x0, x1, log_x), pad(y0, y1, log_y));
    draw((720, 420), |root| {
        let mut b = ChartBuilder::on(&root);
        b.caption(title, ("sans-serif", 20)).margin(12).x_label_area_size(40).y_label_area_size(70);
        // The four axis combinations are four chart types in plotters.
        macro_rules! body {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw()?;
                for (i, (name, p)) in series.iter().enumerate() {
                    let color = Palette99::pick(i).to_rgba();
                    chart
                        .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))?
                        .label(*name)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                        });
                    chart.draw_series(p.iter().map(|&q| Circle::new(q, 3, color.filled())))?;
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .draw()?;
            }};
        }
        match (log_x, log_y) {
            (false, false) => body!(b.build_cartesian_2d(x0..x1, y0..y1)?),
            (true, false) => body!(b.build_cartesian_2d((x0..x1).log_scale(), y0..y1)?),
            (false, true) => body!(b.build_cartesian_2d(x0..x1, (y0..y1).log_scale())?),
            (true, true) => {
                body!(b.build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())?)
            }
        }
        Ok(())
    })
}

/// A matrix as coloured cells (row 0 at the top), white for the smallest finite value,
/// dark blue for the largest; −∞ (a removed score) in grey.
pub fn heatmap(title: &str, m: ArrayView2<'_, f64>) -> Figure {
    let (rows, cols) = m.dim();
    let finite = m.iter().copied().filter(|x| x.is_finite());
    let (lo, hi) = finite.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let cell = (360 / rows.max(cols)).clamp(6, 40) as u32;
    let size = (cols as u32 * cell + 90, rows as u32 * cell + 70);
    draw(size, |root| {
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(24)
            .y_label_area_size(30)
            .build_cartesian_2d(0..cols, rows..0)?;
        chart.configure_mesh().disable_mesh().x_desc("key j").y_desc("query i").draw()?;
        chart.draw_series(m.indexed_iter().map(|((i, j), &x)| {
            let color = if x.is_finite() {
                let t = if hi > lo { (x - lo) / (hi - lo) } else { 1.0 };
                RGBColor(
                    (255.0 * (1.0 - t)) as u8,
                    (255.0 * (1.0 - 0.8 * t)) as u8,
                    255 - (90.0 * t) as u8,
                )
            } else {
                RGBColor(170, 170, 170)
            };
            Rectangle::new([(j, i), (j + 1, i + 1)], color.filled())
        }))?;
        Ok(())
    })
}

/// Runs `f` and returns its result with the peak resident memory it added to the process,
/// in bytes, measured by the kernel (Linux: the high-water mark `VmHWM` of
/// /proc/self/status, reset through /proc/self/clear_refs first). Allocations of 64 KiB and
/// more are made to go straight to and from the kernel (`mallopt(M_MMAP_THRESHOLD)`), so
/// what an earlier call freed is not silently reused; `None` where the counters are
/// missing.
pub fn peak_rss<R>(f: impl FnOnce() -> R) -> (R, Option<u64>) {
    // SAFETY: mallopt only changes glibc's allocation policy for later allocations.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
    }
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = high_water_mark();
    let r = f();
    let after = high_water_mark();
    match (reset, before, after) {
        (true, Some(b), Some(a)) => (r, Some(a.saturating_sub(b))),
        _ => (r, None),
    }
}

fn high_water_mark() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The rows of one of the project's measurement CSVs (`#` lines are comments, the first
/// other line the header), each as column name → text.
pub fn read_csv(path: &str) -> std::io::Result<Vec<HashMap<String, String>>> {
    let text = std::fs::read_to_string(path)?;
    let mut lines = text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty());
    let header: Vec<String> =
        lines.next().unwrap_or_default().split(',').map(str::to_string).collect();
    Ok(lines
        .map(|l| header.iter().cloned().zip(l.split(',').map(str::to_string)).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_chart_is_svg_with_one_line_per_series() {
        let sq: Vec<(f64, f64)> = (1..6).map(|i| (i as f64, (i * i) as f64)).collect();
        let lin: Vec<(f64, f64)> = (1..6).map(|i| (i as f64, i as f64)).collect();
        for log in [(false, false), (true, true)] {
            let f = lines("t", ("x", "y"), log, &[("square", sq.clone()), ("linear", lin.clone())]);
            let svg = format!("{f:?}");
            assert!(svg.contains("<svg"));
            assert!(svg.contains("square") && svg.contains("linear"), "{log:?}");
            assert_eq!(svg.matches("<circle").count(), 10);
        }
    }

    #[test]
    fn a_heatmap_has_one_cell_per_entry_and_grey_for_minus_infinity() {
        let m = ndarray::arr2(&[[0.0, 1.0, f64::NEG_INFINITY], [2.0, 3.0, 4.0]]);
        let svg = format!("{:?}", heatmap("s", m.view()));
        assert!(svg.matches("<rect").count() >= 6);
        assert_eq!(svg.matches("fill=\"#AAAAAA\"").count(), 1);
    }

    #[test]
    fn peak_rss_sees_a_touched_64_mib_buffer() {
        let (len, peak) = peak_rss(|| {
            let v = vec![1u8; 64 << 20];
            std::hint::black_box(&v).len()
        });
        assert_eq!(len, 64 << 20);
        if let Some(p) = peak {
            // other tests run in this process at the same time: an upper bound with room
            assert!((60 << 20..160 << 20).contains(&p), "peak {p}");
        }
    }

    #[test]
    fn csv_rows_skip_comments() {
        let dir = std::env::temp_dir().join(format!("attn-nb-{}.csv", std::process::id()));
        std::fs::write(&dir, "# machine\na,b\n1,2\n3,4\n").unwrap();
        let rows = read_csv(dir.to_str().unwrap()).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1]["b"], "4");
    }
}
