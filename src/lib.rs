//! cellmorph: hand-written CUDA kernels with a CPU reference path for
//! label-free cell-imaging models.

pub mod backend;
pub mod cp2image;
pub mod cpu;
pub mod device;
pub mod error;
pub mod expression;
pub mod geometry;
pub mod imaging;
pub mod io;
pub mod models;
pub mod ops;
pub mod pipeline;
pub mod plot;
pub mod stats;
pub mod svr;
pub mod synth;
pub mod table;
pub mod tensor;

pub use backend::Backend;
pub use device::Device;
pub use error::{Error, Result};
pub use tensor::Tensor;
