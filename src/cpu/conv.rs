//! 2-D convolution and transposed convolution (dilation 1, groups 1).
//!
//! Both ops, forward and backward, reduce to three loops over one pair of
//! planes linked by a kernel window: a *small* plane (the conv output, or the
//! transposed conv's input) and a *big* plane (the conv input, or the
//! transposed conv's output), with `big[i·s + k − p] ↔ small[i]` along each
//! axis:
//!
//! - `correlate`: `small[i, j] += Σ_k K[ky, kx] · big[i·s + ky − p, j·s + kx − p]`
//!   (conv forward, transposed-conv input gradient);
//! - `scatter`: `big[i·s + ky − p, j·s + kx − p] += K[ky, kx] · small[i, j]`
//!   (transposed-conv forward, conv input gradient);
//! - `kernel_grad`: `dK[ky, kx] += Σ_{i,j} small[i, j] · big[i·s + ky − p, j·s + kx − p]`
//!   (both weight gradients).
//!
//! Out-of-range big positions are the zero padding and are skipped. No im2col
//! buffer is built; the innermost loops run along a row, contiguous in the
//! small plane (and in the big plane too when the stride is 1).

use super::{check_len, chunk, numel};
use crate::error::{Error, Result};
use crate::geometry::{Conv2dGeom, ConvTranspose2dGeom};
use rayon::prelude::*;
use std::ops::Range;

/// The window linking a small plane to a big plane (see the module docs).
#[derive(Clone, Copy, Debug)]
struct Window {
    small_h: usize,
    small_w: usize,
    big_h: usize,
    big_w: usize,
    kh: usize,
    kw: usize,
    stride_h: usize,
    stride_w: usize,
    pad_h: usize,
    pad_w: usize,
}

impl Window {
    /// Conv2d: the output is the small plane, the input the big one.
    fn conv(g: &Conv2dGeom) -> Self {
        Window {
            small_h: g.oh,
            small_w: g.ow,
            big_h: g.h,
            big_w: g.w,
            kh: g.kh,
            kw: g.kw,
            stride_h: g.stride_h,
            stride_w: g.stride_w,
            pad_h: g.pad_h,
            pad_w: g.pad_w,
        }
    }

    /// Transposed conv: the input is the small plane, the output the big one.
    fn transposed(g: &ConvTranspose2dGeom) -> Self {
        Window {
            small_h: g.h,
            small_w: g.w,
            big_h: g.oh,
            big_w: g.ow,
            kh: g.kh,
            kw: g.kw,
            stride_h: g.stride_h,
            stride_w: g.stride_w,
            pad_h: g.pad_h,
            pad_w: g.pad_w,
        }
    }

    fn small_len(&self) -> usize {
        self.small_h * self.small_w
    }

    fn big_len(&self) -> usize {
        self.big_h * self.big_w
    }

    fn kernel_len(&self) -> usize {
        self.kh * self.kw
    }

    /// Small rows `i` whose big row `i·s + ky − p` lies inside the big plane.
    fn rows(&self, ky: usize) -> Range<usize> {
        valid_range(self.small_h, self.big_h, self.stride_h, self.pad_h, ky)
    }

    /// Small columns `j` whose big column `j·s + kx − p` lies inside the big plane.
    fn cols(&self, kx: usize) -> Range<usize> {
        valid_range(self.small_w, self.big_w, self.stride_w, self.pad_w, kx)
    }
}

/// Indices `o < small_len` with `0 ≤ o·stride + k − pad < big_len`.
fn valid_range(
    small_len: usize,
    big_len: usize,
    stride: usize,
    pad: usize,
    k: usize,
) -> Range<usize> {
    let lo = pad.saturating_sub(k).div_ceil(stride);
    let hi = (big_len + pad)
        .saturating_sub(k)
        .div_ceil(stride)
        .min(small_len);
    lo..hi.max(lo)
}

