//! Multi-class RBF support vector classification with libsvm's semantics,
//! as scikit-learn's `SVC(kernel="rbf")`, and its cross-validated grid
//! search.
//!
//! - [`smo`]: libsvm's SMO for one two-class dual (WSS 3, tol 1e-3).
//! - [`Svc`]: one-vs-one over every pair of classes in sorted order, each
//!   pair's problem solved on its samples in libsvm's order (the first
//!   class's then the second's, each in training order); support vectors,
//!   dual coefficients and intercepts laid out as libsvm's `sv_coef`
//!   (scikit-learn's `support_`, `dual_coef_`, `intercept_`); prediction
//!   by one-vs-one voting, ties to the first class in sorted order.
//! - [`grid`]: `GridSearchCV(SVC(), {"C", "gamma"}, cv=folds)` scored by
//!   accuracy, with out-of-fold predictions of the best setting.
//! - [`folds`]: scikit-learn's `StratifiedKFold(k)` without shuffling.
//! - [`model`]: the fitted model as JSON; [`confusion`]: the confusion
//!   matrix with per-class precision and recall.
//!
//! - [`device`]: the same fits and grid search with the SMO solves batched
//!   on a kernel device (`kernels/svm.cu`; CUDA or emulated), bit for bit
//!   the CPU's results.
//!
//! The kernel is `exp(−γ·|x − y|²)` in `f64`, `|x − y|²` summed over the
//! features in order, so every kernel value is the same bits wherever it
//! is computed.

pub mod confusion;
pub mod device;
pub mod folds;
pub mod grid;
pub mod model;
pub mod smo;

pub use confusion::Confusion;
pub use device::{fit_on, grid_search_on, solve_duals_on, SvcDual};
pub use folds::stratified_kfold;
pub use grid::{grid_search, SettingScore, SvmGridOutcome, SvmGridSpec};
pub use model::SvmModel;

use crate::{Error, Result};

/// scikit-learn's `gamma`: a number, or `"scale"` = 1 / (n_features ·
/// X.var()) of the training matrix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Gamma {
    /// A fixed γ > 0.
    Value(f64),
    /// `1 / (n_features · X.var())`, the variance over every entry of the
    /// training matrix (1 when it is 0), as scikit-learn's `"scale"`.
    Scale,
}

impl Gamma {
    /// Parses `scale` or a finite number > 0.
    pub fn parse(s: &str) -> Result<Gamma> {
        let s = s.trim();
        if s == "scale" {
            return Ok(Gamma::Scale);
        }
        match s.parse::<f64>() {
            Ok(v) if v.is_finite() && v > 0.0 => Ok(Gamma::Value(v)),
            _ => Err(Error::invalid(format!(
                "gamma '{s}' is neither 'scale' nor a finite number > 0"
            ))),
        }
    }

    /// Parses a comma-separated list of [`Gamma::parse`] items.
    pub fn parse_list(s: &str) -> Result<Vec<Gamma>> {
        s.split(',').map(Gamma::parse).collect()
    }

    /// γ for the training rows `rows` of `x` (row-major, `n_features`
    /// columns).
    pub fn resolve(&self, x: &[f64], n_features: usize, rows: &[usize]) -> f64 {
        match *self {
            Gamma::Value(g) => g,
            Gamma::Scale => {
                let n = (rows.len() * n_features) as f64;
                let values = || {
                    rows.iter()
                        .flat_map(|&r| &x[r * n_features..(r + 1) * n_features])
                };
                let mean = values().sum::<f64>() / n;
                let var = values().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
                if var > 0.0 {
                    1.0 / (n_features as f64 * var)
                } else {
                    1.0
                }
            }
        }
    }
}

impl std::fmt::Display for Gamma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Gamma::Value(g) => write!(f, "{g}"),
            Gamma::Scale => write!(f, "scale"),
        }
    }
}

/// `|a − b|²`, summed in feature order.
pub fn squared_distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum()
}

