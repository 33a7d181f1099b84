//! Numeric CSV tables (samples × named columns).
//!
//! The format is comma-separated text as [`crate::csv`] reads and writes it
//! (quoted fields, `#` comment lines, blank lines skipped, a UTF-8 BOM
//! dropped): a header row whose first cell names the row index (written back
//! as `sample`) and whose other cells name the columns, then one row per
//! sample starting with its name. Every value must be a finite number:
//! NaN and infinities are rejected, because every consumer here (SVR, stats)
//! would otherwise produce silently wrong numbers.

use std::collections::HashMap;
use std::path::Path;

use crate::csv::{CsvFile, CsvWriter};
use crate::{Error, Result};

/// A dense table of finite `f64` values with unique row and column names.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Row (sample) names, in file order.
    pub row_names: Vec<String>,
    /// Column names, in file order.
    pub col_names: Vec<String>,
    /// Values, row-major: `data[r * col_names.len() + c]`.
    pub data: Vec<f64>,
}

impl Table {
    /// Builds a table, checking that names are unique, the table is not
    /// empty, `data` has `rows × cols` values and every value is finite.
    pub fn new(row_names: Vec<String>, col_names: Vec<String>, data: Vec<f64>) -> Result<Table> {
        if row_names.is_empty() || col_names.is_empty() {
            return Err(Error::invalid(format!(
                "table is empty ({} rows × {} columns)",
                row_names.len(),
                col_names.len()
            )));
        }
        if data.len() != row_names.len() * col_names.len() {
            return Err(Error::shape(
                "Table::new",
                format!(
                    "{} values for {} rows × {} columns",
                    data.len(),
                    row_names.len(),
                    col_names.len()
                ),
            ));
        }
        check_unique(&row_names, "row").map_err(Error::invalid)?;
        check_unique(&col_names, "column").map_err(Error::invalid)?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            let (r, c) = (i / col_names.len(), i % col_names.len());
            return Err(Error::invalid(format!(
                "non-finite value {} at row '{}', column '{}'",
                data[i], row_names[r], col_names[c]
            )));
        }
        Ok(Table {
            row_names,
            col_names,
            data,
        })
    }

    /// Reads a table from a CSV file (see the module documentation).
    pub fn read_csv(path: impl AsRef<Path>) -> Result<Table> {
        Table::from_csv(&CsvFile::read(path)?)
    }

    /// Parses CSV text; `origin` names the source in error messages.
    pub fn parse_csv(text: &str, origin: impl AsRef<Path>) -> Result<Table> {
        Table::from_csv(&CsvFile::parse(text, origin)?)
    }

    fn from_csv(csv: &CsvFile) -> Result<Table> {
        let col_names: Vec<String> = csv.header.fields.iter().skip(1).cloned().collect();
        if col_names.is_empty() {
            return Err(csv.line_error(
                csv.header.line,
                "empty table: the header names no data columns",
            ));
        }
        csv.check_unique_header(1)?;

        let mut row_names: Vec<String> = Vec::with_capacity(csv.rows.len());
        let mut data = Vec::with_capacity(csv.rows.len() * col_names.len());
        let mut seen = HashMap::with_capacity(csv.rows.len());
        for row in &csv.rows {
            csv.check_width(row)?;
            let name = row.get(0);
            if name.is_empty() {
                return Err(csv.line_error(row.line, "empty row name"));
            }
            if let Some(first) = seen.insert(name, row.line) {
                return Err(csv.line_error(
                    row.line,
                    format!("duplicate row name {name:?} (first on line {first})"),
                ));
            }
            for c in 1..row.len() {
                data.push(csv.number(row, c)?);
            }
            row_names.push(name.to_string());
        }
        if row_names.is_empty() {
            return Err(csv.error("empty table: no data rows"));
        }
        Ok(Table {
            row_names,
            col_names,
            data,
        })
    }

    /// The table as CSV text, header cell `sample` first. Values are written
    /// with Rust's shortest round-trip formatting, so reading back is exact.
    pub fn to_csv_string(&self) -> String {
        self.to_csv_writer().into_string()
    }

    fn to_csv_writer(&self) -> CsvWriter {
        let mut w = CsvWriter::new();
        w.record(std::iter::once("sample").chain(self.col_names.iter().map(String::as_str)));
        let mut fields = Vec::with_capacity(self.n_cols() + 1);
        for (r, name) in self.row_names.iter().enumerate() {
            fields.clear();
            fields.push(name.clone());
            fields.extend(self.row(r).iter().map(f64::to_string));
            w.record(&fields);
        }
        w
    }

    /// Writes the table as CSV (see [`Table::to_csv_string`]), through a
    /// temporary file so an existing file is never left half-written.
    pub fn write_csv(&self, path: impl AsRef<Path>) -> Result<()> {
        self.to_csv_writer().write(path.as_ref())
    }

    /// Number of rows.
    pub fn n_rows(&self) -> usize {
        self.row_names.len()
    }

    /// Number of columns.
    pub fn n_cols(&self) -> usize {
        self.col_names.len()
    }

    /// Row `r` as a slice. Panics when `r >= n_rows()` (a programming error).
    pub fn row(&self, r: usize) -> &[f64] {
        let n = self.n_cols();
        &self.data[r * n..(r + 1) * n]
    }

    /// Column `c` copied out. Panics when `c >= n_cols()` (a programming error).
    pub fn column(&self, c: usize) -> Vec<f64> {
        self.data
            .chunks_exact(self.n_cols())
            .map(|row| row[c])
            .collect()
    }

    /// Index of the row called `name`.
    pub fn row_index(&self, name: &str) -> Option<usize> {
        self.row_names.iter().position(|n| n == name)
    }

    /// Index of the column called `name`.
    pub fn col_index(&self, name: &str) -> Option<usize> {
        self.col_names.iter().position(|n| n == name)
    }

    /// A new table with the named rows, in the order given; an error names
    /// the first sample that is missing.
    pub fn select_rows<S: AsRef<str>>(&self, names: &[S]) -> Result<Table> {
        let index = name_index(&self.row_names);
        let mut row_names = Vec::with_capacity(names.len());
        let mut data = Vec::with_capacity(names.len() * self.n_cols());
        for name in names {
            let name = name.as_ref();
            let &r = index
                .get(name)
                .ok_or_else(|| Error::invalid(format!("sample '{name}' is not in the table")))?;
            row_names.push(name.to_string());
            data.extend_from_slice(self.row(r));
        }
        Table::new(row_names, self.col_names.clone(), data)
    }

    /// Checks that every sample of `names` (the rows of the table read from
    /// `names_from`) is a row of this table, read from `path`.
    ///
    /// # Errors
    /// [`Error::Format`] naming `path`, `names_from`, the first missing
    /// sample and how many are missing.
    pub fn require_rows<S: AsRef<str>>(
        &self,
        path: &Path,
        names: &[S],
        names_from: &Path,
    ) -> Result<()> {
        let index = name_index(&self.row_names);
        let missing: Vec<&str> = names
            .iter()
            .map(AsRef::as_ref)
            .filter(|n| !index.contains_key(n))
            .collect();
        match missing.first() {
            None => Ok(()),
            Some(first) => Err(Error::format(
                path,
                format!(
                    "sample {first:?} of {} is not a row of this table ({} of its {} samples are missing)",
                    names_from.display(),
                    missing.len(),
                    names.len()
                ),
            )),
        }
    }

    /// A new table with the named columns, in the order given; an error
    /// names the first column that is missing.
    pub fn select_cols<S: AsRef<str>>(&self, names: &[S]) -> Result<Table> {
        let index = name_index(&self.col_names);
        let cols = names
            .iter()
            .map(|name| {
                let name = name.as_ref();
                index
                    .get(name)
                    .copied()
                    .ok_or_else(|| Error::invalid(format!("column '{name}' is not in the table")))
            })
            .collect::<Result<Vec<usize>>>()?;
        let mut data = Vec::with_capacity(self.n_rows() * cols.len());
        for r in 0..self.n_rows() {
            let row = self.row(r);
            data.extend(cols.iter().map(|&c| row[c]));
        }
        let col_names = names.iter().map(|n| n.as_ref().to_string()).collect();
        Table::new(self.row_names.clone(), col_names, data)
    }
}

