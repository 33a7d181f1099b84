//! RBF SVC (`cellmorph::svm`, `cellmorph svm grid|predict`) against
//! scikit-learn's `SVC`, `GridSearchCV` and `StratifiedKFold` (fixtures in
//! `tests/fixtures/svm/`, made by `scripts/fixtures/svm.py`), and the
//! commands' files and errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cellmorph::apps::expression::categories::read_labels;
use cellmorph::svm::{grid_search, stratified_kfold, Gamma, Svc, SvmGridSpec, SvmModel};
use cellmorph::table::Table;
use serde_json::Value;

/// Dual coefficients, in units of max(C, 1): both solvers stop when the
/// maximal KKT violation falls below tol = 1e-3 (scikit-learn's default)
/// along the same working-set path, but libsvm keeps its kernel matrix in
/// f32 (cellmorph in f64), which moves the iterates by more as C grows;
/// measured: 2.5e-7 at C = 1, 2.9e-4 · C at C = 100.
const DUAL_TOL: f64 = 1e-3;
/// Intercepts and decision values: of the order of the stopping tolerance
/// (in decision-function units); measured at most 1.4e-3 (C = 100), below
/// 3e-7 for C ≤ 10.
const DECISION_TOL: f64 = 2e-3;

fn fixture(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/svm")
        .join(name);
    assert!(path.is_file(), "fixture {} is missing", path.display());
    path
}

fn json() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("svm.json")).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn indices(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// The training (or test) set: features row-major, labels as indices into
/// the sorted classes.
struct Data {
    x: Vec<f64>,
    n_features: usize,
    y: Vec<usize>,
    classes: Vec<String>,
}

fn data(features: &str, labels: &str) -> Data {
    let t = Table::read_csv(fixture(features)).unwrap();
    let l = read_labels(&fixture(labels), "quality").unwrap();
    let names: Vec<&str> = l.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(names, t.row_names, "labels in feature order");
    let mut classes: Vec<String> = l.iter().map(|(_, c)| c.clone()).collect();
    classes.sort();
    classes.dedup();
    let y = l
        .iter()
        .map(|(_, c)| classes.iter().position(|k| k == c).unwrap())
        .collect();
    Data {
        n_features: t.n_cols(),
        x: t.data,
        y,
        classes,
    }
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f64::max)
}

