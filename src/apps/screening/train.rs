//! Transfer learning of the screening DenseNet, stage 1 of Kim et al.:
//! the backbone frozen, a new head trained on its pooled features.
//!
//! [`screen_train`] is `cellmorph screen train`: it loads a torchvision
//! DenseNet `state_dict` (or seeds a DenseNet-121 backbone with
//! torchvision's initialization, [`random_backbone`]), computes every
//! labelled image's pooled features **once** with the inference network
//! ([`predict`], the pre-processing of `screen predict`; on any device with
//! [`screen_train_on`]), keeps
//! them in memory (`images × features` floats), splits the images by file
//! into training and validation sets (stratified, seeded,
//! [`stratified_split`]), trains the head on the cached features
//! ([`train_head`]) and writes the whole network (backbone unchanged, the
//! best epoch's head) as safetensors that `screen predict` loads, with the
//! per-epoch metrics as CSV and curves as PNG.
//!
//! [`labelled_features`] is the feature pass (shared with `screen tune`,
//! whose trials all train on one such cache); [`train_head`] is the
//! reusable core (the search calls it once per trial): mini-batches from a seeded shuffle each epoch, AdamW
//! (Adam when the weight decay is 0), class-weighted cross-entropy, dropout
//! after the hidden ReLU of Kim's head with the counter-based mask
//! [`dropout_keep`], validation loss, ROC AUC, F1 and accuracy each epoch,
//! early stopping on validation AUC (ties broken by the lower validation
//! loss), the best epoch's head kept.
//!
//! Augmentation (flips, rotations) does not apply here: with cached
//! features every epoch sees the same inputs. Everything is deterministic:
//! the same inputs and seed give the same bytes.
//!
//! **Stage 2** ([`FineTuneOptions`], `--unfreeze`) starts from stage 1's
//! best network and trains part of the backbone with the head, on the
//! training images, at a lower learning rate (default stage 1's / 10),
//! with AdamW (a fresh optimizer state), stage 1's class weights, dropout
//! and batch size, through [`DenseNetTrainer`]:
//! - `Unfreeze::Last`: the last dense block and `norm5` (with the head)
//!   are trained; their BatchNorms (every `norm1`/`norm2` of the last
//!   block, and `norm5`) run in **training mode** (batch statistics, running
//!   statistics updated, counters advanced). Everything before the block
//!   (stem, `norm0`, earlier blocks, transitions) is frozen with its
//!   BatchNorms in eval mode, as a PyTorch model whose frozen part is in
//!   `eval()`; its output, the last block's input, is computed once per
//!   image and cached: `images × C × H × W × 4` bytes (DenseNet-121 at
//!   226 × 306: 512 × 7 × 9, 129 KB an image). A cache above
//!   `max_cache_bytes` ([`DEFAULT_MAX_CACHE_BYTES`], `--max-cache-gib 8`)
//!   is refused before it is built. Frozen tensors are written unchanged,
//!   bit for bit.
//! - `Unfreeze::All`: every layer is trained, every BatchNorm in training
//!   mode; nothing is cached: each epoch reads and pre-processes the images
//!   batch by batch (activations live for one batch). Each training image
//!   is flipped left–right and/or top–bottom (both: a 180° rotation; 90°
//!   rotations would change the 226 × 306 shape) by bits 0 and 1 of
//!   [`counter_u64`](crate::rng::counter_u64)`(seed, epoch, image row)`.
//!   The cached `Last` activations are not augmented (a flip does not
//!   commute with the frozen convolutions).
//!
//! With [`screen_train_on`] the feature pass and all of stage 2 (the frozen
//! part's pass, the training steps, validation) run on the given device
//! through [`DenseNetTrainer::step_on`]; stage 1's head and the optimizers
//! stay on the host.
//!
//! Validation runs the network in eval mode each epoch; stage-2 epochs are
//! numbered after stage 1's, appended to the same metrics CSV (`stage` 2)
//! and curves. Early stopping (stage 1's patience) and the best epoch work
//! as in stage 1, with stage 1's best as the bar: when no stage-2 epoch
//! beats it (higher validation AUC, or equal AUC and lower loss), stage 1's
//! network is written.
//!
//! After each stage-2 epoch a checkpoint ([`crate::train::checkpoint`]:
//! the state, AdamW's moments, the best epoch's state under `best.`, the
//! BatchNorm counters and the metrics so far) is written atomically;
//! resuming from it runs stage 1 again (deterministic, on cached
//! features) and continues stage 2 to the same bytes as the unbroken run
//! (each epoch's shuffle, dropout and flips depend only on the seed, the
//! epoch and the step).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::files::read_labels;
use super::images::{list_images, prefetch, ImageEntry};
use super::predict::{predict, PredictOptions};
use super::preprocess::{Prepared, Preprocess, SkipReason};
use crate::backend::Backend;
use crate::csv::CsvWriter;
use crate::error::{Error, Result};
use crate::io::{check_output_is_not_an_input, write_atomic, TensorFile, TensorWriter};
use crate::models::densenet::{random_backbone, DenseNet, DenseNetArch, DenseNetConfig};
use crate::plot::{line_plot, PlotOptions, Series};
use crate::rng::{dropout_keep, SplitMix64};
use crate::stats::classification::binary_metrics;
use crate::train::checkpoint;
use crate::train::densenet::{Batch, DenseNetState, DenseNetTrainer, StepSettings};
use crate::train::loss::{cross_entropy, cross_entropy_backward};
use crate::train::optim::{AdamConfig, Method, Optimizer};
use crate::train::store::ParamStore;

/// Classes of the screening head (negative, positive).
pub const CLASSES: usize = 2;
/// Metadata key of the training record in the written weights.
pub const TRAIN_METADATA_KEY: &str = "cellmorph.screen_train";

// Sub-streams of the seed.
const STREAM_HEAD: u64 = 1;
const STREAM_SPLIT: u64 = 2;
const STREAM_SHUFFLE: u64 = 3;
const STREAM_DROPOUT: u64 = 4;
const STREAM_FT_SHUFFLE: u64 = 5;
const STREAM_FT_DROPOUT: u64 = 6;
const STREAM_FT_FLIPS: u64 = 7;

/// Default bound of the stage-2 activation cache (`--unfreeze last`).
pub const DEFAULT_MAX_CACHE_BYTES: u64 = 8 << 30;

/// What stage 2 trains together with the head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Unfreeze {
    /// The last dense block and `norm5`, on the cached activations at the
    /// last block's input.
    Last,
    /// Every layer, on the images (flipped at random).
    All,
}

/// Settings of stage 2 (fine-tuning, [`screen_train`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FineTuneOptions {
    /// What is unfrozen.
    pub unfreeze: Unfreeze,
    /// Most epochs of stage 2 (early stopping with stage 1's patience).
    pub epochs: usize,
    /// Learning rate (`None`: stage 1's divided by 10).
    pub lr: Option<f64>,
    /// `Unfreeze::Last`: refuse an activation cache larger than this.
    pub max_cache_bytes: u64,
    /// Checkpoint written after each stage-2 epoch (`None`:
    /// `<output stem>.checkpoint.safetensors`).
    #[serde(skip)]
    pub checkpoint: Option<PathBuf>,
    /// Resume stage 2 from this checkpoint (stage 1 is run again: it is
    /// deterministic); the result equals the unbroken run's.
    #[serde(skip)]
    pub resume: Option<PathBuf>,
}

impl Default for FineTuneOptions {
    fn default() -> Self {
        FineTuneOptions {
            unfreeze: Unfreeze::Last,
            epochs: 5,
            lr: None,
            max_cache_bytes: DEFAULT_MAX_CACHE_BYTES,
            checkpoint: None,
            resume: None,
        }
    }
}

/// The classifier put on the pooled features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum HeadKind {
    /// Kim et al.'s `Sequential(Linear(C, hidden), ReLU, Dropout,
    /// Linear(hidden, 2))`, saved as `classifier.{0,3}.*`.
    Kim {
        /// Width of the hidden layer (64 in the paper).
        hidden: usize,
    },
    /// One `Linear(C, 2)`, saved as `classifier.*` (no dropout).
    Linear,
}

