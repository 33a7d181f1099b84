//! Binary classification metrics: scikit-learn's `roc_curve` and
//! `roc_auc_score`, and the confusion matrix at a score threshold with the
//! rates derived from it.
//!
//! Rates whose denominator is zero (for example PPV when nothing is
//! predicted positive) are `None`; scikit-learn would warn and report 0.

use super::{check_finite, check_len};
use crate::error::{Error, Result};

/// Points of the ROC curve, as scikit-learn's `roc_curve`: one point per
/// distinct score (descending), preceded by `(0, 0)` at threshold `+∞`.
#[derive(Clone, Debug, PartialEq)]
pub struct RocCurve {
    /// False positive rate at each threshold, non-decreasing from 0 to 1.
    pub fpr: Vec<f64>,
    /// True positive rate at each threshold, non-decreasing from 0 to 1.
    pub tpr: Vec<f64>,
    /// Thresholds, decreasing: `+∞`, then the distinct scores kept. A sample
    /// is predicted positive at threshold `t` when its score is `≥ t`.
    pub thresholds: Vec<f64>,
}

/// Cumulative counts at the end of each group of tied scores, scores
/// descending: `(false positives, true positives, score)`.
fn cumulative_counts(
    op: &'static str,
    labels: &[bool],
    scores: &[f64],
) -> Result<Vec<(u64, u64, f64)>> {
    if labels.len() != scores.len() {
        return Err(Error::shape(
            op,
            format!("{} labels but {} scores", labels.len(), scores.len()),
        ));
    }
    check_len(op, scores.len(), 1)?;
    check_finite(op, scores)?;
    let positives = labels.iter().filter(|&&l| l).count();
    if positives == 0 || positives == labels.len() {
        return Err(Error::invalid(format!(
            "{op}: only one class present in the labels, so the ROC curve is undefined"
        )));
    }
    let mut order: Vec<(f64, bool)> = scores.iter().copied().zip(labels.iter().copied()).collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut points = Vec::new();
    let (mut fp, mut tp) = (0_u64, 0_u64);
    for (i, &(score, label)) in order.iter().enumerate() {
        if label {
            tp += 1;
        } else {
            fp += 1;
        }
        // A point closes each run of equal scores: tied samples cross the
        // threshold together.
        let last_of_group = order.get(i + 1).is_none_or(|next| next.0 != score);
        if last_of_group {
            points.push((fp, tp, score));
        }
    }
    Ok(points)
}

/// The ROC curve of `scores` for the binary `labels` (true = positive),
/// as scikit-learn's `roc_curve(labels, scores, drop_intermediate=...)`.
///
/// With `drop_intermediate`, points collinear with their neighbours (which
/// do not change the area) are dropped, exactly as scikit-learn does; the
/// first and last points are always kept.
///
/// # Errors
/// Lengths differ, empty input, a non-finite score, or labels of a single
/// class (the curve is undefined; scikit-learn warns and returns NaN rates).
pub fn roc_curve(labels: &[bool], scores: &[f64], drop_intermediate: bool) -> Result<RocCurve> {
    let mut points = cumulative_counts("roc_curve", labels, scores)?;
    if drop_intermediate && points.len() > 2 {
        // Keep a point unless both second differences (of fp and of tp
        // counts) vanish there, i.e. it is collinear with its neighbours.
        let keep: Vec<bool> = (0..points.len())
            .map(|i| {
                if i == 0 || i + 1 == points.len() {
                    return true;
                }
                let (a, b, c) = (points[i - 1], points[i], points[i + 1]);
                a.0 + c.0 != 2 * b.0 || a.1 + c.1 != 2 * b.1
            })
            .collect();
        let mut flags = keep.into_iter();
        points.retain(|_| flags.next().unwrap_or(true));
    }
    let (neg, pos) = points
        .last()
        .map_or((0.0, 0.0), |&(fp, tp, _)| (fp as f64, tp as f64));
    let mut curve = RocCurve {
        fpr: vec![0.0],
        tpr: vec![0.0],
        thresholds: vec![f64::INFINITY],
    };
    for (fp, tp, score) in points {
        curve.fpr.push(fp as f64 / neg);
        curve.tpr.push(tp as f64 / pos);
        curve.thresholds.push(score);
    }
    Ok(curve)
}

