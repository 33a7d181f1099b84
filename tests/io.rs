//! safetensors loading: PyTorch names, and a clear error for each kind of bad file.

mod common;

use cellmorph::io::{TensorFile, TensorWriter};
use cellmorph::{Backend, Error};

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn sample_file(dir: &std::path::Path) -> std::path::PathBuf {
    let mut w = TensorWriter::new();
    w.add_slice(
        "enc.blocks.0.weight",
        &[2, 1, 2, 2],
        &[1.0f32, 2., 3., 4., 5., 6., 7., 8.],
    )
    .unwrap();
    w.add_slice("enc.blocks.0.bias", &[2], &[0.5f32, -0.5])
        .unwrap();
    w.add_slice("ids", &[3], &[1i64, 2, 3]).unwrap();
    w.set_metadata("format", "pt");
    let p = dir.join("w.safetensors");
    w.write(&p).unwrap();
    p
}

fn tempdir(tag: &str) -> common::TempDir {
    common::TempDir::new("io", tag)
}

#[test]
fn roundtrip_with_pytorch_names() {
    let dir = tempdir("rt");
    let p = sample_file(&dir);
    let f = TensorFile::open(&p).unwrap();
    assert_eq!(f.len(), 3);
    assert_eq!(f.shape("enc.blocks.0.weight"), Some(&[2usize, 1, 2, 2][..]));
    let be = Backend::cpu();
    let w = f.expect(&be, "enc.blocks.0.weight", &[2, 1, 2, 2]).unwrap();
    assert_eq!(w.to_vec().unwrap(), vec![1.0, 2., 3., 4., 5., 6., 7., 8.]);
    assert_eq!(f.i64("ids").unwrap().1, vec![1, 2, 3]);
    assert_eq!(
        f.metadata()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
}

#[test]
fn missing_key_names_the_key() {
    let dir = tempdir("missing");
    let f = TensorFile::open(sample_file(&dir)).unwrap();
    let err = f
        .expect(&Backend::cpu(), "enc.blocks.2.weight", &[2])
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Format { .. }), "{msg}");
    assert!(
        msg.contains("missing tensor \"enc.blocks.2.weight\""),
        "{msg}"
    );
    assert!(msg.contains("w.safetensors"), "{msg}");
}

#[test]
fn wrong_shape_names_both_shapes() {
    let dir = tempdir("shape");
    let f = TensorFile::open(sample_file(&dir)).unwrap();
    let msg = f
        .expect(&Backend::cpu(), "enc.blocks.0.weight", &[2, 1, 3, 3])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("[2, 1, 2, 2]") && msg.contains("[2, 1, 3, 3]"),
        "{msg}"
    );
}

#[test]
fn wrong_dtype_is_rejected() {
    let dir = tempdir("dtype");
    let f = TensorFile::open(sample_file(&dir)).unwrap();
    let msg = f.f32("ids").unwrap_err().to_string();
    assert!(
        msg.contains("I64") && msg.contains("floating-point"),
        "{msg}"
    );
    let msg = f.i64("enc.blocks.0.bias").unwrap_err().to_string();
    assert!(msg.contains("F32") && msg.contains("integer"), "{msg}");
}

