//! A synthetic data set for the expression-from-morphology pipeline
//! (`cellmorph synth`), with a known answer.
//!
//! Every sample has three hidden factors in [−1, 1]: cell size, cell density
//! and darkness of the cell bodies. Its images are phase-contrast-like: a
//! mid-grey, noisy, unevenly lit background with elliptical cells, each a
//! darker body ringed by a bright halo, whose size, number and darkness
//! follow the factors. Its expression profile holds raw counts in which a
//! few *signal* genes depend log-linearly on one factor each, with noise,
//! and all other genes are noise. A pipeline that reads morphology well
//! should predict the signal genes and not the others.
//!
//! Output (see [`generate`]) in one directory:
//! - `images/<sample>_<k>.png` (8-bit) or `.tif` (16-bit);
//! - `samples.csv`: `sample,image` lines (see [`crate::imaging::read_sample_list`]);
//! - `expression.csv`: raw counts, samples × genes (a [`Table`]);
//! - `truth.json`: the factors of each sample and the signal genes ([`SynthTruth`]).
//!
//! Everything is a function of [`SynthConfig`] (seed included): two runs with
//! the same configuration write byte-identical files.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::imaging::{write_sample_list, BitDepth, GrayImage, SampleImage};
use crate::io::write_atomic;
use crate::rng::SplitMix64;
use crate::table::Table;
use crate::{Error, Result};

/// File name of the expression table inside the output directory.
pub const EXPRESSION_CSV: &str = "expression.csv";
/// File name of the sample list inside the output directory.
pub const SAMPLES_CSV: &str = "samples.csv";
/// File name of the ground truth inside the output directory.
pub const TRUTH_JSON: &str = "truth.json";
/// Sub-directory holding the images.
pub const IMAGE_DIR: &str = "images";
/// Names of the hidden factors, in the order of [`SampleTruth::factors`].
pub const FACTOR_NAMES: [&str; 3] = ["cell_size", "cell_density", "darkness"];

/// Image file format of a synthetic data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SynthFormat {
    /// 8-bit grayscale PNG.
    Png8,
    /// 16-bit grayscale TIFF.
    Tiff16,
}

/// What to generate. [`SynthConfig::default`] is small enough for the whole
/// pipeline to run on two CPU cores in about a minute: 24 samples × 2 images
/// of 320×320 (4 patches of 160 each), 100 genes of which 12 carry signal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Number of samples.
    pub samples: usize,
    /// Images per sample.
    pub images_per_sample: usize,
    /// Image width in pixels (at least 16).
    pub width: usize,
    /// Image height in pixels (at least 16).
    pub height: usize,
    /// Number of genes in the expression table.
    pub genes: usize,
    /// How many of them depend on a factor (assigned to the factors in turn).
    pub signal_genes: usize,
    /// Standard deviation (log2 units) of the noise added to signal genes.
    pub signal_noise_sd: f64,
    /// Standard deviation (log2 units) of the noise genes across samples,
    /// comparable to the signal genes' spread so that a mean/CV filter keeps
    /// both.
    pub noise_gene_sd: f64,
    /// Mean sequencing depth (total counts) per sample; each sample's depth
    /// varies by a factor up to e^±0.3 around it.
    pub reads_per_sample: f64,
    /// Image file format.
    pub format: SynthFormat,
}

impl Default for SynthConfig {
    fn default() -> SynthConfig {
        SynthConfig {
            seed: 1,
            samples: 24,
            images_per_sample: 2,
            width: 320,
            height: 320,
            genes: 100,
            signal_genes: 12,
            signal_noise_sd: 0.25,
            noise_gene_sd: 0.7,
            reads_per_sample: 2.0e6,
            format: SynthFormat::Png8,
        }
    }
}