impl HeadKind {
    /// The Linear layers: (`state_dict` prefix, in, out).
    fn layers(self, in_features: usize) -> Vec<(&'static str, usize, usize)> {
        match self {
            HeadKind::Kim { hidden } => vec![
                ("classifier.0", in_features, hidden),
                ("classifier.3", hidden, CLASSES),
            ],
            HeadKind::Linear => vec![("classifier", in_features, CLASSES)],
        }
    }
}

/// A head's parameters (in a [`ParamStore`] under their `state_dict` names).
#[derive(Clone, Debug, PartialEq)]
pub struct Head {
    kind: HeadKind,
    in_features: usize,
    store: ParamStore,
    /// Store ids of each layer's (weight, bias), with its (in, out).
    layers: Vec<(usize, usize, usize, usize)>,
}

/// What a training-mode forward keeps for the backward.
struct HeadPass {
    /// Kim's head: the hidden layer after ReLU and dropout `[n, hidden]`,
    /// and the dropout scale per element (0 where dropped or ReLU-clamped).
    hidden: Option<(Vec<f32>, Vec<f32>)>,
    logits: Vec<f32>,
}

impl Head {
    fn build(
        kind: HeadKind,
        in_features: usize,
        values: Vec<(Vec<f32>, Vec<f32>)>,
    ) -> Result<Self> {
        if in_features == 0 || matches!(kind, HeadKind::Kim { hidden: 0 }) {
            return Err(Error::invalid(format!(
                "a head of {in_features} inputs ({kind:?}) is empty"
            )));
        }
        let mut store = ParamStore::new();
        let mut layers = Vec::new();
        for ((name, i, o), (w, b)) in kind.layers(in_features).into_iter().zip(values) {
            let wi = store.insert(format!("{name}.weight"), &[o, i], w, true)?;
            let bi = store.insert(format!("{name}.bias"), &[o], b, true)?;
            layers.push((wi, bi, i, o));
        }
        Ok(Head {
            kind,
            in_features,
            store,
            layers,
        })
    }

    /// A new head with PyTorch's default `Linear` initialization: weight and
    /// bias uniform in `±1/√in`, each layer from its own stream of `seed`.
    ///
    /// # Errors
    /// Zero inputs or a zero hidden width.
    pub fn fresh(kind: HeadKind, in_features: usize, seed: u64) -> Result<Self> {
        let root = SplitMix64::new(seed);
        let values = kind
            .layers(in_features)
            .iter()
            .enumerate()
            .map(|(k, &(_, i, o))| {
                let mut rng = root.fork(k as u64);
                let bound = 1.0 / (i.max(1) as f32).sqrt();
                let w = rng.uniform_vec(o * i, -bound, bound);
                let b = rng.uniform_vec(o, -bound, bound);
                (w, b)
            })
            .collect();
        Self::build(kind, in_features, values)
    }

    /// The head of `file` when it has exactly this kind's `classifier`
    /// tensors with matching shapes; `None` otherwise (another head, or
    /// none).
    ///
    /// # Errors
    /// A matching tensor that cannot be read or holds a non-finite value.
    pub fn from_file(
        file: &TensorFile,
        kind: HeadKind,
        in_features: usize,
    ) -> Result<Option<Self>> {
        let layers = kind.layers(in_features);
        let names: Vec<String> = file
            .names()
            .into_iter()
            .filter(|n| n.starts_with("classifier."))
            .collect();
        if names.len() != 2 * layers.len() {
            return Ok(None);
        }
        let mut values = Vec::new();
        for &(name, i, o) in &layers {
            let (wn, bn) = (format!("{name}.weight"), format!("{name}.bias"));
            if file.shape(&wn) != Some(&[o, i][..]) || file.shape(&bn) != Some(&[o][..]) {
                return Ok(None);
            }
            let (_, w) = file.f32(&wn)?;
            let (_, b) = file.f32(&bn)?;
            if w.iter().chain(&b).any(|v| !v.is_finite()) {
                return Err(Error::format(
                    file.path(),
                    format!("{name}: a non-finite weight"),
                ));
            }
            values.push((w, b));
        }
        Self::build(kind, in_features, values).map(Some)
    }

    /// The head's kind.
    pub fn kind(&self) -> HeadKind {
        self.kind
    }

    /// Adds the head's tensors to `w` under their `state_dict` names.
    pub fn write_values(&self, w: &mut TensorWriter) -> Result<()> {
        self.store.write_values(w, "")
    }

    fn check_input(&self, x: &[f32], n: usize) -> Result<()> {
        if x.len() != n * self.in_features {
            return Err(Error::shape(
                "screening head",
                format!(
                    "{} feature values for {n} images of {} features",
                    x.len(),
                    self.in_features
                ),
            ));
        }
        Ok(())
    }

    /// One layer: `y = x·Wᵀ + b`.
    fn linear(&self, layer: usize, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let (wi, bi, i, o) = self.layers[layer];
        let mut y = vec![0.0f32; n * o];
        crate::cpu::linear::linear_forward(
            n,
            i,
            o,
            x,
            &self.store.get(wi).value,
            Some(&self.store.get(bi).value),
            &mut y,
        )?;
        Ok(y)
    }

    /// Forward of `n` feature rows; with `dropout` = (seed, step, p), in
    /// training mode: element `k` of the batch's hidden layer is kept when
    /// [`dropout_keep`]`(seed, step, k, p)` and scaled by `1/(1−p)`.
    fn forward(&self, x: &[f32], n: usize, dropout: Option<(u64, u64, f32)>) -> Result<HeadPass> {
        self.check_input(x, n)?;
        match self.kind {
            HeadKind::Linear => Ok(HeadPass {
                hidden: None,
                logits: self.linear(0, x, n)?,
            }),
            HeadKind::Kim { .. } => {
                let mut h = self.linear(0, x, n)?;
                let mut scale = vec![0.0f32; h.len()];
                for (k, (v, s)) in h.iter_mut().zip(scale.iter_mut()).enumerate() {
                    let keep = match dropout {
                        Some((seed, step, p)) if p > 0.0 => {
                            dropout_keep(seed, step, k as u64, p).then_some(1.0 / (1.0 - p))
                        }
                        _ => Some(1.0),
                    };
                    *s = match keep {
                        Some(m) if *v > 0.0 => m,
                        _ => 0.0,
                    };
                    *v *= *s;
                }
                let logits = self.linear(1, &h, n)?;
                Ok(HeadPass {
                    hidden: Some((h, scale)),
                    logits,
                })
            }
        }
    }

    /// Eval-mode logits `[n, 2]` (dropout off).
    pub fn logits(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        Ok(self.forward(x, n, None)?.logits)
    }

    /// Gradients of the loss (given its gradient `dlogits`) into the store.
    fn backward(&mut self, x: &[f32], n: usize, pass: &HeadPass, dlogits: &[f32]) -> Result<()> {
        self.store.zero_grads();
        let last = self.layers.len() - 1;
        let input_last = match &pass.hidden {
            Some((h, _)) => h.as_slice(),
            None => x,
        };
        let dh = self.linear_backward(last, input_last, n, dlogits)?;
        if let Some((_, scale)) = &pass.hidden {
            let dpre: Vec<f32> = dh.iter().zip(scale).map(|(g, s)| g * s).collect();
            self.linear_backward(0, x, n, &dpre)?;
        }
        Ok(())
    }

    /// Backward of one layer: accumulates its weight and bias gradients,
    /// returns the input gradient.
    fn linear_backward(
        &mut self,
        layer: usize,
        x: &[f32],
        n: usize,
        dy: &[f32],
    ) -> Result<Vec<f32>> {
        let (wi, bi, i, o) = self.layers[layer];
        let mut dx = vec![0.0f32; n * i];
        let mut dw = vec![0.0f32; o * i];
        let mut db = vec![0.0f32; o];
        crate::cpu::linear::linear_backward(
            n,
            i,
            o,
            x,
            &self.store.get(wi).value,
            dy,
            &mut dx,
            &mut dw,
            Some(&mut db),
        )?;
        self.store.accumulate(wi, &dw)?;
        self.store.accumulate(bi, &db)?;
        Ok(dx)
    }
}

/// Cached features with a label per row.
#[derive(Clone, Copy, Debug)]
pub struct FeatureSet<'a> {
    /// `[n, dim]`, row-major.
    pub features: &'a [f32],
    /// Features per image.
    pub dim: usize,
    /// `n` labels (true: the positive class 1).
    pub labels: &'a [bool],
}

