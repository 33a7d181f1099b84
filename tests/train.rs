//! The training core against PyTorch's goldens
//! (`tests/fixtures/ops_backward.safetensors`, made by
//! `scripts/fixtures/ops_backward.py`'s source in `../shared`; README there):
//! the losses and their gradients, and Adam with and without weight decay
//! over three steps.
//!
//! Tolerances: losses and gradients within 1e-5 of the largest magnitude
//! (they are summed in f64 and rounded once, PyTorch sums in f32: a few
//! f32 ulps apart); Adam within 1e-6 of the largest parameter (the update
//! is element-wise in f32 in PyTorch's order, so only the rounding of the
//! scalars can differ).

mod common;

use cellmorph::io::TensorFile;
use cellmorph::train::loss;
use cellmorph::train::{AdamConfig, Method, Optimizer, ParamGroup, Schedule};

fn fixture() -> TensorFile {
    TensorFile::open(common::fixture_path("ops_backward.safetensors"))
        .expect("ops_backward fixture")
}

fn get(f: &TensorFile, name: &str) -> Vec<f32> {
    f.f32(name).unwrap_or_else(|e| panic!("{name}: {e}")).1
}

fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= rel * scale,
        "{what}: max |Δ| {err:e} > {rel:e} × {scale:e}"
    );
}

#[test]
fn mse_and_its_gradient_match_pytorch() {
    let f = fixture();
    let (x, t) = (get(&f, "mse.x"), get(&f, "mse.target"));
    let y = loss::mse(&x, &t).unwrap();
    assert_close("mse.y", &[y], &get(&f, "mse.y"), 1e-5);
    let dx = loss::mse_backward(&x, &t, 1.0).unwrap();
    assert_close("mse.dx", &dx, &get(&f, "mse.dx"), 1e-5);
}

#[test]
fn bce_on_logits_and_on_probabilities_match_pytorch() {
    // The golden is sigmoid followed by BCE; on logits that is
    // `bce_with_logits`, on probabilities `bce` chained with sigmoid's
    // derivative p(1 − p).
    let f = fixture();
    let (x, t) = (get(&f, "bce.x"), get(&f, "bce.target"));
    let want_y = get(&f, "bce.y");
    let want_dx = get(&f, "bce.dx");
    let y = loss::bce_with_logits(&x, &t).unwrap();
    assert_close("bce_with_logits", &[y], &want_y, 1e-5);
    let dx = loss::bce_with_logits_backward(&x, &t, 1.0).unwrap();
    assert_close("bce_with_logits dx", &dx, &want_dx, 1e-5);

    let p: Vec<f32> = x.iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect();
    let y = loss::bce(&p, &t).unwrap();
    assert_close("bce", &[y], &want_y, 1e-5);
    let dp = loss::bce_backward(&p, &t, 1.0).unwrap();
    let dx: Vec<f32> = dp
        .iter()
        .zip(&p)
        .map(|(&g, &q)| g * q * (1.0 - q))
        .collect();
    assert_close("bce dx through sigmoid", &dx, &want_dx, 1e-4);
}

#[test]
fn cross_entropy_matches_pytorch_and_weights_reweight() {
    let f = fixture();
    let x = get(&f, "cross_entropy.x");
    let targets: Vec<usize> = get(&f, "cross_entropy.target")
        .iter()
        .map(|&v| v as usize)
        .collect();
    let classes = x.len() / targets.len();
    let y = loss::cross_entropy(&x, classes, &targets, None).unwrap();
    assert_close("cross_entropy.y", &[y], &get(&f, "cross_entropy.y"), 1e-5);
    let dx = loss::cross_entropy_backward(&x, classes, &targets, None, 1.0).unwrap();
    assert_close("cross_entropy.dx", &dx, &get(&f, "cross_entropy.dx"), 1e-5);

    // Uniform class weights change nothing; a weight of zero on a class
    // removes its samples from both the sum and the normalizer.
    let uniform = vec![3.0f32; classes];
    let yu = loss::cross_entropy(&x, classes, &targets, Some(&uniform)).unwrap();
    assert!((yu - y).abs() <= 1e-6 * y.abs());
    let mut w = vec![1.0f32; classes];
    w[0] = 0.0;
    let yw = loss::cross_entropy(&x, classes, &targets, Some(&w)).unwrap();
    let kept: Vec<usize> = (0..targets.len()).filter(|&i| targets[i] != 0).collect();
    let xs: Vec<f32> = kept
        .iter()
        .flat_map(|&i| x[i * classes..(i + 1) * classes].to_vec())
        .collect();
    let ts: Vec<usize> = kept.iter().map(|&i| targets[i]).collect();
    let y_kept = loss::cross_entropy(&xs, classes, &ts, None).unwrap();
    assert!(
        (yw - y_kept).abs() <= 1e-6 * y_kept.abs(),
        "{yw} vs {y_kept}"
    );
    // A target outside the classes is an error, not a panic.
    assert!(loss::cross_entropy(&x, classes, &vec![classes; targets.len()], None).is_err());
}

