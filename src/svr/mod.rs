//! Batched linear epsilon-SVR and grid search ([reference](crate::reference) §1).
//!
//! scikit-learn's `SVR(kernel="linear")` reproduced: libsvm's dual solved by
//! [`smo::solve`] over a precomputed `f64` Gram matrix, one self-contained
//! call per problem, many problems in parallel on rayon. [`grid`] runs
//! `GridSearchCV(SVR(kernel="linear"), {"C", "epsilon"}, cv=KFold(k))` for
//! many genes at once; [`cv`] gives cross-validated (out-of-fold)
//! predictions, plain or nested; [`model`] saves and applies the fitted models.
//!
//! Matrices are passed as row-major `&[f64]` with an explicit column count.

pub mod cv;
pub mod device;
pub mod grid;
pub mod model;
pub mod smo;

pub use device::{fit_batch_on, grid_search_on, solve_batch_on, DualSolution, DEVICE_MAX_ROWS};
pub use grid::{
    grid_edge_warnings, grid_search, kfold, on_grid_edge, parse_list, r2_score, GridOutcome,
    GridResult, GridSpec, GridStats, SkippedGene,
};
pub use model::{GeneModel, SvrModel};

use std::collections::HashMap;

use rayon::prelude::*;

use crate::{Error, Result};

/// Hyper-parameters of one fit, scikit-learn's names and defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SvrParams {
    /// Box constraint `C` (> 0).
    pub c: f64,
    /// Width of the insensitive tube `ε` (≥ 0).
    pub epsilon: f64,
    /// Stopping tolerance on the maximal KKT violation (libsvm's `eps`).
    pub tol: f64,
}

impl Default for SvrParams {
    /// scikit-learn's defaults: `C = 1`, `ε = 0.1`, `tol = 1e-3`.
    fn default() -> Self {
        SvrParams {
            c: 1.0,
            epsilon: 0.1,
            tol: 1e-3,
        }
    }
}

impl SvrParams {
    /// `C` and `ε` with the default tolerance 1e-3.
    pub fn new(c: f64, epsilon: f64) -> Self {
        SvrParams {
            c,
            epsilon,
            ..SvrParams::default()
        }
    }

    /// Checks `C > 0`, `ε ≥ 0` and `tol > 0`, all finite.
    pub fn validate(&self) -> Result<()> {
        if !(self.c.is_finite() && self.c > 0.0) {
            return Err(Error::invalid(format!(
                "SVR: C must be a finite number > 0, got {}",
                self.c
            )));
        }
        if !(self.epsilon.is_finite() && self.epsilon >= 0.0) {
            return Err(Error::invalid(format!(
                "SVR: epsilon must be a finite number >= 0, got {}",
                self.epsilon
            )));
        }
        if !(self.tol.is_finite() && self.tol > 0.0) {
            return Err(Error::invalid(format!(
                "SVR: tol must be a finite number > 0, got {}",
                self.tol
            )));
        }
        Ok(())
    }
}

/// A fitted linear SVR: `f(x) = w·x + b`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearSvr {
    /// Weight vector, one entry per feature.
    pub w: Vec<f64>,
    /// Intercept.
    pub b: f64,
}

impl LinearSvr {
    /// `w·x + b` for one sample; an error if `x` has the wrong length.
    pub fn decision(&self, x: &[f64]) -> Result<f64> {
        if x.len() != self.w.len() {
            return Err(Error::shape(
                "LinearSvr::decision",
                format!("sample has {} features, model {}", x.len(), self.w.len()),
            ));
        }
        Ok(dot(&self.w, x) + self.b)
    }

    /// Predictions for the rows of the row-major matrix `x` (`w.len()`
    /// columns).
    pub fn predict(&self, x: &[f64]) -> Result<Vec<f64>> {
        let d = self.w.len();
        if d == 0 || !x.len().is_multiple_of(d) {
            return Err(Error::shape(
                "LinearSvr::predict",
                format!("{} values are not rows of {d} features", x.len()),
            ));
        }
        Ok(x.chunks_exact(d)
            .map(|r| dot(&self.w, r) + self.b)
            .collect())
    }
}

/// One solved problem.
#[derive(Debug, Clone, PartialEq)]
pub struct SvrFit {
    /// The fitted model.
    pub model: LinearSvr,
    /// SMO iterations used.
    pub iterations: usize,
    /// False when the iteration cap ([`smo::default_max_iter`]) was reached
    /// before the tolerance; the model is then the last iterate.
    pub converged: bool,
}

/// One problem of a batch: a subset of the feature matrix's rows, their
/// targets and the hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SvrProblem {
    /// Indices of the training rows in the feature matrix.
    pub train_rows: Vec<usize>,
    /// One target per training row.
    pub y: Vec<f64>,
    /// Hyper-parameters.
    pub params: SvrParams,
}