/// A fitted one-vs-one RBF SVC, laid out as libsvm's model.
#[derive(Debug, Clone, PartialEq)]
pub struct Svc {
    /// The classes it separates (indices into the caller's class list),
    /// ascending.
    pub classes: Vec<usize>,
    /// Support vectors per class, in [`Svc::classes`] order.
    pub n_support: Vec<usize>,
    /// The support vectors' positions among the training rows given to
    /// [`Svc::fit`], grouped by class, ascending within a class.
    pub support: Vec<usize>,
    /// The support vectors, row-major, `n_features` columns.
    pub support_vectors: Vec<f64>,
    /// Columns of the support vectors.
    pub n_features: usize,
    /// libsvm's `sv_coef` (scikit-learn's `dual_coef_`): `classes − 1` rows
    /// of one coefficient per support vector. For the pair (a, b), a < b,
    /// the coefficients of a's vectors are in row b − 1 and b's in row a.
    pub dual_coef: Vec<Vec<f64>>,
    /// One intercept (`−ρ`) per pair, pairs (0,1), (0,2), …, (1,2), ….
    pub intercept: Vec<f64>,
    /// The kernel's γ.
    pub gamma: f64,
    /// SMO iterations over all pairs.
    pub iterations: usize,
    /// Pairs whose SMO stopped at the iteration cap.
    pub unconverged: usize,
}

impl Svc {
    /// Fits on the rows `rows` of `x` (row-major, `n_features` columns)
    /// with labels `y` (class indices, one per row), box constraint `c`,
    /// kernel width `gamma` and SMO tolerance `tol`.
    ///
    /// # Errors
    /// Fewer than two classes, mismatched lengths, a row out of range, or
    /// `c`, `gamma`, `tol` not finite and > 0.
    pub fn fit(
        x: &[f64],
        n_features: usize,
        rows: &[usize],
        y: &[usize],
        c: f64,
        gamma: f64,
        tol: f64,
    ) -> Result<Svc> {
        check_training_rows("Svc::fit", x, n_features, rows)?;
        let row = |r: usize| &x[r * n_features..(r + 1) * n_features];
        Svc::fit_with(x, n_features, rows, y, c, gamma, tol, &|a, b| {
            squared_distance(row(a), row(b))
        })
    }

    /// [`Svc::fit`] with the squared distances between rows of `x` given
    /// by `dist` (the grid search passes a precomputed matrix).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fit_with(
        x: &[f64],
        n_features: usize,
        rows: &[usize],
        y: &[usize],
        c: f64,
        gamma: f64,
        tol: f64,
        dist: &(dyn Fn(usize, usize) -> f64 + Sync),
    ) -> Result<Svc> {
        check_params(c, gamma, tol)?;
        let plan = FitPlan::new(rows, y)?;
        // One pair's Gram matrix at a time.
        let solutions: Vec<PairSolution> = (0..plan.pairs.len())
            .map(|p| {
                let pair = &plan.pairs[p];
                let l = pair.pos.len();
                let gram = plan.gram(p, rows, gamma, dist);
                let labels: Vec<f64> = (0..l)
                    .map(|t| if t < pair.n_pos { 1.0 } else { -1.0 })
                    .collect();
                let mut coef = vec![0.0; l];
                let outcome = smo::solve(
                    &gram,
                    l,
                    &labels,
                    c,
                    tol,
                    smo::default_max_iter(l),
                    &mut coef,
                );
                PairSolution { coef, outcome }
            })
            .collect();
        Ok(Svc::assemble(x, n_features, rows, &plan, &solutions, gamma))
    }

    /// The model from the solved duals of `plan`'s pairs (in pair order).
    pub(crate) fn assemble(
        x: &[f64],
        n_features: usize,
        rows: &[usize],
        plan: &FitPlan,
        solutions: &[PairSolution],
        gamma: f64,
    ) -> Svc {
        let n_classes = plan.classes.len();
        let n_train = rows.len();
        let mut coef: Vec<Vec<f64>> = vec![vec![0.0; n_train]; n_classes - 1];
        let mut nonzero = vec![false; n_train];
        let mut intercept = Vec::with_capacity(plan.pairs.len());
        let (mut iterations, mut unconverged) = (0, 0);
        for (pair, s) in plan.pairs.iter().zip(solutions) {
            let (a, b) = pair.classes;
            iterations += s.outcome.iterations;
            unconverged += usize::from(!s.outcome.converged);
            intercept.push(-s.outcome.rho);
            for (t, &al) in s.coef.iter().enumerate() {
                if al != 0.0 {
                    nonzero[pair.pos[t]] = true;
                }
                // a's coefficients go to row b − 1, b's to row a.
                let r = if t < pair.n_pos { b - 1 } else { a };
                coef[r][pair.pos[t]] = al;
            }
        }
        let mut n_support = Vec::with_capacity(n_classes);
        let mut support = Vec::new();
        for m in &plan.members {
            let before = support.len();
            support.extend(m.iter().copied().filter(|&p| nonzero[p]));
            n_support.push(support.len() - before);
        }
        let dual_coef = coef
            .iter()
            .map(|r| support.iter().map(|&p| r[p]).collect())
            .collect();
        let support_vectors = support
            .iter()
            .flat_map(|&p| &x[rows[p] * n_features..(rows[p] + 1) * n_features])
            .copied()
            .collect();
        Svc {
            classes: plan.classes.clone(),
            n_support,
            support,
            support_vectors,
            n_features,
            dual_coef,
            intercept,
            gamma,
            iterations,
            unconverged,
        }
    }

    /// The kernel values `exp(−γ·|x − sv|²)` of one sample against every
    /// support vector. Panics if `x` is not `n_features` long (callers
    /// check).
    pub fn kernel_values(&self, x: &[f64]) -> Vec<f64> {
        assert_eq!(x.len(), self.n_features, "Svc::kernel_values: length");
        self.support_vectors
            .chunks_exact(self.n_features)
            .map(|sv| (-self.gamma * squared_distance(x, sv)).exp())
            .collect()
    }

    /// libsvm's one-vs-one decision values from the kernel values of one
    /// sample (pairs in [`Svc::intercept`] order; positive favours the
    /// pair's first class) and the predicted class (an index into
    /// [`Svc::classes`]): most votes, ties to the first class.
    pub fn decide(&self, kernel: &[f64]) -> (Vec<f64>, usize) {
        let k = self.classes.len();
        let mut start = Vec::with_capacity(k);
        let mut s = 0;
        for &n in &self.n_support {
            start.push(s);
            s += n;
        }
        let mut votes = vec![0usize; k];
        let mut dec = Vec::with_capacity(self.intercept.len());
        let mut p = 0;
        for a in 0..k {
            for b in a + 1..k {
                let (sa, sb) = (start[a], start[b]);
                let mut sum = 0.0;
                for t in 0..self.n_support[a] {
                    sum += self.dual_coef[b - 1][sa + t] * kernel[sa + t];
                }
                for t in 0..self.n_support[b] {
                    sum += self.dual_coef[a][sb + t] * kernel[sb + t];
                }
                let v = sum + self.intercept[p];
                votes[if v > 0.0 { a } else { b }] += 1;
                dec.push(v);
                p += 1;
            }
        }
        let mut best = 0;
        for (i, &v) in votes.iter().enumerate().skip(1) {
            if v > votes[best] {
                best = i;
            }
        }
        (dec, best)
    }

    /// The predicted class (an entry of [`Svc::classes`]) of one sample.
    pub fn predict_row(&self, x: &[f64]) -> usize {
        self.classes[self.decide(&self.kernel_values(x)).1]
    }
}

