//! `cellmorph svr cv`: cross-validated (out-of-fold) expression predictions
//! from files ([`crate::svr::cv`]), with per-gene scores of the out-of-fold
//! predictions: Pearson r, r², `r2_score`, the two-sided p of r and
//! Benjamini–Hochberg q across the genes.

use std::path::PathBuf;
use std::time::Instant;

use super::prepare::read_expression;
use crate::backend::Backend;
use crate::csv::{CsvFile, CsvWriter};
use crate::stats::{benjamini_hochberg, pearson, r2_score};
use crate::svr::cv::{
    cross_validate_on, group_kfold_folds, kfold_folds, leave_one_group_out_folds,
    shuffled_kfold_folds, CvOutcome, Folds,
};
use crate::svr::GridSpec;
use crate::table::Table;
use crate::{Error, Result};

/// A CSV naming each sample's group: a `sample` column and the group column.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupFile {
    /// The CSV.
    pub path: PathBuf,
    /// Name of the group column.
    pub column: String,
}

/// How the samples are split into outer folds.
#[derive(Clone, Debug, PartialEq)]
pub enum OuterFolds {
    /// scikit-learn's `KFold(k)`: contiguous blocks in sample order.
    KFold(usize),
    /// A seeded permutation cut into `KFold(k)` blocks
    /// ([`shuffled_kfold_folds`]; not scikit-learn's shuffled permutation).
    Shuffled {
        /// Folds.
        k: usize,
        /// Seed of the permutation.
        seed: u64,
    },
    /// scikit-learn's `GroupKFold(k)`.
    GroupKFold {
        /// Folds.
        k: usize,
        /// The groups.
        groups: GroupFile,
    },
    /// scikit-learn's `LeaveOneGroupOut`.
    LeaveOneGroupOut(GroupFile),
}

impl OuterFolds {
    /// A short description: "5 folds, contiguous", "4 folds, grouped by batch".
    pub fn describe(&self, n_folds: usize) -> String {
        match self {
            OuterFolds::KFold(_) => format!("{n_folds} folds, contiguous"),
            OuterFolds::Shuffled { seed, .. } => format!("{n_folds} folds, shuffled, seed {seed}"),
            OuterFolds::GroupKFold { groups, .. } => {
                format!("{n_folds} folds, grouped by {}", groups.column)
            }
            OuterFolds::LeaveOneGroupOut(groups) => {
                format!("{n_folds} folds, leave one {} out", groups.column)
            }
        }
    }
}

/// What [`cross_validate`] reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct CrossValidateOptions {
    /// Feature table CSV: sample, then one column per feature.
    pub features: PathBuf,
    /// Expression table CSV: sample, then one column per gene (log2 CPM
    /// unless `raw_counts`).
    pub expression: PathBuf,
    /// The expression table holds raw counts: normalize to log2(CPM + 1) first.
    pub raw_counts: bool,
    /// The (C, ε) settings, inner folds (used when nested) and tolerance.
    pub grid: GridSpec,
    /// The outer folds.
    pub outer: OuterFolds,
    /// Output CSV of the out-of-fold predictions (sample, one column per gene).
    pub output: PathBuf,
    /// Optional per-gene score CSV.
    pub summary: Option<PathBuf>,
    /// Per-batch correction of the features before the folds, when any
    /// (label-free: each batch, held out or not, centred on its own
    /// statistics).
    pub batches: Option<super::batch::BatchFile>,
}

