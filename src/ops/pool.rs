//! Pooling over NCHW images: max and average pooling, global average
//! pooling. Kernels: `kernels/pool.cu`; CPU reference: `crate::cpu::pool`.

use super::{dims4, expect_shape, i64_arg, on_device, plane_cfg, stride_cfg};
use crate::backend::{Backend, KernelArg, LaunchCfg};
use crate::cpu;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::geometry::{Pool2dGeom, Pool2dParams};
use crate::tensor::Tensor;

/// Grid cap of the one-block-per-plane kernel (its loop covers the rest).
const MAX_PLANE_BLOCKS: usize = 1 << 20;

/// Max or average.
#[derive(Clone, Copy)]
enum PoolKind {
    Max,
    Avg,
}

fn pool2d_into(
    op: &'static str,
    kind: PoolKind,
    be: &Backend,
    x: &Tensor,
    p: Pool2dParams,
    y: &mut Tensor,
) -> Result<()> {
    on_device(op, be, &[x, y])?;
    let g = Pool2dGeom::new(op, x.shape(), p)?;
    expect_shape(op, "output", y, &g.out_shape())?;
    if be.device() == Device::Cpu {
        let (xs, ys) = (x.host_for(op)?, y.host_mut_for(op)?);
        return match kind {
            PoolKind::Max => cpu::max_pool2d_forward(&g, xs, ys),
            PoolKind::Avg => cpu::avg_pool2d_forward(&g, xs, ys),
        };
    }
    let planes = g.n * g.c;
    let out_plane = g.oh * g.ow;
    if planes == 0 || out_plane == 0 {
        return Ok(());
    }
    // The kernels index within a plane in 32-bit arithmetic.
    KernelArg::int("input plane size", g.h * g.w)?;
    KernelArg::int("output plane size", out_plane)?;
    let mut args = vec![
        x.arg(),
        y.arg_mut(),
        i64_arg("planes", planes)?,
        KernelArg::int("h", g.h)?,
        KernelArg::int("w", g.w)?,
        KernelArg::int("oh", g.oh)?,
        KernelArg::int("ow", g.ow)?,
        KernelArg::int("kernel height", g.kh)?,
        KernelArg::int("kernel width", g.kw)?,
        KernelArg::int("stride", g.stride_h)?,
        KernelArg::int("stride", g.stride_w)?,
        KernelArg::int("padding", g.pad_h)?,
        KernelArg::int("padding", g.pad_w)?,
    ];
    let name = match kind {
        PoolKind::Max => "max_pool2d_f32",
        PoolKind::Avg => {
            args.push(KernelArg::I32(i32::from(g.count_include_pad)));
            "avg_pool2d_f32"
        }
    };
    // SAFETY: x holds n·c·h·w and y n·c·oh·ow f32 on be's device (checked
    // above) and both outlive the launch; the argument list matches
    // (const float*, float*, long long planes, int h, w, oh, ow, kh, kw, sh,
    // sw, ph, pw[, int count_include_pad]); windows are clipped to the input
    // plane and outputs are < oh·ow per plane, planes < n·c.
    unsafe { be.launch(name, plane_cfg(out_plane, planes), &args) }
}

/// 2-D max pooling (padding acts as −∞; a NaN in the window wins):
/// `x` `[n, c, h, w]` → `[n, c, oh, ow]` (floor mode, see [`Pool2dGeom`]).
pub fn max_pool2d(be: &Backend, x: &Tensor, p: Pool2dParams) -> Result<Tensor> {
    let g = Pool2dGeom::new("max_pool2d", x.shape(), p)?;
    let mut y = Tensor::zeros(be, &g.out_shape())?;
    max_pool2d_into(be, x, p, &mut y)?;
    Ok(y)
}

/// [`max_pool2d`] into a preallocated `y` `[n, c, oh, ow]`.
pub fn max_pool2d_into(be: &Backend, x: &Tensor, p: Pool2dParams, y: &mut Tensor) -> Result<()> {
    pool2d_into("max_pool2d", PoolKind::Max, be, x, p, y)
}

/// 2-D average pooling (padding counts as zeros; the divisor follows
/// `p.count_include_pad`): `x` `[n, c, h, w]` → `[n, c, oh, ow]`.
pub fn avg_pool2d(be: &Backend, x: &Tensor, p: Pool2dParams) -> Result<Tensor> {
    let g = Pool2dGeom::new("avg_pool2d", x.shape(), p)?;
    let mut y = Tensor::zeros(be, &g.out_shape())?;
    avg_pool2d_into(be, x, p, &mut y)?;
    Ok(y)
}

/// [`avg_pool2d`] into a preallocated `y` `[n, c, oh, ow]`.
pub fn avg_pool2d_into(be: &Backend, x: &Tensor, p: Pool2dParams, y: &mut Tensor) -> Result<()> {
    pool2d_into("avg_pool2d", PoolKind::Avg, be, x, p, y)
}

