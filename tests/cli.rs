//! The `cellmorph` binary end to end: `infer` against the goldens, and clear
//! errors (non-zero exit, a message naming the problem) on bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use cellmorph::io::{TensorFile, TensorWriter};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cellmorph"))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tempdir(tag: &str) -> common::TempDir {
    common::TempDir::new("cli", tag)
}

/// Writes the fixture's `input` tensor alone, as a user would.
fn input_file(cases: &Path, dir: &Path) -> PathBuf {
    let c = TensorFile::open(cases).unwrap();
    let (shape, data) = c.f32("input").unwrap();
    let mut w = TensorWriter::new();
    w.add_slice("input", &shape, &data).unwrap();
    let p = dir.join("input.safetensors");
    w.write(&p).unwrap();
    p
}

fn infer_vqvae2(device: &str, tag: &str) {
    let dir = tempdir(tag);
    let cases = fixtures().join("vqvae2_small.cases.safetensors");
    let input = input_file(&cases, &dir);
    let out = dir.join("out.safetensors");
    let st = bin()
        .args(["infer", "--model", "vqvae2", "--weights"])
        .arg(fixtures().join("vqvae2_small.weights.safetensors"))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&out)
        .args(["--device", device, "--batch-size", "2"])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let got = TensorFile::open(&out).unwrap();
    let want = TensorFile::open(&cases).unwrap();
    // Codes: identical except at near-ties (gap < 1e-4), as fixtures/README.md says.
    for (ids, gap) in [
        ("id_t", "gap_t"),
        ("id_b", "gap_b"),
        ("hist_t", ""),
        ("hist_b", ""),
    ] {
        let (gs, g) = got.i64(ids).unwrap();
        let (ws, w) = want.i64(ids).unwrap();
        assert_eq!(gs, ws, "{ids} shape");
        let gaps = if gap.is_empty() {
            vec![1.0; w.len()]
        } else {
            want.f32(gap).unwrap().1
        };
        for i in 0..w.len() {
            assert!(
                g[i] == w[i] || gaps[i] < 1e-4,
                "{ids}[{i}]: {} vs {}",
                g[i],
                w[i]
            );
        }
    }
    for name in ["quant_t", "quant_b", "dec", "diff"] {
        assert_close(&got, name, &want, name, "vqvae2");
    }
}

/// Output `ours` of `got` equals `theirs` of `want` in shape and within 1e-3
/// relative (max |Δ| / max |ref|), the whole-network tolerance of
/// fixtures/README.md.
fn assert_close(got: &TensorFile, ours: &str, want: &TensorFile, theirs: &str, what: &str) {
    assert_close_tol(got, ours, want, theirs, what, 1e-3);
}

/// [`assert_close`] within `tol` relative.
fn assert_close_tol(
    got: &TensorFile,
    ours: &str,
    want: &TensorFile,
    theirs: &str,
    what: &str,
    tol: f32,
) {
    let (gs, g) = got.f32(ours).unwrap();
    let (ws, w) = want.f32(theirs).unwrap();
    assert_eq!(gs, ws, "{what} {ours} shape");
    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = g
        .iter()
        .zip(&w)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= tol * scale,
        "{what} {ours}: max |Δ| {err} vs max |ref| {scale}"
    );
}

#[test]
fn infer_vqvae2_cpu_matches_golden() {
    infer_vqvae2("cpu", "cpu");
}

#[test]
fn infer_vqvae2_emulated_matches_golden() {
    infer_vqvae2("emulated", "emu");
}

fn fails_with(args: &[&str], needle: &str) {
    let st = bin().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(!st.status.success(), "{args:?} should fail");
    assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
}