fn name_index(names: &[String]) -> HashMap<&str, usize> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect()
}

fn check_unique(names: &[String], what: &str) -> std::result::Result<(), String> {
    let mut seen = HashMap::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        if let Some(first) = seen.insert(name.as_str(), i) {
            return Err(format!(
                "duplicate {what} name '{name}' (positions {} and {})",
                first + 1,
                i + 1
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Table> {
        Table::parse_csv(text, "t.csv")
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_and_round_trips() {
        let t = parse("sample,a,\"b,c\"\r\nS1, 1.5 ,-2e-3\n\n\"S \"\"2\"\"\",0,7\n").unwrap();
        assert_eq!(t.row_names, ["S1", "S \"2\""]);
        assert_eq!(t.col_names, ["a", "b,c"]);
        assert_eq!(t.data, [1.5, -0.002, 0.0, 7.0]);
        let back = parse(&t.to_csv_string()).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn round_trip_is_bit_exact() {
        let values = vec![0.1 + 0.2, -1e-300, 123456.789e10, std::f64::consts::PI];
        let t = Table::new(
            vec!["r".into()],
            (0..4).map(|i| format!("c{i}")).collect(),
            values.clone(),
        )
        .unwrap();
        assert_eq!(parse(&t.to_csv_string()).unwrap().data, values);
    }

    #[test]
    fn errors_name_line_and_column() {
        let e = err("s,a,b\nS1,1,2\nS2,1,x\n");
        assert!(
            e.contains("t.csv") && e.contains("line 3, column \"b\": \"x\" is not a number"),
            "{e}"
        );
        let e = err("s,a,b\nS1,1\n");
        assert!(e.contains("line 2") && e.contains("2 fields"), "{e}");
        let e = err("s,a\nS1,NaN\n");
        assert!(e.contains("line 2") && e.contains("non-finite"), "{e}");
        let e = err("s,a\nS1,inf\n");
        assert!(e.contains("non-finite"), "{e}");
        let e = err("s,a\nS1,\n");
        assert!(e.contains("is not a number"), "{e}");
        let e = err("s,a,a\nS1,1,2\n");
        assert!(
            e.contains("line 1, column \"a\": duplicate column name"),
            "{e}"
        );
        let e = err("s,a\nS1,1\nS1,2\n");
        assert!(
            e.contains("line 3: duplicate row name \"S1\" (first on line 2)"),
            "{e}"
        );
        assert!(err("").contains("t.csv: empty file"));
        assert!(err("s,a\n").contains("no data rows"));
        assert!(err("s\nS1\n").contains("no data columns"));
        assert!(err("s,\"a\n").contains("unterminated quote"));
    }

    #[test]
    fn missing_file_names_path() {
        let e = Table::read_csv("/nonexistent/x.csv")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/x.csv"), "{e}");
    }

    #[test]
    fn selects_rows_and_columns() {
        let t = parse("s,a,b,c\nS1,1,2,3\nS2,4,5,6\n").unwrap();
        let r = t.select_rows(&["S2", "S1"]).unwrap();
        assert_eq!(r.data, [4.0, 5.0, 6.0, 1.0, 2.0, 3.0]);
        let c = t.select_cols(&["c", "a"]).unwrap();
        assert_eq!(c.data, [3.0, 1.0, 6.0, 4.0]);
        assert_eq!(t.column(1), [2.0, 5.0]);
        let e = t.select_rows(&["S3"]).unwrap_err().to_string();
        assert!(e.contains("sample 'S3'"), "{e}");
        let e = t.select_cols(&["z"]).unwrap_err().to_string();
        assert!(e.contains("column 'z'"), "{e}");
    }

    #[test]
    fn new_validates() {
        assert!(Table::new(vec!["r".into()], vec!["c".into()], vec![f64::NAN]).is_err());
        assert!(Table::new(vec!["r".into()], vec!["c".into()], vec![]).is_err());
        assert!(Table::new(vec![], vec!["c".into()], vec![]).is_err());
    }
}
