//! `attn run` on packed batches (`--cu-seqlens-q/-k`) and KV caches (`--cache-seqlens`,
//! `--block-table`): every algorithm matches the float64 reference of the one unpacked call
//! it equals; bad spans, lengths and tables exit 2 naming the flag, writing nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use attn::core::metrics::compare;
use attn::core::reference::RefProblem;
use attn::core::varlen::{KvCache, SeqLens};
use attn::{Inputs, Options, Window};
use ndarray::{Array1, Array2, Array4, s};
use ndarray_npy::{read_npy, write_npy};

const ALGOS: &[&str] = &["naive", "chunked", "flash1", "flash2", "ring"];

fn dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-varlen").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn attn(d: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attn")).current_dir(d).args(args).output().unwrap()
}

fn ok(out: &Output) {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn within(got: &Path, want: ndarray::ArrayView4<'_, f64>, tol: f64, what: &str) {
    let got: Array4<f32> = read_npy(got).unwrap();
    let e = compare(got.view(), want);
    assert!(e.normwise <= tol, "{what}: normwise {:.3e}", e.normwise);
}

/// `attn run --algo ALGO --q q.npy --k K --v V --causal --out o.npy --check`.
fn causal_run<'a>(algo: &'a str, k: &'a str, v: &'a str) -> Vec<&'a str> {
    let args = ["run", "--algo", algo, "--q", "q.npy", "--k", k, "--v", v, "--causal"];
    let mut args = args.to_vec();
    args.extend(["--out", "o.npy", "--check"]);
    args
}

