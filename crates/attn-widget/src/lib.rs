//! # attn-widget — the book's step-through, FlashAttention-2 running in the page
//!
//! The CPU FlashAttention-2 of stage 4 (`attn_flash2::cpu::forward_traced`, the same code
//! the tests and the CLI run), compiled to WebAssembly. The page picks a problem; [`Run`]
//! runs the traced forward on seeded random Q, K, V (`attn_core::random::qkv`, as
//! `attn trace` does) and hands the page every step of Algorithm 1's loops: the tile of
//! Q_i and K_j, whether it was full or cut, m_i, ℓ_i and Õ_i after it, and at each query
//! block's finish O_i. One query row in blocks of one is the online softmax.
//!
//! The page's script (`book/src/widget/stepper.js`) draws the tile grid and the numbers;
//! nothing here knows about the page but the exported names.

use attn_core::reference::RefProblem;
use attn_core::trace::{StepKind, Trace};
use attn_core::{Forward, Inputs, Options, Shape, Window};
use wasm_bindgen::prelude::*;

/// The largest sequence length and head dimension the page offers: a trace keeps every
/// row of every step, and the page shows them all.
pub const MAX_SEQ: usize = 64;
pub const MAX_HEAD_DIM: usize = 16;

/// The problem the reader picked.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Setup {
    pub n_q: usize,
    pub n_k: usize,
    pub head_dim: usize,
    /// (B_r, B_c)
    pub blocks: (usize, usize),
    pub causal: bool,
    pub window: Option<Window>,
    pub softcap: Option<f32>,
    /// The seed of Q, K, V: K and V take seed + 1 and seed + 2, as `attn_core::random::qkv`.
    pub seed: u64,
}

impl Setup {
    fn check(&self) -> Result<(), String> {
        let size = |name: &str, x: usize, max: usize| {
            if (1..=max).contains(&x) {
                Ok(())
            } else {
                Err(format!(
                    "{name} is {x}: the step-through takes 1 to {max} (`attn trace` takes any size)"
                ))
            }
        };
        size("n_q", self.n_q, MAX_SEQ)?;
        size("n_k", self.n_k, MAX_SEQ)?;
        size("d", self.head_dim, MAX_HEAD_DIM)?;
        size("B_r", self.blocks.0, self.n_q)?;
        size("B_c", self.blocks.1, self.n_k)
    }

    fn shape(&self) -> Shape {
        Shape::new(1, 1, self.n_q, self.head_dim).with_n_k(self.n_k)
    }

    fn options(&self) -> Options {
        Options {
            q_block: Some(self.blocks.0),
            k_block: Some(self.blocks.1),
            window: self.window,
            softcap: self.softcap,
            ..Options::default().causal(self.causal)
        }
    }
}

/// One traced run of the CPU FlashAttention-2, with the float64 reference beside it.
#[wasm_bindgen]
#[derive(Debug)]
pub struct Run {
    setup: Setup,
    fwd: Forward,
    trace: Trace,
    reference: RefProblem,
    /// The reference's O.
    ref_out: attn_core::ndarray::Array4<f64>,
}

impl Run {
    /// Runs `setup`; a problem the page cannot show, or the stage rejects, is an error
    /// that names the field to change.
    pub fn build(setup: Setup) -> Result<Self, String> {
        setup.check()?;
        let (q, k, v) = attn_core::random::qkv(&setup.shape(), setup.seed);
        let inputs = Inputs::new(q.view(), k.view(), v.view());
        let opts = setup.options();
        let (fwd, trace) =
            attn_flash2::cpu::forward_traced(&inputs, &opts).map_err(|e| e.to_string())?;
        let reference = RefProblem::from_inputs(&inputs, &opts).map_err(|e| e.to_string())?;
        let ref_out = reference.forward().out;
        Ok(Self { setup, fwd, trace, reference, ref_out })
    }

    fn step(&self, i: usize) -> &attn_core::trace::Step {
        &self.trace.steps[i.min(self.trace.steps.len() - 1)]
    }
}

