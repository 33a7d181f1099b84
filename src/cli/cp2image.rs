//! `cellmorph cp2image`: single-cell images from CellProfiler features —
//! generate, manipulate one feature, interpolate between cells or group
//! means, and the helpers that make the inputs (standardization file,
//! seeded random generator weights).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use cellmorph::apps::cp2image::features::{
    standardize, NanPolicy, StandardizeOptions, Standardizer,
};
use cellmorph::apps::cp2image::figures::{
    generate_images, interpolate, manipulate_feature, DisplayOptions, GenerateOptions,
    GeneratedOutput, InterpolateEnds, InterpolateOptions, ManipulateBase, ManipulateOptions,
};
use cellmorph::apps::cp2image::generator::{
    init_weights, GeneratorInfo, GeneratorOptions, InitWeightsOptions,
};
use cellmorph::{Device, Error, Precision, Result};

use super::open_device;

#[derive(Subcommand, Debug)]
pub enum Cp2ImageCommand {
    /// Generate one image per feature row: a PNG per row in a directory, or
    /// one contact sheet (an --output ending in .png).
    Generate(GenerateArgs),
    /// Vary one feature over a range with the others fixed and draw the row
    /// of images (the paper's Figure 4c).
    Manipulate(ManipulateArgs),
    /// Interpolate from one cell's features to another's, replacing the most
    /// different features first (Figure 5a), or along the straight line
    /// between two group means (--group-means, Figure 5c).
    Interpolate(InterpolateArgs),
    /// Write the per-feature mean/std file the generator's inputs are
    /// standardized with.
    Standardize(StandardizeArgs),
    /// Write a generator with seeded random (untrained) weights, for
    /// examples and benchmarks where no trained generator exists.
    InitWeights(InitWeightsArgs),
    /// Train the GAN (generator + spectral-norm discriminator) on a feature
    /// table and the real crops it describes (CPU).
    Train(TrainArgs),
    /// Evaluate a generator on the cells `train` held out: pixel MSE and
    /// SSIM against the mean-training-image and nearest-training-cell
    /// baselines, and the fidelity of simple measurements; JSON report.
    Evaluate(EvaluateArgs),
}

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The feature CSV the generator was trained on.
    #[arg(long)]
    features: PathBuf,
    /// The crops (safetensors tensor `crops`).
    #[arg(long)]
    crops: PathBuf,
    /// `id,split` CSV [default: <weights stem>.split.csv beside the weights,
    /// as `cp2image train` writes it].
    #[arg(long)]
    split: Option<PathBuf>,
    /// Output report (JSON).
    #[arg(long)]
    output: PathBuf,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Feature CSV: one row per cell, the first column the cell's index in
    /// the crop file (cell_id); metadata columns are skipped.
    #[arg(long)]
    features: PathBuf,
    /// Missing feature values (empty, nan, NA): refuse, drop-column (leave
    /// out every feature with one; the generator gets fewer inputs), or
    /// impute (the column's median over all rows).
    #[arg(long, default_value = "refuse")]
    nan: NanPolicy,
    /// Crops: a safetensors file with an integer tensor `crops` [N, C, 64, 64]
    /// (0 … 255), e.g. single_cells/cells.safetensors; C (1 or 3) sets the
    /// generator's output channels.
    #[arg(long)]
    crops: PathBuf,
    /// Output generator weights; the discriminator, the standardization
    /// file, metrics CSV, curves PNG, sheet PNG and checkpoint are written
    /// beside it (`<stem>.discriminator.safetensors`, `<stem>.standardize.json`,
    /// `<stem>.metrics.csv`, `<stem>.curves.png`, `<stem>.sheet.png`,
    /// `<stem>.checkpoint.safetensors`).
    #[arg(long)]
    output: PathBuf,
    /// Continue from a checkpoint of an earlier run with the same data and
    /// options (only --epochs may change); equals the unbroken run. A
    /// checkpoint made with other options or data, of another model, or
    /// damaged is refused.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Passes over the training cells.
    #[arg(long, default_value_t = 10)]
    epochs: u64,
    /// Cells per step (at least 2).
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Adam's learning rate (both networks).
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Adam's betas.
    #[arg(long, default_value = "0.5,0.999", value_parser = super::train::parse_betas)]
    betas: (f64, f64),
    /// Seed of the weights, the split and the batch orders.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fraction of the cells held out for the per-epoch evaluation and sheet.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Generator channels c0 … c4.
    #[arg(long, value_delimiter = ',', default_values_t = [256usize, 128, 64, 32, 16])]
    generator_channels: Vec<usize>,
    /// Discriminator block channels.
    #[arg(long, value_delimiter = ',', default_values_t = [32usize, 64, 128, 256, 256])]
    discriminator_channels: Vec<usize>,
    /// Weight of the generator's pixel MSE to the real cell.
    #[arg(long, default_value_t = 1.0)]
    mse_weight: f32,
    /// Weight of the matching of the discriminator's hidden features.
    #[arg(long, default_value_t = 1.0)]
    feature_matching_weight: f32,
    /// Weight of the adversarial term −mean log D(G(z)) (0: the objective of
    /// docs/MODELS.md, MSE plus feature matching).
    #[arg(long, default_value_t = 0.0)]
    adversarial_weight: f32,
    /// cpu, cuda, cuda:N or emulated (training runs in f32; a device run
    /// matches the CPU's within rounding, not bit for bit).
    #[arg(long, default_value = "cpu")]
    device: Device,
}

