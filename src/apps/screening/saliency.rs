//! Saliency maps of the screening DenseNet over its input: Grad-CAM++ and
//! VisualBackProp (the CAM is in [`super::cam`]), their PNG overlays and
//! their raw maps as 16-bit PNG.
//!
//! # Grad-CAM++ (Chattopadhay et al. 2018)
//!
//! On `A = relu(norm5(·))`, the activated last feature map `[C, h, w]` that
//! the global pool reads: pytorch-grad-cam's target layer for torchvision
//! DenseNets is `model.features[-1]` (`norm5`), whose output torchvision
//! passes through a ReLU before the pool; we take the map after that ReLU,
//! as the paper assumes non-negative activations. With `g = ∂S_c/∂A` (`S_c`
//! the class's logit) and the closed form the paper derives for
//! `exp(S_c)`:
//!
//! ```text
//! α_kij = g² / (2 g² + Σ_ab A_kab · g³)   (0 where g = 0)
//! w_k   = Σ_ij α_kij · relu(g_kij)
//! map   = relu(Σ_k w_k A_k)
//! ```
//!
//! (no `eps` in the denominator: it is positive wherever `relu(g) > 0`
//! because `A ≥ 0`). pytorch-grad-cam's hooks on `norm5` see the gradient
//! with respect to `norm5`'s output, which is 0 where that output is ≤ 0;
//! with respect to `A` it is not, so its weights differ from these by each
//! channel's fraction of positive positions. `A` is globally average-pooled, so `g_kij =
//! W_eff[c, k] / (h·w)` at every position, `W_eff` being the head's exact
//! gradient at the image's pooled features (Linear, or Kim's
//! Linear/ReLU/Dropout head in eval mode with its ReLU masks;
//! [`DenseNet::head_linearization`]). No backward pass through the
//! backbone is needed: the forward runs on any device, `A` is read back
//! and the head's gradient is taken on the host. The map is upsampled
//! bilinearly (`align_corners=False`) to the input and divided by its
//! maximum.
//!
//! # VisualBackProp (Bojarski et al. 2016)
//!
//! Forward only. The "layers" of a DenseNet are taken to be the stem's
//! output `relu(norm0(conv0(x)))` (input/2) and each dense block's output
//! after the BatchNorm and ReLU that the next stage applies to it
//! (transition `b`'s norm, `norm5` after the last block; input/4, /8, …).
//! Each is averaged over its channels; from the deepest up, the running
//! mask is upsampled to the next shallower map's size and multiplied
//! pointwise with it, and at last upsampled to the input and divided by
//! its maximum. Upsampling is nearest-neighbour (`src = ⌊dst · in /
//! out⌋`, PyTorch's `nearest`): for the stride-2 stages it equals the
//! paper's transposed convolution with a 2×2 filter of ones up to a
//! constant factor, which the final normalization removes, and it also
//! handles the odd sizes that floor division leaves.

use std::path::Path;

use rayon::prelude::*;

use super::preprocess::resize;
use crate::error::{Error, Result};
use crate::imaging::{BitDepth, GrayImage};
use crate::models::densenet::{DenseNet, DenseNetWorkspace};

/// A saliency method of `screen predict --saliency`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaliencyMethod {
    /// The class activation map ([`super::cam`]).
    Cam,
    /// Grad-CAM++ on the activated last feature map.
    GradCamPlusPlus,
    /// VisualBackProp over the stem and the dense blocks.
    VisualBackProp,
}

impl SaliencyMethod {
    /// The name used in file names: `cam`, `gradcampp`, `visualbackprop`.
    pub fn name(self) -> &'static str {
        match self {
            SaliencyMethod::Cam => "cam",
            SaliencyMethod::GradCamPlusPlus => "gradcampp",
            SaliencyMethod::VisualBackProp => "visualbackprop",
        }
    }

    /// The name used in titles.
    pub fn label(self) -> &'static str {
        match self {
            SaliencyMethod::Cam => "CAM",
            SaliencyMethod::GradCamPlusPlus => "Grad-CAM++",
            SaliencyMethod::VisualBackProp => "VisualBackProp",
        }
    }

    /// Whether the method explains one class (VisualBackProp does not).
    pub fn has_class(self) -> bool {
        self != SaliencyMethod::VisualBackProp
    }
}

/// A Grad-CAM++ map at feature resolution.
#[derive(Clone, Debug, PartialEq)]
pub struct GradCamPlusPlus {
    /// Map height.
    pub height: usize,
    /// Map width.
    pub width: usize,
    /// The channel weights `w_k` `[C]`.
    pub weights: Vec<f32>,
    /// `relu(Σ_k w_k A_k)`, row-major `[h, w]`.
    pub values: Vec<f32>,
}

