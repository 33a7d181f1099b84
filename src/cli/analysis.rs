//! `cellmorph tsne` and `cellmorph cluster`: analyses of a feature table.

use std::path::{Path, PathBuf};

use clap::Args;

use cellmorph::apps::expression::cluster::{cluster_file, ClusterFileOptions};
use cellmorph::apps::expression::tsne::{tsne_file, TsneFileOptions};
use cellmorph::io::check_output_is_not_an_input;
use cellmorph::stats::tsne::{TsneInit, TsneOptions};
use cellmorph::{Error, Result};

#[derive(Args, Debug)]
pub struct TsneArgs {
    /// Feature table CSV: sample, then one column per feature (e.g. a profile CSV).
    #[arg(long)]
    features: PathBuf,
    /// Output CSV: sample, x, y.
    #[arg(long)]
    output: PathBuf,
    /// Seed of --init random.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Perplexity (effective number of neighbours); below the number of samples.
    #[arg(long, default_value_t = 30.0)]
    perplexity: f64,
    /// Gradient-descent iterations in all (at least 250, the early-exaggeration phase).
    #[arg(long, default_value_t = 1000)]
    iterations: usize,
    /// Initial embedding: pca (the first two principal components, scaled
    /// to standard deviation 1e-4) or random (1e-4 × normal, --seed).
    #[arg(long, default_value = "pca")]
    init: TsneInit,
    /// Scatter plot PNG of the embedding.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Column that colours the plot's points: categories (legend) or, when
    /// every value is a number, a colour bar. Looked up in --labels, else in
    /// the feature table.
    #[arg(long, requires = "plot")]
    color_by: Option<String>,
    /// CSV keyed by a `sample` column (else its first column) holding
    /// --color-by, e.g. a sample list with a batch column, or the output of
    /// `cellmorph cluster`.
    #[arg(long, requires = "color_by")]
    labels: Option<PathBuf>,
    /// Colour by categories even when every value of --color-by is a number
    /// (cluster numbers, batch ids).
    #[arg(long, requires = "color_by")]
    categorical: bool,
}

#[derive(Args, Debug)]
pub struct ClusterArgs {
    /// Feature table CSV: sample, then one column per feature.
    #[arg(long)]
    features: PathBuf,
    /// Number of flat clusters (SciPy's fcluster(Z, k, "maxclust")).
    #[arg(long)]
    k: usize,
    /// Cluster the feature columns (genes, codes) instead of the samples.
    #[arg(long, visible_alias = "genes")]
    columns: bool,
    /// Output CSV: sample (or feature), cluster (1..k).
    #[arg(long)]
    output: PathBuf,
    /// SciPy's linkage matrix as CSV: a, b, height, size (cluster ids n + row).
    #[arg(long)]
    linkage: Option<PathBuf>,
    /// Dendrogram beside a heat map of the z-scored table, rows in
    /// dendrogram order (PNG).
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// Refuses outputs that are inputs or that name the same file twice.
fn check_outputs(outputs: &[(&str, &Path)], inputs: &[(&str, &Path)]) -> Result<()> {
    for (i, (flag, path)) in outputs.iter().enumerate() {
        check_output_is_not_an_input(flag, path, inputs)?;
        for (other, earlier) in &outputs[..i] {
            if std::path::absolute(path).ok() == std::path::absolute(earlier).ok() {
                return Err(Error::invalid(format!(
                    "{flag} {} is also {other}; give them different paths",
                    path.display()
                )));
            }
        }
    }
    Ok(())
}

pub fn tsne(a: TsneArgs) -> Result<()> {
    let mut inputs: Vec<(&str, &Path)> = vec![("--features", &a.features)];
    if let Some(l) = &a.labels {
        inputs.push(("--labels", l));
    }
    let mut outputs: Vec<(&str, &Path)> = vec![("--output", &a.output)];
    if let Some(p) = &a.plot {
        outputs.push(("--plot", p));
    }
    check_outputs(&outputs, &inputs)?;
    let s = tsne_file(&TsneFileOptions {
        features: a.features.clone(),
        output: a.output.clone(),
        tsne: TsneOptions {
            perplexity: a.perplexity,
            max_iter: a.iterations,
            init: a.init,
            seed: a.seed,
            ..TsneOptions::default()
        },
        plot: a.plot.clone(),
        color_by: a.color_by.clone(),
        labels: a.labels.clone(),
        categorical: a.categorical,
    })?;
    eprintln!(
        "tsne: {} samples × {} features, exact, perplexity {}, learning rate {}, {} iterations in {:.2} s",
        s.samples, s.features, a.perplexity, s.result.learning_rate, s.result.iterations, s.seconds
    );
    println!("KL divergence {:.6}", s.result.kl_divergence);
    eprintln!("coordinates -> {}", a.output.display());
    if let Some(p) = &a.plot {
        eprintln!("plot -> {}", p.display());
    }
    Ok(())
}

pub fn cluster(a: ClusterArgs) -> Result<()> {
    let inputs: Vec<(&str, &Path)> = vec![("--features", &a.features)];
    let mut outputs: Vec<(&str, &Path)> = vec![("--output", &a.output)];
    if let Some(p) = &a.linkage {
        outputs.push(("--linkage", p));
    }
    if let Some(p) = &a.plot {
        outputs.push(("--plot", p));
    }
    check_outputs(&outputs, &inputs)?;
    let s = cluster_file(&ClusterFileOptions {
        features: a.features.clone(),
        k: a.k,
        columns: a.columns,
        output: a.output.clone(),
        linkage: a.linkage.clone(),
        plot: a.plot.clone(),
    })?;
    eprintln!(
        "cluster: Ward linkage of {} {} in {:.2} s",
        s.names.len(),
        s.what,
        s.seconds
    );
    println!("cluster  size");
    for (i, size) in s.sizes().iter().enumerate() {
        println!("{:>7}  {size}", i + 1);
    }
    eprintln!("clusters -> {}", a.output.display());
    for (flag, p) in [("linkage", &a.linkage), ("plot", &a.plot)] {
        if let Some(p) = p {
            eprintln!("{flag} -> {}", p.display());
        }
    }
    Ok(())
}
