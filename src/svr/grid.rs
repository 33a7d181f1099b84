//! scikit-learn's `GridSearchCV(SVR(kernel="linear"), {"C", "epsilon"},
//! cv=KFold(k))` for many genes at once.
//!
//! - Folds: [`kfold`], contiguous blocks in sample order, no shuffling.
//! - Score: [`r2_score`] on the held-out fold, averaged over the folds.
//! - Settings in grid order, C outer and ε inner; the best is the highest
//!   mean score, the first in grid order on an exact tie.
//! - Refit on all samples with the best setting.
//!
//! The Gram matrix of each fold's training rows (and the held-out × training
//! cross-Gram used for prediction) is computed once and shared by every gene
//! and setting. The work is one flat rayon batch over (gene, fold, ε)
//! chains; a chain solves its C values in increasing order. When a solve
//! never hit the `C` bound ([`smo::SmoOutcome::c_bound_active`] false), every
//! larger C would repeat the same computation bit for bit, so its score is
//! reused instead of recomputed. This is not a warm start: each score is
//! exactly what an independent solve gives. With the paper's features the
//! dual coefficients are far below C = 1, so 1,100 settings cost 11 solves.
//!
//! Genes whose expression is the same in every sample are skipped and
//! reported in [`GridOutcome::skipped`]: their R² is undefined (scikit-learn
//! would return 1.0 for every setting and pick the first), so any fitted
//! number would be meaningless.

use rayon::prelude::*;

use super::{cross_gram, linear_gram, primal_weights, smo, SvrParams};
use crate::table::Table;
use crate::{Error, Result};

/// Most values one grid list may expand to; a guard against typos such as
/// `0:100:0.0001`.
const MAX_LIST_LEN: usize = 1_000_000;

/// The hyper-parameter grid and cross-validation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GridSpec {
    /// C values (outer loop of the grid order).
    pub c: Vec<f64>,
    /// ε values (inner loop).
    pub epsilon: Vec<f64>,
    /// Number of folds k of `KFold(k)`.
    pub folds: usize,
    /// SMO stopping tolerance (scikit-learn's `tol`, 1e-3).
    pub tol: f64,
}

