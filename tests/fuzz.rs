//! Parsers fed arbitrary and mutated bytes: the safetensors reader and the
//! model loaders behind it, CSV tables (numeric tables, expression tables,
//! CP2Image feature tables, sample lists, screening labels and
//! predictions), model JSON (SVR models, CP2Image standardization),
//! image decoding (PNG and TIFF, including headers that claim huge sizes)
//! and training checkpoints (which must also never resume wrong: a damaged
//! checkpoint is refused or loads exactly the saved state).
//!
//! Property: every input gives `Ok` or `Err`, never a panic (proptest
//! reports a panic as a failure), and no case allocates more than a fixed
//! budget beyond its input ([`ALLOC_BUDGET`], tracked per thread by the
//! counting allocator below). Mutations of valid seed files: truncation, bit
//! flips, byte overwrites, little- and big-endian length fields set huge,
//! random splices and insertions; plus plain arbitrary bytes.
//!
//! CI runs 256 cases per parser (a few seconds each). For a longer run:
//! `PROPTEST_CASES=100000 cargo test --release --test fuzz` (add `PROPTEST_RNG_SEED=N` for other inputs than the fixed seed CI draws).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;

use cellmorph::apps::cp2image::features::{FeatureColumns, FeatureTable, Standardizer};
use cellmorph::apps::expression::prepare::read_expression;
use cellmorph::apps::screening::files::{read_labels, read_predictions};
use cellmorph::csv::CsvFile;
use cellmorph::imaging::{read_gray, read_sample_list, BitDepth, GrayImage};
use cellmorph::io::TensorFile;
use cellmorph::models::cp2image::Generator;
use cellmorph::models::densenet::DenseNet;
use cellmorph::models::vqvae2::VqVae2;
use cellmorph::svr::SvrModel;
use cellmorph::table::Table;
use cellmorph::train::checkpoint;
use cellmorph::train::optim::ParamState;
use cellmorph::train::{AdamConfig, Method, Optimizer, ParamStore, SgdConfig};
use cellmorph::Backend;

/// Counts the live bytes of each thread and their peak, so a case can check
/// how much it allocated. The parsers run on the case's thread, so their
/// count is exact; work they hand to other threads (rayon inside a model
/// loader) is not counted.
struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn add(n: usize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get().saturating_add(n);
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

fn sub(n: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(n)));
}

// SAFETY: every call forwards to the system allocator unchanged; the
// counters are plain thread-local cells that never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        add(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        sub(layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        add(new_size);
        sub(layout.size());
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Most bytes one case may allocate beyond 16 × its input: the images are
/// read under a pixel limit of 2²⁰ (set below), which decodes in at most
/// 8 MiB plus the grayscale copy; everything else is proportional to the
/// input.
const ALLOC_BUDGET: usize = 64 << 20;

/// Pixel limit for the image cases (the default, 2²⁷, would allow a 1 GB
/// decode per case from a header alone; that cap is tested in tests/cli.rs).
const FUZZ_MAX_PIXELS: &str = "1048576";

/// Runs `f` and fails the case when it allocated more than the budget.
fn bounded<T>(input_len: usize, what: &str, f: impl FnOnce() -> T) -> T {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let out = f();
    let peak = PEAK.with(Cell::get) - start;
    let budget = ALLOC_BUDGET + 16 * input_len;
    assert!(
        peak <= budget,
        "{what}: a {input_len}-byte input allocated {peak} bytes at peak (budget {budget})"
    );
    out
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// The cases are drawn from a fixed seed, so CI runs the same inputs every
/// time (`PROPTEST_RNG_SEED=N` explores others).
fn config() -> ProptestConfig {
    let seed = std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(seed),
        ..ProptestConfig::default()
    }
}

