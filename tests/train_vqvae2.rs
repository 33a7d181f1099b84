//! One VQ-VAE-2 training step on the CPU against PyTorch's golden
//! (`tests/fixtures/vqvae2_train_step.safetensors`, README there): codes,
//! losses, every gradient, and the state after the EMA update and one Adam
//! step; determinism; a finite-difference check; and `cellmorph train-step`.
//!
//! Tolerances: losses within 1e-4 relative; each `grad.*` and `after.*`
//! tensor within 1e-3 of its largest |reference| (the backward runs the
//! CPU ops in a different summation order than PyTorch, a few f32 ulps per
//! op over ~30 layers). Codes must be equal; the test also reports the
//! smallest margin between the best and second-best code distance so that
//! a near-tie (which a reordering of sums could flip) would show up in the
//! message.

mod common;
mod vqvae2_step;

use std::path::Path;
use std::process::Command;

use cellmorph::io::{TensorFile, TensorWriter};
use cellmorph::train::vqvae2::{self, StepConfig};
use vqvae2_step::{
    adam, assert_close, before_file, get, golden, ids, min_code_margin, setup, Setup,
};

#[test]
fn a_training_step_matches_pytorch() {
    let Setup {
        f,
        cfg,
        mut store,
        shape,
        x,
        ..
    } = setup();
    let before = store.clone();
    let mut opt = adam();
    store.register(&mut opt).unwrap();
    let out = vqvae2::train_step(
        &mut store,
        &mut opt,
        1e-4,
        &cfg,
        &shape,
        &x,
        &StepConfig::default(),
    )
    .unwrap();

    // Codes: equal, and not near a tie (the margin is reported). The
    // quantizer inputs are recomputed with the inference model's path.
    {
        use cellmorph::models::VqVae2;
        use cellmorph::{Backend, Device, Tensor};
        let be = Backend::new(Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let model = VqVae2::load(&be, before_file(&f, dir.path())).unwrap();
        let xt = Tensor::from_vec(&be, &shape, x.clone()).unwrap();
        let (pre_t, enc_b) = model.pre_quantize_top(&be, &xt).unwrap();
        let (_, quant_t) = model.quantize_top(&be, &pre_t).unwrap();
        let pre_b = model.pre_quantize_bottom(&be, &quant_t, &enc_b).unwrap();
        for (level, pre) in [("t", &pre_t), ("b", &pre_b)] {
            let embed = before.by_name(&format!("quantize_{level}.embed")).unwrap();
            let m = min_code_margin(
                pre.shape(),
                &pre.to_vec().unwrap(),
                &embed.value,
                cfg.n_embed,
            );
            eprintln!("id_{level}: smallest best/second-best distance gap {m:e}");
        }
    }
    assert_eq!(out.id_t, ids(&f, "id_t"), "id_t");
    assert_eq!(out.id_b, ids(&f, "id_b"), "id_b");
    assert_eq!(out.id_t_shape, f.shape("id_t").unwrap());
    assert_eq!(out.id_b_shape, f.shape("id_b").unwrap());

    for (what, got) in [
        ("loss", out.loss),
        ("recon_loss", out.recon_loss),
        ("latent_loss", out.latent_loss),
    ] {
        let e = assert_close(what, &[got], &get(&f, what), 1e-4);
        eprintln!("{what}: {got} rel err {e:e}");
    }
    let e = assert_close("dec", &out.dec, &get(&f, "dec"), 1e-4);
    eprintln!("dec: rel err {e:e}");

    let mut worst_grad = (0f32, String::new());
    let mut worst_after = (0f32, String::new());
    for p in store.params() {
        if p.trainable {
            let e = assert_close(
                &format!("grad.{}", p.name),
                &p.grad,
                &get(&f, &format!("grad.{}", p.name)),
                1e-3,
            );
            if e > worst_grad.0 {
                worst_grad = (e, p.name.clone());
            }
        }
        let want = get(&f, &format!("after.{}", p.name));
        let e = assert_close(&format!("after.{}", p.name), &p.value, &want, 1e-3);
        if e > worst_after.0 {
            worst_after = (e, p.name.clone());
        }
    }
    assert_eq!(
        store.params().len(),
        f.names().iter().filter(|n| n.starts_with("after.")).count(),
        "every after.* tensor is in the store"
    );
    eprintln!(
        "worst grad: {:e} ({}); worst after: {:e} ({})",
        worst_grad.0, worst_grad.1, worst_after.0, worst_after.1
    );
}

#[test]
fn two_steps_from_the_same_state_give_the_same_bits() {
    let s = setup();
    let run = || {
        let mut store = s.store.clone();
        let mut opt = adam();
        store.register(&mut opt).unwrap();
        let out = vqvae2::train_step(
            &mut store,
            &mut opt,
            1e-4,
            &s.cfg,
            &s.shape,
            &s.x,
            &StepConfig::default(),
        )
        .unwrap();
        (store, out)
    };
    let (a, oa) = run();
    let (b, ob) = run();
    assert_eq!(oa.loss.to_bits(), ob.loss.to_bits());
    assert_eq!(oa.id_t, ob.id_t);
    assert_eq!(oa.id_b, ob.id_b);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&oa.dec), bits(&ob.dec));
    for (p, q) in a.params().iter().zip(b.params()) {
        assert_eq!(bits(&p.value), bits(&q.value), "{}: values", p.name);
        assert_eq!(bits(&p.grad), bits(&q.grad), "{}: gradients", p.name);
    }
}

