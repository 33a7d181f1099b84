//! One DenseNet training step against PyTorch's golden
//! (`tests/fixtures/densenet_train_step.safetensors`: growth 8, blocks
//! [2, 2], 16 initial features, bn_size 2, two classes; train-mode BN,
//! cross-entropy, Adam lr 1e-3).
//!
//! Tolerances: logits and loss within 1e-4 relative; each gradient within
//! 1e-3 of its tensor's largest |reference| value (the backward sums in a
//! different order than PyTorch's, and batch-norm backward through batch
//! statistics amplifies the f32 rounding a little); every tensor after the
//! step within 1e-3 of its largest |reference| value (Adam's first step
//! moves each parameter by about lr·sign(g), so a tiny gradient whose sign
//! differs may move a parameter by up to 2e-3 in absolute terms — the check
//! is relative to the tensor's scale, which is ≥ 1 for BN weights and ~0.1
//! or more for convs); `num_batches_tracked` exactly.

mod common;

use cellmorph::io::TensorFile;
use cellmorph::train::densenet::{
    train_step, train_step_on, Batch, DenseNetState, DenseNetTrainer, StepOutput, StepSettings,
    TrainStep,
};
use cellmorph::train::store::Param;
use cellmorph::train::AdamConfig;
use cellmorph::{Backend, Device};

const LR: f64 = 1e-3;

struct Golden {
    file: TensorFile,
    input: Vec<f32>,
    shape: [usize; 4],
    labels: Vec<usize>,
}

fn golden() -> Golden {
    let file = TensorFile::open(common::fixture_path("densenet_train_step.safetensors"))
        .expect("densenet_train_step fixture");
    let (shape, input) = file.f32("input").expect("input");
    let shape: [usize; 4] = shape.try_into().expect("input is 4-D");
    let labels = file
        .i64("labels")
        .expect("labels")
        .1
        .iter()
        .map(|&v| usize::try_from(v).expect("non-negative label"))
        .collect();
    Golden {
        file,
        input,
        shape,
        labels,
    }
}

impl Golden {
    fn batch(&self) -> Batch<'_> {
        Batch {
            input: &self.input,
            shape: self.shape,
            labels: &self.labels,
        }
    }

    fn get(&self, name: &str) -> Vec<f32> {
        self.file
            .f32(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .1
    }
}

/// max |got − want| / max |want|, the scale floored at `floor` (and 1e-30).
fn rel_err(what: &str, got: &[f32], want: &[f32], floor: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(floor)
        .max(1e-30);
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    err / scale
}

#[test]
fn one_step_matches_pytorch() {
    let g = golden();
    let step = train_step(&g.file, "before.", &g.batch(), AdamConfig::default(), LR).unwrap();
    check_golden(&g, &step);
}

