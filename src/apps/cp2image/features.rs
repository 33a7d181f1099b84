//! CellProfiler feature tables and their standardization: [`FeatureTable`]
//! reads a CSV of features, one row per cell (the first column names the
//! row, feature columns hold finite numbers, every other column is kept as
//! text); [`Standardizer`] holds each feature's mean and standard deviation,
//! saved as JSON beside the generator's weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::csv::CsvFile;
use crate::io::write_atomic;
use crate::{Error, Result};

/// Columns of the single-cell feature tables that describe the cell's place
/// in the field rather than the cell: never used as features unless named
/// explicitly.
pub const METADATA_COLUMNS: &[&str] = &["field", "centroid_y", "centroid_x"];

/// Whether a column is an identifier or location rather than a
/// measurement: [`METADATA_COLUMNS`], and the columns CellProfiler writes
/// beside its measurements (`ImageNumber`, `ObjectNumber`, `Metadata_*`,
/// `FileName_*`, `PathName_*`, `URL_*`, `Location_*`, and per object
/// `<Object>_Location_*`, `<Object>_Number_Object_Number`,
/// `<Object>_Parent_*`). Never features unless named explicitly.
pub fn is_identifier_column(name: &str) -> bool {
    METADATA_COLUMNS.contains(&name)
        || name == "ImageNumber"
        || name == "ObjectNumber"
        || ["Metadata_", "FileName_", "PathName_", "URL_", "Location_"]
            .iter()
            .any(|p| name.starts_with(p))
        || name.contains("_Location_")
        || name.ends_with("_Number_Object_Number")
        || name.contains("_Parent_")
}

/// What to do with missing feature values (an empty cell, `nan`, `NaN`,
/// `NA`, `N/A`; CellProfiler writes `nan` where a measurement is undefined).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NanPolicy {
    /// Refuse the table, naming the file, line and column (the default).
    #[default]
    Refuse,
    /// Leave out every feature column with a missing value (when fitting a
    /// standardization or training; the generator then has fewer inputs).
    DropColumn,
    /// Replace each missing value by its column's median over the table's
    /// rows when fitting or training; by the feature's training mean (a
    /// standardized 0) when a trained generator reads the table.
    Impute,
}

impl std::fmt::Display for NanPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NanPolicy::Refuse => "refuse",
            NanPolicy::DropColumn => "drop-column",
            NanPolicy::Impute => "impute",
        })
    }
}

impl std::str::FromStr for NanPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<NanPolicy> {
        match s {
            "refuse" => Ok(NanPolicy::Refuse),
            "drop-column" | "drop" => Ok(NanPolicy::DropColumn),
            "impute" | "impute-median" => Ok(NanPolicy::Impute),
            other => Err(Error::invalid(format!(
                "unknown NaN policy '{other}' (expected refuse, drop-column or impute)"
            ))),
        }
    }
}

/// What [`FeatureTable::resolve_missing`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MissingReport {
    /// Feature columns left out.
    pub dropped: Vec<String>,
    /// Imputed features: (name, missing values, the value put in).
    pub imputed: Vec<(String, usize, f64)>,
}

