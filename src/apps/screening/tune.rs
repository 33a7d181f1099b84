//! `cellmorph screen tune`: a hyper-parameter search for the screening head
//! (stage 1 of [`train`](super::train)) by Bayesian optimization.
//!
//! **What is searched.** The learning rate (log scale), the weight decay
//! (log scale; a range starting at 0 adds one decade below
//! `--weight-decay-floor` whose values mean 0, plain Adam), and for Kim's
//! head the dropout (linear) and the hidden width (integer, log scale).
//! Each trial's point lives in the unit cube ([`ParamRange::from_unit`]);
//! the Gaussian process sees the point of the values actually used
//! ([`ParamRange::to_unit`] of the rounded width, of a weight decay of 0),
//! so a resumed search sees what the unbroken one saw.
//!
//! **How.** `--initial K` trials from a seeded Latin hypercube
//! ([`latin_hypercube`]), then each trial at the candidate of highest
//! expected improvement under a Gaussian process fitted to every finished
//! trial ([`suggest`]: Matérn 5/2, length scale and noise by maximum
//! likelihood over a grid, candidates drawn from the seed and the trial
//! number). It is written here: of the Rust crates looked at, `tpe` has
//! not moved in years, `egobox` brings linfa and a linear-algebra stack,
//! `parzen` is new, and none makes a search resumable bit for bit from a
//! CSV log.
//!
//! **The objective** is a trial's best validation AUC (the epoch that
//! `screen train`'s early stopping keeps); the best trial has the highest,
//! then the lower validation loss, then the lower trial number. A trial
//! whose training fails (a diverging loss) is logged with its error and
//! counts as AUC 0.5, chance, for the surrogate. When every trial reaches
//! the same AUC (a small, easy validation set), the surrogate has nothing
//! to model and its trials explore; the validation loss then picks the best.
//!
//! **Shared work.** The backbone's pooled features are computed once
//! ([`labelled_features`](super::train::labelled_features), on the device of
//! [`screen_tune_on`]), and every trial trains a fresh head on that
//! cache with [`train_head`]. Every trial uses the same seeded,
//! stratified train/validation split, the same head initialization seed,
//! shuffles and dropout masks as `screen train --seed S` (common random
//! numbers: trials differ by their parameters only), so `screen train`
//! with a trial's values and the same seed and options reproduces that
//! trial's head bit for bit. Stage 2 (fine-tuning) is not part of the
//! search: run `screen train --unfreeze` with the best values.
//!
//! **Files.** Each finished trial is appended to the log CSV and synced
//! (a killed run keeps its log); the log opens with `#` lines holding the
//! search's settings ([`TuneSettings`], with a fingerprint of the
//! features), which `--resume` requires to match before it continues after
//! the last logged trial (the logged trials are read back, not rerun; a
//! cut last line is dropped). An existing log is otherwise refused unless
//! `--force` starts it over. The best trial's network (backbone and head,
//! as `screen train` writes it) goes to `--output` atomically whenever a
//! trial beats the best; at the end the output is checked to hold the
//! best trial (else that trial is trained again, deterministic). A JSON
//! summary and a PNG of the AUC by trial with the running best follow.
//!
//! The same seed and settings give the same trials, log (bar the seconds
//! column) and weights, bit for bit; `--time-limit` only decides how many
//! trials run.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::preprocess::SkipReason;
use super::train::{
    assemble, head_seed, labelled_features_on, stratified_split, train_head, FeatureSet,
    FeatureSource, Head, HeadKind, HeadTrainOptions, HeadTrainResult, Init,
};
use crate::csv::{CsvFile, CsvWriter};
use crate::error::{Error, Result};
use crate::io::{check_output_is_not_an_input, write_atomic, TensorFile};
use crate::models::densenet::DenseNet;
use crate::plot::{line_plot, PlotOptions, Series};
use crate::rng::SplitMix64;
use crate::stats::bayesopt::{latin_hypercube, suggest, SuggestOptions};
use crate::Backend;

/// Metadata key of the search record in the written weights.
pub const TUNE_METADATA_KEY: &str = "cellmorph.screen_tune";
/// Version of the log's settings line.
const LOG_VERSION: u32 = 1;
/// Most trials of one search (each model-based trial fits a Gaussian
/// process to all earlier ones, cubic in their number).
pub const MAX_TRIALS: usize = 1000;
/// Widest Kim head searched.
pub const MAX_HIDDEN: usize = 4096;
/// The value a failed trial stands for in the surrogate (chance AUC).
const FAILED_TRIAL_AUC: f64 = 0.5;

// Sub-streams of the seed (apart from `screen train`'s, which the trials
// use as it does).
const STREAM_DESIGN: u64 = 101;
const STREAM_SUGGEST: u64 = 102;

const SETTINGS_PREFIX: &str = "settings ";

/// How a parameter maps the unit interval onto its values.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Scale {
    /// `lo + u·(hi − lo)`.
    Linear,
    /// Uniform in the logarithm.
    Log,
    /// Uniform in the logarithm, rounded to an integer.
    LogInteger,
    /// Uniform in the logarithm over `[floor/10, hi]`, values at or below
    /// `floor` meaning 0.
    LogOrZero {
        /// The smallest non-zero value.
        floor: f64,
    },
}

/// One searched parameter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamRange {
    /// Its name (the log's column).
    pub name: String,
    /// Lowest value (0 for [`Scale::LogOrZero`]).
    pub lo: f64,
    /// Highest value.
    pub hi: f64,
    /// How the unit interval maps onto it.
    pub scale: Scale,
}

impl ParamRange {
    fn log_bounds(&self) -> (f64, f64) {
        match self.scale {
            Scale::LogOrZero { floor } => ((floor / 10.0).ln(), self.hi.ln()),
            _ => (self.lo.ln(), self.hi.ln()),
        }
    }

