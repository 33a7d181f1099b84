//! BatchNorm inference with running statistics, plain and fused with the
//! ReLU that follows it. Kernels: `kernels/norm.cu`; CPU reference:
//! `crate::cpu::norm`.

use super::{expect_shape, i64_arg, on_device, plane_cfg};
use crate::backend::{Backend, KernelArg};
use crate::cpu;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// `(n, c, hw)` of a BatchNorm input `[n, c, ...]` after checking the four
/// per-channel vectors are `[c]`.
fn bn_dims(
    op: &'static str,
    x: &Tensor,
    per_channel: [(&str, &Tensor); 4],
) -> Result<(usize, usize, usize)> {
    let (n, c, rest) = match x.shape() {
        [n, c, rest @ ..] => (*n, *c, rest),
        s => {
            return Err(Error::shape(
                op,
                format!("input must be [n, c, ...], got shape {s:?}"),
            ))
        }
    };
    for (name, t) in per_channel {
        if t.shape() != [c] {
            return Err(Error::shape(
                op,
                format!(
                    "{name} has shape {:?}, expected [{c}] for input {:?}",
                    t.shape(),
                    x.shape()
                ),
            ));
        }
    }
    Ok((n, c, rest.iter().product()))
}

/// BatchNorm inference with running statistics, optionally followed by ReLU.
#[allow(clippy::too_many_arguments)]
fn batchnorm_impl(
    op: &'static str,
    relu: bool,
    be: &Backend,
    x: &Tensor,
    [gamma, beta, mean, var]: [&Tensor; 4],
    eps: f32,
    y: &mut Tensor,
) -> Result<()> {
    on_device(op, be, &[x, gamma, beta, mean, var, y])?;
    let (n, c, hw) = bn_dims(
        op,
        x,
        [
            ("gamma", gamma),
            ("beta", beta),
            ("mean", mean),
            ("var", var),
        ],
    )?;
    expect_shape(op, "output", y, x.shape())?;
    if be.device() == Device::Cpu {
        let out = y.host_mut_for(op)?;
        cpu::batchnorm_forward(
            n,
            c,
            hw,
            x.host_for(op)?,
            gamma.host_for(op)?,
            beta.host_for(op)?,
            mean.host_for(op)?,
            var.host_for(op)?,
            eps,
            out,
        )?;
        if relu {
            // ReLU in place: each value is read before it is overwritten.
            out.iter_mut().filter(|v| **v < 0.0).for_each(|v| *v = 0.0);
        }
        return Ok(());
    }
    if x.numel() == 0 {
        return Ok(());
    }
    let planes = n * c;
    let args = [
        x.arg(),
        gamma.arg(),
        beta.arg(),
        mean.arg(),
        var.arg(),
        KernelArg::F32(eps),
        y.arg_mut(),
        KernelArg::int("channels", c)?,
        i64_arg("plane size", hw)?,
        i64_arg("planes", planes)?,
    ];
    let name = if relu {
        "batchnorm_relu_f32"
    } else {
        "batchnorm_f32"
    };
    // SAFETY: x and y hold n·c·hw f32 and gamma, beta, mean, var hold c f32
    // each, all on be's device (checked above) and outliving the launch; the
    // kernel's parameters are (const float* x, gamma, beta, mean, var, float
    // eps, float* y, int c, long long hw, long long planes) and it touches
    // planes p < n·c, in-plane indices < hw and channels p % c only.
    unsafe { be.launch(name, plane_cfg(hw, planes), &args) }
}

/// BatchNorm inference: `y = (x − mean) / √(var + eps) · gamma + beta` per
/// channel. Shapes: `x` `[n, c, ...]` (NCHW or `[n, c]`), `gamma`, `beta`,
/// `mean`, `var` `[c]`.
pub fn batchnorm(
    be: &Backend,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let mut y = Tensor::zeros(be, x.shape())?;
    batchnorm_into(be, x, gamma, beta, mean, var, eps, &mut y)?;
    Ok(y)
}

/// [`batchnorm`] into a preallocated `y` of `x`'s shape.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_into(
    be: &Backend,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
    y: &mut Tensor,
) -> Result<()> {
    batchnorm_impl("batchnorm", false, be, x, [gamma, beta, mean, var], eps, y)
}

/// [`batchnorm`] followed by ReLU in one pass (DenseNet's BN → ReLU).
pub fn batchnorm_relu(
    be: &Backend,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let mut y = Tensor::zeros(be, x.shape())?;
    batchnorm_relu_into(be, x, gamma, beta, mean, var, eps, &mut y)?;
    Ok(y)
}

/// [`batchnorm_relu`] into a preallocated `y` of `x`'s shape.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_relu_into(
    be: &Backend,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
    y: &mut Tensor,
) -> Result<()> {
    batchnorm_impl(
        "batchnorm_relu",
        true,
        be,
        x,
        [gamma, beta, mean, var],
        eps,
        y,
    )
}