/// Area under the ROC curve, as scikit-learn's `roc_auc_score` for binary
/// labels: the trapezoidal area over distinct thresholds, so tied scores
/// count one half.
///
/// Summed exactly in integers and divided once, so it agrees with
/// scikit-learn to rounding.
///
/// # Errors
/// As [`roc_curve`] (including labels of a single class).
pub fn roc_auc(labels: &[bool], scores: &[f64]) -> Result<f64> {
    let points = cumulative_counts("roc_auc", labels, scores)?;
    let (mut prev_fp, mut prev_tp) = (0_u128, 0_u128);
    // Twice the area in units of (1 negative) × (1 positive).
    let mut twice_area = 0_u128;
    for &(fp, tp, _) in &points {
        let (fp, tp) = (u128::from(fp), u128::from(tp));
        twice_area += (fp - prev_fp) * (tp + prev_tp);
        (prev_fp, prev_tp) = (fp, tp);
    }
    Ok(twice_area as f64 / (2.0 * prev_fp as f64 * prev_tp as f64))
}

/// Confusion matrix of binary predictions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfusionMatrix {
    /// Positive samples predicted positive.
    pub true_positive: usize,
    /// Negative samples predicted positive.
    pub false_positive: usize,
    /// Negative samples predicted negative.
    pub true_negative: usize,
    /// Positive samples predicted negative.
    pub false_negative: usize,
}

/// Ratio of counts, `None` when the denominator is zero.
fn ratio(num: usize, den: usize) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

impl ConfusionMatrix {
    /// Counts with a sample predicted positive when `score >= threshold`
    /// (the paper's "threshold 0.5 on the positive class"; the fixtures
    /// confirm that a score equal to the threshold is positive).
    ///
    /// # Errors
    /// Lengths differ, empty input, a NaN score or a NaN threshold.
    pub fn at_threshold(labels: &[bool], scores: &[f64], threshold: f64) -> Result<Self> {
        const OP: &str = "confusion_matrix";
        if labels.len() != scores.len() {
            return Err(Error::shape(
                OP,
                format!("{} labels but {} scores", labels.len(), scores.len()),
            ));
        }
        check_len(OP, scores.len(), 1)?;
        if threshold.is_nan() {
            return Err(Error::invalid(format!("{OP}: threshold is NaN")));
        }
        if let Some(i) = scores.iter().position(|s| s.is_nan()) {
            return Err(Error::invalid(format!("{OP}: score {i} is NaN")));
        }
        let mut m = ConfusionMatrix {
            true_positive: 0,
            false_positive: 0,
            true_negative: 0,
            false_negative: 0,
        };
        for (&label, &score) in labels.iter().zip(scores) {
            match (label, score >= threshold) {
                (true, true) => m.true_positive += 1,
                (false, true) => m.false_positive += 1,
                (false, false) => m.true_negative += 1,
                (true, false) => m.false_negative += 1,
            }
        }
        Ok(m)
    }

    /// Number of samples.
    pub fn total(&self) -> usize {
        self.true_positive + self.false_positive + self.true_negative + self.false_negative
    }

    /// `(TP + TN) / total`; `None` only for an empty matrix.
    pub fn accuracy(&self) -> Option<f64> {
        ratio(self.true_positive + self.true_negative, self.total())
    }

    /// Sensitivity (recall, TPR): `TP / (TP + FN)`; `None` without positives.
    pub fn sensitivity(&self) -> Option<f64> {
        ratio(self.true_positive, self.true_positive + self.false_negative)
    }

    /// Specificity (TNR): `TN / (TN + FP)`; `None` without negatives.
    pub fn specificity(&self) -> Option<f64> {
        ratio(self.true_negative, self.true_negative + self.false_positive)
    }

    /// Positive predictive value (precision): `TP / (TP + FP)`; `None` when
    /// nothing is predicted positive.
    pub fn ppv(&self) -> Option<f64> {
        ratio(self.true_positive, self.true_positive + self.false_positive)
    }