    /// The value at `u` ∈ [0, 1].
    pub fn from_unit(&self, u: f64) -> f64 {
        let u = u.clamp(0.0, 1.0);
        let (a, b) = self.log_bounds();
        let v = match self.scale {
            Scale::Linear => self.lo + u * (self.hi - self.lo),
            Scale::Log => (a + u * (b - a)).exp(),
            Scale::LogInteger => (a + u * (b - a)).exp().round(),
            Scale::LogOrZero { floor } => {
                let w = (a + u * (b - a)).exp();
                if w <= floor {
                    return 0.0;
                }
                w
            }
        };
        v.clamp(self.lo, self.hi)
    }

    /// The point of value `v` in [0, 1] (0 for a fixed parameter; the
    /// middle of the zero decade for 0 on [`Scale::LogOrZero`]).
    pub fn to_unit(&self, v: f64) -> f64 {
        let (a, b) = self.log_bounds();
        let u = match self.scale {
            _ if self.hi == self.lo => 0.0,
            Scale::Linear => (v - self.lo) / (self.hi - self.lo),
            Scale::LogOrZero { floor } if v <= 0.0 => 0.5 * (floor.ln() - a) / (b - a),
            _ => (v.ln() - a) / (b - a),
        };
        u.clamp(0.0, 1.0)
    }

    fn contains(&self, v: f64) -> bool {
        v.is_finite()
            && v >= self.lo
            && v <= self.hi
            && (self.scale != Scale::LogInteger || v.fract() == 0.0)
    }

    /// The value as the log writes it (the shortest text that reads back
    /// as the same `f64`).
    fn format(&self, v: f64) -> String {
        format!("{v}")
    }
}

/// Parses `LOW..HIGH` given as `flag`.
///
/// # Errors
/// Anything else, non-finite bounds or `LOW > HIGH`, naming the flag.
pub fn parse_range(flag: &str, text: &str) -> Result<(f64, f64)> {
    let bad = |why: &str| {
        Error::invalid(format!(
            "{flag} {text:?}: {why}; expected LOW..HIGH, e.g. {flag} 1e-5..1e-1 (LOW = HIGH fixes the value)"
        ))
    };
    let (lo, hi) = text
        .split_once("..")
        .ok_or_else(|| bad("no `..` between the bounds"))?;
    let num = |s: &str, which: &str| {
        s.trim()
            .parse::<f64>()
            .map_err(|_| bad(&format!("the {which} bound {:?} is not a number", s.trim())))
            .and_then(|v| {
                if v.is_finite() {
                    Ok(v)
                } else {
                    Err(bad(&format!("the {which} bound is not finite")))
                }
            })
    };
    let (lo, hi) = (num(lo, "low")?, num(hi, "high")?);
    if lo > hi {
        return Err(bad("the low bound is above the high one"));
    }
    Ok((lo, hi))
}

/// The head the search trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TuneHead {
    /// Kim et al.'s two layers: learning rate, weight decay, dropout and
    /// hidden width are searched.
    Kim,
    /// One Linear layer: learning rate and weight decay.
    Linear,
}

/// The bounds of the search, as given on the command line.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchBounds {
    /// Learning rate, `> 0` (log scale).
    pub lr: (f64, f64),
    /// Weight decay, `≥ 0` (log scale; a low bound of 0 adds the zero
    /// decade below `weight_decay_floor`).
    pub weight_decay: (f64, f64),
    /// The smallest non-zero weight decay when the range starts at 0.
    pub weight_decay_floor: f64,
    /// Dropout, in [0, 1) (Kim head).
    pub dropout: (f64, f64),
    /// Hidden width, integers in 1..=[`MAX_HIDDEN`] (Kim head).
    pub hidden: (f64, f64),
}

impl Default for SearchBounds {
    fn default() -> Self {
        SearchBounds {
            lr: (1e-5, 1e-1),
            weight_decay: (0.0, 1e-2),
            weight_decay_floor: 1e-6,
            dropout: (0.0, 0.7),
            hidden: (16.0, 256.0),
        }
    }
}

/// The searched parameters of `head` within `b`, in the log's column
/// order: `lr`, `weight_decay`, then `dropout` and `hidden` for Kim's head.
///
/// # Errors
/// A bound outside its parameter's domain, naming the flag.
pub fn search_space(head: TuneHead, b: &SearchBounds) -> Result<Vec<ParamRange>> {
    let (lo, hi) = b.lr;
    if lo <= 0.0 || lo.is_nan() {
        return Err(Error::invalid(format!(
            "--lr {lo}..{hi}: the learning rate is searched on a log scale and must be above 0"
        )));
    }
    let mut space = vec![ParamRange {
        name: "lr".into(),
        lo,
        hi,
        scale: Scale::Log,
    }];
    let (lo, hi) = b.weight_decay;
    let floor = b.weight_decay_floor;
    if lo < 0.0 {
        return Err(Error::invalid(format!(
            "--weight-decay {lo}..{hi}: the weight decay cannot be negative"
        )));
    }
    let scale = if lo > 0.0 {
        Scale::Log
    } else if hi == 0.0 {
        Scale::Linear
    } else {
        if !(floor > 0.0 && floor < hi && floor.is_finite()) {
            return Err(Error::invalid(format!(
                "--weight-decay-floor {floor}: with --weight-decay 0..{hi}, the floor (the smallest non-zero weight decay) must lie strictly between 0 and {hi}"
            )));
        }
        Scale::LogOrZero { floor }
    };
    space.push(ParamRange {
        name: "weight_decay".into(),
        lo,
        hi,
        scale,
    });
    if head == TuneHead::Kim {
        let (lo, hi) = b.dropout;
        if !(lo >= 0.0 && hi < 1.0) {
            return Err(Error::invalid(format!(
                "--dropout {lo}..{hi}: a dropout probability lies in [0, 1)"
            )));
        }
        space.push(ParamRange {
            name: "dropout".into(),
            lo,
            hi,
            scale: Scale::Linear,
        });
        let (lo, hi) = b.hidden;
        if !(lo >= 1.0 && hi <= MAX_HIDDEN as f64 && lo.fract() == 0.0 && hi.fract() == 0.0) {
            return Err(Error::invalid(format!(
                "--hidden {lo}..{hi}: the hidden width is a whole number from 1 to {MAX_HIDDEN}"
            )));
        }
        space.push(ParamRange {
            name: "hidden".into(),
            lo,
            hi,
            scale: Scale::LogInteger,
        });
    }
    Ok(space)
}

