//! Reading a model's weights out of a [`TensorFile`]: one reader and one
//! BatchNorm fold for every model.
//!
//! [`Weights`] hands out tensors by name (relative to an optional prefix such
//! as `module.`), each checked for its dtype (floating point), its shape and
//! its values (every one finite), and records which tensors were used so
//! that the tensors a model did not read are reported. Every error names the
//! file and the tensor.
//!
//! [`BatchNorm`] holds a `BatchNorm2d`'s parameters and running statistics
//! and computes the inference fold `scale = γ/√(var + ε)`,
//! `shift = β − mean·scale` once, in f64, with ε = [`BN_EPS`].

use std::collections::BTreeSet;

use safetensors::Dtype;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::TensorFile;
use crate::tensor::Tensor;

/// BatchNorm's ε: PyTorch's default `1e-5`, as the f32 its float kernels
/// add to the variance. The folds widen it exactly to f64
/// (`f64::from(BN_EPS)`), so a folded BatchNorm and one run as its own op
/// add the same ε.
pub const BN_EPS: f32 = 1e-5;

/// How many leftover names an error lists before `…`.
const LEFTOVERS_SHOWN: usize = 8;

/// The dtypes a weight may be stored in; all are read as f32.
const FLOAT_DTYPES: &str = "F32, F64, F16 or BF16";

fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::BF16)
}

/// Reads a model's tensors out of a [`TensorFile`] with checks, and
/// remembers which it handed out.
///
/// Names passed to the reader are relative to its prefix (`""` by default):
/// with the prefix `"module."`, `w.host("fc.weight", …)` reads
/// `module.fc.weight`. Errors and [`Weights::leftovers`] use the full names
/// in the file.
#[derive(Debug)]
pub struct Weights<'a> {
    file: &'a TensorFile,
    prefix: String,
    source: String,
    used: BTreeSet<String>,
}

impl<'a> Weights<'a> {
    /// A reader over all of `file`'s tensors.
    pub fn new(file: &'a TensorFile) -> Self {
        Self::with_prefix(file, "")
    }

    /// A reader over the tensors of `file` whose names start with `prefix`
    /// (prepended verbatim, so include the separator: `"module."`).
    pub fn with_prefix(file: &'a TensorFile, prefix: impl Into<String>) -> Self {
        Weights {
            file,
            prefix: prefix.into(),
            source: "the architecture read off the other weights".to_string(),
            used: BTreeSet::new(),
        }
    }

    /// Says where the expected shapes come from, for shape errors
    /// ("… expected [16, 32, 3, 3] from `source`"), e.g. the hyper-parameters
    /// read off the other weights.
    pub fn shapes_from(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// The file read.
    pub fn file(&self) -> &'a TensorFile {
        self.file
    }

    /// The prefix of every name (`""` when none).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `name`'s full name in the file.
    pub fn full_name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The names under the prefix, relative to it, sorted.
    pub fn names(&self) -> Vec<String> {
        self.file
            .names()
            .into_iter()
            .filter_map(|n| n.strip_prefix(self.prefix.as_str()).map(str::to_string))
            .collect()
    }