/// Grad-CAM++ of the feature map `activated` `[C, h, w]` given the
/// gradient of the class score with respect to it (same shape); see the
/// module docs. Sums run in f64 in a fixed order.
///
/// # Errors
/// Lengths that disagree with `[C, h, w]` or an empty map.
pub fn grad_cam_plus_plus_from_gradient(
    activated: &[f32],
    gradient: &[f32],
    (h, w): (usize, usize),
) -> Result<GradCamPlusPlus> {
    let hw = h * w;
    if hw == 0 || activated.is_empty() || !activated.len().is_multiple_of(hw) {
        return Err(Error::shape(
            "grad_cam_plus_plus",
            format!("{} feature values for maps of {h}×{w}", activated.len()),
        ));
    }
    if gradient.len() != activated.len() {
        return Err(Error::shape(
            "grad_cam_plus_plus",
            format!(
                "{} gradient values for {} feature values",
                gradient.len(),
                activated.len()
            ),
        ));
    }
    let weights: Vec<f64> = activated
        .chunks_exact(hw)
        .zip(gradient.chunks_exact(hw))
        .map(|(a, g)| {
            let sum: f64 = a.iter().map(|&v| f64::from(v)).sum();
            g.iter()
                .map(|&g| {
                    let g = f64::from(g);
                    let (g2, g3) = (g * g, g * g * g);
                    let den = 2.0 * g2 + sum * g3;
                    if g > 0.0 && den != 0.0 {
                        g2 / den * g
                    } else {
                        0.0
                    }
                })
                .sum()
        })
        .collect();
    let mut values = vec![0.0f64; hw];
    for (&wk, plane) in weights.iter().zip(activated.chunks_exact(hw)) {
        if wk != 0.0 {
            values
                .iter_mut()
                .zip(plane)
                .for_each(|(m, &a)| *m += wk * f64::from(a));
        }
    }
    Ok(GradCamPlusPlus {
        height: h,
        width: w,
        weights: weights.into_iter().map(|v| v as f32).collect(),
        values: values.into_iter().map(|v| v.max(0.0) as f32).collect(),
    })
}

/// Grad-CAM++ of `class` for one image from its activated last features
/// `[C, h, w]` (a slice of [`DenseNetWorkspace::activated`]), the gradient
/// taken through `model`'s head on the host (module docs).
///
/// # Errors
/// A slice that is not `[C, h, w]` for the network's `C`, or a class the
/// head does not have.
pub fn grad_cam_plus_plus(
    model: &DenseNet,
    activated: &[f32],
    (h, w): (usize, usize),
    class: usize,
) -> Result<GradCamPlusPlus> {
    let c = model.config().num_features;
    let hw = h * w;
    if activated.len() != c * hw || hw == 0 {
        return Err(Error::shape(
            "grad_cam_plus_plus",
            format!("{} feature values for [{c}, {h}, {w}]", activated.len()),
        ));
    }
    let classes = model.config().num_classes();
    if class >= classes {
        return Err(Error::invalid(format!(
            "Grad-CAM++: class {class} does not exist (the head has {classes} classes)"
        )));
    }
    let pooled: Vec<f32> = activated
        .chunks_exact(hw)
        .map(|plane| (plane.iter().map(|&v| f64::from(v)).sum::<f64>() / hw as f64) as f32)
        .collect();
    let (w_eff, _) = model.head_linearization(&pooled)?;
    let mut gradient = Vec::with_capacity(c * hw);
    for &wk in &w_eff[class * c..(class + 1) * c] {
        let g = (f64::from(wk) / hw as f64) as f32;
        gradient.extend(std::iter::repeat_n(g, hw));
    }
    grad_cam_plus_plus_from_gradient(activated, &gradient, (h, w))
}

/// `map` `[h, w]` (non-negative) upsampled bilinearly to `to`
/// ([`resize`], PyTorch's `align_corners=False`) and divided by its
/// maximum; all zeros when the map has no positive value.
pub fn upsample_normalized(
    map: &[f32],
    from: (usize, usize),
    to: (usize, usize),
) -> Result<Vec<f32>> {
    let mut heat = resize(map, from, to)?;
    normalize_max(&mut heat);
    Ok(heat)
}

/// Divides by the maximum, negatives set to 0 (all zeros when nothing is
/// positive).
fn normalize_max(v: &mut [f32]) {
    let max = v.iter().fold(0.0f32, |a, &x| a.max(x));
    v.iter_mut()
        .for_each(|x| *x = if max > 0.0 { x.max(0.0) / max } else { 0.0 });
}

