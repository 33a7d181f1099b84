//! The expression-from-morphology commands: `profile`, `expression prepare`,
//! `expression evaluate`, `map`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use cellmorph::apps::expression::evaluate::{
    evaluate_gene_models, DatasetFiles, EvaluateGeneModelsOptions,
};
use cellmorph::apps::expression::map::{map_image, MapImageOptions};
use cellmorph::apps::expression::prepare::{prepare_counts, GeneFilter, PrepareCountsOptions};
use cellmorph::apps::expression::profile::{profile_files, ProfileFilesOptions, ProfileOptions};
use cellmorph::{Device, Error, Precision, Result};

#[derive(Args, Debug)]
pub struct ProfileArgs {
    /// Sample list CSV, one line per image: a sample column and an image
    /// path column (by default `sample` and `image` or `path`, any order);
    /// other columns (batch, group, …) are allowed and ignored here.
    #[arg(long)]
    pub samples: PathBuf,
    /// Name of the sample list's sample column [default: sample].
    #[arg(long)]
    pub sample_column: Option<String>,
    /// Name of the sample list's image path column [default: image, else path].
    #[arg(long)]
    pub image_column: Option<String>,
    /// VQ-VAE-2 weights (safetensors, vq-vae-2-pytorch names).
    #[arg(long)]
    pub weights: PathBuf,
    /// Output profile CSV: sample, top0..top{K-1}, bottom0..bottom{K-1}.
    #[arg(long)]
    pub output: PathBuf,
    /// Also write the raw code counts behind the profiles here (CSV:
    /// sample, images, patches, top0.., bottom0..).
    #[arg(long)]
    pub counts: Option<PathBuf>,
    /// cpu, cuda, cuda:N or emulated.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Convolution precision: f32 (reference), or bf16/f16 on tensor cores
    /// (operands rounded, f32 accumulation).
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// Patches per device batch (bounds device memory).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Patch side in pixels.
    #[arg(long, default_value_t = 160)]
    pub patch: usize,
    /// Also report the reconstruction MSE in 8-bit units (decodes every patch).
    #[arg(long)]
    pub mse: bool,
}

#[derive(Subcommand, Debug)]
pub enum ExpressionCommand {
    /// Raw counts → counts per million → log2(x + 1), then the mean/CV gene filter.
    Prepare(PrepareArgs),
    /// Table-3-style evaluation of a gene model on one or more data sets.
    Evaluate(EvaluateArgs),
    /// Cut labelled images into tiles, one sample each, with targets from the
    /// label masks (fractional nucleus count, foreground fraction, mean
    /// intensity): real images with known answers for profile → svr cv.
    Tiles(TilesArgs),
}

#[derive(Args, Debug)]
pub struct TilesArgs {
    /// CSV with an `image` column, optional `labels` (instance mask of the
    /// same size: 0 background, one value per object) and `batch` columns;
    /// relative paths resolved against its folder.
    #[arg(long)]
    images: PathBuf,
    /// Tile side in pixels (one VQ-VAE-2 patch: 160).
    #[arg(long, default_value_t = 160)]
    size: usize,
    /// Step between tile origins [default: --size, no overlap].
    #[arg(long)]
    stride: Option<usize>,
    /// New or empty folder: tiles/*.png, samples.csv (sample, image, batch,
    /// source, x, y) and, with labels, targets.csv (sample, nuclei,
    /// foreground_fraction, mean_intensity).
    #[arg(long)]
    output_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// Expression CSV: sample, then one column per gene.
    #[arg(long)]
    counts: PathBuf,
    /// The table is already normalized (log2 CPM): only filter.
    #[arg(long)]
    normalized: bool,
    /// Keep genes whose mean (log2 CPM) is at least this.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    min_mean: f64,
    /// Keep genes whose coefficient of variation (sample std / mean) is at least this.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    min_cv: f64,
    /// Output CSV of the kept genes, log2 CPM.
    #[arg(long)]
    output: PathBuf,
}

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// Gene model JSON from `svr grid`.
    #[arg(long)]
    model: PathBuf,
    /// A data set: NAME=FEATURES.csv,EXPRESSION.csv (repeat for several;
    /// a model trained on one batch is evaluated on the others).
    #[arg(long = "dataset", required = true)]
    datasets: Vec<String>,
    /// The expression tables hold raw counts: normalize to log2(CPM + 1) first.
    #[arg(long)]
    raw_counts: bool,
    /// FDR level.
    #[arg(long, default_value_t = 0.05)]
    fdr: f64,
    /// Genes shown (and plotted) per data set.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Output CSV with every gene and data set.
    #[arg(long)]
    output: PathBuf,
    /// Folder for predicted-vs-measured scatter PNGs of the top genes.
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Units of the expression values, shown on the plots' axes (e.g.
    /// "log2 CPM"); none by default.
    #[arg(long)]
    units: Option<String>,
    /// Write into --plots even when it holds files of another run.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct MapArgs {
    /// VQ-VAE-2 weights.
    #[arg(long)]
    weights: PathBuf,
    /// Gene model JSON from `svr grid` (trained on profiles of these weights).
    #[arg(long)]
    model: PathBuf,
    /// Gene to map.
    #[arg(long)]
    gene: String,
    /// Image to map.
    #[arg(long)]
    image: PathBuf,
    /// Output heat-map PNG over the image; a CSV of the patch values is written beside it.
    #[arg(long)]
    output: PathBuf,
    /// cpu, cuda, cuda:N or emulated.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Convolution precision: f32 (reference), or bf16/f16 on tensor cores
    /// (operands rounded, f32 accumulation).
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Patches per device batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Patch side in pixels.
    #[arg(long, default_value_t = 160)]
    patch: usize,
}

