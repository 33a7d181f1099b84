//! CP2Image around the model (`crate::models::cp2image`): feature tables,
//! standardization, the paper's feature manipulation (Figure 4c) and
//! interpolation (Figure 5a, 5c), and contact sheets that put real crops
//! beside generated images.
//!
//! - [`FeatureTable`] reads a CSV of CellProfiler features, one row per cell:
//!   the first column names the row (`cell_id`), feature columns must hold
//!   finite numbers, and every other column (`field`, centroids) is kept as
//!   text. This is the layout of `shared/data/single_cells/features.csv`.
//! - [`Standardizer`]: per-feature mean and standard deviation (population,
//!   as scikit-learn's `StandardScaler`; a zero deviation counts as 1), saved
//!   as JSON with the feature names, by default beside the generator's
//!   weights ([`Standardizer::default_path`]). The generator takes
//!   `z = (x − mean) / std`.
//! - [`manipulation`], [`replacement_path`], [`linear_path`]: the feature
//!   vectors the figures are drawn from, in standardized units;
//!   [`cosine_similarity`] labels the interpolation steps.
//! - [`CropSet`] reads the real crops (`cells.safetensors`, tensor `crops`
//!   u8 `[N, C, S, S]`), [`Sheet`] lays out rows of captioned tiles and
//!   writes a PNG; [`DisplayScale`] maps channels to colours the way the data
//!   set's preview does (channel 0 → blue, 1 → green, 2 → red, each divided
//!   by its 99.5th percentile, for display only: the real crops by theirs
//!   and the generated images by theirs, since a generator's output range
//!   depends on how its training targets were scaled).
//!
//! # Examples on the real single-cell set
//!
//! `shared/data/single_cells` has p = 405 features per cell, and there is no
//! trained CP2Image generator with p = 405 (the fixture's has p = 32). The
//! examples therefore use a generator with seeded random weights
//! (`cp2image init-weights`, [`crate::models::cp2image::random_generator_weights`]):
//! the real features and crops go through the whole pipeline, but the
//! generated images are not predictions of how the cells look. Weights made
//! this way carry a metadata note, and every command that loads them says
//! so on stderr and in the contact sheet's title.
//!
//! ```text
//! D=../shared/data/single_cells
//! cellmorph cp2image init-weights --features 405 --output g405.safetensors --seed 1
//! cellmorph cp2image standardize --features $D/features.csv --weights g405.safetensors
//! cellmorph cp2image generate --weights g405.safetensors --features $D/features.csv \
//!     --crops $D/cells.safetensors --limit 24 --output sheet.png
//! cellmorph cp2image manipulate --weights g405.safetensors --features $D/features.csv \
//!     --crops $D/cells.safetensors --feature Nuclei_AreaShape_Area --row 12 --output area.png
//! cellmorph cp2image interpolate --weights g405.safetensors --features $D/features.csv \
//!     --crops $D/cells.safetensors --from-row 4 --to-row 15 --output interp.png
//! cellmorph cp2image interpolate --weights g405.safetensors --features $D/features.csv \
//!     --crops $D/cells.safetensors --group-means --from-group 01_POS002 --to-group 01_POS218 \
//!     --output groups.png
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::io::{write_atomic, TensorFile};
use crate::models::cp2image::Generator;
use crate::plot::save_png;
use crate::tensor::Tensor;
use crate::{Error, Result};

/// Columns of the single-cell feature tables that describe the cell's place
/// in the field rather than the cell: never used as features unless named
/// explicitly.
pub const METADATA_COLUMNS: &[&str] = &["field", "centroid_y", "centroid_x"];

/// Which columns of a CSV are features.
#[derive(Clone, Copy, Debug)]
pub enum FeatureColumns<'a> {
    /// Every column after the first except [`METADATA_COLUMNS`]; a
    /// non-numeric cell in any of them is an error.
    AllButMetadata,
    /// Exactly these, in this order (the CSV may order them differently and
    /// hold other columns); a missing one is an error.
    Named(&'a [String]),
}

