//! Cross-validated predictions (`cellmorph svr cv`) against scikit-learn's
//! `cross_val_predict` (fixtures `svr_cv.json`, `cv_groups.csv`, made by
//! `scripts/fixtures/svr_cv.py` from `grid_features.csv` ×
//! `grid_expression.csv`), and the command's folds, files and errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cellmorph::apps::expression::cv::{read_groups, score_genes, GroupFile};
use cellmorph::svr::cv::{
    check_folds, cross_validate_on, group_kfold_folds, kfold_folds, leave_one_group_out_folds,
    shuffled_kfold_folds, CvGene, CvOutcome, Folds,
};
use cellmorph::svr::GridSpec;
use cellmorph::table::Table;
use cellmorph::Backend;
use serde_json::Value;

/// Prediction budget in units of 1 + |y|: the SMO stops at tol 1e-3 (as
/// scikit-learn's default), and the two solutions differ by path and
/// rounding within that tolerance — the budget tests/svr_grid.rs uses for
/// refit predictions.
const PRED_TOL: f64 = 1e-3;
/// Inner-search scores (R² units) closer than this to scikit-learn's best
/// are a near tie that a tol-1e-3 solver may resolve either way.
const SCORE_TOL: f64 = 1e-3;

fn fixture(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/svr")
        .join(name);
    assert!(path.is_file(), "fixture {} is missing", path.display());
    path
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn folds_of(v: &Value) -> Folds {
    v.as_array()
        .unwrap()
        .iter()
        .map(|f| {
            f.as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as usize)
                .collect()
        })
        .collect()
}

struct Data {
    features: Table,
    expression: Table,
    json: Value,
}

fn data() -> Data {
    let json = std::fs::read(fixture("svr_cv.json")).unwrap();
    Data {
        features: Table::read_csv(fixture("grid_features.csv")).unwrap(),
        expression: Table::read_csv(fixture("grid_expression.csv")).unwrap(),
        json: serde_json::from_slice(&json).unwrap(),
    }
}

fn case<'a>(d: &'a Data, name: &str) -> &'a Value {
    d.json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("case {name} missing"))
}

fn groups(d: &Data) -> Vec<String> {
    read_groups(
        &GroupFile {
            path: fixture("cv_groups.csv"),
            column: "batch".into(),
        },
        &d.expression.row_names,
    )
    .unwrap()
}

/// Runs one plain case on the given folds and compares every prediction.
fn check_plain(name: &str, folds: Folds) {
    let d = data();
    let c = case(&d, name);
    assert_eq!(folds, folds_of(&c["folds"]), "{name}: folds differ");
    let spec = GridSpec::new(floats(&c["C"]), floats(&c["epsilon"])).unwrap();
    let out = cross_validate_on(
        &Backend::cpu(),
        &d.features,
        &d.expression,
        &folds,
        &spec,
        &mut || {},
    )
    .unwrap();
    assert!(!out.nested);
    assert_eq!(out.genes.len(), 6);
    assert_eq!(out.unconverged, 0);
    let mut worst = 0.0_f64;
    for g in &out.genes {
        let want = floats(&c["predictions"][&g.gene]);
        for (p, q) in g.predicted.iter().zip(&want) {
            worst = worst.max((p - q).abs() / (1.0 + q.abs()));
        }
        assert_eq!(g.chosen, vec![(1.0, 0.1); folds.len()]);
    }
    println!("{name}: max prediction deviation {worst:.2e} (1 + |y| units)");
    assert!(worst <= PRED_TOL, "{name}: predictions off by {worst}");
}

#[test]
fn kfold_matches_cross_val_predict() {
    check_plain("kfold", kfold_folds(29, 5).unwrap());
}

#[test]
fn group_kfold_matches_sklearn() {
    let d = data();
    check_plain("group_kfold", group_kfold_folds(&groups(&d), 3).unwrap());
}

#[test]
fn leave_one_group_out_matches_sklearn() {
    let d = data();
    check_plain("logo", leave_one_group_out_folds(&groups(&d)).unwrap());
}