/// `small[i, j] += Σ K[ky, kx] · big[i·s + ky − p, j·s + kx − p]`.
fn correlate(win: &Window, big: &[f32], kernel: &[f32], small: &mut [f32]) {
    for ky in 0..win.kh {
        for i in win.rows(ky) {
            let big_row = &big[(i * win.stride_h + ky - win.pad_h) * win.big_w..][..win.big_w];
            let small_row = &mut small[i * win.small_w..][..win.small_w];
            for kx in 0..win.kw {
                let k = kernel[ky * win.kw + kx];
                let cols = win.cols(kx);
                if cols.is_empty() {
                    continue;
                }
                let b0 = cols.start * win.stride_w + kx - win.pad_w;
                let len = cols.len();
                let out = &mut small_row[cols];
                if win.stride_w == 1 {
                    for (o, &v) in out.iter_mut().zip(&big_row[b0..b0 + len]) {
                        *o += k * v;
                    }
                } else {
                    // Indexing a span cut to the exact extent lets the compiler drop the
                    // bounds checks; `step_by` here ran about half as fast.
                    let span = &big_row[b0..=b0 + (len - 1) * win.stride_w];
                    for (t, o) in out.iter_mut().enumerate() {
                        *o += k * span[t * win.stride_w];
                    }
                }
            }
        }
    }
}

/// `big[i·s + ky − p, j·s + kx − p] += K[ky, kx] · small[i, j]`.
fn scatter(win: &Window, small: &[f32], kernel: &[f32], big: &mut [f32]) {
    for ky in 0..win.kh {
        for i in win.rows(ky) {
            let small_row = &small[i * win.small_w..][..win.small_w];
            let big_row = &mut big[(i * win.stride_h + ky - win.pad_h) * win.big_w..][..win.big_w];
            for kx in 0..win.kw {
                let k = kernel[ky * win.kw + kx];
                let cols = win.cols(kx);
                if cols.is_empty() {
                    continue;
                }
                let b0 = cols.start * win.stride_w + kx - win.pad_w;
                let inp = &small_row[cols];
                if win.stride_w == 1 {
                    for (o, &v) in big_row[b0..b0 + inp.len()].iter_mut().zip(inp) {
                        *o += k * v;
                    }
                } else {
                    let span = &mut big_row[b0..=b0 + (inp.len() - 1) * win.stride_w];
                    for (t, &v) in inp.iter().enumerate() {
                        span[t * win.stride_w] += k * v;
                    }
                }
            }
        }
    }
}

/// `dK[ky, kx] += Σ_{i,j} small[i, j] · big[i·s + ky − p, j·s + kx − p]`.
fn kernel_grad(win: &Window, small: &[f32], big: &[f32], dkernel: &mut [f32]) {
    for ky in 0..win.kh {
        for kx in 0..win.kw {
            let cols = win.cols(kx);
            if cols.is_empty() {
                continue;
            }
            let b0 = cols.start * win.stride_w + kx - win.pad_w;
            let mut acc = 0.0f32;
            for i in win.rows(ky) {
                let small_row = &small[i * win.small_w..][..win.small_w];
                let big_row = &big[(i * win.stride_h + ky - win.pad_h) * win.big_w..][..win.big_w];
                let s = &small_row[cols.clone()];
                let span = &big_row[b0..=b0 + (s.len() - 1) * win.stride_w];
                acc += s
                    .iter()
                    .enumerate()
                    .map(|(t, &a)| a * span[t * win.stride_w])
                    .sum::<f32>();
            }
            dkernel[ky * win.kw + kx] += acc;
        }
    }
}

fn check_stride(op: &'static str, stride_h: usize, stride_w: usize) -> Result<()> {
    if stride_h == 0 || stride_w == 0 {
        return Err(Error::shape(op, "stride must be at least 1"));
    }
    Ok(())
}

