//! The screening pipeline (docs/MODELS.md §2): pre-processing, image lists,
//! batch prediction with skips, the predictions and features files, the
//! evaluation against `tests/fixtures/metrics.json` (scikit-learn), class
//! activation maps, and the `cellmorph screen` command line.
//!
//! Tolerances: resizing and scaling are checked against values worked out by
//! hand (PyTorch's conventions) to 1e-5 (f32 rounding of a few operations on
//! values ≤ 255); metrics to 1e-12 relative (closed forms over counts);
//! predictions through `predict` must equal running the network directly on
//! the same pre-processed input exactly on the CPU (same code path), and
//! within 1e-5 of it under emulation (summation order).

mod common;

use std::path::{Path, PathBuf};

use cellmorph::apps::screening::cam::cam_overlay;
use cellmorph::apps::screening::files::{
    read_labels, read_predictions, write_features, write_predictions,
};
use cellmorph::apps::screening::images::{list_images, ImageEntry};
use cellmorph::apps::screening::predict::{predict, PredictOptions};
use cellmorph::apps::screening::preprocess::{
    preprocess, resize, value_channel, Prepared, Preprocess, SkipReason, IMAGENET_MEAN,
    IMAGENET_STD,
};
use cellmorph::apps::screening::report::evaluate;
use cellmorph::imaging::{BitDepth, GrayImage};
use cellmorph::io::TensorFile;
use cellmorph::models::densenet::DenseNet;
use cellmorph::{Backend, Device, Tensor};
use serde::Deserialize;

fn tmp(tag: &str) -> common::TempDir {
    common::TempDir::new("screen", tag)
}

fn small_weights() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/densenet_small.weights.safetensors")
}

fn assert_near(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{i}]: {g} vs {w}");
    }
}

/// A deterministic 8-bit test image: a smooth pattern plus a ramp, values
/// in [lo, lo + span].
fn pattern(w: usize, h: usize, lo: u16, span: u16) -> GrayImage {
    let data = (0..h)
        .flat_map(|y| {
            (0..w).map(move |x| {
                let t = ((x as f32 * 0.37).sin() * 0.5 + 0.5) * 0.6 + (y as f32 / h as f32) * 0.4;
                lo + (t * f32::from(span)).round() as u16
            })
        })
        .collect();
    GrayImage::new(w, h, BitDepth::Eight, data).unwrap()
}

// ---------------------------------------------------------------------------
// Resizing and pre-processing
// ---------------------------------------------------------------------------

#[test]
fn resize_area_averages_integer_factors() {
    // 4×6 → 2×3: means of 2×2 blocks.
    let src: Vec<f32> = (0..24).map(|v| v as f32).collect();
    let out = resize(&src, (4, 6), (2, 3)).unwrap();
    assert_near("area", &out, &[3.5, 5.5, 7.5, 15.5, 17.5, 19.5], 1e-6);
    // Different factors per axis (4×6 → 1×2: 4×3 blocks), and the identity.
    let out = resize(&src, (4, 6), (1, 2)).unwrap();
    assert_near("area 4×3", &out, &[10.0, 13.0], 1e-6);
    assert_eq!(resize(&src, (4, 6), (4, 6)).unwrap(), src);
}

#[test]
fn resize_bilinear_follows_pytorch_half_pixel_convention() {
    // F.interpolate([[0, 1], [2, 3]], size=(4, 4), mode="bilinear",
    // align_corners=False): source coordinates clamp at 0 and the last pixel.
    let out = resize(&[0.0, 1.0, 2.0, 3.0], (2, 2), (4, 4)).unwrap();
    #[rustfmt::skip]
    let want = [
        0.0, 0.25, 0.75, 1.0,
        0.5, 0.75, 1.25, 1.5,
        1.5, 1.75, 2.25, 2.5,
        2.0, 2.25, 2.75, 3.0,
    ];
    assert_near("2×2→4×4", &out, &want, 1e-6);
    // 5×5 → 3×3 (not an integer factor): source coordinates (d + 0.5)·5/3 − 0.5
    // = 1/3, 2, 11/3; a linear ramp 5y + x is reproduced exactly there.
    let src: Vec<f32> = (0..25).map(|v| v as f32).collect();
    let out = resize(&src, (5, 5), (3, 3)).unwrap();
    let s = [1.0 / 3.0, 2.0, 11.0 / 3.0];
    let want: Vec<f32> = s
        .iter()
        .flat_map(|y| s.iter().map(move |x| 5.0 * y + x))
        .collect();
    assert_near("5×5→3×3", &out, &want, 1e-5);
    // A single pixel stretches to a constant; bad sizes are errors.
    assert_eq!(resize(&[7.0], (1, 1), (3, 2)).unwrap(), vec![7.0; 6]);
    assert!(resize(&[1.0; 5], (2, 3), (1, 1)).is_err());
    assert!(resize(&[1.0; 6], (2, 3), (0, 1)).is_err());
}

