//! Making VQ-VAE-2 weights from images: `vqvae2 init` (seeded weights with
//! codebooks seeded by k-means++ on encoder outputs) and `vqvae2 train`
//! (the vq-vae-2-pytorch recipe: random patches with flips and 90°
//! rotations, MSE + 0.25 × commitment, straight-through, EMA codebooks,
//! Adam), plus a dead-code restart, per-epoch metrics, curves, a
//! reconstruction sheet and resumable checkpoints.
//!
//! Every random choice is a stateless draw of [`counter_u64`] keyed by the
//! seed, the step and the element, so the batch of step `t` is the same
//! whether the run was interrupted or not, and a resumed run continues with
//! exactly the bits of an unbroken one. The step and the evaluation
//! passes run on the chosen [`Backend`] ([`crate::train::vqvae2`]); the
//! checkpoint does not record the device, so a run may resume on another
//! (bit for bit only on the same one).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::apps::cp2image::sheets::{Sheet, Tile};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::imaging::{read_dimensions, read_gray, scale_pixel, GrayImage, SampleImage};
use crate::io::{TensorFile, TensorWriter};
use crate::models::vqvae2::VqVae2Config;
use crate::plot::{line_plot, PlotOptions, Series};
use crate::rng::{counter_u64, fnv1a64};
use crate::tensor::Tensor;
use crate::train::checkpoint;
use crate::train::store::ParamStore;
use crate::train::vqvae2::{self as step_fns, Restart, StepConfig, StepOutput};
use crate::train::{AdamConfig, Method, Optimizer};

use super::init::{random_vqvae2, seeded_codebooks};

/// Stream keys of the draws (so no two uses share a draw).
const KEY_SPLIT: u64 = 0x5e11_7000;
const KEY_TRAIN: u64 = 0x7a1e_0000;
const KEY_EVAL_TRAIN: u64 = 0xe7a1_0001;
const KEY_EVAL_VAL: u64 = 0xe7a1_0002;
const KEY_INIT: u64 = 0x1417_0003;
const KEY_RESTART: u64 = 0xdead_c0de;

/// Decoded images kept in memory at most (bytes of `u16` pixels); beyond
/// it the cache is emptied and images are decoded again when drawn.
const IMAGE_CACHE_BYTES: usize = 1 << 30;

/// 8-bit units: pixels scaled to [−1, 1] span 255 levels over 2.
const TO_8BIT: f64 = 127.5 * 127.5;

/// The usable images of a list: those that decode their header and hold at
/// least one patch; the others are reported as `(path, reason)`.
pub struct ImagePool {
    paths: Vec<PathBuf>,
    sizes: Vec<(usize, usize)>,
    cache: HashMap<usize, GrayImage>,
    cached_bytes: usize,
}

impl ImagePool {
    /// Reads every image's size (not its pixels) and keeps those with room
    /// for a `patch × patch` patch.
    pub fn new(list: &[SampleImage], patch: usize) -> Result<(ImagePool, Vec<(PathBuf, String)>)> {
        if patch == 0 {
            return Err(Error::invalid("--patch must be at least 1"));
        }
        let mut seen = std::collections::HashSet::new();
        let (mut paths, mut sizes, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
        for item in list {
            if !seen.insert(item.path.clone()) {
                continue;
            }
            match read_dimensions(&item.path) {
                Ok((w, h)) if w >= patch && h >= patch => {
                    paths.push(item.path.clone());
                    sizes.push((w, h));
                }
                Ok((w, h)) => skipped.push((
                    item.path.clone(),
                    format!("{w}×{h} is smaller than one {patch}×{patch} patch"),
                )),
                Err(e) => skipped.push((item.path.clone(), e.to_string())),
            }
        }
        let pool = ImagePool {
            paths,
            sizes,
            cache: HashMap::new(),
            cached_bytes: 0,
        };
        Ok((pool, skipped))
    }

    /// Number of usable images.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Whether no image is usable.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// The usable images' paths.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    fn image(&mut self, i: usize) -> Result<&GrayImage> {
        if !self.cache.contains_key(&i) {
            let img = read_gray(&self.paths[i])?;
            if (img.width(), img.height()) != self.sizes[i] {
                return Err(Error::format(
                    &self.paths[i],
                    "the image changed size while training",
                ));
            }
            let bytes = img.data().len() * 2;
            if self.cached_bytes + bytes > IMAGE_CACHE_BYTES {
                self.cache.clear();
                self.cached_bytes = 0;
            }
            self.cached_bytes += bytes;
            self.cache.insert(i, img);
        }
        self.cache
            .get(&i)
            .ok_or_else(|| Error::invalid("image cache lost an entry"))
    }

