//! `cellmorph bench` end to end on the CPU device, on tiny sizes: the JSON
//! line's keys, outputs checked against naive references computed here
//! (conv, VQ lookup, histogram), the model workloads' output shapes, and
//! clear errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cellmorph::io::{TensorFile, TensorWriter};
use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cellmorph"))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tempdir(tag: &str) -> common::TempDir {
    common::TempDir::new("cli-bench", tag)
}

/// Runs `cellmorph bench ARGS` and returns its JSON line, failing with its
/// stderr when it fails.
fn bench(args: &[&str], paths: &[(&str, &Path)]) -> Value {
    let mut cmd = bin();
    cmd.arg("bench").args(args);
    for (flag, p) in paths {
        cmd.arg(flag).arg(p);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_json(&out)
}

/// Stdout must be exactly one line holding one JSON object with every key.
fn parse_json(out: &Output) -> Value {
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout must be one line, got {stdout:?}");
    let v: Value = serde_json::from_str(lines[0]).unwrap();
    for key in [
        "workload",
        "device",
        "precision",
        "batch",
        "shape",
        "warmup",
        "iters",
        "median_s",
        "mean_s",
        "min_s",
        "items_per_s",
        "flops",
        "gflop_per_s",
    ] {
        assert!(v.get(key).is_some(), "missing key {key:?} in {v}");
    }
    let (median, mean, min) = (
        v["median_s"].as_f64().unwrap(),
        v["mean_s"].as_f64().unwrap(),
        v["min_s"].as_f64().unwrap(),
    );
    assert!(min > 0.0 && min <= median && min <= mean, "{v}");
    assert!(v["shape"].is_object(), "{v}");
    v
}

/// A deterministic pseudo-random sequence in [−1, 1) for the test inputs.
fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32 ^ seed.wrapping_mul(0x9E37_79B9))
                .wrapping_mul(2_654_435_761)
                .rotate_left(13);
            (h % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

#[test]
fn conv_matches_naive_conv() {
    let dir = tempdir("conv");
    let (n, c_in, h, w, c_out, k, pad) = (1, 3, 8, 8, 4, 3, 1);
    let x = values(n * c_in * h * w, 1);
    let wt = values(c_out * c_in * k * k, 2);
    let b = values(c_out, 3);
    let input = dir.join("in.safetensors");
    let mut tw = TensorWriter::new();
    tw.add_slice("x", &[n, c_in, h, w], &x).unwrap();
    tw.add_slice("w", &[c_out, c_in, k, k], &wt).unwrap();
    tw.add_slice("b", &[c_out], &b).unwrap();
    tw.write(&input).unwrap();
    let output = dir.join("out.safetensors");
    let v = bench(
        &[
            "conv", "--batch", "1", "--c-in", "3", "--height", "8", "--width", "8", "--c-out", "4",
            "--kernel", "3", "--pad", "1", "--iters", "2",
        ],
        &[("--input", &input), ("--output", &output)],
    );
    assert_eq!(v["workload"], "conv");
    assert_eq!(v["batch"], 1);
    assert_eq!(v["iters"], 2);
    assert_eq!(v["precision"], "f32");
    assert_eq!(v["shape"]["out_height"], 8);
    let flops = (2 * n * c_out * h * w * c_in * k * k) as f64;
    assert_eq!(v["flops"].as_f64().unwrap(), flops);

    let (shape, y) = TensorFile::open(&output).unwrap().f32("y").unwrap();
    assert_eq!(shape, vec![n, c_out, h, w]);
    for co in 0..c_out {
        for oy in 0..h {
            for ox in 0..w {
                let mut s = f64::from(b[co]);
                for ci in 0..c_in {
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy + ky) as isize - pad as isize;
                            let ix = (ox + kx) as isize - pad as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            let xv = x[(ci * h + iy as usize) * w + ix as usize];
                            let wv = wt[((co * c_in + ci) * k + ky) * k + kx];
                            s += f64::from(xv) * f64::from(wv);
                        }
                    }
                }
                let got = y[(co * h + oy) * w + ox];
                assert!(
                    (f64::from(got) - s).abs() <= 1e-5 * (1.0 + s.abs()),
                    "y[{co}, {oy}, {ox}] = {got}, naive {s}"
                );
            }
        }
    }
}