    /// True when the file holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.file.contains(&self.full_name(name))
    }

    /// The shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&'a [usize]> {
        self.file.shape(&self.full_name(name))
    }

    fn error(&self, msg: String) -> Error {
        Error::format(self.file.path(), msg)
    }

    /// `name`'s values as f32: it must exist, be stored as a floating-point
    /// dtype, have exactly `shape` and hold only finite values. Marks it used.
    ///
    /// # Errors
    /// Naming the file and the tensor: missing (with similar names), the
    /// dtype found, the shape found and the one expected, or the flat index
    /// and value of the first NaN or infinity.
    pub fn host(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let full = self.full_name(name);
        let (found, dtype) = self.file.require(&full)?;
        if !is_float(dtype) {
            return Err(self.error(format!(
                "tensor {full:?} has dtype {dtype:?}, expected a floating-point dtype ({FLOAT_DTYPES})"
            )));
        }
        if found != shape {
            return Err(self.error(format!(
                "tensor {full:?} has shape {found:?}, expected {shape:?} from {}",
                self.source
            )));
        }
        let (_, data) = self.file.f32(&full)?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(self.error(format!(
                "tensor {full:?} holds a non-finite value ({}) at flat index {i}",
                data[i]
            )));
        }
        self.used.insert(full);
        Ok(data)
    }

    /// [`Weights::host`] for a tensor that may be absent (`None` then).
    pub fn host_optional(&mut self, name: &str, shape: &[usize]) -> Result<Option<Vec<f32>>> {
        if self.contains(name) {
            self.host(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// [`Weights::host`] uploaded to `be`'s device.
    pub fn tensor(&mut self, be: &Backend, name: &str, shape: &[usize]) -> Result<Tensor> {
        let data = self.host(name, shape)?;
        Tensor::from_vec(be, shape, data)
    }

    /// Accepts `name` without reading it (a training-only buffer such as
    /// `num_batches_tracked` or a codebook's `cluster_size`): when present,
    /// its shape must be one of `shapes`, and it is marked used; any dtype
    /// is accepted. Returns whether it is present.
    pub fn skip(&mut self, name: &str, shapes: &[&[usize]]) -> Result<bool> {
        let full = self.full_name(name);
        let Some(found) = self.file.shape(&full) else {
            return Ok(false);
        };
        if !shapes.contains(&found) {
            let expected: Vec<String> = shapes.iter().map(|s| format!("{s:?}")).collect();
            return Err(self.error(format!(
                "tensor {full:?} has shape {found:?}, expected {} from {}",
                expected.join(" or "),
                self.source
            )));
        }
        self.used.insert(full);
        Ok(true)
    }

    /// `P.weight`, `P.bias`, `P.running_mean` and `P.running_var` of a
    /// `BatchNorm2d(c)` under `prefix` (each read with [`Weights::host`]);
    /// `P.num_batches_tracked` (training only) is accepted when it is a
    /// scalar or `[1]`.
    ///
    /// # Errors
    /// As [`Weights::host`], and a negative running variance.
    pub fn batchnorm(&mut self, prefix: &str, c: usize) -> Result<BatchNorm> {
        self.skip(&format!("{prefix}.num_batches_tracked"), &[&[], &[1]])?;
        let bn = BatchNorm {
            gamma: self.host(&format!("{prefix}.weight"), &[c])?,
            beta: self.host(&format!("{prefix}.bias"), &[c])?,
            mean: self.host(&format!("{prefix}.running_mean"), &[c])?,
            var: self.host(&format!("{prefix}.running_var"), &[c])?,
        };
        if let Some(i) = bn.var.iter().position(|&v| v < 0.0) {
            let full = self.full_name(prefix);
            return Err(self.error(format!(
                "{full}.running_var[{i}] is negative (running_var[{i}] = {} is negative; a variance must be ≥ 0)",
                bn.var[i]
            )));
        }
        Ok(bn)
    }

    /// The full names of the tensors under the prefix that were not handed
    /// out (nor [skipped](Weights::skip)), sorted.
    pub fn leftovers(&self) -> Vec<String> {
        self.file
            .names()
            .into_iter()
            .filter(|n| n.starts_with(self.prefix.as_str()) && !self.used.contains(n))
            .collect()
    }

    /// Fails when tensors are left over: "`n` tensors `what`: a, b, …",
    /// e.g. `what` = "are not part of this CP2Image generator".
    pub fn reject_leftovers(&self, what: &str) -> Result<()> {
        let left = self.leftovers();
        if left.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = left
            .iter()
            .take(LEFTOVERS_SHOWN)
            .map(String::as_str)
            .collect();
        Err(self.error(format!(
            "{} tensors {what}: {}{}",
            left.len(),
            shown.join(", "),
            if left.len() > shown.len() {
                ", …"
            } else {
                ""
            }
        )))
    }
}

/// A `BatchNorm2d`'s parameters and running statistics on the host, as
/// [`Weights::batchnorm`] reads them.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNorm {
    /// γ (`weight`).
    pub gamma: Vec<f32>,
    /// β (`bias`).
    pub beta: Vec<f32>,
    /// `running_mean`.
    pub mean: Vec<f32>,
    /// `running_var`.
    pub var: Vec<f32>,
}

impl BatchNorm {
    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.gamma.len()
    }

    /// The fold's scale `γ/√(var + ε)` per channel, in f64 (every fold in
    /// the crate starts here).
    pub fn scale(&self) -> Vec<f64> {
        self.gamma
            .iter()
            .zip(&self.var)
            .map(|(&g, &v)| f64::from(g) / (f64::from(v) + f64::from(BN_EPS)).sqrt())
            .collect()
    }

    /// `(scale, shift)` with `shift = β − mean·scale`, both computed in f64
    /// and rounded once to f32: inference BatchNorm as `x·scale + shift`.
    pub fn scale_shift(&self) -> (Vec<f32>, Vec<f32>) {
        self.scale()
            .into_iter()
            .enumerate()
            .map(|(c, s)| {
                (
                    s as f32,
                    (f64::from(self.beta[c]) - f64::from(self.mean[c]) * s) as f32,
                )
            })
            .unzip()
    }

    /// Folds this BatchNorm into the convolution right before it: per output
    /// channel `o`, `W'[o] = W[o]·scale[o]` and
    /// `b'[o] = (b[o] − mean[o])·scale[o] + β[o]`, in f64 and rounded once.
    /// `weight` is `[c_out, …]` row-major and `bias` `[c_out]` (zeros for a
    /// conv without bias; `b'` is then [`BatchNorm::scale_shift`]'s shift
    /// bit for bit).
    pub fn fold_into_conv(&self, weight: &mut [f32], bias: &mut [f32]) -> Result<()> {
        let c = self.channels();
        if bias.len() != c || weight.len().checked_rem(c).unwrap_or(weight.len()) != 0 {
            return Err(Error::invalid(format!(
                "BatchNorm fold: {c} channels cannot fold into a conv with {} weights and {} biases",
                weight.len(),
                bias.len()
            )));
        }
        let per_out = weight.len().checked_div(c).unwrap_or(0);
        for (o, s) in self.scale().into_iter().enumerate() {
            for w in &mut weight[o * per_out..(o + 1) * per_out] {
                *w = (f64::from(*w) * s) as f32;
            }
            bias[o] = ((f64::from(bias[o]) - f64::from(self.mean[o])) * s + f64::from(self.beta[o]))
                as f32;
        }
        Ok(())
    }
}