/// The step `step` against the golden `g`, within the tolerances of the
/// module header (every device's step is held to the same bounds).
fn check_golden(g: &Golden, step: &TrainStep) {
    let e = rel_err("logits", &step.output.logits, &g.get("logits"), 0.0);
    println!("logits: max rel err {e:e}");
    assert!(e <= 1e-4, "logits: {e:e}");
    let want_loss = g.get("loss")[0];
    let e = (step.output.loss - want_loss).abs() / want_loss.abs();
    println!("loss {} vs {want_loss}: rel err {e:e}", step.output.loss);
    assert!(e <= 1e-4, "loss: {e:e}");

    let params = &step.after.params;
    let mut worst_grad = (0f32, String::new());
    let mut n_grads = 0;
    let mut bad = Vec::new();
    // The gradient of norm0.weight is zero in exact arithmetic: norm0's
    // output reaches the loss only through ReLU and max pool (positively
    // homogeneous, and β = 0 at init) and then training-mode BNs, which are
    // invariant to scaling a channel. PyTorch's golden holds rounding noise
    // (~1e-7, against gradients of ~1e-2 elsewhere), so each tensor's scale
    // is floored at 1e-3 of the largest reference gradient of the step.
    let grad_floor = 1e-3
        * g.file
            .names()
            .iter()
            .filter(|n| n.starts_with("grad."))
            .flat_map(|n| g.get(n))
            .fold(0f32, |m, v| m.max(v.abs()));
    for name in g.file.names() {
        let Some(key) = name.strip_prefix("grad.") else {
            continue;
        };
        let p = params
            .by_name(key)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(p.trainable, "{key} should be trainable");
        let want = g.get(&name);
        let e = rel_err(&name, &p.grad, &want, grad_floor);
        println!("{name}: {e:e}");
        if e > 1e-3 {
            bad.push(format!("{name}: max |Δ| / max |ref| = {e:e}"));
        }
        if e >= worst_grad.0 {
            worst_grad = (e, name.clone());
        }
        n_grads += 1;
    }
    assert!(bad.is_empty(), "gradients off:\n{}", bad.join("\n"));
    let trainable = params.params().iter().filter(|p| p.trainable).count();
    assert_eq!(n_grads, trainable, "every trainable parameter has a golden");
    println!("grads: worst {} at {}", worst_grad.0, worst_grad.1);

    let mut worst_after = (0f32, String::new());
    let mut n_after = 0;
    for name in g.file.names() {
        let Some(key) = name.strip_prefix("after.") else {
            continue;
        };
        n_after += 1;
        if key.ends_with(".num_batches_tracked") {
            let want = g.file.i64(&name).unwrap().1[0];
            assert_eq!(
                step.after.num_batches_tracked.get(key),
                Some(&want),
                "{name}"
            );
            continue;
        }
        let p = params
            .by_name(key)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        // Elements whose reference gradient is at rounding-noise level
        // (below the floor above: all of norm0.weight, some of norm0.bias):
        // Adam's first step is lr·g/(|g| + ε), any value in [−lr, lr] for
        // such a g, so ours and PyTorch's may differ by up to 2·lr. Each is
        // still checked to be one bounded Adam step from the state before;
        // the other elements are compared as below.
        let mut value = p.value.clone();
        if g.file.names().contains(&format!("grad.{key}")) {
            let grad = g.get(&format!("grad.{key}"));
            let before = g.get(&format!("before.{key}"));
            let want = g.get(&name);
            let lr = LR as f32 * 1.001;
            for (i, v) in value.iter_mut().enumerate() {
                if grad[i].abs() < grad_floor {
                    assert!(
                        (*v - before[i]).abs() <= lr,
                        "{name}[{i}]: moved more than lr"
                    );
                    assert!((*v - want[i]).abs() <= 2.0 * lr, "{name}[{i}]");
                    *v = want[i];
                }
            }
        }
        let e = rel_err(&name, &value, &g.get(&name), 0.0);
        assert!(e <= 1e-3, "{name}: max |Δ| / max |ref| = {e:e}");
        if e >= worst_after.0 {
            worst_after = (e, name.clone());
        }
    }
    assert_eq!(
        n_after,
        params.params().len() + step.after.num_batches_tracked.len()
    );
    println!("after: worst {} at {}", worst_after.0, worst_after.1);
}

#[test]
fn written_state_keeps_names_and_dtypes() {
    let g = golden();
    let step = train_step(&g.file, "before.", &g.batch(), AdamConfig::default(), LR).unwrap();
    let mut w = cellmorph::io::TensorWriter::new();
    step.after.write_values(&mut w, "after.").unwrap();
    step.after.write_grads(&mut w, "grad.").unwrap();
    let back = TensorFile::from_bytes("written", w.to_bytes().unwrap()).unwrap();
    for name in g.file.names() {
        if name.starts_with("after.") || name.starts_with("grad.") {
            assert_eq!(back.shape(&name), g.file.shape(&name), "{name}: shape");
            assert_eq!(back.dtype(&name), g.file.dtype(&name), "{name}: dtype");
        }
    }
    // The written state reads back as the same state.
    let again = DenseNetState::from_file(&back, "after.").unwrap();
    assert_eq!(again.num_batches_tracked, step.after.num_batches_tracked);
    for p in step.after.params.params() {
        assert_eq!(again.params.by_name(&p.name).unwrap().value, p.value);
    }
}

#[test]
fn two_steps_from_one_state_are_bit_identical() {
    let g = golden();
    let a = train_step(&g.file, "before.", &g.batch(), AdamConfig::default(), LR).unwrap();
    let b = train_step(&g.file, "before.", &g.batch(), AdamConfig::default(), LR).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.output.logits), bits(&b.output.logits));
    assert_eq!(a.output.loss.to_bits(), b.output.loss.to_bits());
    for (p, q) in a.after.params.params().iter().zip(b.after.params.params()) {
        assert_eq!(bits(&p.value), bits(&q.value), "{}: value", p.name);
        assert_eq!(bits(&p.grad), bits(&q.grad), "{}: grad", p.name);
    }
    assert_eq!(a.after.num_batches_tracked, b.after.num_batches_tracked);
}

