//! The three applications, one folder each, built on the models
//! ([`crate::models`]), the ops and the SVR:
//!
//! - [`expression`]: expression from morphology (Wakui et al. 2023) —
//!   images → VQ-VAE-2 code-frequency profiles → per-gene SVR → evaluation
//!   and patch-wise maps; the demo on synthetic data with known truth.
//! - [`screening`]: stem-cell line screening with DenseNet (Kim et al.
//!   2022) — pre-processing, prediction, class activation maps, metrics.
//! - [`cp2image`]: single-cell images from CellProfiler features (Ji et
//!   al.) — standardization, generation, feature manipulation and
//!   interpolation, contact sheets.
//!
//! Each folder's `mod.rs` says what the application is and lists its files.
//!
//! # One library function per command
//!
//! Every `cellmorph` command is one function here, taking a plain options
//! struct and returning what it did; `src/cli/` only parses the arguments,
//! opens the device the command names (`Backend::new(device)?.with_precision(p)`,
//! passed as `be`), calls the function and prints.
//!
//! | command | library function |
//! | --- | --- |
//! | `demo` | [`expression::demo::run_demo`]`(be, &DemoConfig, dir)` |
//! | `synth` | [`expression::synth::generate`]`(&SynthConfig, dir)` |
//! | `profile` | [`expression::profile::profile_files`]`(be, &ProfileFilesOptions)` |
//! | `expression prepare` | [`expression::prepare::prepare_counts`]`(&PrepareCountsOptions)` |
//! | `expression evaluate` | [`expression::evaluate::evaluate_gene_models`]`(&EvaluateGeneModelsOptions)` |
//! | `map` | [`expression::map::map_image`]`(be, &MapImageOptions)` |
//! | `svr grid` | [`expression::gene_models::fit_gene_models`]`(be, &FitGeneModelsOptions)` |
//! | `tsne` | [`expression::tsne::tsne_file`]`(&TsneFileOptions)` |
//! | `cluster` | [`expression::cluster::cluster_file`]`(&ClusterFileOptions)` |
//! | `svr predict` | [`expression::gene_models::predict_expression`]`(&PredictExpressionOptions)` |
//! | `svm grid` | [`expression::categories::fit_categories`]`(&Backend, &FitCategoriesOptions)` |
//! | `svm predict` | [`expression::categories::predict_categories`]`(&PredictCategoriesOptions)` |
//! | `screen predict` | [`screening::predict::screen_images`]`(be, &ScreenImagesOptions, progress)` |
//! | `screen evaluate` | [`screening::report::evaluate_predictions`]`(&EvaluatePredictionsOptions)` |
//! | `screen train` | [`screening::train::screen_train`]`(&ScreenTrainOptions, progress)` |
//! | `cp2image generate` | [`cp2image::figures::generate_images`]`(be, &GenerateOptions)` |
//! | `cp2image manipulate` | [`cp2image::figures::manipulate_feature`]`(be, &ManipulateOptions)` |
//! | `cp2image interpolate` | [`cp2image::figures::interpolate`]`(be, &InterpolateOptions)` |
//! | `cp2image standardize` | [`cp2image::features::standardize`]`(&StandardizeOptions)` |
//! | `cp2image init-weights` | [`cp2image::generator::init_weights`]`(&InitWeightsOptions)` |
//!
//! The commands that are not applications call the layers below directly:
//! `infer` runs one model's `infer` function
//! ([`crate::models::vqvae2::infer`], [`crate::models::densenet::infer`],
//! [`crate::models::cp2image::infer_generator`],
//! [`crate::models::cp2image::infer_discriminator`]), `devices` lists what
//! [`crate::backend`] offers, and `bench` (the kernel timing harness) lives
//! in `src/cli/bench.rs`.

pub mod cp2image;
pub mod expression;
pub mod screening;

/// A progress bar on stderr with the message `what` (indicatif hides it
/// when stderr is not a terminal, so logs stay clean); every long command
/// uses this one style.
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}
