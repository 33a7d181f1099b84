//! `cellmorph::stats` against `tests/fixtures/metrics.json` (scikit-learn
//! `r2_score` / `roc_auc_score` / confusion-matrix rates, SciPy `pearsonr`,
//! statsmodels `multipletests(method="fdr_bh")`; see that folder's README).
//!
//! Tolerances: closed forms (R², r, r², BH q, rates, AUC) agree to rounding,
//! checked at 1e-9 relative; p-values go through the incomplete beta
//! function and are checked at 1e-8 relative (it is accurate to ~1e-14).

use cellmorph::stats::{
    benjamini_hochberg, binary_metrics, fdr_reject, pearson, r2_score, regression_metrics, roc_auc,
    roc_curve, ConfusionMatrix,
};
use serde::Deserialize;

/// Relative tolerance for closed-form quantities.
const CLOSED_FORM_RTOL: f64 = 1e-9;
/// Relative tolerance for p-values (special-function evaluations).
const P_VALUE_RTOL: f64 = 1e-8;

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Case {
    Regression {
        pred: Vec<f64>,
        measured: Vec<f64>,
        r2_score: f64,
        pearson_r: f64,
        pearson_p: f64,
        r2: f64,
    },
    Bh {
        p: Vec<f64>,
        q: Vec<f64>,
        #[serde(rename = "reject_0.05")]
        reject: Vec<bool>,
    },
    Binary {
        y_true: Vec<u8>,
        score: Vec<f64>,
        threshold: f64,
        auc: f64,
        f1: f64,
        accuracy: f64,
        sensitivity: f64,
        specificity: f64,
        ppv: f64,
        npv: f64,
    },
}

fn cases() -> Vec<Case> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/metrics.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn assert_close(what: &str, got: f64, want: f64, rtol: f64) {
    assert!(
        got.is_finite() && (got - want).abs() <= rtol * want.abs(),
        "{what}: got {got:e}, want {want:e} (relative error {:e} > {rtol:e})",
        ((got - want) / want).abs()
    );
}

fn some(what: &str, v: Option<f64>) -> f64 {
    v.unwrap_or_else(|| panic!("{what}: undefined, fixture has a value"))
}

#[test]
fn fixture_covers_every_kind() {
    let cases = cases();
    let count = |f: fn(&Case) -> bool| cases.iter().filter(|c| f(c)).count();
    assert_eq!(count(|c| matches!(c, Case::Regression { .. })), 3);
    assert_eq!(count(|c| matches!(c, Case::Bh { .. })), 1);
    assert_eq!(count(|c| matches!(c, Case::Binary { .. })), 2);
}

#[test]
fn regression_cases_match_sklearn_and_scipy() {
    for (i, case) in cases().iter().enumerate() {
        let Case::Regression {
            pred,
            measured,
            r2_score: want_r2_score,
            pearson_r,
            pearson_p,
            r2,
        } = case
        else {
            continue;
        };
        let tag = format!("case {i} (n = {})", pred.len());
        let got = r2_score(measured, pred).unwrap();
        assert_close(
            &format!("{tag} r2_score"),
            got,
            *want_r2_score,
            CLOSED_FORM_RTOL,
        );
        let (r, p) = pearson(pred, measured).unwrap();
        assert_close(&format!("{tag} pearson r"), r, *pearson_r, CLOSED_FORM_RTOL);
        assert_close(&format!("{tag} pearson p"), p, *pearson_p, P_VALUE_RTOL);
        let all = regression_metrics(measured, pred).unwrap();
        assert_close(&format!("{tag} r²"), all.r2, *r2, CLOSED_FORM_RTOL);
        assert_eq!((all.r2_score, all.pearson_r, all.pearson_p), (got, r, p));
    }
}

#[test]
fn bh_case_matches_statsmodels() {
    for case in cases() {
        let Case::Bh { p, q, reject } = case else {
            continue;
        };
        let got = benjamini_hochberg(&p).unwrap();
        assert_eq!(got.len(), q.len());
        for (i, (g, w)) in got.iter().zip(&q).enumerate() {
            assert_close(&format!("q[{i}]"), *g, *w, CLOSED_FORM_RTOL);
        }
        assert_eq!(fdr_reject(&p, 0.05).unwrap(), reject);
    }
}

