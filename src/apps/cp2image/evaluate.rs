//! `cellmorph cp2image evaluate`: how close a generator's images are to the
//! real cells they were made from, on cells it did not train on, against
//! two baselines, and whether simple measurements of the cells survive.
//!
//! - Pixel MSE of generated vs real, beside the MSE of the mean training
//!   image and of the nearest training cell in standardized feature space
//!   (Euclidean): a generator that beats neither has learned nothing the
//!   features did not give a lookup.
//! - SSIM (Wang et al. 2004): 11×11 Gaussian window, σ = 1.5, data range
//!   1, C1 = 0.01², C2 = 0.03², over the window positions inside the image
//!   (no padding), averaged over positions, channels and cells.
//! - Feature fidelity: per channel the mean intensity, the object (the
//!   pixels above the image's own midpoint (min + max)/2) with its area and
//!   integrated intensity, and the mean intensity in four rings around the
//!   centre; each computed the same way on real and generated cells, with
//!   the Pearson r across the held-out cells per measurement.
//!
//! FID needs Inception-v3 weights and is not computed.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::backend::Backend;
use crate::csv::CsvFile;
use crate::error::{Error, Result};
use crate::stats::regression::pearson;

use super::features::FeatureTable;
use super::generator::{GeneratorOptions, LoadedGenerator};
use super::sheets::CropSet;

/// What `cp2image evaluate` reads.
#[derive(Clone, Debug)]
pub struct EvaluateOptions {
    /// The generator (and its standardization file).
    pub generator: GeneratorOptions,
    /// The feature table the generator was trained on (ids = crop indices).
    pub features: PathBuf,
    /// The crops.
    pub crops: PathBuf,
    /// `id,split` (`train`/`val`), as `cp2image train` writes it.
    pub split: PathBuf,
}

/// One measurement's agreement between real and generated cells.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Fidelity {
    /// e.g. `mean_intensity_c0`.
    pub measurement: String,
    /// Pearson r across the held-out cells (`None` when a side is constant).
    pub pearson_r: Option<f64>,
}

/// The report (`report.json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// Held-out cells evaluated.
    pub cells: usize,
    /// Training cells behind the baselines.
    pub training_cells: usize,
    /// Pixel MSE of the generated images.
    pub mse: f64,
    /// Pixel MSE of the mean training image.
    pub mse_mean_image: f64,
    /// Pixel MSE of the nearest training cell in feature space.
    pub mse_nearest_cell: f64,
    /// Mean SSIM of the generated images.
    pub ssim: f64,
    /// Mean SSIM of the mean training image.
    pub ssim_mean_image: f64,
    /// Mean SSIM of the nearest training cell.
    pub ssim_nearest_cell: f64,
    /// Per measurement, real vs generated.
    pub fidelity: Vec<Fidelity>,
    /// Mean of the defined Pearson r values.
    pub fidelity_mean_r: Option<f64>,
    /// What is not computed, and why.
    pub not_computed: Vec<String>,
}

fn read_split(path: &Path, table: &FeatureTable) -> Result<(Vec<usize>, Vec<usize>)> {
    let csv = CsvFile::read(path)?;
    let (id_col, split_col) = match (csv.column("id"), csv.column("split")) {
        (Some(a), Some(b)) => (a, b),
        _ => return Err(csv.line_error(csv.header.line, "the header must name `id` and `split`")),
    };
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for row in &csv.rows {
        let id = row.get(id_col);
        let r = table
            .row_index(id)
            .map_err(|e| csv.line_error(row.line, e))?;
        match row.get(split_col) {
            "train" => train.push(r),
            "val" => val.push(r),
            other => {
                return Err(csv.line_error(
                    row.line,
                    format!("split {other:?} is neither `train` nor `val`"),
                ))
            }
        }
    }
    if train.is_empty() || val.is_empty() {
        return Err(Error::format(
            path,
            format!(
                "{} training and {} held-out cells: both are needed",
                train.len(),
                val.len()
            ),
        ));
    }
    Ok((train, val))
}

/// The 11-tap Gaussian (σ 1.5), normalized.
fn gaussian11() -> [f64; 11] {
    let mut g = [0.0; 11];
    for (i, v) in g.iter_mut().enumerate() {
        let x = i as f64 - 5.0;
        *v = (-x * x / (2.0 * 1.5 * 1.5)).exp();
    }
    let s: f64 = g.iter().sum();
    g.map(|v| v / s)
}

