//! Careless and hostile use of the command line (issue 16): output folders
//! that hold another run's files, outputs whose folder is missing, patches
//! too small for the model, tables that disagree, a single image file to
//! screen, damaged or foreign checkpoints for `vqvae2 train --resume` and
//! weights for `train-step`. Each case exits non-zero with a message naming
//! what the user gave, or succeeds without mixing runs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cellmorph::imaging::{BitDepth, GrayImage};
use cellmorph::io::{OutputFolder, RUN_MARKER};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cellmorph"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn tempdir(tag: &str) -> common::TempDir {
    common::TempDir::new("hard", tag)
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs and expects failure; returns stderr.
fn fails(cmd: &mut Command) -> String {
    let o = run(cmd);
    let e = stderr(&o);
    assert!(!o.status.success(), "expected failure, got success: {e}");
    assert!(!e.contains("panicked"), "{e}");
    e
}

/// Runs and expects success; returns stderr.
fn succeeds(cmd: &mut Command) -> String {
    let o = run(cmd);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    e
}

fn png(path: &Path, w: usize, h: usize) {
    let data = (0..w * h).map(|i| (i * 7 % 256) as u16).collect();
    GrayImage::new(w, h, BitDepth::Eight, data)
        .unwrap()
        .save(path)
        .unwrap();
}

fn marker(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join(RUN_MARKER)).unwrap()).unwrap()
}

fn synth(out: &Path, seed: &str) -> Command {
    let mut c = bin();
    c.args([
        "synth",
        "--samples",
        "2",
        "--images-per-sample",
        "1",
        "--size",
        "48",
        "--genes",
        "4",
        "--signal-genes",
        "1",
        "--seed",
        seed,
        "--out",
    ])
    .arg(out);
    c
}

