//! Single linear epsilon-SVR fits against scikit-learn's `SVR(kernel="linear")`
//! (fixture `svr_fits.json`: exact solutions at tol 1e-10 and sklearn's
//! default-tolerance predictions).

use std::path::PathBuf;

use cellmorph::svr::{self, smo, SvrParams, SvrProblem};
use serde_json::Value;

/// Reads a fixture from `tests/fixtures/svr/`; fails loudly if missing.
fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/svr")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

struct Case {
    tag: String,
    c: f64,
    epsilon: f64,
    x_train: Vec<f64>,
    y_train: Vec<f64>,
    x_test: Vec<f64>,
    d: usize,
    w: Vec<f64>,
    b: f64,
    support: Vec<usize>,
    dual_coef: Vec<f64>,
    pred_test: Vec<f64>,
    pred_train: Vec<f64>,
    pred_test_default_tol: Vec<f64>,
}

fn floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        other => vec![other.as_f64().expect("number")],
    }
}

fn cases() -> Vec<Case> {
    let json: Value = serde_json::from_slice(&fixture("svr_fits.json")).expect("svr_fits.json");
    json.as_array()
        .expect("a list of cases")
        .iter()
        .map(|c| Case {
            tag: format!(
                "{} C={} eps={}",
                c["tag"].as_str().unwrap(),
                c["C"],
                c["epsilon"]
            ),
            c: c["C"].as_f64().unwrap(),
            epsilon: c["epsilon"].as_f64().unwrap(),
            d: c["X_train"][0].as_array().unwrap().len(),
            x_train: floats(&c["X_train"]),
            y_train: floats(&c["y_train"]),
            x_test: floats(&c["X_test"]),
            w: floats(&c["w"]),
            b: c["b"].as_f64().unwrap(),
            support: floats(&c["support"]).iter().map(|&s| s as usize).collect(),
            dual_coef: floats(&c["dual_coef"]),
            pred_test: floats(&c["pred_test"]),
            pred_train: floats(&c["pred_train"]),
            pred_test_default_tol: floats(&c["pred_test_default_tol"]),
        })
        .collect()
}

/// max_i |got_i − want_i| / (1 + |want_i|).
fn max_rel(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / (1.0 + w.abs()))
        .fold(0.0, f64::max)
}

fn max_abs(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max)
}

/// At scikit-learn's default tol = 1e-3 the solution is approximate, and how
/// far from the exact one depends on the path. The README's budget is
/// 1e-3·(1 + |y|); on the diabetes cases scikit-learn's own default-tol
/// predictions are 1.2e-3 and 3.0e-3 away, so there the budget is twice
/// scikit-learn's own distance.
#[test]
fn default_tolerance_fits_are_close_to_the_exact_solution() {
    for case in cases() {
        let params = SvrParams::new(case.c, case.epsilon);
        let fit = svr::fit(&case.x_train, case.d, &case.y_train, &params).unwrap();
        assert!(fit.converged, "{}: not converged", case.tag);
        let test = fit.model.predict(&case.x_test).unwrap();
        let train = fit.model.predict(&case.x_train).unwrap();
        let sklearn_dev = max_rel(&case.pred_test_default_tol, &case.pred_test);
        let budget = 1e-3f64.max(2.0 * sklearn_dev);
        let (dev_test, dev_train) = (
            max_rel(&test, &case.pred_test),
            max_rel(&train, &case.pred_train),
        );
        let w_dev = max_abs(&fit.model.w, &case.w) / max_abs(&case.w, &vec![0.0; case.d]);
        println!(
            "{}: {} iterations, test dev {dev_test:.2e}, train dev {dev_train:.2e} \
             (sklearn default tol: {sklearn_dev:.2e}, budget {budget:.1e}), \
             max|Δw|/max|w| {w_dev:.2e}",
            case.tag, fit.iterations
        );
        assert!(
            dev_test <= budget,
            "{}: test predictions off by {dev_test}",
            case.tag
        );
        assert!(
            dev_train <= budget,
            "{}: train predictions off by {dev_train}",
            case.tag
        );
        // w is unique for a linear kernel; at tol 1e-3 it is known to about
        // the same relative accuracy as the predictions.
        assert!(w_dev <= 2e-2, "{}: w off by {w_dev} relative", case.tag);
    }
}

