//! Per-batch correction of feature tables (profiles) before the SVR: each
//! batch's features centred on the batch mean (`center`), or also scaled to
//! unit variance within the batch (`standardize`, population standard
//! deviation; a feature constant within a batch becomes 0 there).
//!
//! The correction uses the features only, never the targets, and each batch
//! is corrected with its own statistics: a held-out batch is centred on its
//! own mean at prediction time, so leave-one-batch-out scores stay honest
//! with respect to the targets (the correction is transductive in the
//! features, as ComBat and per-plate normalization are).
//!
//! [`BatchCorrection`] names the mode; [`correct_batches`] is the loop nest;
//! [`BatchFile`] reads each sample's batch from a CSV.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::cv::{read_groups, GroupFile};
use crate::table::Table;
use crate::{Error, Result};

/// How the features of each batch are corrected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchCorrection {
    /// `x − mean_batch(x)` per feature.
    Center,
    /// `(x − mean_batch(x)) / sd_batch(x)` per feature (population sd;
    /// 0 where the feature is constant within the batch).
    Standardize,
}

impl fmt::Display for BatchCorrection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BatchCorrection::Center => "center",
            BatchCorrection::Standardize => "standardize",
        })
    }
}

impl FromStr for BatchCorrection {
    type Err = Error;
    fn from_str(s: &str) -> Result<BatchCorrection> {
        match s {
            "center" | "centre" => Ok(BatchCorrection::Center),
            "standardize" | "standardise" | "scale" => Ok(BatchCorrection::Standardize),
            other => Err(Error::invalid(format!(
                "unknown batch correction '{other}' (expected center or standardize)"
            ))),
        }
    }
}

/// Where each sample's batch is read from, and how batches are corrected.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchFile {
    /// The CSV (`sample` column and the batch column).
    pub path: PathBuf,
    /// The batch column.
    pub column: String,
    /// The correction.
    pub mode: BatchCorrection,
}

impl BatchFile {
    /// `features` with every row corrected within its batch; every row of
    /// `features` needs a batch in the file (an error names the file and
    /// the sample otherwise).
    pub fn apply(&self, features: &Table) -> Result<Table> {
        let groups = GroupFile {
            path: self.path.clone(),
            column: self.column.clone(),
        };
        let batches = read_groups(&groups, &features.row_names)?;
        correct_batches(features, &batches, self.mode)
    }
}

/// Corrects every feature within each batch; `batches[r]` is row `r`'s
/// batch. Sums run in row order per batch, in f64, so the result does not
/// depend on how batches interleave beyond that order.
pub fn correct_batches(
    features: &Table,
    batches: &[String],
    mode: BatchCorrection,
) -> Result<Table> {
    let (n, p) = (features.n_rows(), features.n_cols());
    if batches.len() != n {
        return Err(Error::invalid(format!(
            "batch correction: {} batch labels for {n} feature rows",
            batches.len()
        )));
    }
    let mut rows_of: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (r, b) in batches.iter().enumerate() {
        rows_of.entry(b.as_str()).or_default().push(r);
    }
    let mut out = features.data.clone();
    for rows in rows_of.values() {
        let m = rows.len() as f64;
        for c in 0..p {
            let mean = rows.iter().map(|&r| features.data[r * p + c]).sum::<f64>() / m;
            let scale = match mode {
                BatchCorrection::Center => 1.0,
                BatchCorrection::Standardize => {
                    let var = rows
                        .iter()
                        .map(|&r| (features.data[r * p + c] - mean).powi(2))
                        .sum::<f64>()
                        / m;
                    let sd = var.sqrt();
                    // Constant within the batch (or a single sample): the
                    // centred value is 0 and stays 0.
                    if sd > 0.0 {
                        1.0 / sd
                    } else {
                        0.0
                    }
                }
            };
            for &r in rows {
                out[r * p + c] = (features.data[r * p + c] - mean) * scale;
            }
        }
    }
    Table::new(features.row_names.clone(), features.col_names.clone(), out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(rows: &[&[f64]]) -> Table {
        let names = (0..rows.len()).map(|i| format!("s{i}")).collect();
        let cols = (0..rows[0].len()).map(|i| format!("f{i}")).collect();
        Table::new(names, cols, rows.concat()).unwrap()
    }

    #[test]
    fn centering_removes_each_batch_mean() {
        let t = table(&[&[1.0, 10.0], &[3.0, 30.0], &[100.0, 5.0], &[102.0, 7.0]]);
        let b: Vec<String> = ["a", "a", "b", "b"].iter().map(|s| s.to_string()).collect();
        let c = correct_batches(&t, &b, BatchCorrection::Center).unwrap();
        assert_eq!(c.data, vec![-1.0, -10.0, 1.0, 10.0, -1.0, -1.0, 1.0, 1.0]);
        assert_eq!(c.row_names, t.row_names);
    }

    #[test]
    fn standardizing_gives_unit_variance_and_zero_for_constants() {
        let t = table(&[&[1.0, 4.0], &[3.0, 4.0], &[5.0, 4.0], &[0.0, 1.0]]);
        let b: Vec<String> = ["a", "a", "a", "b"].iter().map(|s| s.to_string()).collect();
        let c = correct_batches(&t, &b, BatchCorrection::Standardize).unwrap();
        let sd = (8.0f64 / 3.0).sqrt();
        let want = [-2.0 / sd, 0.0, 0.0, 0.0, 2.0 / sd, 0.0, 0.0, 0.0];
        for (got, want) in c.data.iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
    }

    #[test]
    fn modes_parse_and_print() {
        for m in [BatchCorrection::Center, BatchCorrection::Standardize] {
            assert_eq!(m.to_string().parse::<BatchCorrection>().unwrap(), m);
        }
        assert!("combat".parse::<BatchCorrection>().is_err());
    }
}
