//! The paper's pre-processing of one image ([reference](crate::reference) §2): value channel,
//! brightness filter, intensity scaling, resize to the network input,
//! [0, 1], gray to channels, optional ImageNet normalization.

use std::fmt;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::imaging::{BitDepth, GrayImage};

/// Network input height of the paper (H × W = 226 × 306, a quarter of the
/// 904 × 1224 camera images).
pub const INPUT_HEIGHT: usize = 226;
/// Network input width of the paper.
pub const INPUT_WIDTH: usize = 306;
/// Images whose mean value channel exceeds this (8-bit units) are excluded.
pub const MAX_MEAN_V: f64 = 230.0;
/// Intensities are scaled so that the mean value channel becomes this.
pub const TARGET_MEAN_V: f64 = 130.0;
/// ImageNet channel means (torchvision-pretrained backbones).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Pre-processing settings; [`Default`] is the paper's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Preprocess {
    /// Output height.
    pub height: usize,
    /// Output width.
    pub width: usize,
    /// Exclusion threshold on the mean value channel (8-bit units).
    pub max_mean_v: f64,
    /// Mean value channel after scaling (8-bit units).
    pub target_mean_v: f64,
    /// Output channels: the gray image is copied to each (3 for torchvision
    /// backbones).
    pub channels: usize,
    /// Normalize with the ImageNet mean and standard deviation (3 channels only).
    pub imagenet_normalize: bool,
}

impl Default for Preprocess {
    fn default() -> Self {
        Preprocess {
            height: INPUT_HEIGHT,
            width: INPUT_WIDTH,
            max_mean_v: MAX_MEAN_V,
            target_mean_v: TARGET_MEAN_V,
            channels: 3,
            imagenet_normalize: false,
        }
    }
}

/// Why an image was not predicted.
#[derive(Clone, Debug, PartialEq)]
pub enum SkipReason {
    /// The file could not be read or decoded (the message says why).
    Unreadable(String),
    /// Mean value channel above the threshold (over-exposed or empty field).
    TooBright {
        /// The image's mean V (8-bit units).
        mean_v: f64,
        /// The threshold it exceeded.
        max: f64,
    },
    /// Mean value channel 0: there is nothing to scale to the target mean.
    Blank,
    /// Narrower or lower than [`MIN_SIDE`] pixels: too little to upscale
    /// to the network's input and call.
    TooSmall {
        /// Width in pixels.
        width: usize,
        /// Height in pixels.
        height: usize,
    },
}

/// The smallest width and height (pixels) an image is screened at; smaller
/// ones are skipped ([`SkipReason::TooSmall`]).
pub const MIN_SIDE: usize = 4;

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::Unreadable(msg) => write!(f, "unreadable: {msg}"),
            SkipReason::TooBright { mean_v, max } => {
                write!(f, "too bright: mean V {mean_v:.2} > {max}")
            }
            SkipReason::Blank => write!(f, "blank: mean V is 0"),
            SkipReason::TooSmall { width, height } => write!(
                f,
                "too small: {width}×{height} pixels (screening needs at least {MIN_SIDE}×{MIN_SIDE})"
            ),
        }
    }
}

/// A pre-processed image, or why it was excluded.
#[derive(Clone, Debug, PartialEq)]
pub enum Prepared {
    /// The network input `[channels, height, width]`, row-major.
    Image {
        /// The input values.
        data: Vec<f32>,
        /// The original image's mean value channel (8-bit units).
        mean_v: f64,
    },
    /// Excluded by the brightness filter.
    Skipped(SkipReason),
}

/// The value channel in 8-bit units: 8-bit pixels as they are, 16-bit
/// pixels scaled by 255/65535 (the paper's thresholds are 8-bit values).
/// [`read_gray`](crate::imaging::read_gray) already made RGB input `V = max(R, G, B)`.
pub fn value_channel(img: &GrayImage) -> Vec<f32> {
    let k = match img.depth() {
        BitDepth::Eight => 1.0,
        BitDepth::Sixteen => 255.0 / 65535.0,
    };
    img.data().iter().map(|&p| f32::from(p) * k).collect()
}

