//! CP2Image: the generator and the discriminator against PyTorch outputs
//! (`tests/fixtures/cp2image_small.*`: p = 32,
//! generator channels (64, 32, 16, 8, 8), discriminator channels
//! (3, 8, 16, 16, 32, 32), 4 cases) on the CPU, emulated and CUDA devices;
//! BatchNorm folded against BatchNorm run separately; the feature
//! standardization, manipulation and interpolation, contact sheets, and the
//! examples' inputs on the real single-cell set
//! (64 cells in `tests/data/single_cells`).
//!
//! Tolerance (fixtures/README.md): whole networks in f32 within
//! max|Δ| / max|ref| ≤ 1e-3 — another summation order than PyTorch's, and
//! the folded weights round differently from conv-then-BN. Folded against
//! separate BatchNorm on the same device: 1e-4 (the same convolutions, only
//! the per-channel affine map applied before or after rounding).

mod common;

use std::path::{Path, PathBuf};

use cellmorph::backend::cuda_device_count;
use cellmorph::io::{TensorFile, TensorWriter};
use cellmorph::models::cp2image::{
    infer_discriminator, infer_generator, random_generator_weights, BatchNormMode, Discriminator,
    Generator, GeneratorConfig,
};
use cellmorph::{Backend, Device, Tensor};

/// max|Δ| / max|ref| for a whole network against PyTorch (see above).
const TOL: f32 = 1e-3;
/// max|Δ| / max|ref| between folded and separate BatchNorm (see above).
const FOLD_TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("cp2image_small.{name}.safetensors"))
}

fn weights(model: &str) -> TensorFile {
    TensorFile::open(fixture(&format!("{model}.weights"))).expect("fixture weights")
}

fn cases() -> TensorFile {
    TensorFile::open(fixture("cases")).expect("fixture cases")
}

fn reference(name: &str) -> (Vec<usize>, Vec<f32>) {
    cases().f32(name).expect("reference tensor")
}

fn input(be: &Backend, name: &str) -> Tensor {
    let (shape, data) = reference(name);
    Tensor::from_vec(be, &shape, data).expect("input tensor")
}

fn max_rel(what: &str, out: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(out.len(), reference.len(), "{what}: length");
    assert!(
        out.iter().all(|v| v.is_finite()),
        "{what}: non-finite output"
    );
    let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = out
        .iter()
        .zip(reference)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale.max(f32::MIN_POSITIVE)
}

fn assert_close(what: &str, out: &[f32], reference: &[f32], tol: f32) {
    let rel = max_rel(what, out, reference);
    println!("  {what}: max|Δ|/max|ref| = {rel:.2e}");
    assert!(rel <= tol, "{what}: max|Δ|/max|ref| = {rel:.3e} > {tol:e}");
}

fn cuda() -> Backend {
    assert!(
        cuda_device_count() > 0,
        "skipped: no CUDA device (this test needs a GPU)"
    );
    Backend::new(Device::Cuda(0)).expect("opening CUDA device 0")
}

fn emulated() -> Backend {
    Backend::new(Device::Emulated).expect("emulated device")
}

/// G(z) against `image`, D(x) against `prob_x`/`hidden_x.*` and D(G(z))
/// against `prob_image`/`hidden_image.*`.
fn check_fixture(be: &Backend, mode: BatchNormMode) {
    println!("device {}, BatchNorm {mode:?}", be.describe());
    let g = Generator::from_file_with(be, &weights("generator"), mode).expect("generator");
    let d =
        Discriminator::from_file_with(be, &weights("discriminator"), mode).expect("discriminator");
    assert_eq!(g.config().channels, [64, 32, 16, 8, 8]);
    assert_eq!(g.config().n_features, 32);
    assert_eq!(g.config().image_size(), 64);
    assert_eq!(d.config().channels, [3, 8, 16, 16, 32, 32]);
    assert_eq!(d.config().image_size, 64);

    let image = g.forward(be, &input(be, "z")).expect("G(z)");
    assert_eq!(image.shape(), [4, 3, 64, 64]);
    let image_host = image.to_vec().unwrap();
    assert_close("image", &image_host, &reference("image").1, TOL);

    for (what, x) in [("x", input(be, "x")), ("image", image)] {
        let out = d.forward(be, &x).expect("D");
        assert_eq!(out.prob.shape(), [4, 1]);
        assert_close(
            &format!("prob_{what}"),
            &out.prob.to_vec().unwrap(),
            &reference(&format!("prob_{what}")).1,
            TOL,
        );
        assert_eq!(out.hidden.len(), 5);
        for (i, h) in out.hidden.iter().enumerate() {
            let (shape, want) = reference(&format!("hidden_{what}.{i}"));
            assert_eq!(h.shape(), shape.as_slice(), "hidden_{what}.{i} shape");
            assert_close(
                &format!("hidden_{what}.{i}"),
                &h.to_vec().unwrap(),
                &want,
                TOL,
            );
        }
    }
}

#[test]
fn fixture_cpu_folded() {
    check_fixture(&Backend::cpu(), BatchNormMode::Folded);
}

