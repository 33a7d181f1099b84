//! Evaluation as the paper's Table 3: for each gene and each data set, the
//! predicted expression against the measured one — R² as the squared Pearson
//! correlation, its two-sided p-value (t-distribution, n − 2 degrees of
//! freedom), Benjamini–Hochberg q-values across the genes of the data set,
//! significance at FDR < alpha, and scikit-learn's `r2_score` beside it.
//! [`evaluate_gene_models`] is `cellmorph expression evaluate`.
//!
//! Each data set is labelled ([`DataRole`]) from the training samples the
//! model records (name and feature-row fingerprint, [`SvrModel::training_rows_in`]):
//! in-sample when every sample was used to fit the model — R², p and q then
//! describe the fit, not how well it predicts new samples — held-out when
//! none was, partly in-sample otherwise, and "not recorded" for models
//! written before the record existed. The model's warnings (a chosen C or ε
//! on the grid's edge) are repeated in the table and the CSV.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::plots::scatter_top;
use super::prepare::read_expression;
use crate::csv::CsvWriter;
use crate::error::{Error, Result};
use crate::stats::{benjamini_hochberg, pearson, r2_score};
use crate::svr::SvrModel;
use crate::table::Table;

/// A data set to evaluate on: its profile features and measured expression.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Name shown in the tables (e.g. the batch).
    pub name: String,
    /// Feature table (samples × the model's features).
    pub features: Table,
    /// Measured expression (samples × genes), on the scale the model was fitted on.
    pub expression: Table,
}

/// One gene on one data set.
#[derive(Debug, Clone)]
pub struct GeneResult {
    /// Data set name.
    pub dataset: String,
    /// Gene name.
    pub gene: String,
    /// Samples compared.
    pub n: usize,
    /// Pearson correlation of predicted and measured.
    pub pearson_r: f64,
    /// Squared Pearson correlation (the paper's R²).
    pub r2: f64,
    /// Two-sided Pearson p-value.
    pub p: f64,
    /// Benjamini–Hochberg q-value across the data set's genes.
    pub q: f64,
    /// scikit-learn's coefficient of determination.
    pub r2_score: f64,
    /// q < alpha.
    pub significant: bool,
    /// Predicted values, in sample order (for scatter plots).
    pub predicted: Vec<f64>,
    /// Measured values, in sample order.
    pub measured: Vec<f64>,
}

/// A gene that could not be evaluated on a data set, and why.
#[derive(Debug, Clone)]
pub struct GeneSkip {
    /// Data set name.
    pub dataset: String,
    /// Gene name.
    pub gene: String,
    /// Reason.
    pub reason: String,
}

/// Whether a data set's samples were used to fit the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataRole {
    /// Every sample is a training sample: the numbers describe the fit.
    InSample,
    /// No sample is a training sample.
    HeldOut,
    /// Some samples are training samples.
    Partial {
        /// Training samples among them.
        in_training: usize,
        /// Samples.
        n: usize,
    },
    /// The model records no training samples.
    NotRecorded,
}

impl DataRole {
    /// From the number of training rows among `n` samples (`None`: not recorded).
    pub fn from_count(in_training: Option<usize>, n: usize) -> DataRole {
        match in_training {
            None => DataRole::NotRecorded,
            Some(0) => DataRole::HeldOut,
            Some(k) if k == n => DataRole::InSample,
            Some(k) => DataRole::Partial { in_training: k, n },
        }
    }

    /// Short label for CSVs and titles: `in-sample`, `held-out`,
    /// `partly in-sample`, `unknown`.
    pub fn label(&self) -> &'static str {
        match self {
            DataRole::InSample => "in-sample",
            DataRole::HeldOut => "held-out",
            DataRole::Partial { .. } => "partly in-sample",
            DataRole::NotRecorded => "unknown",
        }
    }

    /// A sentence for the table.
    pub fn describe(&self) -> String {
        match self {
            DataRole::InSample => "in-sample: the model was fitted on these samples, so R², p and q describe the fit, not predictions for new samples (use `svr cv` for cross-validated numbers)".into(),
            DataRole::HeldOut => "held-out: none of these samples was used to fit the model".into(),
            DataRole::Partial { in_training, n } => format!("partly in-sample: {in_training} of {n} samples were used to fit the model"),
            DataRole::NotRecorded => "in-sample or held-out unknown: the model does not record its training samples".into(),
        }
    }
}

