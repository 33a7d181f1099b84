//! Max, average and global average pooling over NCHW planes.

use super::{check_len, chunk, numel};
use crate::error::{Error, Result};
use crate::geometry::Pool2dGeom;
use rayon::prelude::*;
use std::ops::Range;

/// In-bounds input indices of the window of output index `o` along one axis.
fn window(o: usize, stride: usize, pad: usize, k: usize, len: usize) -> Range<usize> {
    let lo = (o * stride).saturating_sub(pad).min(len);
    let hi = (o * stride + k).saturating_sub(pad).min(len);
    lo..hi.max(lo)
}

/// Size of the window of output index `o` along one axis counting padding
/// but not running past it (PyTorch's `count_include_pad` divisor).
fn padded_window_len(o: usize, stride: usize, pad: usize, k: usize, len: usize) -> usize {
    let start = o * stride;
    (start + k).min(len + 2 * pad).saturating_sub(start)
}

/// Checks the stride and the lengths of an input-sized and an output-sized slice.
fn check_pool(
    op: &'static str,
    g: &Pool2dGeom,
    (in_name, in_len): (&str, usize),
    (out_name, out_len): (&str, usize),
) -> Result<()> {
    if g.stride_h == 0 || g.stride_w == 0 {
        return Err(Error::shape(op, "stride must be at least 1"));
    }
    check_len(op, in_name, in_len, numel(op, &[g.n, g.c, g.h, g.w])?)?;
    check_len(op, out_name, out_len, numel(op, &[g.n, g.c, g.oh, g.ow])?)
}

/// Index in the plane of the window's maximum: the first maximum in row-major
/// scan order, except that a NaN wins (PyTorch's rule). `None` only for a
/// window with no in-bounds element.
fn window_argmax(g: &Pool2dGeom, x_plane: &[f32], oy: usize, ox: usize) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for iy in window(oy, g.stride_h, g.pad_h, g.kh, g.h) {
        for ix in window(ox, g.stride_w, g.pad_w, g.kw, g.w) {
            let i = iy * g.w + ix;
            let v = x_plane[i];
            if best.is_none_or(|(_, b)| v > b || v.is_nan()) {
                best = Some((i, v));
            }
        }
    }
    best.map(|(i, _)| i)
}

/// Max pooling (padding acts as −∞): `x` `[n, c, h, w]` → `y` `[n, c, oh, ow]`.
pub fn max_pool2d_forward(g: &Pool2dGeom, x: &[f32], y: &mut [f32]) -> Result<()> {
    check_pool("max_pool2d_forward", g, ("x", x.len()), ("y", y.len()))?;
    let (x_plane, y_plane) = (g.h * g.w, g.oh * g.ow);
    y.par_chunks_mut(chunk(y_plane))
        .enumerate()
        .for_each(|(p, y_p)| {
            let x_p = &x[p * x_plane..][..x_plane];
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    y_p[oy * g.ow + ox] =
                        window_argmax(g, x_p, oy, ox).map_or(f32::NEG_INFINITY, |i| x_p[i]);
                }
            }
        });
    Ok(())
}

/// Max pooling backward: each `dy` goes to its window's maximum (as chosen by
/// the forward), summed where windows overlap; `dx` `[n, c, h, w]` is overwritten.
pub fn max_pool2d_backward(g: &Pool2dGeom, x: &[f32], dy: &[f32], dx: &mut [f32]) -> Result<()> {
    const OP: &str = "max_pool2d_backward";
    check_pool(OP, g, ("x", x.len()), ("dy", dy.len()))?;
    check_len(OP, "dx", dx.len(), x.len())?;
    let (x_plane, y_plane) = (g.h * g.w, g.oh * g.ow);
    dx.par_chunks_mut(chunk(x_plane))
        .enumerate()
        .for_each(|(p, dx_p)| {
            let x_p = &x[p * x_plane..][..x_plane];
            let dy_p = &dy[p * y_plane..][..y_plane];
            dx_p.fill(0.0);
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    if let Some(i) = window_argmax(g, x_p, oy, ox) {
                        dx_p[i] += dy_p[oy * g.ow + ox];
                    }
                }
            }
        });
    Ok(())
}

