//! Helpers shared by the test suites (each test file includes this module
//! with `mod common;`).

/// Uniform values in [−1, 1) from a SplitMix64 stream seeded with `seed`.
#[allow(dead_code)] // not every suite that includes this module draws data
pub fn data(seed: u64, len: usize) -> Vec<f32> {
    cellmorph::rng::signed_unit_vec(seed, len)
}

/// The path of fixture `name` (for example
/// `densenet121_kimhead.weights.safetensors`). Paper-size fixtures are kept
/// as seeded files (`NAME.seeded.safetensors`, see
/// `cellmorph::io::expand_seeded` and `scripts/fixtures/paper.py`); the
/// first call in a test process writes the complete file under cargo's
/// per-target temporary folder and returns its path.
#[allow(dead_code)] // not every suite that includes this module reads fixtures
pub fn fixture_path(name: &str) -> std::path::PathBuf {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static DONE: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let plain = dir.join(name);
    if plain.is_file() {
        return plain;
    }
    let stem = name
        .strip_suffix(".safetensors")
        .unwrap_or_else(|| panic!("fixture {name}: neither a file nor a seeded safetensors"));
    let seeded = dir.join(format!("{stem}.seeded.safetensors"));
    assert!(
        seeded.is_file(),
        "missing fixture: neither {} nor {}",
        plain.display(),
        seeded.display()
    );
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    let done = done.get_or_insert_with(HashMap::new);
    if let Some(p) = done.get(name) {
        return p.clone();
    }
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join(name);
    let bytes = cellmorph::io::expand_seeded(&seeded).unwrap_or_else(|e| panic!("{e}"));
    // Another test process may be writing the same file: write a file of our
    // own and rename it into place (the contents are identical).
    let tmp = out_dir.join(format!(".{name}.{}", std::process::id()));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, &out).unwrap();
    done.insert(name.to_string(), out.clone());
    out
}

/// A proptest configuration of `cases` cases (`PROPTEST_CASES=N` overrides)
/// drawn from a fixed seed, so CI runs the same inputs every time;
/// `PROPTEST_RNG_SEED=N` draws others (as tests/fuzz.rs). No failure files
/// are written: a failure prints its case.
#[allow(dead_code)] // not every suite that includes this module runs properties
pub fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    let env = |key: &str| {
        std::env::var(key).ok().map(|v| {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{key} must be an integer, got {v:?}"))
        })
    };
    proptest::test_runner::Config {
        cases: env("PROPTEST_CASES").map_or(cases, |c| c as u32),
        rng_seed: proptest::test_runner::RngSeed::Fixed(env("PROPTEST_RNG_SEED").unwrap_or(0)),
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    }
}

/// The emulated kernel device.
#[allow(dead_code)] // not every suite that includes this module runs kernels
pub fn emulated() -> cellmorph::Backend {
    cellmorph::Backend::new(cellmorph::Device::Emulated).expect("the emulated device must be built")
}

/// CUDA device 0. Tests that use it are `#[ignore]`d so that a machine
/// without a GPU reports them as ignored, never as passed; forced to run
/// there, they fail.
#[allow(dead_code)] // not every suite that includes this module runs kernels
pub fn cuda() -> cellmorph::Backend {
    assert!(
        cellmorph::backend::cuda_device_count() > 0,
        "skipped: no CUDA device (this test needs a GPU)"
    );
    cellmorph::Backend::new(cellmorph::Device::Cuda(0)).expect("opening CUDA device 0")
}

/// SplitMix64 uniform values in [0, 1), seeded with the field.
#[allow(dead_code)] // not every suite that includes this module draws f64 values
pub struct Rng(pub u64);

#[allow(dead_code)] // not every suite uses every draw
impl Rng {
    pub fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// In 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next() * n as f64) as usize).min(n - 1)
    }

    /// In [−1, 1), or one of −1, −0.5, 0, 0.5, 1 when `coarse`.
    pub fn value(&mut self, coarse: bool) -> f64 {
        if coarse {
            self.below(5) as f64 * 0.5 - 1.0
        } else {
            self.next() * 2.0 - 1.0
        }
    }
}

/// A fresh folder under the system's temporary directory, removed with
/// everything in it when dropped (also when the test fails, unless
/// `CELLMORPH_KEEP_TEST_DIRS` is set, for looking at what a failing test
/// wrote). Named `cellmorph-PREFIX-TAG-PID-N`, N counting the folders of
/// this process (tests running at once may share a tag); an old folder of
/// that name is removed first.
#[allow(dead_code)] // not every suite that includes this module writes files
pub struct TempDir(std::path::PathBuf);

