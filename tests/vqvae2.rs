//! Whole-model tests of the VQ-VAE-2 against PyTorch (vq-vae-2-pytorch)
//! outputs: `tests/fixtures/vqvae2_small.*` (copied from shared/fixtures) and
//! the paper-size `vqvae2_paper.*` (seeded weights and input, see
//! `tests/common`).
//!
//! Tolerances (fixtures/README.md): float tensors within max|Δ| / max|ref| ≤
//! 1e-3 (a whole network in f32 with another summation order than
//! PyTorch's); codes identical wherever PyTorch's gap between the nearest and
//! the second-nearest code (`gap_t`, `gap_b`) is at least 1e-4 — below that,
//! rounding may legitimately pick the other code. A code that flips at a near
//! tie changes everything downstream of it, so each stage is also checked
//! from PyTorch's own inputs: the bottom path from the reference `quant_t`
//! (`VqVae2::encode_bottom`) and the decoder from the reference `quant_t`,
//! `quant_b`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use cellmorph::backend::cuda_device_count;
use cellmorph::io::{TensorFile, TensorWriter};
use cellmorph::models::vqvae2::{mse_8bit, profile, sum_histograms, VqVae2, VqVae2Config};
use cellmorph::{Backend, Device, Tensor};

/// max|Δ| / max|ref| for float tensors of a whole network (see above).
const TOL: f32 = 1e-3;
/// Below this gap (PyTorch's distance to the second-nearest code minus the
/// distance to the nearest) a code may differ.
const NEAR_TIE: f32 = 1e-4;

fn small_fixture() -> (PathBuf, PathBuf) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    (
        dir.join("vqvae2_small.weights.safetensors"),
        dir.join("vqvae2_small.cases.safetensors"),
    )
}

/// The paper-size fixture: seeded weights and input, PyTorch's outputs
/// (`scripts/fixtures/paper.py`).
fn paper_fixture() -> (PathBuf, PathBuf) {
    (
        common::fixture_path("vqvae2_paper.weights.safetensors"),
        common::fixture_path("vqvae2_paper.cases.safetensors"),
    )
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

fn assert_close(what: &str, out: &[f32], reference: &[f32]) {
    let rel = max_rel(what, out, reference);
    println!("  {what}: max|Δ|/max|ref| = {rel:.2e}");
    assert!(rel <= TOL, "{what}: max|Δ|/max|ref| = {rel:.3e} > {TOL:e}");
}

/// The reference tensors of one fixture.
struct Reference {
    cases: TensorFile,
}

impl Reference {
    fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        self.cases.f32(name).unwrap()
    }
    fn i64(&self, name: &str) -> Vec<i64> {
        self.cases.i64(name).unwrap().1
    }
    fn tensor(&self, be: &Backend, name: &str) -> Tensor {
        let (shape, data) = self.f32(name);
        Tensor::from_vec(be, &shape, data).unwrap()
    }
    fn scalar(&self, name: &str) -> f32 {
        self.cases.f32(name).unwrap().1[0]
    }
}

/// Checks codes against PyTorch's: equal wherever the gap is ≥ NEAR_TIE.
/// Returns the positions that differ (all at near ties).
fn check_codes(what: &str, ours: &[i32], reference: &[i64], gap: &[f32]) -> Vec<usize> {
    assert_eq!(ours.len(), reference.len(), "{what}: length");
    let differ: Vec<usize> = (0..ours.len())
        .filter(|&i| i64::from(ours[i]) != reference[i])
        .collect();
    for &i in &differ {
        assert!(
            gap[i] < NEAR_TIE,
            "{what}[{i}]: code {} but PyTorch chose {} with a gap of {:e} (≥ {NEAR_TIE:e})",
            ours[i],
            reference[i],
            gap[i]
        );
    }
    let near = gap.iter().filter(|&&g| g < NEAR_TIE).count();
    println!(
        "  {what}: {} of {} codes differ, all at near ties ({near} near ties)",
        differ.len(),
        ours.len()
    );
    differ
}

