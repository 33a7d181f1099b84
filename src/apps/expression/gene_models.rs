//! Per-gene SVR models from files: [`fit_gene_models`] (`cellmorph svr
//! grid`) runs the cross-validated grid search of [`crate::svr`] for every
//! gene of an expression table on a feature table and writes the model
//! JSON; [`predict_expression`] (`cellmorph svr predict`) applies a model to
//! a feature table.

use std::path::PathBuf;
use std::time::Instant;

use super::batch::BatchFile;
use super::prepare::read_expression;
use crate::backend::Backend;
use crate::svr::{grid_edge_warnings, grid_search_on, GridOutcome, GridSpec, SvrModel};
use crate::table::Table;
use crate::{Error, Result};

/// What [`fit_gene_models`] reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct FitGeneModelsOptions {
    /// Feature table CSV: sample, then one column per feature (e.g. a
    /// profile CSV).
    pub features: PathBuf,
    /// Expression table CSV: sample, then one column per gene (log2 CPM
    /// unless `raw_counts`).
    pub expression: PathBuf,
    /// The expression table holds raw counts: normalize to log2(CPM + 1)
    /// first.
    pub raw_counts: bool,
    /// The (C, ε) grid, folds and tolerance.
    pub grid: GridSpec,
    /// Per-batch correction of the features before the search, when any.
    pub batches: Option<BatchFile>,
    /// Output model JSON.
    pub output: PathBuf,
}

/// What [`fit_gene_models`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct FitGeneModelsSummary {
    /// Genes (expression columns), fitted or skipped.
    pub genes: usize,
    /// Samples (expression rows).
    pub samples: usize,
    /// Features (feature columns).
    pub features: usize,
    /// The fitted genes, the skipped ones and the work counters.
    pub outcome: GridOutcome,
    /// Seconds the search took.
    pub seconds: f64,
    /// Warnings about the choices (a chosen C or ε on the grid's edge),
    /// also stored in the model.
    pub warnings: Vec<String>,
}

/// `cellmorph svr grid`: per-gene linear epsilon-SVR with a
/// cross-validated grid search over (C, ε) on `be`, as scikit-learn's
/// `GridSearchCV(SVR(kernel="linear"))`; writes the model JSON. Fails when
/// no gene can be fitted.
pub fn fit_gene_models(be: &Backend, o: &FitGeneModelsOptions) -> Result<FitGeneModelsSummary> {
    let features = Table::read_csv(&o.features)?;
    let expression = read_expression(&o.expression, o.raw_counts)?;
    features.require_rows(&o.features, &expression.row_names, &o.expression)?;
    let features = training_features(&features, &expression, o.batches.as_ref())?;
    let t0 = Instant::now();
    let outcome = grid_search_on(be, &features, &expression, &o.grid)?;
    let seconds = t0.elapsed().as_secs_f64();
    if outcome.results.is_empty() {
        let examples: Vec<String> = outcome
            .skipped
            .iter()
            .take(3)
            .map(|s| format!("{}: {}", s.gene, s.reason))
            .collect();
        return Err(Error::invalid(format!(
            "no gene could be fitted ({} skipped{}{})",
            outcome.skipped.len(),
            if examples.is_empty() { "" } else { ", e.g. " },
            examples.join("; ")
        )));
    }
    let chosen: Vec<(&str, f64, f64)> = outcome
        .results
        .iter()
        .map(|r| (r.gene.as_str(), r.c, r.epsilon))
        .collect();
    let warnings = grid_edge_warnings(&o.grid, &chosen);
    let mut model = SvrModel::from_grid(features.col_names.clone(), &outcome.results)
        .with_training(&features, warnings.clone())?;
    model.batch_correction = o.batches.as_ref().map(|b| b.mode.to_string());
    model.save(&o.output)?;
    Ok(FitGeneModelsSummary {
        genes: expression.n_cols(),
        samples: expression.n_rows(),
        features: features.n_cols(),
        outcome,
        seconds,
        warnings,
    })
}

/// What [`predict_expression`] reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct PredictExpressionOptions {
    /// Model JSON written by [`fit_gene_models`].
    pub model: PathBuf,
    /// Feature table CSV with the model's feature columns.
    pub features: PathBuf,
    /// Each sample's batch, needed when the model was fitted on
    /// batch-corrected features (the model's correction is applied within
    /// each batch of this table); an error otherwise.
    pub batches: Option<(PathBuf, String)>,
    /// Output CSV: sample, one column per gene.
    pub output: PathBuf,
}

/// `cellmorph svr predict`: predicts every gene of a model from a feature
/// table and writes the predictions; returns them (samples × genes).
pub fn predict_expression(o: &PredictExpressionOptions) -> Result<Table> {
    let model = SvrModel::load(&o.model)?;
    let features = Table::read_csv(&o.features)?;
    let in_context = |e: Error| {
        Error::format(
            &o.features,
            format!("for the model {}: {e}", o.model.display()),
        )
    };
    let predicted = match (&model.batch_correction, &o.batches) {
        (None, None) => model.predict(&features).map_err(in_context)?,
        (Some(mode), Some((path, column))) => {
            let batches = BatchFile {
                path: path.clone(),
                column: column.clone(),
                mode: mode
                    .parse()
                    .map_err(|e| Error::format(&o.model, format!("{e}")))?,
            };
            model
                .predict_corrected(&batches.apply(&features)?)
                .map_err(in_context)?
        }
        (Some(mode), None) => {
            return Err(Error::invalid(format!(
                "{} was fitted on batch-corrected features ({mode}); give --batches \
                 so the features are corrected within their batches the same way",
                o.model.display()
            )))
        }
        (None, Some((path, _))) => {
            return Err(Error::invalid(format!(
                "--batches {} given, but {} was fitted without batch correction",
                path.display(),
                o.model.display()
            )))
        }
    };
    predicted.write_csv(&o.output)?;
    Ok(predicted)
}

/// The rows of `features` that `expression` names, in its order, corrected
/// within their batches when `batches` is given (the statistics of each
/// batch come from these rows only).
pub fn training_features(
    features: &Table,
    expression: &Table,
    batches: Option<&BatchFile>,
) -> Result<Table> {
    let rows = features.select_rows(&expression.row_names)?;
    match batches {
        Some(b) => b.apply(&rows),
        None => Ok(rows),
    }
}
