//! `cellmorph svr grid` and `cellmorph svr predict`.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};

use cellmorph::apps::expression::prepare::{ExpressionTable, Scale};
use cellmorph::svr::{grid_search_on, GridSpec, SvrModel};
use cellmorph::table::Table;
use cellmorph::{Device, Error, Result};

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

/// Reads an expression CSV, normalizing raw counts when asked.
pub(crate) fn read_expression(path: &PathBuf, raw_counts: bool) -> Result<Table> {
    let t = Table::read_csv(path)?;
    if !raw_counts {
        return Ok(t);
    }
    let e = ExpressionTable::new(
        t.row_names.clone(),
        t.col_names.clone(),
        t.data.clone(),
        Scale::RawCounts,
    )?
    .normalize()?;
    Table::new(
        e.samples().to_vec(),
        e.genes().to_vec(),
        e.values().to_vec(),
    )
}

fn grid(a: GridArgs) -> Result<()> {
    let features = Table::read_csv(&a.features)?;
    let expression = read_expression(&a.expression, a.raw_counts)?;
    let mut spec = GridSpec::parse(&a.c, &a.epsilon)?;
    spec.folds = a.folds;
    eprintln!(
        "grid: {} genes × {} settings ({} C × {} ε) × {} folds on {} samples × {} features",
        expression.n_cols(),
        spec.n_settings(),
        spec.c.len(),
        spec.epsilon.len(),
        spec.folds,
        expression.n_rows(),
        features.n_cols()
    );
    let t0 = Instant::now();
    let be = super::open_device(a.device, cellmorph::Precision::F32)?;
    let outcome = grid_search_on(&be, &features, &expression, &spec)?;
    let secs = t0.elapsed().as_secs_f64();
    for s in &outcome.skipped {
        eprintln!("skipped gene {}: {}", s.gene, s.reason);
    }
    if outcome.stats.unconverged > 0 {
        eprintln!(
            "warning: {} of {} SMO runs stopped at the iteration cap",
            outcome.stats.unconverged, outcome.stats.smo_solves
        );
    }
    eprintln!(
        "{} problems ({} SMO solves) in {secs:.2} s",
        outcome.stats.problems, outcome.stats.smo_solves
    );
    if outcome.results.is_empty() {
        return Err(Error::invalid(
            "no gene could be fitted (see the skipped genes above)",
        ));
    }
    println!("{:<20} {:>8} {:>8} {:>10}", "gene", "C", "epsilon", "cv_R2");
    for r in &outcome.results {
        println!(
            "{:<20} {:>8} {:>8} {:>10.4}",
            r.gene, r.c, r.epsilon, r.cv_score
        );
    }
    let model = SvrModel::from_grid(features.col_names.clone(), &outcome.results);
    model.save(&a.output)?;
    eprintln!("model -> {}", a.output.display());
    Ok(())
}

fn predict(a: PredictArgs) -> Result<()> {
    let model = SvrModel::load(&a.model)?;
    let features = Table::read_csv(&a.features)?;
    let predicted = model.predict(&features)?;
    predicted.write_csv(&a.output)?;
    eprintln!(
        "{} samples × {} genes -> {}",
        predicted.n_rows(),
        predicted.n_cols(),
        a.output.display()
    );
    Ok(())
}