/// Row indices of the training and validation sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    /// Training rows, ascending.
    pub train: Vec<usize>,
    /// Validation rows, ascending.
    pub val: Vec<usize>,
}

/// Fisher–Yates shuffle driven by `rng`.
fn shuffle(v: &mut [usize], rng: &mut SplitMix64) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
}

/// Splits rows into training and validation sets per class: of each
/// class's `n_c` rows, `round(n_c · val_fraction)` (at least 1, at most
/// `n_c − 1`) go to validation, drawn by a seeded shuffle.
///
/// # Errors
/// A fraction outside (0, 1), or a class with fewer than 2 rows.
pub fn stratified_split(labels: &[bool], val_fraction: f64, seed: u64) -> Result<Split> {
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        return Err(Error::invalid(format!(
            "--val-fraction {val_fraction}: must lie strictly between 0 and 1 (the validation set picks the best epoch)"
        )));
    }
    let root = SplitMix64::new(seed).fork(STREAM_SPLIT);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for class in [false, true] {
        let mut rows: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
        if rows.len() < 2 {
            return Err(Error::invalid(format!(
                "class {} has {} image(s): training needs at least 2 of each class (one to train on, one to validate)",
                u8::from(class),
                rows.len()
            )));
        }
        shuffle(&mut rows, &mut root.fork(u64::from(class)));
        let k = ((rows.len() as f64 * val_fraction).round() as usize).clamp(1, rows.len() - 1);
        val.extend_from_slice(&rows[..k]);
        train.extend_from_slice(&rows[k..]);
    }
    train.sort_unstable();
    val.sort_unstable();
    Ok(Split { train, val })
}

/// Settings of [`train_head`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadTrainOptions {
    /// Most epochs.
    pub epochs: usize,
    /// Images per optimizer step (the last batch of an epoch may be smaller).
    pub batch_size: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW's decoupled weight decay (0: plain Adam).
    pub weight_decay: f64,
    /// Dropout probability after the hidden ReLU of Kim's head.
    pub dropout: f32,
    /// Seeds the shuffles and the dropout masks.
    pub seed: u64,
    /// Stop after this many epochs without a better validation AUC (0:
    /// never stop early).
    pub patience: usize,
    /// Weigh the loss by class, `n / (2·n_c)` over the training set
    /// (scikit-learn's "balanced"); otherwise every image counts once.
    pub balanced: bool,
}

impl Default for HeadTrainOptions {
    fn default() -> Self {
        HeadTrainOptions {
            epochs: 30,
            batch_size: 32,
            lr: 1e-3,
            weight_decay: 0.0,
            dropout: 0.5,
            seed: 0,
            patience: 5,
            balanced: true,
        }
    }
}

/// One epoch's metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based.
    pub epoch: usize,
    /// Mean training loss over the epoch's batches (weighted by batch size;
    /// dropout on).
    pub train_loss: f64,
    /// Validation loss (dropout off, the same class weights).
    pub val_loss: f64,
    /// Validation ROC AUC of the positive-class probability.
    pub val_auc: f64,
    /// Validation F1 at probability 0.5 (`None` when undefined).
    pub val_f1: Option<f64>,
    /// Validation accuracy at probability 0.5.
    pub val_accuracy: f64,
    /// Best epoch so far (the head of this epoch is kept).
    pub best: bool,
}

/// What [`train_head`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadTrainResult {
    /// The head of the best epoch.
    pub head: Head,
    /// Every epoch run, in order.
    pub epochs: Vec<EpochMetrics>,
    /// The best epoch (1-based).
    pub best_epoch: usize,
    /// Whether early stopping ended the run before `epochs`.
    pub stopped_early: bool,
    /// The loss's class weights (negative, positive), if balanced.
    pub class_weights: Option<[f32; 2]>,
}

impl HeadTrainResult {
    /// The best epoch's metrics.
    pub fn best(&self) -> Option<&EpochMetrics> {
        self.epochs.get(self.best_epoch.checked_sub(1)?)
    }
}

fn gather(data: &FeatureSet, rows: &[usize]) -> (Vec<f32>, Vec<usize>) {
    let mut x = Vec::with_capacity(rows.len() * data.dim);
    let mut t = Vec::with_capacity(rows.len());
    for &r in rows {
        x.extend_from_slice(&data.features[r * data.dim..(r + 1) * data.dim]);
        t.push(usize::from(data.labels[r]));
    }
    (x, t)
}

fn check_head_options(o: &HeadTrainOptions) -> Result<()> {
    if o.epochs == 0 {
        return Err(Error::invalid("--epochs must be at least 1"));
    }
    if o.batch_size == 0 {
        return Err(Error::invalid("--batch-size must be at least 1"));
    }
    if !(o.lr > 0.0 && o.lr.is_finite()) {
        return Err(Error::invalid(format!(
            "--lr {}: must be a positive number",
            o.lr
        )));
    }
    if !(o.weight_decay >= 0.0 && o.weight_decay.is_finite()) {
        return Err(Error::invalid(format!(
            "--weight-decay {}: must be 0 or more",
            o.weight_decay
        )));
    }
    if !(0.0..1.0).contains(&o.dropout) {
        return Err(Error::invalid(format!(
            "--dropout {}: must lie in [0, 1)",
            o.dropout
        )));
    }
    Ok(())
}

/// Trains `head` on the rows `split.train` of `data`, validating on
/// `split.val` after each epoch (see the module docs); `on_epoch` sees
/// each epoch's metrics as it ends.
///
/// # Errors
/// Invalid options, features that do not fit the head, an empty split or a
/// validation set without both classes, or a non-finite loss.
pub fn train_head(
    data: &FeatureSet,
    split: &Split,
    mut head: Head,
    o: &HeadTrainOptions,
    mut on_epoch: impl FnMut(&EpochMetrics),
) -> Result<HeadTrainResult> {
    check_head_options(o)?;
    let n = data.labels.len();
    if data.dim != head.in_features || data.features.len() != n * data.dim {
        return Err(Error::shape(
            "train_head",
            format!(
                "{} feature values for {n} labels of {} features; the head takes {}",
                data.features.len(),
                data.dim,
                head.in_features
            ),
        ));
    }
    if split.train.is_empty() || split.val.iter().chain(&split.train).any(|&r| r >= n) {
        return Err(Error::invalid(format!(
            "train_head: {} training and {} validation rows for {n} images",
            split.train.len(),
            split.val.len()
        )));
    }
    let val_labels: Vec<bool> = split.val.iter().map(|&r| data.labels[r]).collect();
    if !(val_labels.contains(&true) && val_labels.contains(&false)) {
        return Err(Error::invalid(
            "train_head: the validation set needs both classes for its AUC",
        ));
    }
    let class_weights = if o.balanced {
        let pos = split.train.iter().filter(|&&r| data.labels[r]).count();
        let neg = split.train.len() - pos;
        if pos == 0 || neg == 0 {
            return Err(Error::invalid(
                "train_head: balanced class weights need both classes in the training set",
            ));
        }
        let total = split.train.len() as f64;
        Some([
            (total / (2.0 * neg as f64)) as f32,
            (total / (2.0 * pos as f64)) as f32,
        ])
    } else {
        None
    };
    let weights = class_weights.as_ref().map(|w| &w[..]);
    let adam = AdamConfig {
        weight_decay: o.weight_decay,
        ..AdamConfig::default()
    };
    let mut opt = Optimizer::new(Method::AdamW(adam))?;
    head.store.register(&mut opt)?;
    let root = SplitMix64::new(o.seed);
    let dropout_seed = root.fork(STREAM_DROPOUT).next_u64();
    let (val_x, val_t) = gather(data, &split.val);
    let mut order = split.train.clone();
    let mut epochs = Vec::new();
    let mut best: Option<(f64, f64, usize, Head)> = None;
    let mut step = 0u64;
    let mut stopped_early = false;
    for epoch in 1..=o.epochs {
        shuffle(
            &mut order,
            &mut root.fork(STREAM_SHUFFLE).fork(epoch as u64),
        );
        let mut loss_sum = 0.0f64;
        for rows in order.chunks(o.batch_size) {
            let (x, t) = gather(data, rows);
            let pass = head.forward(&x, rows.len(), Some((dropout_seed, step, o.dropout)))?;
            let loss = cross_entropy(&pass.logits, CLASSES, &t, weights)?;
            if !loss.is_finite() {
                return Err(Error::invalid(format!(
                    "training diverged at epoch {epoch}: the loss is {loss} (try a lower --lr)"
                )));
            }
            loss_sum += f64::from(loss) * rows.len() as f64;
            let dlogits = cross_entropy_backward(&pass.logits, CLASSES, &t, weights, 1.0)?;
            head.backward(&x, rows.len(), &pass, &dlogits)?;
            head.store.step(&mut opt, o.lr)?;
            step += 1;
        }
        let logits = head.logits(&val_x, split.val.len())?;
        let (val_loss, m) = validation_metrics(&logits, &val_t, &val_labels, weights)?;
        let auc = m.auc.unwrap_or(f64::NAN);
        let improved = match &best {
            None => true,
            Some((b_auc, b_loss, _, _)) => auc > *b_auc || (auc == *b_auc && val_loss < *b_loss),
        };
        if improved {
            let mut kept = head.clone();
            kept.store.zero_grads();
            best = Some((auc, val_loss, epoch, kept));
        }
        let metrics = EpochMetrics {
            epoch,
            train_loss: loss_sum / order.len() as f64,
            val_loss,
            val_auc: auc,
            val_f1: m.f1,
            val_accuracy: m.accuracy.unwrap_or(f64::NAN),
            best: improved,
        };
        on_epoch(&metrics);
        epochs.push(metrics);
        let best_epoch = best.as_ref().map_or(epoch, |b| b.2);
        if o.patience > 0 && epoch - best_epoch >= o.patience && epoch < o.epochs {
            stopped_early = true;
            break;
        }
    }
    let (_, _, best_epoch, head) =
        best.ok_or_else(|| Error::invalid("train_head: no epoch ran"))?;
    Ok(HeadTrainResult {
        head,
        epochs,
        best_epoch,
        stopped_early,
        class_weights,
    })
}

