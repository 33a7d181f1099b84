//! scikit-learn's `GridSearchCV(SVC(kernel="rbf"), {"C": …, "gamma": …},
//! cv=folds)` scored by accuracy, then the refit on every sample.
//!
//! Settings run in scikit-learn's `ParameterGrid` order (C outer, gamma
//! inner); each fold's score is the held-out accuracy (correct / held out),
//! a setting's score their mean; the best is the first setting with the
//! highest mean, as `rank_test_score`. `gamma = "scale"` is resolved on
//! each training set, as scikit-learn does inside each fit. The squared
//! distances between all samples are computed once; every (setting, fold)
//! fit reads them, in parallel on rayon (each fit is sequential, so the
//! result does not depend on the thread count).

use rayon::prelude::*;

use super::{check_matrix, squared_distance, Gamma, Svc};
use crate::svr::cv::Folds;
use crate::{Error, Result};

/// The grid: C values, gamma values and the SMO tolerance.
#[derive(Debug, Clone, PartialEq)]
pub struct SvmGridSpec {
    /// C values (each finite and > 0).
    pub c: Vec<f64>,
    /// gamma values.
    pub gamma: Vec<Gamma>,
    /// SMO tolerance (scikit-learn's default 1e-3).
    pub tol: f64,
}

impl SvmGridSpec {
    /// A grid with scikit-learn's tolerance 1e-3.
    pub fn new(c: Vec<f64>, gamma: Vec<Gamma>) -> SvmGridSpec {
        SvmGridSpec {
            c,
            gamma,
            tol: 1e-3,
        }
    }

    /// The settings in `ParameterGrid` order: C outer, gamma inner.
    pub fn settings(&self) -> Vec<(f64, Gamma)> {
        self.c
            .iter()
            .flat_map(|&c| self.gamma.iter().map(move |&g| (c, g)))
            .collect()
    }
}

/// One setting's cross-validated accuracy.
#[derive(Debug, Clone, PartialEq)]
pub struct SettingScore {
    /// C.
    pub c: f64,
    /// gamma as given.
    pub gamma: Gamma,
    /// Held-out accuracy of each fold.
    pub fold_accuracy: Vec<f64>,
    /// Their mean (scikit-learn's `mean_test_score`).
    pub mean_accuracy: f64,
}

/// What [`grid_search`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct SvmGridOutcome {
    /// Every setting, in grid order.
    pub scores: Vec<SettingScore>,
    /// Index of the best setting in [`SvmGridOutcome::scores`].
    pub best: usize,
    /// Out-of-fold predicted class of every sample with the best setting.
    pub oof_predicted: Vec<usize>,
    /// The best setting refitted on every sample.
    pub model: Svc,
    /// SMO runs (over all pairs, folds, settings and the refit) that
    /// stopped at the iteration cap.
    pub unconverged: usize,
}

/// The most samples [`grid_search`] takes: its squared-distance matrix is
/// `n²` f64 values (2 GiB at this bound).
pub const MAX_GRID_SAMPLES: usize = 16_384;

/// Runs the grid search on the rows of `x` (row-major, `n_features`
/// columns) with class labels `y` (one per row) over `folds` (held-out
/// indices), then refits the best setting on every row.
///
/// # Errors
/// An empty grid, a bad matrix or label count, folds that are not a
/// partition of the samples, a training set with a single class, or an
/// invalid C or gamma.
pub fn grid_search(
    x: &[f64],
    n_features: usize,
    y: &[usize],
    spec: &SvmGridSpec,
    folds: &Folds,
) -> Result<SvmGridOutcome> {
    search(x, n_features, y, spec, folds, &|jobs, dist| {
        jobs.par_iter()
            .map(|job| {
                Svc::fit_with(
                    x,
                    n_features,
                    job.rows,
                    &job.labels,
                    job.c,
                    job.gamma,
                    spec.tol,
                    dist,
                )
                .map_err(|e| job.context(e))
            })
            .collect()
    })
}

/// One fit of a grid search: a (setting, fold) or the refit.
pub(crate) struct FitJob<'a> {
    /// Training rows (indices into the samples).
    pub rows: &'a [usize],
    /// Their labels.
    pub labels: Vec<usize>,
    /// C.
    pub c: f64,
    /// γ resolved on `rows`.
    pub gamma: f64,
    /// For error messages: the fold and setting, or `None` for the refit.
    pub what: Option<(usize, f64, Gamma)>,
}

impl FitJob<'_> {
    /// `e` with the job's fold and setting in front.
    pub fn context(&self, e: Error) -> Error {
        match self.what {
            Some((f, c, gamma)) => {
                Error::invalid(format!("fold {f} (C = {c}, gamma = {gamma}): {e}"))
            }
            None => e,
        }
    }
}

/// Fits every job with the given squared distances between samples, one
/// model per job in order.
pub(crate) type Fitter<'a> =
    dyn Fn(&[FitJob], &(dyn Fn(usize, usize) -> f64 + Sync)) -> Result<Vec<Svc>> + 'a;

