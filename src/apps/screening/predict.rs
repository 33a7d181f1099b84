//! Prediction: every image of a run through a [`DenseNet`] in device
//! batches, with images read and pre-processed on a second thread
//! ([`prefetch`]) while the device works; unreadable or excluded images are
//! skipped with a reason, never an error. [`screen_images`] is
//! `cellmorph screen predict`: weights and image list in, predictions CSV
//! out.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use super::cam::{cam_overlay, input_gray, write_cam_png, write_heat_png};
use super::files::{write_features, write_predictions};
use super::images::{list_images, prefetch, ImageEntry};
use super::preprocess::{Prepared, Preprocess, SkipReason};
use super::saliency::{
    densenet_averaged_maps, grad_cam_plus_plus, upsample_normalized, visual_back_prop,
    write_map_png16, SaliencyMethod,
};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::TensorFile;
use crate::models::densenet::{DenseNet, DenseNetConfig, DenseNetWorkspace};
use crate::tensor::Tensor;

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
    /// Write each image's saliency map as an overlay PNG and a 16-bit PNG
    /// map, as it goes.
    pub saliency: Option<SaliencyOptions>,
}

/// Which saliency maps [`predict`] writes, and where.
#[derive(Clone, Debug, PartialEq)]
pub struct SaliencyOptions {
    /// The method.
    pub method: SaliencyMethod,
    /// Directory of `<stem>.<method>.png` (the map over the gray input, as
    /// [`write_cam_png`]) and `<stem>.<method>.map.png` (the normalized map
    /// at input resolution, 16-bit gray, [`write_map_png16`]).
    pub dir: PathBuf,
    /// The class explained (CAM, Grad-CAM++); `None`: each image's
    /// predicted class (the arg max probability). VisualBackProp explains
    /// no class.
    pub class: Option<usize>,
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
            saliency: None,
        }
    }
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
    /// The saliency overlay PNG written for the image, when asked for.
    pub saliency: Option<PathBuf>,
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
    if !(0.0..=1.0).contains(&options.threshold) {
        return Err(Error::invalid(format!(
            "--threshold {}: a probability threshold must lie in [0, 1] (above 1 nothing could be positive)",
            options.threshold
        )));
    }
    // Fail on a too-small input size before reading any image.
    cfg.features_shape(1, options.preprocess.height, options.preprocess.width)?;
    let start = Instant::now();
    let mut outcomes: Vec<Option<std::result::Result<Verdict, SkipReason>>> =
        vec![None; images.len()];
    if let Some(s) = &options.saliency {
        if let Some(class) = s.class.filter(|&c| c >= cfg.num_classes()) {
            return Err(Error::invalid(format!(
                "--saliency-class {class}: the head has {} classes (0 to {})",
                cfg.num_classes(),
                cfg.num_classes() - 1
            )));
        }
    }
    if let Some(dir) = &options.cam_dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    if let Some(s) = &options.saliency {
        std::fs::create_dir_all(&s.dir).map_err(|e| Error::io(&s.dir, e))?;
    }
    let mut runner = BatchRunner {
        be,
        model,
        images,
        options,
        ws: None,
        inference_seconds: 0.0,
        cam_names: HashSet::new(),
        saliency_names: HashSet::new(),
    };
    let mut done = 0;
    let bs = options.batch_size;
    prefetch(images, bs, &options.preprocess, |rx| -> Result<()> {
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
    saliency_names: HashSet<String>,
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
        let method = self.options.saliency.as_ref().map(|s| s.method);
        let activated = if self.options.cam_dir.is_some()
            || method.is_some_and(|m| m != SaliencyMethod::VisualBackProp)
        {
            Some(ws.activated().to_vec()?)
        } else {
            None
        };
        self.inference_seconds += t.elapsed().as_secs_f64();
        // VisualBackProp reads the stem's and every block's output back.
        let averaged = if method == Some(SaliencyMethod::VisualBackProp) {
            Some(densenet_averaged_maps(self.model, ws)?)
        } else {
            None
        };
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
        let saliency = match &self.options.saliency {
            Some(s) => {
                let targets: Vec<(PathBuf, PathBuf)> = batch
                    .iter()
                    .map(|(i, _, _)| self.saliency_paths(&s.dir, *i, s.method))
                    .collect();
                let per_image = (c * fh * fw).max(1);
                let model = self.model;
                let size = (p.height, p.width);
                batch
                    .par_iter()
                    .zip(&targets)
                    .enumerate()
                    .map(|(k, ((_, x, _), (overlay, map)))| {
                        let row = &probs[k * classes..(k + 1) * classes];
                        let class = s.class.unwrap_or_else(|| arg_max(row));
                        let features = || {
                            activated
                                .as_ref()
                                .and_then(|a| a.get(k * per_image..(k + 1) * per_image))
                                .ok_or_else(|| Error::invalid("saliency: no features read back"))
                        };
                        let heat = match s.method {
                            SaliencyMethod::Cam => {
                                cam_overlay(model, features()?, (fh, fw), x, p, class)?.heat
                            }
                            SaliencyMethod::GradCamPlusPlus => {
                                let g = grad_cam_plus_plus(model, features()?, (fh, fw), class)?;
                                upsample_normalized(&g.values, (fh, fw), size)?
                            }
                            SaliencyMethod::VisualBackProp => {
                                let maps =
                                    averaged.as_ref().and_then(|a| a.get(k)).ok_or_else(|| {
                                        Error::invalid("saliency: no feature maps read back")
                                    })?;
                                visual_back_prop(maps, size)?
                            }
                        };
                        // Short enough for the 306-pixel-wide input.
                        let title = if s.method.has_class() {
                            format!("{} c{class}, p = {:.3}", s.method.label(), row[class])
                        } else {
                            let pc = self.options.positive_class;
                            format!("{}, p{pc}={:.3}", s.method.label(), row[pc])
                        };
                        write_heat_png(overlay, &input_gray(x, p)?, &heat, size, &title)?;
                        write_map_png16(map, &heat, size)?;
                        Ok(Some(overlay.clone()))
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            None => vec![None; n],
        };
        for (k, (((i, _, mean_v), cam), saliency)) in
            batch.drain(..).zip(cams).zip(saliency).enumerate()
        {
            let probability = probs[k * classes + self.options.positive_class];
            let features = pooled.as_ref().map(|v| v[k * c..(k + 1) * c].to_vec());
            outcomes[i] = Some(Ok(Verdict {
                probability,
                positive: f64::from(probability) >= self.options.threshold,
                mean_v,
                features,
                cam,
                saliency,
            }));
        }
        Ok(n)
    }

    /// `<dir>/<file stem>.cam.png`, with `_<index>` added when two images
    /// share a stem.
    fn cam_path(&mut self, dir: &Path, index: usize) -> PathBuf {
        let stem = unique_stem(self.images, &mut self.cam_names, index);
        dir.join(format!("{stem}.cam.png"))
    }

    /// `<dir>/<file stem>.<method>.png` and `.<method>.map.png`, with
    /// `_<index>` added to the stem when two images share one.
    fn saliency_paths(
        &mut self,
        dir: &Path,
        index: usize,
        method: SaliencyMethod,
    ) -> (PathBuf, PathBuf) {
        let stem = unique_stem(self.images, &mut self.saliency_names, index);
        let m = method.name();
        (
            dir.join(format!("{stem}.{m}.png")),
            dir.join(format!("{stem}.{m}.map.png")),
        )
    }
}

/// The file stem of image `index`, or `<stem>_<index>` when `taken` holds
/// the stem already; records what it returns in `taken`.
fn unique_stem(images: &[ImageEntry], taken: &mut HashSet<String>, index: usize) -> String {
    let id = images.get(index).map_or("image", |e| e.id.as_str());
    let stem = Path::new(id)
        .file_stem()
        .map_or_else(|| "image".to_string(), |s| s.to_string_lossy().into_owned());
    if taken.insert(stem.clone()) {
        return stem;
    }
    let stem = format!("{stem}_{index}");
    taken.insert(stem.clone());
    stem
}

/// Index of the largest value (the first of ties).
fn arg_max(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// What [`screen_images`] reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct ScreenImagesOptions {
    /// DenseNet weights (torchvision state_dict names, safetensors).
    pub weights: PathBuf,
    /// A directory of PNG/TIFF images, or a CSV whose header has an `image`
    /// column ([`list_images`]).
    pub images: PathBuf,
    /// Predictions CSV to write ([`write_predictions`]).
    pub output: PathBuf,
    /// Also write each predicted image's pooled features here (`.csv` or
    /// `.safetensors`, [`write_features`]).
    pub features_out: Option<PathBuf>,
    /// Also write a class activation map overlay PNG per predicted image here.
    pub cam_dir: Option<PathBuf>,
    /// Also write a saliency overlay and map per predicted image.
    pub saliency: Option<SaliencyOptions>,
    /// Images per device batch (device memory grows linearly with it).
    pub batch_size: usize,
    /// Positive when the positive-class probability is at least this.
    pub threshold: f64,
    /// Index of the positive class in the head's output.
    pub positive_class: usize,
    /// Normalize inputs with the ImageNet mean and std.
    pub imagenet_normalize: bool,
}

/// What [`screen_images`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct ScreenImagesSummary {
    /// The network that ran.
    pub model: DenseNetConfig,
    /// Files of an image directory passed over (no PNG/TIFF extension).
    pub ignored: Vec<PathBuf>,
    /// The predictions, their timing and the options used.
    pub run: PredictRun,
}

/// `cellmorph screen predict`: loads the DenseNet onto `be`, lists the
/// images, predicts every one ([`predict`], with the pre-processing of the
/// paper and the network's input channels) and writes the predictions CSV
/// and, when asked, the pooled features. `progress` is called with the
/// images finished so far and the total.
pub fn screen_images(
    be: &Backend,
    o: &ScreenImagesOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<ScreenImagesSummary> {
    if o.batch_size == 0 {
        return Err(Error::invalid("--batch-size must be at least 1"));
    }
    let file = TensorFile::open(&o.weights)?;
    let model = DenseNet::from_file(be, &file)?;
    let list = list_images(&o.images)?;
    let options = PredictOptions {
        batch_size: o.batch_size,
        preprocess: Preprocess {
            channels: model.config().in_channels,
            imagenet_normalize: o.imagenet_normalize,
            ..Preprocess::default()
        },
        threshold: o.threshold,
        positive_class: o.positive_class,
        keep_features: o.features_out.is_some(),
        cam_dir: o.cam_dir.clone(),
        saliency: o.saliency.clone(),
    };
    let total = list.entries.len();
    progress(0, total);
    let run = predict(be, &model, &list.entries, &options, |done| {
        progress(done, total)
    })?;
    write_predictions(&o.output, &run, &o.weights.display().to_string())?;
    if let Some(path) = &o.features_out {
        write_features(path, &run)?;
    }
    Ok(ScreenImagesSummary {
        model: model.config().clone(),
        ignored: list.ignored,
        run,
    })
}
