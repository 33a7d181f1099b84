//! Statistics and evaluation metrics, matching the implementations the
//! paper's users know: scikit-learn (`r2_score`, `roc_auc_score`,
//! `roc_curve`), SciPy (`pearsonr`) and statsmodels (`multipletests`
//! with `fdr_bh`).
//!
//! - [`special`]: log-gamma and the regularized incomplete beta function,
//!   written here (continued fraction, modified Lentz) for Pearson p-values.
//! - [`regression`]: R², Pearson r with its two-sided p-value.
//! - [`fdr`]: Benjamini–Hochberg q-values.
//! - [`classification`]: ROC curve and AUC, confusion matrix at a threshold
//!   and the rates derived from it.
//! - [`tsne`]: exact t-SNE as scikit-learn's `TSNE(method="exact")`.
//! - [`bayesopt`]: a Gaussian-process surrogate with expected improvement
//!   on the unit cube (the hyper-parameter search of `screen tune`).
//! - [`cluster`]: Ward linkage, flat clusters and dendrogram order as SciPy's
//!   `linkage(X, "ward")`, `fcluster(Z, k, "maxclust")`, `dendrogram`.
//!
//! Every function validates its input and returns an error, never a panic,
//! on empty input, mismatched lengths, non-finite values, or data for which
//! the quantity is undefined (each function documents which).

pub mod bayesopt;
pub mod classification;
pub mod cluster;
pub mod fdr;
pub mod regression;
pub mod special;
pub mod tsne;

pub use classification::{
    binary_metrics, roc_auc, roc_curve, BinaryMetrics, ConfusionMatrix, RocCurve,
};
pub use fdr::{benjamini_hochberg, fdr_reject};
pub use regression::{pearson, r2_score, regression_metrics, RegressionMetrics};
pub use special::regularized_incomplete_beta;

use crate::error::{Error, Result};

/// Checks that `a` and `b` have the same length, at least `min_len`, and
/// contain only finite values.
fn check_paired(op: &'static str, a: &[f64], b: &[f64], min_len: usize) -> Result<()> {
    if a.len() != b.len() {
        return Err(Error::shape(
            op,
            format!(
                "inputs have different lengths ({} and {})",
                a.len(),
                b.len()
            ),
        ));
    }
    check_len(op, a.len(), min_len)?;
    check_finite(op, a)?;
    check_finite(op, b)
}

/// Checks that `len` is at least `min_len` (and so never zero).
fn check_len(op: &'static str, len: usize, min_len: usize) -> Result<()> {
    let min_len = min_len.max(1);
    if len < min_len {
        return Err(Error::invalid(format!(
            "{op}: needs at least {min_len} value(s), got {len}"
        )));
    }
    Ok(())
}

/// Checks that every value is finite, naming the first one that is not.
fn check_finite(op: &'static str, values: &[f64]) -> Result<()> {
    match values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        Some((i, v)) => Err(Error::invalid(format!(
            "{op}: value {i} is not finite ({v})"
        ))),
        None => Ok(()),
    }
}

/// Whether all values are exactly equal (the definition SciPy and
/// scikit-learn use for "constant input").
fn is_constant(values: &[f64]) -> bool {
    values.windows(2).all(|w| w[0] == w[1])
}

/// Arithmetic mean, two-pass corrected so that the mean of a constant
/// vector is that constant up to one rounding.
fn mean(values: &[f64]) -> f64 {
    let n = values.len() as f64;
    let m = values.iter().sum::<f64>() / n;
    m + values.iter().map(|v| v - m).sum::<f64>() / n
}
