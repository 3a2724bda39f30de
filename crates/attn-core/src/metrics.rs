//! Error metrics against the float64 reference.
//!
//! The normwise relative error ‖x − r‖₂ / ‖r‖₂ is the figure DESIGN.md's tolerances are
//! stated in. Being an average, it can hide one bad row among many, so it comes with an
//! elementwise figure: the largest |x − r| over the root-mean-square of `r`. A NaN anywhere
//! makes both infinite, so NaN never passes. Equal infinities (the −∞ log-sum-exp of a fully
//! masked row) count as exact.

use ndarray::{ArrayView, Dimension};

/// Both error figures of one tensor, and where the worst element is.
#[derive(Clone, Debug, PartialEq)]
pub struct ErrorReport {
    /// ‖x − r‖₂ / ‖r‖₂ (‖x − r‖₂ when r is zero).
    pub normwise: f64,
    /// max |x − r| / rms(r) (max |x − r| when r is zero).
    pub elementwise: f64,
    /// Flat index of the worst element.
    pub worst: usize,
}

impl ErrorReport {
    /// Whether both figures are within `tol` (normwise) and `elem_tol` (elementwise).
    pub fn within(&self, tol: f64, elem_tol: f64) -> bool {
        self.normwise <= tol && self.elementwise <= elem_tol
    }
}

/// Compares `x` against the reference `r`, which must have the same shape.
///
/// # Panics
/// When the shapes differ: that is a bug in the caller, not an input error.
pub fn compare<D: Dimension>(x: ArrayView<'_, f32, D>, r: ArrayView<'_, f64, D>) -> ErrorReport {
    assert_eq!(x.shape(), r.shape(), "compare: shapes differ");
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
        if d > worst_abs || d.is_nan() {
            worst_abs = d;
            worst = idx;
        }
        diff2 += d * d;
        if ri.is_finite() {
            ref2 += ri * ri;
            count += 1;
        }
    }
    let norm = ref2.sqrt();
    let rms = if count > 0 {
        (ref2 / count as f64).sqrt()
    } else {
        0.0
    };
    let nan_to_inf = |v: f64| if v.is_nan() { f64::INFINITY } else { v };
    ErrorReport {
        normwise: nan_to_inf(if norm > 0.0 {
            diff2.sqrt() / norm
        } else {
            diff2.sqrt()
        }),
        elementwise: nan_to_inf(if rms > 0.0 {
            worst_abs / rms
        } else {
            worst_abs
        }),
        worst,
    }
}

/// ‖x − r‖₂ / ‖r‖₂, NaN-proof (see [`compare`]).
pub fn rel_error<D: Dimension>(x: ArrayView<'_, f32, D>, r: ArrayView<'_, f64, D>) -> f64 {
    compare(x, r).normwise
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
        assert!(
            (e.elementwise - 0.01).abs() < 1e-6,
            "elementwise {}",
            e.elementwise
        );
        assert_eq!(e.worst / 4, 77);
    }
}
