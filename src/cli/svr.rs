//! `cellmorph svr grid`, `cellmorph svr predict` and `cellmorph svr cv`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use cellmorph::apps::expression::batch::{BatchCorrection, BatchFile};
use cellmorph::apps::expression::cv::{
    cross_validate, CrossValidateOptions, GroupFile, OuterFolds,
};
use cellmorph::apps::expression::gene_models::{
    fit_gene_models, predict_expression, FitGeneModelsOptions, PredictExpressionOptions,
};
use cellmorph::svr::{grid_edge_warnings, GridSpec};
use cellmorph::{Device, Result};

#[derive(Subcommand, Debug)]
pub enum SvrCommand {
    /// Per-gene linear epsilon-SVR with a cross-validated grid search over
    /// (C, epsilon), as scikit-learn's GridSearchCV(SVR(kernel="linear")).
    Grid(GridArgs),
    /// Predict expression from a feature table with a fitted model.
    Predict(PredictArgs),
    /// Cross-validated (out-of-fold) predictions per gene, as scikit-learn's
    /// cross_val_predict: plain K-fold for one C and one epsilon, nested
    /// (the grid search inside each outer training fold) for lists.
    Cv(CvArgs),
}

/// Per-batch correction of the features (svr grid and svr cv).
#[derive(Args, Debug)]
pub struct BatchArgs {
    /// Correct the features within each batch before fitting: `center`
    /// subtracts the batch's mean of every feature, `standardize` also divides
    /// by the batch's standard deviation. Label-free: every batch, held out
    /// or not, is corrected with its own statistics; `svr predict` then needs
    /// --batches for the new samples. Needs --batches (svr cv: or --groups).
    #[arg(long)]
    batch_correct: Option<BatchCorrection>,
    /// CSV with a `sample` column and the --batch-column naming each
    /// sample's batch.
    #[arg(long)]
    batches: Option<PathBuf>,
    /// Column of --batches holding the batch [default: batch; svr cv with
    /// --groups and no --batches: the --group-column].
    #[arg(long)]
    batch_column: Option<String>,
}

impl BatchArgs {
    /// The batch file to correct with, falling back on `groups` (svr cv).
    fn resolve(&self, groups: Option<&GroupFile>) -> Result<Option<BatchFile>> {
        let Some(mode) = self.batch_correct else {
            if let Some(path) = &self.batches {
                return Err(cellmorph::Error::invalid(format!(
                    "--batches {} given without --batch-correct center|standardize",
                    path.display()
                )));
            }
            return Ok(None);
        };
        let (path, column) = match (&self.batches, groups) {
            (Some(path), _) => (
                path.clone(),
                self.batch_column.clone().unwrap_or_else(|| "batch".into()),
            ),
            (None, Some(g)) => (
                g.path.clone(),
                self.batch_column
                    .clone()
                    .unwrap_or_else(|| g.column.clone()),
            ),
            (None, None) => {
                return Err(cellmorph::Error::invalid(format!(
                    "--batch-correct {mode} needs --batches FILE naming each sample's batch"
                )))
            }
        };
        Ok(Some(BatchFile { path, column, mode }))
    }
}

#[derive(Args, Debug)]
pub struct CvArgs {
    /// Feature table CSV: sample, then one column per feature (e.g. a profile CSV).
    #[arg(long)]
    features: PathBuf,
    /// Expression table CSV: sample, then one column per gene (log2 CPM
    /// unless --raw-counts). Its row order defines the contiguous folds.
    #[arg(long)]
    expression: PathBuf,
    /// C values (one value: plain K-fold; a list or range: nested search),
    /// same syntax as svr grid.
    #[arg(long)]
    c: String,
    /// Epsilon values, same syntax.
    #[arg(long)]
    epsilon: String,
    /// Outer folds [default: 5]. Without --shuffle or --groups: scikit-learn's
    /// KFold(K), contiguous blocks in sample order, the first n % K one larger.
    #[arg(long)]
    folds: Option<usize>,
    /// Inner folds of the nested grid search (contiguous KFold over each
    /// outer training set, in sample order).
    #[arg(long, default_value_t = 3)]
    inner_folds: usize,
    /// Shuffle before cutting the outer folds: a Fisher-Yates permutation
    /// from cellmorph's SplitMix64 generator seeded with --seed, then
    /// contiguous KFold blocks of the permuted order. Deterministic, but NOT
    /// scikit-learn's KFold(shuffle=True, random_state) permutation (NumPy's
    /// generator is not reproduced).
    #[arg(long)]
    shuffle: bool,
    /// Seed of --shuffle.
    #[arg(long, default_value_t = 0, requires = "shuffle")]
    seed: u64,
    /// CSV with a `sample` column and the --group-column: grouped outer folds
    /// (scikit-learn's GroupKFold(K); no group in two folds). Every sample
    /// of the expression table needs a group.
    #[arg(long, requires = "group_column", conflicts_with = "shuffle")]
    groups: Option<PathBuf>,
    /// Column of --groups holding the group (e.g. batch).
    #[arg(long, requires = "groups")]
    group_column: Option<String>,
    /// One outer fold per group (scikit-learn's LeaveOneGroupOut), groups
    /// in sorted order; needs --groups, excludes --folds.
    #[arg(long, requires = "groups", conflicts_with = "folds")]
    leave_one_group_out: bool,
    /// The expression table holds raw counts: normalize to log2(CPM + 1) first.
    #[arg(long)]
    raw_counts: bool,
    /// Output CSV of the out-of-fold predictions: sample, one column per gene,
    /// rows in the expression table's order.
    #[arg(long)]
    output: PathBuf,
    /// Per-gene scores CSV: gene, n, pearson_r, R2, r2_score, p, q, and the
    /// C and epsilon chosen in most outer folds with their counts.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Where the solver runs: cpu, cuda, cuda:N or emulated (kernel devices
    /// take training sets of at most 128 samples).
    #[arg(long, default_value = "cpu")]
    device: Device,
    #[command(flatten)]
    batch: BatchArgs,
}