impl SynthConfig {
    /// Checks that the configuration describes a data set that can be made.
    pub fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(Error::invalid(format!("synth: {msg}")));
        if self.samples == 0 || self.images_per_sample == 0 {
            return fail(format!(
                "needs at least one sample and one image per sample (got {} and {})",
                self.samples, self.images_per_sample
            ));
        }
        if self.width < 16 || self.height < 16 {
            return fail(format!(
                "images must be at least 16×16 (got {}×{})",
                self.width, self.height
            ));
        }
        if self
            .width
            .checked_mul(self.height)
            .is_none_or(|n| n > 1 << 30)
        {
            return fail(format!(
                "images of {}×{} are too large",
                self.width, self.height
            ));
        }
        if self.genes == 0 || self.signal_genes > self.genes {
            return fail(format!(
                "needs at least one gene and at most as many signal genes as genes (got {} of {})",
                self.signal_genes, self.genes
            ));
        }
        for (name, v) in [
            ("signal_noise_sd", self.signal_noise_sd),
            ("noise_gene_sd", self.noise_gene_sd),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return fail(format!("{name} must be finite and ≥ 0 (got {v})"));
            }
        }
        if !(self.reads_per_sample.is_finite() && self.reads_per_sample >= 1.0) {
            return fail(format!(
                "reads_per_sample must be finite and ≥ 1 (got {})",
                self.reads_per_sample
            ));
        }
        Ok(())
    }
}

/// The hidden state of one sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleTruth {
    /// Sample name, as in the expression table and the sample list.
    pub sample: String,
    /// Factor values in [−1, 1], in the order of [`FACTOR_NAMES`].
    pub factors: [f64; 3],
    /// The sample's image paths, relative to the output directory.
    pub images: Vec<String>,
}

/// A gene that depends on a factor: `log2 rate = base + coefficient · factor + noise`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalGene {
    /// Gene name (a column of the expression table).
    pub gene: String,
    /// Index into [`FACTOR_NAMES`].
    pub factor: usize,
    /// Effect in log2 units per unit of the factor (sign included).
    pub coefficient: f64,
}

/// Contents of `truth.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthTruth {
    /// The configuration that produced the data set.
    pub config: SynthConfig,
    /// Factor names, [`FACTOR_NAMES`].
    pub factor_names: Vec<String>,
    /// One entry per sample, in table order.
    pub samples: Vec<SampleTruth>,
    /// The genes that carry signal, in table order.
    pub signal_genes: Vec<SignalGene>,
    /// The genes that are pure noise, in table order.
    pub noise_genes: Vec<String>,
}

impl SynthTruth {
    /// Reads a `truth.json` written by [`generate`].
    pub fn read(path: impl AsRef<Path>) -> Result<SynthTruth> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))
    }
}

/// Paths and truth of a generated data set.
#[derive(Debug, Clone)]
pub struct SynthOutput {
    /// The sample list, `<dir>/samples.csv`.
    pub samples_csv: PathBuf,
    /// The raw-count table, `<dir>/expression.csv`.
    pub expression_csv: PathBuf,
    /// The ground truth, `<dir>/truth.json`.
    pub truth_json: PathBuf,
    /// Every image written, with its sample, in sample-list order.
    pub images: Vec<SampleImage>,
    /// What `truth.json` holds.
    pub truth: SynthTruth,
}

/// Cell-drawing parameters that follow a sample's factors.
struct Morphology {
    /// Mean cell radius in pixels.
    radius: f64,
    /// Cells per 100×100 pixels.
    density: f64,
    /// How much darker than the background a cell body is (fraction of full scale).
    darkness: f64,
}

impl Morphology {
    fn from_factors(f: &[f64; 3]) -> Morphology {
        Morphology {
            radius: 10.0 + 4.0 * f[0],
            density: 6.0 + 4.0 * f[1],
            darkness: 0.18 + 0.1 * f[2],
        }
    }
}

/// Brightness of the halo ring above the background (fraction of full scale).
const HALO: f64 = 0.22;
/// Standard deviation of the per-pixel background noise.
const PIXEL_NOISE: f64 = 0.025;