#[test]
fn preprocessing_scales_mean_v_to_130_and_resizes() {
    // 452×612 → 226×306 is a factor 2: area averaging keeps the mean, so the
    // output mean is exactly the target (nothing clips: max 60·130/mean < 255).
    let img = pattern(612, 452, 20, 60);
    let v = value_channel(&img);
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
    let Prepared::Image { data, mean_v } = preprocess(&img, &Preprocess::default()).unwrap() else {
        panic!("a mid-gray image must not be skipped");
    };
    assert!((mean_v - mean).abs() < 1e-9);
    let plane = 226 * 306;
    assert_eq!(data.len(), 3 * plane);
    let out_mean = data[..plane].iter().map(|&x| f64::from(x)).sum::<f64>() / plane as f64 * 255.0;
    assert!(
        (out_mean - 130.0).abs() < 1e-3,
        "mean after scaling {out_mean}"
    );
    assert_eq!(
        data[..plane],
        data[plane..2 * plane],
        "gray copied to every channel"
    );
    assert_eq!(data[..plane], data[2 * plane..]);
    // One output pixel by hand: the mean of its 2×2 block, scaled.
    let k = 130.0 / mean;
    let block = [v[0], v[1], v[612], v[613]]
        .iter()
        .map(|&x| f64::from(x) * k)
        .sum::<f64>()
        / 4.0;
    assert!((f64::from(data[0]) - block / 255.0).abs() < 1e-6);

    // ImageNet normalization: (v − mean_c) / std_c per channel.
    let p = Preprocess {
        imagenet_normalize: true,
        ..Preprocess::default()
    };
    let Prepared::Image { data: norm, .. } = preprocess(&img, &p).unwrap() else {
        panic!("not skipped");
    };
    for c in 0..3 {
        let want = (data[c * plane + 17] - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        assert!((norm[c * plane + 17] - want).abs() < 1e-6);
    }
}

#[test]
fn preprocessing_clips_and_handles_any_size_and_depth() {
    // Mostly dark with a bright patch: scaling to mean 130 pushes the patch past 255.
    let mut img = pattern(40, 30, 10, 20);
    let mut data = img.data().to_vec();
    for p in data.iter_mut().take(40 * 5) {
        *p = 250;
    }
    img = GrayImage::new(40, 30, BitDepth::Eight, data).unwrap();
    let p = Preprocess {
        height: 30,
        width: 40,
        ..Preprocess::default()
    };
    let Prepared::Image { data: out, .. } = preprocess(&img, &p).unwrap() else {
        panic!("not skipped");
    };
    assert!(out.iter().all(|&v| (0.0..=1.0).contains(&v)));
    assert_eq!(out[0], 1.0, "the bright patch clips to 255");

    // 16-bit with p16 = 257·p8 is the same image in 8-bit units.
    let wide: Vec<u16> = img.data().iter().map(|&p| p * 257).collect();
    let img16 = GrayImage::new(40, 30, BitDepth::Sixteen, wide).unwrap();
    let Prepared::Image { data: out16, .. } = preprocess(&img16, &p).unwrap() else {
        panic!("not skipped");
    };
    assert_near("16-bit", &out16, &out, 1e-5);

    // Odd sizes, upsampling from the smallest screened size: all give the
    // requested size (smaller images are skipped, below).
    for (w, h) in [(4, 4), (7, 5), (100, 77), (307, 227)] {
        let Prepared::Image { data, .. } =
            preprocess(&pattern(w, h, 50, 100), &Preprocess::default()).unwrap()
        else {
            panic!("{w}×{h}: not skipped");
        };
        assert_eq!(data.len(), 3 * 226 * 306, "{w}×{h}");
        assert!(data.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn bright_and_blank_images_are_skipped_with_reasons() {
    let bright = pattern(20, 10, 231, 10);
    match preprocess(&bright, &Preprocess::default()).unwrap() {
        Prepared::Skipped(SkipReason::TooBright { mean_v, max }) => {
            assert!(mean_v > 230.0 && max == 230.0);
            let msg = SkipReason::TooBright { mean_v, max }.to_string();
            assert!(msg.contains("too bright") && msg.contains("230"), "{msg}");
        }
        other => panic!("expected a too-bright skip, got {other:?}"),
    }
    // Exactly 230 is kept (the filter is mean V > 230).
    let edge = GrayImage::new(4, 4, BitDepth::Eight, vec![230; 16]).unwrap();
    assert!(matches!(
        preprocess(&edge, &Preprocess::default()).unwrap(),
        Prepared::Image { .. }
    ));
    let black = GrayImage::new(4, 4, BitDepth::Eight, vec![0; 16]).unwrap();
    assert_eq!(
        preprocess(&black, &Preprocess::default()).unwrap(),
        Prepared::Skipped(SkipReason::Blank)
    );
    // A 1×1 or 3×8 image is not upscaled and called: skipped, saying why.
    for (w, h) in [(1, 1), (3, 8), (8, 3)] {
        let tiny = GrayImage::new(w, h, BitDepth::Eight, vec![100; w * h]).unwrap();
        let got = preprocess(&tiny, &Preprocess::default()).unwrap();
        assert_eq!(
            got,
            Prepared::Skipped(SkipReason::TooSmall {
                width: w,
                height: h
            })
        );
        if let Prepared::Skipped(r) = got {
            assert!(r.to_string().contains(&format!("{w}×{h}")), "{r}");
        }
    }
}

// ---------------------------------------------------------------------------
// Image lists
// ---------------------------------------------------------------------------

#[test]
fn images_are_listed_from_directories_and_csv() {
    let dir = tmp("list");
    let img = pattern(8, 8, 40, 50);
    for name in ["b.png", "a.TIF", "c.tiff"] {
        img.save(dir.join(name)).unwrap();
    }
    std::fs::write(dir.join("notes.txt"), "x").unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    let list = list_images(&dir).unwrap();
    let ids: Vec<&str> = list.entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["a.TIF", "b.png", "c.tiff"]);
    assert_eq!(list.ignored, vec![dir.join("notes.txt")]);

    let csv = dir.join("sub/list.csv");
    std::fs::write(&csv, "label,image\n1,../b.png\n0,\"../we, ird.png\"\n").unwrap();
    let list = list_images(&csv).unwrap();
    assert_eq!(list.entries[0].id, "../b.png");
    assert_eq!(list.entries[0].path, dir.join("sub/../b.png"));
    assert_eq!(list.entries[1].id, "../we, ird.png");

    std::fs::write(&csv, "path,label\na.png,1\n").unwrap();
    assert!(list_images(&csv)
        .unwrap_err()
        .to_string()
        .contains("`image` column"));
    std::fs::write(&csv, "image\n").unwrap();
    assert!(list_images(&csv)
        .unwrap_err()
        .to_string()
        .contains("no images"));
    let empty = tmp("empty");
    assert!(list_images(&empty)
        .unwrap_err()
        .to_string()
        .contains("no images"));
    assert!(list_images(&empty.join("missing")).is_err());
    std::fs::write(empty.join("a.jpg"), b"jpeg").unwrap();
    let msg = list_images(&empty).unwrap_err().to_string();
    assert!(
        msg.contains("a.jpg") && msg.contains("only PNG and TIFF"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------
// Prediction
// ---------------------------------------------------------------------------

/// A small input size for the small fixture network (5 classes; class 1 is
/// taken as positive).
fn small_pre() -> Preprocess {
    Preprocess {
        height: 40,
        width: 56,
        ..Preprocess::default()
    }
}

/// Writes a run's images: good ones of various kinds plus a too-bright one,
/// a corrupt one and a missing one. Returns the entries and the indices of
/// the good images.
fn write_run(dir: &Path) -> (Vec<ImageEntry>, Vec<usize>) {
    let mut entries = Vec::new();
    let mut good = Vec::new();
    let mut add = |name: &str, ok: bool| {
        if ok {
            good.push(entries.len());
        }
        entries.push(ImageEntry {
            id: name.to_string(),
            path: dir.join(name),
        });
    };
    pattern(112, 80, 30, 90).save(dir.join("g0.png")).unwrap();
    add("g0.png", true);
    pattern(20, 20, 240, 10)
        .save(dir.join("bright.png"))
        .unwrap();
    add("bright.png", false);
    std::fs::write(dir.join("corrupt.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    add("corrupt.png", false);
    let img = pattern(57, 41, 10, 200);
    let wide: Vec<u16> = img.data().iter().map(|&p| p * 200).collect();
    GrayImage::new(57, 41, BitDepth::Sixteen, wide)
        .unwrap()
        .save(dir.join("g1.tif"))
        .unwrap();
    add("g1.tif", true);
    add("missing.png", false);
    // RGB: V = max(R, G, B).
    let rgb = image::RgbImage::from_fn(30, 22, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 7) as u8, 60])
    });
    rgb.save(dir.join("g2.png")).unwrap();
    add("g2.png", true);
    pattern(300, 200, 60, 120).save(dir.join("g3.png")).unwrap();
    add("g3.png", true);
    (entries, good)
}

/// The positive-class probability from running the network directly.
fn direct_probs(
    be: &Backend,
    model: &DenseNet,
    entries: &[ImageEntry],
    good: &[usize],
) -> Vec<f32> {
    let p = small_pre();
    let mut data = Vec::new();
    for &i in good {
        let img = cellmorph::imaging::read_gray(&entries[i].path).unwrap();
        let Prepared::Image { data: d, .. } = preprocess(&img, &p).unwrap() else {
            panic!("{} should be kept", entries[i].id);
        };
        data.extend(d);
    }
    let x = Tensor::from_vec(be, &[good.len(), 3, p.height, p.width], data).unwrap();
    let probs = model.forward(be, &x).unwrap().probs().to_vec().unwrap();
    probs.chunks_exact(5).map(|r| r[1]).collect()
}

fn check_predict(be: &Backend, tol: f32) {
    let dir = tmp(&format!("predict-{}", be.device()));
    let (entries, good) = write_run(&dir);
    let file = TensorFile::open(small_weights()).unwrap();
    let model = DenseNet::from_file(be, &file).unwrap();
    let want = direct_probs(
        &Backend::cpu(),
        &DenseNet::from_file(&Backend::cpu(), &file).unwrap(),
        &entries,
        &good,
    );
    for batch in [1, 2, 3, 16] {
        let options = PredictOptions {
            batch_size: batch,
            preprocess: small_pre(),
            keep_features: true,
            ..PredictOptions::default()
        };
        let mut seen = Vec::new();
        let run = predict(be, &model, &entries, &options, |d| seen.push(d)).unwrap();
        assert_eq!(
            seen.last(),
            Some(&entries.len()),
            "progress reaches the end"
        );
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(run.predictions.len(), entries.len());
        assert_eq!(run.timing.images, good.len());
        let ids: Vec<&str> = run.predictions.iter().map(|p| p.id.as_str()).collect();
        let want_ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, want_ids, "input order is kept");
        let got: Vec<f32> = good
            .iter()
            .map(|&i| run.predictions[i].outcome.as_ref().unwrap().probability)
            .collect();
        assert_near(&format!("batch {batch}"), &got, &want, tol);
        for p in &run.predictions {
            if let Ok(v) = &p.outcome {
                assert_eq!(v.positive, f64::from(v.probability) >= 0.5);
                assert_eq!(v.features.as_ref().map(Vec::len), Some(36));
            }
        }
        let reasons: Vec<String> = run.skipped().map(|(id, r)| format!("{id}: {r}")).collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(
            reasons[0].starts_with("bright.png: too bright"),
            "{reasons:?}"
        );
        assert!(
            reasons[1].starts_with("corrupt.png: unreadable") && reasons[1].contains("corrupt"),
            "{reasons:?}"
        );
        assert!(
            reasons[2].starts_with("missing.png: unreadable"),
            "{reasons:?}"
        );
    }
}

#[test]
fn predict_skips_bad_images_and_matches_the_network_cpu() {
    check_predict(&Backend::cpu(), 0.0);
}

#[test]
fn predict_emulated_matches_cpu() {
    check_predict(&Backend::new(Device::Emulated).unwrap(), 1e-5);
}

#[test]
fn predict_rejects_bad_options() {
    let be = Backend::cpu();
    let model = DenseNet::from_file(&be, &TensorFile::open(small_weights()).unwrap()).unwrap();
    let entries = [ImageEntry {
        id: "x".into(),
        path: "x.png".into(),
    }];
    let bad = |o: PredictOptions| {
        predict(&be, &model, &entries, &o, |_| {})
            .unwrap_err()
            .to_string()
    };
    let base = PredictOptions {
        preprocess: small_pre(),
        ..PredictOptions::default()
    };
    assert!(bad(PredictOptions {
        batch_size: 0,
        ..base.clone()
    })
    .contains("batch size"));
    assert!(bad(PredictOptions {
        positive_class: 5,
        ..base.clone()
    })
    .contains("positive class 5"));
    let one = Preprocess {
        channels: 1,
        ..small_pre()
    };
    assert!(bad(PredictOptions {
        preprocess: one,
        ..base.clone()
    })
    .contains("channels"));
    let tiny = Preprocess {
        height: 8,
        width: 8,
        ..small_pre()
    };
    assert!(bad(PredictOptions {
        preprocess: tiny,
        ..base
    })
    .contains("too small"));
}

#[test]
fn predictions_and_features_files_round_trip() {
    let be = Backend::cpu();
    let dir = tmp("files");
    let (entries, good) = write_run(&dir);
    let model = DenseNet::from_file(&be, &TensorFile::open(small_weights()).unwrap()).unwrap();
    let options = PredictOptions {
        batch_size: 2,
        preprocess: small_pre(),
        keep_features: true,
        ..PredictOptions::default()
    };
    let run = predict(&be, &model, &entries, &options, |_| {}).unwrap();
    let csv = dir.join("predictions.csv");
    write_predictions(&csv, &run, "w.safetensors").unwrap();
    let back = read_predictions(&csv).unwrap();
    assert_eq!(back.rows.len(), entries.len());
    assert_eq!(back.images, Some(good.len()));
    assert!(back.total_seconds.is_some_and(|s| s > 0.0));
    assert!(back.inference_seconds.is_some_and(|s| s > 0.0));
    assert_eq!(back.device.as_deref(), Some(run.device.as_str()));
    for (row, p) in back.rows.iter().zip(&run.predictions) {
        assert_eq!(row.id, p.id);
        match &p.outcome {
            Ok(v) => assert_eq!(row.probability.map(|x| x as f32), Some(v.probability)),
            Err(r) => {
                assert_eq!(row.probability, None);
                assert_eq!(row.reason.as_deref(), Some(r.to_string().as_str()));
            }
        }
    }
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(text.contains("\nimage,status,prob_positive,prediction,mean_v,reason\n"));
    assert!(text.contains("# images_per_second: "));

    let features: Vec<Vec<f32>> = good
        .iter()
        .map(|&i| {
            run.predictions[i]
                .outcome
                .as_ref()
                .unwrap()
                .features
                .clone()
                .unwrap()
        })
        .collect();
    let st = dir.join("features.safetensors");
    write_features(&st, &run).unwrap();
    let f = TensorFile::open(&st).unwrap();
    let (shape, data) = f.f32("features").unwrap();
    assert_eq!(shape, vec![good.len(), 36]);
    assert_eq!(data, features.concat());
    let ids: Vec<String> = serde_json::from_str(&f.metadata().unwrap()["images"]).unwrap();
    assert_eq!(
        ids,
        good.iter()
            .map(|&i| entries[i].id.clone())
            .collect::<Vec<_>>()
    );
    let fcsv = dir.join("features.csv");
    write_features(&fcsv, &run).unwrap();
    let text = std::fs::read_to_string(&fcsv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), good.len() + 1);
    assert!(lines[0].starts_with("image,f0,f1,") && lines[0].ends_with(",f35"));
    let first: Vec<f32> = lines[1]
        .split(',')
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(first, features[0]);
    assert!(write_features(&dir.join("f.npy"), &run).is_err());
}

// ---------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
struct BinaryCase {
    kind: String,
    #[serde(default)]
    y_true: Vec<u8>,
    #[serde(default)]
    score: Vec<f64>,
    #[serde(default)]
    threshold: f64,
    #[serde(default)]
    auc: f64,
    #[serde(default)]
    f1: f64,
    #[serde(default)]
    accuracy: f64,
    #[serde(default)]
    sensitivity: f64,
    #[serde(default)]
    specificity: f64,
    #[serde(default)]
    ppv: f64,
    #[serde(default)]
    npv: f64,
}

fn close(what: &str, got: Option<f64>, want: f64) {
    let got = got.unwrap_or_else(|| panic!("{what}: missing"));
    assert!(
        (got - want).abs() <= 1e-12 * want.abs().max(1.0),
        "{what}: {got} vs {want}"
    );
}

/// The fixture's binary cases written as a predictions file and a labels
/// file (ids matched by file name: `run/img_i.png` against `img_i.png`),
/// evaluated as `screen evaluate` does.
#[test]
fn evaluation_matches_scikit_learn() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/metrics.json");
    let cases: Vec<BinaryCase> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let dir = tmp("eval");
    let mut n = 0;
    for (k, c) in cases.iter().filter(|c| c.kind == "binary").enumerate() {
        let mut preds =
            String::from("# total_seconds: 2.0\n# predicted: 999\nimage,status,prob_positive\n");
        let mut labels = String::from("image,label\n");
        // The fixture's scores reach 1.3 (scikit-learn takes any score),
        // but a predictions file holds probabilities in [0, 1]: scores and
        // threshold are halved, which is exact in binary floating point and
        // keeps every comparison, so every metric is unchanged.
        for (i, (&y, &s)) in c.y_true.iter().zip(&c.score).enumerate() {
            preds.push_str(&format!("run/img_{i}.png,ok,{}\n", s / 2.0));
            labels.push_str(&format!("img_{i}.png,{y}\n"));
        }
        preds.push_str("run/extra.png,skipped,\n");
        labels.push_str("unknown.png,1\n");
        let (pp, lp) = (dir.join(format!("p{k}.csv")), dir.join(format!("l{k}.csv")));
        std::fs::write(&pp, preds).unwrap();
        std::fs::write(&lp, labels).unwrap();
        let r = evaluate(
            &read_predictions(&pp).unwrap(),
            &read_labels(&lp).unwrap(),
            c.threshold / 2.0,
        )
        .unwrap();
        assert_eq!(r.n, c.y_true.len());
        close("auc", r.roc_auc, c.auc);
        close("f1", r.f1, c.f1);
        close("accuracy", r.accuracy, c.accuracy);
        close("sensitivity", r.sensitivity, c.sensitivity);
        close("specificity", r.specificity, c.specificity);
        close("ppv", r.ppv, c.ppv);
        close("npv", r.npv, c.npv);
        let m = r.confusion_matrix;
        assert_eq!(m.tp + m.fn_, r.positives);
        assert_eq!(m.tn + m.fp, r.negatives);
        assert_eq!(r.labels_without_prediction, vec!["unknown.png".to_string()]);
        assert_eq!(r.skipped, 1);
        assert!(r.predictions_without_label.is_empty());
        assert_eq!(r.images_per_second, Some(999.0 / 2.0));
        let roc = r.roc_curve.as_ref().unwrap();
        assert_eq!(
            (roc.fpr[0], roc.tpr[0], roc.thresholds[0]),
            (0.0, 0.0, None)
        );
        assert_eq!((roc.fpr.last(), roc.tpr.last()), (Some(&1.0), Some(&1.0)));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["confusion_matrix"]["fn"], m.fn_);
        n += 1;
    }
    assert_eq!(n, 2, "the fixture's binary cases");
}