/// Where a trial's point came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The initial Latin hypercube.
    Random,
    /// Expected improvement under the Gaussian process.
    Model,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Random => "random",
            Source::Model => "model",
        }
    }
}

/// One finished trial (a row of the log). Trials compare equal when
/// everything but the seconds is (values bit for bit, so a failed trial's
/// NaN metrics equal themselves).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Trial {
    /// 1-based.
    pub trial: usize,
    /// Where its point came from.
    pub source: Source,
    /// The parameters' values, in the order of the search space.
    pub values: Vec<f64>,
    /// Best validation AUC (NaN when the trial failed).
    pub val_auc: f64,
    /// Validation F1 of the best epoch (`None`: undefined or failed).
    pub val_f1: Option<f64>,
    /// Validation accuracy of the best epoch.
    pub val_accuracy: f64,
    /// Validation loss of the best epoch.
    pub val_loss: f64,
    /// The best epoch (0 when failed).
    pub best_epoch: usize,
    /// Epochs run.
    pub epochs: usize,
    /// Seconds of training (not part of any comparison).
    #[serde(skip)]
    pub seconds: f64,
    /// Why the trial failed.
    pub error: Option<String>,
}

impl PartialEq for Trial {
    fn eq(&self, o: &Trial) -> bool {
        let same = |a: f64, b: f64| a.to_bits() == b.to_bits();
        self.trial == o.trial
            && self.source == o.source
            && self.values.len() == o.values.len()
            && self.values.iter().zip(&o.values).all(|(a, b)| same(*a, *b))
            && same(self.val_auc, o.val_auc)
            && match (self.val_f1, o.val_f1) {
                (Some(a), Some(b)) => same(a, b),
                (a, b) => a.is_none() && b.is_none(),
            }
            && same(self.val_accuracy, o.val_accuracy)
            && same(self.val_loss, o.val_loss)
            && self.best_epoch == o.best_epoch
            && self.epochs == o.epochs
            && self.error == o.error
    }
}

impl Trial {
    /// The value the surrogate fits.
    fn objective(&self) -> f64 {
        if self.error.is_some() || !self.val_auc.is_finite() {
            FAILED_TRIAL_AUC
        } else {
            self.val_auc
        }
    }

    /// Whether this trial beats `best` (none yet, or one of lower AUC, or
    /// of the same AUC and a higher loss); a failed trial beats nothing.
    fn beats(&self, best: Option<&Trial>) -> bool {
        if self.error.is_some() || !self.val_auc.is_finite() {
            return false;
        }
        best.is_none_or(|b| {
            self.val_auc > b.val_auc || (self.val_auc == b.val_auc && self.val_loss < b.val_loss)
        })
    }
}

/// What must match for `--resume` to continue a log: written in its
/// `# settings` line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneSettings {
    /// Format version.
    pub version: u32,
    /// The head.
    pub head: TuneHead,
    /// The searched parameters.
    pub space: Vec<ParamRange>,
    /// Random trials before the model-based ones.
    pub initial: usize,
    /// The seed.
    pub seed: u64,
    /// Per-trial training (its `lr`, `weight_decay` and `dropout` are the
    /// trial's; here they are 0).
    pub train: HeadTrainOptions,
    /// Validation fraction of the split.
    pub val_fraction: f64,
    /// ImageNet normalization of the inputs.
    pub imagenet_normalize: bool,
    /// Usable labelled images.
    pub images: usize,
    /// FNV-1a of the cached features, the labels and the split (hex): the
    /// same images, labels and backbone.
    pub features: String,
}

/// What [`screen_tune`] reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct TuneOptions {
    /// A directory of PNG/TIFF images, or a CSV with an `image` column.
    pub images: PathBuf,
    /// Labels CSV (`image,label`).
    pub labels: PathBuf,
    /// The best trial's network (safetensors, as `screen train` writes).
    pub output: PathBuf,
    /// The backbone.
    pub init: Init,
    /// The head searched.
    pub head: TuneHead,
    /// The bounds ([`search_space`]).
    pub bounds: SearchBounds,
    /// Per-trial training: epochs, batch size, patience, class weights and
    /// seed (`lr`, `weight_decay`, `dropout` are ignored: searched).
    pub train: HeadTrainOptions,
    /// Fraction of each class held out for validation (one split for all
    /// trials).
    pub val_fraction: f64,
    /// ImageNet normalization of the inputs.
    pub imagenet_normalize: bool,
    /// Trials in all (a resumed log's included), at most [`MAX_TRIALS`].
    pub trials: usize,
    /// Start no trial after this many seconds of this command.
    pub time_limit: Option<f64>,
    /// Random (Latin hypercube) trials before the model-based ones.
    pub initial: usize,
    /// Trial log CSV (default `<output stem>.trials.csv`).
    pub log: Option<PathBuf>,
    /// Summary JSON (default `<output stem>.tune.json`).
    pub summary: Option<PathBuf>,
    /// AUC-by-trial PNG (default `<output stem>.tune.png`).
    pub plot: Option<PathBuf>,
    /// Continue the log's search.
    pub resume: bool,
    /// Start over when the log exists.
    pub force: bool,
}

