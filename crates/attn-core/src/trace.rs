//! Traces of the tiled loops, for the book's tile pictures, its worked example and the
//! step-through: a CPU stage handed a [`Tracer`] records, after every step of its loops,
//! which query block and key block met and the running statistics (m_i, ℓ_i and the
//! accumulator) — copies only, so a traced run gives the untraced run's bits (the stages'
//! trace tests compare them).
//!
//! A trace keeps every row of every step: it is meant for small problems.

use std::sync::Mutex;

use ndarray::{ArrayView1, ArrayView2};

use crate::{Forward, Head, Inputs, Options, Problem, Result, Shape};

/// What a step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// A tile every row of which sees every key of the tile.
    Full,
    /// A tile that causal masking or the window cuts: some positions are removed.
    Cut,
    /// The end of a query block's loop: chunked attention's merge of its chunk summaries,
    /// FlashAttention-2's division by ℓ_i. `cols` spans the keys the block saw.
    Finish,
}

impl StepKind {
    /// The tile's kind from the key range alone (causal masking and the window).
    pub fn of_tile(
        head: &Head<'_>,
        (i0, rows): (usize, usize),
        (j0, cols): (usize, usize),
    ) -> Self {
        if head.keys.tile_cut((i0, i0 + rows), (j0, cols)) { Self::Cut } else { Self::Full }
    }

    /// The name the CSV files and the book use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Cut => "cut",
            Self::Finish => "finish",
        }
    }
}

/// One step of a tiled loop, with the state it leaves behind.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub b: usize,
    pub h: usize,
    /// Where the step falls in the stage's loops, outer loop first, as the blocks' first
    /// rows: (i0, j0) for chunked attention and FlashAttention-2, (j0, i0) for
    /// FlashAttention-1. Steps sort by (b, h, order): the loops as if run one after another.
    pub order: (usize, usize),
    /// The query rows `i0 .. i0 + rows`.
    pub rows: (usize, usize),
    /// The keys `j0 .. j0 + cols`.
    pub cols: (usize, usize),
    pub kind: StepKind,
    /// Per query row after the step: the running max m_i (natural log scale), ℓ_i, and the
    /// accumulator, `rows × d` row-major — Õ_i unnormalised in FlashAttention-2, O_i
    /// normalised in FlashAttention-1, a chunk's Σ exp(S − m) V in chunked attention (its
    /// m and ℓ are the chunk's own); after a [`StepKind::Finish`], O_i.
    pub m: Vec<f32>,
    pub ell: Vec<f32>,
    pub acc: Vec<f32>,
}

/// Collects the steps of one run; shared by the run's threads.
#[derive(Debug, Default)]
pub struct Tracer {
    steps: Mutex<Vec<Step>>,
}

/// The state a step leaves, as views of the stage's own buffers (copied when recorded).
#[derive(Clone, Copy, Debug)]
pub struct State<'a> {
    pub m: ArrayView1<'a, f32>,
    pub ell: ArrayView1<'a, f32>,
    pub acc: ArrayView2<'a, f32>,
}

impl Tracer {
    /// Records one step.
    pub fn record(&self, step: Step) {
        self.steps.lock().expect("a tracer's lock is never poisoned").push(step);
    }

    /// Records a tile step of `head` over query rows `rows` and keys `cols`, full or cut
    /// ([`StepKind::of_tile`]), from the state it leaves behind.
    pub fn record_tile(
        &self,
        head: &Head<'_>,
        order: (usize, usize),
        (rows, cols): ((usize, usize), (usize, usize)),
        state: State<'_>,
    ) {
        let kind = StepKind::of_tile(head, rows, cols);
        self.record_step(head, order, (rows, cols), kind, state);
    }

    /// Records the end of query block `rows` of `head` ([`StepKind::Finish`]), its keys
    /// spanning what the block's rows see.
    pub fn record_finish(&self, head: &Head<'_>, (i0, n): (usize, usize), state: State<'_>) {
        let (start, end) = (head.key_start(i0), head.key_end(i0 + n - 1));
        let keys = (start.min(end), end.saturating_sub(start));
        self.record_step(head, (i0, usize::MAX), ((i0, n), keys), StepKind::Finish, state);
    }

    /// Records a step of `head` over query rows `rows` and keys `cols` from the state it
    /// leaves behind.
    pub fn record_step(
        &self,
        head: &Head<'_>,
        order: (usize, usize),
        (rows, cols): ((usize, usize), (usize, usize)),
        kind: StepKind,
        state: State<'_>,
    ) {
        self.record(Step {
            b: head.b,
            h: head.h,
            order,
            rows,
            cols,
            kind,
            m: state.m.to_vec(),
            ell: state.ell.to_vec(),
            acc: state.acc.iter().copied().collect(),
        });
    }