/// Mean SSIM of two `[c, size, size]` images in [0, 1] (module docs).
pub fn ssim(a: &[f32], b: &[f32], channels: usize, size: usize) -> Result<f64> {
    if size < 11 || a.len() != channels * size * size || b.len() != a.len() || channels == 0 {
        return Err(Error::invalid(format!(
            "ssim: images of {channels}×{size}×{size} (at least 11×11) expected, got {} and {} values",
            a.len(),
            b.len()
        )));
    }
    let g = gaussian11();
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let out = size - 10;
    let mut total = 0.0;
    for c in 0..channels {
        let pa = &a[c * size * size..][..size * size];
        let pb = &b[c * size * size..][..size * size];
        for y in 0..out {
            for x in 0..out {
                let (mut ma, mut mb, mut saa, mut sbb, mut sab) = (0.0, 0.0, 0.0, 0.0, 0.0);
                for (dy, gy) in g.iter().enumerate() {
                    for (dx, gx) in g.iter().enumerate() {
                        let w = gy * gx;
                        let i = (y + dy) * size + x + dx;
                        let (va, vb) = (f64::from(pa[i]), f64::from(pb[i]));
                        ma += w * va;
                        mb += w * vb;
                        saa += w * va * va;
                        sbb += w * vb * vb;
                        sab += w * va * vb;
                    }
                }
                let (va, vb, cov) = (saa - ma * ma, sbb - mb * mb, sab - ma * mb);
                total += ((2.0 * ma * mb + c1) * (2.0 * cov + c2))
                    / ((ma * ma + mb * mb + c1) * (va + vb + c2));
            }
        }
    }
    Ok(total / (channels * out * out) as f64)
}

/// The measurements of one `[c, size, size]` cell (module docs), in the
/// order of [`measurement_names`].
pub fn measurements(img: &[f32], channels: usize, size: usize) -> Vec<f64> {
    let plane = size * size;
    let centre = (size as f64 - 1.0) / 2.0;
    let ring_width = size as f64 / 2.0 / 4.0;
    let mut out = Vec::with_capacity(channels * 7);
    for c in 0..channels {
        let p = &img[c * plane..][..plane];
        let sum: f64 = p.iter().map(|&v| f64::from(v)).sum();
        let (lo, hi) = p
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                (l.min(v), h.max(v))
            });
        let mid = (lo + hi) / 2.0;
        let object = p.iter().filter(|&&v| hi > lo && v > mid);
        let (area, object_sum) = object.fold((0.0, 0.0), |(a, s), &v| (a + 1.0, s + f64::from(v)));
        let (mut rings, mut counts) = ([0.0f64; 4], [0usize; 4]);
        for y in 0..size {
            for x in 0..size {
                let r = ((y as f64 - centre).powi(2) + (x as f64 - centre).powi(2)).sqrt();
                let k = (r / ring_width) as usize;
                if k < 4 {
                    rings[k] += f64::from(p[y * size + x]);
                    counts[k] += 1;
                }
            }
        }
        out.push(sum / plane as f64);
        out.push(area);
        out.push(object_sum);
        for k in 0..4 {
            out.push(rings[k] / counts[k].max(1) as f64);
        }
    }
    out
}

/// Names of [`measurements`] for `channels` channels.
pub fn measurement_names(channels: usize) -> Vec<String> {
    let mut v = Vec::new();
    for c in 0..channels {
        v.push(format!("mean_intensity_c{c}"));
        v.push(format!("object_area_c{c}"));
        v.push(format!("object_integrated_intensity_c{c}"));
        for k in 0..4 {
            v.push(format!("radial_ring{k}_c{c}"));
        }
    }
    v
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        / a.len().max(1) as f64
}