#[test]
fn fits_match_sklearn_svc() {
    let train = data("features.csv", "labels.csv");
    let test = data("test_features.csv", "test_labels.csv");
    let j = json();
    let rows: Vec<usize> = (0..train.y.len()).collect();
    for fit in j["fits"].as_array().unwrap() {
        let c = fit["C"].as_f64().unwrap();
        let gamma = match &fit["gamma"] {
            Value::String(s) => Gamma::parse(s).unwrap(),
            v => Gamma::Value(v.as_f64().unwrap()),
        };
        let g = gamma.resolve(&train.x, train.n_features, &rows);
        let m = Svc::fit(&train.x, train.n_features, &rows, &train.y, c, g, 1e-3).unwrap();
        assert_eq!(m.unconverged, 0);
        for variant in ["no_shrinking", "shrinking"] {
            let sk = &fit[variant];
            let what = format!("C = {c}, gamma = {gamma}, {variant}");
            // numpy's variance sums pairwise, cellmorph's in order.
            let g_sk = sk["gamma_value"].as_f64().unwrap();
            assert!(
                (g - g_sk).abs() <= 1e-12 * g_sk,
                "{what}: gamma {g} vs {g_sk}"
            );
            assert_eq!(strings(&sk["classes"]), train.classes, "{what}");
            assert_eq!(m.n_support, indices(&sk["n_support"]), "{what}: n_support");
            assert_eq!(m.support, indices(&sk["support"]), "{what}: support");
            let dual: Vec<f64> = m.dual_coef.concat();
            let sk_dual: Vec<f64> = sk["dual_coef"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(floats)
                .collect();
            let d_dual = max_abs_diff(&dual, &sk_dual);
            let d_b = max_abs_diff(&m.intercept, &floats(&sk["intercept"]));
            // Test-set decision values (libsvm's pairwise, "ovo") and votes.
            let mut d_dec: f64 = 0.0;
            let predicted: Vec<String> = test
                .x
                .chunks_exact(test.n_features)
                .zip(sk["test_decision"].as_array().unwrap())
                .map(|(x, dec_sk)| {
                    let (dec, best) = m.decide(&m.kernel_values(x));
                    d_dec = d_dec.max(max_abs_diff(&dec, &floats(dec_sk)));
                    train.classes[m.classes[best]].clone()
                })
                .collect();
            println!(
                "{what}: max |Δdual| {d_dual:.2e}, |Δintercept| {d_b:.2e}, |Δdecision| {d_dec:.2e}"
            );
            assert!(d_dual <= DUAL_TOL * c.max(1.0), "{what}: dual {d_dual}");
            assert!(d_b <= DECISION_TOL, "{what}: intercept {d_b}");
            assert!(d_dec <= DECISION_TOL, "{what}: decision {d_dec}");
            assert_eq!(
                predicted,
                strings(&sk["test_predicted"]),
                "{what}: predictions"
            );
        }
        // Bounded (|coef| = C) and free vectors both occur.
        let dual = m.dual_coef.concat();
        assert!(dual.iter().any(|v| v.abs() == c), "C = {c}: no bounded SV");
        assert!(
            dual.iter().any(|v| v.abs() > 0.0 && v.abs() < c),
            "C = {c}: no free SV"
        );
    }
}

#[test]
fn grid_search_matches_sklearn() {
    let train = data("features.csv", "labels.csv");
    let j = json();
    let g = &j["grid"];
    let gamma: Vec<Gamma> = g["gamma"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| match v {
            Value::String(s) => Gamma::parse(s).unwrap(),
            v => Gamma::Value(v.as_f64().unwrap()),
        })
        .collect();
    let spec = SvmGridSpec::new(floats(&g["C"]), gamma);
    let folds = stratified_kfold(&train.y, 5).unwrap();
    let out = grid_search(&train.x, train.n_features, &train.y, &spec, &folds).unwrap();
    let sk = floats(&g["mean_test_score"]);
    assert_eq!(out.scores.len(), sk.len());
    for (s, (mine, theirs)) in out.scores.iter().zip(&sk).enumerate() {
        let p = &g["params"][s];
        assert_eq!(mine.c, p["C"].as_f64().unwrap(), "grid order, setting {s}");
        // Fold accuracies are multiples of 1/16: identical predictions give
        // identical scores; 1e-3 is the budget.
        assert!(
            (mine.mean_accuracy - theirs).abs() <= 1e-3,
            "setting {s}: {} vs {theirs}",
            mine.mean_accuracy
        );
    }
    // Several settings tie at the top: the first wins, as sklearn's rank.
    assert_eq!(out.best, g["best_index"].as_u64().unwrap() as usize);
    let classes = &train.classes;
    let oof: Vec<String> = out
        .oof_predicted
        .iter()
        .map(|&k| classes[k].clone())
        .collect();
    assert_eq!(oof, strings(&g["oof_predicted"]));
}

#[test]
fn stratified_folds_match_sklearn() {
    let train = data("features.csv", "labels.csv");
    let j = json();
    let s = &j["stratified"];
    let want: Vec<Vec<usize>> = s["train_k5"]
        .as_array()
        .unwrap()
        .iter()
        .map(indices)
        .collect();
    // Label values do not matter, only equality: indices and names agree.
    assert_eq!(stratified_kfold(&train.y, 5).unwrap(), want);
    let small = strings(&s["small_labels"]);
    let want: Vec<Vec<usize>> = s["small_k3"]
        .as_array()
        .unwrap()
        .iter()
        .map(indices)
        .collect();
    assert_eq!(stratified_kfold(&small, 3).unwrap(), want);
    // "c" has 3 members: 4 folds are refused (scikit-learn only warns).
    assert!(stratified_kfold(&small, 4).is_err());
}

// ---- the commands ----

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cellmorph"))
}

fn tempdir(tag: &str) -> common::TempDir {
    common::TempDir::new("svm", tag)
}