#[test]
fn fixture_cpu_separate_batchnorm() {
    check_fixture(&Backend::cpu(), BatchNormMode::Separate);
}

#[test]
fn fixture_emulated() {
    let be = emulated();
    check_fixture(&be, BatchNormMode::Folded);
    check_fixture(&be, BatchNormMode::Separate);
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn fixture_cuda() {
    let be = cuda();
    check_fixture(&be, BatchNormMode::Folded);
    check_fixture(&be, BatchNormMode::Separate);
}

#[test]
fn folded_batchnorm_matches_separate_on_cpu() {
    let be = Backend::cpu();
    let z = input(&be, "z");
    let run = |mode| {
        Generator::from_file_with(&be, &weights("generator"), mode)
            .unwrap()
            .forward(&be, &z)
            .unwrap()
            .to_vec()
            .unwrap()
    };
    assert_close(
        "generator folded vs separate",
        &run(BatchNormMode::Folded),
        &run(BatchNormMode::Separate),
        FOLD_TOL,
    );
    let x = input(&be, "x");
    let run = |mode| {
        let o = Discriminator::from_file_with(&be, &weights("discriminator"), mode)
            .unwrap()
            .forward(&be, &x)
            .unwrap();
        o.hidden
            .iter()
            .flat_map(|h| h.to_vec().unwrap())
            .chain(o.prob.to_vec().unwrap())
            .collect::<Vec<f32>>()
    };
    assert_close(
        "discriminator folded vs separate",
        &run(BatchNormMode::Folded),
        &run(BatchNormMode::Separate),
        FOLD_TOL,
    );
}

/// `infer_*` in batches of 3 (a full and a partial batch) give the
/// fixture's outputs under the names `cellmorph infer` writes.
fn check_infer(be: &Backend) {
    let host = Backend::cpu();
    let mut out = TensorWriter::new();
    infer_generator(be, &weights("generator"), &input(&host, "z"), 3, &mut out).unwrap();
    infer_discriminator(
        be,
        &weights("discriminator"),
        &input(&host, "x"),
        3,
        &mut out,
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("cellmorph-cp2image-infer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("out-{}.safetensors", be.device()));
    out.write(&path).unwrap();
    let got = TensorFile::open(&path).unwrap();
    let pairs = [
        ("image", "image".to_string()),
        ("prob", "prob_x".to_string()),
    ]
    .into_iter()
    .chain((0..5).map(|i| {
        (
            ["hidden.0", "hidden.1", "hidden.2", "hidden.3", "hidden.4"][i],
            format!("hidden_x.{i}"),
        )
    }));
    for (name, ref_name) in pairs {
        let (shape, data) = got.f32(name).unwrap();
        let (want_shape, want) = reference(&ref_name);
        assert_eq!(shape, want_shape, "{name} shape");
        assert_close(name, &data, &want, TOL);
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn infer_in_batches_cpu() {
    check_infer(&Backend::cpu());
}

#[test]
fn infer_in_batches_emulated() {
    check_infer(&emulated());
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn infer_in_batches_cuda() {
    check_infer(&cuda());
}

#[test]
fn bad_inputs_and_weights_are_clear_errors() {
    let be = Backend::cpu();
    let g = Generator::from_file(&be, &weights("generator")).unwrap();
    let z = Tensor::from_vec(&be, &[2, 31], vec![0.0; 62]).unwrap();
    let e = g.forward(&be, &z).unwrap_err().to_string();
    assert!(e.contains("[2, 31]") && e.contains("32"), "{e}");
    let d = Discriminator::from_file(&be, &weights("discriminator")).unwrap();
    let x = Tensor::from_vec(&be, &[1, 3, 32, 32], vec![0.0; 3 * 32 * 32]).unwrap();
    let e = d.forward(&be, &x).unwrap_err().to_string();
    assert!(e.contains("[1, 3, 32, 32]") && e.contains("64"), "{e}");

    // A discriminator file is not a generator and vice versa.
    let e = Generator::from_file(&be, &weights("discriminator"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("generator"), "{e}");
    let e = Discriminator::from_file(&be, &weights("generator"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("discriminator"), "{e}");
}

/// The fixture's tensors with `name` replaced by `(shape, data)` (or
/// removed when `None`), plus `extra` tensors, written to a temporary file.
fn edited(
    model: &str,
    name: &str,
    with: Option<(Vec<usize>, Vec<f32>)>,
    extra: &[&str],
) -> TensorFile {
    let src = weights(model);
    let mut w = TensorWriter::new();
    for n in src.names() {
        if n == name {
            if let Some((shape, data)) = &with {
                w.add_slice(&n, shape, data).unwrap();
            }
        } else if n.ends_with("num_batches_tracked") {
            let (shape, data) = src.i64(&n).unwrap();
            w.add_slice(&n, &shape, &data).unwrap();
        } else {
            let (shape, data) = src.f32(&n).unwrap();
            w.add_slice(&n, &shape, &data).unwrap();
        }
    }
    for e in extra {
        w.add_slice(e, &[1], &[0.0f32]).unwrap();
    }
    let path = std::env::temp_dir().join(format!(
        "cellmorph-cp2image-edit-{}-{model}-{}.safetensors",
        std::process::id(),
        name.replace('.', "_")
    ));
    w.write(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).ok();
    TensorFile::from_bytes(&path, bytes).unwrap()
}

#[test]
fn bad_weights_name_the_tensor() {
    let be = Backend::cpu();
    let err = |r: cellmorph::Result<()>| r.unwrap_err().to_string();
    let gen = |f: TensorFile| err(Generator::from_file(&be, &f).map(drop));
    let disc = |f: TensorFile| err(Discriminator::from_file(&be, &f).map(drop));

    let e = gen(edited(
        "generator",
        "blocks.1.conv.weight",
        Some((vec![16, 31, 3, 3], vec![0.0; 16 * 31 * 9])),
        &[],
    ));
    assert!(
        e.contains("blocks.1.conv.weight")
            && e.contains("[16, 31, 3, 3]")
            && e.contains("[16, 32, 3, 3]"),
        "{e}"
    );
    let e = gen(edited("generator", "blocks.2.bn.running_var", None, &[]));
    assert!(
        e.contains("missing tensor \"blocks.2.bn.running_var\""),
        "{e}"
    );
    let mut nan = vec![0.5f32; 8];
    nan[3] = f32::NAN;
    let e = gen(edited(
        "generator",
        "blocks.3.bn.weight",
        Some((vec![8], nan)),
        &[],
    ));
    assert!(
        e.contains("blocks.3.bn.weight") && e.contains("non-finite") && e.contains("index 3"),
        "{e}"
    );
    let e = gen(edited(
        "generator",
        "blocks.3.bn.running_var",
        Some((vec![8], vec![-1.0; 8])),
        &[],
    ));
    assert!(e.contains("running_var[0] = -1 is negative"), "{e}");
    let e = gen(edited("generator", "", None, &["extra.weight"]));
    assert!(
        e.contains("1 tensors are not part of this CP2Image generator: extra.weight"),
        "{e}"
    );
    let e = disc(edited(
        "discriminator",
        "blocks.1.conv.weight_u",
        Some((vec![16], vec![0.0; 16])),
        &[],
    ));
    assert!(e.contains("blocks.1.conv") && e.contains("σ"), "{e}");
    let e = disc(edited(
        "discriminator",
        "fc.weight",
        Some((vec![1, 64], vec![0.0; 64])),
        &[],
    ));
    assert!(e.contains("fc.weight") && e.contains("[1, 128]"), "{e}");
}

#[test]
fn random_generator_weights_load_and_say_untrained() {
    let cfg = GeneratorConfig {
        n_features: 7,
        channels: vec![8, 8, 4],
        out_channels: 3,
    };
    let w = random_generator_weights(&cfg, 5).unwrap();
    let dir = std::env::temp_dir().join(format!("cellmorph-cp2image-rand-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("g.safetensors");
    w.write(&path).unwrap();
    let file = TensorFile::open(&path).unwrap();
    assert!(cellmorph::models::cp2image::is_untrained(&file).is_some());
    let be = Backend::cpu();
    let g = Generator::from_file(&be, &file).unwrap();
    assert_eq!(g.config(), &cfg);
    assert_eq!(g.config().image_size(), 16);
    let z: Vec<f32> = (0..14).map(|i| (i as f32 * 0.37).sin()).collect();
    let img = g
        .forward(&be, &Tensor::from_vec(&be, &[2, 7], z).unwrap())
        .unwrap()
        .to_vec()
        .unwrap();
    assert_eq!(img.len(), 2 * 3 * 16 * 16);
    // He-scaled weights keep activations alive: the images are not flat grey.
    let (lo, hi) = img
        .iter()
        .fold((1.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    assert!(hi - lo > 0.1, "image range {lo}..{hi}");
    // Same seed, same file; another seed, other weights.
    let again = random_generator_weights(&cfg, 5).unwrap();
    again.write(dir.join("g2.safetensors")).unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(dir.join("g2.safetensors")).unwrap()
    );
    random_generator_weights(&cfg, 6)
        .unwrap()
        .write(dir.join("g3.safetensors"))
        .unwrap();
    assert_ne!(
        std::fs::read(&path).unwrap(),
        std::fs::read(dir.join("g3.safetensors")).unwrap()
    );
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------------
// Features, standardization, manipulation, interpolation, sheets.

use cellmorph::apps::cp2image::features::{FeatureColumns, FeatureTable, Standardizer};
use cellmorph::apps::cp2image::sheets::{CropSet, DisplayScale, Sheet, Tile};
use cellmorph::apps::cp2image::vectors::{
    cosine_similarity, linear_path, linspace, manipulation, nearest_row, replacement_path,
    resolve_feature,
};
use proptest::prelude::*;

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn parse(text: &str, cols: FeatureColumns<'_>) -> Result<FeatureTable, String> {
    FeatureTable::parse_csv(text, "t.csv", cols).map_err(|e| e.to_string())
}

#[test]
fn feature_csv_selects_columns_and_keeps_text() {
    let csv = "cell_id,field,a,b,centroid_y\n0,F1,1,2,5\n1,\"F,2\",3,4.5,6\n";
    let t = parse(csv, FeatureColumns::AllButMetadata).unwrap();
    assert_eq!(t.names, ["a", "b"]);
    assert_eq!(t.values, [1.0, 2.0, 3.0, 4.5]);
    assert_eq!(t.ids, ["0", "1"]);
    assert_eq!(t.text_column("field").unwrap(), ["F1", "F,2"]);
    assert_eq!(t.group_rows("field", "F,2").unwrap(), [1]);
    assert_eq!(t.mean_of(&[0, 1]).unwrap(), [2.0, 3.25]);
    // Named: in the order asked, other columns (even numeric ones) kept as text.
    let wanted = names(&["b", "a"]);
    let t = parse(csv, FeatureColumns::Named(&wanted)).unwrap();
    assert_eq!(t.names, ["b", "a"]);
    assert_eq!(t.values, [2.0, 1.0, 4.5, 3.0]);
    assert_eq!(t.text_column("centroid_y").unwrap(), ["5", "6"]);
}

#[test]
fn feature_csv_errors_are_clear() {
    let all = FeatureColumns::AllButMetadata;
    let e = parse("id,a,b\n0,1,x\n", all).unwrap_err();
    assert!(
        e.contains("line 2") && e.contains("\"b\"") && e.contains("not a number"),
        "{e}"
    );
    let e = parse("id,a,b\n0,1,2\n1,NaN,2\n", all).unwrap_err();
    assert!(e.contains("line 3") && e.contains("not finite"), "{e}");
    let e = parse("id,a,b\n0,1,2\n1,2\n", all).unwrap_err();
    assert!(e.contains("line 3") && e.contains("2 fields"), "{e}");
    let e = parse("id,a,a\n0,1,2\n", all).unwrap_err();
    assert!(e.contains("duplicate column"), "{e}");
    let wanted = names(&["a", "Nuclei_Missing", "Other"]);
    let e = parse("id,a,b\n0,1,2\n", FeatureColumns::Named(&wanted)).unwrap_err();
    assert!(
        e.contains("2 of the 3") && e.contains("Nuclei_Missing") && e.contains("Other"),
        "{e}"
    );
    // A non-feature column may hold text; a feature column may not.
    let wanted = names(&["a"]);
    assert!(parse("id,a,b\n0,1,x\n", FeatureColumns::Named(&wanted)).is_ok());
    assert!(parse("id,a\n", all).unwrap_err().contains("no data rows"));
}

#[test]
fn standardizer_is_population_standardization() {
    let t = parse(
        "id,a,b,c\n0,1,10,7\n1,2,20,7\n2,6,60,7\n",
        FeatureColumns::AllButMetadata,
    )
    .unwrap();
    let s = Standardizer::fit(&t).unwrap();
    assert_eq!(s.features, ["a", "b", "c"]);
    assert_eq!(s.mean, [3.0, 30.0, 7.0]);
    // Population variance of (1, 2, 6): ((−2)² + (−1)² + 3²) / 3 = 14/3.
    let sd = (14.0f64 / 3.0).sqrt();
    assert!((s.std[0] - sd).abs() < 1e-12 && (s.std[1] - 10.0 * sd).abs() < 1e-10);
    assert_eq!(s.std[2], 1.0, "a constant feature gets deviation 1");
    let z = s.apply(&[6.0, 60.0, 7.0]).unwrap();
    assert!(
        (f64::from(z[0]) - 3.0 / sd).abs() < 1e-6 && z[2] == 0.0,
        "{z:?}"
    );
    let e = s.apply(&[1.0, 2.0]).unwrap_err().to_string();
    assert!(e.contains("length 2") && e.contains("expected 3"), "{e}");
    let e = s.apply(&[1.0, f64::NAN, 7.0]).unwrap_err().to_string();
    assert!(e.contains("\"b\"") && e.contains("NaN"), "{e}");
    assert!(s.check_generator(3).is_ok());
    let e = s.check_generator(32).unwrap_err().to_string();
    assert!(e.contains("3 features") && e.contains("32"), "{e}");

    let dir = std::env::temp_dir().join(format!("cellmorph-cp2image-std-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let weights = dir.join("g.weights.safetensors");
    let path = Standardizer::default_path(&weights);
    assert_eq!(path, dir.join("g.weights.standardize.json"));
    s.write(&path).unwrap();
    assert_eq!(Standardizer::read(&path).unwrap(), s);
    std::fs::write(&path, r#"{"features":["a"],"mean":[0,1],"std":[1]}"#).unwrap();
    let e = Standardizer::read(&path).unwrap_err().to_string();
    assert!(e.contains("1 feature names, 2 means"), "{e}");
    std::fs::write(&path, r#"{"features":["a"],"mean":[0],"std":[0]}"#).unwrap();
    assert!(Standardizer::read(&path)
        .unwrap_err()
        .to_string()
        .contains("positive deviation"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn features_resolve_by_name_or_index() {
    let n = names(&[
        "Nuclei_AreaShape_Area",
        "Nuclei_Intensity_MeanIntensity_DNA",
        "x",
    ]);
    assert_eq!(resolve_feature(&n, "x").unwrap(), 2);
    assert_eq!(resolve_feature(&n, "1").unwrap(), 1);
    let e = resolve_feature(&n, "3").unwrap_err().to_string();
    assert!(e.contains("out of range") && e.contains("0 … 2"), "{e}");
    let e = resolve_feature(&n, "meanintensity")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown feature") && e.contains("Nuclei_Intensity_MeanIntensity_DNA"),
        "{e}"
    );
    let e = resolve_feature(&n, "Cytoplasm_Foo")
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown feature \"Cytoplasm_Foo\""), "{e}");
}

#[test]
fn manipulation_changes_one_feature() {
    let base = [0.5f32, -1.0, 2.0];
    let values = linspace(-2.0, 2.0, 5).unwrap();
    assert_eq!(values, [-2.0, -1.0, 0.0, 1.0, 2.0]);
    let rows = manipulation(&base, 1, &values).unwrap();
    for (row, v) in rows.chunks(3).zip(&values) {
        assert_eq!(row, [0.5, *v as f32, 2.0]);
    }
    assert!(manipulation(&base, 3, &values).is_err());
    assert!(linspace(0.0, 1.0, 1).is_err());
    assert!(linspace(f64::NAN, 1.0, 3).is_err());
}

#[test]
fn cosine_and_linear_path() {
    assert!((cosine_similarity(&[1.0, 0.0], &[1.0, 1.0]) - 0.5f64.sqrt()).abs() < 1e-12);
    assert!((cosine_similarity(&[1.0, 2.0], &[-2.0, -4.0]) + 1.0).abs() < 1e-12);
    assert_eq!(cosine_similarity(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    let path = linear_path(&[0.0, 10.0], &[4.0, 2.0], 5).unwrap();
    assert_eq!(path, [0.0, 10.0, 1.0, 8.0, 2.0, 6.0, 3.0, 4.0, 4.0, 2.0]);
    assert!(linear_path(&[0.0], &[1.0, 2.0], 3).is_err());
    assert_eq!(
        nearest_row(&[0.0, 0.0, 5.0, 5.0, 1.0, 1.0], 2, &[1.2, 0.9]),
        Some(2)
    );
}

proptest! {
    #![proptest_config(common::proptest_config(64))]

    /// Step k of the replacement path holds the target in exactly the
    /// min(k·per_step, p) dimensions with the largest |to − from| and the
    /// source elsewhere; it starts at `from` and ends at `to`.
    #[test]
    fn replacement_path_replaces_most_different_first(
        p in 1usize..120,
        per_step in 1usize..60,
        seed in any::<u64>(),
    ) {
        println!("seed {seed}, p {p}, per_step {per_step}");
        let mut s = seed | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // Coarse values so that ties and zero differences occur.
            ((s >> 60) as f32) / 4.0 - 2.0
        };
        let from: Vec<f32> = (0..p).map(|_| next()).collect();
        let to: Vec<f32> = (0..p).map(|_| next()).collect();
        let path = replacement_path(&from, &to, per_step).unwrap();
        let steps = p.div_ceil(per_step) + 1;
        prop_assert_eq!(path.len(), steps * p);
        prop_assert_eq!(&path[..p], from.as_slice());
        prop_assert_eq!(&path[(steps - 1) * p..], to.as_slice());
        for k in 0..steps {
            let v = &path[k * p..(k + 1) * p];
            let replaced: Vec<usize> = (0..p).filter(|&i| v[i] == to[i] && from[i] != to[i]).collect();
            let kept: Vec<usize> = (0..p).filter(|&i| v[i] == from[i] && from[i] != to[i]).collect();
            prop_assert_eq!(replaced.len() + kept.len(), (0..p).filter(|&i| from[i] != to[i]).count());
            prop_assert!(replaced.len() <= (k * per_step).min(p));
            let d = |i: usize| (to[i] - from[i]).abs();
            let min_replaced = replaced.iter().map(|&i| d(i)).fold(f32::INFINITY, f32::min);
            let max_kept = kept.iter().map(|&i| d(i)).fold(0.0f32, f32::max);
            prop_assert!(min_replaced >= max_kept, "step {}: replaced {} < kept {}", k, min_replaced, max_kept);
        }
    }
}

/// A solid-colour tile.
fn solid(w: u32, h: u32, rgb: [u8; 3]) -> Tile {
    Tile {
        image: image::RgbImage::from_pixel(w, h, image::Rgb(rgb)),
        caption: "COS 0.5".into(),
    }
}

#[test]
fn sheet_places_tiles_and_draws_text() {
    let sheet = Sheet {
        title: vec!["TITLE".into()],
        rows: vec![
            (
                "REAL".into(),
                vec![solid(8, 8, [255, 0, 0]), solid(8, 8, [0, 255, 0])],
            ),
            ("GEN".into(), vec![solid(8, 8, [0, 0, 255])]),
        ],
    };
    let img = sheet.render().unwrap();
    // Layout: gap 6, margin = "REAL" (4 × 6 px) + gap, title line 10 + gap,
    // rows of tile (8) + caption line (10) + gap (6).
    let x0 = 6 + 24 + 6;
    let y0 = 6 + 10 + 6;
    assert_eq!(img.get_pixel(x0, y0).0, [255, 0, 0]);
    assert_eq!(img.get_pixel(x0 + 7, y0 + 7).0, [255, 0, 0]);
    assert_eq!(img.get_pixel(x0 + 8 + 6, y0).0, [0, 255, 0]);
    assert_eq!(img.get_pixel(x0, y0 + 24).0, [0, 0, 255]);
    // Ink in the title and in the first caption.
    let ink = |x: std::ops::Range<u32>, y: std::ops::Range<u32>| {
        x.flat_map(|x| y.clone().map(move |y| (x, y)))
            .any(|(x, y)| img.get_pixel(x, y).0 == [235, 235, 235])
    };
    assert!(ink(6..36, 6..13), "title text");
    assert!(ink(x0..x0 + 8, y0 + 10..y0 + 17), "caption text");
}

#[test]
fn display_scale_maps_channels_to_colours() {
    // Channel 0 → blue, 1 → green, 2 → red; values over max clip.
    let scale = DisplayScale {
        max: vec![0.5, 1.0, 0.25],
    };
    let img = [0.25f32, 1.0, 0.5];
    let tile = scale.render(&img, 1, 2).unwrap();
    assert_eq!(tile.dimensions(), (2, 2));
    assert_eq!(tile.get_pixel(1, 1).0, [255, 255, 128]);
    let gray = DisplayScale::unit(1).render(&[0.5], 1, 1).unwrap();
    assert_eq!(gray.get_pixel(0, 0).0, [128, 128, 128]);
    assert!(scale.render(&[0.0; 5], 1, 1).is_err());
    // Percentile stretch of generated images, nearest rank: the 99.5th of
    // 0/200 … 199/200 is the ⌈0.995 · 200⌉ = 199th smallest value, 198/200.
    let imgs: Vec<f32> = (0..200).map(|i| i as f32 / 200.0).collect();
    let s = DisplayScale::from_images(&imgs, 1, 4, 99.5).unwrap();
    assert_eq!(s.max, [198.0 / 200.0]);
}

// ---------------------------------------------------------------------------
// 64 real single cells (tests/data/single_cells: evenly spaced rows of the
// 1,510 ExampleFly cells, made by scripts/fixtures/test_data.py).

/// Cells in the test subset.
const N_CELLS: usize = 64;

fn single_cells(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/single_cells")
        .join(name);
    assert!(p.is_file(), "missing test data {}", p.display());
    p
}

fn real_feature_names() -> Vec<String> {
    std::fs::read_to_string(single_cells("feature_names.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn real_features_match_the_tensor_file_and_standardize() {
    let wanted = real_feature_names();
    assert_eq!(wanted.len(), 405);
    let table =
        FeatureTable::read_csv(single_cells("features.csv"), FeatureColumns::Named(&wanted))
            .unwrap();
    assert_eq!((table.n_rows(), table.n_features()), (N_CELLS, 405));
    // Without the names list: every column but cell_id and the metadata.
    let all = FeatureTable::read_csv(single_cells("features.csv"), FeatureColumns::AllButMetadata)
        .unwrap();
    assert_eq!(all.names, wanted);
    assert_eq!(all.text_column("field").unwrap()[0], "01_POS002");

    // The CSV holds the float32 tensor's values to 7 significant digits.
    let cells = TensorFile::open(single_cells("cells.safetensors")).unwrap();
    let (shape, x) = cells.f32("features").unwrap();
    assert_eq!(shape, [N_CELLS, 405]);
    for (i, (&a, &b)) in table.values.iter().zip(&x).enumerate() {
        assert!(
            (a - f64::from(b)).abs() <= 1e-6 * f64::from(b).abs().max(1e-30),
            "value {i}: csv {a} vs tensor {b}"
        );
    }

    // Standardized columns have mean 0 and deviation 1.
    let s = Standardizer::fit(&table).unwrap();
    let z = s.apply_table(&table).unwrap();
    for f in [0usize, 100, 404] {
        let col: Vec<f64> = z.chunks(405).map(|r| f64::from(r[f])).collect();
        let m = col.iter().sum::<f64>() / N_CELLS as f64;
        let v = col.iter().map(|c| (c - m).powi(2)).sum::<f64>() / N_CELLS as f64;
        assert!(
            m.abs() < 1e-5 && (v - 1.0).abs() < 1e-4,
            "feature {f}: mean {m}, var {v}"
        );
    }
}

#[test]
fn real_crops_read_and_index_by_cell_id() {
    let crops = CropSet::read(single_cells("cells.safetensors")).unwrap();
    assert_eq!((crops.n, crops.channels, crops.size), (N_CELLS, 3, 64));
    assert_eq!(crops.index_of("17").unwrap(), 17);
    assert!(crops
        .index_of("64")
        .unwrap_err()
        .to_string()
        .contains("64 crops"));
    assert!(crops
        .index_of("cell7")
        .unwrap_err()
        .to_string()
        .contains("not a crop index"));
    let c = crops.crop(3).unwrap();
    assert_eq!(c.len(), 3 * 64 * 64);
    assert!(c.iter().all(|&v| (0.0..=1.0).contains(&v)) && c.iter().any(|&v| v > 0.0));
    let s = DisplayScale::from_crops(&crops, &[0, 1, 2, 3], 99.5).unwrap();
    assert!(s.max.iter().all(|&m| m > 0.0 && m <= 1.0), "{:?}", s.max);
}

/// A small generator with p = 405 (random weights) run on real
/// standardized features: the emulated kernels agree with the CPU.
#[test]
fn real_features_drive_the_generator_on_cpu_and_emulated() {
    let wanted = real_feature_names();
    let table =
        FeatureTable::read_csv(single_cells("features.csv"), FeatureColumns::Named(&wanted))
            .unwrap();
    let s = Standardizer::fit(&table).unwrap();
    let rows = [0usize, 4, 15, 40, N_CELLS - 1];
    let z: Vec<f32> = rows
        .iter()
        .flat_map(|&r| s.apply(table.row(r).unwrap()).unwrap())
        .collect();
    let cfg = GeneratorConfig {
        n_features: 405,
        channels: vec![32, 16, 16, 8, 8],
        out_channels: 3,
    };
    let dir = std::env::temp_dir().join(format!("cellmorph-cp2image-real-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("g.safetensors");
    random_generator_weights(&cfg, 11)
        .unwrap()
        .write(&path)
        .unwrap();
    let file = TensorFile::open(&path).unwrap();
    let run = |be: &Backend| {
        let g = Generator::from_file(be, &file).unwrap();
        cellmorph::apps::cp2image::generator::generate(be, &g, &z, 2).unwrap()
    };
    let cpu = run(&Backend::cpu());
    assert_eq!(cpu.len(), rows.len() * 3 * 64 * 64);
    assert!(cpu.iter().all(|v| (0.0..=1.0).contains(v)));
    assert_close(
        "real features, emulated vs cpu",
        &run(&emulated()),
        &cpu,
        FOLD_TOL,
    );
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------------
// The `cellmorph cp2image` commands on the real single-cell set.

/// Runs the binary; returns (success, stdout, stderr).
fn cellmorph(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cellmorph"))
        .args(args)
        .output()
        .expect("running cellmorph");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(args: &[&str]) -> (String, String) {
    let (success, stdout, stderr) = cellmorph(args);
    assert!(success, "cellmorph {args:?} failed:\n{stdout}\n{stderr}");
    (stdout, stderr)
}

fn fails(args: &[&str]) -> String {
    let (success, stdout, stderr) = cellmorph(args);
    assert!(!success, "cellmorph {args:?} should fail:\n{stdout}");
    stderr
}

fn png_size(path: &Path) -> (u32, u32) {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
        .dimensions()
}

#[test]
fn cli_examples_on_real_single_cells() {
    let dir = std::env::temp_dir().join(format!("cellmorph-cp2image-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let s = |p: PathBuf| p.to_string_lossy().into_owned();
    let g = s(dir.join("g405.safetensors"));
    let feats = s(single_cells("features.csv"));
    let crops = s(single_cells("cells.safetensors"));

    let (out, _) = ok(&[
        "cp2image",
        "init-weights",
        "--features",
        "405",
        "--output",
        &g,
        "--seed",
        "3",
        "--channels",
        "32,16,16,8,8",
    ]);
    assert!(out.contains("UNTRAINED"), "{out}");
    let (out, _) = ok(&[
        "cp2image",
        "standardize",
        "--features",
        &feats,
        "--weights",
        &g,
    ]);
    assert!(out.contains("405 features from 64 cells"), "{out}");
    assert!(dir.join("g405.standardize.json").is_file());

    let sheet = dir.join("sheet.png");
    let (_, err) = ok(&[
        "cp2image",
        "generate",
        "--weights",
        &g,
        "--features",
        &feats,
        "--crops",
        &crops,
        "--limit",
        "3",
        "--zoom",
        "1",
        "--output",
        &s(sheet.clone()),
    ]);
    assert!(err.contains("UNTRAINED"), "{err}");
    // Two rows (real, generated) of three 64-px tiles under 3 title lines.
    let (w, h) = png_size(&sheet);
    assert!(w >= 3 * 64 && h >= 2 * 64 + 30, "{w}×{h}");

    let pngs = dir.join("pngs");
    ok(&[
        "cp2image",
        "generate",
        "--weights",
        &g,
        "--features",
        &feats,
        "--rows",
        "3,40",
        "--output",
        &s(pngs.clone()),
    ]);
    assert_eq!(png_size(&pngs.join("3.png")), (64, 64));
    assert_eq!(png_size(&pngs.join("40.png")), (64, 64));

    let manip = dir.join("manip.png");
    let (out, _) = ok(&[
        "cp2image",
        "manipulate",
        "--weights",
        &g,
        "--features",
        &feats,
        "--crops",
        &crops,
        "--feature",
        "Nuclei_AreaShape_Area",
        "--row",
        "12",
        "--from",
        "-2",
        "--to",
        "2",
        "--steps",
        "5",
        "--zoom",
        "1",
        "--output",
        &s(manip.clone()),
    ]);
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with(char::is_numeric))
            .count(),
        5,
        "{out}"
    );
    // The real crop and five generated images in one row.
    assert!(png_size(&manip).0 >= 6 * 64);

    let interp = dir.join("interp.png");
    let (out, _) = ok(&[
        "cp2image",
        "interpolate",
        "--weights",
        &g,
        "--features",
        &feats,
        "--crops",
        &crops,
        "--from-row",
        "4",
        "--to-row",
        "15",
        "--zoom",
        "1",
        "--output",
        &s(interp.clone()),
    ]);
    // 405 features, 50 per step: 9 steps after the start; the last is the target.
    let cos: Vec<f64> = out
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter_map(|(_, c)| c.parse().ok())
        .collect();
    assert_eq!(cos.len(), 10, "{out}");
    assert!((cos[9] - 1.0).abs() < 1e-4 && cos[0] < cos[9], "{cos:?}");
    assert!(png_size(&interp).0 >= 12 * 64);

    let groups = dir.join("groups.png");
    let (out, _) = ok(&[
        "cp2image",
        "interpolate",
        "--weights",
        &g,
        "--features",
        &feats,
        "--crops",
        &crops,
        "--group-means",
        "--from-group",
        "01_POS002",
        "--to-group",
        "01_POS218",
        "--steps",
        "4",
        "--zoom",
        "1",
        "--output",
        &s(groups.clone()),
    ]);
    assert!(out.lines().any(|l| l.starts_with("3\t1.0000")), "{out}");
    assert!(png_size(&groups).0 >= 6 * 64);

    // Clear errors.
    let e = fails(&[
        "cp2image",
        "manipulate",
        "--weights",
        &g,
        "--features",
        &feats,
        "--feature",
        "Nuclei_AreaShape_Volume",
        "--output",
        &s(dir.join("x.png")),
    ]);
    assert!(
        e.contains("unknown feature \"Nuclei_AreaShape_Volume\""),
        "{e}"
    );
    let e = fails(&[
        "cp2image",
        "interpolate",
        "--weights",
        &g,
        "--features",
        &feats,
        "--group-means",
        "--from-group",
        "01_POS002",
        "--to-group",
        "POS999",
        "--output",
        &s(dir.join("x.png")),
    ]);
    assert!(e.contains("POS999") && e.contains("01_POS076"), "{e}");
    let bad = dir.join("bad.csv");
    let text = std::fs::read_to_string(single_cells("features.csv")).unwrap();
    let mut lines: Vec<String> = text.lines().take(3).map(str::to_string).collect();
    let set_area = |line: &str, v: &str| {
        let mut f: Vec<&str> = line.split(',').collect();
        f[4] = v; // Nuclei_AreaShape_Area, after cell_id, field and the centroid
        f.join(",")
    };
    lines[2] = set_area(&lines[2], "NaN");
    std::fs::write(&bad, lines.join("\n")).unwrap();
    let e = fails(&[
        "cp2image",
        "generate",
        "--weights",
        &g,
        "--features",
        &s(bad.clone()),
        "--output",
        &s(dir.join("y")),
    ]);
    assert!(e.contains("line 3") && e.contains("not finite"), "{e}");
    lines[2] = set_area(&lines[2], "n/a");
    std::fs::write(&bad, lines.join("\n")).unwrap();
    let e = fails(&[
        "cp2image",
        "generate",
        "--weights",
        &g,
        "--features",
        &s(bad.clone()),
        "--output",
        &s(dir.join("y")),
    ]);
    assert!(
        e.contains("line 3") && e.contains("\"n/a\" is not a number"),
        "{e}"
    );
    // The fixture generator takes 32 features, the file standardizes 405.
    let e = fails(&[
        "cp2image",
        "generate",
        "--weights",
        &s(fixture("generator.weights")),
        "--standardize",
        &s(dir.join("g405.standardize.json")),
        "--features",
        &feats,
        "--output",
        &s(dir.join("y")),
    ]);
    assert!(e.contains("405 features but the generator takes 32"), "{e}");
    let e = fails(&[
        "cp2image",
        "generate",
        "--weights",
        &s(fixture("generator.weights")),
        "--features",
        &feats,
        "--output",
        &s(dir.join("y")),
    ]);
    assert!(
        e.contains("no standardization file") && e.contains("cp2image standardize"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
