//! Fully connected layer, PyTorch's `Linear`: `y = x · Wᵀ + b`.

use super::gemm::{
    self, gemm, pack_a, pack_a_transposed, pack_b, pack_b_transposed, packed_a_len, packed_len,
    Kernel, NR,
};
use super::{check_len, numel};
use crate::error::Result;
use rayon::prelude::*;

/// Row blocks per thread to aim for, so that uneven blocks still balance.
const TASKS_PER_THREAD: usize = 4;

/// `y[i, o] = b[o] + Σ_k x[i, k] · w[o, k]`. The fast path, a blocked GEMM;
/// its specification is [`reference::linear`], which it equals bit for bit
/// on the exact GEMM path and within rounding on the FMA paths (see
/// `CELLMORPH_CPU_GEMM` in the [`conv`](super::conv) module docs;
/// unit-tested).
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
    linear_forward_with(gemm::selected()?, n, in_f, out_f, x, w, b, y)
}

/// [`linear_forward`] on the GEMM `kernel`.
#[allow(clippy::too_many_arguments)]
fn linear_forward_with(
    kernel: Kernel,
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

    if y.is_empty() {
        return Ok(());
    }
    // One GEMM, y = x · Wᵀ: W's rows are the columns of B, packed once; each
    // task packs its block of x rows as A. Products are summed from zero in
    // increasing k and the bias is added last, as in `b + Σ_k x·w`.
    let mut w_packed = vec![0.0; packed_len(out_f, NR, in_f)];
    pack_b_transposed(out_f, in_f, w, in_f, &mut w_packed);
    let rows = n
        .div_ceil(TASKS_PER_THREAD * rayon::current_num_threads())
        .next_multiple_of(kernel.mr());
    y.par_chunks_mut(rows * out_f)
        .enumerate()
        .for_each(|(t, y_rows)| {
            let m = y_rows.len() / out_f;
            let x_rows = &x[t * rows * in_f..][..m * in_f];
            let mut x_packed = vec![0.0; packed_a_len(kernel, m, in_f)];
            pack_a(kernel, m, in_f, x_rows, in_f, &mut x_packed);
            y_rows.fill(0.0);
            gemm(kernel, m, out_f, in_f, &x_packed, &w_packed, y_rows, out_f);
            if let Some(b) = b {
                for y_row in y_rows.chunks_exact_mut(out_f) {
                    for (y, &bo) in y_row.iter_mut().zip(b) {
                        *y += bo;
                    }
                }
            }
        });
    Ok(())
}

/// Linear backward: overwrites `dx = dy · W` `[n, in_f]`, `dw = dyᵀ · x`
/// `[out_f, in_f]` and, if given, `db = Σ_i dy[i]` `[out_f]`. The fast path,
/// two blocked GEMMs; its specification is [`reference::linear_backward`],
/// which it equals bit for bit on the exact GEMM path and within rounding on
/// the FMA paths (every sum runs from zero in increasing index, as there;
/// unit-tested). `db` is the specification's own loop.
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
    linear_backward_with(gemm::selected()?, n, in_f, out_f, x, w, dy, dx, dw, db)
}