#[wasm_bindgen]
impl Run {
    /// The page's constructor: the window's sides as given (−1 unbounded), absent for none.
    #[wasm_bindgen(constructor)]
    pub fn new(
        n_q: usize,
        n_k: usize,
        head_dim: usize,
        block_q: usize,
        block_k: usize,
        causal: bool,
        window_left: Option<i32>,
        window_right: Option<i32>,
        softcap: Option<f32>,
        seed: u32,
    ) -> Result<Run, JsError> {
        let window = match (window_left, window_right) {
            (None, None) => None,
            (l, r) => Some(Window::new(l.unwrap_or(-1).into(), r.unwrap_or(-1).into())),
        };
        let setup = Setup {
            n_q,
            n_k,
            head_dim,
            blocks: (block_q, block_k),
            causal,
            window,
            softcap,
            seed: seed.into(),
        };
        Self::build(setup).map_err(|e| JsError::new(&e))
    }

    /// Steps in the loops' order, tiles and finishes together.
    pub fn steps(&self) -> usize {
        self.trace.steps.len()
    }

    /// (T_r, T_c): query blocks and key blocks.
    pub fn grid(&self) -> Vec<u32> {
        let (t_r, t_c) = self.trace.grid.tiles();
        let (b_r, b_c) = self.trace.grid.blocks;
        [t_r, t_c, b_r, b_c].map(|x| x as u32).to_vec()
    }

    /// "full", "cut" or "finish".
    pub fn kind(&self, step: usize) -> String {
        self.step(step).kind.name().into()
    }

    /// The step's query rows and keys: [i0, rows, j0, cols].
    pub fn tile(&self, step: usize) -> Vec<u32> {
        let s = self.step(step);
        [s.rows.0, s.rows.1, s.cols.0, s.cols.1].map(|x| x as u32).to_vec()
    }

    /// m_i of the step's rows after it.
    pub fn m(&self, step: usize) -> Vec<f32> {
        self.step(step).m.clone()
    }

    /// ℓ_i of the step's rows after it.
    pub fn ell(&self, step: usize) -> Vec<f32> {
        self.step(step).ell.clone()
    }

    /// Õ_i (after a finish, O_i) of the step's rows, rows × d row-major.
    pub fn acc(&self, step: usize) -> Vec<f32> {
        self.step(step).acc.clone()
    }

    /// The scores S_ij of the step's tile with every modifier, −∞ where masked (float64,
    /// from the reference): rows × cols row-major.
    pub fn scores(&self, step: usize) -> Vec<f64> {
        let s = self.step(step);
        let rows = s.rows.0..s.rows.0 + s.rows.1;
        rows.flat_map(|i| {
            (s.cols.0..s.cols.0 + s.cols.1).map(move |j| self.reference.score(0, 0, i, j))
        })
        .collect()
    }

    /// The stage's O, n_q × d row-major.
    pub fn output(&self) -> Vec<f32> {
        self.fwd.out.iter().copied().collect()
    }

    /// The float64 reference's O, n_q × d row-major.
    pub fn reference(&self) -> Vec<f64> {
        self.ref_out.iter().copied().collect()
    }

    /// The tests' measure of O against the reference: ‖O − O_ref‖₂ / ‖O_ref‖₂.
    pub fn error(&self) -> f64 {
        attn_core::metrics::compare(self.fwd.out.view(), self.ref_out.view()).normwise
    }

    /// The tile steps (no finish) up to and including `step`, as [query block, key block]
    /// pairs: what the grid has visited so far.
    pub fn visited(&self, step: usize) -> Vec<u32> {
        let (b_r, b_c) = self.trace.grid.blocks;
        self.trace.steps[..=step.min(self.trace.steps.len() - 1)]
            .iter()
            .filter(|s| s.kind != StepKind::Finish)
            .flat_map(|s| [(s.rows.0 / b_r) as u32, (s.cols.0 / b_c) as u32])
            .collect()
    }

    /// Every tile's fate over the whole run, row-major over (query block, key block):
    /// 0 never visited, 1 full, 2 cut.
    pub fn fates(&self) -> Vec<u8> {
        use attn_core::trace::TileFate;
        let fates = self.trace.fates(0, 0);
        fates
            .iter()
            .flatten()
            .map(|f| match f {
                TileFate::Skipped => 0,
                TileFate::Visited { kind: StepKind::Cut, .. } => 2,
                TileFate::Visited { .. } => 1,
            })
            .collect()
    }