/// Conv2d forward: `y[n, co] = b[co] + Σ_ci x[n, ci] ⋆ w[co, ci]` (cross-correlation
/// with stride and zero padding, as PyTorch's `Conv2d`).
///
/// Shapes: `x` `[n, c_in, h, w]`, `w` `[c_out, c_in, kh, kw]`, `b` `[c_out]`,
/// `y` `[n, c_out, oh, ow]` (overwritten).
pub fn conv2d_forward(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    const OP: &str = "conv2d_forward";
    check_stride(OP, g.stride_h, g.stride_w)?;
    check_len(OP, "x", x.len(), numel(OP, &[g.n, g.c_in, g.h, g.w])?)?;
    check_len(OP, "w", w.len(), numel(OP, &[g.c_out, g.c_in, g.kh, g.kw])?)?;
    if let Some(b) = b {
        check_len(OP, "b", b.len(), g.c_out)?;
    }
    check_len(OP, "y", y.len(), numel(OP, &[g.n, g.c_out, g.oh, g.ow])?)?;

    let win = Window::conv(g);
    let (x_plane, k_len) = (win.big_len(), win.kernel_len());
    y.par_chunks_mut(chunk(win.small_len()))
        .enumerate()
        .for_each(|(p, y_plane)| {
            let (n, co) = (p / g.c_out, p % g.c_out);
            y_plane.fill(b.map_or(0.0, |b| b[co]));
            for ci in 0..g.c_in {
                let x_nc = &x[(n * g.c_in + ci) * x_plane..][..x_plane];
                let w_oc = &w[(co * g.c_in + ci) * k_len..][..k_len];
                correlate(&win, x_nc, w_oc, y_plane);
            }
        });
    Ok(())
}

/// Conv2d backward: from `dy` `[n, c_out, oh, ow]`, overwrites `dx`
/// `[n, c_in, h, w]`, `dw` `[c_out, c_in, kh, kw]` and, if given, `db` `[c_out]`.
pub fn conv2d_backward(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) -> Result<()> {
    const OP: &str = "conv2d_backward";
    check_stride(OP, g.stride_h, g.stride_w)?;
    let x_len = numel(OP, &[g.n, g.c_in, g.h, g.w])?;
    let w_len = numel(OP, &[g.c_out, g.c_in, g.kh, g.kw])?;
    check_len(OP, "x", x.len(), x_len)?;
    check_len(OP, "w", w.len(), w_len)?;
    check_len(OP, "dy", dy.len(), numel(OP, &[g.n, g.c_out, g.oh, g.ow])?)?;
    check_len(OP, "dx", dx.len(), x_len)?;
    check_len(OP, "dw", dw.len(), w_len)?;
    if let Some(db) = &db {
        check_len(OP, "db", db.len(), g.c_out)?;
    }

    let win = Window::conv(g);
    let (x_plane, y_plane, k_len) = (win.big_len(), win.small_len(), win.kernel_len());

    // dx[n, ci] = Σ_co dy[n, co] scattered through w[co, ci].
    dx.par_chunks_mut(chunk(x_plane))
        .enumerate()
        .for_each(|(p, dx_plane)| {
            let (n, ci) = (p / g.c_in, p % g.c_in);
            dx_plane.fill(0.0);
            for co in 0..g.c_out {
                let dy_nc = &dy[(n * g.c_out + co) * y_plane..][..y_plane];
                let w_oc = &w[(co * g.c_in + ci) * k_len..][..k_len];
                scatter(&win, dy_nc, w_oc, dx_plane);
            }
        });

    // dw[co, ci] = Σ_n dy[n, co] ⋆ x[n, ci], one (co, ci) kernel per task.
    dw.par_chunks_mut(chunk(k_len))
        .enumerate()
        .for_each(|(p, dw_k)| {
            let (co, ci) = (p / g.c_in, p % g.c_in);
            dw_k.fill(0.0);
            for n in 0..g.n {
                let dy_nc = &dy[(n * g.c_out + co) * y_plane..][..y_plane];
                let x_nc = &x[(n * g.c_in + ci) * x_plane..][..x_plane];
                kernel_grad(&win, dy_nc, x_nc, dw_k);
            }
        });

    if let Some(db) = db {
        bias_grad(g.n, g.c_out, y_plane, dy, db);
    }
    Ok(())
}

/// `db[c] = Σ_{n, i} dy[n, c, i]` for `dy` `[n, c, plane]`.
fn bias_grad(n: usize, c: usize, plane: usize, dy: &[f32], db: &mut [f32]) {
    db.par_iter_mut().enumerate().for_each(|(co, d)| {
        *d = (0..n)
            .map(|ni| dy[(ni * c + co) * plane..][..plane].iter().sum::<f32>())
            .sum();
    });
}