/// A table of raw feature values, one row per cell.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureTable {
    /// Row names (the CSV's first column), in file order.
    pub ids: Vec<String>,
    /// Feature names, in column order of `values`.
    pub names: Vec<String>,
    /// Values, row-major `[ids.len(), names.len()]`.
    pub values: Vec<f64>,
    /// The non-feature columns as text: (name, one value per row).
    pub text_columns: Vec<(String, Vec<String>)>,
}

impl FeatureTable {
    /// Reads a feature CSV (see the module documentation).
    pub fn read_csv(path: impl AsRef<Path>, columns: FeatureColumns<'_>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse_csv(&text, path, columns)
    }

    /// Parses CSV text; `origin` names the source in error messages.
    pub fn parse_csv(
        text: &str,
        origin: impl AsRef<Path>,
        columns: FeatureColumns<'_>,
    ) -> Result<Self> {
        let origin = origin.as_ref();
        let fail = |line: usize, msg: String| Error::format(origin, format!("line {line}: {msg}"));
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
            .filter(|(_, l)| !l.trim().is_empty());
        let (header_line, header) = lines
            .next()
            .ok_or_else(|| Error::format(origin, "empty file: no header row"))?;
        let header = crate::table::split_fields(header).map_err(|m| fail(header_line, m))?;
        let mut position: HashMap<&str, usize> = HashMap::new();
        for (i, name) in header.iter().enumerate().skip(1) {
            if position.insert(name.as_str(), i).is_some() {
                return Err(fail(header_line, format!("duplicate column name {name:?}")));
            }
        }
        let feature_cols: Vec<usize> = match columns {
            FeatureColumns::AllButMetadata => (1..header.len())
                .filter(|&i| !METADATA_COLUMNS.contains(&header[i].as_str()))
                .collect(),
            FeatureColumns::Named(names) => {
                let missing: Vec<&str> = names
                    .iter()
                    .map(String::as_str)
                    .filter(|n| !position.contains_key(n))
                    .collect();
                if !missing.is_empty() {
                    return Err(Error::format(
                        origin,
                        format!(
                            "{} of the {} features needed are not columns of this table: {}{}",
                            missing.len(),
                            names.len(),
                            missing[..missing.len().min(5)].join(", "),
                            if missing.len() > 5 { ", …" } else { "" }
                        ),
                    ));
                }
                names.iter().map(|n| position[n.as_str()]).collect()
            }
        };
        if feature_cols.is_empty() {
            return Err(fail(header_line, "no feature columns".into()));
        }
        let is_feature: Vec<bool> = {
            let mut v = vec![false; header.len()];
            for &c in &feature_cols {
                v[c] = true;
            }
            v
        };
        let text_cols: Vec<usize> = (1..header.len()).filter(|&i| !is_feature[i]).collect();

        let mut ids = Vec::new();
        let mut values = Vec::new();
        let mut text_values: Vec<Vec<String>> = vec![Vec::new(); text_cols.len()];
        let mut row = vec![0.0f64; header.len()];
        for (line_no, line) in lines {
            let fields = crate::table::split_fields(line).map_err(|m| fail(line_no, m))?;
            if fields.len() != header.len() {
                return Err(fail(
                    line_no,
                    format!(
                        "{} fields, but the header has {}",
                        fields.len(),
                        header.len()
                    ),
                ));
            }
            for &c in &feature_cols {
                let cell = fields[c].trim();
                let v: f64 = cell.parse().map_err(|_| {
                    fail(
                        line_no,
                        format!(
                            "column {} ({:?}): {cell:?} is not a number",
                            c + 1,
                            header[c]
                        ),
                    )
                })?;
                if !v.is_finite() {
                    return Err(fail(
                        line_no,
                        format!(
                            "column {} ({:?}): {cell:?} is not finite (NaN and infinities cannot be standardized)",
                            c + 1,
                            header[c]
                        ),
                    ));
                }
                row[c] = v;
            }
            values.extend(feature_cols.iter().map(|&c| row[c]));
            for (acc, &c) in text_values.iter_mut().zip(&text_cols) {
                acc.push(fields[c].clone());
            }
            ids.push(fields[0].clone());
        }
        if ids.is_empty() {
            return Err(Error::format(origin, "no data rows"));
        }
        Ok(FeatureTable {
            ids,
            names: feature_cols.iter().map(|&c| header[c].clone()).collect(),
            values,
            text_columns: text_cols
                .iter()
                .map(|&c| header[c].clone())
                .zip(text_values)
                .collect(),
        })
    }