fn adam_case(name: &str, wd: f64) {
    let f = fixture();
    let mut p = get(&f, &format!("{name}.param"));
    let mut opt = Optimizer::new(Method::Adam(AdamConfig {
        betas: (0.9, 0.999),
        eps: 1e-8,
        weight_decay: wd,
    }))
    .unwrap();
    let g = opt.add_group(ParamGroup::new("all")).unwrap();
    opt.add_param(g, "param", p.len()).unwrap();
    let lr = Schedule::Constant { base: 0.01 };
    for step in 1..=3u64 {
        let grad = get(&f, &format!("{name}.grad_{step}"));
        opt.step(lr.lr(step - 1), &mut [&mut p[..]], &[&grad[..]])
            .unwrap();
        let want = get(&f, &format!("{name}.param_after_{step}"));
        assert_close(&format!("{name} after step {step}"), &p, &want, 1e-6);
    }
}

#[test]
fn adam_three_steps_match_pytorch() {
    adam_case("adam_wd0.0", 0.0);
}

#[test]
fn adam_with_weight_decay_three_steps_match_pytorch() {
    adam_case("adam_wd0.01", 0.01);
}

#[test]
fn frozen_groups_and_restored_state_behave_like_pytorch() {
    let f = fixture();
    let p0 = get(&f, "adam_wd0.0.param");
    let grads: Vec<Vec<f32>> = (1..=3)
        .map(|s| get(&f, &format!("adam_wd0.0.grad_{s}")))
        .collect();
    let make = || {
        let mut opt = Optimizer::new(Method::Adam(AdamConfig::default())).unwrap();
        let live = opt.add_group(ParamGroup::new("live")).unwrap();
        let frozen = opt.add_group(ParamGroup::new("frozen").frozen()).unwrap();
        opt.add_param(live, "a", p0.len()).unwrap();
        opt.add_param(frozen, "b", p0.len()).unwrap();
        opt
    };
    // Three unbroken steps.
    let mut opt = make();
    let (mut a, mut b) = (p0.clone(), p0.clone());
    for g in &grads {
        opt.step(0.01, &mut [&mut a[..], &mut b[..]], &[&g[..], &[]])
            .unwrap();
    }
    assert_eq!(b, p0, "a frozen group is not touched");
    assert_ne!(a, p0);
    // One step, the state carried into a fresh optimizer, two more steps:
    // the same bits.
    let mut first = make();
    let (mut a2, mut b2) = (p0.clone(), p0.clone());
    first
        .step(0.01, &mut [&mut a2[..], &mut b2[..]], &[&grads[0][..], &[]])
        .unwrap();
    let mut resumed = make();
    for i in 0..2 {
        resumed
            .set_state(i, first.state(i).unwrap().clone())
            .unwrap();
    }
    for g in &grads[1..] {
        resumed
            .step(0.01, &mut [&mut a2[..], &mut b2[..]], &[&g[..], &[]])
            .unwrap();
    }
    assert_eq!(a2, a, "resumed from its state, Adam continues bit for bit");
}