#[test]
fn truncated_and_corrupt_files_are_errors() {
    let dir = tempdir("trunc");
    let p = sample_file(&dir);
    let bytes = std::fs::read(&p).unwrap();
    for cut in [0, 4, 8, 20, bytes.len() - 1] {
        let err = TensorFile::from_bytes("cut.safetensors", bytes[..cut].to_vec()).unwrap_err();
        assert!(
            err.to_string().contains("cut.safetensors"),
            "cut at {cut}: {err}"
        );
    }
    let mut garbage = bytes.clone();
    garbage[10] = b'{';
    garbage[11] = b'{';
    assert!(TensorFile::from_bytes("bad.safetensors", garbage).is_err());
    let err = TensorFile::open(dir.join("does-not-exist.safetensors")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
}

#[test]
fn reads_the_pytorch_ops_fixture() {
    let p = fixture("ops.safetensors");
    assert!(
        p.is_file(),
        "fixture {} is missing: the golden tests cannot run",
        p.display()
    );
    let f = TensorFile::open(&p).unwrap();
    let (shape, _) = f.f32("conv2d_0.weight").unwrap();
    assert_eq!(shape, vec![8, 3, 3, 3]);
    assert!(f.metadata().is_some_and(|m| m.contains_key("cases")));
}

#[test]
fn writing_replaces_atomically() {
    let dir = tempdir("atomic");
    let p = dir.join("out.safetensors");
    std::fs::write(&p, b"previous").unwrap();
    let mut w = TensorWriter::new();
    assert!(w.add_slice("x", &[2, 2], &[1.0f32; 3]).is_err());
    w.add_slice("x", &[2, 2], &[1.0f32; 4]).unwrap();
    // A directory in the way: the write fails and the old file is untouched.
    assert!(w.write(&dir).is_err());
    assert_eq!(std::fs::read(&p).unwrap(), b"previous");
    w.write(&p).unwrap();
    assert_eq!(TensorFile::open(&p).unwrap().names(), vec!["x".to_string()]);
}

// --- models::weights: the one checked reader every model loads through ----

use cellmorph::models::weights::{BatchNorm, Weights, BN_EPS};
use cellmorph::models::{DenseNet, Discriminator, Generator, VqVae2};
use safetensors::Dtype;

/// One tensor of a weight file, floating-point values or integers.
#[derive(Clone)]
struct Stored {
    name: String,
    shape: Vec<usize>,
    values: Values,
}

#[derive(Clone)]
enum Values {
    F32(Vec<f32>),
    F16(Vec<f32>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

/// The tensors of `tests/fixtures/{name}.weights.safetensors`.
fn fixture_tensors(name: &str) -> Vec<Stored> {
    let f = TensorFile::open(fixture(&format!("{name}.weights.safetensors"))).unwrap();
    f.names()
        .into_iter()
        .map(|n| {
            let shape = f.shape(&n).unwrap().to_vec();
            let values = if f.dtype(&n) == Some(Dtype::F32) {
                Values::F32(f.f32(&n).unwrap().1)
            } else {
                Values::I64(f.i64(&n).unwrap().1)
            };
            Stored {
                name: n,
                shape,
                values,
            }
        })
        .collect()
}

/// Writes `tensors` (each name prefixed by `prefix`) into a temporary file
/// named after `tag` and opens it.
fn write_tensors(tag: &str, prefix: &str, tensors: &[Stored]) -> TensorFile {
    let mut w = TensorWriter::new();
    for t in tensors {
        let name = format!("{prefix}{}", t.name);
        match &t.values {
            Values::F32(v) => w.add_slice(&name, &t.shape, v),
            Values::F16(v) => {
                let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
                w.add_slice(&name, &t.shape, &h)
            }
            Values::I32(v) => w.add_slice(&name, &t.shape, v),
            Values::I64(v) => w.add_slice(&name, &t.shape, v),
        }
        .unwrap();
    }
    // The folder goes when this returns; the opened file's data stays
    // readable (the loader holds it).
    let dir = tempdir("weights");
    let path = dir.join(format!("{tag}.safetensors"));
    w.write(&path).unwrap();
    TensorFile::open(&path).unwrap()
}

/// The small fixture of a model with `edit` applied to its tensors.
fn edited_model(model: Model, tag: &str, edit: impl FnOnce(&mut Vec<Stored>)) -> TensorFile {
    let mut tensors = fixture_tensors(model.fixture());
    edit(&mut tensors);
    write_tensors(&format!("{}-{tag}", model.fixture()), "", &tensors)
}

/// Sets element `index` of tensor `name` to `value`.
fn poke(tensors: &mut [Stored], name: &str, index: usize, value: f32) {
    let t = tensors.iter_mut().find(|t| t.name == name).unwrap();
    match &mut t.values {
        Values::F32(v) => v[index] = value,
        _ => panic!("{name} is not f32"),
    }
}

fn stored<'a>(tensors: &'a mut [Stored], name: &str) -> &'a mut Stored {
    tensors
        .iter_mut()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}

#[derive(Clone, Copy, Debug)]
enum Model {
    VqVae2,
    DenseNet,
    Generator,
    Discriminator,
}

const MODELS: [Model; 4] = [
    Model::VqVae2,
    Model::DenseNet,
    Model::Generator,
    Model::Discriminator,
];

impl Model {
    fn fixture(self) -> &'static str {
        match self {
            Model::VqVae2 => "vqvae2_small",
            Model::DenseNet => "densenet_small",
            Model::Generator => "cp2image_small.generator",
            Model::Discriminator => "cp2image_small.discriminator",
        }
    }

    /// A convolution weight of each model.
    fn conv_weight(self) -> &'static str {
        match self {
            Model::VqVae2 => "enc_t.blocks.2.weight",
            Model::DenseNet => "features.denseblock1.denselayer2.conv2.weight",
            Model::Generator => "blocks.1.conv.weight",
            Model::Discriminator => "blocks.2.conv.weight_orig",
        }
    }

    /// A bias or BatchNorm vector of each model.
    fn vector(self) -> &'static str {
        match self {
            Model::VqVae2 => "dec.blocks.0.bias",
            Model::DenseNet => "features.transition1.norm.running_mean",
            Model::Generator => "blocks.2.bn.bias",
            Model::Discriminator => "blocks.0.conv.weight_u",
        }
    }

    /// Loads `file` with the model's `from_file` (the public entry point).
    fn load_file(self, file: &TensorFile) -> cellmorph::Result<()> {
        let be = Backend::cpu();
        match self {
            Model::VqVae2 => VqVae2::from_file(&be, file).map(drop),
            Model::DenseNet => DenseNet::from_file(&be, file).map(drop),
            Model::Generator => Generator::from_file(&be, file).map(drop),
            Model::Discriminator => Discriminator::from_file(&be, file).map(drop),
        }
    }

    /// Loads `path` with the model's `load`.
    fn load(self, path: &std::path::Path) -> cellmorph::Result<()> {
        let be = Backend::cpu();
        match self {
            Model::VqVae2 => VqVae2::load(&be, path).map(drop),
            Model::DenseNet => DenseNet::load(&be, path).map(drop),
            Model::Generator => Generator::load(&be, path).map(drop),
            Model::Discriminator => Discriminator::load(&be, path).map(drop),
        }
    }

    fn error(self, file: &TensorFile) -> String {
        match self.load_file(file) {
            Ok(()) => panic!("{self:?}: {} must not load", file.path().display()),
            Err(e) => e.to_string(),
        }
    }
}

