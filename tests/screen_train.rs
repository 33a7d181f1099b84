//! `cellmorph screen train` (stage 1: frozen backbone, head trained on
//! cached pooled features) on a synthetic two-class data set built here:
//! class 0 a smooth low-contrast field, class 1 the same with a fine
//! checkerboard texture (a difference that survives the mean-V
//! normalization of the pre-processing), at the paper's input size, through the small DenseNet
//! fixture (`tests/fixtures/densenet_small.weights.safetensors`, whose
//! 5-class head is replaced by a fresh 2-class one). Stage 2
//! (`--unfreeze`) runs on the same data.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cellmorph::apps::screening::images::ImageEntry;
use cellmorph::apps::screening::predict::{predict, PredictOptions};
use cellmorph::apps::screening::train::{
    screen_train, stratified_split, train_head, FeatureSet, FineTuneOptions, Head, HeadKind,
    HeadTrainOptions, Init, ScreenTrainOptions, Unfreeze, TRAIN_METADATA_KEY,
};
use cellmorph::io::TensorFile;
use cellmorph::models::densenet::{DenseNet, DenseNetArch};
use cellmorph::Backend;

fn tmp(tag: &str) -> common::TempDir {
    common::TempDir::new("screen-train", tag)
}

fn small_weights() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/densenet_small.weights.safetensors")
}

/// `n` images of each class in `dir/images`, and `dir/labels.csv`.
fn data_set(dir: &Path, n: usize) -> (PathBuf, PathBuf) {
    common::TextureImages {
        amplitude: (30.0, 60.0),
        noise: 6.0,
        first_seed: 100,
    }
    .write(dir, n)
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
        fine_tune: None,
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
        &["--device", "emulated", "--unfreeze-lr", "1e-3"],
        "need --unfreeze",
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

/// The metrics CSV's rows as numbers (an empty F1 is NaN).
fn metric_rows(path: &Path) -> Vec<Vec<f64>> {
    let csv = std::fs::read_to_string(path).unwrap();
    assert!(csv.starts_with("epoch,train_loss,val_loss,val_auc,val_f1,val_accuracy,best,stage\n"));
    csv.lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .map(|v| v.parse().unwrap_or(f64::NAN))
                .collect()
        })
        .collect()
}

fn stage2_options(dir: &Path, out: &str, unfreeze: Unfreeze, seed: u64) -> ScreenTrainOptions {
    let (imgs, labels) = (dir.join("images"), dir.join("labels.csv"));
    let mut o = options(
        &imgs,
        &labels,
        &dir.join(out),
        Init::File(small_weights()),
        HeadKind::Kim { hidden: 16 },
    );
    // A short stage 1 leaves stage 2 something to improve; half the
    // images validate (a 4-image validation set makes the AUC jumpy).
    o.train.epochs = 2;
    o.val_fraction = 0.5;
    o.train.seed = seed;
    o.train.patience = 0;
    o.train.dropout = 0.2;
    o.fine_tune = Some(FineTuneOptions {
        unfreeze,
        epochs: 10,
        lr: Some(1e-3),
        ..FineTuneOptions::default()
    });
    o
}