#[derive(Args, Debug)]
pub struct GridArgs {
    /// Feature table CSV: sample, then one column per feature (e.g. a profile CSV).
    #[arg(long)]
    features: PathBuf,
    /// Expression table CSV: sample, then one column per gene (log2 CPM unless --raw-counts).
    #[arg(long)]
    expression: PathBuf,
    /// C values: comma-separated, or start:stop:step with the stop inclusive (1:100:1).
    #[arg(long, default_value = "1:100:1")]
    c: String,
    /// Epsilon values, same syntax (0:0.5:0.05).
    #[arg(long, default_value = "0:0.5:0.05")]
    epsilon: String,
    /// Folds of KFold (contiguous, unshuffled).
    #[arg(long, default_value_t = 3)]
    folds: usize,
    /// The expression table holds raw counts: normalize to log2(CPM + 1) first.
    #[arg(long)]
    raw_counts: bool,
    /// Output model JSON.
    #[arg(long)]
    output: PathBuf,
    /// Where the solver runs: cpu, cuda, cuda:N or emulated (kernel devices
    /// take folds of at most 128 training samples).
    #[arg(long, default_value = "cpu")]
    device: Device,
    #[command(flatten)]
    batch: BatchArgs,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Model JSON written by `svr grid`.
    #[arg(long)]
    model: PathBuf,
    /// Feature table CSV with the model's feature columns.
    #[arg(long)]
    features: PathBuf,
    /// CSV with a `sample` column and the --batch-column: needed when the
    /// model was fitted with --batch-correct; each batch of --features is
    /// corrected with its own statistics.
    #[arg(long)]
    batches: Option<PathBuf>,
    /// Column of --batches holding the batch.
    #[arg(long, default_value = "batch", requires = "batches")]
    batch_column: String,
    /// Output CSV: sample, one column per gene.
    #[arg(long)]
    output: PathBuf,
}

pub fn run(cmd: SvrCommand) -> Result<()> {
    match cmd {
        SvrCommand::Grid(a) => grid(a),
        SvrCommand::Predict(a) => predict(a),
        SvrCommand::Cv(a) => cv(a),
    }
}