/// Central differences of the loss for entries of the decoder side
/// (`dec.*`, `upsample_t.*`): the codes do not depend on them, so the loss is
/// differentiable there and its true gradient is the one computed. (Encoder
/// parameters cannot be checked this way: their straight-through gradient
/// is by design not the derivative of the loss, which is piecewise
/// constant in the codes.) The forward runs in f32: the rounding noise of
/// the loss (~1e-9 absolute) over 2h = 2e-3 is ~1e-6, far below the
/// gradients checked (1e-3 … 1e-1). The loss is quadratic in the last bias
/// (exact there) but only piecewise smooth in the others, where a step moves
/// some decoder pre-activations across the ReLU's kink: that error grows
/// like h (2.7% at h = 1e-2, ~0.7% at 1e-3; the loss is also rounded to f32,
/// ~1e-5 relative noise at h = 1e-3), hence h = 1e-3 and a
/// tolerance of 1e-2 relative plus 1e-6 absolute. The golden test is the
/// precise check; this one checks the backward independently of PyTorch.
#[test]
fn decoder_gradients_match_finite_differences() {
    let s = setup();
    let step = StepConfig::default();
    let mut store = s.store.clone();
    vqvae2::gradients(&mut store, &s.cfg, &s.shape, &s.x, &step).unwrap();
    // In each tensor, the entry with the largest |gradient|.
    for name in [
        "dec.blocks.6.bias",
        "dec.blocks.6.weight",
        "dec.blocks.4.bias",
        "dec.blocks.1.conv.3.weight",
        "dec.blocks.0.weight",
        "upsample_t.bias",
        "upsample_t.weight",
    ] {
        let id = store.id(name).unwrap();
        let grad = &store.get(id).grad;
        let i = (0..grad.len())
            .max_by(|&a, &b| grad[a].abs().total_cmp(&grad[b].abs()))
            .unwrap();
        let g = grad[i] as f64;
        let h = std::env::var("FD_H")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1e-3f32);
        // The perturbed values as stored (rounded to f32), and their loss.
        let at = |delta: f32| {
            let mut p = s.store.clone();
            let v = &mut p.get_mut(id).value[i];
            *v += delta;
            let v = *v as f64;
            let l = vqvae2::loss_only(&p, &s.cfg, &s.shape, &s.x, &step)
                .unwrap()
                .0 as f64;
            (v, l)
        };
        let ((vp, lp), (vm, lm)) = (at(h), at(-h));
        let fd = (lp - lm) / (vp - vm);
        let tol = 1e-2 * g.abs().max(fd.abs()) + 1e-6;
        eprintln!("{name}[{i}]: finite difference {fd:e}, backward {g:e}");
        assert!(
            (fd - g).abs() <= tol,
            "{name}[{i}]: finite difference {fd:e}, backward {g:e}"
        );
    }
}

