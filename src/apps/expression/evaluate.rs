//! Evaluation as the paper's Table 3: for each gene and each data set, the
//! predicted expression against the measured one — R² as the squared Pearson
//! correlation, its two-sided p-value (t-distribution, n − 2 degrees of
//! freedom), Benjamini–Hochberg q-values across the genes of the data set,
//! significance at FDR < alpha, and scikit-learn's `r2_score` beside it.
//! [`evaluate_gene_models`] is `cellmorph expression evaluate`.

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

/// All results of [`evaluate`].
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    /// Per gene and data set, data sets in the order given, genes in model order.
    pub results: Vec<GeneResult>,
    /// Genes that could not be evaluated.
    pub skipped: Vec<GeneSkip>,
    /// The FDR level used.
    pub alpha: f64,
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

    /// CSV: dataset, gene, n, R2, pearson_r, p, q, r2_score, significant.
    pub fn to_csv(&self) -> String {
        self.to_csv_writer().into_string()
    }

    fn to_csv_writer(&self) -> CsvWriter {
        let mut w = CsvWriter::new();
        w.record([
            "dataset",
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

    /// A readable Table-3-style summary: per data set the number of genes
    /// significant at FDR < alpha, then the top `k` genes.
    pub fn table(&self, k: usize) -> String {
        let mut s = String::new();
        for ds in self.datasets() {
            let all: Vec<&GeneResult> = self.results.iter().filter(|r| r.dataset == ds).collect();
            let sig = all.iter().filter(|r| r.significant).count();
            let _ = writeln!(
                s,
                "data set {ds}: {sig} of {} genes significant at FDR < {}",
                all.len(),
                self.alpha
            );
            let _ = writeln!(
                s,
                "  {:<16} {:>4} {:>7} {:>10} {:>10} {:>9}  FDR",
                "gene", "n", "R2", "p", "q", "r2_score"
            );
            for r in self.top(&ds, k) {
                let _ = writeln!(
                    s,
                    "  {:<16} {:>4} {:>7.3} {:>10.2e} {:>10.2e} {:>9.3}  {}",
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
        Some(dir) => scatter_top(&evaluation, o.top, dir)?,
        None => Vec::new(),
    };
    Ok(EvaluateGeneModelsSummary { evaluation, plots })
}