/// Checks C, γ and the tolerance of a fit.
pub(crate) fn check_params(c: f64, gamma: f64, tol: f64) -> Result<()> {
    for (name, v) in [("C", c), ("gamma", gamma), ("tol", tol)] {
        if !(v.is_finite() && v > 0.0) {
            return Err(Error::invalid(format!(
                "SVC: {name} must be a finite number > 0, got {v}"
            )));
        }
    }
    Ok(())
}

/// One pair's two-class problem in libsvm's order: the first class's
/// samples, then the second's, each in training order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PairProblem {
    /// The two classes (indices into [`FitPlan::classes`]), a < b.
    pub classes: (usize, usize),
    /// Training positions (indices into the fit's rows) of its samples.
    pub pos: Vec<usize>,
    /// How many of them belong to the first class (label +1).
    pub n_pos: usize,
}

/// The one-vs-one problems of a fit, before any kernel value is computed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FitPlan {
    /// Distinct classes, ascending.
    pub classes: Vec<usize>,
    /// Training positions of each class, in training order.
    pub members: Vec<Vec<usize>>,
    /// Pairs (0,1), (0,2), …, (1,2), ….
    pub pairs: Vec<PairProblem>,
}

impl FitPlan {
    /// The pairs of the labels `y` of the training rows `rows`.
    ///
    /// # Errors
    /// Mismatched lengths or fewer than two classes.
    pub(crate) fn new(rows: &[usize], y: &[usize]) -> Result<FitPlan> {
        if rows.len() != y.len() {
            return Err(Error::shape(
                "Svc::fit",
                format!("{} labels for {} training rows", y.len(), rows.len()),
            ));
        }
        let mut classes: Vec<usize> = y.to_vec();
        classes.sort_unstable();
        classes.dedup();
        if classes.len() < 2 {
            return Err(Error::invalid(format!(
                "SVC: the training samples hold {} class(es); at least 2 are needed",
                classes.len()
            )));
        }
        let members: Vec<Vec<usize>> = classes
            .iter()
            .map(|&k| (0..y.len()).filter(|&p| y[p] == k).collect())
            .collect();
        let n_classes = classes.len();
        let mut pairs = Vec::with_capacity(n_classes * (n_classes - 1) / 2);
        for a in 0..n_classes {
            for b in a + 1..n_classes {
                pairs.push(PairProblem {
                    classes: (a, b),
                    pos: members[a].iter().chain(&members[b]).copied().collect(),
                    n_pos: members[a].len(),
                });
            }
        }
        Ok(FitPlan {
            classes,
            members,
            pairs,
        })
    }

