//! cellmorph: hand-written CUDA kernels with a CPU reference path for
//! label-free cell-imaging models.

pub mod cpu;
pub mod error;
pub mod geometry;
pub mod stats;
pub mod svr;
pub mod table;

pub use error::{Error, Result};
