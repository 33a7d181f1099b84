//! Activations and the other element-wise ops: ReLU (also in place),
//! LeakyReLU, sigmoid, softmax over any axis, the residual add and dropout;
//! and the backward passes of ReLU, LeakyReLU, sigmoid and dropout.
//! Kernels: `kernels/activation.cu`; CPU reference: `crate::cpu::activation`.

use super::{expect_shape, i64_arg, on_device, stride_cfg, MAX_BLOCKS, THREADS};
use crate::backend::{Backend, KernelArg, LaunchCfg};
use crate::cpu;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{check_device, Tensor};

/// Launches a flat kernel `name(const float* x, float* y, [extra], long long n)`.
fn launch_unary(
    be: &Backend,
    name: &str,
    x: &Tensor,
    y: &mut Tensor,
    extra: Option<KernelArg>,
) -> Result<()> {
    let n = x.numel();
    if n == 0 {
        return Ok(());
    }
    let mut args = vec![x.arg(), y.arg_mut()];
    args.extend(extra);
    args.push(i64_arg("numel", n)?);
    // SAFETY: the callers checked that x and y live on be's device with the
    // same shape (n f32 each) and they outlive the launch; every kernel
    // launched here is (const float*, float*, [float], long long n), matching
    // `extra`, and touches indices < n only.
    unsafe { be.launch(name, stride_cfg(n), &args) }
}

/// Checks devices and that `y` has `x`'s shape.
fn check_unary(op: &'static str, be: &Backend, x: &Tensor, y: &Tensor) -> Result<()> {
    on_device(op, be, &[x, y])?;
    expect_shape(op, "output", y, x.shape())
}

/// ReLU: `y = max(x, 0)` (NaN passes through). Shapes: any.
pub fn relu(be: &Backend, x: &Tensor) -> Result<Tensor> {
    let mut y = Tensor::zeros(be, x.shape())?;
    relu_into(be, x, &mut y)?;
    Ok(y)
}

/// [`relu`] into a preallocated `y` of `x`'s shape.
pub fn relu_into(be: &Backend, x: &Tensor, y: &mut Tensor) -> Result<()> {
    const OP: &str = "relu";
    check_unary(OP, be, x, y)?;
    if be.device() == Device::Cpu {
        return cpu::relu_forward(x.host_for(OP)?, y.host_mut_for(OP)?);
    }
    launch_unary(be, "relu_f32", x, y, None)
}

/// [`relu`] overwriting `x`.
pub fn relu_inplace(be: &Backend, x: &mut Tensor) -> Result<()> {
    const OP: &str = "relu_inplace";
    check_device(OP, be, x)?;
    if be.device() == Device::Cpu {
        // The reference takes distinct input and output slices.
        let src = x.host_for(OP)?.to_vec();
        return cpu::relu_forward(&src, x.host_mut_for(OP)?);
    }
    let n = x.numel();
    if n == 0 {
        return Ok(());
    }
    let args = [x.arg_mut(), i64_arg("numel", n)?];
    // SAFETY: x holds n f32 on be's device (checked above) and outlives the
    // launch; relu_inplace_f32(float*, long long) touches indices < n only.
    unsafe { be.launch("relu_inplace_f32", stride_cfg(n), &args) }
}

/// LeakyReLU: `y = x` where `x > 0`, else `slope · x`. Shapes: any.
pub fn leaky_relu(be: &Backend, x: &Tensor, slope: f32) -> Result<Tensor> {
    let mut y = Tensor::zeros(be, x.shape())?;
    leaky_relu_into(be, x, slope, &mut y)?;
    Ok(y)
}

/// [`leaky_relu`] into a preallocated `y` of `x`'s shape.
pub fn leaky_relu_into(be: &Backend, x: &Tensor, slope: f32, y: &mut Tensor) -> Result<()> {
    const OP: &str = "leaky_relu";
    check_unary(OP, be, x, y)?;
    if be.device() == Device::Cpu {
        return cpu::leaky_relu_forward(slope, x.host_for(OP)?, y.host_mut_for(OP)?);
    }
    launch_unary(be, "leaky_relu_f32", x, y, Some(KernelArg::F32(slope)))
}