    /// Pair `p`'s l × l Gram matrix `exp(−γ·dist)` (row-major, 1 on the
    /// diagonal), `dist` indexed by the rows of `x`.
    pub(crate) fn gram(
        &self,
        p: usize,
        rows: &[usize],
        gamma: f64,
        dist: &(dyn Fn(usize, usize) -> f64 + Sync),
    ) -> Vec<f64> {
        let pos = &self.pairs[p].pos;
        let l = pos.len();
        let mut gram = vec![0.0; l * l];
        for s in 0..l {
            gram[s * l + s] = 1.0;
            for t in s + 1..l {
                let k = (-gamma * dist(rows[pos[s]], rows[pos[t]])).exp();
                gram[s * l + t] = k;
                gram[t * l + s] = k;
            }
        }
        gram
    }
}

/// One pair's solved dual.
#[derive(Debug, Clone, PartialEq)]
pub struct PairSolution {
    /// `y_t·α_t` per sample of the pair, in the pair's order.
    pub coef: Vec<f64>,
    /// ρ, iterations and convergence, as [`smo::solve`] reports them.
    pub outcome: smo::SmoOutcome,
}

/// Checks a non-empty row-major matrix of finite values with `n_features`
/// columns.
pub(crate) fn check_matrix(x: &[f64], n_features: usize) -> Result<()> {
    if n_features == 0 || x.is_empty() || !x.len().is_multiple_of(n_features) {
        return Err(Error::shape(
            "svm",
            format!(
                "{} values are not a non-empty matrix of {n_features} columns",
                x.len()
            ),
        ));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "feature matrix: non-finite value {} at row {}, column {}",
            x[i],
            i / n_features,
            i % n_features
        )));
    }
    Ok(())
}

/// [`check_matrix`], and every index of `rows` a row of `x`; errors name
/// `op`.
pub(crate) fn check_training_rows(
    op: &'static str,
    x: &[f64],
    n_features: usize,
    rows: &[usize],
) -> Result<()> {
    check_matrix(x, n_features)?;
    let n = x.len() / n_features;
    if let Some(&r) = rows.iter().find(|&&r| r >= n) {
        return Err(Error::shape(
            op,
            format!("training row {r} of a {n}-row matrix"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gamma_parses_scale_and_positive_numbers() {
        assert_eq!(Gamma::parse("scale").unwrap(), Gamma::Scale);
        assert_eq!(Gamma::parse(" 0.5").unwrap(), Gamma::Value(0.5));
        for bad in ["0", "-1", "nan", "auto", ""] {
            assert!(Gamma::parse(bad).is_err(), "{bad}");
        }
        // 1 / (2 · var{0, 1, 2, 3}) = 1 / (2 · 1.25).
        let x = [0.0, 1.0, 2.0, 3.0];
        assert_eq!(Gamma::Scale.resolve(&x, 2, &[0, 1]), 0.4);
        assert_eq!(Gamma::Scale.resolve(&[1.0, 1.0], 2, &[0]), 1.0);
    }

    #[test]
    fn three_separated_clusters_are_predicted_by_their_class() {
        let x = [0.0, 0.0, 0.1, 0.0, 5.0, 5.0, 5.1, 5.0, -5.0, 5.0, -5.1, 5.0];
        let y = [2, 2, 0, 0, 1, 1];
        let rows: Vec<usize> = (0..6).collect();
        let m = Svc::fit(&x, 2, &rows, &y, 1.0, 0.5, 1e-3).unwrap();
        assert_eq!(m.classes, vec![0, 1, 2]);
        assert_eq!(m.intercept.len(), 3);
        assert_eq!(m.dual_coef.len(), 2);
        assert_eq!(m.predict_row(&[4.9, 5.2]), 0);
        assert_eq!(m.predict_row(&[-4.9, 5.2]), 1);
        assert_eq!(m.predict_row(&[0.05, -0.1]), 2);
        assert!(Svc::fit(&x, 2, &rows, &[1; 6], 1.0, 0.5, 1e-3).is_err());
        assert!(Svc::fit(&x, 2, &rows, &y, 0.0, 0.5, 1e-3).is_err());
    }
}
