//! The CP2Image GAN training step on the kernel devices
//! (`cellmorph::train::cp2image::train_step_on`, `train-step --model
//! cp2image --device`, `cp2image train --device`) against the PyTorch
//! golden `tests/fixtures/cp2image_train_step.safetensors` and against the
//! CPU reference path.
//!
//! Tolerances: the golden's, as `tests/train.rs` checks the CPU step (1e-3
//! of each tensor's largest magnitude; 1e-4 for the losses; the conv biases
//! in front of BatchNorm, whose exact gradient is zero, checked for being
//! noise and for an Adam step of at most 2·lr; running means within
//! 0.1 × 2·lr more, as those biases feed them). Emulated against CPU: the
//! same rules with 1e-4 (the kernels sum in other orders than the CPU
//! reference, in f32, and Adam turns gradient rounding into update
//! differences). Two emulated runs: the same bits (no atomics).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use cellmorph::io::{TensorFile, TensorWriter};
use cellmorph::train::cp2image::{train_step_on, Batch, NetState};
use cellmorph::train::{AdamConfig, Method, Optimizer};
use cellmorph::Backend;

/// The golden's learning rate.
const LR: f32 = 2e-4;

fn golden() -> TensorFile {
    TensorFile::open(common::fixture_path("cp2image_train_step.safetensors")).unwrap()
}