/// [`grid_search`] with the fits done by `fit` (the CPU solver, or a
/// device's batched one: `super::device`).
pub(crate) fn search(
    x: &[f64],
    n_features: usize,
    y: &[usize],
    spec: &SvmGridSpec,
    folds: &Folds,
    fit: &Fitter,
) -> Result<SvmGridOutcome> {
    check_matrix(x, n_features)?;
    let n = x.len() / n_features;
    if y.len() != n {
        return Err(Error::shape(
            "svm::grid_search",
            format!("{} labels for {n} samples", y.len()),
        ));
    }
    if n > MAX_GRID_SAMPLES {
        return Err(Error::invalid(format!(
            "SVM grid: {n} samples would need a {n}×{n} distance matrix ({:.1} GiB); \
             at most {MAX_GRID_SAMPLES} samples are taken (subsample the table)",
            (n as f64) * (n as f64) * 8.0 / (1u64 << 30) as f64
        )));
    }
    let settings = spec.settings();
    if settings.is_empty() {
        return Err(Error::invalid("SVM grid: no C or no gamma value"));
    }
    let mut fold_of = vec![usize::MAX; n];
    for (f, fold) in folds.iter().enumerate() {
        for &i in fold {
            if i >= n || fold_of[i] != usize::MAX {
                return Err(Error::invalid(format!(
                    "SVM grid: fold {f} holds sample {i}, out of range or in two folds"
                )));
            }
            fold_of[i] = f;
        }
    }
    if folds.len() < 2 || fold_of.contains(&usize::MAX) {
        return Err(Error::invalid(
            "SVM grid: the folds must be at least 2 and cover every sample",
        ));
    }
    let row = |r: usize| &x[r * n_features..(r + 1) * n_features];
    let d2: Vec<f64> = (0..n)
        .into_par_iter()
        .flat_map_iter(|a| (0..n).map(move |b| squared_distance(row(a), row(b))))
        .collect();
    let dist = |a: usize, b: usize| d2[a * n + b];
    let train: Vec<Vec<usize>> = (0..folds.len())
        .map(|f| (0..n).filter(|&i| fold_of[i] != f).collect())
        .collect();
    // γ of each (gamma value, fold): "scale" depends on the training rows.
    let gammas: Vec<Vec<f64>> = spec
        .gamma
        .iter()
        .map(|g| {
            train
                .iter()
                .map(|rows| g.resolve(x, n_features, rows))
                .collect()
        })
        .collect();
    let n_gamma = spec.gamma.len();
    let jobs: Vec<FitJob> = (0..settings.len())
        .flat_map(|s| (0..folds.len()).map(move |f| (s, f)))
        .map(|(s, f)| {
            let (c, gamma) = settings[s];
            let rows = &train[f];
            FitJob {
                rows,
                labels: rows.iter().map(|&r| y[r]).collect(),
                c,
                gamma: gammas[s % n_gamma][f],
                what: Some((f, c, gamma)),
            }
        })
        .collect();
    let models = fit(&jobs, &dist)?;
    // Each job: the held-out predictions and the SMO runs that hit the cap.
    let results: Vec<(Vec<usize>, usize)> = jobs
        .par_iter()
        .zip(&models)
        .map(|(job, m)| {
            let f = job.what.map_or(0, |w| w.0);
            let predicted = folds[f]
                .iter()
                .map(|&i| {
                    let kernel: Vec<f64> = m
                        .support
                        .iter()
                        .map(|&p| (-m.gamma * dist(i, job.rows[p])).exp())
                        .collect();
                    m.classes[m.decide(&kernel).1]
                })
                .collect();
            (predicted, m.unconverged)
        })
        .collect();
    let mut unconverged = 0;
    let mut scores = Vec::with_capacity(settings.len());
    for (s, &(c, gamma)) in settings.iter().enumerate() {
        let fold_accuracy: Vec<f64> = (0..folds.len())
            .map(|f| {
                let (pred, unconv) = &results[s * folds.len() + f];
                unconverged += unconv;
                let correct = pred
                    .iter()
                    .zip(&folds[f])
                    .filter(|(p, &i)| **p == y[i])
                    .count();
                correct as f64 / folds[f].len() as f64
            })
            .collect();
        let mean_accuracy = fold_accuracy.iter().sum::<f64>() / folds.len() as f64;
        scores.push(SettingScore {
            c,
            gamma,
            fold_accuracy,
            mean_accuracy,
        });
    }
    let mut best = 0;
    for (s, sc) in scores.iter().enumerate() {
        if sc.mean_accuracy > scores[best].mean_accuracy {
            best = s;
        }
    }
    let mut oof_predicted = vec![0; n];
    for (f, fold) in folds.iter().enumerate() {
        for (&i, &p) in fold.iter().zip(&results[best * folds.len() + f].0) {
            oof_predicted[i] = p;
        }
    }
    let all: Vec<usize> = (0..n).collect();
    let (c, gamma) = settings[best];
    let refit = FitJob {
        rows: &all,
        labels: y.to_vec(),
        c,
        gamma: gamma.resolve(x, n_features, &all),
        what: None,
    };
    let model = fit(std::slice::from_ref(&refit), &dist)?
        .pop()
        .ok_or_else(|| Error::invalid("SVM grid: the refit returned no model"))?;
    unconverged += model.unconverged;
    Ok(SvmGridOutcome {
        scores,
        best,
        oof_predicted,
        model,
        unconverged,
    })
}