/// Central differences of the training-mode loss (batch statistics, so the
/// BN's dependence on every input is in the loss) against the analytic
/// gradient, at the largest-gradient entry of a few tensors spread over the
/// network. The loss is an f32 (~0.67, ulp 6e-8), so with h = 1e-3 each
/// difference carries ~3e-5 of rounding noise; on top come the O(h²)
/// curvature of batch norm and ReLU / max-pool switches crossed within ±h.
/// Observed deviations are at most ~1 % (conv0, the deepest); the bound
/// 2 % + 1e-4 absolute allows for that and still catches a wrong or missing
/// term (those are off by tens of percent or more).
#[test]
fn gradients_match_finite_differences() {
    let g = golden();
    let state = DenseNetState::from_file(&g.file, "before.").unwrap();
    let mut t = DenseNetTrainer::new(state, AdamConfig::default()).unwrap();
    let batch = g.batch();
    t.forward_backward(&batch).unwrap();
    let names = [
        "classifier.weight",
        "features.norm5.weight",
        "features.transition1.conv.weight",
        "features.denseblock1.denselayer1.conv2.weight",
        "features.denseblock1.denselayer2.norm1.bias",
        "features.conv0.weight",
    ];
    let h = 1e-3f32;
    for name in names {
        let p = t.state().params.by_name(name).unwrap().clone();
        let (i, &grad) = p
            .grad
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        let v = p.value[i];
        t.set_value(name, i, v + h).unwrap();
        let up = t.loss(&batch).unwrap();
        t.set_value(name, i, v - h).unwrap();
        let down = t.loss(&batch).unwrap();
        t.set_value(name, i, v).unwrap();
        let fd = (up as f64 - down as f64) / (2.0 * h as f64);
        let err = (fd - grad as f64).abs();
        println!("{name}[{i}]: analytic {grad:e}, finite difference {fd:e}");
        assert!(
            err <= 2e-2 * (grad as f64).abs() + 1e-4,
            "{name}[{i}]: analytic {grad:e} vs finite difference {fd:e}"
        );
    }
}

