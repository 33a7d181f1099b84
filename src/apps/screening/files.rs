//! The screening's files: the predictions CSV (the run's settings and
//! timing in `#` comment lines), the labels CSV, and the pooled features
//! (CSV or safetensors).

use std::collections::HashMap;
use std::path::Path;

use super::predict::PredictRun;
use super::preprocess::SkipReason;
use crate::csv::{CsvFile, CsvWriter};
use crate::error::{Error, Result};
use crate::io::TensorWriter;

/// Reads a screening CSV (see [`crate::csv`]): rows may be shorter than
/// the header (missing cells read as empty) but not longer. Columns are
/// found by name, ignoring case ([`CsvFile::column_ignore_case`]).
pub(crate) fn read_csv(path: &Path) -> Result<CsvFile> {
    let csv = CsvFile::read(path)?;
    if let Some(row) = csv.rows.iter().find(|r| r.len() > csv.header.len()) {
        return Err(csv.width_error(row));
    }
    Ok(csv)
}

/// The `# key: value` comment lines of a screening CSV.
fn comment_values(csv: &CsvFile) -> Vec<(&str, &str)> {
    csv.comments
        .iter()
        .filter_map(|c| c.text.split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect()
}

/// Writes the predictions CSV: `#` comment lines with the run's settings and
/// timing (`key: value`; read back by [`read_predictions`], skipped by
/// `pandas.read_csv(..., comment="#")`), then
/// `image,status,prob_positive,prediction,mean_v,reason` with status `ok`
/// or `skipped` and, for skipped images, the reason. `weights` is recorded
/// as given.
pub fn write_predictions(path: &Path, run: &PredictRun, weights: &str) -> Result<()> {
    let t = &run.timing;
    let skipped = run.skipped().count();
    let meta: [(&str, String); 11] = [
        ("weights", weights.replace(['\n', '\r'], " ")),
        ("device", run.device.clone()),
        ("batch_size", run.options.batch_size.to_string()),
        ("threshold", run.options.threshold.to_string()),
        ("positive_class", run.options.positive_class.to_string()),
        (
            "imagenet_normalize",
            run.options.preprocess.imagenet_normalize.to_string(),
        ),
        ("images", format!("{}", run.predictions.len())),
        ("predicted", format!("{} (skipped {skipped})", t.images)),
        ("total_seconds", format!("{:.6}", t.total_seconds)),
        ("inference_seconds", format!("{:.6}", t.inference_seconds)),
        (
            "images_per_second",
            format!(
                "{:.3} (inference only: {:.3})",
                t.images_per_second(),
                t.inference_images_per_second()
            ),
        ),
    ];
    let mut w = CsvWriter::new();
    w.comment("cellmorph screen predict");
    for (k, v) in meta {
        w.comment(&format!("{k}: {v}"));
    }
    w.record([
        "image",
        "status",
        "prob_positive",
        "prediction",
        "mean_v",
        "reason",
    ]);
    for p in &run.predictions {
        match &p.outcome {
            Ok(v) => w.record([
                p.id.as_str(),
                "ok",
                &v.probability.to_string(),
                &u8::from(v.positive).to_string(),
                &format!("{:.3}", v.mean_v),
                "",
            ]),
            Err(r) => {
                let mean = match r {
                    SkipReason::TooBright { mean_v, .. } => format!("{mean_v:.3}"),
                    SkipReason::Blank => "0".to_string(),
                    SkipReason::Unreadable(_) | SkipReason::TooSmall { .. } => String::new(),
                };
                w.record([p.id.as_str(), "skipped", "", "", &mean, &r.to_string()]);
            }
        }
    }
    w.write(path)
}

/// One row of a predictions file.
#[derive(Clone, Debug, PartialEq)]
pub struct PredictionRow {
    /// Image id.
    pub id: String,
    /// Positive-class probability; `None` for a skipped image.
    pub probability: Option<f64>,
    /// Skip reason, for skipped images.
    pub reason: Option<String>,
}

/// A predictions file as read back.
#[derive(Clone, Debug, PartialEq)]
pub struct PredictionsFile {
    /// Rows in file order.
    pub rows: Vec<PredictionRow>,
    /// Predicted images (from the timing comments).
    pub images: Option<usize>,
    /// Whole-run seconds.
    pub total_seconds: Option<f64>,
    /// Device seconds.
    pub inference_seconds: Option<f64>,
    /// Device the run used.
    pub device: Option<String>,
}

/// Reads a predictions CSV written by [`write_predictions`] (or any CSV with
/// `image` and `prob_positive` columns; a `status` column marks skips).
///
/// # Errors
/// Unreadable file, missing columns, a probability that is not a number
/// in [0, 1], or a duplicated image id.
pub fn read_predictions(path: &Path) -> Result<PredictionsFile> {
    let csv = read_csv(path)?;
    let col = |name: &str| {
        csv.column_ignore_case(name)
            .ok_or_else(|| csv.error(format!("the header has no `{name}` column")))
    };
    let (ci, cp) = (col("image")?, col("prob_positive")?);
    let (cs, cr) = (
        csv.column_ignore_case("status"),
        csv.column_ignore_case("reason"),
    );
    let mut seen = HashMap::new();
    let mut rows = Vec::with_capacity(csv.rows.len());
    for row in &csv.rows {
        let id = row.get(ci);
        if id.is_empty() {
            return Err(csv.cell_error(row.line, ci, "empty image id"));
        }
        if let Some(first) = seen.insert(id, row.line) {
            return Err(csv.cell_error(
                row.line,
                ci,
                format!("image {id:?} already on line {first}"),
            ));
        }
        let skipped = cs.is_some_and(|c| row.get(c).eq_ignore_ascii_case("skipped"));
        let probability = if skipped {
            None
        } else {
            let v = row.get(cp);
            let p: f64 = v
                .parse()
                .ok()
                .filter(|p: &f64| p.is_finite())
                .ok_or_else(|| {
                    csv.cell_error(row.line, cp, format!("{v:?} is not a finite number"))
                })?;
            if !(0.0..=1.0).contains(&p) {
                return Err(csv.cell_error(
                    row.line,
                    cp,
                    format!("{v} is not a probability (0 to 1)"),
                ));
            }
            Some(p)
        };
        rows.push(PredictionRow {
            id: id.to_string(),
            probability,
            reason: cr.map(|c| row.get(c).to_string()).filter(|r| !r.is_empty()),
        });
    }
    let comments = comment_values(&csv);
    let meta = |key: &str| {
        comments
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    };
    let number =
        |key: &str| meta(key).and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok());
    Ok(PredictionsFile {
        rows,
        images: number("predicted").map(|v| v as usize),
        total_seconds: number("total_seconds"),
        inference_seconds: number("inference_seconds"),
        device: meta("device"),
    })
}

