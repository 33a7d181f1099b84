//! Careless and hostile use of the command line (issue 16): output folders
//! that hold another run's files, outputs whose folder is missing, patches
//! too small for the model, tables that disagree, a single image file to
//! screen. Each case exits non-zero with a message naming what the user
//! gave, or succeeds without mixing runs.

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

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cellmorph-hard-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
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