/// All results of [`evaluate`].
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    /// Per gene and data set, data sets in the order given, genes in model order.
    pub results: Vec<GeneResult>,
    /// Genes that could not be evaluated.
    pub skipped: Vec<GeneSkip>,
    /// The FDR level used.
    pub alpha: f64,
    /// Each data set's [`DataRole`], in the order given.
    pub roles: Vec<(String, DataRole)>,
    /// The model's warnings (e.g. a chosen C or ε on the grid's edge).
    pub warnings: Vec<String>,
}

/// Evaluates every gene of `model` on every data set. Samples are matched by
/// name: samples of the expression table missing from the features are an
/// error; model genes absent from a data set's expression, and genes whose
/// predictions or measurements are constant (no correlation defined), are
/// reported as skipped.
pub fn evaluate(model: &SvrModel, datasets: &[Dataset], alpha: f64) -> Result<Evaluation> {
    if !(alpha > 0.0 && alpha < 1.0) {
        return Err(Error::invalid(format!(
            "FDR level {alpha} is not in (0, 1)"
        )));
    }
    let mut eval = Evaluation {
        alpha,
        warnings: model
            .training
            .as_ref()
            .map(|t| t.warnings.clone())
            .unwrap_or_default(),
        ..Evaluation::default()
    };
    for (i, ds) in datasets.iter().enumerate() {
        if datasets[..i].iter().any(|d| d.name == ds.name) {
            return Err(Error::invalid(format!(
                "data set name {:?} is given twice; each data set needs its own name",
                ds.name
            )));
        }
    }
    for ds in datasets {
        let samples = &ds.expression.row_names;
        if samples.len() < MIN_SAMPLES {
            return Err(Error::invalid(format!(
                "data set {}: {} sample(s); R² and its p-value need at least {MIN_SAMPLES} (the t-test has n − 2 degrees of freedom)",
                ds.name,
                samples.len()
            )));
        }
        let features = ds.features.select_rows(samples).map_err(|e| {
            Error::invalid(format!(
                "data set {}: features and expression disagree: {e}",
                ds.name
            ))
        })?;
        let predicted = model.predict(&features)?;
        let role = DataRole::from_count(model.training_rows_in(&features)?, samples.len());
        eval.roles.push((ds.name.clone(), role));
        let mut rows = Vec::new();
        for (g, (gene, _)) in model.genes.iter().enumerate() {
            let Some(col) = ds.expression.col_index(gene) else {
                eval.skipped.push(GeneSkip {
                    dataset: ds.name.clone(),
                    gene: gene.clone(),
                    reason: "not in the data set's expression table".into(),
                });
                continue;
            };
            let measured = ds.expression.column(col);
            let pred = predicted.column(g);
            match (pearson(&measured, &pred), r2_score(&measured, &pred)) {
                (Ok((r, p)), Ok(r2s)) => rows.push(GeneResult {
                    dataset: ds.name.clone(),
                    gene: gene.clone(),
                    n: measured.len(),
                    pearson_r: r,
                    r2: r * r,
                    p,
                    q: f64::NAN,
                    r2_score: r2s,
                    significant: false,
                    predicted: pred,
                    measured,
                }),
                (Err(e), _) | (_, Err(e)) => eval.skipped.push(GeneSkip {
                    dataset: ds.name.clone(),
                    gene: gene.clone(),
                    reason: e.to_string(),
                }),
            }
        }
        if !rows.is_empty() {
            let p: Vec<f64> = rows.iter().map(|r| r.p).collect();
            let q = benjamini_hochberg(&p)?;
            for (r, q) in rows.iter_mut().zip(q) {
                r.q = q;
                r.significant = q < alpha;
            }
        }
        eval.results.extend(rows);
    }
    if eval.results.is_empty() {
        let why: Vec<String> = eval
            .skipped
            .iter()
            .take(3)
            .map(|s| format!("{} on {}: {}", s.gene, s.dataset, s.reason))
            .collect();
        return Err(Error::invalid(format!(
            "no gene could be evaluated ({} skipped, e.g. {})",
            eval.skipped.len(),
            why.join("; ")
        )));
    }
    Ok(eval)
}

/// The fewest samples a data set needs: R² from a correlation and its
/// p-value (t-distribution with n − 2 degrees of freedom) are undefined below.
pub const MIN_SAMPLES: usize = 3;

