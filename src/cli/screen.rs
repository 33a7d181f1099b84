//! `cellmorph screen predict` and `cellmorph screen evaluate`: the
//! stem-cell line screening of Kim et al. 2022 ([reference](crate::reference) §2).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use cellmorph::apps::screening::predict::{screen_images, ScreenImagesOptions};
use cellmorph::apps::screening::report::{evaluate_predictions, EvaluatePredictionsOptions};
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
