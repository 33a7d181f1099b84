//! The evaluation of a prediction run against labels: ROC AUC, F1,
//! accuracy, sensitivity, specificity, PPV, NPV, confusion matrix and
//! throughput ([`crate::stats`], scikit-learn's conventions; positive when
//! `probability ≥ threshold`), as JSON and a ROC curve PNG.
//! [`evaluate_predictions`] is `cellmorph screen evaluate`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::files::{read_labels, read_predictions, PredictionsFile};
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::plot::{roc_plot, PlotOptions};
use crate::stats::{binary_metrics, roc_curve};

/// Confusion-matrix counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// True positives.
    pub tp: usize,
    /// False positives.
    pub fp: usize,
    /// True negatives.
    pub tn: usize,
    /// False negatives (`fn` in the JSON).
    #[serde(rename = "fn")]
    pub fn_: usize,
}

/// ROC curve points; thresholds are `null` for +∞ (the first point).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RocPoints {
    /// False positive rates.
    pub fpr: Vec<f64>,
    /// True positive rates.
    pub tpr: Vec<f64>,
    /// Thresholds (decreasing).
    pub thresholds: Vec<Option<f64>>,
}

/// The evaluation of a predictions file against labels (serialized as the
/// report JSON). Rates with a zero denominator are `null`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvaluationReport {
    /// Images with both a prediction and a label.
    pub n: usize,
    /// Positives among them.
    pub positives: usize,
    /// Negatives among them.
    pub negatives: usize,
    /// Decision threshold on the probability (`≥` is positive).
    pub threshold: f64,
    /// ROC AUC (null with a single class).
    pub roc_auc: Option<f64>,
    /// F1 score.
    pub f1: Option<f64>,
    /// Accuracy.
    pub accuracy: Option<f64>,
    /// Sensitivity (recall).
    pub sensitivity: Option<f64>,
    /// Specificity.
    pub specificity: Option<f64>,
    /// Positive predictive value (precision).
    pub ppv: Option<f64>,
    /// Negative predictive value.
    pub npv: Option<f64>,
    /// Counts at the threshold.
    pub confusion_matrix: Counts,
    /// Whole-run throughput of the prediction run (images/s), if recorded.
    pub images_per_second: Option<f64>,
    /// Device-only throughput, if recorded.
    pub inference_images_per_second: Option<f64>,
    /// Device of the prediction run, if recorded.
    pub device: Option<String>,
    /// Images skipped by the prediction run.
    pub skipped: usize,
    /// Labeled images the predictions do not mention.
    pub labels_without_prediction: Vec<String>,
    /// Predicted images without a label.
    pub predictions_without_label: Vec<String>,
    /// The ROC curve (null with a single class).
    pub roc_curve: Option<RocPoints>,
}