/// The validation loss and metrics (threshold 0.5 on the positive-class
/// softmax probability) of `logits` `[n, 2]`.
fn validation_metrics(
    logits: &[f32],
    targets: &[usize],
    labels: &[bool],
    weights: Option<&[f32]>,
) -> Result<(f64, crate::stats::classification::BinaryMetrics)> {
    let val_loss = f64::from(cross_entropy(logits, CLASSES, targets, weights)?);
    let probs: Vec<f64> = logits
        .chunks_exact(CLASSES)
        .map(|l| {
            let m = l[0].max(l[1]);
            let (e0, e1) = (f64::from(l[0] - m).exp(), f64::from(l[1] - m).exp());
            e1 / (e0 + e1)
        })
        .collect();
    Ok((val_loss, binary_metrics(labels, &probs, 0.5)?))
}

/// Writes the per-epoch metrics CSV: `epoch,train_loss,val_loss,val_auc,
/// val_f1,val_accuracy,best,stage` (`best` is 1 on the epochs that
/// improved; an undefined F1 is empty; `stage` is 1 for `epochs`, 2 for
/// `stage2`, whose epochs continue the numbering).
pub fn write_metrics(path: &Path, epochs: &[EpochMetrics], stage2: &[EpochMetrics]) -> Result<()> {
    let mut w = CsvWriter::new();
    w.record([
        "epoch",
        "train_loss",
        "val_loss",
        "val_auc",
        "val_f1",
        "val_accuracy",
        "best",
        "stage",
    ]);
    let staged = epochs
        .iter()
        .map(|e| (1u8, e))
        .chain(stage2.iter().map(|e| (2u8, e)));
    for (stage, e) in staged {
        w.record([
            e.epoch.to_string(),
            format!("{:.6}", e.train_loss),
            format!("{:.6}", e.val_loss),
            format!("{:.6}", e.val_auc),
            e.val_f1.map_or_else(String::new, |v| format!("{v:.6}")),
            format!("{:.6}", e.val_accuracy),
            u8::from(e.best).to_string(),
            stage.to_string(),
        ]);
    }
    w.write(path)
}

/// Draws the training curves (losses, validation AUC, F1 and accuracy
/// against the epoch) as PNG.
pub fn plot_curves(path: &Path, epochs: &[EpochMetrics], title: &str) -> Result<()> {
    let x: Vec<f64> = epochs.iter().map(|e| e.epoch as f64).collect();
    let series = |label: &str, f: &dyn Fn(&EpochMetrics) -> f64| {
        let (x, y): (Vec<f64>, Vec<f64>) = x
            .iter()
            .zip(epochs)
            .map(|(&x, e)| (x, f(e)))
            .filter(|(_, y)| y.is_finite())
            .unzip();
        Series {
            label: label.to_string(),
            x,
            y,
        }
    };
    let all = [
        series("train loss", &|e| e.train_loss),
        series("val loss", &|e| e.val_loss),
        series("val AUC", &|e| e.val_auc),
        series("val F1", &|e| e.val_f1.unwrap_or(f64::NAN)),
        series("val accuracy", &|e| e.val_accuracy),
    ];
    let kept: Vec<Series> = all.into_iter().filter(|s| !s.x.is_empty()).collect();
    line_plot(
        path,
        &kept,
        &PlotOptions {
            title: title.to_string(),
            x_label: "epoch".to_string(),
            y_label: "loss / metric".to_string(),
            width: 640,
            height: 420,
        },
    )
}

/// Where the backbone comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    /// A torchvision DenseNet `state_dict` (safetensors), with or without a
    /// head.
    File(PathBuf),
    /// Seeded from scratch ([`random_backbone`]) with this architecture.
    Random(DenseNetArch),
}

/// What [`screen_train`] reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct ScreenTrainOptions {
    /// A directory of PNG/TIFF images, or a CSV with an `image` column
    /// ([`list_images`]; a labels file serves).
    pub images: PathBuf,
    /// Labels CSV (`image,label`, [`read_labels`]); ids as in `images`.
    pub labels: PathBuf,
    /// The trained network (safetensors).
    pub output: PathBuf,
    /// The backbone.
    pub init: Init,
    /// The head to train.
    pub head: HeadKind,
    /// Head training settings (`batch_size` also batches the feature pass).
    pub train: HeadTrainOptions,
    /// Fraction of each class's images held out for validation.
    pub val_fraction: f64,
    /// Normalize inputs with the ImageNet mean and std (for ImageNet
    /// backbones; `screen predict --imagenet-norm` must then be used too).
    pub imagenet_normalize: bool,
    /// Metrics CSV ([`write_metrics`]); default `<output stem>.metrics.csv`.
    pub metrics: Option<PathBuf>,
    /// Curves PNG ([`plot_curves`]); default `<output stem>.curves.png`.
    pub plot: Option<PathBuf>,
    /// Stage 2 after the head training (`None`: stage 1 only).
    pub fine_tune: Option<FineTuneOptions>,
}

/// Progress of [`screen_train`].
#[derive(Clone, Debug, PartialEq)]
pub enum TrainProgress {
    /// Features computed for `done` of `total` images.
    Features {
        /// Images finished.
        done: usize,
        /// Images to do.
        total: usize,
    },
    /// An epoch ended.
    Epoch(EpochMetrics),
    /// Stage 2 began; with `--unfreeze last`, after caching this many
    /// bytes of activations.
    Stage2 {
        /// Bytes of the activation cache (0 for `--unfreeze all`).
        cache_bytes: u64,
    },
    /// A stage-2 epoch ended (epochs continue stage 1's numbering).
    Stage2Epoch(EpochMetrics),
}

/// What [`screen_train`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct ScreenTrainSummary {
    /// The network written.
    pub model: DenseNetConfig,
    /// Whether the head started from the init file's (matching) head.
    pub head_from_init: bool,
    /// Images used (labelled and predicted).
    pub images: usize,
    /// Images of the list without a label (not used).
    pub unlabeled: usize,
    /// Labelled images the pre-processing excluded, and why.
    pub excluded: Vec<(String, SkipReason)>,
    /// Training and validation set sizes.
    pub train_images: usize,
    /// See `train_images`.
    pub val_images: usize,
    /// Seconds computing the features.
    pub feature_seconds: f64,
    /// Seconds training the head.
    pub train_seconds: f64,
    /// The head training's result.
    pub result: HeadTrainResult,
    /// The metrics CSV written.
    pub metrics: PathBuf,
    /// The curves PNG written.
    pub plot: PathBuf,
    /// Stage 2, when it ran.
    pub stage2: Option<FineTuneSummary>,
}

