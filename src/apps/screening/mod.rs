//! Stem-cell line screening of Kim et al. 2022 (MODELS.md §2): live-cell
//! images → pre-processing → DenseNet → positive-class probability and
//! decision, class activation maps, pooled features; and the evaluation of
//! the predictions against labels.
//!
//! - [`preprocess`]: the paper's pre-processing of one image (value channel,
//!   brightness filter, intensity scaling, resize, [0, 1], gray to channels,
//!   optional ImageNet normalization).
//! - [`list_images`]: the images of a run, from a CSV list or a directory.
//! - [`predict`]: every image through a [`DenseNet`] in batches, with images
//!   decoded and pre-processed on a second thread while the device works;
//!   unreadable or excluded images are skipped with a reason, never an error.
//! - [`write_predictions`] / [`read_predictions`]: the predictions CSV, which
//!   carries the run's timing in `#` comment lines; [`write_features`]: the
//!   pooled features (CSV or safetensors).
//! - [`cam_overlay`] / [`write_cam_png`]: class activation maps (see
//!   [`DenseNet::class_activation_map`]) over the network input, as PNG.
//! - [`evaluate`]: ROC AUC, F1, accuracy, sensitivity, specificity, PPV, NPV,
//!   confusion matrix and throughput ([`crate::stats`], scikit-learn's
//!   conventions; positive when `probability ≥ threshold`), written by
//!   [`write_report`] (JSON) and [`write_roc_png`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::imaging::{read_gray, BitDepth, GrayImage, PatchGrid};
use crate::io::{write_atomic, TensorWriter};
use crate::models::densenet::{ClassActivationMap, DenseNet, DenseNetWorkspace};
use crate::plot::{heatmap_overlay, roc_plot, HeatmapOptions, PlotOptions};
use crate::stats::{binary_metrics, roc_curve};
use crate::table::{quote_field as quote, split_fields as split_csv};
use crate::tensor::Tensor;

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
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::Unreadable(msg) => write!(f, "unreadable: {msg}"),
            SkipReason::TooBright { mean_v, max } => {
                write!(f, "too bright: mean V {mean_v:.2} > {max}")
            }
            SkipReason::Blank => write!(f, "blank: mean V is 0"),
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
/// [`read_gray`] already made RGB input `V = max(R, G, B)`.
pub fn value_channel(img: &GrayImage) -> Vec<f32> {
    let k = match img.depth() {
        BitDepth::Eight => 1.0,
        BitDepth::Sixteen => 255.0 / 65535.0,
    };
    img.data().iter().map(|&p| f32::from(p) * k).collect()
}

/// Pre-processing of MODELS.md §2, in its order:
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

/// One image of a run: how it is named in the outputs and where it is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageEntry {
    /// The name written to the predictions: the path as given in the list,
    /// or the file name for a directory.
    pub id: String,
    /// The file to read.
    pub path: PathBuf,
}

/// The images of a run and the files of a directory that were passed over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageList {
    /// The images, in list order (directories: sorted by file name).
    pub entries: Vec<ImageEntry>,
    /// Directory entries without a PNG/TIFF extension (not read).
    pub ignored: Vec<PathBuf>,
}