/// Renders one image as intensities in [0, 1], row-major.
fn render(rng: &mut SplitMix64, width: usize, height: usize, m: &Morphology) -> Vec<f64> {
    // Uneven illumination: a gentle linear ramp in a random direction.
    let angle = rng.uniform(0.0, std::f64::consts::TAU);
    let (ramp_x, ramp_y) = (angle.cos() * 0.04, angle.sin() * 0.04);
    let (w, h) = (width as f64, height as f64);
    let mut canvas: Vec<f64> = (0..width * height)
        .map(|i| {
            let (x, y) = ((i % width) as f64 / w - 0.5, (i / width) as f64 / h - 0.5);
            0.5 + ramp_x * x + ramp_y * y
        })
        .collect();

    let n_cells = ((w * h / 1.0e4) * m.density).round().max(1.0) as usize;
    for _ in 0..n_cells {
        let (cx, cy) = (rng.uniform(0.0, w), rng.uniform(0.0, h));
        let r = m.radius * (0.12 * rng.normal()).exp();
        let aspect = (0.1 * rng.normal()).exp();
        let (a, b) = (r * aspect, r / aspect);
        let theta = rng.uniform(0.0, std::f64::consts::PI);
        let (sin, cos) = theta.sin_cos();
        let dark = m.darkness * (0.1 * rng.normal()).exp();
        // Nucleus centre, in the cell's normalized coordinates.
        let (nu, nv) = (0.25 * rng.uniform(-1.0, 1.0), 0.25 * rng.uniform(-1.0, 1.0));
        // Beyond 1.5 radii the halo term is below 1e-6 of its peak.
        let reach = 1.5 * a.max(b);
        let x0 = (cx - reach).floor().max(0.0) as usize;
        let x1 = ((cx + reach).ceil().max(0.0) as usize).min(width);
        let y0 = (cy - reach).floor().max(0.0) as usize;
        let y1 = ((cy + reach).ceil().max(0.0) as usize).min(height);
        for y in y0..y1 {
            for x in x0..x1 {
                let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
                let u = (dx * cos + dy * sin) / a;
                let v = (dy * cos - dx * sin) / b;
                let d = (u * u + v * v).sqrt();
                let mut delta = HALO * (-((d - 1.12) / 0.1).powi(2)).exp();
                if d < 1.0 {
                    // Thickest, so darkest, at the centre, and darker still
                    // over the nucleus.
                    let dn2 = (u - nu).powi(2) + (v - nv).powi(2);
                    delta -= dark * (0.6 + 0.4 * (1.0 - d * d) + 0.4 * (-dn2 / 0.1).exp());
                }
                if let Some(px) = canvas.get_mut(y * width + x) {
                    *px += delta;
                }
            }
        }
    }
    for px in &mut canvas {
        *px = (*px + PIXEL_NOISE * rng.normal()).clamp(0.0, 1.0);
    }
    canvas
}

/// Quantizes [0, 1] intensities to an image of the given depth.
fn quantize(values: &[f64], width: usize, height: usize, depth: BitDepth) -> Result<GrayImage> {
    let max = f64::from(depth.max_value());
    let data = values
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * max).round() as u16)
        .collect();
    GrayImage::new(width, height, depth, data)
}

/// Zero-padded names `<prefix>01`, … wide enough for `n`.
fn names(prefix: &str, n: usize) -> Vec<String> {
    let digits = n.to_string().len().max(2);
    (1..=n).map(|i| format!("{prefix}{i:0digits$}")).collect()
}

