//! Regression scores: scikit-learn's `r2_score` and SciPy's `pearsonr`.

use super::special::student_t_two_sided_p_from_x;
use super::{check_paired, is_constant, mean};
use crate::error::{Error, Result};

/// Coefficient of determination `1 − Σ(y − ŷ)² / Σ(y − ȳ)²`, exactly as
/// scikit-learn's `r2_score(y_true, y_pred)` (single output, no weights,
/// `force_finite=True`).
///
/// Not symmetric: `y_true` are the measured values. When `y_true` is
/// constant (all values exactly equal) the ratio is undefined and, like
/// scikit-learn, the score is 1.0 for perfect predictions and 0.0 otherwise.
///
/// # Errors
/// Lengths differ, fewer than two samples (scikit-learn warns and returns
/// NaN there), or a non-finite value.
pub fn r2_score(y_true: &[f64], y_pred: &[f64]) -> Result<f64> {
    check_paired("r2_score", y_true, y_pred, 2)?;
    let residual: f64 = y_true
        .iter()
        .zip(y_pred)
        .map(|(t, p)| (t - p) * (t - p))
        .sum();
    if is_constant(y_true) {
        return Ok(if residual == 0.0 { 1.0 } else { 0.0 });
    }
    let m = mean(y_true);
    let total: f64 = y_true.iter().map(|t| (t - m) * (t - m)).sum();
    Ok(1.0 - residual / total)
}

/// Pearson correlation `r` and its two-sided p-value, as SciPy's
/// `pearsonr(x, y)`.
///
/// The p-value is that of `t = r √((n−2)/(1−r²))` under Student's t with
/// `n − 2` degrees of freedom, computed as `I_{1−r²}((n−2)/2, 1/2)` with
/// `1 − r² = (1−|r|)(1+|r|)` for accuracy near |r| = 1. `r` is clipped to
/// `[−1, 1]`. With two samples `r = ±1` and `p = 1`, as in SciPy.
///
/// # Errors
/// Lengths differ, fewer than two samples, a non-finite value, or a
/// constant input (r undefined; SciPy warns and returns NaN).
pub fn pearson(x: &[f64], y: &[f64]) -> Result<(f64, f64)> {
    check_paired("pearson", x, y, 2)?;
    if is_constant(x) || is_constant(y) {
        return Err(Error::invalid(
            "pearson: an input is constant, so the correlation is undefined",
        ));
    }
    let xc = centered_unit(x);
    let yc = centered_unit(y);
    let r = xc
        .iter()
        .zip(&yc)
        .map(|(a, b)| a * b)
        .sum::<f64>()
        .clamp(-1.0, 1.0);
    let n = x.len();
    if n == 2 {
        return Ok((r.signum(), 1.0));
    }
    let abs_r = r.abs();
    let one_minus_r2 = (1.0 - abs_r) * (1.0 + abs_r);
    let p = student_t_two_sided_p_from_x((n - 2) as f64, one_minus_r2)?;
    Ok((r, p))
}

/// `v − mean(v)` scaled to unit Euclidean norm. Scaling by the largest
/// deviation first keeps the norm from overflowing or underflowing (as
/// SciPy does). The caller guarantees `v` is not constant.
fn centered_unit(v: &[f64]) -> Vec<f64> {
    let m = mean(v);
    let mut c: Vec<f64> = v.iter().map(|a| a - m).collect();
    let max = c.iter().fold(0.0_f64, |acc, a| acc.max(a.abs()));
    c.iter_mut().for_each(|a| *a /= max);
    let norm = c.iter().map(|a| a * a).sum::<f64>().sqrt();
    c.iter_mut().for_each(|a| *a /= norm);
    c
}

/// The paper's Table 3 columns for one gene on one data set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RegressionMetrics {
    /// scikit-learn's `r2_score(measured, predicted)`.
    pub r2_score: f64,
    /// Pearson r between predicted and measured.
    pub pearson_r: f64,
    /// Two-sided p-value of `pearson_r` (t-test, n − 2 degrees of freedom).
    pub pearson_p: f64,
    /// The paper's R²: `pearson_r²`.
    pub r2: f64,
}

