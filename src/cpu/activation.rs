//! Activations (ReLU, LeakyReLU, sigmoid) and softmax, as PyTorch computes
//! them, the residual add and dropout: the element-wise ops.

use super::{check_len, chunk, numel};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// `y[i] = f(x[i])` after checking that `y` matches `x`.
fn map1(op: &'static str, x: &[f32], y: &mut [f32], f: impl Fn(f32) -> f32 + Sync) -> Result<()> {
    check_len(op, "y", y.len(), x.len())?;
    y.par_iter_mut().zip(x).for_each(|(y, &x)| *y = f(x));
    Ok(())
}

/// `out[i] = f(a[i], b[i])` after checking that `b` and `out` match `a`.
fn map2(
    op: &'static str,
    a: &[f32],
    (b_name, b): (&str, &[f32]),
    (out_name, out): (&str, &mut [f32]),
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<()> {
    check_len(op, b_name, b.len(), a.len())?;
    check_len(op, out_name, out.len(), a.len())?;
    out.par_iter_mut()
        .zip(a.par_iter().zip(b))
        .for_each(|(o, (&a, &b))| *o = f(a, b));
    Ok(())
}

/// ReLU: `y = max(x, 0)`; NaN passes through, as in PyTorch.
pub fn relu_forward(x: &[f32], y: &mut [f32]) -> Result<()> {
    map1("relu_forward", x, y, |v| if v < 0.0 { 0.0 } else { v })
}

/// ReLU backward: `dx = dy` where `x > 0`, else 0 (PyTorch's choice at 0).
pub fn relu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) -> Result<()> {
    map2("relu_backward", x, ("dy", dy), ("dx", dx), |x, dy| {
        if x > 0.0 {
            dy
        } else {
            0.0
        }
    })
}

/// LeakyReLU: `y = x` where `x > 0`, else `slope · x`.
pub fn leaky_relu_forward(slope: f32, x: &[f32], y: &mut [f32]) -> Result<()> {
    map1("leaky_relu_forward", x, y, |v| {
        if v > 0.0 {
            v
        } else {
            slope * v
        }
    })
}

/// LeakyReLU backward: `dx = dy` where `x > 0`, else `slope · dy`.
pub fn leaky_relu_backward(slope: f32, x: &[f32], dy: &[f32], dx: &mut [f32]) -> Result<()> {
    map2("leaky_relu_backward", x, ("dy", dy), ("dx", dx), |x, dy| {
        if x > 0.0 {
            dy
        } else {
            slope * dy
        }
    })
}

/// Sigmoid: `y = 1 / (1 + e^(−x))` (saturates cleanly to 0 and 1).
pub fn sigmoid_forward(x: &[f32], y: &mut [f32]) -> Result<()> {
    map1("sigmoid_forward", x, y, |v| 1.0 / (1.0 + (-v).exp()))
}

/// Sigmoid backward from the forward output: `dx = dy · y · (1 − y)`.
pub fn sigmoid_backward(y: &[f32], dy: &[f32], dx: &mut [f32]) -> Result<()> {
    map2("sigmoid_backward", y, ("dy", dy), ("dx", dx), |y, dy| {
        dy * y * (1.0 - y)
    })
}

/// Softmax over the middle axis of `x` `[outer, dim, inner]` (PyTorch's
/// `softmax(x, dim)` with everything before `dim` folded into `outer` and
/// everything after into `inner`). The maximum is subtracted before `exp`.
pub fn softmax_forward(
    outer: usize,
    dim: usize,
    inner: usize,
    x: &[f32],
    y: &mut [f32],
) -> Result<()> {
    const OP: &str = "softmax_forward";
    let len = numel(OP, &[outer, dim, inner])?;
    check_len(OP, "x", x.len(), len)?;
    check_len(OP, "y", y.len(), len)?;

    let block = dim * inner;
    y.par_chunks_mut(chunk(block))
        .enumerate()
        .for_each(|(o, y_block)| {
            let x_block = &x[o * block..][..block];
            for j in 0..inner {
                let max = (0..dim)
                    .map(|d| x_block[d * inner + j])
                    .fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                for d in 0..dim {
                    let e = (x_block[d * inner + j] - max).exp();
                    y_block[d * inner + j] = e;
                    sum += e;
                }
                for d in 0..dim {
                    y_block[d * inner + j] /= sum;
                }
            }
        });
    Ok(())
}

