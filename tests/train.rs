//! The training core against PyTorch's goldens
//! (`tests/fixtures/ops_backward.safetensors` and the training-step
//! fixtures, described in `tests/fixtures/README.md`):
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

/// One CP2Image step (generator then discriminator update) against
/// `cp2image_train_step.safetensors`. Tolerance 1e-3 of each tensor's
/// largest magnitude, as the fixture README gives for whole-model
/// gradients and updated weights (the CPU ops sum in another order than
/// PyTorch, a few f32 ulps per op over ~12 layers and two networks).
#[test]
fn a_cp2image_training_step_matches_pytorch() {
    use cellmorph::train::cp2image::{train_step, Batch, NetState};
    let f = TensorFile::open(common::fixture_path("cp2image_train_step.safetensors")).unwrap();
    let mut g = NetState::from_file(&f, "G.before.").unwrap();
    let mut d = NetState::from_file(&f, "D.before.").unwrap();
    let adam = || {
        Optimizer::new(Method::Adam(AdamConfig {
            betas: (0.5, 0.999),
            ..AdamConfig::default()
        }))
        .unwrap()
    };
    let (mut og, mut od) = (adam(), adam());
    g.params.register(&mut og).unwrap();
    d.params.register(&mut od).unwrap();
    let (shape, x) = f.f32("x").unwrap();
    let batch = Batch {
        z: &get(&f, "z"),
        x: &x,
        x_real: &get(&f, "x_real"),
        shape: shape.try_into().unwrap(),
    };
    let losses = train_step(&mut g, &mut d, &mut og, &mut od, 2e-4, &batch).unwrap();
    assert_close("loss_g", &[losses.loss_g], &get(&f, "loss_g"), 1e-4);
    assert_close("loss_d", &[losses.loss_d], &get(&f, "loss_d"), 1e-4);
    let rel = |got: &[f32], want: &[f32]| {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
        got.iter()
            .zip(want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale
    };
    let mut worst = Vec::new();
    for (net, state) in [("G", &g), ("D", &d)] {
        for p in state.params.params() {
            if p.trainable {
                let name = format!("{net}.grad.{}", p.name);
                worst.push((rel(&p.grad, &get(&f, &name)), name));
            }
            let name = format!("{net}.after.{}", p.name);
            worst.push((rel(&p.value, &get(&f, &name)), name));
        }
        for (name, &count) in &state.num_batches_tracked {
            let (_, want) = f.i64(&format!("{net}.after.{name}")).unwrap();
            assert_eq!(count, want[0], "{net}.{name}");
        }
    }
    // A conv bias followed by BatchNorm has a zero gradient in exact
    // arithmetic (BN removes the channel mean): both sides hold rounding
    // noise, so those are checked for being negligible next to the conv
    // weight's gradient, and their Adam step (which normalizes the noise)
    // for staying within one learning-rate-sized step.
    worst.retain(|(_, name)| !(name.contains(".conv.bias") && name.contains("blocks.")));
    for (net, state) in [("G", &g), ("D", &d)] {
        for p in state.params.params() {
            if !(p.name.contains(".conv.bias") && p.name.starts_with("blocks.")) {
                continue;
            }
            let w = p.name.replace(
                ".bias",
                if net == "D" {
                    ".weight_orig"
                } else {
                    ".weight"
                },
            );
            let wg = state.params.by_name(&w).unwrap();
            let wmax = wg.grad.iter().fold(0f32, |m, v| m.max(v.abs()));
            let want = get(&f, &format!("{net}.grad.{}", p.name));
            let gmax = p.grad.iter().chain(&want).fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                gmax <= 1e-4 * wmax,
                "{net}.{}: |grad| {gmax} vs weight grads {wmax}",
                p.name
            );
            let after = get(&f, &format!("{net}.after.{}", p.name));
            let dmax = p
                .value
                .iter()
                .zip(&after)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(dmax <= 2.0 * 2e-4 + 1e-6, "{net}.after.{}: {dmax}", p.name);
        }
    }
    // The second generator forward (discriminator step) sees those biases
    // after their noise-driven Adam step, and its batch means carry them
    // into the running means with momentum 0.1: at most 0.1 × 2·lr apart
    // beyond the usual tolerance.
    for (net, state) in [("G", &g), ("D", &d)] {
        for p in state.params.params() {
            if !p.name.ends_with(".bn.running_mean") {
                continue;
            }
            let name = format!("{net}.after.{}", p.name);
            let want = get(&f, &name);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let dmax = p
                .value
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(dmax <= 1e-3 * scale + 0.1 * 2.0 * 2e-4, "{name}: {dmax}");
        }
    }
    worst.retain(|(_, name)| !name.ends_with(".bn.running_mean"));
    worst.sort_by(|a, b| b.0.total_cmp(&a.0));
    assert!(
        worst[0].0 <= 1e-3,
        "largest relative errors: {:?}",
        &worst[..8]
    );
}