    /// Patch `j` of draw stream (`seed`, `step`) from the images `among`
    /// (indices into the pool): a uniformly drawn image, a uniform offset
    /// and, with `augment`, one of the 8 flips/rotations; appended to `out`
    /// as `patch²` values in [−1, 1].
    fn draw(
        &mut self,
        among: &[usize],
        patch: usize,
        (seed, step, j): (u64, u64, u64),
        augment: bool,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let below = |r: u64, n: usize| ((u128::from(r) * n as u128) >> 64) as usize;
        let r = |k: u64| counter_u64(seed, step, 4 * j + k);
        let i = *among
            .get(below(r(0), among.len()))
            .ok_or_else(|| Error::invalid("no image to draw patches from"))?;
        let (w, h) = self.sizes[i];
        let x0 = below(r(1), w - patch + 1);
        let y0 = below(r(2), h - patch + 1);
        let t = if augment { below(r(3), 8) } else { 0 };
        let img = self.image(i)?;
        let (data, depth) = (img.data(), img.depth());
        for y in 0..patch {
            for x in 0..patch {
                // The dihedral transform t: bit 0 mirrors x, bit 1 mirrors
                // y, bit 2 swaps the axes (with the mirrors, the 8 flips
                // and 90° rotations of a square).
                let (mut u, mut v) = (x, y);
                if t & 4 != 0 {
                    (u, v) = (v, u);
                }
                if t & 1 != 0 {
                    u = patch - 1 - u;
                }
                if t & 2 != 0 {
                    v = patch - 1 - v;
                }
                out.push(scale_pixel(data[(y0 + v) * w + x0 + u], depth));
            }
        }
        Ok(())
    }
}

/// `vqvae2 init`'s options.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// The architecture.
    pub config: VqVae2Config,
    /// Patch side.
    pub patch: usize,
    /// Patches whose encoder outputs seed the codebooks.
    pub seed_patches: usize,
    /// Seed of the weights and the draws.
    pub seed: u64,
}

/// Seeded weights for `opts.config` (PyTorch's default initialisation) with
/// both codebooks seeded by k-means++ on encoder outputs of random patches
/// of `pool`, written to `out` with metadata saying how they were made.
pub fn init_weights(pool: &mut ImagePool, opts: &InitOptions, out: &Path) -> Result<()> {
    if opts.config.in_channel != 1 {
        return Err(Error::invalid(format!(
            "images are single-channel; in_channel {} is not supported",
            opts.config.in_channel
        )));
    }
    if opts.seed_patches == 0 {
        return Err(Error::invalid("--seed-patches must be at least 1"));
    }
    if pool.is_empty() {
        return Err(Error::invalid("no usable image to seed the codebooks from"));
    }
    let all: Vec<usize> = (0..pool.len()).collect();
    let p = opts.patch;
    let mut data = Vec::with_capacity(opts.seed_patches * p * p);
    for j in 0..opts.seed_patches as u64 {
        pool.draw(&all, p, (opts.seed ^ KEY_INIT, 0, j), false, &mut data)?;
    }
    let be = Backend::cpu();
    let x = Tensor::from_vec(&be, &[opts.seed_patches, 1, p, p], data)?;
    let random = random_vqvae2(&opts.config, opts.seed)?;
    let random = TensorFile::from_bytes(out, random.to_bytes()?)?;
    let mut w = seeded_codebooks(&be, &random, &x, opts.seed)?;
    w.set_metadata(
        "cellmorph",
        &format!(
            "untrained VQ-VAE-2 ({}): seeded random weights (seed {}), codebooks seeded by \
             k-means++ on encoder outputs of {} random {p}×{p} patches of {} images",
            opts.config,
            opts.seed,
            opts.seed_patches,
            pool.len()
        ),
    );
    w.write(out)
}