/// Scores of one gene's out-of-fold predictions.
#[derive(Clone, Debug, PartialEq)]
pub struct CvGeneScore {
    /// Gene name.
    pub gene: String,
    /// Samples.
    pub n: usize,
    /// Pearson r of predicted and measured (NaN when the predictions are constant).
    pub pearson_r: f64,
    /// `pearson_r²`.
    pub r2: f64,
    /// scikit-learn's `r2_score(measured, predicted)`.
    pub r2_score: f64,
    /// Two-sided p of `pearson_r` (NaN when r is undefined).
    pub p: f64,
    /// Benjamini–Hochberg q across the genes with a defined p.
    pub q: f64,
    /// The C chosen in most outer folds (the smallest on a tie).
    pub c: f64,
    /// In how many outer folds `c` was chosen.
    pub c_folds: usize,
    /// The ε chosen in most outer folds (the smallest on a tie).
    pub epsilon: f64,
    /// In how many outer folds `epsilon` was chosen.
    pub epsilon_folds: usize,
}

/// What [`cross_validate`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct CrossValidateSummary {
    /// Predictions, folds and skipped genes.
    pub outcome: CvOutcome,
    /// One score per predicted gene, in expression-column order.
    pub scores: Vec<CvGeneScore>,
    /// Features (feature columns).
    pub features: usize,
    /// [`OuterFolds::describe`].
    pub scheme: String,
    /// Seconds the fits took.
    pub seconds: f64,
}

/// `cellmorph svr cv`: out-of-fold predictions of every gene of an
/// expression table, plain K-fold for one (C, ε), nested grid search for
/// several; writes the predictions (rows in the expression table's order)
/// and, when asked, the per-gene scores. Fails when no gene can be predicted.
pub fn cross_validate(be: &Backend, o: &CrossValidateOptions) -> Result<CrossValidateSummary> {
    let features = Table::read_csv(&o.features)?;
    let expression = read_expression(&o.expression, o.raw_counts)?;
    features.require_rows(&o.features, &expression.row_names, &o.expression)?;
    let features =
        super::gene_models::training_features(&features, &expression, o.batches.as_ref())?;
    let n = expression.n_rows();
    let folds: Folds = match &o.outer {
        OuterFolds::KFold(k) => kfold_folds(n, *k)?,
        OuterFolds::Shuffled { k, seed } => shuffled_kfold_folds(n, *k, *seed)?,
        OuterFolds::GroupKFold { k, groups } => {
            group_kfold_folds(&read_groups(groups, &expression.row_names)?, *k)?
        }
        OuterFolds::LeaveOneGroupOut(groups) => {
            leave_one_group_out_folds(&read_groups(groups, &expression.row_names)?)?
        }
    };
    let nested = o.grid.n_settings() > 1;
    let bar = crate::apps::progress_bar(if nested { folds.len() as u64 } else { 0 }, "outer fold");
    if !nested {
        bar.finish_and_clear();
    }
    let t0 = Instant::now();
    let outcome = cross_validate_on(be, &features, &expression, &folds, &o.grid, &mut || {
        bar.inc(1)
    })?;
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    if outcome.genes.is_empty() {
        let examples: Vec<String> = outcome
            .skipped
            .iter()
            .take(3)
            .map(|s| format!("{}: {}", s.gene, s.reason))
            .collect();
        return Err(Error::invalid(format!(
            "no gene could be cross-validated ({} skipped, e.g. {})",
            outcome.skipped.len(),
            examples.join("; ")
        )));
    }
    let scores = score_genes(&outcome)?;
    outcome.predictions()?.write_csv(&o.output)?;
    if let Some(path) = &o.summary {
        scores_csv(&scores).write(path)?;
    }
    Ok(CrossValidateSummary {
        scheme: o.outer.describe(folds.len()),
        outcome,
        scores,
        features: features.n_cols(),
        seconds,
    })
}