#[test]
fn conv_generated_inputs_and_contradicting_flags() {
    let v = bench(
        &[
            "conv", "--batch", "2", "--c-in", "2", "--height", "6", "--width", "5", "--c-out", "3",
            "--kernel", "3", "--stride", "2", "--iters", "1", "--warmup", "0",
        ],
        &[],
    );
    assert_eq!(v["shape"]["out_height"], 2);
    assert_eq!(v["shape"]["out_width"], 2);
    assert_eq!(v["warmup"], 0);

    // A flag that contradicts the input file is an error naming the tensor.
    let dir = tempdir("conv-contra");
    let input = dir.join("in.safetensors");
    let mut tw = TensorWriter::new();
    tw.add_slice("x", &[1, 2, 4, 4], &values(32, 4)).unwrap();
    tw.add_slice("w", &[3, 2, 3, 3], &values(54, 5)).unwrap();
    tw.add_slice("b", &[3], &values(3, 6)).unwrap();
    tw.write(&input).unwrap();
    let out = bin()
        .args(["bench", "conv", "--c-in", "5", "--input"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"x\"") && err.contains("--c-in"),
        "stderr: {err}"
    );
}

#[test]
fn vq_lookup_matches_brute_force() {
    let dir = tempdir("vq");
    let (n, dim, codes) = (100, 4, 8);
    let z = values(n * dim, 7);
    let book = values(codes * dim, 8);
    let input = dir.join("in.safetensors");
    let mut tw = TensorWriter::new();
    tw.add_slice("z", &[n, dim], &z).unwrap();
    tw.add_slice("codebook", &[codes, dim], &book).unwrap();
    tw.write(&input).unwrap();
    let output = dir.join("out.safetensors");
    let v = bench(
        &["vq-lookup", "--n", "100", "--iters", "2"],
        &[("--input", &input), ("--output", &output)],
    );
    assert_eq!(v["batch"], 100);
    assert_eq!(v["shape"]["dim"], 4);
    assert_eq!(v["shape"]["codes"], 8);
    assert_eq!(v["flops"].as_f64().unwrap(), (2 * n * codes * dim) as f64);

    let (shape, got) = TensorFile::open(&output).unwrap().i64("codes").unwrap();
    assert_eq!(shape, vec![n]);
    for i in 0..n {
        let dist = |k: usize| -> f64 {
            (0..dim)
                .map(|d| f64::from(z[i * dim + d] - book[k * dim + d]).powi(2))
                .sum()
        };
        let best = (0..codes)
            .min_by(|&a, &b| dist(a).total_cmp(&dist(b)))
            .unwrap();
        let g = got[i] as usize;
        // Equal up to near-ties (the op sums ||x||² − 2x·e + ||e||² in f32).
        assert!(
            g == best || (dist(g) - dist(best)).abs() < 1e-5,
            "vector {i}: code {g} (d² {}), brute force {best} (d² {})",
            dist(g),
            dist(best)
        );
    }
}

