//! CP2Image generator throughput: generated images/s at batch 1, 256 and
//! 4096 on the CPU reference and, when a GPU is present, CUDA (BENCHMARKS.md;
//! the paper took 0.02 s per image, the GPU target is ≥ 100,000 images/s at
//! batch 4096 on an H100).
//!
//! The generator has the paper's size: p = 405 inputs (the real single-cell
//! set's feature count) and channels (256, 128, 64, 32, 16), about
//! 42 MFLOP per 64×64×3 image, with seeded random weights (throughput does
//! not depend on the values) and BatchNorm folded as in inference. Criterion
//! reports "elements/s" = images/s. Sample counts are bounded so the CPU run
//! finishes in a few minutes on two cores: CPU batch 256 runs criterion's
//! minimum of 10 samples without warm-up, and CPU batch 4096 (over a minute
//! per batch on two cores) is timed once outside criterion and printed as
//! `cp2image_generator/cpu/4096 (one run)`; it is skipped under `--test`,
//! `--list` or a filter that does not match its name. The emulated device is
//! not benchmarked (it checks kernel logic, not speed).

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};

use cellmorph::backend::cuda_device_count;
use cellmorph::io::TensorFile;
use cellmorph::models::cp2image::{random_generator_weights, Generator, GeneratorConfig};
use cellmorph::{Backend, Device, Tensor};

/// Inputs p (the real single-cell set's feature count).
const P: usize = 405;
/// Batch sizes of BENCHMARKS.md.
const BATCHES: [usize; 3] = [1, 256, 4096];

fn backends() -> Vec<Backend> {
    let mut v = vec![Backend::cpu()];
    if cuda_device_count() > 0 {
        match Backend::new(Device::Cuda(0)) {
            Ok(be) => v.push(be),
            Err(e) => eprintln!("CUDA present but not usable: {e}"),
        }
    } else {
        eprintln!("skipped: no CUDA device (CPU benches only)");
    }
    v
}

/// Standard-normal-ish standardized features (sum of uniforms), seeded.
fn features(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n)
        .map(|_| (0..4).map(|_| uniform()).sum::<f32>() * 1.732 - 3.464)
        .collect()
}

/// The paper-size generator with seeded random weights, written to a
/// temporary file and loaded back as a user would.
fn weights() -> TensorFile {
    let path = std::env::temp_dir().join(format!(
        "cellmorph-bench-cp2image-{}.safetensors",
        std::process::id()
    ));
    random_generator_weights(&GeneratorConfig::paper(P), 1)
        .and_then(|w| w.write(&path))
        .expect("writing bench weights");
    let file = TensorFile::open(&path).expect("reading bench weights");
    std::fs::remove_file(&path).ok();
    file
}

/// Name of the CPU case timed once outside criterion.
const CPU_ONE_SHOT: &str = "cp2image_generator/cpu/4096";

fn generator(c: &mut Criterion, file: &TensorFile) {
    let mut g = c.benchmark_group("cp2image_generator");
    for be in backends() {
        let model = Generator::from_file(&be, file).expect("generator");
        for batch in BATCHES {
            let cpu = be.device() == Device::Cpu;
            if cpu && batch == 4096 {
                continue;
            }
            let z = Tensor::from_vec(&be, &[batch, P], features(batch * P, batch as u64))
                .expect("bench input");
            let heavy = cpu && batch >= 256;
            g.sample_size(10);
            g.warm_up_time(if heavy {
                Duration::from_millis(1)
            } else {
                Duration::from_secs(1)
            });
            g.measurement_time(Duration::from_secs(if heavy { 1 } else { 3 }));
            g.throughput(Throughput::Elements(batch as u64));
            g.bench_with_input(
                BenchmarkId::new(be.device().to_string(), batch),
                &batch,
                |b, _| {
                    b.iter(|| {
                        let y = model.forward(&be, &z).expect("forward");
                        // Wait for the GPU (and keep the output alive) inside the timing.
                        be.synchronize().expect("synchronize");
                        y
                    })
                },
            );
        }
    }
    g.finish();
}

/// True when the command line asks for a normal run that includes `name`:
/// not `--test`/`--list`, and any positional filter is a substring of it.
fn one_shot_wanted(name: &str) -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--test" || a == "--list") {
        return false;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
}

/// CPU batch 4096, timed once (see the module documentation).
fn cpu_batch_4096_once(file: &TensorFile) {
    if !one_shot_wanted(CPU_ONE_SHOT) {
        return;
    }
    let be = Backend::cpu();
    let model = Generator::from_file(&be, file).expect("generator");
    let z = Tensor::from_vec(&be, &[4096, P], features(4096 * P, 4096)).expect("bench input");
    let start = Instant::now();
    let y = model.forward(&be, &z).expect("forward");
    let s = start.elapsed().as_secs_f64();
    drop(y);
    println!(
        "{CPU_ONE_SHOT} (one run)\n                        time:   {s:.2} s\n                        thrpt:  {:.1} images/s",
        4096.0 / s
    );
}

fn main() {
    let file = weights();
    let mut c = Criterion::default().configure_from_args();
    generator(&mut c, &file);
    cpu_batch_4096_once(&file);
    c.final_summary();
}