    /// The steps in the loops' order (see [`Step::order`]).
    pub fn finish(self, grid: Grid) -> Trace {
        let mut steps = self.steps.into_inner().expect("a tracer's lock is never poisoned");
        steps.sort_by_key(|s| (s.b, s.h, s.order, s.kind == StepKind::Finish));
        Trace { grid, steps }
    }
}

/// Runs a stage's forward with a tracer (`run`), and returns its result with the trace of
/// a grid of `blocks` (the stage's block sizes for the problem).
pub fn traced(
    inputs: &Inputs<'_>,
    opts: &Options,
    blocks: fn(&Shape, &Options) -> (usize, usize),
    run: impl FnOnce(&Tracer) -> Result<Forward>,
) -> Result<(Forward, Trace)> {
    let tracer = Tracer::default();
    let fwd = run(&tracer)?;
    let sh = Problem::shapes_only(inputs, opts)?.shape;
    let grid = Grid { n_q: sh.n_q, n_k: sh.n_k, head_dim: sh.head_dim, blocks: blocks(&sh, opts) };
    Ok((fwd, tracer.finish(grid)))
}

/// The problem's tile grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub n_q: usize,
    pub n_k: usize,
    pub head_dim: usize,
    /// Query rows and keys per block (B_r, B_c).
    pub blocks: (usize, usize),
}

impl Grid {
    /// (T_r, T_c): query blocks and key blocks.
    pub fn tiles(&self) -> (usize, usize) {
        (self.n_q.div_ceil(self.blocks.0), self.n_k.div_ceil(self.blocks.1))
    }
}

/// A stage's recorded loops.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    pub grid: Grid,
    pub steps: Vec<Step>,
}

/// How a tile of the grid fared in a run, for one (batch, head).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileFate {
    /// Never visited: causal masking or the window hides all of it.
    Skipped,
    /// Visited, the `n`-th tile step of the head's loops (from 0), full or cut.
    Visited { n: usize, kind: StepKind },
}

impl Trace {
    /// The tile steps (no [`StepKind::Finish`]) of one (batch, head), in loop order.
    pub fn tile_steps(&self, b: usize, h: usize) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(move |s| s.b == b && s.h == h && s.kind != StepKind::Finish)
    }

    /// The fate of every tile of one (batch, head): `[query block][key block]`.
    pub fn fates(&self, b: usize, h: usize) -> Vec<Vec<TileFate>> {
        let (t_r, t_c) = self.grid.tiles();
        let mut fates = vec![vec![TileFate::Skipped; t_c]; t_r];
        for (n, s) in self.tile_steps(b, h).enumerate() {
            let (i, j) = (s.rows.0 / self.grid.blocks.0, s.cols.0 / self.grid.blocks.1);
            fates[i][j] = TileFate::Visited { n, kind: s.kind };
        }
        fates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(b: usize, order: (usize, usize), kind: StepKind) -> Step {
        let (i, j) = order;
        Step {
            b,
            h: 0,
            order,
            rows: (2 * i, 2),
            cols: (2 * j, 2),
            kind,
            m: vec![],
            ell: vec![],
            acc: vec![],
        }
    }

    #[test]
    fn steps_sort_into_loop_order_and_unvisited_tiles_are_skipped() {
        let tracer = Tracer::default();
        // recorded out of order, as parallel tasks would
        tracer.record(step(0, (1, 1), StepKind::Cut));
        tracer.record(step(0, (1, 0), StepKind::Full));
        tracer.record(step(0, (0, 0), StepKind::Cut));
        tracer.record(step(1, (0, 0), StepKind::Full));
        let trace = tracer.finish(Grid { n_q: 4, n_k: 4, head_dim: 1, blocks: (2, 2) });
        let orders: Vec<_> = trace.steps.iter().map(|s| (s.b, s.order)).collect();
        assert_eq!(orders, [(0, (0, 0)), (0, (1, 0)), (0, (1, 1)), (1, (0, 0))]);
        let fates = trace.fates(0, 0);
        assert_eq!(fates[0][0], TileFate::Visited { n: 0, kind: StepKind::Cut });
        assert_eq!(fates[0][1], TileFate::Skipped);
        assert_eq!(fates[1][0], TileFate::Visited { n: 1, kind: StepKind::Full });
        assert_eq!(fates[1][1], TileFate::Visited { n: 2, kind: StepKind::Cut });
    }
}
