//! Error metrics against the float64 reference.
//!
//! The normwise relative error ‖x − r‖₂ / ‖r‖₂ is the figure DESIGN.md's tolerances are
//! stated in. Being an average, it can hide one bad row among many, so it comes with an
//! elementwise figure: the largest |x − r| over the root-mean-square of `r`. A NaN anywhere
//! makes both infinite, so NaN never passes. Equal infinities (the −∞ log-sum-exp of a fully
//! masked row) count as exact.

use ndarray::{ArrayView, Dimension};

/// float32's unit roundoff, 2⁻²⁴.
pub const F32_UNIT_ROUNDOFF: f64 = 1.0 / 16_777_216.0;

/// How many roundings of the cancelling terms [`compare_floored`] forgives: normwise, and
/// per element.
pub const FLOOR_ROUNDINGS: (f64, f64) = (4.0, 16.0);

/// Both error figures of one tensor, and where the worst element is.
#[derive(Clone, Debug, PartialEq)]
pub struct ErrorReport {
    /// ‖x − r‖₂ / ‖r‖₂ (‖x − r‖₂ when r is zero).
    pub normwise: f64,
    /// max |x − r| / rms(r) (max |x − r| when r is zero), after the floor.
    pub elementwise: f64,
    /// Flat index of the worst element.
    pub worst: usize,
    /// float32's rounding floor relative to ‖r‖: `c · u · ‖M‖ / ‖r‖` where `M` are the
    /// magnitudes of the terms that cancel ([`compare_floored`]); 0 from [`compare`].
    pub floor: f64,
}

impl ErrorReport {
    /// Whether the normwise error is within `tol` (plus the rounding floor) and the
    /// elementwise one within `elem_tol`.
    pub fn within(&self, tol: f64, elem_tol: f64) -> bool {
        self.normwise <= tol + self.floor && self.elementwise <= elem_tol
    }
}

/// Compares `x` against the reference `r`, which must have the same shape.
///
/// # Panics
/// When the shapes differ: that is a bug in the caller, not an input error.
pub fn compare<D: Dimension>(x: ArrayView<'_, f32, D>, r: ArrayView<'_, f64, D>) -> ErrorReport {
    compare_impl(x, r, None)
}

/// [`compare`] for a quantity whose entries are sums of terms that may cancel, given `m`,
/// the sums of their magnitudes (e.g. [`crate::reference::RefProblem::backward_magnitudes`]).
///
/// No float32 computation can resolve a difference of nearly equal terms better than its
/// rounding of those terms, `u · m` (u = 2⁻²⁴): a softmax row that is one-hot to within
/// 1e-5 has a gradient of size 1e-5 whose every f32 evaluation is off by ~u/1e-5 ≈ 1e-2
/// relative. So the report carries that floor, `FLOOR_ROUNDINGS.0 · u · ‖m‖ / ‖r‖`, which
/// [`ErrorReport::within`] adds to the tolerance, and the elementwise figure discounts
/// `FLOOR_ROUNDINGS.1 · u · m` per element. For well-conditioned problems the floor is a few
/// 1e-6, far below the tolerances.
pub fn compare_floored<D: Dimension>(
    x: ArrayView<'_, f32, D>,
    r: ArrayView<'_, f64, D>,
    m: ArrayView<'_, f64, D>,
) -> ErrorReport {
    assert_eq!(r.shape(), m.shape(), "compare_floored: shapes differ");
    compare_impl(x, r, Some(m))
}