/// `cellmorph train-step --model cp2image` on the golden's state and batch.
#[test]
fn the_cp2image_train_step_command_reproduces_the_losses() {
    let f = TensorFile::open(common::fixture_path("cp2image_train_step.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (weights, batch) = common::train_step_inputs(
        &f,
        dir.path(),
        &[("G.before.", "G."), ("D.before.", "D.")],
        &["z", "x", "x_real"],
    );
    let out = dir.path().join("out.safetensors");
    let st = common::train_step_command(
        &[
            "--model",
            "cp2image",
            "--lr",
            "2e-4",
            "--betas",
            "0.5,0.999",
        ],
        &weights,
        &batch,
        &out,
    );
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let o = TensorFile::open(&out).unwrap();
    for name in ["loss_g", "loss_d"] {
        assert_close(name, &get(&o, name), &get(&f, name), 1e-4);
    }
    for name in [
        "G.after.out.weight",
        "D.after.fc.weight",
        "D.grad.blocks.2.conv.weight_orig",
    ] {
        assert_close(name, &get(&o, name), &get(&f, name), 1e-3);
    }
    assert_eq!(
        o.i64("D.after.blocks.0.bn.num_batches_tracked").unwrap().1,
        vec![4]
    );
}

/// `cellmorph cp2image train` on the 64 real ExampleFly cells of
/// tests/data/single_cells, with narrow networks so that it takes seconds.
fn cp2image_train(dir: &std::path::Path, out: &str, extra: &[&str]) -> std::process::Output {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/single_cells");
    std::process::Command::new(env!("CARGO_BIN_EXE_cellmorph"))
        .args(["cp2image", "train", "--batch-size", "8"])
        .args(["--generator-channels", "32,16,8,8,8"])
        .args(["--discriminator-channels", "8,8,16,16,16"])
        .arg("--features")
        .arg(data.join("features.csv"))
        .arg("--crops")
        .arg(data.join("cells.safetensors"))
        .arg("--output")
        .arg(dir.join(out))
        .args(extra)
        .output()
        .unwrap()
}

fn column(path: &std::path::Path, name: &str) -> Vec<f64> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let i = header.iter().position(|h| *h == name).unwrap();
    lines
        .map(|l| l.split(',').nth(i).unwrap().parse().unwrap())
        .collect()
}