    /// Negative predictive value: `TN / (TN + FN)`; `None` when nothing is
    /// predicted negative.
    pub fn npv(&self) -> Option<f64> {
        ratio(self.true_negative, self.true_negative + self.false_negative)
    }

    /// F1 score `2TP / (2TP + FP + FN)` (the harmonic mean of PPV and
    /// sensitivity); `None` when there are no positives and none predicted.
    pub fn f1(&self) -> Option<f64> {
        ratio(
            2 * self.true_positive,
            2 * self.true_positive + self.false_positive + self.false_negative,
        )
    }
}

/// The DenseNet screening metrics of [reference](crate::reference) §2 for one evaluation set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BinaryMetrics {
    /// Threshold on the positive-class score (positive when `score >= threshold`).
    pub threshold: f64,
    /// Counts at `threshold`.
    pub confusion: ConfusionMatrix,
    /// ROC AUC; `None` when the labels hold a single class.
    pub auc: Option<f64>,
    /// See [`ConfusionMatrix::f1`].
    pub f1: Option<f64>,
    /// See [`ConfusionMatrix::accuracy`].
    pub accuracy: Option<f64>,
    /// See [`ConfusionMatrix::sensitivity`].
    pub sensitivity: Option<f64>,
    /// See [`ConfusionMatrix::specificity`].
    pub specificity: Option<f64>,
    /// See [`ConfusionMatrix::ppv`].
    pub ppv: Option<f64>,
    /// See [`ConfusionMatrix::npv`].
    pub npv: Option<f64>,
}