/// Sigmoid: `y = 1 / (1 + e^(−x))`. Shapes: any.
pub fn sigmoid(be: &Backend, x: &Tensor) -> Result<Tensor> {
    let mut y = Tensor::zeros(be, x.shape())?;
    sigmoid_into(be, x, &mut y)?;
    Ok(y)
}

/// [`sigmoid`] into a preallocated `y` of `x`'s shape.
pub fn sigmoid_into(be: &Backend, x: &Tensor, y: &mut Tensor) -> Result<()> {
    const OP: &str = "sigmoid";
    check_unary(OP, be, x, y)?;
    if be.device() == Device::Cpu {
        return cpu::sigmoid_forward(x.host_for(OP)?, y.host_mut_for(OP)?);
    }
    launch_unary(be, "sigmoid_f32", x, y, None)
}

/// Dropout in training mode: `y = x · mask / (1 − p)`, element `i` kept
/// when [`crate::rng::dropout_keep`]`(seed, step, i, p)` (a stateless
/// counter-based draw: the mask of a step is a function of `seed`, `step`
/// and the flat index alone, the same bits on every device). A dropped
/// element is `x · 0`, so NaN propagates; `p = 0` is the identity and `p`
/// outside [0, 1) an [`Error::Invalid`]. Shapes: any.
pub fn dropout(be: &Backend, x: &Tensor, seed: u64, step: u64, p: f32) -> Result<Tensor> {
    let mut y = Tensor::zeros(be, x.shape())?;
    dropout_into(be, x, seed, step, p, &mut y)?;
    Ok(y)
}

/// [`dropout`] into a preallocated `y` of `x`'s shape.
pub fn dropout_into(
    be: &Backend,
    x: &Tensor,
    seed: u64,
    step: u64,
    p: f32,
    y: &mut Tensor,
) -> Result<()> {
    dropout_impl("dropout", be, x, (seed, step, p), y)
}

/// Backward of [`dropout`]: `dx = dy · mask / (1 − p)` with the forward's
/// mask (pass the forward's `seed`, `step` and `p`).
pub fn dropout_backward(be: &Backend, dy: &Tensor, seed: u64, step: u64, p: f32) -> Result<Tensor> {
    let mut dx = Tensor::zeros(be, dy.shape())?;
    dropout_backward_into(be, dy, seed, step, p, &mut dx)?;
    Ok(dx)
}

/// [`dropout_backward`] into a preallocated `dx` of `dy`'s shape.
pub fn dropout_backward_into(
    be: &Backend,
    dy: &Tensor,
    seed: u64,
    step: u64,
    p: f32,
    dx: &mut Tensor,
) -> Result<()> {
    dropout_impl("dropout_backward", be, dy, (seed, step, p), dx)
}

/// Both directions of dropout: `out = v · mask / (1 − p)`.
fn dropout_impl(
    op: &'static str,
    be: &Backend,
    v: &Tensor,
    (seed, step, p): (u64, u64, f32),
    out: &mut Tensor,
) -> Result<()> {
    check_unary(op, be, v, out)?;
    let scale = cpu::dropout_scale(p)?;
    if be.device() == Device::Cpu {
        let (v, out) = (v.host_for(op)?, out.host_mut_for(op)?);
        return if op == "dropout" {
            cpu::dropout_forward(seed, step, p, v, out)
        } else {
            cpu::dropout_backward(seed, step, p, v, out)
        };
    }
    let n = v.numel();
    if n == 0 {
        return Ok(());
    }
    let args = [
        v.arg(),
        out.arg_mut(),
        KernelArg::U64(seed),
        KernelArg::U64(step),
        KernelArg::F32(p),
        KernelArg::F32(scale),
        i64_arg("numel", n)?,
    ];
    // SAFETY: v and out live on be's device with the same shape (n f32 each,
    // checked above) and outlive the launch; dropout_f32(const float* x,
    // float* y, unsigned long long seed, unsigned long long step, float p,
    // float scale, long long n) touches indices < n only.
    unsafe { be.launch("dropout_f32", stride_cfg(n), &args) }
}