    /// Number of rows.
    pub fn n_rows(&self) -> usize {
        self.ids.len()
    }

    /// Number of features.
    pub fn n_features(&self) -> usize {
        self.names.len()
    }

    /// Row `r`'s values, or an error when out of range.
    pub fn row(&self, r: usize) -> Result<&[f64]> {
        let p = self.n_features();
        self.values.get(r * p..(r + 1) * p).ok_or_else(|| {
            Error::invalid(format!("row {r} is out of range ({} rows)", self.n_rows()))
        })
    }

    /// The index of the row named `id`; the error shows a few names.
    pub fn row_index(&self, id: &str) -> Result<usize> {
        self.ids.iter().position(|r| r == id).ok_or_else(|| {
            Error::invalid(format!(
                "no row named {id:?} (rows are named by the first column, e.g. {})",
                self.ids[..self.ids.len().min(3)].join(", ")
            ))
        })
    }

    /// The text column `name`.
    pub fn text_column(&self, name: &str) -> Result<&[String]> {
        self.text_columns
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .ok_or_else(|| {
                let have: Vec<&str> = self.text_columns.iter().map(|(n, _)| n.as_str()).collect();
                Error::invalid(format!(
                    "no non-feature column {name:?}; the table has {}",
                    if have.is_empty() {
                        "none".to_string()
                    } else {
                        have.join(", ")
                    }
                ))
            })
    }

    /// The rows whose text column `column` equals `value`.
    pub fn group_rows(&self, column: &str, value: &str) -> Result<Vec<usize>> {
        let col = self.text_column(column)?;
        let rows: Vec<usize> = (0..col.len()).filter(|&r| col[r] == value).collect();
        if rows.is_empty() {
            let mut values: Vec<&str> = col.iter().map(String::as_str).collect();
            values.sort_unstable();
            values.dedup();
            return Err(Error::invalid(format!(
                "no row has {column} = {value:?}; its values are {}{}",
                values[..values.len().min(8)].join(", "),
                if values.len() > 8 { ", …" } else { "" }
            )));
        }
        Ok(rows)
    }

    /// The mean raw feature vector of `rows`.
    pub fn mean_of(&self, rows: &[usize]) -> Result<Vec<f64>> {
        if rows.is_empty() {
            return Err(Error::invalid("the mean of no rows is undefined"));
        }
        let mut acc = vec![0.0; self.n_features()];
        for &r in rows {
            for (a, v) in acc.iter_mut().zip(self.row(r)?) {
                *a += v;
            }
        }
        Ok(acc.into_iter().map(|a| a / rows.len() as f64).collect())
    }
}

/// Per-feature standardization `z = (x − mean) / std`, as saved beside a
/// generator's weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Standardizer {
    /// Feature names, in the generator's input order.
    pub features: Vec<String>,
    /// Per-feature mean.
    pub mean: Vec<f64>,
    /// Per-feature standard deviation (never zero).
    pub std: Vec<f64>,
}