impl GridSpec {
    /// A grid with 3 folds and tolerance 1e-3, validated.
    pub fn new(c: Vec<f64>, epsilon: Vec<f64>) -> Result<GridSpec> {
        let spec = GridSpec {
            c,
            epsilon,
            folds: 3,
            tol: SvrParams::default().tol,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// A grid from two list arguments in [`parse_list`] syntax.
    pub fn parse(c: &str, epsilon: &str) -> Result<GridSpec> {
        GridSpec::new(parse_list(c)?, parse_list(epsilon)?)
    }

    /// The paper's grid: C ∈ {1, 2, …, 100}, ε ∈ {0, 0.05, …, 0.5}, 3 folds.
    pub fn paper() -> GridSpec {
        GridSpec {
            c: (1..=100).map(f64::from).collect(),
            epsilon: (0..=10)
                .map(|i| round_decimals(f64::from(i) * 0.05, 2))
                .collect(),
            folds: 3,
            tol: SvrParams::default().tol,
        }
    }

    /// Number of settings, `c.len() × epsilon.len()`.
    pub fn n_settings(&self) -> usize {
        self.c.len() * self.epsilon.len()
    }

    /// `(C, ε)` of setting `index` in grid order (C outer, ε inner). Panics
    /// if `index >= n_settings()`.
    pub fn setting(&self, index: usize) -> (f64, f64) {
        let ne = self.epsilon.len();
        (self.c[index / ne], self.epsilon[index % ne])
    }

    /// Checks non-empty lists, valid values (C > 0, ε ≥ 0, tol > 0) and
    /// at least 2 folds.
    pub fn validate(&self) -> Result<()> {
        if self.c.is_empty() || self.epsilon.is_empty() {
            return Err(Error::invalid(
                "grid search: the C and epsilon lists must not be empty",
            ));
        }
        for &c in &self.c {
            for &epsilon in &self.epsilon {
                SvrParams {
                    c,
                    epsilon,
                    tol: self.tol,
                }
                .validate()?;
            }
        }
        if self.folds < 2 {
            return Err(Error::invalid(format!(
                "grid search: need at least 2 folds, got {}",
                self.folds
            )));
        }
        Ok(())
    }
}

/// Parses a grid list: comma-separated items, each a number or an inclusive
/// range `start:stop:step` (`1:100:1` is 1, 2, …, 100; `0:0.5:0.05` is the 11
/// values 0, 0.05, …, 0.5). Range values are `start + i·step` rounded to the
/// decimals written in `start` and `step`, so `0:0.5:0.05` yields exactly the
/// literal `0.15`, not `0.15000000000000002`.
pub fn parse_list(s: &str) -> Result<Vec<f64>> {
    let bad = |msg: String| Error::invalid(format!("grid list '{s}': {msg}"));
    let mut values = Vec::new();
    for item in s.split(',').map(str::trim) {
        if item.is_empty() {
            return Err(bad("empty item".into()));
        }
        let parts: Vec<&str> = item.split(':').map(str::trim).collect();
        let num = |p: &str| -> Result<f64> {
            match p.parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(v),
                _ => Err(bad(format!("'{p}' is not a finite number"))),
            }
        };
        match parts.as_slice() {
            [v] => values.push(num(v)?),
            [start_s, stop_s, step_s] => {
                let (start, stop, step) = (num(start_s)?, num(stop_s)?, num(step_s)?);
                if step <= 0.0 {
                    return Err(bad(format!("step must be > 0 in '{item}'")));
                }
                if stop < start {
                    return Err(bad(format!("empty range '{item}' (stop < start)")));
                }
                let span = (stop - start) / step;
                // Tolerate the rounding in (stop − start)/step, e.g. 0.5/0.05.
                let count = (span + 1e-9 * span.max(1.0)).floor() + 1.0;
                if count > (MAX_LIST_LEN - values.len()) as f64 {
                    return Err(bad(format!("'{item}' has more than {MAX_LIST_LEN} values")));
                }
                let decimals = decimals_of(start_s).max(decimals_of(step_s));
                for i in 0..count as usize {
                    values.push(round_decimals(start + i as f64 * step, decimals));
                }
            }
            _ => {
                return Err(bad(format!(
                    "'{item}' is neither a number nor start:stop:step"
                )))
            }
        }
    }
    Ok(values)
}

/// Digits after the decimal point that a numeric literal carries
/// (`0.05` → 2, `1e-5` → 5, `2.5e1` → 0).
fn decimals_of(literal: &str) -> usize {
    let lower = literal.to_ascii_lowercase();
    let (mantissa, exponent) = match lower.split_once('e') {
        Some((m, e)) => (m, e.parse::<i64>().unwrap_or(0)),
        None => (lower.as_str(), 0),
    };
    let frac = mantissa.split_once('.').map_or(0, |(_, f)| f.len()) as i64;
    (frac - exponent).clamp(0, 20) as usize
}

/// `v` rounded to `decimals` decimal places, as the nearest `f64` to the
/// decimal string (so 0.15000000000000002 becomes 0.15).
fn round_decimals(v: f64, decimals: usize) -> f64 {
    format!("{v:.decimals$}").parse().unwrap_or(v)
}

/// scikit-learn's `KFold(k)` without shuffling: `k` contiguous index ranges
/// over `0..n`, the first `n % k` one longer. An error if `k < 2` or `n < k`.
pub fn kfold(n: usize, k: usize) -> Result<Vec<std::ops::Range<usize>>> {
    if k < 2 {
        return Err(Error::invalid(format!(
            "KFold: need at least 2 folds, got {k}"
        )));
    }
    if n < k {
        return Err(Error::invalid(format!(
            "KFold: cannot split {n} samples into {k} folds"
        )));
    }
    let mut start = 0;
    Ok((0..k)
        .map(|f| {
            let len = n / k + usize::from(f < n % k);
            let range = start..start + len;
            start += len;
            range
        })
        .collect())
}

/// scikit-learn's `r2_score` for one output: `1 − SS_res/SS_tot`, with its
/// conventions: a perfect prediction scores 1 (also of a constant target),
/// an imperfect prediction of a constant target scores 0, and fewer than
/// two samples give NaN. Panics if the lengths differ.
pub fn r2_score(y_true: &[f64], y_pred: &[f64]) -> f64 {
    assert_eq!(y_true.len(), y_pred.len(), "r2_score: length mismatch");
    let n = y_true.len();
    if n < 2 {
        return f64::NAN;
    }
    let mean = y_true.iter().sum::<f64>() / n as f64;
    let ss_res: f64 = y_true
        .iter()
        .zip(y_pred)
        .map(|(t, p)| (t - p) * (t - p))
        .sum();
    let ss_tot: f64 = y_true.iter().map(|t| (t - mean) * (t - mean)).sum();
    if ss_res == 0.0 {
        1.0
    } else if ss_tot == 0.0 {
        0.0
    } else {
        1.0 - ss_res / ss_tot
    }
}

/// The grid search's result for one gene.
#[derive(Debug, Clone, PartialEq)]
pub struct GridResult {
    /// Gene (expression column) name.
    pub gene: String,
    /// Best C.
    pub c: f64,
    /// Best ε.
    pub epsilon: f64,
    /// Mean cross-validated R² of the best setting.
    pub cv_score: f64,
    /// Mean cross-validated R² of every setting, in grid order.
    pub mean_scores: Vec<f64>,
    /// Weights of the refit on all samples.
    pub w: Vec<f64>,
    /// Intercept of the refit.
    pub b: f64,
    /// Whether the refit converged within the iteration cap.
    pub converged: bool,
}

/// A gene left out of the search, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct SkippedGene {
    /// Gene name.
    pub gene: String,
    /// Human-readable reason.
    pub reason: String,
}

