//! Command-line interface: one file per command family.

mod analysis;
mod bench;
mod cp2image;
mod demo;
mod devices;
mod expression;
mod infer;
mod screen;
mod svm;
mod svr;
mod train;
mod vqvae2;

use clap::{Parser, Subcommand};

use cellmorph::{Backend, Device, Precision, Result};

/// Label-free cell imaging with hand-written CUDA kernels and a CPU reference path.
#[derive(Parser, Debug)]
#[command(name = "cellmorph", version, about, long_about = None)]
pub struct Cli {
    /// Largest image, in pixels, any command decodes (default 2²⁷ ≈ 134
    /// million, about 1.3 GB to decode; overrides CELLMORPH_MAX_PIXELS).
    /// Larger images are refused from their header.
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_pixels: Option<u64>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The main job: the whole expression-from-morphology pipeline on a
    /// generated data set with known truth, on the CPU by default.
    Demo(demo::DemoArgs),
    /// Write a synthetic phase-contrast data set with known truth.
    Synth(demo::SynthArgs),
    /// Images → VQ-VAE-2 code-frequency profiles per sample.
    Profile(expression::ProfileArgs),
    /// Expression tables: preparation and Table-3 evaluation.
    #[command(subcommand)]
    Expression(expression::ExpressionCommand),
    /// Patch-wise expression map of one image as a heat-map PNG.
    Map(expression::MapArgs),
    /// Show which devices this build and machine can use.
    Devices,
    /// Run a model on the tensor named `input` of a safetensors file.
    Infer(infer::InferArgs),
    /// CP2Image: single-cell images from CellProfiler features (generate,
    /// manipulate, interpolate).
    #[command(subcommand, name = "cp2image")]
    Cp2Image(cp2image::Cp2ImageCommand),
    /// Per-gene linear SVR: grid search and prediction.
    #[command(subcommand)]
    Svr(svr::SvrCommand),
    /// Sample categories with an RBF SVM: grid search, prediction.
    #[command(subcommand)]
    Svm(svm::SvmCommand),
    /// Stem-cell line screening with DenseNet (Kim et al. 2022): predict, evaluate.
    #[command(subcommand)]
    Screen(screen::ScreenCommand),
    /// Time one workload (model forward or single op) for kernel benchmarking; JSON on stdout.
    Bench(bench::BenchArgs),
    /// One training step (CPU): state after the step, gradients and losses.
    TrainStep(train::TrainStepArgs),
    /// VQ-VAE-2 weights from images: init (k-means++ codebooks), train.
    #[command(subcommand, name = "vqvae2")]
    Vqvae2(vqvae2::Vqvae2Command),
    /// Exact t-SNE of a feature table (as scikit-learn's), coordinates as
    /// CSV and a scatter plot coloured by a column.
    Tsne(analysis::TsneArgs),
    /// Ward clustering of the samples (or feature columns) of a table (as
    /// SciPy's), k flat clusters, linkage, dendrogram + heat map.
    Cluster(analysis::ClusterArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.max_pixels {
        cellmorph::imaging::set_max_pixels(n)?;
    }
    match cli.command {
        Command::Demo(a) => demo::demo(a),
        Command::Synth(a) => demo::synth(a),
        Command::Profile(a) => expression::profile(a),
        Command::Expression(c) => expression::run(c),
        Command::Map(a) => expression::map(a),
        Command::Devices => devices::run(),
        Command::Infer(a) => infer::run(a),
        Command::Cp2Image(c) => cp2image::run(c),
        Command::Svr(c) => svr::run(c),
        Command::Svm(c) => svm::run(c),
        Command::Screen(c) => screen::run(c),
        Command::Bench(a) => bench::run(a),
        Command::TrainStep(a) => train::run(a),
        Command::Vqvae2(c) => vqvae2::run(c),
        Command::Tsne(a) => analysis::tsne(a),
        Command::Cluster(a) => analysis::cluster(a),
    }
}

/// The command line as given, without `--force`: the run description that
/// [`cellmorph::io::OutputFolder`] records in an output folder, so the
/// same command repeated (resumed) into its folder is recognised.
pub(crate) fn run_description() -> String {
    std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .filter(|a| a != "--force")
        .collect::<Vec<_>>()
        .join(" ")
}

/// Opens the device named on the command line, saying which one was opened.
pub(crate) fn open_device(device: Device, precision: Precision) -> Result<Backend> {
    let be = Backend::new(device)?.with_precision(precision);
    if precision.is_reduced() {
        eprintln!("device: {} (convolutions in {precision})", be.describe());
    } else {
        eprintln!("device: {}", be.describe());
    }
    Ok(be)
}
