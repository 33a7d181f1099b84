//! Batch normalization in inference mode (running statistics).

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
