//! The C-SVC kernels (`kernels/svm.cu` through `svm::device`), emulated and
//! on CUDA, against the CPU solver: independent pairwise duals (the
//! fixture's, seeded random and degenerate ones), fits, and the whole grid
//! search on the fixture, through the library and the command.
//!
//! Tolerance: none. The kernels repeat every floating-point operation of
//! `svm::smo::solve` in the same order with no FMA contraction (see the
//! header of kernels/svm.cu), so coefficients, ρ, iteration counts, grid
//! accuracies, the choice and the model must equal the CPU's exactly
//! (`==`, which also equates the two zeros ρ may come out as). A tolerance
//! would hide a reordered sum or a different tie-break in the working-set
//! selection, the bugs these tests are for.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use cellmorph::apps::expression::categories::read_labels;
use cellmorph::svm::device::{fit_on, grid_search_on, solve_duals_on, SvcDual, SHARED_MAX_ROWS};
use cellmorph::svm::{grid_search, squared_distance, stratified_kfold, Gamma, Svc, SvmGridSpec};
use cellmorph::svr::cv::{kfold_folds, Folds};
use cellmorph::table::Table;
use cellmorph::Backend;

use common::{cuda, emulated, Rng};

/// An owned dual: Gram matrix, size, positives, C, tol.
struct Problem {
    gram: Vec<f64>,
    l: usize,
    n_pos: usize,
    c: f64,
    tol: f64,
}

/// The RBF Gram matrix of `rows` of `x`, as the library computes it.
fn rbf_gram(x: &[f64], d: usize, rows: &[usize], gamma: f64) -> Vec<f64> {
    let l = rows.len();
    let row = |r: usize| &x[r * d..(r + 1) * d];
    let mut g = vec![0.0; l * l];
    for s in 0..l {
        g[s * l + s] = 1.0;
        for t in s + 1..l {
            let k = (-gamma * squared_distance(row(rows[s]), row(rows[t]))).exp();
            g[s * l + t] = k;
            g[t * l + s] = k;
        }
    }
    g
}

/// A random problem of `l` samples: features from `levels` values per
/// coordinate (few levels: duplicate rows and tied gradients), `n_pos`
/// positives, γ and C drawn over several decades.
fn random_problem(rng: &mut Rng, l: usize, d: usize, levels: usize, n_pos: usize) -> Problem {
    let x: Vec<f64> = (0..l * d)
        .map(|_| rng.below(levels) as f64 / levels as f64)
        .collect();
    let rows: Vec<usize> = (0..l).collect();
    let gamma = 10f64.powf(rng.next() * 3.0 - 1.5);
    Problem {
        gram: rbf_gram(&x, d, &rows, gamma),
        l,
        n_pos,
        c: 10f64.powf(rng.next() * 5.0 - 2.0),
        tol: if rng.below(2) == 0 { 1e-3 } else { 1e-6 },
    }
}

/// Solves `problems` on `be` in one batch and one by one with
/// `smo::solve`, and requires identical results.
fn check_duals(be: &Backend, problems: &[Problem], what: &str) {
    let duals: Vec<SvcDual> = problems
        .iter()
        .map(|p| SvcDual {
            gram: &p.gram,
            l: p.l,
            n_pos: p.n_pos,
            c: p.c,
            tol: p.tol,
        })
        .collect();
    check_dual_refs(be, &duals, what);
}

