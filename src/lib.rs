//! cellmorph: hand-written CUDA kernels with a CPU reference path for
//! label-free cell-imaging models (VQ-VAE-2 expression profiles after Wakui
//! et al. 2023, DenseNet screening after Kim et al. 2022, CP2Image after Ji et
//! al.), usable from Rust and from the `cellmorph` command line.
//!
//! The pieces, bottom up:
//! - [`Device`] and [`Backend`]: the CPU reference, a CUDA GPU, or the CUDA
//!   kernels emulated on the CPU, chosen at run time.
//! - [`Tensor`]: a shape and a buffer on a device (NCHW for images).
//! - [`ops`]: shape-checked ops (conv2d, conv_transpose2d, batch-norm, pools,
//!   VQ lookup, histograms, …), each on every device; [`cpu`] holds their
//!   plain reference implementations, forward and backward.
//! - [`models`]: models read off PyTorch `state_dict`s saved as safetensors
//!   ([`io::TensorFile`]), every hyper-parameter taken from the weights.
//! - [`svr`], [`svm`], [`stats`]: the batched SVR grid search, the RBF SVM
//!   classifier and the statistics.
//! - [`apps`]: the three applications, one folder each — expression from
//!   morphology, stem-cell line screening, CP2Image — with one library
//!   function per `cellmorph` command.
//! - [`reference`](mod@reference): the architectures, tensor names and formulas all of the
//!   above implement (`docs/MODELS.md`); [`rng`]: the seeded randomness.
//!
//! # Example
//!
//! Load a VQ-VAE-2 and encode an image batch into codes and code histograms:
//!
//! ```
//! use cellmorph::models::VqVae2;
//! use cellmorph::{Backend, Device, Tensor};
//!
//! # fn main() -> cellmorph::Result<()> {
//! let weights = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/vqvae2_small.weights.safetensors");
//! let be = Backend::new(Device::Cpu)?; // or Device::Cuda(0), Device::Emulated
//! let model = VqVae2::load(&be, weights)?;
//! let k = model.config().n_embed;
//!
//! // Two 48×64 grayscale images scaled to [-1, 1] (NCHW).
//! let pixels: Vec<f32> = (0..2 * 48 * 64).map(|i| ((i % 255) as f32) / 127.5 - 1.0).collect();
//! let x = Tensor::from_vec(&be, &[2, 1, 48, 64], pixels)?;
//!
//! let encoded = model.encode(&be, &x)?;
//! assert_eq!(encoded.id_t.shape(), &[2, 6, 8]); // top codes at H/8
//! assert_eq!(encoded.id_b.shape(), &[2, 12, 16]); // bottom codes at H/4
//! let hist = model.histogram(&be, &encoded.id_b)?.to_vec()?;
//! assert_eq!(hist.len(), 2 * k);
//! assert_eq!(hist[..k].iter().sum::<i32>(), 12 * 16);
//!
//! // Bad input is an error, never a panic.
//! assert!(VqVae2::load(&be, "no-such-file.safetensors").is_err());
//! # Ok(())
//! # }
//! ```

pub mod apps;
pub mod backend;
pub mod cpu;
pub mod csv;
pub mod device;
pub mod error;
pub mod geometry;
pub mod imaging;
pub mod io;
pub mod models;
pub mod ops;
pub mod plot;
pub mod precision;
pub mod reference;
pub mod rng;
pub mod stats;
pub mod svm;
pub mod svr;
pub mod table;
pub mod tensor;
pub mod train;

pub use backend::Backend;
pub use device::Device;
pub use error::{Error, Result};
pub use precision::Precision;
pub use tensor::Tensor;