/// Writes a synthetic data set into `dir` (created if missing; files of the
/// same names are replaced, other files are left alone).
///
/// Random draws come from [`SplitMix64`] seeded with `config.seed`, in a
/// fixed order: factors, gene parameters, counts; each image uses its own
/// forked stream, so images are rendered in parallel yet deterministically.
pub fn generate(config: &SynthConfig, dir: impl AsRef<Path>) -> Result<SynthOutput> {
    config.validate()?;
    let dir = dir.as_ref();
    let image_dir = dir.join(IMAGE_DIR);
    std::fs::create_dir_all(&image_dir).map_err(|e| Error::io(&image_dir, e))?;
    let mut rng = SplitMix64::new(config.seed);

    let sample_names = names("s", config.samples);
    let gene_names = names("gene_", config.genes);
    let (depth, ext) = match config.format {
        SynthFormat::Png8 => (BitDepth::Eight, "png"),
        SynthFormat::Tiff16 => (BitDepth::Sixteen, "tif"),
    };

    let samples: Vec<SampleTruth> = sample_names
        .iter()
        .map(|name| SampleTruth {
            sample: name.clone(),
            factors: [
                rng.uniform(-1.0, 1.0),
                rng.uniform(-1.0, 1.0),
                rng.uniform(-1.0, 1.0),
            ],
            images: (1..=config.images_per_sample)
                .map(|k| format!("{IMAGE_DIR}/{name}_{k}.{ext}"))
                .collect(),
        })
        .collect();

    // Images: one forked stream per (sample, image).
    let jobs: Vec<(usize, usize)> = (0..config.samples)
        .flat_map(|s| (0..config.images_per_sample).map(move |k| (s, k)))
        .collect();
    let image_rng = rng.fork(u64::MAX);
    jobs.par_iter()
        .map(|&(s, k)| -> Result<()> {
            let truth = samples
                .get(s)
                .ok_or_else(|| Error::invalid(format!("synth: no sample {s}")))?;
            let rel = truth
                .images
                .get(k)
                .ok_or_else(|| Error::invalid(format!("synth: no image {k} of sample {s}")))?;
            let mut img_rng = image_rng.fork(((s as u64) << 32) | k as u64);
            let values = render(
                &mut img_rng,
                config.width,
                config.height,
                &Morphology::from_factors(&truth.factors),
            );
            quantize(&values, config.width, config.height, depth)?.save(dir.join(rel))
        })
        .collect::<Result<Vec<()>>>()?;

    // Genes: choose the signal genes, then a base level and effect for each.
    let mut order: Vec<usize> = (0..config.genes).collect();
    for i in 0..config.signal_genes {
        let j = i + rng.below(config.genes - i);
        order.swap(i, j);
    }
    let mut factor_of: Vec<Option<(usize, f64)>> = vec![None; config.genes];
    let mut chosen: Vec<usize> = order.iter().take(config.signal_genes).copied().collect();
    chosen.sort_unstable();
    for (i, &g) in chosen.iter().enumerate() {
        let sign = if rng.next_f64() < 0.5 { -1.0 } else { 1.0 };
        if let Some(slot) = factor_of.get_mut(g) {
            *slot = Some((i % 3, sign * rng.uniform(0.8, 1.5)));
        }
    }
    let base: Vec<f64> = (0..config.genes).map(|_| rng.uniform(4.0, 10.0)).collect();

    let mut counts = Vec::with_capacity(config.samples * config.genes);
    for truth in &samples {
        let log_rate: Vec<f64> = base
            .iter()
            .zip(&factor_of)
            .map(|(&b, effect)| match effect {
                Some((k, coef)) => {
                    let f = truth.factors.get(*k).copied().unwrap_or(0.0);
                    b + coef * f + config.signal_noise_sd * rng.normal()
                }
                None => b + config.noise_gene_sd * rng.normal(),
            })
            .collect();
        let rates: Vec<f64> = log_rate.iter().map(|l| l.exp2()).collect();
        let total: f64 = rates.iter().sum();
        let reads = config.reads_per_sample * rng.uniform(-0.3, 0.3).exp();
        counts.extend(rates.iter().map(|r| rng.poisson(reads * r / total) as f64));
    }
    let expression_csv = dir.join(EXPRESSION_CSV);
    let table = Table::new(sample_names.clone(), gene_names.clone(), counts)?;
    write_atomic(&expression_csv, table.to_csv_string().as_bytes())?;

    let images: Vec<SampleImage> = samples
        .iter()
        .flat_map(|t| {
            t.images.iter().map(|rel| SampleImage {
                sample: t.sample.clone(),
                path: PathBuf::from(rel),
            })
        })
        .collect();
    let samples_csv = dir.join(SAMPLES_CSV);
    write_sample_list(&samples_csv, &images)?;

    let truth = SynthTruth {
        config: config.clone(),
        factor_names: FACTOR_NAMES.iter().map(|s| s.to_string()).collect(),
        signal_genes: gene_names
            .iter()
            .zip(&factor_of)
            .filter_map(|(gene, effect)| {
                effect.map(|(factor, coefficient)| SignalGene {
                    gene: gene.clone(),
                    factor,
                    coefficient,
                })
            })
            .collect(),
        noise_genes: gene_names
            .iter()
            .zip(&factor_of)
            .filter(|(_, effect)| effect.is_none())
            .map(|(gene, _)| gene.clone())
            .collect(),
        samples,
    };
    let truth_json = dir.join(TRUTH_JSON);
    let json = serde_json::to_string_pretty(&truth)
        .map_err(|e| Error::format(&truth_json, e.to_string()))?;
    write_atomic(&truth_json, json.as_bytes())?;

    Ok(SynthOutput {
        samples_csv,
        expression_csv,
        truth_json,
        images: images
            .into_iter()
            .map(|e| SampleImage {
                sample: e.sample,
                path: dir.join(e.path),
            })
            .collect(),
        truth,
    })
}