fn fixture(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A scratch file per test (tests run in parallel threads, so each test
/// passes its own tag).
fn scratch(tag: &str, ext: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cellmorph-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{tag}.{ext}"))
}

/// A scratch file no other call gets.
fn unique_scratch(ext: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    scratch(
        &format!("seed-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
        ext,
    )
}

/// One change to a seed file; positions are taken modulo its length.
#[derive(Clone, Debug)]
enum Mutation {
    Truncate(usize),
    FlipBit(usize, u8),
    SetByte(usize, u8),
    /// A little-endian u64 (safetensors' header length) set huge.
    HugeU64Le(usize, u64),
    /// A big-endian u32 (PNG chunk lengths, dimensions) set huge.
    HugeU32Be(usize, u32),
    /// A little-endian u32 (TIFF offsets and counts) set huge.
    HugeU32Le(usize, u32),
    /// Bytes `from..from + len` copied over `at`.
    Splice {
        at: usize,
        from: usize,
        len: usize,
    },
    Insert(usize, Vec<u8>),
}

fn huge_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(u64::MAX),
        Just(1u64 << 40),
        Just(u32::MAX as u64),
        any::<u64>()
    ]
}

fn huge_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(u32::MAX),
        Just(1u32 << 31),
        Just(100_000),
        any::<u32>()
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::SetByte(i, v)),
        (any::<usize>(), huge_u64()).prop_map(|(i, v)| Mutation::HugeU64Le(i, v)),
        (any::<usize>(), huge_u32()).prop_map(|(i, v)| Mutation::HugeU32Be(i, v)),
        (any::<usize>(), huge_u32()).prop_map(|(i, v)| Mutation::HugeU32Le(i, v)),
        (any::<usize>(), any::<usize>(), 1usize..64).prop_map(|(at, from, len)| Mutation::Splice {
            at,
            from,
            len
        }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
    ]
}

/// Where a mutation lands: half the time in the first 256 bytes (headers),
/// else anywhere.
fn position(i: usize, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    if i.is_multiple_of(2) {
        (i / 2) % len.min(256)
    } else {
        (i / 2) % len
    }
}

fn put(bytes: &mut [u8], at: usize, v: &[u8]) {
    for (k, b) in v.iter().enumerate() {
        if let Some(slot) = bytes.get_mut(at + k) {
            *slot = *b;
        }
    }
}

fn mutate(seed: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for m in muts {
        let len = b.len();
        match m {
            Mutation::Truncate(i) => b.truncate(if len == 0 { 0 } else { i % len }),
            Mutation::FlipBit(i, bit) if len > 0 => b[position(*i, len)] ^= 1 << bit,
            Mutation::SetByte(i, v) if len > 0 => b[position(*i, len)] = *v,
            Mutation::HugeU64Le(i, v) => put(&mut b, position(*i, len), &v.to_le_bytes()),
            Mutation::HugeU32Be(i, v) => put(&mut b, position(*i, len), &v.to_be_bytes()),
            Mutation::HugeU32Le(i, v) => put(&mut b, position(*i, len), &v.to_le_bytes()),
            Mutation::Splice { at, from, len: n } if len > 0 => {
                let from = position(*from, len);
                let piece: Vec<u8> = b[from..(from + n).min(len)].to_vec();
                put(&mut b, position(*at, len), &piece);
            }
            Mutation::Insert(i, v) => {
                let at = position(*i, len + 1).min(len);
                b.splice(at..at, v.iter().copied());
            }
            _ => {}
        }
    }
    b
}

/// A mutated copy of one of `seeds` (1 to 4 mutations), or arbitrary bytes.
fn input(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    prop_oneof![
        4 => (0..n, prop::collection::vec(mutation(), 1..5))
            .prop_map(move |(s, m)| mutate(&seeds[s], &m)),
        1 => prop::collection::vec(any::<u8>(), 0..512),
    ]
}

/// Text seeds as bytes.
fn texts(seeds: &[&str]) -> Vec<Vec<u8>> {
    seeds.iter().map(|s| s.as_bytes().to_vec()).collect()
}

/// Every tensor of a file that parsed, read as f32 and i64, then each model
/// built from it (all three may fail; none may panic).
fn exercise_tensors(bytes: Vec<u8>) {
    let len = bytes.len();
    bounded(len, "safetensors", || {
        let Ok(file) = TensorFile::from_bytes("fuzz.safetensors", bytes) else {
            return;
        };
        for name in file.names() {
            let _ = file.f32(&name);
            let _ = file.i64(&name);
        }
        let be = Backend::cpu();
        let _ = VqVae2::from_file(&be, &file);
        let _ = DenseNet::from_file(&be, &file);
        let _ = Generator::from_file(&be, &file);
    });
}

