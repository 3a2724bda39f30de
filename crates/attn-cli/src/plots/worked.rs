//! The book's worked example, every number from a trace of the real code: Q, K, V of four
//! rows in two dimensions (small integers, scale 1, so the scores are integers), blocks of
//! two, through the online softmax (one row), chunked attention and FlashAttention-2.
//! Written as Markdown tables the chapters include; `attn plots --only tiles` remakes them
//! and a test checks that the book's copies are what the code gives today.

use std::fmt::Write as _;
use std::path::Path;

use attn::core::KeyRange;
use attn::core::trace::{Step, StepKind, Trace};
use attn::{Inputs, Options};
use ndarray::Array4;

use super::tiles::worked_problem;
use super::write_file;
use crate::CliError;

/// The files this module writes, under the plots folder.
pub const FILES: [&str; 4] = [
    "worked-online-softmax.md",
    "worked-chunked.md",
    "worked-flash2.md",
    "worked-flash2-causal.md",
];

fn num(x: f32) -> String {
    let text = if x == f32::NEG_INFINITY {
        "−∞".into()
    } else if x == x.round() && x.abs() < 1e6 {
        format!("{x:.0}")
    } else {
        format!("{x:.4}")
    };
    text.replace('-', "−")
}

fn vector(xs: &[f32]) -> String {
    format!("({})", xs.iter().map(|&x| num(x)).collect::<Vec<_>>().join(", "))
}

fn opts(causal: bool) -> Options {
    Options {
        scale: Some(1.0),
        q_block: Some(2),
        k_block: Some(2),
        ..Options::default().causal(causal)
    }
}

