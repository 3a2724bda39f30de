//! The `attn` binary as a user meets it: results that match the float64 reference, and
//! for every bad input exit status 2, one line naming the flag, and no output file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use attn::core::metrics::compare;
use attn::core::reference::RefProblem;
use attn::core::testing::{AlibiKind, BiasKind, Case, MaskKind};
use attn::{Inputs, Mask, Shape};
use ndarray::{Array3, Array4, ArrayD};
use ndarray_npy::{read_npy, write_npy};

/// Every stage, as the CLI names it, with block sizes that do not divide the lengths.
const STAGES: &[&[&str]] = &[
    &["--algo", "naive"],
    &["--algo", "chunked"],
    &["--algo", "chunked", "--q-block", "7", "--k-block", "5"],
    &["--algo", "chunked", "--q-block", "1", "--k-block", "1000"],
    &["--algo", "flash1"],
    &["--algo", "flash1", "--sram", "1K"],
    &["--algo", "flash1", "--q-block", "3", "--k-block", "11"],
    &["--algo", "flash2"],
    &["--algo", "flash2", "--q-block", "5", "--k-block", "3"],
    &["--algo", "ring"],
    &["--algo", "ring", "--ranks", "3", "--q-block", "4", "--k-block", "3"],
    &["--algo", "ring", "--ranks", "8"],
    &[],
];