/// Evaluates the generator on the held-out cells of the split.
pub fn evaluate(be: &Backend, o: &EvaluateOptions) -> Result<Report> {
    let g = LoadedGenerator::open(be, &o.generator)?;
    let table = g.read_table(&o.features)?;
    let crops = CropSet::read(&o.crops)?;
    let (train, val) = read_split(&o.split, &table)?;
    let cfg = g.info().config;
    let size = cfg.image_size();
    if crops.size != size || crops.channels != cfg.out_channels {
        return Err(Error::format(
            &o.crops,
            format!(
                "crops are {}×{s}×{s}, the generator makes {}×{size}×{size}",
                crops.channels,
                cfg.out_channels,
                s = crops.size
            ),
        ));
    }
    let cell = |r: usize| crops.index_of(&table.ids[r]).and_then(|i| crops.crop(i));
    let z = g.standardizer.apply_table(&table)?;
    let p = table.n_features();
    let mut zv = Vec::with_capacity(val.len() * p);
    for &r in &val {
        zv.extend_from_slice(&z[r * p..(r + 1) * p]);
    }
    let generated = g.generate(be, &zv)?;
    let len = g.image_len();

    let mut mean_image = vec![0.0f64; len];
    for &r in &train {
        for (m, v) in mean_image.iter_mut().zip(cell(r)?) {
            *m += f64::from(v);
        }
    }
    let mean_image: Vec<f32> = mean_image
        .iter()
        .map(|m| (m / train.len() as f64) as f32)
        .collect();

    let ch = cfg.out_channels;
    let (mut m, mut m_mean, mut m_near) = (0.0, 0.0, 0.0);
    let (mut s, mut s_mean, mut s_near) = (0.0, 0.0, 0.0);
    let names = measurement_names(ch);
    let (mut real_meas, mut fake_meas) = (
        vec![Vec::with_capacity(val.len()); names.len()],
        vec![Vec::with_capacity(val.len()); names.len()],
    );
    for (k, &r) in val.iter().enumerate() {
        let real = cell(r)?;
        let fake = &generated[k * len..(k + 1) * len];
        let zr = &z[r * p..(r + 1) * p];
        let nearest = train
            .iter()
            .map(|&t| {
                let d: f64 = z[t * p..(t + 1) * p]
                    .iter()
                    .zip(zr)
                    .map(|(&a, &b)| f64::from(a - b).powi(2))
                    .sum();
                (d, t)
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, t)| t)
            .ok_or_else(|| Error::invalid("no training cell"))?;
        let near = cell(nearest)?;
        m += mse(fake, &real);
        m_mean += mse(&mean_image, &real);
        m_near += mse(&near, &real);
        s += ssim(fake, &real, ch, size)?;
        s_mean += ssim(&mean_image, &real, ch, size)?;
        s_near += ssim(&near, &real, ch, size)?;
        for (i, v) in measurements(&real, ch, size).into_iter().enumerate() {
            real_meas[i].push(v);
        }
        for (i, v) in measurements(fake, ch, size).into_iter().enumerate() {
            fake_meas[i].push(v);
        }
    }
    let n = val.len() as f64;
    let fidelity: Vec<Fidelity> = names
        .into_iter()
        .enumerate()
        .map(|(i, name)| Fidelity {
            measurement: name,
            pearson_r: pearson(&real_meas[i], &fake_meas[i]).ok().map(|(r, _)| r),
        })
        .collect();
    let defined: Vec<f64> = fidelity.iter().filter_map(|f| f.pearson_r).collect();
    Ok(Report {
        cells: val.len(),
        training_cells: train.len(),
        mse: m / n,
        mse_mean_image: m_mean / n,
        mse_nearest_cell: m_near / n,
        ssim: s / n,
        ssim_mean_image: s_mean / n,
        ssim_nearest_cell: s_near / n,
        fidelity_mean_r: (!defined.is_empty())
            .then(|| defined.iter().sum::<f64>() / defined.len() as f64),
        fidelity,
        not_computed: vec!["FID: needs Inception-v3 weights, which cellmorph does not ship".into()],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssim_is_one_for_equal_images_and_drops_with_noise() {
        let size = 16;
        let a: Vec<f32> = (0..size * size).map(|i| (i % 7) as f32 / 7.0).collect();
        assert!((ssim(&a, &a, 1, size).unwrap() - 1.0).abs() < 1e-12);
        let b: Vec<f32> = a
            .iter()
            .enumerate()
            .map(|(i, v)| v + if i % 2 == 0 { 0.2 } else { -0.2 })
            .collect();
        let s = ssim(&a, &b, 1, size).unwrap();
        assert!(s < 0.9 && s > -1.0, "{s}");
        assert!(ssim(&a, &a, 1, 10).is_err());
    }

    #[test]
    fn measurements_see_a_bright_centre() {
        let size = 16;
        let mut img = vec![0.0f32; size * size];
        for y in 6..10 {
            for x in 6..10 {
                img[y * size + x] = 1.0;
            }
        }
        let m = measurements(&img, 1, size);
        assert_eq!(m.len(), measurement_names(1).len());
        assert_eq!(m[0], 16.0 / 256.0, "mean intensity");
        assert_eq!(m[1], 16.0, "area above the midpoint");
        assert_eq!(m[2], 16.0, "the object's integrated intensity");
        assert!(m[3] > m[6], "the inner ring is brighter than the outer one");
    }
}
