//! The SVR kernels (`kernels/svr.cu` through `svr::device`), emulated and on
//! CUDA, against the CPU solver: independent duals over random problems and
//! the whole grid search on the fixture data.
//!
//! Tolerance: none. The kernels repeat every floating-point operation of
//! `smo::solve` and of the grid's scoring in the same order, with no FMA
//! contraction (see the header of kernels/svr.cu), so β, b, iteration
//! counts, flags, cross-validation scores, choices and refits must equal
//! the CPU's exactly (`==`, which also equates the two zeros an intercept
//! may come out as). A tolerance would hide a reordered sum or a different
//! tie-break in the working-set selection, the bugs these tests are for; the
//! messages report the largest difference when they fail.
//!
//! Random problems draw their features and targets either from continuous
//! values or from a few small integers: the latter makes duplicate rows and
//! equal gradients common, so the warp reductions' tie-breaking (the last
//! index wins, as in libsvm's `>=` scans) is exercised.

mod common;

use std::path::PathBuf;

use cellmorph::svr::{
    self, fit_batch, grid_search, grid_search_on, smo, solve_batch_on, GridSpec, SvrParams,
    SvrProblem, DEVICE_MAX_ROWS,
};
use cellmorph::table::Table;
use cellmorph::Backend;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};

use common::{cuda, emulated, Rng};

/// Property cases on the emulated device (each CUDA thread is a fiber there,
/// and every warp collective switches all 32).
const EMU_CASES: u32 = 48;
const CUDA_CASES: u32 = 200;

/// A feature matrix and problems on random row subsets of it.
struct Batch {
    x: Vec<f64>,
    d: usize,
    problems: Vec<SvrProblem>,
}

/// `n_problems` problems of 1..=max_l training rows (two share their rows,
/// and so a Gram matrix) on an `n_rows × d` matrix, C from 0.01 (often
/// binding) to 10, ε from 0 to 0.5.
fn batch(
    seed: u64,
    n_rows: usize,
    d: usize,
    max_l: usize,
    n_problems: usize,
    coarse: bool,
) -> Batch {
    let mut rng = Rng(seed);
    let x: Vec<f64> = (0..n_rows * d).map(|_| rng.value(coarse)).collect();
    let mut problems: Vec<SvrProblem> = Vec::new();
    for p in 0..n_problems {
        let train_rows: Vec<usize> = if p == 1 {
            problems[0].train_rows.clone()
        } else {
            let l = 1 + rng.below(max_l.min(n_rows));
            // A random subset in random order: a partial Fisher–Yates shuffle.
            let mut all: Vec<usize> = (0..n_rows).collect();
            for k in 0..l {
                let j = k + rng.below(n_rows - k);
                all.swap(k, j);
            }
            all.truncate(l);
            all
        };
        let y = train_rows.iter().map(|_| 3.0 * rng.value(coarse)).collect();
        let c = 10f64.powf(rng.next() * 3.0 - 2.0);
        let epsilon = if coarse {
            0.1 * rng.below(6) as f64
        } else {
            0.5 * rng.next()
        };
        problems.push(SvrProblem {
            train_rows,
            y,
            params: SvrParams {
                c,
                epsilon,
                tol: if rng.below(2) == 0 { 1e-3 } else { 1e-6 },
            },
        });
    }
    Batch { x, d, problems }
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f64::max)
}