#[test]
fn evaluation_input_errors_are_clear() {
    let dir = tmp("eval-err");
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let labels = write("l.csv", "image,label\na.png,maybe\n");
    assert!(read_labels(&labels)
        .unwrap_err()
        .to_string()
        .contains("\"maybe\""));
    let labels = write("l2.csv", "image,label\na.png,1\na.png,0\n");
    assert!(read_labels(&labels)
        .unwrap_err()
        .to_string()
        .contains("already on line 2"));
    let labels = write("l3.csv", "image,class\na.png,1\n");
    assert!(read_labels(&labels)
        .unwrap_err()
        .to_string()
        .contains("`label` column"));
    let preds = write("p.csv", "image,prob_positive\na.png,NaN\n");
    assert!(read_predictions(&preds)
        .unwrap_err()
        .to_string()
        .contains("not a finite number"));
    let preds = write("p2.csv", "image,prob_positive\nb.png,0.3\n");
    let ok_labels = write("l4.csv", "image,label\na.png,1\nc.png,high\nd.png,LOW\n");
    let r = evaluate(
        &read_predictions(&preds).unwrap(),
        &read_labels(&ok_labels).unwrap(),
        0.5,
    );
    assert!(r
        .unwrap_err()
        .to_string()
        .contains("no predicted image has a label"));
    // A single class: rates where defined, no AUC and no curve.
    let preds = write("p3.csv", "image,prob_positive\na.png,0.7\nc.png,0.2\n");
    let one = write("l5.csv", "image,label\na.png,1\nc.png,1\n");
    let r = evaluate(
        &read_predictions(&preds).unwrap(),
        &read_labels(&one).unwrap(),
        0.5,
    )
    .unwrap();
    assert_eq!(
        (r.roc_auc, r.roc_curve.is_none(), r.sensitivity),
        (None, true, Some(0.5))
    );
    assert_eq!(r.specificity, None);
}