/// Global average pooling: `x` `[n, c, h, w]` → `[n, c]`, the mean of each plane.
pub fn global_avg_pool(be: &Backend, x: &Tensor) -> Result<Tensor> {
    let [n, c, _, _] = dims4("global_avg_pool", x)?;
    let mut y = Tensor::zeros(be, &[n, c])?;
    global_avg_pool_into(be, x, &mut y)?;
    Ok(y)
}

/// [`global_avg_pool`] into a preallocated `y` `[n, c]`.
pub fn global_avg_pool_into(be: &Backend, x: &Tensor, y: &mut Tensor) -> Result<()> {
    const OP: &str = "global_avg_pool";
    on_device(OP, be, &[x, y])?;
    let [n, c, h, w] = dims4(OP, x)?;
    expect_shape(OP, "output", y, &[n, c])?;
    let hw = h * w;
    if be.device() == Device::Cpu {
        return cpu::global_avg_pool_forward(n, c, hw, x.host_for(OP)?, y.host_mut_for(OP)?);
    }
    let planes = n * c;
    if planes == 0 {
        return Ok(());
    }
    // About 8 elements per thread before the reduction, 32 to 512 threads.
    let threads = hw.div_ceil(8).div_ceil(32).clamp(1, 16) * 32;
    let cfg = LaunchCfg {
        grid: (planes.clamp(1, MAX_PLANE_BLOCKS) as u32, 1, 1),
        block: (threads as u32, 1, 1),
        shared_bytes: 0,
    };
    let args = [
        x.arg(),
        y.arg_mut(),
        i64_arg("planes", planes)?,
        i64_arg("plane size", hw)?,
    ];
    // SAFETY: x holds n·c·hw and y n·c f32 on be's device (checked above) and
    // both outlive the launch; global_avg_pool_f32(const float*, float*,
    // long long planes, long long hw) reads planes < n·c of hw elements and
    // writes y[p] for p < n·c; blockDim.x is a multiple of 32 up to 512, as
    // its 32-entry shared reduction needs.
    unsafe { be.launch("global_avg_pool_f32", cfg, &args) }
}

/// Backward of [`global_avg_pool`]: `dy` `[n, c]` → `dx` `[n, c, h, w]`,
/// every element of plane `(n, c)` getting `dy[n, c] / (h·w)`.
pub fn global_avg_pool_backward(be: &Backend, dy: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    const OP: &str = "global_avg_pool_backward";
    let [n, c] = match dy.shape() {
        &[n, c] => [n, c],
        s => {
            return Err(Error::shape(
                OP,
                format!("dy must be [n, c], got shape {s:?}"),
            ))
        }
    };
    let mut dx = Tensor::zeros(be, &[n, c, h, w])?;
    global_avg_pool_backward_into(be, dy, &mut dx)?;
    Ok(dx)
}

/// [`global_avg_pool_backward`] into a preallocated `dx` `[n, c, h, w]`
/// (its spatial size is the forward input's).
pub fn global_avg_pool_backward_into(be: &Backend, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    const OP: &str = "global_avg_pool_backward";
    on_device(OP, be, &[dy, dx])?;
    let [n, c, h, w] = dims4(OP, dx)?;
    expect_shape(OP, "dy", dy, &[n, c])?;
    let hw = h * w;
    if be.device() == Device::Cpu {
        return cpu::global_avg_pool_backward(n, c, hw, dy.host_for(OP)?, dx.host_mut_for(OP)?);
    }
    let total = n * c * hw;
    if total == 0 {
        return Ok(());
    }
    let args = [
        dy.arg(),
        dx.arg_mut(),
        i64_arg("planes", n * c)?,
        i64_arg("plane size", hw)?,
    ];
    // SAFETY: dy holds n·c and dx n·c·hw f32 on be's device (checked above)
    // and both outlive the launch; global_avg_pool_backward_f32(const float*,
    // float*, long long planes, long long hw) writes dx[i] for i < planes·hw
    // and reads dy[i / hw] < planes; hw > 0 here (total > 0).
    unsafe { be.launch("global_avg_pool_backward_f32", stride_cfg(total), &args) }
}

/// Which pooling a backward undoes, with what it reads besides `dy`.
#[derive(Clone, Copy)]
enum PoolBackward<'a> {
    /// Max pooling: the forward input, to find each window's maximum.
    Max(&'a Tensor),
    /// Average pooling: `dy` alone.
    Avg,
}