/// The divisor of the average over window `(oy, ox)`.
fn avg_divisor(g: &Pool2dGeom, oy: usize, ox: usize) -> f32 {
    let (rows, cols) = if g.count_include_pad {
        (
            padded_window_len(oy, g.stride_h, g.pad_h, g.kh, g.h),
            padded_window_len(ox, g.stride_w, g.pad_w, g.kw, g.w),
        )
    } else {
        (
            window(oy, g.stride_h, g.pad_h, g.kh, g.h).len(),
            window(ox, g.stride_w, g.pad_w, g.kw, g.w).len(),
        )
    };
    (rows * cols) as f32
}

/// Average pooling (padding counts as zeros): `x` `[n, c, h, w]` → `y`
/// `[n, c, oh, ow]`, dividing by the whole window when
/// `g.count_include_pad` (PyTorch's default), else by its in-bounds part.
pub fn avg_pool2d_forward(g: &Pool2dGeom, x: &[f32], y: &mut [f32]) -> Result<()> {
    check_pool("avg_pool2d_forward", g, ("x", x.len()), ("y", y.len()))?;
    let (x_plane, y_plane) = (g.h * g.w, g.oh * g.ow);
    y.par_chunks_mut(chunk(y_plane))
        .enumerate()
        .for_each(|(p, y_p)| {
            let x_p = &x[p * x_plane..][..x_plane];
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let cols = window(ox, g.stride_w, g.pad_w, g.kw, g.w);
                    let sum: f32 = window(oy, g.stride_h, g.pad_h, g.kh, g.h)
                        .map(|iy| x_p[iy * g.w..][cols.clone()].iter().sum::<f32>())
                        .sum();
                    y_p[oy * g.ow + ox] = sum / avg_divisor(g, oy, ox);
                }
            }
        });
    Ok(())
}

/// Average pooling backward: each `dy / divisor` is spread over the in-bounds
/// part of its window; `dx` `[n, c, h, w]` is overwritten.
pub fn avg_pool2d_backward(g: &Pool2dGeom, dy: &[f32], dx: &mut [f32]) -> Result<()> {
    check_pool("avg_pool2d_backward", g, ("dx", dx.len()), ("dy", dy.len()))?;
    let (x_plane, y_plane) = (g.h * g.w, g.oh * g.ow);
    dx.par_chunks_mut(chunk(x_plane))
        .enumerate()
        .for_each(|(p, dx_p)| {
            let dy_p = &dy[p * y_plane..][..y_plane];
            dx_p.fill(0.0);
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let share = dy_p[oy * g.ow + ox] / avg_divisor(g, oy, ox);
                    let cols = window(ox, g.stride_w, g.pad_w, g.kw, g.w);
                    for iy in window(oy, g.stride_h, g.pad_h, g.kh, g.h) {
                        for d in &mut dx_p[iy * g.w..][cols.clone()] {
                            *d += share;
                        }
                    }
                }
            }
        });
    Ok(())
}

/// Global average pooling: `x` `[n, c, hw]` → `y` `[n, c]`, the mean of each
/// plane (NaN for an empty plane, as PyTorch's `mean`).
pub fn global_avg_pool_forward(
    n: usize,
    c: usize,
    hw: usize,
    x: &[f32],
    y: &mut [f32],
) -> Result<()> {
    const OP: &str = "global_avg_pool_forward";
    check_len(OP, "x", x.len(), numel(OP, &[n, c, hw])?)?;
    check_len(OP, "y", y.len(), numel(OP, &[n, c])?)?;
    y.par_iter_mut().enumerate().for_each(|(p, y)| {
        *y = x[p * hw..][..hw].iter().sum::<f32>() / hw as f32;
    });
    Ok(())
}

/// Global average pooling backward: `dx[n, c, i] = dy[n, c] / hw`; `dx`
/// `[n, c, hw]` is overwritten.
pub fn global_avg_pool_backward(
    n: usize,
    c: usize,
    hw: usize,
    dy: &[f32],
    dx: &mut [f32],
) -> Result<()> {
    const OP: &str = "global_avg_pool_backward";
    check_len(OP, "dy", dy.len(), numel(OP, &[n, c])?)?;
    check_len(OP, "dx", dx.len(), numel(OP, &[n, c, hw])?)?;
    dx.par_chunks_mut(chunk(hw))
        .zip(dy.par_iter())
        .for_each(|(dx_p, &dy)| dx_p.fill(dy / hw as f32));
    Ok(())
}