fn dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn attn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attn")).args(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes a case's tensors and runs `attn run` on them, forward and backward, then checks
/// every output file against the float64 reference.
fn run_case(
    name: &str,
    algo: &[&str],
    case: &Case,
    mask_as_4d_file: Option<ArrayD<bool>>,
    bias_file: Option<ArrayD<f32>>,
) {
    let d = dir(name);
    let data = case.build();
    write_npy(d.join("q.npy"), &data.q).unwrap();
    write_npy(d.join("k.npy"), &data.k).unwrap();
    write_npy(d.join("v.npy"), &data.v).unwrap();
    write_npy(d.join("do.npy"), &data.d_out).unwrap();
    let mut args: Vec<String> = ["run", "--q", s(&d.join("q.npy")), "--k", s(&d.join("k.npy"))]
        .iter()
        .chain(algo)
        .map(|x| x.to_string())
        .collect();
    for (flag, file) in [
        ("--v", "v.npy"),
        ("--out", "o.npy"),
        ("--lse", "lse.npy"),
        ("--grad-out", "do.npy"),
        ("--dq", "dq.npy"),
        ("--dk", "dk.npy"),
        ("--dv", "dv.npy"),
    ] {
        args.push(flag.into());
        args.push(s(&d.join(file)).into());
    }
    if let Some(m) = &data.mask2 {
        write_npy(d.join("mask.npy"), m).unwrap();
        args.extend(["--mask".into(), s(&d.join("mask.npy")).into()]);
    }
    if let Some(m) = &mask_as_4d_file {
        write_npy(d.join("mask.npy"), m).unwrap();
        args.extend(["--mask".into(), s(&d.join("mask.npy")).into()]);
    }
    if let Some(b) = &bias_file {
        write_npy(d.join("bias.npy"), b).unwrap();
        args.extend(["--bias".into(), s(&d.join("bias.npy")).into()]);
    }
    if data.opts.causal {
        args.push("--causal".into());
    }
    if let Some(scale) = data.opts.scale {
        args.extend(["--scale".into(), scale.to_string()]);
    }
    if let Some(dr) = data.opts.dropout {
        args.extend(["--dropout".into(), dr.p.to_string(), "--seed".into(), dr.seed.to_string()]);
    }
    if let Some(w) = data.opts.window {
        args.push(format!("--window={},{}", w.left, w.right));
    }
    if let Some(c) = data.opts.softcap {
        args.extend(["--softcap".into(), c.to_string()]);
    }
    if let Some(a) = &data.alibi {
        // one slope per head as the 1-D [heads] file, per batch entry as 2-D
        if case.alibi == AlibiKind::PerHead {
            write_npy(d.join("alibi.npy"), &a.row(0).to_owned()).unwrap();
        } else {
            write_npy(d.join("alibi.npy"), a).unwrap();
        }
        args.extend(["--alibi".into(), s(&d.join("alibi.npy")).into()]);
    }
    let want_dbias = case.bias_grad && bias_file.is_some();
    let bias_file_shape = bias_file.as_ref().map(|b| b.shape().to_vec());
    if want_dbias {
        args.extend(["--dbias".into(), s(&d.join("dbias.npy")).into()]);
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = attn(&arg_refs);
    assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));

    // The reference on the same tensors (the mask and bias as the CLI was given them).
    let mask4 = mask_as_4d_file.map(|m| m.into_dimensionality::<ndarray::Ix4>().unwrap());
    let bias4 = bias_file.map(|b| {
        let mut shape = vec![1; 4 - b.ndim()];
        shape.extend(b.shape());
        b.into_shape_with_order(shape).unwrap().into_dimensionality::<ndarray::Ix4>().unwrap()
    });
    let mut inputs = Inputs::new(data.q.view(), data.k.view(), data.v.view());
    if let Some(m) = &data.mask2 {
        inputs = inputs.with_mask(Mask::KeyPadding(m.view()));
    }
    if let Some(m) = &mask4 {
        inputs = inputs.with_mask(Mask::Full(m.view()));
    }
    if let Some(b) = &bias4 {
        inputs = inputs.with_bias(b.view());
    }
    if let Some(a) = &data.alibi {
        inputs = inputs.with_alibi(a.view());
    }
    let opts = attn::Options { bias_grad: want_dbias, ..data.opts.clone() };
    let r = RefProblem::from_inputs(&inputs, &opts).unwrap();
    let rf = r.forward();
    let rg = r.backward(&data.d_out.mapv(f64::from));
    let o: Array4<f32> = read_npy(d.join("o.npy")).unwrap();
    let lse: Array3<f32> = read_npy(d.join("lse.npy")).unwrap();
    assert!(compare(o.view(), rf.out.view()).within(1e-5, 3e-4), "{name}: out");
    assert!(compare(lse.view(), rf.lse.view()).within(1e-5, 3e-4), "{name}: lse");
    for (file, reference) in [("dq.npy", &rg.dq), ("dk.npy", &rg.dk), ("dv.npy", &rg.dv)] {
        let g: Array4<f32> = read_npy(d.join(file)).unwrap();
        let e = compare(g.view(), reference.view());
        assert!(e.within(1e-4, 3e-3), "{name}: {file} {e:?}");
    }
    if want_dbias {
        let g: ArrayD<f32> = read_npy(d.join("dbias.npy")).unwrap();
        let file_shape = bias_file_shape.unwrap();
        assert_eq!(g.shape(), file_shape, "{name}: dbias is not in the bias file's shape");
        let reference = rg.dbias.as_ref().unwrap();
        let g = g.into_shape_with_order(reference.dim()).unwrap();
        let e = compare(g.view(), reference.view());
        assert!(e.within(1e-4, 3e-3), "{name}: dbias {e:?}");
    }
}

#[test]
fn run_matches_the_reference_on_plain_self_attention() {
    for algo in STAGES {
        run_case("plain", algo, &Case::new(Shape::new(2, 3, 33, 16), 1), None, None);
    }
}

#[test]
fn run_matches_the_reference_with_causal_cross_attention_gqa_and_key_padding() {
    let case = Case {
        causal: true,
        mask: MaskKind::KeyPadding,
        ..Case::new(Shape::new(2, 4, 19, 24).with_n_k(45).with_kv_heads(2), 2)
    };
    for algo in STAGES {
        run_case("cross-gqa", algo, &case, None, None);
    }
    // --deterministic is accepted by every stage (it changes only the CUDA flash2 backward).
    run_case("cross-gqa-det", &["--algo", "flash2", "--deterministic"], &case, None, None);
}