/// `cellmorph train-step --model densenet` on the golden split into a
/// weights file and a batch file writes what the library's step computes,
/// bit for bit (the library's step is checked against PyTorch above).
#[test]
fn the_train_step_command_writes_the_library_step() {
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    let (weights, batch) = command_inputs(&g, dir.path());
    let out = dir.path().join("out.safetensors");
    let st = common::train_step_command(
        &["--model", "densenet", "--lr", "1e-3"],
        &weights,
        &batch,
        &out,
    );
    assert!(
        st.status.success(),
        "train-step failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let o = TensorFile::open(&out).unwrap();
    let step = train_step(&g.file, "before.", &g.batch(), AdamConfig::default(), LR).unwrap();
    for p in step.after.params.params() {
        assert_eq!(
            o.f32(&format!("after.{}", p.name)).unwrap().1,
            p.value,
            "after.{}",
            p.name
        );
        if p.trainable {
            assert_eq!(
                o.f32(&format!("grad.{}", p.name)).unwrap().1,
                p.grad,
                "grad.{}",
                p.name
            );
        }
    }
    for (k, v) in &step.after.num_batches_tracked {
        assert_eq!(o.i64(&format!("after.{k}")).unwrap().1, vec![*v], "{k}");
    }
    assert_eq!(o.f32("logits").unwrap().1, step.output.logits);
    assert_eq!(o.f32("loss").unwrap().1, vec![step.output.loss]);
    // The output may not replace an input.
    let st = common::train_step_command(&["--model", "densenet"], &weights, &batch, &batch);
    assert!(!st.status.success());
    assert!(String::from_utf8_lossy(&st.stderr).contains("would destroy the input"));
}

// ---------------------------------------------------------------------------
// The step on the other devices (kernels through `crate::ops`).

/// Writes the golden's `before.` state and its batch as the two input files
/// of `train-step`.
fn command_inputs(g: &Golden, dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    common::train_step_inputs(&g.file, dir, &[("before.", "")], &["input", "labels"])
}

/// `cellmorph train-step --model densenet --device DEVICE` on the golden,
/// read back as a step (state after, gradients, logits, loss).
fn command_step(g: &Golden, device: &str) -> TrainStep {
    let dir = tempfile::tempdir().unwrap();
    let (weights, batch) = command_inputs(g, dir.path());
    let out = dir.path().join("out.safetensors");
    let st = common::train_step_command(
        &["--model", "densenet", "--lr", "1e-3", "--device", device],
        &weights,
        &batch,
        &out,
    );
    assert!(
        st.status.success(),
        "train-step --device {device} failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let o = TensorFile::open(&out).unwrap();
    let mut after = DenseNetState::from_file(&o, "after.").unwrap();
    for id in 0..after.params.params().len() {
        let p = after.params.get_mut(id);
        if p.trainable {
            p.grad = o.f32(&format!("grad.{}", p.name)).unwrap().1;
        }
    }
    TrainStep {
        after,
        output: StepOutput {
            logits: o.f32("logits").unwrap().1,
            loss: o.f32("loss").unwrap().1[0],
        },
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Two devices' gradients of one tensor: within 1e-5 of the tensor's
/// largest |reference| value (observed: at most 2.4e-6). `norm0.weight`'s
/// exact gradient is 0 (see [`check_golden`]): both devices' rounding noise
/// there must stay below 1e-4 of `step_scale`, the step's largest gradient.
fn check_grad(what: &str, reference: &Param, got: &Param, step_scale: f32) {
    if reference.name == "features.norm0.weight" {
        for g in [&reference.grad, &got.grad] {
            let m = g.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(m <= 1e-4 * step_scale, "{what}norm0.weight: {m:e}");
        }
        return;
    }
    let e = rel_err(&reference.name, &got.grad, &reference.grad, 1e-30);
    assert!(e <= 1e-5, "{what}grad {}: {e:e}", reference.name);
}

/// The states after two devices' steps: each element within 1e-3 of its
/// tensor's largest |reference| value, except where the reference gradient
/// is below `grad_floor` (rounding noise: Adam's first step then moves the
/// parameter by anything in [−lr, lr]), where within 2·lr.
fn check_after(what: &str, reference: &Param, got: &Param, grad_floor: f32) {
    let scale = reference.value.iter().fold(0f32, |m, v| m.max(v.abs()));
    let lr = LR as f32 * 1.001;
    for (i, (&a, &b)) in reference.value.iter().zip(&got.value).enumerate() {
        let noise = reference.grad.get(i).is_some_and(|g| g.abs() < grad_floor);
        let bound = if noise { 2.0 * lr } else { 1e-3 * scale };
        assert!(
            (a - b).abs() <= bound,
            "{what} {}[{i}]: {b} vs {a} (bound {bound:e})",
            reference.name
        );
    }
}

/// `train-step --device emulated` reproduces PyTorch's golden within the
/// CPU step's tolerances.
#[test]
fn emulated_step_matches_pytorch() {
    let g = golden();
    check_golden(&g, &command_step(&g, "emulated"));
}

/// The emulated step against the CPU step, and against itself. The kernels
/// sum in other orders than the CPU reference (implicit-GEMM convolutions,
/// chunked weight-gradient and BatchNorm sums), so values differ by
/// rounding: logits and loss within 1e-4 relative, gradients as
/// [`check_grad`] (the golden bound is 1e-3), and
/// the state after as [`check_after`] (Adam's first step is lr·g/(|g| + ε):
/// a gradient at rounding-noise level, as norm0's, may move its parameter
/// anywhere in [−lr, lr] on either device). Two emulated steps are
/// the same bits (no atomics, fixed reduction orders).
#[test]
fn emulated_step_matches_the_cpu_step_and_repeats_bit_for_bit() {
    let g = golden();
    let be = Backend::new(Device::Emulated).unwrap();
    let step = |be: &Backend| {
        train_step_on(
            be,
            &g.file,
            "before.",
            &g.batch(),
            AdamConfig::default(),
            LR,
        )
        .unwrap()
    };
    let (cpu, emu, again) = (step(&Backend::cpu()), step(&be), step(&be));
    let e = rel_err("logits", &emu.output.logits, &cpu.output.logits, 0.0);
    assert!(e <= 1e-4, "logits: {e:e}");
    let e = (emu.output.loss - cpu.output.loss).abs() / cpu.output.loss.abs();
    assert!(e <= 1e-4, "loss: {e:e}");
    let grad_scale = cpu
        .after
        .params
        .params()
        .iter()
        .flat_map(|p| p.grad.iter())
        .fold(0f32, |m, v| m.max(v.abs()));
    for (p, q) in cpu
        .after
        .params
        .params()
        .iter()
        .zip(emu.after.params.params())
    {
        assert_eq!(p.name, q.name);
        check_grad("", p, q, grad_scale);
        check_after("after", p, q, 1e-3 * grad_scale);
    }
    assert_eq!(cpu.after.num_batches_tracked, emu.after.num_batches_tracked);
    assert_eq!(bits(&emu.output.logits), bits(&again.output.logits));
    assert_eq!(emu.output.loss.to_bits(), again.output.loss.to_bits());
    for (p, q) in emu
        .after
        .params
        .params()
        .iter()
        .zip(again.after.params.params())
    {
        assert_eq!(bits(&p.value), bits(&q.value), "{}: value", p.name);
        assert_eq!(bits(&p.grad), bits(&q.grad), "{}: grad", p.name);
    }
}

/// The settings `screen train` uses (stage 2 from the last block with
/// class weights and head dropout; every layer with class weights) and the
/// eval-mode pass, emulated against the CPU within the bounds above.
#[test]
fn emulated_stage2_settings_and_eval_match_the_cpu() {
    let g = golden();
    let be = Backend::new(Device::Emulated).unwrap();
    let state = DenseNetState::from_file(&g.file, "before.").unwrap();
    let cpu_trainer = DenseNetTrainer::new(state, AdamConfig::default()).unwrap();
    let [n, _, h, w] = g.shape;
    let nb = cpu_trainer.blocks();
    let weights = [0.7f32, 1.6];
    // The last block's input, eval mode, on both devices.
    let (x_cpu, shape) = cpu_trainer
        .eval_forward(&g.input, g.shape, 0, nb - 1)
        .unwrap();
    let (x_emu, shape_emu) = cpu_trainer
        .eval_forward_on(&be, &g.input, g.shape, 0, nb - 1)
        .unwrap();
    assert_eq!(shape, shape_emu);
    assert_eq!(
        shape,
        cpu_trainer.block_input_shape(n, h, w, nb - 1).unwrap()
    );
    assert!(rel_err("block input", &x_emu, &x_cpu, 0.0) <= 1e-4);
    let (l_cpu, _) = cpu_trainer.eval_forward(&g.input, g.shape, 0, nb).unwrap();
    let (l_emu, _) = cpu_trainer
        .eval_forward_on(&be, &g.input, g.shape, 0, nb)
        .unwrap();
    assert!(rel_err("eval logits", &l_emu, &l_cpu, 0.0) <= 1e-4);
    for (first, input, shape) in [(nb - 1, &x_cpu, shape), (0, &g.input, g.shape)] {
        let settings = StepSettings {
            first_block: first,
            class_weights: Some(&weights),
            dropout: Some((9, 3, 0.5)),
        };
        let batch = Batch {
            input,
            shape,
            labels: &g.labels,
        };
        let (mut a, mut b) = (cpu_trainer.clone(), cpu_trainer.clone());
        let oa = a.step_on(&Backend::cpu(), &batch, &settings, LR).unwrap();
        let ob = b.step_on(&be, &batch, &settings, LR).unwrap();
        assert!(
            rel_err("logits", &ob.logits, &oa.logits, 0.0) <= 1e-4,
            "first {first}"
        );
        assert!(
            (ob.loss - oa.loss).abs() <= 1e-4 * oa.loss.abs(),
            "first {first}"
        );
        let pa = &a.state().params;
        let scale = pa
            .params()
            .iter()
            .flat_map(|p| p.grad.iter())
            .fold(0f32, |m, v| m.max(v.abs()));
        for (p, q) in pa.params().iter().zip(b.state().params.params()) {
            check_grad(&format!("first {first}: "), p, q, scale);
            check_after(&format!("first {first}, after"), p, q, 1e-3 * scale);
            if first > 0
                && !p.name.starts_with("features.denseblock2.")
                && !p.name.starts_with("features.norm5.")
                && !p.name.starts_with("classifier")
            {
                // Nothing before the last block runs: untouched, no gradient.
                assert_eq!(
                    bits(&q.value),
                    bits(&cpu_trainer.state().params.by_name(&p.name).unwrap().value),
                    "{}",
                    p.name
                );
                assert!(q.grad.iter().all(|&v| v == 0.0), "{}", p.name);
            }
        }
        assert_eq!(a.state().num_batches_tracked, b.state().num_batches_tracked);
    }
}

/// The golden on a CUDA GPU (`scripts/gpu-check.sh` runs ignored tests).
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn cuda_step_matches_pytorch() {
    assert!(
        cellmorph::backend::cuda_device_count() > 0,
        "no CUDA device: this test needs a GPU"
    );
    let g = golden();
    check_golden(&g, &command_step(&g, "cuda"));
    let be = Backend::new(Device::Cuda(0)).unwrap();
    let a = train_step_on(
        &be,
        &g.file,
        "before.",
        &g.batch(),
        AdamConfig::default(),
        LR,
    )
    .unwrap();
    let b = train_step_on(
        &be,
        &g.file,
        "before.",
        &g.batch(),
        AdamConfig::default(),
        LR,
    )
    .unwrap();
    check_golden(&g, &a);
    for (p, q) in a.after.params.params().iter().zip(b.after.params.params()) {
        assert_eq!(bits(&p.value), bits(&q.value), "{}: value", p.name);
        assert_eq!(bits(&p.grad), bits(&q.grad), "{}: grad", p.name);
    }
}