/// Solves the batch on `be` and with `smo::solve` one problem at a time, and
/// requires identical results.
fn check_batch(be: &Backend, b: &Batch) -> Result<(), TestCaseError> {
    let got = solve_batch_on(be, &b.x, b.d, &b.problems)
        .map_err(|e| TestCaseError::fail(format!("solve_batch_on: {e}")))?;
    prop_assert_eq!(got.len(), b.problems.len());
    let mut ws = smo::Workspace::default();
    for (k, (p, s)) in b.problems.iter().zip(&got).enumerate() {
        let l = p.train_rows.len();
        let gram = svr::linear_gram(&b.x, b.d, &p.train_rows);
        let mut beta = vec![0.0; l];
        let want = smo::solve(
            &gram,
            l,
            &p.y,
            p.params.c,
            p.params.epsilon,
            p.params.tol,
            smo::default_max_iter(l),
            &mut ws,
            &mut beta,
        );
        let what = format!(
            "problem {k} (l = {l}, C = {}, ε = {}, tol = {})",
            p.params.c, p.params.epsilon, p.params.tol
        );
        prop_assert_eq!(
            s.outcome.iterations,
            want.iterations,
            "{}: iterations",
            what
        );
        prop_assert_eq!(s.outcome.converged, want.converged, "{}: converged", what);
        prop_assert_eq!(
            s.outcome.c_bound_active,
            want.c_bound_active,
            "{}: C bound",
            what
        );
        prop_assert!(
            s.beta == beta,
            "{}: β differs by up to {:e}",
            what,
            max_diff(&s.beta, &beta)
        );
        prop_assert!(
            s.outcome.b == want.b,
            "{}: b = {} on the device, {} on the CPU",
            what,
            s.outcome.b,
            want.b
        );
    }
    Ok(())
}

/// Random batches: seed, rows, features, max training rows, problems and
/// coarse data.
fn run_batches(be: &Backend, cases: u32, max_rows: usize) {
    let mut runner = TestRunner::new(common::proptest_config(cases));
    let strategy = (
        any::<u64>(),
        2usize..=max_rows,
        1usize..=12,
        1usize..=6,
        any::<bool>(),
    );
    runner
        .run(&strategy, |(seed, n_rows, d, n_problems, coarse)| {
            println!(
                "seed {seed}: {n_rows} rows × {d} features, {n_problems} problems, coarse {coarse}"
            );
            let b = batch(seed, n_rows, d, n_rows, n_problems.max(2), coarse);
            check_batch(be, &b)
        })
        .unwrap();
}

#[test]
fn emulated_duals_equal_cpu() {
    run_batches(&emulated(), EMU_CASES, 96);
}

/// Each kernel variant (at most 32, 64 and 128 training rows) at its edges,
/// and degenerate problems: a single row, all-zero features (every curvature
/// is 0, libsvm's TAU path), duplicated rows and targets (exact ties).
#[test]
fn emulated_variants_and_degenerate_problems() {
    let be = emulated();
    for (seed, n_rows, d, max_l, coarse) in [
        (1u64, 32, 5, 32, false),
        (2, 33, 4, 33, true),
        (3, 64, 3, 64, false),
        (4, 65, 6, 65, true),
        (5, DEVICE_MAX_ROWS, 8, DEVICE_MAX_ROWS, false),
    ] {
        let mut b = batch(seed, n_rows, d, max_l, 2, coarse);
        for p in &mut b.problems {
            p.train_rows = (0..max_l).collect();
            p.y.resize(max_l, 0.5);
        }
        println!("variant edge: seed {seed}, l = {max_l}");
        check_batch(&be, &b).unwrap();
    }

    let x = vec![0.5, -1.0, 0.5, -1.0, 0.0, 0.0, 2.0, 1.0];
    let params = SvrParams::new(1.0, 0.1);
    let zeros = vec![0.0; 8];
    let problems = vec![
        SvrProblem {
            train_rows: vec![2],
            y: vec![3.0],
            params,
        },
        // Rows 0 and 1 are equal, row 2 is zero.
        SvrProblem {
            train_rows: vec![0, 1, 2, 3, 0],
            y: vec![1.0, 1.0, -1.0, 2.0, 1.0],
            params: SvrParams::new(0.5, 0.0),
        },
        SvrProblem {
            train_rows: vec![3, 3, 3],
            y: vec![2.0, 2.0, 2.0],
            params,
        },
    ];
    check_batch(
        &be,
        &Batch {
            x,
            d: 2,
            problems: problems.clone(),
        },
    )
    .unwrap();
    check_batch(
        &be,
        &Batch {
            x: zeros,
            d: 2,
            problems,
        },
    )
    .unwrap();
}

#[test]
fn emulated_fits_equal_cpu_fits() {
    let b = batch(7, 30, 9, 25, 5, false);
    let got = svr::fit_batch_on(&emulated(), &b.x, b.d, &b.problems).unwrap();
    let want = fit_batch(&b.x, b.d, &b.problems).unwrap();
    assert_eq!(got, want);
}