/// `quant` `[n, d, hw]` compared only at positions whose codes agree.
fn check_quant(what: &str, ours: &[f32], reference: &[f32], d: usize, hw: usize, differ: &[usize]) {
    let keep = |i: &usize| {
        let p = (i / (d * hw)) * hw + i % hw;
        !differ.contains(&p)
    };
    let (o, r): (Vec<f32>, Vec<f32>) = (0..ours.len())
        .filter(keep)
        .map(|i| (ours[i], reference[i]))
        .unzip();
    assert_close(what, &o, &r);
}

/// Histograms: exact where no code differs; each differing code moves one
/// count from one bin to another.
fn check_hist(what: &str, ours: &[i32], reference: &[i64], flips: usize) {
    assert_eq!(ours.len(), reference.len(), "{what}: length");
    let moved: i64 = ours
        .iter()
        .zip(reference)
        .map(|(&a, &b)| (i64::from(a) - b).abs())
        .sum();
    assert!(
        moved <= 2 * flips as i64,
        "{what}: histograms differ by {moved} counts with only {flips} differing codes"
    );
    let (sum_o, sum_r) = (
        ours.iter().map(|&v| i64::from(v)).sum::<i64>(),
        reference.iter().sum::<i64>(),
    );
    assert_eq!(sum_o, sum_r, "{what}: total count");
}

