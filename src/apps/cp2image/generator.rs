//! The generator as the commands use it: [`generate`] runs it in device
//! batches.

use crate::backend::Backend;
use crate::models::cp2image::Generator;
use crate::tensor::Tensor;
use crate::{Error, Result};

/// Runs the generator on standardized vectors `z` (`[rows, p]` row-major)
/// in batches of `batch`; returns the images `[rows, C, S, S]` row-major.
pub fn generate(be: &Backend, g: &Generator, z: &[f32], batch: usize) -> Result<Vec<f32>> {
    let p = g.config().n_features;
    if batch == 0 {
        return Err(Error::invalid("batch size must be at least 1"));
    }
    if !z.len().is_multiple_of(p) {
        return Err(Error::invalid(format!(
            "{} values are not whole feature vectors of length {p}",
            z.len()
        )));
    }
    let mut images = Vec::new();
    for chunk in z.chunks(batch * p) {
        let x = Tensor::from_slice(be, &[chunk.len() / p, p], chunk)?;
        images.extend(g.forward(be, &x)?.to_vec()?);
    }
    Ok(images)
}