pub fn profile(a: ProfileArgs) -> Result<()> {
    cellmorph::io::check_output_is_not_an_input(
        "--output",
        &a.output,
        &[("--samples", &a.samples), ("--weights", &a.weights)],
    )?;
    if let Some(c) = &a.counts {
        cellmorph::io::check_output_is_not_an_input(
            "--counts",
            c,
            &[
                ("--samples", &a.samples),
                ("--weights", &a.weights),
                ("--output", &a.output),
            ],
        )?;
    }
    let be = super::open_device(a.device, a.precision)?;
    let s = profile_files(
        &be,
        &ProfileFilesOptions {
            samples: a.samples,
            columns: cellmorph::imaging::SampleColumns {
                sample: a.sample_column,
                image: a.image_column,
            },
            weights: a.weights,
            output: a.output.clone(),
            counts: a.counts.clone(),
            profile: ProfileOptions {
                patch: a.patch,
                batch: a.batch_size,
                mse: a.mse,
                progress: true,
            },
        },
    )?;
    if let Some(note) = &s.untrained {
        eprintln!("note: {note} — the encoder is UNTRAINED; its codes describe texture, not learned morphology");
    }
    eprintln!("VQ-VAE-2: {}", s.model);
    let report = &s.report;
    for sk in &report.skipped {
        eprintln!(
            "skipped {} ({}): {}",
            sk.path.display(),
            sk.sample,
            sk.reason
        );
    }
    let patches: usize = report.samples.iter().map(|s| s.patches).sum();
    eprintln!(
        "{} samples, {patches} patches in {:.1} s",
        report.samples.len(),
        s.seconds
    );
    if let Some(mse) = report.mse_8bit {
        println!("reconstruction MSE (8-bit units): {mse:.2}");
    }
    eprintln!("profiles -> {}", a.output.display());
    Ok(())
}

pub fn run(cmd: ExpressionCommand) -> Result<()> {
    match cmd {
        ExpressionCommand::Prepare(a) => prepare(a),
        ExpressionCommand::Evaluate(a) => evaluate_cmd(a),
        ExpressionCommand::Tiles(a) => tiles(a),
    }
}

fn tiles(a: TilesArgs) -> Result<()> {
    cellmorph::io::check_output_is_not_an_input(
        "--output-dir",
        &a.output_dir,
        &[("--images", &a.images)],
    )?;
    let s = cellmorph::apps::expression::tiles::cut_tiles(
        &cellmorph::apps::expression::tiles::TileOptions {
            list: a.images,
            size: a.size,
            stride: a.stride.unwrap_or(a.size),
            output: a.output_dir.clone(),
        },
    )?;
    let batches: Vec<String> = s
        .per_batch
        .iter()
        .map(|(b, n)| format!("{}: {n}", if b.is_empty() { "(no batch)" } else { b }))
        .collect();
    eprintln!(
        "{} tiles of {}×{} from {} images ({}) -> {}",
        s.tiles,
        a.size,
        a.size,
        s.images,
        batches.join(", "),
        a.output_dir.display()
    );
    if !s.targets {
        eprintln!("no labels column: samples.csv only, no targets.csv");
    }
    Ok(())
}