/// Progress of [`screen_tune`].
#[derive(Clone, Debug, PartialEq)]
pub enum TuneProgress {
    /// Features computed for `done` of `total` images.
    Features {
        /// Images finished.
        done: usize,
        /// Images to do.
        total: usize,
    },
    /// Trials read back from the log.
    Resumed(usize),
    /// A trial finished (`true`: it is the best so far).
    Trial(Trial, bool),
}

/// Why the search stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// `trials` were done.
    Trials,
    /// The time limit passed.
    TimeLimit,
}

/// What [`screen_tune`] did (also written as the summary JSON).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TuneSummary {
    /// The search's settings.
    pub settings: TuneSettings,
    /// Every trial, in order.
    pub trials: Vec<Trial>,
    /// Trials read back from the log.
    pub resumed: usize,
    /// Why the search stopped.
    pub stopped: Stop,
    /// The best trial (`None` when every trial failed).
    pub best: Option<Trial>,
    /// The best trial's parameters by name.
    pub best_values: Vec<(String, f64)>,
    /// Whether the best trial was trained again at the end (its weights
    /// were not in the output).
    pub retrained_best: bool,
    /// Labelled images the pre-processing excluded, and why.
    pub excluded: Vec<(String, String)>,
    /// Labelled training and validation images.
    pub train_images: usize,
    /// See `train_images`.
    pub val_images: usize,
    /// Seconds of the feature pass (computed once for every trial).
    pub feature_seconds: f64,
    /// Seconds of the whole command.
    pub seconds: f64,
    /// Files written.
    pub output: PathBuf,
    /// See `output`.
    pub log: PathBuf,
    /// See `output`.
    pub summary: PathBuf,
    /// The plot, unless no trial succeeded.
    pub plot: Option<PathBuf>,
}

/// `<dir>/<output stem><suffix>`.
fn beside(output: &Path, suffix: &str) -> PathBuf {
    let stem = output
        .file_stem()
        .map_or_else(|| "tune".to_string(), |s| s.to_string_lossy().into_owned());
    output.with_file_name(format!("{stem}{suffix}"))
}

/// FNV-1a over the features' bits, the labels and the split.
fn fingerprint(features: &[f32], labels: &[bool], train: &[usize], val: &[usize]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for v in features {
        eat(&v.to_bits().to_le_bytes());
    }
    for &l in labels {
        eat(&[u8::from(l)]);
    }
    for &r in train.iter().chain(val) {
        eat(&(r as u64).to_le_bytes());
    }
    format!("{h:016x}")
}

fn header(space: &[ParamRange]) -> Vec<String> {
    let mut h = vec!["trial".to_string(), "source".to_string()];
    h.extend(space.iter().map(|p| p.name.clone()));
    for c in [
        "val_auc",
        "val_f1",
        "val_accuracy",
        "val_loss",
        "best_epoch",
        "epochs",
        "seconds",
        "error",
    ] {
        h.push(c.to_string());
    }
    h
}

fn row(space: &[ParamRange], t: &Trial) -> Vec<String> {
    let num = |v: f64| {
        if v.is_finite() {
            format!("{v}")
        } else {
            String::new()
        }
    };
    let mut r = vec![t.trial.to_string(), t.source.name().to_string()];
    r.extend(space.iter().zip(&t.values).map(|(p, &v)| p.format(v)));
    r.push(num(t.val_auc));
    r.push(t.val_f1.map_or_else(String::new, num));
    r.push(num(t.val_accuracy));
    r.push(num(t.val_loss));
    r.push(t.best_epoch.to_string());
    r.push(t.epochs.to_string());
    r.push(format!("{:.3}", t.seconds));
    r.push(t.error.clone().unwrap_or_default());
    r
}

/// The log's opening: a title, the settings and the header.
fn log_head(settings: &TuneSettings) -> Result<String> {
    let json = serde_json::to_string(settings)
        .map_err(|e| Error::invalid(format!("tune settings to JSON: {e}")))?;
    let mut w = CsvWriter::new();
    w.comment("cellmorph screen tune: one row per finished trial; continue with --resume");
    w.comment(&format!("{SETTINGS_PREFIX}{json}"));
    w.record(header(&settings.space));
    Ok(w.into_string())
}

