//! `cellmorph expression tiles` on the real images and masks of tests/data,
//! and per-batch correction of profiles (`--batch-correct` of `svr grid`,
//! `svr cv`, `svr predict`): tiles → profile → leave-one-batch-out CV.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cellmorph::imaging::read_gray;
use cellmorph::table::Table;

fn data(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(p)
}

fn tempdir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("expression_tiles-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str], paths: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cellmorph"));
    c.args(args);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    c.output().unwrap()
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn err(out: Output, what: &str) -> String {
    assert!(!out.status.success(), "{what} should have failed");
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!e.contains("panicked"), "{what}: {e}");
    e
}

/// The tile list of the three test images with their masks and batches.
fn tile_list(dir: &Path) -> PathBuf {
    let list = dir.join("list.csv");
    let mut s = String::from("image,labels,batch\n");
    for (img, mask, batch) in [
        (
            "bbbc007/A9/A9_p5d.png",
            "bbbc007/A9/A9_p5d_labels.png",
            "bbbc007",
        ),
        (
            "examplefly/01_POS002_D.png",
            "examplefly/nuclei_labels/01_POS002_nuclei.png",
            "examplefly",
        ),
        (
            "stardist_dsb2018/img2d.png",
            "stardist_dsb2018/mask2d.png",
            "dsb2018",
        ),
    ] {
        s.push_str(&format!(
            "{},{},{batch}\n",
            data(img).display(),
            data(mask).display()
        ));
    }
    std::fs::write(&list, s).unwrap();
    list
}

#[test]
fn tiles_cut_the_grid_and_measure_the_masks() {
    let dir = tempdir("grid");
    let list = tile_list(&dir);
    let out = dir.join("tiles");
    ok(
        run(
            &["expression", "tiles"],
            &[("--images", &list), ("--output-dir", &out)],
        ),
        "tiles",
    );
    // 450² → 2×2 tiles of 160, 1000×1006 → 6×6, 512² → 3×3.
    let samples = std::fs::read_to_string(out.join("samples.csv")).unwrap();
    assert_eq!(samples.lines().count(), 1 + 4 + 36 + 9);
    assert!(samples.starts_with("sample,image,batch,source,x,y\n"));
    let targets = Table::read_csv(out.join("targets.csv")).unwrap();
    assert_eq!(targets.n_rows(), 49);
    assert_eq!(
        targets.col_names,
        ["nuclei", "foreground_fraction", "mean_intensity"]
    );
    for r in 0..targets.n_rows() {
        let row = targets.row(r);
        assert!(row[0] >= 0.0 && (0.0..=1.0).contains(&row[1]) && (0.0..=1.0).contains(&row[2]));
    }
    // A tile is the source crop, pixel for pixel, at the source bit depth.
    let src = read_gray(data("stardist_dsb2018/img2d.png")).unwrap();
    let tile = read_gray(out.join("tiles/img2d_y160_x320.png")).unwrap();
    assert_eq!(
        (tile.width(), tile.height(), tile.depth()),
        (160, 160, src.depth())
    );
    for y in 0..160 {
        for x in 0..160 {
            assert_eq!(tile.pixel(x, y), src.pixel(320 + x, 160 + y));
        }
    }
    // The same tile's foreground fraction, counted here from the mask.
    let mask = read_gray(data("stardist_dsb2018/mask2d.png")).unwrap();
    let fg = (0..160)
        .flat_map(|y| (0..160).map(move |x| (x, y)))
        .filter(|&(x, y)| mask.pixel(320 + x, 160 + y) != Some(0))
        .count();
    let r = targets.row_index("img2d_y160_x320").unwrap();
    assert_eq!(targets.row(r)[1], fg as f64 / (160.0 * 160.0));

    // Into a non-empty folder: refused, nothing changed.
    let before = std::fs::read(out.join("samples.csv")).unwrap();
    let e = err(
        run(
            &["expression", "tiles"],
            &[("--images", &list), ("--output-dir", &out)],
        ),
        "tiles into a used folder",
    );
    assert!(e.contains("not empty"), "{e}");
    assert_eq!(std::fs::read(out.join("samples.csv")).unwrap(), before);
}