    /// The head dimension d.
    pub fn head_dim(&self) -> usize {
        self.setup.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attn_core::KeyRange;

    fn setup() -> Setup {
        Setup {
            n_q: 7,
            n_k: 10,
            head_dim: 3,
            blocks: (3, 4),
            causal: true,
            window: Some(Window::new(4, -1)),
            softcap: Some(2.5),
            seed: 11,
        }
    }

    #[test]
    fn the_run_matches_the_reference_and_visits_what_the_key_range_keeps() {
        let s = setup();
        let run = Run::build(s).unwrap();
        assert!(run.error() < 1e-5, "‖O − O_ref‖ / ‖O_ref‖ = {}", run.error());
        // every tile that holds a kept (query, key) pair is visited once, no other
        let keys = KeyRange::new(s.n_q, s.n_k, s.causal, s.window);
        let (t_r, t_c) = (s.n_q.div_ceil(3), s.n_k.div_ceil(4));
        let fates = run.fates();
        for (bi, bj) in (0..t_r).flat_map(|i| (0..t_c).map(move |j| (i, j))) {
            let kept = (bi * 3..(bi * 3 + 3).min(s.n_q))
                .any(|i| (keys.start(i)..keys.end(i)).any(|j| j / 4 == bj));
            assert_eq!(fates[bi * t_c + bj] != 0, kept, "tile ({bi}, {bj})");
        }
        let tiles = run.visited(run.steps() - 1);
        assert_eq!(tiles.len() / 2, fates.iter().filter(|&&f| f != 0).count());
        assert_eq!(run.steps(), tiles.len() / 2 + t_r, "one finish per query block");
    }

    #[test]
    fn a_finish_holds_o_and_the_scores_are_masked_where_the_window_cuts() {
        let run = Run::build(setup()).unwrap();
        let d = 3;
        for step in (0..run.steps()).filter(|&i| run.kind(i) == "finish") {
            let t = run.tile(step);
            let (i0, rows) = (t[0] as usize, t[1] as usize);
            let acc = run.acc(step);
            let out = run.output();
            assert_eq!(acc[..], out[i0 * d..(i0 + rows) * d], "finish of rows {i0}..");
        }
        // row 6 (diagonal 6 + 3 = 9) keeps keys 5..=9: key 4 is masked, key 5 is not
        let step = (0..run.steps()).find(|&i| run.tile(i)[..3] == [6, 1, 4]).unwrap();
        let scores = run.scores(step);
        assert_eq!(scores[0], f64::NEG_INFINITY);
        assert!(scores[1].is_finite() && scores[1].abs() <= 2.5, "softcapped: {}", scores[1]);
    }

    #[test]
    fn one_row_in_blocks_of_one_is_the_online_softmax() {
        let s = Setup { n_q: 1, n_k: 6, blocks: (1, 1), causal: false, window: None, ..setup() };
        let run = Run::build(s).unwrap();
        assert_eq!(run.steps(), 7, "six keys one at a time, then the finish");
        // ℓ after key j is Σ_{j' ≤ j} exp(s_j' − m): recompute it from the scores
        let scores: Vec<f64> = (0..6).map(|j| run.scores(j)[0]).collect();
        for j in 0..6 {
            let m = scores[..=j].iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let ell: f64 = scores[..=j].iter().map(|x| (x - m).exp()).sum();
            assert!((f64::from(run.m(j)[0]) - m).abs() < 1e-5);
            assert!((f64::from(run.ell(j)[0]) - ell).abs() < 1e-5 * ell);
        }
    }

    #[test]
    fn a_problem_the_page_cannot_show_names_the_field() {
        let err = Run::build(Setup { n_k: 65, ..setup() }).unwrap_err();
        assert!(err.starts_with("n_k is 65: the step-through takes 1 to 64"), "{err}");
        let err = Run::build(Setup { blocks: (8, 4), ..setup() }).unwrap_err();
        assert!(err.starts_with("B_r is 8"), "{err}");
        let err = Run::build(Setup { softcap: Some(-1.0), ..setup() }).unwrap_err();
        assert!(err.contains("softcap"), "{err}");
    }
}