#[test]
fn the_train_step_command_reproduces_the_golden() {
    let f = golden();
    let dir = tempfile::tempdir().unwrap();
    let (weights, batch) =
        common::train_step_inputs(&f, dir.path(), &[("before.", "")], &["input"]);
    let out = dir.path().join("out.safetensors");
    let st = common::train_step_command(&["--model", "vqvae2"], &weights, &batch, &out);
    assert!(
        st.status.success(),
        "train-step failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let o = TensorFile::open(&out).unwrap();
    for name in f.names() {
        if name.starts_with("after.") || name.starts_with("grad.") {
            assert_close(&name, &get(&o, &name), &get(&f, &name), 1e-3);
        }
    }
    for name in ["loss", "recon_loss", "latent_loss", "dec"] {
        assert_close(name, &get(&o, name), &get(&f, name), 1e-4);
    }
    for name in ["id_t", "id_b"] {
        assert_eq!(o.i64(name).unwrap(), f.i64(name).unwrap(), "{name}");
    }

    // Other models and devices: clear errors, no output.
    let out2 = dir.path().join("none.safetensors");
    for (args, msg) in [
        (vec!["--model", "cp2image"], "not a CP2Image network"),
        (vec!["--model", "unet"], "unknown model"),
        (vec!["--model", "vqvae2", "--precision", "bf16"], "f32 only"),
    ] {
        let st = common::train_step_command(&args, &weights, &batch, &out2);
        let err = String::from_utf8_lossy(&st.stderr);
        assert!(!st.status.success(), "{args:?} should fail");
        assert!(err.contains(msg), "{args:?}: {err}");
        assert!(!out2.exists());
    }
}

/// `train-step --device emulated` (the step on the CUDA kernels compiled
/// for the CPU) against the golden, with the tolerances of the CPU command
/// (the emulated step sums in another order than the CPU's; see
/// tests/train_vqvae2_device.rs for the library-level checks).
#[test]
fn the_train_step_command_on_the_emulated_device_reproduces_the_golden() {
    let f = golden();
    let dir = tempfile::tempdir().unwrap();
    let (weights, batch) =
        common::train_step_inputs(&f, dir.path(), &[("before.", "")], &["input"]);
    let out = dir.path().join("out.safetensors");
    let st = common::train_step_command(
        &["--model", "vqvae2", "--device", "emulated"],
        &weights,
        &batch,
        &out,
    );
    let said = String::from_utf8_lossy(&st.stderr);
    assert!(st.status.success(), "train-step failed: {said}");
    assert!(said.contains("emulated"), "the device is named: {said}");
    let o = TensorFile::open(&out).unwrap();
    let mut checked = 0;
    for name in f.names() {
        if name.starts_with("after.") || name.starts_with("grad.") {
            assert_close(&name, &get(&o, &name), &get(&f, &name), 1e-3);
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} tensors compared");
    for name in ["loss", "recon_loss", "latent_loss", "dec"] {
        assert_close(name, &get(&o, name), &get(&f, name), 1e-4);
    }
    for name in ["id_t", "id_b"] {
        assert_eq!(o.i64(name).unwrap(), f.i64(name).unwrap(), "{name}");
    }
}

// ---- `cellmorph vqvae2 init` / `vqvae2 train` on the real images of tests/data.

/// A sample list of the three real nucleus images in `tests/data`.
fn real_samples(dir: &Path) -> std::path::PathBuf {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let list = dir.join("samples.csv");
    let mut s = String::from("sample,image\n");
    for (name, path) in [
        ("bbbc007", "bbbc007/A9/A9_p5d.png"),
        ("fly", "examplefly/01_POS002_D.png"),
        ("dsb", "stardist_dsb2018/img2d.png"),
    ] {
        s.push_str(&format!("{name},{}\n", data.join(path).display()));
    }
    std::fs::write(&list, s).unwrap();
    list
}

fn cellmorph(args: &[&str], paths: &[(&str, &Path)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cellmorph"));
    c.args(args);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    c.output().unwrap()
}

fn ok(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err(out: std::process::Output, what: &str) -> String {
    assert!(!out.status.success(), "{what} should have failed");
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!e.contains("panicked"), "{what}: {e}");
    e
}

/// A small architecture (the paper's layout, narrower) on 32×32 patches,
/// so that a test run takes seconds.
const SMALL: &[&str] = &[
    "--channel",
    "16",
    "--n-res-channel",
    "8",
    "--embed-dim",
    "8",
    "--n-embed",
    "16",
    "--patch",
    "32",
];

fn small_init(dir: &Path, list: &Path) -> std::path::PathBuf {
    let w0 = dir.join("w0.safetensors");
    ok(
        cellmorph(
            &[&["vqvae2", "init"][..], SMALL].concat(),
            &[("--samples", list), ("--output", &w0)],
        ),
        "vqvae2 init",
    );
    w0
}

/// `vqvae2 train` with the small recipe; extra flags appended.
fn small_train(
    list: &Path,
    init: Option<&Path>,
    out: &Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "vqvae2",
        "train",
        "--patch",
        "32",
        "--batch-size",
        "4",
        "--steps-per-epoch",
        "5",
        "--eval-patches",
        "8",
        "--val-fraction",
        "0.34",
        "--lr",
        "2e-3",
    ];
    args.extend_from_slice(extra);
    let mut paths = vec![("--samples", list), ("--output", out)];
    if let Some(i) = init {
        paths.push(("--init", i));
    }
    cellmorph(&args, &paths)
}

fn metrics(path: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

fn column(rows: &[Vec<String>], name: &str) -> Vec<f64> {
    let i = rows[0].iter().position(|h| h == name).unwrap();
    rows[1..].iter().map(|r| r[i].parse().unwrap()).collect()
}

#[test]
fn vqvae2_train_lowers_the_reconstruction_error_on_real_images_and_writes_its_reports() {
    let dir = tempfile::tempdir().unwrap();
    let list = real_samples(dir.path());
    let w0 = small_init(dir.path(), &list);
    let meta = TensorFile::open(&w0).unwrap();
    let note = meta.metadata().unwrap()["cellmorph"].clone();
    assert!(
        note.contains("k-means++") && note.contains("3 images"),
        "{note}"
    );

    let out = dir.path().join("w.safetensors");
    let log = ok(
        small_train(&list, Some(&w0), &out, &["--steps", "40"]),
        "vqvae2 train",
    );
    assert!(log.contains("trained 40 steps"), "{log}");
    let rows = metrics(&dir.path().join("w.metrics.csv"));
    assert_eq!(
        rows.len(),
        1 + 8,
        "a header and one row per epoch of 5 steps"
    );
    let mse = column(&rows, "train_mse_8bit");
    let val = column(&rows, "val_mse_8bit");
    // The first epoch's decoder is still near its random start; 40 steps
    // at lr 2e-3 bring the error down by far more than the patch-to-patch
    // spread of the 8 fixed evaluation patches.
    assert!(
        mse[7] < 0.5 * mse[0] && val[7] < 0.5 * val[0],
        "train {mse:?}, val {val:?}"
    );
    for name in ["val_live_t", "val_live_b", "val_perplexity_b"] {
        assert!(column(&rows, name).iter().all(|&v| v >= 1.0), "{name}");
    }
    for png in ["w.curves.png", "w.reconstructions.png"] {
        let img = image::open(dir.path().join(png)).unwrap();
        assert!(img.width() > 100 && img.height() > 60, "{png}");
    }

    // The trained weights are a state_dict `profile` reads, and it does not
    // call them untrained (the init weights it does).
    let prof = dir.path().join("p.csv");
    let profile = |weights: &Path| {
        cellmorph(
            &["profile", "--patch", "32"],
            &[
                ("--samples", &list),
                ("--weights", weights),
                ("--output", &prof),
            ],
        )
    };
    let o = profile(&out);
    let said = String::from_utf8_lossy(&o.stderr).into_owned();
    ok(o, "profile on trained weights");
    assert!(!said.contains("UNTRAINED"), "{said}");
    let o = profile(&w0);
    let said = String::from_utf8_lossy(&o.stderr).into_owned();
    ok(o, "profile on init weights");
    assert!(said.contains("UNTRAINED"), "{said}");
    ok(profile(&out), "profile on trained weights");
    let t = std::fs::read_to_string(&prof).unwrap();
    assert_eq!(t.lines().count(), 4, "{t}");
}

#[test]
fn vqvae2_train_resumed_equals_unbroken_and_the_seed_decides_the_bits() {
    let dir = tempfile::tempdir().unwrap();
    let list = real_samples(dir.path());
    let w0 = small_init(dir.path(), &list);
    let path = |n: &str| dir.path().join(n);

    ok(
        small_train(&list, Some(&w0), &path("u.safetensors"), &["--steps", "12"]),
        "unbroken",
    );
    ok(
        small_train(
            &list,
            Some(&w0),
            &path("r.safetensors"),
            &["--steps", "7", "--checkpoint-every", "7"],
        ),
        "first part",
    );
    let ck = path("r.checkpoint.safetensors");
    ok(
        cellmorph(
            &[
                "vqvae2",
                "train",
                "--patch",
                "32",
                "--batch-size",
                "4",
                "--steps-per-epoch",
                "5",
                "--eval-patches",
                "8",
                "--val-fraction",
                "0.34",
                "--lr",
                "2e-3",
                "--steps",
                "12",
            ],
            &[
                ("--samples", &list),
                ("--output", &path("r.safetensors")),
                ("--resume", &ck),
            ],
        ),
        "resumed",
    );
    let bytes = |n: &str| std::fs::read(path(n)).unwrap();
    assert!(
        bytes("u.safetensors") == bytes("r.safetensors"),
        "resumed ≠ unbroken"
    );
    assert_eq!(
        std::fs::read_to_string(path("u.metrics.csv")).unwrap(),
        std::fs::read_to_string(path("r.metrics.csv")).unwrap()
    );

    ok(
        small_train(
            &list,
            Some(&w0),
            &path("s.safetensors"),
            &["--steps", "12", "--seed", "1"],
        ),
        "seed 1",
    );
    ok(
        small_train(
            &list,
            Some(&w0),
            &path("t.safetensors"),
            &["--steps", "12", "--seed", "1"],
        ),
        "seed 1 again",
    );
    assert!(
        bytes("s.safetensors") == bytes("t.safetensors"),
        "same seed, other bits"
    );
    assert!(
        bytes("s.safetensors") != bytes("u.safetensors"),
        "the seed changed nothing"
    );

    // A resume with other options is refused and names the checkpoint.
    let e = err(
        cellmorph(
            &[
                "vqvae2",
                "train",
                "--patch",
                "32",
                "--batch-size",
                "8",
                "--steps",
                "20",
            ],
            &[
                ("--samples", &list),
                ("--output", &path("x.safetensors")),
                ("--resume", &path("u.checkpoint.safetensors")),
            ],
        ),
        "resume with another batch size",
    );
    assert!(
        e.contains("u.checkpoint.safetensors") && e.contains("other options"),
        "{e}"
    );
}

#[test]
fn vqvae2_train_restarts_dead_codes() {
    let dir = tempfile::tempdir().unwrap();
    let list = real_samples(dir.path());
    let w0 = small_init(dir.path(), &list);
    // Push half of each codebook far from every encoder output: those codes
    // are never chosen unless restarted.
    let f = TensorFile::open(&w0).unwrap();
    let mut w = TensorWriter::new();
    for name in f.names() {
        let (shape, mut v) = f.f32(&name).unwrap();
        if name.ends_with(".embed") || name.ends_with(".embed_avg") {
            let k = shape[1];
            for (i, x) in v.iter_mut().enumerate() {
                if i % k >= k / 2 {
                    *x = 1e3;
                }
            }
        }
        w.add_slice(&name, &shape, &v).unwrap();
    }
    let far = dir.path().join("far.safetensors");
    w.write(&far).unwrap();

    let run = |out: &str, threshold: &str| {
        let o = dir.path().join(out);
        let log = ok(
            small_train(
                &list,
                Some(&far),
                &o,
                &["--steps", "10", "--dead-threshold", threshold],
            ),
            "train",
        );
        let rows = metrics(&dir.path().join(out.replace(".safetensors", ".metrics.csv")));
        let restarted: f64 = column(&rows, "restarted_b").iter().sum();
        let (shape, embed) = TensorFile::open(&o)
            .unwrap()
            .f32("quantize_b.embed")
            .unwrap();
        let k = shape[1];
        // The far codes' largest |value|.
        let far_max = embed
            .iter()
            .enumerate()
            .filter(|(i, _)| i % k >= k / 2)
            .fold(0f32, |m, (_, v)| m.max(v.abs()));
        (far_max, restarted, log)
    };
    let (stays, r0, _) = run("off.safetensors", "0");
    let (moved, r1, log) = run("on.safetensors", "1");
    assert_eq!(r0, 0.0);
    assert!(
        r1 >= 8.0,
        "the 8 far bottom codes are restarted: {r1}\n{log}"
    );
    // Unused codes keep their place under the EMA update (sum and count
    // decay alike); restarted ones sit on encoder outputs, which are O(1).
    assert!(
        stays > 900.0,
        "far codes stay far without restarts: {stays}"
    );
    assert!(
        moved < 100.0,
        "restarts bring far codes to the data: {moved}"
    );
}

#[test]
fn vqvae2_commands_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let list = real_samples(dir.path());
    let w0 = small_init(dir.path(), &list);
    let out = dir.path().join("w.safetensors");
    let e = err(
        small_train(&list, Some(&w0), &out, &["--precision", "bf16"]),
        "bf16",
    );
    assert!(e.contains("--precision") && e.contains("f32"), "{e}");
    let e = err(
        small_train(&list, Some(&w0), &out, &["--patch", "30"]),
        "patch 30",
    );
    assert!(e.contains("--patch"), "{e}");
    let e = err(small_train(&list, Some(&w0), &w0, &[]), "output = init");
    assert!(e.contains("--init"), "{e}");
    let e = err(
        small_train(&list, Some(&w0), &out, &["--val-fraction", "0.9"]),
        "no training image",
    );
    assert!(e.contains("--val-fraction"), "{e}");

    // Weights without the decoder (`upsample_t`, `dec`; `dec_t` feeds the
    // bottom codes and stays): profiling works, training says what is
    // missing.
    let f = TensorFile::open(&w0).unwrap();
    let mut w = TensorWriter::new();
    for name in f.names() {
        if !(name.starts_with("dec.") || name.starts_with("upsample_t.")) {
            let (shape, v) = f.f32(&name).unwrap();
            w.add_slice(&name, &shape, &v).unwrap();
        }
    }
    let enc = dir.path().join("enc.safetensors");
    w.write(&enc).unwrap();
    let e = err(small_train(&list, Some(&enc), &out, &[]), "no decoder");
    assert!(
        e.contains("decoder") && e.contains("enc.safetensors"),
        "{e}"
    );
    ok(
        cellmorph(
            &["profile", "--patch", "32"],
            &[
                ("--samples", &list),
                ("--weights", &enc),
                ("--output", &dir.path().join("p.csv")),
            ],
        ),
        "profile without a decoder",
    );
    let e = err(
        cellmorph(
            &["profile", "--patch", "32", "--mse"],
            &[
                ("--samples", &list),
                ("--weights", &enc),
                ("--output", &dir.path().join("q.csv")),
            ],
        ),
        "profile --mse without a decoder",
    );
    assert!(e.contains("decoder"), "{e}");

    // Images too small for a patch are named.
    let tiny = dir.path().join("tiny.png");
    image::GrayImage::new(8, 8).save(&tiny).unwrap();
    let small_list = dir.path().join("tiny.csv");
    std::fs::write(&small_list, format!("sample,image\na,{}\n", tiny.display())).unwrap();
    let e = err(
        cellmorph(
            &[&["vqvae2", "init"][..], SMALL].concat(),
            &[
                ("--samples", &small_list),
                ("--output", &dir.path().join("t.safetensors")),
            ],
        ),
        "init on a tiny image",
    );
    assert!(e.contains("tiny.png") && e.contains("patch"), "{e}");
}

/// `vqvae2 train --device emulated`: a short run works, writes weights and
/// metrics, is reproducible, and a run resumed from its checkpoint equals an
/// unbroken one bit for bit (as on the CPU).
#[test]
fn vqvae2_train_on_the_emulated_device_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let list = real_samples(dir.path());
    let w0 = small_init(dir.path(), &list);
    let path = |n: &str| dir.path().join(n);
    let emu = |out: &str, init: Option<&Path>, extra: &[&str]| {
        let args = [&["--device", "emulated"][..], extra].concat();
        ok(small_train(&list, init, &path(out), &args), out)
    };
    let log = emu("u.safetensors", Some(&w0), &["--steps", "3"]);
    assert!(log.contains("trained 3 steps"), "{log}");
    emu(
        "r.safetensors",
        Some(&w0),
        &["--steps", "2", "--checkpoint-every", "2"],
    );
    let ck = path("r.checkpoint.safetensors");
    emu(
        "r.safetensors",
        None,
        &["--steps", "3", "--resume", ck.to_str().unwrap()],
    );
    let bytes = |n: &str| std::fs::read(path(n)).unwrap();
    assert!(
        bytes("u.safetensors") == bytes("r.safetensors"),
        "resumed ≠ unbroken"
    );
    let rows = metrics(&path("u.metrics.csv"));
    assert_eq!(rows.len(), 2, "a header and the (partial) epoch's row");
    assert_eq!(
        std::fs::read_to_string(path("u.metrics.csv")).unwrap(),
        std::fs::read_to_string(path("r.metrics.csv")).unwrap()
    );
    let mse = column(&rows, "train_mse_8bit");
    assert!(mse[0].is_finite() && mse[0] > 0.0, "{mse:?}");
    // The weights are a VQ-VAE-2 state_dict that moved from the start.
    let trained = TensorFile::open(path("u.safetensors")).unwrap();
    let start = TensorFile::open(&w0).unwrap();
    let name = "dec.blocks.0.weight";
    assert_ne!(
        trained.f32(name).unwrap(),
        start.f32(name).unwrap(),
        "{name}"
    );
}