fn check_dual_refs(be: &Backend, duals: &[SvcDual], what: &str) {
    let got = solve_duals_on(be, duals).unwrap();
    assert_eq!(got.len(), duals.len());
    let mut iterations = 0;
    for (k, (d, s)) in duals.iter().zip(&got).enumerate() {
        let want = d.solve_cpu();
        let (coef, want) = (want.coef, want.outcome);
        let at = format!(
            "{what}, dual {k} (l = {}, n_pos = {}, C = {}, tol = {})",
            d.l, d.n_pos, d.c, d.tol
        );
        assert_eq!(s.outcome.iterations, want.iterations, "{at}: iterations");
        assert_eq!(s.outcome.converged, want.converged, "{at}: converged");
        let diff = s
            .coef
            .iter()
            .zip(&coef)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            s.coef == coef,
            "{at}: coefficients differ by up to {diff:e}"
        );
        assert!(
            s.outcome.rho == want.rho,
            "{at}: ρ = {} on the device, {} on the CPU",
            s.outcome.rho,
            want.rho
        );
        iterations += want.iterations;
    }
    println!(
        "{what}: {} duals, {iterations} SMO iterations, identical on {}",
        duals.len(),
        be.device()
    );
}

/// Seeded random duals of 1..=max_l samples, both kernel variants when
/// max_l > SHARED_MAX_ROWS.
fn random_duals(seed: u64, count: usize, max_l: usize) -> Vec<Problem> {
    let mut rng = Rng(seed);
    (0..count)
        .map(|_| {
            let l = 1 + rng.below(max_l);
            let levels = [2, 3, 1000][rng.below(3)];
            let d = 1 + rng.below(6);
            let n_pos = rng.below(l + 1);
            random_problem(&mut rng, l, d, levels, n_pos)
        })
        .collect()
}

#[test]
fn emulated_random_duals_equal_cpu() {
    let seed = 20260101;
    println!("seed {seed}");
    check_duals(&emulated(), &random_duals(seed, 40, 96), "random duals");
}

/// The shared-memory variant's edge (l = 128) and the global-memory variant
/// just above it and further.
#[test]
fn emulated_variant_edges_equal_cpu() {
    let mut rng = Rng(7);
    let problems: Vec<Problem> = [
        (1, 1),
        (2, 1),
        (32, 16),
        (33, 10),
        (SHARED_MAX_ROWS, 64),
        (SHARED_MAX_ROWS + 1, 40),
        (200, 120),
    ]
    .into_iter()
    .enumerate()
    .map(|(k, (l, n_pos))| {
        let mut p = random_problem(&mut rng, l, 3, if k % 2 == 0 { 1000 } else { 3 }, n_pos);
        // C in the range where some variables bind and some stay free.
        p.c = 1.0;
        p
    })
    .collect();
    check_duals(&emulated(), &problems, "variant edges");
}

/// Ties and degenerate problems: duplicate rows (tied gradients, the
/// last-index tie rule), identical rows only (every curvature 0: libsvm's
/// TAU path), a single class (no working pair: 0 iterations, ρ from the
/// bounds), C so small that every variable ends at a bound, and duals
/// that share one Gram matrix (one block) with different C.
#[test]
fn emulated_degenerate_duals_equal_cpu() {
    let x = [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0];
    let dup = rbf_gram(&x, 2, &[0, 1, 2, 3, 4, 5], 0.5);
    let same = vec![1.0; 25];
    let mut problems = vec![
        Problem {
            gram: dup.clone(),
            l: 6,
            n_pos: 3,
            c: 1.0,
            tol: 1e-3,
        },
        Problem {
            gram: same.clone(),
            l: 5,
            n_pos: 2,
            c: 10.0,
            tol: 1e-3,
        },
        Problem {
            gram: same,
            l: 5,
            n_pos: 5,
            c: 1.0,
            tol: 1e-3,
        },
        Problem {
            gram: dup.clone(),
            l: 6,
            n_pos: 0,
            c: 1.0,
            tol: 1e-3,
        },
    ];
    let mut rng = Rng(3);
    // Unbalanced (17 of 40 positive: 17 negatives reach C), then balanced
    // (every variable reaches C).
    for (levels, n_pos) in [(2, 17), (1000, 17), (2, 20)] {
        let mut p = random_problem(&mut rng, 40, 4, levels, n_pos);
        p.c = 1e-4;
        problems.push(p);
    }
    check_duals(&emulated(), &problems, "degenerate duals");
    // Balanced and C tiny: every coefficient is ±C.
    let p = &problems[problems.len() - 1];
    let s = solve_duals_on(
        &emulated(),
        &[SvcDual {
            gram: &p.gram,
            l: p.l,
            n_pos: p.n_pos,
            c: p.c,
            tol: p.tol,
        }],
    )
    .unwrap();
    assert!(s[0].coef.iter().all(|v| v.abs() == p.c), "{:?}", s[0].coef);

    // One Gram matrix, 6 C values: the block-sharing path.
    let shared: Vec<SvcDual> = [0.01, 0.1, 1.0, 10.0, 100.0, 1e4]
        .iter()
        .map(|&c| SvcDual {
            gram: &dup,
            l: 6,
            n_pos: 3,
            c,
            tol: 1e-3,
        })
        .collect();
    check_dual_refs(&emulated(), &shared, "one Gram matrix, several C");
}