/// The generator and how to run it.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// Generator weights (safetensors, PyTorch state_dict names).
    #[arg(long)]
    weights: PathBuf,
    /// Standardization file [default: <weights stem>.standardize.json beside the weights].
    #[arg(long)]
    standardize: Option<PathBuf>,
    /// cpu, cuda, cuda:N or emulated.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Convolution precision: f32 (reference), or bf16/f16 on tensor cores
    /// (operands rounded, f32 accumulation).
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Images per device batch.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Missing feature values (empty, nan, NA): refuse, or impute (the
    /// feature's training mean, i.e. a standardized 0).
    #[arg(long, default_value = "refuse")]
    nan: NanPolicy,
}

/// Real crops to show beside the generated images, and the display size.
#[derive(Args, Debug)]
pub struct DisplayArgs {
    /// Real crops (safetensors with tensor `crops` u8 [N, C, S, S]; the
    /// feature table's first column is the crop index), e.g. the
    /// single-cell set's cells.safetensors (tests/data/single_cells).
    #[arg(long)]
    crops: Option<PathBuf>,
    /// Magnification of the tiles in contact sheets.
    #[arg(long, default_value_t = 2)]
    zoom: usize,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Feature table (CSV, one row per cell; first column the row id).
    #[arg(long)]
    features: PathBuf,
    /// A directory (one <row id>.png per row) or a contact sheet (*.png).
    #[arg(long)]
    output: PathBuf,
    /// Only these rows (ids from the first column, comma-separated).
    #[arg(long, value_delimiter = ',')]
    rows: Vec<String>,
    /// At most this many rows (the first ones, after --rows).
    #[arg(long)]
    limit: Option<usize>,
    /// Cells per sheet row.
    #[arg(long, default_value_t = 8)]
    columns: usize,
    #[command(flatten)]
    display: DisplayArgs,
    /// Write into an --output folder even when it holds files of another run.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct ManipulateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Feature table (CSV, one row per cell; first column the row id);
    /// needed with --row.
    #[arg(long)]
    features: Option<PathBuf>,
    /// The feature to vary, by name or 0-based index.
    #[arg(long)]
    feature: String,
    /// The cell whose other features stay fixed [default: the mean cell,
    /// all features 0 SD].
    #[arg(long, requires = "features")]
    row: Option<String>,
    /// First value, in standard deviations from the feature's mean.
    #[arg(long, default_value_t = -3.0, allow_negative_numbers = true)]
    from: f64,
    /// Last value, in standard deviations from the feature's mean.
    #[arg(long, default_value_t = 3.0, allow_negative_numbers = true)]
    to: f64,
    /// Number of images.
    #[arg(long, default_value_t = 7)]
    steps: usize,
    /// Contact sheet to write (*.png).
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    display: DisplayArgs,
}

#[derive(Args, Debug)]
pub struct InterpolateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Feature table (CSV, one row per cell; first column the row id).
    #[arg(long)]
    features: PathBuf,
    /// Start cell (row id).
    #[arg(long, required_unless_present = "group_means")]
    from_row: Option<String>,
    /// Target cell (row id).
    #[arg(long, required_unless_present = "group_means")]
    to_row: Option<String>,
    /// Features replaced per step, most different first (the paper used 50).
    #[arg(long, default_value_t = 50)]
    per_step: usize,
    /// Interpolate on the straight line between two group means instead.
    #[arg(long, conflicts_with_all = ["from_row", "to_row"], requires_all = ["from_group", "to_group"])]
    group_means: bool,
    /// The non-feature column that defines the groups.
    #[arg(long, default_value = "field")]
    group_column: String,
    /// Start group (a value of --group-column).
    #[arg(long)]
    from_group: Option<String>,
    /// Target group (a value of --group-column).
    #[arg(long)]
    to_group: Option<String>,
    /// Images on the line between group means, ends included.
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Contact sheet to write (*.png).
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    display: DisplayArgs,
}

