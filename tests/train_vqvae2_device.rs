//! The VQ-VAE-2 training step on the kernel devices: the emulated device
//! (CUDA's kernels compiled for the CPU, how CI runs them) and, in the
//! `#[ignore]`d `cuda_*` tests, a real GPU (`scripts/gpu-check.sh` runs
//! them; without a GPU they fail, they never pass silently).
//!
//! - against PyTorch's golden (`tests/fixtures/vqvae2_train_step.safetensors`)
//!   with the tolerances of `tests/train_vqvae2.rs`: losses and the
//!   reconstruction within 1e-4 relative, every `grad.*` and `after.*` tensor
//!   within 1e-3 of its largest |reference|; codes equal (the smallest gap
//!   between the best and second-best code distance of the fixture is
//!   printed: it is far above the few-ulp differences a reordered sum makes,
//!   so no code may flip);
//! - against the CPU step on the same batch: see [`DEVICE_VS_CPU`];
//! - two runs on one device give the same bits (the device reductions run in
//!   chunks fixed by the shapes, without atomics).

mod common;
mod vqvae2_step;

use cellmorph::train::vqvae2::{self, StepConfig, StepOutput};
use cellmorph::train::ParamStore;
use cellmorph::Backend;
use vqvae2_step::{adam, assert_close, get, ids, rel_err, setup, Setup};

/// Emulated (or CUDA) against the CPU step, each tensor relative to its
/// largest |CPU value|, for the gradients, the updated state, the losses and
/// the reconstruction: the device convolutions sum their products (and the
/// weight and bias gradients their pixels, in chunks) in another order than
/// the CPU reference, a few f32 ulps per op compounded over ~30 layers
/// forward and back. Measured on the fixture under emulation: 1.0e-6 for
/// the gradients, 6.8e-7 for the state after the step, 5e-7 for the
/// reconstruction; the bound leaves a factor 100 for a GPU's own fused
/// multiply-adds.
const DEVICE_VS_CPU: f32 = 1e-4;

/// One step (Adam, lr 1e-4, the golden's recipe) on `be` from the golden's
/// `before.*` state.
fn step_on(be: &Backend, s: &Setup) -> (ParamStore, StepOutput) {
    let mut store = s.store.clone();
    let mut opt = adam();
    store.register(&mut opt).unwrap();
    let out = vqvae2::train_step_on(
        be,
        &mut store,
        &mut opt,
        1e-4,
        &s.cfg,
        &s.shape,
        &s.x,
        &StepConfig::default(),
    )
    .unwrap_or_else(|e| panic!("train step on {be:?}: {e}"));
    (store, out)
}

/// The step on `be` against PyTorch's golden.
fn matches_the_golden(be: &Backend) {
    let s = setup();
    let f = &s.f;
    let (store, out) = step_on(be, &s);
    assert_eq!(out.id_t, ids(f, "id_t"), "id_t");
    assert_eq!(out.id_b, ids(f, "id_b"), "id_b");
    assert_eq!(out.id_t_shape, f.shape("id_t").unwrap());
    assert_eq!(out.id_b_shape, f.shape("id_b").unwrap());
    for (what, got) in [
        ("loss", out.loss),
        ("recon_loss", out.recon_loss),
        ("latent_loss", out.latent_loss),
    ] {
        let e = assert_close(what, &[got], &get(f, what), 1e-4);
        eprintln!("{what}: {got} rel err {e:e}");
    }
    assert_close("dec", &out.dec, &get(f, "dec"), 1e-4);
    let (mut worst_grad, mut worst_after) = (0f32, 0f32);
    for p in store.params() {
        if p.trainable {
            let want = get(f, &format!("grad.{}", p.name));
            let e = assert_close(&format!("grad.{}", p.name), &p.grad, &want, 1e-3);
            worst_grad = worst_grad.max(e);
        }
        let want = get(f, &format!("after.{}", p.name));
        let e = assert_close(&format!("after.{}", p.name), &p.value, &want, 1e-3);
        worst_after = worst_after.max(e);
    }
    eprintln!("{be:?}: worst grad {worst_grad:e}, worst after {worst_after:e}");
}