impl MissingReport {
    /// One line for the user, or `None` when nothing was missing.
    pub fn describe(&self) -> Option<String> {
        if !self.dropped.is_empty() {
            return Some(format!(
                "--nan drop-column: left out {} features with missing values ({}{})",
                self.dropped.len(),
                self.dropped[..self.dropped.len().min(5)].join(", "),
                if self.dropped.len() > 5 { ", …" } else { "" }
            ));
        }
        if !self.imputed.is_empty() {
            let values: usize = self.imputed.iter().map(|i| i.1).sum();
            return Some(format!(
                "--nan impute: filled {values} missing values in {} features ({}{})",
                self.imputed.len(),
                self.imputed[..self.imputed.len().min(5)]
                    .iter()
                    .map(|i| i.0.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                if self.imputed.len() > 5 { ", …" } else { "" }
            ));
        }
        None
    }
}

/// A missing value as feature tables write it.
fn is_missing(cell: &str) -> bool {
    cell.is_empty()
        || ["nan", "na", "n/a"]
            .iter()
            .any(|m| cell.eq_ignore_ascii_case(m))
}

/// The median of `v` (sorted in place; the mean of the middle two for an
/// even count), `None` when empty.
fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// Which columns of a CSV are features.
#[derive(Clone, Copy, Debug)]
pub enum FeatureColumns<'a> {
    /// Every column after the first except identifiers
    /// ([`is_identifier_column`]: [`METADATA_COLUMNS`] and CellProfiler's
    /// `ImageNumber`, `ObjectNumber`, `Metadata_*`, `Location_*`, …); a
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
        Self::from_csv(&CsvFile::read(path)?, columns, false)
    }

    /// Reads a feature CSV and applies `policy` to its missing values (an
    /// empty cell, `nan`, `NaN`, `NA`, `N/A`): refused with file, line and
    /// column, or handled as [`FeatureTable::resolve_missing`] says. For a
    /// table the generator reads (`FeatureColumns::Named`), `fill` gives the
    /// value that replaces a missing one per named feature (the training
    /// means: a standardized 0) and `drop-column` is refused.
    pub fn read_csv_with(
        path: impl AsRef<Path>,
        columns: FeatureColumns<'_>,
        policy: NanPolicy,
        fill: Option<&[f64]>,
    ) -> Result<(Self, MissingReport)> {
        let path = path.as_ref();
        let csv = CsvFile::read(path)?;
        let mut table = Self::from_csv(&csv, columns, policy != NanPolicy::Refuse)?;
        let report = table
            .resolve_missing(policy, fill)
            .map_err(|e| Error::format(path, e.to_string()))?;
        Ok((table, report))
    }

    /// Parses CSV text; `origin` names the source in error messages.
    pub fn parse_csv(
        text: &str,
        origin: impl AsRef<Path>,
        columns: FeatureColumns<'_>,
    ) -> Result<Self> {
        Self::from_csv(&CsvFile::parse(text, origin)?, columns, false)
    }

    /// Builds the table; with `allow_missing` a missing value is read as
    /// NaN (infinities and other text are still errors).
    fn from_csv(csv: &CsvFile, columns: FeatureColumns<'_>, allow_missing: bool) -> Result<Self> {
        let header = &csv.header.fields;
        csv.check_unique_header(1)?;
        let position: HashMap<&str, usize> = header
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, name)| (name.as_str(), i))
            .collect();
        let feature_cols: Vec<usize> = match columns {
            FeatureColumns::AllButMetadata => (1..header.len())
                .filter(|&i| !is_identifier_column(&header[i]))
                .collect(),
            FeatureColumns::Named(names) => {
                let missing: Vec<&str> = names
                    .iter()
                    .map(String::as_str)
                    .filter(|n| !position.contains_key(n))
                    .collect();
                if !missing.is_empty() {
                    return Err(csv.error(format!(
                        "{} of the {} features needed are not columns of this table: {}{}",
                        missing.len(),
                        names.len(),
                        missing[..missing.len().min(5)].join(", "),
                        if missing.len() > 5 { ", …" } else { "" }
                    )));
                }
                names.iter().map(|n| position[n.as_str()]).collect()
            }
        };
        if feature_cols.is_empty() {
            return Err(csv.line_error(csv.header.line, "no feature columns"));
        }
        let is_feature: Vec<bool> = {
            let mut v = vec![false; header.len()];
            for &c in &feature_cols {
                v[c] = true;
            }
            v
        };
        let text_cols: Vec<usize> = (1..header.len()).filter(|&i| !is_feature[i]).collect();

        // CellProfiler's per-object tables start with ImageNumber, which
        // repeats: a cell is named `<ImageNumber>_<ObjectNumber>` there.
        let object_col = (header.first().map(String::as_str) == Some("ImageNumber"))
            .then(|| position.get("ObjectNumber").copied())
            .flatten();
        let row_id = |row: &crate::csv::Record| match object_col {
            Some(c) => format!("{}_{}", row.get(0), row.get(c)),
            None => row.get(0).to_string(),
        };
        let mut ids = Vec::with_capacity(csv.rows.len());
        let mut values = Vec::with_capacity(csv.rows.len() * feature_cols.len());
        let mut text_values: Vec<Vec<String>> = vec![Vec::new(); text_cols.len()];
        let mut first_line: std::collections::HashMap<String, usize> =
            std::collections::HashMap::with_capacity(csv.rows.len());
        for row in &csv.rows {
            csv.check_width(row)?;
            let id = row_id(row);
            if let Some(prev) = first_line.insert(id.clone(), row.line) {
                return Err(csv.line_error(
                    row.line,
                    format!(
                        "row id {id:?} was already given on line {prev}; row ids must be unique"
                    ),
                ));
            }
            for &c in &feature_cols {
                if allow_missing && is_missing(row.get(c)) {
                    values.push(f64::NAN);
                } else {
                    values.push(csv.number(row, c)?);
                }
            }
            for (acc, &c) in text_values.iter_mut().zip(&text_cols) {
                acc.push(row.get(c).to_string());
            }
            ids.push(id);
        }
        if ids.is_empty() {
            return Err(csv.error("no data rows"));
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

    /// Applies `policy` to the NaN values of the table (see [`NanPolicy`]);
    /// `fill` (one value per feature) replaces them instead of the column
    /// median when given. Fails when `Refuse` meets a NaN, when a column
    /// has no value at all to take a median of, or when dropping would
    /// leave no feature.
    pub fn resolve_missing(
        &mut self,
        policy: NanPolicy,
        fill: Option<&[f64]>,
    ) -> Result<MissingReport> {
        let (n, p) = (self.n_rows(), self.n_features());
        let missing: Vec<usize> = (0..p)
            .map(|c| (0..n).filter(|&r| self.values[r * p + c].is_nan()).count())
            .collect();
        let mut report = MissingReport::default();
        if missing.iter().all(|&m| m == 0) {
            return Ok(report);
        }
        let worst = (0..p).max_by_key(|&c| missing[c]).unwrap_or(0);
        match policy {
            NanPolicy::Refuse => Err(Error::invalid(format!(
                "feature {:?} has {} missing values (and {} features have some); \
                 choose --nan drop-column or --nan impute",
                self.names[worst],
                missing[worst],
                missing.iter().filter(|&&m| m > 0).count()
            ))),
            NanPolicy::DropColumn => {
                if fill.is_some() {
                    return Err(Error::invalid(format!(
                        "feature {:?} has missing values, and the generator needs every \
                         feature it was trained on: use --nan impute (the training mean) \
                         or fill the table",
                        self.names[worst]
                    )));
                }
                let keep: Vec<usize> = (0..p).filter(|&c| missing[c] == 0).collect();
                if keep.is_empty() {
                    return Err(Error::invalid(
                        "every feature has a missing value: --nan drop-column leaves none",
                    ));
                }
                report.dropped = (0..p)
                    .filter(|&c| missing[c] > 0)
                    .map(|c| self.names[c].clone())
                    .collect();
                let mut values = Vec::with_capacity(n * keep.len());
                for r in 0..n {
                    values.extend(keep.iter().map(|&c| self.values[r * p + c]));
                }
                self.values = values;
                self.names = keep.iter().map(|&c| self.names[c].clone()).collect();
                Ok(report)
            }
            NanPolicy::Impute => {
                for c in (0..p).filter(|&c| missing[c] > 0) {
                    let value = match fill {
                        Some(f) => *f.get(c).ok_or_else(|| {
                            Error::invalid(format!("no fill value for feature {:?}", self.names[c]))
                        })?,
                        None => {
                            let mut col: Vec<f64> = (0..n)
                                .map(|r| self.values[r * p + c])
                                .filter(|v| !v.is_nan())
                                .collect();
                            median(&mut col).ok_or_else(|| {
                                Error::invalid(format!(
                                    "feature {:?} has no value in any row: nothing to impute from \
                                     (use --nan drop-column)",
                                    self.names[c]
                                ))
                            })?
                        }
                    };
                    for r in 0..n {
                        if self.values[r * p + c].is_nan() {
                            self.values[r * p + c] = value;
                        }
                    }
                    report
                        .imputed
                        .push((self.names[c].clone(), missing[c], value));
                }
                Ok(report)
            }
        }
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

/// What [`standardize`] reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct StandardizeOptions {
    /// Feature table (CSV, one row per cell; first column the row id).
    pub features: PathBuf,
    /// Only these features (a file with one name per line); `None`: every
    /// column but the first and [`METADATA_COLUMNS`].
    pub feature_names: Option<PathBuf>,
    /// Missing values: refused, or their columns dropped, or imputed by the
    /// column median.
    pub nan: NanPolicy,
    /// Where to write the JSON (e.g. [`Standardizer::default_path`] of the
    /// generator's weights).
    pub output: PathBuf,
}

/// What [`standardize`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct StandardizeSummary {
    /// The standardization written.
    pub standardizer: Standardizer,
    /// Cells (rows) it was fitted on.
    pub cells: usize,
    /// Features constant over the cells (given deviation 1).
    pub constant: usize,
    /// What the NaN policy did.
    pub missing: MissingReport,
}