#[test]
fn histogram_matches_counting() {
    let dir = tempdir("hist");
    let (n, bins, segments) = (1000usize, 16usize, 4usize);
    let codes: Vec<i32> = (0..n).map(|i| ((i * i + 3 * i) % bins) as i32).collect();
    let input = dir.join("in.safetensors");
    let mut tw = TensorWriter::new();
    tw.add_slice("codes", &[n], &codes).unwrap();
    tw.write(&input).unwrap();
    let output = dir.join("out.safetensors");
    let v = bench(
        &[
            "histogram",
            "--bins",
            "16",
            "--segments",
            "4",
            "--iters",
            "3",
        ],
        &[("--input", &input), ("--output", &output)],
    );
    assert_eq!(v["batch"], 1000);
    assert!(v["flops"].is_null() && v["gflop_per_s"].is_null());

    let (shape, hist) = TensorFile::open(&output).unwrap().i64("hist").unwrap();
    assert_eq!(shape, vec![segments, bins]);
    let share = n / segments;
    let mut want = vec![0i64; segments * bins];
    for (i, &c) in codes.iter().enumerate() {
        want[(i / share) * bins + c as usize] += 1;
    }
    assert_eq!(hist, want);

    // Generated codes: one segment is a bincount of all of them.
    let output = dir.join("gen.safetensors");
    bench(
        &["histogram", "--n", "5000", "--bins", "7", "--iters", "1"],
        &[("--output", &output)],
    );
    let (shape, hist) = TensorFile::open(&output).unwrap().i64("hist").unwrap();
    assert_eq!(shape, vec![1, 7]);
    assert_eq!(hist.iter().sum::<i64>(), 5000);

    // A code outside [0, bins) is an error naming the tensor.
    let out = bin()
        .args(["bench", "histogram", "--bins", "8", "--input"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"codes\""), "stderr: {err}");
}

#[test]
fn vqvae2_profile_runs() {
    let dir = tempdir("vqvae2");
    let output = dir.join("out.safetensors");
    let weights = fixtures().join("vqvae2_small.weights.safetensors");
    let (n, h, w) = (2usize, 32usize, 48usize);
    let v = bench(
        &[
            "vqvae2-profile",
            "--batch",
            "2",
            "--height",
            "32",
            "--width",
            "48",
            "--iters",
            "2",
            "--warmup",
            "1",
        ],
        &[("--weights", &weights), ("--output", &output)],
    );
    assert_eq!(v["batch"], 2);
    let k = v["shape"]["n_embed"].as_u64().unwrap() as usize;
    let out = TensorFile::open(&output).unwrap();
    let (s, _) = out.i64("id_t").unwrap();
    assert_eq!(s, vec![n, h / 8, w / 8]);
    let (s, _) = out.i64("id_b").unwrap();
    assert_eq!(s, vec![n, h / 4, w / 4]);
    // The histograms are zeroed every iteration: each row counts one image.
    for (name, positions) in [("hist_t", (h / 8) * (w / 8)), ("hist_b", (h / 4) * (w / 4))] {
        let (s, hist) = out.i64(name).unwrap();
        assert_eq!(s, vec![n, k], "{name}");
        for row in hist.chunks_exact(k) {
            assert_eq!(row.iter().sum::<i64>(), positions as i64, "{name}");
        }
    }
}

#[test]
fn densenet_runs_and_matches_the_golden() {
    let dir = tempdir("densenet");
    let weights = fixtures().join("densenet_small.weights.safetensors");
    let output = dir.join("out.safetensors");
    let v = bench(
        &[
            "densenet", "--batch", "1", "--height", "40", "--width", "56", "--iters", "1",
            "--warmup", "0",
        ],
        &[("--weights", &weights), ("--output", &output)],
    );
    assert_eq!(v["batch"], 1);
    assert!(v["flops"].as_f64().unwrap() > 0.0);
    let out = TensorFile::open(&output).unwrap();
    for name in ["logits", "probs"] {
        assert_eq!(out.f32(name).unwrap().0, vec![1, 5], "{name}");
    }

    // With the cases' input, probs match PyTorch's (tolerance of tests/densenet.rs).
    let cases = fixtures().join("densenet_small.cases.safetensors");
    bench(
        &["densenet", "--iters", "1", "--warmup", "0"],
        &[
            ("--weights", &weights),
            ("--input", &cases),
            ("--output", &output),
        ],
    );
    let (s, got) = TensorFile::open(&output).unwrap().f32("probs").unwrap();
    let (ws, want) = TensorFile::open(&cases).unwrap().f32("probs").unwrap();
    assert_eq!(s, ws);
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-3 * scale, "probs {g} vs {w}");
    }
}