#[test]
fn nested_matches_grid_search_in_cross_val_predict() {
    let d = data();
    let c = case(&d, "nested");
    let mut spec = GridSpec::new(floats(&c["C"]), floats(&c["epsilon"])).unwrap();
    spec.folds = 3;
    let folds = kfold_folds(29, 5).unwrap();
    assert_eq!(folds, folds_of(&c["folds"]));
    let mut ticks = 0;
    let out = cross_validate_on(
        &Backend::cpu(),
        &d.features,
        &d.expression,
        &folds,
        &spec,
        &mut || ticks += 1,
    )
    .unwrap();
    assert!(out.nested);
    assert_eq!(ticks, 5);
    assert_eq!(out.genes.len(), 6);
    let (mut same, mut contested, mut worst) = (0, 0, 0.0_f64);
    for g in &out.genes {
        let want = floats(&c["predictions"][&g.gene]);
        for (f, fold) in folds.iter().enumerate() {
            let sk = floats(&c["chosen"][&g.gene][f]);
            if g.chosen[f] == (sk[0], sk[1]) {
                same += 1;
                for &i in fold {
                    worst = worst.max((g.predicted[i] - want[i]).abs() / (1.0 + want[i].abs()));
                }
            } else {
                // A different choice is only acceptable in a near tie:
                // scikit-learn scores ours within the budget of its best.
                let scores = floats(&c["inner_scores"][&g.gene][f]);
                let ci = spec.c.iter().position(|&v| v == g.chosen[f].0).unwrap();
                let ei = spec
                    .epsilon
                    .iter()
                    .position(|&v| v == g.chosen[f].1)
                    .unwrap();
                let best = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let ours = scores[ci * spec.epsilon.len() + ei];
                assert!(
                    best - ours <= SCORE_TOL,
                    "{} fold {f}: chose {:?}, scikit-learn {sk:?} scores it {} below its best",
                    g.gene,
                    g.chosen[f],
                    best - ours
                );
                contested += 1;
            }
        }
    }
    println!(
        "nested: {same} of 30 (gene, fold) choices as scikit-learn, {contested} near ties; \
         max prediction deviation {worst:.2e}"
    );
    assert!(same >= 27, "only {same} of 30 choices agree");
    assert!(worst <= PRED_TOL, "nested predictions off by {worst}");
}

/// The per-gene scores of scikit-learn's own out-of-fold predictions must
/// be SciPy's pearsonr, r2_score and BH q; 1e-9 relative: the same formulas
/// in float64, different summation order, and p through an incomplete beta.
#[test]
fn scores_match_scipy() {
    let d = data();
    for name in ["kfold", "nested"] {
        let c = case(&d, name);
        let genes: Vec<CvGene> = (0..d.expression.n_cols())
            .map(|j| {
                let gene = d.expression.col_names[j].clone();
                CvGene {
                    predicted: floats(&c["predictions"][&gene]),
                    measured: d.expression.column(j),
                    chosen: vec![(1.0, 0.1), (1.0, 0.2), (2.0, 0.2)],
                    gene,
                }
            })
            .collect();
        let outcome = CvOutcome {
            samples: d.expression.row_names.clone(),
            genes,
            skipped: vec![],
            nested: false,
            folds: vec![],
            unconverged: 0,
        };
        let scores = score_genes(&outcome).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-300);
        for s in &scores {
            let w = &c["scores"][&s.gene];
            for (what, ours) in [
                ("pearson_r", s.pearson_r),
                ("R2", s.r2),
                ("r2_score", s.r2_score),
                ("p", s.p),
                ("q", s.q),
            ] {
                let want = w[what].as_f64().unwrap();
                assert!(
                    close(ours, want),
                    "{name} {} {what}: {ours} vs {want}",
                    s.gene
                );
            }
            // Most frequent choices, the smallest on a tie.
            assert_eq!(
                (s.c, s.c_folds, s.epsilon, s.epsilon_folds),
                (1.0, 2, 0.2, 2)
            );
            assert_eq!(s.n, 29);
        }
    }
}