/// The images named by `source`: a directory (its `.png`, `.tif` and
/// `.tiff` files, any case, not recursive, sorted by name) or a CSV file
/// with a header holding an `image` column (other columns, e.g. `label`,
/// are ignored, so a labels file serves as a list; relative paths are
/// resolved against the CSV's directory).
///
/// # Errors
/// Unreadable source, a CSV without an `image` column or with a malformed
/// line, or no images at all.
pub fn list_images(source: &Path) -> Result<ImageList> {
    let meta = std::fs::metadata(source).map_err(|e| Error::io(source, e))?;
    let list = if meta.is_dir() {
        let mut list = ImageList::default();
        let rd = std::fs::read_dir(source).map_err(|e| Error::io(source, e))?;
        let mut files = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(source, e))?;
            if entry
                .file_type()
                .map_err(|e| Error::io(entry.path(), e))?
                .is_dir()
            {
                continue;
            }
            files.push(entry.path());
        }
        files.sort();
        for path in files {
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase);
            match (ext.as_deref(), path.file_name().and_then(|n| n.to_str())) {
                (Some("png" | "tif" | "tiff"), Some(name)) => list.entries.push(ImageEntry {
                    id: name.to_string(),
                    path: path.clone(),
                }),
                _ => list.ignored.push(path),
            }
        }
        list
    } else {
        let table = read_csv_rows(source)?;
        let col = table.column("image").ok_or_else(|| {
            Error::format(
                source,
                "the header has no `image` column (e.g. `image,label`)",
            )
        })?;
        let base = source.parent().unwrap_or(Path::new(""));
        let entries = table
            .rows
            .iter()
            .map(|(line, row)| {
                let id = row.get(col).map(String::as_str).unwrap_or_default();
                if id.is_empty() {
                    return Err(Error::format(
                        source,
                        format!("line {line}: empty image path"),
                    ));
                }
                Ok(ImageEntry {
                    id: id.to_string(),
                    path: base.join(id),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        ImageList {
            entries,
            ignored: Vec::new(),
        }
    };
    if list.entries.is_empty() {
        let other = match list.ignored.first() {
            Some(p) => format!(
                "; {} other files such as {} were passed over: only PNG and TIFF are read",
                list.ignored.len(),
                p.display()
            ),
            None => String::new(),
        };
        return Err(Error::format(
            source,
            format!("no images to screen (a directory needs .png/.tif/.tiff files; a list needs rows){other}"),
        ));
    }
    Ok(list)
}

/// Settings of a prediction run.
#[derive(Clone, Debug, PartialEq)]
pub struct PredictOptions {
    /// Images per device batch (bounds device memory).
    pub batch_size: usize,
    /// Pre-processing (its `channels` must match the network's input).
    pub preprocess: Preprocess,
    /// Positive when its probability is `≥ threshold` (0.5 in the paper).
    pub threshold: f64,
    /// Index of the positive class (1: high MUSE marker).
    pub positive_class: usize,
    /// Keep each image's pooled features.
    pub keep_features: bool,
    /// Write each image's class activation map of the positive class as a
    /// PNG overlay into this directory ([`write_cam_png`]), as it goes.
    pub cam_dir: Option<PathBuf>,
}

impl Default for PredictOptions {
    fn default() -> Self {
        PredictOptions {
            batch_size: 32,
            preprocess: Preprocess::default(),
            threshold: 0.5,
            positive_class: 1,
            keep_features: false,
            cam_dir: None,
        }
    }
}

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

/// The network's verdict on one image.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Softmax probability of the positive class.
    pub probability: f32,
    /// `probability ≥ threshold`.
    pub positive: bool,
    /// Mean value channel of the original image (8-bit units).
    pub mean_v: f64,
    /// Pooled features, when asked for.
    pub features: Option<Vec<f32>>,
    /// The class activation map PNG written for the image, when asked for.
    pub cam: Option<PathBuf>,
}

/// The result for one image.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// The image's id ([`ImageEntry::id`]).
    pub id: String,
    /// Its verdict, or why it was skipped.
    pub outcome: std::result::Result<Verdict, SkipReason>,
}

/// Wall-clock timing of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Timing {
    /// Images predicted (skipped ones not counted).
    pub images: usize,
    /// The whole run: reading, pre-processing (overlapped), inference.
    pub total_seconds: f64,
    /// Device work only: uploading batches, the network, reading results back.
    pub inference_seconds: f64,
}

impl Timing {
    /// Predicted images per second of the whole run.
    pub fn images_per_second(&self) -> f64 {
        per_second(self.images, self.total_seconds)
    }
    /// Predicted images per second of device work.
    pub fn inference_images_per_second(&self) -> f64 {
        per_second(self.images, self.inference_seconds)
    }
}