#[test]
fn cp2image_generator_runs() {
    let dir = tempdir("cp2image");
    let weights = fixtures().join("cp2image_small.generator.weights.safetensors");
    let output = dir.join("out.safetensors");
    let v = bench(
        &["cp2image-generator", "--batch", "3", "--iters", "1"],
        &[("--weights", &weights), ("--output", &output)],
    );
    assert_eq!(v["batch"], 3);
    let size = v["shape"]["image_size"].as_u64().unwrap() as usize;
    let (s, image) = TensorFile::open(&output).unwrap().f32("image").unwrap();
    assert_eq!(s, vec![3, 3, size, size]);
    assert!(image.iter().all(|p| (0.0..=1.0).contains(p)));
}

#[test]
fn clear_errors() {
    let run = |args: &[&str]| {
        let out = bin().arg("bench").args(args).output().unwrap();
        assert!(!out.status.success(), "bench {args:?} should fail");
        assert!(out.stdout.is_empty(), "no JSON on failure");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["densenet", "--batch", "1"]);
    assert!(err.contains("--weights"), "stderr: {err}");
    let err = run(&["conv", "--c-in", "3", "--height", "8", "--width", "8"]);
    assert!(
        err.contains("--c-out") && err.contains("--kernel"),
        "stderr: {err}"
    );
    let err = run(&["vq-lookup", "--iters", "0"]);
    assert!(err.contains("--iters"), "stderr: {err}");
    let err = run(&["vq-lookup", "--dim", "0"]);
    assert!(err.contains("--dim"), "stderr: {err}");
    let err = run(&["histogram", "--batch", "4"]);
    assert!(err.contains("--batch"), "stderr: {err}");
    let err = run(&["no-such-workload"]);
    assert!(err.contains("vq-lookup"), "stderr: {err}");
}

/// Copies the tensors of `file` named `{from}…` to `w` as `{to}…` (the
/// BatchNorm counters as int64, everything else as f32).
fn copy_prefixed(file: &TensorFile, from: &str, to: &str, w: &mut TensorWriter) {
    for name in file.names() {
        let Some(rest) = name.strip_prefix(from) else {
            continue;
        };
        let new = format!("{to}{rest}");
        if name.ends_with("num_batches_tracked") {
            let (s, v) = file.i64(&name).unwrap();
            w.add_slice(&new, &s, &v).unwrap();
        } else {
            let (s, v) = file.f32(&name).unwrap();
            w.add_slice(&new, &s, &v).unwrap();
        }
    }
}

/// |a − b| ≤ tol · max(|b|, 1).
fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

#[test]
fn densenet_train_step_reports_the_goldens_first_loss() {
    // The DenseNet train-step golden (PyTorch, small network, 4 images of
    // 32×40, labels 0 1 1 0): balanced labels make the bench's class weights
    // 1, so its weighted loss is the golden's plain mean. Every iteration
    // starts from the same weights, so the last of two still reports the
    // first step's loss and logits.
    let dir = tempdir("densenet-train");
    let golden = TensorFile::open(fixtures().join("densenet_train_step.safetensors")).unwrap();
    let (weights, input, output) = (
        dir.join("w.safetensors"),
        dir.join("in.safetensors"),
        dir.join("out.safetensors"),
    );
    let mut w = TensorWriter::new();
    copy_prefixed(&golden, "before.", "", &mut w);
    w.write(&weights).unwrap();
    let mut inp = TensorWriter::new();
    let (xs, x) = golden.f32("input").unwrap();
    let (ls, labels) = golden.i64("labels").unwrap();
    inp.add_slice("input", &xs, &x).unwrap();
    inp.add_slice("labels", &ls, &labels).unwrap();
    inp.write(&input).unwrap();
    let v = bench(
        &["densenet-train-step", "--iters", "2", "--warmup", "0"],
        &[
            ("--weights", &weights),
            ("--input", &input),
            ("--output", &output),
        ],
    );
    assert_eq!(v["workload"], "densenet-train-step");
    assert_eq!(v["batch"], xs[0]);
    assert_eq!(v["shape"]["height"], xs[2]);
    assert_eq!(v["shape"]["width"], xs[3]);
    let out = TensorFile::open(&output).unwrap();
    let (_, loss) = out.f32("loss").unwrap();
    let (_, want) = golden.f32("loss").unwrap();
    // f32 sums in another order than PyTorch's: the train-step tests'
    // tolerance.
    assert!(
        close(loss[0], want[0], 1e-5),
        "loss {} vs {}",
        loss[0],
        want[0]
    );
    let (s, logits) = out.f32("logits").unwrap();
    let (gs, want) = golden.f32("logits").unwrap();
    assert_eq!(s, gs);
    for (a, b) in logits.iter().zip(&want) {
        assert!(close(*a, *b, 1e-4), "logit {a} vs {b}");
    }
}

