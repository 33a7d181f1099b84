//! Data movement over NCHW images: nearest ×2 upsampling and channel
//! concatenation (into a new tensor, or into a channel slice of a
//! preallocated one) and its backward, channel slicing. Kernels: `kernels/layout.cu`; CPU reference:
//! `crate::cpu::layout`.

use super::{dims4, expect_shape, i64_arg, on_device, plane_cfg, MAX_BLOCKS, MAX_GRID_Y, THREADS};
use crate::backend::{Backend, KernelArg, LaunchCfg};
use crate::cpu;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Nearest-neighbour ×2 upsampling: `x` `[n, c, h, w]` → `[n, c, 2h, 2w]`.
pub fn upsample_nearest2x(be: &Backend, x: &Tensor) -> Result<Tensor> {
    let [n, c, h, w] = dims4("upsample_nearest2x", x)?;
    let mut y = Tensor::zeros(be, &[n, c, 2 * h, 2 * w])?;
    upsample_nearest2x_into(be, x, &mut y)?;
    Ok(y)
}

/// [`upsample_nearest2x`] into a preallocated `y` `[n, c, 2h, 2w]`.
pub fn upsample_nearest2x_into(be: &Backend, x: &Tensor, y: &mut Tensor) -> Result<()> {
    const OP: &str = "upsample_nearest2x";
    on_device(OP, be, &[x, y])?;
    let [n, c, h, w] = dims4(OP, x)?;
    expect_shape(OP, "output", y, &[n, c, 2 * h, 2 * w])?;
    if be.device() == Device::Cpu {
        return cpu::upsample_nearest2x_forward(n, c, h, w, x.host_for(OP)?, y.host_mut_for(OP)?);
    }
    let planes = n * c;
    let out_plane = 4 * h * w;
    if planes == 0 || out_plane == 0 {
        return Ok(());
    }
    // The kernel indexes within an output plane in 32-bit arithmetic.
    KernelArg::int("output plane size", out_plane)?;
    let args = [
        x.arg(),
        y.arg_mut(),
        i64_arg("planes", planes)?,
        KernelArg::int("h", h)?,
        KernelArg::int("w", w)?,
    ];
    // SAFETY: x holds n·c·h·w and y n·c·4hw f32 on be's device (checked
    // above) and both outlive the launch; upsample_nearest2x_f32(const
    // float*, float*, long long planes, int h, int w) writes outputs < 4hw
    // per plane and reads x[oy/2, ox/2] inside the input plane.
    unsafe {
        be.launch(
            "upsample_nearest2x_f32",
            plane_cfg(out_plane, planes),
            &args,
        )
    }
}

/// Backward of [`upsample_nearest2x`]: `dy` `[n, c, 2h, 2w]` → `dx`
/// `[n, c, h, w]`, each `dx` element the sum of the 2×2 block of `dy` that
/// copied it (a gather, in the CPU reference's order). `dy`'s spatial sizes
/// must be even.
pub fn upsample_nearest2x_backward(be: &Backend, dy: &Tensor) -> Result<Tensor> {
    const OP: &str = "upsample_nearest2x_backward";
    let [n, c, h, w] = upsample_backward_dims(OP, dy)?;
    let mut dx = Tensor::zeros(be, &[n, c, h, w])?;
    upsample_nearest2x_backward_into(be, dy, &mut dx)?;
    Ok(dx)
}

/// `[n, c, h, w]` of the input gradient for `dy` `[n, c, 2h, 2w]`.
fn upsample_backward_dims(op: &'static str, dy: &Tensor) -> Result<[usize; 4]> {
    let [n, c, oh, ow] = dims4(op, dy)?;
    if oh % 2 != 0 || ow % 2 != 0 {
        return Err(Error::shape(
            op,
            format!(
                "dy has shape {:?}: its height and width must be even",
                dy.shape()
            ),
        ));
    }
    Ok([n, c, oh / 2, ow / 2])
}