#[test]
fn fold_properties() {
    for (n, k) in [(29, 5), (10, 3), (7, 7)] {
        let plain = kfold_folds(n, k).unwrap();
        check_folds(&plain, n).unwrap();
        for seed in [0, 1, 42] {
            let s = shuffled_kfold_folds(n, k, seed).unwrap();
            check_folds(&s, n).unwrap();
            // Same sizes as KFold, in the same order.
            let sizes = |f: &Folds| f.iter().map(Vec::len).collect::<Vec<_>>();
            assert_eq!(sizes(&s), sizes(&plain));
            assert_eq!(s, shuffled_kfold_folds(n, k, seed).unwrap());
        }
        assert_ne!(
            shuffled_kfold_folds(n, k, 1).unwrap(),
            shuffled_kfold_folds(n, k, 2).unwrap()
        );
    }
    let d = data();
    let g = groups(&d);
    for folds in [
        group_kfold_folds(&g, 3).unwrap(),
        group_kfold_folds(&g, 2).unwrap(),
        leave_one_group_out_folds(&g).unwrap(),
    ] {
        check_folds(&folds, g.len()).unwrap();
        for (f, fold) in folds.iter().enumerate() {
            for other in &folds[f + 1..] {
                assert!(
                    fold.iter().all(|&i| other.iter().all(|&j| g[i] != g[j])),
                    "a group is in two folds"
                );
            }
        }
    }
    assert!(group_kfold_folds(&g, 6).is_err());
}

// ---- the command ----

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cellmorph"))
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cellmorph-svr-cv-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cv(extra: &[&str], output: &Path) -> Output {
    bin()
        .args(["svr", "cv", "--features"])
        .arg(fixture("grid_features.csv"))
        .arg("--expression")
        .arg(fixture("grid_expression.csv"))
        .args(["--c", "1", "--epsilon", "0.1"])
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
fn cli_writes_predictions_and_summary() {
    let dir = tempdir("files");
    let (out, summary) = (dir.join("oof.csv"), dir.join("scores.csv"));
    let stdout = ok(&cv(
        &["--folds", "5", "--summary", summary.to_str().unwrap()],
        &out,
    ));
    assert!(
        stdout.contains("cross-validated (5 folds, contiguous)"),
        "{stdout}"
    );
    let d = data();
    let oof = Table::read_csv(&out).unwrap();
    assert_eq!(oof.row_names, d.expression.row_names);
    assert_eq!(oof.col_names, d.expression.col_names);
    let want = case(&d, "kfold");
    for (j, gene) in oof.col_names.iter().enumerate() {
        for (p, q) in oof.column(j).iter().zip(floats(&want["predictions"][gene])) {
            assert!((p - q).abs() <= PRED_TOL * (1.0 + q.abs()));
        }
    }
    let text = std::fs::read_to_string(&summary).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "gene,n,pearson_r,R2,r2_score,p,q,C,C_folds,epsilon,epsilon_folds"
    );
    let gene2: Vec<&str> = lines
        .find(|l| l.starts_with("GENE2,"))
        .unwrap()
        .split(',')
        .collect();
    let sk = want["scores"]["GENE2"]["R2"].as_f64().unwrap();
    let r2: f64 = gene2[3].parse().unwrap();
    // R² of predictions within PRED_TOL of scikit-learn's: a few 1e-3 at most.
    assert!((r2 - sk).abs() <= 1e-2, "R2 {r2} vs {sk}");
    assert_eq!(&gene2[7..], ["1", "5", "0.1", "5"]);
}

#[test]
fn cli_shuffle_is_seeded() {
    let dir = tempdir("shuffle");
    let run = |seed: &str, name: &str| {
        let out = dir.join(name);
        let stdout = ok(&cv(&["--folds", "4", "--shuffle", "--seed", seed], &out));
        assert!(stdout.contains("4 folds, shuffled, seed"), "{stdout}");
        std::fs::read(out).unwrap()
    };
    let a = run("3", "a.csv");
    assert_eq!(a, run("3", "b.csv"), "same seed, different bytes");
    assert_ne!(a, run("4", "c.csv"), "different seeds, same predictions");
    let plain = dir.join("plain.csv");
    ok(&cv(&["--folds", "4"], &plain));
    assert_ne!(a, std::fs::read(plain).unwrap());
}

