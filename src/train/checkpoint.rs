//! Training checkpoints: one safetensors file holding the model's
//! `state_dict` under its own names (so [`ParamStore::from_file`] reads a
//! checkpoint as it reads weights), the optimizer's state as
//! `optimizer.{param}.{exp_avg,exp_avg_sq,momentum_buffer}` with
//! PyTorch's keys, each parameter's step count, and the caller's progress
//! (any JSON: step, epoch, metrics so far) in the metadata. Written
//! atomically with a checksum; loading checks every name, dtype, shape and
//! count, so a resumed run continues from exactly the saved bits.
//!
//! A checkpoint is refused, with an error naming the file and the tensor or
//! metadata key, when it is damaged (truncated, bytes changed: the checksum,
//! FNV-1a 64 over every tensor's name, shape and bytes and every metadata
//! entry, no longer matches) or does not fit the model (a missing or extra
//! tensor, a dtype other than F32, another shape, NaN or ±∞ in a value or in
//! the optimizer state, optimizer state another optimizer or step would not
//! have, a step count beyond [`MAX_STEP`]). Checkpoints written before the
//! checksum existed have none and get every check but that one. Whether the
//! checkpoint comes from the same run is the trainer's to check, from the
//! progress it returns: `vqvae2 train`, `cp2image train` and `screen train`
//! refuse (they do not merely warn about) other options than the
//! checkpoint's (batch size, learning rate, seed, …) except the run length,
//! other data, optimizer step counts beyond the progress ([`check_steps`])
//! and BatchNorm counters of other layers ([`check_counters`]).

use std::path::Path;

use crate::io::{TensorFile, TensorWriter};
use crate::train::optim::{Optimizer, ParamState, MAX_STEP};
use crate::train::store::ParamStore;
use crate::{Error, Result};

/// Prefix of the optimizer's tensors.
pub const OPTIMIZER_PREFIX: &str = "optimizer.";
/// Metadata key of the per-parameter step counts (a JSON array).
const STEPS_KEY: &str = "cellmorph.optimizer_steps";
/// Metadata key of the caller's progress (JSON).
const PROGRESS_KEY: &str = "cellmorph.progress";
/// Metadata key saying what the file is.
const KIND_KEY: &str = "cellmorph.checkpoint";
/// Metadata key of the checksum (`fnv1a64:` and 16 hex digits).
const CHECKSUM_KEY: &str = "cellmorph.checksum";
/// Prefix of the checksum's value.
const CHECKSUM_PREFIX: &str = "fnv1a64:";

/// FNV-1a, 64 bits, over a checkpoint's contents in a fixed order: the
/// tensors by name (each: name, shape, little-endian f32 bytes), then the
/// metadata by key without the checksum itself (each: key, value); every
/// string and shape led by its length, so no two contents share a stream.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = (self.0 ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn len(&mut self, n: usize) {
        self.bytes(&(n as u64).to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.len(s.len());
        self.bytes(s.as_bytes());
    }
    fn tensor(&mut self, name: &str, shape: &[usize], values: &[f32]) {
        self.str(name);
        self.len(shape.len());
        for &d in shape {
            self.len(d);
        }
        self.len(values.len());
        for v in values {
            self.bytes(&v.to_le_bytes());
        }
    }
}

/// The checksum of `tensors` (sorted by name) and `metadata`.
fn checksum<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize], &'a [f32])>,
    metadata: &std::collections::HashMap<String, String>,
) -> String {
    let mut h = Fnv::new();
    let mut tensors: Vec<_> = tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(b.0));
    h.len(tensors.len());
    for (name, shape, values) in tensors {
        h.tensor(name, shape, values);
    }
    let mut meta: Vec<_> = metadata
        .iter()
        .filter(|(k, _)| *k != CHECKSUM_KEY)
        .collect();
    meta.sort();
    h.len(meta.len());
    for (k, v) in meta {
        h.str(k);
        h.str(v);
    }
    format!("{CHECKSUM_PREFIX}{:016x}", h.0)
}

/// Writes `store` (values of parameters and buffers), `opt`'s state and
/// `progress` to `path` atomically.
pub fn save(
    path: &Path,
    store: &ParamStore,
    opt: &Optimizer,
    progress: &serde_json::Value,
) -> Result<()> {
    save_parts(path, &[("", store, opt)], progress)
}