#[test]
fn densenet_train_step_generates_inputs() {
    let dir = tempdir("densenet-train-gen");
    let weights = fixtures().join("densenet_small.weights.safetensors");
    let output = dir.join("out.safetensors");
    let v = bench(
        &[
            "densenet-train-step",
            "--batch",
            "3",
            "--height",
            "32",
            "--width",
            "40",
            "--iters",
            "1",
            "--warmup",
            "0",
        ],
        &[("--weights", &weights), ("--output", &output)],
    );
    assert_eq!(v["batch"], 3);
    let classes = v["shape"]["classes"].as_u64().unwrap() as usize;
    let out = TensorFile::open(&output).unwrap();
    let (s, logits) = out.f32("logits").unwrap();
    assert_eq!(s, vec![3, classes]);
    let (_, loss) = out.f32("loss").unwrap();
    assert!(loss[0].is_finite() && loss[0] > 0.0, "loss {}", loss[0]);
    assert!(logits.iter().all(|v| v.is_finite()));
}

#[test]
fn cp2image_train_step_reports_the_goldens_first_losses() {
    // The CP2Image train-step golden (PyTorch, narrow networks, p = 16,
    // batch 4): its starting G and D under "G." and "D.", its z, x, x_real.
    let dir = tempdir("cp2image-train");
    let golden = TensorFile::open(fixtures().join("cp2image_train_step.safetensors")).unwrap();
    let (weights, input, output) = (
        dir.join("w.safetensors"),
        dir.join("in.safetensors"),
        dir.join("out.safetensors"),
    );
    let mut w = TensorWriter::new();
    copy_prefixed(&golden, "G.before.", "G.", &mut w);
    copy_prefixed(&golden, "D.before.", "D.", &mut w);
    w.write(&weights).unwrap();
    let mut inp = TensorWriter::new();
    for name in ["z", "x", "x_real"] {
        let (s, v) = golden.f32(name).unwrap();
        inp.add_slice(name, &s, &v).unwrap();
    }
    inp.write(&input).unwrap();
    let v = bench(
        &["cp2image-train-step", "--iters", "2", "--warmup", "0"],
        &[
            ("--weights", &weights),
            ("--input", &input),
            ("--output", &output),
        ],
    );
    let (zs, _) = golden.f32("z").unwrap();
    assert_eq!(v["workload"], "cp2image-train-step");
    assert_eq!(v["batch"], zs[0]);
    assert_eq!(v["shape"]["features"], zs[1]);
    assert_eq!(v["shape"]["image_size"], 64);
    let out = TensorFile::open(&output).unwrap();
    for name in ["loss_g", "loss_d"] {
        let (_, got) = out.f32(name).unwrap();
        let (_, want) = golden.f32(name).unwrap();
        // Same tolerance as the train-step tests: f32 sums in another order.
        assert!(
            close(got[0], want[0], 1e-5),
            "{name} {} vs {}",
            got[0],
            want[0]
        );
    }
}

#[test]
fn cp2image_train_step_needs_both_networks() {
    let dir = tempdir("cp2image-train-g");
    let g =
        TensorFile::open(fixtures().join("cp2image_small.generator.weights.safetensors")).unwrap();
    let weights = dir.join("g.safetensors");
    let mut w = TensorWriter::new();
    copy_prefixed(&g, "", "G.", &mut w);
    w.write(&weights).unwrap();
    let out = bin()
        .args(["bench", "cp2image-train-step", "--iters", "1", "--weights"])
        .arg(&weights)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("D."), "stderr: {err}");
}
