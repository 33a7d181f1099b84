//! Ward clustering of a feature table (`cellmorph cluster`): of its samples
//! (rows) or of its feature columns, cut into k flat clusters; the
//! assignments, the SciPy linkage matrix, and a dendrogram beside a heat
//! map of the z-scored table (each feature over the samples), the clusters
//! marked by a colour strip.

use std::path::PathBuf;
use std::time::Instant;

use crate::csv::CsvWriter;
use crate::plot::{dendrogram_heatmap_image, save_png, DendrogramHeatmapOptions};
use crate::stats::cluster::{ward_linkage, Linkage};
use crate::table::Table;
use crate::{Error, Result};

/// What [`cluster_file`] reads and writes.
#[derive(Debug, Clone)]
pub struct ClusterFileOptions {
    /// Feature table CSV (sample, then one column per feature).
    pub features: PathBuf,
    /// Number of flat clusters.
    pub k: usize,
    /// Cluster the feature columns (each described by its values over the
    /// samples) instead of the samples.
    pub columns: bool,
    /// Output CSV: `sample,cluster` (or `feature,cluster`), in table order.
    pub output: PathBuf,
    /// SciPy's linkage matrix as CSV: `a,b,height,size`.
    pub linkage: Option<PathBuf>,
    /// Dendrogram + heat-map PNG.
    pub plot: Option<PathBuf>,
}

/// What [`cluster_file`] did.
#[derive(Debug, Clone)]
pub struct ClusterFileSummary {
    /// `samples` or `features`.
    pub what: &'static str,
    /// Names of the clustered items, in table order.
    pub names: Vec<String>,
    /// Cluster of each item (1..).
    pub labels: Vec<usize>,
    /// The hierarchy.
    pub linkage: Linkage,
    /// Seconds spent clustering.
    pub seconds: f64,
}

impl ClusterFileSummary {
    /// Items per cluster, cluster 1 first.
    pub fn sizes(&self) -> Vec<usize> {
        let k = self.labels.iter().copied().max().unwrap_or(0);
        let mut sizes = vec![0; k];
        for &l in &self.labels {
            sizes[l - 1] += 1;
        }
        sizes
    }
}

/// Clusters the table's samples (or columns) with Ward linkage on the values
/// as given (standardize first if the features have different scales) and
/// writes the files.
///
/// # Errors
/// An unreadable table, `k` of 0 or above the number of items, the
/// clustering's own errors ([`ward_linkage`]), unwritable outputs.
pub fn cluster_file(o: &ClusterFileOptions) -> Result<ClusterFileSummary> {
    let table = Table::read_csv(&o.features)?;
    let (rows, cols) = (table.n_rows(), table.n_cols());
    let z = zscore_columns(&table.data, rows, cols);
    let (what, names, items, dims, data, shown) = if o.columns {
        (
            "features",
            table.col_names.clone(),
            cols,
            rows,
            transpose(&table.data, rows, cols),
            transpose(&z, rows, cols),
        )
    } else {
        (
            "samples",
            table.row_names.clone(),
            rows,
            cols,
            table.data.clone(),
            z,
        )
    };
    if o.k == 0 || o.k > items {
        return Err(Error::invalid(format!(
            "--k {} must be between 1 and the number of {what} ({items})",
            o.k
        )));
    }
    let start = Instant::now();
    let linkage = ward_linkage(&data, items, dims).map_err(|e| match e {
        Error::Invalid(msg) => Error::format(&o.features, msg),
        other => other,
    })?;
    let labels = linkage.fcluster_maxclust(o.k)?;
    let seconds = start.elapsed().as_secs_f64();

    let mut w = CsvWriter::new();
    w.record([if o.columns { "feature" } else { "sample" }, "cluster"]);
    for (name, l) in names.iter().zip(&labels) {
        w.record([name.clone(), l.to_string()]);
    }
    w.write(&o.output)?;
    if let Some(path) = &o.linkage {
        let mut w = CsvWriter::new();
        w.record(["a", "b", "height", "size"]);
        for m in &linkage.merges {
            w.record([
                m.a.to_string(),
                m.b.to_string(),
                m.height.to_string(),
                m.size.to_string(),
            ]);
        }
        w.write(path)?;
    }
    if let Some(path) = &o.plot {
        let (row_names, col_names) = if o.columns {
            (&table.col_names, &table.row_names)
        } else {
            (&table.row_names, &table.col_names)
        };
        let img = dendrogram_heatmap_image(
            &linkage,
            &shown,
            dims,
            row_names,
            col_names,
            &DendrogramHeatmapOptions {
                title: format!("Ward clustering of {items} {what}, k = {}", o.k),
                range: (-3.0, 3.0),
                value_label: "z-score".into(),
                groups: Some(labels.clone()),
            },
        )?;
        save_png(path, &img)?;
    }
    Ok(ClusterFileSummary {
        what,
        names,
        labels,
        linkage,
        seconds,
    })
}

/// Each column centred and scaled to standard deviation 1 (ddof 0); a
/// constant column becomes 0.
fn zscore_columns(data: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = data.to_vec();
    for c in 0..cols {
        let mean = (0..rows).map(|r| data[r * cols + c]).sum::<f64>() / rows as f64;
        let var = (0..rows)
            .map(|r| (data[r * cols + c] - mean).powi(2))
            .sum::<f64>()
            / rows as f64;
        let sd = var.sqrt();
        for r in 0..rows {
            out[r * cols + c] = if sd > 0.0 {
                (data[r * cols + c] - mean) / sd
            } else {
                0.0
            };
        }
    }
    out
}

fn transpose(data: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    (0..cols)
        .flat_map(|c| (0..rows).map(move |r| data[r * cols + c]))
        .collect()
}