/// The step on `be` against the CPU step on the same batch, and twice on
/// `be` for the same bits.
fn matches_the_cpu_and_repeats_its_bits(be: &Backend) {
    let s = setup();
    let (cpu, cpu_out) = step_on(&Backend::cpu(), &s);
    let (dev, out) = step_on(be, &s);
    assert_eq!(out.id_t, cpu_out.id_t, "id_t");
    assert_eq!(out.id_b, cpu_out.id_b, "id_b");
    for (what, got, want) in [
        ("loss", out.loss, cpu_out.loss),
        ("recon_loss", out.recon_loss, cpu_out.recon_loss),
        ("latent_loss", out.latent_loss, cpu_out.latent_loss),
    ] {
        assert_close(what, &[got], &[want], DEVICE_VS_CPU);
    }
    assert_close("dec", &out.dec, &cpu_out.dec, DEVICE_VS_CPU);
    let (mut worst_grad, mut worst_after) = (0f32, 0f32);
    for (p, q) in dev.params().iter().zip(cpu.params()) {
        assert_eq!(p.name, q.name);
        if p.trainable {
            let what = format!("grad.{}", p.name);
            worst_grad = worst_grad.max(assert_close(&what, &p.grad, &q.grad, DEVICE_VS_CPU));
        }
        let what = format!("after.{}", p.name);
        let e = assert_close(&what, &p.value, &q.value, DEVICE_VS_CPU);
        worst_after = worst_after.max(e);
    }
    let dec = rel_err("dec", &out.dec, &cpu_out.dec);
    eprintln!("{be:?} vs cpu: dec {dec:e}, worst grad {worst_grad:e}, worst after {worst_after:e}");

    let (again, out2) = step_on(be, &s);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(out.loss.to_bits(), out2.loss.to_bits(), "loss");
    assert_eq!(bits(&out.dec), bits(&out2.dec), "dec");
    assert_eq!((&out.id_t, &out.id_b), (&out2.id_t, &out2.id_b), "codes");
    for (p, q) in dev.params().iter().zip(again.params()) {
        assert_eq!(bits(&p.value), bits(&q.value), "{}: values", p.name);
        assert_eq!(bits(&p.grad), bits(&q.grad), "{}: gradients", p.name);
    }
}

/// The forward-only entry points on `be` agree with the step's forward.
fn forward_passes_agree(be: &Backend) {
    let s = setup();
    let step = StepConfig::default();
    let eval = vqvae2::evaluate_on(be, &s.store, &s.cfg, &s.shape, &s.x, &step).unwrap();
    let loss = vqvae2::loss_only_on(be, &s.store, &s.cfg, &s.shape, &s.x, &step).unwrap();
    let mut store = s.store.clone();
    let grads = vqvae2::gradients_on(be, &mut store, &s.cfg, &s.shape, &s.x, &step).unwrap();
    assert_eq!(
        eval, grads,
        "evaluate_on and gradients_on: the same forward"
    );
    assert_eq!(
        (loss.0.to_bits(), loss.1.to_bits(), loss.2.to_bits()),
        (
            eval.loss.to_bits(),
            eval.recon_loss.to_bits(),
            eval.latent_loss.to_bits()
        )
    );
    // Parameters and codebooks untouched.
    for (p, q) in store.params().iter().zip(s.store.params()) {
        assert_eq!(p.value, q.value, "{}", p.name);
    }
}

#[test]
fn emulated_step_matches_the_golden() {
    matches_the_golden(&common::emulated());
}

#[test]
fn emulated_step_matches_the_cpu_and_repeats_its_bits() {
    matches_the_cpu_and_repeats_its_bits(&common::emulated());
}

#[test]
fn emulated_forward_passes_agree() {
    forward_passes_agree(&common::emulated());
}

#[test]
fn a_reduced_precision_backend_is_refused() {
    let s = setup();
    let be = common::emulated().with_precision(cellmorph::Precision::Bf16);
    let mut store = s.store.clone();
    let e = vqvae2::gradients_on(
        &be,
        &mut store,
        &s.cfg,
        &s.shape,
        &s.x,
        &StepConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("f32"), "{e}");
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh)"]
fn cuda_step_matches_the_golden() {
    matches_the_golden(&common::cuda());
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh)"]
fn cuda_step_matches_the_cpu_and_repeats_its_bits() {
    matches_the_cpu_and_repeats_its_bits(&common::cuda());
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh)"]
fn cuda_forward_passes_agree() {
    forward_passes_agree(&common::cuda());
}