#[test]
fn every_model_has_load_and_from_file() {
    for model in MODELS {
        let path = fixture(&format!("{}.weights.safetensors", model.fixture()));
        model.load(&path).unwrap();
        model.load_file(&TensorFile::open(&path).unwrap()).unwrap();
        let err = model
            .load(&tempdir("load").join("none.safetensors"))
            .unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{model:?}: {err}");
    }
}

#[test]
fn nan_and_inf_weights_are_rejected_by_every_model_naming_tensor_and_index() {
    for model in MODELS {
        for (name, index) in [(model.conv_weight(), 5), (model.vector(), 1)] {
            for (what, value) in [
                ("NaN", f32::NAN),
                ("inf", f32::INFINITY),
                ("-inf", f32::NEG_INFINITY),
            ] {
                let tag = format!("{}-{what}", name.replace('.', "_"));
                let file = edited_model(model, &tag, |t| poke(t, name, index, value));
                let msg = model.error(&file);
                assert!(
                    msg.contains(&format!("tensor {name:?}"))
                        && msg.contains("non-finite")
                        && msg.contains(&format!("({what}) at flat index {index}"))
                        && msg.contains(&format!("{tag}.safetensors")),
                    "{model:?}, {name}[{index}] = {what}: {msg}"
                );
            }
        }
    }
}

#[test]
fn nan_and_inf_codebook_entries_are_rejected() {
    // Before the shared reader a NaN code vector loaded and silently never
    // (or always) won the nearest-code search.
    for codebook in ["quantize_t.embed", "quantize_b.embed"] {
        for (what, value) in [("NaN", f32::NAN), ("inf", f32::INFINITY)] {
            // Column 3 of row 2 of the [embed_dim, n_embed] = [16, 24] codebook.
            let index = 2 * 24 + 3;
            let file = edited_model(Model::VqVae2, &format!("{codebook}-{what}"), |t| {
                poke(t, codebook, index, value)
            });
            let msg = Model::VqVae2.error(&file);
            assert!(
                msg.contains(&format!("tensor {codebook:?}"))
                    && msg.contains(&format!("non-finite value ({what}) at flat index {index}")),
                "{codebook}[{index}] = {what}: {msg}"
            );
        }
    }
    // The training-only buffers are shape-checked but not read: as before,
    // their values do not matter for inference.
    let file = edited_model(Model::VqVae2, "embed_avg-nan", |t| {
        poke(t, "quantize_t.embed_avg", 0, f32::NAN)
    });
    Model::VqVae2.load_file(&file).unwrap();
    let file = edited_model(Model::VqVae2, "cluster_size-shape", |t| {
        let s = stored(t, "quantize_b.cluster_size");
        s.shape = vec![23];
        s.values = Values::F32(vec![1.0; 23]);
    });
    let msg = Model::VqVae2.error(&file);
    assert!(
        msg.contains("quantize_b.cluster_size") && msg.contains("[23]") && msg.contains("[24]"),
        "{msg}"
    );
}