const TABLE: &str = "sample,f1,f2,f3\ns01,1,2.5,-3e2\ns02,0.1,\"4\",5\n# comment\ns03,7,8,9\n";
const COUNTS: &str = "sample,g1,g2\ns01,10,0\ns02,3,7\ns03,0,12\n";
const FEATURES: &str = "cell_id,ImageNumber,Metadata_Well,AreaShape_Area,Intensity_Mean\n0,1,A01,120.5,0.3\n1,1,A02,98,0.25\n2,2,A01,130,0.4\n";
const SAMPLES: &str = "\u{feff}sample,image\ns01,a.png\ns02,sub/b,with comma.tif\n";
const LABELS: &str = "image,label\na.png,1\nb.png,low\nc.png,true\n";
const PREDICTIONS: &str = "# cellmorph screen predict\n# images: 2\nimage,status,prob_positive,prediction,mean_v,reason\na.png,ok,0.75,1,0.5,\nb.png,skipped,,,,unreadable\n";
const SVR_MODEL: &str = r#"{"features":["f1","f2"],"genes":{"g1":{"C":1.0,"epsilon":0.1,"cv_score":0.5,"w":[0.95,-0.03],"b":0.2}},"training":{"samples":{"s01":"302cc99babacbed6"},"warnings":[]}}"#;
const STANDARDIZER: &str =
    r#"{"features":["a","b"],"mean":[2.0,2.6666666666666665],"std":[0.8164965809,0.9428090415]}"#;