/// With a tight tolerance the solver must reach the exact solution itself:
/// the same support vectors, predictions, w and b to 1e-4 (relative to
/// 1 + |value|) and dual coefficients to 1e-3 (they reach C = 5).
///
/// Why not closer: libsvm caches the kernel in `f32` (`Qfloat`), so
/// scikit-learn's "exact" solution is exact for K rounded to `f32`, while
/// this solver keeps K in `f64`. The worst case (diabetes, C = 5, where the
/// dual is nearly degenerate) differs by 2.4e-5 in predictions and 1.2e-4 in
/// β; rounding K's off-diagonal entries to `f32` here brings every case
/// within 2e-6, which is how the cause was confirmed.
#[test]
fn tight_tolerance_reaches_the_exact_solution() {
    for case in cases() {
        let l = case.y_train.len();
        let rows: Vec<usize> = (0..l).collect();
        let gram = svr::linear_gram(&case.x_train, case.d, &rows);
        let mut beta = vec![0.0; l];
        let mut ws = smo::Workspace::default();
        let out = smo::solve(
            &gram,
            l,
            &case.y_train,
            case.c,
            case.epsilon,
            1e-10,
            smo::default_max_iter(l),
            &mut ws,
            &mut beta,
        );
        assert!(out.converged, "{}", case.tag);
        let w = svr::primal_weights(&case.x_train, case.d, &rows, &beta);
        let model = svr::LinearSvr { w, b: out.b };
        let dev = max_rel(&model.predict(&case.x_test).unwrap(), &case.pred_test);
        let w_dev = max_abs(&model.w, &case.w);
        let b_dev = (model.b - case.b).abs() / (1.0 + case.b.abs());
        let mut dual = vec![0.0; l];
        for (&s, &a) in case.support.iter().zip(&case.dual_coef) {
            dual[s] = a;
        }
        let dual_dev = max_abs(&beta, &dual);
        let support: Vec<usize> = (0..l).filter(|&m| beta[m] != 0.0).collect();
        println!(
            "{}: {} iterations, pred dev {dev:.2e}, |Δw| {w_dev:.2e}, b dev {b_dev:.2e}, \
             |Δβ| {dual_dev:.2e}",
            case.tag, out.iterations
        );
        assert!(dev < 1e-4, "{}: predictions off by {dev}", case.tag);
        assert!(w_dev < 1e-4, "{}: w off by {w_dev}", case.tag);
        assert!(b_dev < 1e-4, "{}: b off by {b_dev}", case.tag);
        assert!(
            dual_dev < 1e-3,
            "{}: dual coefficients off by {dual_dev}",
            case.tag
        );
        assert_eq!(support, case.support, "{}: support vectors", case.tag);
    }
}

/// The batch API gives each problem exactly what a single fit gives, whatever
/// the mix of training sets and parameters.
#[test]
fn batch_equals_single_fits() {
    let case = cases()
        .into_iter()
        .find(|c| c.tag.starts_with("diabetes"))
        .unwrap();
    let n = case.y_train.len();
    let problems: Vec<SvrProblem> = [(0..n).collect::<Vec<_>>(), (0..n).step_by(2).collect()]
        .iter()
        .flat_map(|rows| {
            [(0.5, 0.1), (5.0, 0.3), (0.01, 0.0)].map(|(c, e)| SvrProblem {
                train_rows: rows.clone(),
                y: rows.iter().map(|&r| case.y_train[r]).collect(),
                params: SvrParams::new(c, e),
            })
        })
        .collect();
    let fits = svr::fit_batch(&case.x_train, case.d, &problems).unwrap();
    for (p, fit) in problems.iter().zip(&fits) {
        let x: Vec<f64> = p
            .train_rows
            .iter()
            .flat_map(|&r| case.x_train[r * case.d..(r + 1) * case.d].to_vec())
            .collect();
        let single = svr::fit(&x, case.d, &p.y, &p.params).unwrap();
        assert_eq!(&single, fit, "rows {}, {:?}", p.train_rows.len(), p.params);
    }
}