/// Work counters of a grid search.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GridStats {
    /// Problems the search stands for: genes × settings × folds + refits.
    pub problems: usize,
    /// SMO runs actually performed (fewer where results were shared).
    pub smo_solves: usize,
    /// Problems whose SMO stopped at the iteration cap.
    pub unconverged: usize,
}

/// Everything a grid search produced.
#[derive(Debug, Clone, PartialEq)]
pub struct GridOutcome {
    /// One result per fitted gene, in expression-column order.
    pub results: Vec<GridResult>,
    /// Genes that were not fitted.
    pub skipped: Vec<SkippedGene>,
    /// Work counters.
    pub stats: GridStats,
}

/// What both grid searches (CPU and device) start from: the validated
/// spec's samples, the feature rows in the expression table's order, and the
/// genes split into fitted ones and constant ones (skipped: R² is undefined).
pub(crate) struct GridInputs {
    /// Samples.
    pub n: usize,
    /// Features `[n, d]` in the expression table's row order.
    pub x: Table,
    /// Feature columns.
    pub d: usize,
    /// (gene, expression over the samples) of the genes to fit.
    pub genes: Vec<(String, Vec<f64>)>,
    /// The constant genes, with the reason.
    pub skipped: Vec<SkippedGene>,
}

impl GridInputs {
    /// Validates `spec` against the samples and splits the genes.
    pub(crate) fn prepare(features: &Table, expression: &Table, spec: &GridSpec) -> Result<Self> {
        spec.validate()?;
        let n = expression.n_rows();
        if n < 2 * spec.folds {
            return Err(Error::invalid(format!(
                "grid search: {n} samples cannot be split into {} folds of at least 2 samples each",
                spec.folds
            )));
        }
        let x = features.select_rows(&expression.row_names)?;
        let d = x.n_cols();
        let mut genes = Vec::new();
        let mut skipped = Vec::new();
        for (g, name) in expression.col_names.iter().enumerate() {
            let y = expression.column(g);
            if y.iter().all(|&v| v == y[0]) {
                skipped.push(SkippedGene {
                    gene: name.clone(),
                    reason: format!(
                        "expression is {} in all {n} samples: R² is undefined, gene not fitted",
                        y[0]
                    ),
                });
            } else {
                genes.push((name.clone(), y));
            }
        }
        Ok(GridInputs {
            n,
            x,
            d,
            genes,
            skipped,
        })
    }
}