/// Shared checks and launch of the two pool2d backward gathers.
fn pool2d_backward_into(
    op: &'static str,
    kind: PoolBackward,
    be: &Backend,
    dy: &Tensor,
    p: Pool2dParams,
    dx: &mut Tensor,
) -> Result<()> {
    on_device(op, be, &[dy, dx])?;
    if let PoolBackward::Max(x) = kind {
        on_device(op, be, &[x])?;
        expect_shape(op, "dx", dx, x.shape())?;
    }
    let g = Pool2dGeom::new(op, dx.shape(), p)?;
    expect_shape(op, "dy", dy, &g.out_shape())?;
    if be.device() == Device::Cpu {
        let (dys, dxs) = (dy.host_for(op)?, dx.host_mut_for(op)?);
        return match kind {
            PoolBackward::Max(x) => cpu::max_pool2d_backward(&g, x.host_for(op)?, dys, dxs),
            PoolBackward::Avg => cpu::avg_pool2d_backward(&g, dys, dxs),
        };
    }
    let planes = g.n * g.c;
    let in_plane = g.h * g.w;
    if planes == 0 || in_plane == 0 {
        return Ok(());
    }
    // The kernels index within a plane in 32-bit arithmetic.
    KernelArg::int("input plane size", in_plane)?;
    KernelArg::int("output plane size", g.oh * g.ow)?;
    let mut args = Vec::with_capacity(15);
    if let PoolBackward::Max(x) = kind {
        args.push(x.arg());
    }
    args.extend([
        dy.arg(),
        dx.arg_mut(),
        i64_arg("planes", planes)?,
        KernelArg::int("h", g.h)?,
        KernelArg::int("w", g.w)?,
        KernelArg::int("oh", g.oh)?,
        KernelArg::int("ow", g.ow)?,
        KernelArg::int("kernel height", g.kh)?,
        KernelArg::int("kernel width", g.kw)?,
        KernelArg::int("stride", g.stride_h)?,
        KernelArg::int("stride", g.stride_w)?,
        KernelArg::int("padding", g.pad_h)?,
        KernelArg::int("padding", g.pad_w)?,
    ]);
    let name = match kind {
        PoolBackward::Max(_) => "max_pool2d_backward_f32",
        PoolBackward::Avg => {
            args.push(KernelArg::I32(i32::from(g.count_include_pad)));
            "avg_pool2d_backward_f32"
        }
    };
    // SAFETY: x (max only) and dx hold n·c·h·w and dy n·c·oh·ow f32 on be's
    // device (checked above) and all outlive the launch; the argument list
    // matches max_pool2d_backward_f32(const float* x, const float* dy,
    // float* dx, long long planes, int h, w, oh, ow, kh, kw, sh, sw, ph, pw)
    // or avg_pool2d_backward_f32(const float* dy, float* dx, long long
    // planes, int h, w, oh, ow, kh, kw, sh, sw, ph, pw, int
    // count_include_pad); each thread writes dx[p, i] for i < h·w, p < n·c,
    // and reads windows clipped to the plane and outputs < oh·ow.
    unsafe { be.launch(name, plane_cfg(in_plane, planes), &args) }
}

/// Backward of [`max_pool2d`]: `x` `[n, c, h, w]`, `dy` `[n, c, oh, ow]` →
/// `dx` `[n, c, h, w]`, each `dy` going to its window's maximum (the first
/// maximum in row-major order; a NaN wins), summed where windows overlap.
/// Deterministic: a gather that recomputes each covering window's argmax.
pub fn max_pool2d_backward(
    be: &Backend,
    x: &Tensor,
    dy: &Tensor,
    p: Pool2dParams,
) -> Result<Tensor> {
    let mut dx = Tensor::zeros(be, x.shape())?;
    max_pool2d_backward_into(be, x, dy, p, &mut dx)?;
    Ok(dx)
}

/// [`max_pool2d_backward`] into a preallocated `dx` of `x`'s shape.
pub fn max_pool2d_backward_into(
    be: &Backend,
    x: &Tensor,
    dy: &Tensor,
    p: Pool2dParams,
    dx: &mut Tensor,
) -> Result<()> {
    pool2d_backward_into("max_pool2d_backward", PoolBackward::Max(x), be, dy, p, dx)
}

/// Backward of [`avg_pool2d`]: `dy` `[n, c, oh, ow]` → `dx` `[n, c, h, w]`
/// (`h`, `w` the forward input's), each `dy / divisor` spread over the
/// in-bounds part of its window. Deterministic: a gather.
pub fn avg_pool2d_backward(
    be: &Backend,
    dy: &Tensor,
    p: Pool2dParams,
    h: usize,
    w: usize,
) -> Result<Tensor> {
    let [n, c, _, _] = dims4("avg_pool2d_backward", dy)?;
    let mut dx = Tensor::zeros(be, &[n, c, h, w])?;
    avg_pool2d_backward_into(be, dy, p, &mut dx)?;
    Ok(dx)
}

/// [`avg_pool2d_backward`] into a preallocated `dx` `[n, c, h, w]` (its
/// spatial size is the forward input's).
pub fn avg_pool2d_backward_into(
    be: &Backend,
    dy: &Tensor,
    p: Pool2dParams,
    dx: &mut Tensor,
) -> Result<()> {
    pool2d_backward_into("avg_pool2d_backward", PoolBackward::Avg, be, dy, p, dx)
}