impl Evaluation {
    /// The `k` genes of `dataset` with the highest R², best first.
    pub fn top(&self, dataset: &str, k: usize) -> Vec<&GeneResult> {
        let mut v: Vec<&GeneResult> = self
            .results
            .iter()
            .filter(|r| r.dataset == dataset)
            .collect();
        v.sort_by(|a, b| b.r2.total_cmp(&a.r2));
        v.truncate(k);
        v
    }

    /// Data set names in order of first appearance.
    pub fn datasets(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for r in &self.results {
            if !v.contains(&r.dataset) {
                v.push(r.dataset.clone());
            }
        }
        v
    }

    /// The [`DataRole`] of a data set ([`DataRole::NotRecorded`] for an
    /// unknown name).
    pub fn role(&self, dataset: &str) -> DataRole {
        self.roles
            .iter()
            .find(|(d, _)| d == dataset)
            .map_or(DataRole::NotRecorded, |(_, r)| *r)
    }

    /// CSV: `# warning: …` comment lines for the model's warnings, then
    /// dataset, evaluated ([`DataRole::label`]), gene, n, R2, pearson_r, p,
    /// q, r2_score, significant.
    pub fn to_csv(&self) -> String {
        self.to_csv_writer().into_string()
    }

    fn to_csv_writer(&self) -> CsvWriter {
        let mut w = CsvWriter::new();
        for warning in &self.warnings {
            w.comment(&format!("warning: {warning}"));
        }
        w.record([
            "dataset",
            "evaluated",
            "gene",
            "n",
            "R2",
            "pearson_r",
            "p",
            "q",
            "r2_score",
            "significant",
        ]);
        for r in &self.results {
            w.record([
                r.dataset.clone(),
                self.role(&r.dataset).label().to_string(),
                r.gene.clone(),
                r.n.to_string(),
                r.r2.to_string(),
                r.pearson_r.to_string(),
                r.p.to_string(),
                r.q.to_string(),
                r.r2_score.to_string(),
                r.significant.to_string(),
            ]);
        }
        w
    }

    /// Writes [`Evaluation::to_csv`] atomically.
    pub fn write_csv(&self, path: &Path) -> Result<()> {
        self.to_csv_writer().write(path)
    }

    /// A readable Table-3-style summary: the model's warnings, then per
    /// data set whether it is in-sample or held-out, the number of genes
    /// significant at FDR < alpha, and the top `k` genes.
    pub fn table(&self, k: usize) -> String {
        let mut s = String::new();
        for warning in &self.warnings {
            let _ = writeln!(s, "warning (from the model): {warning}");
        }
        for ds in self.datasets() {
            let all: Vec<&GeneResult> = self.results.iter().filter(|r| r.dataset == ds).collect();
            let sig = all.iter().filter(|r| r.significant).count();
            let role = self.role(&ds);
            let _ = writeln!(
                s,
                "data set {ds} ({}): {sig} of {} genes significant at FDR < {}",
                role.label(),
                all.len(),
                self.alpha
            );
            let _ = writeln!(s, "  {}", role.describe());
            let top = self.top(&ds, k);
            let width = top
                .iter()
                .map(|r| r.gene.chars().count())
                .max()
                .unwrap_or(0)
                .max(4);
            let _ = writeln!(
                s,
                "  {:<width$} {:>4} {:>7} {:>10} {:>10} {:>9}  FDR",
                "gene", "n", "R2", "p", "q", "r2_score"
            );
            for r in top {
                let _ = writeln!(
                    s,
                    "  {:<width$} {:>4} {:>7.3} {:>10.2e} {:>10.2e} {:>9.3}  {}",
                    r.gene,
                    r.n,
                    r.r2,
                    r.p,
                    r.q,
                    r.r2_score,
                    if r.significant { "*" } else { "" }
                );
            }
        }
        let skipped = self.skipped.len();
        if skipped > 0 {
            let _ = writeln!(
                s,
                "{skipped} gene/data-set pair(s) skipped (see the report)"
            );
        }
        s
    }
}

/// A data set as files: [`Dataset`] before reading.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetFiles {
    /// Name shown in the tables (e.g. the batch).
    pub name: String,
    /// Feature table CSV (samples × the model's features).
    pub features: PathBuf,
    /// Expression table CSV (samples × genes).
    pub expression: PathBuf,
}