/// Runs the grid search for every gene (column) of `expression`.
///
/// Samples are the rows of `expression`, in its order (which defines the
/// folds); their features are looked up by name in `features` (an error
/// names a missing sample; feature rows of other samples are ignored).
/// Every held-out fold must have at least 2 samples (R² is undefined on
/// one), so at least `2·folds` samples are required.
pub fn grid_search(features: &Table, expression: &Table, spec: &GridSpec) -> Result<GridOutcome> {
    let GridInputs {
        n,
        x,
        d,
        genes,
        skipped,
    } = GridInputs::prepare(features, expression, spec)?;

    let folds: Vec<Fold> = kfold(n, spec.folds)?
        .into_par_iter()
        .map(|test| Fold::new(&x.data, d, n, test))
        .collect();

    // One chain per (gene, fold, ε); C ascending inside a chain.
    let (n_c, n_eps, n_folds) = (spec.c.len(), spec.epsilon.len(), folds.len());
    let mut c_order: Vec<usize> = (0..n_c).collect();
    c_order.sort_by(|&a, &b| spec.c[a].total_cmp(&spec.c[b]));
    let chains: Vec<ChainScores> = (0..genes.len() * n_folds * n_eps)
        .into_par_iter()
        .map_init(ChainScratch::default, |scratch, chain| {
            let (g, rest) = (chain / (n_folds * n_eps), chain % (n_folds * n_eps));
            let (fold, e) = (&folds[rest / n_eps], rest % n_eps);
            fold.score_chain(&genes[g].1, spec, &c_order, spec.epsilon[e], scratch)
        })
        .collect();

    let mut stats = GridStats {
        problems: genes.len() * (spec.n_settings() * n_folds + 1),
        ..GridStats::default()
    };
    for chain in &chains {
        stats.smo_solves += chain.solves;
        stats.unconverged += chain.unconverged;
    }

    let all_rows: Vec<usize> = (0..n).collect();
    let full_gram = linear_gram(&x.data, d, &all_rows);
    let results: Vec<GridResult> = genes
        .par_iter()
        .enumerate()
        .map_init(ChainScratch::default, |scratch, (g, (name, y))| {
            let mean_scores: Vec<f64> = (0..spec.n_settings())
                .map(|s| {
                    let (ci, e) = (s / n_eps, s % n_eps);
                    let sum: f64 = (0..n_folds)
                        .map(|f| chains[(g * n_folds + f) * n_eps + e].scores[ci])
                        .sum();
                    sum / n_folds as f64
                })
                .collect();
            let best = best_index(&mean_scores);
            let (c, epsilon) = spec.setting(best);
            scratch.beta.resize(n, 0.0);
            let out = smo::solve(
                &full_gram,
                n,
                y,
                c,
                epsilon,
                spec.tol,
                smo::default_max_iter(n),
                &mut scratch.ws,
                &mut scratch.beta,
            );
            GridResult {
                gene: name.clone(),
                c,
                epsilon,
                cv_score: mean_scores[best],
                mean_scores,
                w: primal_weights(&x.data, d, &all_rows, &scratch.beta),
                b: out.b,
                converged: out.converged,
            }
        })
        .collect();
    stats.smo_solves += results.len();
    stats.unconverged += results.iter().filter(|r| !r.converged).count();
    Ok(GridOutcome {
        results,
        skipped,
        stats,
    })
}

/// True when `v` is the smallest or largest of at least two grid values:
/// the best setting may then lie outside the grid. ε = 0 at the lower edge
/// is a natural bound, not an edge.
pub fn on_grid_edge(values: &[f64], v: f64) -> bool {
    if values.len() < 2 {
        return false;
    }
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (v == lo && lo > 0.0) || v == hi
}