/// `vqvae2 train`'s options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Patch side (160).
    pub patch: usize,
    /// Patches per step (32).
    pub batch: usize,
    /// Total optimizer steps.
    pub steps: u64,
    /// Steps per epoch (metrics, plots and by default checkpoints after each).
    pub steps_per_epoch: u64,
    /// Adam's learning rate (3e-4).
    pub lr: f64,
    /// Seed of every draw.
    pub seed: u64,
    /// Fraction of the images held out for validation.
    pub val_fraction: f64,
    /// Steps between checkpoints (0: after every epoch).
    pub checkpoint_every: u64,
    /// Codes whose EMA count falls below this are restarted (0: never).
    pub dead_threshold: f32,
    /// Patches per split for the per-epoch metrics.
    pub eval_patches: usize,
    /// Commitment weight (0.25).
    pub latent_loss_weight: f32,
    /// EMA decay (0.99).
    pub decay: f32,
}

impl TrainOptions {
    /// The recipe's defaults (vq-vae-2-pytorch), for `steps` steps.
    pub fn new(steps: u64) -> TrainOptions {
        TrainOptions {
            patch: 160,
            batch: 32,
            steps,
            steps_per_epoch: 100,
            lr: 3e-4,
            seed: 0,
            val_fraction: 0.1,
            checkpoint_every: 0,
            dead_threshold: 1.0,
            eval_patches: 64,
            latent_loss_weight: 0.25,
            decay: 0.99,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |flag: &str, why: &str| Err(Error::invalid(format!("{flag} {why}")));
        if self.patch < 8 || !self.patch.is_multiple_of(8) {
            return bad(
                "--patch",
                "must be a multiple of 8 (the top level is 1/8 of the patch)",
            );
        }
        if self.batch == 0 {
            return bad("--batch-size", "must be at least 1");
        }
        if self.steps == 0 || self.steps_per_epoch == 0 {
            return bad("--steps/--steps-per-epoch", "must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("--lr", "must be finite and positive");
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return bad("--val-fraction", "must lie in [0, 1)");
        }
        if !(self.dead_threshold.is_finite() && self.dead_threshold >= 0.0) {
            return bad("--dead-threshold", "must be finite and ≥ 0");
        }
        if self.eval_patches == 0 {
            return bad("--eval-patches", "must be at least 1");
        }
        if !(0.0..1.0).contains(&self.decay) {
            return bad("--decay", "must lie in [0, 1)");
        }
        if !(self.latent_loss_weight.is_finite() && self.latent_loss_weight >= 0.0) {
            return bad("--latent-loss-weight", "must be finite and ≥ 0");
        }
        Ok(())
    }

    fn checkpoint_every(&self) -> u64 {
        if self.checkpoint_every == 0 {
            self.steps_per_epoch
        } else {
            self.checkpoint_every
        }
    }
}

/// Where `vqvae2 train` writes.
#[derive(Clone, Debug)]
pub struct TrainPaths {
    /// The trained weights (a `state_dict`).
    pub output: PathBuf,
    /// Per-epoch metrics CSV.
    pub metrics: PathBuf,
    /// Loss curves PNG.
    pub curves: PathBuf,
    /// Originals beside reconstructions PNG.
    pub sheet: PathBuf,
    /// The resumable checkpoint.
    pub checkpoint: PathBuf,
}

impl TrainPaths {
    /// Everything beside `output`: `<stem>.metrics.csv`, `<stem>.curves.png`,
    /// `<stem>.reconstructions.png`, `<stem>.checkpoint.safetensors`.
    pub fn beside(output: &Path) -> TrainPaths {
        let stem = output
            .file_stem()
            .map_or_else(|| "vqvae2".into(), |s| s.to_string_lossy().into_owned());
        let dir = output.parent().unwrap_or(Path::new(""));
        TrainPaths {
            output: output.to_path_buf(),
            metrics: dir.join(format!("{stem}.metrics.csv")),
            curves: dir.join(format!("{stem}.curves.png")),
            sheet: dir.join(format!("{stem}.reconstructions.png")),
            checkpoint: dir.join(format!("{stem}.checkpoint.safetensors")),
        }
    }

    /// Every path, with the flag or role that names it.
    pub fn all(&self) -> [(&'static str, &Path); 5] {
        [
            ("--output", &self.output),
            ("metrics CSV", &self.metrics),
            ("curves PNG", &self.curves),
            ("reconstruction sheet", &self.sheet),
            ("checkpoint", &self.checkpoint),
        ]
    }
}

/// Metrics of one split at the end of an epoch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitMetrics {
    /// Reconstruction MSE in 8-bit units (pixels 0…255).
    pub mse_8bit: f64,
    /// `diff_t + diff_b`.
    pub latent_loss: f64,
    /// Perplexity of the top codes' usage, `exp(−Σ p log p)`.
    pub perplexity_t: f64,
    /// Perplexity of the bottom codes' usage.
    pub perplexity_b: f64,
    /// Top codes used at least once.
    pub live_t: usize,
    /// Bottom codes used at least once.
    pub live_b: usize,
}

/// One row of the metrics CSV.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochRow {
    /// 1-based epoch.
    pub epoch: u64,
    /// Optimizer steps taken so far.
    pub step: u64,
    /// Mean training loss (`recon + w·latent`) over the epoch's steps.
    pub train_loss: f64,
    /// Codes restarted during the epoch, top and bottom.
    pub restarted: [usize; 2],
    /// On fixed training patches (no augmentation).
    pub train: SplitMetrics,
    /// On fixed validation patches (`None` without a validation split).
    pub val: Option<SplitMetrics>,
}

/// What a checkpoint's progress holds besides the tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Progress {
    step: u64,
    /// The weights the run started from.
    init: String,
    options: TrainOptions,
    images: u64,
    rows: Vec<EpochRow>,
    epoch_loss_sum: f64,
    epoch_steps: u64,
    epoch_restarted: [usize; 2],
}