#[test]
fn run_matches_the_reference_with_broadcast_mask_low_rank_bias_dropout_and_scale() {
    let case = Case {
        causal: true,
        dropout: Some(0.25),
        scale: Some(0.3),
        bias: BiasKind::None,
        ..Case::new(Shape::new(1, 2, 40, 8).with_n_k(23).with_kv_heads(1), 3)
    };
    // A 4-D mask broadcast over batch and heads, and a 2-D bias [n_q, n_k] that the CLI
    // broadcasts like numpy.
    let mask = attn::core::random::mask((1, 1, 40, 23), 0.8, 5).into_dyn();
    let bias = attn::core::random::bias((40, 23), 0.1, 6).into_dyn();
    for algo in STAGES {
        run_case("broadcast", algo, &case, Some(mask.clone()), Some(bias.clone()));
    }
}

#[test]
fn run_matches_the_reference_with_window_softcap_alibi_and_dbias() {
    let shape = Shape::new(2, 4, 37, 16).with_n_k(29).with_kv_heads(2);
    let cases = [
        Case { window: Some((6, 3)), softcap: Some(2.5), bias_grad: true, ..Case::new(shape, 7) },
        Case {
            window: Some((-1, 4)),
            causal: true,
            alibi: AlibiKind::PerHead,
            bias_grad: true,
            ..Case::new(shape, 8)
        },
        Case {
            window: Some((5, -1)),
            alibi: AlibiKind::PerBatchHead,
            softcap: Some(1.0),
            dropout: Some(0.2),
            ..Case::new(shape, 9)
        },
    ];
    // A bias [heads, 1, n_k] (broadcast over batch and queries): dBias comes back in that shape.
    let bias = attn::core::random::bias((4, 1, 29), 0.0, 10).into_dyn();
    for (i, case) in cases.iter().enumerate() {
        for algo in STAGES {
            run_case(&format!("mods-{i}"), algo, case, None, Some(bias.clone()));
        }
    }
}

/// Runs `attn` on a small valid problem with one thing broken by `edit`, and checks the
/// exit status, the one-line message naming `flag`, and that no output was written.
fn assert_rejected(name: &str, flag: &str, edit: impl FnOnce(&Path, &mut Vec<String>)) {
    let d = dir(name);
    let shape = Shape::new(1, 2, 8, 4);
    let (q, k, v) = attn::core::random::qkv(&shape, 1);
    write_npy(d.join("q.npy"), &q).unwrap();
    write_npy(d.join("k.npy"), &k).unwrap();
    write_npy(d.join("v.npy"), &v).unwrap();
    let mut args: Vec<String> = vec!["run".into(), "--algo".into(), "naive".into()];
    for (f, file) in [
        ("--q", "q.npy"),
        ("--k", "k.npy"),
        ("--v", "v.npy"),
        ("--out", "o.npy"),
        ("--lse", "lse.npy"),
    ] {
        args.push(f.into());
        args.push(s(&d.join(file)).into());
    }
    edit(&d, &mut args);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = attn(&refs);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{name}: status {:?}, stderr {stderr}", out.status);
    assert!(stderr.contains(flag), "{name}: message does not name {flag}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{name}: more than one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    let leftovers: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| {
            !["q.npy", "k.npy", "v.npy", "m.npy", "b.npy", "do.npy", "bad.npy"]
                .contains(&f.as_str())
        })
        .collect();
    assert!(leftovers.is_empty(), "{name}: files left behind: {leftovers:?}");
}