/// Checks devices and that `dy` and `dx` have the shape of `saved` (the
/// forward input or output the backward pass reads).
fn check_backward(
    op: &'static str,
    be: &Backend,
    saved: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
) -> Result<()> {
    on_device(op, be, &[saved, dy, dx])?;
    expect_shape(op, "dy", dy, saved.shape())?;
    expect_shape(op, "dx", dx, saved.shape())
}

/// Launches a flat backward kernel
/// `name(const float* saved, const float* dy, float* dx, [extra], long long n)`.
fn launch_backward(
    be: &Backend,
    name: &str,
    saved: &Tensor,
    dy: &Tensor,
    dx: &mut Tensor,
    extra: Option<KernelArg>,
) -> Result<()> {
    let n = saved.numel();
    if n == 0 {
        return Ok(());
    }
    let mut args = vec![saved.arg(), dy.arg(), dx.arg_mut()];
    args.extend(extra);
    args.push(i64_arg("numel", n)?);
    // SAFETY: the callers checked (check_backward) that saved, dy and dx live
    // on be's device with the same shape (n f32 each) and they outlive the
    // launch; every kernel launched here is (const float*, const float*,
    // float*, [float], long long n) — relu_backward_f32, sigmoid_backward_f32,
    // and leaky_relu_backward_f32 with `extra` = slope — and touches indices
    // < n only.
    unsafe { be.launch(name, stride_cfg(n), &args) }
}

/// ReLU backward: `dx = dy` where `x > 0`, else 0 (PyTorch's choice at 0).
/// `x` is the forward input; `dy` and the result have its shape.
pub fn relu_backward(be: &Backend, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let mut dx = Tensor::zeros(be, x.shape())?;
    relu_backward_into(be, x, dy, &mut dx)?;
    Ok(dx)
}

/// [`relu_backward`] into a preallocated `dx` of `x`'s shape.
pub fn relu_backward_into(be: &Backend, x: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    const OP: &str = "relu_backward";
    check_backward(OP, be, x, dy, dx)?;
    if be.device() == Device::Cpu {
        return cpu::relu_backward(x.host_for(OP)?, dy.host_for(OP)?, dx.host_mut_for(OP)?);
    }
    launch_backward(be, "relu_backward_f32", x, dy, dx, None)
}

/// LeakyReLU backward: `dx = dy` where `x > 0`, else `slope · dy`. `x` is
/// the forward input; `dy` and the result have its shape.
pub fn leaky_relu_backward(be: &Backend, x: &Tensor, dy: &Tensor, slope: f32) -> Result<Tensor> {
    let mut dx = Tensor::zeros(be, x.shape())?;
    leaky_relu_backward_into(be, x, dy, slope, &mut dx)?;
    Ok(dx)
}

/// [`leaky_relu_backward`] into a preallocated `dx` of `x`'s shape.
pub fn leaky_relu_backward_into(
    be: &Backend,
    x: &Tensor,
    dy: &Tensor,
    slope: f32,
    dx: &mut Tensor,
) -> Result<()> {
    const OP: &str = "leaky_relu_backward";
    check_backward(OP, be, x, dy, dx)?;
    if be.device() == Device::Cpu {
        return cpu::leaky_relu_backward(
            slope,
            x.host_for(OP)?,
            dy.host_for(OP)?,
            dx.host_mut_for(OP)?,
        );
    }
    launch_backward(
        be,
        "leaky_relu_backward_f32",
        x,
        dy,
        dx,
        Some(KernelArg::F32(slope)),
    )
}

/// Sigmoid backward from the forward output `y`: `dx = dy · y · (1 − y)`.
/// `dy` and the result have `y`'s shape.
pub fn sigmoid_backward(be: &Backend, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let mut dx = Tensor::zeros(be, y.shape())?;
    sigmoid_backward_into(be, y, dy, &mut dx)?;
    Ok(dx)
}

/// [`sigmoid_backward`] into a preallocated `dx` of `y`'s shape.
pub fn sigmoid_backward_into(be: &Backend, y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    const OP: &str = "sigmoid_backward";
    check_backward(OP, be, y, dy, dx)?;
    if be.device() == Device::Cpu {
        return cpu::sigmoid_backward(y.host_for(OP)?, dy.host_for(OP)?, dx.host_mut_for(OP)?);
    }
    launch_backward(be, "sigmoid_backward_f32", y, dy, dx, None)
}

