//! t-SNE of a feature table (`cellmorph tsne`): the coordinates as CSV
//! (`sample,x,y`) and a scatter PNG coloured by a column of a labels table
//! (categories with a legend, numbers with a colour bar).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::csv::{CsvFile, CsvWriter};
use crate::plot::{colored_scatter_image, save_png, PlotOptions, PointColors};
use crate::stats::tsne::{tsne, TsneInit, TsneOptions, TsneResult};
use crate::table::Table;
use crate::{Error, Result};

/// What [`tsne_file`] reads and writes.
#[derive(Debug, Clone)]
pub struct TsneFileOptions {
    /// Feature table CSV (sample, then one column per feature).
    pub features: PathBuf,
    /// Output CSV: sample, x, y.
    pub output: PathBuf,
    /// The t-SNE parameters.
    pub tsne: TsneOptions,
    /// Scatter PNG of the embedding.
    pub plot: Option<PathBuf>,
    /// Column that colours the points.
    pub color_by: Option<String>,
    /// Table holding `color_by`, keyed by its `sample` column (else its
    /// first column); `None`: the feature table itself.
    pub labels: Option<PathBuf>,
    /// Treat `color_by` as categories even when every value is a number.
    pub categorical: bool,
}

/// What [`tsne_file`] did.
#[derive(Debug, Clone)]
pub struct TsneFileSummary {
    /// Samples embedded.
    pub samples: usize,
    /// Features per sample.
    pub features: usize,
    /// The embedding, final KL divergence and iterations.
    pub result: TsneResult,
    /// Seconds spent in t-SNE.
    pub seconds: f64,
}

/// Runs t-SNE on the feature table and writes the coordinates (and the
/// plot). The colour column is checked before the optimization starts.
///
/// # Errors
/// Unreadable or invalid tables, a missing colour column or sample, t-SNE's
/// own errors ([`crate::stats::tsne::tsne`]), unwritable outputs.
pub fn tsne_file(o: &TsneFileOptions) -> Result<TsneFileSummary> {
    let table = Table::read_csv(&o.features)?;
    let (n, d) = (table.n_rows(), table.n_cols());
    let colors = match &o.color_by {
        Some(column) => {
            let source = o.labels.as_deref().unwrap_or(&o.features);
            read_point_colors(source, column, &table.row_names, o.categorical)?
        }
        None => PointColors::Single,
    };
    let start = Instant::now();
    let result = tsne(&table.data, n, d, &o.tsne).map_err(|e| match e {
        Error::Invalid(msg) => Error::format(&o.features, msg),
        other => other,
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let mut w = CsvWriter::new();
    w.record(["sample", "x", "y"]);
    for (r, name) in table.row_names.iter().enumerate() {
        w.record([
            name.clone(),
            result.embedding[2 * r].to_string(),
            result.embedding[2 * r + 1].to_string(),
        ]);
    }
    w.write(&o.output)?;
    if let Some(plot) = &o.plot {
        let (xs, ys): (Vec<f64>, Vec<f64>) = (0..n)
            .map(|r| (result.embedding[2 * r], result.embedding[2 * r + 1]))
            .unzip();
        let init = match o.tsne.init {
            TsneInit::Pca => "pca".to_string(),
            TsneInit::Random => format!("random, seed {}", o.tsne.seed),
        };
        let opts = PlotOptions {
            title: format!(
                "t-SNE, perplexity {}, KL {:.3}",
                o.tsne.perplexity, result.kl_divergence
            ),
            x_label: format!("t-SNE 1 ({n} samples, init {init})"),
            y_label: "t-SNE 2".into(),
            width: 640,
            height: 520,
        };
        save_png(plot, &colored_scatter_image(&xs, &ys, &colors, &opts)?)?;
    }
    Ok(TsneFileSummary {
        samples: n,
        features: d,
        result,
        seconds,
    })
}

/// The colours of the points named `samples` from `column` of the table at
/// `path`, keyed by its `sample` column (else its first column): numbers
/// when every value is a finite number and `categorical` is false, else
/// categories (sorted, numerically when all are numbers).
///
/// # Errors
/// An unreadable file, no such column (the message lists the columns), a
/// sample named twice, or a sample without a row.
pub fn read_point_colors(
    path: &Path,
    column: &str,
    samples: &[String],
    categorical: bool,
) -> Result<PointColors> {
    let csv = CsvFile::read(path)?;
    let key = csv.column_ignore_case("sample").unwrap_or(0);
    let col = csv.column(column).ok_or_else(|| {
        csv.error(format!(
            "no column {column:?} to colour by; columns: {}",
            csv.header.fields.join(", ")
        ))
    })?;
    let mut by_sample: HashMap<&str, (&str, usize)> = HashMap::with_capacity(csv.rows.len());
    for row in &csv.rows {
        if let Some((_, first)) = by_sample.insert(row.get(key), (row.get(col), row.line)) {
            return Err(csv.line_error(
                row.line,
                format!("sample {:?} again (first on line {first})", row.get(key)),
            ));
        }
    }
    let mut values = Vec::with_capacity(samples.len());
    for s in samples {
        match by_sample.get(s.as_str()) {
            Some(&(v, _)) => values.push(v),
            None => {
                return Err(csv.error(format!(
                    "sample {s:?} of the features has no row (colouring by {column:?})"
                )))
            }
        }
    }
    let numbers: Option<Vec<f64>> = values
        .iter()
        .map(|v| v.parse::<f64>().ok().filter(|x| x.is_finite()))
        .collect();
    if let (Some(numbers), false) = (&numbers, categorical) {
        return Ok(PointColors::Values {
            values: numbers.clone(),
            label: column.to_string(),
        });
    }
    let mut names: Vec<String> = values.iter().map(|v| v.to_string()).collect();
    match &numbers {
        Some(_) => names.sort_by(|a, b| {
            let (x, y) = (a.parse::<f64>(), b.parse::<f64>());
            match (x, y) {
                (Ok(x), Ok(y)) => x.total_cmp(&y),
                _ => a.cmp(b),
            }
        }),
        None => names.sort(),
    }
    names.dedup();
    let index = values
        .iter()
        .map(|v| names.iter().position(|nm| nm == v).unwrap_or(0))
        .collect();
    Ok(PointColors::Categories { index, names })
}