/// On the CPU device the entry points are the CPU solver.
#[test]
fn cpu_device_runs_the_cpu_solver() {
    let cpu = Backend::cpu();
    check_batch(&cpu, &batch(11, 24, 5, 20, 4, true)).unwrap();
    let (features, expression) = fixture_data();
    let spec = GridSpec::parse("0.01,1", "0,0.2").unwrap();
    check_grid(&cpu, &features, &expression, &spec, "cpu device");
}

#[test]
fn device_errors_are_clear() {
    let be = emulated();
    let n = DEVICE_MAX_ROWS + 1;
    let x: Vec<f64> = (0..n).map(|i| i as f64).collect();
    let problem = SvrProblem {
        train_rows: (0..n).collect(),
        y: vec![1.0; n],
        params: SvrParams::default(),
    };
    let e = solve_batch_on(&be, &x, 1, std::slice::from_ref(&problem))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("129 training rows") && e.contains("at most 128"),
        "{e}"
    );
    // The CPU device has no such limit.
    let cpu = solve_batch_on(&Backend::cpu(), &x, 1, std::slice::from_ref(&problem)).unwrap();
    assert!(cpu.len() == 1 && cpu[0].outcome.converged);

    let bad = SvrProblem {
        train_rows: vec![0, 1],
        y: vec![1.0],
        params: SvrParams::default(),
    };
    let e = solve_batch_on(&be, &x, 1, &[bad]).unwrap_err().to_string();
    assert!(e.contains("1 targets for 2 training rows"), "{e}");
    let bad = SvrProblem {
        train_rows: vec![0, n],
        y: vec![1.0, 2.0],
        params: SvrParams::default(),
    };
    let e = solve_batch_on(&be, &x, 1, &[bad]).unwrap_err().to_string();
    assert!(e.contains("training row 129"), "{e}");

    let names = |k: usize, p: &str| (0..k).map(|i| format!("{p}{i}")).collect::<Vec<_>>();
    let features = Table::new(names(n, "S"), names(1, "F"), x.clone()).unwrap();
    let expression = Table::new(names(n, "S"), names(1, "G"), x).unwrap();
    let spec = GridSpec::new(vec![1.0], vec![0.1]).unwrap();
    let e = grid_search_on(&be, &features, &expression, &spec)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("129 samples") && e.contains("at most 128"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------
// Grid search on the fixture data
// ---------------------------------------------------------------------------

fn fixture(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let copy = root.join("tests/fixtures/svr").join(name);
    assert!(
        copy.exists(),
        "\n\n*** FIXTURE MISSING: tests/fixtures/svr/{name} (see ORIGIN.md there) ***\n\n"
    );
    copy
}

/// The fixture's 29 × 128 features and its 6 genes plus a constant one
/// (skipped by both paths).
fn fixture_data() -> (Table, Table) {
    let features = Table::read_csv(fixture("grid_features.csv")).unwrap();
    let base = Table::read_csv(fixture("grid_expression.csv")).unwrap();
    let mut names = base.col_names.clone();
    names.push("FLAT".into());
    let mut data = Vec::new();
    for r in 0..base.n_rows() {
        data.extend_from_slice(base.row(r));
        data.push(7.5);
    }
    let expression = Table::new(base.row_names.clone(), names, data).unwrap();
    (features, expression)
}

/// The grid search on `be` and on the CPU: every result, skipped gene and
/// counter must be identical.
fn check_grid(be: &Backend, features: &Table, expression: &Table, spec: &GridSpec, what: &str) {
    let start = std::time::Instant::now();
    let got = grid_search_on(be, features, expression, spec).unwrap();
    let device_s = start.elapsed().as_secs_f64();
    let start = std::time::Instant::now();
    let want = grid_search(features, expression, spec).unwrap();
    let cpu_s = start.elapsed().as_secs_f64();
    println!(
        "{what}: {} genes × {} settings × {} folds: {} problems, {} SMO solves; {} {device_s:.3} s, \
         cpu {cpu_s:.3} s",
        want.results.len(),
        spec.n_settings(),
        spec.folds,
        want.stats.problems,
        want.stats.smo_solves,
        be.device()
    );
    assert_eq!(got.skipped, want.skipped, "{what}: skipped genes");
    assert_eq!(got.stats, want.stats, "{what}: work counters");
    assert_eq!(got.results.len(), want.results.len());
    for (g, w) in got.results.iter().zip(&want.results) {
        println!(
            "  {}: C = {}, ε = {}, cv {:.6}, max |Δ mean score| {:e}, max |Δw| {:e}",
            g.gene,
            g.c,
            g.epsilon,
            g.cv_score,
            max_diff(&g.mean_scores, &w.mean_scores),
            max_diff(&g.w, &w.w)
        );
        assert_eq!(g, w, "{what}: gene {}", w.gene);
    }
}

/// The fixture's small and low-C grids (the latter makes C bind, so chains
/// run several solves), all 6 genes and a constant one.
#[test]
fn emulated_grid_equals_cpu_grid() {
    let (features, expression) = fixture_data();
    let be = emulated();
    for (what, c, eps) in [
        ("small", "0.1,1,10,100", "0,0.1,0.2"),
        ("low_c", "0.001,0.01,0.03,0.1", "0,0.25"),
    ] {
        let spec = GridSpec::parse(c, eps).unwrap();
        check_grid(&be, &features, &expression, &spec, what);
    }
}

/// The paper's grid (C 1..100, ε 0..0.5, 3 folds) on the fixture genes.
#[test]
fn emulated_paper_grid_equals_cpu_grid() {
    let (features, expression) = fixture_data();
    check_grid(
        &emulated(),
        &features,
        &expression,
        &GridSpec::paper(),
        "paper",
    );
}

/// The paper's workload: 218 genes (see [`paper_genes`]) × 1,100 settings ×
/// 3 folds.
#[test]
fn emulated_paper_size_grid_equals_cpu_grid() {
    let (features, expression) = paper_genes();
    check_grid(
        &emulated(),
        &features,
        &expression,
        &GridSpec::paper(),
        "paper (218 genes)",
    );
}

/// The fixture features and 218 genes made from the 6 fixture genes plus
/// seeded uniform noise of ±0.25.
fn paper_genes() -> (Table, Table) {
    let (features, base) = fixture_data();
    let base = base.select_cols(&base.col_names[..6]).unwrap();
    let (n, genes) = (base.n_rows(), 218);
    let seed = 20230101u64;
    println!("seed {seed}");
    let mut rng = Rng(seed);
    let mut values = vec![0.0; n * genes];
    for g in 0..genes {
        let y = base.column(g % base.n_cols());
        for (r, v) in y.iter().enumerate() {
            values[r * genes + g] = v + 0.25 * (rng.next() * 2.0 - 1.0);
        }
    }
    let names = (0..genes).map(|g| format!("G{g}")).collect();
    let expression = Table::new(base.row_names.clone(), names, values).unwrap();
    (features, expression)
}

// ---------------------------------------------------------------------------
// CUDA
// ---------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn cuda_duals_equal_cpu() {
    let be = cuda();
    run_batches(&be, CUDA_CASES, DEVICE_MAX_ROWS);
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn cuda_fixture_grids_equal_cpu_grid() {
    let (features, expression) = fixture_data();
    let be = cuda();
    for (what, c, eps) in [
        ("small", "0.1,1,10,100", "0,0.1,0.2"),
        ("low_c", "0.001,0.01,0.03,0.1", "0,0.25"),
    ] {
        check_grid(
            &be,
            &features,
            &expression,
            &GridSpec::parse(c, eps).unwrap(),
            what,
        );
    }
    check_grid(&be, &features, &expression, &GridSpec::paper(), "paper");
}

/// The paper's workload on the GPU against the CPU, with both timings
/// printed.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn cuda_paper_size_grid_equals_cpu_grid() {
    let be = cuda();
    let (features, expression) = paper_genes();
    // Warm up: module load and first-launch costs are not the grid's.
    grid_search_on(
        &be,
        &features,
        &expression.select_cols(&["G0"]).unwrap(),
        &GridSpec::paper(),
    )
    .unwrap();
    check_grid(
        &be,
        &features,
        &expression,
        &GridSpec::paper(),
        "paper (218 genes)",
    );
}
