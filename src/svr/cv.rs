//! Cross-validated predictions: scikit-learn's `cross_val_predict` of a
//! linear SVR per gene, plain or nested.
//!
//! - One (C, ε): each outer fold fits `SVR(kernel="linear", C, epsilon)` on
//!   the other folds and predicts its held-out samples.
//! - Several settings: nested, as `cross_val_predict(GridSearchCV(SVR,
//!   grid, cv=KFold(inner)), cv=outer)`: [`super::grid_search`] runs on each
//!   outer training set (its samples in input order, so the inner folds are
//!   contiguous blocks of it), picks (C, ε) per gene, refits on the outer
//!   training set and predicts the held-out fold.
//!
//! Outer folds ([`Folds`]) are lists of held-out sample indices:
//! - [`kfold_folds`]: scikit-learn's `KFold(k)`, contiguous, unshuffled;
//! - [`shuffled_kfold_folds`]: a seeded Fisher–Yates permutation
//!   ([`crate::rng::SplitMix64`]), then contiguous `KFold(k)` blocks of the
//!   permuted order. Deterministic for a seed, but not scikit-learn's
//!   `KFold(shuffle=True, random_state)` (NumPy's generator cannot be
//!   reproduced across languages);
//! - [`group_kfold_folds`]: scikit-learn's `GroupKFold(k)` (no shuffling);
//! - [`leave_one_group_out_folds`]: scikit-learn's `LeaveOneGroupOut`.

use super::device::{fit_batch_on, grid_search_on};
use super::grid::{kfold, GridSpec, SkippedGene};
use super::{LinearSvr, SvrParams, SvrProblem};
use crate::backend::Backend;
use crate::rng::SplitMix64;
use crate::table::Table;
use crate::{Error, Result};

/// Outer folds: the held-out sample indices of each fold, ascending.
pub type Folds = Vec<Vec<usize>>;

/// `KFold(k)` without shuffling: contiguous blocks, the first `n % k` one
/// longer ([`kfold`]).
pub fn kfold_folds(n: usize, k: usize) -> Result<Folds> {
    Ok(kfold(n, k)?.into_iter().map(Iterator::collect).collect())
}

/// A seeded permutation of `0..n` (Fisher–Yates from the last position
/// down, `j = below(i + 1)` of [`SplitMix64::new`]`(seed)`), cut into the
/// contiguous blocks of `KFold(k)`; each fold's indices sorted.
pub fn shuffled_kfold_folds(n: usize, k: usize, seed: u64) -> Result<Folds> {
    let blocks = kfold(n, k)?;
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(seed);
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        order.swap(i, j);
    }
    Ok(blocks
        .into_iter()
        .map(|b| {
            let mut fold = order[b].to_vec();
            fold.sort_unstable();
            fold
        })
        .collect())
}

/// The distinct group labels, sorted (as `np.unique`), and each sample's
/// index into them.
fn unique_groups<S: AsRef<str>>(groups: &[S]) -> (Vec<&str>, Vec<usize>) {
    let mut labels: Vec<&str> = groups.iter().map(AsRef::as_ref).collect();
    labels.sort_unstable();
    labels.dedup();
    let index = groups
        .iter()
        .map(|g| labels.binary_search(&g.as_ref()).unwrap_or(0))
        .collect();
    (labels, index)
}

/// scikit-learn's `GroupKFold(k)` (`shuffle=False`): groups (labels sorted
/// as text) by size, largest first, each added to the fold with the fewest
/// samples so far (the first such fold on a tie). Groups of equal size are
/// taken in reverse label order, as scikit-learn's
/// `np.argsort(sizes, kind="stable")[::-1]`. No group is in two folds.
pub fn group_kfold_folds<S: AsRef<str>>(groups: &[S], k: usize) -> Result<Folds> {
    if k < 2 {
        return Err(Error::invalid(format!(
            "GroupKFold: need at least 2 folds, got {k}"
        )));
    }
    let (labels, index) = unique_groups(groups);
    if labels.len() < k {
        return Err(Error::invalid(format!(
            "GroupKFold: {k} folds need at least {k} groups, got {}",
            labels.len()
        )));
    }
    let mut size = vec![0usize; labels.len()];
    for &g in &index {
        size[g] += 1;
    }
    let mut order: Vec<usize> = (0..labels.len()).collect();
    order.sort_by(|&a, &b| size[b].cmp(&size[a]).then(b.cmp(&a)));
    let mut fold_size = vec![0usize; k];
    let mut fold_of = vec![0usize; labels.len()];
    for g in order {
        let lightest = (0..k).min_by_key(|&f| (fold_size[f], f)).unwrap_or(0);
        fold_size[lightest] += size[g];
        fold_of[g] = lightest;
    }
    Ok((0..k)
        .map(|f| {
            (0..groups.len())
                .filter(|&i| fold_of[index[i]] == f)
                .collect()
        })
        .collect())
}