#[test]
fn binary_cases_match_sklearn() {
    for (i, case) in cases().into_iter().enumerate() {
        let Case::Binary {
            y_true,
            score,
            threshold,
            auc,
            f1,
            accuracy,
            sensitivity,
            specificity,
            ppv,
            npv,
        } = case
        else {
            continue;
        };
        let labels: Vec<bool> = y_true.iter().map(|&y| y == 1).collect();
        let tag = format!("case {i} (n = {})", labels.len());
        let m = binary_metrics(&labels, &score, threshold).unwrap();
        let rtol = CLOSED_FORM_RTOL;
        assert_close(&format!("{tag} auc"), some("auc", m.auc), auc, rtol);
        assert_close(&format!("{tag} f1"), some("f1", m.f1), f1, rtol);
        let acc = some("accuracy", m.accuracy);
        assert_close(&format!("{tag} accuracy"), acc, accuracy, rtol);
        let sens = some("sensitivity", m.sensitivity);
        assert_close(&format!("{tag} sensitivity"), sens, sensitivity, rtol);
        let spec = some("specificity", m.specificity);
        assert_close(&format!("{tag} specificity"), spec, specificity, rtol);
        assert_close(&format!("{tag} ppv"), some("ppv", m.ppv), ppv, rtol);
        assert_close(&format!("{tag} npv"), some("npv", m.npv), npv, rtol);
        // The AUC from the curve's points by the trapezoid rule, as
        // scikit-learn's `auc(fpr, tpr)`, with and without dropped points.
        for drop in [false, true] {
            let curve = roc_curve(&labels, &score, drop).unwrap();
            let area: f64 = curve
                .fpr
                .windows(2)
                .zip(curve.tpr.windows(2))
                .map(|(f, t)| (f[1] - f[0]) * (t[1] + t[0]) / 2.0)
                .sum();
            assert_close(&format!("{tag} trapezoid (drop {drop})"), area, auc, 1e-12);
        }
        assert_eq!(roc_auc(&labels, &score).unwrap(), some("auc", m.auc));
    }
}

#[test]
fn threshold_counts_ties_as_positive() {
    // The fixtures hold scores exactly at 0.5; only `>=` reproduces their
    // sensitivity (the first binary case: 8 of 12 positives, not 7).
    let case = cases()
        .into_iter()
        .find_map(|c| match c {
            Case::Binary { y_true, score, .. } => Some((y_true, score)),
            _ => None,
        })
        .unwrap();
    let labels: Vec<bool> = case.0.iter().map(|&y| y == 1).collect();
    assert!(case.1.contains(&0.5));
    let m = ConfusionMatrix::at_threshold(&labels, &case.1, 0.5).unwrap();
    assert_eq!((m.true_positive, m.false_negative), (8, 4));
    assert_eq!((m.false_positive, m.true_negative), (5, 3));
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let x = [1.0, 2.0, 3.0];
    assert!(r2_score(&x, &x[..2]).is_err());
    assert!(r2_score(&[], &[]).is_err());
    assert!(r2_score(&[1.0, f64::NAN, 3.0], &x).is_err());
    assert!(pearson(&x, &[2.0, 2.0, 2.0]).is_err());
    assert!(pearson(&[f64::NAN, 1.0, 2.0], &x).is_err());
    assert!(regression_metrics(&x, &[5.0, 5.0, 5.0]).is_err());
    assert!(benjamini_hochberg(&[]).is_err());
    assert!(benjamini_hochberg(&[0.5, 2.0]).is_err());
    assert!(roc_auc(&[true, true, true], &x).is_err());
    assert!(roc_curve(&[true, false], &x, true).is_err());
    assert!(binary_metrics(&[true, false, true], &[0.1, f64::NAN, 0.3], 0.5).is_err());
}

#[test]
fn constant_truth_conventions() {
    // scikit-learn (force_finite=True): 1.0 for a perfect prediction, else 0.0.
    assert_eq!(r2_score(&[3.0; 4], &[3.0; 4]).unwrap(), 1.0);
    assert_eq!(r2_score(&[3.0; 4], &[3.0, 3.0, 3.0, 2.0]).unwrap(), 0.0);
}
