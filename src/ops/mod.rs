//! The inference ops, each on every device: shape checks, then the CPU
//! reference (`crate::cpu`) or a kernel from `kernels/` (CUDA or emulated).
//!
//! Every op has an allocating form (`relu(be, x) -> Tensor`) and an `_into`
//! form writing into a preallocated output, so models can plan their buffers.

pub mod conv;
pub mod elementwise;
pub mod linear;
pub mod pool;
pub mod vq;

pub use conv::*;
pub use elementwise::*;
pub use linear::*;
pub use pool::*;
pub use vq::*;

use crate::backend::Backend;
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