/// Writes `bytes` to the test's scratch file and returns its path.
fn as_file(tag: &str, ext: &str, bytes: &[u8]) -> PathBuf {
    let p = scratch(tag, ext);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A small image saved by the library, as PNG or TIFF bytes.
fn image_seed(ext: &str, depth: BitDepth, w: usize, h: usize) -> Vec<u8> {
    let max = depth.max_value() as usize;
    let data = (0..w * h).map(|i| ((i * 37) % (max + 1)) as u16).collect();
    let img = GrayImage::new(w, h, depth, data).unwrap();
    let p = unique_scratch(ext);
    img.save(&p).unwrap();
    std::fs::read(&p).unwrap()
}

/// CRC-32 (IEEE) as PNG chunks use it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// `png` with its IHDR width and height replaced and the chunk's CRC
/// fixed, so the decoder trusts the claimed size.
fn png_with_size(png: &[u8], w: u32, h: u32) -> Vec<u8> {
    let mut b = png.to_vec();
    // Signature (8), IHDR length (4) and type (4), then width and height.
    b[16..20].copy_from_slice(&w.to_be_bytes());
    b[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&b[12..29]);
    b[29..33].copy_from_slice(&crc.to_be_bytes());
    b
}

fn limit_pixels() {
    std::env::set_var("CELLMORPH_MAX_PIXELS", FUZZ_MAX_PIXELS);
}

// ---- Training checkpoints.

/// A small generator-and-discriminator pair as `cp2image train` checkpoints
/// it (`G.` and `D.`): G trained by Adam (with a buffer), D by SGD with
/// momentum, so both kinds of optimizer state are present. `scale` sets
/// the starting values (0 for a model to load into).
fn ck_model(scale: f32) -> [(ParamStore, Optimizer); 2] {
    let mut g = ParamStore::new();
    let v = |n: usize, k: f32| {
        (0..n)
            .map(|i| scale * (i as f32 * 0.37 + k).sin())
            .collect()
    };
    g.insert("w", &[3, 4], v(12, 0.1), true).unwrap();
    g.insert("b", &[3], v(3, 0.2), true).unwrap();
    g.insert("bn.running_mean", &[3], v(3, 0.3), false).unwrap();
    let mut og = Optimizer::new(Method::Adam(AdamConfig::default())).unwrap();
    g.register(&mut og).unwrap();
    let mut d = ParamStore::new();
    d.insert("w", &[2, 3], v(6, 0.4), true).unwrap();
    d.insert("b", &[2], v(2, 0.5), true).unwrap();
    let mut od = Optimizer::new(Method::Sgd(SgdConfig {
        momentum: 0.9,
        dampening: 0.0,
        nesterov: false,
        weight_decay: 0.0,
    }))
    .unwrap();
    d.register(&mut od).unwrap();
    [(g, og), (d, od)]
}

const CK_PROGRESS: &str = r#"{"epoch":3,"options":{"lr":0.0002,"batch":8}}"#;

/// The bytes of a checkpoint of [`ck_model`] after three steps (made once).
fn checkpoint_seed() -> Vec<u8> {
    static SEED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    SEED.get_or_init(make_checkpoint_seed).clone()
}

fn make_checkpoint_seed() -> Vec<u8> {
    let [(mut g, mut og), (mut d, mut od)] = ck_model(1.0);
    for t in 0..3 {
        for (s, o) in [(&mut g, &mut og), (&mut d, &mut od)] {
            s.zero_grads();
            for id in 0..s.params().len() {
                if s.get(id).trainable {
                    let n = s.get(id).value.len();
                    let grad: Vec<f32> = (0..n).map(|i| ((i + t) as f32 * 0.71).cos()).collect();
                    s.accumulate(id, &grad).unwrap();
                }
            }
            s.step(o, 1e-2).unwrap();
        }
    }
    let p = unique_scratch("safetensors");
    let progress: serde_json::Value = serde_json::from_str(CK_PROGRESS).unwrap();
    checkpoint::save_parts(&p, &[("G.", &g, &og), ("D.", &d, &od)], &progress).unwrap();
    std::fs::read(&p).unwrap()
}

/// What a checkpoint restores: values, optimizer states, progress.
type Restored = (Vec<Vec<f32>>, Vec<ParamState>, serde_json::Value);

/// Loads the checkpoint at `path` into a fresh [`ck_model`]; on an error
/// also checks that the model was left untouched.
fn load_ck(path: &Path) -> cellmorph::Result<Restored> {
    let [(mut g, mut og), (mut d, mut od)] = ck_model(0.0);
    let before = (g.clone(), d.clone());
    let r = checkpoint::load_parts(
        path,
        &mut [("G.", &mut g, &mut og), ("D.", &mut d, &mut od)],
    );
    match r {
        Ok(progress) => {
            let values = [&g, &d]
                .iter()
                .flat_map(|s| s.params().iter().map(|p| p.value.clone()))
                .collect();
            let states = [&og, &od]
                .iter()
                .flat_map(|o| (0..o.params().len()).map(|i| o.state(i).unwrap().clone()))
                .collect();
            Ok((values, states, progress))
        }
        Err(e) => {
            assert_eq!(
                (g, d),
                before,
                "a refused checkpoint changed the model: {e}"
            );
            Err(e)
        }
    }
}

/// A damaged checkpoint is refused with an error naming it, or (a change
/// that leaves the contents as they were) loads exactly what was saved.
fn check_damaged(bytes: &[u8], tag: &str, original: &Restored) {
    let p = as_file(tag, "safetensors", bytes);
    match bounded(bytes.len(), "checkpoint", || load_ck(&p)) {
        Ok(r) => assert!(&r == original, "a damaged checkpoint loaded other values"),
        Err(e) => assert!(
            e.to_string().contains(tag),
            "the error does not name the file: {e}"
        ),
    }
}

/// The tensors and metadata of a checkpoint, to rewrite it with a change.
struct CkParts {
    tensors: std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    meta: std::collections::HashMap<String, String>,
}

fn ck_parts(bytes: &[u8]) -> CkParts {
    let f = TensorFile::from_bytes("seed", bytes.to_vec()).unwrap();
    CkParts {
        tensors: f
            .names()
            .into_iter()
            .map(|n| {
                let t = f.f32(&n).unwrap();
                (n, t)
            })
            .collect(),
        meta: f.metadata().unwrap().clone(),
    }
}

/// Writes `parts` to the scratch file `tag`, with tensor `f16` (if any) in
/// F16, and returns its path.
fn write_ck(tag: &str, parts: &CkParts, f16: Option<&str>) -> PathBuf {
    let mut w = cellmorph::io::TensorWriter::new();
    for (name, (shape, v)) in &parts.tensors {
        if Some(name.as_str()) == f16 {
            let h: Vec<half::f16> = v.iter().map(|x| half::f16::from_f32(*x)).collect();
            w.add_slice(name, shape, &h).unwrap();
        } else {
            w.add_slice(name, shape, v).unwrap();
        }
    }
    for (k, v) in &parts.meta {
        w.set_metadata(k, v);
    }
    let p = scratch(tag, "safetensors");
    w.write(&p).unwrap();
    p
}

/// Every byte of a checkpoint flipped (one bit each) and every truncation:
/// refused, naming the file, or loaded unchanged; the header length set
/// huge: refused.
#[test]
fn checkpoints_flipped_anywhere_or_truncated_never_resume_wrong() {
    let seed = checkpoint_seed();
    let original = load_ck(&as_file("ck-original", "safetensors", &seed)).unwrap();
    let mut refused = 0;
    for i in 0..seed.len() {
        let mut b = seed.clone();
        b[i] ^= 1 << (i % 8);
        let p = as_file("ck-flip", "safetensors", &b);
        match load_ck(&p) {
            Ok(r) => assert!(r == original, "byte {i} flipped: other values loaded"),
            Err(e) => {
                assert!(e.to_string().contains("ck-flip"), "byte {i}: {e}");
                refused += 1;
            }
        }
    }
    // Flips in the header's padding spaces may leave valid JSON; every
    // flip of a tensor's bytes is caught by the checksum.
    assert!(
        refused * 10 >= seed.len() * 9,
        "{refused} of {} flips refused",
        seed.len()
    );
    for len in 0..seed.len() {
        let p = as_file("ck-short", "safetensors", &seed[..len]);
        let e = load_ck(&p).unwrap_err().to_string();
        assert!(e.contains("ck-short"), "{len} bytes: {e}");
    }
    for huge in [u64::MAX, 1 << 40, seed.len() as u64] {
        let mut b = seed.clone();
        b[..8].copy_from_slice(&huge.to_le_bytes());
        let p = as_file("ck-huge", "safetensors", &b);
        let e = bounded(b.len(), "huge header", || load_ck(&p)).unwrap_err();
        assert!(e.to_string().contains("ck-huge"), "{e}");
    }
}

/// A checkpoint rewritten with one change (a valid safetensors file): with
/// its checksum kept, every change of contents is refused as damage; with
/// the checksum removed (as checkpoints written before it), each change is
/// refused for what it is, naming the file and the tensor or key.
#[test]
fn checkpoints_that_do_not_fit_the_model_are_refused_by_name() {
    let seed = checkpoint_seed();
    let original = load_ck(&as_file("ck-seed", "safetensors", &seed)).unwrap();
    let base = ck_parts(&seed);
    assert!(base.meta.contains_key("cellmorph.checksum"));

    // Without the checksum, an unchanged checkpoint still loads, exactly.
    let mut legacy = ck_parts(&seed);
    legacy.meta.remove("cellmorph.checksum");
    assert!(load_ck(&write_ck("ck-legacy", &legacy, None)).unwrap() == original);

    type Change = Box<dyn Fn(&mut CkParts)>;
    let set = |name: &'static str, i: usize, v: f32| -> Change {
        Box::new(move |p: &mut CkParts| p.tensors.get_mut(name).unwrap().1[i] = v)
    };
    let meta = |key: &'static str, v: &'static str| -> Change {
        Box::new(move |p: &mut CkParts| {
            p.meta.insert(key.to_string(), v.to_string());
        })
    };
    const STEPS_G: &str = "cellmorph.optimizer_steps.G.";
    let cases: Vec<(&str, Change, &[&str])> = vec![
        (
            "nan-weight",
            set("G.w", 5, f32::NAN),
            &["\"G.w\"", "non-finite", "index 5"],
        ),
        (
            "inf-buffer",
            set("G.bn.running_mean", 1, f32::INFINITY),
            &["G.bn.running_mean", "non-finite"],
        ),
        (
            "nan-exp-avg",
            set("optimizer.G.w.exp_avg", 0, f32::NAN),
            &["G.w", "exp_avg", "non-finite"],
        ),
        (
            "inf-momentum",
            set("optimizer.D.b.momentum_buffer", 1, f32::NEG_INFINITY),
            &["D.b", "momentum_buffer", "non-finite"],
        ),
        (
            "negative-v",
            set("optimizer.G.b.exp_avg_sq", 2, -1.0),
            &["G.b", "exp_avg_sq", "negative"],
        ),
        (
            "shape",
            Box::new(|p: &mut CkParts| p.tensors.get_mut("G.w").unwrap().0 = vec![4, 3]),
            &["\"G.w\"", "shape [4, 3]"],
        ),
        (
            "state-shape",
            Box::new(|p: &mut CkParts| {
                p.tensors.get_mut("optimizer.G.w.exp_avg").unwrap().0 = vec![3, 4]
            }),
            &["optimizer.G.w.exp_avg", "shape"],
        ),
        (
            "missing",
            Box::new(|p: &mut CkParts| {
                p.tensors.remove("D.b");
            }),
            &["missing tensor \"D.b\""],
        ),
        (
            "missing-state",
            Box::new(|p: &mut CkParts| {
                p.tensors.remove("optimizer.D.w.momentum_buffer");
            }),
            &["D.w", "no optimizer state"],
        ),
        (
            "extra",
            Box::new(|p: &mut CkParts| {
                p.tensors
                    .insert("G.head.weight".into(), (vec![2], vec![0.0, 1.0]));
            }),
            &["unexpected tensor \"G.head.weight\""],
        ),
        (
            "foreign-state",
            Box::new(|p: &mut CkParts| {
                p.tensors
                    .insert("optimizer.D.w.exp_avg".into(), (vec![6], vec![0.0; 6]));
            }),
            &["D.w", "exp_avg", "does not belong"],
        ),
        (
            "another-model",
            Box::new(|p: &mut CkParts| {
                let t = std::mem::take(&mut p.tensors);
                p.tensors = t
                    .into_iter()
                    .map(|(k, v)| (k.replace("G.", "E."), v))
                    .collect();
            }),
            &["missing tensor \"G.w\""],
        ),
        ("step-negative", meta(STEPS_G, "[-1,3]"), &[STEPS_G, "-1"]),
        ("step-fraction", meta(STEPS_G, "[2.5,3]"), &[STEPS_G]),
        (
            "step-absurd",
            meta(STEPS_G, "[18446744073709551615,3]"),
            &["G.w", "step count", "beyond"],
        ),
        ("step-zero", meta(STEPS_G, "[0,3]"), &["G.w", "step 0"]),
        (
            "step-count",
            meta(STEPS_G, "[3,3,3]"),
            &["optimizer state for 3 parameters, the model has 2"],
        ),
        ("steps-not-json", meta(STEPS_G, "three"), &[STEPS_G]),
        (
            "progress",
            meta("cellmorph.progress", "{\"epoch\":"),
            &["cellmorph.progress"],
        ),
        (
            "kind",
            Box::new(|p: &mut CkParts| {
                p.meta.remove("cellmorph.checkpoint");
            }),
            &["not a cellmorph training checkpoint"],
        ),
    ];
    for (tag, change, needles) in &cases {
        // Checksum kept: refused as damage (or, for a checksum-free
        // reason, as above) — never loaded.
        let mut parts = ck_parts(&seed);
        change(&mut parts);
        let e = load_ck(&write_ck(&format!("ck-{tag}-sum"), &parts, None))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("ck-{tag}-sum")), "{tag}: {e}");
        // Checksum removed: refused for the reason itself.
        parts.meta.remove("cellmorph.checksum");
        let e = load_ck(&write_ck(&format!("ck-{tag}"), &parts, None))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("ck-{tag}.safetensors")), "{tag}: {e}");
        for n in *needles {
            assert!(e.contains(n), "{tag}: {e:?} lacks {n:?}");
        }
    }
    // A tensor in F16 (a converted checkpoint would not resume the saved bits).
    let e = load_ck(&write_ck("ck-f16", &legacy, Some("D.w")))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ck-f16") && e.contains("\"D.w\"") && e.contains("F16"),
        "{e}"
    );
    // The checksum itself damaged, or not one.
    for (tag, v) in [
        ("ck-sum-bad", "fnv1a64:0000000000000000"),
        ("ck-sum-junk", "x"),
    ] {
        let mut parts = ck_parts(&seed);
        parts.meta.insert("cellmorph.checksum".into(), v.into());
        let e = load_ck(&write_ck(tag, &parts, None))
            .unwrap_err()
            .to_string();
        assert!(e.contains(tag) && e.contains("changed or damaged"), "{e}");
    }
}

