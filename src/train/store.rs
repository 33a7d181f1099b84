//! One store for a model's parameters, their gradients and its buffers, by
//! PyTorch `state_dict` name, in a fixed order (the order of insertion),
//! saved and loaded as safetensors.
//!
//! Trainable parameters carry a gradient of the same length; buffers
//! (BatchNorm running statistics, VQ codebooks and their moving averages)
//! are stored alongside with `trainable = false` and no gradient, so that
//! writing the store gives the whole `state_dict`.

use std::collections::{BTreeMap, HashMap};

use crate::io::{TensorFile, TensorWriter};
use crate::train::checkpoint::OPTIMIZER_PREFIX;
use crate::train::optim::{Optimizer, ParamGroup};
use crate::{Error, Result};

/// One named tensor of the store.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    /// The `state_dict` key.
    pub name: String,
    /// PyTorch's shape.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub value: Vec<f32>,
    /// The gradient (same length as `value`) for a trainable parameter;
    /// empty for a buffer.
    pub grad: Vec<f32>,
    /// Updated by the optimizer (a parameter) or not (a buffer).
    pub trainable: bool,
}

/// The store: see the module documentation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamStore {
    params: Vec<Param>,
    index: HashMap<String, usize>,
}

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tensor; its id is its position. A duplicate name or a value
    /// whose length disagrees with the shape is an error.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        value: Vec<f32>,
        trainable: bool,
    ) -> Result<usize> {
        let name = name.into();
        let len = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::invalid(format!("{name}: shape {shape:?} overflows")))?;
        if len != value.len() {
            return Err(Error::invalid(format!(
                "{name}: shape {shape:?} needs {len} values, got {}",
                value.len()
            )));
        }
        if self.index.contains_key(&name) {
            return Err(Error::invalid(format!("{name}: already in the store")));
        }
        let id = self.params.len();
        self.index.insert(name.clone(), id);
        self.params.push(Param {
            name,
            shape: shape.to_vec(),
            grad: if trainable {
                vec![0.0; len]
            } else {
                Vec::new()
            },
            value,
            trainable,
        });
        Ok(id)
    }

    /// Every f32 tensor of `file` (in name order) except a checkpoint's
    /// optimizer state (names under [`OPTIMIZER_PREFIX`]); `trainable(name)`
    /// says which are parameters.
    pub fn from_file(file: &TensorFile, trainable: impl Fn(&str) -> bool) -> Result<Self> {
        let mut store = Self::new();
        for name in file.names() {
            if name.starts_with(OPTIMIZER_PREFIX) {
                continue;
            }
            let (shape, value) = file.f32(&name)?;
            if let Some(i) = value.iter().position(|v| !v.is_finite()) {
                return Err(Error::format(
                    file.path(),
                    format!("tensor {name:?} holds a non-finite value at flat index {i}"),
                ));
            }
            let t = trainable(&name);
            store.insert(name, &shape, value, t)?;
        }
        Ok(store)
    }

    /// A `state_dict` under `prefix` in `file` (e.g. `"before."`, or `""`),
    /// prefix removed: every f32 tensor into a store (`is_buffer(name)`
    /// marks buffers: running statistics, spectral-norm vectors) and every
    /// int64 `*.num_batches_tracked` scalar into the returned counters.
    /// Non-finite values are an error naming the tensor.
    pub fn read_state_dict(
        file: &TensorFile,
        prefix: &str,
        is_buffer: impl Fn(&str) -> bool,
    ) -> Result<(Self, BTreeMap<String, i64>)> {
        let mut store = Self::new();
        let mut counters = BTreeMap::new();
        for name in file.names() {
            let Some(key) = name.strip_prefix(prefix) else {
                continue;
            };
            if key.ends_with(".num_batches_tracked") {
                let (_, v) = file.i64(&name)?;
                let &[count] = v.as_slice() else {
                    return Err(Error::format(
                        file.path(),
                        format!("tensor {name:?} has {} values, expected one", v.len()),
                    ));
                };
                counters.insert(key.to_string(), count);
            } else {
                let (shape, v) = file.f32(&name)?;
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    return Err(Error::format(
                        file.path(),
                        format!("tensor {name:?} holds a non-finite value at flat index {i}"),
                    ));
                }
                store.insert(key, &shape, v, !is_buffer(key))?;
            }
        }
        Ok((store, counters))
    }

    /// The id of `name`, or an error naming it.
    pub fn id(&self, name: &str) -> Result<usize> {
        self.index
            .get(name)
            .copied()
            .ok_or_else(|| Error::invalid(format!("the parameter store has no tensor {name:?}")))
    }

    /// All tensors, in order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// The tensor `id`.
    pub fn get(&self, id: usize) -> &Param {
        &self.params[id]
    }

    /// The tensor `id`, mutable.
    pub fn get_mut(&mut self, id: usize) -> &mut Param {
        &mut self.params[id]
    }

    /// The tensor called `name`.
    pub fn by_name(&self, name: &str) -> Result<&Param> {
        Ok(&self.params[self.id(name)?])
    }

    /// Sets every gradient to zero.
    pub fn zero_grads(&mut self) {
        for p in &mut self.params {
            p.grad.fill(0.0);
        }
    }

    /// Adds `g` into the gradient of `id` (a trainable parameter of the
    /// same length).
    pub fn accumulate(&mut self, id: usize, g: &[f32]) -> Result<()> {
        let p = &mut self.params[id];
        if p.grad.len() != g.len() {
            return Err(Error::shape(
                "ParamStore::accumulate",
                format!(
                    "{}: gradient of {} values for {} (trainable: {})",
                    p.name,
                    g.len(),
                    p.grad.len(),
                    p.trainable
                ),
            ));
        }
        for (a, &b) in p.grad.iter_mut().zip(g) {
            *a += b;
        }
        Ok(())
    }

    /// Registers every trainable parameter, in store order, in group
    /// `group` of `opt` (created if `opt` has none), so that
    /// [`ParamStore::step`] can hand values and gradients over in the same
    /// order.
    pub fn register(&self, opt: &mut Optimizer) -> Result<()> {
        let group = if opt.groups().is_empty() {
            opt.add_group(ParamGroup::new("all"))?
        } else {
            0
        };
        for p in self.params.iter().filter(|p| p.trainable) {
            opt.add_param(group, p.name.clone(), p.value.len())?;
        }
        Ok(())
    }

    /// One optimizer step over the trainable parameters (registered with
    /// [`ParamStore::register`]).
    pub fn step(&mut self, opt: &mut Optimizer, lr: f64) -> Result<()> {
        let (mut values, grads): (Vec<&mut [f32]>, Vec<&[f32]>) = self
            .params
            .iter_mut()
            .filter(|p| p.trainable)
            .map(|p| (&mut p.value[..], &p.grad[..]))
            .unzip();
        opt.step(lr, &mut values, &grads)
    }

    /// Adds every tensor's value (the `state_dict`) to `w`, under its name
    /// with `prefix` in front.
    pub fn write_values(&self, w: &mut TensorWriter, prefix: &str) -> Result<()> {
        for p in &self.params {
            w.add_slice(&format!("{prefix}{}", p.name), &p.shape, &p.value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_checks_names_and_lengths() {
        let mut s = ParamStore::new();
        assert_eq!(s.insert("a", &[2, 3], vec![0.0; 6], true).unwrap(), 0);
        assert!(s.insert("a", &[1], vec![0.0], true).is_err());
        assert!(s.insert("b", &[2], vec![0.0; 3], true).is_err());
        s.insert("buf", &[2], vec![1.0, 2.0], false).unwrap();
        assert!(s.get(1).grad.is_empty());
        s.accumulate(0, &[1.0; 6]).unwrap();
        s.accumulate(0, &[1.0; 6]).unwrap();
        assert_eq!(s.get(0).grad, vec![2.0; 6]);
        assert!(
            s.accumulate(1, &[1.0, 1.0]).is_err(),
            "a buffer has no gradient"
        );
        s.zero_grads();
        assert_eq!(s.get(0).grad, vec![0.0; 6]);
        assert!(s.id("nope").is_err());
    }
}