/// [`save`] for several networks trained together (a GAN's generator and
/// discriminator): each `(prefix, store, optimizer)` under its prefix
/// (e.g. `"G."`).
pub fn save_parts(
    path: &Path,
    parts: &[(&str, &ParamStore, &Optimizer)],
    progress: &serde_json::Value,
) -> Result<()> {
    let mut w = TensorWriter::new();
    let mut meta = std::collections::HashMap::new();
    // (name, shape, values) of every tensor, for the checksum.
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    for (prefix, store, opt) in parts {
        store.write_values(&mut w, prefix)?;
        for p in store.params() {
            tensors.push((format!("{prefix}{}", p.name), p.shape.clone(), &p.value));
        }
        let mut steps = Vec::with_capacity(opt.params().len());
        for (i, info) in opt.params().iter().enumerate() {
            let state = opt.state(i);
            for (key, v) in state.map(ParamState::tensors).unwrap_or_default() {
                let name = format!("{OPTIMIZER_PREFIX}{prefix}{}.{key}", info.name);
                w.add_slice(&name, &[v.len()], v)?;
                tensors.push((name, vec![v.len()], v));
            }
            steps.push(state.map_or(0, |s| s.step));
        }
        meta.insert(
            steps_key(prefix),
            serde_json::Value::from(steps).to_string(),
        );
    }
    meta.insert(
        KIND_KEY.to_string(),
        "training checkpoint (state_dict + optimizer state)".to_string(),
    );
    meta.insert(PROGRESS_KEY.to_string(), progress.to_string());
    let sum = checksum(
        tensors
            .iter()
            .map(|(n, s, v)| (n.as_str(), s.as_slice(), *v)),
        &meta,
    );
    for (k, v) in &meta {
        w.set_metadata(k, v);
    }
    w.set_metadata(CHECKSUM_KEY, &sum);
    w.write(path)
}

fn steps_key(prefix: &str) -> String {
    if prefix.is_empty() {
        STEPS_KEY.to_string()
    } else {
        format!("{STEPS_KEY}.{prefix}")
    }
}

/// Restores `store` and `opt` (registered over the same parameters as when
/// saved) from the checkpoint at `path`; returns the saved progress.
/// Nothing is changed unless the whole file checks out.
pub fn load(path: &Path, store: &mut ParamStore, opt: &mut Optimizer) -> Result<serde_json::Value> {
    load_parts(path, &mut [("", store, opt)])
}