/// Each sample's group from `g`, in the order of `samples`. An error names
/// the file and a sample without a group, a missing column, or a sample
/// given twice with different groups.
pub fn read_groups(g: &GroupFile, samples: &[String]) -> Result<Vec<String>> {
    let csv = CsvFile::read(&g.path)?;
    let sample_col = csv
        .column("sample")
        .ok_or_else(|| csv.error("no 'sample' column in the header"))?;
    let group_col = csv.column(&g.column).ok_or_else(|| {
        csv.error(format!(
            "no group column '{}' in the header ({})",
            g.column,
            csv.header.fields.join(", ")
        ))
    })?;
    let mut group_of: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    for row in &csv.rows {
        csv.check_width(row)?;
        let (sample, group) = (row.get(sample_col), row.get(group_col));
        if group.is_empty() {
            return Err(csv.cell_error(
                row.line,
                group_col,
                format!("sample '{sample}' has an empty group"),
            ));
        }
        if let Some(prev) = group_of.insert(sample, group) {
            if prev != group {
                return Err(csv.line_error(
                    row.line,
                    format!("sample '{sample}' is given twice, in groups '{prev}' and '{group}'"),
                ));
            }
        }
    }
    samples
        .iter()
        .map(|s| {
            group_of
                .get(s.as_str())
                .map(|g| g.to_string())
                .ok_or_else(|| csv.error(format!("sample '{s}' has no group")))
        })
        .collect()
}

/// Scores of every predicted gene; q by Benjamini–Hochberg over the genes
/// whose Pearson r is defined.
pub fn score_genes(outcome: &CvOutcome) -> Result<Vec<CvGeneScore>> {
    let mut scores = Vec::with_capacity(outcome.genes.len());
    for g in &outcome.genes {
        let (pearson_r, p) = pearson(&g.predicted, &g.measured).unwrap_or((f64::NAN, f64::NAN));
        let (c, c_folds) = mode(g.chosen.iter().map(|s| s.0));
        let (epsilon, epsilon_folds) = mode(g.chosen.iter().map(|s| s.1));
        scores.push(CvGeneScore {
            gene: g.gene.clone(),
            n: g.measured.len(),
            pearson_r,
            r2: pearson_r * pearson_r,
            r2_score: r2_score(&g.measured, &g.predicted)?,
            p,
            q: f64::NAN,
            c,
            c_folds,
            epsilon,
            epsilon_folds,
        });
    }
    let defined: Vec<usize> = (0..scores.len())
        .filter(|&i| !scores[i].p.is_nan())
        .collect();
    if !defined.is_empty() {
        let p: Vec<f64> = defined.iter().map(|&i| scores[i].p).collect();
        for (&i, q) in defined.iter().zip(benjamini_hochberg(&p)?) {
            scores[i].q = q;
        }
    }
    Ok(scores)
}

/// The most frequent value and its count; the smallest on a tie.
fn mode(values: impl Iterator<Item = f64>) -> (f64, usize) {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    let mut best = (f64::NAN, 0);
    let mut i = 0;
    while i < v.len() {
        let j = i + v[i..].iter().take_while(|&&x| x == v[i]).count();
        if j - i > best.1 {
            best = (v[i], j - i);
        }
        i = j;
    }
    best
}

/// CSV: gene, n, pearson_r, R2, r2_score, p, q, C, C_folds, epsilon, epsilon_folds.
pub fn scores_csv(scores: &[CvGeneScore]) -> CsvWriter {
    let mut w = CsvWriter::new();
    w.record([
        "gene",
        "n",
        "pearson_r",
        "R2",
        "r2_score",
        "p",
        "q",
        "C",
        "C_folds",
        "epsilon",
        "epsilon_folds",
    ]);
    for s in scores {
        w.record([
            s.gene.clone(),
            s.n.to_string(),
            s.pearson_r.to_string(),
            s.r2.to_string(),
            s.r2_score.to_string(),
            s.p.to_string(),
            s.q.to_string(),
            s.c.to_string(),
            s.c_folds.to_string(),
            s.epsilon.to_string(),
            s.epsilon_folds.to_string(),
        ]);
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_prefers_the_smallest_on_ties() {
        assert_eq!(mode([2.0, 1.0, 2.0, 1.0, 3.0].into_iter()), (1.0, 2));
        assert_eq!(mode([5.0, 0.5, 5.0].into_iter()), (5.0, 2));
    }
}