#[test]
fn integer_weights_are_rejected_naming_both_dtypes_and_half_weights_still_load() {
    for model in MODELS {
        let name = model.vector();
        let file = edited_model(model, "i32", |t| {
            let s = stored(t, name);
            let Values::F32(v) = &s.values else { panic!() };
            s.values = Values::I32(v.iter().map(|&x| x as i32).collect());
        });
        let msg = model.error(&file);
        assert!(
            msg.contains(&format!("tensor {name:?} has dtype I32"))
                && msg.contains("expected a floating-point dtype"),
            "{model:?}: {msg}"
        );
        // F16 (and BF16, F64) weights were converted to f32 before and still are.
        let file = edited_model(model, "f16", |t| {
            let s = stored(t, name);
            let Values::F32(v) = &s.values else { panic!() };
            s.values = Values::F16(v.clone());
        });
        model.load_file(&file).unwrap();
    }
}

#[test]
fn wrong_shapes_name_the_tensor_and_both_shapes() {
    for model in MODELS {
        let name = model.vector();
        let mut want = Vec::new();
        let file = edited_model(model, "shape", |t| {
            let s = stored(t, name);
            want = s.shape.clone();
            s.shape = vec![want[0] + 1];
            s.values = Values::F32(vec![0.5; want[0] + 1]);
        });
        let msg = model.error(&file);
        assert!(
            msg.contains(&format!("tensor {name:?} has shape [{}]", want[0] + 1))
                && msg.contains(&format!("expected {want:?}")),
            "{model:?}: {msg}"
        );
    }
}

#[test]
fn leftover_tensors_are_rejected_by_every_model_and_training_buffers_accepted() {
    for model in MODELS {
        // The fixtures hold num_batches_tracked (DenseNet, CP2Image) and the
        // codebooks' cluster_size and embed_avg (VQ-VAE-2): accepted.
        model
            .load_file(&edited_model(model, "as_is", |_| {}))
            .unwrap();
        let file = edited_model(model, "extra", |t| {
            t.push(Stored {
                name: "extra.weight".into(),
                shape: vec![2],
                values: Values::F32(vec![1.0, 2.0]),
            })
        });
        let msg = model.error(&file);
        assert!(
            msg.contains("1 tensors") && msg.contains(": extra.weight"),
            "{model:?}: {msg}"
        );
    }
    // A num_batches_tracked that is not a scalar.
    let file = edited_model(Model::Generator, "tracked", |t| {
        let s = stored(t, "blocks.0.bn.num_batches_tracked");
        s.shape = vec![2];
        s.values = Values::I64(vec![1, 2]);
    });
    let msg = Model::Generator.error(&file);
    assert!(
        msg.contains("blocks.0.bn.num_batches_tracked") && msg.contains("[2]"),
        "{msg}"
    );
}