/// A trainer's progress bounds the optimizer's step counts and the batch
/// counters it restores.
#[test]
fn checkpoint_step_counts_and_counters_are_checked_against_the_run() {
    let p = as_file("ck-steps", "safetensors", &checkpoint_seed());
    let [(mut g, mut og), (mut d, mut od)] = ck_model(0.0);
    checkpoint::load_parts(&p, &mut [("G.", &mut g, &mut og), ("D.", &mut d, &mut od)]).unwrap();
    checkpoint::check_steps(&p, &og, 3).unwrap();
    checkpoint::check_steps(&p, &og, 1000).unwrap();
    let e = checkpoint::check_steps(&p, &og, 2).unwrap_err().to_string();
    assert!(
        e.contains("ck-steps") && e.contains("w: the optimizer took 3 steps"),
        "{e}"
    );
    let m = |kv: &[(&str, i64)]| -> std::collections::BTreeMap<String, i64> {
        kv.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    };
    let model = m(&[("bn.num_batches_tracked", 0)]);
    checkpoint::check_counters(&p, &m(&[("bn.num_batches_tracked", 9)]), &model).unwrap();
    for (saved, needle) in [
        (m(&[("bn.num_batches_tracked", -1)]), "is -1"),
        (m(&[("bn.num_batches_tracked", i64::MAX)]), "outside"),
        (m(&[]), "is missing"),
        (
            m(&[("bn.num_batches_tracked", 1), ("x.num_batches_tracked", 1)]),
            "not a layer",
        ),
    ] {
        let e = checkpoint::check_counters(&p, &saved, &model)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ck-steps") && e.contains(needle), "{e}");
    }
}