#[test]
fn cli_grouped_folds() {
    let dir = tempdir("groups");
    let groups = fixture("cv_groups.csv");
    let out = dir.join("logo.csv");
    let g = groups.to_str().unwrap();
    let stdout = ok(&cv(
        &[
            "--groups",
            g,
            "--group-column",
            "batch",
            "--leave-one-group-out",
        ],
        &out,
    ));
    assert!(stdout.contains("5 folds, leave one batch out"), "{stdout}");
    let d = data();
    let want = case(&d, "logo");
    let oof = Table::read_csv(&out).unwrap();
    for (j, gene) in oof.col_names.iter().enumerate() {
        for (p, q) in oof.column(j).iter().zip(floats(&want["predictions"][gene])) {
            assert!((p - q).abs() <= PRED_TOL * (1.0 + q.abs()));
        }
    }
    let stdout = ok(&cv(
        &["--groups", g, "--group-column", "batch", "--folds", "3"],
        &dir.join("gkf.csv"),
    ));
    assert!(stdout.contains("3 folds, grouped by batch"), "{stdout}");

    // A sample without a group: the error names it and the file.
    let partial = dir.join("partial.csv");
    let text = std::fs::read_to_string(&groups).unwrap();
    let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("S07,")).collect();
    std::fs::write(&partial, kept.join("\n")).unwrap();
    let e = err(&cv(
        &[
            "--groups",
            partial.to_str().unwrap(),
            "--group-column",
            "batch",
        ],
        &dir.join("x.csv"),
    ));
    assert!(e.contains("S07") && e.contains("partial.csv"), "{e}");
    // A missing group column.
    let e = err(&cv(
        &["--groups", g, "--group-column", "plate"],
        &dir.join("x.csv"),
    ));
    assert!(e.contains("plate") && e.contains("cv_groups.csv"), "{e}");
    // More folds than groups.
    let e = err(&cv(
        &["--groups", g, "--group-column", "batch", "--folds", "6"],
        &dir.join("x.csv"),
    ));
    assert!(e.contains("6 folds need at least 6 groups"), "{e}");
    // Grouped folds are not shuffled.
    err(&cv(
        &["--groups", g, "--group-column", "batch", "--shuffle"],
        &dir.join("x.csv"),
    ));
    assert!(!dir.join("x.csv").exists());
}

#[test]
fn cli_refuses_to_overwrite_inputs() {
    let dir = tempdir("inputs");
    let copy = dir.join("expression.csv");
    std::fs::copy(fixture("grid_expression.csv"), &copy).unwrap();
    let before = std::fs::read(&copy).unwrap();
    let o = bin()
        .args(["svr", "cv", "--features"])
        .arg(fixture("grid_features.csv"))
        .arg("--expression")
        .arg(&copy)
        .args(["--c", "1", "--epsilon", "0.1", "--output"])
        .arg(&copy)
        .output()
        .unwrap();
    let e = err(&o);
    assert!(e.contains("--expression"), "{e}");
    assert_eq!(std::fs::read(&copy).unwrap(), before);
    let out = dir.join("oof.csv");
    let e = err(&cv(&["--summary", out.to_str().unwrap()], &out));
    assert!(e.contains("--summary") && e.contains("--output"), "{e}");
}

// ---- expression evaluate: in-sample or held-out, and the model's warnings ----

