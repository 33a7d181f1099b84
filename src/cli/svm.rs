//! `cellmorph svm grid` and `cellmorph svm predict`.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use cellmorph::apps::expression::categories::{
    fit_categories, predict_categories, CvScheme, FitCategoriesOptions, PredictCategoriesOptions,
};
use cellmorph::svm::{Confusion, Gamma, SvmGridSpec};
use cellmorph::svr::parse_list;
use cellmorph::{Device, Error, Result};

#[derive(Subcommand, Debug)]
pub enum SvmCommand {
    /// RBF SVM classification of sample categories with a cross-validated
    /// grid search over (C, gamma), as scikit-learn's GridSearchCV(SVC(),
    /// cv=StratifiedKFold(K)); refits the best setting on every sample.
    Grid(GridArgs),
    /// Predict categories from a feature table with a fitted model.
    Predict(PredictArgs),
}

#[derive(Args, Debug)]
pub struct GridArgs {
    /// Feature table CSV: sample, then one column per feature (e.g. a profile CSV).
    #[arg(long)]
    features: PathBuf,
    /// Labels CSV: a `sample` column and the label column (strings). Its row
    /// order is the sample order of the folds.
    #[arg(long)]
    labels: PathBuf,
    /// Column of --labels holding the category.
    #[arg(long, default_value = "label")]
    label_column: String,
    /// C values: comma-separated, or start:stop:step with the stop inclusive.
    #[arg(long, default_value = "0.1,1,10,100")]
    c: String,
    /// gamma values, comma-separated; `scale` is 1 / (n_features · X.var())
    /// of each training set, as scikit-learn.
    #[arg(long, default_value = "scale")]
    gamma: String,
    /// Folds. Default scheme: scikit-learn's StratifiedKFold(K) without
    /// shuffling (what GridSearchCV uses for a classifier); every class
    /// needs at least K samples.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Contiguous KFold(K) blocks in label-file order instead of stratified folds.
    #[arg(long, conflicts_with = "shuffle")]
    contiguous: bool,
    /// Shuffle, then contiguous KFold(K) blocks: a Fisher-Yates permutation
    /// from cellmorph's SplitMix64 seeded with --seed (deterministic, NOT
    /// scikit-learn's KFold(shuffle=True) permutation).
    #[arg(long)]
    shuffle: bool,
    /// Seed of --shuffle.
    #[arg(long, default_value_t = 0, requires = "shuffle")]
    seed: u64,
    /// Output model JSON.
    #[arg(long)]
    output: PathBuf,
    /// Out-of-fold confusion matrix CSV (best setting).
    #[arg(long)]
    confusion: Option<PathBuf>,
    /// Out-of-fold confusion matrix as a PNG heat map.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Out-of-fold predictions CSV: sample, label, predicted, fold.
    #[arg(long)]
    predictions: Option<PathBuf>,
    /// Where the SMO solves run: cpu, cuda, cuda:N or emulated (same
    /// results on each; kernel devices batch every pair of every fold and
    /// setting). Predictions are computed on the CPU.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Model JSON written by `svm grid`.
    #[arg(long)]
    model: PathBuf,
    /// Feature table CSV with the model's feature columns.
    #[arg(long)]
    features: PathBuf,
    /// Output CSV: sample, predicted (, label), one-vs-one decision values.
    #[arg(long)]
    output: PathBuf,
    /// Labels CSV (`sample` + the label column) to score the predictions;
    /// only its samples are predicted.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Column of --labels holding the category.
    #[arg(long, default_value = "label")]
    label_column: String,
}

pub fn run(cmd: SvmCommand) -> Result<()> {
    match cmd {
        SvmCommand::Grid(a) => grid(a),
        SvmCommand::Predict(a) => predict(a),
    }
}

fn check_outputs(outputs: &[(&str, &Path)], inputs: &[(&str, &Path)]) -> Result<()> {
    for (i, (flag, out)) in outputs.iter().enumerate() {
        cellmorph::io::check_output_is_not_an_input(flag, out, inputs)?;
        for (other_flag, other) in &outputs[..i] {
            if std::path::absolute(out).ok() == std::path::absolute(other).ok() {
                return Err(Error::invalid(format!(
                    "{flag} {} is also {other_flag}; give them different paths",
                    out.display()
                )));
            }
        }
    }
    Ok(())
}