#[test]
fn cp2image_train_learns_resumes_exactly_and_writes_a_usable_generator() {
    let dir = tempfile::tempdir().unwrap();
    let ok = |o: std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let log = ok(cp2image_train(
        dir.path(),
        "u.safetensors",
        &["--epochs", "6"],
    ));
    assert!(log.contains("trained 6 epochs"), "{log}");
    let mse = column(&dir.path().join("u.metrics.csv"), "val_mse");
    let loss_g = column(&dir.path().join("u.metrics.csv"), "loss_g");
    assert_eq!(mse.len(), 6);
    // From sigmoid outputs near 0.5 on dim cells the generator's pixel
    // error falls steadily in the first epochs.
    assert!(
        mse[5] < mse[0] && loss_g[5] < loss_g[0],
        "{mse:?} {loss_g:?}"
    );
    for f in [
        "u.curves.png",
        "u.sheet.png",
        "u.standardize.json",
        "u.discriminator.safetensors",
    ] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }

    // Resumed after 3 epochs = unbroken, bit for bit; the seed decides.
    ok(cp2image_train(
        dir.path(),
        "r.safetensors",
        &["--epochs", "3"],
    ));
    let ck = dir.path().join("r.checkpoint.safetensors");
    ok(cp2image_train(
        dir.path(),
        "r.safetensors",
        &["--epochs", "6", "--resume", ck.to_str().unwrap()],
    ));
    let bytes = |n: &str| std::fs::read(dir.path().join(n)).unwrap();
    for (a, b) in [
        ("u.safetensors", "r.safetensors"),
        ("u.discriminator.safetensors", "r.discriminator.safetensors"),
        ("u.metrics.csv", "r.metrics.csv"),
    ] {
        assert!(bytes(a) == bytes(b), "{a} ≠ {b}");
    }
    ok(cp2image_train(
        dir.path(),
        "s.safetensors",
        &["--epochs", "6", "--seed", "3"],
    ));
    assert!(bytes("s.safetensors") != bytes("u.safetensors"));

    // The generator is one `cp2image generate` reads, with its standardization.
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/single_cells");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cellmorph"))
        .args(["cp2image", "generate", "--weights"])
        .arg(dir.path().join("u.safetensors"))
        .arg("--features")
        .arg(data.join("features.csv"))
        .arg("--output")
        .arg(dir.path().join("gen.png"))
        .output()
        .unwrap();
    ok(o);

    // `cp2image evaluate` on the held-out cells of the run's split.
    let report = dir.path().join("report.json");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cellmorph"))
        .args(["cp2image", "evaluate", "--weights"])
        .arg(dir.path().join("u.safetensors"))
        .arg("--features")
        .arg(data.join("features.csv"))
        .arg("--crops")
        .arg(data.join("cells.safetensors"))
        .arg("--output")
        .arg(&report)
        .output()
        .unwrap();
    ok(o);
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let split = std::fs::read_to_string(dir.path().join("u.split.csv")).unwrap();
    let held_out = split.lines().filter(|l| l.ends_with(",val")).count();
    assert_eq!(r["cells"], held_out as u64);
    assert_eq!(r["training_cells"], (64 - held_out) as u64);
    // The last epoch's held-out MSE of training is the report's (same cells,
    // same inference-mode generator).
    assert!((r["mse"].as_f64().unwrap() - mse[5]).abs() < 1e-9, "{r}");
    for key in ["ssim", "ssim_mean_image", "ssim_nearest_cell"] {
        let v = r[key].as_f64().unwrap();
        assert!(v > -1.0 && v <= 1.0, "{key} {v}");
    }
    assert!(r["mse_mean_image"].as_f64().unwrap() > 0.0);
    assert_eq!(r["fidelity"].as_array().unwrap().len(), 3 * 7);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cellmorph"))
        .args(["cp2image", "evaluate", "--weights"])
        .arg(dir.path().join("u.safetensors"))
        .arg("--features")
        .arg(data.join("features.csv"))
        .arg("--crops")
        .arg(data.join("cells.safetensors"))
        .arg("--split")
        .arg(dir.path().join("missing.csv"))
        .arg("--output")
        .arg(dir.path().join("r2.json"))
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("missing.csv"));

    // The adversarial term changes the training; a negative weight is refused.
    ok(cp2image_train(
        dir.path(),
        "a.safetensors",
        &["--epochs", "1", "--adversarial-weight", "0.5"],
    ));
    ok(cp2image_train(
        dir.path(),
        "b.safetensors",
        &["--epochs", "1"],
    ));
    assert!(bytes("a.safetensors") != bytes("b.safetensors"));

    // Clear errors.
    for (extra, msg) in [
        (vec!["--batch-size", "1"], "--batch-size"),
        (vec!["--adversarial-weight", "-1"], "--adversarial-weight"),
        (vec!["--val-fraction", "0.95"], "fewer than one batch"),
        (
            vec![
                "--epochs",
                "8",
                "--resume",
                ck.to_str().unwrap(),
                "--seed",
                "9",
            ],
            "other options",
        ),
    ] {
        let o = cp2image_train(dir.path(), "e.safetensors", &extra);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && e.contains(msg) && !e.contains("panicked"),
            "{extra:?}: {e}"
        );
    }
}

