//! Sample categories (e.g. quality classes, the paper's Table 1) from a
//! feature table with an RBF SVM: [`fit_categories`] (`cellmorph svm
//! grid`) runs the cross-validated grid search of [`crate::svm`] and
//! writes the model, the out-of-fold confusion matrix (CSV, PNG) and
//! predictions; [`predict_categories`] (`cellmorph svm predict`) applies a
//! model.
//!
//! The labels CSV has a `sample` column and a label column (strings); its
//! row order is the sample order of the folds. Every labelled sample must
//! be in the feature table; feature rows without a label are not used.

use std::path::PathBuf;
use std::time::Instant;

use crate::backend::Backend;
use crate::csv::{CsvFile, CsvWriter};
use crate::svm::device::grid_search_on;
use crate::svm::model::{StoredGrid, StoredScore};
use crate::svm::{stratified_kfold, Confusion, Gamma, SvmGridOutcome, SvmGridSpec, SvmModel};
use crate::svr::cv::{kfold_folds, shuffled_kfold_folds, Folds};
use crate::table::Table;
use crate::{Error, Result};

/// How the samples are split for the grid search.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CvScheme {
    /// scikit-learn's `StratifiedKFold(k)` (no shuffling): what
    /// `GridSearchCV` uses for a classifier given `cv=k`.
    Stratified,
    /// scikit-learn's `KFold(k)`: contiguous blocks in label-file order.
    KFold,
    /// A seeded SplitMix64 Fisher–Yates permutation, then contiguous
    /// blocks (deterministic; not scikit-learn's shuffled permutation).
    Shuffled {
        /// The seed.
        seed: u64,
    },
}

impl CvScheme {
    fn folds(&self, y: &[usize], k: usize) -> Result<Folds> {
        match *self {
            CvScheme::Stratified => stratified_kfold(y, k),
            CvScheme::KFold => kfold_folds(y.len(), k),
            CvScheme::Shuffled { seed } => shuffled_kfold_folds(y.len(), k, seed),
        }
    }

    fn describe(&self, k: usize) -> String {
        match self {
            CvScheme::Stratified => format!("StratifiedKFold({k})"),
            CvScheme::KFold => format!("KFold({k}), contiguous"),
            CvScheme::Shuffled { seed } => {
                format!("KFold({k}) of a SplitMix64 shuffle, seed {seed}")
            }
        }
    }
}

/// What [`fit_categories`] reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct FitCategoriesOptions {
    /// Feature table CSV: sample, then one column per feature.
    pub features: PathBuf,
    /// Labels CSV: `sample` and the label column.
    pub labels: PathBuf,
    /// The label column's name.
    pub label_column: String,
    /// The grid.
    pub grid: SvmGridSpec,
    /// Number of folds.
    pub folds: usize,
    /// How the folds are cut.
    pub scheme: CvScheme,
    /// Output model JSON.
    pub output: PathBuf,
    /// Out-of-fold confusion matrix CSV.
    pub confusion: Option<PathBuf>,
    /// Out-of-fold confusion matrix PNG.
    pub plot: Option<PathBuf>,
    /// Out-of-fold predictions CSV: sample, label, predicted, fold.
    pub predictions: Option<PathBuf>,
}

/// What [`fit_categories`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct FitCategoriesSummary {
    /// Labelled samples used.
    pub samples: usize,
    /// Feature rows without a label (not used).
    pub unlabelled: usize,
    /// Features.
    pub features: usize,
    /// The fold scheme, in words.
    pub scheme: String,
    /// The search.
    pub outcome: SvmGridOutcome,
    /// The out-of-fold confusion matrix of the best setting.
    pub confusion: Confusion,
    /// γ of the refitted model.
    pub gamma: f64,
    /// Warnings (a choice on the grid's edge, SMO runs at the cap).
    pub warnings: Vec<String>,
    /// Seconds the search took.
    pub seconds: f64,
}

/// Labelled samples: (sample, label) in file order.
pub fn read_labels(path: &std::path::Path, column: &str) -> Result<Vec<(String, String)>> {
    let csv = CsvFile::read(path)?;
    let sample_col = csv
        .column("sample")
        .ok_or_else(|| csv.error("no 'sample' column in the header"))?;
    let label_col = csv.column(column).ok_or_else(|| {
        csv.error(format!(
            "no label column '{column}' in the header ({})",
            csv.header.fields.join(", ")
        ))
    })?;
    let mut seen = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(csv.rows.len());
    for row in &csv.rows {
        csv.check_width(row)?;
        let (sample, label) = (row.get(sample_col), row.get(label_col));
        if sample.is_empty() {
            return Err(csv.cell_error(row.line, sample_col, "empty sample name"));
        }
        if label.is_empty() {
            return Err(csv.cell_error(
                row.line,
                label_col,
                format!("sample '{sample}' has an empty label"),
            ));
        }
        if let Some(first) = seen.insert(sample.to_string(), row.line) {
            return Err(csv.line_error(
                row.line,
                format!("sample '{sample}' is given twice (first on line {first})"),
            ));
        }
        out.push((sample.to_string(), label.to_string()));
    }
    if out.is_empty() {
        return Err(csv.error("no labelled samples"));
    }
    Ok(out)
}

