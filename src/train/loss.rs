//! Losses, forward and backward, with PyTorch's `reduction="mean"` semantics
//! (`docs/MODELS.md` §4).
//!
//! Every loss takes flat row-major slices and returns a scalar `f32`; its
//! `*_backward` returns the gradient with respect to the input for an
//! upstream scalar gradient `dy` (`dy = 1` for a loss that is the whole
//! objective, `0.25` for a weighted term, …).
//!
//! # Arithmetic and reduction order
//!
//! Each element's term and each element's gradient is computed in `f64` from
//! the `f32` inputs and rounded to `f32` once. Reductions are a plain
//! sequential `f64` sum in index order (row-major, element 0 first), divided
//! at the end; there is no pairwise tree, no threading and no SIMD
//! reassociation, so the same inputs always give the same bits. The `f64`
//! accumulation makes the result agree with PyTorch's `f32` (pairwise or
//! vectorised) sums to within a few `f32` ulps.
//!
//! Bad input (mismatched lengths, no elements, a class index out of range, a
//! zero total class weight) is an [`Error`], never a panic.

use crate::{Error, Result};

fn check_pair(op: &'static str, x: &[f32], target: &[f32]) -> Result<()> {
    if x.len() != target.len() {
        return Err(Error::shape(
            op,
            format!(
                "input has {} elements but target has {}",
                x.len(),
                target.len()
            ),
        ));
    }
    if x.is_empty() {
        return Err(Error::shape(op, "the mean over zero elements is undefined"));
    }
    Ok(())
}

/// Sequential `f64` sum of `term(i)` for `i` in `0..n`, in index order.
fn sum_in_order(n: usize, mut term: impl FnMut(usize) -> f64) -> f64 {
    let mut acc = 0.0f64;
    for i in 0..n {
        acc += term(i);
    }
    acc
}

/// Mean squared error, `mean((x − t)²)` over all `n` elements
/// (`torch.nn.functional.mse_loss`).
pub fn mse(x: &[f32], target: &[f32]) -> Result<f32> {
    check_pair("mse", x, target)?;
    let s = sum_in_order(x.len(), |i| {
        let d = x[i] as f64 - target[i] as f64;
        d * d
    });
    Ok((s / x.len() as f64) as f32)
}

/// Gradient of [`mse`] with respect to `x`: `dx_i = dy · 2 (x_i − t_i) / n`.
pub fn mse_backward(x: &[f32], target: &[f32], dy: f32) -> Result<Vec<f32>> {
    check_pair("mse_backward", x, target)?;
    let k = dy as f64 * 2.0 / x.len() as f64;
    Ok(x.iter()
        .zip(target)
        .map(|(&a, &t)| (k * (a as f64 - t as f64)) as f32)
        .collect())
}

/// Binary cross-entropy on logits
/// (`torch.nn.functional.binary_cross_entropy_with_logits`, no weights):
/// `mean(max(x, 0) − x·t + log(1 + exp(−|x|)))`, the numerically stable form
/// of `−[t·log σ(x) + (1 − t)·log(1 − σ(x))]`. Targets may be soft (in
/// `[0, 1]`).
pub fn bce_with_logits(x: &[f32], target: &[f32]) -> Result<f32> {
    check_pair("bce_with_logits", x, target)?;
    let s = sum_in_order(x.len(), |i| {
        let (a, t) = (x[i] as f64, target[i] as f64);
        a.max(0.0) - a * t + (-a.abs()).exp().ln_1p()
    });
    Ok((s / x.len() as f64) as f32)
}

/// Gradient of [`bce_with_logits`] with respect to the logits:
/// `dx_i = dy · (σ(x_i) − t_i) / n`, with `σ(x) = 1 / (1 + exp(−x))`
/// evaluated without overflow for either sign of `x`.
pub fn bce_with_logits_backward(x: &[f32], target: &[f32], dy: f32) -> Result<Vec<f32>> {
    check_pair("bce_with_logits_backward", x, target)?;
    let k = dy as f64 / x.len() as f64;
    Ok(x.iter()
        .zip(target)
        .map(|(&a, &t)| (k * (sigmoid(a as f64) - t as f64)) as f32)
        .collect())
}

fn sigmoid(a: f64) -> f64 {
    if a >= 0.0 {
        1.0 / (1.0 + (-a).exp())
    } else {
        let e = a.exp();
        e / (1.0 + e)
    }
}

