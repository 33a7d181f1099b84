//! `cellmorph screen train` (stage 1: frozen backbone, head trained on
//! cached pooled features) on a synthetic two-class data set built here:
//! class 0 a smooth low-contrast field, class 1 the same with a fine
//! checkerboard texture (a difference that survives the mean-V
//! normalization of the pre-processing), at the paper's input size, through the small DenseNet
//! fixture (`tests/fixtures/densenet_small.weights.safetensors`, whose
//! 5-class head is replaced by a fresh 2-class one).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cellmorph::apps::screening::images::ImageEntry;
use cellmorph::apps::screening::predict::{predict, PredictOptions};
use cellmorph::apps::screening::train::{
    screen_train, stratified_split, train_head, FeatureSet, Head, HeadKind, HeadTrainOptions, Init,
    ScreenTrainOptions, TRAIN_METADATA_KEY,
};
use cellmorph::imaging::{BitDepth, GrayImage};
use cellmorph::io::TensorFile;
use cellmorph::models::densenet::{DenseNet, DenseNetArch};
use cellmorph::rng::SplitMix64;
use cellmorph::Backend;

fn tmp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "cellmorph-screen-train-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn small_weights() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/densenet_small.weights.safetensors")
}

/// One 306×226 8-bit image: a smooth field with noise; `textured` adds a
/// checkerboard of 4-pixel squares with a seeded amplitude.
fn synthetic(seed: u64, textured: bool) -> GrayImage {
    let (w, h) = (306usize, 226usize);
    let mut rng = SplitMix64::new(seed);
    let amplitude = if textured {
        rng.uniform(30.0, 60.0)
    } else {
        0.0
    };
    let data: Vec<u16> = (0..w * h)
        .map(|i| {
            let (x, y) = (i % w, i / w);
            let base = 90.0 + 10.0 * (x as f64 / 40.0).sin() + 10.0 * (y as f64 / 30.0).cos();
            let sign = if (x / 4 + y / 4) % 2 == 0 { 1.0 } else { -1.0 };
            (base + sign * amplitude + rng.uniform(-6.0, 6.0)).round() as u16
        })
        .collect();
    GrayImage::new(w, h, BitDepth::Eight, data).unwrap()
}

/// `n` images of each class in `dir/images`, and `dir/labels.csv`.
fn data_set(dir: &Path, n: usize) -> (PathBuf, PathBuf) {
    let imgs = dir.join("images");
    std::fs::create_dir_all(&imgs).unwrap();
    let mut labels = String::from("image,label\n");
    for i in 0..2 * n {
        let positive = i % 2 == 1;
        let name = format!("img{i:02}.png");
        synthetic(100 + i as u64, positive)
            .save(imgs.join(&name))
            .unwrap();
        labels.push_str(&format!("{name},{}\n", u8::from(positive)));
    }
    let labels_path = dir.join("labels.csv");
    std::fs::write(&labels_path, labels).unwrap();
    (imgs, labels_path)
}

fn cellmorph(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cellmorph"))
        .args(args)
        .output()
        .unwrap()
}

fn train_args<'a>(
    imgs: &'a Path,
    labels: &'a Path,
    out: &'a Path,
    extra: &'a [&'a str],
) -> Vec<&'a std::ffi::OsStr> {
    let mut v: Vec<&std::ffi::OsStr> = vec![
        "screen".as_ref(),
        "train".as_ref(),
        "--images".as_ref(),
        imgs.as_os_str(),
        "--labels".as_ref(),
        labels.as_os_str(),
        "--output".as_ref(),
        out.as_os_str(),
    ];
    v.extend(extra.iter().map(|s| std::ffi::OsStr::new(*s)));
    v
}

fn options(
    imgs: &Path,
    labels: &Path,
    out: &Path,
    init: Init,
    head: HeadKind,
) -> ScreenTrainOptions {
    ScreenTrainOptions {
        images: imgs.to_path_buf(),
        labels: labels.to_path_buf(),
        output: out.to_path_buf(),
        init,
        head,
        train: HeadTrainOptions {
            epochs: 40,
            batch_size: 8,
            seed: 5,
            patience: 10,
            ..HeadTrainOptions::default()
        },
        val_fraction: 0.25,
        imagenet_normalize: false,
        metrics: None,
        plot: None,
    }
}