/// The adversarial term's gradient: the generator step's gradient of one
/// output-layer weight against a central finite difference of `loss_g`
/// (generator forward in training mode; the discriminator's spectral norm
/// and BN statistics are restored between evaluations by cloning).
#[test]
fn the_adversarial_term_has_the_gradient_of_its_loss() {
    use cellmorph::train::cp2image::{train_step_weighted, Batch, LossWeights, NetState};
    let f = TensorFile::open(common::fixture_path("cp2image_train_step.safetensors")).unwrap();
    let g0 = NetState::from_file(&f, "G.before.").unwrap();
    let d0 = NetState::from_file(&f, "D.before.").unwrap();
    let (shape, x) = f.f32("x").unwrap();
    let (z, x_real) = (get(&f, "z"), get(&f, "x_real"));
    let batch = Batch {
        z: &z,
        x: &x,
        x_real: &x_real,
        shape: shape.try_into().unwrap(),
    };
    let w = LossWeights {
        mse: 0.0,
        feature_matching: 0.0,
        adversarial: 1.0,
    };
    // loss_g and the gradient at the given generator (lr 0: nothing moves).
    let run = |g: &NetState| {
        let (mut g, mut d) = (g.clone(), d0.clone());
        let sgd = || Optimizer::new(Method::Adam(AdamConfig::default())).unwrap();
        let (mut og, mut od) = (sgd(), sgd());
        g.params.register(&mut og).unwrap();
        d.params.register(&mut od).unwrap();
        let l = train_step_weighted(&mut g, &mut d, &mut og, &mut od, 0.0, &batch, &w).unwrap();
        (f64::from(l.loss_g), g)
    };
    let (_, after) = run(&g0);
    let id = g0.params.id("out.weight").unwrap();
    let grad = after.params.get(id).grad.clone();
    assert!(
        grad.iter().any(|v| v.abs() > 1e-4),
        "the adversarial term moves the generator"
    );
    let h = 1e-2f32;
    for i in [0usize, 7, 50] {
        let mut plus = g0.clone();
        plus.params.get_mut(id).value[i] += h;
        let mut minus = g0.clone();
        minus.params.get_mut(id).value[i] -= h;
        let fd = (run(&plus).0 - run(&minus).0) / (2.0 * f64::from(h));
        let g = f64::from(grad[i]);
        // f32 forward passes: the difference quotient carries about
        // 1e-7/h relative noise on a loss of order 1.
        assert!(
            (fd - g).abs() <= 2e-3 + 0.05 * g.abs(),
            "out.weight[{i}]: fd {fd:e}, backward {g:e}"
        );
    }
}