fn prepare(a: PrepareArgs) -> Result<()> {
    cellmorph::io::check_output_is_not_an_input("--output", &a.output, &[("--counts", &a.counts)])?;
    let filter = GeneFilter {
        min_mean: a.min_mean,
        min_cv: a.min_cv,
    };
    let s = prepare_counts(&PrepareCountsOptions {
        counts: a.counts,
        normalized: a.normalized,
        filter,
        output: a.output,
    })?;
    for d in &s.report.dropped {
        eprintln!("dropped {}: {:?}", d.gene, d.reason);
    }
    eprintln!(
        "kept {} of {} genes (mean ≥ {}, CV ≥ {})",
        s.report.kept.len(),
        s.genes,
        a.min_mean,
        a.min_cv
    );
    Ok(())
}

/// Parses NAME=FEATURES,EXPRESSION.
fn parse_dataset(spec: &str) -> Result<DatasetFiles> {
    let bad = || {
        Error::invalid(format!(
            "--dataset {spec:?}: expected NAME=FEATURES.csv,EXPRESSION.csv"
        ))
    };
    let (name, files) = spec.split_once('=').ok_or_else(bad)?;
    let (f, e) = files.split_once(',').ok_or_else(bad)?;
    Ok(DatasetFiles {
        name: name.to_string(),
        features: PathBuf::from(f),
        expression: PathBuf::from(e),
    })
}

fn evaluate_cmd(a: EvaluateArgs) -> Result<()> {
    let datasets = a
        .datasets
        .iter()
        .map(|d| parse_dataset(d))
        .collect::<Result<Vec<_>>>()?;
    let mut inputs: Vec<(&str, &std::path::Path)> = vec![("--model", &a.model)];
    for d in &datasets {
        inputs.push(("--dataset", &d.features));
        inputs.push(("--dataset", &d.expression));
    }
    cellmorph::io::check_output_is_not_an_input("--output", &a.output, &inputs)?;
    let plots = a
        .plots
        .as_deref()
        .map(|p| {
            cellmorph::io::OutputFolder::claim("--plots", p, &super::run_description(), a.force)
        })
        .transpose()?;
    let s = evaluate_gene_models(&EvaluateGeneModelsOptions {
        model: a.model,
        datasets,
        raw_counts: a.raw_counts,
        fdr: a.fdr,
        output: a.output.clone(),
        plots: a.plots,
        top: a.top,
        units: a.units,
    })?;
    if let Some(p) = plots {
        p.finish()?;
    }
    let eval = &s.evaluation;
    for sk in &eval.skipped {
        eprintln!("skipped {} on {}: {}", sk.gene, sk.dataset, sk.reason);
    }
    print!("{}", eval.table(a.top));
    eprintln!("results -> {}", a.output.display());
    Ok(())
}

pub fn map(a: MapArgs) -> Result<()> {
    let is_png = a
        .output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !is_png {
        return Err(Error::invalid(format!(
            "--output {}: the map is a PNG image; give a path ending in .png (the patch values are written beside it as .csv)",
            a.output.display()
        )));
    }
    let inputs: [(&str, &std::path::Path); 3] = [
        ("--weights", &a.weights),
        ("--model", &a.model),
        ("--image", &a.image),
    ];
    cellmorph::io::check_output_is_not_an_input("--output", &a.output, &inputs)?;
    cellmorph::io::check_output_is_not_an_input(
        "--output (its .csv beside it)",
        &a.output.with_extension("csv"),
        &inputs,
    )?;
    let be = super::open_device(a.device, a.precision)?;
    let s = map_image(
        &be,
        &MapImageOptions {
            weights: a.weights,
            model: a.model,
            gene: a.gene.clone(),
            image: a.image,
            output: a.output.clone(),
            patch: a.patch,
            batch_size: a.batch_size,
        },
    )?;
    eprintln!(
        "{}: {}×{} patches -> {} and {}",
        a.gene,
        s.map.rows,
        s.map.cols,
        a.output.display(),
        s.csv.display()
    );
    Ok(())
}
