//! Element-wise ops, and the helpers the activations share.

use super::check_len;
use crate::error::Result;
use rayon::prelude::*;

/// `y[i] = f(x[i])` after checking that `y` matches `x`.
pub(super) fn map1(
    op: &'static str,
    x: &[f32],
    y: &mut [f32],
    f: impl Fn(f32) -> f32 + Sync,
) -> Result<()> {
    check_len(op, "y", y.len(), x.len())?;
    y.par_iter_mut().zip(x).for_each(|(y, &x)| *y = f(x));
    Ok(())
}

/// `out[i] = f(a[i], b[i])` after checking that `b` and `out` match `a`.
pub(super) fn map2(
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

/// Element-wise sum `y = a + b` (all three the same length), e.g. a residual
/// connection. It is its own backward: the gradient of each input is `dy`
/// itself, so no `add_backward` exists; callers pass `dy` on to both branches.
pub fn add_forward(a: &[f32], b: &[f32], y: &mut [f32]) -> Result<()> {
    map2("add_forward", a, ("b", b), ("y", y), |a, b| a + b)
}