/// Runs the whole model on `be` against a fixture.
fn check_model(be: &Backend, (weights, cases): (PathBuf, PathBuf)) {
    let t0 = Instant::now();
    let model = VqVae2::load(be, &weights).unwrap();
    let cfg = *model.config();
    let r = Reference {
        cases: TensorFile::open(&cases).unwrap(),
    };
    println!("{} on {}: {cfg}", weights.display(), be.describe());
    let x = r.tensor(be, "input");
    let n = x.shape()[0];

    let enc = model.encode(be, &x).unwrap();
    assert_close("enc_b", &enc.enc_b.to_vec().unwrap(), &r.f32("enc_b").1);
    assert_close("enc_t", &enc.enc_t.to_vec().unwrap(), &r.f32("enc_t").1);
    let (d, hw_t, hw_b) = (cfg.embed_dim, enc.id_t.numel() / n, enc.id_b.numel() / n);
    let id_t = enc.id_t.to_vec().unwrap();
    let flips_t = check_codes("id_t", &id_t, &r.i64("id_t"), &r.f32("gap_t").1);
    check_quant(
        "quant_t",
        &enc.quant_t.to_vec().unwrap(),
        &r.f32("quant_t").1,
        d,
        hw_t,
        &flips_t,
    );
    let hist_t = model.histogram(be, &enc.id_t).unwrap();
    check_hist(
        "hist_t",
        &hist_t.to_vec().unwrap(),
        &r.i64("hist_t"),
        flips_t.len(),
    );

    // The bottom path from PyTorch's quant_t, so that a top code flipped at a
    // near tie does not make the bottom incomparable.
    let (id_b, quant_b) = model
        .encode_bottom(be, &r.tensor(be, "quant_t"), &enc.enc_b)
        .unwrap();
    let id_b = id_b.to_vec().unwrap();
    let flips_b = check_codes(
        "id_b (from PyTorch's quant_t)",
        &id_b,
        &r.i64("id_b"),
        &r.f32("gap_b").1,
    );
    check_quant(
        "quant_b (from PyTorch's quant_t)",
        &quant_b.to_vec().unwrap(),
        &r.f32("quant_b").1,
        d,
        hw_b,
        &flips_b,
    );
    let dec_ref_inputs = model
        .decode(be, &r.tensor(be, "quant_t"), &r.tensor(be, "quant_b"))
        .unwrap();
    assert_close(
        "dec (from PyTorch's quant_t, quant_b)",
        &dec_ref_inputs.to_vec().unwrap(),
        &r.f32("dec").1,
    );

    // The model's own chain, compared where it is comparable.
    if flips_t.is_empty() {
        assert_eq!(
            enc.id_b.to_vec().unwrap(),
            id_b,
            "encode's id_b vs the bottom path alone"
        );
    }
    let id_b_own = enc.id_b.to_vec().unwrap();
    let flips_b_own: Vec<usize> = (0..id_b_own.len())
        .filter(|&i| i64::from(id_b_own[i]) != r.i64("id_b")[i])
        .collect();
    let hist_b = model.histogram(be, &enc.id_b).unwrap();
    if flips_t.is_empty() {
        check_hist(
            "hist_b",
            &hist_b.to_vec().unwrap(),
            &r.i64("hist_b"),
            flips_b_own.len(),
        );
    }
    let dec = model.decode(be, &enc.quant_t, &enc.quant_b).unwrap();
    if flips_t.is_empty() && flips_b_own.is_empty() {
        assert_close("dec", &dec.to_vec().unwrap(), &r.f32("dec").1);
    } else {
        println!(
            "  dec: not compared end to end ({} top, {} bottom codes flipped at near ties)",
            flips_t.len(),
            flips_b_own.len()
        );
    }

    let diff_ref = r.scalar("diff");
    let rel = (enc.diff - diff_ref).abs() / diff_ref.abs();
    println!("  diff: {} vs {diff_ref} ({rel:.2e})", enc.diff);
    // A code flipped at a near tie changes its squared error by at most the
    // gap (< 1e-4), divided by the mean's positions·dim.
    let slack = NEAR_TIE
        * (flips_t.len() as f32 / (n * hw_t * d) as f32
            + flips_b_own.len() as f32 / (n * hw_b * d) as f32);
    assert!(
        (enc.diff - diff_ref).abs() <= TOL * diff_ref.abs() + slack,
        "diff {} vs {diff_ref}",
        enc.diff
    );

    let prof = profile(
        &sum_histograms(&hist_t).unwrap(),
        &sum_histograms(&hist_b).unwrap(),
    )
    .unwrap();
    let prof_ref = r.cases.f32("profile").unwrap().1;
    if flips_t.is_empty() && flips_b_own.is_empty() {
        assert_close("profile", &prof, &prof_ref);
    } else {
        // Moving one count between bins changes log2((c+1)/total) of
        // those bins by at most log2(2) = 1.
        let worst = prof
            .iter()
            .zip(&prof_ref)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        println!("  profile: max |Δ| = {worst:.2e} with flipped codes");
        assert!(worst <= 1.0 + 1e-4, "profile differs by {worst}");
    }

    let mse = mse_8bit(&dec, &x).unwrap();
    let mse_ref = r.scalar("mse_8bit");
    let mse_own = mse_8bit(&dec_ref_inputs, &x).unwrap();
    println!("  mse_8bit: {mse} (from PyTorch's codes: {mse_own}) vs {mse_ref}");
    assert!(
        (mse_own - mse_ref).abs() <= TOL * mse_ref,
        "mse_8bit {mse_own} vs {mse_ref}"
    );
    if flips_t.is_empty() && flips_b_own.is_empty() {
        assert!(
            (mse - mse_ref).abs() <= TOL * mse_ref,
            "mse_8bit {mse} vs {mse_ref}"
        );
    }

    // The codes-only paths agree bitwise with encode (same device, same
    // arithmetic), and the fused histograms with the separate ones.
    let (ct, cb) = model.encode_codes(be, &x).unwrap();
    assert_eq!(ct.to_vec().unwrap(), id_t, "encode_codes id_t");
    assert_eq!(cb.to_vec().unwrap(), id_b_own, "encode_codes id_b");
    let mut ht = Tensor::zeros(be, &[n, cfg.n_embed]).unwrap();
    let mut hb = Tensor::zeros(be, &[n, cfg.n_embed]).unwrap();
    model
        .encode_histograms(be, &x, None, &mut ht, &mut hb)
        .unwrap();
    assert_eq!(
        ht.to_vec().unwrap(),
        hist_t.to_vec().unwrap(),
        "fused hist_t"
    );
    assert_eq!(
        hb.to_vec().unwrap(),
        hist_b.to_vec().unwrap(),
        "fused hist_b"
    );
    // All images as one sample, accumulated twice: twice the column sums.
    let mut one_t = Tensor::zeros(be, &[1, cfg.n_embed]).unwrap();
    let mut one_b = Tensor::zeros(be, &[1, cfg.n_embed]).unwrap();
    for _ in 0..2 {
        model
            .encode_histograms(be, &x, Some(&[0, n]), &mut one_t, &mut one_b)
            .unwrap();
    }
    let twice = |h: &Tensor<i32>| {
        sum_histograms(h)
            .unwrap()
            .iter()
            .map(|c| c * 2)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        sum_histograms(&one_t).unwrap(),
        twice(&hist_t),
        "accumulated sample hist_t"
    );
    assert_eq!(
        sum_histograms(&one_b).unwrap(),
        twice(&hist_b),
        "accumulated sample hist_b"
    );
    println!("  done in {:.1} s", t0.elapsed().as_secs_f64());
}