#[test]
fn packed_batches_match_the_reference_for_every_algorithm() {
    let d = dir("packed");
    let (lens_q, lens_k) = ([5usize, 0, 9, 3], [4usize, 3, 9, 6]);
    let (tq, tk) = (17, 22);
    let q = attn::core::random::normal((1, 4, tq, 6), 1);
    let k = attn::core::random::normal((1, 2, tk, 6), 2);
    let v = attn::core::random::normal((1, 2, tk, 6), 3);
    let d_out = attn::core::random::normal((1, 4, tq, 6), 4);
    let cum = |l: &[usize]| -> Array1<i32> {
        std::iter::once(0)
            .chain(l.iter().scan(0, |t, &x| {
                *t += x as i32;
                Some(*t)
            }))
            .collect()
    };
    write_npy(d.join("cq.npy"), &cum(&lens_q)).unwrap(); // int32
    write_npy(d.join("ck.npy"), &cum(&lens_k).mapv(i64::from)).unwrap(); // int64
    for (f, a) in [("q.npy", &q), ("k.npy", &k), ("v.npy", &v), ("do.npy", &d_out)] {
        write_npy(d.join(f), a).unwrap();
    }
    let opts = Options { window: Some(Window::new(3, -1)), ..Options::default().causal(true) };
    let inputs = Inputs::new(q.view(), k.view(), v.view());
    let unpacked = SeqLens::from_lengths(&lens_q, &lens_k).unpacked(&inputs, &opts);
    let reference = RefProblem::from_inputs(&unpacked.inputs(&inputs), &unpacked.opts).unwrap();
    let (r, rg) = (reference.forward(), reference.backward(&d_out.mapv(f64::from)));
    for algo in ALGOS {
        let mut args = causal_run(algo, "k.npy", "v.npy");
        args.extend("--window=3,-1 --cu-seqlens-q cq.npy --cu-seqlens-k ck.npy --grad-out do.npy --dq dq.npy --dk dk.npy --dv dv.npy".split(' '));
        args.extend(["--repeats", "2"]); // the results of the last of the timed calls
        let out = attn(&d, &args);
        ok(&out);
        within(&d.join("o.npy"), r.out.view(), 1e-5, &format!("{algo}: out"));
        within(&d.join("dq.npy"), rg.dq.view(), 1e-4, &format!("{algo}: dq"));
        within(&d.join("dk.npy"), rg.dk.view(), 1e-4, &format!("{algo}: dk"));
        within(&d.join("dv.npy"), rg.dv.view(), 1e-4, &format!("{algo}: dv"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("error vs float64 reference"), "{algo}: {stdout}");
    }
}

#[test]
fn cached_and_paged_decoding_match_the_reference_for_every_algorithm() {
    let d = dir("cached");
    let (batch, n_max, page) = (3, 10, 4);
    let lens = [10i64, 3, 7];
    let q = attn::core::random::normal((batch, 4, 2, 8), 5);
    let mut k = attn::core::random::normal((batch, 2, n_max, 8), 6);
    let mut v = attn::core::random::normal((batch, 2, n_max, 8), 7);
    let (k_clean, v_clean) = (k.clone(), v.clone());
    for (b, &l) in lens.iter().enumerate() {
        k.slice_mut(s![b, .., l as usize.., ..]).fill(f32::NAN); // never read
        v.slice_mut(s![b, .., l as usize.., ..]).fill(f32::NAN);
    }
    // the pool: row b's block i at page 3 · (2 − b) + i, through the table
    let blocks = n_max.div_ceil(page);
    let table =
        Array2::from_shape_fn((batch, blocks), |(b, i)| (blocks * (batch - 1 - b) + i) as i64);
    let mut kp = Array4::<f32>::zeros((batch * blocks, 2, page, 8));
    let mut vp = kp.clone();
    for b in 0..batch {
        for pos in 0..lens[b] as usize {
            let p = table[(b, pos / page)] as usize;
            kp.slice_mut(s![p, .., pos % page, ..]).assign(&k_clean.slice(s![b, .., pos, ..]));
            vp.slice_mut(s![p, .., pos % page, ..]).assign(&v_clean.slice(s![b, .., pos, ..]));
        }
    }
    let lens_file = Array1::from(lens.to_vec());
    write_npy(d.join("lens.npy"), &lens_file).unwrap();
    write_npy(d.join("table.npy"), &table.mapv(|x| x as i32)).unwrap();
    for (f, a) in [("q.npy", &q), ("k.npy", &k), ("v.npy", &v), ("kp.npy", &kp), ("vp.npy", &vp)] {
        write_npy(d.join(f), a).unwrap();
    }
    let opts = Options::default().causal(true);
    let inputs = Inputs::new(q.view(), k.view(), v.view());
    let unpacked = KvCache::contiguous(&lens).unwrap().unpacked(&inputs, &opts);
    let r = RefProblem::from_inputs(&unpacked.inputs(&inputs), &unpacked.opts).unwrap().forward();
    for algo in ALGOS {
        for (kf, vf, extra) in
            [("k.npy", "v.npy", &[][..]), ("kp.npy", "vp.npy", &["--block-table", "table.npy"][..])]
        {
            let mut args = causal_run(algo, kf, vf);
            args.extend(["--cache-seqlens", "lens.npy"]);
            args.extend(extra);
            ok(&attn(&d, &args));
            within(&d.join("o.npy"), r.out.view(), 1e-5, &format!("{algo} {kf}: out"));
        }
    }
}

/// Exit 2, one line naming `flag`, no file written.
fn rejected(d: &Path, flag: &str, args: &[&str]) {
    let out = attn(d, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(stderr.contains(flag), "{args:?}: does not name {flag}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(!d.join("o.npy").exists() && !d.join("dq.npy").exists(), "{args:?}: wrote a file");
}

#[test]
fn bad_spans_lengths_and_tables_exit_2_naming_the_flag() {
    let d = dir("bad");
    let q = attn::core::random::normal((1, 2, 8, 4), 1);
    let qb = attn::core::random::normal((2, 2, 1, 4), 2);
    let kc = attn::core::random::normal((2, 2, 6, 4), 3);
    let pool = attn::core::random::normal((3, 2, 2, 4), 4);
    for (f, a) in
        [("q.npy", &q), ("do.npy", &q), ("qb.npy", &qb), ("kc.npy", &kc), ("pool.npy", &pool)]
    {
        write_npy(d.join(f), a).unwrap();
    }
    let ints = |f: &str, x: &[i64]| write_npy(d.join(f), &Array1::from(x.to_vec())).unwrap();
    ints("good.npy", &[0, 3, 8]);
    ints("late.npy", &[1, 3, 8]);
    ints("down.npy", &[0, 5, 3, 8]);
    ints("short.npy", &[0, 3, 7]);
    ints("long.npy", &[7, 2]);
    ints("lens.npy", &[4, 4]);
    write_npy(
        d.join("table.npy"),
        &Array2::from_shape_vec((2, 3), vec![0i64, 1, 2, 2, 5, 0]).unwrap(),
    )
    .unwrap();
    let packed = |cq: &'static str, ck: &'static str| {
        vec![
            "run",
            "--q",
            "q.npy",
            "--k",
            "q.npy",
            "--v",
            "q.npy",
            "--out",
            "o.npy",
            "--cu-seqlens-q",
            cq,
            "--cu-seqlens-k",
            ck,
        ]
    };
    rejected(&d, "--cu-seqlens-q", &packed("late.npy", "good.npy"));
    rejected(&d, "--cu-seqlens-q", &packed("down.npy", "good.npy"));
    rejected(&d, "--cu-seqlens-k", &packed("good.npy", "short.npy"));
    let cached = |k: &'static str, lens: &'static str| {
        vec!["run", "--q", "qb.npy", "--k", k, "--v", k, "--out", "o.npy", "--cache-seqlens", lens]
    };
    rejected(&d, "--cache-seqlens", &cached("kc.npy", "long.npy"));
    let mut paged = cached("pool.npy", "lens.npy");
    paged.extend(["--block-table", "table.npy"]);
    rejected(&d, "--block-table", &paged);
    let mut grads = cached("kc.npy", "lens.npy");
    grads.extend(["--grad-out", "do.npy", "--dq", "dq.npy", "--dk", "dk.npy", "--dv", "dv.npy"]);
    rejected(&d, "--grad-out", &grads);
    // and the good spans run
    ok(&attn(&d, &packed("good.npy", "good.npy")));
}

#[test]
fn decode_bench_prints_a_step_time_and_bandwidth_beside_the_copy_bandwidth() {
    let d = dir("decode-bench");
    let out = attn(
        &d,
        &[
            "decode-bench",
            "--batch",
            "2",
            "--seq",
            "300",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--head-dim",
            "16",
            "--splits",
            "3",
            "--repeats",
            "2",
        ],
    );
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let header = |prefix: &str| -> f64 {
        let gb: f64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|l| l.trim_end_matches(" GB/s").parse().ok())
            .unwrap_or_else(|| panic!("no '{prefix}': {stdout}"));
        assert!(gb > 0.1, "{prefix}{gb} GB/s");
        gb
    };
    let copy = header("# copy bandwidth (read + write, parallel copy): ");
    let read = header("# read bandwidth (parallel sum): ");
    let row =
        stdout.lines().find(|l| l.starts_with("2,300,")).unwrap_or_else(|| panic!("{stdout}"));
    let cols: Vec<f64> = row.split(',').map(|x| x.parse().unwrap()).collect();
    // batch, n_k, splits, step_ms, kv_gb_per_s, share_of_copy, share_of_read
    assert_eq!(cols.len(), 7, "{row}");
    assert_eq!(cols[2], 3.0, "{row}");
    assert!(cols[3] > 0.0 && cols[4] > 0.0, "{row}");
    assert!(
        (cols[5] - cols[4] / copy).abs() <= 1e-3 + 0.01 * cols[5],
        "share of copy {row} against {copy}"
    );
    assert!(
        (cols[6] - cols[4] / read).abs() <= 1e-3 + 0.01 * cols[6],
        "share of read {row} against {read}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("batch 2, n_k 300"), "no progress line");
}