/// The reuse behind the grid search: a solve that never touched the C bound
/// is bit-identical for every larger C. Checked on every fixture case and a
/// range of C values, with the bound flag asserted both ways.
#[test]
fn untouched_c_bound_means_identical_results_for_larger_c() {
    let mut reused = 0;
    for case in cases() {
        let l = case.y_train.len();
        let rows: Vec<usize> = (0..l).collect();
        let gram = svr::linear_gram(&case.x_train, case.d, &rows);
        let mut ws = smo::Workspace::default();
        let solve = |c: f64, ws: &mut smo::Workspace| {
            let mut beta = vec![0.0; l];
            let out = smo::solve(
                &gram,
                l,
                &case.y_train,
                c,
                case.epsilon,
                1e-3,
                smo::default_max_iter(l),
                ws,
                &mut beta,
            );
            (out, beta)
        };
        let cs = [1e-4, 1e-3, 0.01, 0.1, 0.5, 1.0, 3.0, 50.0, 100.0];
        for (k, &c) in cs.iter().enumerate() {
            let (out, beta) = solve(c, &mut ws);
            let max_alpha = beta.iter().fold(0.0f64, |m, b| m.max(b.abs()));
            if max_alpha >= c {
                assert!(
                    out.c_bound_active,
                    "{} C={c}: at the bound, flag not set",
                    case.tag
                );
            }
            if !out.c_bound_active {
                for &bigger in &cs[k + 1..] {
                    let (o2, b2) = solve(bigger, &mut ws);
                    assert_eq!(
                        (o2.b.to_bits(), o2.iterations, &b2),
                        (out.b.to_bits(), out.iterations, &beta),
                        "{}: C={c} and C={bigger} differ",
                        case.tag
                    );
                    reused += 1;
                }
            }
        }
    }
    assert!(reused > 0, "no case exercised the C-independent path");
}

#[test]
fn bad_inputs_are_errors() {
    let x = [1.0, 2.0, 3.0, 4.0];
    let y = [1.0, 2.0];
    assert!(svr::fit(&x, 2, &y, &SvrParams::new(0.0, 0.1)).is_err());
    assert!(svr::fit(&x, 2, &y, &SvrParams::new(1.0, -1.0)).is_err());
    assert!(svr::fit(&x, 3, &y, &SvrParams::default()).is_err());
    assert!(svr::fit(&x, 2, &[1.0], &SvrParams::default()).is_err());
    assert!(svr::fit(&[1.0, f64::NAN, 3.0, 4.0], 2, &y, &SvrParams::default()).is_err());
    assert!(svr::fit(&x, 2, &[1.0, f64::INFINITY], &SvrParams::default()).is_err());
    let p = SvrProblem {
        train_rows: vec![0, 5],
        y: vec![1.0, 2.0],
        params: SvrParams::default(),
    };
    assert!(svr::fit_batch(&x, 2, &[p]).is_err());
}

/// A constant feature column is harmless; a constant target gives w = 0 and
/// b = that constant (the dual optimum is α = 0).
#[test]
fn constant_columns_and_targets() {
    let x = [1.0, 5.0, 2.0, 5.0, 3.0, 5.0, 4.0, 5.0];
    let fit = svr::fit(&x, 2, &[2.0, 4.0, 6.0, 8.0], &SvrParams::new(100.0, 0.0)).unwrap();
    let pred = fit.model.predict(&x).unwrap();
    assert!(max_abs(&pred, &[2.0, 4.0, 6.0, 8.0]) < 1e-2, "{pred:?}");
    let fit = svr::fit(&x, 2, &[3.0; 4], &SvrParams::default()).unwrap();
    assert_eq!(fit.model.w, [0.0, 0.0]);
    assert_eq!(fit.model.b, 3.0);
}

/// Reaching the iteration cap is reported, not a panic, and the iterate is
/// still a feasible dual point (Σβ = 0, |β| ≤ C).
#[test]
fn iteration_cap_is_reported() {
    let case = cases()
        .into_iter()
        .find(|c| c.tag == "diabetes C=5 eps=0.3")
        .unwrap();
    let l = case.y_train.len();
    let rows: Vec<usize> = (0..l).collect();
    let gram = svr::linear_gram(&case.x_train, case.d, &rows);
    let mut beta = vec![0.0; l];
    let out = smo::solve(
        &gram,
        l,
        &case.y_train,
        case.c,
        case.epsilon,
        1e-3,
        50,
        &mut smo::Workspace::default(),
        &mut beta,
    );
    assert!(!out.converged);
    assert_eq!(out.iterations, 50);
    let sum: f64 = beta.iter().sum();
    assert!(sum.abs() < 1e-12, "Σβ = {sum}");
    assert!(beta.iter().all(|b| b.abs() <= case.c));
    assert!(out.b.is_finite());
}
