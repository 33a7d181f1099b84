//! t-SNE and Ward clustering against scikit-learn and SciPy (fixtures in
//! `tests/fixtures/tsne/`, made by `scripts/fixtures/tsne_ward.py`), and the
//! `cellmorph tsne` / `cellmorph cluster` commands: files, plots, errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cellmorph::stats::cluster::ward_linkage;
use cellmorph::stats::tsne::{
    gradient_descent, joint_probabilities, kl_divergence_gradient, pca_init, tsne, tsne_from,
    TsneInit, TsneOptions,
};
use cellmorph::table::Table;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tsne")
        .join(name);
    assert!(path.is_file(), "fixture {} is missing", path.display());
    path
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("golden.json")).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn data() -> Table {
    Table::read_csv(fixture("data.csv")).unwrap()
}

fn groups() -> Vec<String> {
    let text = std::fs::read_to_string(fixture("labels.csv")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().to_string())
        .collect()
}

/// Mean fraction of each point's 5 nearest neighbours (in the n × 2
/// embedding) that share its label, as the fixture script computes it.
fn knn5_agreement(y: &[f64], labels: &[String]) -> f64 {
    let n = labels.len();
    let mut total = 0.0;
    for i in 0..n {
        let mut d: Vec<(f64, usize)> = (0..n)
            .filter(|&j| j != i)
            .map(|j| {
                let (dx, dy) = (y[2 * i] - y[2 * j], y[2 * i + 1] - y[2 * j + 1]);
                (dx * dx + dy * dy, j)
            })
            .collect();
        d.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        total += d[..5]
            .iter()
            .filter(|(_, j)| labels[*j] == labels[i])
            .count() as f64
            / 5.0;
    }
    total / n as f64
}

fn worst_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

#[test]
fn joint_probabilities_match_scikit_learn() {
    let (t, g) = (data(), golden());
    let p = joint_probabilities(&t.data, t.n_rows(), t.n_cols(), 30.0).unwrap();
    let want = floats(&g["joint_p"]);
    assert_eq!(p.len(), want.len());
    // scikit-learn keeps the conditional probabilities in f32 and sums them
    // in f32 (NumPy's pairwise sum); the f32 values agree to a few ulps, the
    // normalizing sum to ~1e-7 relative: 1e-6 relative covers both.
    let worst = p
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs() / b)
        .fold(0.0, f64::max);
    eprintln!("joint P: largest relative difference {worst:.2e}");
    for (k, (a, b)) in p.iter().zip(&want).enumerate() {
        assert!((a - b).abs() <= 1e-6 * b + 1e-15, "p[{k}]: {a} vs {b}");
    }
}

#[test]
fn gradient_and_ten_steps_match_scikit_learn() {
    let g = golden();
    let p = floats(&g["joint_p"]);
    let y0 = floats(&g["init"]);
    let n = y0.len() / 2;
    let (kl, grad) = kl_divergence_gradient(&p, &y0, n, true);
    let want = floats(&g["grad0"]);
    // Same formula in f64; only the summation order differs (BLAS dot).
    let scale = max_abs(&want);
    eprintln!(
        "gradient: largest difference {:.2e} of the largest component",
        worst_diff(&grad, &want) / scale
    );
    for (k, (a, b)) in grad.iter().zip(&want).enumerate() {
        assert!((a - b).abs() <= 1e-9 * scale, "grad[{k}]: {a} vs {b}");
    }
    let kl0 = g["kl0"].as_f64().unwrap();
    assert!((kl - kl0).abs() <= 1e-10 * kl0, "KL {kl} vs {kl0}");

    // Ten iterations of the exaggerated phase (gains, momentum 0.5).
    let ex = g["early_exaggeration"].as_f64().unwrap();
    let lr = g["learning_rate"].as_f64().unwrap();
    let pe: Vec<f64> = p.iter().map(|v| v * ex).collect();
    let mut y = y0.clone();
    let (_, last) = gradient_descent(&pe, &mut y, n, 0, 10, 0.5, lr, 250);
    assert_eq!(last, 9);
    let want = floats(&g["after10"]);
    // Ten steps amplify the 1e-15 rounding differences a little; the step
    // sizes are ~1e-3 of the coordinates' scale, so 1e-9 relative to the
    // largest coordinate still checks every update exactly.
    let scale = max_abs(&want);
    eprintln!(
        "after 10 steps: largest difference {:.2e} of the largest coordinate",
        worst_diff(&y, &want) / scale
    );
    for (k, (a, b)) in y.iter().zip(&want).enumerate() {
        assert!((a - b).abs() <= 1e-9 * scale, "y10[{k}]: {a} vs {b}");
    }
}