#[test]
fn an_output_folder_takes_one_run_unless_forced() {
    let dir = tempdir("folder");
    let out = dir.join("data");
    succeeds(&mut synth(&out, "1"));
    let m = marker(&out);
    assert_eq!(m["complete"], true, "{m}");
    assert!(m["run"].as_str().unwrap().contains("--seed 1"), "{m}");
    let first = std::fs::read(out.join("expression.csv")).unwrap();

    // The same run again (a resume) is allowed and writes the same files.
    succeeds(&mut synth(&out, "1"));
    assert_eq!(std::fs::read(out.join("expression.csv")).unwrap(), first);

    // Another run is refused before it writes anything.
    let e = fails(&mut synth(&out, "2"));
    assert!(
        e.contains("--out") && e.contains("another run") && e.contains("--force"),
        "{e}"
    );
    assert_eq!(std::fs::read(out.join("expression.csv")).unwrap(), first);

    // Forced, it replaces the files and the marker names it.
    succeeds(synth(&out, "2").arg("--force"));
    assert_ne!(std::fs::read(out.join("expression.csv")).unwrap(), first);
    let m = marker(&out);
    assert!(m["run"].as_str().unwrap().contains("--seed 2"), "{m}");
    assert!(!m["run"].as_str().unwrap().contains("--force"), "{m}");

    // A folder of someone else's files (no marker) is refused too.
    let foreign = dir.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let e = fails(&mut synth(&foreign, "1"));
    assert!(e.contains("not written by this command"), "{e}");
    assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 1);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_demo_into_another_runs_folder_is_refused_before_any_work() {
    let dir = tempdir("demo");
    let out = dir.join("demo");
    std::fs::create_dir_all(&out).unwrap();
    // What a demo killed mid-way leaves: some files, its marker incomplete.
    std::fs::write(
        out.join(RUN_MARKER),
        r#"{"run": "demo --out x --seed 1 --quick", "complete": false}"#,
    )
    .unwrap();
    std::fs::write(out.join("model.json"), "{}").unwrap();
    let e = fails(
        bin()
            .args(["demo", "--quick", "--seed", "2", "--out"])
            .arg(&out),
    );
    assert!(
        e.contains("--out") && e.contains("incomplete: demo --out x --seed 1"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("model.json")).unwrap(),
        "{}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_run_that_stops_is_marked_incomplete_and_one_that_wrote_nothing_leaves_nothing() {
    let dir = tempdir("marker");
    let out = dir.join("run");
    {
        let f = OutputFolder::claim("--out", &out, "run a", false).unwrap();
        std::fs::write(f.path().join("part.csv"), "x").unwrap();
        // Dropped without finish(): as after an error half-way.
    }
    let m = marker(&out);
    assert_eq!(m["complete"], false, "{m}");
    assert_eq!(m["run"], "run a", "{m}");
    // The same run resumes; another is refused.
    OutputFolder::claim("--out", &out, "run a", false)
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(marker(&out)["complete"], true);
    let e = OutputFolder::claim("--out", &out, "run b", false).unwrap_err();
    assert!(e.to_string().contains("complete: run a"), "{e}");

    let empty = dir.join("empty");
    drop(OutputFolder::claim("--plots", &empty, "run c", false).unwrap());
    assert!(!empty.exists(), "a run that wrote nothing leaves no folder");

    let file = dir.join("file.png");
    std::fs::write(&file, "x").unwrap();
    let e = OutputFolder::claim("--plots", &file, "run d", false).unwrap_err();
    assert!(
        e.to_string().contains("--plots") && e.to_string().contains("not a folder"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A tiny SVR model and its tables.
fn svr_inputs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let feat = dir.join("feat.csv");
    let expr = dir.join("expr.csv");
    std::fs::write(
        &feat,
        "sample,f1,f2\ns01,1,2\ns02,2,3\ns03,3,1\ns04,4,4\ns05,5,2\ns06,6,1\n",
    )
    .unwrap();
    std::fs::write(
        &expr,
        "sample,g1\ns01,1\ns02,2\ns03,3\ns04,4\ns05,4\ns06,6\n",
    )
    .unwrap();
    let model = dir.join("m.json");
    succeeds(
        bin()
            .args([
                "svr",
                "grid",
                "--c",
                "1",
                "--epsilon",
                "0.1",
                "--folds",
                "2",
            ])
            .arg("--features")
            .arg(&feat)
            .arg("--expression")
            .arg(&expr)
            .arg("--output")
            .arg(&model),
    );
    (feat, expr, model)
}

#[test]
fn plots_naming_a_file_or_a_foreign_folder_is_refused() {
    let dir = tempdir("plots");
    let (feat, expr, model) = svr_inputs(&dir);
    let evaluate = |plots: &Path| {
        let mut c = bin();
        c.args(["expression", "evaluate", "--model"])
            .arg(&model)
            .arg("--dataset")
            .arg(format!("A={},{}", feat.display(), expr.display()))
            .arg("--output")
            .arg(dir.join("eval.csv"))
            .arg("--plots")
            .arg(plots);
        c
    };
    let file = dir.join("plots.png");
    std::fs::write(&file, "x").unwrap();
    let e = fails(&mut evaluate(&file));
    assert!(
        e.contains("--plots") && e.contains("plots.png") && e.contains("not a folder"),
        "{e}"
    );
    assert!(!e.contains("os error 17"), "{e}");

    let plots = dir.join("plots");
    succeeds(&mut evaluate(&plots));
    assert!(plots.join("A_g1.png").is_file());
    assert_eq!(marker(&plots)["complete"], true);
    std::fs::write(
        plots.join(RUN_MARKER),
        r#"{"run": "other", "complete": true}"#,
    )
    .unwrap();
    let e = fails(&mut evaluate(&plots));
    assert!(e.contains("--plots") && e.contains("another run"), "{e}");
    succeeds(evaluate(&plots).arg("--force"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn tables_that_disagree_name_both_files() {
    let dir = tempdir("tables");
    let (feat, _, model) = svr_inputs(&dir);
    let expr = dir.join("expr_s07.csv");
    std::fs::write(
        &expr,
        "sample,g1\ns01,1\ns02,2\ns03,3\ns04,4\ns05,4\ns07,6\n",
    )
    .unwrap();
    for cmd in [["svr", "grid"], ["svr", "cv"]] {
        let e = fails(
            bin()
                .args(cmd)
                .args(["--c", "1", "--epsilon", "0.1", "--folds", "2"])
                .arg("--features")
                .arg(&feat)
                .arg("--expression")
                .arg(&expr)
                .arg("--output")
                .arg(dir.join("out.csv")),
        );
        assert!(
            e.contains("\"s07\"") && e.contains("feat.csv") && e.contains("expr_s07.csv"),
            "{cmd:?}: {e}"
        );
    }
    let narrow = dir.join("narrow.csv");
    std::fs::write(&narrow, "sample,f1,f3\ns01,1,2\n").unwrap();
    let e = fails(
        bin()
            .args(["svr", "predict", "--model"])
            .arg(&model)
            .arg("--features")
            .arg(&narrow)
            .arg("--output")
            .arg(dir.join("pred.csv")),
    );
    assert!(
        e.contains("narrow.csv") && e.contains("'f2'") && e.contains("m.json"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_patch_too_small_for_the_vqvae2_is_refused_in_pixels() {
    let dir = tempdir("patch");
    png(&dir.join("tiny.png"), 7, 5);
    let list = dir.join("samples.csv");
    std::fs::write(&list, "sample,image\ns01,tiny.png\n").unwrap();
    let profile = |patch: &str| {
        let mut c = bin();
        c.args(["profile", "--patch", patch, "--samples"])
            .arg(&list)
            .arg("--weights")
            .arg(fixture("vqvae2_small.weights.safetensors"))
            .arg("--output")
            .arg(dir.join("p.csv"));
        c
    };
    for patch in ["4", "5", "12"] {
        let e = fails(&mut profile(patch));
        assert!(
            e.contains(&format!("--patch {patch}")) && e.contains("8×8 pixels"),
            "{e}"
        );
        assert!(!e.contains("conv2d"), "{e}");
    }
    // A valid patch larger than the image: the image is named, in pixels.
    let e = fails(&mut profile("16"));
    assert!(e.contains("tiny.png") && e.contains("7×5"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn outputs_in_a_missing_folder_fail_before_the_work() {
    let dir = tempdir("nodir");
    png(&dir.join("a.png"), 64, 64);
    let list = dir.join("samples.csv");
    std::fs::write(&list, "sample,image\ns01,a.png\n").unwrap();
    let missing = dir.join("nodir");
    let e = fails(
        bin()
            .args(["profile", "--patch", "32", "--samples"])
            .arg(&list)
            .arg("--weights")
            .arg(fixture("vqvae2_small.weights.safetensors"))
            .arg("--output")
            .arg(missing.join("p.csv")),
    );
    assert!(
        e.contains("--output") && e.contains("does not exist") && !e.contains("patches"),
        "{e}"
    );
    // Training names --output, not a sidecar written at the end.
    let e = fails(
        bin()
            .args([
                "vqvae2",
                "train",
                "--patch",
                "32",
                "--steps",
                "2",
                "--samples",
            ])
            .arg(&list)
            .arg("--init")
            .arg(fixture("vqvae2_small.weights.safetensors"))
            .arg("--output")
            .arg(missing.join("W.safetensors")),
    );
    assert!(
        e.contains("--output") && e.contains("does not exist") && !e.contains("metrics"),
        "{e}"
    );
    assert!(!missing.exists());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn screen_predict_takes_one_image_file() {
    let dir = tempdir("one");
    let weights = fixture("densenet_small.weights.safetensors");
    let good = dir.join("cell.png");
    png(&good, 64, 48);
    let out = dir.join("pred.csv");
    let e = succeeds(
        bin()
            .args(["screen", "predict", "--weights"])
            .arg(&weights)
            .arg("--images")
            .arg(&good)
            .arg("--output")
            .arg(&out),
    );
    assert!(e.contains("predicted 1 images"), "{e}");
    // An undecodable image is named with its decoding error (not read as a
    // CSV list), and nothing predicted is a failure.
    let bad = dir.join("bad.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nxxxx").unwrap();
    let e = fails(
        bin()
            .args(["screen", "predict", "--weights"])
            .arg(&weights)
            .arg("--images")
            .arg(&bad)
            .arg("--output")
            .arg(dir.join("pred2.csv")),
    );
    assert!(e.contains("bad.png") && !e.contains("UTF-8"), "{e}");
    assert!(e.contains("no image of"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

// ---- `vqvae2 train --resume` on damaged and foreign checkpoints.

/// A sample list of the three real nucleus images in `tests/data`.
fn real_samples(dir: &Path) -> PathBuf {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut s = String::from("sample,image\n");
    for (name, path) in [
        ("bbbc007", "bbbc007/A9/A9_p5d.png"),
        ("fly", "examplefly/01_POS002_D.png"),
        ("dsb", "stardist_dsb2018/img2d.png"),
    ] {
        s.push_str(&format!("{name},{}\n", data.join(path).display()));
    }
    let list = dir.join("samples.csv");
    std::fs::write(&list, s).unwrap();
    list
}

/// `vqvae2 train` with a small recipe (seconds, learning rate 2e-3 unless
/// `extra` gives one); `paths` are (flag, path).
fn vqvae2_train(extra: &[&str], paths: &[(&str, &Path)]) -> Command {
    let mut c = bin();
    c.args([
        "vqvae2",
        "train",
        "--patch",
        "32",
        "--batch-size",
        "4",
        "--steps-per-epoch",
        "5",
        "--eval-patches",
        "8",
        "--val-fraction",
        "0.34",
    ]);
    if !extra.contains(&"--lr") {
        c.args(["--lr", "2e-3"]);
    }
    c.args(extra);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    c
}

/// A copy of the checkpoint `from` at `to` with `change` applied to its
/// tensors and metadata, written without its checksum (as a checkpoint
/// from before the checksum, which gets every other check); `f16` names a
/// tensor to store in F16.
fn rewrite(
    from: &Path,
    to: &Path,
    f16: Option<&str>,
    change: impl FnOnce(
        &mut std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>,
        &mut std::collections::HashMap<String, String>,
    ),
) {
    let f = cellmorph::io::TensorFile::open(from).unwrap();
    let mut tensors = f
        .names()
        .into_iter()
        .map(|n| {
            let t = f.f32(&n).unwrap();
            (n, t)
        })
        .collect();
    let mut meta = f.metadata().unwrap().clone();
    meta.remove("cellmorph.checksum");
    change(&mut tensors, &mut meta);
    let mut w = cellmorph::io::TensorWriter::new();
    for (name, (shape, v)) in &tensors {
        if Some(name.as_str()) == f16 {
            let h: Vec<half::f16> = v.iter().map(|x| half::f16::from_f32(*x)).collect();
            w.add_slice(name, shape, &h).unwrap();
        } else {
            w.add_slice(name, shape, v).unwrap();
        }
    }
    for (k, v) in &meta {
        w.set_metadata(k, v);
    }
    w.write(to).unwrap();
}

/// Every kind of bad checkpoint given to `vqvae2 train --resume` is refused
/// before any training with an error naming the file and what is wrong
/// (the tensor, the metadata, the options); the output is not written, and
/// the good checkpoint still resumes.
#[test]
fn vqvae2_resume_refuses_damaged_and_foreign_checkpoints() {
    let dir = tempdir("resume");
    let list = real_samples(&dir);
    let w0 = dir.join("w0.safetensors");
    succeeds(bin().args([
        "vqvae2",
        "init",
        "--channel",
        "16",
        "--n-res-channel",
        "8",
        "--embed-dim",
        "8",
        "--n-embed",
        "16",
        "--patch",
        "32",
        "--samples",
        list.to_str().unwrap(),
        "--output",
        w0.to_str().unwrap(),
    ]));
    let first = dir.join("r.safetensors");
    succeeds(&mut vqvae2_train(
        &["--steps", "5"],
        &[("--samples", &list), ("--init", &w0), ("--output", &first)],
    ));
    let ck = dir.join("r.checkpoint.safetensors");
    let good = std::fs::read(&ck).unwrap();
    let bad = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let flip = |at: usize| {
        let mut b = good.clone();
        b[at] ^= 0x10;
        b
    };
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let rewritten = |name: &str, f16: Option<&str>, change: &dyn Fn(&mut _, &mut _)| {
        let p = dir.join(name);
        rewrite(&ck, &p, f16, |t, m| change(t, m));
        p
    };
    let set_steps = |m: &mut std::collections::HashMap<String, String>, v: &str| {
        let n: Vec<u64> = serde_json::from_str(&m["cellmorph.optimizer_steps"]).unwrap();
        let s = vec![v; n.len()].join(",");
        m.insert("cellmorph.optimizer_steps".into(), format!("[{s}]"));
    };
    let cases: Vec<(PathBuf, Vec<&str>)> = vec![
        (
            bad("truncated.safetensors", &good[..good.len() / 2]),
            vec!["truncated or corrupt"],
        ),
        (
            bad("huge-header.safetensors", &huge),
            vec!["not a valid safetensors"],
        ),
        (
            bad("flip-data.safetensors", &flip(good.len() - 3)),
            vec!["changed or damaged"],
        ),
        (
            // A byte of the header (inside the JSON): refused either way.
            bad("flip-header.safetensors", &flip(8 + header_len / 2)),
            vec![],
        ),
        (
            rewritten("extra.safetensors", None, &|t, _| {
                t.insert("extra.weight".into(), (vec![2], vec![0.5, 0.5]));
            }),
            vec!["unexpected tensor \"extra.weight\""],
        ),
        (
            rewritten("missing.safetensors", None, &|t, _| {
                t.remove("dec.blocks.0.bias");
            }),
            vec!["missing tensor \"dec.blocks.0.bias\""],
        ),
        (
            rewritten("shape.safetensors", None, &|t, _| {
                let (s, v) = t.get_mut("dec.blocks.0.bias").unwrap();
                v.push(0.0);
                s[0] += 1;
            }),
            vec!["\"dec.blocks.0.bias\"", "shape"],
        ),
        (
            rewritten(
                "dtype.safetensors",
                Some("enc_b.blocks.0.weight"),
                &|_, _| {},
            ),
            vec!["\"enc_b.blocks.0.weight\"", "F16"],
        ),
        (
            rewritten("nan.safetensors", None, &|t, _| {
                t.get_mut("quantize_b.embed").unwrap().1[3] = f32::NAN;
            }),
            vec!["\"quantize_b.embed\"", "non-finite"],
        ),
        (
            rewritten("nan-state.safetensors", None, &|t, _| {
                t.get_mut("optimizer.dec.blocks.0.weight.exp_avg_sq")
                    .unwrap()
                    .1[0] = f32::INFINITY;
            }),
            vec!["dec.blocks.0.weight", "exp_avg_sq", "non-finite"],
        ),
        (
            rewritten("step-negative.safetensors", None, &|_, m| {
                set_steps(m, "-5")
            }),
            vec!["cellmorph.optimizer_steps", "-5"],
        ),
        (
            rewritten("step-absurd.safetensors", None, &|_, m| {
                set_steps(m, "18446744073709551615")
            }),
            vec!["step count", "beyond"],
        ),
        (
            rewritten("step-ahead.safetensors", None, &|_, m| set_steps(m, "1000")),
            vec!["took 1000 steps", "progress says 5"],
        ),
        (
            rewritten("progress.safetensors", None, &|_, m| {
                m.insert("cellmorph.progress".into(), "{\"step\": 5}".into());
            }),
            vec!["checkpoint progress"],
        ),
        // Another model's weights, and this run's own output weights.
        (
            fixture("densenet_small.weights.safetensors"),
            vec!["not a vq-vae-2-pytorch VQVAE"],
        ),
        (first.clone(), vec!["not a cellmorph training checkpoint"]),
    ];
    let out = dir.join("x.safetensors");
    for (path, needles) in &cases {
        let e = fails(&mut vqvae2_train(
            &["--steps", "10"],
            &[("--samples", &list), ("--resume", path), ("--output", &out)],
        ));
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(e.contains(name), "{name}: the error does not name it: {e}");
        for n in needles {
            assert!(e.contains(n), "{name}: {e:?} lacks {n:?}");
        }
        assert!(!out.exists(), "{name}: an output was written");
    }
    // Other flags than the checkpoint was written with: refused.
    let e = fails(&mut vqvae2_train(
        &["--steps", "10", "--lr", "1e-3"],
        &[("--samples", &list), ("--resume", &ck), ("--output", &out)],
    ));
    assert!(
        e.contains("r.checkpoint.safetensors") && e.contains("other options"),
        "{e}"
    );
    // The good checkpoint resumes.
    succeeds(&mut vqvae2_train(
        &["--steps", "6"],
        &[("--samples", &list), ("--resume", &ck), ("--output", &out)],
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `before.` state of a training golden (`tests/fixtures/*_train_step`)
/// as a weights file, and its batch, for `train-step`; `change` edits the
/// weights' f32 tensors first.
fn train_step_inputs(
    model: &str,
    dir: &Path,
    tag: &str,
    change: impl FnOnce(&mut std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>),
) -> (PathBuf, PathBuf) {
    let f = cellmorph::io::TensorFile::open(fixture(&format!("{model}_train_step.safetensors")))
        .unwrap();
    let strip = |n: &str| -> Option<String> {
        ["", "G.", "D."].iter().find_map(|p| {
            n.strip_prefix(&format!("{p}before."))
                .map(|r| format!("{p}{r}"))
        })
    };
    let mut floats = std::collections::BTreeMap::new();
    let mut w = cellmorph::io::TensorWriter::new();
    for n in f.names() {
        let Some(name) = strip(&n) else { continue };
        if n.ends_with("num_batches_tracked") {
            let (s, v) = f.i64(&n).unwrap();
            w.add_slice(&name, &s, &v).unwrap();
        } else {
            floats.insert(name, f.f32(&n).unwrap());
        }
    }
    change(&mut floats);
    for (name, (s, v)) in &floats {
        w.add_slice(name, s, v).unwrap();
    }
    let weights = dir.join(format!("{model}-{tag}.safetensors"));
    w.write(&weights).unwrap();
    let mut b = cellmorph::io::TensorWriter::new();
    for name in ["input", "z", "x", "x_real"] {
        if f.contains(name) {
            let (s, v) = f.f32(name).unwrap();
            b.add_slice(name, &s, &v).unwrap();
        }
    }
    if f.contains("labels") {
        let (s, v) = f.i64("labels").unwrap();
        b.add_slice("labels", &s, &v).unwrap();
    }
    let batch = dir.join(format!("{model}-batch.safetensors"));
    b.write(&batch).unwrap();
    (weights, batch)
}

/// `train-step` weights that are damaged or not the model's (an extra or a
/// missing tensor, NaN, a truncated file, a huge header length): an error
/// naming the file and the tensor, and no output; the intact weights step.
#[test]
fn train_step_refuses_bad_weights_by_name() {
    let dir = tempdir("train-step");
    type Tensors = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;
    /// Changes the weights and returns the tensor it concerns.
    type Change<'a> = Box<dyn Fn(&mut Tensors) -> String + 'a>;
    for (model, g) in [("vqvae2", ""), ("densenet", ""), ("cp2image", "G.")] {
        let out = dir.join(format!("{model}-out.safetensors"));
        let step = |weights: &Path, batch: &Path| {
            let mut c = bin();
            c.args(["train-step", "--model", model, "--weights"])
                .arg(weights)
                .arg("--batch")
                .arg(batch)
                .arg("--output")
                .arg(&out);
            c
        };
        let (good, batch) = train_step_inputs(model, &dir, "good", |_| {});
        succeeds(&mut step(&good, &batch));
        std::fs::remove_file(&out).unwrap();
        let first = |t: &Tensors| {
            t.keys()
                .find(|k| k.starts_with(g) && k.ends_with("weight"))
                .unwrap()
                .clone()
        };
        let cases: Vec<(&str, Change, &str)> = vec![
            (
                "extra",
                Box::new(|t: &mut Tensors| {
                    let name = format!("{g}extra.weight");
                    t.insert(name.clone(), (vec![2], vec![1.0, 2.0]));
                    name
                }),
                "not part of",
            ),
            (
                "missing",
                Box::new(|t: &mut Tensors| {
                    let name = first(t);
                    t.remove(&name);
                    name
                }),
                "missing",
            ),
            (
                "nan",
                Box::new(|t: &mut Tensors| {
                    let name = first(t);
                    t.get_mut(&name).unwrap().1[0] = f32::NAN;
                    name
                }),
                "non-finite",
            ),
        ];
        for (tag, change, needle) in cases {
            let mut named = String::new();
            let (w, batch) = train_step_inputs(model, &dir, tag, |t| named = change(t));
            let e = fails(&mut step(&w, &batch));
            let file = format!("{model}-{tag}.safetensors");
            assert!(
                e.contains(&file) && e.contains(needle),
                "{model} {tag}: {e}"
            );
            // The tensor is named (DenseNet's head names its layer).
            let stem = named.rsplit_once('.').unwrap().0;
            assert!(e.contains(stem), "{model} {tag}: {e} does not name {named}");
            assert!(!out.exists(), "{model} {tag}: an output was written");
        }
        let bytes = std::fs::read(&good).unwrap();
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        for (tag, b) in [("short", &bytes[..bytes.len() - 5]), ("huge", &huge[..])] {
            let p = dir.join(format!("{model}-{tag}.safetensors"));
            std::fs::write(&p, b).unwrap();
            let e = fails(&mut step(&p, &batch));
            assert!(
                e.contains(&format!("{model}-{tag}.safetensors"))
                    && e.contains("not a valid safetensors"),
                "{model} {tag}: {e}"
            );
            assert!(!out.exists());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