fn per_second(n: usize, s: f64) -> f64 {
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

/// A prediction run: one [`Prediction`] per input image, in input order.
#[derive(Clone, Debug, PartialEq)]
pub struct PredictRun {
    /// Per-image results.
    pub predictions: Vec<Prediction>,
    /// Timing.
    pub timing: Timing,
    /// The options used.
    pub options: PredictOptions,
    /// The device, as [`Backend::describe`] says.
    pub device: String,
}

impl PredictRun {
    /// The skipped images and why.
    pub fn skipped(&self) -> impl Iterator<Item = (&str, &SkipReason)> {
        self.predictions
            .iter()
            .filter_map(|p| p.outcome.as_ref().err().map(|r| (p.id.as_str(), r)))
    }
}

/// Reads and pre-processes one image; decoding failures become skips.
fn prepare(entry: &ImageEntry, p: &Preprocess) -> Result<Prepared> {
    match read_gray(&entry.path) {
        Ok(img) => preprocess(&img, p),
        Err(e) => Ok(Prepared::Skipped(SkipReason::Unreadable(e.to_string()))),
    }
}

/// Images waiting for a full batch: (index in the run, input, mean V).
type Pending = Vec<(usize, Vec<f32>, f64)>;

/// Runs `model` over `images` on `be`: images are decoded and pre-processed
/// in parallel on a second thread, one batch ahead of the device, and
/// gathered into full device batches of `batch_size` (skipped images leave
/// no holes). `progress` is called with the number of images finished so
/// far (predicted or skipped).
///
/// # Errors
/// Invalid options (batch size 0, a positive class the head does not have,
/// a head with fewer than 2 classes, channels that differ from the
/// network's) or a device failure. Images that cannot be read or are
/// excluded are skips, not errors.
pub fn predict(
    be: &Backend,
    model: &DenseNet,
    images: &[ImageEntry],
    options: &PredictOptions,
    mut progress: impl FnMut(usize),
) -> Result<PredictRun> {
    let cfg = model.config();
    if options.batch_size == 0 {
        return Err(Error::invalid("the batch size must be at least 1"));
    }
    if cfg.num_classes() < 2 || options.positive_class >= cfg.num_classes() {
        return Err(Error::invalid(format!(
            "positive class {} with a head of {} classes: screening needs at least 2 classes and a positive class among them",
            options.positive_class,
            cfg.num_classes()
        )));
    }
    if options.preprocess.channels != cfg.in_channels {
        return Err(Error::invalid(format!(
            "pre-processing makes {} channels but the network takes {}",
            options.preprocess.channels, cfg.in_channels
        )));
    }
    if options.preprocess.imagenet_normalize && options.preprocess.channels != 3 {
        return Err(Error::invalid(format!(
            "ImageNet normalization needs 3 channels, the network takes {}",
            options.preprocess.channels
        )));
    }
    if !options.threshold.is_finite() {
        return Err(Error::invalid("the threshold must be a finite number"));
    }
    // Fail on a too-small input size before reading any image.
    cfg.features_shape(1, options.preprocess.height, options.preprocess.width)?;
    let start = Instant::now();
    let mut outcomes: Vec<Option<std::result::Result<Verdict, SkipReason>>> =
        vec![None; images.len()];
    if let Some(dir) = &options.cam_dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut runner = BatchRunner {
        be,
        model,
        images,
        options,
        ws: None,
        inference_seconds: 0.0,
        cam_names: HashSet::new(),
    };
    let mut done = 0;
    std::thread::scope(|s| -> Result<()> {
        let (tx, rx) = sync_channel::<Vec<(usize, Result<Prepared>)>>(1);
        let bs = options.batch_size;
        let pre = options.preprocess;
        s.spawn(move || {
            for (c, chunk) in images.chunks(bs).enumerate() {
                let prepared: Vec<_> = chunk
                    .par_iter()
                    .enumerate()
                    .map(|(i, e)| (c * bs + i, prepare(e, &pre)))
                    .collect();
                if tx.send(prepared).is_err() {
                    return; // the device side stopped on an error
                }
            }
        });
        let mut pending: Pending = Vec::new();
        for chunk in rx {
            for (i, prepared) in chunk {
                match prepared? {
                    Prepared::Image { data, mean_v } => pending.push((i, data, mean_v)),
                    Prepared::Skipped(r) => {
                        outcomes[i] = Some(Err(r));
                        done += 1;
                    }
                }
            }
            while pending.len() >= bs {
                let rest = pending.split_off(bs);
                done += runner.run(&mut pending, &mut outcomes)?;
                pending = rest;
            }
            progress(done);
        }
        if !pending.is_empty() {
            done += runner.run(&mut pending, &mut outcomes)?;
            progress(done);
        }
        Ok(())
    })?;
    let predictions = images
        .iter()
        .zip(outcomes)
        .map(|(e, o)| {
            Ok(Prediction {
                id: e.id.clone(),
                outcome: o
                    .ok_or_else(|| Error::invalid(format!("image {} was never processed", e.id)))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let predicted = predictions.iter().filter(|p| p.outcome.is_ok()).count();
    Ok(PredictRun {
        predictions,
        timing: Timing {
            images: predicted,
            total_seconds: start.elapsed().as_secs_f64(),
            inference_seconds: runner.inference_seconds,
        },
        options: options.clone(),
        device: be.describe(),
    })
}

/// The device side of [`predict`]: one workspace, reused while the batch
/// size stays.
struct BatchRunner<'a> {
    be: &'a Backend,
    model: &'a DenseNet,
    images: &'a [ImageEntry],
    options: &'a PredictOptions,
    ws: Option<DenseNetWorkspace>,
    inference_seconds: f64,
    cam_names: HashSet<String>,
}

impl BatchRunner<'_> {
    /// Runs one batch, filling the outcomes of its images; returns how many.
    fn run(
        &mut self,
        batch: &mut Pending,
        outcomes: &mut [Option<std::result::Result<Verdict, SkipReason>>],
    ) -> Result<usize> {
        let p = &self.options.preprocess;
        let n = batch.len();
        let t = Instant::now();
        let ws = match self.ws {
            Some(ref mut ws) if ws.batch() == n => ws,
            _ => {
                drop(self.ws.take());
                self.ws
                    .insert(self.model.workspace(self.be, n, p.height, p.width)?)
            }
        };
        let mut data = Vec::with_capacity(n * p.channels * p.height * p.width);
        for (_, x, _) in batch.iter() {
            data.extend_from_slice(x);
        }
        let x = Tensor::from_vec(self.be, &[n, p.channels, p.height, p.width], data)?;
        self.model.forward_into(self.be, &x, ws)?;
        let probs = ws.probs().to_vec()?;
        let pooled = if self.options.keep_features {
            Some(ws.pooled().to_vec()?)
        } else {
            None
        };
        let activated = if self.options.cam_dir.is_some() {
            Some(ws.activated().to_vec()?)
        } else {
            None
        };
        self.inference_seconds += t.elapsed().as_secs_f64();
        let cfg = self.model.config();
        let (classes, c) = (cfg.num_classes(), cfg.num_features);
        let [_, _, fh, fw] = cfg.features_shape(n, p.height, p.width)?;
        let cams = match (&activated, &self.options.cam_dir) {
            (Some(a), Some(dir)) => {
                let targets: Vec<PathBuf> = batch
                    .iter()
                    .map(|(i, _, _)| self.cam_path(dir, *i))
                    .collect();
                let per_image = c * fh * fw;
                let pc = self.options.positive_class;
                batch
                    .par_iter()
                    .zip(a.par_chunks(per_image.max(1)))
                    .zip(&targets)
                    .enumerate()
                    .map(|(k, (((_, x, _), f), path))| {
                        let overlay = cam_overlay(self.model, f, (fh, fw), x, p, pc)?;
                        let title = format!("CAM class {pc}, p = {:.3}", probs[k * classes + pc]);
                        write_cam_png(path, &overlay, &title)?;
                        Ok(Some(path.clone()))
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            _ => vec![None; n],
        };
        for (k, ((i, _, mean_v), cam)) in batch.drain(..).zip(cams).enumerate() {
            let probability = probs[k * classes + self.options.positive_class];
            let features = pooled.as_ref().map(|v| v[k * c..(k + 1) * c].to_vec());
            outcomes[i] = Some(Ok(Verdict {
                probability,
                positive: f64::from(probability) >= self.options.threshold,
                mean_v,
                features,
                cam,
            }));
        }
        Ok(n)
    }

    /// `<dir>/<file stem>.cam.png`, with `_<index>` added when two images
    /// share a stem.
    fn cam_path(&mut self, dir: &Path, index: usize) -> PathBuf {
        let id = self.images.get(index).map_or("image", |e| e.id.as_str());
        let stem = Path::new(id)
            .file_stem()
            .map_or_else(|| "image".to_string(), |s| s.to_string_lossy().into_owned());
        let mut name = format!("{stem}.cam.png");
        if !self.cam_names.insert(name.clone()) {
            name = format!("{stem}_{index}.cam.png");
            self.cam_names.insert(name.clone());
        }
        dir.join(name)
    }
}

/// The class activation map of `class` for one image over the gray input it
/// explains: `activated` is the image's `[C, h, w]` activated features
/// ([`DenseNetWorkspace::activated`]), `input` its pre-processed network
/// input `[channels, height, width]` made with `p`.
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
    // Channel 0 of the input, undoing the optional normalization.
    let (m, s) = if p.imagenet_normalize {
        (IMAGENET_MEAN[0], IMAGENET_STD[0])
    } else {
        (0.0, 1.0)
    };
    let image: Vec<f32> = input[..plane].iter().map(|&v| v * s + m).collect();
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

// ---------------------------------------------------------------------------
// CSV files
// ---------------------------------------------------------------------------

/// A CSV file: `# key: value` comment lines, a header, rows with their line
/// numbers.
struct CsvRows {
    meta: Vec<(String, String)>,
    header: Vec<String>,
    rows: Vec<(usize, Vec<String>)>,
}

impl CsvRows {
    /// Index of the column named `name` (case-insensitive).
    fn column(&self, name: &str) -> Option<usize> {
        self.header
            .iter()
            .position(|h| h.eq_ignore_ascii_case(name))
    }
}

fn read_csv_rows(path: &Path) -> Result<CsvRows> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text =
        String::from_utf8(bytes).map_err(|_| Error::format(path, "not a text (UTF-8) CSV file"))?;
    let mut meta = Vec::new();
    let mut header: Option<Vec<String>> = None;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_start_matches('\u{feff}');
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            if let Some((k, v)) = comment.split_once(':') {
                meta.push((k.trim().to_string(), v.trim().to_string()));
            }
            continue;
        }
        let fields =
            split_csv(line).map_err(|e| Error::format(path, format!("line {}: {e}", i + 1)))?;
        match header {
            None => header = Some(fields),
            Some(ref h) if fields.len() > h.len() => {
                return Err(Error::format(
                    path,
                    format!(
                        "line {}: {} fields but the header has {}",
                        i + 1,
                        fields.len(),
                        h.len()
                    ),
                ))
            }
            Some(_) => rows.push((i + 1, fields)),
        }
    }
    let header = header.ok_or_else(|| Error::format(path, "empty CSV file (no header)"))?;
    Ok(CsvRows { meta, header, rows })
}

/// Writes the predictions CSV: `#` comment lines with the run's settings and
/// timing (`key: value`; read back by [`read_predictions`], skipped by
/// `pandas.read_csv(..., comment="#")`), then
/// `image,status,prob_positive,prediction,mean_v,reason` with status `ok`
/// or `skipped` and, for skipped images, the reason. `weights` is recorded
/// as given.
pub fn write_predictions(path: &Path, run: &PredictRun, weights: &str) -> Result<()> {
    let t = &run.timing;
    let skipped = run.skipped().count();
    let mut s = String::new();
    let meta: [(&str, String); 11] = [
        ("weights", weights.replace(['\n', '\r'], " ")),
        ("device", run.device.clone()),
        ("batch_size", run.options.batch_size.to_string()),
        ("threshold", run.options.threshold.to_string()),
        ("positive_class", run.options.positive_class.to_string()),
        (
            "imagenet_normalize",
            run.options.preprocess.imagenet_normalize.to_string(),
        ),
        ("images", format!("{}", run.predictions.len())),
        ("predicted", format!("{} (skipped {skipped})", t.images)),
        ("total_seconds", format!("{:.6}", t.total_seconds)),
        ("inference_seconds", format!("{:.6}", t.inference_seconds)),
        (
            "images_per_second",
            format!(
                "{:.3} (inference only: {:.3})",
                t.images_per_second(),
                t.inference_images_per_second()
            ),
        ),
    ];
    s.push_str("# cellmorph screen predict\n");
    for (k, v) in meta {
        s.push_str(&format!("# {k}: {v}\n"));
    }
    s.push_str("image,status,prob_positive,prediction,mean_v,reason\n");
    for p in &run.predictions {
        let row = match &p.outcome {
            Ok(v) => format!(
                "{},ok,{},{},{:.3},",
                quote(&p.id),
                v.probability,
                u8::from(v.positive),
                v.mean_v
            ),
            Err(r) => {
                let mean = match r {
                    SkipReason::TooBright { mean_v, .. } => format!("{mean_v:.3}"),
                    SkipReason::Blank => "0".to_string(),
                    SkipReason::Unreadable(_) => String::new(),
                };
                format!(
                    "{},skipped,,,{mean},{}",
                    quote(&p.id),
                    quote(&r.to_string())
                )
            }
        };
        s.push_str(&row);
        s.push('\n');
    }
    write_atomic(path, s.as_bytes())
}

/// One row of a predictions file.
#[derive(Clone, Debug, PartialEq)]
pub struct PredictionRow {
    /// Image id.
    pub id: String,
    /// Positive-class probability; `None` for a skipped image.
    pub probability: Option<f64>,
    /// Skip reason, for skipped images.
    pub reason: Option<String>,
}

/// A predictions file as read back.
#[derive(Clone, Debug, PartialEq)]
pub struct PredictionsFile {
    /// Rows in file order.
    pub rows: Vec<PredictionRow>,
    /// Predicted images (from the timing comments).
    pub images: Option<usize>,
    /// Whole-run seconds.
    pub total_seconds: Option<f64>,
    /// Device seconds.
    pub inference_seconds: Option<f64>,
    /// Device the run used.
    pub device: Option<String>,
}

/// Reads a predictions CSV written by [`write_predictions`] (or any CSV with
/// `image` and `prob_positive` columns; a `status` column marks skips).
///
/// # Errors
/// Unreadable file, missing columns, a probability that is not a finite
/// number, or a duplicated image id.
pub fn read_predictions(path: &Path) -> Result<PredictionsFile> {
    let csv = read_csv_rows(path)?;
    let col = |name: &str| {
        csv.column(name)
            .ok_or_else(|| Error::format(path, format!("the header has no `{name}` column")))
    };
    let (ci, cp) = (col("image")?, col("prob_positive")?);
    let (cs, cr) = (csv.column("status"), csv.column("reason"));
    let get = |row: &[String], c: usize| row.get(c).cloned().unwrap_or_default();
    let mut seen = HashMap::new();
    let mut rows = Vec::with_capacity(csv.rows.len());
    for (line, row) in &csv.rows {
        let id = get(row, ci);
        if id.is_empty() {
            return Err(Error::format(path, format!("line {line}: empty image id")));
        }
        if let Some(first) = seen.insert(id.clone(), *line) {
            return Err(Error::format(
                path,
                format!("line {line}: image {id:?} already on line {first}"),
            ));
        }
        let skipped = cs.is_some_and(|c| get(row, c).eq_ignore_ascii_case("skipped"));
        let probability = if skipped {
            None
        } else {
            let v = get(row, cp);
            let p: f64 = v
                .parse()
                .ok()
                .filter(|p: &f64| p.is_finite())
                .ok_or_else(|| {
                    Error::format(
                        path,
                        format!("line {line}: prob_positive {v:?} is not a finite number"),
                    )
                })?;
            Some(p)
        };
        rows.push(PredictionRow {
            id,
            probability,
            reason: cr.map(|c| get(row, c)).filter(|r| !r.is_empty()),
        });
    }
    let meta = |key: &str| {
        csv.meta
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let number =
        |key: &str| meta(key).and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok());
    Ok(PredictionsFile {
        rows,
        images: number("predicted").map(|v| v as usize),
        total_seconds: number("total_seconds"),
        inference_seconds: number("inference_seconds"),
        device: meta("device"),
    })
}

/// Reads a labels CSV: a header with `image` and `label` columns; labels
/// `1`/`0`, `true`/`false`, `positive`/`negative` or `high`/`low` (any case).
///
/// # Errors
/// Unreadable file, missing columns, an unknown label or a duplicated image.
pub fn read_labels(path: &Path) -> Result<Vec<(String, bool)>> {
    let csv = read_csv_rows(path)?;
    let col = |name: &str| {
        csv.column(name).ok_or_else(|| {
            Error::format(
                path,
                format!("the header has no `{name}` column (expected `image,label`)"),
            )
        })
    };
    let (ci, cl) = (col("image")?, col("label")?);
    let mut seen = HashMap::new();
    let mut out = Vec::with_capacity(csv.rows.len());
    for (line, row) in &csv.rows {
        let id = row.get(ci).cloned().unwrap_or_default();
        let raw = row
            .get(cl)
            .map(|s| s.to_ascii_lowercase())
            .unwrap_or_default();
        let label = match raw.as_str() {
            "1" | "true" | "positive" | "high" => true,
            "0" | "false" | "negative" | "low" => false,
            _ => {
                return Err(Error::format(
                    path,
                    format!("line {line}: label {raw:?} is not 1/0, true/false, positive/negative or high/low"),
                ))
            }
        };
        if id.is_empty() {
            return Err(Error::format(path, format!("line {line}: empty image id")));
        }
        if let Some(first) = seen.insert(id.clone(), *line) {
            return Err(Error::format(
                path,
                format!("line {line}: image {id:?} already on line {first}"),
            ));
        }
        out.push((id, label));
    }
    if out.is_empty() {
        return Err(Error::format(path, "no labels"));
    }
    Ok(out)
}

/// Writes the pooled features of the predicted images: `.csv` (`image,f0,
/// f1, ...`) or `.safetensors` (`features` `[n, C]`, the image ids as a JSON
/// list in the metadata key `images`), by the extension of `path`.
///
/// # Errors
/// Another extension, a run without features, or a write failure.
pub fn write_features(path: &Path, run: &PredictRun) -> Result<()> {
    let rows: Vec<(&str, &[f32])> = run
        .predictions
        .iter()
        .filter_map(|p| {
            let v = p.outcome.as_ref().ok()?;
            Some((p.id.as_str(), v.features.as_deref()?))
        })
        .collect();
    let predicted = run.predictions.iter().filter(|p| p.outcome.is_ok()).count();
    if rows.len() != predicted {
        return Err(Error::invalid(
            "the run did not keep its features (PredictOptions::keep_features)",
        ));
    }
    let c = rows.first().map_or(0, |r| r.1.len());
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("csv") => {
            let mut s = String::from("image");
            for k in 0..c {
                s.push_str(&format!(",f{k}"));
            }
            s.push('\n');
            for (id, f) in &rows {
                s.push_str(&quote(id));
                for v in *f {
                    s.push_str(&format!(",{v}"));
                }
                s.push('\n');
            }
            write_atomic(path, s.as_bytes())
        }
        Some("safetensors") => {
            let mut w = TensorWriter::new();
            let data: Vec<f32> = rows.iter().flat_map(|r| r.1.iter().copied()).collect();
            w.add_slice("features", &[rows.len(), c], &data)?;
            let ids: Vec<&str> = rows.iter().map(|r| r.0).collect();
            let json = serde_json::to_string(&ids)
                .map_err(|e| Error::invalid(format!("image ids to JSON: {e}")))?;
            w.set_metadata("images", &json);
            w.write(path)
        }
        _ => Err(Error::invalid(format!(
            "{}: features are written as .csv or .safetensors",
            path.display()
        ))),
    }
}

// ---------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------

/// Confusion-matrix counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// True positives.
    pub tp: usize,
    /// False positives.
    pub fp: usize,
    /// True negatives.
    pub tn: usize,
    /// False negatives (`fn` in the JSON).
    #[serde(rename = "fn")]
    pub fn_: usize,
}

/// ROC curve points; thresholds are `null` for +∞ (the first point).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RocPoints {
    /// False positive rates.
    pub fpr: Vec<f64>,
    /// True positive rates.
    pub tpr: Vec<f64>,
    /// Thresholds (decreasing).
    pub thresholds: Vec<Option<f64>>,
}