fn traced(
    f: fn(&Inputs<'_>, &Options) -> attn::Result<(attn::Forward, Trace)>,
    causal: bool,
) -> Result<(attn::Forward, Trace), CliError> {
    let (q, k, v) = worked_problem();
    f(&Inputs::new(q.view(), k.view(), v.view()), &opts(causal))
        .map_err(|e| CliError { code: 1, message: format!("the worked example: {e}") })
}

/// Row `r` (within its block) of a step's accumulator.
fn acc_row(s: &Step, r: usize, d: usize) -> &[f32] {
    &s.acc[r * d..(r + 1) * d]
}

/// S = Q Kᵀ (scale 1) for the rows and keys of a step.
fn scores(q: &Array4<f32>, k: &Array4<f32>, s: &Step, r: usize) -> Vec<f32> {
    let i = s.rows.0 + r;
    (s.cols.0..s.cols.0 + s.cols.1)
        .map(|j| (0..q.dim().3).map(|c| q[[0, 0, i, c]] * k[[0, 0, j, c]]).sum())
        .collect()
}

fn header() -> String {
    let (q, k, v) = worked_problem();
    let rows = |a: &Array4<f32>| {
        (0..4).map(|i| vector(&[a[[0, 0, i, 0]], a[[0, 0, i, 1]]])).collect::<Vec<_>>().join(", ")
    };
    format!(
        "<!-- made by `attn plots --only tiles` from a trace of the code; do not edit -->\n\n\
         Q = {}; K = {}; V = {}; scale 1; blocks of 2.\n\n",
        rows(&q),
        rows(&k),
        rows(&v)
    )
}

/// Every worked-example file, into `out`.
pub fn worked_examples(out: &Path) -> Result<(), CliError> {
    for (name, text) in FILES.iter().zip(texts()?) {
        write_file(&out.join(name), &text)?;
    }
    Ok(())
}

/// The four files' text, in the order of [`FILES`].
pub fn texts() -> Result<Vec<String>, CliError> {
    let (q, k, _) = worked_problem();
    let d = 2;
    let (_, chunked) = traced(attn::chunked::cpu::forward_traced, false)?;
    let (fwd, flash2) = traced(attn::flash2::cpu::forward_traced, false)?;
    let (fwd_causal, flash2_causal) = traced(attn::flash2::cpu::forward_traced, true)?;

    // The online softmax: query row 1 alone, its keys in two pieces of two.
    let mut online = header();
    online.push_str(
        "| piece | keys | scores s | m | ℓ | w |\n| --- | --- | --- | ---: | ---: | --- |\n",
    );
    for s in chunked.steps.iter().filter(|s| s.rows.0 == 0) {
        let keys = format!("{}–{}", s.cols.0 + 1, s.cols.0 + s.cols.1);
        let (piece, sc) = match s.kind {
            StepKind::Finish => ("merged".to_string(), String::new()),
            _ => (format!("K{}", s.cols.0 / 2 + 1), vector(&scores(&q, &k, s, 0))),
        };
        let w = if s.kind == StepKind::Finish { "o = ".to_string() } else { String::new() };
        let _ = writeln!(
            online,
            "| {piece} | {keys} | {sc} | {} | {} | {w}{} |",
            num(s.m[0]),
            num(s.ell[0]),
            vector(acc_row(s, 0, d))
        );
    }
    let _ = writeln!(online, "\nlog-sum-exp of row 1: {}", num(fwd.lse[[0, 0, 0]]));

    // Chunked attention: each query chunk's key-chunk summaries, then the merge.
    let mut chunk_text = header();
    chunk_text.push_str(
        "| query chunk | step | row | scores | m | ℓ | values (merged: O) |\n\
         | --- | --- | ---: | --- | ---: | ---: | --- |\n",
    );
    for s in &chunked.steps {
        for r in 0..s.rows.1 {
            let (step, sc) = match s.kind {
                StepKind::Finish => ("merge".to_string(), String::new()),
                _ => (format!("summary of K{}", s.cols.0 / 2 + 1), vector(&scores(&q, &k, s, r))),
            };
            let _ = writeln!(
                chunk_text,
                "| Q{} | {step} | {} | {sc} | {} | {} | {} |",
                s.rows.0 / 2 + 1,
                s.rows.0 + r + 1,
                num(s.m[r]),
                num(s.ell[r]),
                vector(acc_row(s, r, d))
            );
        }
    }

    let flash2_table = |trace: &Trace, fwd: &attn::Forward, causal: bool| {
        let mut text = header();
        if causal {
            text.push_str(
                "Causal: tile (Q1, K2) is never visited; the diagonal tiles are cut.\n\n",
            );
        }
        text.push_str(
            "| step | tile | row | scores S (−∞: masked) | m_i | e^(m_old − m_i) | ℓ_i | Õ_i (finish: O_i) |\n\
             | ---: | --- | ---: | --- | ---: | ---: | ---: | --- |\n",
        );
        let keys = KeyRange::new(4, 4, causal, None);
        let mut step = 0;
        // m before the step; a query block starts from −∞ (no key seen)
        let mut m_old = vec![f32::NEG_INFINITY; 2];
        for s in &trace.steps {
            let tile = match s.kind {
                StepKind::Finish => format!("finish Q{}", s.rows.0 / 2 + 1),
                kind => {
                    step += 1;
                    let cut = if kind == StepKind::Cut { " (cut)" } else { "" };
                    format!("(Q{}, K{}){cut}", s.rows.0 / 2 + 1, s.cols.0 / 2 + 1)
                }
            };
            for r in 0..s.rows.1 {
                let i = s.rows.0 + r;
                let (sc, alpha) = match s.kind {
                    StepKind::Finish => (String::new(), String::new()),
                    _ => {
                        let mut row = scores(&q, &k, s, r);
                        for (c, x) in row.iter_mut().enumerate() {
                            if !(keys.start(i)..keys.end(i)).contains(&(s.cols.0 + c)) {
                                *x = f32::NEG_INFINITY;
                            }
                        }
                        let a = if m_old[r] == f32::NEG_INFINITY {
                            0.0
                        } else {
                            (m_old[r] - s.m[r]).exp()
                        };
                        (vector(&row), num(a))
                    }
                };
                let shown = if r == 0 { step.to_string() } else { String::new() };
                let shown = if s.kind == StepKind::Finish { String::new() } else { shown };
                let _ = writeln!(
                    text,
                    "| {shown} | {tile} | {} | {sc} | {} | {alpha} | {} | {} |",
                    i + 1,
                    num(s.m[r]),
                    num(s.ell[r]),
                    vector(acc_row(s, r, d))
                );
            }
            m_old = match s.kind {
                StepKind::Finish => vec![f32::NEG_INFINITY; 2],
                _ => s.m.clone(),
            };
        }
        let lse: Vec<f32> = fwd.lse.iter().copied().collect();
        let _ = writeln!(text, "\nlog-sum-exp L = m + log ℓ: {}", vector(&lse));
        text
    };
    Ok(vec![
        online,
        chunk_text,
        flash2_table(&flash2, &fwd, false),
        flash2_table(&flash2_causal, &fwd_causal, true),
    ])
}