impl Standardizer {
    /// Mean and population standard deviation of every feature of `table`;
    /// a constant feature gets deviation 1 (so it standardizes to 0).
    pub fn fit(table: &FeatureTable) -> Result<Self> {
        let (n, p) = (table.n_rows(), table.n_features());
        if n == 0 {
            return Err(Error::invalid("cannot standardize a table without rows"));
        }
        let mut mean = vec![0.0f64; p];
        for r in 0..n {
            for (m, v) in mean.iter_mut().zip(table.row(r)?) {
                *m += v;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        // Two passes: the scales span 1e-9 … 1e8, so E[x²] − E[x]² would cancel.
        let mut var = vec![0.0f64; p];
        for r in 0..n {
            for ((s, v), m) in var.iter_mut().zip(table.row(r)?).zip(&mean) {
                *s += (v - m) * (v - m);
            }
        }
        let std = var
            .into_iter()
            .map(|s| {
                let sd = (s / n as f64).sqrt();
                if sd > 0.0 {
                    sd
                } else {
                    1.0
                }
            })
            .collect();
        Ok(Standardizer {
            features: table.names.clone(),
            mean,
            std,
        })
    }

    /// Number of features.
    pub fn len(&self) -> usize {
        self.features.len()
    }

    /// True when there are no features.
    pub fn is_empty(&self) -> bool {
        self.features.is_empty()
    }

    /// `<weights directory>/<weights file name without .safetensors>.standardize.json`.
    pub fn default_path(weights: &Path) -> PathBuf {
        let name = weights
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stem = name.strip_suffix(".safetensors").unwrap_or(&name);
        weights.with_file_name(format!("{stem}.standardize.json"))
    }

    /// Reads and validates a standardization file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let s: Standardizer = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not a standardization file: {e}")))?;
        s.validate()
            .map_err(|e| Error::format(path, e.to_string()))?;
        Ok(s)
    }

    /// Writes the file as JSON (atomically).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.validate()?;
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::format(path, format!("encoding JSON: {e}")))?;
        write_atomic(path, text.as_bytes())
    }

    fn validate(&self) -> Result<()> {
        let p = self.features.len();
        if p == 0 || self.mean.len() != p || self.std.len() != p {
            return Err(Error::invalid(format!(
                "{} feature names, {} means and {} deviations: they must be equal and nonzero",
                p,
                self.mean.len(),
                self.std.len()
            )));
        }
        if let Some(i) = (0..p)
            .find(|&i| !(self.mean[i].is_finite() && self.std[i].is_finite() && self.std[i] > 0.0))
        {
            return Err(Error::invalid(format!(
                "feature {:?}: mean {} and deviation {} must be finite with a positive deviation",
                self.features[i], self.mean[i], self.std[i]
            )));
        }
        Ok(())
    }

    /// Fails unless the generator takes exactly these features.
    pub fn check_generator(&self, n_features: usize) -> Result<()> {
        if self.len() != n_features {
            return Err(Error::invalid(format!(
                "the standardization file has {} features but the generator takes {n_features}; they must come from the same training set",
                self.len()
            )));
        }
        Ok(())
    }

    /// Standardizes one raw feature vector.
    pub fn apply(&self, raw: &[f64]) -> Result<Vec<f32>> {
        if raw.len() != self.len() {
            return Err(Error::invalid(format!(
                "feature vector of length {}, expected {}",
                raw.len(),
                self.len()
            )));
        }
        if let Some(i) = raw.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(format!(
                "feature {:?} is {} (NaN and infinities cannot be standardized)",
                self.features[i], raw[i]
            )));
        }
        Ok(raw
            .iter()
            .zip(self.mean.iter().zip(&self.std))
            .map(|(x, (m, s))| ((x - m) / s) as f32)
            .collect())
    }

    /// Standardizes every row of `table`, whose features must be this
    /// file's features in this order (read it with
    /// `FeatureColumns::Named(&self.features)`): `[rows, p]` row-major.
    pub fn apply_table(&self, table: &FeatureTable) -> Result<Vec<f32>> {
        if table.names != self.features {
            return Err(Error::invalid(
                "the table's feature columns are not the standardization file's features in order",
            ));
        }
        let mut z = Vec::with_capacity(table.values.len());
        for r in 0..table.n_rows() {
            z.extend(self.apply(table.row(r)?)?);
        }
        Ok(z)
    }
}

/// The index of a feature given by name or by 0-based index. Unknown names
/// get an error with the names that contain the text, case-insensitively.
pub fn resolve_feature(names: &[String], spec: &str) -> Result<usize> {
    if let Some(i) = names.iter().position(|n| n == spec) {
        return Ok(i);
    }
    if let Ok(i) = spec.trim().parse::<usize>() {
        if i < names.len() {
            return Ok(i);
        }
        return Err(Error::invalid(format!(
            "feature index {i} is out of range: there are {} features (0 … {})",
            names.len(),
            names.len().saturating_sub(1)
        )));
    }
    let needle = spec.to_ascii_lowercase();
    let near: Vec<&str> = names
        .iter()
        .filter(|n| n.to_ascii_lowercase().contains(&needle))
        .map(String::as_str)
        .take(5)
        .collect();
    Err(Error::invalid(format!(
        "unknown feature {spec:?}{}",
        if near.is_empty() {
            format!(
                " ({} features, e.g. {})",
                names.len(),
                names[..names.len().min(3)].join(", ")
            )
        } else {
            format!("; did you mean {}?", near.join(", "))
        }
    )))
}