/// The evaluation of a predictions file against labels (serialized as the
/// report JSON). Rates with a zero denominator are `null`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvaluationReport {
    /// Images with both a prediction and a label.
    pub n: usize,
    /// Positives among them.
    pub positives: usize,
    /// Negatives among them.
    pub negatives: usize,
    /// Decision threshold on the probability (`≥` is positive).
    pub threshold: f64,
    /// ROC AUC (null with a single class).
    pub roc_auc: Option<f64>,
    /// F1 score.
    pub f1: Option<f64>,
    /// Accuracy.
    pub accuracy: Option<f64>,
    /// Sensitivity (recall).
    pub sensitivity: Option<f64>,
    /// Specificity.
    pub specificity: Option<f64>,
    /// Positive predictive value (precision).
    pub ppv: Option<f64>,
    /// Negative predictive value.
    pub npv: Option<f64>,
    /// Counts at the threshold.
    pub confusion_matrix: Counts,
    /// Whole-run throughput of the prediction run (images/s), if recorded.
    pub images_per_second: Option<f64>,
    /// Device-only throughput, if recorded.
    pub inference_images_per_second: Option<f64>,
    /// Device of the prediction run, if recorded.
    pub device: Option<String>,
    /// Images skipped by the prediction run.
    pub skipped: usize,
    /// Labeled images the predictions do not mention.
    pub labels_without_prediction: Vec<String>,
    /// Predicted images without a label.
    pub predictions_without_label: Vec<String>,
    /// The ROC curve (null with a single class).
    pub roc_curve: Option<RocPoints>,
}