/// scikit-learn's `LeaveOneGroupOut`: one fold per group, groups in label
/// order (sorted as text). At least 2 groups.
pub fn leave_one_group_out_folds<S: AsRef<str>>(groups: &[S]) -> Result<Folds> {
    let (labels, index) = unique_groups(groups);
    if labels.len() < 2 {
        return Err(Error::invalid(format!(
            "LeaveOneGroupOut: need at least 2 groups, got {}",
            labels.len()
        )));
    }
    Ok((0..labels.len())
        .map(|g| (0..groups.len()).filter(|&i| index[i] == g).collect())
        .collect())
}

/// Checks that `folds` partition `0..n` with every fold and every training
/// set non-empty.
pub fn check_folds(folds: &[Vec<usize>], n: usize) -> Result<()> {
    if folds.len() < 2 {
        return Err(Error::invalid(format!(
            "cross-validation: need at least 2 folds, got {}",
            folds.len()
        )));
    }
    let mut seen = vec![false; n];
    for (f, fold) in folds.iter().enumerate() {
        if fold.is_empty() || fold.len() == n {
            return Err(Error::invalid(format!(
                "cross-validation: fold {f} holds out {} of {n} samples; each fold needs held-out and training samples",
                fold.len()
            )));
        }
        for &i in fold {
            if i >= n || seen[i] {
                return Err(Error::invalid(format!(
                    "cross-validation: sample index {i} is out of range or in two folds"
                )));
            }
            seen[i] = true;
        }
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(Error::invalid(format!(
            "cross-validation: sample index {i} is in no fold"
        )));
    }
    Ok(())
}

/// One gene's cross-validated predictions.
#[derive(Debug, Clone, PartialEq)]
pub struct CvGene {
    /// Gene (expression column) name.
    pub gene: String,
    /// Out-of-fold prediction of every sample, in sample order.
    pub predicted: Vec<f64>,
    /// Measured expression, in sample order.
    pub measured: Vec<f64>,
    /// (C, ε) used in each outer fold (the inner search's choice when nested).
    pub chosen: Vec<(f64, f64)>,
}

/// What [`cross_validate_on`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct CvOutcome {
    /// Samples, in the expression table's order.
    pub samples: Vec<String>,
    /// The predicted genes, in expression-column order.
    pub genes: Vec<CvGene>,
    /// Genes not predicted, and why.
    pub skipped: Vec<SkippedGene>,
    /// Whether a grid search ran inside each outer fold.
    pub nested: bool,
    /// Outer folds used.
    pub folds: Folds,
    /// SMO runs (outer fits, or inner searches and refits) that stopped at
    /// the iteration cap.
    pub unconverged: usize,
}

impl CvOutcome {
    /// The out-of-fold predictions as a table (samples × predicted genes).
    pub fn predictions(&self) -> Result<Table> {
        let n = self.samples.len();
        let mut data = Vec::with_capacity(n * self.genes.len());
        for i in 0..n {
            data.extend(self.genes.iter().map(|g| g.predicted[i]));
        }
        Table::new(
            self.samples.clone(),
            self.genes.iter().map(|g| g.gene.clone()).collect(),
            data,
        )
    }
}