/// What stage 2 did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FineTuneSummary {
    /// What was unfrozen.
    pub unfreeze: Unfreeze,
    /// The learning rate used.
    pub lr: f64,
    /// Every stage-2 epoch (numbered after stage 1's).
    pub epochs: Vec<EpochMetrics>,
    /// The epoch whose weights were written (stage 1's best epoch when no
    /// stage-2 epoch beat it).
    pub best_epoch: usize,
    /// Whether the written weights are stage 2's.
    pub improved: bool,
    /// Whether early stopping ended stage 2.
    pub stopped_early: bool,
    /// Bytes of the cached activations (0 for `Unfreeze::All`).
    pub cache_bytes: u64,
    /// Seconds of stage 2 (caching included; not in the written record,
    /// which must not depend on timing).
    #[serde(skip)]
    pub seconds: f64,
}

/// `<dir>/<output stem><suffix>`.
fn beside(output: &Path, suffix: &str) -> PathBuf {
    let stem = output
        .file_stem()
        .map_or_else(|| "train".to_string(), |s| s.to_string_lossy().into_owned());
    output.with_file_name(format!("{stem}{suffix}"))
}

/// The backbone's `state_dict` and a name for it.
fn load_backbone(init: &Init, seed: u64) -> Result<(TensorFile, String)> {
    match init {
        Init::File(path) => Ok((TensorFile::open(path)?, path.display().to_string())),
        Init::Random(arch) => {
            let name = format!("seeded DenseNet (seed {seed})");
            let bytes = random_backbone(arch, seed)?.to_bytes()?;
            Ok((TensorFile::from_bytes(&name, bytes)?, name))
        }
    }
}

/// The backbone's tensors (every non-`classifier.` one, floating point as
/// f32, the BatchNorm counters as int64) with `head`'s.
pub(crate) fn assemble(backbone: &TensorFile, head: &Head) -> Result<TensorWriter> {
    let mut w = TensorWriter::new();
    for name in backbone.names() {
        if name.starts_with("classifier.") {
            continue;
        }
        if name.ends_with(".num_batches_tracked") {
            let (shape, v) = backbone.i64(&name)?;
            w.add_slice(&name, &shape, &v)?;
        } else {
            let (shape, v) = backbone.f32(&name)?;
            w.add_slice(&name, &shape, &v)?;
        }
    }
    head.write_values(&mut w)?;
    Ok(w)
}

/// The seed of a fresh head ([`Head::fresh`]) in a run seeded with `seed`.
pub fn head_seed(seed: u64) -> u64 {
    SplitMix64::new(seed).fork(STREAM_HEAD).next_u64()
}

/// Where [`labelled_features`] reads from.
#[derive(Clone, Copy, Debug)]
pub struct FeatureSource<'a> {
    /// A directory of PNG/TIFF images, or a CSV with an `image` column.
    pub images: &'a Path,
    /// Labels CSV (`image,label`); ids as in `images`.
    pub labels: &'a Path,
    /// The backbone.
    pub init: &'a Init,
    /// Seeds the backbone when `init` is [`Init::Random`].
    pub seed: u64,
    /// Images per batch of the feature pass.
    pub batch_size: usize,
    /// Normalize inputs with the ImageNet mean and std.
    pub imagenet_normalize: bool,
}

/// Every usable labelled image's pooled features, computed once
/// ([`labelled_features`]): the cache that stage 1 and each trial of a
/// hyper-parameter search train heads on.
pub struct LabelledFeatures {
    /// The backbone's `state_dict` (with the init file's head, if any).
    pub backbone: TensorFile,
    /// A name for the backbone (the init path, or the seeded architecture).
    pub origin: String,
    /// Features per image (`features.norm5` channels).
    pub dim: usize,
    /// `[images, dim]`, row-major, in label-file order.
    pub features: Vec<f32>,
    /// One label per row.
    pub labels: Vec<bool>,
    /// The image of each row.
    pub entries: Vec<ImageEntry>,
    /// Labelled images the pre-processing excluded, and why.
    pub excluded: Vec<(String, SkipReason)>,
    /// Images of the list without a label (not used).
    pub unlabeled: usize,
    /// The pre-processing the features were computed with.
    pub preprocess: Preprocess,
    /// Seconds of the feature pass.
    pub seconds: f64,
}

/// Reads the labels and the image list, loads the backbone and computes
/// the pooled features of every labelled image (the pre-processing of
/// `screen predict`, on the CPU); `progress(done, total)` follows the pass.
///
/// # Errors
/// Unreadable weights, image list or labels; a label for an image that is
/// not in the list; a labelled image that cannot be read.
pub fn labelled_features(
    src: &FeatureSource,
    progress: impl FnMut(usize, usize),
) -> Result<LabelledFeatures> {
    labelled_features_on(&Backend::cpu(), src, progress)
}

/// [`labelled_features`] with the inference network on `be`'s device
/// (the pre-processing stays on the host, as in `screen predict`).
pub fn labelled_features_on(
    be: &Backend,
    src: &FeatureSource,
    mut progress: impl FnMut(usize, usize),
) -> Result<LabelledFeatures> {
    let labels = read_labels(src.labels)?;
    let list = list_images(src.images)?;
    let mut by_id = std::collections::HashMap::new();
    for (k, e) in list.entries.iter().enumerate() {
        by_id.insert(e.id.as_str(), k);
    }
    let mut entries: Vec<ImageEntry> = Vec::with_capacity(labels.len());
    let mut wanted: Vec<bool> = Vec::with_capacity(labels.len());
    let mut labelled = vec![false; list.entries.len()];
    for (id, label) in &labels {
        let k = *by_id.get(id.as_str()).ok_or_else(|| {
            Error::format(
                src.labels,
                format!(
                    "image {id:?} is labelled but not among the images of {} (ids are file names for a directory, paths as written for a list)",
                    src.images.display()
                ),
            )
        })?;
        labelled[k] = true;
        entries.push(list.entries[k].clone());
        wanted.push(*label);
    }
    let unlabeled = labelled.iter().filter(|l| !**l).count();

    let (backbone, origin) = load_backbone(src.init, src.seed)?;
    let dim = match backbone.shape("features.norm5.weight") {
        Some(&[c]) if c > 0 => c,
        s => {
            return Err(Error::format(
                backbone.path(),
                format!(
                    "features.norm5.weight has shape {s:?}, expected [num_features]: not a torchvision DenseNet state_dict"
                ),
            ))
        }
    };
    // The pooled features do not depend on the head: any one loads the net.
    let probe = Head::fresh(HeadKind::Linear, dim, 0)?;
    let model_file = TensorFile::from_bytes(&origin, assemble(&backbone, &probe)?.to_bytes()?)?;
    let model = DenseNet::from_file(be, &model_file)?;
    drop(model_file);

    let pre = Preprocess {
        channels: model.config().in_channels,
        imagenet_normalize: src.imagenet_normalize,
        ..Preprocess::default()
    };
    let t0 = Instant::now();
    let total = entries.len();
    progress(0, total);
    let run = predict(
        be,
        &model,
        &entries,
        &PredictOptions {
            batch_size: src.batch_size,
            preprocess: pre,
            keep_features: true,
            ..PredictOptions::default()
        },
        |done| progress(done, total),
    )?;
    let seconds = t0.elapsed().as_secs_f64();
    let mut features = Vec::with_capacity(total * dim);
    let mut kept_labels = Vec::with_capacity(total);
    let mut kept_entries = Vec::with_capacity(total);
    let mut excluded = Vec::new();
    for ((p, entry), &label) in run.predictions.into_iter().zip(&entries).zip(&wanted) {
        match p.outcome {
            Ok(v) => {
                let f = v.features.ok_or_else(|| {
                    Error::invalid(format!("image {}: no features were kept", p.id))
                })?;
                features.extend_from_slice(&f);
                kept_labels.push(label);
                kept_entries.push(entry.clone());
            }
            Err(SkipReason::Unreadable(msg)) => {
                return Err(Error::format(
                    &entry.path,
                    format!("labelled image {:?} cannot be read: {msg}", p.id),
                ))
            }
            Err(reason) => excluded.push((p.id, reason)),
        }
    }
    Ok(LabelledFeatures {
        backbone,
        origin,
        dim,
        features,
        labels: kept_labels,
        entries: kept_entries,
        excluded,
        unlabeled,
        preprocess: pre,
        seconds,
    })
}

