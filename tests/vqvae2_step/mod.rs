//! The golden of one VQ-VAE-2 training step
//! (`tests/fixtures/vqvae2_train_step.safetensors`) and the comparisons of
//! `tests/train_vqvae2.rs` (CPU) and `tests/train_vqvae2_device.rs` (CUDA,
//! emulated): a test file includes it with `mod vqvae2_step;` after
//! `mod common;`.

#![allow(dead_code)] // not every suite uses every helper

use std::path::Path;

use cellmorph::io::{TensorFile, TensorWriter};
use cellmorph::train::vqvae2;
use cellmorph::train::{AdamConfig, Method, Optimizer, ParamStore};

pub const GOLDEN: &str = "vqvae2_train_step.safetensors";

pub fn golden() -> TensorFile {
    TensorFile::open(crate::common::fixture_path(GOLDEN)).expect("vqvae2_train_step fixture")
}

pub fn get(f: &TensorFile, name: &str) -> Vec<f32> {
    f.f32(name).unwrap_or_else(|e| panic!("{name}: {e}")).1
}

/// Max |got − want| divided by max |want|.
pub fn rel_err(what: &str, got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    err / scale
}

pub fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) -> f32 {
    let e = rel_err(what, got, want);
    assert!(e <= rel, "{what}: max |Δ| / max |ref| = {e:e} > {rel:e}");
    e
}

/// The `before.*` tensors without their prefix, as a weights file.
pub fn before_file(f: &TensorFile, dir: &Path) -> std::path::PathBuf {
    let mut w = TensorWriter::new();
    for name in f.names() {
        if let Some(rest) = name.strip_prefix("before.") {
            let (shape, data) = f.f32(&name).unwrap();
            w.add_slice(rest, &shape, &data).unwrap();
        }
    }
    let p = dir.join("before.safetensors");
    w.write(&p).unwrap();
    p
}

pub fn adam() -> Optimizer {
    Optimizer::new(Method::Adam(AdamConfig::default())).unwrap()
}

pub struct Setup {
    pub f: TensorFile,
    pub cfg: cellmorph::models::vqvae2::VqVae2Config,
    pub store: ParamStore,
    pub shape: Vec<usize>,
    pub x: Vec<f32>,
    pub _dir: tempfile::TempDir,
}

pub fn setup() -> Setup {
    let f = golden();
    let dir = tempfile::tempdir().unwrap();
    let weights = TensorFile::open(before_file(&f, dir.path())).unwrap();
    let (cfg, store) = vqvae2::load_store(&weights).unwrap();
    let (shape, x) = f.f32("input").unwrap();
    Setup {
        f,
        cfg,
        store,
        shape,
        x,
        _dir: dir,
    }
}

pub fn ids(f: &TensorFile, name: &str) -> Vec<i32> {
    f.i64(name).unwrap().1.iter().map(|&v| v as i32).collect()
}

/// The smallest gap between the best and the second-best squared distance
/// over all positions of `pre` `[n, d, h, w]` against `embed` `[d, K]`, in
/// f64: how far the codes are from a tie.
pub fn min_code_margin(pre_shape: &[usize], pre: &[f32], embed: &[f32], k: usize) -> f64 {
    let (n, d, hw) = (pre_shape[0], pre_shape[1], pre_shape[2] * pre_shape[3]);
    let mut margin = f64::INFINITY;
    for s in 0..n {
        for p in 0..hw {
            let mut dist: Vec<f64> = (0..k)
                .map(|j| {
                    (0..d)
                        .map(|c| {
                            let v = pre[(s * d + c) * hw + p] as f64 - embed[c * k + j] as f64;
                            v * v
                        })
                        .sum()
                })
                .collect();
            dist.sort_by(|a, b| a.partial_cmp(b).unwrap());
            margin = margin.min(dist[1] - dist[0]);
        }
    }
    margin
}