/// Reads a labels CSV: a header with `image` and `label` columns; labels
/// `1`/`0`, `true`/`false`, `positive`/`negative` or `high`/`low` (any case).
///
/// # Errors
/// Unreadable file, missing columns, an unknown label or a duplicated image.
pub fn read_labels(path: &Path) -> Result<Vec<(String, bool)>> {
    let csv = read_csv(path)?;
    let col = |name: &str| {
        csv.column_ignore_case(name).ok_or_else(|| {
            csv.error(format!(
                "the header has no `{name}` column (expected `image,label`)"
            ))
        })
    };
    let (ci, cl) = (col("image")?, col("label")?);
    let mut seen = HashMap::new();
    let mut out = Vec::with_capacity(csv.rows.len());
    for row in &csv.rows {
        let id = row.get(ci);
        let raw = row.get(cl).to_ascii_lowercase();
        let label = match raw.as_str() {
            "1" | "true" | "positive" | "high" => true,
            "0" | "false" | "negative" | "low" => false,
            _ => {
                return Err(csv.cell_error(
                    row.line,
                    cl,
                    format!("label {raw:?} is not 1/0, true/false, positive/negative or high/low"),
                ))
            }
        };
        if id.is_empty() {
            return Err(csv.cell_error(row.line, ci, "empty image id"));
        }
        if let Some(first) = seen.insert(id, row.line) {
            return Err(csv.cell_error(
                row.line,
                ci,
                format!("image {id:?} already on line {first}"),
            ));
        }
        out.push((id.to_string(), label));
    }
    if out.is_empty() {
        return Err(csv.error("no labels"));
    }
    Ok(out)
}

/// Writes the pooled features of the predicted images: `.csv` (`image,f0,
/// f1, ...`) or `.safetensors` (`features` `[n, C]`, the image ids as a JSON
/// list in the metadata key `images`), by the extension of `path`.
///
/// # Errors
/// Another extension, a run without features, or a write failure.
pub fn write_features(path: &Path, run: &PredictRun) -> Result<()> {
    let rows: Vec<(&str, &[f32])> = run
        .predictions
        .iter()
        .filter_map(|p| {
            let v = p.outcome.as_ref().ok()?;
            Some((p.id.as_str(), v.features.as_deref()?))
        })
        .collect();
    let predicted = run.predictions.iter().filter(|p| p.outcome.is_ok()).count();
    if rows.len() != predicted {
        return Err(Error::invalid(
            "the run did not keep its features (PredictOptions::keep_features)",
        ));
    }
    let c = rows.first().map_or(0, |r| r.1.len());
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("csv") => {
            let mut w = CsvWriter::new();
            w.record(std::iter::once("image".to_string()).chain((0..c).map(|k| format!("f{k}"))));
            for (id, f) in &rows {
                w.record(std::iter::once(id.to_string()).chain(f.iter().map(f32::to_string)));
            }
            w.write(path)
        }
        Some("safetensors") => {
            let mut w = TensorWriter::new();
            let data: Vec<f32> = rows.iter().flat_map(|r| r.1.iter().copied()).collect();
            w.add_slice("features", &[rows.len(), c], &data)?;
            let ids: Vec<&str> = rows.iter().map(|r| r.0).collect();
            let json = serde_json::to_string(&ids)
                .map_err(|e| Error::invalid(format!("image ids to JSON: {e}")))?;
            w.set_metadata("images", &json);
            w.write(path)
        }
        _ => Err(Error::invalid(format!(
            "{}: features are written as .csv or .safetensors",
            path.display()
        ))),
    }
}