/// Cross-validated predictions of every gene (column) of `expression` from
/// `features` (rows looked up by sample name, in the expression table's
/// order), over the outer `folds` (indices into the expression rows). With
/// one setting in `grid` each fold fits that setting; with more, the grid
/// search (`grid.folds` inner folds, contiguous) runs inside each outer
/// training set. Genes constant over all samples are skipped (R² is
/// undefined), as are, when nested, genes constant in an outer training set
/// (the inner search cannot score them). `on_fold` is called after each
/// outer fold of a nested run.
pub fn cross_validate_on(
    be: &Backend,
    features: &Table,
    expression: &Table,
    folds: &[Vec<usize>],
    grid: &GridSpec,
    on_fold: &mut dyn FnMut(),
) -> Result<CvOutcome> {
    grid.validate()?;
    let n = expression.n_rows();
    check_folds(folds, n)?;
    let x = features.select_rows(&expression.row_names)?;
    let d = x.n_cols();
    let mut skipped = Vec::new();
    let mut genes: Vec<CvGene> = Vec::new();
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
            genes.push(CvGene {
                gene: name.clone(),
                predicted: vec![f64::NAN; n],
                measured: y,
                chosen: Vec::with_capacity(folds.len()),
            });
        }
    }
    let trains: Vec<Vec<usize>> = folds
        .iter()
        .map(|test| {
            let mut held = vec![false; n];
            test.iter().for_each(|&i| held[i] = true);
            (0..n).filter(|&i| !held[i]).collect()
        })
        .collect();
    let nested = grid.n_settings() > 1;
    let mut unconverged = 0;
    if !nested {
        let params = SvrParams {
            c: grid.c[0],
            epsilon: grid.epsilon[0],
            tol: grid.tol,
        };
        let problems: Vec<SvrProblem> = trains
            .iter()
            .flat_map(|train| {
                genes.iter().map(move |g| SvrProblem {
                    train_rows: train.clone(),
                    y: train.iter().map(|&r| g.measured[r]).collect(),
                    params,
                })
            })
            .collect();
        let fits = fit_batch_on(be, &x.data, d, &problems)?;
        let n_genes = genes.len();
        for (f, test) in folds.iter().enumerate() {
            for (gi, gene) in genes.iter_mut().enumerate() {
                let fit = &fits[f * n_genes + gi];
                unconverged += usize::from(!fit.converged);
                for &i in test {
                    gene.predicted[i] = fit.model.decision(x.row(i))?;
                }
                gene.chosen.push((params.c, params.epsilon));
            }
            on_fold();
        }
    } else {
        let mut dropped: Vec<(usize, String)> = Vec::new();
        let index: std::collections::HashMap<String, usize> = genes
            .iter()
            .enumerate()
            .map(|(i, g)| (g.gene.clone(), i))
            .collect();
        for (f, (test, train)) in folds.iter().zip(&trains).enumerate() {
            let names: Vec<&str> = train
                .iter()
                .map(|&i| expression.row_names[i].as_str())
                .collect();
            let fitted: Vec<&str> = genes.iter().map(|g| g.gene.as_str()).collect();
            let sub_x = x.select_rows(&names)?;
            let sub_y = expression.select_rows(&names)?.select_cols(&fitted)?;
            let outcome = grid_search_on(be, &sub_x, &sub_y, grid).map_err(|e| {
                Error::invalid(format!(
                    "outer fold {} of {} ({} training samples): {e}",
                    f + 1,
                    folds.len(),
                    train.len()
                ))
            })?;
            unconverged += outcome.stats.unconverged;
            for sk in &outcome.skipped {
                if let Some(&gi) = index.get(&sk.gene) {
                    if !dropped.iter().any(|(d, _)| *d == gi) {
                        dropped.push((
                            gi,
                            format!(
                                "constant in the training samples of outer fold {}: the inner search cannot score it",
                                f + 1
                            ),
                        ));
                    }
                }
            }
            for r in &outcome.results {
                let Some(gene) = index.get(&r.gene).map(|&gi| &mut genes[gi]) else {
                    continue;
                };
                let model = LinearSvr {
                    w: r.w.clone(),
                    b: r.b,
                };
                for &i in test {
                    gene.predicted[i] = model.decision(x.row(i))?;
                }
                gene.chosen.push((r.c, r.epsilon));
            }
            on_fold();
        }
        dropped.sort_by_key(|(gi, _)| std::cmp::Reverse(*gi));
        for (gi, reason) in dropped {
            let gene = genes.remove(gi);
            skipped.push(SkippedGene {
                gene: gene.gene,
                reason,
            });
        }
    }
    Ok(CvOutcome {
        samples: expression.row_names.clone(),
        genes,
        skipped,
        nested,
        folds: folds.to_vec(),
        unconverged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kfold_folds_are_contiguous() {
        assert_eq!(
            kfold_folds(7, 3).unwrap(),
            vec![vec![0, 1, 2], vec![3, 4], vec![5, 6]]
        );
    }

    #[test]
    fn shuffled_folds_partition_and_depend_on_the_seed() {
        let a = shuffled_kfold_folds(23, 4, 7).unwrap();
        check_folds(&a, 23).unwrap();
        let sizes: Vec<usize> = a.iter().map(Vec::len).collect();
        assert_eq!(sizes, [6, 6, 6, 5]);
        assert_eq!(a, shuffled_kfold_folds(23, 4, 7).unwrap());
        assert_ne!(a, shuffled_kfold_folds(23, 4, 8).unwrap());
        assert_ne!(a, kfold_folds(23, 4).unwrap());
    }

    #[test]
    fn group_kfold_balances_largest_first() {
        // Sizes a 1, b 4, c 2, d 3: b to fold 0, d to fold 1, c to the
        // lighter fold 1 (3 < 4), then a to fold 0 (4 < 5).
        let g = ["b", "a", "d", "b", "c", "d", "b", "c", "d", "b"];
        let folds = group_kfold_folds(&g, 2).unwrap();
        check_folds(&folds, g.len()).unwrap();
        assert_eq!(folds[0], [0, 1, 3, 6, 9]);
        assert_eq!(folds[1], [2, 4, 5, 7, 8]);
        assert!(group_kfold_folds(&g, 5).is_err());
    }

    #[test]
    fn leave_one_group_out_in_label_order() {
        let g = ["y", "x", "y", "z"];
        let folds = leave_one_group_out_folds(&g).unwrap();
        assert_eq!(folds, vec![vec![1], vec![0, 2], vec![3]]);
        assert!(leave_one_group_out_folds(&["x", "x"]).is_err());
    }

    #[test]
    fn fold_checks() {
        assert!(check_folds(&[vec![0], vec![1, 2]], 3).is_ok());
        assert!(check_folds(&[vec![0], vec![0, 1, 2]], 3).is_err());
        assert!(check_folds(&[vec![0], vec![2]], 3).is_err());
        assert!(check_folds(&[vec![0, 1, 2]], 3).is_err());
        assert!(check_folds(&[vec![0], vec![], vec![1, 2]], 3).is_err());
    }
}