/// What [`evaluate_gene_models`] reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct EvaluateGeneModelsOptions {
    /// Gene model JSON (from [`super::gene_models::fit_gene_models`]).
    pub model: PathBuf,
    /// The data sets (a model trained on one batch is evaluated on the others).
    pub datasets: Vec<DatasetFiles>,
    /// The expression tables hold raw counts: normalize to log2(CPM + 1) first.
    pub raw_counts: bool,
    /// FDR level.
    pub fdr: f64,
    /// Output CSV with every gene and data set ([`Evaluation::write_csv`]).
    pub output: PathBuf,
    /// Folder for predicted-vs-measured scatter PNGs of the top genes.
    pub plots: Option<PathBuf>,
    /// Genes plotted per data set.
    pub top: usize,
    /// Units of the expression values for the plots' axes (e.g. "log2 CPM").
    pub units: Option<String>,
}

/// What [`evaluate_gene_models`] did.
#[derive(Debug, Clone)]
pub struct EvaluateGeneModelsSummary {
    /// The evaluation written.
    pub evaluation: Evaluation,
    /// The scatter PNGs written.
    pub plots: Vec<PathBuf>,
}

/// `cellmorph expression evaluate`: Table-3-style evaluation of a gene model
/// on one or more data sets ([`evaluate`]); writes the results CSV and, when
/// asked, scatter plots of the top genes.
pub fn evaluate_gene_models(o: &EvaluateGeneModelsOptions) -> Result<EvaluateGeneModelsSummary> {
    let model = SvrModel::load(&o.model)?;
    let datasets = o
        .datasets
        .iter()
        .map(|d| {
            Ok(Dataset {
                name: d.name.clone(),
                features: Table::read_csv(&d.features)?,
                expression: read_expression(&d.expression, o.raw_counts)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let evaluation = evaluate(&model, &datasets, o.fdr)?;
    evaluation.write_csv(&o.output)?;
    let plots = match &o.plots {
        Some(dir) => scatter_top(&evaluation, o.top, dir, o.units.as_deref())?,
        None => Vec::new(),
    };
    Ok(EvaluateGeneModelsSummary { evaluation, plots })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svr::GeneModel;

    #[test]
    fn table_fits_long_names_and_labels_roles() {
        let long = "A_GENE_NAME_LONGER_THAN_SIXTEEN";
        let model = SvrModel {
            features: vec!["f".into()],
            genes: vec![
                (
                    long.into(),
                    GeneModel {
                        c: 1.0,
                        epsilon: 0.1,
                        cv_score: 0.0,
                        w: vec![1.0],
                        b: 0.0,
                    },
                ),
                (
                    "G".into(),
                    GeneModel {
                        c: 1.0,
                        epsilon: 0.1,
                        cv_score: 0.0,
                        w: vec![-1.0],
                        b: 0.0,
                    },
                ),
            ],
            training: None,
            batch_correction: None,
        };
        let names: Vec<String> = (0..4).map(|i| format!("s{i}")).collect();
        let features =
            Table::new(names.clone(), vec!["f".into()], vec![1.0, 2.0, 3.0, 5.0]).unwrap();
        let expression = Table::new(
            names,
            vec![long.into(), "G".into()],
            vec![1.0, 2.0, 2.5, 1.0, 2.0, 3.0, 5.5, 1.0],
        )
        .unwrap();
        let ds = Dataset {
            name: "A".into(),
            features: features.clone(),
            expression,
        };
        let e = evaluate(&model, std::slice::from_ref(&ds), 0.05).unwrap();
        assert_eq!(e.role("A"), DataRole::NotRecorded);
        let table = e.table(5);
        let lines: Vec<&str> = table.lines().collect();
        let h = lines.iter().position(|l| l.contains("r2_score")).unwrap();
        let col = lines[h].find(" n ").unwrap();
        // Both gene rows put their n (4) under the header's n.
        for row in &lines[h + 1..h + 3] {
            assert_eq!(&row[col..col + 2], " 4", "{table}");
        }
        let trained = model.with_training(&features, vec![]).unwrap();
        let e = evaluate(&trained, &[ds], 0.05).unwrap();
        assert_eq!(e.role("A"), DataRole::InSample);
        assert!(e.table(5).contains("data set A (in-sample)"));
        assert!(e.to_csv().contains("A,in-sample,G,4,"));
    }
}