/// [`load`] for a checkpoint written by [`save_parts`], with the same
/// prefixes. Nothing is changed unless every part checks out.
pub fn load_parts(
    path: &Path,
    parts: &mut [(&str, &mut ParamStore, &mut Optimizer)],
) -> Result<serde_json::Value> {
    let file = TensorFile::open(path)?;
    let empty = std::collections::HashMap::new();
    let meta = file.metadata().unwrap_or(&empty);
    let get = |key: &str| -> Result<&String> {
        meta.get(key).ok_or_else(|| {
            Error::format(
                path,
                format!("not a cellmorph training checkpoint (no {key:?} metadata)"),
            )
        })
    };
    get(KIND_KEY)?;
    // Every tensor, read once: F32 only (a checkpoint is written in f32; a
    // converted tensor would not resume the saved bits).
    let mut tensors = std::collections::BTreeMap::new();
    for name in file.names() {
        if let Some(dtype) = file.dtype(&name).filter(|d| *d != safetensors::Dtype::F32) {
            return Err(Error::format(
                path,
                format!("tensor {name:?} has dtype {dtype:?}; a checkpoint holds F32 tensors only"),
            ));
        }
        let t = file.f32(&name)?;
        tensors.insert(name, t);
    }
    if let Some(saved) = meta.get(CHECKSUM_KEY) {
        let sum = checksum(
            tensors
                .iter()
                .map(|(n, (s, v))| (n.as_str(), s.as_slice(), v.as_slice())),
            meta,
        );
        if *saved != sum {
            return Err(Error::format(
                path,
                format!(
                    "{CHECKSUM_KEY} is {saved:?} but the contents give {sum:?}: the file was changed or damaged after it was written"
                ),
            ));
        }
    }
    let progress: serde_json::Value = serde_json::from_str(get(PROGRESS_KEY)?)
        .map_err(|e| Error::format(path, format!("{PROGRESS_KEY}: {e}")))?;
    // Tensors not claimed by any part are an error (another model's file).
    let mut unclaimed: std::collections::BTreeSet<&str> =
        tensors.keys().map(String::as_str).collect();
    let mut restored = Vec::with_capacity(parts.len());
    for (prefix, store, opt) in parts.iter() {
        let key = steps_key(prefix);
        let steps: Vec<u64> = serde_json::from_str(get(&key)?).map_err(|e| {
            Error::format(
                path,
                format!("{key}: {e} (step counts are integers from 0 to {MAX_STEP})"),
            )
        })?;
        if steps.len() != opt.params().len() {
            return Err(Error::format(
                path,
                format!(
                    "optimizer state for {} parameters, the model has {}",
                    steps.len(),
                    opt.params().len()
                ),
            ));
        }
        let mut values = Vec::with_capacity(store.params().len());
        for p in store.params() {
            let name = format!("{prefix}{}", p.name);
            let (shape, data) = take(&tensors, &mut unclaimed, &name).ok_or_else(|| {
                Error::format(
                    path,
                    format!("missing tensor {name:?} (a parameter of the model)"),
                )
            })?;
            if *shape != p.shape {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor {name:?} has shape {shape:?}, the model {:?}",
                        p.shape
                    ),
                ));
            }
            if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor {name:?} holds a non-finite value ({}) at flat index {i}",
                        data[i]
                    ),
                ));
            }
            values.push(data.clone());
        }
        let mut trial = (*opt).clone();
        for (i, (info, &step)) in opt.params().iter().zip(&steps).enumerate() {
            let mut read = |key: &str| -> Result<Option<Vec<f32>>> {
                let name = format!("{OPTIMIZER_PREFIX}{prefix}{}.{key}", info.name);
                let Some((shape, v)) = take(&tensors, &mut unclaimed, &name) else {
                    return Ok(None);
                };
                if *shape != [info.len] {
                    return Err(Error::format(
                        path,
                        format!(
                            "tensor {name:?} has shape {shape:?}, the parameter {} values",
                            info.len
                        ),
                    ));
                }
                Ok(Some(v.clone()))
            };
            let state = ParamState {
                step,
                exp_avg: read("exp_avg")?,
                exp_avg_sq: read("exp_avg_sq")?,
                momentum_buffer: read("momentum_buffer")?,
            };
            trial
                .set_state(i, state)
                .map_err(|e| Error::format(path, format!("{prefix}{e}")))?;
        }
        restored.push((values, trial));
    }
    if let Some(name) = unclaimed.first() {
        return Err(Error::format(
            path,
            format!(
                "unexpected tensor {name:?} ({} in all): neither a parameter of the model nor its optimizer state (a checkpoint of another model?)",
                unclaimed.len()
            ),
        ));
    }
    for ((_, store, opt), (values, trial)) in parts.iter_mut().zip(restored) {
        **opt = trial;
        for (id, v) in values.into_iter().enumerate() {
            store.get_mut(id).value = v;
        }
    }
    Ok(progress)
}

/// The tensor `name` of `tensors`, marked as claimed.
fn take<'a>(
    tensors: &'a std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    unclaimed: &mut std::collections::BTreeSet<&str>,
    name: &str,
) -> Option<&'a (Vec<usize>, Vec<f32>)> {
    unclaimed.remove(name);
    tensors.get(name)
}

/// Checks that no parameter of `opt` has taken more than `steps` optimizer
/// steps (the trainer's own count from the checkpoint's progress), naming
/// the checkpoint `path`: a larger count is another run's state or a damaged
/// one, and would resume with the wrong bias corrections.
pub fn check_steps(path: &Path, opt: &Optimizer, steps: u64) -> Result<()> {
    for (i, info) in opt.params().iter().enumerate() {
        let step = opt.state(i).map_or(0, |s| s.step);
        if step > steps {
            return Err(Error::format(
                path,
                format!(
                    "{}: the optimizer took {step} steps, but the run's progress says {steps}",
                    info.name
                ),
            ));
        }
    }
    Ok(())
}

