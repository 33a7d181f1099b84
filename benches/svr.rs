//! SVR throughput on the paper's workload (docs/MODELS.md §1): 218 genes ×
//! 1,100 settings (C 1..100, ε 0..0.5 step 0.05) × 3 folds on 29 samples ×
//! 128 features: 719,400 cross-validation problems plus 218 refits.
//!
//! Data: the fixture profiles `tests/fixtures/svr/grid_features.csv`
//! (29 × 128) and 218 genes made from the 6 fixture genes plus seeded
//! Gaussian noise (a quarter of each gene's spread).
//!
//! - `svr/grid_paper`: the whole grid search, in problems/s. Settings whose
//!   solve never touches the C bound share one SMO run per (gene, fold, ε).
//! - `svr/grid_paper_cuda`: the same search on CUDA device 0
//!   (`svr::grid_search_on`, kernels/svr.cu), when one is present; skipped
//!   with a message otherwise.
//! - `svr/fit_batch_independent`: 21,582 of the same problems (C ∈ {1, 50,
//!   100}) solved one by one, the raw per-problem SMO throughput.
//! - `svr/smo_single`: one SMO solve on a 19-sample fold Gram matrix.
//!
//! Run: `cargo bench --bench svr`.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use cellmorph::backend::cuda_device_count;
use cellmorph::svr::{
    self, grid_search, grid_search_on, kfold, smo, GridSpec, SvrParams, SvrProblem,
};
use cellmorph::table::Table;
use cellmorph::{Backend, Device};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const SEED: u64 = 20230101;
const GENES: usize = 218;

fn splitmix(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
}

/// The fixture features and `GENES` seeded genes.
fn workload() -> (Table, Table) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/svr");
    let read = |name: &str| {
        Table::read_csv(dir.join(name)).unwrap_or_else(|e| panic!("bench data missing: {e}"))
    };
    let (features, base) = (read("grid_features.csv"), read("grid_expression.csv"));
    let n = base.n_rows();
    let mut state = SEED;
    let mut values = vec![0.0; n * GENES];
    for g in 0..GENES {
        let y = base.column(g % base.n_cols());
        let mean = y.iter().sum::<f64>() / n as f64;
        let sd = (y.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        for (r, v) in y.iter().enumerate() {
            let (u1, u2) = (splitmix(&mut state).max(1e-300), splitmix(&mut state));
            let gauss = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            values[r * GENES + g] = v + 0.25 * sd * gauss;
        }
    }
    let names = (0..GENES).map(|g| format!("G{g}")).collect();
    let expression = Table::new(base.row_names.clone(), names, values).unwrap();
    (features, expression)
}

fn bench_svr(c: &mut Criterion) {
    println!("svr bench: seed {SEED}, {GENES} genes");
    let (features, expression) = workload();
    let spec = GridSpec::paper();
    let n = expression.n_rows();
    let mut group = c.benchmark_group("svr");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));

    let problems = (GENES * (spec.n_settings() * spec.folds + 1)) as u64;
    group.throughput(Throughput::Elements(problems));
    group.bench_function("grid_paper", |b| {
        b.iter(|| grid_search(black_box(&features), &expression, &spec).unwrap())
    });
    if cuda_device_count() > 0 {
        let be = Backend::new(Device::Cuda(0)).expect("opening CUDA device 0");
        println!("svr/grid_paper_cuda on {}", be.describe());
        group.bench_function("grid_paper_cuda", |b| {
            b.iter(|| grid_search_on(&be, black_box(&features), &expression, &spec).unwrap())
        });
    } else {
        println!("svr/grid_paper_cuda skipped: no CUDA device");
    }

    let folds = kfold(n, 3).unwrap();
    let mut batch = Vec::new();
    for g in 0..GENES {
        let y = expression.column(g);
        for test in &folds {
            let train: Vec<usize> = (0..n).filter(|r| !test.contains(r)).collect();
            for &cv in &[1.0, 50.0, 100.0] {
                for &e in &spec.epsilon {
                    batch.push(SvrProblem {
                        y: train.iter().map(|&r| y[r]).collect(),
                        train_rows: train.clone(),
                        params: SvrParams::new(cv, e),
                    });
                }
            }
        }
    }
    group.throughput(Throughput::Elements(batch.len() as u64));
    group.bench_function("fit_batch_independent", |b| {
        b.iter(|| svr::fit_batch(&features.data, features.n_cols(), black_box(&batch)).unwrap())
    });

    let first = &batch[0];
    let l = first.train_rows.len();
    let gram = svr::linear_gram(&features.data, features.n_cols(), &first.train_rows);
    let mut ws = smo::Workspace::default();
    let mut beta = vec![0.0; l];
    group.throughput(Throughput::Elements(1));
    group.bench_function("smo_single", |b| {
        b.iter(|| {
            smo::solve(
                black_box(&gram),
                l,
                &first.y,
                1.0,
                0.1,
                1e-3,
                smo::default_max_iter(l),
                &mut ws,
                &mut beta,
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench_svr);
criterion_main!(benches);