fn grid_cmd(features: &Path, labels: &Path, output: &Path, extra: &[&str]) -> Output {
    bin()
        .args(["svm", "grid", "--features"])
        .arg(features)
        .arg("--labels")
        .arg(labels)
        .args(["--label-column", "quality", "--c", "0.1,1,10,100"])
        .args(["--gamma", "0.01,0.05,0.2,scale", "--folds", "5"])
        .arg("--output")
        .arg(output)
        .args(extra)
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    assert!(!o.status.success(), "should have failed");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn grid_then_predict_round_trip() {
    let dir = tempdir("roundtrip");
    let model = dir.join("model.json");
    let (conf, png, oof) = (dir.join("c.csv"), dir.join("c.png"), dir.join("oof.csv"));
    let out = ok(&grid_cmd(
        &fixture("features.csv"),
        &fixture("labels.csv"),
        &model,
        &[
            "--confusion",
            conf.to_str().unwrap(),
            "--plot",
            png.to_str().unwrap(),
            "--predictions",
            oof.to_str().unwrap(),
        ],
    ));
    assert!(out.contains("best: C = 1, gamma = 0.05"), "{out}");
    let j = json();
    let m = SvmModel::load(&model).unwrap();
    assert_eq!((m.c, m.gamma), (1.0, 0.05));
    let sk = &j["fits"][1]["no_shrinking"];
    assert_eq!(m.n_support, indices(&sk["n_support"]));
    let grid = m.grid.as_ref().unwrap();
    assert_eq!(grid.best, 5);
    assert_eq!(grid.scores.len(), 16);

    // The confusion matrix is that of sklearn's out-of-fold predictions.
    let train = data("features.csv", "labels.csv");
    let sk_oof = strings(&j["grid"]["oof_predicted"]);
    let k = train.classes.len();
    let mut counts = vec![0usize; k * k];
    for (t, p) in train.y.iter().zip(&sk_oof) {
        counts[t * k + train.classes.iter().position(|c| c == p).unwrap()] += 1;
    }
    let text = std::fs::read_to_string(&conf).unwrap();
    for (t, class) in train.classes.iter().enumerate() {
        let row: Vec<String> = counts[t * k..(t + 1) * k]
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert!(
            text.contains(&format!("\n{class},{},", row.join(","))),
            "{class}: {text}"
        );
    }
    let correct: usize = (0..k).map(|c| counts[c * k + c]).sum();
    assert!(
        out.contains(&format!("accuracy {:.4}", correct as f64 / 80.0)),
        "{out}"
    );
    assert!(image::open(&png).unwrap().width() > 100);
    assert_eq!(std::fs::read_to_string(&oof).unwrap().lines().count(), 82);

    // predict on the test set equals sklearn's SVC(C=1, gamma=0.05).
    let pred = dir.join("pred.csv");
    let out = ok(&bin()
        .args(["svm", "predict", "--model"])
        .arg(&model)
        .arg("--features")
        .arg(fixture("test_features.csv"))
        .arg("--labels")
        .arg(fixture("test_labels.csv"))
        .args(["--label-column", "quality", "--output"])
        .arg(&pred)
        .output()
        .unwrap());
    assert!(out.contains("accuracy"), "{out}");
    let text = std::fs::read_to_string(&pred).unwrap();
    let predicted: Vec<String> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().to_string())
        .collect();
    assert_eq!(predicted, strings(&sk["test_predicted"]));
    assert!(
        text.starts_with("sample,predicted,label,fail_vs_fair,"),
        "{text}"
    );

    // Same seed, same model bits.
    let again = dir.join("again.json");
    ok(&grid_cmd(
        &fixture("features.csv"),
        &fixture("labels.csv"),
        &again,
        &["--shuffle", "--seed", "3"],
    ));
    let again2 = dir.join("again2.json");
    ok(&grid_cmd(
        &fixture("features.csv"),
        &fixture("labels.csv"),
        &again2,
        &["--shuffle", "--seed", "3"],
    ));
    assert_eq!(
        std::fs::read(&again).unwrap(),
        std::fs::read(&again2).unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn command_errors() {
    let dir = tempdir("errors");
    let model = dir.join("m.json");
    let features = fixture("features.csv");
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    // A labelled sample missing from the features.
    let labels = write("missing.csv", "sample,quality\ns000,good\nnope,fair\n");
    let e = err(&grid_cmd(&features, &labels, &model, &[]));
    assert!(e.contains("'nope' is not in the feature table"), "{e}");
    // A single class.
    let one: String = (0..10).map(|i| format!("s{i:03},good\n")).collect();
    let labels = write("one.csv", &format!("sample,quality\n{one}"));
    let e = err(&grid_cmd(&features, &labels, &model, &[]));
    assert!(e.contains("single class"), "{e}");
    // A class with fewer members than folds.
    let few: String = (0..12)
        .map(|i| format!("s{i:03},{}\n", if i < 3 { "rare" } else { "common" }))
        .collect();
    let labels = write("few.csv", &format!("sample,quality\n{few}"));
    let e = err(&grid_cmd(&features, &labels, &model, &[]));
    assert!(e.contains("fewer than the 5 folds"), "{e}");
    // A missing label column, an empty label, a duplicate sample.
    let labels = write("grade.csv", "sample,grade\ns000,a\n");
    let e = err(&grid_cmd(&features, &labels, &model, &[]));
    assert!(e.contains("no label column 'quality'"), "{e}");
    let labels = write("empty.csv", "sample,quality\ns000,\n");
    assert!(err(&grid_cmd(&features, &labels, &model, &[])).contains("empty label"));
    let labels = write("dup.csv", "sample,quality\ns000,a\ns000,a\n");
    assert!(err(&grid_cmd(&features, &labels, &model, &[])).contains("given twice"));
    // Non-finite features.
    let bad = write("nan.csv", "sample,f1,f2\ns000,1,nan\ns001,2,3\n");
    let e = err(&grid_cmd(&bad, &fixture("labels.csv"), &model, &[]));
    assert!(e.contains("not finite"), "{e}");
    // Output = input, and two outputs on one path.
    let e = err(&grid_cmd(
        &features,
        &fixture("labels.csv"),
        &fixture("labels.csv"),
        &[],
    ));
    assert!(e.contains("writing it would destroy the input"), "{e}");
    let same = dir.join("same.csv");
    let e = err(&grid_cmd(
        &features,
        &fixture("labels.csv"),
        &model,
        &[
            "--confusion",
            same.to_str().unwrap(),
            "--predictions",
            same.to_str().unwrap(),
        ],
    ));
    assert!(e.contains("give them different paths"), "{e}");
    // Bad gamma.
    let e = err(&bin()
        .args(["svm", "grid", "--features"])
        .arg(&features)
        .arg("--labels")
        .arg(fixture("labels.csv"))
        .args(["--label-column", "quality", "--gamma", "auto", "--output"])
        .arg(&model)
        .output()
        .unwrap());
    assert!(e.contains("gamma 'auto'"), "{e}");
    assert!(!model.exists(), "no model written on errors");
    // predict: not a model; a feature column missing.
    let e = err(&bin()
        .args(["svm", "predict", "--model"])
        .arg(fixture("labels.csv"))
        .arg("--features")
        .arg(&features)
        .arg("--output")
        .arg(dir.join("p.csv"))
        .output()
        .unwrap());
    assert!(e.contains("not an SVM model"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn edge_warning_contiguous_folds_and_missing_columns() {
    let dir = tempdir("edge");
    let model = dir.join("m.json");
    let oof = dir.join("oof.csv");
    // With two values of each, every choice is on the grid's edge.
    let o = bin()
        .args(["svm", "grid", "--features"])
        .arg(fixture("features.csv"))
        .arg("--labels")
        .arg(fixture("labels.csv"))
        .args([
            "--label-column",
            "quality",
            "--c",
            "1,10",
            "--gamma",
            "0.05,0.2",
        ])
        .args(["--folds", "4", "--contiguous", "--output"])
        .arg(&model)
        .arg("--predictions")
        .arg(&oof)
        .output()
        .unwrap();
    let out = ok(&o);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("is on the grid's edge"), "{stderr}");
    assert!(out.contains("KFold(4), contiguous"), "{out}");
    // Contiguous folds: samples 0..20 are fold 0, 20..40 fold 1, ….
    let text = std::fs::read_to_string(&oof).unwrap();
    let folds: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .skip(1)
        .map(|l| l.rsplit(',').next().unwrap())
        .collect();
    assert_eq!(folds.len(), 80);
    assert!(folds[..20].iter().all(|&f| f == "0") && folds[60..].iter().all(|&f| f == "3"));

    // A feature column of the model missing from the table to predict.
    let partial = dir.join("partial.csv");
    std::fs::write(&partial, "sample,f01,f02\nt000,1,2\n").unwrap();
    let e = err(&bin()
        .args(["svm", "predict", "--model"])
        .arg(&model)
        .arg("--features")
        .arg(&partial)
        .arg("--output")
        .arg(dir.join("p.csv"))
        .output()
        .unwrap());
    assert!(e.contains("no column 'f03'"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