/// CUDA device 0. CUDA-only tests are `#[ignore]`d so that a machine without a
/// GPU reports them as ignored, never as passed; forced to run there, they fail.
fn cuda() -> Backend {
    assert!(
        cuda_device_count() > 0,
        "skipped: no CUDA device (this test needs a GPU)"
    );
    Backend::new(Device::Cuda(0)).unwrap()
}

#[test]
fn small_cpu() {
    check_model(&Backend::cpu(), small_fixture());
}

#[test]
fn small_emulated() {
    check_model(&Backend::new(Device::Emulated).unwrap(), small_fixture());
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn small_cuda() {
    check_model(&cuda(), small_fixture());
}

#[test]
fn paper_cpu() {
    check_model(&Backend::cpu(), paper_fixture());
}

/// About 10 s on 2 cores in the test profile.
#[test]
fn paper_emulated() {
    check_model(&Backend::new(Device::Emulated).unwrap(), paper_fixture());
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn paper_cuda() {
    check_model(&cuda(), paper_fixture());
}

/// The small weights with `edit` applied, written to a temporary file.
fn edited_weights(
    name: &str,
    edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
) -> PathBuf {
    let file = TensorFile::open(small_fixture().0).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = file
        .names()
        .into_iter()
        .map(|n| {
            let (s, d) = file.f32(&n).unwrap();
            (n, s, d)
        })
        .collect();
    edit(&mut tensors);
    let mut w = TensorWriter::new();
    for (n, s, d) in &tensors {
        w.add_slice(n, s, d).unwrap();
    }
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vqvae2_{name}.safetensors"));
    w.write(&path).unwrap();
    path
}

fn load_error(path: &Path) -> String {
    VqVae2::load(&Backend::cpu(), path).unwrap_err().to_string()
}

#[test]
fn loader_reads_hyper_parameters() {
    let model = VqVae2::load(&Backend::cpu(), small_fixture().0).unwrap();
    let expect = VqVae2Config {
        in_channel: 1,
        channel: 32,
        n_res_block: 2,
        n_res_channel: 8,
        embed_dim: 16,
        n_embed: 24,
    };
    assert_eq!(*model.config(), expect);
    let paper = VqVae2::load(&Backend::cpu(), paper_fixture().0).unwrap();
    let expect = VqVae2Config {
        in_channel: 1,
        channel: 128,
        n_res_block: 2,
        n_res_channel: 32,
        embed_dim: 64,
        n_embed: 64,
    };
    assert_eq!(*paper.config(), expect);
}

#[test]
fn encoder_only_weights_encode_and_refuse_to_decode() {
    let enc = edited_weights("encoder_only", |t| {
        t.retain(|(n, _, _)| !(n.starts_with("dec.") || n.starts_with("upsample_t.")))
    });
    let be = Backend::cpu();
    let full = VqVae2::load(&be, small_fixture().0).unwrap();
    let model = VqVae2::load(&be, &enc).unwrap();
    assert!(full.has_decoder() && !model.has_decoder());
    assert_eq!(model.config(), full.config());
    let cases = TensorFile::open(small_fixture().1).unwrap();
    let (shape, data) = cases.f32("input").unwrap();
    let x = Tensor::from_vec(&be, &shape, data).unwrap();
    let (a, b) = (
        model.encode(&be, &x).unwrap(),
        full.encode(&be, &x).unwrap(),
    );
    assert_eq!(a.id_t.to_vec().unwrap(), b.id_t.to_vec().unwrap());
    assert_eq!(a.id_b.to_vec().unwrap(), b.id_b.to_vec().unwrap());
    let msg = model
        .decode(&be, &a.quant_t, &a.quant_b)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no decoder"), "{msg}");
    // Half a decoder (upsample_t without dec) is an error saying so.
    let half = edited_weights("half_decoder", |t| {
        t.retain(|(n, _, _)| !n.starts_with("dec."))
    });
    let msg = load_error(&half);
    assert!(msg.contains("but dec has 0"), "{msg}");
}

#[test]
fn loader_rejects_inconsistent_weights() {
    let missing = edited_weights("missing", |t| {
        t.retain(|(n, _, _)| n != "dec.blocks.6.bias")
    });
    let msg = load_error(&missing);
    assert!(msg.contains("dec.blocks.6.bias"), "{msg}");

    let wrong = edited_weights("wrong_shape", |t| {
        let e = t
            .iter_mut()
            .find(|(n, _, _)| n == "quantize_b.embed")
            .unwrap();
        e.1 = vec![16, 12];
        e.2.truncate(16 * 12);
    });
    let msg = load_error(&wrong);
    assert!(
        msg.contains("quantize_b.embed") && msg.contains("n_embed 24"),
        "{msg}"
    );

    let extra_block = edited_weights("extra_block", |t| {
        let copies: Vec<_> = t
            .iter()
            .filter(|(n, _, _)| n.starts_with("dec_t.blocks.2.conv"))
            .map(|(n, s, d)| (n.replace("blocks.2.", "blocks.3."), s.clone(), d.clone()))
            .collect();
        t.extend(copies);
    });
    let msg = load_error(&extra_block);
    assert!(
        msg.contains("residual blocks") && msg.contains("dec_t has 3"),
        "{msg}"
    );

    let extra_key = edited_weights("extra_key", |t| {
        t.push(("head.weight".into(), vec![2], vec![0.0, 1.0]))
    });
    let msg = load_error(&extra_key);
    assert!(msg.contains("head.weight"), "{msg}");

    let odd = edited_weights("half_channel", |t| {
        let e = t
            .iter_mut()
            .find(|(n, _, _)| n == "enc_b.blocks.0.weight")
            .unwrap();
        e.1 = vec![15, 1, 4, 4];
        e.2.truncate(15 * 16);
    });
    let msg = load_error(&odd);
    assert!(msg.contains("enc_b.blocks.0.weight"), "{msg}");

    let not_vq = edited_weights("not_vq", |t| t.retain(|(n, _, _)| !n.starts_with("enc_b")));
    let msg = load_error(&not_vq);
    assert!(msg.contains("enc_b.blocks.0.weight"), "{msg}");
}

#[test]
fn input_shape_errors() {
    let be = Backend::cpu();
    let model = VqVae2::load(&be, small_fixture().0).unwrap();
    let two_channels = Tensor::zeros(&be, &[1, 2, 16, 16]).unwrap();
    assert!(model
        .encode(&be, &two_channels)
        .unwrap_err()
        .to_string()
        .contains("[N, 1, H, W]"));
    // 52 rows: 13 bottom rows, but the top path returns 12.
    let odd = Tensor::zeros(&be, &[1, 1, 52, 16]).unwrap();
    let msg = model.encode_codes(&be, &odd).unwrap_err().to_string();
    assert!(msg.contains("divisible by 8"), "{msg}");
}

#[test]
fn profile_formula() {
    // log2((c + 1) / Σ(c + 1)), top block first.
    let p = profile(&[0, 1, 2], &[5, 0, 0]).unwrap();
    let expect = [
        1.0f64 / 6.0,
        2.0 / 6.0,
        3.0 / 6.0,
        6.0 / 8.0,
        1.0 / 8.0,
        1.0 / 8.0,
    ]
    .map(|v| v.log2() as f32);
    assert_eq!(p, expect);
    assert!(profile(&[1, 2], &[1]).is_err());
}
