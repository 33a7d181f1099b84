//! `cellmorph screen predict` and `cellmorph screen evaluate`: the
//! stem-cell line screening of Kim et al. 2022 (MODELS.md §2).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use cellmorph::apps::screening::files::{
    read_labels, read_predictions, write_features, write_predictions,
};
use cellmorph::apps::screening::images::list_images;
use cellmorph::apps::screening::predict::{predict, PredictOptions};
use cellmorph::apps::screening::preprocess::Preprocess;
use cellmorph::apps::screening::report::{evaluate, write_report, write_roc_png};
use cellmorph::io::TensorFile;
use cellmorph::models::densenet::DenseNet;
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
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// DenseNet weights (torchvision state_dict names, safetensors).
    #[arg(long)]
    weights: PathBuf,
    /// A directory of PNG/TIFF images, or a CSV whose header has an `image`
    /// column (paths relative to the CSV).
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
    /// Positive when the positive-class probability is at least this.
    #[arg(long, default_value_t = 0.5)]
    threshold: f64,
    /// Index of the positive class in the head's output.
    #[arg(long, default_value_t = 1)]
    positive_class: usize,
    /// Normalize inputs with the ImageNet mean and std (torchvision-pretrained backbones).
    #[arg(long)]
    imagenet_norm: bool,
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
    }
}

fn run_predict(a: PredictArgs) -> Result<()> {
    if a.batch_size == 0 {
        return Err(Error::invalid("--batch-size must be at least 1"));
    }
    let be = super::open_device(a.device, a.precision)?;
    let file = TensorFile::open(&a.weights)?;
    let model = DenseNet::load(&be, &file)?;
    eprintln!("{}", model.config());
    let list = list_images(&a.images)?;
    if !list.ignored.is_empty() {
        eprintln!(
            "ignoring {} files without a .png/.tif/.tiff extension in {}",
            list.ignored.len(),
            a.images.display()
        );
    }
    let options = PredictOptions {
        batch_size: a.batch_size,
        preprocess: Preprocess {
            channels: model.config().in_channels,
            imagenet_normalize: a.imagenet_norm,
            ..Preprocess::default()
        },
        threshold: a.threshold,
        positive_class: a.positive_class,
        keep_features: a.features_out.is_some(),
        cam_dir: a.cam_dir.clone(),
    };
    let bar = indicatif::ProgressBar::new(list.entries.len() as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message("screening");
    let result = predict(&be, &model, &list.entries, &options, |done| {
        bar.set_position(done as u64)
    });
    bar.finish_and_clear();
    let run = result?;
    write_predictions(&a.output, &run, &a.weights.display().to_string())?;
    if let Some(path) = &a.features_out {
        write_features(path, &run)?;
    }
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
    Ok(())
}

fn run_evaluate(a: EvaluateArgs) -> Result<()> {
    let preds = read_predictions(&a.predictions)?;
    let labels = read_labels(&a.labels)?;
    let report = evaluate(&preds, &labels, a.threshold)?;
    write_report(&a.output, &report)?;
    let roc = a.output.with_extension("roc.png");
    if let Some(curve) = &report.roc_curve {
        write_roc_png(&roc, curve, report.roc_auc)?;
    }
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
        if report.roc_curve.is_some() {
            format!(" and {}", roc.display())
        } else {
            " (no ROC curve: the labels hold a single class)".to_string()
        }
    );
    Ok(())
}