fn print_confusion(c: &Confusion) {
    let width = c
        .classes
        .iter()
        .map(|s| s.chars().count())
        .max()
        .unwrap_or(5)
        .max(9);
    println!(
        "{:<width$} {:>9} {:>9} {:>7}",
        "class", "precision", "recall", "n"
    );
    let k = c.classes.len();
    for (i, name) in c.classes.iter().enumerate() {
        let n: usize = c.counts[i * k..(i + 1) * k].iter().sum();
        println!(
            "{:<width$} {:>9.4} {:>9.4} {:>7}",
            name,
            c.precision(i),
            c.recall(i),
            n
        );
    }
    println!("accuracy {:.4} ({} samples)", c.accuracy(), c.total());
}

fn grid(a: GridArgs) -> Result<()> {
    let mut outputs: Vec<(&str, &Path)> = vec![("--output", &a.output)];
    for (flag, p) in [
        ("--confusion", &a.confusion),
        ("--plot", &a.plot),
        ("--predictions", &a.predictions),
    ] {
        if let Some(p) = p {
            outputs.push((flag, p));
        }
    }
    check_outputs(
        &outputs,
        &[("--features", &a.features), ("--labels", &a.labels)],
    )?;
    let grid = SvmGridSpec::new(parse_list(&a.c)?, Gamma::parse_list(&a.gamma)?);
    let scheme = if a.shuffle {
        CvScheme::Shuffled { seed: a.seed }
    } else if a.contiguous {
        CvScheme::KFold
    } else {
        CvScheme::Stratified
    };
    let be = super::open_device(a.device, cellmorph::Precision::F32)?;
    let s = fit_categories(
        &be,
        &FitCategoriesOptions {
            features: a.features,
            labels: a.labels,
            label_column: a.label_column,
            grid: grid.clone(),
            folds: a.folds,
            scheme,
            output: a.output.clone(),
            confusion: a.confusion.clone(),
            plot: a.plot.clone(),
            predictions: a.predictions.clone(),
        },
    )?;
    eprintln!(
        "svm grid: {} samples × {} features, {} classes; {} settings ({} C × {} gamma) × {}; {:.2} s",
        s.samples,
        s.features,
        s.confusion.classes.len(),
        grid.settings().len(),
        grid.c.len(),
        grid.gamma.len(),
        s.scheme,
        s.seconds
    );
    if s.unlabelled > 0 {
        eprintln!(
            "{} feature rows without a label were not used",
            s.unlabelled
        );
    }
    println!("{:>10} {:>10} {:>10}", "C", "gamma", "cv_acc");
    for (i, sc) in s.outcome.scores.iter().enumerate() {
        let mark = if i == s.outcome.best { " *" } else { "" };
        println!(
            "{:>10} {:>10} {:>10.4}{mark}",
            sc.c,
            sc.gamma.to_string(),
            sc.mean_accuracy
        );
    }
    let best = &s.outcome.scores[s.outcome.best];
    println!(
        "best: C = {}, gamma = {} (γ = {:.6} on all samples), mean cv accuracy {:.4}",
        best.c, best.gamma, s.gamma, best.mean_accuracy
    );
    println!("out-of-fold ({}), best setting:", s.scheme);
    print_confusion(&s.confusion);
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
    eprintln!("model -> {}", a.output.display());
    for (flag, p) in &outputs[1..] {
        eprintln!("{} -> {}", flag.trim_start_matches('-'), p.display());
    }
    Ok(())
}

fn predict(a: PredictArgs) -> Result<()> {
    let mut inputs: Vec<(&str, &Path)> = vec![("--model", &a.model), ("--features", &a.features)];
    if let Some(l) = &a.labels {
        inputs.push(("--labels", l));
    }
    cellmorph::io::check_output_is_not_an_input("--output", &a.output, &inputs)?;
    let (n, confusion) = predict_categories(&PredictCategoriesOptions {
        model: a.model,
        features: a.features,
        output: a.output.clone(),
        labels: a.labels.map(|l| (l, a.label_column)),
    })?;
    if let Some(c) = &confusion {
        print_confusion(c);
    }
    eprintln!("{n} samples -> {}", a.output.display());
    Ok(())
}