/// The command line end to end: training reaches validation AUC 1 with a
/// falling loss, writes metrics and curves, leaves the backbone bit for bit
/// as it was, and `screen predict` loads the output and separates the
/// classes.
#[test]
fn command_line_trains_a_head_that_predict_loads() {
    let dir = tmp("cli");
    let (imgs, labels) = data_set(&dir, 8);
    let out = dir.join("trained.safetensors");
    let init = small_weights();
    let mut args = train_args(
        &imgs,
        &labels,
        &out,
        &[
            "--epochs",
            "60",
            "--batch-size",
            "4",
            "--lr",
            "0.003",
            "--dropout",
            "0.2",
            "--seed",
            "3",
            "--patience",
            "0",
            "--val-fraction",
            "0.25",
        ],
    );
    args.extend(["--init".as_ref(), init.as_os_str()]);
    let o = cellmorph(&args);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.contains("epoch   1: train loss"), "{stdout}");

    // Metrics: one row per epoch, the best validation AUC 1, the loss falls.
    let csv = std::fs::read_to_string(dir.join("trained.metrics.csv")).unwrap();
    let rows: Vec<Vec<f64>> = csv
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .map(|v| v.parse().unwrap_or(f64::NAN))
                .collect()
        })
        .collect();
    assert!(!rows.is_empty(), "{csv}");
    let best_auc = rows.iter().map(|r| r[3]).fold(0.0, f64::max);
    assert_eq!(best_auc, 1.0, "{csv}");
    assert_eq!(rows.len(), 60, "{csv}");
    // Per-epoch losses are noisy (dropout, batches of 4): compare the means
    // of the first and last ten epochs.
    let mean = |r: &[Vec<f64>], col: usize| r.iter().map(|v| v[col]).sum::<f64>() / r.len() as f64;
    let (early, late) = (&rows[..10], &rows[50..]);
    assert!(
        mean(late, 1) < 0.7 * mean(early, 1),
        "the training loss did not fall: {csv}"
    );
    assert!(
        mean(late, 2) < mean(early, 2),
        "the validation loss did not fall: {csv}"
    );
    let png = image::open(dir.join("trained.curves.png")).unwrap();
    assert_eq!((png.width(), png.height()), (640, 420));

    // The backbone is the init's, bit for bit; the head is new (2 classes).
    let (a, b) = (
        TensorFile::open(&init).unwrap(),
        TensorFile::open(&out).unwrap(),
    );
    let mut backbone = 0;
    for name in a.names().iter().filter(|n| n.starts_with("features.")) {
        if name.ends_with("num_batches_tracked") {
            assert_eq!(a.i64(name).unwrap(), b.i64(name).unwrap(), "{name}");
        } else {
            assert_eq!(a.f32(name).unwrap(), b.f32(name).unwrap(), "{name}");
        }
        backbone += 1;
    }
    assert!(backbone > 20);
    assert_eq!(b.shape("classifier.3.weight"), Some(&[2, 64][..]));
    let meta = b.metadata().unwrap()[TRAIN_METADATA_KEY].clone();
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(meta["head_from_init"], false);
    assert_eq!(meta["train_images"], 12);
    assert_eq!(meta["val_images"], 4);

    // `screen predict` loads it; every positive image scores above every
    // negative one (the texture is easy to see).
    let pred = dir.join("pred.csv");
    let o = cellmorph(&[
        "screen".as_ref(),
        "predict".as_ref(),
        "--weights".as_ref(),
        out.as_os_str(),
        "--images".as_ref(),
        imgs.as_os_str(),
        "--output".as_ref(),
        pred.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let preds = cellmorph::apps::screening::files::read_predictions(&pred).unwrap();
    let score = |odd: bool| -> Vec<f64> {
        preds
            .rows
            .iter()
            .filter(|r| (r.id[3..5].parse::<usize>().unwrap() % 2 == 1) == odd)
            .map(|r| r.probability.unwrap())
            .collect()
    };
    let (pos, neg) = (score(true), score(false));
    let lowest_pos = pos.iter().copied().fold(f64::INFINITY, f64::min);
    let highest_neg = neg.iter().copied().fold(0.0, f64::max);
    assert!(lowest_pos > highest_neg, "{pos:?} vs {neg:?}");
}

/// Same seed, same bytes; another seed, other bytes. The cached-feature
/// head equals the head of the written network run end to end.
#[test]
fn training_is_deterministic_and_the_cached_head_is_the_network_head() {
    let dir = tmp("det");
    let (imgs, labels) = data_set(&dir, 6);
    let run = |name: &str, seed: u64| {
        let out = dir.join(name);
        let mut o = options(
            &imgs,
            &labels,
            &out,
            Init::File(small_weights()),
            HeadKind::Kim { hidden: 16 },
        );
        o.train.epochs = 6;
        o.train.seed = seed;
        let s = screen_train(&o, |_| {}).unwrap();
        (std::fs::read(&out).unwrap(), s)
    };
    let (a, sa) = run("a.safetensors", 1);
    let (b, _) = run("b.safetensors", 1);
    let (c, _) = run("c.safetensors", 2);
    assert!(a == b, "same seed, different bytes");
    assert!(a != c, "another seed gave the same bytes");
    assert_eq!(
        std::fs::read(dir.join("a.metrics.csv")).unwrap(),
        std::fs::read(dir.join("b.metrics.csv")).unwrap()
    );

    // The written network's probabilities equal the trained head applied
    // to the pooled features. Tolerance 1e-6: both are f32 CPU linear
    // layers over the same features; only the softmax is computed apart.
    let be = Backend::cpu();
    let file = TensorFile::open(dir.join("a.safetensors")).unwrap();
    let model = DenseNet::from_file(&be, &file).unwrap();
    let entries: Vec<ImageEntry> = (0..12)
        .map(|i| ImageEntry {
            id: format!("img{i:02}.png"),
            path: imgs.join(format!("img{i:02}.png")),
        })
        .collect();
    let run = predict(
        &be,
        &model,
        &entries,
        &PredictOptions {
            keep_features: true,
            ..PredictOptions::default()
        },
        |_| {},
    )
    .unwrap();
    let c = model.config().num_features;
    let head = Head::from_file(&file, HeadKind::Kim { hidden: 16 }, c)
        .unwrap()
        .expect("the written head has Kim's shape");
    assert!(
        head == sa.result.head,
        "the written head is not the trained one"
    );
    for p in &run.predictions {
        let v = p.outcome.as_ref().unwrap();
        let l = head.logits(v.features.as_ref().unwrap(), 1).unwrap();
        let p1 = 1.0 / (1.0 + (l[0] - l[1]).exp());
        assert!(
            (p1 - v.probability).abs() <= 1e-6,
            "{}: {p1} vs {}",
            p.id,
            v.probability
        );
    }

    // Training again from the written file starts from its head.
    let mut o = options(
        &imgs,
        &labels,
        &dir.join("d.safetensors"),
        Init::File(dir.join("a.safetensors")),
        HeadKind::Kim { hidden: 16 },
    );
    o.train.epochs = 1;
    assert!(screen_train(&o, |_| {}).unwrap().head_from_init);
    o.head = HeadKind::Linear;
    assert!(!screen_train(&o, |_| {}).unwrap().head_from_init);
}

/// Without --init: a seeded backbone with torchvision's initialization
/// (a small architecture here), a single Linear head; the loss falls.
#[test]
fn training_from_scratch_seeds_the_backbone() {
    let dir = tmp("scratch");
    let (imgs, labels) = data_set(&dir, 5);
    let arch = DenseNetArch {
        in_channels: 3,
        num_init_features: 8,
        growth_rate: 4,
        bn_size: 2,
        block_config: vec![2, 2],
    };
    let out = dir.join("s.safetensors");
    let mut o = options(&imgs, &labels, &out, Init::Random(arch), HeadKind::Linear);
    o.train.patience = 0;
    o.train.epochs = 30;
    o.val_fraction = 0.4;
    let s = screen_train(&o, |_| {}).unwrap();
    assert_eq!(s.result.epochs.len(), 30);
    assert_eq!((s.train_images, s.val_images), (6, 4));
    let losses: Vec<f64> = s.result.epochs.iter().map(|e| e.train_loss).collect();
    assert!(losses[29] < losses[0], "{losses:?}");
    let file = TensorFile::open(&out).unwrap();
    let model = DenseNet::from_file(&Backend::cpu(), &file).unwrap();
    // Block 1: 8 + 2·4 = 16, halved to 8 by the transition; block 2: 8 + 2·4.
    assert_eq!(model.config().num_features, 16);
    assert_eq!(model.config().transition_channels, [8]);
    assert_eq!(file.shape("classifier.weight"), Some(&[2, 16][..]));
    assert_eq!(
        file.f32("features.norm5.running_var").unwrap().1,
        vec![1.0; 16]
    );
}

#[test]
fn split_is_stratified_seeded_and_by_row() {
    let labels: Vec<bool> = (0..20).map(|i| i % 4 == 0).collect(); // 5 positive
    let s = stratified_split(&labels, 0.2, 9).unwrap();
    assert_eq!(s.val.iter().filter(|&&i| labels[i]).count(), 1);
    assert_eq!(s.val.len(), 4);
    assert_eq!(s.train.len() + s.val.len(), 20);
    assert!(s.train.iter().all(|i| !s.val.contains(i)));
    assert_eq!(s, stratified_split(&labels, 0.2, 9).unwrap());
    assert_ne!(s, stratified_split(&labels, 0.2, 10).unwrap());
    assert!(stratified_split(&labels, 0.0, 9).is_err());
    assert!(stratified_split(&[true, false, false], 0.5, 9).is_err());
}

/// Bad input gives a clear message and a failure status.
#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tmp("errors");
    let (imgs, labels) = data_set(&dir, 2);
    let out = dir.join("o.safetensors");
    let init = small_weights();
    let fail = |images: &Path, labels: &Path, output: &Path, extra: &[&str], want: &str| {
        let mut args = train_args(images, labels, output, extra);
        args.extend(["--init".as_ref(), init.as_os_str()]);
        let o = cellmorph(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "succeeded: {stderr}");
        assert!(stderr.contains(want), "expected {want:?} in: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    };

    let missing = dir.join("missing.csv");
    std::fs::write(&missing, "image,label\nimg00.png,0\nnope.png,1\n").unwrap();
    fail(
        &imgs,
        &missing,
        &out,
        &[],
        "image \"nope.png\" is labelled but not among the images",
    );
    let unknown = dir.join("unknown.csv");
    std::fs::write(&unknown, "image,label\nimg00.png,0\nimg01.png,maybe\n").unwrap();
    fail(&imgs, &unknown, &out, &[], "label \"maybe\" is not");
    let single = dir.join("single.csv");
    std::fs::write(&single, "image,label\nimg00.png,0\nimg02.png,0\n").unwrap();
    fail(&imgs, &single, &out, &[], "class 1 has 0 image(s)");
    // A list (here the labels file itself) naming a file that does not exist.
    let list = dir.join("list.csv");
    std::fs::write(
        &list,
        "image,label\nimages/img00.png,0\nimages/img01.png,1\nimages/img02.png,0\nimages/gone.png,1\n",
    )
    .unwrap();
    fail(
        &list,
        &list,
        &out,
        &[],
        "labelled image \"images/gone.png\" cannot be read",
    );
    // No output may overwrite an input.
    fail(&imgs, &labels, &init, &[], "--output");
    let labels_str = labels.to_str().unwrap();
    fail(
        &imgs,
        &labels,
        &out,
        &["--metrics", labels_str],
        "--metrics",
    );
    fail(
        &imgs,
        &labels,
        &out,
        &["--device", "emulated"],
        "runs on the CPU",
    );
    fail(&imgs, &labels, &out, &["--dropout", "1"], "--dropout 1");
    assert!(!out.exists());
}

/// Labels that the features cannot predict: the validation AUC stops
/// improving, training stops `patience` epochs after the best one, and the
/// head returned is the best epoch's (its validation loss is the one
/// recorded for that epoch).
#[test]
fn early_stopping_keeps_the_best_epoch() {
    let n = 40;
    let labels: Vec<bool> = (0..n).map(|i| (i * 7 + 3) % 5 < 2).collect();
    let features = cellmorph::rng::signed_unit_vec(4, n * 6);
    let data = FeatureSet {
        features: &features,
        dim: 6,
        labels: &labels,
    };
    let split = stratified_split(&labels, 0.3, 2).unwrap();
    let o = HeadTrainOptions {
        epochs: 200,
        batch_size: 8,
        lr: 1e-2,
        patience: 3,
        seed: 1,
        ..HeadTrainOptions::default()
    };
    let head = Head::fresh(HeadKind::Kim { hidden: 8 }, 6, 1).unwrap();
    let mut seen = 0;
    let r = train_head(&data, &split, head, &o, |_| seen += 1).unwrap();
    assert!(r.stopped_early);
    assert_eq!(seen, r.epochs.len());
    assert_eq!(r.epochs.len(), r.best_epoch + 3);
    let best = r.best().unwrap();
    assert!(best.best);
    assert!(r.epochs.iter().all(|e| e.val_auc <= best.val_auc));
    let (mut x, mut t) = (Vec::new(), Vec::new());
    for &i in &split.val {
        x.extend_from_slice(&features[i * 6..(i + 1) * 6]);
        t.push(usize::from(labels[i]));
    }
    let logits = r.head.logits(&x, split.val.len()).unwrap();
    let w = r.class_weights.unwrap();
    let loss = cellmorph::train::loss::cross_entropy(&logits, 2, &t, Some(&w)).unwrap();
    assert_eq!(f64::from(loss), best.val_loss);
}