/// [`upsample_nearest2x_backward`] into a preallocated `dx` `[n, c, h, w]`.
pub fn upsample_nearest2x_backward_into(be: &Backend, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    const OP: &str = "upsample_nearest2x_backward";
    on_device(OP, be, &[dy, dx])?;
    let [n, c, h, w] = upsample_backward_dims(OP, dy)?;
    expect_shape(OP, "dx", dx, &[n, c, h, w])?;
    if be.device() == Device::Cpu {
        return cpu::upsample_nearest2x_backward(
            n,
            c,
            h,
            w,
            dy.host_for(OP)?,
            dx.host_mut_for(OP)?,
        );
    }
    let planes = n * c;
    let in_plane = h * w;
    if planes == 0 || in_plane == 0 {
        return Ok(());
    }
    // The kernel indexes within a dy plane in 32-bit arithmetic.
    KernelArg::int("dy plane size", 4 * in_plane)?;
    let args = [
        dy.arg(),
        dx.arg_mut(),
        i64_arg("planes", planes)?,
        KernelArg::int("h", h)?,
        KernelArg::int("w", w)?,
    ];
    // SAFETY: dy holds n·c·4hw and dx n·c·h·w f32 on be's device (checked
    // above) and both outlive the launch; upsample_nearest2x_backward_f32(
    // const float*, float*, long long planes, int h, int w) writes dx
    // elements < hw per plane and reads the 2×2 block dy[2iy..2iy+2,
    // 2ix..2ix+2] inside the dy plane.
    unsafe {
        be.launch(
            "upsample_nearest2x_backward_f32",
            plane_cfg(in_plane, planes),
            &args,
        )
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
    let (n, c_src, hw, c_dst) = channel_slice_dims(OP, src, dst, c_offset)?;
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
    let cfg = channel_block_cfg(n, c_src * hw);
    let args = channel_block_args(src, dst, [n, c_src, hw, c_dst, c_offset])?;
    // SAFETY: src holds n·c_src·hw and dst n·c_dst·hw f32 on be's device
    // (checked above) and both outlive the launch; c_offset + c_src <= c_dst,
    // so copy_channels_f32(const float*, float*, long long n, c_src, hw,
    // c_dst, c_off) writes inside dst only.
    unsafe { be.launch("copy_channels_f32", cfg, &args) }
}

/// Channels `c_offset..c_offset + count` of `src` `[n, c_src, ...]` as a new
/// `[n, count, ...]`: the backward of [`concat_channels`] and
/// [`copy_channels_into`] (each concatenated input's part of the gradient).
pub fn slice_channels(be: &Backend, src: &Tensor, c_offset: usize, count: usize) -> Result<Tensor> {
    let mut shape = src.shape().to_vec();
    channel_dims("slice_channels", "source", src)?;
    shape[1] = count;
    let mut dst = Tensor::zeros(be, &shape)?;
    slice_channels_into(be, src, c_offset, &mut dst)?;
    Ok(dst)
}

/// [`slice_channels`] into a preallocated `dst` `[n, c_dst, ...]` (all of it
/// overwritten): channels `c_offset..c_offset + c_dst` of `src`. Errors when
/// they do not fit or the other axes differ.
pub fn slice_channels_into(
    be: &Backend,
    src: &Tensor,
    c_offset: usize,
    dst: &mut Tensor,
) -> Result<()> {
    const OP: &str = "slice_channels";
    on_device(OP, be, &[src, dst])?;
    let (n, c_dst, hw, c_src) = channel_slice_dims(OP, dst, src, c_offset)?;
    if be.device() == Device::Cpu {
        return cpu::slice_channels(
            n,
            c_src,
            hw,
            src.host_for(OP)?,
            c_offset,
            c_dst,
            dst.host_mut_for(OP)?,
        );
    }
    if dst.numel() == 0 {
        return Ok(());
    }
    let cfg = channel_block_cfg(n, c_dst * hw);
    let args = channel_block_args(src, dst, [n, c_src, hw, c_dst, c_offset])?;
    // SAFETY: src holds n·c_src·hw and dst n·c_dst·hw f32 on be's device
    // (checked above) and both outlive the launch; c_offset + c_dst <= c_src,
    // so slice_channels_f32(const float*, float*, long long n, c_src, hw,
    // c_dst, c_off) reads inside src and writes dst's n·c_dst·hw elements only.
    unsafe { be.launch("slice_channels_f32", cfg, &args) }
}

/// The launch of the channel-block kernels (`copy_channels_f32`,
/// `slice_channels_f32`, `add_channels_f32`): grid.y over the `n` images,
/// a 1-D grid-stride loop over the `block` contiguous floats of each.
fn channel_block_cfg(n: usize, block: usize) -> LaunchCfg {
    LaunchCfg {
        grid: (
            block.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32,
            n.clamp(1, MAX_GRID_Y) as u32,
            1,
        ),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    }
}

/// The arguments of the channel-block kernels, which all take `(const float*
/// src, float* dst, long long n, c_src, hw, c_dst, c_off)`.
fn channel_block_args(
    src: &Tensor,
    dst: &mut Tensor,
    [n, c_src, hw, c_dst, c_offset]: [usize; 5],
) -> Result<[KernelArg; 7]> {
    Ok([
        src.arg(),
        dst.arg_mut(),
        i64_arg("n", n)?,
        i64_arg("source channels", c_src)?,
        i64_arg("plane size", hw)?,
        i64_arg("destination channels", c_dst)?,
        i64_arg("channel offset", c_offset)?,
    ])
}

/// Checks that `narrow` `[n, c, ...]` fits channels `c_offset..c_offset + c`
/// of `wide` `[n, c_wide, ...]` (the other axes equal); returns
/// `(n, c, hw, c_wide)`.
fn channel_slice_dims(
    op: &'static str,
    narrow: &Tensor,
    wide: &Tensor,
    c_offset: usize,
) -> Result<(usize, usize, usize, usize)> {
    let (n, c, hw) = channel_dims(op, "channel slice", narrow)?;
    let (_, c_wide, _) = channel_dims(op, "wide tensor", wide)?;
    let (s, d) = (narrow.shape(), wide.shape());
    if s.len() != d.len() || s[0] != d[0] || s[2..] != d[2..] {
        return Err(Error::shape(
            op,
            format!("channel slice {s:?} and wide tensor {d:?} differ outside the channel axis"),
        ));
    }
    if c_offset.checked_add(c).is_none_or(|end| end > c_wide) {
        return Err(Error::shape(
            op,
            format!(
                "{s:?} at channel offset {c_offset} (channels {c_offset}..{c_offset}+{c}) \
                 does not fit in {d:?}"
            ),
        ));
    }
    Ok((n, c, hw, c_wide))
}

/// Adds `src` `[n, c_src, ...]` into channels `c_offset..c_offset + c_src`
/// of `dst` `[n, c_dst, ...]` (`d = d + s`, one f32 add per element, the
/// same bits on every device), leaving its other channels alone: a dense
/// layer's input gradient added into its block buffer's gradient.
pub fn add_channels_into(
    be: &Backend,
    src: &Tensor,
    dst: &mut Tensor,
    c_offset: usize,
) -> Result<()> {
    const OP: &str = "add_channels";
    on_device(OP, be, &[src, dst])?;
    let (n, c_src, hw, c_dst) = channel_slice_dims(OP, src, dst, c_offset)?;
    let block = c_src * hw;
    if be.device() == Device::Cpu {
        let (s, d) = (src.host_for(OP)?, dst.host_mut_for(OP)?);
        for ni in 0..n {
            let d = &mut d[(ni * c_dst + c_offset) * hw..][..block];
            for (a, &b) in d.iter_mut().zip(&s[ni * block..][..block]) {
                *a += b;
            }
        }
        return Ok(());
    }
    if src.numel() == 0 {
        return Ok(());
    }
    let args = channel_block_args(src, dst, [n, c_src, hw, c_dst, c_offset])?;
    // SAFETY: src holds n·c_src·hw and dst n·c_dst·hw f32 on be's device
    // (checked above) and both outlive the launch; c_offset + c_src <= c_dst,
    // so add_channels_f32(const float*, float*, long long n, c_src, hw,
    // c_dst, c_off) reads and writes inside dst only.
    unsafe { be.launch("add_channels_f32", channel_block_cfg(n, block), &args) }
}