/// On the CPU device the entry points are the CPU solver.
#[test]
fn cpu_device_runs_the_cpu_solver() {
    check_duals(&Backend::cpu(), &random_duals(5, 10, 60), "cpu device");
    let f = fixture_data();
    let folds = stratified_kfold(&f.y, 5).unwrap();
    let spec = SvmGridSpec::new(vec![1.0], vec![Gamma::Scale]);
    assert_eq!(
        grid_search_on(&Backend::cpu(), &f.x, f.d, &f.y, &spec, &folds).unwrap(),
        grid_search(&f.x, f.d, &f.y, &spec, &folds).unwrap()
    );
}

#[test]
fn device_errors_are_clear() {
    let be = emulated();
    let g = vec![1.0; 4];
    let bad = |l: usize, n_pos: usize, c: f64| {
        solve_duals_on(
            &be,
            &[SvcDual {
                gram: &g,
                l,
                n_pos,
                c,
                tol: 1e-3,
            }],
        )
        .unwrap_err()
        .to_string()
    };
    let e = bad(3, 1, 1.0);
    assert!(e.contains("dual 0: 4 Gram values, l = 3"), "{e}");
    let e = bad(2, 3, 1.0);
    assert!(e.contains("3 positive samples"), "{e}");
    let e = bad(2, 1, 0.0);
    assert!(e.contains("C must be a finite number > 0"), "{e}");
    // A fit with a single class, as the CPU path reports it.
    let x = [0.0, 1.0, 2.0];
    let e = fit_on(&be, &x, 1, &[0, 1, 2], &[1, 1, 1], 1.0, 1.0, 1e-3)
        .unwrap_err()
        .to_string();
    let cpu = Svc::fit(&x, 1, &[0, 1, 2], &[1, 1, 1], 1.0, 1.0, 1e-3)
        .unwrap_err()
        .to_string();
    assert_eq!(e, cpu);
}

// ---------------------------------------------------------------------------
// Fits and the grid search on the fixture
// ---------------------------------------------------------------------------

fn fixture(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/svm")
        .join(name);
    assert!(path.is_file(), "fixture {} is missing", path.display());
    path
}

/// The fixture's 80 × 12 training features and labels (4 classes).
struct Fixture {
    x: Vec<f64>,
    d: usize,
    y: Vec<usize>,
}

fn fixture_data() -> Fixture {
    let t = Table::read_csv(fixture("features.csv")).unwrap();
    let l = read_labels(&fixture("labels.csv"), "quality").unwrap();
    let mut classes: Vec<&str> = l.iter().map(|(_, c)| c.as_str()).collect();
    classes.sort_unstable();
    classes.dedup();
    let y = l
        .iter()
        .map(|(_, c)| classes.iter().position(|k| k == c).unwrap())
        .collect();
    Fixture {
        d: t.n_cols(),
        x: t.data,
        y,
    }
}

/// The fixture's grid (as in tests/svm.rs and svm.json).
fn fixture_spec() -> SvmGridSpec {
    SvmGridSpec::new(
        vec![0.1, 1.0, 10.0, 100.0],
        Gamma::parse_list("0.01,0.05,0.2,scale").unwrap(),
    )
}