/// Reads a log back (see the module docs), dropping a cut last line;
/// returns its trials and the length of its text that is kept.
fn read_log(path: &Path, settings: &TuneSettings) -> Result<(Vec<Trial>, usize)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let text = std::str::from_utf8(&bytes[..keep])
        .map_err(|_| Error::format(path, "not UTF-8 text: not a screen tune log"))?;
    let csv = CsvFile::parse(text, path)?;
    let logged = csv
        .comments
        .iter()
        .find_map(|c| c.text.strip_prefix(SETTINGS_PREFIX))
        .ok_or_else(|| {
            csv.error("no `# settings` line: not a screen tune log (start over with --force)")
        })?;
    let logged: serde_json::Value = serde_json::from_str(logged)
        .map_err(|e| csv.error(format!("the settings line is not JSON: {e}")))?;
    let now = serde_json::to_value(settings)
        .map_err(|e| Error::invalid(format!("tune settings to JSON: {e}")))?;
    if logged != now {
        let mut diffs = Vec::new();
        if let (Some(a), Some(b)) = (logged.as_object(), now.as_object()) {
            for (k, v) in b {
                if a.get(k) != Some(v) {
                    diffs.push(format!(
                        "{k}: the log has {}, this run {v}",
                        a.get(k)
                            .map_or_else(|| "nothing".to_string(), |x| x.to_string())
                    ));
                }
            }
        }
        return Err(csv.error(format!(
            "the log was written by a search with other settings, so --resume cannot continue it ({}); rerun with the log's settings, or start over with --force",
            if diffs.is_empty() {
                "the settings line differs".to_string()
            } else {
                diffs.join("; ")
            }
        )));
    }
    let want = header(&settings.space);
    let have: Vec<String> = (0..csv.header.len())
        .map(|i| csv.header.get(i).to_string())
        .collect();
    if have != want {
        return Err(csv.error(format!(
            "header {} does not match this search's {}",
            have.join(","),
            want.join(",")
        )));
    }
    let space = &settings.space;
    let mut trials = Vec::with_capacity(csv.rows.len());
    for (k, r) in csv.rows.iter().enumerate() {
        csv.check_width(r)?;
        let cell = |i: usize| r.get(i);
        let bad = |i: usize, why: &str| csv.cell_error(r.line, i, why);
        let number = |i: usize| -> Result<f64> {
            if cell(i).is_empty() {
                Ok(f64::NAN)
            } else {
                cell(i).parse::<f64>().map_err(|_| bad(i, "not a number"))
            }
        };
        let count = |i: usize| cell(i).parse::<usize>().map_err(|_| bad(i, "not a count"));
        let trial = count(0)?;
        if trial != k + 1 {
            return Err(bad(
                0,
                &format!("trial {trial} where {} was expected", k + 1),
            ));
        }
        let source = match cell(1) {
            "random" => Source::Random,
            "model" => Source::Model,
            _ => return Err(bad(1, "neither random nor model")),
        };
        if (source == Source::Random) != (trial <= settings.initial) {
            return Err(bad(
                1,
                &format!(
                    "trial {trial} is {} but --initial {} makes it {}",
                    source.name(),
                    settings.initial,
                    if trial <= settings.initial {
                        "random"
                    } else {
                        "model"
                    }
                ),
            ));
        }
        let mut values = Vec::with_capacity(space.len());
        for (j, p) in space.iter().enumerate() {
            let v = number(2 + j)?;
            if !p.contains(v) {
                return Err(bad(2 + j, &format!("{v} is outside {}..{}", p.lo, p.hi)));
            }
            values.push(v);
        }
        let m = 2 + space.len();
        let error = Some(cell(m + 7).to_string()).filter(|e| !e.is_empty());
        let val_auc = number(m)?;
        if error.is_none() && !(0.0..=1.0).contains(&val_auc) {
            return Err(bad(m, "an AUC lies in [0, 1]"));
        }
        let f1 = number(m + 1)?;
        trials.push(Trial {
            trial,
            source,
            values,
            val_auc,
            val_f1: f1.is_finite().then_some(f1),
            val_accuracy: number(m + 2)?,
            val_loss: number(m + 3)?,
            best_epoch: count(m + 4)?,
            epochs: count(m + 5)?,
            seconds: number(m + 6)?,
            error,
        });
    }
    Ok((trials, keep))
}

/// The search record in the written network's metadata.
#[derive(Serialize, Deserialize)]
struct Record {
    stage: String,
    settings: TuneSettings,
    trial: Trial,
}

/// The head of `space`'s values `v`.
fn head_kind(head: TuneHead, space: &[ParamRange], v: &[f64]) -> HeadKind {
    match head {
        TuneHead::Linear => HeadKind::Linear,
        TuneHead::Kim => HeadKind::Kim {
            hidden: space
                .iter()
                .zip(v)
                .find(|(p, _)| p.name == "hidden")
                .map_or(64, |(_, &h)| h as usize),
        },
    }
}

/// `base` with the trial's learning rate, weight decay and dropout.
fn trial_options(base: &HeadTrainOptions, space: &[ParamRange], v: &[f64]) -> HeadTrainOptions {
    let mut o = base.clone();
    for (p, &x) in space.iter().zip(v) {
        match p.name.as_str() {
            "lr" => o.lr = x,
            "weight_decay" => o.weight_decay = x,
            "dropout" => o.dropout = x as f32,
            _ => {}
        }
    }
    o
}

/// The data every trial trains on.
struct Shared<'a> {
    data: FeatureSet<'a>,
    split: &'a super::train::Split,
    settings: &'a TuneSettings,
}

/// Trains one trial's head; a training error is the trial's, not the
/// search's.
fn run_trial(
    s: &Shared,
    trial: usize,
    source: Source,
    values: Vec<f64>,
) -> Result<(Trial, Option<HeadTrainResult>)> {
    let space = &s.settings.space;
    let kind = head_kind(s.settings.head, space, &values);
    let o = trial_options(&s.settings.train, space, &values);
    let t0 = Instant::now();
    let head = Head::fresh(kind, s.data.dim, head_seed(o.seed))?;
    let result = train_head(&s.data, s.split, head, &o, |_| {});
    let seconds = t0.elapsed().as_secs_f64();
    Ok(match result {
        Ok(r) => {
            let b = r
                .best()
                .ok_or_else(|| Error::invalid(format!("trial {trial}: no epoch ran")))?;
            (
                Trial {
                    trial,
                    source,
                    values,
                    val_auc: b.val_auc,
                    val_f1: b.val_f1,
                    val_accuracy: b.val_accuracy,
                    val_loss: b.val_loss,
                    best_epoch: r.best_epoch,
                    epochs: r.epochs.len(),
                    seconds,
                    error: None,
                },
                Some(r),
            )
        }
        Err(e) => (
            Trial {
                trial,
                source,
                values,
                val_auc: f64::NAN,
                val_f1: None,
                val_accuracy: f64::NAN,
                val_loss: f64::NAN,
                best_epoch: 0,
                epochs: 0,
                seconds,
                error: Some(e.to_string()),
            },
            None,
        ),
    })
}