/// `cellmorph cp2image standardize`: fits each feature's mean and standard
/// deviation on a feature table and writes the standardization file.
pub fn standardize(o: &StandardizeOptions) -> Result<StandardizeSummary> {
    let names: Option<Vec<String>> = o
        .feature_names
        .as_ref()
        .map(|p| {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            Ok::<_, Error>(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect(),
            )
        })
        .transpose()?;
    let columns = match &names {
        Some(n) => FeatureColumns::Named(n),
        None => FeatureColumns::AllButMetadata,
    };
    let (table, missing) = FeatureTable::read_csv_with(&o.features, columns, o.nan, None)?;
    let s = Standardizer::fit(&table)?;
    s.write(&o.output)?;
    let n = table.n_rows();
    let constant = (0..s.len())
        .filter(|&i| (1..n).all(|r| table.values[r * s.len() + i] == table.values[i]))
        .count();
    Ok(StandardizeSummary {
        standardizer: s,
        cells: n,
        constant,
        missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cellprofiler_identifier_columns_are_not_features() {
        let csv = "ImageNumber,ObjectNumber,Metadata_Well,FileName_DNA,PathName_DNA,\
                   Nuclei_Location_Center_X,Nuclei_Number_Object_Number,Nuclei_Parent_Cells,\
                   Nuclei_AreaShape_Area,Nuclei_Intensity_MeanIntensity_DNA\n\
                   1,1,A01,a.tif,/d,10.5,1,1,313,0.25\n\
                   1,2,A01,a.tif,/d,20.5,2,2,291,0.5\n";
        let t = FeatureTable::parse_csv(csv, "cp.csv", FeatureColumns::AllButMetadata).unwrap();
        assert_eq!(
            t.names,
            [
                "Nuclei_AreaShape_Area",
                "Nuclei_Intensity_MeanIntensity_DNA"
            ]
        );
        assert_eq!(t.values, [313.0, 0.25, 291.0, 0.5]);
        assert_eq!(
            t.ids,
            ["1_1", "1_2"],
            "ImageNumber_ObjectNumber names a cell"
        );
        let kept: Vec<&str> = t.text_columns.iter().map(|(n, _)| n.as_str()).collect();
        assert!(kept.contains(&"Metadata_Well") && kept.contains(&"Nuclei_Location_Center_X"));
        // Named explicitly, an identifier column is used as asked.
        let named = ["Nuclei_Location_Center_X".to_string()];
        let t = FeatureTable::parse_csv(csv, "cp.csv", FeatureColumns::Named(&named)).unwrap();
        assert_eq!(t.values, [10.5, 20.5]);
        for name in [
            "Nuclei_AreaShape_Area",
            "Cells_Texture_Contrast_DNA_3_00",
            "area",
        ] {
            assert!(!is_identifier_column(name), "{name}");
        }
    }

    const WITH_NAN: &str = "cell_id,a,b,c\n\
                            0,1,nan,5\n\
                            1,2,,NaN\n\
                            2,4,7,NA\n\
                            3,10,9,1\n";

    #[test]
    fn missing_values_are_refused_by_default_naming_the_cell() {
        let e = FeatureTable::parse_csv(WITH_NAN, "f.csv", FeatureColumns::AllButMetadata)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("f.csv") && e.contains("line 2") && e.contains("nan"),
            "{e}"
        );
    }

    fn lenient() -> FeatureTable {
        FeatureTable::from_csv(
            &CsvFile::parse(WITH_NAN, "f.csv").unwrap(),
            FeatureColumns::AllButMetadata,
            true,
        )
        .unwrap()
    }

    #[test]
    fn drop_column_keeps_the_complete_features() {
        let mut t = lenient();
        let r = t.resolve_missing(NanPolicy::DropColumn, None).unwrap();
        assert_eq!(t.names, ["a"]);
        assert_eq!(t.values, [1.0, 2.0, 4.0, 10.0]);
        assert_eq!(r.dropped, ["b", "c"]);
        assert!(r.describe().unwrap().contains("left out 2 features"));
    }

    #[test]
    fn impute_uses_the_column_median_or_the_given_fill() {
        let mut t = lenient();
        let r = t.resolve_missing(NanPolicy::Impute, None).unwrap();
        // b: median of {7, 9} = 8 (even count: the mean of the middle two);
        // c: median of {5, 1} = 3.
        assert_eq!(
            t.values,
            [1.0, 8.0, 5.0, 2.0, 8.0, 3.0, 4.0, 7.0, 3.0, 10.0, 9.0, 1.0]
        );
        assert_eq!(r.imputed, [("b".into(), 2, 8.0), ("c".into(), 2, 3.0)]);
        let mut t = lenient();
        t.resolve_missing(NanPolicy::Impute, Some(&[0.0, -1.0, -2.0]))
            .unwrap();
        assert_eq!(t.values[1], -1.0);
        assert_eq!(t.values[5], -2.0);
        // A generator's table cannot lose columns.
        let mut t = lenient();
        let e = t
            .resolve_missing(NanPolicy::DropColumn, Some(&[0.0; 3]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("every feature it was trained on"), "{e}");
    }

    #[test]
    fn an_all_missing_column_cannot_be_imputed_and_infinity_is_still_refused() {
        let csv = "cell_id,a,b\n0,1,nan\n1,2,\n";
        let mut t = FeatureTable::from_csv(
            &CsvFile::parse(csv, "f.csv").unwrap(),
            FeatureColumns::AllButMetadata,
            true,
        )
        .unwrap();
        let e = t.resolve_missing(NanPolicy::Impute, None).unwrap_err();
        assert!(e.to_string().contains("\"b\" has no value"), "{e}");
        let csv = "cell_id,a\n0,inf\n";
        assert!(FeatureTable::from_csv(
            &CsvFile::parse(csv, "f.csv").unwrap(),
            FeatureColumns::AllButMetadata,
            true
        )
        .is_err());
        for (text, want) in [
            ("refuse", NanPolicy::Refuse),
            ("drop-column", NanPolicy::DropColumn),
            ("impute", NanPolicy::Impute),
        ] {
            assert_eq!(text.parse::<NanPolicy>().unwrap(), want);
            assert_eq!(want.to_string(), text);
        }
    }
}