/// Pre-processing of [reference](crate::reference) §2, in its order:
/// 1. value channel `V` in 8-bit units ([`value_channel`]);
/// 2. mean `V` > `max_mean_v` → [`Prepared::Skipped`] (reported, not an
///    error), as is a mean of 0;
/// 3. `V · target/mean`, clipped to 255 (kept in floating point, no rounding
///    to integers);
/// 4. resize to `height × width` ([`resize`]);
/// 5. divide by 255, copy to `channels` channels, and optionally apply the
///    ImageNet normalization `(v − mean_c) / std_c`.
pub fn preprocess(img: &GrayImage, p: &Preprocess) -> Result<Prepared> {
    if p.height == 0 || p.width == 0 || p.channels == 0 {
        return Err(Error::invalid(format!(
            "pre-processing to {} channels of {}×{} is empty",
            p.channels, p.height, p.width
        )));
    }
    if p.imagenet_normalize && p.channels != 3 {
        return Err(Error::invalid(format!(
            "ImageNet normalization needs 3 channels, not {}",
            p.channels
        )));
    }
    if img.width() < MIN_SIDE || img.height() < MIN_SIDE {
        return Ok(Prepared::Skipped(SkipReason::TooSmall {
            width: img.width(),
            height: img.height(),
        }));
    }
    let v = value_channel(img);
    let mean_v = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
    if mean_v > p.max_mean_v {
        return Ok(Prepared::Skipped(SkipReason::TooBright {
            mean_v,
            max: p.max_mean_v,
        }));
    }
    if mean_v <= 0.0 {
        return Ok(Prepared::Skipped(SkipReason::Blank));
    }
    let k = (p.target_mean_v / mean_v) as f32;
    let scaled: Vec<f32> = v.iter().map(|&x| (x * k).min(255.0)).collect();
    let resized = resize(&scaled, (img.height(), img.width()), (p.height, p.width))?;
    let plane = p.height * p.width;
    let mut data = Vec::with_capacity(p.channels * plane);
    for c in 0..p.channels {
        let (m, s) = if p.imagenet_normalize {
            (IMAGENET_MEAN[c], IMAGENET_STD[c])
        } else {
            (0.0, 1.0)
        };
        data.extend(resized.iter().map(|&x| (x / 255.0 - m) / s));
    }
    Ok(Prepared::Image { data, mean_v })
}

/// Resizes a row-major `src` of `from = (h, w)` to `to = (h, w)`: area
/// averaging when both sides shrink by an integer factor (or stay), which is
/// PyTorch's `F.interpolate(mode="area")` there; bilinear otherwise, with
/// PyTorch's `F.interpolate(mode="bilinear", align_corners=False,
/// antialias=False)` convention (half-pixel centres: source coordinate
/// `(dst + 0.5)·in/out − 0.5`, clamped at 0; the same as OpenCV's
/// `INTER_LINEAR`).
pub fn resize(src: &[f32], from: (usize, usize), to: (usize, usize)) -> Result<Vec<f32>> {
    let ((h, w), (oh, ow)) = (from, to);
    if src.len() != h * w || h == 0 || w == 0 || oh == 0 || ow == 0 {
        return Err(Error::shape(
            "resize",
            format!(
                "{} values for a {h}×{w} image resized to {oh}×{ow}",
                src.len()
            ),
        ));
    }
    if h % oh == 0 && w % ow == 0 {
        Ok(resize_area(src, (h, w), (h / oh, w / ow)))
    } else {
        Ok(resize_bilinear(src, (h, w), (oh, ow)))
    }
}

/// Means of `fy × fx` blocks.
fn resize_area(src: &[f32], (h, w): (usize, usize), (fy, fx): (usize, usize)) -> Vec<f32> {
    let (oh, ow) = (h / fy, w / fx);
    let norm = 1.0 / (fy * fx) as f64;
    let mut out = vec![0.0f32; oh * ow];
    out.par_chunks_mut(ow).enumerate().for_each(|(oy, row)| {
        for (ox, o) in row.iter_mut().enumerate() {
            let mut acc = 0.0f64;
            for y in oy * fy..(oy + 1) * fy {
                acc += src[y * w + ox * fx..][..fx]
                    .iter()
                    .map(|&v| f64::from(v))
                    .sum::<f64>();
            }
            *o = (acc * norm) as f32;
        }
    });
    out
}

/// Source index pair and weight of the second for one output coordinate
/// (PyTorch's `align_corners=False` bilinear).
fn bilinear_taps(dst: usize, in_len: usize, out_len: usize) -> (usize, usize, f32) {
    let scale = in_len as f64 / out_len as f64;
    let src = ((dst as f64 + 0.5) * scale - 0.5).max(0.0);
    let i0 = (src.floor() as usize).min(in_len - 1);
    let i1 = (i0 + 1).min(in_len - 1);
    (i0, i1, (src - i0 as f64) as f32)
}

fn resize_bilinear(src: &[f32], (h, w): (usize, usize), (oh, ow): (usize, usize)) -> Vec<f32> {
    let xs: Vec<(usize, usize, f32)> = (0..ow).map(|x| bilinear_taps(x, w, ow)).collect();
    let mut out = vec![0.0f32; oh * ow];
    out.par_chunks_mut(ow).enumerate().for_each(|(oy, row)| {
        let (y0, y1, ly) = bilinear_taps(oy, h, oh);
        let (r0, r1) = (&src[y0 * w..][..w], &src[y1 * w..][..w]);
        for (o, &(x0, x1, lx)) in row.iter_mut().zip(&xs) {
            let top = r0[x0] * (1.0 - lx) + r0[x1] * lx;
            let bottom = r1[x0] * (1.0 - lx) + r1[x1] * lx;
            *o = top * (1.0 - ly) + bottom * ly;
        }
    });
    out
}