/// Writes the network of `backbone` with `head` and the trial's record to
/// `output`, atomically, after checking that it loads.
fn write_network(
    output: &Path,
    backbone: &TensorFile,
    head: &Head,
    settings: &TuneSettings,
    trial: &Trial,
) -> Result<()> {
    let mut w = assemble(backbone, head)?;
    let record = Record {
        stage: "1: backbone frozen, head trained on cached pooled features; the best trial of screen tune".into(),
        settings: settings.clone(),
        trial: trial.clone(),
    };
    let json = serde_json::to_string(&record)
        .map_err(|e| Error::invalid(format!("tune record to JSON: {e}")))?;
    w.set_metadata(TUNE_METADATA_KEY, &json);
    let bytes = w.to_bytes()?;
    DenseNet::from_file(
        &Backend::cpu(),
        &TensorFile::from_bytes(output, bytes.clone())?,
    )?;
    write_atomic(output, &bytes)
}

/// Whether `output` holds `trial` of this search.
fn output_holds(output: &Path, settings: &TuneSettings, trial: &Trial) -> bool {
    let Ok(file) = TensorFile::open(output) else {
        return false;
    };
    file.metadata()
        .and_then(|m| m.get(TUNE_METADATA_KEY))
        .and_then(|j| serde_json::from_str::<Record>(j).ok())
        .is_some_and(|r| r.settings == *settings && r.trial == *trial)
}

/// The point of the next trial: a Latin-hypercube point for the first
/// `initial`, then expected improvement over the finished ones.
fn next_point(settings: &TuneSettings, design: &[Vec<f64>], done: &[Trial]) -> Result<Vec<f64>> {
    let t = done.len() + 1;
    let space = &settings.space;
    let u = if t <= settings.initial {
        design[t - 1].clone()
    } else {
        let x: Vec<Vec<f64>> = done
            .iter()
            .map(|d| {
                space
                    .iter()
                    .zip(&d.values)
                    .map(|(p, &v)| p.to_unit(v))
                    .collect()
            })
            .collect();
        let y: Vec<f64> = done.iter().map(Trial::objective).collect();
        let mut rng = SplitMix64::new(settings.seed)
            .fork(STREAM_SUGGEST)
            .fork(t as u64);
        suggest(&x, &y, &mut rng, &SuggestOptions::default())?.x
    };
    Ok(space.iter().zip(&u).map(|(p, &u)| p.from_unit(u)).collect())
}

/// Draws the validation AUC of each trial and the best so far; `false`
/// (nothing written) when no trial succeeded.
fn plot_trials(path: &Path, trials: &[Trial], best: Option<&Trial>) -> Result<bool> {
    let mut auc = Series {
        label: "val AUC".into(),
        x: Vec::new(),
        y: Vec::new(),
    };
    let mut running = Series {
        label: "best so far".into(),
        x: Vec::new(),
        y: Vec::new(),
    };
    let mut top = f64::NEG_INFINITY;
    for t in trials
        .iter()
        .filter(|t| t.error.is_none() && t.val_auc.is_finite())
    {
        top = top.max(t.val_auc);
        auc.x.push(t.trial as f64);
        auc.y.push(t.val_auc);
        running.x.push(t.trial as f64);
        running.y.push(top);
    }
    if auc.x.is_empty() {
        return Ok(false);
    }
    let title = best.map_or_else(
        || "screen tune: every trial failed".to_string(),
        |b| {
            format!(
                "screen tune: best trial {} (val AUC {:.4})",
                b.trial, b.val_auc
            )
        },
    );
    line_plot(
        path,
        &[auc, running],
        &PlotOptions {
            title,
            x_label: "trial".into(),
            y_label: "validation AUC".into(),
            width: 640,
            height: 420,
        },
    )?;
    Ok(true)
}

fn check_options(o: &TuneOptions) -> Result<Vec<ParamRange>> {
    if o.trials == 0 || o.trials > MAX_TRIALS {
        return Err(Error::invalid(format!(
            "--trials {}: must be from 1 to {MAX_TRIALS}",
            o.trials
        )));
    }
    if o.initial == 0 || o.initial > MAX_TRIALS {
        return Err(Error::invalid(format!(
            "--initial {}: must be from 1 to {MAX_TRIALS} (the model needs random trials to start from)",
            o.initial
        )));
    }
    if let Some(t) = o.time_limit {
        if !(t > 0.0 && t.is_finite()) {
            return Err(Error::invalid(format!(
                "--time-limit {t}: must be a positive number of seconds"
            )));
        }
    }
    if o.train.epochs == 0 {
        return Err(Error::invalid("--epochs must be at least 1"));
    }
    if o.train.batch_size == 0 {
        return Err(Error::invalid("--batch-size must be at least 1"));
    }
    if !(o.val_fraction > 0.0 && o.val_fraction < 1.0) {
        return Err(Error::invalid(format!(
            "--val-fraction {}: must lie strictly between 0 and 1 (the validation set scores the trials)",
            o.val_fraction
        )));
    }
    if o.resume && o.force {
        return Err(Error::invalid(
            "--resume continues the log and --force starts it over: give one of them",
        ));
    }
    search_space(o.head, &o.bounds)
}

/// `cellmorph screen tune` (see the module docs).
///
/// # Errors
/// Invalid options or bounds; an output that is an input; an existing log
/// without `--resume` or `--force`, or `--resume` of a log that is missing
/// or was written with other settings; the errors of
/// [`labelled_features`](super::train::labelled_features); a write failure.
pub fn screen_tune(o: &TuneOptions, progress: impl FnMut(TuneProgress)) -> Result<TuneSummary> {
    screen_tune_on(&Backend::cpu(), o, progress)
}