/// `steps` evenly spaced values from `from` to `to` inclusive.
pub fn linspace(from: f64, to: f64, steps: usize) -> Result<Vec<f64>> {
    if steps < 2 || !from.is_finite() || !to.is_finite() {
        return Err(Error::invalid(format!(
            "a range needs finite ends and at least 2 steps, got {from} … {to} in {steps}"
        )));
    }
    Ok((0..steps)
        .map(|i| from + (to - from) * i as f64 / (steps - 1) as f64)
        .collect())
}

/// Figure 4c: copies of `base` (standardized) with feature `feature` set to
/// each of `values` (standardized units: deviations from the mean); the
/// other features stay fixed. Row-major `[values.len(), p]`.
pub fn manipulation(base: &[f32], feature: usize, values: &[f64]) -> Result<Vec<f32>> {
    if feature >= base.len() {
        return Err(Error::invalid(format!(
            "feature index {feature} is out of range for vectors of length {}",
            base.len()
        )));
    }
    let mut out = Vec::with_capacity(values.len() * base.len());
    for &v in values {
        let start = out.len();
        out.extend_from_slice(base);
        out[start + feature] = v as f32;
    }
    Ok(out)
}

/// Figure 5a: from `from` to `to`, replacing `per_step` dimensions at a
/// time, most different (largest |to − from|, ties by index) first. Returns
/// `⌈p / per_step⌉ + 1` vectors, row-major, the first `from` and the last
/// `to`.
pub fn replacement_path(from: &[f32], to: &[f32], per_step: usize) -> Result<Vec<f32>> {
    check_pair(from, to)?;
    if per_step == 0 {
        return Err(Error::invalid("dimensions per step must be at least 1"));
    }
    let p = from.len();
    let mut order: Vec<usize> = (0..p).collect();
    order.sort_by(|&a, &b| {
        let (da, db) = ((to[a] - from[a]).abs(), (to[b] - from[b]).abs());
        db.total_cmp(&da).then(a.cmp(&b))
    });
    let mut current = from.to_vec();
    let mut out = current.clone();
    for chunk in order.chunks(per_step) {
        for &i in chunk {
            current[i] = to[i];
        }
        out.extend_from_slice(&current);
    }
    Ok(out)
}

/// Figure 5c: `steps` points on the straight line from `from` to `to`
/// (both included), row-major.
pub fn linear_path(from: &[f32], to: &[f32], steps: usize) -> Result<Vec<f32>> {
    check_pair(from, to)?;
    let ts = linspace(0.0, 1.0, steps)?;
    Ok(ts
        .iter()
        .flat_map(|&t| {
            from.iter()
                .zip(to)
                .map(move |(&a, &b)| (f64::from(a) + t * (f64::from(b) - f64::from(a))) as f32)
        })
        .collect())
}

fn check_pair(from: &[f32], to: &[f32]) -> Result<()> {
    if from.len() != to.len() || from.is_empty() {
        return Err(Error::invalid(format!(
            "interpolation needs two vectors of the same nonzero length, got {} and {}",
            from.len(),
            to.len()
        )));
    }
    if from.iter().chain(to).any(|v| !v.is_finite()) {
        return Err(Error::invalid("interpolation endpoints must be finite"));
    }
    Ok(())
}

