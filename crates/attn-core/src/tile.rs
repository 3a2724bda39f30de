//! Two elementwise steps on a tile of scores that every CPU stage's backward takes, with the
//! contract's rule for rows that see no key built in (their weights and gradients are 0,
//! never NaN). FlashAttention-2 has vectorised copies of both in its kernels.

use ndarray::{ArrayView1, ArrayView2, ArrayViewMut2, Zip};

/// `P ← exp(S − lse)` row by row: the weights recomputed from the saved log-sum-exp. A row
/// whose log-sum-exp is −∞ saw no key and gets zeros.
pub fn probs_from_lse(mut s: ArrayViewMut2<'_, f32>, lse: ArrayView1<'_, f32>) {
    for (mut row, &l) in s.rows_mut().into_iter().zip(&lse) {
        if l == f32::NEG_INFINITY {
            row.fill(0.0);
        } else {
            row.mapv_inplace(|x| (x - l).exp());
        }
    }
}

/// `dS ← P ∘ (dP − D)` in place of dP, with `D` one number per row.
pub fn ds_from_dp(mut dp: ArrayViewMut2<'_, f32>, p: ArrayView2<'_, f32>, d: ArrayView1<'_, f32>) {
    Zip::from(dp.rows_mut()).and(p.rows()).and(d).for_each(|mut ds, p_row, &d_i| {
        Zip::from(&mut ds).and(p_row).for_each(|ds, &p| *ds = p * (*ds - d_i));
    });
}