#[derive(Args, Debug)]
pub struct StandardizeArgs {
    /// Feature table (CSV, one row per cell; first column the row id).
    #[arg(long)]
    features: PathBuf,
    /// Only these features (a file with one name per line, e.g.
    /// feature_names.txt) [default: every column but the first and field,
    /// centroid_y, centroid_x].
    #[arg(long)]
    feature_names: Option<PathBuf>,
    /// Missing feature values (empty, nan, NA): refuse, drop-column (leave
    /// out every feature with one), or impute (the column's median).
    #[arg(long, default_value = "refuse")]
    nan: NanPolicy,
    /// Where to write the JSON.
    #[arg(long, required_unless_present = "weights")]
    output: Option<PathBuf>,
    /// Write <weights stem>.standardize.json beside these weights instead.
    #[arg(long, conflicts_with = "output")]
    weights: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct InitWeightsArgs {
    /// Number of input features p (405 for the ExampleFly single cells).
    #[arg(long)]
    features: usize,
    /// Output weights (safetensors).
    #[arg(long)]
    output: PathBuf,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Channels c0,…,cB (the paper's by default).
    #[arg(long, value_delimiter = ',', default_values_t = [256usize, 128, 64, 32, 16])]
    channels: Vec<usize>,
}

pub fn run(cmd: Cp2ImageCommand) -> Result<()> {
    match cmd {
        Cp2ImageCommand::Generate(a) => run_generate(a),
        Cp2ImageCommand::Manipulate(a) => run_manipulate(a),
        Cp2ImageCommand::Interpolate(a) => run_interpolate(a),
        Cp2ImageCommand::Standardize(a) => run_standardize(a),
        Cp2ImageCommand::InitWeights(a) => run_init_weights(a),
        Cp2ImageCommand::Train(a) => run_train(a),
        Cp2ImageCommand::Evaluate(a) => run_evaluate(a),
    }
}

impl ModelArgs {
    fn options(&self) -> GeneratorOptions {
        GeneratorOptions {
            weights: self.weights.clone(),
            standardize: self.standardize.clone(),
            batch_size: self.batch_size,
            nan: self.nan,
        }
    }
}

impl ModelArgs {
    /// The files this generator reads, by flag.
    fn inputs(&self) -> Vec<(&'static str, &std::path::Path)> {
        let mut v = vec![("--weights", self.weights.as_path())];
        if let Some(s) = &self.standardize {
            v.push(("--standardize", s.as_path()));
        }
        v
    }
}

impl DisplayArgs {
    /// Adds the files shown beside the generated images to `inputs`.
    fn inputs<'a>(&'a self, inputs: &mut Vec<(&'static str, &'a std::path::Path)>) {
        if let Some(c) = &self.crops {
            inputs.push(("--crops", c.as_path()));
        }
    }

    fn options(&self) -> DisplayOptions {
        DisplayOptions {
            crops: self.crops.clone(),
            zoom: self.zoom,
        }
    }
}

/// Says which generator ran, and when it is untrained.
fn say_generator(m: &ModelArgs, g: &GeneratorInfo) {
    eprintln!("generator: {}", g.config);
    if let Some(note) = &g.untrained {
        eprintln!(
            "note: {} is an UNTRAINED generator ({note}); its images show what the pipeline does, not what cells with these features look like",
            m.weights.display()
        );
    }
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let mut inputs = a.model.inputs();
    inputs.push(("--features", &a.features));
    a.display.inputs(&mut inputs);
    cellmorph::io::check_output_is_not_an_input("--output", &a.output, &inputs)?;
    let sheet = a
        .output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    let folder = if sheet {
        None
    } else {
        Some(cellmorph::io::OutputFolder::claim(
            "--output",
            &a.output,
            &super::run_description(),
            a.force,
        )?)
    };
    let be = open_device(a.model.device, a.model.precision)?;
    let s = generate_images(
        &be,
        &GenerateOptions {
            generator: a.model.options(),
            features: a.features,
            output: a.output.clone(),
            rows: a.rows,
            limit: a.limit,
            columns: a.columns,
            display: a.display.options(),
        },
    )?;
    if let Some(f) = folder {
        f.finish()?;
    }
    say_generator(&a.model, &s.generator);
    match s.output {
        GeneratedOutput::Directory => println!(
            "wrote {} images to {} (8-bit RGB: channel 0 blue, 1 green, 2 red, value × 255)",
            s.images,
            a.output.display()
        ),
        GeneratedOutput::Sheet => println!("wrote {} ({} cells)", a.output.display(), s.images),
    }
    Ok(())
}

fn run_manipulate(a: ManipulateArgs) -> Result<()> {
    let mut inputs = a.model.inputs();
    if let Some(f) = &a.features {
        inputs.push(("--features", f));
    }
    a.display.inputs(&mut inputs);
    cellmorph::io::check_output_is_not_an_input("--output", &a.output, &inputs)?;
    let base = match (a.row, a.features) {
        (Some(id), Some(features)) => ManipulateBase::Row { features, id },
        (Some(_), None) => return Err(Error::invalid("--row needs --features")),
        (None, _) => ManipulateBase::MeanCell,
    };
    let be = open_device(a.model.device, a.model.precision)?;
    let s = manipulate_feature(
        &be,
        &ManipulateOptions {
            generator: a.model.options(),
            feature: a.feature,
            base,
            from: a.from,
            to: a.to,
            steps: a.steps,
            output: a.output.clone(),
            display: a.display.options(),
        },
    )?;
    say_generator(&a.model, &s.generator);
    println!("step\tz (sd)\t{}", s.feature_name);
    for (k, (v, raw)) in s.z.iter().zip(&s.raw).enumerate() {
        println!("{k}\t{v:+.3}\t{raw}");
    }
    println!("wrote {}", a.output.display());
    Ok(())
}

fn run_interpolate(a: InterpolateArgs) -> Result<()> {
    let mut inputs = a.model.inputs();
    inputs.push(("--features", &a.features));
    a.display.inputs(&mut inputs);
    cellmorph::io::check_output_is_not_an_input("--output", &a.output, &inputs)?;
    let ends = if a.group_means {
        match (a.from_group, a.to_group) {
            (Some(from), Some(to)) => InterpolateEnds::GroupMeans {
                column: a.group_column,
                from,
                to,
                steps: a.steps,
            },
            _ => {
                return Err(Error::invalid(
                    "--group-means needs --from-group and --to-group",
                ))
            }
        }
    } else {
        match (a.from_row, a.to_row) {
            (Some(from), Some(to)) => InterpolateEnds::Rows {
                from,
                to,
                per_step: a.per_step,
            },
            _ => {
                return Err(Error::invalid(
                    "give --from-row and --to-row, or --group-means",
                ))
            }
        }
    };
    let be = open_device(a.model.device, a.model.precision)?;
    let s = interpolate(
        &be,
        &InterpolateOptions {
            generator: a.model.options(),
            features: a.features,
            ends,
            output: a.output.clone(),
            display: a.display.options(),
        },
    )?;
    say_generator(&a.model, &s.generator);
    println!("step\tcosine similarity to target");
    for (k, c) in s.cosine.iter().enumerate() {
        println!("{k}\t{c:.4}");
    }
    println!("wrote {}", a.output.display());
    Ok(())
}

fn run_standardize(a: StandardizeArgs) -> Result<()> {
    let output = match (a.output, a.weights) {
        (Some(o), _) => o,
        (None, Some(w)) => Standardizer::default_path(&w),
        (None, None) => return Err(Error::invalid("give --output or --weights")),
    };
    let mut inputs = vec![("--features", a.features.as_path())];
    if let Some(f) = &a.feature_names {
        inputs.push(("--feature-names", f));
    }
    cellmorph::io::check_output_is_not_an_input("--output", &output, &inputs)?;
    let features = a.features.clone();
    let s = standardize(&StandardizeOptions {
        features: a.features,
        feature_names: a.feature_names,
        nan: a.nan,
        output: output.clone(),
    })?;
    if let Some(line) = s.missing.describe() {
        eprintln!("{}: {line}", features.display());
    }
    println!(
        "wrote {}: {} features from {} cells{}",
        output.display(),
        s.standardizer.len(),
        s.cells,
        if s.constant > 0 {
            format!(" ({} constant, given deviation 1)", s.constant)
        } else {
            String::new()
        }
    );
    Ok(())
}

fn run_init_weights(a: InitWeightsArgs) -> Result<()> {
    let config = init_weights(&InitWeightsOptions {
        n_features: a.features,
        channels: a.channels,
        seed: a.seed,
        output: a.output.clone(),
    })?;
    println!(
        "wrote {}: an UNTRAINED generator with seeded random weights (seed {}), {config}",
        a.output.display(),
        a.seed
    );
    Ok(())
}

fn run_train(a: TrainArgs) -> Result<()> {
    use cellmorph::apps::cp2image::features::{FeatureColumns, FeatureTable};
    use cellmorph::apps::cp2image::sheets::CropSet;
    use cellmorph::apps::cp2image::train::{train, TrainOptions, TrainPaths};
    let paths = TrainPaths::beside(&a.output);
    let inputs = [
        ("--features", a.features.as_path()),
        ("--crops", a.crops.as_path()),
    ];
    for (role, path) in paths.all() {
        cellmorph::io::check_output_is_not_an_input(role, path, &inputs)?;
    }
    let (table, missing) =
        FeatureTable::read_csv_with(&a.features, FeatureColumns::AllButMetadata, a.nan, None)?;
    if let Some(line) = missing.describe() {
        eprintln!("{}: {line}", a.features.display());
    }
    let crops = CropSet::read(&a.crops)?;
    let opts = TrainOptions {
        epochs: a.epochs,
        batch: a.batch_size,
        lr: a.lr,
        betas: a.betas,
        seed: a.seed,
        val_fraction: a.val_fraction,
        generator_channels: a.generator_channels,
        discriminator_channels: a.discriminator_channels,
        sheet_cells: 8,
        loss_weights: cellmorph::train::cp2image::LossWeights {
            mse: a.mse_weight,
            feature_matching: a.feature_matching_weight,
            adversarial: a.adversarial_weight,
        },
    };
    let be = open_device(a.device, Precision::F32)?;
    let s = train(
        &be,
        &table,
        &crops,
        a.resume.as_deref(),
        &opts,
        &paths,
        true,
    )?;
    if let Some(last) = s.rows.last() {
        println!(
            "epoch {}: loss G {:.5}, D {:.5}; held-out MSE {:.5} vs {:.5} for the mean training image",
            last.epoch, last.loss_g, last.loss_d, last.val_mse, last.val_mse_mean_image
        );
    }
    println!(
        "trained {} epochs ({} this run, {:.2} steps/s) on {} cells, {} held out",
        a.epochs,
        a.epochs - s.resumed_from,
        s.steps_per_s,
        s.cells.0,
        s.cells.1
    );
    for (role, path) in paths.all() {
        println!("  {role}: {}", path.display());
    }
    Ok(())
}

fn run_evaluate(a: EvaluateArgs) -> Result<()> {
    use cellmorph::apps::cp2image::evaluate::{evaluate, EvaluateOptions};
    let split = a.split.clone().unwrap_or_else(|| {
        let stem = a
            .model
            .weights
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        a.model.weights.with_file_name(format!("{stem}.split.csv"))
    });
    let mut inputs = a.model.inputs();
    inputs.extend([
        ("--features", a.features.as_path()),
        ("--crops", a.crops.as_path()),
        ("--split", split.as_path()),
    ]);
    cellmorph::io::check_output_is_not_an_input("--output", &a.output, &inputs)?;
    let be = open_device(a.model.device, a.model.precision)?;
    let r = evaluate(
        &be,
        &EvaluateOptions {
            generator: a.model.options(),
            features: a.features.clone(),
            crops: a.crops.clone(),
            split,
        },
    )?;
    let json =
        serde_json::to_string_pretty(&r).map_err(|e| Error::invalid(format!("report: {e}")))?;
    cellmorph::io::write_atomic(&a.output, json.as_bytes())?;
    println!(
        "{} held-out cells ({} training): MSE {:.5} (mean image {:.5}, nearest cell {:.5}); SSIM {:.4} (mean image {:.4}, nearest cell {:.4}); measurement fidelity mean r {}",
        r.cells,
        r.training_cells,
        r.mse,
        r.mse_mean_image,
        r.mse_nearest_cell,
        r.ssim,
        r.ssim_mean_image,
        r.ssim_nearest_cell,
        r.fidelity_mean_r.map_or("undefined".to_string(), |v| format!("{v:.3}"))
    );
    println!("wrote {}", a.output.display());
    Ok(())
}
