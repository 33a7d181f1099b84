//! The models, each reading its hyper-parameters off its weights.

pub mod batch;
pub mod cp2image;
pub mod densenet;
pub mod vqvae2;
pub mod weights;

pub use vqvae2::{VqVae2, VqVae2Config};