proptest! {
    #![proptest_config(config())]

    /// Mutated checkpoints (truncation, bit flips, overwrites, huge length
    /// fields, splices, insertions, arbitrary bytes): refused naming the
    /// file, or loaded exactly as saved; bounded memory either way.
    #[test]
    fn mutated_checkpoints(bytes in input(vec![checkpoint_seed()])) {
        let original = load_ck(&as_file("ck-prop-original", "safetensors", &checkpoint_seed())).unwrap();
        check_damaged(&bytes, "ck-prop", &original);
    }

    #[test]
    fn safetensors_and_model_loaders(bytes in input(vec![
        fixture("vqvae2_small.weights.safetensors"),
        fixture("densenet_small.weights.safetensors"),
        fixture("cp2image_small.generator.weights.safetensors"),
        fixture("vqvae2_small.cases.safetensors"),
    ])) {
        exercise_tensors(bytes);
    }

    #[test]
    fn csv_tables(bytes in input(texts(&[TABLE, COUNTS, FEATURES, SAMPLES]))) {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        bounded(bytes.len(), "csv text", || {
            let _ = CsvFile::parse(&text, "fuzz.csv");
            let _ = Table::parse_csv(&text, "fuzz.csv");
            let _ = FeatureTable::parse_csv(&text, "fuzz.csv", FeatureColumns::AllButMetadata);
            let names = ["AreaShape_Area".to_string(), "f1".to_string()];
            let _ = FeatureTable::parse_csv(&text, "fuzz.csv", FeatureColumns::Named(&names));
        });
        // The file readers also see the raw bytes (invalid UTF-8, BOMs).
        let p = as_file("table", "csv", &bytes);
        bounded(bytes.len(), "csv files", || {
            let _ = CsvFile::read(&p);
            let _ = read_expression(&p, true);
            let _ = read_expression(&p, false);
        });
    }

    #[test]
    fn sample_lists_labels_predictions(bytes in input(texts(&[SAMPLES, LABELS, PREDICTIONS]))) {
        let p = as_file("lists", "csv", &bytes);
        bounded(bytes.len(), "lists", || {
            let _ = read_sample_list(&p);
            let _ = read_labels(&p);
            let _ = read_predictions(&p);
        });
    }

    #[test]
    fn model_json(bytes in input(texts(&[SVR_MODEL, STANDARDIZER]))) {
        let p = as_file("model", "json", &bytes);
        bounded(bytes.len(), "model json", || {
            if let Ok(m) = SvrModel::load(&p) {
                let t = Table::parse_csv("sample,f1,f2\ns01,1,2\ns02,3,4\n", "x.csv");
                if let Ok(t) = t {
                    let _ = m.predict(&t);
                }
            }
            if let Ok(s) = Standardizer::read(&p) {
                let _ = s.apply(&[1.0, 2.0]);
            }
        });
    }

    #[test]
    fn png_and_tiff(bytes in input(vec![
        image_seed("png", BitDepth::Eight, 13, 7),
        image_seed("png", BitDepth::Sixteen, 5, 9),
        image_seed("tif", BitDepth::Eight, 6, 4),
        image_seed("tif", BitDepth::Sixteen, 3, 11),
    ])) {
        limit_pixels();
        for ext in ["png", "tif"] {
            let p = as_file("image", ext, &bytes);
            bounded(bytes.len(), "image", || {
                let _ = read_gray(&p);
            });
        }
    }

    #[test]
    fn png_claiming_huge_sizes(
        w in prop_oneof![Just(0u32), 1u32..64, Just(1 << 16), Just(u32::MAX >> 1), any::<u32>()],
        h in prop_oneof![Just(0u32), 1u32..64, Just(1 << 16), Just(u32::MAX >> 1), any::<u32>()],
        sixteen in any::<bool>(),
    ) {
        limit_pixels();
        let depth = if sixteen { BitDepth::Sixteen } else { BitDepth::Eight };
        let bytes = png_with_size(&image_seed("png", depth, 8, 8), w, h);
        let p = as_file("huge", "png", &bytes);
        let r = bounded(bytes.len(), "png header", || read_gray(&p));
        if let Err(e) = r {
            prop_assert!(e.to_string().contains("huge.png"), "{e}");
        }
    }
}

