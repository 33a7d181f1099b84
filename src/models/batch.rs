//! Running a model over a large input in device batches and gathering its
//! named outputs, so that `cellmorph infer` never holds more than one batch of
//! activations on the device.

use std::collections::BTreeMap;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::TensorWriter;
use crate::tensor::Tensor;

/// Calls `f(batch, first_index)` for consecutive batches of at most
/// `batch_size` items along the first axis of the host data `input` with
/// `shape`; each batch is copied to `be`'s device.
pub fn for_each_batch(
    be: &Backend,
    shape: &[usize],
    input: &[f32],
    batch_size: usize,
    mut f: impl FnMut(&Tensor, usize) -> Result<()>,
) -> Result<()> {
    let (&n, rest) = shape
        .split_first()
        .ok_or_else(|| Error::invalid("the input tensor has no batch axis (it is a scalar)"))?;
    if batch_size == 0 {
        return Err(Error::invalid("the batch size must be at least 1"));
    }
    let item: usize = rest.iter().product();
    if item * n != input.len() {
        return Err(Error::invalid(format!(
            "input shape {shape:?} needs {} values, got {}",
            item * n,
            input.len()
        )));
    }
    let mut start = 0;
    while start < n {
        let len = batch_size.min(n - start);
        let mut bshape = shape.to_vec();
        bshape[0] = len;
        let x = Tensor::from_slice(be, &bshape, &input[start * item..(start + len) * item])?;
        f(&x, start)?;
        start += len;
    }
    Ok(())
}

enum Part {
    F32(Vec<usize>, Vec<f32>),
    I32(Vec<usize>, Vec<i32>),
    /// Weighted mean of per-batch scalars: (Σ value·weight, Σ weight).
    Mean(f64, f64),
}

/// Named outputs gathered batch by batch and concatenated along the first axis.
#[derive(Default)]
pub struct Gathered {
    parts: BTreeMap<String, Part>,
}

impl Gathered {
    /// An empty collection.
    pub fn new() -> Self {
        Self::default()
    }

    fn check_item(name: &str, have: &[usize], new: &[usize]) -> Result<()> {
        if have.get(1..) != new.get(1..) {
            return Err(Error::invalid(format!(
                "output {name}: batch shapes {have:?} and {new:?} differ beyond the first axis"
            )));
        }
        Ok(())
    }

    /// Appends a batch of an f32 output.
    pub fn push(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let data = t.to_vec()?;
        match self.parts.get_mut(name) {
            None => {
                self.parts
                    .insert(name.to_string(), Part::F32(t.shape().to_vec(), data));
            }
            Some(Part::F32(shape, all)) => {
                Self::check_item(name, shape, t.shape())?;
                shape[0] += t.shape().first().copied().unwrap_or(0);
                all.extend(data);
            }
            Some(_) => return Err(Error::invalid(format!("output {name}: mixed types"))),
        }
        Ok(())
    }

    /// Appends a batch of an i32 output.
    pub fn push_i32(&mut self, name: &str, t: &Tensor<i32>) -> Result<()> {
        let data = t.to_vec()?;
        match self.parts.get_mut(name) {
            None => {
                self.parts
                    .insert(name.to_string(), Part::I32(t.shape().to_vec(), data));
            }
            Some(Part::I32(shape, all)) => {
                Self::check_item(name, shape, t.shape())?;
                shape[0] += t.shape().first().copied().unwrap_or(0);
                all.extend(data);
            }
            Some(_) => return Err(Error::invalid(format!("output {name}: mixed types"))),
        }
        Ok(())
    }

    /// Adds a batch's value of a scalar that is a mean over items (such as a
    /// loss), weighted by the batch's item count.
    pub fn push_mean(&mut self, name: &str, value: f64, weight: f64) -> Result<()> {
        match self
            .parts
            .entry(name.to_string())
            .or_insert(Part::Mean(0.0, 0.0))
        {
            Part::Mean(s, w) => {
                *s += value * weight;
                *w += weight;
                Ok(())
            }
            _ => Err(Error::invalid(format!("output {name}: mixed types"))),
        }
    }

    /// Adds every gathered output to `out`.
    pub fn write_into(&self, out: &mut TensorWriter) -> Result<()> {
        for (name, part) in &self.parts {
            match part {
                Part::F32(shape, data) => out.add_slice(name, shape, data)?,
                Part::I32(shape, data) => out.add_slice(name, shape, data)?,
                Part::Mean(s, w) => {
                    let v = if *w > 0.0 { s / w } else { f64::NAN };
                    out.add_slice(name, &[1], &[v as f32])?
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_the_input_and_outputs_concatenate() {
        let be = Backend::cpu();
        let data: Vec<f32> = (0..10 * 3).map(|v| v as f32).collect();
        let mut g = Gathered::new();
        let mut starts = Vec::new();
        for_each_batch(&be, &[10, 3], &data, 4, |x, s| {
            starts.push((s, x.shape()[0]));
            g.push("y", x)?;
            g.push_mean("m", s as f64, x.shape()[0] as f64)
        })
        .unwrap();
        assert_eq!(starts, vec![(0, 4), (4, 4), (8, 2)]);
        let mut w = TensorWriter::new();
        g.write_into(&mut w).unwrap();
        let dir = std::env::temp_dir().join(format!("cellmorph-batch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("o.safetensors");
        w.write(&p).unwrap();
        let f = crate::io::TensorFile::open(&p).unwrap();
        assert_eq!(f.f32("y").unwrap(), (vec![10, 3], data));
        // (0·4 + 4·4 + 8·2) / 10
        assert_eq!(f.f32("m").unwrap().1, vec![3.2]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(for_each_batch(&be, &[10, 3], &[0.0; 29], 4, |_, _| Ok(())).is_err());
        assert!(for_each_batch(&be, &[10, 3], &[0.0; 30], 0, |_, _| Ok(())).is_err());
    }
}