/// The training record stored in the output's metadata.
#[derive(Serialize)]
struct Record<'a> {
    stage: &'static str,
    init: &'a str,
    head: HeadKind,
    head_from_init: bool,
    images: String,
    labels: String,
    train_images: usize,
    val_images: usize,
    val_fraction: f64,
    imagenet_normalize: bool,
    options: &'a HeadTrainOptions,
    class_weights: Option<[f32; 2]>,
    epochs_run: usize,
    best_epoch: usize,
    best: Option<&'a EpochMetrics>,
    fine_tune: Option<&'a FineTuneOptions>,
    stage2: Option<&'a FineTuneSummary>,
}

/// `cellmorph screen train`, stage 1 (see the module docs). `progress`
/// sees the feature pass and every epoch.
///
/// # Errors
/// An output that is one of the inputs; unreadable weights, image list or
/// labels; a label for an image that is not in the list; a labelled image
/// that cannot be read; fewer than 2 usable images of a class; invalid
/// options; a write failure.
pub fn screen_train(
    o: &ScreenTrainOptions,
    progress: impl FnMut(TrainProgress),
) -> Result<ScreenTrainSummary> {
    screen_train_on(&Backend::cpu(), o, progress)
}

/// [`screen_train`] on `be`'s device: the feature pass (the inference
/// network), and stage 2's frozen-part pass, training steps and validation
/// ([`DenseNetTrainer::step_on`]). Stage 1's head trains on the host, on
/// the cached pooled features (`images × features` floats). `be` must be
/// f32 (training runs in f32).
pub fn screen_train_on(
    be: &Backend,
    o: &ScreenTrainOptions,
    mut progress: impl FnMut(TrainProgress),
) -> Result<ScreenTrainSummary> {
    if be.precision() != crate::precision::Precision::F32 {
        return Err(Error::invalid(format!(
            "screen train runs in f32 only, the backend is {}",
            be.precision()
        )));
    }
    check_head_options(&o.train)?;
    if let Some(ft) = &o.fine_tune {
        check_fine_tune(ft, o.train.lr)?;
    }
    if !(o.val_fraction > 0.0 && o.val_fraction < 1.0) {
        return Err(Error::invalid(format!(
            "--val-fraction {}: must lie strictly between 0 and 1 (the validation set picks the best epoch)",
            o.val_fraction
        )));
    }
    let metrics_path = o
        .metrics
        .clone()
        .unwrap_or_else(|| beside(&o.output, ".metrics.csv"));
    let plot_path = o
        .plot
        .clone()
        .unwrap_or_else(|| beside(&o.output, ".curves.png"));
    let mut inputs: Vec<(&str, &Path)> = vec![("--images", &o.images), ("--labels", &o.labels)];
    if let Init::File(p) = &o.init {
        inputs.push(("--init", p));
    }
    check_output_is_not_an_input("--output", &o.output, &inputs)?;
    inputs.push(("--output", &o.output));
    check_output_is_not_an_input("--metrics", &metrics_path, &inputs)?;
    inputs.push(("--metrics", &metrics_path));
    check_output_is_not_an_input("--plot", &plot_path, &inputs)?;
    let checkpoint_path = o.fine_tune.as_ref().map(|ft| {
        ft.checkpoint
            .clone()
            .unwrap_or_else(|| beside(&o.output, ".checkpoint.safetensors"))
    });
    if let Some(ck) = &checkpoint_path {
        inputs.push(("--plot", &plot_path));
        check_output_is_not_an_input("--checkpoint", ck, &inputs)?;
    }

    let LabelledFeatures {
        backbone,
        origin,
        dim,
        features,
        labels: kept_labels,
        entries: kept_entries,
        excluded,
        unlabeled,
        preprocess: pre,
        seconds: feature_seconds,
    } = labelled_features_on(
        be,
        &FeatureSource {
            images: &o.images,
            labels: &o.labels,
            init: &o.init,
            seed: o.train.seed,
            batch_size: o.train.batch_size,
            imagenet_normalize: o.imagenet_normalize,
        },
        |done, total| progress(TrainProgress::Features { done, total }),
    )?;
    let init_head = Head::from_file(&backbone, o.head, dim)?;
    let head_from_init = init_head.is_some();
    let head = match init_head {
        Some(h) => h,
        None => Head::fresh(o.head, dim, head_seed(o.train.seed))?,
    };
    let split = stratified_split(&kept_labels, o.val_fraction, o.train.seed).map_err(|e| {
        Error::format(
            &o.labels,
            format!(
                "{e} ({} usable labelled images, {} excluded by the pre-processing)",
                kept_labels.len(),
                excluded.len()
            ),
        )
    })?;
    let t1 = Instant::now();
    let data = FeatureSet {
        features: &features,
        dim,
        labels: &kept_labels,
    };
    let result = train_head(&data, &split, head, &o.train, |m| {
        progress(TrainProgress::Epoch(m.clone()))
    })?;
    let train_seconds = t1.elapsed().as_secs_f64();

    let mut out = assemble(&backbone, &result.head)?;
    let mut stage2 = None;
    if let Some(ft) = &o.fine_tune {
        let stage1 = TensorFile::from_bytes(&origin, out.to_bytes()?)?;
        let best = result
            .best()
            .ok_or_else(|| Error::invalid("stage 1 ran no epoch"))?;
        let data = Stage2Data {
            entries: &kept_entries,
            labels: &kept_labels,
            split: &split,
            class_weights: result.class_weights,
            preprocess: pre,
        };
        let t2 = Instant::now();
        let ck = checkpoint_path
            .as_deref()
            .ok_or_else(|| Error::invalid("stage 2 without a checkpoint path"))?;
        let (state, mut summary) = fine_tune(
            be,
            &stage1,
            &data,
            &o.train,
            ft,
            (best, result.epochs.len()),
            ck,
            &mut progress,
        )?;
        summary.seconds = t2.elapsed().as_secs_f64();
        if let Some(state) = state {
            out = TensorWriter::new();
            state.write_values(&mut out, "")?;
        }
        stage2 = Some(summary);
    }
    let record = Record {
        stage: match (&o.fine_tune, &stage2) {
            (None, _) => "1: backbone frozen, head trained on cached pooled features",
            (Some(_), Some(s)) if s.improved => "2: fine-tuned after stage 1 (the weights are stage 2's best epoch)",
            _ => "2: fine-tuned after stage 1 (no stage-2 epoch beat stage 1: the weights are stage 1's)",
        },
        init: &origin,
        head: o.head,
        head_from_init,
        images: o.images.display().to_string(),
        labels: o.labels.display().to_string(),
        train_images: split.train.len(),
        val_images: split.val.len(),
        val_fraction: o.val_fraction,
        imagenet_normalize: o.imagenet_normalize,
        options: &o.train,
        class_weights: result.class_weights,
        epochs_run: result.epochs.len(),
        best_epoch: result.best_epoch,
        best: result.best(),
        fine_tune: o.fine_tune.as_ref(),
        stage2: stage2.as_ref(),
    };
    let json = serde_json::to_string(&record)
        .map_err(|e| Error::invalid(format!("training record to JSON: {e}")))?;
    // One metadata key: the file's bytes must not depend on map order.
    out.set_metadata(TRAIN_METADATA_KEY, &json);
    let bytes = out.to_bytes()?;
    // What is written must load as the network `screen predict` runs.
    let written = DenseNet::from_file(
        &Backend::cpu(),
        &TensorFile::from_bytes(&o.output, bytes.clone())?,
    )?;
    write_atomic(&o.output, &bytes)?;
    let stage2_epochs = stage2.as_ref().map_or(&[][..], |s| &s.epochs[..]);
    write_metrics(&metrics_path, &result.epochs, stage2_epochs)?;
    let all_epochs: Vec<EpochMetrics> =
        result.epochs.iter().chain(stage2_epochs).cloned().collect();
    let title = match &stage2 {
        None => format!("screen train (best epoch {})", result.best_epoch),
        Some(s) => format!(
            "screen train (stage 2 from epoch {}, best epoch {})",
            result.epochs.len() + 1,
            s.best_epoch
        ),
    };
    plot_curves(&plot_path, &all_epochs, &title)?;
    Ok(ScreenTrainSummary {
        model: written.config().clone(),
        head_from_init,
        images: kept_labels.len(),
        unlabeled,
        excluded,
        train_images: split.train.len(),
        val_images: split.val.len(),
        feature_seconds,
        train_seconds,
        result,
        metrics: metrics_path,
        plot: plot_path,
        stage2,
    })
}

