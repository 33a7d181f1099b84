//! Element-wise and per-row ops: ReLU, LeakyReLU, sigmoid, residual add,
//! BatchNorm inference (plain and fused with ReLU), softmax over any axis and
//! channel concatenation. Kernels: `kernels/elementwise.cu`; CPU reference:
//! `crate::cpu::{activation, elementwise, norm, layout}`.

use super::{expect_shape, on_device};
use crate::backend::{Backend, KernelArg, LaunchCfg};
use crate::cpu;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{check_device, Tensor};

/// Threads per block of the 1-D grid-stride kernels.
const THREADS: u32 = 256;
/// Grid cap of the grid-stride kernels: 8192 blocks of 256 threads fill every
/// SM of current GPUs many times over; the kernels' loops cover the rest.
const MAX_BLOCKS: usize = 8192;
/// The hardware limit on `grid.y`.
const MAX_GRID_Y: usize = 65535;

/// A 1-D grid-stride launch over `n` items.
pub(super) fn stride_cfg(n: usize) -> LaunchCfg {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS);
    LaunchCfg {
        grid: (blocks as u32, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    }
}

/// A launch with `planes` on `grid.y` and the `len` items of one plane on
/// `block.x`/`grid.x` (both grid-stride in the kernels). The block is sized
/// to the plane (a multiple of 32, at most 256) so small planes (7×7 in
/// DenseNet's last block) do not leave most threads idle.
pub(super) fn plane_cfg(len: usize, planes: usize) -> LaunchCfg {
    let threads = len.div_ceil(32).clamp(1, THREADS as usize / 32) * 32;
    let blocks_x = len.div_ceil(threads).clamp(1, MAX_BLOCKS);
    LaunchCfg {
        grid: (blocks_x as u32, planes.clamp(1, MAX_GRID_Y) as u32, 1),
        block: (threads as u32, 1, 1),
        shared_bytes: 0,
    }
}

/// A size as a kernel `long long`.
pub(super) fn i64_arg(what: &str, v: usize) -> Result<KernelArg> {
    i64::try_from(v).map(KernelArg::I64).map_err(|_| {
        Error::invalid(format!(
            "{what} = {v} does not fit a 64-bit kernel argument"
        ))
    })
}

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

/// `(n, c, hw)` of a tensor `[n, c, ...]`, naming `what` in errors.
fn channel_dims(op: &'static str, what: &str, t: &Tensor) -> Result<(usize, usize, usize)> {
    match t.shape() {
        [n, c, rest @ ..] => Ok((*n, *c, rest.iter().product())),
        s => Err(Error::shape(
            op,
            format!("{what} must be [n, c, ...], got shape {s:?}"),
        )),
    }
}

/// Concatenates tensors `[n, c_i, ...]` along the channel axis into a new
/// `[n, Σ c_i, ...]`. All inputs must agree on every axis but the channels.
pub fn concat_channels(be: &Backend, xs: &[&Tensor]) -> Result<Tensor> {
    const OP: &str = "concat_channels";
    let Some(first) = xs.first() else {
        return Err(Error::shape(OP, "no tensors to concatenate"));
    };
    channel_dims(OP, "input 0", first)?;
    let mut shape = first.shape().to_vec();
    shape[1] = 0;
    for (i, x) in xs.iter().enumerate() {
        let s = x.shape();
        let agrees = s.len() == shape.len() && s[0] == shape[0] && s[2..] == shape[2..];
        if !agrees {
            return Err(Error::shape(
                OP,
                format!(
                    "input {i} has shape {s:?}, which does not match input 0 {:?} outside the channel axis",
                    first.shape()
                ),
            ));
        }
        shape[1] += s[1];
    }
    let mut y = Tensor::zeros(be, &shape)?;
    let mut offset = 0;
    for x in xs {
        copy_channels_into(be, x, &mut y, offset)?;
        offset += x.shape()[1];
    }
    Ok(y)
}

/// Writes `src` `[n, c_src, ...]` into channels `c_offset..c_offset + c_src`
/// of `dst` `[n, c_dst, ...]`, leaving its other channels alone (DenseNet's
/// concatenation into one preallocated feature buffer). Errors when the
/// channels do not fit or the other axes differ.
pub fn copy_channels_into(
    be: &Backend,
    src: &Tensor,
    dst: &mut Tensor,
    c_offset: usize,
) -> Result<()> {
    const OP: &str = "copy_channels";
    on_device(OP, be, &[src, dst])?;
    let (n, c_src, hw) = channel_dims(OP, "source", src)?;
    let (_, c_dst, _) = channel_dims(OP, "destination", dst)?;
    let (s, d) = (src.shape(), dst.shape());
    if s.len() != d.len() || s[0] != d[0] || s[2..] != d[2..] {
        return Err(Error::shape(
            OP,
            format!("source {s:?} and destination {d:?} differ outside the channel axis"),
        ));
    }
    if c_offset.checked_add(c_src).is_none_or(|end| end > c_dst) {
        return Err(Error::shape(
            OP,
            format!("source {s:?} at channel offset {c_offset} does not fit in destination {d:?}"),
        ));
    }
    if be.device() == Device::Cpu {
        return cpu::copy_channels(
            n,
            c_src,
            hw,
            src.host_for(OP)?,
            c_dst,
            c_offset,
            dst.host_mut_for(OP)?,
        );
    }
    if src.numel() == 0 {
        return Ok(());
    }
    let block = c_src * hw;
    let cfg = LaunchCfg {
        grid: (
            block.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32,
            n.clamp(1, MAX_GRID_Y) as u32,
            1,
        ),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    };
    let args = [
        src.arg(),
        dst.arg_mut(),
        i64_arg("n", n)?,
        i64_arg("source channels", c_src)?,
        i64_arg("plane size", hw)?,
        i64_arg("destination channels", c_dst)?,
        i64_arg("channel offset", c_offset)?,
    ];
    // SAFETY: src holds n·c_src·hw and dst n·c_dst·hw f32 on be's device
    // (checked above) and both outlive the launch; c_offset + c_src <= c_dst,
    // so copy_channels_f32(const float*, float*, long long n, c_src, hw,
    // c_dst, c_off) writes inside dst only.
    unsafe { be.launch("copy_channels_f32", cfg, &args) }
}
