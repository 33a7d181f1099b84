//! Fully connected layer (PyTorch's `Linear`): `y = x·Wᵀ + b`. On CUDA and
//! emulated devices it runs the conv2d implicit-GEMM kernel of
//! `kernels/conv.cu` as a 1×1 conv over `[n, in, 1, 1]`, whose NCHW output
//! `[n, out, 1, 1]` is exactly `[n, out]`. CPU reference:
//! `crate::cpu::linear_forward`.

use super::conv::{check_bias, launch_conv2d, Conv2dKernel};
use super::{expect_shape, on_device};
use crate::backend::Backend;
use crate::cpu;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::geometry::{Conv2dGeom, Conv2dParams};
use crate::tensor::Tensor;

/// `(n, in, out)` from x `[n, in]` and w `[out, in]`, or a shape error.
fn linear_dims(op: &'static str, x: &Tensor, w: &Tensor) -> Result<(usize, usize, usize)> {
    match (x.shape(), w.shape()) {
        (&[n, in_f], &[out_f, w_in]) if w_in == in_f => Ok((n, in_f, out_f)),
        (&[_, in_f], &[_, w_in]) => Err(Error::shape(
            op,
            format!(
                "input {:?} has {in_f} features but weight {:?} expects {w_in}",
                x.shape(),
                w.shape()
            ),
        )),
        _ => Err(Error::shape(
            op,
            format!(
                "input must be [n, in] and weight [out, in], got input {:?} and weight {:?}",
                x.shape(),
                w.shape()
            ),
        )),
    }
}

/// Linear layer: x `[n, in]`, w `[out, in]`, optional bias `[out]` →
/// `[n, out]`, `y[i, o] = b[o] + Σ_k x[i, k]·w[o, k]`.
pub fn linear(be: &Backend, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (n, _, out_f) = linear_dims("linear", x, w)?;
    let mut y = Tensor::zeros(be, &[n, out_f])?;
    linear_into(be, x, w, b, &mut y)?;
    Ok(y)
}

/// [`linear`] into a preallocated `y` `[n, out]`.
pub fn linear_into(
    be: &Backend,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    y: &mut Tensor,
) -> Result<()> {
    const OP: &str = "linear";
    on_device(OP, be, &[x, w, y])?;
    let (n, in_f, out_f) = linear_dims(OP, x, w)?;
    check_bias(OP, be, b, out_f)?;
    expect_shape(OP, "output", y, &[n, out_f])?;
    if be.device() == Device::Cpu {
        let b = b.map(|b| b.host_for(OP)).transpose()?;
        return cpu::linear_forward(
            n,
            in_f,
            out_f,
            x.host_for(OP)?,
            w.host_for(OP)?,
            b,
            y.host_mut_for(OP)?,
        );
    }
    let g = Conv2dGeom::new(
        &[n, in_f, 1, 1],
        &[out_f, in_f, 1, 1],
        Conv2dParams::new(1, 0),
    )?;
    launch_conv2d(OP, be, &g, Conv2dKernel::Gemm, x, w, b, y)
}