/// The grid-edge warnings for chosen (gene, C, ε): one line per
/// hyper-parameter whose chosen value sits on the grid's edge
/// ([`on_grid_edge`]) for some gene, naming up to three such genes. Empty
/// when nothing is on an edge.
pub fn grid_edge_warnings(spec: &GridSpec, chosen: &[(&str, f64, f64)]) -> Vec<String> {
    let mut out = Vec::new();
    for (what, values, index) in [("C", &spec.c, 0), ("epsilon", &spec.epsilon, 1)] {
        let on_edge: Vec<&str> = chosen
            .iter()
            .filter(|r| on_grid_edge(values, if index == 0 { r.1 } else { r.2 }))
            .map(|r| r.0)
            .collect();
        if !on_edge.is_empty() {
            out.push(format!(
                "the chosen {what} sits on the edge of the grid ({} … {}) for {} of {} genes (e.g. {}); the best value may lie outside it — widen the grid",
                values.iter().copied().fold(f64::INFINITY, f64::min),
                values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                on_edge.len(),
                chosen.len(),
                on_edge[..on_edge.len().min(3)].join(", ")
            ));
        }
    }
    out
}

/// scikit-learn's choice: the highest mean score, the first on an exact tie;
/// NaN scores rank below every number (index 0 if all are NaN).
pub(crate) fn best_index(scores: &[f64]) -> usize {
    let mut best = 0;
    for (s, &v) in scores.iter().enumerate().skip(1) {
        if v > scores[best] || (scores[best].is_nan() && !v.is_nan()) {
            best = s;
        }
    }
    best
}

/// One fold's rows and the kernel values every problem on it needs.
pub(crate) struct Fold {
    pub(crate) train: Vec<usize>,
    pub(crate) test: Vec<usize>,
    /// Training Gram matrix, `train × train`.
    pub(crate) gram: Vec<f64>,
    /// `test × train`: predictions are `Σ β_m K(x_m, x)` + b as in libsvm.
    pub(crate) cross: Vec<f64>,
}

#[derive(Default)]
struct ChainScratch {
    ws: smo::Workspace,
    beta: Vec<f64>,
    y_train: Vec<f64>,
    pred: Vec<f64>,
    y_test: Vec<f64>,
}

/// Held-out R² per C (in spec order) of one (gene, fold, ε).
struct ChainScores {
    scores: Vec<f64>,
    solves: usize,
    unconverged: usize,
}

impl Fold {
    pub(crate) fn new(x: &[f64], d: usize, n: usize, test: std::ops::Range<usize>) -> Fold {
        let train: Vec<usize> = (0..n).filter(|r| !test.contains(r)).collect();
        let test: Vec<usize> = test.collect();
        Fold {
            gram: linear_gram(x, d, &train),
            cross: cross_gram(x, d, &test, &train),
            train,
            test,
        }
    }