/// All of [`RegressionMetrics`] for `predicted` against `measured`.
///
/// # Errors
/// As [`r2_score`] and [`pearson`] (including constant `measured` or
/// `predicted`, for which Pearson r is undefined).
pub fn regression_metrics(measured: &[f64], predicted: &[f64]) -> Result<RegressionMetrics> {
    let r2_score = r2_score(measured, predicted)?;
    let (pearson_r, pearson_p) = pearson(predicted, measured)?;
    Ok(RegressionMetrics {
        r2_score,
        pearson_r,
        pearson_p,
        r2: pearson_r * pearson_r,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r2_score_sklearn_docstring_example() {
        // scikit-learn's docstring: r2_score([3, -0.5, 2, 7], [2.5, 0.0, 2, 8]) = 0.948...
        let got = r2_score(&[3.0, -0.5, 2.0, 7.0], &[2.5, 0.0, 2.0, 8.0]).unwrap();
        // Closed form: 1 − 1.5 / 29.1875.
        assert!((got - (1.0 - 1.5 / 29.1875)).abs() <= 1e-15);
    }

    #[test]
    fn r2_score_constant_truth_follows_force_finite() {
        assert_eq!(r2_score(&[2.0, 2.0, 2.0], &[2.0, 2.0, 2.0]).unwrap(), 1.0);
        assert_eq!(r2_score(&[2.0, 2.0, 2.0], &[2.0, 2.0, 2.1]).unwrap(), 0.0);
        // Predicting the mean scores exactly 0 for non-constant truth.
        assert_eq!(r2_score(&[1.0, 2.0, 3.0], &[2.0, 2.0, 2.0]).unwrap(), 0.0);
    }

    #[test]
    fn r2_score_rejects_bad_input() {
        assert!(r2_score(&[], &[]).is_err());
        assert!(r2_score(&[1.0], &[1.0]).is_err());
        assert!(r2_score(&[1.0, 2.0], &[1.0]).is_err());
        assert!(r2_score(&[1.0, f64::NAN], &[1.0, 2.0]).is_err());
        assert!(r2_score(&[1.0, 2.0], &[f64::INFINITY, 2.0]).is_err());
    }

    #[test]
    fn pearson_three_points_matches_closed_form() {
        // n = 3 (one dof): p = 1 − (2/π) asin(|r|).
        let (r, p) = pearson(&[1.0, 2.0, 3.0], &[1.0, 3.0, 2.0]).unwrap();
        assert!((r - 0.5).abs() <= 1e-15);
        let want = 1.0 - 2.0 / std::f64::consts::PI * 0.5_f64.asin();
        assert!((p - want).abs() <= 1e-14 * want, "{p} vs {want}");
    }

    #[test]
    fn pearson_perfect_and_two_point_cases() {
        let (r, p) = pearson(&[1.0, 2.0, 3.0, 4.0], &[-2.0, -4.0, -6.0, -8.0]).unwrap();
        assert_eq!((r, p), (-1.0, 0.0));
        assert_eq!(pearson(&[1.0, 2.0], &[5.0, 3.0]).unwrap(), (-1.0, 1.0));
    }

    #[test]
    fn pearson_is_scale_invariant_and_symmetric() {
        let x = [0.3, 1.7, 2.2, 5.0, 4.1, 3.3];
        let y = [1.0, 2.0, 2.5, 4.0, 4.5, 2.0];
        let (r, p) = pearson(&x, &y).unwrap();
        let big: Vec<f64> = x.iter().map(|v| v * 1e200).collect();
        let (r2, p2) = pearson(&y, &big).unwrap();
        assert!((r - r2).abs() <= 1e-15 && (p - p2).abs() <= 1e-14 * p);
    }

    #[test]
    fn pearson_rejects_bad_input() {
        assert!(pearson(&[], &[]).is_err());
        assert!(pearson(&[1.0], &[2.0]).is_err());
        assert!(pearson(&[1.0, 2.0, 3.0], &[1.0, 2.0]).is_err());
        assert!(pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_err());
        assert!(pearson(&[1.0, 2.0, 3.0], &[4.0, 4.0, 4.0]).is_err());
        assert!(pearson(&[1.0, f64::NAN, 3.0], &[1.0, 2.0, 3.0]).is_err());
    }
}