fn cv(a: CvArgs) -> Result<()> {
    let mut inputs: Vec<(&str, &std::path::Path)> =
        vec![("--features", &a.features), ("--expression", &a.expression)];
    if let Some(g) = &a.groups {
        inputs.push(("--groups", g));
    }
    if let Some(b) = &a.batch.batches {
        inputs.push(("--batches", b));
    }
    cellmorph::io::check_output_is_not_an_input("--output", &a.output, &inputs)?;
    if let Some(summary) = &a.summary {
        cellmorph::io::check_output_is_not_an_input("--summary", summary, &inputs)?;
        if std::path::absolute(summary).ok() == std::path::absolute(&a.output).ok() {
            return Err(cellmorph::Error::invalid(format!(
                "--summary {} is also --output; give them different paths",
                summary.display()
            )));
        }
    }
    let mut grid = GridSpec::parse(&a.c, &a.epsilon)?;
    grid.folds = a.inner_folds;
    let k = a.folds.unwrap_or(5);
    let group_file = match (&a.groups, &a.group_column) {
        (Some(path), Some(column)) => Some(GroupFile {
            path: path.clone(),
            column: column.clone(),
        }),
        _ => None,
    };
    let batches = a.batch.resolve(group_file.as_ref())?;
    let outer = match group_file {
        Some(groups) if a.leave_one_group_out => OuterFolds::LeaveOneGroupOut(groups),
        Some(groups) => OuterFolds::GroupKFold { k, groups },
        None if a.shuffle => OuterFolds::Shuffled { k, seed: a.seed },
        None => OuterFolds::KFold(k),
    };
    let be = super::open_device(a.device, cellmorph::Precision::F32)?;
    let s = cross_validate(
        &be,
        &CrossValidateOptions {
            features: a.features,
            expression: a.expression,
            raw_counts: a.raw_counts,
            grid: grid.clone(),
            outer,
            output: a.output.clone(),
            summary: a.summary.clone(),
            batches: batches.clone(),
        },
    )?;
    let o = &s.outcome;
    eprintln!(
        "cv: {} genes on {} samples × {} features, {} in {:.2} s",
        o.genes.len(),
        o.samples.len(),
        s.features,
        if o.nested {
            format!(
                "nested: {} settings ({} C × {} ε), {} inner folds",
                grid.n_settings(),
                grid.c.len(),
                grid.epsilon.len(),
                grid.folds
            )
        } else {
            format!("C = {}, ε = {}", grid.c[0], grid.epsilon[0])
        },
        s.seconds
    );
    for sk in &o.skipped {
        eprintln!("skipped gene {}: {}", sk.gene, sk.reason);
    }
    if o.unconverged > 0 {
        eprintln!(
            "warning: {} SMO runs stopped at the iteration cap",
            o.unconverged
        );
    }
    if o.nested {
        let chosen: Vec<(&str, f64, f64)> = s
            .scores
            .iter()
            .map(|g| (g.gene.as_str(), g.c, g.epsilon))
            .collect();
        for w in grid_edge_warnings(&grid, &chosen) {
            eprintln!("warning: {w} (most frequent choice over the outer folds)");
        }
    }
    let width = s
        .scores
        .iter()
        .map(|g| g.gene.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    let correction = match &batches {
        Some(b) => format!(", features corrected ({}) within each {}", b.mode, b.column),
        None => String::new(),
    };
    println!(
        "cross-validated ({}{correction}): out-of-fold predictions",
        s.scheme
    );
    println!(
        "{:<width$} {:>8} {:>8} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "gene", "R2", "r2_score", "p", "q", "pearson_r", "C", "epsilon"
    );
    for g in &s.scores {
        println!(
            "{:<width$} {:>8.4} {:>8.4} {:>10.2e} {:>10.2e} {:>10.4} {:>8} {:>8}",
            g.gene, g.r2, g.r2_score, g.p, g.q, g.pearson_r, g.c, g.epsilon
        );
    }
    eprintln!("out-of-fold predictions -> {}", a.output.display());
    if let Some(summary) = &a.summary {
        eprintln!("scores -> {}", summary.display());
    }
    Ok(())
}

fn grid(a: GridArgs) -> Result<()> {
    let mut inputs: Vec<(&str, &std::path::Path)> =
        vec![("--features", &a.features), ("--expression", &a.expression)];
    if let Some(b) = &a.batch.batches {
        inputs.push(("--batches", b));
    }
    cellmorph::io::check_output_is_not_an_input("--output", &a.output, &inputs)?;
    let batches = a.batch.resolve(None)?;
    let mut spec = GridSpec::parse(&a.c, &a.epsilon)?;
    spec.folds = a.folds;
    let be = super::open_device(a.device, cellmorph::Precision::F32)?;
    let s = fit_gene_models(
        &be,
        &FitGeneModelsOptions {
            features: a.features,
            expression: a.expression,
            raw_counts: a.raw_counts,
            grid: spec.clone(),
            batches,
            output: a.output.clone(),
        },
    )?;
    eprintln!(
        "grid: {} genes × {} settings ({} C × {} ε) × {} folds on {} samples × {} features",
        s.genes,
        spec.n_settings(),
        spec.c.len(),
        spec.epsilon.len(),
        spec.folds,
        s.samples,
        s.features
    );
    let outcome = &s.outcome;
    for sk in &outcome.skipped {
        eprintln!("skipped gene {}: {}", sk.gene, sk.reason);
    }
    if outcome.stats.unconverged > 0 {
        eprintln!(
            "warning: {} of {} SMO runs stopped at the iteration cap",
            outcome.stats.unconverged, outcome.stats.smo_solves
        );
    }
    eprintln!(
        "{} problems ({} SMO solves) in {:.2} s",
        outcome.stats.problems, outcome.stats.smo_solves, s.seconds
    );
    let width = outcome
        .results
        .iter()
        .map(|r| r.gene.chars().count())
        .max()
        .unwrap_or(0)
        .max(4);
    println!(
        "{:<width$} {:>8} {:>8} {:>10}",
        "gene", "C", "epsilon", "cv_R2"
    );
    for r in &outcome.results {
        println!(
            "{:<width$} {:>8} {:>8} {:>10.4}",
            r.gene, r.c, r.epsilon, r.cv_score
        );
    }
    for w in &s.warnings {
        eprintln!("warning: {w} (recorded in the model)");
    }
    eprintln!("model -> {}", a.output.display());
    Ok(())
}

fn predict(a: PredictArgs) -> Result<()> {
    let mut inputs: Vec<(&str, &std::path::Path)> =
        vec![("--model", &a.model), ("--features", &a.features)];
    if let Some(b) = &a.batches {
        inputs.push(("--batches", b));
    }
    cellmorph::io::check_output_is_not_an_input("--output", &a.output, &inputs)?;
    let predicted = predict_expression(&PredictExpressionOptions {
        model: a.model,
        features: a.features,
        batches: a.batches.map(|p| (p, a.batch_column)),
        output: a.output.clone(),
    })?;
    eprintln!(
        "{} samples × {} genes -> {}",
        predicted.n_rows(),
        predicted.n_cols(),
        a.output.display()
    );
    Ok(())
}