#[allow(dead_code)]
impl TempDir {
    /// Creates `cellmorph-{prefix}-{tag}-{pid}-{n}` (empty).
    pub fn new(prefix: &str, tag: &str) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!(
            "cellmorph-{prefix}-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    /// The folder's path.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("CELLMORPH_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The synthetic two-class screening images of the `screen train` and
/// `screen tune` suites: 306×226 8-bit smooth fields with uniform noise of
/// ±`noise`; class 1 adds a checkerboard of 4-pixel squares whose amplitude
/// is drawn uniformly from `amplitude`.
#[allow(dead_code)] // not every suite that includes this module makes images
pub struct TextureImages {
    /// Range of the checkerboard amplitude of class-1 images.
    pub amplitude: (f64, f64),
    /// Half-width of the uniform pixel noise.
    pub noise: f64,
    /// Seed of the first image (image `i` uses `first_seed + i`).
    pub first_seed: u64,
}

#[allow(dead_code)]
impl TextureImages {
    /// One image from `seed`; `textured` adds the checkerboard.
    pub fn image(&self, seed: u64, textured: bool) -> cellmorph::imaging::GrayImage {
        use cellmorph::imaging::{BitDepth, GrayImage};
        let (w, h) = (306usize, 226usize);
        let mut rng = cellmorph::rng::SplitMix64::new(seed);
        let amplitude = if textured {
            rng.uniform(self.amplitude.0, self.amplitude.1)
        } else {
            0.0
        };
        let data: Vec<u16> = (0..w * h)
            .map(|i| {
                let (x, y) = (i % w, i / w);
                let base = 90.0 + 10.0 * (x as f64 / 40.0).sin() + 10.0 * (y as f64 / 30.0).cos();
                let sign = if (x / 4 + y / 4) % 2 == 0 { 1.0 } else { -1.0 };
                (base + sign * amplitude + rng.uniform(-self.noise, self.noise)).round() as u16
            })
            .collect();
        GrayImage::new(w, h, BitDepth::Eight, data).unwrap()
    }

    /// `n` images of each class (alternating, odd ones textured) in
    /// `dir/images`, and `dir/labels.csv` (`image,label`).
    pub fn write(
        &self,
        dir: &std::path::Path,
        n: usize,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let imgs = dir.join("images");
        std::fs::create_dir_all(&imgs).unwrap();
        let mut labels = String::from("image,label\n");
        for i in 0..2 * n {
            let positive = i % 2 == 1;
            let name = format!("img{i:02}.png");
            self.image(self.first_seed + i as u64, positive)
                .save(imgs.join(&name))
                .unwrap();
            labels.push_str(&format!("{name},{}\n", u8::from(positive)));
        }
        let labels_path = dir.join("labels.csv");
        std::fs::write(&labels_path, labels).unwrap();
        (imgs, labels_path)
    }
}

/// The two input files of `cellmorph train-step` made from a training
/// golden: `dir/w.safetensors` with the tensors named `{from}{key}` stored
/// as `{to}{key}` for each `(from, to)` in `weights`, and
/// `dir/b.safetensors` with the tensors named in `batch`; each keeps its
/// dtype (f32, or i64 for counters and labels).
#[allow(dead_code)] // not every suite that includes this module trains
pub fn train_step_inputs(
    f: &cellmorph::io::TensorFile,
    dir: &std::path::Path,
    weights: &[(&str, &str)],
    batch: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf) {
    fn copy(
        f: &cellmorph::io::TensorFile,
        from: &str,
        to: &str,
        w: &mut cellmorph::io::TensorWriter,
    ) {
        match f.f32(from) {
            Ok((s, v)) => w.add_slice(to, &s, &v).unwrap(),
            Err(_) => {
                let (s, v) = f.i64(from).unwrap();
                w.add_slice(to, &s, &v).unwrap()
            }
        }
    }
    let (wp, bp) = (dir.join("w.safetensors"), dir.join("b.safetensors"));
    let mut w = cellmorph::io::TensorWriter::new();
    for name in f.names() {
        for (from, to) in weights {
            if let Some(key) = name.strip_prefix(from) {
                copy(f, &name, &format!("{to}{key}"), &mut w);
            }
        }
    }
    w.write(&wp).unwrap();
    let mut b = cellmorph::io::TensorWriter::new();
    for name in batch {
        copy(f, name, name, &mut b);
    }
    b.write(&bp).unwrap();
    (wp, bp)
}

/// Runs `cellmorph train-step ARGS --weights W --batch B --output OUT`.
#[allow(dead_code)]
pub fn train_step_command(
    args: &[&str],
    weights: &std::path::Path,
    batch: &std::path::Path,
    out: &std::path::Path,
) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cellmorph"))
        .arg("train-step")
        .args(args)
        .arg("--weights")
        .arg(weights)
        .arg("--batch")
        .arg(batch)
        .arg("--output")
        .arg(out)
        .output()
        .unwrap()
}
