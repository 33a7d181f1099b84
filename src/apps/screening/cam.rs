//! Class activation maps (see [`DenseNet::class_activation_map`]) over the
//! network input they explain, and their PNG overlays.

use std::path::Path;

use super::preprocess::{resize, Preprocess, IMAGENET_MEAN, IMAGENET_STD};
use crate::error::{Error, Result};
use crate::imaging::{BitDepth, GrayImage, PatchGrid};
use crate::models::densenet::{ClassActivationMap, DenseNet};
use crate::plot::{heatmap_overlay, HeatmapOptions};

/// A class activation map with the network input it explains.
#[derive(Clone, Debug, PartialEq)]
pub struct CamOverlay {
    /// The pre-processed gray image in [0, 1], `height × width` of the input.
    pub image: Vec<f32>,
    /// The map upsampled bilinearly to the image, after Grad-CAM's
    /// convention: negative evidence set to 0, then divided by the maximum
    /// (all zeros when there is no positive evidence).
    pub heat: Vec<f32>,
    /// Height of both.
    pub height: usize,
    /// Width of both.
    pub width: usize,
    /// The raw map at feature resolution (`mean + offset` = the logit).
    pub map: ClassActivationMap,
}

/// The class activation map of `class` for one image over the gray input it
/// explains: `activated` is the image's `[C, h, w]` activated features
/// ([`DenseNetWorkspace::activated`]), `input` its pre-processed network
/// input `[channels, height, width]` made with `p`.
///
/// [`DenseNetWorkspace::activated`]: crate::models::densenet::DenseNetWorkspace::activated
pub fn cam_overlay(
    model: &DenseNet,
    activated: &[f32],
    feature_hw: (usize, usize),
    input: &[f32],
    p: &Preprocess,
    class: usize,
) -> Result<CamOverlay> {
    let plane = p.height * p.width;
    if input.len() != p.channels * plane {
        return Err(Error::shape(
            "cam_overlay",
            format!(
                "{} input values for [{}, {}, {}]",
                input.len(),
                p.channels,
                p.height,
                p.width
            ),
        ));
    }
    let map = model.class_activation_map(activated, feature_hw, class)?;
    let image = input_gray(input, p)?;
    let mut heat = resize(&map.values, feature_hw, (p.height, p.width))?;
    let max = heat.iter().fold(0.0f32, |a, &v| a.max(v));
    heat.iter_mut()
        .for_each(|v| *v = if max > 0.0 { v.max(0.0) / max } else { 0.0 });
    Ok(CamOverlay {
        image,
        heat,
        height: p.height,
        width: p.width,
        map,
    })
}

/// The gray image in [0, 1] a network input `[channels, height, width]`
/// made with `p` shows: its channel 0, the optional ImageNet normalization
/// undone.
pub fn input_gray(input: &[f32], p: &Preprocess) -> Result<Vec<f32>> {
    let plane = p.height * p.width;
    if input.len() != p.channels * plane || plane == 0 {
        return Err(Error::shape(
            "input_gray",
            format!(
                "{} input values for [{}, {}, {}]",
                input.len(),
                p.channels,
                p.height,
                p.width
            ),
        ));
    }
    let (m, s) = if p.imagenet_normalize {
        (IMAGENET_MEAN[0], IMAGENET_STD[0])
    } else {
        (0.0, 1.0)
    };
    Ok(input[..plane].iter().map(|&v| v * s + m).collect())
}

/// Writes a CAM overlay PNG ([`crate::plot::heatmap_overlay`]): the
/// normalized heat map in viridis at half opacity over the gray network
/// input (stretched from its darkest to its brightest pixel), with `title`
/// above and a 0–1 colorbar.
pub fn write_cam_png(path: &Path, overlay: &CamOverlay, title: &str) -> Result<()> {
    write_heat_png(
        path,
        &overlay.image,
        &overlay.heat,
        (overlay.height, overlay.width),
        title,
    )
}

/// Writes a heat map overlay PNG as [`write_cam_png`] does: `heat` (values
/// in [0, 1]) over `image` (gray in [0, 1]), both `height × width`.
pub fn write_heat_png(
    path: &Path,
    image: &[f32],
    heat: &[f32],
    (h, w): (usize, usize),
    title: &str,
) -> Result<()> {
    if image.len() != h * w || heat.len() != h * w {
        return Err(Error::shape(
            "write_heat_png",
            format!(
                "{} image and {} heat values for {h}×{w}",
                image.len(),
                heat.len()
            ),
        ));
    }
    let gray: Vec<u16> = image
        .iter()
        .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u16)
        .collect();
    let image = GrayImage::new(w, h, BitDepth::Eight, gray)?;
    // One value per pixel: the heat is already at the image's resolution.
    let grid = PatchGrid::new(w, h, 1)?;
    let values: Vec<f64> = heat.iter().map(|&v| f64::from(v)).collect();
    let opts = HeatmapOptions {
        title: title.to_string(),
        alpha: 0.5,
        range: Some((0.0, 1.0)),
        ..HeatmapOptions::default()
    };
    heatmap_overlay(path, &image, &grid, &values, &opts)
}