#[test]
fn full_run_reaches_scikit_learns_kl_and_separation() {
    let (t, g) = (data(), golden());
    let n = t.n_rows();
    let p = joint_probabilities(&t.data, n, t.n_cols(), 30.0).unwrap();
    let r = tsne_from(&p, n, floats(&g["init"]), &TsneOptions::default()).unwrap();
    let want = g["kl_divergence"].as_f64().unwrap();
    eprintln!(
        "KL {} (scikit-learn {want}), {} iterations (scikit-learn n_iter_ {})",
        r.kl_divergence, r.iterations, g["n_iter"]
    );
    // 1000 chaotic iterations amplify rounding differences, so the final
    // layouts differ; the objective they reach agrees within 5 %.
    assert!(
        (r.kl_divergence - want).abs() <= 0.05 * want,
        "KL {} vs {want}",
        r.kl_divergence
    );
    let agree = knn5_agreement(&r.embedding, &groups());
    let sk = g["knn5_agreement"].as_f64().unwrap();
    assert!(agree >= sk - 0.02, "kNN agreement {agree} vs {sk}");
}

#[test]
fn pca_init_matches_scikit_learn() {
    let (t, g) = (data(), golden());
    let y = pca_init(&t.data, t.n_rows(), t.n_cols()).unwrap();
    let want = floats(&g["pca_init"]);
    // Power iteration converged to 1e-13 against LAPACK's eigenvectors.
    let scale = max_abs(&want);
    eprintln!(
        "PCA init: largest difference {:.2e} of the largest coordinate",
        worst_diff(&y, &want) / scale
    );
    for (k, (a, b)) in y.iter().zip(&want).enumerate() {
        assert!((a - b).abs() <= 1e-9 * scale, "pca[{k}]: {a} vs {b}");
    }
}

#[test]
fn same_seed_same_bits_other_seed_other_layout() {
    let t = data();
    let opts = |seed| TsneOptions {
        init: TsneInit::Random,
        seed,
        max_iter: 300,
        ..TsneOptions::default()
    };
    let (n, d) = (t.n_rows(), t.n_cols());
    let a = tsne(&t.data, n, d, &opts(1)).unwrap();
    let b = tsne(&t.data, n, d, &opts(1)).unwrap();
    let c = tsne(&t.data, n, d, &opts(2)).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.embedding, c.embedding);
    let too_short = TsneOptions {
        max_iter: 100,
        ..TsneOptions::default()
    };
    assert!(tsne(&t.data, n, d, &too_short).is_err());
}

fn check_ward(x: &[f64], n: usize, d: usize, g: &Value) {
    let z = ward_linkage(x, n, d).unwrap();
    let want = g["linkage"].as_array().unwrap();
    assert_eq!(z.merges.len(), want.len());
    let worst = z
        .merges
        .iter()
        .zip(want)
        .map(|(m, w)| (m.height - floats(w)[2]).abs() / floats(w)[2].max(f64::MIN_POSITIVE))
        .fold(0.0, f64::max);
    eprintln!("Ward heights: largest relative difference {worst:.2e}");
    for (i, (m, w)) in z.merges.iter().zip(want).enumerate() {
        let w = floats(w);
        assert_eq!(
            (m.a as f64, m.b as f64, m.size as f64),
            (w[0], w[1], w[3]),
            "merge {i}"
        );
        // Same Lance–Williams arithmetic; pdist may sum in another order.
        assert!(
            (m.height - w[2]).abs() <= 1e-9 * w[2].abs(),
            "height {i}: {} vs {}",
            m.height,
            w[2]
        );
    }
    let leaves: Vec<usize> = g["leaves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(z.leaves(), leaves);
    for (k, labels) in g["fcluster"].as_object().unwrap() {
        let k: usize = k.parse().unwrap();
        let want: Vec<usize> = labels
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(z.fcluster_maxclust(k).unwrap(), want, "k = {k}");
    }
}

#[test]
fn ward_matches_scipy_on_samples_and_columns() {
    let (t, g) = (data(), golden());
    let (n, d) = (t.n_rows(), t.n_cols());
    check_ward(&t.data, n, d, &g["ward_rows"]);
    let xt: Vec<f64> = (0..d)
        .flat_map(|c| (0..n).map(move |r| (r, c)))
        .map(|(r, c)| t.data[r * d + c])
        .collect();
    check_ward(&xt, d, n, &g["ward_columns"]);
    // Integer grid points: duplicates and equal distances everywhere, so
    // every merge order depends on SciPy's tie-breaking.
    let ties = floats(&g["ties_data"]);
    check_ward(&ties, ties.len() / 2, 2, &g["ward_ties"]);
}

// ---- the commands ----

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cellmorph"))
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cellmorph-tsne-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str], paths: &[(&str, &Path)]) -> Output {
    let mut c = bin();
    c.args(args);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    c.output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
}