/// The result of a training run.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// Every epoch's metrics.
    pub rows: Vec<EpochRow>,
    /// The step the run started from (0, or the checkpoint's).
    pub resumed_from: u64,
    /// Training and validation images.
    pub images: (usize, usize),
    /// Steps per second of this invocation.
    pub steps_per_s: f64,
}

/// The seeded split of the pool's images: (training, validation) indices.
fn split(pool: &ImagePool, opts: &TrainOptions) -> Result<(Vec<usize>, Vec<usize>)> {
    let n = pool.len();
    let mut order: Vec<usize> = (0..n).collect();
    // Fisher–Yates with counter draws.
    for i in (1..n).rev() {
        let r = counter_u64(opts.seed ^ KEY_SPLIT, 0, i as u64);
        let j = ((u128::from(r) * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
    let n_val = if opts.val_fraction > 0.0 {
        ((n as f64 * opts.val_fraction).round() as usize).max(1)
    } else {
        0
    };
    if n_val >= n {
        return Err(Error::invalid(format!(
            "--val-fraction {} leaves no training image out of {n}; use 0 to train on every image",
            opts.val_fraction
        )));
    }
    let val = order[..n_val].to_vec();
    let mut train = order[n_val..].to_vec();
    train.sort_unstable();
    Ok((train, val))
}

/// Identity of the image list, stored in checkpoints so a resume on other
/// images is refused.
fn images_hash(pool: &ImagePool) -> u64 {
    let joined: Vec<String> = pool
        .paths()
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    fnv1a64(&joined.join("\n"))
}

/// Perplexity and number of used codes of `ids` over `k` codes.
fn usage(ids: &[i32], k: usize) -> (f64, usize) {
    let mut counts = vec![0u64; k];
    for &i in ids {
        if let Some(c) = usize::try_from(i).ok().and_then(|i| counts.get_mut(i)) {
            *c += 1;
        }
    }
    let n = ids.len().max(1) as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum();
    (entropy.exp(), counts.iter().filter(|&&c| c > 0).count())
}

/// The fixed evaluation patches of one split.
struct EvalSet {
    x: Vec<f32>,
    n: usize,
}

fn eval_set(
    pool: &mut ImagePool,
    among: &[usize],
    opts: &TrainOptions,
    key: u64,
) -> Result<Option<EvalSet>> {
    if among.is_empty() {
        return Ok(None);
    }
    let p = opts.patch;
    let mut x = Vec::with_capacity(opts.eval_patches * p * p);
    for j in 0..opts.eval_patches as u64 {
        pool.draw(among, p, (opts.seed ^ key, 0, j), false, &mut x)?;
    }
    Ok(Some(EvalSet {
        x,
        n: opts.eval_patches,
    }))
}

/// Metrics of the current weights on `set`, evaluated in batches; also
/// returns the reconstructions of its first `keep` patches.
fn evaluate(
    be: &Backend,
    store: &ParamStore,
    cfg: &VqVae2Config,
    set: &EvalSet,
    opts: &TrainOptions,
    step: &StepConfig,
    keep: usize,
) -> Result<(SplitMetrics, Vec<f32>)> {
    let p2 = opts.patch * opts.patch;
    let (mut recon, mut latent) = (0.0f64, 0.0f64);
    let (mut ids_t, mut ids_b, mut kept) = (Vec::new(), Vec::new(), Vec::new());
    let mut start = 0;
    while start < set.n {
        let n = opts.batch.min(set.n - start);
        let x = &set.x[start * p2..(start + n) * p2];
        let out: StepOutput =
            step_fns::evaluate_on(be, store, cfg, &[n, 1, opts.patch, opts.patch], x, step)?;
        recon += f64::from(out.recon_loss) * n as f64;
        latent += f64::from(out.latent_loss) * n as f64;
        ids_t.extend_from_slice(&out.id_t);
        ids_b.extend_from_slice(&out.id_b);
        let want = keep.saturating_sub(start).min(n);
        kept.extend_from_slice(&out.dec[..want * p2]);
        start += n;
    }
    let (perplexity_t, live_t) = usage(&ids_t, cfg.n_embed);
    let (perplexity_b, live_b) = usage(&ids_b, cfg.n_embed);
    Ok((
        SplitMetrics {
            mse_8bit: recon / set.n as f64 * TO_8BIT,
            latent_loss: latent / set.n as f64,
            perplexity_t,
            perplexity_b,
            live_t,
            live_b,
        },
        kept,
    ))
}

/// Writes the metrics CSV (every epoch so far).
fn write_metrics(path: &Path, rows: &[EpochRow]) -> Result<()> {
    let mut s = String::from(
        "epoch,step,train_loss,restarted_t,restarted_b,\
         train_mse_8bit,train_latent_loss,train_perplexity_t,train_perplexity_b,train_live_t,train_live_b,\
         val_mse_8bit,val_latent_loss,val_perplexity_t,val_perplexity_b,val_live_t,val_live_b\n",
    );
    let split = |m: Option<&SplitMetrics>| match m {
        Some(m) => format!(
            "{},{},{},{},{},{}",
            m.mse_8bit, m.latent_loss, m.perplexity_t, m.perplexity_b, m.live_t, m.live_b
        ),
        None => ",,,,,".to_string(),
    };
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            r.epoch,
            r.step,
            r.train_loss,
            r.restarted[0],
            r.restarted[1],
            split(Some(&r.train)),
            split(r.val.as_ref())
        ));
    }
    crate::io::write_atomic(path, s.as_bytes())
}