/// [`screen_tune`] with the feature pass (the inference network) on `be`'s
/// device; the trials train heads on the host, on the cached features. The
/// log's fingerprint covers the features, so a log is resumed only with
/// features equal to its own (the same device kind and precision, in
/// practice).
pub fn screen_tune_on(
    be: &Backend,
    o: &TuneOptions,
    mut progress: impl FnMut(TuneProgress),
) -> Result<TuneSummary> {
    let start = Instant::now();
    let space = check_options(o)?;
    let log_path = o
        .log
        .clone()
        .unwrap_or_else(|| beside(&o.output, ".trials.csv"));
    let summary_path = o
        .summary
        .clone()
        .unwrap_or_else(|| beside(&o.output, ".tune.json"));
    let plot_path = o
        .plot
        .clone()
        .unwrap_or_else(|| beside(&o.output, ".tune.png"));
    let mut inputs: Vec<(&str, &Path)> = vec![("--images", &o.images), ("--labels", &o.labels)];
    if let Init::File(p) = &o.init {
        inputs.push(("--init", p));
    }
    for (flag, path) in [
        ("--output", &o.output),
        ("--log", &log_path),
        ("--summary", &summary_path),
        ("--plot", &plot_path),
    ] {
        check_output_is_not_an_input(flag, path, &inputs)?;
        inputs.push((flag, path));
    }
    // Decide about the log before the feature pass.
    match (log_path.exists(), o.resume) {
        (true, false) if !o.force => {
            return Err(Error::invalid(format!(
                "--log {} exists: pass --resume to continue its search, or --force to start over (its trials are lost)",
                log_path.display()
            )))
        }
        (false, true) => {
            return Err(Error::invalid(format!(
                "--resume: there is no log {} to continue (give --log, or drop --resume)",
                log_path.display()
            )))
        }
        _ => {}
    }

    let feats = labelled_features_on(
        be,
        &FeatureSource {
            images: &o.images,
            labels: &o.labels,
            init: &o.init,
            seed: o.train.seed,
            batch_size: o.train.batch_size,
            imagenet_normalize: o.imagenet_normalize,
        },
        |done, total| progress(TuneProgress::Features { done, total }),
    )?;
    let split = stratified_split(&feats.labels, o.val_fraction, o.train.seed).map_err(|e| {
        Error::format(
            &o.labels,
            format!(
                "{e} ({} usable labelled images, {} excluded by the pre-processing)",
                feats.labels.len(),
                feats.excluded.len()
            ),
        )
    })?;
    let settings = TuneSettings {
        version: LOG_VERSION,
        head: o.head,
        space: space.clone(),
        initial: o.initial,
        seed: o.train.seed,
        train: HeadTrainOptions {
            lr: 0.0,
            weight_decay: 0.0,
            dropout: 0.0,
            ..o.train.clone()
        },
        val_fraction: o.val_fraction,
        imagenet_normalize: o.imagenet_normalize,
        images: feats.labels.len(),
        features: fingerprint(&feats.features, &feats.labels, &split.train, &split.val),
    };

    let mut trials = Vec::new();
    if o.resume {
        let (logged, keep) = read_log(&log_path, &settings)?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&log_path)
            .map_err(|e| Error::io(&log_path, e))?;
        f.set_len(keep as u64)
            .map_err(|e| Error::io(&log_path, e))?;
        trials = logged;
        progress(TuneProgress::Resumed(trials.len()));
    } else {
        write_atomic(&log_path, log_head(&settings)?.as_bytes())?;
    }
    let resumed = trials.len();
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;

    let shared = Shared {
        data: FeatureSet {
            features: &feats.features,
            dim: feats.dim,
            labels: &feats.labels,
        },
        split: &split,
        settings: &settings,
    };
    let design = latin_hypercube(
        settings.initial,
        space.len(),
        &mut SplitMix64::new(settings.seed).fork(STREAM_DESIGN),
    );
    let mut best: Option<usize> = None;
    for (k, t) in trials.iter().enumerate() {
        if t.beats(best.map(|b| &trials[b])) {
            best = Some(k);
        }
    }
    let mut written: Option<usize> = None;
    let mut stopped = Stop::Trials;
    while trials.len() < o.trials {
        if o.time_limit
            .is_some_and(|limit| start.elapsed().as_secs_f64() >= limit)
        {
            stopped = Stop::TimeLimit;
            break;
        }
        let t = trials.len() + 1;
        let source = if t <= settings.initial {
            Source::Random
        } else {
            Source::Model
        };
        let values = next_point(&settings, &design, &trials)?;
        let (trial, result) = run_trial(&shared, t, source, values)?;
        let improved = trial.beats(best.map(|b| &trials[b]));
        if let (true, Some(r)) = (improved, &result) {
            write_network(&o.output, &feats.backbone, &r.head, &settings, &trial)?;
            written = Some(t - 1);
            best = Some(t - 1);
        }
        let mut w = CsvWriter::new();
        w.record(row(&space, &trial));
        log.write_all(w.into_string().as_bytes())
            .and_then(|()| log.sync_data())
            .map_err(|e| Error::io(&log_path, e))?;
        progress(TuneProgress::Trial(trial.clone(), improved));
        trials.push(trial);
    }
    drop(log);

    let best_trial = best.map(|b| trials[b].clone());
    let mut retrained_best = false;
    if let Some(b) = &best_trial {
        if written != Some(b.trial - 1) && !output_holds(&o.output, &settings, b) {
            let (again, result) = run_trial(&shared, b.trial, b.source, b.values.clone())?;
            let r = result.ok_or_else(|| {
                Error::invalid(format!(
                    "trial {} trained again failed: {}",
                    b.trial,
                    again.error.clone().unwrap_or_default()
                ))
            })?;
            write_network(&o.output, &feats.backbone, &r.head, &settings, b)?;
            retrained_best = true;
        }
    }
    let plotted = plot_trials(&plot_path, &trials, best_trial.as_ref())?;
    let summary = TuneSummary {
        best_values: best_trial.as_ref().map_or_else(Vec::new, |b| {
            space
                .iter()
                .zip(&b.values)
                .map(|(p, &v)| (p.name.clone(), v))
                .collect()
        }),
        settings,
        trials,
        resumed,
        stopped,
        best: best_trial,
        retrained_best,
        excluded: feats
            .excluded
            .iter()
            .map(|(id, r): &(String, SkipReason)| (id.clone(), r.to_string()))
            .collect(),
        train_images: split.train.len(),
        val_images: split.val.len(),
        feature_seconds: feats.seconds,
        seconds: start.elapsed().as_secs_f64(),
        output: o.output.clone(),
        log: log_path,
        summary: summary_path.clone(),
        plot: plotted.then_some(plot_path),
    };
    let json = serde_json::to_string_pretty(&summary)
        .map_err(|e| Error::invalid(format!("tune summary to JSON: {e}")))?;
    write_atomic(&summary_path, json.as_bytes())?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_map_to_the_unit_interval_and_back() {
        let space = search_space(TuneHead::Kim, &SearchBounds::default()).unwrap();
        for p in &space {
            for k in 0..=20 {
                let u = k as f64 / 20.0;
                let v = p.from_unit(u);
                assert!(p.contains(v), "{} at {u}: {v}", p.name);
                // The value's point gives the value again, up to the
                // rounding of a logarithm and an exponential.
                let back = p.from_unit(p.to_unit(v));
                assert!(
                    (back - v).abs() <= 1e-12 * v.abs(),
                    "{} at {u}: {back} vs {v}",
                    p.name
                );
            }
        }
        // The zero decade: a fifth of 1e-7..1e-2 on the log scale.
        let wd = &space[1];
        assert_eq!(wd.from_unit(0.0), 0.0);
        assert_eq!(wd.from_unit(0.19), 0.0);
        assert!(wd.from_unit(0.21) > 1e-6);
        assert!((wd.from_unit(1.0) - 1e-2).abs() < 1e-15);
    }

    fn trial(k: usize, auc: f64, loss: f64, error: Option<&str>) -> Trial {
        Trial {
            trial: k,
            source: if k <= 2 {
                Source::Random
            } else {
                Source::Model
            },
            values: vec![1e-3 * k as f64, 0.0, 0.25, 17.0],
            val_auc: if error.is_some() { f64::NAN } else { auc },
            val_f1: error.is_none().then_some(0.5),
            val_accuracy: if error.is_some() { f64::NAN } else { 0.75 },
            val_loss: if error.is_some() { f64::NAN } else { loss },
            best_epoch: usize::from(error.is_none()) * 3,
            epochs: usize::from(error.is_none()) * 5,
            seconds: 0.25,
            error: error.map(String::from),
        }
    }

    /// Higher AUC wins, then lower loss; a failed trial never wins and
    /// stands for chance in the surrogate.
    #[test]
    fn the_best_trial_and_failed_trials() {
        let (a, b, c) = (
            trial(1, 0.8, 0.5, None),
            trial(2, 0.8, 0.4, None),
            trial(3, 0.0, 0.0, Some("training diverged")),
        );
        assert!(a.beats(None) && b.beats(Some(&a)) && !a.beats(Some(&b)));
        assert!(!a.beats(Some(&a)), "a tie keeps the earlier trial");
        assert!(!c.beats(None) && !c.beats(Some(&a)));
        assert_eq!(c.objective(), FAILED_TRIAL_AUC);
        assert_eq!(c, c.clone(), "NaN metrics compare equal bit for bit");
    }

    /// Rows written to the log read back as the same trials (a failed one
    /// with a comma in its error included); a cut last line is dropped; a
    /// log of other settings is refused, naming what differs.
    #[test]
    fn the_log_reads_back_what_was_written() {
        let dir = std::env::temp_dir().join(format!("cellmorph-tune-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.csv");
        let space = search_space(TuneHead::Kim, &SearchBounds::default()).unwrap();
        let settings = TuneSettings {
            version: LOG_VERSION,
            head: TuneHead::Kim,
            space: space.clone(),
            initial: 2,
            seed: 3,
            train: HeadTrainOptions::default(),
            val_fraction: 0.2,
            imagenet_normalize: false,
            images: 10,
            features: "00ff".into(),
        };
        let trials = vec![
            trial(1, 0.75, 0.6, None),
            trial(2, 0.0, 0.0, Some("diverged, at epoch 2")),
            trial(3, 0.875, 0.3125, None),
        ];
        let mut text = log_head(&settings).unwrap();
        for t in &trials {
            let mut w = CsvWriter::new();
            w.record(row(&space, t));
            text.push_str(&w.into_string());
        }
        let whole = text.len();
        text.push_str("4,model,0.0");
        std::fs::write(&path, &text).unwrap();
        let (back, keep) = read_log(&path, &settings).unwrap();
        assert_eq!(back, trials);
        assert_eq!(keep, whole);
        let other = TuneSettings {
            initial: 3,
            ..settings
        };
        let e = read_log(&path, &other).unwrap_err().to_string();
        assert!(e.contains("initial: the log has 2, this run 3"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn range_parsing_errors_name_the_flag() {
        assert_eq!(parse_range("--lr", "1e-5..1e-1").unwrap(), (1e-5, 1e-1));
        assert_eq!(parse_range("--lr", " 2 .. 2 ").unwrap(), (2.0, 2.0));
        for (text, why) in [
            ("1e-5-1e-1", "no `..`"),
            ("a..1", "low bound \"a\" is not a number"),
            ("1..", "high bound \"\" is not a number"),
            ("1..inf", "not finite"),
            ("3..2", "above the high one"),
        ] {
            let e = parse_range("--lr", text).unwrap_err().to_string();
            assert!(e.contains("--lr") && e.contains(why), "{text}: {e}");
        }
    }
}