/// Every pair of the extreme sizes the property above draws from (it once
/// met 2³¹−1 × 2³¹−1, whose size in bytes overflowed a u64 in the error
/// message).
#[test]
fn png_headers_with_every_pair_of_extreme_sizes() {
    limit_pixels();
    let seed = image_seed("png", BitDepth::Eight, 8, 8);
    let sizes = [0u32, 1, 1 << 16, u32::MAX >> 1, u32::MAX];
    for w in sizes {
        for h in sizes {
            let bytes = png_with_size(&seed, w, h);
            let p = as_file("extreme", "png", &bytes);
            if let Err(e) = bounded(bytes.len(), "png header", || read_gray(&p)) {
                assert!(e.to_string().contains("extreme.png"), "{w}×{h}: {e}");
            }
        }
    }
}

#[test]
fn seeds_are_valid() {
    // The mutations start from files the parsers accept.
    exercise_tensors(fixture("vqvae2_small.weights.safetensors"));
    let be = Backend::cpu();
    let f = TensorFile::from_bytes("v", fixture("vqvae2_small.weights.safetensors")).unwrap();
    VqVae2::from_file(&be, &f).unwrap();
    Table::parse_csv(TABLE, "t.csv").unwrap();
    FeatureTable::parse_csv(FEATURES, "f.csv", FeatureColumns::AllButMetadata).unwrap();
    let p = as_file("seed-samples", "csv", SAMPLES.as_bytes());
    assert_eq!(read_sample_list(&p).unwrap().len(), 2);
    let p = as_file("seed-labels", "csv", LABELS.as_bytes());
    assert_eq!(read_labels(&p).unwrap().len(), 3);
    let p = as_file("seed-predictions", "csv", PREDICTIONS.as_bytes());
    read_predictions(&p).unwrap();
    let p = as_file("seed-model", "json", SVR_MODEL.as_bytes());
    SvrModel::load(&p).unwrap();
    let p = as_file("seed-standardizer", "json", STANDARDIZER.as_bytes());
    Standardizer::read(&p).unwrap();
    for (ext, depth) in [("png", BitDepth::Eight), ("tif", BitDepth::Sixteen)] {
        let p = as_file(
            &format!("seed-image-{ext}"),
            ext,
            &image_seed(ext, depth, 13, 7),
        );
        let img = read_gray(&p).unwrap();
        assert_eq!((img.width(), img.height()), (13, 7));
    }
    let p = as_file(
        "seed-resized",
        "png",
        &png_with_size(&image_seed("png", BitDepth::Eight, 8, 8), 8, 8),
    );
    assert_eq!(read_gray(&p).unwrap().width(), 8);
}

