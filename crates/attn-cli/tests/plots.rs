//! `attn plots --quick`: every figure and its numbers are written, the numbers are finite,
//! and the measured memory grows as n² for naive attention and at most linearly for the
//! memory-efficient stages.

use std::path::Path;
use std::process::Command;

use attn::core::memory::log_log_slope;

/// The rows of a CSV written by `attn plots`: (header, rows), comment lines skipped.
fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines().filter(|l| !l.starts_with('#'));
    let header = lines.next().unwrap().split(',').map(String::from).collect();
    let rows = lines.map(|l| l.split(',').map(String::from).collect()).collect();
    (header, rows)
}

#[test]
fn quick_plots_write_every_file_with_the_expected_slopes() {
    let dir = std::env::temp_dir().join(format!("attn-plots-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_attn"))
        .args(["plots", "--quick", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    if !attn::cuda::available() {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("GPU plots: skipped"), "{stdout}");
    }

    for file in ["memory", "throughput", "traffic-vs-n", "traffic-vs-sram"]
        .iter()
        .flat_map(|f| [format!("{f}.svg"), format!("{f}.csv")])
    {
        let path = dir.join(&file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        if file.ends_with(".svg") {
            assert!(text.starts_with("<svg") && text.contains("</svg>"), "{file} is not an SVG");
            assert!(text.contains("attn plots --quick"), "{file} lacks the command stamp");
            assert!(text.matches("<polyline").count() >= 4, "{file} has fewer than 4 lines");
        } else {
            assert!(text.contains("# machine: ") && text.contains("# date: 20"), "{file} stamp");
            let (header, rows) = read_csv(&path);
            assert!(rows.len() >= 8, "{file}: {} rows", rows.len());
            for row in &rows {
                assert_eq!(row.len(), header.len(), "{file}: {row:?}");
                for (name, cell) in header.iter().zip(row).skip(1) {
                    let x: f64 = cell.parse().unwrap_or_else(|_| panic!("{file} {name}: {cell}"));
                    assert!(x.is_finite() && x >= 0.0, "{file} {name}: {x}");
                }
            }
        }
    }

    // Memory slopes on the log-log data, over the three largest n.
    let (header, rows) = read_csv(&dir.join("memory.csv"));
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    for (stage, lo, hi) in
        [("naive", 1.8, 2.2), ("chunked", 0.0, 1.2), ("flash1", 0.0, 1.2), ("flash2", 0.0, 1.2)]
    {
        for bytes in ["forward_bytes", "forward_backward_bytes"] {
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r[0] == stage)
                .map(|r| (r[col("n")].parse().unwrap(), r[col(bytes)].parse().unwrap()))
                .collect();
            assert_eq!(pts.len(), 4, "{stage}: {pts:?}");
            let s = log_log_slope(&pts[pts.len() - 3..]);
            assert!((lo..=hi).contains(&s), "{stage} {bytes}: slope {s:.2} not in {lo}..{hi}");
        }
    }

    // Traffic: naive's count is independent of M; flash1's falls as M grows.
    let (header, rows) = read_csv(&dir.join("traffic-vs-sram.csv"));
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let flash1: Vec<f64> = rows
        .iter()
        .filter(|r| r[0] == "flash1")
        .map(|r| r[col("forward_bytes")].parse().unwrap())
        .collect();
    assert!(flash1.windows(2).all(|w| w[1] < w[0]), "flash1 traffic against M: {flash1:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gpu_figures_are_drawn_from_the_recorded_results() {
    let dir = std::env::temp_dir().join(format!("attn-gpu-plots-{}", std::process::id()));
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../book/src/data");
    let out = Command::new(env!("CARGO_BIN_EXE_attn"))
        .args(["plots", "--only", "gpu", "--out"])
        .arg(&dir)
        .arg("--gpu-csv")
        .arg(data.join("attn-gpu-h100.csv"))
        .arg("--sdpa-csv")
        .arg(data.join("sdpa-gpu-h100.csv"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for file in ["gpu-memory.svg", "gpu-throughput.svg"] {
        let svg = std::fs::read_to_string(dir.join(file)).unwrap();
        assert!(svg.contains("H100") && svg.contains("PyTorch SDPA math"), "{file}");
        // naive, chunked, math and efficient lines in every panel
        assert!(svg.matches("<polyline").count() >= 8, "{file}");
    }
    let (header, rows) = read_csv(&dir.join("gpu.csv"));
    assert_eq!(header[0], "stage");
    for stage in ["naive", "chunked", "flash2"] {
        let n = rows.iter().filter(|r| r[0] == stage).count();
        assert_eq!(n, 6, "{stage}: 2 masks x 3 lengths");
    }
    // A broken file is refused with the flag named.
    std::fs::write(dir.join("bad.csv"), "stage,n\nnaive,x\n").unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_attn"))
        .args(["plots", "--only", "gpu", "--out"])
        .arg(&dir)
        .arg("--gpu-csv")
        .arg(dir.join("bad.csv"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--gpu-csv"));
    std::fs::remove_dir_all(&dir).unwrap();
}
