//! Fully connected layer, PyTorch's `Linear`: `y = x · Wᵀ + b`.

use super::{check_len, chunk, numel};
use crate::error::Result;
use rayon::prelude::*;

/// `y[i, o] = b[o] + Σ_k x[i, k] · w[o, k]`.
///
/// Shapes: `x` `[n, in_f]`, `w` `[out_f, in_f]`, `b` `[out_f]`, `y` `[n, out_f]` (overwritten).
pub fn linear_forward(
    n: usize,
    in_f: usize,
    out_f: usize,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    const OP: &str = "linear_forward";
    check_len(OP, "x", x.len(), numel(OP, &[n, in_f])?)?;
    check_len(OP, "w", w.len(), numel(OP, &[out_f, in_f])?)?;
    if let Some(b) = b {
        check_len(OP, "b", b.len(), out_f)?;
    }
    check_len(OP, "y", y.len(), numel(OP, &[n, out_f])?)?;

    y.par_chunks_mut(chunk(out_f))
        .enumerate()
        .for_each(|(i, y_row)| {
            let x_row = &x[i * in_f..][..in_f];
            for (o, y) in y_row.iter_mut().enumerate() {
                let w_row = &w[o * in_f..][..in_f];
                let dot: f32 = x_row.iter().zip(w_row).map(|(&a, &b)| a * b).sum();
                *y = b.map_or(0.0, |b| b[o]) + dot;
            }
        });
    Ok(())
}

/// Linear backward: overwrites `dx = dy · W` `[n, in_f]`, `dw = dyᵀ · x`
/// `[out_f, in_f]` and, if given, `db = Σ_i dy[i]` `[out_f]`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    n: usize,
    in_f: usize,
    out_f: usize,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) -> Result<()> {
    const OP: &str = "linear_backward";
    let x_len = numel(OP, &[n, in_f])?;
    let w_len = numel(OP, &[out_f, in_f])?;
    check_len(OP, "x", x.len(), x_len)?;
    check_len(OP, "w", w.len(), w_len)?;
    check_len(OP, "dy", dy.len(), numel(OP, &[n, out_f])?)?;
    check_len(OP, "dx", dx.len(), x_len)?;
    check_len(OP, "dw", dw.len(), w_len)?;
    if let Some(db) = &db {
        check_len(OP, "db", db.len(), out_f)?;
    }

    dx.par_chunks_mut(chunk(in_f))
        .enumerate()
        .for_each(|(i, dx_row)| {
            dx_row.fill(0.0);
            for (o, &g) in dy[i * out_f..][..out_f].iter().enumerate() {
                for (d, &wv) in dx_row.iter_mut().zip(&w[o * in_f..][..in_f]) {
                    *d += g * wv;
                }
            }
        });

    dw.par_chunks_mut(chunk(in_f))
        .enumerate()
        .for_each(|(o, dw_row)| {
            dw_row.fill(0.0);
            for i in 0..n {
                let g = dy[i * out_f + o];
                for (d, &xv) in dw_row.iter_mut().zip(&x[i * in_f..][..in_f]) {
                    *d += g * xv;
                }
            }
        });

    if let Some(db) = db {
        db.par_iter_mut().enumerate().for_each(|(o, d)| {
            *d = (0..n).map(|i| dy[i * out_f + o]).sum();
        });
    }
    Ok(())
}