#[test]
fn evaluate_labels_in_sample_and_held_out_data() {
    let dir = tempdir("evaluate");
    let model = dir.join("model.json");
    // The low-C grid: scikit-learn picks C = 0.01, its upper edge, for most
    // genes (grid_results.json), so the model must carry the edge warning.
    let o = bin()
        .args(["svr", "grid", "--features"])
        .arg(fixture("grid_features.csv"))
        .arg("--expression")
        .arg(fixture("grid_expression.csv"))
        .args([
            "--c",
            "1e-5,3e-5,1e-4,3e-4,1e-3,1e-2",
            "--epsilon",
            "0,0.05,0.2",
            "--output",
        ])
        .arg(&model)
        .output()
        .unwrap();
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("the chosen C sits on the edge"));
    let json: Value = serde_json::from_slice(&std::fs::read(&model).unwrap()).unwrap();
    assert_eq!(json["training"]["samples"].as_object().unwrap().len(), 29);
    let warnings = json["training"]["warnings"].as_array().unwrap();
    assert!(
        warnings.iter().any(|w| w
            .as_str()
            .unwrap()
            .contains("the chosen C sits on the edge")),
        "{warnings:?}"
    );

    // The training samples with one feature value changed are new data.
    let shifted = dir.join("shifted.csv");
    let mut t = Table::read_csv(fixture("grid_features.csv")).unwrap();
    for v in t.data.iter_mut() {
        *v += 0.5;
    }
    t.write_csv(&shifted).unwrap();
    let out = dir.join("eval.csv");
    let ds = |name: &str, f: &Path, e: &Path| format!("{name}={},{}", f.display(), e.display());
    let o = bin()
        .args(["expression", "evaluate", "--model"])
        .arg(&model)
        .arg("--dataset")
        .arg(ds(
            "train",
            &fixture("grid_features.csv"),
            &fixture("grid_expression.csv"),
        ))
        .arg("--dataset")
        .arg(ds(
            "test",
            &fixture("grid_test_features.csv"),
            &fixture("grid_test_expression.csv"),
        ))
        .arg("--dataset")
        .arg(ds("shifted", &shifted, &fixture("grid_expression.csv")))
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = ok(&o);
    assert!(stdout.contains("data set train (in-sample)"), "{stdout}");
    assert!(stdout.contains("data set test (held-out)"), "{stdout}");
    assert!(stdout.contains("data set shifted (held-out)"), "{stdout}");
    assert!(
        stdout.contains("warning (from the model): the chosen C"),
        "{stdout}"
    );
    let csv = std::fs::read_to_string(&out).unwrap();
    let mut lines = csv.lines();
    assert!(
        lines.next().unwrap().starts_with("# warning: the chosen C"),
        "{csv}"
    );
    let header = lines.find(|l| !l.starts_with('#')).unwrap();
    assert!(header.starts_with("dataset,evaluated,gene,"), "{header}");
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 18);
    assert!(rows[..6].iter().all(|r| r.starts_with("train,in-sample,")));
    assert!(rows[6..].iter().all(|r| r.contains(",held-out,")));
    // The table's name column fits the names: every row's n column starts
    // where the header's does.
    let table: Vec<&str> = stdout.lines().collect();
    let h = table
        .iter()
        .position(|l| l.trim_start().starts_with("gene"))
        .unwrap();
    let n_at = table[h].find(" n ").unwrap() + 1;
    for row in &table[h + 1..h + 4] {
        let b = row.as_bytes();
        assert!(
            b[n_at - 1].is_ascii_digit() && b[n_at] == b'9' && b[n_at + 1] == b' ',
            "{row:?} under {:?}",
            table[h]
        );
    }
}

/// The kernel solver on the emulated device gives the CPU's bytes (the
/// device SMO is the CPU algorithm step for step), plain and nested.
#[test]
fn cli_emulated_device_matches_cpu() {
    let dir = tempdir("device");
    for (c, e) in [("1", "0.1"), ("1e-4,1e-2", "0,0.5")] {
        let run = |device: &str| {
            let out = dir.join(format!("{device}.csv"));
            let o = bin()
                .args(["svr", "cv", "--features"])
                .arg(fixture("grid_features.csv"))
                .arg("--expression")
                .arg(fixture("grid_expression.csv"))
                .args(["--c", c, "--epsilon", e, "--device", device, "--output"])
                .arg(&out)
                .output()
                .unwrap();
            ok(&o);
            std::fs::read(out).unwrap()
        };
        assert_eq!(run("cpu"), run("emulated"), "C {c}, epsilon {e}");
    }
}
