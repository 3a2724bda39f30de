//! `attn plots --only tiles`: the tile pictures and their numbers (which tiles each stage's
//! loops visit, in which order, which they skip or cut), and the worked example the book
//! includes — checked against the book's copies (no drift) and against the float64 reference.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use attn::Options;

fn plots(dir: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_attn"))
        .args(["plots", "--only", "tiles", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// (panel, q block, k block) → (fate, step) from a tiles CSV.
fn tiles(path: &Path) -> HashMap<(String, usize, usize), (String, Option<usize>)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines().filter(|l| !l.starts_with('#'));
    assert_eq!(lines.next().unwrap(), "panel,n_q,n_k,b_r,b_c,q_block,k_block,fate,step");
    lines
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            assert_eq!(c.len(), 9, "{l}");
            let key = (c[0].to_string(), c[5].parse().unwrap(), c[6].parse().unwrap());
            (key, (c[7].to_string(), c[8].parse().ok()))
        })
        .collect()
}

fn count(
    t: &HashMap<(String, usize, usize), (String, Option<usize>)>,
    panel: &str,
    fate: &str,
) -> usize {
    t.iter().filter(|((p, _, _), (f, _))| p == panel && f == fate).count()
}

fn step(
    t: &HashMap<(String, usize, usize), (String, Option<usize>)>,
    panel: &str,
    i: usize,
    j: usize,
) -> Option<usize> {
    t[&(panel.to_string(), i, j)].1
}

#[test]
fn tile_pictures_show_each_stages_loops() {
    let dir = std::env::temp_dir().join(format!("attn-tiles-{}", std::process::id()));
    plots(&dir);
    for name in ["chunked", "flash1", "flash2", "gpu"] {
        let svg = std::fs::read_to_string(dir.join(format!("tiles-{name}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("attn plots --only tiles"), "{name}");
        assert!(svg.matches("<rect").count() >= 64, "tiles-{name}.svg draws too few tiles");
    }
    // 8 × 8 causal grids: 36 tiles visited (8 cut on the diagonal), 28 skipped
    let f2 = tiles(&dir.join("tiles-flash2.csv"));
    let f1 = tiles(&dir.join("tiles-flash1.csv"));
    let ch = tiles(&dir.join("tiles-chunked.csv"));
    for (t, panel) in [(&f2, "flash2-causal"), (&f1, "flash1-causal"), (&ch, "chunked-causal")] {
        assert_eq!(
            (count(t, panel, "full"), count(t, panel, "cut"), count(t, panel, "skipped")),
            (28, 8, 28),
            "{panel}"
        );
        let mut steps: Vec<usize> =
            t.iter().filter(|((p, _, _), _)| p == panel).filter_map(|(_, (_, s))| *s).collect();
        steps.sort();
        assert_eq!(steps, (1..=36).collect::<Vec<_>>(), "{panel}: steps are not 1..36");
    }
    // loop order: FlashAttention-2 walks a query block's row, FlashAttention-1 a key block's column
    assert_eq!(step(&f2, "flash2-causal", 2, 2), Some(3));
    assert_eq!(step(&f1, "flash1-causal", 2, 2), Some(9));
    assert_eq!(step(&f1, "flash1-causal", 8, 1), Some(8));
    assert_eq!(step(&f2, "flash2-causal", 8, 1), Some(29));
    // a window of 20 keys on blocks of 8: four key blocks a query block once past the start
    assert_eq!(count(&f2, "flash2-window", "skipped"), 64 - 26);
    assert_eq!(step(&f2, "flash2-window", 5, 1), None);
    assert_eq!(t_fate(&f2, "flash2-window", 5, 2), "cut");
    assert_eq!(t_fate(&f2, "flash2-window", 5, 4), "full");
    // n_q = 40 < n_k = 64, causal from the bottom right: the first query block sees 25 keys
    assert_eq!(t_fate(&f2, "flash2-cross", 1, 3), "full");
    assert_eq!(t_fate(&f2, "flash2-cross", 1, 4), "cut");
    assert_eq!(t_fate(&f2, "flash2-cross", 1, 5), "skipped");
    let _ = std::fs::remove_dir_all(&dir);
}

fn t_fate<'a>(
    t: &'a HashMap<(String, usize, usize), (String, Option<usize>)>,
    panel: &str,
    i: usize,
    j: usize,
) -> &'a str {
    &t[&(panel.to_string(), i, j)].0
}

fn book_plots() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../book/src/plots")
}

#[test]
fn the_books_worked_example_is_what_the_code_gives() {
    let dir = std::env::temp_dir().join(format!("attn-worked-{}", std::process::id()));
    plots(&dir);
    for name in attn_cli_worked_files() {
        let made = std::fs::read_to_string(dir.join(name)).unwrap();
        let book = std::fs::read_to_string(book_plots().join(name)).unwrap_or_default();
        assert!(
            same_up_to_last_place(&made, &book),
            "book/src/plots/{name} is not what the code gives: run `attn plots --only tiles`\n{made}"
        );
    }
    // and the outputs it ends with are the float64 reference's, to the four places shown
    let q = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]];
    let k = [[1.0, 1.0], [2.0, 0.0], [0.0, 1.0], [1.0, -1.0]];
    let v = [[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 3.0]];
    let four =
        |x: [[f32; 2]; 4]| ndarray::Array4::from_shape_fn((1, 1, 4, 2), |(_, _, i, c)| x[i][c]);
    let (q, k, v) = (four(q), four(k), four(v));
    let text = std::fs::read_to_string(dir.join("worked-flash2.md")).unwrap();
    let inputs = attn::Inputs::new(q.view(), k.view(), v.view());
    let opts = Options { scale: Some(1.0), ..Options::default() };
    let want = attn::core::reference::forward(&inputs, &opts).unwrap();
    for i in 0..4 {
        let shown = |x: f64| format!("{x:.4}").replace('-', "−");
        let o = format!("({}, {})", shown(want.out[[0, 0, i, 0]]), shown(want.out[[0, 0, i, 1]]));
        let row = format!("| finish Q{} | {} |", i / 2 + 1, i + 1);
        let line = text.lines().find(|l| l.contains(&row)).unwrap_or_else(|| panic!("{row}"));
        assert!(line.ends_with(&format!("{o} |")), "row {}: {line} ≠ {o}", i + 1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn attn_cli_worked_files() -> [&'static str; 4] {
    ["worked-online-softmax.md", "worked-chunked.md", "worked-flash2.md", "worked-flash2-causal.md"]
}

/// The same text, numbers allowed to differ by one unit in the last of four places shown (a
/// host's exp may round a last bit the other way, and carry into the fourth place).
fn same_up_to_last_place(a: &str, b: &str) -> bool {
    let tokens = |t: &str| -> Vec<String> {
        t.replace('−', "-")
            .split(|c: char| c.is_whitespace() || "(),|".contains(c))
            .filter(|w| !w.is_empty())
            .map(String::from)
            .collect()
    };
    let (ta, tb) = (tokens(a), tokens(b));
    ta.len() == tb.len()
        && ta.iter().zip(&tb).all(|(x, y)| match (x.parse::<f64>(), y.parse::<f64>()) {
            (Ok(x), Ok(y)) => (x - y).abs() <= 1.5e-4,
            _ => x == y,
        })
}