/// Every pairwise dual of every (setting, fold) of the fixture's grid and
/// of the refit, built as `Svc::fit` builds them, solved in one batch.
#[test]
fn emulated_fixture_pair_duals_equal_cpu() {
    let f = fixture_data();
    let folds = stratified_kfold(&f.y, 5).unwrap();
    let n = f.y.len();
    let mut train: Vec<Vec<usize>> = folds
        .iter()
        .map(|held| (0..n).filter(|i| !held.contains(i)).collect())
        .collect();
    train.push((0..n).collect());
    let spec = fixture_spec();
    let mut problems = Vec::new();
    for rows in &train {
        for g in &spec.gamma {
            let gamma = g.resolve(&f.x, f.d, rows);
            for a in 0..4 {
                for b in a + 1..4 {
                    let pos: Vec<usize> = rows
                        .iter()
                        .copied()
                        .filter(|&r| f.y[r] == a)
                        .chain(rows.iter().copied().filter(|&r| f.y[r] == b))
                        .collect();
                    let n_pos = pos.iter().filter(|&&r| f.y[r] == a).count();
                    let gram = rbf_gram(&f.x, f.d, &pos, gamma);
                    for &c in &spec.c {
                        problems.push(Problem {
                            gram: gram.clone(),
                            l: pos.len(),
                            n_pos,
                            c,
                            tol: spec.tol,
                        });
                    }
                }
            }
        }
    }
    check_duals(&emulated(), &problems, "fixture pairs");
}

/// `fit_on` equals `Svc::fit`: the fixture at one setting, and a 3-class
/// problem with duplicated rows and pairs above the shared-memory size.
#[test]
fn emulated_fits_equal_cpu_fits() {
    let be = emulated();
    let f = fixture_data();
    let rows: Vec<usize> = (0..f.y.len()).collect();
    for (c, gamma) in [(1.0, 0.05), (100.0, 0.2), (0.1, 0.01)] {
        assert_eq!(
            fit_on(&be, &f.x, f.d, &rows, &f.y, c, gamma, 1e-3).unwrap(),
            Svc::fit(&f.x, f.d, &rows, &f.y, c, gamma, 1e-3).unwrap(),
            "fixture, C = {c}, γ = {gamma}"
        );
    }
    let mut rng = Rng(11);
    let n = 210;
    let x: Vec<f64> = (0..n * 3).map(|_| rng.below(4) as f64 * 0.5).collect();
    let y: Vec<usize> = (0..n).map(|_| rng.below(3)).collect();
    let rows: Vec<usize> = (0..n).collect();
    let got = fit_on(&be, &x, 3, &rows, &y, 2.0, 0.7, 1e-3).unwrap();
    let want = Svc::fit(&x, 3, &rows, &y, 2.0, 0.7, 1e-3).unwrap();
    println!(
        "210 samples, 3 classes: {} SMO iterations, {} support vectors",
        want.iterations,
        want.support.len()
    );
    assert!(
        got == want,
        "210 samples: iterations {} vs {}, intercepts {:?} vs {:?}",
        got.iterations,
        want.iterations,
        got.intercept,
        want.intercept
    );
}

/// The grid search on `be` and on the CPU: every fold accuracy, the choice,
/// the out-of-fold predictions and the refitted model must be identical.
fn check_grid(be: &Backend, f: &Fixture, spec: &SvmGridSpec, folds: &Folds, what: &str) {
    let start = std::time::Instant::now();
    let got = grid_search_on(be, &f.x, f.d, &f.y, spec, folds).unwrap();
    let device_s = start.elapsed().as_secs_f64();
    let start = std::time::Instant::now();
    let want = grid_search(&f.x, f.d, &f.y, spec, folds).unwrap();
    let cpu_s = start.elapsed().as_secs_f64();
    println!(
        "{what}: {} settings × {} folds, best {} (mean accuracy {}); {} {device_s:.3} s, cpu {cpu_s:.3} s",
        want.scores.len(),
        folds.len(),
        want.best,
        want.scores[want.best].mean_accuracy,
        be.device()
    );
    assert_eq!(got.scores, want.scores, "{what}: grid accuracies");
    assert_eq!(got.best, want.best, "{what}: choice");
    assert_eq!(got.oof_predicted, want.oof_predicted, "{what}: predictions");
    assert_eq!(got.model, want.model, "{what}: model");
    assert_eq!(got, want, "{what}");
}

