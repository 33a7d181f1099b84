//! The feature vectors the paper's figures are drawn from, in standardized
//! units: one feature varied (Figure 4c, [`manipulation`]), the most
//! different features replaced step by step (Figure 5a,
//! [`replacement_path`]), the straight line between two vectors (Figure 5c,
//! [`linear_path`]); [`cosine_similarity`] labels the steps.

use crate::{Error, Result};

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

/// The most steps of a manipulation or interpolation (each step is one
/// generated image in a contact sheet).
pub const MAX_STEPS: usize = 4096;

/// `steps` evenly spaced values from `from` to `to` inclusive (2 to
/// [`MAX_STEPS`]).
pub fn linspace(from: f64, to: f64, steps: usize) -> Result<Vec<f64>> {
    if !(2..=MAX_STEPS).contains(&steps) || !from.is_finite() || !to.is_finite() {
        return Err(Error::invalid(format!(
            "a range needs finite ends and 2 to {MAX_STEPS} steps (one image each), got {from} … {to} in {steps}"
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