#[test]
fn fractional_counts_of_an_exact_cover_sum_to_the_objects() {
    // 512 = 2 × 256: four tiles cover the DSB image exactly, so every object
    // is split among them and the fractional counts sum to the object count.
    let dir = tempdir("cover");
    let list = dir.join("list.csv");
    std::fs::write(
        &list,
        format!(
            "image,labels\n{},{}\n",
            data("stardist_dsb2018/img2d.png").display(),
            data("stardist_dsb2018/mask2d.png").display()
        ),
    )
    .unwrap();
    let out = dir.join("tiles");
    ok(
        run(
            &["expression", "tiles", "--size", "256"],
            &[("--images", &list), ("--output-dir", &out)],
        ),
        "tiles",
    );
    let targets = Table::read_csv(out.join("targets.csv")).unwrap();
    assert_eq!(targets.n_rows(), 4);
    let sum: f64 = targets.column(0).iter().sum();
    let mask = read_gray(data("stardist_dsb2018/mask2d.png")).unwrap();
    let objects: std::collections::BTreeSet<u16> =
        mask.data().iter().copied().filter(|&l| l != 0).collect();
    // Four sums of terms ≤ 1, each exact to an ulp: far inside 1e-9.
    assert!(
        (sum - objects.len() as f64).abs() < 1e-9,
        "{sum} vs {}",
        objects.len()
    );
}

#[test]
fn tiles_errors_name_the_input() {
    let dir = tempdir("errors");
    let list = dir.join("list.csv");
    std::fs::write(
        &list,
        format!(
            "image,labels\n{},{}\n",
            data("stardist_dsb2018/img2d.png").display(),
            data("bbbc007/A9/A9_p5d_labels.png").display()
        ),
    )
    .unwrap();
    let e = err(
        run(
            &["expression", "tiles"],
            &[("--images", &list), ("--output-dir", &dir.join("o"))],
        ),
        "mask of another size",
    );
    assert!(
        e.contains("A9_p5d_labels.png") && e.contains("450×450"),
        "{e}"
    );
    assert!(!dir.join("o").exists(), "nothing written on a bad input");

    let e = err(
        run(
            &["expression", "tiles", "--size", "600"],
            &[
                ("--images", &tile_list(&dir)),
                ("--output-dir", &dir.join("o")),
            ],
        ),
        "tile larger than the image",
    );
    assert!(
        e.contains("A9_p5d.png") && e.contains("smaller than one 600×600 tile"),
        "{e}"
    );
}

/// tiles → profile (the small test weights) shared by the batch tests.
fn profiles(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let out = dir.join("tiles");
    ok(
        run(
            &["expression", "tiles"],
            &[("--images", &tile_list(dir)), ("--output-dir", &out)],
        ),
        "tiles",
    );
    let profiles = dir.join("profiles.csv");
    let weights = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vqvae2_small.weights.safetensors");
    ok(
        run(
            &["profile", "--patch", "80", "--batch-size", "8"],
            &[
                ("--samples", &out.join("samples.csv")),
                ("--weights", &weights),
                ("--output", &profiles),
            ],
        ),
        "profile",
    );
    (profiles, out.join("targets.csv"), out.join("samples.csv"))
}