/// Softmax backward from the forward output `y` `[outer, dim, inner]`:
/// `dx = y · (dy − Σ_dim dy · y)`.
pub fn softmax_backward(
    outer: usize,
    dim: usize,
    inner: usize,
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
) -> Result<()> {
    const OP: &str = "softmax_backward";
    let len = numel(OP, &[outer, dim, inner])?;
    check_len(OP, "y", y.len(), len)?;
    check_len(OP, "dy", dy.len(), len)?;
    check_len(OP, "dx", dx.len(), len)?;

    let block = dim * inner;
    dx.par_chunks_mut(chunk(block))
        .enumerate()
        .for_each(|(o, dx_block)| {
            let y_block = &y[o * block..][..block];
            let dy_block = &dy[o * block..][..block];
            for j in 0..inner {
                let dot: f32 = (0..dim)
                    .map(|d| y_block[d * inner + j] * dy_block[d * inner + j])
                    .sum();
                for d in 0..dim {
                    let i = d * inner + j;
                    dx_block[i] = y_block[i] * (dy_block[i] - dot);
                }
            }
        });
    Ok(())
}

/// The scale `1/(1 − p)` of the elements dropout keeps, after checking that
/// `p` is a drop probability in [0, 1).
pub fn dropout_scale(p: f32) -> Result<f32> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(format!(
            "dropout: the drop probability must be in [0, 1), got {p}"
        )));
    }
    Ok(1.0 / (1.0 - p))
}

/// Dropout in training mode with the counter-based mask of
/// [`crate::rng::dropout_keep`]: `y[i] = x[i] · mask[i] / (1 − p)`, element
/// `i` kept with probability `1 − p` by `dropout_keep(seed, step, i, p)`.
/// A dropped element is `x[i] · 0` (NaN and ±∞ stay NaN, as PyTorch's
/// `x · mask · scale`); `p = 0` is the identity, `p` outside [0, 1) an
/// error. The device kernel (`dropout_f32`) draws the same mask bit for bit.
pub fn dropout_forward(seed: u64, step: u64, p: f32, x: &[f32], y: &mut [f32]) -> Result<()> {
    dropout_apply("dropout_forward", (seed, step, p), (x, "y", y))
}

/// Dropout backward: `dx = dy · mask / (1 − p)` with the forward's mask
/// (the same `seed`, `step` and `p`), i.e. [`dropout_forward`] applied to `dy`.
pub fn dropout_backward(seed: u64, step: u64, p: f32, dy: &[f32], dx: &mut [f32]) -> Result<()> {
    dropout_apply("dropout_backward", (seed, step, p), (dy, "dx", dx))
}

/// `out[i] = v[i] · (kept ? 1/(1 − p) : 0)`, the body of both directions.
fn dropout_apply(
    op: &'static str,
    (seed, step, p): (u64, u64, f32),
    (v, out_name, out): (&[f32], &str, &mut [f32]),
) -> Result<()> {
    let scale = dropout_scale(p)?;
    check_len(op, out_name, out.len(), v.len())?;
    out.par_iter_mut()
        .zip(v)
        .enumerate()
        .for_each(|(i, (o, &v))| {
            let keep = crate::rng::dropout_keep(seed, step, i as u64, p);
            *o = v * if keep { scale } else { 0.0 };
        });
    Ok(())
}

/// Element-wise sum `y = a + b` (all three the same length), e.g. a residual
/// connection. It is its own backward: the gradient of each input is `dy`
/// itself, so no `add_backward` exists; callers pass `dy` on to both branches.
pub fn add_forward(a: &[f32], b: &[f32], y: &mut [f32]) -> Result<()> {
    map2("add_forward", a, ("b", b), ("y", y), |a, b| a + b)
}