// ---------------------------------------------------------------------------
// Class activation maps
// ---------------------------------------------------------------------------

#[test]
fn cam_overlay_covers_the_input_and_normalizes_the_heat() {
    let be = Backend::cpu();
    let model = DenseNet::from_file(&be, &TensorFile::open(small_weights()).unwrap()).unwrap();
    let p = small_pre();
    let Prepared::Image { data, .. } = preprocess(&pattern(112, 80, 30, 90), &p).unwrap() else {
        panic!("not skipped");
    };
    let x = Tensor::from_slice(&be, &[1, 3, 40, 56], &data).unwrap();
    let ws = model.forward(&be, &x).unwrap();
    let f = ws.activated().to_vec().unwrap();
    let logits = ws.logits().to_vec().unwrap();
    for (class, &logit) in logits.iter().enumerate() {
        let o = cam_overlay(&model, &f, (2, 3), &data, &p, class).unwrap();
        assert_eq!((o.height, o.width), (40, 56));
        assert_eq!(o.image, data[..40 * 56].to_vec());
        assert!(o.heat.iter().all(|&v| (0.0..=1.0).contains(&v)));
        let max = o.heat.iter().fold(0.0f32, |a, &v| a.max(v));
        let positive = o.map.values.iter().any(|&v| v > 0.0);
        assert_eq!(max, if positive { 1.0 } else { 0.0 });
        let mean = o.map.values.iter().sum::<f32>() / 6.0;
        assert!((mean + o.map.offset - logit).abs() < 1e-4);
    }
    assert!(cam_overlay(&model, &f, (2, 3), &data[1..], &p, 0).is_err());
}

