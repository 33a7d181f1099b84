//! Batch normalization: inference mode (running statistics) and training
//! mode (batch statistics, running statistics updated as PyTorch does).

use super::{check_len, chunk, numel};
use crate::error::Result;
use rayon::prelude::*;

/// Checks the per-channel vectors (`[c]`) and the `[n, c, hw]` tensors.
fn check_bn(
    op: &'static str,
    (n, c, hw): (usize, usize, usize),
    per_channel: &[(&str, usize)],
    tensors: &[(&str, usize)],
) -> Result<()> {
    for &(name, len) in per_channel {
        check_len(op, name, len, c)?;
    }
    let len = numel(op, &[n, c, hw])?;
    for &(name, actual) in tensors {
        check_len(op, name, actual, len)?;
    }
    Ok(())
}

/// BatchNorm2d inference: `y = (x − mean) / √(var + eps) · gamma + beta`, per
/// channel, computed as `x · scale + shift` with
/// `scale = gamma / √(var + eps)`, `shift = beta − mean · scale`.
///
/// Shapes: `x`, `y` `[n, c, hw]`; `gamma`, `beta`, `mean`, `var` `[c]`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_forward(
    n: usize,
    c: usize,
    hw: usize,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f32,
    y: &mut [f32],
) -> Result<()> {
    const OP: &str = "batchnorm_forward";
    check_bn(
        OP,
        (n, c, hw),
        &[
            ("gamma", gamma.len()),
            ("beta", beta.len()),
            ("mean", mean.len()),
            ("var", var.len()),
        ],
        &[("x", x.len()), ("y", y.len())],
    )?;

    y.par_chunks_mut(chunk(hw))
        .enumerate()
        .for_each(|(p, y_plane)| {
            let ch = p % c;
            let scale = gamma[ch] / (var[ch] + eps).sqrt();
            let shift = beta[ch] - mean[ch] * scale;
            for (y, &x) in y_plane.iter_mut().zip(&x[p * hw..][..hw]) {
                *y = x * scale + shift;
            }
        });
    Ok(())
}

/// BatchNorm2d backward in inference mode: the running statistics are
/// constants, so the layer is a per-channel affine map. Overwrites
/// `dx = dy · gamma / √(var + eps)`, `dgamma[c] = Σ dy · (x − mean) / √(var + eps)`
/// and `dbeta[c] = Σ dy` (sums over `n` and `hw`).
///
/// Shapes: `x`, `dy`, `dx` `[n, c, hw]`; `gamma`, `mean`, `var`, `dgamma`, `dbeta` `[c]`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_backward(
    n: usize,
    c: usize,
    hw: usize,
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f32,
    dy: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    const OP: &str = "batchnorm_backward";
    check_bn(
        OP,
        (n, c, hw),
        &[
            ("gamma", gamma.len()),
            ("mean", mean.len()),
            ("var", var.len()),
            ("dgamma", dgamma.len()),
            ("dbeta", dbeta.len()),
        ],
        &[("x", x.len()), ("dy", dy.len()), ("dx", dx.len())],
    )?;

    dx.par_chunks_mut(chunk(hw))
        .enumerate()
        .for_each(|(p, dx_plane)| {
            let ch = p % c;
            let scale = gamma[ch] / (var[ch] + eps).sqrt();
            for (dx, &dy) in dx_plane.iter_mut().zip(&dy[p * hw..][..hw]) {
                *dx = dy * scale;
            }
        });

    dgamma
        .par_iter_mut()
        .zip(dbeta.par_iter_mut())
        .enumerate()
        .for_each(|(ch, (dg, db))| {
            let inv_std = 1.0 / (var[ch] + eps).sqrt();
            let (mut sum_dy, mut sum_dy_xhat) = (0.0f32, 0.0f32);
            for ni in 0..n {
                let plane = (ni * c + ch) * hw;
                for (&dy, &x) in dy[plane..][..hw].iter().zip(&x[plane..][..hw]) {
                    sum_dy += dy;
                    sum_dy_xhat += dy * (x - mean[ch]) * inv_std;
                }
            }
            *dg = sum_dy_xhat;
            *db = sum_dy;
        });
    Ok(())
}