fn compare_impl<D: Dimension>(
    x: ArrayView<'_, f32, D>,
    r: ArrayView<'_, f64, D>,
    m: Option<ArrayView<'_, f64, D>>,
) -> ErrorReport {
    assert_eq!(x.shape(), r.shape(), "compare: shapes differ");
    let u = F32_UNIT_ROUNDOFF;
    let (mut m2, mut elem_floor) = (0.0f64, Vec::new());
    if let Some(m) = &m {
        m2 = m.iter().map(|v| v * v).sum();
        elem_floor = m.iter().map(|v| FLOOR_ROUNDINGS.1 * u * v).collect();
    }
    let (mut diff2, mut ref2, mut count) = (0.0f64, 0.0f64, 0usize);
    let (mut worst_abs, mut worst) = (0.0f64, 0usize);
    for (idx, (&xi, &ri)) in x.iter().zip(r.iter()).enumerate() {
        let xi = xi as f64;
        let d = if xi == ri {
            0.0 // also equal infinities
        } else if xi.is_finite() && ri.is_finite() {
            (xi - ri).abs()
        } else {
            f64::INFINITY // NaN, or an infinity where the reference has none
        };
        let beyond_floor = (d - elem_floor.get(idx).copied().unwrap_or(0.0)).max(0.0);
        if beyond_floor > worst_abs || d.is_nan() {
            worst_abs = beyond_floor;
            worst = idx;
        }
        diff2 += d * d;
        if ri.is_finite() {
            ref2 += ri * ri;
            count += 1;
        }
    }
    let norm = ref2.sqrt();
    let rms = if count > 0 { (ref2 / count as f64).sqrt() } else { 0.0 };
    let nan_to_inf = |v: f64| if v.is_nan() { f64::INFINITY } else { v };
    ErrorReport {
        normwise: nan_to_inf(if norm > 0.0 { diff2.sqrt() / norm } else { diff2.sqrt() }),
        elementwise: nan_to_inf(if rms > 0.0 { worst_abs / rms } else { worst_abs }),
        worst,
        floor: if norm > 0.0 {
            FLOOR_ROUNDINGS.0 * u * m2.sqrt() / norm
        } else {
            FLOOR_ROUNDINGS.0 * u * m2.sqrt()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, array};

    #[test]
    fn exact_match_is_zero() {
        let r = array![[1.0f64, -2.0], [3.0, f64::NEG_INFINITY]];
        let x = r.mapv(|v| v as f32);
        let e = compare(x.view(), r.view());
        assert_eq!(e.normwise, 0.0);
        assert_eq!(e.elementwise, 0.0);
    }

    #[test]
    fn nan_never_passes() {
        let r = Array2::<f64>::ones((3, 3));
        let mut x = r.mapv(|v| v as f32);
        x[[1, 2]] = f32::NAN;
        let e = compare(x.view(), r.view());
        assert!(e.normwise.is_infinite() && e.elementwise.is_infinite());
        assert_eq!(e.worst, 5);
    }

    #[test]
    fn one_bad_row_among_many_shows_elementwise() {
        let r = Array2::<f64>::ones((10_000, 4));
        let mut x = r.mapv(|v| v as f32);
        x.row_mut(77).fill(1.01);
        let e = compare(x.view(), r.view());
        assert!(e.normwise < 2e-4, "normwise {}", e.normwise);
        assert!((e.elementwise - 0.01).abs() < 1e-6, "elementwise {}", e.elementwise);
        assert_eq!(e.worst / 4, 77);
    }

    #[test]
    fn the_floor_forgives_only_float32_rounding_of_the_cancelling_terms() {
        // A reference of 1e-5 built from terms of size 1: f32 gets it right to ~1e-7
        // absolute, 1e-2 relative; the floor (4 · u · 1 / 1e-5 ≈ 2.4e-2) covers that.
        let r = array![1e-5f64, -2e-5];
        let m = array![1.0f64, 1.0];
        let x = array![1.01e-5f32, -2.01e-5];
        let e = compare_floored(x.view(), r.view(), m.view());
        assert!(e.within(1e-4, 1e-3), "{e:?}");
        // But not a real error: 10 % of a term is far above its rounding.
        let x = array![0.1f32, -2e-5];
        assert!(!compare_floored(x.view(), r.view(), m.view()).within(1e-4, 1e-3));
    }
}