fn png_size(path: &Path) -> (u32, u32) {
    let img = image::open(path).unwrap();
    (img.width(), img.height())
}

#[test]
fn tsne_command_writes_coordinates_and_plots() {
    let dir = tempdir("cmd");
    let (out, plot) = (dir.join("xy.csv"), dir.join("xy.png"));
    let (features, labels) = (fixture("data.csv"), fixture("labels.csv"));
    let stdout = ok(&run(
        &["tsne", "--iterations", "300", "--color-by", "group"],
        &[
            ("--features", &features),
            ("--labels", &labels),
            ("--output", &out),
            ("--plot", &plot),
        ],
    ));
    assert!(stdout.contains("KL divergence"), "{stdout}");
    let xy = Table::read_csv(&out).unwrap();
    assert_eq!(xy.col_names, ["x", "y"]);
    assert_eq!(xy.row_names, data().row_names);
    assert_eq!(png_size(&plot), (640, 520));
    // A numeric column gets a colour bar; --categorical forces a legend.
    for extra in [&[][..], &["--categorical"][..]] {
        let mut args = vec!["tsne", "--iterations", "250", "--color-by", "score"];
        args.extend_from_slice(extra);
        ok(&run(
            &args,
            &[
                ("--features", &features),
                ("--labels", &labels),
                ("--output", &out),
                ("--plot", &plot),
            ],
        ));
    }
    // Colouring by a column of the feature table itself.
    ok(&run(
        &[
            "tsne",
            "--iterations",
            "250",
            "--color-by",
            "f00",
            "--init",
            "random",
        ],
        &[
            ("--features", &features),
            ("--output", &out),
            ("--plot", &plot),
        ],
    ));

    fails_with(
        &run(
            &["tsne", "--color-by", "batch"],
            &[
                ("--features", &features),
                ("--labels", &labels),
                ("--output", &out),
                ("--plot", &plot),
            ],
        ),
        "no column \"batch\"",
    );
    fails_with(
        &run(
            &["tsne"],
            &[("--features", &features), ("--output", &features)],
        ),
        "would destroy the input",
    );
    fails_with(
        &run(
            &["tsne", "--perplexity", "200"],
            &[("--features", &features), ("--output", &out)],
        ),
        "perplexity (200) must be less than the number of samples (150)",
    );
    let small = dir.join("small.csv");
    std::fs::write(&small, "sample,a,b\ns1,1,2\ns2,3,nan\ns3,0,1\n").unwrap();
    fails_with(
        &run(&["tsne"], &[("--features", &small), ("--output", &out)]),
        "line 3",
    );
    std::fs::write(&small, "sample,a,b\ns1,1,2\ns2,3,4\ns3,0,1\n").unwrap();
    fails_with(
        &run(&["tsne"], &[("--features", &small), ("--output", &out)]),
        "must be less than the number of samples (3)",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cluster_command_writes_assignments_linkage_and_plot() {
    let dir = tempdir("cluster");
    let (out, link, plot) = (dir.join("c.csv"), dir.join("z.csv"), dir.join("c.png"));
    let features = fixture("data.csv");
    let stdout = ok(&run(
        &["cluster", "--k", "3"],
        &[
            ("--features", &features),
            ("--output", &out),
            ("--linkage", &link),
            ("--plot", &plot),
        ],
    ));
    assert!(stdout.contains("cluster  size"), "{stdout}");
    let g = golden();
    let labels = Table::read_csv(&out).unwrap();
    let want: Vec<f64> = floats(&g["ward_rows"]["fcluster"]["3"]);
    assert_eq!(labels.data, want);
    let z = Table::read_csv(&link).unwrap();
    assert_eq!(z.n_rows(), 149);
    let (w, h) = png_size(&plot);
    assert!(w > 300 && h >= 150 * 4, "{w}×{h}");

    ok(&run(
        &["cluster", "--k", "4", "--genes"],
        &[
            ("--features", &features),
            ("--output", &out),
            ("--plot", &plot),
        ],
    ));
    let labels = Table::read_csv(&out).unwrap();
    assert_eq!(labels.row_names, data().col_names);
    assert_eq!(labels.data, floats(&g["ward_columns"]["fcluster"]["4"]));

    fails_with(
        &run(
            &["cluster", "--k", "21", "--columns"],
            &[("--features", &features), ("--output", &out)],
        ),
        "between 1 and the number of features (20)",
    );
    fails_with(
        &run(
            &["cluster", "--k", "2"],
            &[
                ("--features", &features),
                ("--output", &out),
                ("--linkage", &out),
            ],
        ),
        "is also --output",
    );
    fails_with(
        &run(
            &["cluster", "--k", "2"],
            &[("--features", &features), ("--output", &features)],
        ),
        "would destroy the input",
    );
    let _ = std::fs::remove_dir_all(&dir);
}
