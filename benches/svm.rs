//! RBF SVC grid-search throughput, CPU and CUDA (`svm::grid_search`,
//! `svm::grid_search_on`, kernels/svm.cu).
//!
//! - `svm/grid_fixture`: the fixture grid of tests/svm.rs (80 samples × 12
//!   features, 4 classes, C {0.1, 1, 10, 100} × γ {0.01, 0.05, 0.2,
//!   scale}, StratifiedKFold(5)): 16 settings × 5 folds × 6 pairs = 480
//!   duals of ≤ 38 samples (shared-memory kernel) plus the refit.
//! - `svm/grid_synthetic`: 600 seeded samples × 16 features, 4 classes,
//!   the same grid: pairs of ~240 samples in the folds (global-memory
//!   kernel), 480 duals plus the refit.
//!
//! Each has a `_cuda` twin on CUDA device 0 when one is present (skipped
//! with a message otherwise). Throughput is in duals solved per second.
//!
//! Run: `cargo bench --bench svm`.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use cellmorph::apps::expression::categories::read_labels;
use cellmorph::backend::cuda_device_count;
use cellmorph::svm::{grid_search, grid_search_on, stratified_kfold, Gamma, SvmGridSpec};
use cellmorph::table::Table;
use cellmorph::{Backend, Device};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const SEED: u64 = 20260107;

fn splitmix(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
}

/// The fixture: features row-major, 12 columns, labels as class indices.
fn fixture() -> (Vec<f64>, usize, Vec<usize>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/svm");
    let t = Table::read_csv(dir.join("features.csv"))
        .unwrap_or_else(|e| panic!("bench data missing: {e}"));
    let labels = read_labels(&dir.join("labels.csv"), "quality").unwrap();
    let mut classes: Vec<&str> = labels.iter().map(|(_, c)| c.as_str()).collect();
    classes.sort_unstable();
    classes.dedup();
    let y = labels
        .iter()
        .map(|(_, c)| classes.iter().position(|k| k == c).unwrap())
        .collect();
    (t.data.clone(), t.n_cols(), y)
}

/// 600 samples of 4 overlapping Gaussian classes in 16 dimensions.
fn synthetic() -> (Vec<f64>, usize, Vec<usize>) {
    let (n, d) = (600, 16);
    let mut state = SEED;
    let mut x = Vec::with_capacity(n * d);
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let class = i % 4;
        for k in 0..d {
            let (u1, u2) = (splitmix(&mut state).max(1e-300), splitmix(&mut state));
            let gauss = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            let centre = if k % 4 == class { 1.0 } else { 0.0 };
            x.push(centre + gauss);
        }
        y.push(class);
    }
    (x, d, y)
}

fn bench_svm(c: &mut Criterion) {
    println!("svm bench: seed {SEED}");
    let spec = SvmGridSpec::new(
        vec![0.1, 1.0, 10.0, 100.0],
        Gamma::parse_list("0.01,0.05,0.2,scale").unwrap(),
    );
    let cuda = if cuda_device_count() > 0 {
        let be = Backend::new(Device::Cuda(0)).expect("opening CUDA device 0");
        println!("svm/*_cuda on {}", be.describe());
        Some(be)
    } else {
        println!("svm/*_cuda skipped: no CUDA device");
        None
    };
    let mut group = c.benchmark_group("svm");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for (name, (x, d, y)) in [("grid_fixture", fixture()), ("grid_synthetic", synthetic())] {
        let folds = stratified_kfold(&y, 5).unwrap();
        // 6 pairs per fit.
        group.throughput(Throughput::Elements(
            (6 * (spec.settings().len() * 5 + 1)) as u64,
        ));
        group.bench_function(name, |b| {
            b.iter(|| grid_search(black_box(&x), d, &y, &spec, &folds).unwrap())
        });
        if let Some(be) = &cuda {
            group.bench_function(format!("{name}_cuda"), |b| {
                b.iter(|| grid_search_on(be, black_box(&x), d, &y, &spec, &folds).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_svm);
criterion_main!(benches);
