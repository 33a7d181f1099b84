//! scikit-learn's `StratifiedKFold(k)` without shuffling
//! (`_make_test_folds` of scikit-learn 1.9).
//!
//! Classes are numbered by first appearance; the per-fold count of each
//! class is that of a round robin over the labels sorted by that number
//! (fold f gets every k-th sample starting at f); then each class's
//! samples, in input order, go to fold 0 until its count is reached, then
//! fold 1, and so on.

use crate::svr::cv::Folds;
use crate::{Error, Result};

/// The held-out indices of each of the `k` folds, ascending, for labels
/// `y` (any values; equal values are one class).
///
/// # Errors
/// `k < 2`, more folds than samples, or a class with fewer than `k`
/// members (scikit-learn only warns when some class has fewer members than
/// folds; then a fold would hold none of that class, so cellmorph refuses).
pub fn stratified_kfold<T: PartialEq>(y: &[T], k: usize) -> Result<Folds> {
    if k < 2 {
        return Err(Error::invalid(format!(
            "StratifiedKFold: need at least 2 folds, got {k}"
        )));
    }
    if y.len() < k {
        return Err(Error::invalid(format!(
            "StratifiedKFold: cannot split {} samples into {k} folds",
            y.len()
        )));
    }
    // Class numbers by first appearance.
    let mut firsts: Vec<&T> = Vec::new();
    let encoded: Vec<usize> = y
        .iter()
        .map(|v| match firsts.iter().position(|f| *f == v) {
            Some(c) => c,
            None => {
                firsts.push(v);
                firsts.len() - 1
            }
        })
        .collect();
    let n_classes = firsts.len();
    let mut counts = vec![0usize; n_classes];
    for &c in &encoded {
        counts[c] += 1;
    }
    if let Some(c) = counts.iter().position(|&n| n < k) {
        return Err(Error::invalid(format!(
            "StratifiedKFold: class number {} (by first appearance, first at sample {}) has {} member(s), fewer than the {k} folds",
            c + 1,
            encoded.iter().position(|&e| e == c).unwrap_or(0),
            counts[c]
        )));
    }
    // allocation[f][c]: members of class c among sorted[f], sorted[f + k], ….
    let mut sorted = encoded.clone();
    sorted.sort_unstable();
    let mut allocation = vec![vec![0usize; n_classes]; k];
    for (i, &c) in sorted.iter().enumerate() {
        allocation[i % k][c] += 1;
    }
    let mut folds: Folds = vec![Vec::new(); k];
    let mut fold_of_class = vec![0usize; n_classes];
    let mut used = vec![0usize; n_classes];
    for (i, &c) in encoded.iter().enumerate() {
        while used[c] == allocation[fold_of_class[c]][c] {
            fold_of_class[c] += 1;
            used[c] = 0;
        }
        folds[fold_of_class[c]].push(i);
        used[c] += 1;
    }
    Ok(folds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_follow_sklearn_round_robin_allocation() {
        // sorted encoded = [0,0,0,0,0,1,1,1] → fold 0: 0,0,1 (i = 0,3,6);
        // fold 1: 0,0,1 (1,4,7); fold 2: 0,1 (2,5).
        let y = ["b", "a", "b", "b", "a", "b", "a", "b"];
        let f = stratified_kfold(&y, 3).unwrap();
        assert_eq!(f, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7]]);
        assert!(stratified_kfold(&y, 4).is_err());
        assert!(stratified_kfold(&y, 1).is_err());
    }
}
