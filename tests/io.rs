//! safetensors loading: PyTorch names, and a clear error for each kind of bad file.

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

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("cellmorph-io-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
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
