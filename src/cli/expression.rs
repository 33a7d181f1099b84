//! The expression-from-morphology commands: `profile`, `expression prepare`,
//! `expression evaluate`, `map`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use cellmorph::apps::expression::evaluate::{evaluate, Dataset};
use cellmorph::apps::expression::map::expression_map;
use cellmorph::apps::expression::prepare::{ExpressionTable, GeneFilter, Scale};
use cellmorph::apps::expression::profile::{profile_samples, ProfileOptions};
use cellmorph::imaging::read_sample_list;
use cellmorph::models::vqvae2::VqVae2;
use cellmorph::svr::SvrModel;
use cellmorph::table::Table;
use cellmorph::{Device, Error, Precision, Result};

#[derive(Args, Debug)]
pub struct ProfileArgs {
    /// Sample list CSV with the header `sample,image` (one line per image).
    #[arg(long)]
    pub samples: PathBuf,
    /// VQ-VAE-2 weights (safetensors, vq-vae-2-pytorch names).
    #[arg(long)]
    pub weights: PathBuf,
    /// Output profile CSV: sample, top0..top{K-1}, bottom0..bottom{K-1}.
    #[arg(long)]
    pub output: PathBuf,
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
    #[arg(long, default_value_t = 0.0)]
    min_mean: f64,
    /// Keep genes whose coefficient of variation (sample std / mean) is at least this.
    #[arg(long, default_value_t = 0.0)]
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
    let list = read_sample_list(&a.samples)?;
    let be = super::open_device(a.device, a.precision)?;
    let model = VqVae2::load(&be, &a.weights)?;
    let untrained = cellmorph::io::TensorFile::open(&a.weights)?
        .metadata()
        .and_then(|m| m.get("cellmorph").cloned());
    if let Some(note) = untrained {
        eprintln!("note: {note} — the encoder is UNTRAINED; its codes describe texture, not learned morphology");
    }
    eprintln!("VQ-VAE-2: {}", model.config());
    let t0 = std::time::Instant::now();
    let report = profile_samples(
        &be,
        &model,
        &list,
        ProfileOptions {
            patch: a.patch,
            batch: a.batch_size,
            mse: a.mse,
            progress: true,
        },
    )?;
    for s in &report.skipped {
        eprintln!("skipped {} ({}): {}", s.path.display(), s.sample, s.reason);
    }
    let patches: usize = report.samples.iter().map(|s| s.patches).sum();
    eprintln!(
        "{} samples, {patches} patches in {:.1} s",
        report.samples.len(),
        t0.elapsed().as_secs_f64()
    );
    if let Some(mse) = report.mse_8bit {
        println!("reconstruction MSE (8-bit units): {mse:.2}");
    }
    report.to_table()?.write_csv(&a.output)?;
    eprintln!("profiles -> {}", a.output.display());
    Ok(())
}

pub fn run(cmd: ExpressionCommand) -> Result<()> {
    match cmd {
        ExpressionCommand::Prepare(a) => prepare(a),
        ExpressionCommand::Evaluate(a) => evaluate_cmd(a),
    }
}

fn prepare(a: PrepareArgs) -> Result<()> {
    let t = Table::read_csv(&a.counts)?;
    let scale = if a.normalized {
        Scale::Log2Cpm
    } else {
        Scale::RawCounts
    };
    let e = ExpressionTable::new(t.row_names, t.col_names, t.data, scale)?.normalize()?;
    let report = e.filter_genes(&GeneFilter {
        min_mean: a.min_mean,
        min_cv: a.min_cv,
    })?;
    for d in &report.dropped {
        eprintln!("dropped {}: {:?}", d.gene, d.reason);
    }
    eprintln!(
        "kept {} of {} genes (mean ≥ {}, CV ≥ {})",
        report.kept.len(),
        e.n_genes(),
        a.min_mean,
        a.min_cv
    );
    if report.kept.is_empty() {
        return Err(Error::invalid("no gene passes the filter"));
    }
    let kept = e.select_genes(&report.kept)?;
    Table::new(
        kept.samples().to_vec(),
        kept.genes().to_vec(),
        kept.values().to_vec(),
    )?
    .write_csv(&a.output)
}

/// Parses NAME=FEATURES,EXPRESSION.
fn parse_dataset(spec: &str, raw_counts: bool) -> Result<Dataset> {
    let (name, files) = spec.split_once('=').ok_or_else(|| {
        Error::invalid(format!(
            "--dataset {spec:?}: expected NAME=FEATURES.csv,EXPRESSION.csv"
        ))
    })?;
    let (f, e) = files.split_once(',').ok_or_else(|| {
        Error::invalid(format!(
            "--dataset {spec:?}: expected NAME=FEATURES.csv,EXPRESSION.csv"
        ))
    })?;
    Ok(Dataset {
        name: name.to_string(),
        features: Table::read_csv(f)?,
        expression: super::svr::read_expression(&PathBuf::from(e), raw_counts)?,
    })
}

fn evaluate_cmd(a: EvaluateArgs) -> Result<()> {
    let model = SvrModel::load(&a.model)?;
    let datasets = a
        .datasets
        .iter()
        .map(|d| parse_dataset(d, a.raw_counts))
        .collect::<Result<Vec<_>>>()?;
    let eval = evaluate(&model, &datasets, a.fdr)?;
    for s in &eval.skipped {
        eprintln!("skipped {} on {}: {}", s.gene, s.dataset, s.reason);
    }
    print!("{}", eval.table(a.top));
    eval.write_csv(&a.output)?;
    eprintln!("results -> {}", a.output.display());
    if let Some(dir) = &a.plots {
        super::plots::scatter_top(&eval, a.top, dir)?;
    }
    Ok(())
}

pub fn map(a: MapArgs) -> Result<()> {
    let be = super::open_device(a.device, a.precision)?;
    let vq = VqVae2::load(&be, &a.weights)?;
    let model = SvrModel::load(&a.model)?;
    let m = expression_map(&be, &vq, &model, &a.gene, &a.image, a.patch, a.batch_size)?;
    let csv = a.output.with_extension("csv");
    let mut text = String::from("row,col,x,y,predicted\n");
    for (i, v) in m.values.iter().enumerate() {
        let (r, c) = (i / m.cols, i % m.cols);
        text.push_str(&format!("{r},{c},{},{},{v}\n", c * m.patch, r * m.patch));
    }
    cellmorph::io::write_atomic(&csv, text.as_bytes())?;
    super::plots::map_png(&m, &a.image, &a.output)?;
    eprintln!(
        "{}: {}×{} patches -> {} and {}",
        a.gene,
        m.rows,
        m.cols,
        a.output.display(),
        csv.display()
    );
    Ok(())
}