/// Matches predictions to labels by image id (exactly, or by file name when
/// that is unique on both sides) and computes the screening metrics.
///
/// # Errors
/// No predicted image has a label, or the metrics fail (see
/// [`binary_metrics`]).
pub fn evaluate(
    preds: &PredictionsFile,
    labels: &[(String, bool)],
    threshold: f64,
) -> Result<EvaluationReport> {
    if !(0.0..=1.0).contains(&threshold) {
        return Err(Error::invalid(format!(
            "--threshold {threshold}: a probability threshold must lie in [0, 1] (above 1 nothing could be positive)"
        )));
    }
    let file_name = |id: &str| {
        Path::new(id)
            .file_name()
            .map_or_else(|| id.to_string(), |n| n.to_string_lossy().into_owned())
    };
    let mut by_name: HashMap<String, Option<usize>> = HashMap::new();
    for (i, r) in preds.rows.iter().enumerate() {
        by_name
            .entry(file_name(&r.id))
            .and_modify(|e| *e = None)
            .or_insert(Some(i));
    }
    let mut label_names: HashMap<String, usize> = HashMap::new();
    for (id, _) in labels {
        *label_names.entry(file_name(id)).or_default() += 1;
    }
    let exact: HashMap<&str, usize> = preds
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), i))
        .collect();
    let mut used = vec![false; preds.rows.len()];
    let (mut y, mut scores) = (Vec::new(), Vec::new());
    let mut labels_without_prediction = Vec::new();
    for (id, label) in labels {
        let name = file_name(id);
        let found = exact.get(id.as_str()).copied().or_else(|| {
            (label_names.get(&name) == Some(&1))
                .then(|| by_name.get(&name).copied().flatten())
                .flatten()
        });
        match found {
            Some(i) => {
                used[i] = true;
                if let Some(p) = preds.rows[i].probability {
                    y.push(*label);
                    scores.push(p);
                }
            }
            None => labels_without_prediction.push(id.clone()),
        }
    }
    if y.is_empty() {
        return Err(Error::invalid(
            "no predicted image has a label (image ids are matched exactly, or by file name)",
        ));
    }
    let m = binary_metrics(&y, &scores, threshold)?;
    let roc_curve = match m.auc {
        Some(_) => {
            let c = roc_curve(&y, &scores, true)?;
            Some(RocPoints {
                fpr: c.fpr,
                tpr: c.tpr,
                thresholds: c
                    .thresholds
                    .into_iter()
                    .map(|t| t.is_finite().then_some(t))
                    .collect(),
            })
        }
        None => None,
    };
    let positives = y.iter().filter(|&&l| l).count();
    let seconds_rate = |s: Option<f64>| match (preds.images, s) {
        (Some(n), Some(s)) if s > 0.0 => Some(n as f64 / s),
        _ => None,
    };
    Ok(EvaluationReport {
        n: y.len(),
        positives,
        negatives: y.len() - positives,
        threshold,
        roc_auc: m.auc,
        f1: m.f1,
        accuracy: m.accuracy,
        sensitivity: m.sensitivity,
        specificity: m.specificity,
        ppv: m.ppv,
        npv: m.npv,
        confusion_matrix: Counts {
            tp: m.confusion.true_positive,
            fp: m.confusion.false_positive,
            tn: m.confusion.true_negative,
            fn_: m.confusion.false_negative,
        },
        images_per_second: seconds_rate(preds.total_seconds),
        inference_images_per_second: seconds_rate(preds.inference_seconds),
        device: preds.device.clone(),
        skipped: preds
            .rows
            .iter()
            .filter(|r| r.probability.is_none())
            .count(),
        labels_without_prediction,
        predictions_without_label: preds
            .rows
            .iter()
            .zip(&used)
            .filter(|(r, &u)| !u && r.probability.is_some())
            .map(|(r, _)| r.id.clone())
            .collect(),
        roc_curve,
    })
}

/// Writes the report as pretty-printed JSON.
pub fn write_report(path: &Path, report: &EvaluationReport) -> Result<()> {
    let mut json = serde_json::to_string_pretty(report)
        .map_err(|e| Error::invalid(format!("report to JSON: {e}")))?;
    json.push('\n');
    write_atomic(path, json.as_bytes())
}

/// Writes the ROC curve as a PNG plot ([`crate::plot::roc_plot`]) with the
/// AUC in the title.
pub fn write_roc_png(path: &Path, curve: &RocPoints, auc: Option<f64>) -> Result<()> {
    let opts = PlotOptions {
        title: auc.map_or_else(|| "ROC".to_string(), |a| format!("ROC (AUC = {a:.3})")),
        x_label: "False positive rate".to_string(),
        y_label: "True positive rate".to_string(),
        ..PlotOptions::default()
    };
    roc_plot(path, &curve.fpr, &curve.tpr, &opts)
}

/// What [`evaluate_predictions`] reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct EvaluatePredictionsOptions {
    /// Predictions CSV ([`read_predictions`]).
    pub predictions: PathBuf,
    /// Labels CSV with `image` and `label` columns ([`read_labels`]).
    pub labels: PathBuf,
    /// Report JSON to write; the ROC curve goes to `<stem>.roc.png` beside it.
    pub output: PathBuf,
    /// Positive when the probability is at least this.
    pub threshold: f64,
}

/// What [`evaluate_predictions`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct EvaluatePredictionsSummary {
    /// The report written.
    pub report: EvaluationReport,
    /// The ROC curve PNG, unless the labels hold a single class.
    pub roc_png: Option<PathBuf>,
}

/// `cellmorph screen evaluate`: matches a predictions file to labels
/// ([`evaluate`]), writes the report JSON ([`write_report`]) and the ROC
/// curve PNG beside it ([`write_roc_png`]).
pub fn evaluate_predictions(o: &EvaluatePredictionsOptions) -> Result<EvaluatePredictionsSummary> {
    let preds = read_predictions(&o.predictions)?;
    let labels = read_labels(&o.labels)?;
    let report = evaluate(&preds, &labels, o.threshold)?;
    write_report(&o.output, &report)?;
    let roc_png = match &report.roc_curve {
        Some(curve) => {
            let roc = o.output.with_extension("roc.png");
            write_roc_png(&roc, curve, report.roc_auc)?;
            Some(roc)
        }
        None => None,
    };
    Ok(EvaluatePredictionsSummary { report, roc_png })
}