#[test]
fn device_cuda_without_a_device_exits_2_saying_so() {
    if attn::cuda::available() {
        eprintln!("skipped: a CUDA device is present (the GPU tests cover --device cuda)");
        return;
    }
    for algo in ["naive", "chunked", "flash2"] {
        assert_rejected(&format!("no-cuda-{algo}"), "--device", |_, a| {
            set(a, "--algo", algo);
            a.extend(["--device".into(), "cuda".into()]);
        });
        let d = dir("no-cuda-message");
        let out = attn(&[
            "run",
            "--device",
            "cuda",
            "--algo",
            algo,
            "--q",
            s(&d.join("q.npy")),
            "--k",
            "x",
            "--v",
            "x",
            "--out",
            "x",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("no CUDA device found"), "{algo}: {stderr}");
    }
}

fn set(args: &mut [String], flag: &str, value: &str) {
    let i = args.iter().position(|a| a == flag).unwrap();
    args[i + 1] = value.into();
}

#[test]
fn bad_inputs_exit_2_with_one_line_naming_the_flag_and_write_nothing() {
    assert_rejected("missing-file", "--k", |d, a| set(a, "--k", s(&d.join("nope.npy"))));
    assert_rejected("ranks-zero", "--ranks", |_, a| {
        set(a, "--algo", "ring");
        a.extend(["--ranks".into(), "0".into()]);
    });
    assert_rejected("ranks-not-ring", "--ranks", |_, a| a.extend(["--ranks".into(), "2".into()]));
    assert_rejected("not-npy", "--q", |d, a| {
        std::fs::write(d.join("bad.npy"), b"hello").unwrap();
        set(a, "--q", s(&d.join("bad.npy")));
    });
    assert_rejected("wrong-dtype", "--v", |d, a| {
        write_npy(d.join("bad.npy"), &Array4::<f64>::zeros((1, 2, 8, 4))).unwrap();
        set(a, "--v", s(&d.join("bad.npy")));
    });
    assert_rejected("wrong-rank", "--q", |d, a| {
        write_npy(d.join("bad.npy"), &Array3::<f32>::zeros((2, 8, 4))).unwrap();
        set(a, "--q", s(&d.join("bad.npy")));
    });
    assert_rejected("head-dim", "--k", |d, a| {
        write_npy(d.join("bad.npy"), &Array4::<f32>::zeros((1, 2, 8, 5))).unwrap();
        set(a, "--k", s(&d.join("bad.npy")));
    });
    assert_rejected("kv-heads", "--k", |d, a| {
        let kv = Array4::<f32>::zeros((1, 3, 8, 4));
        write_npy(d.join("bad.npy"), &kv).unwrap();
        write_npy(d.join("b.npy"), &kv).unwrap();
        set(a, "--k", s(&d.join("bad.npy")));
        set(a, "--v", s(&d.join("b.npy")));
    });
    assert_rejected("nan", "--q", |d, a| {
        let mut q = Array4::<f32>::zeros((1, 2, 8, 4));
        q[[0, 1, 3, 2]] = f32::NAN;
        write_npy(d.join("bad.npy"), &q).unwrap();
        set(a, "--q", s(&d.join("bad.npy")));
    });
    assert_rejected("inf", "--v", |d, a| {
        let mut v = Array4::<f32>::zeros((1, 2, 8, 4));
        v[[0, 0, 0, 0]] = f32::INFINITY;
        write_npy(d.join("bad.npy"), &v).unwrap();
        set(a, "--v", s(&d.join("bad.npy")));
    });
    assert_rejected("bias-nan", "--bias", |d, a| {
        let mut b = Array4::<f32>::zeros((1, 1, 8, 8));
        b[[0, 0, 1, 1]] = f32::NAN;
        write_npy(d.join("b.npy"), &b).unwrap();
        a.extend(["--bias".into(), s(&d.join("b.npy")).into()]);
    });
    assert_rejected("bias-shape", "--bias", |d, a| {
        write_npy(d.join("b.npy"), &Array4::<f32>::zeros((1, 3, 8, 8))).unwrap();
        a.extend(["--bias".into(), s(&d.join("b.npy")).into()]);
    });
    assert_rejected("mask-dtype", "--mask", |d, a| {
        write_npy(d.join("m.npy"), &ndarray::Array2::<f32>::ones((1, 8))).unwrap();
        a.extend(["--mask".into(), s(&d.join("m.npy")).into()]);
    });
    assert_rejected("mask-shape", "--mask", |d, a| {
        write_npy(d.join("m.npy"), &ndarray::Array2::<bool>::from_elem((1, 7), true)).unwrap();
        a.extend(["--mask".into(), s(&d.join("m.npy")).into()]);
    });
    assert_rejected("mask-rank", "--mask", |d, a| {
        write_npy(d.join("m.npy"), &Array3::<bool>::from_elem((1, 8, 8), true)).unwrap();
        a.extend(["--mask".into(), s(&d.join("m.npy")).into()]);
    });
    assert_rejected("zero-q-block", "--q-block", |_, a| a.extend(["--q-block".into(), "0".into()]));
    assert_rejected("zero-k-block", "--k-block", |_, a| a.extend(["--k-block".into(), "0".into()]));
    assert_rejected("zero-sram", "--sram", |_, a| a.extend(["--sram".into(), "0".into()]));
    assert_rejected("unknown-algo", "--algo", |_, a| set(a, "--algo", "quantum"));
    assert_rejected("dropout", "--dropout", |_, a| a.extend(["--dropout".into(), "1.0".into()]));
    assert_rejected("negative-dropout", "--dropout", |_, a| {
        a.extend(["--dropout".into(), "-0.1".into()])
    });
    assert_rejected("scale", "--scale", |_, a| a.extend(["--scale".into(), "0".into()]));
    assert_rejected("memory-limit", "--algo", |_, a| {
        a.extend(["--memory-limit".into(), "100".into()])
    });
    assert_rejected("memory-limit-syntax", "--memory-limit", |_, a| {
        a.extend(["--memory-limit".into(), "lots".into()])
    });
    assert_rejected("grad-shape", "--grad-out", |d, a| {
        write_npy(d.join("do.npy"), &Array4::<f32>::zeros((1, 2, 9, 4))).unwrap();
        for (f, file) in
            [("--grad-out", "do.npy"), ("--dq", "dq.npy"), ("--dk", "dk.npy"), ("--dv", "dv.npy")]
        {
            a.extend([f.into(), s(&d.join(file)).into()]);
        }
    });
    assert_rejected("grad-incomplete", "--dq", |d, a| {
        write_npy(d.join("do.npy"), &Array4::<f32>::zeros((1, 2, 8, 4))).unwrap();
        a.extend(["--grad-out".into(), s(&d.join("do.npy")).into()]);
    });
    assert_rejected("window-side", "--window", |_, a| a.push("--window=-2,0".into()));
    assert_rejected("window-syntax", "--window", |_, a| a.extend(["--window".into(), "4".into()]));
    assert_rejected("softcap-zero", "--softcap", |_, a| a.extend(["--softcap".into(), "0".into()]));
    assert_rejected("softcap-negative", "--softcap", |_, a| {
        a.extend(["--softcap".into(), "-3".into()])
    });
    assert_rejected("softcap-inf", "--softcap", |_, a| {
        a.extend(["--softcap".into(), "inf".into()])
    });
    assert_rejected("alibi-shape", "--alibi", |d, a| {
        write_npy(d.join("b.npy"), &ndarray::Array1::<f32>::ones(3)).unwrap();
        a.extend(["--alibi".into(), s(&d.join("b.npy")).into()]);
    });
    assert_rejected("alibi-rank", "--alibi", |d, a| {
        write_npy(d.join("b.npy"), &Array3::<f32>::ones((1, 2, 1))).unwrap();
        a.extend(["--alibi".into(), s(&d.join("b.npy")).into()]);
    });
    assert_rejected("alibi-nan", "--alibi", |d, a| {
        write_npy(d.join("b.npy"), &ndarray::arr1(&[0.5f32, f32::NAN])).unwrap();
        a.extend(["--alibi".into(), s(&d.join("b.npy")).into()]);
    });
    assert_rejected("dbias-without-bias", "--dbias", |d, a| {
        write_npy(d.join("do.npy"), &Array4::<f32>::zeros((1, 2, 8, 4))).unwrap();
        for (f, file) in [
            ("--grad-out", "do.npy"),
            ("--dq", "dq.npy"),
            ("--dk", "dk.npy"),
            ("--dv", "dv.npy"),
            ("--dbias", "db.npy"),
        ] {
            a.extend([f.into(), s(&d.join(file)).into()]);
        }
    });
    assert_rejected("dbias-without-grad-out", "--dbias", |d, a| {
        write_npy(d.join("b.npy"), &Array4::<f32>::zeros((1, 1, 8, 8))).unwrap();
        a.extend(["--bias".into(), s(&d.join("b.npy")).into()]);
        a.extend(["--dbias".into(), s(&d.join("db.npy")).into()]);
    });
    // bf16 / f16 run only on the tensor cores (CUDA flash2).
    assert_rejected("dtype-cpu", "--dtype", |_, a| a.extend(["--dtype".into(), "bf16".into()]));
    assert_rejected("dtype-bad", "--dtype", |_, a| a.extend(["--dtype".into(), "f8".into()]));
    assert_rejected("out-dir-missing", "--out", |d, a| {
        set(a, "--out", s(&d.join("no/such/dir/o.npy")))
    });
}

#[test]
fn default_command_prints_the_table_with_small_errors() {
    let out = attn(&["table", "--heads", "2", "--seq", "96", "--head-dim", "16", "--repeats", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let row = stdout.lines().find(|l| l.starts_with("naive")).expect("a naive row");
    let cols: Vec<&str> = row.split_whitespace().collect();
    let fwd_err: f64 = cols[2].parse().unwrap();
    let bwd_err: f64 = cols[3].parse().unwrap();
    assert!(fwd_err <= 1e-5 && bwd_err <= 1e-4, "{row}");
    let gflops: f64 = cols[5].parse().unwrap();
    assert!(gflops > 0.0, "{row}");
}

#[test]
fn demo_runs_the_seeds_examples_and_naive_refuses_at_full_size() {
    let out = attn(&["demo", "--seq", "300"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("autoregressive: y [1, 300, 512]"), "{stdout}");
    assert!(stdout.contains("cross attention: y [1, 300, 512]"), "{stdout}");
    // Naive attention at the seed's 65 536 needs 128 GiB: a clean refusal, before allocating.
    let out = Command::new(env!("CARGO_BIN_EXE_attn"))
        .args(["demo", "--algo", "naive", "--example", "autoregressive"])
        .env("ATTN_MEMORY_LIMIT", "16G")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("128.0 GiB") && stderr.contains("flash2"), "{stderr}");
    // The module with the score modifiers; a bad one is refused naming its flag.
    let out = attn(&["demo", "--seq", "300", "--window=32,0", "--softcap", "20", "--alibi"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cross attention: y [1, 300, 512]"));
    for (flag, bad) in [("--window", "--window=-3,0"), ("--softcap", "--softcap=-1")] {
        let out = attn(&["demo", "--seq", "64", bad]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.starts_with(&format!("error: {flag}:")), "{stderr}");
    }
}

#[test]
fn matmul_peak_reports_a_rate_the_stages_can_be_compared_with() {
    let out = attn(&["matmul-peak", "--size", "256"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let gflops: f64 = text
        .split("peak: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no rate in {text:?}"));
    // A 256³ product on any CPU that runs these tests: above 0.1 GFLOP/s, below 100 TFLOP/s.
    assert!((0.1..100_000.0).contains(&gflops), "{gflops} GFLOP/s");
}