/// Element-wise sum `y = a + b` (a residual connection). `a` and `b` must
/// have the same shape (no broadcasting).
pub fn add(be: &Backend, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let mut y = Tensor::zeros(be, a.shape())?;
    add_into(be, a, b, &mut y)?;
    Ok(y)
}

/// [`add`] into a preallocated `y` of the inputs' shape.
pub fn add_into(be: &Backend, a: &Tensor, b: &Tensor, y: &mut Tensor) -> Result<()> {
    const OP: &str = "add";
    on_device(OP, be, &[a, b, y])?;
    if a.shape() != b.shape() {
        return Err(Error::shape(
            OP,
            format!(
                "a has shape {:?} but b has shape {:?}",
                a.shape(),
                b.shape()
            ),
        ));
    }
    expect_shape(OP, "output", y, a.shape())?;
    if be.device() == Device::Cpu {
        return cpu::add_forward(a.host_for(OP)?, b.host_for(OP)?, y.host_mut_for(OP)?);
    }
    let n = a.numel();
    if n == 0 {
        return Ok(());
    }
    let args = [a.arg(), b.arg(), y.arg_mut(), i64_arg("numel", n)?];
    // SAFETY: a, b and y hold n f32 each on be's device (checked above) and
    // outlive the launch; add_f32(const float*, const float*, float*,
    // long long n) touches indices < n only.
    unsafe { be.launch("add_f32", stride_cfg(n), &args) }
}

/// Softmax over `axis` of an n-d tensor (the maximum is subtracted first).
/// Shapes: any with `axis < rank`; the output has `x`'s shape.
pub fn softmax(be: &Backend, x: &Tensor, axis: usize) -> Result<Tensor> {
    let mut y = Tensor::zeros(be, x.shape())?;
    softmax_into(be, x, axis, &mut y)?;
    Ok(y)
}

/// [`softmax`] into a preallocated `y` of `x`'s shape.
pub fn softmax_into(be: &Backend, x: &Tensor, axis: usize, y: &mut Tensor) -> Result<()> {
    const OP: &str = "softmax";
    check_unary(OP, be, x, y)?;
    let shape = x.shape();
    let Some(&dim) = shape.get(axis) else {
        return Err(Error::shape(
            OP,
            format!("axis {axis} is out of range for shape {shape:?}"),
        ));
    };
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    if be.device() == Device::Cpu {
        return cpu::softmax_forward(outer, dim, inner, x.host_for(OP)?, y.host_mut_for(OP)?);
    }
    if x.numel() == 0 {
        return Ok(());
    }
    if inner == 1 {
        // One warp per row, 8 rows per block.
        let warps = THREADS as usize / 32;
        let cfg = LaunchCfg {
            grid: (outer.div_ceil(warps).clamp(1, MAX_BLOCKS) as u32, 1, 1),
            block: (THREADS, 1, 1),
            shared_bytes: 0,
        };
        let args = [
            x.arg(),
            y.arg_mut(),
            i64_arg("rows", outer)?,
            i64_arg("dim", dim)?,
        ];
        // SAFETY: x and y hold outer·dim f32 on be's device (checked above)
        // and outlive the launch; softmax_rows_f32(const float*, float*,
        // long long rows, long long dim) touches rows < outer and columns
        // < dim only.
        unsafe { be.launch("softmax_rows_f32", cfg, &args) }
    } else {
        let args = [
            x.arg(),
            y.arg_mut(),
            i64_arg("outer", outer)?,
            i64_arg("dim", dim)?,
            i64_arg("inner", inner)?,
        ];
        // SAFETY: x and y hold outer·dim·inner f32 on be's device (checked
        // above) and outlive the launch; softmax_cols_f32(const float*,
        // float*, long long outer, dim, inner) touches indices
        // < outer·dim·inner only.
        unsafe { be.launch("softmax_cols_f32", stride_cfg(outer * inner), &args) }
    }
}