/// Transposed conv2d forward (PyTorch's `ConvTranspose2d`, the gradient of a
/// conv2d with respect to its input): `y[n, co] = b[co] + Σ_ci x[n, ci]`
/// scattered through `w[ci, co]`.
///
/// Shapes: `x` `[n, c_in, h, w]`, `w` `[c_in, c_out, kh, kw]`, `b` `[c_out]`,
/// `y` `[n, c_out, oh, ow]` (overwritten).
pub fn conv_transpose2d_forward(
    g: &ConvTranspose2dGeom,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    const OP: &str = "conv_transpose2d_forward";
    check_stride(OP, g.stride_h, g.stride_w)?;
    check_len(OP, "x", x.len(), numel(OP, &[g.n, g.c_in, g.h, g.w])?)?;
    check_len(OP, "w", w.len(), numel(OP, &[g.c_in, g.c_out, g.kh, g.kw])?)?;
    if let Some(b) = b {
        check_len(OP, "b", b.len(), g.c_out)?;
    }
    check_len(OP, "y", y.len(), numel(OP, &[g.n, g.c_out, g.oh, g.ow])?)?;

    let win = Window::transposed(g);
    let (x_plane, k_len) = (win.small_len(), win.kernel_len());
    y.par_chunks_mut(chunk(win.big_len()))
        .enumerate()
        .for_each(|(p, y_plane)| {
            let (n, co) = (p / g.c_out, p % g.c_out);
            y_plane.fill(b.map_or(0.0, |b| b[co]));
            for ci in 0..g.c_in {
                let x_nc = &x[(n * g.c_in + ci) * x_plane..][..x_plane];
                let w_io = &w[(ci * g.c_out + co) * k_len..][..k_len];
                scatter(&win, x_nc, w_io, y_plane);
            }
        });
    Ok(())
}

/// Transposed conv2d backward: from `dy` `[n, c_out, oh, ow]`, overwrites `dx`
/// `[n, c_in, h, w]`, `dw` `[c_in, c_out, kh, kw]` and, if given, `db` `[c_out]`.
pub fn conv_transpose2d_backward(
    g: &ConvTranspose2dGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) -> Result<()> {
    const OP: &str = "conv_transpose2d_backward";
    check_stride(OP, g.stride_h, g.stride_w)?;
    let x_len = numel(OP, &[g.n, g.c_in, g.h, g.w])?;
    let w_len = numel(OP, &[g.c_in, g.c_out, g.kh, g.kw])?;
    check_len(OP, "x", x.len(), x_len)?;
    check_len(OP, "w", w.len(), w_len)?;
    check_len(OP, "dy", dy.len(), numel(OP, &[g.n, g.c_out, g.oh, g.ow])?)?;
    check_len(OP, "dx", dx.len(), x_len)?;
    check_len(OP, "dw", dw.len(), w_len)?;
    if let Some(db) = &db {
        check_len(OP, "db", db.len(), g.c_out)?;
    }

    let win = Window::transposed(g);
    let (x_plane, y_plane, k_len) = (win.small_len(), win.big_len(), win.kernel_len());

    // dx[n, ci] = Σ_co dy[n, co] ⋆ w[ci, co]: an ordinary strided convolution.
    dx.par_chunks_mut(chunk(x_plane))
        .enumerate()
        .for_each(|(p, dx_plane)| {
            let (n, ci) = (p / g.c_in, p % g.c_in);
            dx_plane.fill(0.0);
            for co in 0..g.c_out {
                let dy_nc = &dy[(n * g.c_out + co) * y_plane..][..y_plane];
                let w_io = &w[(ci * g.c_out + co) * k_len..][..k_len];
                correlate(&win, dy_nc, w_io, dx_plane);
            }
        });

    // dw[ci, co] = Σ_n x[n, ci] paired with dy[n, co] through the window.
    dw.par_chunks_mut(chunk(k_len))
        .enumerate()
        .for_each(|(p, dw_k)| {
            let (ci, co) = (p / g.c_out, p % g.c_out);
            dw_k.fill(0.0);
            for n in 0..g.n {
                let x_nc = &x[(n * g.c_in + ci) * x_plane..][..x_plane];
                let dy_nc = &dy[(n * g.c_out + co) * y_plane..][..y_plane];
                kernel_grad(&win, x_nc, dy_nc, dw_k);
            }
        });

    if let Some(db) = db {
        bias_grad(g.n, g.c_out, y_plane, dy, db);
    }
    Ok(())
}