/// BatchNorm2d in training mode, as `torch.nn.BatchNorm2d.train()` runs it:
/// per channel, the batch mean `μ` and the *biased* batch variance `σ²` over
/// `n` and `hw` (`m = n·hw` values), `y = (x − μ)/√(σ² + eps) · gamma + beta`,
/// then the running statistics move towards the batch's:
/// `running_mean ← (1 − momentum)·running_mean + momentum·μ`,
/// `running_var ← (1 − momentum)·running_var + momentum·σ²·m/(m − 1)`
/// (the *unbiased* variance; with `m = 1` the running variance is left
/// unchanged instead of becoming infinite). The caller counts
/// `num_batches_tracked`.
///
/// `save_mean` and `save_inv_std` receive `μ` and `1/√(σ² + eps)`, what
/// [`batchnorm_train_backward`] needs.
///
/// Determinism: each channel's sums run in f64, sequentially over `n` then
/// `hw`, so the result does not depend on the thread count.
///
/// Shapes: `x`, `y` `[n, c, hw]`; every other slice `[c]`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_forward(
    n: usize,
    c: usize,
    hw: usize,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    momentum: f32,
    running_mean: &mut [f32],
    running_var: &mut [f32],
    save_mean: &mut [f32],
    save_inv_std: &mut [f32],
    y: &mut [f32],
) -> Result<()> {
    const OP: &str = "batchnorm_train_forward";
    check_bn(
        OP,
        (n, c, hw),
        &[
            ("gamma", gamma.len()),
            ("beta", beta.len()),
            ("running_mean", running_mean.len()),
            ("running_var", running_var.len()),
            ("save_mean", save_mean.len()),
            ("save_inv_std", save_inv_std.len()),
        ],
        &[("x", x.len()), ("y", y.len())],
    )?;
    let m = n * hw;
    if m == 0 {
        return Err(crate::Error::shape(
            OP,
            "training-mode batch norm needs at least one value per channel",
        ));
    }
    let momentum = momentum as f64;
    // One task per channel: each channel's sums stay sequential, so the
    // bits do not depend on the split.
    save_mean
        .par_iter_mut()
        .zip(save_inv_std.par_iter_mut())
        .zip(running_mean.par_iter_mut().zip(running_var.par_iter_mut()))
        .enumerate()
        .for_each(
            |(ch, ((save_mean, save_inv_std), (running_mean, running_var)))| {
                let planes = || (0..n).map(|ni| &x[(ni * c + ch) * hw..][..hw]);
                let sum: f64 = planes().flatten().map(|&v| v as f64).sum();
                let mean = sum / m as f64;
                let sq: f64 = planes()
                    .flatten()
                    .map(|&v| {
                        let d = v as f64 - mean;
                        d * d
                    })
                    .sum();
                let var = sq / m as f64;
                let inv_std = 1.0 / (var + eps as f64).sqrt();
                *save_mean = mean as f32;
                *save_inv_std = inv_std as f32;
                *running_mean = ((1.0 - momentum) * *running_mean as f64 + momentum * mean) as f32;
                if m > 1 {
                    let unbiased = sq / (m - 1) as f64;
                    *running_var =
                        ((1.0 - momentum) * *running_var as f64 + momentum * unbiased) as f32;
                }
            },
        );
    y.par_chunks_mut(chunk(hw))
        .enumerate()
        .for_each(|(p, y_plane)| {
            let ch = p % c;
            let scale = gamma[ch] * save_inv_std[ch];
            let shift = beta[ch] - save_mean[ch] * scale;
            for (y, &x) in y_plane.iter_mut().zip(&x[p * hw..][..hw]) {
                *y = x * scale + shift;
            }
        });
    Ok(())
}

/// Backward of [`batchnorm_train_forward`], through the batch statistics:
/// with `x̂ = (x − μ)·inv_std` and per-channel sums over `n` and `hw`,
/// `dbeta = Σ dy`, `dgamma = Σ dy·x̂`, and
/// `dx = gamma·inv_std/m · (m·dy − dbeta − x̂·dgamma)`.
/// Overwrites `dx`, `dgamma`, `dbeta`; the sums run in f64, sequentially
/// (deterministic).
///
/// Shapes: `x`, `dy`, `dx` `[n, c, hw]`; `gamma`, `save_mean`,
/// `save_inv_std`, `dgamma`, `dbeta` `[c]`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_backward(
    n: usize,
    c: usize,
    hw: usize,
    x: &[f32],
    gamma: &[f32],
    save_mean: &[f32],
    save_inv_std: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    const OP: &str = "batchnorm_train_backward";
    check_bn(
        OP,
        (n, c, hw),
        &[
            ("gamma", gamma.len()),
            ("save_mean", save_mean.len()),
            ("save_inv_std", save_inv_std.len()),
            ("dgamma", dgamma.len()),
            ("dbeta", dbeta.len()),
        ],
        &[("x", x.len()), ("dy", dy.len()), ("dx", dx.len())],
    )?;
    let m = (n * hw) as f64;
    // One task per channel, each channel's sums sequential (as above).
    dbeta
        .par_iter_mut()
        .zip(dgamma.par_iter_mut())
        .enumerate()
        .for_each(|(ch, (dbeta, dgamma))| {
            let (mean, inv_std) = (save_mean[ch] as f64, save_inv_std[ch] as f64);
            let (mut sum_dy, mut sum_dy_xhat) = (0.0f64, 0.0f64);
            for ni in 0..n {
                let plane = (ni * c + ch) * hw;
                for (&g, &v) in dy[plane..][..hw].iter().zip(&x[plane..][..hw]) {
                    sum_dy += g as f64;
                    sum_dy_xhat += g as f64 * (v as f64 - mean) * inv_std;
                }
            }
            *dbeta = sum_dy as f32;
            *dgamma = sum_dy_xhat as f32;
        });
    dx.par_chunks_mut(chunk(hw))
        .enumerate()
        .for_each(|(p, dx_plane)| {
            let ch = p % c;
            let (mean, inv_std) = (save_mean[ch] as f64, save_inv_std[ch] as f64);
            let k = gamma[ch] as f64 * inv_std / m;
            let (db, dg) = (dbeta[ch] as f64, dgamma[ch] as f64);
            for ((dx, &g), &v) in dx_plane
                .iter_mut()
                .zip(&dy[p * hw..][..hw])
                .zip(&x[p * hw..][..hw])
            {
                let xhat = (v as f64 - mean) * inv_std;
                *dx = (k * (m * g as f64 - db - xhat * dg)) as f32;
            }
        });
    Ok(())
}
