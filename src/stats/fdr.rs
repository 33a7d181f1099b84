//! Benjamini–Hochberg false discovery rate control, as statsmodels'
//! `multipletests(p, method="fdr_bh")`.

use super::check_len;
use crate::error::{Error, Result};

/// Benjamini–Hochberg adjusted p-values (q-values), in the input order.
///
/// With the p-values sorted ascending, `q_(i) = min_{j ≥ i} min(1, p_(j) m / j)`
/// for `m` tests and ranks `j` from 1: monotone in p, capped at 1, as
/// statsmodels' `fdr_bh`. Tied p-values get equal q-values.
///
/// # Errors
/// Empty input, or a value that is NaN or outside `[0, 1]`.
pub fn benjamini_hochberg(p: &[f64]) -> Result<Vec<f64>> {
    check_len("benjamini_hochberg", p.len(), 1)?;
    if let Some((i, v)) = p
        .iter()
        .enumerate()
        .find(|(_, v)| !(0.0..=1.0).contains(*v))
    {
        return Err(Error::invalid(format!(
            "benjamini_hochberg: p-value {i} is {v}, outside [0, 1]"
        )));
    }
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut q = vec![0.0; m];
    let mut running_min = 1.0_f64;
    for (rank0, &i) in order.iter().enumerate().rev() {
        running_min = running_min.min(p[i] * m as f64 / (rank0 + 1) as f64);
        q[i] = running_min;
    }
    Ok(q)
}

/// Which hypotheses are rejected at false discovery rate `alpha`: statsmodels'
/// `reject` output, equivalently `q ≤ alpha` for the q-values of
/// [`benjamini_hochberg`]. (The paper reports genes with "FDR < 0.05"; a q
/// exactly equal to alpha is the only difference.)
///
/// # Errors
/// As [`benjamini_hochberg`], or `alpha` outside `(0, 1)`.
pub fn fdr_reject(p: &[f64], alpha: f64) -> Result<Vec<bool>> {
    if !(alpha > 0.0 && alpha < 1.0) {
        return Err(Error::invalid(format!(
            "fdr_reject: alpha must lie in (0, 1), got {alpha}"
        )));
    }
    Ok(benjamini_hochberg(p)?
        .into_iter()
        .map(|q| q <= alpha)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_example() {
        // Sorted p: 0.01, 0.02, 0.03, 0.04, 0.5 → p·5/rank: 0.05, 0.05, 0.05,
        // 0.05, 0.5; input order is shuffled to check the unsorting.
        let p = [0.04, 0.5, 0.01, 0.03, 0.02];
        let q = benjamini_hochberg(&p).unwrap();
        let want = [0.05, 0.5, 0.05, 0.05, 0.05];
        for (g, w) in q.iter().zip(want) {
            assert!((g - w).abs() <= 1e-15, "{q:?}");
        }
        assert_eq!(
            fdr_reject(&p, 0.06).unwrap(),
            [true, false, true, true, true]
        );
    }

    #[test]
    fn monotone_capped_and_tied() {
        let p = [0.9, 0.9, 1.0, 0.2, 0.2];
        let q = benjamini_hochberg(&p).unwrap();
        // Ranks: 0.2·5/2 = 0.5 for both ties; 0.9·5/4 = 1.125 → capped by the
        // running minimum with 1.0·5/5 = 1.
        assert_eq!(q, vec![1.0, 1.0, 1.0, 0.5, 0.5]);
    }

    #[test]
    fn single_value_is_unchanged() {
        assert_eq!(benjamini_hochberg(&[0.03]).unwrap(), vec![0.03]);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(benjamini_hochberg(&[]).is_err());
        assert!(benjamini_hochberg(&[0.1, f64::NAN]).is_err());
        assert!(benjamini_hochberg(&[0.1, 1.5]).is_err());
        assert!(benjamini_hochberg(&[-0.1]).is_err());
        assert!(fdr_reject(&[0.1], 0.0).is_err());
        assert!(fdr_reject(&[0.1], f64::NAN).is_err());
    }
}