/// Cosine similarity of two vectors (0 when either is all zeros).
pub fn cosine_similarity(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

/// The row of `z` (`[rows, p]` row-major) nearest to `target` in
/// Euclidean distance.
pub fn nearest_row(z: &[f32], p: usize, target: &[f32]) -> Option<usize> {
    z.chunks_exact(p.max(1))
        .map(|row| {
            row.iter()
                .zip(target)
                .map(|(&a, &b)| f64::from(a - b).powi(2))
                .sum::<f64>()
        })
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

/// Runs the generator on standardized vectors `z` (`[rows, p]` row-major)
/// in batches of `batch`; returns the images `[rows, C, S, S]` row-major.
pub fn generate(be: &Backend, g: &Generator, z: &[f32], batch: usize) -> Result<Vec<f32>> {
    let p = g.config().n_features;
    if batch == 0 {
        return Err(Error::invalid("batch size must be at least 1"));
    }
    if !z.len().is_multiple_of(p) {
        return Err(Error::invalid(format!(
            "{} values are not whole feature vectors of length {p}",
            z.len()
        )));
    }
    let mut images = Vec::new();
    for chunk in z.chunks(batch * p) {
        let x = Tensor::from_slice(be, &[chunk.len() / p, p], chunk)?;
        images.extend(g.forward(be, &x)?.to_vec()?);
    }
    Ok(images)
}

/// Real single-cell crops: u8 `[N, C, S, S]`.
#[derive(Clone, Debug)]
pub struct CropSet {
    /// Number of crops.
    pub n: usize,
    /// Channels.
    pub channels: usize,
    /// Side in pixels.
    pub size: usize,
    /// Pixels, `[n, channels, size, size]` row-major.
    pub pixels: Vec<u8>,
}

impl CropSet {
    /// Reads tensor `crops` (an integer tensor with values 0 … 255, shape
    /// `[N, C, S, S]`) from a safetensors file such as
    /// `single_cells/cells.safetensors`.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let file = TensorFile::open(path)?;
        let (shape, values) = file.i64("crops")?;
        let [n, channels, h, w] = match shape.as_slice() {
            &[n, c, h, w] => [n, c, h, w],
            s => {
                return Err(Error::format(
                    file.path(),
                    format!("tensor \"crops\" has shape {s:?}, expected [N, C, S, S]"),
                ))
            }
        };
        if h != w {
            return Err(Error::format(
                file.path(),
                format!("crops are {h}×{w}, not square"),
            ));
        }
        let pixels = values
            .iter()
            .map(|&v| u8::try_from(v))
            .collect::<std::result::Result<Vec<u8>, _>>()
            .map_err(|_| {
                Error::format(file.path(), "tensor \"crops\" holds values outside 0 … 255")
            })?;
        Ok(CropSet {
            n,
            channels,
            size: h,
            pixels,
        })
    }

    /// Crop `i` scaled to [0, 1] (`p / 255`), `[C, S, S]`.
    pub fn crop(&self, i: usize) -> Result<Vec<f32>> {
        let len = self.channels * self.size * self.size;
        self.pixels
            .get(i * len..(i + 1) * len)
            .map(|px| px.iter().map(|&p| f32::from(p) / 255.0).collect())
            .ok_or_else(|| Error::invalid(format!("crop {i} is out of range ({} crops)", self.n)))
    }

    /// The crop index of a feature-table row id (`cell_id` is the row index
    /// of the crops in the single-cell sets).
    pub fn index_of(&self, id: &str) -> Result<usize> {
        match id.trim().parse::<usize>() {
            Ok(i) if i < self.n => Ok(i),
            Ok(i) => Err(Error::invalid(format!(
                "row id {i} has no crop: the crop file holds {} crops",
                self.n
            ))),
            Err(_) => Err(Error::invalid(format!(
                "row id {id:?} is not a crop index: with --crops, the table's first column must be the cell's index in the crop file (cell_id)"
            ))),
        }
    }
}

/// How image channels become display colours: channel 0 → blue, 1 →
/// green, 2 → red (a single channel is grey), each divided by `max[c]`
/// (in [0, 1] units) and clipped.
#[derive(Clone, Debug, PartialEq)]
pub struct DisplayScale {
    /// Per-channel value shown at full brightness.
    pub max: Vec<f32>,
}

impl DisplayScale {
    /// Full range: a value of 1 is full brightness.
    pub fn unit(channels: usize) -> Self {
        DisplayScale {
            max: vec![1.0; channels],
        }
    }

    /// Each channel stretched to its `percentile` (e.g. 99.5) over the
    /// given crops, as the data set's preview; at least one grey level.
    pub fn from_crops(crops: &CropSet, indices: &[usize], percentile: f64) -> Result<Self> {
        let len = crops.size * crops.size;
        let mut max = Vec::with_capacity(crops.channels);
        for c in 0..crops.channels {
            let mut hist = [0u64; 256];
            for &i in indices {
                let start = (i * crops.channels + c) * len;
                let plane = crops.pixels.get(start..start + len).ok_or_else(|| {
                    Error::invalid(format!("crop {i} is out of range ({} crops)", crops.n))
                })?;
                for &p in plane {
                    hist[usize::from(p)] += 1;
                }
            }
            let total: u64 = hist.iter().sum();
            let want = (total as f64 * percentile / 100.0).ceil() as u64;
            let mut seen = 0;
            let level = hist
                .iter()
                .position(|&h| {
                    seen += h;
                    seen >= want
                })
                .unwrap_or(255);
            max.push(level.max(1) as f32 / 255.0);
        }
        Ok(DisplayScale { max })
    }

    /// Each channel stretched to its `percentile` over images
    /// `[N, channels, plane]` (row-major) in [0, 1] units; at least 1/255.
    pub fn from_images(
        images: &[f32],
        channels: usize,
        plane: usize,
        percentile: f64,
    ) -> Result<Self> {
        let per_image = channels * plane;
        if per_image == 0 || images.is_empty() || !images.len().is_multiple_of(per_image) {
            return Err(Error::invalid(format!(
                "{} values are not whole images of {channels} × {plane}",
                images.len()
            )));
        }
        let max = (0..channels)
            .map(|c| {
                let mut v: Vec<f32> = images
                    .chunks_exact(per_image)
                    .flat_map(|img| &img[c * plane..(c + 1) * plane])
                    .copied()
                    .collect();
                let k =
                    ((v.len() as f64 * percentile / 100.0).ceil() as usize).clamp(1, v.len()) - 1;
                let (_, q, _) = v.select_nth_unstable_by(k, f32::total_cmp);
                q.max(1.0 / 255.0)
            })
            .collect();
        Ok(DisplayScale { max })
    }

    /// An RGB tile from an image `[C, S, S]` in [0, 1] units, magnified
    /// `zoom` times (nearest neighbour).
    pub fn render(&self, image: &[f32], size: usize, zoom: usize) -> Result<RgbImage> {
        let plane = size * size;
        let channels = image.len().checked_div(plane).unwrap_or(0);
        if channels == 0 || channels * plane != image.len() || channels > self.max.len() {
            return Err(Error::invalid(format!(
                "an image of {} values is not [C, {size}, {size}] with C ≤ {}",
                image.len(),
                self.max.len()
            )));
        }
        let zoom = zoom.max(1);
        let side = u32::try_from(size * zoom).map_err(|_| Error::invalid("tile too large"))?;
        let level = |c: usize, i: usize| -> u8 {
            (image[c * plane + i] / self.max[c] * 255.0)
                .round()
                .clamp(0.0, 255.0) as u8
        };
        Ok(RgbImage::from_fn(side, side, |x, y| {
            let i = (y as usize / zoom) * size + x as usize / zoom;
            let rgb = match channels {
                1 => [level(0, i); 3],
                2 => [0, level(1, i), level(0, i)],
                _ => [level(2, i), level(1, i), level(0, i)],
            };
            image::Rgb(rgb)
        }))
    }
}

/// One captioned image in a [`Sheet`].
#[derive(Clone, Debug)]
pub struct Tile {
    /// The image (any size; rows are laid out by the largest tile).
    pub image: RgbImage,
    /// Text under the image.
    pub caption: String,
}

/// A contact sheet: title lines, then rows of captioned tiles with a label
/// in the left margin.
#[derive(Clone, Debug, Default)]
pub struct Sheet {
    /// Lines of text above the rows.
    pub title: Vec<String>,
    /// (row label, tiles).
    pub rows: Vec<(String, Vec<Tile>)>,
}

/// Gap between tiles and around the sheet, in pixels.
const GAP: u32 = 6;
/// Most pixels a sheet may have (a guard against accidental huge sheets).
const MAX_SHEET_PIXELS: u64 = 200_000_000;
const BACKGROUND: [u8; 3] = [20, 20, 24];
const INK: [u8; 3] = [235, 235, 235];

impl Sheet {
    /// Renders the sheet.
    pub fn render(&self) -> Result<RgbImage> {
        let tile_w = self
            .rows
            .iter()
            .flat_map(|(_, t)| t.iter().map(|t| t.image.width()))
            .max()
            .unwrap_or(0);
        let tile_h = self
            .rows
            .iter()
            .flat_map(|(_, t)| t.iter().map(|t| t.image.height()))
            .max()
            .unwrap_or(0);
        let cols = self.rows.iter().map(|(_, t)| t.len()).max().unwrap_or(0) as u32;
        let margin = self
            .rows
            .iter()
            .map(|(l, _)| text_width(l))
            .max()
            .unwrap_or(0);
        let margin = if margin > 0 { margin + GAP } else { 0 };
        let line = font::LINE_HEIGHT;
        let title_h = self.title.len() as u32 * line;
        let row_h = tile_h + line + GAP;
        let width = (GAP + margin + cols * (tile_w + GAP))
            .max(self.title.iter().map(|t| text_width(t)).max().unwrap_or(0) + 2 * GAP);
        let height =
            GAP + title_h + if title_h > 0 { GAP } else { 0 } + self.rows.len() as u32 * row_h;
        if u64::from(width) * u64::from(height) > MAX_SHEET_PIXELS {
            return Err(Error::invalid(format!(
                "a {width}×{height} sheet is too large; show fewer images (or a smaller zoom)"
            )));
        }
        let mut img = RgbImage::from_pixel(width, height, image::Rgb(BACKGROUND));
        let mut y = GAP;
        for t in &self.title {
            draw_text(&mut img, GAP, y, t, width - GAP);
            y += line;
        }
        if title_h > 0 {
            y += GAP;
        }
        for (label, tiles) in &self.rows {
            draw_text(&mut img, GAP, y + tile_h / 2, label, GAP + margin);
            for (k, tile) in tiles.iter().enumerate() {
                let x = GAP + margin + k as u32 * (tile_w + GAP);
                image::imageops::replace(&mut img, &tile.image, i64::from(x), i64::from(y));
                draw_text(
                    &mut img,
                    x,
                    y + tile.image.height() + 2,
                    &tile.caption,
                    x + tile_w + GAP / 2,
                );
            }
            y += row_h;
        }
        Ok(img)
    }

    /// Renders and writes the sheet as PNG.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        save_png(path, &self.render()?)
    }
}

