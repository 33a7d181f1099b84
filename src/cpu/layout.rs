//! Data movement: nearest ×2 upsampling and channel concatenation/slicing.

use super::{check_len, chunk, numel};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Nearest-neighbour ×2 upsampling: `x` `[n, c, h, w]` → `y` `[n, c, 2h, 2w]`
/// with `y[.., oy, ox] = x[.., oy / 2, ox / 2]`.
pub fn upsample_nearest2x_forward(
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    x: &[f32],
    y: &mut [f32],
) -> Result<()> {
    const OP: &str = "upsample_nearest2x_forward";
    let x_plane = numel(OP, &[h, w])?;
    let y_plane = numel(OP, &[2, h, 2, w])?;
    check_len(OP, "x", x.len(), numel(OP, &[n, c, x_plane])?)?;
    check_len(OP, "y", y.len(), numel(OP, &[n, c, y_plane])?)?;
    y.par_chunks_mut(chunk(y_plane))
        .enumerate()
        .for_each(|(p, y_p)| {
            let x_p = &x[p * x_plane..][..x_plane];
            for (oy, y_row) in y_p.chunks_exact_mut(2 * w).enumerate() {
                let x_row = &x_p[(oy / 2) * w..][..w];
                for (pair, &v) in y_row.chunks_exact_mut(2).zip(x_row) {
                    pair.fill(v);
                }
            }
        });
    Ok(())
}

/// Backward of [`upsample_nearest2x_forward`]: each `dx` element is the sum
/// of the 2×2 block of `dy` it was copied to; `dx` `[n, c, h, w]` is overwritten.
pub fn upsample_nearest2x_backward(
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    dy: &[f32],
    dx: &mut [f32],
) -> Result<()> {
    const OP: &str = "upsample_nearest2x_backward";
    let x_plane = numel(OP, &[h, w])?;
    let y_plane = numel(OP, &[2, h, 2, w])?;
    check_len(OP, "dy", dy.len(), numel(OP, &[n, c, y_plane])?)?;
    check_len(OP, "dx", dx.len(), numel(OP, &[n, c, x_plane])?)?;
    dx.par_chunks_mut(chunk(x_plane))
        .enumerate()
        .for_each(|(p, dx_p)| {
            let dy_p = &dy[p * y_plane..][..y_plane];
            for (iy, dx_row) in dx_p.chunks_exact_mut(w).enumerate() {
                let top = &dy_p[(2 * iy) * 2 * w..][..2 * w];
                let bottom = &dy_p[(2 * iy + 1) * 2 * w..][..2 * w];
                for (ix, d) in dx_row.iter_mut().enumerate() {
                    *d = top[2 * ix] + top[2 * ix + 1] + bottom[2 * ix] + bottom[2 * ix + 1];
                }
            }
        });
    Ok(())
}

/// Checks that channels `offset..offset + count` fit in `total` channels.
fn check_channel_range(op: &'static str, offset: usize, count: usize, total: usize) -> Result<()> {
    match offset.checked_add(count) {
        Some(end) if end <= total => Ok(()),
        _ => Err(Error::shape(
            op,
            format!("channels {offset}..{offset}+{count} do not fit in {total} channels"),
        )),
    }
}

/// Writes `src` `[n, c_src, hw]` into channels `c_offset..c_offset + c_src` of
/// `dst` `[n, c_dst, hw]`, leaving the other channels alone: channel
/// concatenation into a preallocated output, one input at a time. Its
/// backward is [`slice_channels`] with the same offset.
pub fn copy_channels(
    n: usize,
    c_src: usize,
    hw: usize,
    src: &[f32],
    c_dst: usize,
    c_offset: usize,
    dst: &mut [f32],
) -> Result<()> {
    const OP: &str = "copy_channels";
    check_channel_range(OP, c_offset, c_src, c_dst)?;
    check_len(OP, "src", src.len(), numel(OP, &[n, c_src, hw])?)?;
    check_len(OP, "dst", dst.len(), numel(OP, &[n, c_dst, hw])?)?;
    let (src_block, dst_block) = (c_src * hw, c_dst * hw);
    dst.par_chunks_mut(chunk(dst_block))
        .enumerate()
        .for_each(|(ni, dst_n)| {
            dst_n[c_offset * hw..][..src_block]
                .copy_from_slice(&src[ni * src_block..][..src_block]);
        });
    Ok(())
}

/// Reads channels `c_offset..c_offset + c_out` of `src` `[n, c_src_total, hw]`
/// into `dst` `[n, c_out, hw]` (overwritten). The backward of
/// [`copy_channels`]: it hands each concatenated input its part of the gradient.
pub fn slice_channels(
    n: usize,
    c_src_total: usize,
    hw: usize,
    src: &[f32],
    c_offset: usize,
    c_out: usize,
    dst: &mut [f32],
) -> Result<()> {
    const OP: &str = "slice_channels";
    check_channel_range(OP, c_offset, c_out, c_src_total)?;
    check_len(OP, "src", src.len(), numel(OP, &[n, c_src_total, hw])?)?;
    check_len(OP, "dst", dst.len(), numel(OP, &[n, c_out, hw])?)?;
    let (src_block, dst_block) = (c_src_total * hw, c_out * hw);
    dst.par_chunks_mut(chunk(dst_block))
        .enumerate()
        .for_each(|(ni, dst_n)| {
            dst_n.copy_from_slice(&src[ni * src_block + c_offset * hw..][..dst_block]);
        });
    Ok(())
}
