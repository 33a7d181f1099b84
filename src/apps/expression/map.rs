//! Patch-wise expression maps (the paper's Figure 6B): every patch of an
//! image is profiled on its own (no averaging over the sample) and a gene
//! model predicts the gene's expression from that patch's profile alone.

use std::path::Path;

use crate::apps::expression::profile::{patch_profiles, PatchProfiles};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::models::vqvae2::VqVae2;
use crate::svr::SvrModel;

/// Predicted expression per patch of one image, row-major.
#[derive(Debug, Clone)]
pub struct ExpressionMap {
    /// The gene.
    pub gene: String,
    /// Patch rows.
    pub rows: usize,
    /// Patch columns.
    pub cols: usize,
    /// Patch side in pixels.
    pub patch: usize,
    /// `rows · cols` predictions.
    pub values: Vec<f64>,
}

/// Predicts `gene` for every `patch`-sized patch of `image`.
pub fn expression_map(
    be: &Backend,
    vqvae: &VqVae2,
    model: &SvrModel,
    gene: &str,
    image: &Path,
    patch: usize,
    batch: usize,
) -> Result<ExpressionMap> {
    let (_, gm) = model
        .genes
        .iter()
        .find(|(g, _)| g == gene)
        .ok_or_else(|| Error::invalid(format!("gene {gene:?} is not in the SVR model")))?;
    let k = vqvae.config().n_embed;
    if gm.w.len() != 2 * k {
        return Err(Error::invalid(format!(
            "the SVR model has {} features but the VQ-VAE-2 profile has {} (2 × n_embed {k})",
            gm.w.len(),
            2 * k
        )));
    }
    let expected = (0..k)
        .map(|i| format!("top{i}"))
        .chain((0..k).map(|i| format!("bottom{i}")));
    if !model.features.iter().cloned().eq(expected) {
        return Err(Error::invalid(
            "the SVR model's features are not the profile columns top0.., bottom0.. of this VQ-VAE-2",
        ));
    }
    let PatchProfiles {
        rows,
        cols,
        profiles,
    } = patch_profiles(be, vqvae, image, patch, batch)?;
    let values = profiles
        .iter()
        .map(|p| {
            p.iter()
                .zip(&gm.w)
                .map(|(&x, &w)| f64::from(x) * w)
                .sum::<f64>()
                + gm.b
        })
        .collect();
    Ok(ExpressionMap {
        gene: gene.to_string(),
        rows,
        cols,
        patch,
        values,
    })
}
