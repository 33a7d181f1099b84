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
        Self::from_csv(&CsvFile::read(path)?, columns)
    }

    /// Parses CSV text; `origin` names the source in error messages.
    pub fn parse_csv(
        text: &str,
        origin: impl AsRef<Path>,
        columns: FeatureColumns<'_>,
    ) -> Result<Self> {
        Self::from_csv(&CsvFile::parse(text, origin)?, columns)
    }

    fn from_csv(csv: &CsvFile, columns: FeatureColumns<'_>) -> Result<Self> {
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
                values.push(csv.number(row, c)?);
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
    let table = FeatureTable::read_csv(&o.features, columns)?;
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
}