/// Matches predictions to labels by image id (exactly, or by file name when
/// that is unique on both sides) and computes the screening metrics.
///
/// # Errors
/// No predicted image has a label, or the metrics fail (see
/// [`binary_metrics`]).
pub fn evaluate(
    preds: &PredictionsFile,
    labels: &[(String, bool)],
    threshold: f64,
) -> Result<EvaluationReport> {
    let file_name = |id: &str| {
        Path::new(id)
            .file_name()
            .map_or_else(|| id.to_string(), |n| n.to_string_lossy().into_owned())
    };
    let mut by_name: HashMap<String, Option<usize>> = HashMap::new();
    for (i, r) in preds.rows.iter().enumerate() {
        by_name
            .entry(file_name(&r.id))
            .and_modify(|e| *e = None)
            .or_insert(Some(i));
    }
    let mut label_names: HashMap<String, usize> = HashMap::new();
    for (id, _) in labels {
        *label_names.entry(file_name(id)).or_default() += 1;
    }
    let exact: HashMap<&str, usize> = preds
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), i))
        .collect();
    let mut used = vec![false; preds.rows.len()];
    let (mut y, mut scores) = (Vec::new(), Vec::new());
    let mut labels_without_prediction = Vec::new();
    for (id, label) in labels {
        let name = file_name(id);
        let found = exact.get(id.as_str()).copied().or_else(|| {
            (label_names.get(&name) == Some(&1))
                .then(|| by_name.get(&name).copied().flatten())
                .flatten()
        });
        match found {
            Some(i) => {
                used[i] = true;
                if let Some(p) = preds.rows[i].probability {
                    y.push(*label);
                    scores.push(p);
                }
            }
            None => labels_without_prediction.push(id.clone()),
        }
    }
    if y.is_empty() {
        return Err(Error::invalid(
            "no predicted image has a label (image ids are matched exactly, or by file name)",
        ));
    }
    let m = binary_metrics(&y, &scores, threshold)?;
    let roc_curve = match m.auc {
        Some(_) => {
            let c = roc_curve(&y, &scores, true)?;
            Some(RocPoints {
                fpr: c.fpr,
                tpr: c.tpr,
                thresholds: c
                    .thresholds
                    .into_iter()
                    .map(|t| t.is_finite().then_some(t))
                    .collect(),
            })
        }
        None => None,
    };
    let positives = y.iter().filter(|&&l| l).count();
    let seconds_rate = |s: Option<f64>| match (preds.images, s) {
        (Some(n), Some(s)) if s > 0.0 => Some(n as f64 / s),
        _ => None,
    };
    Ok(EvaluationReport {
        n: y.len(),
        positives,
        negatives: y.len() - positives,
        threshold,
        roc_auc: m.auc,
        f1: m.f1,
        accuracy: m.accuracy,
        sensitivity: m.sensitivity,
        specificity: m.specificity,
        ppv: m.ppv,
        npv: m.npv,
        confusion_matrix: Counts {
            tp: m.confusion.true_positive,
            fp: m.confusion.false_positive,
            tn: m.confusion.true_negative,
            fn_: m.confusion.false_negative,
        },
        images_per_second: seconds_rate(preds.total_seconds),
        inference_images_per_second: seconds_rate(preds.inference_seconds),
        device: preds.device.clone(),
        skipped: preds
            .rows
            .iter()
            .filter(|r| r.probability.is_none())
            .count(),
        labels_without_prediction,
        predictions_without_label: preds
            .rows
            .iter()
            .zip(&used)
            .filter(|(r, &u)| !u && r.probability.is_some())
            .map(|(r, _)| r.id.clone())
            .collect(),
        roc_curve,
    })
}