/// Writes the curves: reconstruction MSE (train and validation) against
/// the epoch.
fn write_curves(path: &Path, rows: &[EpochRow]) -> Result<()> {
    let x: Vec<f64> = rows.iter().map(|r| r.epoch as f64).collect();
    let mut series = vec![Series {
        label: "train".into(),
        x: x.clone(),
        y: rows.iter().map(|r| r.train.mse_8bit).collect(),
    }];
    if rows.iter().all(|r| r.val.is_some()) {
        series.push(Series {
            label: "validation".into(),
            x,
            y: rows
                .iter()
                .filter_map(|r| r.val.as_ref().map(|m| m.mse_8bit))
                .collect(),
        });
    }
    let opts = PlotOptions {
        title: "VQ-VAE-2 reconstruction".into(),
        x_label: "epoch".into(),
        y_label: "MSE (8-bit units)".into(),
        width: 640,
        height: 400,
    };
    line_plot(path, &series, &opts)
}

/// A grey tile of a `[−1, 1]` patch.
fn tile(x: &[f32], patch: usize) -> Result<RgbImage> {
    let side = u32::try_from(patch).map_err(|_| Error::invalid("patch too large"))?;
    Ok(RgbImage::from_fn(side, side, |u, v| {
        let val = x[v as usize * patch + u as usize];
        let g = ((val + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8;
        image::Rgb([g, g, g])
    }))
}

fn write_sheet(
    path: &Path,
    originals: &[f32],
    recons: &[f32],
    patch: usize,
    title: String,
) -> Result<()> {
    let p2 = patch * patch;
    let n = recons.len() / p2;
    let row = |data: &[f32]| -> Result<Vec<Tile>> {
        (0..n)
            .map(|i| {
                Ok(Tile {
                    image: tile(&data[i * p2..(i + 1) * p2], patch)?,
                    caption: format!("{i}"),
                })
            })
            .collect()
    };
    Sheet {
        title: vec![title],
        rows: vec![
            ("original".into(), row(originals)?),
            ("reconstructed".into(), row(recons)?),
        ],
    }
    .save(path)
}

/// Trains from `init` (a `state_dict`, e.g. from [`init_weights`]) or, with
/// `resume`, from a checkpoint written by an earlier run with the same
/// options and images; see the module documentation. Steps and metrics run
/// on `be`.
pub fn train(
    be: &Backend,
    pool: &mut ImagePool,
    init: &Path,
    resume: Option<&Path>,
    opts: &TrainOptions,
    paths: &TrainPaths,
    show_progress: bool,
) -> Result<TrainSummary> {
    opts.validate()?;
    if pool.is_empty() {
        return Err(Error::invalid("no usable training image"));
    }
    let file = TensorFile::open(init)?;
    let (cfg, mut store) = step_fns::load_store(&file)?;
    if cfg.in_channel != 1 {
        return Err(Error::format(
            init,
            format!("in_channel {} (images are single-channel)", cfg.in_channel),
        ));
    }
    if !crate::models::vqvae2::has_decoder(&file) {
        return Err(Error::format(
            init,
            "training needs the decoder (upsample_t.*, dec.*), which these weights do not have",
        ));
    }
    // A resume builds the model from the checkpoint itself: its tensors must
    // be exactly a VQ-VAE-2's.
    super::init::check_vqvae2_tensors(&file, &cfg)?;
    drop(file);
    let mut opt = Optimizer::new(Method::Adam(AdamConfig::default()))?;
    store.register(&mut opt)?;
    let step_cfg = StepConfig {
        latent_loss_weight: opts.latent_loss_weight,
        decay: opts.decay,
        ..StepConfig::default()
    };

    let (train_idx, val_idx) = split(pool, opts)?;
    let hash = images_hash(pool);
    let mut progress = Progress {
        step: 0,
        init: init.display().to_string(),
        options: opts.clone(),
        images: hash,
        rows: Vec::new(),
        epoch_loss_sum: 0.0,
        epoch_steps: 0,
        epoch_restarted: [0, 0],
    };
    if let Some(ck) = resume {
        let saved = checkpoint::load(ck, &mut store, &mut opt)?;
        let saved: Progress = serde_json::from_value(saved)
            .map_err(|e| Error::format(ck, format!("checkpoint progress: {e}")))?;
        if saved.images != hash {
            return Err(Error::format(
                ck,
                "the checkpoint was made on another image list (--samples differ)",
            ));
        }
        let same = TrainOptions {
            steps: opts.steps,
            checkpoint_every: opts.checkpoint_every,
            ..saved.options.clone()
        };
        if &same != opts {
            return Err(Error::format(
                ck,
                format!(
                    "the checkpoint was made with other options ({:?}); only --steps and \
                     --checkpoint-every may change on resume",
                    saved.options
                ),
            ));
        }
        checkpoint::check_steps(ck, &opt, saved.step)?;
        if saved.step > opts.steps {
            return Err(Error::format(
                ck,
                format!(
                    "the checkpoint is at step {}, past --steps {}",
                    saved.step, opts.steps
                ),
            ));
        }
        progress = Progress {
            options: opts.clone(),
            ..saved
        };
        if !progress.step.is_multiple_of(opts.steps_per_epoch) {
            progress.rows.pop();
        }
    }
    let resumed_from = progress.step;

    let train_eval = eval_set(pool, &train_idx, opts, KEY_EVAL_TRAIN)?
        .ok_or_else(|| Error::invalid("no training image"))?;
    let val_eval = eval_set(pool, &val_idx, opts, KEY_EVAL_VAL)?;
    let p = opts.patch;
    let shape = [opts.batch, 1, p, p];
    let bar = crate::apps::progress_bar(opts.steps, "steps");
    bar.set_position(progress.step);
    if !show_progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = Instant::now();
    let mut x = Vec::with_capacity(opts.batch * p * p);
    while progress.step < opts.steps {
        let t = progress.step;
        x.clear();
        for j in 0..opts.batch as u64 {
            pool.draw(&train_idx, p, (opts.seed ^ KEY_TRAIN, t, j), true, &mut x)?;
        }
        let restart = Restart {
            threshold: opts.dead_threshold,
            seed: opts.seed ^ KEY_RESTART,
            step: t,
        };
        let (out, restarted) = step_fns::train_step_restarting(
            be,
            &mut store,
            &mut opt,
            opts.lr,
            &cfg,
            &shape,
            &x,
            &step_cfg,
            (opts.dead_threshold > 0.0).then_some(&restart),
        )?;
        if !out.loss.is_finite() {
            return Err(Error::invalid(format!(
                "the loss became {} at step {t}; try a lower --lr",
                out.loss
            )));
        }
        progress.step += 1;
        progress.epoch_loss_sum += f64::from(out.loss);
        progress.epoch_steps += 1;
        progress.epoch_restarted[0] += restarted[0];
        progress.epoch_restarted[1] += restarted[1];
        bar.set_position(progress.step);
        bar.set_message(format!(
            "mse {:.1} latent {:.4}",
            f64::from(out.recon_loss) * TO_8BIT,
            out.latent_loss
        ));

        // A run that stops between epoch ends reports the partial epoch as
        // a row marked by its step; a resumed run replaces that row.
        let whole = progress.step.is_multiple_of(opts.steps_per_epoch);
        if whole || progress.step == opts.steps {
            let keep = 8.min(opts.eval_patches);
            // The sheet shows validation patches, or training ones without a
            // validation split; each set is evaluated once.
            let shown = val_eval.as_ref().unwrap_or(&train_eval);
            let train_keep = if val_eval.is_some() { 0 } else { keep };
            let (train_m, train_recons) =
                evaluate(be, &store, &cfg, &train_eval, opts, &step_cfg, train_keep)?;
            let (val_m, recons) = match &val_eval {
                Some(v) => {
                    let (m, r) = evaluate(be, &store, &cfg, v, opts, &step_cfg, keep)?;
                    (Some(m), r)
                }
                None => (None, train_recons),
            };
            let row = EpochRow {
                epoch: progress.step.div_ceil(opts.steps_per_epoch),
                step: progress.step,
                train_loss: progress.epoch_loss_sum / progress.epoch_steps.max(1) as f64,
                restarted: progress.epoch_restarted,
                train: train_m,
                val: val_m,
            };
            bar.suspend(|| eprintln!("{}", describe(&row)));
            progress.rows.push(row);
            if whole {
                progress.epoch_loss_sum = 0.0;
                progress.epoch_steps = 0;
                progress.epoch_restarted = [0, 0];
            }
            write_metrics(&paths.metrics, &progress.rows)?;
            write_curves(&paths.curves, &progress.rows)?;
            write_sheet(
                &paths.sheet,
                &shown.x[..keep * p * p],
                &recons,
                p,
                format!(
                    "{} patches, step {}: originals above, reconstructions below",
                    if val_eval.is_some() {
                        "validation"
                    } else {
                        "training"
                    },
                    progress.step
                ),
            )?;
        }
        if progress.step.is_multiple_of(opts.checkpoint_every()) || progress.step == opts.steps {
            let value = serde_json::to_value(&progress)
                .map_err(|e| Error::invalid(format!("checkpoint progress: {e}")))?;
            checkpoint::save(&paths.checkpoint, &store, &opt, &value)?;
        }
    }
    bar.finish_and_clear();

    let mut w = TensorWriter::new();
    store.write_values(&mut w, "")?;
    w.set_metadata(
        "cellmorph",
        &format!(
            "VQ-VAE-2 ({cfg}) trained by cellmorph vqvae2 train: {} steps of {} {p}×{p} patches \
             (flips, 90° rotations), Adam lr {}, seed {}, dead-code threshold {}, from {}",
            opts.steps, opts.batch, opts.lr, opts.seed, opts.dead_threshold, progress.init
        ),
    );
    w.write(&paths.output)?;
    let secs = started.elapsed().as_secs_f64();
    Ok(TrainSummary {
        rows: progress.rows,
        resumed_from,
        images: (train_idx.len(), val_idx.len()),
        steps_per_s: (opts.steps - resumed_from) as f64 / secs.max(1e-9),
    })
}

/// One line per epoch for the log.
pub fn describe(r: &EpochRow) -> String {
    let mut s = format!(
        "epoch {} (step {}): loss {:.5}, train mse {:.2} (8-bit), live codes {}/{}",
        r.epoch, r.step, r.train_loss, r.train.mse_8bit, r.train.live_t, r.train.live_b
    );
    if let Some(v) = &r.val {
        s.push_str(&format!(
            "; val mse {:.2}, perplexity {:.1}/{:.1}, live codes {}/{}",
            v.mse_8bit, v.perplexity_t, v.perplexity_b, v.live_t, v.live_b
        ));
    }
    if r.restarted != [0, 0] {
        s.push_str(&format!(
            "; restarted {}/{} dead codes",
            r.restarted[0], r.restarted[1]
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_perplexity_and_live_codes() {
        let (p, live) = usage(&[0, 1, 2, 3], 8);
        assert!((p - 4.0).abs() < 1e-12);
        assert_eq!(live, 4);
        let (p, live) = usage(&[5, 5, 5], 8);
        assert!((p - 1.0).abs() < 1e-12);
        assert_eq!(live, 1);
    }
}