/// Stratified folds (as `svm grid`), and contiguous folds on the samples
/// sorted by class, so that every fold's training set lacks one class
/// entirely (3-class models inside a 4-class search).
#[test]
fn emulated_grid_equals_cpu_grid() {
    let be = emulated();
    let f = fixture_data();
    let spec = fixture_spec();
    check_grid(
        &be,
        &f,
        &spec,
        &stratified_kfold(&f.y, 5).unwrap(),
        "stratified",
    );
    let mut order: Vec<usize> = (0..f.y.len()).collect();
    order.sort_by_key(|&i| f.y[i]);
    let sorted = Fixture {
        x: order
            .iter()
            .flat_map(|&i| f.x[i * f.d..(i + 1) * f.d].iter().copied())
            .collect(),
        d: f.d,
        y: order.iter().map(|&i| f.y[i]).collect(),
    };
    let small = SvmGridSpec::new(vec![0.01, 1.0], Gamma::parse_list("0.05,scale").unwrap());
    check_grid(
        &be,
        &sorted,
        &small,
        &kfold_folds(sorted.y.len(), 4).unwrap(),
        "class-sorted KFold(4)",
    );
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cellmorph"))
}

fn grid_files(dir: &Path, device: &str) -> (String, String, String) {
    let (model, conf, oof) = (
        dir.join(format!("{device}.json")),
        dir.join(format!("{device}.conf.csv")),
        dir.join(format!("{device}.oof.csv")),
    );
    let o = bin()
        .args(["svm", "grid", "--features"])
        .arg(fixture("features.csv"))
        .arg("--labels")
        .arg(fixture("labels.csv"))
        .args(["--label-column", "quality", "--c", "0.1,1,10,100"])
        .args(["--gamma", "0.01,0.05,0.2,scale", "--folds", "5"])
        .args(["--device", device, "--output"])
        .arg(&model)
        .arg("--confusion")
        .arg(&conf)
        .arg("--predictions")
        .arg(&oof)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "svm grid --device {device}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    (read(&model), read(&conf), read(&oof))
}

/// `svm grid --device emulated` writes the same model JSON, confusion
/// matrix and predictions as `--device cpu`, byte for byte.
#[test]
fn emulated_command_writes_the_cpu_files() {
    let dir = std::env::temp_dir().join(format!("cellmorph-svm-device-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cpu = grid_files(&dir, "cpu");
    let emu = grid_files(&dir, "emulated");
    assert!(cpu.0.contains("\"support\""), "{}", cpu.0);
    assert_eq!(emu.0, cpu.0, "model JSON");
    assert_eq!(emu.1, cpu.1, "confusion CSV");
    assert_eq!(emu.2, cpu.2, "predictions CSV");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// CUDA
// ---------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn cuda_duals_equal_cpu() {
    let be = cuda();
    check_duals(&be, &random_duals(20260101, 400, 300), "random duals");
    check_duals(&be, &random_duals(99, 40, 1200), "large random duals");
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn cuda_fixture_grid_equals_cpu_grid() {
    let be = cuda();
    let f = fixture_data();
    // Warm up: module load and first-launch costs are not the grid's.
    let folds = stratified_kfold(&f.y, 5).unwrap();
    grid_search_on(
        &be,
        &f.x,
        f.d,
        &f.y,
        &SvmGridSpec::new(vec![1.0], vec![Gamma::Scale]),
        &folds,
    )
    .unwrap();
    check_grid(&be, &f, &fixture_spec(), &folds, "stratified (cuda)");
}
