//! CPU reference implementations of every op, over plain slices.
//!
//! This is the specification the CUDA kernels are checked against, written in
//! the style of llm.c: one `<op>_forward` / `<op>_backward` pair per layer,
//! explicit shapes as arguments, no autograd. Layouts are PyTorch's: images
//! NCHW, conv weights `[c_out, c_in, kh, kw]`, transposed-conv weights
//! `[c_in, c_out, kh, kw]`, linear weights `[out, in]`.
//!
//! Every function first checks every slice length against the shapes it was
//! given and returns [`Error::Shape`] on a mismatch, then
//! computes. Backward functions overwrite (never accumulate into) their
//! gradient outputs. Work is spread with rayon over independent outputs
//! ((n, c) planes for most ops; image and row-block tiles of a blocked GEMM
//! for conv2d, conv_transpose2d and linear, see `gemm.rs`); sums are plain
//! f32 in increasing index order.
//!
//! One module per op family, named like its kernel file in `kernels/` and its
//! ops module in [`crate::ops`] (see the ops table there). Where the fast path
//! is not itself a plain loop nest, the loop nest it replaced is public next
//! to it as the specification, and the unit tests check that the fast path
//! equals it bit for bit with the exact GEMM (`CELLMORPH_CPU_GEMM=exact`;
//! the default FMA GEMMs round each multiply-add once and stay within the
//! summation error bound, see [`conv`]):
//!
//! | op | fast path | specification |
//! |----|-----------|---------------|
//! | conv2d | [`conv::conv2d_forward`] | [`conv::reference::conv2d`] |
//! | conv_transpose2d | [`conv::conv_transpose2d_forward`] | [`conv::reference::conv_transpose2d`] |
//! | linear | [`linear::linear_forward`] | [`linear::reference::linear`] |
//! | linear backward | [`linear::linear_backward`] | [`linear::reference::linear_backward`] |
//!
//! The other functions have no separate loop nest: each is the specification
//! as written. (The VQ lookup blocks codes and vectors for speed, but every
//! distance is still one `mul_add` chain in the order the module docs of
//! [`vq`] define.)

pub mod activation;
pub mod conv;
mod gemm;
pub mod layout;
pub mod linear;
pub mod norm;
pub mod pool;
pub mod vq;

pub use activation::{
    add_forward, dropout_backward, dropout_forward, dropout_scale, leaky_relu_backward,
    leaky_relu_forward, relu_backward, relu_forward, sigmoid_backward, sigmoid_forward,
    softmax_backward, softmax_forward,
};
pub use conv::{
    conv2d_backward, conv2d_forward, conv_transpose2d_backward, conv_transpose2d_forward,
};
pub use layout::{
    copy_channels, slice_channels, upsample_nearest2x_backward, upsample_nearest2x_forward,
};
pub use linear::{linear_backward, linear_forward};
pub use norm::{
    batchnorm_backward, batchnorm_forward, batchnorm_train_backward, batchnorm_train_forward,
};
pub use pool::{
    avg_pool2d_backward, avg_pool2d_forward, global_avg_pool_backward, global_avg_pool_forward,
    max_pool2d_backward, max_pool2d_forward,
};
pub use vq::*;

use crate::error::{Error, Result};

/// The product of `dims`, or a shape error for `op` if it overflows `usize`.
fn numel(op: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter().try_fold(1usize, |acc, &d| {
        acc.checked_mul(d)
            .ok_or_else(|| Error::shape(op, format!("shape {dims:?} overflows usize")))
    })
}

/// Checks that slice `name` of `op` holds `expected` elements.
fn check_len(op: &'static str, name: &str, actual: usize, expected: usize) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(Error::shape(
            op,
            format!("{name} has {actual} elements, expected {expected}"),
        ))
    }
}

/// Chunk size for `par_chunks(_mut)` over planes of `len` elements: rayon
/// rejects a chunk size of 0, and a zero-sized plane means an empty slice, so
/// any positive size yields the same (empty) iteration.
fn chunk(len: usize) -> usize {
    len.max(1)
}

/// The unit tests' data: [`crate::rng::signed_unit_vec`].
#[cfg(test)]
fn test_data(seed: u64, len: usize) -> Vec<f32> {
    crate::rng::signed_unit_vec(seed, len)
}
