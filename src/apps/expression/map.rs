//! Patch-wise expression maps (the paper's Figure 6B): every patch of an
//! image is profiled on its own (no averaging over the sample) and a gene
//! model predicts the gene's expression from that patch's profile alone.
//! [`map_image`] is `cellmorph map`.

use std::path::{Path, PathBuf};

use super::plots::map_png;
use super::profile::{patch_profiles, PatchProfiles};
use crate::backend::Backend;
use crate::csv::CsvWriter;
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
    if let Some(mode) = &model.batch_correction {
        return Err(Error::invalid(format!(
            "the SVR model was fitted on batch-corrected profiles ({mode}); a patch has no \
             batch to be corrected within, so a map from it would be wrong: fit the model \
             for maps without --batch-correct"
        )));
    }
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

/// What [`map_image`] reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct MapImageOptions {
    /// VQ-VAE-2 weights.
    pub weights: PathBuf,
    /// Gene model JSON (trained on profiles of these weights).
    pub model: PathBuf,
    /// Gene to map.
    pub gene: String,
    /// Image to map.
    pub image: PathBuf,
    /// Output heat-map PNG over the image; a CSV of the patch values is
    /// written beside it (same name, `.csv`).
    pub output: PathBuf,
    /// Patch side in pixels.
    pub patch: usize,
    /// Patches per device batch.
    pub batch_size: usize,
}

/// What [`map_image`] did.
#[derive(Debug, Clone)]
pub struct MapImageSummary {
    /// The map.
    pub map: ExpressionMap,
    /// The CSV of the patch values (`row,col,x,y,predicted`).
    pub csv: PathBuf,
}

/// `cellmorph map`: the patch-wise expression map of one gene on one image
/// ([`expression_map`]) on `be`, written as a CSV of the patch values and
/// a heat-map PNG over the image.
pub fn map_image(be: &Backend, o: &MapImageOptions) -> Result<MapImageSummary> {
    let vq = VqVae2::load(be, &o.weights)?;
    let model = SvrModel::load(&o.model)?;
    let m = expression_map(be, &vq, &model, &o.gene, &o.image, o.patch, o.batch_size)?;
    let csv = o.output.with_extension("csv");
    let mut w = CsvWriter::new();
    w.record(["row", "col", "x", "y", "predicted"]);
    for (i, v) in m.values.iter().enumerate() {
        let (r, c) = (i / m.cols, i % m.cols);
        w.record([
            r.to_string(),
            c.to_string(),
            (c * m.patch).to_string(),
            (r * m.patch).to_string(),
            v.to_string(),
        ]);
    }
    w.write(&csv)?;
    map_png(&m, &o.image, &o.output)?;
    Ok(MapImageSummary { map: m, csv })
}