fn get(f: &TensorFile, name: &str) -> Vec<f32> {
    f.f32(name).unwrap_or_else(|e| panic!("{name}: {e}")).1
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// One step on `be` from the golden's `before` state and batch, written
/// under `train-step`'s output names (`G.after.*`, `G.grad.*`, …, `loss_g`,
/// `loss_d`).
fn step_on(be: &Backend, f: &TensorFile) -> TensorFile {
    let mut g = NetState::from_file(f, "G.before.").unwrap();
    let mut d = NetState::from_file(f, "D.before.").unwrap();
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
    let (z, x_real) = (get(f, "z"), get(f, "x_real"));
    let batch = Batch {
        z: &z,
        x: &x,
        x_real: &x_real,
        shape: shape.try_into().unwrap(),
    };
    let l = train_step_on(be, &mut g, &mut d, &mut og, &mut od, f64::from(LR), &batch).unwrap();
    let mut w = TensorWriter::new();
    g.write_values(&mut w, "G.after.").unwrap();
    d.write_values(&mut w, "D.after.").unwrap();
    g.write_grads(&mut w, "G.grad.").unwrap();
    d.write_grads(&mut w, "D.grad.").unwrap();
    w.add_slice("loss_g", &[1], &[l.loss_g]).unwrap();
    w.add_slice("loss_d", &[1], &[l.loss_d]).unwrap();
    TensorFile::from_bytes("step", w.to_bytes().unwrap()).unwrap()
}

/// Checks every `{G,D}.{after,grad}.*` tensor and the losses of `got`
/// against `want` (see the module documentation), `rel` the tolerance
/// relative to each tensor's largest magnitude; returns the number of
/// tensors compared.
fn check_step(got: &TensorFile, want: &TensorFile, rel: f32) -> usize {
    for name in ["loss_g", "loss_d"] {
        let (a, b) = (get(got, name), get(want, name));
        let err = max_diff(&a, &b);
        assert!(err <= 1e-4 * max_abs(&b), "{name}: {a:?} vs {b:?}");
    }
    let mut worst: Vec<(f32, String)> = Vec::new();
    let mut compared = 0;
    for name in want.names() {
        let Some((net, kind, key)) = ["G.after.", "G.grad.", "D.after.", "D.grad."]
            .iter()
            .find_map(|p| {
                name.strip_prefix(p)
                    .map(|k| (&p[..1], &p[2..p.len() - 1], k))
            })
        else {
            continue;
        };
        compared += 1;
        if key.ends_with("num_batches_tracked") {
            assert_eq!(got.i64(&name).unwrap(), want.i64(&name).unwrap(), "{name}");
            continue;
        }
        let (a, b) = (get(got, &name), get(want, &name));
        let err = max_diff(&a, &b);
        if key.starts_with("blocks.") && key.contains(".conv.bias") {
            // A conv bias followed by BatchNorm: its exact gradient is zero.
            if kind == "grad" {
                let wname = name.replace(
                    ".bias",
                    if net == "D" {
                        ".weight_orig"
                    } else {
                        ".weight"
                    },
                );
                let wmax = max_abs(&get(got, &wname));
                let gmax = max_abs(&a).max(max_abs(&b));
                assert!(
                    gmax <= 1e-4 * wmax,
                    "{name}: |grad| {gmax} vs weight grads {wmax}"
                );
            } else {
                assert!(err <= 2.0 * LR + 1e-6, "{name}: {err}");
            }
        } else if key.ends_with(".bn.running_mean") {
            assert!(err <= rel * max_abs(&b) + 0.1 * 2.0 * LR, "{name}: {err}");
        } else {
            worst.push((err / max_abs(&b).max(1e-30), name.clone()));
        }
    }
    assert!(compared > 0, "no step tensors in the reference");
    let got_count = got
        .names()
        .iter()
        .filter(|n| {
            ["G.after.", "G.grad.", "D.after.", "D.grad."]
                .iter()
                .any(|p| n.starts_with(p))
        })
        .count();
    assert_eq!(
        got_count, compared,
        "the step writes the reference's tensors"
    );
    worst.sort_by(|a, b| b.0.total_cmp(&a.0));
    assert!(
        worst[0].0 <= rel,
        "largest relative errors: {:?}",
        &worst[..worst.len().min(8)]
    );
    compared
}

/// Every tensor of `a` and `b`, bit for bit.
fn bits(f: &TensorFile) -> BTreeMap<String, Vec<u32>> {
    f.names()
        .into_iter()
        .filter(|n| !n.ends_with("num_batches_tracked"))
        .map(|n| {
            let v = get(f, &n).iter().map(|x| x.to_bits()).collect();
            (n, v)
        })
        .collect()
}

/// Splits the golden into `train-step`'s weights and batch files in `dir`.
fn golden_inputs(f: &TensorFile, dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    common::train_step_inputs(
        f,
        dir,
        &[("G.before.", "G."), ("D.before.", "D.")],
        &["z", "x", "x_real"],
    )
}

/// `cellmorph train-step --model cp2image --device emulated` on the
/// golden's state and batch reproduces PyTorch's step.
#[test]
fn the_emulated_train_step_command_matches_pytorch() {
    let f = golden();
    let dir = tempfile::tempdir().unwrap();
    let (weights, batch) = golden_inputs(&f, dir.path());
    let out = dir.path().join("out.safetensors");
    let st = common::train_step_command(
        &[
            "--model",
            "cp2image",
            "--device",
            "emulated",
            "--lr",
            "2e-4",
            "--betas",
            "0.5,0.999",
        ],
        &weights,
        &batch,
        &out,
    );
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(st.status.success(), "{err}");
    assert!(err.contains("emulated"), "names the device: {err}");
    let n = check_step(&TensorFile::open(&out).unwrap(), &f, 1e-3);
    assert!(n > 50, "{n} tensors compared");
}

/// The emulated step against the CPU reference path, and twice on the
/// emulated device: the same bits.
#[test]
fn the_emulated_step_matches_the_cpu_and_repeats_bit_for_bit() {
    let f = golden();
    let cpu = step_on(&Backend::cpu(), &f);
    let be = common::emulated();
    let (e1, e2) = (step_on(&be, &f), step_on(&be, &f));
    assert_eq!(bits(&e1), bits(&e2), "two emulated steps differ");
    check_step(&e1, &cpu, 1e-4);
    // The CPU path itself is deterministic too (and the library's CPU
    // wrapper is the same path).
    assert_eq!(bits(&cpu), bits(&step_on(&Backend::cpu(), &f)));
}

/// A reduced precision is refused (training runs in f32).
#[test]
fn a_reduced_precision_step_is_refused() {
    let f = golden();
    let be = Backend::cpu().with_precision(cellmorph::Precision::Bf16);
    let mut g = NetState::from_file(&f, "G.before.").unwrap();
    let mut d = NetState::from_file(&f, "D.before.").unwrap();
    let mut og = Optimizer::new(Method::Adam(AdamConfig::default())).unwrap();
    let mut od = Optimizer::new(Method::Adam(AdamConfig::default())).unwrap();
    g.params.register(&mut og).unwrap();
    d.params.register(&mut od).unwrap();
    let (shape, x) = f.f32("x").unwrap();
    let z = get(&f, "z");
    let batch = Batch {
        z: &z,
        x: &x,
        x_real: &x,
        shape: shape.try_into().unwrap(),
    };
    let e = train_step_on(&be, &mut g, &mut d, &mut og, &mut od, 1e-4, &batch).unwrap_err();
    assert!(e.to_string().contains("f32"), "{e}");
}

/// `cellmorph cp2image train` on 24 of the real cells of
/// tests/data/single_cells with narrow networks, one epoch.
fn tiny_train(dir: &Path, out: &str, device: &str) -> String {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/single_cells");
    let features = dir.join("features24.csv");
    if !features.exists() {
        let text = std::fs::read_to_string(data.join("features.csv")).unwrap();
        let head: Vec<&str> = text.lines().take(25).collect();
        std::fs::write(&features, head.join("\n") + "\n").unwrap();
    }
    let o = Command::new(env!("CARGO_BIN_EXE_cellmorph"))
        .args(["cp2image", "train", "--batch-size", "8", "--epochs", "1"])
        .args(["--val-fraction", "0.25", "--device", device])
        .args(["--generator-channels", "32,16,8,8,8"])
        .args(["--discriminator-channels", "8,8,16,16,16"])
        .arg("--features")
        .arg(&features)
        .arg("--crops")
        .arg(data.join("cells.safetensors"))
        .arg("--output")
        .arg(dir.join(out))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{device}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read_to_string(dir.join(out.replace(".safetensors", ".metrics.csv"))).unwrap()
}

/// A one-epoch `cp2image train --device emulated` run works and logs the
/// CPU run's losses and held-out MSE (within 1e-3 relative: a few steps of
/// the tolerance above compounded).
#[test]
fn a_tiny_emulated_cp2image_train_run_matches_the_cpu_run() {
    let dir = tempfile::tempdir().unwrap();
    let emu = tiny_train(dir.path(), "e.safetensors", "emulated");
    let cpu = tiny_train(dir.path(), "c.safetensors", "cpu");
    let row = |csv: &str| -> Vec<f64> {
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 2, "one epoch row: {csv}");
        lines[1].split(',').map(|v| v.parse().unwrap()).collect()
    };
    let (e, c) = (row(&emu), row(&cpu));
    assert_eq!(e[0], 1.0);
    for (i, (a, b)) in e.iter().zip(&c).enumerate().skip(1) {
        assert!(a.is_finite(), "column {i}: {a}");
        assert!((a - b).abs() <= 1e-3 * b.abs(), "column {i}: {a} vs {b}");
    }
    for f in [
        "e.safetensors",
        "e.discriminator.safetensors",
        "e.checkpoint.safetensors",
    ] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
}

/// The step on CUDA device 0 against the golden. Ignored without a GPU
/// (`scripts/gpu-check.sh` runs it); forced to run without one, it fails.
#[test]
#[ignore = "needs a CUDA device"]
fn the_cuda_step_matches_pytorch() {
    let f = golden();
    let be = common::cuda();
    let got = step_on(&be, &f);
    check_step(&got, &f, 1e-3);
    assert_eq!(bits(&got), bits(&step_on(&be, &f)), "two CUDA steps differ");
}