/// Checks BatchNorm batch counters (`num_batches_tracked`, kept in a
/// trainer's progress) restored from the checkpoint `path` against the
/// model's: the same layers, each count from 0 to [`MAX_STEP`].
pub fn check_counters(
    path: &Path,
    saved: &std::collections::BTreeMap<String, i64>,
    model: &std::collections::BTreeMap<String, i64>,
) -> Result<()> {
    if let Some(k) = saved.keys().find(|k| !model.contains_key(*k)) {
        return Err(Error::format(
            path,
            format!("batch counter {k:?} is not a layer of the model"),
        ));
    }
    if let Some(k) = model.keys().find(|k| !saved.contains_key(*k)) {
        return Err(Error::format(
            path,
            format!("batch counter {k:?} is missing"),
        ));
    }
    if let Some((k, v)) = saved
        .iter()
        .find(|(_, v)| !(0..=MAX_STEP as i64).contains(*v))
    {
        return Err(Error::format(
            path,
            format!("batch counter {k:?} is {v}, outside 0..={MAX_STEP}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::{AdamConfig, Method};

    fn model() -> (ParamStore, Optimizer) {
        let mut s = ParamStore::new();
        s.insert("w", &[2, 2], vec![1.0, 2.0, 3.0, 4.0], true)
            .unwrap();
        s.insert("buf", &[2], vec![0.5, 0.25], false).unwrap();
        s.insert("b", &[2], vec![0.0, 1.0], true).unwrap();
        let mut o = Optimizer::new(Method::Adam(AdamConfig::default())).unwrap();
        s.register(&mut o).unwrap();
        (s, o)
    }

    #[test]
    fn save_load_round_trips_values_and_optimizer_state_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ck.safetensors");
        let (mut s, mut o) = model();
        for t in 0..3 {
            s.zero_grads();
            s.accumulate(0, &[0.1, -0.2, 0.3 * t as f32, 0.4]).unwrap();
            s.accumulate(2, &[1.0, -1.0]).unwrap();
            s.step(&mut o, 1e-2).unwrap();
        }
        save(&path, &s, &o, &serde_json::json!({"step": 3})).unwrap();

        let (mut s2, mut o2) = model();
        let progress = load(&path, &mut s2, &mut o2).unwrap();
        assert_eq!(progress["step"], 3);
        let values = |s: &ParamStore| {
            s.params()
                .iter()
                .map(|p| p.value.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(values(&s2), values(&s));
        for i in 0..2 {
            assert_eq!(o2.state(i), o.state(i));
        }
        // One more identical step on both gives identical bits.
        for (st, op) in [(&mut s, &mut o), (&mut s2, &mut o2)] {
            st.zero_grads();
            st.accumulate(0, &[0.5; 4]).unwrap();
            st.accumulate(2, &[0.5; 2]).unwrap();
            st.step(op, 1e-2).unwrap();
        }
        assert_eq!(s2, s);

        // A weights file is not a checkpoint; a model of another shape is refused
        // and left untouched.
        let weights = dir.path().join("w.safetensors");
        let mut w = TensorWriter::new();
        s.write_values(&mut w, "").unwrap();
        w.write(&weights).unwrap();
        let (mut s3, mut o3) = model();
        let e = load(&weights, &mut s3, &mut o3).unwrap_err().to_string();
        assert!(e.contains("not a cellmorph training checkpoint"), "{e}");
        let mut other = ParamStore::new();
        other.insert("w", &[4], vec![0.0; 4], true).unwrap();
        other.insert("buf", &[2], vec![0.0; 2], false).unwrap();
        other.insert("b", &[2], vec![0.0; 2], true).unwrap();
        let mut oo = Optimizer::new(Method::Adam(AdamConfig::default())).unwrap();
        other.register(&mut oo).unwrap();
        let before = other.clone();
        let e = load(&path, &mut other, &mut oo).unwrap_err().to_string();
        assert!(e.contains("\"w\"") && e.contains("shape"), "{e}");
        assert_eq!(other, before);
    }
}