#[test]
fn predict_writes_cam_pngs_as_it_goes() {
    let be = Backend::cpu();
    let dir = tmp("cams");
    let (mut entries, good) = write_run(&dir);
    // Two images with the same file stem in different folders.
    std::fs::create_dir(dir.join("other")).unwrap();
    pattern(64, 48, 40, 80)
        .save(dir.join("other/g0.png"))
        .unwrap();
    entries.push(ImageEntry {
        id: "other/g0.png".into(),
        path: dir.join("other/g0.png"),
    });
    let model = DenseNet::from_file(&be, &TensorFile::open(small_weights()).unwrap()).unwrap();
    let cams = dir.join("cams");
    let options = PredictOptions {
        batch_size: 3,
        preprocess: small_pre(),
        cam_dir: Some(cams.clone()),
        ..PredictOptions::default()
    };
    let run = predict(&be, &model, &entries, &options, |_| {}).unwrap();
    let mut written = Vec::new();
    for p in &run.predictions {
        if let Ok(v) = &p.outcome {
            let path = v.cam.clone().expect("a CAM for every predicted image");
            let img = image::open(&path).unwrap().to_rgb8();
            // The 56×40 input plus the colorbar panel and the title band.
            assert_eq!(img.dimensions(), (56 + 90, 120 + 24));
            written.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    assert_eq!(written.len(), good.len() + 1);
    assert_eq!(written[0], "g0.cam.png");
    assert_eq!(written.last().map(String::as_str), Some("g0_7.cam.png"));
    let mut unique = written.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), written.len(), "{written:?}");
}