/// The feature rows of `samples` (row-major), an error naming the first
/// sample missing from the feature table.
fn feature_rows(
    features: &Table,
    samples: &[String],
    origin: &std::path::Path,
) -> Result<Vec<f64>> {
    let mut x = Vec::with_capacity(samples.len() * features.n_cols());
    for s in samples {
        let r = features.row_index(s).ok_or_else(|| {
            Error::format(
                origin,
                format!("labelled sample '{s}' is not in the feature table"),
            )
        })?;
        x.extend_from_slice(features.row(r));
    }
    Ok(x)
}

/// Sorted distinct labels and each sample's index among them.
fn encode(labels: &[String]) -> (Vec<String>, Vec<usize>) {
    let mut classes: Vec<String> = labels.to_vec();
    classes.sort();
    classes.dedup();
    let y = labels
        .iter()
        .map(|l| classes.binary_search(l).unwrap_or(0))
        .collect();
    (classes, y)
}

/// `cellmorph svm grid`: RBF SVC with a cross-validated grid search over
/// (C, gamma), as scikit-learn's `GridSearchCV(SVC(), {"C", "gamma"},
/// cv=StratifiedKFold(k))`; writes the model refitted on every labelled
/// sample and the requested out-of-fold reports. The SMO solves run on
/// `be`'s device (the CPU, or batched on a kernel device with the same
/// results: [`crate::svm::device`]).
pub fn fit_categories(be: &Backend, o: &FitCategoriesOptions) -> Result<FitCategoriesSummary> {
    let features = Table::read_csv(&o.features)?;
    let labelled = read_labels(&o.labels, &o.label_column)?;
    let samples: Vec<String> = labelled.iter().map(|(s, _)| s.clone()).collect();
    let labels: Vec<String> = labelled.iter().map(|(_, l)| l.clone()).collect();
    let x = feature_rows(&features, &samples, &o.labels)?;
    let (classes, y) = encode(&labels);
    if classes.len() < 2 {
        return Err(Error::format(
            &o.labels,
            format!(
                "column '{}' holds a single class ('{}'); classification needs at least 2",
                o.label_column, classes[0]
            ),
        ));
    }
    let folds = o
        .scheme
        .folds(&y, o.folds)
        .map_err(|e| Error::format(&o.labels, e.to_string()))?;
    let t0 = Instant::now();
    let outcome = grid_search_on(be, &x, features.n_cols(), &y, &o.grid, &folds)?;
    let seconds = t0.elapsed().as_secs_f64();
    let confusion = Confusion::new(classes.clone(), &y, &outcome.oof_predicted)?;

    let best = &outcome.scores[outcome.best];
    let mut warnings = Vec::new();
    // A choice at the smallest or largest of several values of C or of a
    // numeric gamma may mean the grid should reach further.
    let on_edge = |v: f64, values: &[f64]| {
        let (lo, hi) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| {
                (l.min(x), h.max(x))
            });
        values.len() > 1 && (v == lo || v == hi)
    };
    if on_edge(best.c, &o.grid.c) {
        warnings.push(format!("the chosen C = {} is on the grid's edge", best.c));
    }
    let numeric: Vec<f64> = o
        .grid
        .gamma
        .iter()
        .filter_map(|g| match g {
            Gamma::Value(v) => Some(*v),
            Gamma::Scale => None,
        })
        .collect();
    if let Gamma::Value(g) = best.gamma {
        if on_edge(g, &numeric) {
            warnings.push(format!("the chosen gamma = {g} is on the grid's edge"));
        }
    }
    if outcome.unconverged > 0 {
        warnings.push(format!(
            "{} SMO runs stopped at the iteration cap",
            outcome.unconverged
        ));
    }
    let scheme = o.scheme.describe(o.folds);
    let mut model = SvmModel::from_svc(
        &outcome.model,
        features.col_names.clone(),
        &classes,
        &samples,
        best.c,
        best.gamma.to_string(),
    );
    model.grid = Some(StoredGrid {
        folds: scheme.clone(),
        scores: outcome
            .scores
            .iter()
            .map(|s| StoredScore {
                c: s.c,
                gamma: s.gamma.to_string(),
                fold_accuracy: s.fold_accuracy.clone(),
                mean_accuracy: s.mean_accuracy,
            })
            .collect(),
        best: outcome.best,
    });
    model.save(&o.output)?;
    let what = format!(
        "out-of-fold, {scheme}, C = {}, gamma = {}",
        best.c, best.gamma
    );
    if let Some(path) = &o.confusion {
        confusion.to_csv(&what).write(path)?;
    }
    if let Some(path) = &o.plot {
        confusion.plot(
            path,
            &format!("{what}: accuracy {:.3}", confusion.accuracy()),
        )?;
    }
    if let Some(path) = &o.predictions {
        let mut fold_of = vec![0; y.len()];
        for (f, fold) in folds.iter().enumerate() {
            for &i in fold {
                fold_of[i] = f;
            }
        }
        let mut w = CsvWriter::new();
        w.comment(&what);
        w.record(["sample", "label", "predicted", "fold"]);
        for i in 0..y.len() {
            w.record([
                samples[i].as_str(),
                labels[i].as_str(),
                classes[outcome.oof_predicted[i]].as_str(),
                &fold_of[i].to_string(),
            ]);
        }
        w.write(path)?;
    }
    Ok(FitCategoriesSummary {
        samples: samples.len(),
        unlabelled: features.n_rows().saturating_sub(samples.len()),
        features: features.n_cols(),
        scheme,
        gamma: outcome.model.gamma,
        outcome,
        confusion,
        warnings,
        seconds,
    })
}

