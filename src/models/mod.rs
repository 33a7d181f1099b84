//! The models, each reading its hyper-parameters off its weights:
//! [`VqVae2`] (expression from morphology), [`DenseNet`] (screening) and
//! CP2Image's [`Generator`] and [`Discriminator`], with their configurations.

pub mod batch;
pub mod cp2image;
pub mod densenet;
pub mod vqvae2;
pub mod weights;

pub use cp2image::{Discriminator, DiscriminatorConfig, Generator, GeneratorConfig};
pub use densenet::{DenseNet, DenseNetConfig};
pub use vqvae2::{VqVae2, VqVae2Config};