#[test]
fn the_reader_checks_and_records_what_it_hands_out() {
    let file = TensorFile::open(fixture("densenet_small.weights.safetensors")).unwrap();
    let mut w = Weights::new(&file);
    assert_eq!(w.prefix(), "");
    assert_eq!(w.names(), file.names());
    assert_eq!(w.leftovers().len(), file.len());
    let conv0 = w.host("features.conv0.weight", &[16, 3, 7, 7]).unwrap();
    assert_eq!(conv0, file.f32("features.conv0.weight").unwrap().1);
    let t = w.tensor(&Backend::cpu(), "classifier.bias", &[5]).unwrap();
    assert_eq!(t.to_vec().unwrap(), file.f32("classifier.bias").unwrap().1);
    assert_eq!(w.host_optional("features.conv0.bias", &[16]).unwrap(), None);
    assert!(w
        .skip("features.norm0.num_batches_tracked", &[&[]])
        .unwrap());
    assert!(!w.skip("no.such.tensor", &[&[]]).unwrap());
    let bn = w
        .batchnorm("features.denseblock1.denselayer1.norm1", 16)
        .unwrap();
    assert_eq!(bn.channels(), 16);
    let left = w.leftovers();
    for used in [
        "features.conv0.weight",
        "classifier.bias",
        "features.norm0.num_batches_tracked",
        "features.denseblock1.denselayer1.norm1.weight",
        "features.denseblock1.denselayer1.norm1.running_var",
        "features.denseblock1.denselayer1.norm1.num_batches_tracked",
    ] {
        assert!(!left.contains(&used.to_string()), "{used} is left over");
    }
    assert_eq!(left.len(), file.len() - 8);
    let msg = w
        .reject_leftovers("are not read by this test")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(&format!(
            "{} tensors are not read by this test: ",
            left.len()
        )) && msg.contains(&left[0])
            && msg.ends_with(", …"),
        "{msg}"
    );

    let msg = w
        .host("classifier.weight", &[5, 35])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("\"classifier.weight\" has shape [5, 36], expected [5, 35] from"),
        "{msg}"
    );
    let msg = Weights::new(&file)
        .shapes_from("the test's numbers")
        .host("classifier.weight", &[1])
        .unwrap_err()
        .to_string();
    assert!(
        msg.ends_with("expected [1] from the test's numbers"),
        "{msg}"
    );
    let msg = w
        .host("features.norm0.num_batches_tracked", &[])
        .unwrap_err();
    assert!(
        msg.to_string()
            .contains("has dtype I64, expected a floating-point dtype"),
        "{msg}"
    );
    let msg = w
        .host("features.norm9.weight", &[16])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("missing tensor \"features.norm9.weight\"")
            && msg.contains("densenet_small.weights.safetensors"),
        "{msg}"
    );
}

#[test]
fn the_reader_reads_under_a_prefix() {
    let mut tensors = fixture_tensors("densenet_small");
    let plain = write_tensors("plain", "", &tensors);
    tensors.truncate(3);
    let mut file_tensors = fixture_tensors("densenet_small");
    for t in &mut file_tensors {
        t.name = format!("module.{}", t.name);
    }
    file_tensors.extend(tensors.iter().cloned().map(|mut t| {
        t.name = format!("ema.{}", t.name);
        t
    }));
    let file = write_tensors("prefixed", "", &file_tensors);

    let mut w = Weights::with_prefix(&file, "module.");
    assert_eq!(w.prefix(), "module.");
    assert_eq!(
        w.full_name("features.conv0.weight"),
        "module.features.conv0.weight"
    );
    assert_eq!(w.names(), plain.names());
    assert!(w.contains("features.norm0.weight") && !w.contains("module.features.norm0.weight"));
    assert_eq!(w.shape("classifier.weight"), Some(&[5usize, 36][..]));
    let bn = w.batchnorm("features.norm0", 16).unwrap();
    assert_eq!(
        bn,
        Weights::new(&plain)
            .batchnorm("features.norm0", 16)
            .unwrap()
    );
    // Leftovers are the unread tensors under the prefix only, by full name.
    let left = w.leftovers();
    assert_eq!(left.len(), plain.len() - 5);
    assert!(left.iter().all(|n| n.starts_with("module.")), "{left:?}");
    // Errors name the full tensor.
    let msg = w.host("classifier.bias", &[4]).unwrap_err().to_string();
    assert!(
        msg.contains("tensor \"module.classifier.bias\" has shape [5]"),
        "{msg}"
    );
    let msg = w.host("nothing", &[1]).unwrap_err().to_string();
    assert!(msg.contains("missing tensor \"module.nothing\""), "{msg}");

    // The models read unprefixed state_dicts, as before: a prefixed one is
    // not theirs.
    let msg = Model::DenseNet.error(&file);
    assert!(msg.contains("not a torchvision DenseNet"), "{msg}");
    let mut ema = Weights::with_prefix(&file, "ema.");
    assert_eq!(ema.names().len(), 3);
    let name = &tensors[0].name;
    let Values::F32(want) = &tensors[0].values else {
        panic!()
    };
    assert_eq!(&ema.host(name, &tensors[0].shape).unwrap(), want);
    assert_eq!(ema.leftovers().len(), 2);
}

