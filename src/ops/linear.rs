//! Fully connected layer (PyTorch's `Linear`): `y = x·Wᵀ + b`. On CUDA and
//! emulated devices it runs the conv2d implicit-GEMM kernel of
//! `kernels/conv.cu` as a 1×1 conv over `[n, in, 1, 1]`, whose NCHW output
//! `[n, out, 1, 1]` is exactly `[n, out]`; its backward likewise runs the
//! conv2d backward kernels (`kernels/conv.cu`, `kernels/conv_backward.cu`)
//! as a 1×1 conv. CPU reference: `crate::cpu::linear`.

use super::conv::{check_bias, conv2d_backward_device, launch_conv2d, Conv2dKernel, ConvGrads};
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

/// Backward of [`linear`]: from `x` `[n, in]`, `w` `[out, in]` and `dy`
/// `[n, out]`, `dx = dy·W` `[n, in]`, `dW = dyᵀ·x` `[out, in]` and, when
/// `bias`, `db = Σ_i dy[i]` `[out]`. On CUDA and emulated devices these are
/// the conv2d backward kernels on a 1×1 conv over `[n, in, 1, 1]`: `dx` on
/// the transposed-conv implicit GEMM (K = out, summed in increasing order),
/// `dW` and `db` summed over the batch in the fixed chunks of
/// [`conv_grad_chunks`](super::conv_grad_chunks) (`k = n`) reduced in a
/// fixed order, no atomics: the same bits on every run and GPU. The CPU
/// device runs [`cpu::linear_backward`].
pub fn linear_backward(
    be: &Backend,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    bias: bool,
) -> Result<ConvGrads> {
    let (_, _, out_f) = linear_dims("linear_backward", x, w)?;
    let mut grads = ConvGrads::zeros(be, x, w, bias.then_some(out_f))?;
    let ConvGrads { dx, dw, db } = &mut grads;
    linear_backward_into(be, x, w, dy, dx, dw, db.as_mut())?;
    Ok(grads)
}

/// [`linear_backward`] into preallocated `dx` `[n, in]`, `dw` `[out, in]`
/// and `db` `[out]` (all overwritten).
pub fn linear_backward_into(
    be: &Backend,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    dx: &mut Tensor,
    dw: &mut Tensor,
    db: Option<&mut Tensor>,
) -> Result<()> {
    const OP: &str = "linear_backward";
    on_device(OP, be, &[x, w, dy, dx, dw])?;
    let (n, in_f, out_f) = linear_dims(OP, x, w)?;
    expect_shape(OP, "dy", dy, &[n, out_f])?;
    expect_shape(OP, "dx", dx, x.shape())?;
    expect_shape(OP, "dw", dw, w.shape())?;
    if let Some(db) = db.as_deref() {
        on_device(OP, be, &[db])?;
        expect_shape(OP, "db", db, &[out_f])?;
    }
    if be.device() == Device::Cpu {
        let db = db.map(|d| d.host_mut_for(OP)).transpose()?;
        return cpu::linear_backward(
            n,
            in_f,
            out_f,
            x.host_for(OP)?,
            w.host_for(OP)?,
            dy.host_for(OP)?,
            dx.host_mut_for(OP)?,
            dw.host_mut_for(OP)?,
            db,
        );
    }
    let g = Conv2dGeom::new(
        &[n, in_f, 1, 1],
        &[out_f, in_f, 1, 1],
        Conv2dParams::new(1, 0),
    )?;
    conv2d_backward_device(OP, be, &g, x, w, dy, dx, dw, db)
}
