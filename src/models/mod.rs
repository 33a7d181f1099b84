//! The models, each reading its hyper-parameters off its weights.

pub mod batch;
pub mod cp2image;
pub mod densenet;
pub mod vqvae2;
pub mod weights;

pub use cp2image::{Discriminator, DiscriminatorConfig, Generator, GeneratorConfig};
pub use densenet::{DenseNet, DenseNetConfig};
pub use vqvae2::{VqVae2, VqVae2Config};
