//! DenseNet-121 screening throughput (Kim et al. 2022; the paper reports 378
//! images/s on its GPU): images/s of the whole network (`forward_into` on a
//! reused workspace, results read back) at batch 64 and 256, for 224×224
//! and the paper's 226×306 input, on the CPU reference and, when present,
//! CUDA. GFLOP/s beside it uses [`DenseNetConfig::flops`] (the plan's
//! multiply-adds ×2).
//!
//! Weights: the seeded `densenet121_kimhead` fixture (DenseNet-121 with the
//! two-class head, `tests/common::fixture_path`; random weights time like
//! trained ones). Input: a fixed pseudo-random batch.
//!
//! A plain timing harness, not criterion: one CPU batch of 256 images takes
//! minutes, far beyond criterion's minimum of ten samples. Each case runs
//! one untimed warm-up batch (CUDA only: module loading, allocation), then
//! `CELLMORPH_BENCH_BATCHES` timed batches (default 1 on the CPU, 20 on
//! CUDA) and reports the mean. `CELLMORPH_BENCH_DEVICES=cpu,cuda` picks the
//! devices (default: both where available).
//!
//! Run: `cargo bench --bench densenet`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use cellmorph::backend::cuda_device_count;
use cellmorph::io::TensorFile;
use cellmorph::models::densenet::DenseNet;
use cellmorph::{Backend, Device, Tensor};

const BATCHES: [usize; 2] = [64, 256];
const SIZES: [(usize, usize); 2] = [(224, 224), (226, 306)];

/// Deterministic values in [0, 1) (an image after pre-processing).
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.parse().ok()
}

fn backends() -> Vec<Backend> {
    let wanted = std::env::var("CELLMORPH_BENCH_DEVICES").unwrap_or_else(|_| "cpu,cuda".into());
    let mut v = Vec::new();
    if wanted.contains("cpu") {
        v.push(Backend::cpu());
    }
    if wanted.contains("cuda") {
        if cuda_device_count() > 0 {
            match Backend::new(Device::Cuda(0)) {
                Ok(be) => v.push(be),
                Err(e) => eprintln!("CUDA present but not usable: {e}"),
            }
        } else {
            eprintln!("skipped: no CUDA device (CPU only)");
        }
    }
    v
}

fn main() {
    let path = common::fixture_path("densenet121_kimhead.weights.safetensors");
    let file = TensorFile::open(&path).expect("the DenseNet-121 fixture");
    for be in backends() {
        let model = DenseNet::from_file(&be, &file).expect("loading DenseNet-121");
        let cpu = be.device() == Device::Cpu;
        let timed = env_usize("CELLMORPH_BENCH_BATCHES").unwrap_or(if cpu { 1 } else { 20 });
        println!("device: {}", be.describe());
        for (h, w) in SIZES {
            let flops = model.config().flops(h, w).expect("flops");
            let act = model
                .config()
                .activation_bytes(h, w)
                .expect("activation bytes");
            for batch in BATCHES {
                let x = Tensor::from_vec(&be, &[batch, 3, h, w], data(batch * 3 * h * w, 7))
                    .expect("input");
                let mut ws = model.workspace(&be, batch, h, w).expect("workspace");
                if !cpu {
                    model.forward_into(&be, &x, &mut ws).expect("warm-up");
                    ws.probs().to_vec().expect("sync");
                }
                let t = Instant::now();
                for _ in 0..timed {
                    model.forward_into(&be, &x, &mut ws).expect("forward");
                    ws.probs().to_vec().expect("sync");
                }
                let s = t.elapsed().as_secs_f64();
                let images = (timed * batch) as f64;
                println!(
                    "densenet121/{}/{h}x{w}/batch{batch}: {:.2} images/s, {:.1} GFLOP/s ({:.2} GFLOP/image, {timed} batch(es) in {s:.2} s, activations {:.2} GiB)",
                    be.device(),
                    images / s,
                    images * flops / s / 1e9,
                    flops / 1e9,
                    (act * batch) as f64 / (1u64 << 30) as f64
                );
            }
        }
    }
}
