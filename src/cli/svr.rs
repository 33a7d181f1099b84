//! `cellmorph svr grid` and `cellmorph svr predict`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use cellmorph::apps::expression::gene_models::{
    fit_gene_models, predict_expression, FitGeneModelsOptions, PredictExpressionOptions,
};
use cellmorph::svr::GridSpec;
use cellmorph::{Device, Result};

#[derive(Subcommand, Debug)]
pub enum SvrCommand {
    /// Per-gene linear epsilon-SVR with a cross-validated grid search over
    /// (C, epsilon), as scikit-learn's GridSearchCV(SVR(kernel="linear")).
    Grid(GridArgs),
    /// Predict expression from a feature table with a fitted model.
    Predict(PredictArgs),
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
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Model JSON written by `svr grid`.
    #[arg(long)]
    model: PathBuf,
    /// Feature table CSV with the model's feature columns.
    #[arg(long)]
    features: PathBuf,
    /// Output CSV: sample, one column per gene.
    #[arg(long)]
    output: PathBuf,
}

pub fn run(cmd: SvrCommand) -> Result<()> {
    match cmd {
        SvrCommand::Grid(a) => grid(a),
        SvrCommand::Predict(a) => predict(a),
    }
}

fn grid(a: GridArgs) -> Result<()> {
    cellmorph::io::check_output_is_not_an_input(
        "--output",
        &a.output,
        &[("--features", &a.features), ("--expression", &a.expression)],
    )?;
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
    println!("{:<20} {:>8} {:>8} {:>10}", "gene", "C", "epsilon", "cv_R2");
    for r in &outcome.results {
        println!(
            "{:<20} {:>8} {:>8} {:>10.4}",
            r.gene, r.c, r.epsilon, r.cv_score
        );
    }
    type Pick = fn(&cellmorph::svr::GridResult) -> f64;
    let picks: [(&str, &[f64], Pick); 2] = [
        ("C", &spec.c, |r| r.c),
        ("epsilon", &spec.epsilon, |r| r.epsilon),
    ];
    for (what, values, pick) in picks {
        let on_edge: Vec<&str> = outcome
            .results
            .iter()
            .filter(|r| on_grid_edge(values, pick(r)))
            .map(|r| r.gene.as_str())
            .collect();
        if !on_edge.is_empty() {
            eprintln!(
                "warning: the chosen {what} sits on the edge of the grid ({} … {}) for {} of {} genes (e.g. {}); the best value may lie outside it — widen the grid",
                values.iter().copied().fold(f64::INFINITY, f64::min),
                values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                on_edge.len(),
                outcome.results.len(),
                on_edge[..on_edge.len().min(3)].join(", ")
            );
        }
    }
    eprintln!("model -> {}", a.output.display());
    Ok(())
}

/// True when `v` is the smallest or largest of at least two grid values
/// (a grid edge of 0 for epsilon is a natural bound, not an edge).
fn on_grid_edge(values: &[f64], v: f64) -> bool {
    if values.len() < 2 {
        return false;
    }
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (v == lo && lo > 0.0) || v == hi
}

fn predict(a: PredictArgs) -> Result<()> {
    cellmorph::io::check_output_is_not_an_input(
        "--output",
        &a.output,
        &[("--model", &a.model), ("--features", &a.features)],
    )?;
    let predicted = predict_expression(&PredictExpressionOptions {
        model: a.model,
        features: a.features,
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
