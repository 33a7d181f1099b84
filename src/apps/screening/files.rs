//! The screening's files: the predictions CSV (the run's settings and
//! timing in `#` comment lines), the labels CSV, and the pooled features
//! (CSV or safetensors).

use std::collections::HashMap;
use std::path::Path;

use super::predict::PredictRun;
use super::preprocess::SkipReason;
use crate::error::{Error, Result};
use crate::io::{write_atomic, TensorWriter};
use crate::table::{quote_field as quote, split_fields as split_csv};

/// A CSV file: `# key: value` comment lines, a header, rows with their line
/// numbers.
pub(crate) struct CsvRows {
    pub(crate) meta: Vec<(String, String)>,
    pub(crate) header: Vec<String>,
    pub(crate) rows: Vec<(usize, Vec<String>)>,
}

impl CsvRows {
    /// Index of the column named `name` (case-insensitive).
    pub(crate) fn column(&self, name: &str) -> Option<usize> {
        self.header
            .iter()
            .position(|h| h.eq_ignore_ascii_case(name))
    }
}

pub(crate) fn read_csv_rows(path: &Path) -> Result<CsvRows> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text =
        String::from_utf8(bytes).map_err(|_| Error::format(path, "not a text (UTF-8) CSV file"))?;
    let mut meta = Vec::new();
    let mut header: Option<Vec<String>> = None;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_start_matches('\u{feff}');
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            if let Some((k, v)) = comment.split_once(':') {
                meta.push((k.trim().to_string(), v.trim().to_string()));
            }
            continue;
        }
        let fields =
            split_csv(line).map_err(|e| Error::format(path, format!("line {}: {e}", i + 1)))?;
        match header {
            None => header = Some(fields),
            Some(ref h) if fields.len() > h.len() => {
                return Err(Error::format(
                    path,
                    format!(
                        "line {}: {} fields but the header has {}",
                        i + 1,
                        fields.len(),
                        h.len()
                    ),
                ))
            }
            Some(_) => rows.push((i + 1, fields)),
        }
    }
    let header = header.ok_or_else(|| Error::format(path, "empty CSV file (no header)"))?;
    Ok(CsvRows { meta, header, rows })
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
    let mut s = String::new();
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
    s.push_str("# cellmorph screen predict\n");
    for (k, v) in meta {
        s.push_str(&format!("# {k}: {v}\n"));
    }
    s.push_str("image,status,prob_positive,prediction,mean_v,reason\n");
    for p in &run.predictions {
        let row = match &p.outcome {
            Ok(v) => format!(
                "{},ok,{},{},{:.3},",
                quote(&p.id),
                v.probability,
                u8::from(v.positive),
                v.mean_v
            ),
            Err(r) => {
                let mean = match r {
                    SkipReason::TooBright { mean_v, .. } => format!("{mean_v:.3}"),
                    SkipReason::Blank => "0".to_string(),
                    SkipReason::Unreadable(_) => String::new(),
                };
                format!(
                    "{},skipped,,,{mean},{}",
                    quote(&p.id),
                    quote(&r.to_string())
                )
            }
        };
        s.push_str(&row);
        s.push('\n');
    }
    write_atomic(path, s.as_bytes())
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
/// Unreadable file, missing columns, a probability that is not a finite
/// number, or a duplicated image id.
pub fn read_predictions(path: &Path) -> Result<PredictionsFile> {
    let csv = read_csv_rows(path)?;
    let col = |name: &str| {
        csv.column(name)
            .ok_or_else(|| Error::format(path, format!("the header has no `{name}` column")))
    };
    let (ci, cp) = (col("image")?, col("prob_positive")?);
    let (cs, cr) = (csv.column("status"), csv.column("reason"));
    let get = |row: &[String], c: usize| row.get(c).cloned().unwrap_or_default();
    let mut seen = HashMap::new();
    let mut rows = Vec::with_capacity(csv.rows.len());
    for (line, row) in &csv.rows {
        let id = get(row, ci);
        if id.is_empty() {
            return Err(Error::format(path, format!("line {line}: empty image id")));
        }
        if let Some(first) = seen.insert(id.clone(), *line) {
            return Err(Error::format(
                path,
                format!("line {line}: image {id:?} already on line {first}"),
            ));
        }
        let skipped = cs.is_some_and(|c| get(row, c).eq_ignore_ascii_case("skipped"));
        let probability = if skipped {
            None
        } else {
            let v = get(row, cp);
            let p: f64 = v
                .parse()
                .ok()
                .filter(|p: &f64| p.is_finite())
                .ok_or_else(|| {
                    Error::format(
                        path,
                        format!("line {line}: prob_positive {v:?} is not a finite number"),
                    )
                })?;
            Some(p)
        };
        rows.push(PredictionRow {
            id,
            probability,
            reason: cr.map(|c| get(row, c)).filter(|r| !r.is_empty()),
        });
    }
    let meta = |key: &str| {
        csv.meta
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
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
    let csv = read_csv_rows(path)?;
    let col = |name: &str| {
        csv.column(name).ok_or_else(|| {
            Error::format(
                path,
                format!("the header has no `{name}` column (expected `image,label`)"),
            )
        })
    };
    let (ci, cl) = (col("image")?, col("label")?);
    let mut seen = HashMap::new();
    let mut out = Vec::with_capacity(csv.rows.len());
    for (line, row) in &csv.rows {
        let id = row.get(ci).cloned().unwrap_or_default();
        let raw = row
            .get(cl)
            .map(|s| s.to_ascii_lowercase())
            .unwrap_or_default();
        let label = match raw.as_str() {
            "1" | "true" | "positive" | "high" => true,
            "0" | "false" | "negative" | "low" => false,
            _ => {
                return Err(Error::format(
                    path,
                    format!("line {line}: label {raw:?} is not 1/0, true/false, positive/negative or high/low"),
                ))
            }
        };
        if id.is_empty() {
            return Err(Error::format(path, format!("line {line}: empty image id")));
        }
        if let Some(first) = seen.insert(id.clone(), *line) {
            return Err(Error::format(
                path,
                format!("line {line}: image {id:?} already on line {first}"),
            ));
        }
        out.push((id, label));
    }
    if out.is_empty() {
        return Err(Error::format(path, "no labels"));
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
            let mut s = String::from("image");
            for k in 0..c {
                s.push_str(&format!(",f{k}"));
            }
            s.push('\n');
            for (id, f) in &rows {
                s.push_str(&quote(id));
                for v in *f {
                    s.push_str(&format!(",{v}"));
                }
                s.push('\n');
            }
            write_atomic(path, s.as_bytes())
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