/// What [`predict_categories`] reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct PredictCategoriesOptions {
    /// Model JSON written by [`fit_categories`].
    pub model: PathBuf,
    /// Feature table CSV with the model's feature columns.
    pub features: PathBuf,
    /// Output CSV: sample, predicted, then the one-vs-one decision values
    /// (`a_vs_b`, positive favours a); with labels also `label`.
    pub output: PathBuf,
    /// Labels CSV and column, to score the predictions.
    pub labels: Option<(PathBuf, String)>,
}

/// `cellmorph svm predict`: predicts every row of the feature table (or,
/// with labels, every labelled sample) and writes the predictions; returns
/// the confusion matrix when labels were given.
pub fn predict_categories(o: &PredictCategoriesOptions) -> Result<(usize, Option<Confusion>)> {
    let model = SvmModel::load(&o.model)?;
    let features = Table::read_csv(&o.features)?;
    let (table, truth) = match &o.labels {
        Some((path, column)) => {
            let labelled = read_labels(path, column)?;
            let samples: Vec<String> = labelled.iter().map(|(s, _)| s.clone()).collect();
            let x = feature_rows(&features, &samples, path)?;
            let t = Table::new(samples, features.col_names.clone(), x)?;
            (t, Some(labelled))
        }
        None => (features, None),
    };
    let predicted = model
        .predict(&table)
        .map_err(|e| Error::format(&o.features, e.to_string()))?;
    let k = model.classes.len();
    let mut header = vec!["sample".to_string(), "predicted".to_string()];
    if truth.is_some() {
        header.push("label".into());
    }
    for a in 0..k {
        for b in a + 1..k {
            header.push(format!("{}_vs_{}", model.classes[a], model.classes[b]));
        }
    }
    let mut w = CsvWriter::new();
    w.record(&header);
    for (r, (p, dec)) in predicted.iter().enumerate() {
        let mut rec = vec![table.row_names[r].clone(), model.classes[*p].clone()];
        if let Some(t) = &truth {
            rec.push(t[r].1.clone());
        }
        rec.extend(dec.iter().map(|v| format!("{v}")));
        w.record(&rec);
    }
    w.write(&o.output)?;
    let confusion = match &truth {
        Some(t) => {
            // Labels the model does not know are scored as extra classes.
            let mut classes = model.classes.clone();
            let mut idx = Vec::with_capacity(t.len());
            for (_, l) in t {
                let i = match classes.iter().position(|c| c == l) {
                    Some(i) => i,
                    None => {
                        classes.push(l.clone());
                        classes.len() - 1
                    }
                };
                idx.push(i);
            }
            let pred: Vec<usize> = predicted.iter().map(|(p, _)| *p).collect();
            Some(Confusion::new(classes, &idx, &pred)?)
        }
        None => None,
    };
    Ok((table.n_rows(), confusion))
}