/// The single-cell table with missing values written into it: feature
/// `Nuclei_AreaShape_Area` empty in row 3 and `nan` in row 10 (as
/// CellProfiler writes undefined measurements).
fn table_with_missing(dir: &std::path::Path) -> std::path::PathBuf {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/single_cells");
    let text = std::fs::read_to_string(data.join("features.csv")).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let col = lines[0]
        .split(',')
        .position(|h| h == "Nuclei_AreaShape_Area")
        .unwrap();
    for (row, value) in [(3usize, ""), (10, "nan")] {
        let mut f: Vec<String> = lines[row + 1].split(',').map(str::to_string).collect();
        f[col] = value.to_string();
        lines[row + 1] = f.join(",");
    }
    let path = dir.join("features_nan.csv");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

#[test]
fn cp2image_nan_policies_refuse_drop_or_impute() {
    let dir = tempfile::tempdir().unwrap();
    let features = table_with_missing(dir.path());
    let crops = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/single_cells/cells.safetensors");
    let train = |out: &str, nan: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cellmorph"))
            .args(["cp2image", "train", "--batch-size", "8", "--epochs", "1"])
            .args(["--generator-channels", "32,16,8,8,8"])
            .args(["--discriminator-channels", "8,8,16,16,16"])
            .args(["--nan", nan])
            .arg("--features")
            .arg(&features)
            .arg("--crops")
            .arg(&crops)
            .arg("--output")
            .arg(dir.path().join(out))
            .output()
            .unwrap()
    };
    // Refused by default, naming the file, line and column.
    let o = train("refused.safetensors", "refuse");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !e.contains("panicked"));
    assert!(
        e.contains("features_nan.csv")
            && e.contains("line 5")
            && e.contains("Nuclei_AreaShape_Area"),
        "{e}"
    );
    assert!(!dir.path().join("refused.safetensors").exists());

    // drop-column: a generator with one input fewer, said on stderr.
    let o = train("dropped.safetensors", "drop-column");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("left out 1 features") && e.contains("Nuclei_AreaShape_Area"),
        "{e}"
    );
    let std_json = std::fs::read_to_string(dir.path().join("dropped.standardize.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&std_json).unwrap();
    let names: Vec<&str> = v["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 404, "405 features less the one with gaps");
    assert!(!names.contains(&"Nuclei_AreaShape_Area"));

    // impute: every feature kept; the generator then reads the gappy table
    // only with --nan impute (the training mean).
    let o = train("imputed.safetensors", "impute");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("filled 2 missing values in 1 features"), "{e}");
    let generate = |nan: &str, out: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cellmorph"))
            .args(["cp2image", "generate", "--nan", nan, "--rows", "3,10"])
            .arg("--weights")
            .arg(dir.path().join("imputed.safetensors"))
            .arg("--features")
            .arg(&features)
            .arg("--output")
            .arg(dir.path().join(out))
            .output()
            .unwrap()
    };
    let o = generate("refuse", "g1.png");
    assert!(!o.status.success());
    let o = generate("impute", "g2.png");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("filled 2 missing values") && e.contains("training mean"),
        "{e}"
    );
    let o = generate("drop-column", "g3.png");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("every feature it was trained on"),
        "{e}"
    );
}

/// `cp2image train --resume` with a damaged, truncated or foreign
/// checkpoint is refused naming the checkpoint, before any training, and
/// the outputs of the earlier run are left as they were.
#[test]
fn cp2image_resume_refuses_damaged_checkpoints_and_keeps_the_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let o = cp2image_train(dir.path(), "r.safetensors", &["--epochs", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ck = dir.path().join("r.checkpoint.safetensors");
    let good = std::fs::read(&ck).unwrap();
    let before: Vec<Vec<u8>> = [
        "r.safetensors",
        "r.discriminator.safetensors",
        "r.metrics.csv",
    ]
    .iter()
    .map(|n| std::fs::read(dir.path().join(n)).unwrap())
    .collect();
    let mut flipped = good.clone();
    let at = good.len() - 5;
    flipped[at] ^= 0x10;
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    // A checkpoint of another model: the VQ-VAE-2 weights fixture.
    let foreign = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
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
        let p = dir.path().join(format!("{name}.safetensors"));
        std::fs::write(&p, &bytes).unwrap();
        let o = cp2image_train(
            dir.path(),
            "r.safetensors",
            &["--epochs", "2", "--resume", p.to_str().unwrap()],
        );
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name}: resumed\n{e}");
        assert!(
            e.contains(&format!("{name}.safetensors")) && e.contains(says),
            "{name}: {e}"
        );
        assert!(!e.contains("panicked"), "{name}: {e}");
        for (n, b) in [
            "r.safetensors",
            "r.discriminator.safetensors",
            "r.metrics.csv",
        ]
        .iter()
        .zip(&before)
        {
            assert!(
                &std::fs::read(dir.path().join(n)).unwrap() == b,
                "{name}: {n} changed"
            );
        }
    }
    // The good checkpoint still resumes.
    let o = cp2image_train(
        dir.path(),
        "r.safetensors",
        &["--epochs", "2", "--resume", ck.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