#[test]
fn a_png_header_over_the_pixel_limit_is_refused_before_decoding() {
    limit_pixels();
    let bytes = png_with_size(&image_seed("png", BitDepth::Sixteen, 8, 8), 40_000, 40_000);
    let p = as_file("over-limit", "png", &bytes);
    let e = bounded(bytes.len(), "over limit", || read_gray(&p)).unwrap_err();
    assert!(e.to_string().contains("over the limit"), "{e}");
}

#[test]
#[should_panic(expected = "allocated")]
fn the_allocation_bound_catches_an_allocation_over_budget() {
    bounded(0, "over budget", || vec![1u8; ALLOC_BUDGET + 1].len());
}

/// Found by this fuzzer: a 222-byte TIFF whose ImageLength tag claims
/// 2,097,153 values, which the decoder read into memory (64 MiB) before
/// finding the file too short.
const TIFF_HUGE_TAG_COUNT: &str = "49492a00300000000100000001000000010000000100000000254a6f94b9de03284d7297bce1062b50759abfe4092e530e0000010400010000000600000001010400010020000400000002010300010000000800000003010300010000000100000006010300010000000100000011010400010000001800000015010300010000000100000016010400010000000b8b02001701040001000000180000001a01050001000000080000001b01050001000000100000002801030001000000010000003d010300010000000100000053010300010000000100000000000000";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

#[test]
fn a_tiff_tag_claiming_millions_of_values_is_refused_without_allocating_them() {
    limit_pixels();
    let bytes = unhex(TIFF_HUGE_TAG_COUNT);
    let p = as_file("huge-count", "tif", &bytes);
    let d = bounded(bytes.len(), "tiff dimensions", || {
        cellmorph::imaging::read_dimensions(&p)
    });
    let e = d.unwrap_err().to_string();
    assert!(
        e.contains("huge-count.tif") && e.contains("tag 257 claims 2097153 values"),
        "{e}"
    );
    let r = bounded(bytes.len(), "tiff decode", || read_gray(&p));
    assert!(r.is_err());
}