/// [`linear_backward`] on the GEMM `kernel`.
#[allow(clippy::too_many_arguments)]
fn linear_backward_with(
    kernel: Kernel,
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
    reference::check_backward("linear_backward", n, in_f, out_f, x, w, dy, dx, dw, &db)?;
    let tasks = TASKS_PER_THREAD * rayon::current_num_threads();

    // dx = dy · W: A = dy [n × out_f], B = W [out_f × in_f] packed once.
    if !dx.is_empty() {
        let mut w_packed = vec![0.0; packed_len(in_f, NR, out_f)];
        pack_b(out_f, in_f, w, in_f, &mut w_packed);
        let rows = n.div_ceil(tasks).next_multiple_of(kernel.mr());
        dx.par_chunks_mut(rows * in_f)
            .enumerate()
            .for_each(|(t, dx_rows)| {
                let m = dx_rows.len() / in_f;
                let dy_rows = &dy[t * rows * out_f..][..m * out_f];
                let mut a = vec![0.0; packed_a_len(kernel, m, out_f)];
                pack_a(kernel, m, out_f, dy_rows, out_f, &mut a);
                dx_rows.fill(0.0);
                gemm(kernel, m, in_f, out_f, &a, &w_packed, dx_rows, in_f);
            });
    }

    // dw = dyᵀ · x: A = dyᵀ [out_f × n] packed once, B = x [n × in_f] by
    // groups of whole strips, one task each, into a compact block of dw
    // (out_f is often 1 or 2: the columns carry the parallelism).
    if !dw.is_empty() {
        let mut a = vec![0.0; packed_a_len(kernel, out_f, n)];
        pack_a_transposed(kernel, out_f, n, dy, out_f, &mut a);
        let strips = in_f.div_ceil(NR);
        let per = strips.div_ceil(strips.min(tasks)) * NR;
        let blocks: Vec<Vec<f32>> = (0..in_f.div_ceil(per))
            .into_par_iter()
            .map(|t| {
                let cols = per.min(in_f - t * per);
                let mut b = vec![0.0; packed_len(cols, NR, n)];
                pack_b(n, cols, x.get(t * per..).unwrap_or(&[]), in_f, &mut b);
                let mut c = vec![0.0; out_f * cols];
                gemm(kernel, out_f, cols, n, &a, &b, &mut c, cols);
                c
            })
            .collect();
        for (t, c) in blocks.iter().enumerate() {
            let cols = per.min(in_f - t * per);
            for (dw_row, c_row) in dw.chunks_exact_mut(in_f).zip(c.chunks_exact(cols)) {
                dw_row[t * per..][..cols].copy_from_slice(c_row);
            }
        }
    }

    if let Some(db) = db {
        reference::bias_grad(n, out_f, dy, db);
    }
    Ok(())
}

/// The specification of the linear layer: the plain loop the GEMM path
/// replaced, readable and slow. [`linear_forward`] computes the same dot
/// products in the same order (summed from zero in increasing k, bias added
/// last), and the unit tests of this module check that it equals this loop
/// bit for bit on the exact GEMM path (within the summation bound on the FMA
/// paths) on sizes around its strips and blocks.
pub mod reference {
    use super::super::chunk;
    use super::{check_len, numel};
    use crate::error::Result;
    use rayon::prelude::*;

    /// Linear forward, the specification of [`linear_forward`](super::linear_forward):
    /// `y[i, o] = b[o] + Σ_k x[i, k] · w[o, k]`, the dot product summed in
    /// increasing k (`b[o]` is 0 without a bias); rayon over rows.
    ///
    /// Shapes: `x` `[n, in_f]`, `w` `[out_f, in_f]`, `b` `[out_f]`, `y`
    /// `[n, out_f]` (overwritten); a wrong length is an
    /// [`Error::Shape`](crate::Error::Shape).
    pub fn linear(
        n: usize,
        in_f: usize,
        out_f: usize,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        y: &mut [f32],
    ) -> Result<()> {
        const OP: &str = "reference::linear";
        check_len(OP, "x", x.len(), numel(OP, &[n, in_f])?)?;
        check_len(OP, "w", w.len(), numel(OP, &[out_f, in_f])?)?;
        if let Some(b) = b {
            check_len(OP, "b", b.len(), out_f)?;
        }
        check_len(OP, "y", y.len(), numel(OP, &[n, out_f])?)?;
        if y.is_empty() {
            return Ok(());
        }
        y.par_chunks_mut(out_f).enumerate().for_each(|(i, y_row)| {
            let x_row = &x[i * in_f..][..in_f];
            for (o, y) in y_row.iter_mut().enumerate() {
                let w_row = &w[o * in_f..][..in_f];
                let dot: f32 = x_row.iter().zip(w_row).map(|(&a, &b)| a * b).sum();
                *y = b.map_or(0.0, |b| b[o]) + dot;
            }
        });
        Ok(())
    }