fn check_fine_tune(ft: &FineTuneOptions, stage1_lr: f64) -> Result<()> {
    if ft.epochs == 0 {
        return Err(Error::invalid("--unfreeze-epochs must be at least 1"));
    }
    let lr = ft.lr.unwrap_or(stage1_lr / 10.0);
    if !(lr > 0.0 && lr.is_finite()) {
        return Err(Error::invalid(format!(
            "--unfreeze-lr {lr}: must be a positive number"
        )));
    }
    Ok(())
}

/// The images stage 2 trains on (rows as in stage 1's split).
struct Stage2Data<'a> {
    entries: &'a [ImageEntry],
    labels: &'a [bool],
    split: &'a Split,
    class_weights: Option<[f32; 2]>,
    preprocess: Preprocess,
}

/// Reads and pre-processes the images of `rows` (in that order), `bs` at a
/// time, handing each batch (its rows, `[n, c, h, w]` values, shape) to `f`.
fn image_batches(
    data: &Stage2Data,
    rows: &[usize],
    bs: usize,
    mut f: impl FnMut(&[usize], Vec<f32>, [usize; 4]) -> Result<()>,
) -> Result<()> {
    let p = data.preprocess;
    let list: Vec<ImageEntry> = rows.iter().map(|&r| data.entries[r].clone()).collect();
    prefetch(&list, bs, &p, |rx| {
        for chunk in rx {
            let mut x = Vec::with_capacity(chunk.len() * p.channels * p.height * p.width);
            let mut idx = Vec::with_capacity(chunk.len());
            for (i, prepared) in chunk {
                match prepared? {
                    Prepared::Image { data: d, .. } => x.extend_from_slice(&d),
                    Prepared::Skipped(r) => {
                        return Err(Error::format(
                            &list[i].path,
                            format!("image {:?} was usable in stage 1 but now: {r}", list[i].id),
                        ))
                    }
                }
                idx.push(rows[i]);
            }
            f(&idx, x, [idx.len(), p.channels, p.height, p.width])?;
        }
        Ok(())
    })
}

/// Flips image `[c, h, w]` in place: left–right when bit 0 of `key` is set,
/// top–bottom when bit 1 is (both: a 180° rotation).
fn flip(img: &mut [f32], c: usize, h: usize, w: usize, key: u64) {
    for plane in img.chunks_exact_mut(h * w).take(c) {
        if key & 1 == 1 {
            for row in plane.chunks_exact_mut(w) {
                row.reverse();
            }
        }
        if key & 2 == 2 {
            for y in 0..h / 2 {
                let (top, bottom) = plane.split_at_mut((h - 1 - y) * w);
                top[y * w..(y + 1) * w].swap_with_slice(&mut bottom[..w]);
            }
        }
    }
}

/// Stage 2's progress in its checkpoint.
#[derive(Serialize, Deserialize)]
struct Stage2Progress {
    train: HeadTrainOptions,
    fine_tune: FineTuneOptions,
    rows: usize,
    step: u64,
    epochs: Vec<EpochMetrics>,
    best_auc: f64,
    best_loss: f64,
    /// 0: stage 1 is still the best.
    best_k: usize,
    stopped_early: bool,
    counters: std::collections::BTreeMap<String, i64>,
    best_counters: std::collections::BTreeMap<String, i64>,
}