    fn score_chain(
        &self,
        y: &[f64],
        spec: &GridSpec,
        c_order: &[usize],
        epsilon: f64,
        s: &mut ChainScratch,
    ) -> ChainScores {
        let l = self.train.len();
        s.y_train.clear();
        s.y_train.extend(self.train.iter().map(|&r| y[r]));
        s.y_test.clear();
        s.y_test.extend(self.test.iter().map(|&r| y[r]));
        s.beta.resize(l, 0.0);
        let mut scores = vec![f64::NAN; spec.c.len()];
        let (mut solves, mut unconverged) = (0, 0);
        // (score, converged) of a solve that every larger C repeats exactly.
        let mut shared: Option<(f64, bool)> = None;
        for &ci in c_order {
            let (score, converged) = match shared {
                Some(hit) => hit,
                None => {
                    let out = smo::solve(
                        &self.gram,
                        l,
                        &s.y_train,
                        spec.c[ci],
                        epsilon,
                        spec.tol,
                        smo::default_max_iter(l),
                        &mut s.ws,
                        &mut s.beta,
                    );
                    solves += 1;
                    s.pred.clear();
                    s.pred.extend(self.cross.chunks_exact(l).map(|k| {
                        k.iter().zip(&s.beta).map(|(kv, bv)| kv * bv).sum::<f64>() + out.b
                    }));
                    let result = (r2_score(&s.y_test, &s.pred), out.converged);
                    if !out.c_bound_active {
                        shared = Some(result);
                    }
                    result
                }
            };
            scores[ci] = score;
            unconverged += usize::from(!converged);
        }
        ChainScores {
            scores,
            solves,
            unconverged,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists() {
        assert_eq!(parse_list("1:5:1").unwrap(), [1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(parse_list("1:100:1").unwrap().len(), 100);
        let e = parse_list("0:0.5:0.05").unwrap();
        assert_eq!(e.len(), 11);
        assert_eq!(e[3], 0.15);
        assert_eq!(e[10], 0.5);
        assert_eq!(e, GridSpec::paper().epsilon);
        assert_eq!(parse_list(" 1, 2.5 ,1e-5").unwrap(), [1.0, 2.5, 1e-5]);
        assert_eq!(parse_list("1e-5:3e-5:1e-5").unwrap(), [1e-5, 2e-5, 3e-5]);
        assert_eq!(parse_list("0.1:0.3:0.1").unwrap(), [0.1, 0.2, 0.3]);
        assert_eq!(parse_list("2:2:1").unwrap(), [2.0]);
        for bad in [
            "",
            "1,,2",
            "0:1:0",
            "0:1:-1",
            "1:0:1",
            "a",
            "1:2",
            "0:nan:1",
            "0:1e9:1e-3",
        ] {
            assert!(parse_list(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn kfold_matches_sklearn() {
        let f = kfold(29, 3).unwrap();
        assert_eq!(f, [0..10, 10..20, 20..29]);
        assert_eq!(kfold(10, 4).unwrap(), [0..3, 3..6, 6..8, 8..10]);
        assert!(kfold(2, 3).is_err());
        assert!(kfold(5, 1).is_err());
    }

    #[test]
    fn r2_conventions() {
        assert_eq!(r2_score(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]), 1.0);
        assert_eq!(r2_score(&[2.0, 2.0], &[2.0, 2.0]), 1.0);
        assert_eq!(r2_score(&[2.0, 2.0], &[2.0, 2.1]), 0.0);
        assert!(r2_score(&[2.0], &[2.0]).is_nan());
        // 1 − 2/2 with SS_res = 1 + 1, SS_tot = 1 + 1.
        assert_eq!(r2_score(&[1.0, 3.0], &[2.0, 2.0]), 0.0);
        assert!((r2_score(&[1.0, 2.0, 3.0], &[1.5, 2.0, 2.5]) - 0.75).abs() < 1e-15);
    }

    #[test]
    fn grid_edges() {
        assert!(on_grid_edge(&[1.0, 2.0, 3.0], 1.0));
        assert!(on_grid_edge(&[1.0, 2.0, 3.0], 3.0));
        assert!(!on_grid_edge(&[1.0, 2.0, 3.0], 2.0));
        assert!(!on_grid_edge(&[0.0, 0.1], 0.0));
        assert!(!on_grid_edge(&[1.0], 1.0));
        let spec = GridSpec::new(vec![1.0, 2.0], vec![0.0, 0.1, 0.2]).unwrap();
        let w = grid_edge_warnings(&spec, &[("A", 1.0, 0.1), ("B", 1.5, 0.0)]);
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("chosen C") && w[0].contains("1 of 2 genes (e.g. A)"),
            "{w:?}"
        );
        assert!(grid_edge_warnings(&spec, &[("A", 1.5, 0.0)]).is_empty());
    }

    #[test]
    fn best_is_first_of_exact_ties() {
        assert_eq!(best_index(&[0.1, 0.3, 0.3, 0.2]), 1);
        assert_eq!(best_index(&[f64::NAN, 0.1, f64::NAN]), 1);
        assert_eq!(best_index(&[f64::NAN, f64::NAN]), 0);
    }

    #[test]
    fn spec_validation() {
        assert!(GridSpec::new(vec![0.0], vec![0.1]).is_err());
        assert!(GridSpec::new(vec![1.0], vec![-0.1]).is_err());
        assert!(GridSpec::new(vec![], vec![0.1]).is_err());
        let spec = GridSpec::paper();
        assert_eq!(spec.n_settings(), 1100);
        assert_eq!(spec.setting(12), (2.0, 0.05));
        assert!(spec.validate().is_ok());
    }
}