/// Nearest-neighbour resize (`src = ⌊dst · in / out⌋`).
pub fn resize_nearest(
    src: &[f32],
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> Result<Vec<f32>> {
    if src.len() != h * w || h == 0 || w == 0 || oh == 0 || ow == 0 {
        return Err(Error::shape(
            "resize_nearest",
            format!(
                "{} values for a {h}×{w} map resized to {oh}×{ow}",
                src.len()
            ),
        ));
    }
    let xs: Vec<usize> = (0..ow).map(|x| x * w / ow).collect();
    Ok((0..oh)
        .flat_map(|y| {
            let row = &src[(y * h / oh) * w..][..w];
            xs.iter().map(move |&x| row[x])
        })
        .collect())
}

/// One layer's channel-averaged map for VisualBackProp.
#[derive(Clone, Debug, PartialEq)]
pub struct AveragedMap {
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// Mean over the layer's channels, row-major.
    pub values: Vec<f32>,
}

/// VisualBackProp's mask from channel-averaged maps ordered from the
/// shallowest to the deepest layer (module docs), at `out` = (height,
/// width), in [0, 1] with maximum 1 (all zeros when the product vanishes
/// everywhere).
///
/// # Errors
/// No layers, or a map whose values do not match its size.
pub fn visual_back_prop(layers: &[AveragedMap], out: (usize, usize)) -> Result<Vec<f32>> {
    let (deepest, rest) = layers
        .split_last()
        .ok_or_else(|| Error::invalid("VisualBackProp needs at least one feature map"))?;
    let mut mask = deepest.values.clone();
    let mut size = (deepest.height, deepest.width);
    for l in rest.iter().rev() {
        let to = (l.height, l.width);
        if l.values.len() != l.height * l.width {
            return Err(Error::shape(
                "visual_back_prop",
                format!(
                    "{} values for a {}×{} map",
                    l.values.len(),
                    l.height,
                    l.width
                ),
            ));
        }
        mask = resize_nearest(&mask, size, to)?;
        mask.iter_mut().zip(&l.values).for_each(|(m, &v)| *m *= v);
        size = to;
    }
    let mut mask = resize_nearest(&mask, size, out)?;
    normalize_max(&mut mask);
    Ok(mask)
}

/// Mean over channels of each image of `data` `[n, c, h, w]`, after
/// `relu(scale·x + shift)` per channel when `norm` is given; summed in f64
/// in channel order.
fn channel_means(
    data: &[f32],
    [n, c, h, w]: [usize; 4],
    norm: Option<&(Vec<f32>, Vec<f32>)>,
) -> Result<Vec<AveragedMap>> {
    let hw = h * w;
    if data.len() != n * c * hw || c == 0 || hw == 0 {
        return Err(Error::shape(
            "visual_back_prop",
            format!("{} values for [{n}, {c}, {h}, {w}]", data.len()),
        ));
    }
    if let Some((s, t)) = norm {
        if s.len() != c || t.len() != c {
            return Err(Error::shape(
                "visual_back_prop",
                format!("a BatchNorm of {} channels for {c} channels", s.len()),
            ));
        }
    }
    Ok(data
        .par_chunks_exact(c * hw)
        .map(|image| {
            let mut acc = vec![0.0f64; hw];
            for (k, plane) in image.chunks_exact(hw).enumerate() {
                match norm {
                    Some((s, t)) => acc.iter_mut().zip(plane).for_each(|(a, &x)| {
                        *a += f64::from((s[k] * x + t[k]).max(0.0));
                    }),
                    None => acc
                        .iter_mut()
                        .zip(plane)
                        .for_each(|(a, &x)| *a += f64::from(x)),
                }
            }
            AveragedMap {
                height: h,
                width: w,
                values: acc.into_iter().map(|v| (v / c as f64) as f32).collect(),
            }
        })
        .collect())
}

fn dims(t: &crate::tensor::Tensor) -> Result<[usize; 4]> {
    match *t.shape() {
        [n, c, h, w] => Ok([n, c, h, w]),
        ref s => Err(Error::shape(
            "visual_back_prop",
            format!("a feature map of shape {s:?}, expected [n, c, h, w]"),
        )),
    }
}

/// The channel-averaged maps VisualBackProp multiplies, per image of the
/// batch `ws` holds after [`DenseNet::forward_into`]: the stem's output,
/// then each dense block's activated output (module docs), shallowest
/// first. The feature maps are read back to the host one at a time.
pub fn densenet_averaged_maps(
    model: &DenseNet,
    ws: &DenseNetWorkspace,
) -> Result<Vec<Vec<AveragedMap>>> {
    let n = ws.batch();
    let mut per_image: Vec<Vec<AveragedMap>> = vec![Vec::new(); n];
    let mut push = |maps: Vec<AveragedMap>| {
        per_image
            .iter_mut()
            .zip(maps)
            .for_each(|(list, m)| list.push(m));
    };
    push(channel_means(&ws.stem().to_vec()?, dims(ws.stem())?, None)?);
    let blocks = ws.block_outputs();
    for (b, t) in blocks.iter().enumerate() {
        if b + 1 == blocks.len() {
            // relu(norm5(·)), already computed.
            let a = ws.activated();
            push(channel_means(&a.to_vec()?, dims(a)?, None)?);
        } else {
            let norm = model.block_norm(b)?;
            push(channel_means(&t.to_vec()?, dims(t)?, Some(&norm))?);
        }
    }
    Ok(per_image)
}

/// Writes `heat` (`height × width`, values in [0, 1]) as a 16-bit
/// grayscale PNG, 0 → 0 and 1 → 65535 (atomically).
pub fn write_map_png16(path: &Path, heat: &[f32], (height, width): (usize, usize)) -> Result<()> {
    if heat.len() != height * width {
        return Err(Error::shape(
            "write_map_png16",
            format!("{} values for a {height}×{width} map", heat.len()),
        ));
    }
    let data = heat
        .iter()
        .map(|&v| (v.clamp(0.0, 1.0) * 65535.0).round() as u16)
        .collect();
    GrayImage::new(width, height, BitDepth::Sixteen, data)?.save(path)
}