/// Binary cross-entropy on probabilities (`torch.nn.functional.binary_cross_entropy`,
/// no weights): `mean(−[t·max(log p, −100) + (1 − t)·max(log(1 − p), −100)])`.
/// PyTorch clamps each log at −100 so that `p = 0` or `p = 1` gives a finite
/// loss; so does this. `p` must lie in `[0, 1]` (PyTorch's check too).
pub fn bce(p: &[f32], target: &[f32]) -> Result<f32> {
    check_pair("bce", p, target)?;
    check_probabilities("bce", p)?;
    let s = sum_in_order(p.len(), |i| {
        let (q, t) = (p[i] as f64, target[i] as f64);
        let log_p = q.ln().max(-100.0);
        let log_1mp = (1.0 - q).ln().max(-100.0);
        -(t * log_p + (1.0 - t) * log_1mp)
    });
    Ok((s / p.len() as f64) as f32)
}

/// Gradient of [`bce`] with respect to the probabilities, as PyTorch's
/// `binary_cross_entropy_backward` computes it:
/// `dp_i = dy · (p_i − t_i) / max(p_i (1 − p_i), 1e-12) / n`. (The clamp at
/// `1e-12` keeps the gradient finite at `p = 0` and `p = 1`, where the
/// clamped forward is flat.)
pub fn bce_backward(p: &[f32], target: &[f32], dy: f32) -> Result<Vec<f32>> {
    check_pair("bce_backward", p, target)?;
    check_probabilities("bce_backward", p)?;
    let k = dy as f64 / p.len() as f64;
    Ok(p.iter()
        .zip(target)
        .map(|(&q, &t)| {
            let q = q as f64;
            (k * (q - t as f64) / (q * (1.0 - q)).max(1e-12)) as f32
        })
        .collect())
}

fn check_probabilities(op: &'static str, p: &[f32]) -> Result<()> {
    match p.iter().position(|q| !(0.0..=1.0).contains(q)) {
        Some(i) => Err(Error::invalid(format!(
            "{op}: input {i} is {}, but probabilities must lie in [0, 1]",
            p[i]
        ))),
        None => Ok(()),
    }
}

fn check_ce(
    op: &'static str,
    logits: &[f32],
    classes: usize,
    targets: &[usize],
    weight: Option<&[f32]>,
) -> Result<()> {
    if classes == 0 || targets.is_empty() {
        return Err(Error::shape(
            op,
            format!(
                "need at least one class and one sample (got {classes} classes, {} targets)",
                targets.len()
            ),
        ));
    }
    if logits.len() != targets.len() * classes {
        return Err(Error::shape(
            op,
            format!(
                "logits have {} elements, but {} targets × {classes} classes need {}",
                logits.len(),
                targets.len(),
                targets.len() * classes
            ),
        ));
    }
    if let Some(i) = targets.iter().position(|&t| t >= classes) {
        return Err(Error::invalid(format!(
            "{op}: target {i} is class {}, but there are {classes} classes",
            targets[i]
        )));
    }
    if let Some(w) = weight {
        if w.len() != classes {
            return Err(Error::shape(
                op,
                format!("{} class weights for {classes} classes", w.len()),
            ));
        }
    }
    Ok(())
}

/// Per row: the maximum logit and `log Σ_j exp(x_j − max)`, in `f64`.
fn row_lse(row: &[f32]) -> (f64, f64) {
    let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let s = sum_in_order(row.len(), |j| (row[j] as f64 - m).exp());
    (m, s.ln())
}

fn class_weight(weight: Option<&[f32]>, t: usize) -> f64 {
    weight.map_or(1.0, |w| w[t] as f64)
}

/// Total weight `Σ_i w[t_i]` (sequential, in sample order); an error if it is
/// zero (PyTorch would return NaN).
fn total_weight(op: &'static str, targets: &[usize], weight: Option<&[f32]>) -> Result<f64> {
    let total = sum_in_order(targets.len(), |i| class_weight(weight, targets[i]));
    if total == 0.0 || !total.is_finite() {
        return Err(Error::invalid(format!(
            "{op}: the class weights of the targets sum to {total}; the weighted mean is undefined"
        )));
    }
    Ok(total)
}

/// Cross-entropy on logits (`torch.nn.functional.cross_entropy` with class
/// indices): log-softmax over each row of `logits` (`[N, classes]`,
/// row-major), then the negative log-likelihood of the target class,
/// averaged as PyTorch does with `reduction="mean"`:
///
/// `loss = Σ_i w[t_i] · nll_i / Σ_i w[t_i]`, with
/// `nll_i = log Σ_j exp(x_ij) − x_{i,t_i}` (computed as
/// `m + log Σ_j exp(x_ij − m) − x_{i,t_i}`, `m = max_j x_ij`).
///
/// Without `weight` every `w` is 1 and this is the plain mean over the
/// batch. `targets` holds `N` class indices.
pub fn cross_entropy(
    logits: &[f32],
    classes: usize,
    targets: &[usize],
    weight: Option<&[f32]>,
) -> Result<f32> {
    check_ce("cross_entropy", logits, classes, targets, weight)?;
    let total = total_weight("cross_entropy", targets, weight)?;
    let s = sum_in_order(targets.len(), |i| {
        let row = &logits[i * classes..(i + 1) * classes];
        let (m, lse) = row_lse(row);
        let t = targets[i];
        class_weight(weight, t) * (m + lse - row[t] as f64)
    });
    Ok((s / total) as f32)
}