#[test]
fn global_norm_clipping_scales_every_gradient_by_one_factor() {
    use cellmorph::train::optim::{clip_grad_norm, grad_norm};
    let mut g1 = [3.0f32, 0.0];
    let mut g2 = [0.0f32, 4.0];
    let n = clip_grad_norm(&mut [&mut g1[..], &mut g2[..]], 1.0).unwrap();
    assert!(
        (n - 5.0).abs() < 1e-12,
        "the norm before clipping is returned"
    );
    let after = grad_norm(&[&g1[..], &g2[..]]);
    assert!((after - 1.0).abs() < 1e-6, "norm after clipping {after}");
    assert!((g1[0] / g2[1] - 0.75).abs() < 1e-6, "directions kept");
    // Below the threshold nothing changes.
    let mut g = [0.1f32, 0.2];
    clip_grad_norm(&mut [&mut g[..]], 10.0).unwrap();
    assert_eq!(g, [0.1, 0.2]);
}

/// The codebook EMA of one VQ-VAE-2 training step
/// (`tests/fixtures/vqvae2_train_step.safetensors`): the encoder runs on
/// the `before.*` weights, the codes must be PyTorch's (chosen with the old
/// codebook), and `cpu::vq::vq_ema_update` must give the `after.*` cluster
/// sizes, averages and codebooks of both levels. Tolerance 1e-5 of the
/// largest value: the quantizer inputs come from an f32 encoder (~1e-6
/// relative) and the vector sums are over at most 256 positions.
#[test]
fn vq_ema_update_matches_a_pytorch_training_step() {
    use cellmorph::io::TensorWriter;
    use cellmorph::models::VqVae2;
    use cellmorph::{cpu, Backend, Device, Tensor};

    let f = TensorFile::open(common::fixture_path("vqvae2_train_step.safetensors"))
        .expect("vqvae2_train_step fixture");
    let mut w = TensorWriter::new();
    for name in f.names() {
        if let Some(rest) = name.strip_prefix("before.") {
            let (shape, data) = f.f32(&name).unwrap();
            w.add_slice(rest, &shape, &data).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("before.safetensors");
    w.write(&weights).unwrap();
    let be = Backend::new(Device::Cpu).unwrap();
    let model = VqVae2::load(&be, &weights).unwrap();
    let (xs, x) = f.f32("input").unwrap();
    let x = Tensor::from_vec(&be, &xs, x).unwrap();

    let (pre_t, enc_b) = model.pre_quantize_top(&be, &x).unwrap();
    let (id_t, quant_t) = model.quantize_top(&be, &pre_t).unwrap();
    let pre_b = model.pre_quantize_bottom(&be, &quant_t, &enc_b).unwrap();
    let (id_b, _) = model.quantize_bottom(&be, &pre_b).unwrap();
    for (level, pre, ids) in [("t", &pre_t, &id_t), ("b", &pre_b, &id_b)] {
        let want_ids: Vec<i32> = f
            .i64(&format!("id_{level}"))
            .unwrap()
            .1
            .iter()
            .map(|&v| v as i32)
            .collect();
        let ids = ids.to_vec().unwrap();
        assert_eq!(ids, want_ids, "id_{level}: the codes of the old codebook");
        let s = pre.shape().to_vec();
        let (n, d, hw) = (s[0], s[1], s[2] * s[3]);
        let q = format!("quantize_{level}");
        let mut cluster = get(&f, &format!("before.{q}.cluster_size"));
        let mut avg = get(&f, &format!("before.{q}.embed_avg"));
        let mut embed = get(&f, &format!("before.{q}.embed"));
        let k = cluster.len();
        cpu::vq::vq_ema_update(
            n,
            d,
            hw,
            k,
            &pre.to_vec().unwrap(),
            &ids,
            0.99,
            1e-5,
            &mut cluster,
            &mut avg,
            &mut embed,
        )
        .unwrap();
        assert_close(
            &format!("{q}.cluster_size"),
            &cluster,
            &get(&f, &format!("after.{q}.cluster_size")),
            1e-5,
        );
        assert_close(
            &format!("{q}.embed_avg"),
            &avg,
            &get(&f, &format!("after.{q}.embed_avg")),
            1e-5,
        );
        assert_close(
            &format!("{q}.embed"),
            &embed,
            &get(&f, &format!("after.{q}.embed")),
            1e-5,
        );
    }
}
