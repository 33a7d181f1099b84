//! `cellmorph screen predict`, `screen evaluate`, `screen train` and
//! `screen tune`: the
//! stem-cell line screening of Kim et al. 2022 ([reference](crate::reference) §2).

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use cellmorph::apps::screening::predict::{screen_images, SaliencyOptions, ScreenImagesOptions};
use cellmorph::apps::screening::report::{evaluate_predictions, EvaluatePredictionsOptions};
use cellmorph::apps::screening::saliency::SaliencyMethod;
use cellmorph::apps::screening::train::{
    screen_train_on, EpochMetrics, FineTuneOptions, HeadKind, HeadTrainOptions, Init,
    ScreenTrainOptions, TrainProgress, Unfreeze,
};
use cellmorph::apps::screening::tune::{
    parse_range, screen_tune_on, SearchBounds, Stop, Trial, TuneHead, TuneOptions, TuneProgress,
};
use cellmorph::models::densenet::DenseNetArch;
use cellmorph::{Device, Error, Precision, Result};

#[derive(Subcommand, Debug)]
pub enum ScreenCommand {
    /// Predict the positive-class probability of every image with a DenseNet
    /// (pre-processing as the paper: value channel, mean-V filter and
    /// scaling, resize to 226×306).
    Predict(PredictArgs),
    /// Evaluate a predictions CSV against labels: ROC AUC, F1, accuracy,
    /// sensitivity, specificity, PPV, NPV, confusion matrix, images/s, and a
    /// ROC curve PNG beside the report.
    Evaluate(EvaluateArgs),
    /// Train the network's head by transfer learning (stage 1 of Kim et
    /// al.): the backbone frozen, each labelled image's pooled features
    /// computed once (the pre-processing of `screen predict`) and cached,
    /// then the head trained on them with AdamW, class-weighted
    /// cross-entropy and dropout, validated each epoch (loss, AUC, F1,
    /// accuracy) with early stopping on the validation AUC. Writes the
    /// whole network with the best epoch's head (loadable by `screen
    /// predict`), the metrics CSV and a curves PNG. Augmentation (flips,
    /// rotations) has no place here: cached features are the same every
    /// epoch. With --unfreeze, stage 2 follows: the last dense block and
    /// norm5 (`last`, on cached activations at the block's input) or every
    /// layer (`all`, on flipped images) fine-tuned with the head at a lower
    /// learning rate, BatchNorm in training mode in the unfrozen part; the
    /// best epoch of both stages is written. Runs on the CPU.
    Train(TrainArgs),
    /// Search the head's learning rate, weight decay, dropout and hidden
    /// width by Bayesian optimization: --initial random trials (a seeded
    /// Latin hypercube), then each trial where a Gaussian process (Matérn
    /// 5/2) expects the most improvement in validation AUC. The pooled
    /// features are computed once and every trial trains a fresh head on
    /// them (stage 1 of `screen train`, the same split and seed for every
    /// trial; no fine-tuning). Each trial is appended to the log CSV as it
    /// ends (--resume continues a log); the best trial's network goes to
    /// --output (loadable by `screen predict`), with a summary JSON and a
    /// PNG of the AUC by trial. Runs on the CPU.
    Tune(TuneArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum HeadArg {
    /// Linear(C, hidden), ReLU, Dropout, Linear(hidden, 2), as Kim et al.
    Kim,
    /// One Linear(C, 2) (no dropout).
    Linear,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SaliencyArg {
    /// Grad-CAM++ on the activated last feature map (relu(norm5)), the
    /// gradient taken through the head on the host.
    Gradcampp,
    /// VisualBackProp: channel means of the stem and dense block outputs,
    /// multiplied from the deepest up (forward only; no class).
    Visualbackprop,
    /// The class activation map (as --cam-dir, for the chosen class).
    Cam,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum UnfreezeArg {
    /// The last dense block and norm5 (the rest frozen, its output cached
    /// once in eval mode).
    Last,
    /// Every layer (images read each epoch, random flips).
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ClassWeightsArg {
    /// Weigh each class by n / (2·n_class) over the training images.
    Balanced,
    /// Every image counts once.
    None,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A directory of PNG/TIFF images, or a CSV whose header has an `image`
    /// column (paths relative to the CSV; the labels file itself serves).
    #[arg(long)]
    images: PathBuf,
    /// Labels CSV with `image` and `label` columns (1/0, true/false,
    /// positive/negative, high/low); ids as in --images (file names for a
    /// directory). Images without a label are not used.
    #[arg(long)]
    labels: PathBuf,
    /// The trained DenseNet (safetensors, torchvision state_dict names).
    #[arg(long)]
    output: PathBuf,
    /// Starting weights: a torchvision DenseNet state_dict as safetensors,
    /// with or without a head (default: a DenseNet-121 backbone seeded from
    /// --seed with torchvision's initialization).
    #[arg(long)]
    init: Option<PathBuf>,
    /// The head: Kim et al.'s two layers, or one Linear. A fresh head is
    /// initialised from --seed unless --init holds a head of this shape.
    #[arg(long, value_enum, default_value = "kim")]
    head: HeadArg,
    /// Hidden width of the Kim head.
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// Most epochs.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Images per batch (the feature pass and each optimizer step).
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Learning rate of the head (AdamW).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Decoupled weight decay (AdamW); 0 is plain Adam.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Dropout probability in the Kim head.
    #[arg(long, default_value_t = 0.5)]
    dropout: f32,
    /// Seeds the backbone (without --init), the head, the split, the
    /// shuffles and the dropout masks: the same seed gives the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fraction of each class's images held out for validation (split by
    /// image file, stratified, seeded).
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f64,
    /// Stop after this many epochs without a better validation AUC (0: never).
    #[arg(long, default_value_t = 5)]
    patience: usize,
    /// Class weights of the loss.
    #[arg(long, value_enum, default_value = "balanced")]
    class_weights: ClassWeightsArg,
    /// Normalize inputs with the ImageNet mean and std (ImageNet backbones;
    /// pass --imagenet-norm to `screen predict` too).
    #[arg(long)]
    imagenet_norm: bool,
    /// Per-epoch metrics CSV (default: <output stem>.metrics.csv beside the output).
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Training curves PNG (default: <output stem>.curves.png beside the output).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Stage 2 after the head: fine-tune the last dense block and norm5
    /// (`last`) or every layer (`all`) together with the head.
    #[arg(long, value_enum)]
    unfreeze: Option<UnfreezeArg>,
    /// Most epochs of stage 2 (early stopping with --patience).
    #[arg(long, default_value_t = 5)]
    unfreeze_epochs: usize,
    /// Learning rate of stage 2 (default: --lr / 10).
    #[arg(long)]
    unfreeze_lr: Option<f64>,
    /// `--unfreeze last`: refuse an activation cache (images × C × H × W ×
    /// 4 bytes at the last block's input) above this many GiB.
    #[arg(long, default_value_t = 8.0)]
    max_cache_gib: f64,
    /// Stage-2 checkpoint, written after each stage-2 epoch (default:
    /// <output stem>.checkpoint.safetensors beside the output).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Resume stage 2 from this checkpoint (stage 1 runs again, as it is
    /// deterministic); only --unfreeze-epochs may differ from the run that
    /// wrote it, and the result equals the unbroken run's. A checkpoint made
    /// with other options or images, of another model, or damaged is refused.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// cpu, cuda, cuda:N or emulated: the feature pass and stage 2 (the
    /// frozen part's pass, the training steps, validation) run there, in
    /// f32; stage 1's head trains on the host, on the cached features.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

#[derive(Args, Debug)]
pub struct TuneArgs {
    /// A directory of PNG/TIFF images, or a CSV whose header has an `image`
    /// column (as `screen train`).
    #[arg(long)]
    images: PathBuf,
    /// Labels CSV with `image` and `label` columns (as `screen train`).
    #[arg(long)]
    labels: PathBuf,
    /// The best trial's network (safetensors, torchvision state_dict names).
    #[arg(long)]
    output: PathBuf,
    /// Backbone weights: a torchvision DenseNet state_dict as safetensors
    /// (default: a DenseNet-121 seeded from --seed).
    #[arg(long)]
    init: Option<PathBuf>,
    /// The head searched: Kim et al.'s two layers (lr, weight decay,
    /// dropout, hidden width) or one Linear (lr, weight decay).
    #[arg(long, value_enum, default_value = "kim")]
    head: HeadArg,
    /// Learning rate range LOW..HIGH, searched on a log scale.
    #[arg(long, default_value = "1e-5..1e-1", allow_hyphen_values = true)]
    lr: String,
    /// Weight decay range LOW..HIGH on a log scale; a LOW of 0 searches
    /// --weight-decay-floor..HIGH plus one decade below the floor that
    /// stands for 0 (plain Adam).
    #[arg(long, default_value = "0..1e-2", allow_hyphen_values = true)]
    weight_decay: String,
    /// The smallest non-zero weight decay when --weight-decay starts at 0.
    #[arg(long, default_value_t = 1e-6, allow_hyphen_values = true)]
    weight_decay_floor: f64,
    /// Dropout range LOW..HIGH in [0, 1) (Kim head; default 0..0.7).
    #[arg(long, allow_hyphen_values = true)]
    dropout: Option<String>,
    /// Hidden width range LOW..HIGH, whole numbers, log scale (Kim head;
    /// default 16..256).
    #[arg(long, allow_hyphen_values = true)]
    hidden: Option<String>,
    /// Trials in all (a resumed log's count), at most 1000.
    #[arg(long, default_value_t = 30)]
    trials: usize,
    /// Start no new trial after this many seconds (the trial running then
    /// finishes).
    #[arg(long, allow_hyphen_values = true)]
    time_limit: Option<f64>,
    /// Random trials (a seeded Latin hypercube) before the model-based ones.
    #[arg(long, default_value_t = 8)]
    initial: usize,
    /// Most epochs per trial (early stopping with --patience).
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Images per batch (the feature pass and each optimizer step).
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Stop a trial after this many epochs without a better validation AUC
    /// (0: never).
    #[arg(long, default_value_t = 5)]
    patience: usize,
    /// Seeds the backbone (without --init), the split, each trial's head,
    /// shuffles and dropout (the same for every trial, as `screen train
    /// --seed`), the random trials and the candidates: the same seed gives
    /// the same trials and weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fraction of each class's images held out for validation (one split
    /// for every trial).
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f64,
    /// Class weights of the loss.
    #[arg(long, value_enum, default_value = "balanced")]
    class_weights: ClassWeightsArg,
    /// Normalize inputs with the ImageNet mean and std.
    #[arg(long)]
    imagenet_norm: bool,
    /// Trial log CSV (default: <output stem>.trials.csv beside the output).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Summary JSON (default: <output stem>.tune.json beside the output).
    #[arg(long)]
    summary: Option<PathBuf>,
    /// AUC-by-trial PNG (default: <output stem>.tune.png beside the output).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Continue the search of an existing log (its settings must match;
    /// its trials are read, not rerun).
    #[arg(long)]
    resume: bool,
    /// Start over when the log exists (its trials are lost).
    #[arg(long)]
    force: bool,
    /// cpu, cuda, cuda:N or emulated: the feature pass runs there, in f32;
    /// the trials train heads on the host, on the cached features.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// DenseNet weights (torchvision state_dict names, safetensors).
    #[arg(long)]
    weights: PathBuf,
    /// A directory of PNG/TIFF images, one such image, or a CSV whose header
    /// has an `image` column (paths relative to the CSV).
    #[arg(long)]
    images: PathBuf,
    /// Output CSV: image, status, prob_positive, prediction, mean_v, reason;
    /// the run's settings and timing in leading `#` lines.
    #[arg(long)]
    output: PathBuf,
    /// cpu, cuda, cuda:N or emulated.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Convolution precision: f32 (reference), or bf16/f16 on tensor cores
    /// (operands rounded, f32 accumulation).
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Images per device batch (device memory grows linearly with it).
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Also write each predicted image's pooled features (.csv or .safetensors).
    #[arg(long)]
    features_out: Option<PathBuf>,
    /// Also write a class activation map overlay PNG per predicted image here.
    #[arg(long)]
    cam_dir: Option<PathBuf>,
    /// Also write a saliency map per predicted image into --saliency-dir:
    /// `<stem>.<method>.png` (the map over the gray input) and
    /// `<stem>.<method>.map.png` (the map in [0, 1] as 16-bit gray).
    #[arg(long, value_enum, requires = "saliency_dir")]
    saliency: Option<SaliencyArg>,
    /// Directory of the saliency maps.
    #[arg(long, requires = "saliency")]
    saliency_dir: Option<PathBuf>,
    /// Class the CAM or Grad-CAM++ explains (default: each image's
    /// predicted class).
    #[arg(long, requires = "saliency")]
    saliency_class: Option<usize>,
    /// Positive when the positive-class probability is at least this.
    #[arg(long, default_value_t = 0.5)]
    threshold: f64,
    /// Index of the positive class in the head's output.
    #[arg(long, default_value_t = 1)]
    positive_class: usize,
    /// Normalize inputs with the ImageNet mean and std (torchvision-pretrained backbones).
    #[arg(long)]
    imagenet_norm: bool,
    /// Write into --cam-dir even when it holds files of another run.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// Predictions CSV written by `screen predict`.
    #[arg(long)]
    predictions: PathBuf,
    /// Labels CSV with `image` and `label` columns (1/0, true/false, positive/negative, high/low).
    #[arg(long)]
    labels: PathBuf,
    /// Output report JSON; the ROC curve goes to `<stem>.roc.png` beside it.
    #[arg(long)]
    output: PathBuf,
    /// Positive when the probability is at least this.
    #[arg(long, default_value_t = 0.5)]
    threshold: f64,
}

pub fn run(cmd: ScreenCommand) -> Result<()> {
    match cmd {
        ScreenCommand::Predict(a) => run_predict(a),
        ScreenCommand::Evaluate(a) => run_evaluate(a),
        ScreenCommand::Train(a) => run_train(a),
        ScreenCommand::Tune(a) => run_tune(a),
    }
}

fn run_predict(a: PredictArgs) -> Result<()> {
    let inputs: [(&str, &std::path::Path); 2] =
        [("--weights", &a.weights), ("--images", &a.images)];
    cellmorph::io::check_output_is_not_an_input("--output", &a.output, &inputs)?;
    if let Some(f) = &a.features_out {
        cellmorph::io::check_output_is_not_an_input("--features-out", f, &inputs)?;
        cellmorph::io::check_output_is_not_an_input(
            "--features-out",
            f,
            &[("--output", &a.output)],
        )?;
    }
    let cams = a
        .cam_dir
        .as_deref()
        .map(|d| {
            cellmorph::io::OutputFolder::claim("--cam-dir", d, &super::run_description(), a.force)
        })
        .transpose()?;
    let saliency = match (a.saliency, &a.saliency_dir) {
        (Some(m), Some(dir)) => {
            cellmorph::io::check_output_is_not_an_input("--saliency-dir", dir, &inputs)?;
            let method = match m {
                SaliencyArg::Gradcampp => SaliencyMethod::GradCamPlusPlus,
                SaliencyArg::Visualbackprop => SaliencyMethod::VisualBackProp,
                SaliencyArg::Cam => SaliencyMethod::Cam,
            };
            if a.saliency_class.is_some() && !method.has_class() {
                return Err(Error::invalid(
                    "--saliency-class: VisualBackProp explains no class (use gradcampp or cam)",
                ));
            }
            Some(SaliencyOptions {
                method,
                dir: dir.clone(),
                class: a.saliency_class,
            })
        }
        _ => None,
    };
    // The saliency folder is claimed like --cam-dir (unless it is that folder).
    let saliency_folder = match (&saliency, a.cam_dir.as_deref()) {
        (Some(o), cam) if cam != Some(o.dir.as_path()) => Some(cellmorph::io::OutputFolder::claim(
            "--saliency-dir",
            &o.dir,
            &super::run_description(),
            a.force,
        )?),
        _ => None,
    };
    let be = super::open_device(a.device, a.precision)?;
    let bar = cellmorph::apps::progress_bar(0, "screening");
    let result = screen_images(
        &be,
        &ScreenImagesOptions {
            weights: a.weights,
            images: a.images.clone(),
            output: a.output.clone(),
            features_out: a.features_out,
            cam_dir: a.cam_dir,
            saliency,
            batch_size: a.batch_size,
            threshold: a.threshold,
            positive_class: a.positive_class,
            imagenet_normalize: a.imagenet_norm,
        },
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    );
    bar.finish_and_clear();
    let s = result?;
    for c in [cams, saliency_folder].into_iter().flatten() {
        c.finish()?;
    }
    eprintln!("{}", s.model);
    if !s.ignored.is_empty() {
        eprintln!(
            "ignoring {} files without a .png/.tif/.tiff extension in {}",
            s.ignored.len(),
            a.images.display()
        );
    }
    let run = &s.run;
    let skipped: Vec<_> = run.skipped().collect();
    if !skipped.is_empty() {
        eprintln!(
            "skipped {} of {} images:",
            skipped.len(),
            run.predictions.len()
        );
        for (id, reason) in &skipped {
            eprintln!("  {id}: {reason}");
        }
    }
    let t = &run.timing;
    let positives = run
        .predictions
        .iter()
        .filter(|p| p.outcome.as_ref().is_ok_and(|v| v.positive))
        .count();
    eprintln!(
        "predicted {} images ({positives} positive) in {:.2} s: {:.1} images/s ({:.1} images/s on the device); wrote {}",
        t.images,
        t.total_seconds,
        t.images_per_second(),
        t.inference_images_per_second(),
        a.output.display()
    );
    if let (Some(m), Some(dir)) = (a.saliency, &a.saliency_dir) {
        let written = run
            .predictions
            .iter()
            .filter(|p| p.outcome.as_ref().is_ok_and(|v| v.saliency.is_some()))
            .count();
        eprintln!(
            "wrote {written} {} overlays and maps to {}",
            m.to_possible_value()
                .map_or_else(String::new, |v| v.get_name().to_string()),
            dir.display()
        );
    }
    if t.images == 0 {
        return Err(Error::invalid(format!(
            "no image of {} could be predicted ({} skipped; the reasons are above and in {})",
            a.images.display(),
            run.predictions.len(),
            a.output.display()
        )));
    }
    Ok(())
}

fn run_evaluate(a: EvaluateArgs) -> Result<()> {
    cellmorph::io::check_output_is_not_an_input(
        "--output",
        &a.output,
        &[("--predictions", &a.predictions), ("--labels", &a.labels)],
    )?;
    let s = evaluate_predictions(&EvaluatePredictionsOptions {
        predictions: a.predictions,
        labels: a.labels,
        output: a.output.clone(),
        threshold: a.threshold,
    })?;
    let report = &s.report;
    let show = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.4}"));
    eprintln!(
        "n {} ({} positive): AUC {}, F1 {}, accuracy {}, sensitivity {}, specificity {}, PPV {}, NPV {}",
        report.n,
        report.positives,
        show(report.roc_auc),
        show(report.f1),
        show(report.accuracy),
        show(report.sensitivity),
        show(report.specificity),
        show(report.ppv),
        show(report.npv)
    );
    if !report.labels_without_prediction.is_empty() {
        eprintln!(
            "{} labeled images have no prediction (e.g. {})",
            report.labels_without_prediction.len(),
            report.labels_without_prediction[0]
        );
    }
    eprintln!(
        "wrote {}{}",
        a.output.display(),
        match &s.roc_png {
            Some(roc) => format!(" and {}", roc.display()),
            None => " (no ROC curve: the labels hold a single class)".to_string(),
        }
    );
    Ok(())
}

fn epoch_line(m: &EpochMetrics) -> String {
    format!(
        "epoch {:>3}: train loss {:.4}, val loss {:.4}, val AUC {:.4}, F1 {}, accuracy {:.4}{}",
        m.epoch,
        m.train_loss,
        m.val_loss,
        m.val_auc,
        m.val_f1
            .map_or_else(|| "n/a".to_string(), |v| format!("{v:.4}")),
        m.val_accuracy,
        if m.best { "  *" } else { "" }
    )
}

fn run_train(a: TrainArgs) -> Result<()> {
    if a.unfreeze.is_none()
        && (a.unfreeze_lr.is_some()
            || a.unfreeze_epochs != 5
            || a.checkpoint.is_some()
            || a.resume.is_some())
    {
        return Err(Error::invalid(
            "--unfreeze-epochs, --unfreeze-lr, --checkpoint and --resume need --unfreeze last|all",
        ));
    }
    if !(a.max_cache_gib > 0.0 && a.max_cache_gib.is_finite()) {
        return Err(Error::invalid(format!(
            "--max-cache-gib {}: must be a positive number",
            a.max_cache_gib
        )));
    }
    let fine_tune = a.unfreeze.map(|u| FineTuneOptions {
        unfreeze: match u {
            UnfreezeArg::Last => Unfreeze::Last,
            UnfreezeArg::All => Unfreeze::All,
        },
        epochs: a.unfreeze_epochs,
        lr: a.unfreeze_lr,
        max_cache_bytes: (a.max_cache_gib * f64::from(1u32 << 30)) as u64,
        checkpoint: a.checkpoint.clone(),
        resume: a.resume.clone(),
    });
    let head = match a.head {
        HeadArg::Kim => HeadKind::Kim { hidden: a.hidden },
        HeadArg::Linear => HeadKind::Linear,
    };
    let bar = cellmorph::apps::progress_bar(0, "features");
    let be = super::open_device(a.device, Precision::F32)?;
    let result = screen_train_on(
        &be,
        &ScreenTrainOptions {
            images: a.images,
            labels: a.labels,
            output: a.output.clone(),
            init: a
                .init
                .map_or_else(|| Init::Random(DenseNetArch::densenet121()), Init::File),
            head,
            train: HeadTrainOptions {
                epochs: a.epochs,
                batch_size: a.batch_size,
                lr: a.lr,
                weight_decay: a.weight_decay,
                dropout: a.dropout,
                seed: a.seed,
                patience: a.patience,
                balanced: a.class_weights == ClassWeightsArg::Balanced,
            },
            val_fraction: a.val_fraction,
            imagenet_normalize: a.imagenet_norm,
            metrics: a.metrics,
            plot: a.plot,
            fine_tune,
        },
        |p| match p {
            TrainProgress::Features { done, total } => {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            }
            TrainProgress::Epoch(m) => {
                bar.finish_and_clear();
                println!("{}", epoch_line(&m));
            }
            TrainProgress::Stage2 { cache_bytes } => {
                if cache_bytes > 0 {
                    println!(
                        "stage 2: cached {:.1} MiB of activations at the last block's input",
                        cache_bytes as f64 / f64::from(1u32 << 20)
                    );
                } else {
                    println!("stage 2: every layer unfrozen");
                }
            }
            TrainProgress::Stage2Epoch(m) => println!("stage 2 {}", epoch_line(&m)),
        },
    );
    bar.finish_and_clear();
    let s = result?;
    eprintln!("{}", s.model);
    for (id, reason) in &s.excluded {
        eprintln!("excluded {id}: {reason}");
    }
    if s.unlabeled > 0 {
        eprintln!(
            "{} listed images have no label and were not used",
            s.unlabeled
        );
    }
    let r = &s.result;
    let best = r.best().map_or_else(String::new, |m| {
        format!(": val AUC {:.4}, val loss {:.4}", m.val_auc, m.val_loss)
    });
    eprintln!(
        "{} images ({} train, {} validation); features in {:.2} s, head {} in {:.2} s; {} epochs{}, best epoch {}{best}",
        s.images,
        s.train_images,
        s.val_images,
        s.feature_seconds,
        if s.head_from_init { "(from --init)" } else { "(fresh)" },
        s.train_seconds,
        r.epochs.len(),
        if r.stopped_early { " (stopped early)" } else { "" },
        r.best_epoch
    );
    if let Some(s2) = &s.stage2 {
        eprintln!(
            "stage 2 ({:?}, lr {}): {} epochs{} in {:.2} s; {}",
            s2.unfreeze,
            s2.lr,
            s2.epochs.len(),
            if s2.stopped_early {
                " (stopped early)"
            } else {
                ""
            },
            s2.seconds,
            if s2.improved {
                format!("best epoch {} written", s2.best_epoch)
            } else {
                format!(
                    "no epoch beat stage 1: stage 1's epoch {} written",
                    s2.best_epoch
                )
            }
        );
    }
    eprintln!(
        "wrote {}, {} and {}",
        a.output.display(),
        s.metrics.display(),
        s.plot.display()
    );
    Ok(())
}

fn trial_line(t: &Trial, names: &[String], best: bool) -> String {
    let values: Vec<String> = names
        .iter()
        .zip(&t.values)
        .map(|(n, &v)| match n.as_str() {
            "hidden" => format!("{n} {v}"),
            "dropout" => format!("{n} {v:.3}"),
            _ if v == 0.0 => format!("{n} 0"),
            _ => format!("{n} {v:.3e}"),
        })
        .collect();
    let outcome = match &t.error {
        Some(e) => format!("failed: {e}"),
        None => format!(
            "val AUC {:.4}, F1 {}, accuracy {:.4}, loss {:.4}, best epoch {} of {}",
            t.val_auc,
            t.val_f1
                .map_or_else(|| "n/a".to_string(), |v| format!("{v:.4}")),
            t.val_accuracy,
            t.val_loss,
            t.best_epoch,
            t.epochs
        ),
    };
    format!(
        "trial {:>3} ({:<6}) {}: {outcome} ({:.2} s){}",
        t.trial,
        match t.source {
            cellmorph::apps::screening::tune::Source::Random => "random",
            cellmorph::apps::screening::tune::Source::Model => "model",
        },
        values.join(", "),
        t.seconds,
        if best { "  *" } else { "" }
    )
}

fn run_tune(a: TuneArgs) -> Result<()> {
    let head = match a.head {
        HeadArg::Kim => TuneHead::Kim,
        HeadArg::Linear => TuneHead::Linear,
    };
    if head == TuneHead::Linear && (a.dropout.is_some() || a.hidden.is_some()) {
        return Err(Error::invalid(
            "--dropout and --hidden are searched for the Kim head only (--head linear has neither)",
        ));
    }
    let defaults = SearchBounds::default();
    let bounds = SearchBounds {
        lr: parse_range("--lr", &a.lr)?,
        weight_decay: parse_range("--weight-decay", &a.weight_decay)?,
        weight_decay_floor: a.weight_decay_floor,
        dropout: match &a.dropout {
            Some(t) => parse_range("--dropout", t)?,
            None => defaults.dropout,
        },
        hidden: match &a.hidden {
            Some(t) => parse_range("--hidden", t)?,
            None => defaults.hidden,
        },
    };
    let names: Vec<String> = match head {
        TuneHead::Kim => vec!["lr", "weight_decay", "dropout", "hidden"],
        TuneHead::Linear => vec!["lr", "weight_decay"],
    }
    .into_iter()
    .map(String::from)
    .collect();
    let bar = cellmorph::apps::progress_bar(0, "features");
    let be = super::open_device(a.device, Precision::F32)?;
    let result = screen_tune_on(
        &be,
        &TuneOptions {
            images: a.images,
            labels: a.labels,
            output: a.output.clone(),
            init: a
                .init
                .map_or_else(|| Init::Random(DenseNetArch::densenet121()), Init::File),
            head,
            bounds,
            train: HeadTrainOptions {
                epochs: a.epochs,
                batch_size: a.batch_size,
                seed: a.seed,
                patience: a.patience,
                balanced: a.class_weights == ClassWeightsArg::Balanced,
                ..HeadTrainOptions::default()
            },
            val_fraction: a.val_fraction,
            imagenet_normalize: a.imagenet_norm,
            trials: a.trials,
            time_limit: a.time_limit,
            initial: a.initial,
            log: a.log,
            summary: a.summary,
            plot: a.plot,
            resume: a.resume,
            force: a.force,
        },
        |p| match p {
            TuneProgress::Features { done, total } => {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            }
            TuneProgress::Resumed(n) => {
                bar.finish_and_clear();
                println!("resumed after {n} logged trials");
            }
            TuneProgress::Trial(t, best) => {
                bar.finish_and_clear();
                println!("{}", trial_line(&t, &names, best));
            }
        },
    );
    bar.finish_and_clear();
    let s = result?;
    for (id, reason) in &s.excluded {
        eprintln!("excluded {id}: {reason}");
    }
    eprintln!(
        "{} images ({} train, {} validation), features once in {:.2} s; {} trials ({} read from the log){}",
        s.settings.images,
        s.train_images,
        s.val_images,
        s.feature_seconds,
        s.trials.len(),
        s.resumed,
        match s.stopped {
            Stop::Trials => "",
            Stop::TimeLimit => ", stopped by --time-limit",
        }
    );
    match &s.best {
        Some(b) => eprintln!(
            "best: {}{}",
            trial_line(b, &names, false),
            if s.retrained_best {
                " (trained again: the output did not hold it)"
            } else {
                ""
            }
        ),
        None if s.trials.is_empty() => {
            return Err(Error::invalid(format!(
                "no trial ran: --time-limit passed before the first one (the feature pass took {:.1} s); no weights were written",
                s.feature_seconds
            )))
        }
        None => {
            return Err(Error::invalid(format!(
                "every trial failed (see {}); no weights were written",
                s.log.display()
            )))
        }
    }
    eprintln!(
        "wrote {}, {}, {}{}",
        s.output.display(),
        s.log.display(),
        s.summary.display(),
        s.plot
            .as_ref()
            .map_or_else(String::new, |p| format!(" and {}", p.display()))
    );
    Ok(())
}