/// Width in pixels of `text` in the sheet font.
fn text_width(text: &str) -> u32 {
    text.chars().count() as u32 * font::ADVANCE
}

/// Draws `text` with its top-left at (x, y), clipped at `x_end`.
fn draw_text(img: &mut RgbImage, x: u32, y: u32, text: &str, x_end: u32) {
    let x_end = x_end.min(img.width());
    for (k, ch) in text.chars().enumerate() {
        let x0 = x + k as u32 * font::ADVANCE;
        if x0 + font::WIDTH > x_end {
            break;
        }
        let rows = font::glyph(ch);
        for (dy, bits) in rows.iter().enumerate() {
            for dx in 0..font::WIDTH {
                if bits & (1 << (font::WIDTH - 1 - dx)) != 0 {
                    let (px, py) = (x0 + dx, y + dy as u32);
                    if py < img.height() {
                        img.put_pixel(px, py, image::Rgb(INK));
                    }
                }
            }
        }
    }
}

/// The plots' 5×7 bitmap font, with the sheet's spacing.
mod font {
    pub(super) use crate::plot::glyph;
    /// Glyph width in pixels.
    pub const WIDTH: u32 = 5;
    /// Horizontal advance per character.
    pub const ADVANCE: u32 = 6;
    /// Vertical advance per line.
    pub const LINE_HEIGHT: u32 = 10;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_lines_split_with_quotes() {
        assert_eq!(
            crate::table::split_fields("a, \"b,c\" ,\"d\"\"e\"").unwrap(),
            ["a", "b,c", "d\"e"]
        );
        assert_eq!(crate::table::split_fields("1,,2").unwrap(), ["1", "", "2"]);
        assert!(crate::table::split_fields("\"open").is_err());
    }

    #[test]
    fn font_covers_caption_characters() {
        let unknown = font::glyph('\u{1}');
        for c in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcxyz .,-+=:_/()%<>#!".chars() {
            assert_ne!(font::glyph(c), unknown, "{c:?} has no glyph");
        }
    }
}