/// `cellmorph screen predict` then `screen evaluate` on a directory with a
/// bad image, at the paper's input size.
#[test]
fn command_line_predict_and_evaluate() {
    let dir = tmp("cli");
    let imgs = dir.join("images");
    std::fs::create_dir(&imgs).unwrap();
    for (i, lo) in [20u16, 40, 60, 80].iter().enumerate() {
        pattern(612, 452, *lo, 100)
            .save(imgs.join(format!("img{i}.png")))
            .unwrap();
    }
    std::fs::write(imgs.join("broken.tif"), b"II*\0garbage").unwrap();
    std::fs::write(imgs.join("readme.txt"), b"not an image").unwrap();
    let exe = env!("CARGO_BIN_EXE_cellmorph");
    let out = std::process::Command::new(exe)
        .args(["screen", "predict", "--weights"])
        .arg(small_weights())
        .arg("--images")
        .arg(&imgs)
        .arg("--output")
        .arg(dir.join("pred.csv"))
        .args(["--batch-size", "3", "--features-out"])
        .arg(dir.join("features.csv"))
        .arg("--cam-dir")
        .arg(dir.join("cams"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("broken.tif: unreadable"), "{stderr}");
    assert!(stderr.contains("ignoring 1 files"), "{stderr}");
    let preds = read_predictions(&dir.join("pred.csv")).unwrap();
    assert_eq!(preds.rows.len(), 5);
    assert_eq!(preds.images, Some(4));
    // One overlay per predicted image, beside the folder's run marker.
    let cams: Vec<_> = std::fs::read_dir(dir.join("cams"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != cellmorph::io::RUN_MARKER)
        .collect();
    assert_eq!(cams.len(), 4, "{cams:?}");
    assert!(dir.join("cams").join(cellmorph::io::RUN_MARKER).is_file());
    assert_eq!(
        std::fs::read_to_string(dir.join("features.csv"))
            .unwrap()
            .lines()
            .count(),
        5
    );

    std::fs::write(
        dir.join("labels.csv"),
        "image,label\nimg0.png,0\nimg1.png,1\nimg2.png,0\nimg3.png,1\nbroken.tif,1\n",
    )
    .unwrap();
    let out = std::process::Command::new(exe)
        .args(["screen", "evaluate", "--predictions"])
        .arg(dir.join("pred.csv"))
        .arg("--labels")
        .arg(dir.join("labels.csv"))
        .arg("--output")
        .arg(dir.join("report.json"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["n"], 4);
    assert_eq!(report["skipped"], 1);
    for key in [
        "roc_auc",
        "f1",
        "accuracy",
        "sensitivity",
        "specificity",
        "ppv",
        "npv",
        "images_per_second",
    ] {
        assert!(report.get(key).is_some(), "{key} missing from the report");
    }
    assert!(report["roc_auc"].is_number());
    assert!(report["images_per_second"]
        .as_f64()
        .is_some_and(|v| v > 0.0));
    let roc = image::open(dir.join("report.roc.png")).unwrap();
    assert_eq!((roc.width(), roc.height()), (480, 480));

    // Errors are messages and a failure status, never a panic.
    let out = std::process::Command::new(exe)
        .args([
            "screen",
            "predict",
            "--weights",
            "missing.safetensors",
            "--images",
        ])
        .arg(&imgs)
        .arg("--output")
        .arg(dir.join("x.csv"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("error: missing.safetensors"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
}