#[test]
fn batch_correction_in_cv_grid_and_predict() {
    let dir = tempdir("batch");
    let (features, targets, samples) = profiles(&dir);
    let cv = |extra: &[&str], out: &Path| {
        let mut args = vec![
            "svr",
            "cv",
            "--c",
            "1",
            "--epsilon",
            "0.1",
            "--group-column",
            "batch",
            "--leave-one-group-out",
        ];
        args.extend_from_slice(extra);
        run(
            &args,
            &[
                ("--features", &features),
                ("--expression", &targets),
                ("--groups", &samples),
                ("--output", out),
            ],
        )
    };
    let plain = dir.join("plain.csv");
    ok(cv(&[], &plain), "cv");
    let centred = dir.join("center.csv");
    ok(cv(&["--batch-correct", "center"], &centred), "cv center");
    let plain = Table::read_csv(&plain).unwrap();
    let centred = Table::read_csv(&centred).unwrap();
    assert_eq!(plain.row_names, centred.row_names);
    assert_ne!(plain.data, centred.data, "the correction changes the fits");

    // By hand: centring each batch of the profiles and running plain cv on
    // that table gives the same predictions (the correction is label-free
    // and made once, before the folds).
    let f = Table::read_csv(&features).unwrap();
    let t = Table::read_csv(&targets).unwrap();
    let f = f.select_rows(&t.row_names).unwrap();
    let batches = cellmorph::apps::expression::cv::read_groups(
        &cellmorph::apps::expression::cv::GroupFile {
            path: samples.clone(),
            column: "batch".into(),
        },
        &f.row_names,
    )
    .unwrap();
    let by_hand = cellmorph::apps::expression::batch::correct_batches(
        &f,
        &batches,
        cellmorph::apps::expression::batch::BatchCorrection::Center,
    )
    .unwrap();
    for b in ["bbbc007", "examplefly", "dsb2018"] {
        let rows: Vec<usize> = (0..f.n_rows()).filter(|&r| batches[r] == b).collect();
        for c in 0..f.n_cols() {
            let mean: f64 =
                rows.iter().map(|&r| by_hand.row(r)[c]).sum::<f64>() / rows.len() as f64;
            assert!(mean.abs() < 1e-9, "batch {b} column {c}: mean {mean}");
        }
    }
    let hand_csv = dir.join("hand.csv");
    by_hand.write_csv(&hand_csv).unwrap();
    let hand_out = dir.join("hand_out.csv");
    ok(
        run(
            &[
                "svr",
                "cv",
                "--c",
                "1",
                "--epsilon",
                "0.1",
                "--group-column",
                "batch",
                "--leave-one-group-out",
            ],
            &[
                ("--features", &hand_csv),
                ("--expression", &targets),
                ("--groups", &samples),
                ("--output", &hand_out),
            ],
        ),
        "cv by hand",
    );
    let hand = Table::read_csv(&hand_out).unwrap();
    // The CSV round trip of the corrected table is exact (shortest
    // round-trip formatting), so the fits are the same bits.
    assert_eq!(hand.data, centred.data);

    // svr grid records the correction; predict then needs the batches.
    let model = dir.join("model.json");
    ok(
        run(
            &[
                "svr",
                "grid",
                "--c",
                "0.1,1",
                "--epsilon",
                "0.1",
                "--batch-correct",
                "standardize",
            ],
            &[
                ("--features", &features),
                ("--expression", &targets),
                ("--batches", &samples),
                ("--output", &model),
            ],
        ),
        "grid",
    );
    let json = std::fs::read_to_string(&model).unwrap();
    assert!(
        json.contains("\"batch_correction\": \"standardize\""),
        "{json}"
    );
    let pred = dir.join("pred.csv");
    let e = err(
        run(
            &["svr", "predict"],
            &[
                ("--model", &model),
                ("--features", &features),
                ("--output", &pred),
            ],
        ),
        "predict without batches",
    );
    assert!(e.contains("--batches") && e.contains("standardize"), "{e}");
    assert!(!pred.exists());
    ok(
        run(
            &["svr", "predict"],
            &[
                ("--model", &model),
                ("--features", &features),
                ("--batches", &samples),
                ("--output", &pred),
            ],
        ),
        "predict with batches",
    );
    assert_eq!(Table::read_csv(&pred).unwrap().n_rows(), 49);
    // expression evaluate predicts without batches: refused, not silently wrong.
    let e = err(
        run(
            &["expression", "evaluate"],
            &[
                ("--model", &model),
                (
                    "--dataset",
                    Path::new(&format!(
                        "tiles={},{}",
                        features.display(),
                        targets.display()
                    )),
                ),
                ("--output", &dir.join("eval.csv")),
            ],
        ),
        "evaluate a batch-corrected model",
    );
    assert!(e.contains("batch-corrected"), "{e}");
    // So does map (it predicts patch by patch, with no batch to correct in).
    let weights = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vqvae2_small.weights.safetensors");
    let map_png = dir.join("map.png");
    let e = err(
        run(
            &["map", "--gene", "nuclei", "--patch", "80"],
            &[
                ("--weights", &weights),
                ("--model", &model),
                ("--image", &data("stardist_dsb2018/img2d.png")),
                ("--output", &map_png),
            ],
        ),
        "map from a batch-corrected model",
    );
    assert!(e.contains("batch-corrected"), "{e}");
    assert!(!map_png.exists());

    let e = err(
        run(
            &["svr", "grid", "--c", "1", "--epsilon", "0.1"],
            &[
                ("--features", &features),
                ("--expression", &targets),
                ("--batches", &samples),
                ("--output", &dir.join("m2.json")),
            ],
        ),
        "--batches without --batch-correct",
    );
    assert!(e.contains("--batch-correct"), "{e}");
}