/// Writes the report as pretty-printed JSON.
pub fn write_report(path: &Path, report: &EvaluationReport) -> Result<()> {
    let mut json = serde_json::to_string_pretty(report)
        .map_err(|e| Error::invalid(format!("report to JSON: {e}")))?;
    json.push('\n');
    write_atomic(path, json.as_bytes())
}

/// Writes a CAM overlay PNG ([`crate::plot::heatmap_overlay`]): the
/// normalized heat map in viridis at half opacity over the gray network
/// input (stretched from its darkest to its brightest pixel), with `title`
/// above and a 0–1 colorbar.
pub fn write_cam_png(path: &Path, overlay: &CamOverlay, title: &str) -> Result<()> {
    let (w, h) = (overlay.width, overlay.height);
    let gray: Vec<u16> = overlay
        .image
        .iter()
        .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u16)
        .collect();
    let image = GrayImage::new(w, h, BitDepth::Eight, gray)?;
    // One value per pixel: the heat is already at the image's resolution.
    let grid = PatchGrid::new(w, h, 1)?;
    let values: Vec<f64> = overlay.heat.iter().map(|&v| f64::from(v)).collect();
    let opts = HeatmapOptions {
        title: title.to_string(),
        alpha: 0.5,
        range: Some((0.0, 1.0)),
        ..HeatmapOptions::default()
    };
    heatmap_overlay(path, &image, &grid, &values, &opts)
}

/// Writes the ROC curve as a PNG plot ([`crate::plot::roc_plot`]) with the
/// AUC in the title.
pub fn write_roc_png(path: &Path, curve: &RocPoints, auc: Option<f64>) -> Result<()> {
    let opts = PlotOptions {
        title: auc.map_or_else(|| "ROC".to_string(), |a| format!("ROC (AUC = {a:.3})")),
        x_label: "False positive rate".to_string(),
        y_label: "True positive rate".to_string(),
        ..PlotOptions::default()
    };
    roc_plot(path, &curve.fpr, &curve.tpr, &opts)
}
