//! The inference ops, each on every device: shape checks, then the CPU
//! reference (`crate::cpu`) or a kernel from `kernels/` (CUDA or emulated).
//! Training ops on every device so far: `relu_backward`,
//! `leaky_relu_backward`, `sigmoid_backward`, `dropout` and
//! `dropout_backward` (activation; the mask of `crate::rng::dropout_keep`,
//! bit for bit), `upsample_nearest2x_backward`, `slice_channels`,
//! `add_channels_into` (layout),
//! `global_avg_pool_backward`, `max_pool2d_backward`, `avg_pool2d_backward`
//! (pool), `conv2d_backward`, `conv_transpose2d_backward` (conv),
//! `linear_backward` (linear, on the conv backward kernels),
//! `batchnorm_train` and `batchnorm_train_backward` (norm). Every reduction
//! (weight, bias and BatchNorm sums) is split into chunks fixed by the shape
//! and reduced in a fixed order, without atomics: the same bits on every run
//! and GPU. Tests: `tests/ops/` (`conv_backward.rs`, `pool.rs`, `norm.rs`,
//! `linear.rs`, `activation.rs`). The rest of the backward passes are
//! CPU-only (`crate::cpu`) for now.
//!
//! Every op has an allocating form (`relu(be, x) -> Tensor`) and an `_into`
//! form writing into a preallocated output, so models can plan their buffers.

pub mod activation;
pub mod conv;
pub mod layout;
pub mod linear;
pub mod norm;
pub mod pool;
pub mod vq;

pub use activation::*;
pub use conv::*;
pub use layout::*;
pub use linear::*;
pub use norm::*;
pub use pool::*;
pub use vq::*;

use crate::backend::{Backend, KernelArg, LaunchCfg};
use crate::error::{Error, Result};
use crate::tensor::{check_device, Element, Tensor};

/// Checks that every tensor lives on `be`'s device.
pub(crate) fn on_device<T: Element>(
    op: &'static str,
    be: &Backend,
    ts: &[&Tensor<T>],
) -> Result<()> {
    ts.iter().try_for_each(|t| check_device(op, be, t))
}

/// Checks that `t` has exactly `shape`, naming `what` otherwise.
pub(crate) fn expect_shape<T: Element>(
    op: &'static str,
    what: &str,
    t: &Tensor<T>,
    shape: &[usize],
) -> Result<()> {
    if t.shape() != shape {
        return Err(Error::shape(
            op,
            format!("{what} has shape {:?}, expected {shape:?}", t.shape()),
        ));
    }
    Ok(())
}

/// Threads per block of the 1-D grid-stride kernels.
const THREADS: u32 = 256;
/// Grid cap of the grid-stride kernels: 8192 blocks of 256 threads fill every
/// SM of current GPUs many times over; the kernels' loops cover the rest.
const MAX_BLOCKS: usize = 8192;
/// The hardware limit on `grid.y`.
const MAX_GRID_Y: usize = 65535;

/// A 1-D grid-stride launch over `n` items.
fn stride_cfg(n: usize) -> LaunchCfg {
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
fn plane_cfg(len: usize, planes: usize) -> LaunchCfg {
    let threads = len.div_ceil(32).clamp(1, THREADS as usize / 32) * 32;
    let blocks_x = len.div_ceil(threads).clamp(1, MAX_BLOCKS);
    LaunchCfg {
        grid: (blocks_x as u32, planes.clamp(1, MAX_GRID_Y) as u32, 1),
        block: (threads as u32, 1, 1),
        shared_bytes: 0,
    }
}

/// A size as a kernel `long long`.
fn i64_arg(what: &str, v: usize) -> Result<KernelArg> {
    i64::try_from(v).map(KernelArg::I64).map_err(|_| {
        Error::invalid(format!(
            "{what} = {v} does not fit a 64-bit kernel argument"
        ))
    })
}

/// `[n, c, h, w]` of a 4-D input.
fn dims4(op: &'static str, x: &Tensor) -> Result<[usize; 4]> {
    match x.shape() {
        &[n, c, h, w] => Ok([n, c, h, w]),
        s => Err(Error::shape(
            op,
            format!("input must be [n, c, h, w], got shape {s:?}"),
        )),
    }
}
