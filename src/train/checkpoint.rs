//! Training checkpoints: one safetensors file holding the model's
//! `state_dict` under its own names (so [`ParamStore::from_file`] reads a
//! checkpoint as it reads weights), the optimizer's state as
//! `optimizer.{param}.{exp_avg,exp_avg_sq,momentum_buffer}` with
//! PyTorch's keys, each parameter's step count, and the caller's progress
//! (any JSON: step, epoch, metrics so far) in the metadata. Written
//! atomically; loading checks every name, shape and count, so a resumed run
//! continues from exactly the saved bits.

use std::path::Path;

use crate::io::{TensorFile, TensorWriter};
use crate::train::optim::{Optimizer, ParamState};
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
    for (prefix, store, opt) in parts {
        store.write_values(&mut w, prefix)?;
        let mut steps = Vec::with_capacity(opt.params().len());
        for (i, info) in opt.params().iter().enumerate() {
            let state = opt.state(i).cloned().unwrap_or_default();
            for (key, v) in state.tensors() {
                w.add_slice(
                    &format!("{OPTIMIZER_PREFIX}{prefix}{}.{key}", info.name),
                    &[v.len()],
                    v,
                )?;
            }
            steps.push(state.step);
        }
        w.set_metadata(
            &steps_key(prefix),
            &serde_json::Value::from(steps).to_string(),
        );
    }
    w.set_metadata(
        KIND_KEY,
        "training checkpoint (state_dict + optimizer state)",
    );
    w.set_metadata(PROGRESS_KEY, &progress.to_string());
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
    let meta = file.metadata();
    let get = |key: &str| -> Result<&String> {
        meta.and_then(|m| m.get(key)).ok_or_else(|| {
            Error::format(
                path,
                format!("not a cellmorph training checkpoint (no {key:?} metadata)"),
            )
        })
    };
    let progress: serde_json::Value = serde_json::from_str(get(PROGRESS_KEY)?)
        .map_err(|e| Error::format(path, format!("{PROGRESS_KEY}: {e}")))?;
    let mut restored = Vec::with_capacity(parts.len());
    for (prefix, store, opt) in parts.iter() {
        let key = steps_key(prefix);
        let steps: Vec<u64> = serde_json::from_str(get(&key)?)
            .map_err(|e| Error::format(path, format!("{key}: {e}")))?;
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
            let (shape, data) = file.f32(&name)?;
            if shape != p.shape {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor {name:?} has shape {shape:?}, the model {:?}",
                        p.shape
                    ),
                ));
            }
            if data.iter().any(|v| !v.is_finite()) {
                return Err(Error::format(
                    path,
                    format!("tensor {name:?} holds NaN or infinite values"),
                ));
            }
            values.push(data);
        }
        let mut trial = (*opt).clone();
        for (i, (info, &step)) in opt.params().iter().zip(&steps).enumerate() {
            let read = |key: &str| -> Result<Option<Vec<f32>>> {
                let name = format!("{OPTIMIZER_PREFIX}{prefix}{}.{key}", info.name);
                if !file.contains(&name) {
                    return Ok(None);
                }
                let (_, v) = file.f32(&name)?;
                if v.len() != info.len {
                    return Err(Error::format(
                        path,
                        format!(
                            "tensor {name:?} has {} values, the parameter {}",
                            v.len(),
                            info.len
                        ),
                    ));
                }
                Ok(Some(v))
            };
            let state = ParamState {
                step,
                exp_avg: read("exp_avg")?,
                exp_avg_sq: read("exp_avg_sq")?,
                momentum_buffer: read("momentum_buffer")?,
            };
            trial
                .set_state(i, state)
                .map_err(|e| Error::format(path, e.to_string()))?;
        }
        restored.push((values, trial));
    }
    for ((_, store, opt), (values, trial)) in parts.iter_mut().zip(restored) {
        **opt = trial;
        for (id, v) in values.into_iter().enumerate() {
            store.get_mut(id).value = v;
        }
    }
    Ok(progress)
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