/// Fits one SVR on all rows of `x` (row-major, `n_features` columns).
pub fn fit(x: &[f64], n_features: usize, y: &[f64], params: &SvrParams) -> Result<SvrFit> {
    let problem = SvrProblem {
        train_rows: (0..y.len()).collect(),
        y: y.to_vec(),
        params: *params,
    };
    let n_rows = check_matrix("svr::fit", x, n_features)?;
    if n_rows != y.len() {
        return Err(Error::shape(
            "svr::fit",
            format!("{n_rows} sample rows but {} targets", y.len()),
        ));
    }
    let mut fits = fit_batch(x, n_features, std::slice::from_ref(&problem))?;
    fits.pop()
        .ok_or_else(|| Error::invalid("svr::fit: the batch returned no fit"))
}

/// Solves every problem, in parallel. Problems with the same training rows
/// share one Gram matrix, computed once.
pub fn fit_batch(x: &[f64], n_features: usize, problems: &[SvrProblem]) -> Result<Vec<SvrFit>> {
    let n_rows = check_matrix("svr::fit_batch", x, n_features)?;
    let mut gram_of = HashMap::new();
    let mut row_sets: Vec<&[usize]> = Vec::new();
    let mut problem_gram = Vec::with_capacity(problems.len());
    for (p, problem) in problems.iter().enumerate() {
        problem.params.validate()?;
        let rows = &problem.train_rows;
        if rows.is_empty() {
            return Err(Error::invalid(format!("SVR problem {p}: no training rows")));
        }
        if let Some(&r) = rows.iter().find(|&&r| r >= n_rows) {
            return Err(Error::shape(
                "svr::fit_batch",
                format!("problem {p}: training row {r} of a {n_rows}-row matrix"),
            ));
        }
        if problem.y.len() != rows.len() {
            return Err(Error::shape(
                "svr::fit_batch",
                format!(
                    "problem {p}: {} targets for {} training rows",
                    problem.y.len(),
                    rows.len()
                ),
            ));
        }
        check_finite(&problem.y, &format!("SVR problem {p}: target"))?;
        let next = row_sets.len();
        let g = *gram_of.entry(rows.as_slice()).or_insert(next);
        if g == next {
            row_sets.push(rows);
        }
        problem_gram.push(g);
    }
    let grams: Vec<Vec<f64>> = row_sets
        .par_iter()
        .map(|rows| linear_gram(x, n_features, rows))
        .collect();
    Ok(problems
        .par_iter()
        .zip(problem_gram.par_iter())
        .map_init(smo::Workspace::default, |ws, (problem, &g)| {
            solve_on_gram(x, n_features, &grams[g], problem, ws)
        })
        .collect())
}

fn solve_on_gram(
    x: &[f64],
    n_features: usize,
    gram: &[f64],
    problem: &SvrProblem,
    ws: &mut smo::Workspace,
) -> SvrFit {
    let l = problem.train_rows.len();
    let mut beta = vec![0.0; l];
    let p = &problem.params;
    let out = smo::solve(
        gram,
        l,
        &problem.y,
        p.c,
        p.epsilon,
        p.tol,
        smo::default_max_iter(l),
        ws,
        &mut beta,
    );
    SvrFit {
        model: LinearSvr {
            w: primal_weights(x, n_features, &problem.train_rows, &beta),
            b: out.b,
        },
        iterations: out.iterations,
        converged: out.converged,
    }
}

/// The l × l linear Gram matrix `K[m][n] = x_{rows[m]}·x_{rows[n]}` (row-major).
/// Panics if a row index is out of range (callers validate).
pub fn linear_gram(x: &[f64], n_features: usize, rows: &[usize]) -> Vec<f64> {
    cross_gram(x, n_features, rows, rows)
}

/// The `a.len() × b.len()` matrix `x_{a[i]}·x_{b[j]}` (row-major). Panics if
/// a row index is out of range (callers validate).
pub fn cross_gram(x: &[f64], n_features: usize, a: &[usize], b: &[usize]) -> Vec<f64> {
    let row = |r: usize| &x[r * n_features..(r + 1) * n_features];
    let mut k = Vec::with_capacity(a.len() * b.len());
    for &ra in a {
        k.extend(b.iter().map(|&rb| dot(row(ra), row(rb))));
    }
    k
}

/// `w = Σ_m beta[m]·x_{rows[m]}`.
pub fn primal_weights(x: &[f64], n_features: usize, rows: &[usize], beta: &[f64]) -> Vec<f64> {
    let mut w = vec![0.0; n_features];
    for (&r, &bm) in rows.iter().zip(beta) {
        if bm != 0.0 {
            let xr = &x[r * n_features..(r + 1) * n_features];
            for (wi, &xi) in w.iter_mut().zip(xr) {
                *wi += bm * xi;
            }
        }
    }
    w
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(p, q)| p * q).sum()
}

/// Checks a row-major matrix and returns its row count.
fn check_matrix(op: &'static str, x: &[f64], n_features: usize) -> Result<usize> {
    if n_features == 0 || x.is_empty() || !x.len().is_multiple_of(n_features) {
        return Err(Error::shape(
            op,
            format!(
                "{} values are not a non-empty matrix of {n_features} columns",
                x.len()
            ),
        ));
    }
    check_finite(x, "feature matrix")?;
    Ok(x.len() / n_features)
}

fn check_finite(v: &[f64], what: &str) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(Error::invalid(format!(
            "{what}: non-finite value {} at index {i}",
            v[i]
        ))),
        None => Ok(()),
    }
}