/// ROC AUC and every confusion-matrix rate at `threshold`.
///
/// # Errors
/// As [`ConfusionMatrix::at_threshold`], or a non-finite score.
pub fn binary_metrics(labels: &[bool], scores: &[f64], threshold: f64) -> Result<BinaryMetrics> {
    let confusion = ConfusionMatrix::at_threshold(labels, scores, threshold)?;
    check_finite("binary_metrics", scores)?;
    let positives = confusion.true_positive + confusion.false_negative;
    let auc = if positives == 0 || positives == confusion.total() {
        None
    } else {
        Some(roc_auc(labels, scores)?)
    };
    Ok(BinaryMetrics {
        threshold,
        confusion,
        auc,
        f1: confusion.f1(),
        accuracy: confusion.accuracy(),
        sensitivity: confusion.sensitivity(),
        specificity: confusion.specificity(),
        ppv: confusion.ppv(),
        npv: confusion.npv(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sklearn_roc_curve_docstring_example() {
        // roc_curve([1, 1, 2, 2] with pos_label 2, [0.1, 0.4, 0.35, 0.8]):
        // fpr [0, 0, 0.5, 0.5, 1], tpr [0, 0.5, 0.5, 1, 1],
        // thresholds [inf, 0.8, 0.4, 0.35, 0.1].
        let labels = [false, false, true, true];
        let scores = [0.1, 0.4, 0.35, 0.8];
        let curve = roc_curve(&labels, &scores, false).unwrap();
        assert_eq!(curve.fpr, vec![0.0, 0.0, 0.5, 0.5, 1.0]);
        assert_eq!(curve.tpr, vec![0.0, 0.5, 0.5, 1.0, 1.0]);
        assert_eq!(curve.thresholds, vec![f64::INFINITY, 0.8, 0.4, 0.35, 0.1]);
        assert_eq!(roc_curve(&labels, &scores, true).unwrap(), curve);
        assert_eq!(roc_auc(&labels, &scores).unwrap(), 0.75);
    }

    #[test]
    fn drop_intermediate_removes_collinear_points_only() {
        // Scores 4, 3, 2 are all positive: (0, 1/3), (0, 2/3) lie on the
        // vertical segment to (0, 1) and are dropped.
        let labels = [true, true, true, false, false];
        let scores = [4.0, 3.0, 2.0, 1.0, 0.0];
        let full = roc_curve(&labels, &scores, false).unwrap();
        assert_eq!(full.thresholds.len(), 6);
        let dropped = roc_curve(&labels, &scores, true).unwrap();
        assert_eq!(dropped.thresholds, vec![f64::INFINITY, 4.0, 2.0, 0.0]);
        assert_eq!(dropped.fpr, vec![0.0, 0.0, 0.0, 1.0]);
        assert_eq!(dropped.tpr, vec![0.0, 1.0 / 3.0, 1.0, 1.0]);
        assert_eq!(roc_auc(&labels, &scores).unwrap(), 1.0);
    }

    #[test]
    fn ties_count_one_half() {
        // Every score tied: one diagonal segment, AUC 0.5.
        let labels = [true, false, true, false, false];
        assert_eq!(roc_auc(&labels, &[0.3; 5]).unwrap(), 0.5);
        // One positive tied with one negative above a negative: pairs
        // (p, n_tied) = 1/2, (p, n_low) = 1 → 0.75.
        assert_eq!(
            roc_auc(&[true, false, false], &[0.5, 0.5, 0.1]).unwrap(),
            0.75
        );
    }

    #[test]
    fn auc_equals_pairwise_probability() {
        // AUC = P(score_pos > score_neg) + ½ P(tie), over all pairs.
        let labels = [true, false, true, true, false, false, true, false];
        let scores = [0.9, 0.9, 0.3, 0.7, 0.1, 0.7, 0.7, 0.2];
        let mut wins = 0.0;
        let mut pairs = 0.0;
        for (li, si) in labels.iter().zip(&scores) {
            for (lj, sj) in labels.iter().zip(&scores) {
                if *li && !*lj {
                    pairs += 1.0;
                    wins += if si > sj {
                        1.0
                    } else if si == sj {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        let got = roc_auc(&labels, &scores).unwrap();
        assert!(
            (got - wins / pairs).abs() <= 1e-15,
            "{got} vs {}",
            wins / pairs
        );
    }

    #[test]
    fn roc_rejects_bad_input() {
        assert!(roc_auc(&[], &[]).is_err());
        assert!(roc_auc(&[true, false], &[0.1]).is_err());
        assert!(roc_auc(&[true, true], &[0.1, 0.2]).is_err());
        assert!(roc_auc(&[false, false], &[0.1, 0.2]).is_err());
        assert!(roc_auc(&[true, false], &[0.1, f64::NAN]).is_err());
        assert!(roc_curve(&[true, false], &[f64::INFINITY, 0.1], false).is_err());
    }

    #[test]
    fn threshold_is_inclusive_and_zero_denominators_are_none() {
        let labels = [true, false, true, false];
        let m = ConfusionMatrix::at_threshold(&labels, &[0.5, 0.5, 0.2, 0.1], 0.5).unwrap();
        assert_eq!(
            m,
            ConfusionMatrix {
                true_positive: 1,
                false_positive: 1,
                true_negative: 1,
                false_negative: 1
            }
        );
        // Nothing predicted positive: PPV undefined, F1 = 0 (there are positives).
        let none = ConfusionMatrix::at_threshold(&labels, &[0.1; 4], 0.5).unwrap();
        assert_eq!(none.ppv(), None);
        assert_eq!(none.f1(), Some(0.0));
        assert_eq!(none.npv(), Some(0.5));
        // No positives at all, all predicted negative: sensitivity and F1 undefined.
        let neg = ConfusionMatrix::at_threshold(&[false, false], &[0.1, 0.2], 0.5).unwrap();
        assert_eq!((neg.sensitivity(), neg.f1(), neg.ppv()), (None, None, None));
        assert_eq!((neg.specificity(), neg.accuracy()), (Some(1.0), Some(1.0)));
        let metrics = binary_metrics(&[false, false], &[0.1, 0.2], 0.5).unwrap();
        assert_eq!(metrics.auc, None);
        assert!(ConfusionMatrix::at_threshold(&labels, &[0.1; 4], f64::NAN).is_err());
        assert!(ConfusionMatrix::at_threshold(&labels, &[0.1; 3], 0.5).is_err());
        assert!(binary_metrics(&labels, &[0.1, f64::INFINITY, 0.2, 0.3], 0.5).is_err());
    }
}