#[test]
fn bad_input_gives_clear_errors() {
    let dir = tempdir("bad");
    let w = fixtures().join("vqvae2_small.weights.safetensors");
    let w = w.to_str().unwrap();
    let missing = dir.join("missing.safetensors");
    let missing = missing.to_str().unwrap();
    let out = dir.join("o.safetensors");
    let out = out.to_str().unwrap();
    fails_with(
        &[
            "infer",
            "--model",
            "nope",
            "--weights",
            w,
            "--input",
            w,
            "--output",
            out,
        ],
        "supported: vqvae2",
    );
    fails_with(
        &[
            "infer",
            "--model",
            "vqvae2",
            "--weights",
            missing,
            "--input",
            w,
            "--output",
            out,
        ],
        "missing.safetensors",
    );
    // The weights file has no tensor named `input`.
    fails_with(
        &[
            "infer",
            "--model",
            "vqvae2",
            "--weights",
            w,
            "--input",
            w,
            "--output",
            out,
        ],
        "missing tensor \"input\"",
    );
    let truncated = dir.join("trunc.safetensors");
    let bytes = std::fs::read(fixtures().join("vqvae2_small.weights.safetensors")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(
        &[
            "infer",
            "--model",
            "vqvae2",
            "--weights",
            truncated.to_str().unwrap(),
            "--input",
            w,
            "--output",
            out,
        ],
        "trunc.safetensors",
    );
    fails_with(
        &[
            "infer",
            "--model",
            "vqvae2",
            "--weights",
            w,
            "--input",
            w,
            "--output",
            out,
            "--device",
            "tpu",
        ],
        "unknown device",
    );
    assert!(
        !Path::new(out).exists(),
        "no output may be written on failure"
    );
}

#[test]
fn cuda_request_without_gpu_is_a_clear_error() {
    if cellmorph::backend::cuda_device_count() > 0 {
        println!("a CUDA device is present: nothing to check here");
        return;
    }
    let dir = tempdir("nocuda");
    let cases = fixtures().join("vqvae2_small.cases.safetensors");
    let input = input_file(&cases, &dir);
    let st = bin()
        .args([
            "infer",
            "--model",
            "vqvae2",
            "--device",
            "cuda",
            "--weights",
        ])
        .arg(fixtures().join("vqvae2_small.weights.safetensors"))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(dir.join("o.safetensors"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(!st.status.success());
    assert!(
        err.contains("no CUDA device") || err.contains("CUDA kernels were not compiled"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn svr_grid_then_predict() {
    let dir = tempdir("svr");
    let f = fixtures().join("svr");
    let model = dir.join("model.json");
    let st = bin()
        .args([
            "svr",
            "grid",
            "--c",
            "1,10",
            "--epsilon",
            "0:0.2:0.1",
            "--features",
        ])
        .arg(f.join("grid_features.csv"))
        .arg("--expression")
        .arg(f.join("grid_expression.csv"))
        .arg("--output")
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    // With C in {1, 10} every chosen C is an edge of the grid: a warning.
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(
        err.contains(
            "warning: the chosen C sits on the edge of the grid (1 … 10) for 6 of 6 genes"
        ),
        "{err}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&model).unwrap()).unwrap();
    assert_eq!(json["features"].as_array().unwrap().len(), 128);
    let genes = json["genes"].as_object().unwrap();
    assert_eq!(genes.len(), 6);
    for (name, g) in genes {
        assert!([1.0, 10.0].contains(&g["C"].as_f64().unwrap()), "{name}");
        assert!(
            [0.0, 0.1, 0.2].contains(&g["epsilon"].as_f64().unwrap()),
            "{name}"
        );
        assert_eq!(g["w"].as_array().unwrap().len(), 128, "{name}");
        assert!(g["cv_score"].as_f64().unwrap().is_finite(), "{name}");
    }
    let pred = dir.join("pred.csv");
    let st = bin()
        .args(["svr", "predict", "--model"])
        .arg(&model)
        .arg("--features")
        .arg(f.join("grid_test_features.csv"))
        .arg("--output")
        .arg(&pred)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let table = cellmorph::table::Table::read_csv(&pred).unwrap();
    assert_eq!(table.n_rows(), 10);
    assert_eq!(table.col_names.len(), 6);
    // A feature table of the wrong width is refused with a clear message.
    fails_with(
        &[
            "svr",
            "predict",
            "--model",
            model.to_str().unwrap(),
            "--features",
            f.join("grid_expression.csv").to_str().unwrap(),
            "--output",
            dir.join("x.csv").to_str().unwrap(),
        ],
        "expects 128 features",
    );
    let feats = f.join("grid_features.csv");
    let expr = f.join("grid_expression.csv");
    let out = dir.join("bad.json");
    for (flag, list, needle) in [
        ("--c", "5:1:1", "stop < start"),
        ("--epsilon", "0:1:0", "step must be > 0"),
    ] {
        fails_with(
            &[
                "svr",
                "grid",
                flag,
                list,
                "--features",
                feats.to_str().unwrap(),
                "--expression",
                expr.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ],
            needle,
        );
    }
    assert!(!out.exists());
}

#[test]
fn synth_profile_prepare() {
    let dir = tempdir("profile");
    let data = dir.join("data");
    let st = bin()
        .args([
            "synth",
            "--samples",
            "4",
            "--images-per-sample",
            "1",
            "--size",
            "176",
            "--genes",
            "10",
            "--signal-genes",
            "2",
            "--out",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    // One broken image in the list: reported and skipped, the rest profiled.
    let list = data.join("samples.csv");
    let mut text = std::fs::read_to_string(&list).unwrap();
    std::fs::write(data.join("broken.png"), b"not a png").unwrap();
    text.push_str("s04,broken.png\n");
    std::fs::write(&list, text).unwrap();
    let profiles = dir.join("profiles.csv");
    let st = bin()
        .args(["profile", "--batch-size", "2", "--patch", "48", "--samples"])
        .arg(&list)
        .arg("--weights")
        .arg(fixtures().join("vqvae2_small.weights.safetensors"))
        .arg("--output")
        .arg(&profiles)
        .arg("--mse")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(st.status.success(), "{err}");
    assert!(
        err.contains("skipped") && err.contains("broken.png"),
        "{err}"
    );
    let stdout = String::from_utf8_lossy(&st.stdout);
    assert!(
        stdout.contains("reconstruction MSE (8-bit units)"),
        "{stdout}"
    );
    let t = cellmorph::table::Table::read_csv(&profiles).unwrap();
    assert_eq!(t.n_rows(), 4);
    assert_eq!(t.n_cols(), 2 * 24);
    assert_eq!(t.col_names[0], "top0");
    assert_eq!(t.col_names[24], "bottom0");
    // A 176×176 image holds 3×3 patches of 48: 9 patches → 9·8·8 = 576 top codes.
    // Each profile block is log2 of a distribution over 24 codes: Σ 2^v = 1.
    for r in 0..t.n_rows() {
        let row = t.row(r);
        for block in [&row[..24], &row[24..]] {
            let s: f64 = block.iter().map(|v| v.exp2()).sum();
            assert!((s - 1.0).abs() < 1e-4, "row {r}: Σ 2^profile = {s}");
        }
    }
    // Encoder-only weights (no upsample_t.*, dec.*) profile the same; --mse
    // says what it needs.
    let full = cellmorph::io::TensorFile::open(fixtures().join("vqvae2_small.weights.safetensors"))
        .unwrap();
    let mut enc = cellmorph::io::TensorWriter::new();
    for n in full.names() {
        if !(n.starts_with("dec.") || n.starts_with("upsample_t.")) {
            let (shape, data) = full.f32(&n).unwrap();
            enc.add_slice(&n, &shape, &data).unwrap();
        }
    }
    let enc_path = dir.join("encoder_only.safetensors");
    enc.write(&enc_path).unwrap();
    let enc_profiles = dir.join("profiles_enc.csv");
    let run = |mse: bool| {
        let mut c = bin();
        c.args(["profile", "--batch-size", "2", "--patch", "48", "--samples"])
            .arg(&list)
            .arg("--weights")
            .arg(&enc_path)
            .arg("--output")
            .arg(&enc_profiles);
        if mse {
            c.arg("--mse");
        }
        c.output().unwrap()
    };
    let st = run(false);
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert_eq!(
        std::fs::read(&enc_profiles).unwrap(),
        std::fs::read(&profiles).unwrap(),
        "encoder-only weights give other profiles"
    );
    let st = run(true);
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(
        !st.status.success() && err.contains("--mse needs the decoder"),
        "{err}"
    );

    let prepared = dir.join("expr.csv");
    let st = bin()
        .args(["expression", "prepare", "--min-cv", "0.0", "--counts"])
        .arg(data.join("expression.csv"))
        .arg("--output")
        .arg(&prepared)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let e = cellmorph::table::Table::read_csv(&prepared).unwrap();
    assert_eq!(e.n_rows(), 4);
    assert!(e.data.iter().all(|v| v.is_finite() && *v >= 0.0));
}

/// Runs `infer` on the fixture tensor `input_name` and compares each output
/// with the fixture tensor it maps to, within 1e-3 relative (whole network).
fn infer_matches(
    model: &str,
    weights: &str,
    cases: &str,
    input_name: &str,
    outputs: &[(&str, &str)],
) {
    infer_matches_with(model, weights, cases, input_name, outputs, &[], 1e-3);
}

/// [`infer_matches`] with extra arguments and tolerance `tol`.
fn infer_matches_with(
    model: &str,
    weights: &str,
    cases: &str,
    input_name: &str,
    outputs: &[(&str, &str)],
    extra: &[&str],
    tol: f32,
) {
    let dir = tempdir(&format!("{model}{}", extra.join("")));
    let c = TensorFile::open(fixtures().join(cases)).unwrap();
    let (shape, data) = c.f32(input_name).unwrap();
    let mut w = TensorWriter::new();
    w.add_slice("input", &shape, &data).unwrap();
    let input = dir.join("input.safetensors");
    w.write(&input).unwrap();
    let out = dir.join("out.safetensors");
    let st = bin()
        .args(["infer", "--model", model, "--batch-size", "3", "--weights"])
        .arg(fixtures().join(weights))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&out)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let got = TensorFile::open(&out).unwrap();
    for (ours, theirs) in outputs {
        assert_close_tol(&got, ours, &c, theirs, model, tol);
    }
}

/// `--precision bf16|f16`: the tensor-core convolutions (emulated here) stay
/// within the 1e-2 of PyTorch's f32 outputs; a bad name is a clear error.
#[test]
fn infer_densenet_reduced_precision() {
    for p in ["bf16", "f16"] {
        infer_matches_with(
            "densenet",
            "densenet_small.weights.safetensors",
            "densenet_small.cases.safetensors",
            "input",
            &[("logits", "logits"), ("probs", "probs")],
            &["--device", "emulated", "--precision", p],
            1e-2,
        );
    }
    let w = fixtures().join("densenet_small.weights.safetensors");
    fails_with(
        &[
            "infer",
            "--model",
            "densenet",
            "--weights",
            w.to_str().unwrap(),
            "--input",
            "x",
            "--output",
            "y",
            "--precision",
            "f8",
        ],
        "unknown precision \"f8\"",
    );
}

#[test]
fn infer_cp2image_matches_golden() {
    infer_matches(
        "cp2image-generator",
        "cp2image_small.generator.weights.safetensors",
        "cp2image_small.cases.safetensors",
        "z",
        &[("image", "image")],
    );
    let hidden: Vec<(String, String)> = (0..5)
        .map(|i| (format!("hidden.{i}"), format!("hidden_x.{i}")))
        .collect();
    let mut outs: Vec<(&str, &str)> = vec![("prob", "prob_x")];
    outs.extend(hidden.iter().map(|(a, b)| (a.as_str(), b.as_str())));
    infer_matches(
        "cp2image-discriminator",
        "cp2image_small.discriminator.weights.safetensors",
        "cp2image_small.cases.safetensors",
        "x",
        &outs,
    );
}

#[test]
fn infer_densenet_matches_golden() {
    infer_matches(
        "densenet",
        "densenet_small.weights.safetensors",
        "densenet_small.cases.safetensors",
        "input",
        &[
            ("features", "features"),
            ("pooled", "pooled"),
            ("logits", "logits"),
            ("probs", "probs"),
        ],
    );
}

/// Issue 16's cases: outputs that would destroy an input, sizes that would
/// abort, probabilities and thresholds out of range, duplicate ids.
#[test]
fn hardening_cases_are_clear_errors() {
    let dir = tempdir("harden");
    let weights = dir.join("w.safetensors");
    std::fs::copy(
        fixtures().join("vqvae2_small.weights.safetensors"),
        &weights,
    )
    .unwrap();
    let before = std::fs::read(&weights).unwrap();
    let input = input_file(&fixtures().join("vqvae2_small.cases.safetensors"), &dir);
    let (w, i) = (weights.to_str().unwrap(), input.to_str().unwrap());
    // The output is an input: spelled the same, spelled differently, a hard link.
    let other_spelling = dir.join(".").join("w.safetensors");
    let link = dir.join("link.safetensors");
    std::fs::hard_link(&weights, &link).unwrap();
    for out in [weights.clone(), other_spelling, link] {
        let out = out.to_str().unwrap().to_string();
        fails_with(
            &[
                "infer",
                "--model",
                "vqvae2",
                "--weights",
                w,
                "--input",
                i,
                "--output",
                &out,
            ],
            "would destroy the input",
        );
    }
    assert_eq!(
        std::fs::read(&weights).unwrap(),
        before,
        "the input is untouched"
    );
    // Sizes from flags are bounded before allocating.
    let out = dir.join("g.safetensors");
    fails_with(
        &[
            "cp2image",
            "init-weights",
            "--features",
            "405",
            "--channels",
            "100000,100000",
            "--output",
            out.to_str().unwrap(),
        ],
        "would hold more than",
    );
    assert!(!out.exists());
    fails_with(
        &[
            "bench", "conv", "--c-in", "4", "--height", "8", "--width", "8", "--c-out", "4",
            "--kernel", "3", "--pad", "1000000",
        ],
        "GiB",
    );
    // Probabilities outside [0, 1] and thresholds that nothing can pass.
    let preds = dir.join("preds.csv");
    std::fs::write(&preds, "image,prob_positive\na.png,0.2\nb.png,7.5\n").unwrap();
    let labels = dir.join("labels.csv");
    std::fs::write(&labels, "image,label\na.png,0\nb.png,1\n").unwrap();
    let report = dir.join("r.json");
    let (p, l, r) = (
        preds.to_str().unwrap(),
        labels.to_str().unwrap(),
        report.to_str().unwrap(),
    );
    fails_with(
        &[
            "screen",
            "evaluate",
            "--predictions",
            p,
            "--labels",
            l,
            "--output",
            r,
        ],
        "is not a probability",
    );
    std::fs::write(&preds, "image,prob_positive\na.png,0.2\nb.png,0.9\n").unwrap();
    fails_with(
        &[
            "screen",
            "evaluate",
            "--predictions",
            p,
            "--labels",
            l,
            "--output",
            r,
            "--threshold",
            "2",
        ],
        "must lie in [0, 1]",
    );
    assert!(!report.exists());
    // map writes a PNG and a CSV beside it: a .csv output would be replaced.
    fails_with(
        &[
            "map",
            "--weights",
            w,
            "--model",
            "m.json",
            "--gene",
            "g",
            "--image",
            "x.png",
            "--output",
            "m.csv",
        ],
        "give a path ending in .png",
    );
    // Negative numbers are values, not unknown flags.
    fails_with(
        &[
            "infer",
            "--model",
            "vqvae2",
            "--weights",
            w,
            "--input",
            i,
            "--output",
            "o.safetensors",
            "--batch-size",
            "-1",
        ],
        "invalid value '-1' for '--batch-size",
    );
    fails_with(
        &[
            "expression",
            "prepare",
            "--counts",
            "missing-counts.csv",
            "--min-mean",
            "-inf",
            "--output",
            "o.csv",
        ],
        "missing-counts.csv",
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Images over the pixel limit are refused from their header, naming the
/// file and the variable that raises the limit; `screen predict` reports
/// the image as unreadable instead of decoding it.
#[test]
fn images_over_the_pixel_limit_are_refused_before_decoding() {
    let dir = tempdir("pixels");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let image = data.join("bbbc007/A9/A9_p5d.png"); // 450×450
    let list = dir.join("s.csv");
    std::fs::write(&list, format!("sample,image\na,{}\n", image.display())).unwrap();
    let w = fixtures().join("vqvae2_small.weights.safetensors");
    let run = |limit: &str| {
        bin()
            .env("CELLMORPH_MAX_PIXELS", limit)
            .args(["profile", "--patch", "32", "--samples"])
            .arg(&list)
            .arg("--weights")
            .arg(&w)
            .arg("--output")
            .arg(dir.join("p.csv"))
            .output()
            .unwrap()
    };
    let o = run("200000");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("A9_p5d.png")
            && e.contains("202500 pixels")
            && e.contains("CELLMORPH_MAX_PIXELS"),
        "{e}"
    );
    assert!(
        run("202500").status.success(),
        "the limit itself is allowed"
    );
    let o = run("lots");
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a positive integer"));
    // The flag, anywhere on the line, wins over the environment.
    let flag = |limit: &str| {
        bin()
            .env("CELLMORPH_MAX_PIXELS", "1")
            .args([
                "--max-pixels",
                limit,
                "profile",
                "--patch",
                "32",
                "--samples",
            ])
            .arg(&list)
            .arg("--weights")
            .arg(&w)
            .arg("--output")
            .arg(dir.join(format!("p{limit}.csv")))
            .output()
            .unwrap()
    };
    let o = flag("202499");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("A9_p5d.png") && e.contains("--max-pixels"),
        "{e}"
    );
    assert!(flag("202500").status.success());
    let o = flag("0");
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--max-pixels"));
}

/// `profile --counts` writes the integer code counts the profile is made
/// from: per level they sum to patches × positions per patch, and the
/// profile is `log2((c + 1) / Σ(c + 1))` of them.
#[test]
fn profile_counts_are_the_histograms_behind_the_profile() {
    let dir = tempdir("counts");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let list = dir.join("s.csv");
    std::fs::write(
        &list,
        format!(
            "sample,image\na,{}\nb,{}\nb,{}\n",
            data.join("bbbc007/A9/A9_p5d.png").display(),
            data.join("stardist_dsb2018/img2d.png").display(),
            data.join("bbbc007/A9/A9_p5d.png").display()
        ),
    )
    .unwrap();
    let w = fixtures().join("vqvae2_small.weights.safetensors");
    let (prof, counts) = (dir.join("p.csv"), dir.join("c.csv"));
    let o = bin()
        .args(["profile", "--patch", "32", "--samples"])
        .arg(&list)
        .arg("--weights")
        .arg(&w)
        .arg("--output")
        .arg(&prof)
        .arg("--counts")
        .arg(&counts)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |p: &Path| -> Vec<Vec<String>> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| l.split(',').map(str::to_string).collect())
            .collect()
    };
    let (c, p) = (read(&counts), read(&prof));
    assert_eq!(&c[0][..3], ["sample", "images", "patches"]);
    let k = (c[0].len() - 3) / 2;
    assert_eq!(c.len(), 3, "a header and two samples");
    for (row, prow) in c[1..].iter().zip(&p[1..]) {
        assert_eq!(row[0], prow[0]);
        let patches: u64 = row[2].parse().unwrap();
        let v: Vec<u64> = row[3..].iter().map(|x| x.parse().unwrap()).collect();
        // 32×32 patches: the top level is 4×4, the bottom 8×8 per patch.
        assert_eq!(v[..k].iter().sum::<u64>(), patches * 16);
        assert_eq!(v[k..].iter().sum::<u64>(), patches * 64);
        for (level, counts) in [&v[..k], &v[k..]].into_iter().enumerate() {
            let total: f64 = counts.iter().map(|&c| c as f64 + 1.0).sum();
            for (j, &cnt) in counts.iter().enumerate() {
                let want = ((cnt as f64 + 1.0) / total).log2();
                let got: f64 = prow[1 + level * k + j].parse().unwrap();
                assert!(
                    (got - want).abs() < 1e-5,
                    "{} level {level} code {j}",
                    row[0]
                );
            }
        }
    }
    assert_eq!(c[2][1], "2", "sample b has two images");
    let o = bin()
        .args(["profile", "--patch", "32", "--samples"])
        .arg(&list)
        .arg("--weights")
        .arg(&w)
        .arg("--output")
        .arg(&prof)
        .arg("--counts")
        .arg(&prof)
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--counts"));
}
