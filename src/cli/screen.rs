//! `cellmorph screen predict`, `screen evaluate` and `screen train`: the
//! stem-cell line screening of Kim et al. 2022 ([reference](crate::reference) §2).

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use cellmorph::apps::screening::predict::{screen_images, SaliencyOptions, ScreenImagesOptions};
use cellmorph::apps::screening::report::{evaluate_predictions, EvaluatePredictionsOptions};
use cellmorph::apps::screening::saliency::SaliencyMethod;
use cellmorph::apps::screening::train::{
    screen_train, EpochMetrics, FineTuneOptions, HeadKind, HeadTrainOptions, Init,
    ScreenTrainOptions, TrainProgress, Unfreeze,
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
    /// Training runs on the CPU so far; other devices are refused.
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
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message("screening");
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
    if a.device != Device::Cpu {
        return Err(Error::invalid(format!(
            "--device {}: screen train runs on the CPU so far (use --device cpu; predict with the trained weights on any device)",
            a.device
        )));
    }
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
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message("features");
    let result = screen_train(
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