/// `--unfreeze last`: only the last dense block, norm5 and the head
/// change (every other tensor, running statistics and counters included,
/// is the input's bit for bit); the unfrozen BatchNorms ran in training
/// mode (their counters advanced by the number of steps); the metrics CSV
/// continues with stage-2 rows; the training loss falls; the written best
/// epoch is no worse on validation AUC than stage 1's best, and `screen
/// predict` loads the output and separates the classes.
#[test]
fn stage2_last_trains_only_the_last_block_and_norm5() {
    let dir = tmp("ft-last");
    data_set(&dir, 8);
    let o = stage2_options(&dir, "last.safetensors", Unfreeze::Last, 5);
    let mut stage2_epochs = 0;
    let s = screen_train(&o, |p| {
        if let cellmorph::apps::screening::train::TrainProgress::Stage2Epoch(_) = p {
            stage2_epochs += 1
        }
    })
    .unwrap();
    let s2 = s.stage2.as_ref().unwrap();
    assert_eq!(stage2_epochs, 10);
    assert_eq!(s2.epochs.len(), 10);
    assert_eq!(s2.epochs[0].epoch, 3);
    // 16 images of 3 × 226 × 306: block 3's input is 16 + 3·8 = 40 → 20
    // channels (the transition halves) at 14 × 19.
    assert_eq!(s2.cache_bytes, 16 * 20 * 14 * 19 * 4);
    // The first stage-2 epoch's loss is above stage 1's: the fixture's
    // running statistics (torchvision's initial 0 and 1) are far from the
    // batch statistics that train-mode BatchNorm uses.
    let first = s2.epochs[0].train_loss;
    let last = s2.epochs[9].train_loss;
    assert!(
        last < first,
        "stage-2 training loss did not fall: {:?}",
        s2.epochs
    );
    let stage1_best = s.result.best().unwrap().val_auc;
    let best = if s2.improved {
        s2.epochs
            .iter()
            .find(|e| e.epoch == s2.best_epoch)
            .unwrap()
            .val_auc
    } else {
        stage1_best
    };
    assert!(best >= stage1_best, "{best} < {stage1_best}");

    let rows = metric_rows(&dir.join("last.metrics.csv"));
    assert_eq!(rows.len(), 12);
    let stages: Vec<f64> = rows.iter().map(|r| r[7]).collect();
    assert_eq!(stages[..3], [1.0, 1.0, 2.0]);
    assert_eq!(stages[11], 2.0);
    assert!(image::open(dir.join("last.curves.png")).is_ok());

    assert!(
        s2.improved,
        "no stage-2 epoch beat stage 1: {:?}",
        s2.epochs
    );
    let (a, b) = (
        TensorFile::open(small_weights()).unwrap(),
        TensorFile::open(dir.join("last.safetensors")).unwrap(),
    );
    let unfrozen =
        |n: &str| n.starts_with("features.denseblock3.") || n.starts_with("features.norm5.");
    let (mut frozen, mut changed) = (0, 0);
    // Stage-2 epochs up to the written one.
    let k = (s2.best_epoch - 2) as i64;
    for name in a.names().iter().filter(|n| n.starts_with("features.")) {
        if name.ends_with("num_batches_tracked") {
            let (x, y) = (a.i64(name).unwrap().1[0], b.i64(name).unwrap().1[0]);
            if unfrozen(name) {
                // 8 training images in batches of 8: 1 step an epoch.
                assert_eq!(y, x + k, "{name}");
            } else {
                assert_eq!(x, y, "{name}");
            }
            continue;
        }
        let (x, y) = (a.f32(name).unwrap(), b.f32(name).unwrap());
        if unfrozen(name) {
            changed += usize::from(x != y);
        } else {
            assert!(x == y, "frozen tensor {name} changed");
            frozen += 1;
        }
    }
    assert!(frozen > 20);
    // conv1, conv2, norm1, norm2 (weight, bias, running mean, var) of
    // both layers of block 3, and norm5's four.
    assert_eq!(changed, 2 * 10 + 4);
    let meta: serde_json::Value =
        serde_json::from_str(&b.metadata().unwrap()[TRAIN_METADATA_KEY]).unwrap();
    assert_eq!(meta["stage2"]["unfreeze"], "Last");

    // `screen predict` loads it and separates the classes.
    let pred = dir.join("pred.csv");
    let o = cellmorph(&[
        "screen".as_ref(),
        "predict".as_ref(),
        "--weights".as_ref(),
        dir.join("last.safetensors").as_os_str(),
        "--images".as_ref(),
        dir.join("images").as_os_str(),
        "--output".as_ref(),
        pred.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let preds = cellmorph::apps::screening::files::read_predictions(&pred).unwrap();
    assert_eq!(preds.rows.len(), 16);
}

/// Same seed, same bytes (weights and metrics) for `last` and `all`;
/// another seed, other bytes. `all` changes the stem too and its training
/// loss falls.
#[test]
fn stage2_is_deterministic() {
    let dir = tmp("ft-det");
    data_set(&dir, 6);
    for (unfreeze, tag) in [(Unfreeze::Last, "last"), (Unfreeze::All, "all")] {
        let run = |name: &str, seed: u64| {
            let mut o = stage2_options(&dir, name, unfreeze, seed);
            if unfreeze == Unfreeze::All {
                o.fine_tune.as_mut().unwrap().epochs = 3;
            }
            let s = screen_train(&o, |_| {}).unwrap();
            (std::fs::read(dir.join(name)).unwrap(), s)
        };
        let (a, sa) = run(&format!("{tag}-a.safetensors"), 7);
        let (b, _) = run(&format!("{tag}-b.safetensors"), 7);
        let (c, _) = run(&format!("{tag}-c.safetensors"), 8);
        assert!(a == b, "{tag}: same seed, different bytes");
        assert!(a != c, "{tag}: another seed gave the same bytes");
        assert_eq!(
            std::fs::read(dir.join(format!("{tag}-a.metrics.csv"))).unwrap(),
            std::fs::read(dir.join(format!("{tag}-b.metrics.csv"))).unwrap()
        );
        if unfreeze == Unfreeze::All {
            let s2 = sa.stage2.unwrap();
            assert_eq!(s2.cache_bytes, 0);
            let e = &s2.epochs;
            assert!(e[e.len() - 1].train_loss < e[0].train_loss, "{e:?}");
            if s2.improved {
                let init = TensorFile::open(small_weights()).unwrap();
                let out = TensorFile::from_bytes("all", a).unwrap();
                let name = "features.conv0.weight";
                assert!(init.f32(name).unwrap() != out.f32(name).unwrap());
                assert!(
                    init.i64("features.norm0.num_batches_tracked").unwrap()
                        != out.i64("features.norm0.num_batches_tracked").unwrap()
                );
            }
        }
    }
}

/// Stage-2 flags: an unknown --unfreeze value, stage-2 flags without
/// --unfreeze, a bad learning rate and an activation cache over the bound
/// are clear errors.
#[test]
fn stage2_bad_flags_are_clear_errors() {
    let dir = tmp("ft-errors");
    let (imgs, labels) = data_set(&dir, 2);
    let out = dir.join("o.safetensors");
    let init = small_weights();
    let fail = |extra: &[&str], want: &str| {
        let mut args = train_args(&imgs, &labels, &out, extra);
        args.extend([
            "--init".as_ref(),
            init.as_os_str(),
            "--epochs".as_ref(),
            "1".as_ref(),
        ]);
        let o = cellmorph(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "succeeded: {stderr}");
        assert!(stderr.contains(want), "expected {want:?} in: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    };
    fail(
        &["--unfreeze", "middle"],
        "invalid value 'middle' for '--unfreeze",
    );
    fail(&["--unfreeze-lr", "0.001"], "need --unfreeze last|all");
    fail(&["--resume", "x.safetensors"], "need --unfreeze last|all");
    fail(
        &["--unfreeze", "all", "--unfreeze-lr", "-1"],
        "--unfreeze-lr -1",
    );
    fail(
        &["--unfreeze", "last", "--unfreeze-epochs", "0"],
        "--unfreeze-epochs must be at least 1",
    );
    fail(
        &["--unfreeze", "last", "--max-cache-gib", "0.000001"],
        "4 images × 20 × 14 × 19 × 4 bytes",
    );
    assert!(!out.exists());
}

/// The trainer's eval-mode forward is the inference network: on the
/// PyTorch fixture's input it gives the fixture's logits (tolerance 1e-3
/// as the fixture's), and running it in two parts through the cached
/// block input gives the same bits as in one.
#[test]
fn eval_forward_matches_the_fixture_and_splits_at_a_block() {
    use cellmorph::train::densenet::{DenseNetState, DenseNetTrainer};
    let weights = TensorFile::open(small_weights()).unwrap();
    let cases = TensorFile::open(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/densenet_small.cases.safetensors"),
    )
    .unwrap();
    let (shape, input) = cases.f32("input").unwrap();
    let (_, logits) = cases.f32("logits").unwrap();
    let shape: [usize; 4] = shape.try_into().unwrap();
    let state = DenseNetState::from_file(&weights, "").unwrap();
    let t = DenseNetTrainer::new(state, Default::default()).unwrap();
    let nb = t.blocks();
    let (got, gshape) = t.eval_forward(&input, shape, 0, nb).unwrap();
    assert_eq!(gshape, [2, 5, 1, 1]);
    for (a, b) in got.iter().zip(&logits) {
        assert!((a - b).abs() <= 1e-3, "{got:?} vs {logits:?}");
    }
    let (mid, mshape) = t.eval_forward(&input, shape, 0, nb - 1).unwrap();
    assert_eq!(
        mshape,
        t.block_input_shape(2, shape[2], shape[3], nb - 1).unwrap()
    );
    let (two, _) = t.eval_forward(&mid, mshape, nb - 1, nb).unwrap();
    assert!(two == got);
}

/// The backward of a step that enters at the last block, with class
/// weights, and with Kim's head with dropout (stage 2's `--unfreeze last`
/// step), against
/// central differences of the same training-mode loss. Tolerance: the
/// loss is f32, so a quotient over ±1e-2 carries an error near
/// 1e-6/1e-2 = 1e-4 plus the curvature term; 2e-3 absolute and 5 %
/// relative cover both.
#[test]
fn last_block_step_gradients_match_finite_differences() {
    use cellmorph::train::densenet::{Batch, DenseNetState, DenseNetTrainer, StepSettings};
    let weights = TensorFile::open(small_weights()).unwrap();
    // The fixture with Kim's head (36 → 6, ReLU, dropout, 6 → 2).
    let mut kim = cellmorph::io::TensorWriter::new();
    for name in weights
        .names()
        .iter()
        .filter(|n| n.starts_with("features."))
    {
        if name.ends_with("num_batches_tracked") {
            let (shape, v) = weights.i64(name).unwrap();
            kim.add_slice(name, &shape, &v).unwrap();
        } else {
            let (shape, v) = weights.f32(name).unwrap();
            kim.add_slice(name, &shape, &v).unwrap();
        }
    }
    for (name, shape, seed) in [
        ("classifier.0.weight", vec![6, 36], 1),
        ("classifier.0.bias", vec![6], 2),
        ("classifier.3.weight", vec![2, 6], 3),
        ("classifier.3.bias", vec![2], 4),
    ] {
        let v: Vec<f32> = cellmorph::rng::signed_unit_vec(seed, shape.iter().product())
            .iter()
            .map(|x| x * 0.5)
            .collect();
        kim.add_slice(name, &shape, &v).unwrap();
    }
    let kim = TensorFile::from_bytes("kim", kim.to_bytes().unwrap()).unwrap();
    for (file, classes) in [(&weights, 5usize), (&kim, 2)] {
        let state = DenseNetState::from_file(file, "").unwrap();
        let mut t = DenseNetTrainer::new(state, Default::default()).unwrap();
        let nb = t.blocks();
        let shape = t.block_input_shape(3, 24, 32, nb - 1).unwrap();
        let input = cellmorph::rng::signed_unit_vec(8, shape.iter().product());
        let labels = [0usize, classes - 1, 1];
        let batch = Batch {
            input: &input,
            shape,
            labels: &labels,
        };
        let w = [0.5f32, 1.5, 1.0, 0.8, 1.2];
        let settings = StepSettings {
            first_block: nb - 1,
            class_weights: Some(&w[..classes]),
            dropout: Some((3, 1, 0.3)),
        };
        t.forward_backward_with(&batch, &settings).unwrap();
        let before = t.state().clone();
        let conv0 = before.params.by_name("features.conv0.weight").unwrap();
        assert!(
            conv0.grad.iter().all(|&g| g == 0.0),
            "a frozen layer got a gradient"
        );
        let names = [
            "features.denseblock3.denselayer1.conv1.weight",
            "features.denseblock3.denselayer2.norm1.weight",
            "features.norm5.bias",
            "classifier.weight",
            "classifier.0.weight",
            "classifier.3.weight",
        ];
        let mut checked = 0;
        for name in names {
            let Ok(p) = before.params.by_name(name) else {
                continue;
            };
            for k in (0..p.value.len()).step_by((p.value.len() / 5).max(1)) {
                let v = p.value[k];
                let eps = 1e-2f32;
                t.set_value(name, k, v + eps).unwrap();
                let up = f64::from(t.loss_with(&batch, &settings).unwrap());
                t.set_value(name, k, v - eps).unwrap();
                let down = f64::from(t.loss_with(&batch, &settings).unwrap());
                t.set_value(name, k, v).unwrap();
                let fd = (up - down) / (2.0 * f64::from(eps));
                let g = f64::from(p.grad[k]);
                assert!(
                    (fd - g).abs() <= 2e-3 + 0.05 * g.abs(),
                    "{name}[{k}]: finite difference {fd}, backward {g}"
                );
                checked += 1;
            }
        }
        assert!(checked >= 15, "{checked}");
    }
}

/// A stage 2 cut after 2 epochs and resumed from its checkpoint writes the
/// same bytes (weights, metrics) as the unbroken run, for `last` and `all`;
/// a checkpoint resumed with other options is refused.
#[test]
fn stage2_resume_equals_the_unbroken_run() {
    let dir = tmp("ft-resume");
    data_set(&dir, 6);
    for (unfreeze, tag) in [(Unfreeze::Last, "last"), (Unfreeze::All, "all")] {
        let epochs = if unfreeze == Unfreeze::All { 3 } else { 5 };
        let mut o = stage2_options(&dir, &format!("{tag}-full.safetensors"), unfreeze, 3);
        o.fine_tune.as_mut().unwrap().epochs = epochs;
        screen_train(&o, |_| {}).unwrap();
        let mut cut = stage2_options(&dir, &format!("{tag}-cut.safetensors"), unfreeze, 3);
        cut.fine_tune.as_mut().unwrap().epochs = 2;
        screen_train(&cut, |_| {}).unwrap();
        let ck = dir.join(format!("{tag}-cut.checkpoint.safetensors"));
        assert!(ck.exists());
        let mut resumed = stage2_options(&dir, &format!("{tag}-resumed.safetensors"), unfreeze, 3);
        let ft = resumed.fine_tune.as_mut().unwrap();
        ft.epochs = epochs;
        ft.resume = Some(ck.clone());
        let s = screen_train(&resumed, |_| {}).unwrap();
        assert_eq!(s.stage2.unwrap().epochs.len(), epochs);
        let read = |name: &str| std::fs::read(dir.join(format!("{tag}-{name}"))).unwrap();
        assert!(
            read("full.safetensors") == read("resumed.safetensors"),
            "{tag}: the resumed run differs from the unbroken one"
        );
        assert_eq!(read("full.metrics.csv"), read("resumed.metrics.csv"));
        resumed.fine_tune.as_mut().unwrap().lr = Some(5e-4);
        let e = screen_train(&resumed, |_| {}).unwrap_err().to_string();
        assert!(e.contains("only --unfreeze-epochs may change"), "{e}");
    }
}

/// `--device emulated` (the kernels through the ops layer, as CUDA runs
/// them): the feature pass, stage 1 and a stage 2 that trains every layer
/// (stem, every block, the head; training-mode BatchNorm, dropout, class
/// weights), one epoch each on four images, writes weights that `screen
/// predict` loads; its stage-2 weights stay close to the CPU run's (the
/// kernels sum in other orders: one AdamW step moves a parameter by at
/// most lr = 1e-3, so each tensor is within 2·lr plus 1e-3 of its scale).
#[test]
fn emulated_device_trains_both_stages_and_predict_loads() {
    let dir = tmp("emulated");
    let (imgs, labels) = data_set(&dir, 2);
    let init = small_weights();
    let run = |out: &Path, device: &str| {
        let extra = [
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--val-fraction",
            "0.5",
            "--dropout",
            "0.2",
            "--unfreeze",
            "all",
            "--unfreeze-epochs",
            "1",
            "--unfreeze-lr",
            "1e-3",
            "--device",
            device,
        ];
        let mut args = train_args(&imgs, &labels, out, &extra);
        args.extend(["--init".as_ref(), init.as_os_str()]);
        let o = cellmorph(&args);
        assert!(
            o.status.success(),
            "--device {device}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let (emu, cpu) = (dir.join("emu.safetensors"), dir.join("cpu.safetensors"));
    run(&emu, "emulated");
    run(&cpu, "cpu");
    let (e, c) = (
        TensorFile::open(&emu).unwrap(),
        TensorFile::open(&cpu).unwrap(),
    );
    assert_eq!(e.names(), c.names());
    let meta: serde_json::Value =
        serde_json::from_str(&e.metadata().unwrap()[TRAIN_METADATA_KEY]).unwrap();
    assert_eq!(
        meta["stage2"]["epochs"].as_array().unwrap().len(),
        1,
        "{meta}"
    );
    for name in e.names() {
        if name.ends_with("num_batches_tracked") {
            assert_eq!(e.i64(&name).unwrap(), c.i64(&name).unwrap(), "{name}");
            continue;
        }
        let (a, b) = (e.f32(&name).unwrap().1, c.f32(&name).unwrap().1);
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 2e-3 + 1e-3 * scale,
                "{name}: emulated {x} vs cpu {y}"
            );
        }
    }
    let pred = dir.join("pred.csv");
    let o = cellmorph(&[
        "screen".as_ref(),
        "predict".as_ref(),
        "--weights".as_ref(),
        emu.as_os_str(),
        "--images".as_ref(),
        imgs.as_os_str(),
        "--output".as_ref(),
        pred.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let preds = cellmorph::apps::screening::files::read_predictions(&pred).unwrap();
    assert_eq!(preds.rows.len(), 4);
    assert!(preds.rows.iter().all(|r| r.probability.is_some()));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `screen train --unfreeze last --resume` with a flipped, truncated,
/// huge-header or foreign checkpoint is refused naming the checkpoint, and
/// the earlier run's weights and metrics stay as they were; the good
/// checkpoint still resumes.
#[test]
fn stage2_resume_refuses_damaged_checkpoints_from_the_command_line() {
    let dir = tmp("ft-bad-resume");
    let (imgs, labels) = data_set(&dir, 2);
    let out = dir.join("o.safetensors");
    let init = small_weights();
    let run = |epochs: &str, resume: Option<&Path>| {
        let mut args = train_args(
            &imgs,
            &labels,
            &out,
            &["--epochs", "1", "--unfreeze", "last", "--unfreeze-epochs"],
        );
        args.extend([epochs.as_ref(), "--init".as_ref(), init.as_os_str()]);
        if let Some(r) = resume {
            args.extend(["--resume".as_ref(), r.as_os_str()]);
        }
        cellmorph(&args)
    };
    let o = run("1", None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ck = dir.join("o.checkpoint.safetensors");
    let good = std::fs::read(&ck).unwrap();
    let keep = ["o.safetensors", "o.metrics.csv"];
    let before: Vec<Vec<u8>> = keep
        .iter()
        .map(|n| std::fs::read(dir.join(n)).unwrap())
        .collect();
    let mut flipped = good.clone();
    let at = good.len() - 7;
    flipped[at] ^= 0x08;
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let foreign = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/vqvae2_small.weights.safetensors"),
    )
    .unwrap();
    for (name, bytes, says) in [
        ("flipped", flipped, "changed or damaged"),
        (
            "truncated",
            good[..good.len() / 3].to_vec(),
            "truncated or corrupt",
        ),
        ("huge-header", huge, "not a valid safetensors"),
        ("foreign", foreign, ""),
    ] {
        let p = dir.join(format!("{name}.safetensors"));
        std::fs::write(&p, &bytes).unwrap();
        let o = run("2", Some(&p));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name}: resumed\n{e}");
        assert!(
            e.contains(&format!("{name}.safetensors")) && e.contains(says),
            "{name}: {e}"
        );
        assert!(!e.contains("panicked"), "{name}: {e}");
        for (n, b) in keep.iter().zip(&before) {
            assert!(
                &std::fs::read(dir.join(n)).unwrap() == b,
                "{name}: {n} changed"
            );
        }
    }
    let o = run("2", Some(&ck));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