#[test]
fn one_batchnorm_fold() {
    let bn = BatchNorm {
        gamma: vec![1.5, -0.5, 2.0],
        beta: vec![0.1, 0.2, -0.3],
        mean: vec![0.4, -1.0, 0.0],
        var: vec![2.0, 0.25, 0.0],
    };
    assert_eq!(BN_EPS, 1e-5);
    let scale = bn.scale();
    for (c, &s) in scale.iter().enumerate() {
        let want = f64::from(bn.gamma[c]) / (f64::from(bn.var[c]) + f64::from(BN_EPS)).sqrt();
        assert_eq!(s, want);
    }
    let (s32, shift) = bn.scale_shift();
    for c in 0..3 {
        assert_eq!(s32[c], scale[c] as f32);
        assert_eq!(
            shift[c],
            (f64::from(bn.beta[c]) - f64::from(bn.mean[c]) * scale[c]) as f32
        );
    }
    // Folded into a bias-free conv, the bias is the shift bit for bit.
    let mut w: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
    let orig = w.clone();
    let mut b = vec![0.0; 3];
    bn.fold_into_conv(&mut w, &mut b).unwrap();
    assert_eq!(b, shift);
    for (i, (&got, &x)) in w.iter().zip(&orig).enumerate() {
        assert_eq!(got, (f64::from(x) * scale[i / 4]) as f32);
    }
    // With a conv bias: b' = (b − mean)·scale + β.
    let mut b = vec![1.0, -2.0, 0.5];
    bn.fold_into_conv(&mut w.clone(), &mut b).unwrap();
    for (c, (&got, x)) in b.iter().zip([1.0f64, -2.0, 0.5]).enumerate() {
        let want = (x - f64::from(bn.mean[c])) * scale[c] + f64::from(bn.beta[c]);
        assert_eq!(got, want as f32);
    }
    assert!(bn.fold_into_conv(&mut [0.0; 10], &mut [0.0; 3]).is_err());
    assert!(bn.fold_into_conv(&mut [0.0; 12], &mut [0.0; 2]).is_err());
}

#[test]
fn negative_running_variances_are_rejected_by_every_batchnorm() {
    for (model, name) in [
        (Model::DenseNet, "features.norm0.running_var"),
        (Model::Generator, "blocks.0.bn.running_var"),
        (Model::Discriminator, "blocks.4.bn.running_var"),
    ] {
        let file = edited_model(model, "negvar", |t| poke(t, name, 2, -0.5));
        let msg = model.error(&file);
        assert!(
            msg.contains(&format!("{name}[2] is negative")) && msg.contains("-0.5"),
            "{model:?}: {msg}"
        );
    }
}

/// The same tensors and metadata give the same bytes in every process: the
/// header's metadata is written in key order, not in a hash order that
/// changes from run to run.
#[test]
fn written_files_are_the_same_bytes_in_every_process() {
    let dir = tempdir("bytes");
    let mut w = TensorWriter::new();
    w.add_slice("b", &[2], &[1.0f32, 2.0]).unwrap();
    w.add_slice("a", &[1], &[3i64]).unwrap();
    for k in ["zeta", "alpha", "mid", "beta", "omega", "kappa", "x1", "x0"] {
        w.set_metadata(k, &format!("value of {k}"));
    }
    let path = dir.join("m.safetensors");
    w.write(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0);
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let keys = ["alpha", "beta", "kappa", "mid", "omega", "x0", "x1", "zeta"];
    let at: Vec<usize> = keys
        .iter()
        .map(|k| header.find(&format!("\"{k}\"")).unwrap())
        .collect();
    assert!(at.windows(2).all(|p| p[0] < p[1]), "{header}");
    // Still a file the loader reads, with everything in it.
    let f = TensorFile::open(&path).unwrap();
    assert_eq!(f.f32("b").unwrap(), (vec![2], vec![1.0, 2.0]));
    assert_eq!(f.metadata().unwrap()["kappa"], "value of kappa");
    // The bytes do not depend on the order of set_metadata calls either.
    let mut w2 = TensorWriter::new();
    w2.add_slice("a", &[1], &[3i64]).unwrap();
    w2.add_slice("b", &[2], &[1.0f32, 2.0]).unwrap();
    for k in keys.iter().rev() {
        w2.set_metadata(k, &format!("value of {k}"));
    }
    assert_eq!(w2.to_bytes().unwrap(), bytes);
}
