//! `cellmorph demo` (the README's main job) and `cellmorph synth`.

use std::path::PathBuf;

use clap::Args;

use cellmorph::apps::expression::demo::{run_demo, DemoConfig};
use cellmorph::apps::expression::synth::{generate, SynthConfig, SynthFormat};
use cellmorph::io::OutputFolder;
use cellmorph::{Device, Precision, Result};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Output folder (data, weights, profiles, model, evaluation, plots).
    #[arg(long, default_value = "cellmorph-demo")]
    out: PathBuf,
    /// cpu, cuda, cuda:N or emulated.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Convolution precision: f32 (reference), or bf16/f16 on tensor cores
    /// (operands rounded, f32 accumulation).
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Samples generated (split in two batches: train A, held-out B).
    #[arg(long, default_value_t = 48)]
    samples: usize,
    /// Seed of the data and the untrained model.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Use a small grid (C 1,10,100 × ε 0,0.1,0.2) instead of the paper's 1,100 settings.
    #[arg(long)]
    quick: bool,
    /// Write into --out even when it holds files of another run.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Output folder: images/, samples.csv, expression.csv (raw counts), truth.json.
    #[arg(long)]
    out: PathBuf,
    /// Samples.
    #[arg(long, default_value_t = 24)]
    samples: usize,
    /// Images per sample.
    #[arg(long, default_value_t = 2)]
    images_per_sample: usize,
    /// Image width and height in pixels.
    #[arg(long, default_value_t = 320)]
    size: usize,
    /// Genes, of which --signal-genes depend on the hidden factors.
    #[arg(long, default_value_t = 100)]
    genes: usize,
    /// Genes that carry signal.
    #[arg(long, default_value_t = 12)]
    signal_genes: usize,
    /// Write 16-bit TIFF instead of 8-bit PNG.
    #[arg(long)]
    tiff16: bool,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write into --out even when it holds files of another run.
    #[arg(long)]
    force: bool,
}

pub fn synth(a: SynthArgs) -> Result<()> {
    let cfg = SynthConfig {
        seed: a.seed,
        samples: a.samples,
        images_per_sample: a.images_per_sample,
        width: a.size,
        height: a.size,
        genes: a.genes,
        signal_genes: a.signal_genes,
        format: if a.tiff16 {
            SynthFormat::Tiff16
        } else {
            SynthFormat::Png8
        },
        ..SynthConfig::default()
    };
    let folder = OutputFolder::claim("--out", &a.out, &super::run_description(), a.force)?;
    let out = generate(&cfg, &a.out)?;
    folder.finish()?;
    eprintln!(
        "{} samples, {} images -> {}\n  {}\n  {}\n  {}",
        cfg.samples,
        out.images.len(),
        a.out.display(),
        out.samples_csv.display(),
        out.expression_csv.display(),
        out.truth_json.display()
    );
    Ok(())
}

pub fn demo(a: DemoArgs) -> Result<()> {
    let folder = OutputFolder::claim("--out", &a.out, &super::run_description(), a.force)?;
    let be = super::open_device(a.device, a.precision)?;
    let mut cfg = DemoConfig::default();
    cfg.synth.samples = a.samples;
    cfg.synth.seed = a.seed;
    if a.quick {
        cfg.grid = DemoConfig::quick_grid()?;
    }
    println!(
        "cellmorph demo: expression from morphology (Wakui et al. 2023) on a synthetic data set"
    );
    println!(
        "NOTE: the VQ-VAE-2 is UNTRAINED (seeded random weights, codebooks seeded by k-means++ on the data);"
    );
    println!("      pass your own weights to `cellmorph profile` for real work.");
    let t0 = std::time::Instant::now();
    let res = run_demo(&be, &cfg, &a.out)?;
    folder.finish()?;
    let secs = t0.elapsed().as_secs_f64();
    println!();
    print!("{}", res.evaluation.table(10));
    let t = res.truth_check();
    println!();
    println!(
        "truth check on the held-out batch: {}/{} signal genes and {}/{} noise genes significant",
        t.signal_significant, t.signal, t.noise_significant, t.noise
    );
    if let (Some(m), Some(path)) = (&res.map, &res.map_png) {
        println!("patch-wise map of {} -> {}", m.gene, path.display());
    }
    println!(
        "{} scatter plots -> {}",
        res.plots.len(),
        res.plot_dir.display()
    );
    for (p, what) in &res.files {
        println!("  {:<60} {what}", p.display().to_string());
    }
    println!("done in {secs:.1} s on {}", be.describe());
    Ok(())
}