    /// Checks the slice lengths of a linear backward.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn check_backward(
        op: &'static str,
        n: usize,
        in_f: usize,
        out_f: usize,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: &[f32],
        dw: &[f32],
        db: &Option<&mut [f32]>,
    ) -> Result<()> {
        let x_len = numel(op, &[n, in_f])?;
        let w_len = numel(op, &[out_f, in_f])?;
        check_len(op, "x", x.len(), x_len)?;
        check_len(op, "w", w.len(), w_len)?;
        check_len(op, "dy", dy.len(), numel(op, &[n, out_f])?)?;
        check_len(op, "dx", dx.len(), x_len)?;
        check_len(op, "dw", dw.len(), w_len)?;
        if let Some(db) = db {
            check_len(op, "db", db.len(), out_f)?;
        }
        Ok(())
    }

    /// `db[o] = Σ_i dy[i, o]`, in increasing i.
    pub(super) fn bias_grad(n: usize, out_f: usize, dy: &[f32], db: &mut [f32]) {
        db.par_iter_mut().enumerate().for_each(|(o, d)| {
            *d = (0..n).map(|i| dy[i * out_f + o]).sum();
        });
    }

    /// Linear backward, the specification of
    /// [`linear_backward`](super::linear_backward): `dx[i, k] = Σ_o dy[i, o] ·
    /// w[o, k]` in increasing o, `dw[o, k] = Σ_i dy[i, o] · x[i, k]` in
    /// increasing i, each from zero with one multiply and one add per step,
    /// and `db[o] = Σ_i dy[i, o]`; rayon over rows of `dx` and of `dw`.
    ///
    /// Shapes: `x` `[n, in_f]`, `w` `[out_f, in_f]`, `dy` `[n, out_f]`, `dx`
    /// `[n, in_f]`, `dw` `[out_f, in_f]`, `db` `[out_f]` (all overwritten); a
    /// wrong length is an [`Error::Shape`](crate::Error::Shape).
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
        const OP: &str = "reference::linear_backward";
        check_backward(OP, n, in_f, out_f, x, w, dy, dx, dw, &db)?;
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
            bias_grad(n, out_f, dy, db);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_data as data;
    use super::*;
    use std::time::Instant;

    /// [`reference::linear`] with a bias, into a new buffer.
    fn naive(n: usize, in_f: usize, out_f: usize, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0; n * out_f];
        reference::linear(n, in_f, out_f, x, w, Some(b), &mut y).unwrap();
        y
    }

    /// Sizes around every GEMM kernel's strips and blocks, one seed per case
    /// (in the message). The exact kernel sums the same products in the same
    /// order as the loop, so equal outputs; an FMA kernel rounds each step
    /// once: both are within `γ_{in_f+1}·(|b| + Σ|x||w|)` of the exact value,
    /// so they may differ by twice that (1 % more for the magnitude's own
    /// rounding).
    #[test]
    fn gemm_equals_the_plain_loop() {
        let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
        let mut seed = 0u64;
        for kernel in Kernel::all() {
            let mr = kernel.mr();
            for n in [1, 3, mr, 2 * mr + 1, 37] {
                for in_f in [0, 1, 17, 300, 513] {
                    for out_f in [1, 5, NR, NR + 3, 70] {
                        seed += 1;
                        let x = data(seed, n * in_f);
                        let w = data(seed + 1000, out_f * in_f);
                        let b = data(seed + 2000, out_f);
                        let want = naive(n, in_f, out_f, &x, &w, &b);
                        let mag = naive(n, in_f, out_f, &abs(&x), &abs(&w), &abs(&b));
                        let mut y = vec![f32::NAN; n * out_f];
                        linear_forward_with(kernel, n, in_f, out_f, &x, &w, Some(&b), &mut y)
                            .unwrap();
                        let ku = (in_f + 1) as f64 * f64::from(f32::EPSILON) / 2.0;
                        let gamma = ku / (1.0 - ku);
                        for (j, ((&g, &r), &m)) in y.iter().zip(&want).zip(&mag).enumerate() {
                            let at = format!("{kernel:?}, seed {seed}: n {n}, in {in_f}, out {out_f}: y[{j}] = {g}, loop gives {r}");
                            if kernel.path() == gemm::Path::Exact {
                                assert!(g == r, "{at}");
                            } else {
                                let err = (f64::from(g) - f64::from(r)).abs();
                                assert!(err <= 2.02 * gamma * f64::from(m), "{at}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// The backward's GEMMs against [`reference::linear_backward`] on sizes
    /// around the strips and blocks (empty dimensions included): equal on
    /// the exact path; on an FMA path each of `dx` (depth `out_f`) and `dw`
    /// (depth `n`) within twice `γ_{depth+1}` of the magnitude (as the
    /// forward's test); `db` is the same loop, so equal everywhere.
    #[test]
    fn backward_gemm_equals_the_plain_loop() {
        let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
        let run = |kernel: Option<Kernel>, (n, in_f, out_f), x: &[f32], w: &[f32], dy: &[f32]| {
            let (mut dx, mut dw, mut db) = (
                vec![f32::NAN; n * in_f],
                vec![f32::NAN; out_f * in_f],
                vec![f32::NAN; out_f],
            );
            match kernel {
                Some(k) => linear_backward_with(
                    k,
                    n,
                    in_f,
                    out_f,
                    x,
                    w,
                    dy,
                    &mut dx,
                    &mut dw,
                    Some(&mut db),
                ),
                None => reference::linear_backward(
                    n,
                    in_f,
                    out_f,
                    x,
                    w,
                    dy,
                    &mut dx,
                    &mut dw,
                    Some(&mut db),
                ),
            }
            .unwrap();
            [dx, dw, db]
        };
        let mut seed = 50_000u64;
        for kernel in Kernel::all() {
            let mr = kernel.mr();
            for n in [0, 1, 3, mr + 1, 2 * mr + 5, 300] {
                for in_f in [0, 1, 17, NR, 9 * NR + 3] {
                    for out_f in [0, 1, 2, mr + 3, 70] {
                        seed += 1;
                        let shape = (n, in_f, out_f);
                        let x = data(seed, n * in_f);
                        let w = data(seed + 1, out_f * in_f);
                        let dy = data(seed + 2, n * out_f);
                        let got = run(Some(kernel), shape, &x, &w, &dy);
                        let want = run(None, shape, &x, &w, &dy);
                        let mag = run(None, shape, &abs(&x), &abs(&w), &abs(&dy));
                        for (what, depth, g, r, m) in [
                            ("dx", out_f, &got[0], &want[0], &mag[0]),
                            ("dw", n, &got[1], &want[1], &mag[1]),
                            ("db", 0, &got[2], &want[2], &mag[2]),
                        ] {
                            let ku = (depth + 1) as f64 * f64::from(f32::EPSILON) / 2.0;
                            let gamma = ku / (1.0 - ku);
                            let exact = kernel.path() == gemm::Path::Exact || what == "db";
                            for (j, ((&g, &r), &m)) in g.iter().zip(r).zip(m).enumerate() {
                                let at = format!("{kernel:?}, seed {seed}, {shape:?}: {what}[{j}] = {g}, loop gives {r}");
                                if exact {
                                    assert!(g.to_bits() == r.to_bits(), "{at}");
                                } else {
                                    let err = (f64::from(g) - f64::from(r)).abs();
                                    assert!(err <= 2.02 * gamma * f64::from(m), "{at}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// GFLOP/s of the plain loop and of the GEMM on the DenseNet head's shape.
    /// Run in release: `cargo test --release --lib cpu::linear -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing; run in release with --nocapture"]
    fn throughput_against_the_plain_loop() {
        let (n, in_f, out_f) = (256, 1024, 64);
        let (x, w, b) = (data(1, n * in_f), data(2, out_f * in_f), data(3, out_f));
        let mut y = vec![0.0; n * out_f];
        let time = |f: &mut dyn FnMut()| {
            f();
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        let naive_s = time(&mut || y = naive(n, in_f, out_f, &x, &w, &b));
        let gemm_s =
            time(&mut || linear_forward(n, in_f, out_f, &x, &w, Some(&b), &mut y).unwrap());
        let flops = 2.0 * (n * in_f * out_f) as f64;
        println!(
            "linear_256x1024x64   plain loop {:6.1} GFLOP/s   gemm {:6.1} GFLOP/s",
            flops / naive_s / 1e9,
            flops / gemm_s / 1e9
        );
    }
}