/// Gradient of [`cross_entropy`] with respect to the logits:
/// `dx_ij = dy · w[t_i] · (softmax(x_i)_j − [j = t_i]) / Σ_k w[t_k]`.
pub fn cross_entropy_backward(
    logits: &[f32],
    classes: usize,
    targets: &[usize],
    weight: Option<&[f32]>,
    dy: f32,
) -> Result<Vec<f32>> {
    check_ce("cross_entropy_backward", logits, classes, targets, weight)?;
    let total = total_weight("cross_entropy_backward", targets, weight)?;
    let mut dx = Vec::with_capacity(logits.len());
    for (i, &t) in targets.iter().enumerate() {
        let row = &logits[i * classes..(i + 1) * classes];
        let (m, lse) = row_lse(row);
        let k = dy as f64 * class_weight(weight, t) / total;
        for (j, &v) in row.iter().enumerate() {
            let p = (v as f64 - m - lse).exp();
            let onehot = if j == t { 1.0 } else { 0.0 };
            dx.push((k * (p - onehot)) as f32);
        }
    }
    Ok(dx)
}

/// The VQ commitment (latent) term, `mean((q − x)²)` over all elements, where
/// `q` is the quantized output treated as a constant (`quant.detach()` in
/// vq-vae-2-pytorch) and `x` the encoder output. The value equals
/// [`mse`]`(x, q)`; the difference is the gradient, which goes to `x` only.
pub fn vq_commitment(q: &[f32], x: &[f32]) -> Result<f32> {
    check_pair("vq_commitment", q, x)?;
    let s = sum_in_order(x.len(), |i| {
        let d = q[i] as f64 - x[i] as f64;
        d * d
    });
    Ok((s / x.len() as f64) as f32)
}

/// Gradient of [`vq_commitment`] with respect to the encoder output `x`:
/// `dx_i = dy · 2 (x_i − q_i) / n`. There is no gradient to `q` (it is
/// detached).
pub fn vq_commitment_backward(q: &[f32], x: &[f32], dy: f32) -> Result<Vec<f32>> {
    check_pair("vq_commitment_backward", q, x)?;
    let k = dy as f64 * 2.0 / x.len() as f64;
    Ok(x.iter()
        .zip(q)
        .map(|(&a, &b)| (k * (a as f64 - b as f64)) as f32)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extreme_logits_stay_finite() {
        let x = [1000.0f32, -1000.0, 0.0];
        let t = [0.0f32, 1.0, 0.5];
        let l = bce_with_logits(&x, &t).unwrap();
        assert!((l as f64 - (1000.0 + 1000.0 + 2f64.ln()) / 3.0).abs() < 1e-3);
        let g = bce_with_logits_backward(&x, &t, 1.0).unwrap();
        assert!(g.iter().all(|v| v.is_finite()));
        let ce = cross_entropy(&[1000.0, -1000.0], 2, &[1], None).unwrap();
        assert_eq!(ce, 2000.0);
    }

    #[test]
    fn bce_clamps_log_at_minus_100() {
        let l = bce(&[0.0, 1.0], &[1.0, 0.0]).unwrap();
        assert_eq!(l, 100.0);
        let g = bce_backward(&[0.0, 1.0], &[1.0, 0.0], 1.0).unwrap();
        assert!(g.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(mse(&[], &[]).is_err());
        assert!(mse(&[1.0], &[1.0, 2.0]).is_err());
        assert!(bce(&[1.5], &[1.0]).is_err());
        assert!(bce(&[f32::NAN], &[1.0]).is_err());
        assert!(cross_entropy(&[0.0; 6], 3, &[3, 0], None).is_err());
        assert!(cross_entropy(&[0.0; 5], 3, &[0, 0], None).is_err());
        assert!(cross_entropy(&[0.0; 6], 3, &[0, 1], Some(&[1.0, 1.0])).is_err());
        assert!(cross_entropy(&[0.0; 6], 3, &[0, 0], Some(&[0.0, 1.0, 1.0])).is_err());
    }
}