/// Stage 2 (see the module docs) from the stage-1 network `stage1`;
/// `baseline` is stage 1's best epoch and its epoch count. Returns the
/// state of stage 2's best epoch (`None` when none beat stage 1).
#[allow(clippy::too_many_arguments)]
fn fine_tune(
    be: &Backend,
    stage1: &TensorFile,
    data: &Stage2Data,
    o: &HeadTrainOptions,
    ft: &FineTuneOptions,
    baseline: (&EpochMetrics, usize),
    checkpoint_path: &Path,
    progress: &mut impl FnMut(TrainProgress),
) -> Result<(Option<DenseNetState>, FineTuneSummary)> {
    let lr = ft.lr.unwrap_or(o.lr / 10.0);
    let mut state = DenseNetState::from_file(stage1, "")?;
    let nb = state.config.block_config.len();
    let first = match ft.unfreeze {
        Unfreeze::Last => nb - 1,
        Unfreeze::All => 0,
    };
    let last_block = format!("features.denseblock{nb}.");
    for id in 0..state.params.params().len() {
        let p = state.params.get_mut(id);
        let buffer = p.name.ends_with(".running_mean") || p.name.ends_with(".running_var");
        p.trainable = !buffer
            && (first == 0
                || p.name.starts_with(&last_block)
                || p.name.starts_with("features.norm5.")
                || p.name.starts_with("classifier."));
    }
    let adam = AdamConfig {
        weight_decay: o.weight_decay,
        ..AdamConfig::default()
    };
    let mut trainer = DenseNetTrainer::with_method(state, Method::AdamW(adam))?;
    let bs = o.batch_size;
    let n = data.labels.len();
    let p = data.preprocess;

    // `last`: the frozen part's eval-mode output for every image, once.
    let mut cache: Option<(Vec<f32>, [usize; 3])> = None;
    if ft.unfreeze == Unfreeze::Last {
        let [_, c, h, w] = trainer.block_input_shape(1, p.height, p.width, first)?;
        let per = c * h * w;
        let bytes = (n as u64) * (per as u64) * 4;
        if bytes > ft.max_cache_bytes {
            return Err(Error::invalid(format!(
                "--unfreeze last caches the input of the last dense block for every image: {n} images × {c} × {h} × {w} × 4 bytes = {:.2} GiB, above --max-cache-gib {:.2}; raise the bound, or use --unfreeze all, which reads the images batch by batch and caches nothing",
                bytes as f64 / f64::from(1u32 << 30),
                ft.max_cache_bytes as f64 / f64::from(1u32 << 30)
            )));
        }
        let mut values = vec![0.0f32; n * per];
        let all: Vec<usize> = (0..n).collect();
        image_batches(data, &all, bs, |rows, x, shape| {
            let (act, _) = trainer.eval_forward_on(be, &x, shape, 0, first)?;
            for (k, &r) in rows.iter().enumerate() {
                values[r * per..(r + 1) * per].copy_from_slice(&act[k * per..(k + 1) * per]);
            }
            Ok(())
        })?;
        cache = Some((values, [c, h, w]));
        progress(TrainProgress::Stage2 { cache_bytes: bytes });
    } else {
        progress(TrainProgress::Stage2 { cache_bytes: 0 });
    }
    let gather = |values: &[f32], per: usize, rows: &[usize]| -> Vec<f32> {
        let mut x = Vec::with_capacity(rows.len() * per);
        for &r in rows {
            x.extend_from_slice(&values[r * per..(r + 1) * per]);
        }
        x
    };

    let weights_arr = data.class_weights;
    let weights = weights_arr.as_ref().map(|w| &w[..]);
    let root = SplitMix64::new(o.seed);
    let dropout_seed = root.fork(STREAM_FT_DROPOUT).next_u64();
    let flip_seed = root.fork(STREAM_FT_FLIPS).next_u64();
    let val_labels: Vec<bool> = data.split.val.iter().map(|&r| data.labels[r]).collect();
    let val_t: Vec<usize> = val_labels.iter().map(|&l| usize::from(l)).collect();
    let (stage1_best, stage1_epochs) = baseline;
    let mut best: (f64, f64, usize, Option<DenseNetState>) =
        (stage1_best.val_auc, stage1_best.val_loss, 0, None);
    let mut order = data.split.train.clone();
    let mut epochs = Vec::new();
    let mut step = 0u64;
    let mut stopped_early = false;
    let mut done = 0;
    // The best state rides in the checkpoint under `best.` (the current
    // state while stage 1 is still the best), with an empty optimizer.
    let no_opt = Optimizer::new(Method::AdamW(adam))?;
    if let Some(ck) = &ft.resume {
        let mut best_params = trainer.state().params.clone();
        let (state, opt) = trainer.parts_mut();
        let saved = checkpoint::load_parts(
            ck,
            &mut [
                ("", &mut state.params, opt),
                ("best.", &mut best_params, &mut no_opt.clone()),
            ],
        )?;
        let saved: Stage2Progress = serde_json::from_value(saved)
            .map_err(|e| Error::format(ck, format!("checkpoint progress: {e}")))?;
        let same = FineTuneOptions {
            epochs: ft.epochs,
            checkpoint: ft.checkpoint.clone(),
            resume: ft.resume.clone(),
            ..saved.fine_tune.clone()
        };
        if saved.train != *o || same != *ft || saved.rows != n {
            return Err(Error::format(
                ck,
                format!(
                    "the checkpoint was made with other options or images ({:?}, {:?}, {} images); only --unfreeze-epochs may change on resume",
                    saved.train, saved.fine_tune, saved.rows
                ),
            ));
        }
        checkpoint::check_steps(ck, opt, saved.step)?;
        checkpoint::check_counters(ck, &saved.counters, &state.num_batches_tracked)?;
        checkpoint::check_counters(ck, &saved.best_counters, &state.num_batches_tracked)?;
        state.num_batches_tracked = saved.counters;
        if saved.best_k > 0 {
            let mut b = state.clone();
            b.params = best_params;
            b.num_batches_tracked = saved.best_counters;
            best = (saved.best_auc, saved.best_loss, saved.best_k, Some(b));
        }
        done = saved.epochs.len();
        step = saved.step;
        stopped_early = saved.stopped_early;
        epochs = saved.epochs;
    }
    for k in (done + 1)..=ft.epochs {
        if stopped_early {
            break;
        }
        let epoch = stage1_epochs + k;
        // Each epoch's order depends on its number only (a resumed run
        // shuffles as the unbroken one).
        order.copy_from_slice(&data.split.train);
        shuffle(&mut order, &mut root.fork(STREAM_FT_SHUFFLE).fork(k as u64));
        let mut loss_sum = 0.0f64;
        let mut run = |rows: &[usize], x: &[f32], shape: [usize; 4]| -> Result<()> {
            let t: Vec<usize> = rows.iter().map(|&r| usize::from(data.labels[r])).collect();
            let settings = StepSettings {
                first_block: first,
                class_weights: weights,
                dropout: Some((dropout_seed, step, o.dropout)),
            };
            let batch = Batch {
                input: x,
                shape,
                labels: &t,
            };
            let out = trainer.step_on(be, &batch, &settings, lr)?;
            if !out.loss.is_finite() {
                return Err(Error::invalid(format!(
                    "stage 2 diverged at epoch {epoch}: the loss is {} (try a lower --unfreeze-lr)",
                    out.loss
                )));
            }
            loss_sum += f64::from(out.loss) * rows.len() as f64;
            step += 1;
            Ok(())
        };
        match &cache {
            Some((values, [c, h, w])) => {
                for rows in order.chunks(bs) {
                    let x = gather(values, c * h * w, rows);
                    run(rows, &x, [rows.len(), *c, *h, *w])?;
                }
            }
            None => image_batches(data, &order, bs, |rows, mut x, shape| {
                let per = p.channels * p.height * p.width;
                for (img, &r) in x.chunks_exact_mut(per).zip(rows) {
                    let key = crate::rng::counter_u64(flip_seed, k as u64, r as u64);
                    flip(img, p.channels, p.height, p.width, key);
                }
                run(rows, &x, shape)
            })?,
        }
        let mut logits = Vec::with_capacity(data.split.val.len() * CLASSES);
        match &cache {
            Some((values, [c, h, w])) => {
                for rows in data.split.val.chunks(bs) {
                    let x = gather(values, c * h * w, rows);
                    let (l, _) =
                        trainer.eval_forward_on(be, &x, [rows.len(), *c, *h, *w], first, nb)?;
                    logits.extend_from_slice(&l);
                }
            }
            None => image_batches(data, &data.split.val, bs, |_, x, shape| {
                let (l, _) = trainer.eval_forward_on(be, &x, shape, 0, nb)?;
                logits.extend_from_slice(&l);
                Ok(())
            })?,
        }
        let (val_loss, m) = validation_metrics(&logits, &val_t, &val_labels, weights)?;
        let auc = m.auc.unwrap_or(f64::NAN);
        let improved = auc > best.0 || (auc == best.0 && val_loss < best.1);
        if improved {
            best = (auc, val_loss, k, Some(trainer.state().clone()));
        }
        let metrics = EpochMetrics {
            epoch,
            train_loss: loss_sum / order.len() as f64,
            val_loss,
            val_auc: auc,
            val_f1: m.f1,
            val_accuracy: m.accuracy.unwrap_or(f64::NAN),
            best: improved,
        };
        progress(TrainProgress::Stage2Epoch(metrics.clone()));
        epochs.push(metrics);
        if o.patience > 0 && k - best.2 >= o.patience && k < ft.epochs {
            stopped_early = true;
        }
        let best_state = best.3.as_ref().unwrap_or(trainer.state());
        let saved = Stage2Progress {
            train: o.clone(),
            fine_tune: ft.clone(),
            rows: n,
            step,
            epochs: epochs.clone(),
            best_auc: best.0,
            best_loss: best.1,
            best_k: best.2,
            stopped_early,
            counters: trainer.state().num_batches_tracked.clone(),
            best_counters: best_state.num_batches_tracked.clone(),
        };
        let value = serde_json::to_value(&saved)
            .map_err(|e| Error::invalid(format!("checkpoint progress: {e}")))?;
        checkpoint::save_parts(
            checkpoint_path,
            &[
                ("", &trainer.state().params, trainer.optimizer()),
                ("best.", &best_state.params, &no_opt),
            ],
            &value,
        )?;
    }
    let (_, _, best_k, state) = best;
    let summary = FineTuneSummary {
        unfreeze: ft.unfreeze,
        lr,
        epochs,
        best_epoch: if best_k == 0 {
            stage1_best.epoch
        } else {
            stage1_epochs + best_k
        },
        improved: state.is_some(),
        stopped_early,
        cache_bytes: cache.as_ref().map_or(0, |(v, _)| v.len() as u64 * 4),
        seconds: 0.0,
    };
    Ok((state, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head's backward against central differences of its loss, with
    /// a dropout mask (fixed by seed and step) and class weights. Tolerance:
    /// the loss is f32, so a difference quotient over ±1e-2 carries an error
    /// near 1e-5/1e-2 = 1e-3 plus the curvature term; 2e-3 absolute and 2 %
    /// relative cover both.
    #[test]
    fn head_gradients_match_finite_differences() {
        let (n, dim) = (6, 5);
        let x = crate::rng::signed_unit_vec(3, n * dim);
        let t = [0usize, 1, 1, 0, 1, 0];
        let weights = [0.7f32, 1.3];
        for kind in [HeadKind::Kim { hidden: 4 }, HeadKind::Linear] {
            let mut head = Head::fresh(kind, dim, 11).unwrap();
            let drop = Some((5u64, 2u64, 0.25f32));
            let loss = |h: &Head| {
                let l = h.forward(&x, n, drop).unwrap().logits;
                f64::from(cross_entropy(&l, CLASSES, &t, Some(&weights)).unwrap())
            };
            let pass = head.forward(&x, n, drop).unwrap();
            let dl =
                cross_entropy_backward(&pass.logits, CLASSES, &t, Some(&weights), 1.0).unwrap();
            head.backward(&x, n, &pass, &dl).unwrap();
            let analytic = head.store.clone();
            for id in 0..analytic.params().len() {
                for k in 0..analytic.get(id).value.len() {
                    let v = analytic.get(id).value[k];
                    let eps = 1e-2f32;
                    head.store.get_mut(id).value[k] = v + eps;
                    let up = loss(&head);
                    head.store.get_mut(id).value[k] = v - eps;
                    let down = loss(&head);
                    head.store.get_mut(id).value[k] = v;
                    let fd = (up - down) / (2.0 * f64::from(eps));
                    let g = f64::from(analytic.get(id).grad[k]);
                    assert!(
                        (fd - g).abs() <= 2e-3 + 0.02 * g.abs(),
                        "{kind:?} {}[{k}]: finite difference {fd}, backward {g}",
                        analytic.get(id).name
                    );
                }
            }
        }
    }
}
