//! PNG outputs of the expression commands: predicted-vs-measured scatter
//! plots of the best genes, and a patch-wise map drawn over its image.

use std::path::Path;

use super::evaluate::Evaluation;
use super::map::ExpressionMap;
use crate::imaging::{read_gray, PatchGrid};
use crate::plot::{heatmap_overlay, scatter_plot, HeatmapOptions, PlotOptions};
use crate::{Error, Result};

/// A file-name-safe version of `s`.
fn safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Predicted-vs-measured scatter PNGs of the top `k` genes of every data
/// set, named `<data set>_<gene>.png` in `dir`; returns their paths. Titles
/// say whether the data set is in-sample or held-out; axes are labelled
/// with the gene and `units` when given.
pub fn scatter_top(
    eval: &Evaluation,
    k: usize,
    dir: &Path,
    units: Option<&str>,
) -> Result<Vec<std::path::PathBuf>> {
    let unit = units.map_or(String::new(), |u| format!(" ({u})"));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut written = Vec::new();
    for ds in eval.datasets() {
        for r in eval.top(&ds, k) {
            let path = dir.join(format!("{}_{}.png", safe(&ds), safe(&r.gene)));
            let opts = PlotOptions {
                title: format!(
                    "{} ({})  {}  R2 {:.3}  q {:.1e}",
                    ds,
                    eval.role(&ds).label(),
                    r.gene,
                    r.r2,
                    r.q
                ),
                x_label: format!("measured {}{unit}", r.gene),
                y_label: format!("predicted {}{unit}", r.gene),
                ..PlotOptions::default()
            };
            scatter_plot(&path, &r.measured, &r.predicted, &opts)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// The map drawn over its image as a heat-map PNG.
pub fn map_png(m: &ExpressionMap, image: &Path, out: &Path) -> Result<()> {
    let img = read_gray(image)?;
    let grid = PatchGrid::new(img.width(), img.height(), m.patch)?;
    let opts = HeatmapOptions {
        title: m.gene.clone(),
        ..HeatmapOptions::default()
    };
    heatmap_overlay(out, &img, &grid, &m.values, &opts)
}
