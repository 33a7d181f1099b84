//! `cellmorph train-step`: one optimizer step of a model from a weights file
//! and a batch, writing the state after the step, the gradients and the
//! step's outputs under the training goldens' names (`after.*`, `grad.*`,
//! `loss`, …).

use std::path::PathBuf;

use clap::Args;

use cellmorph::io::{TensorFile, TensorWriter};
use cellmorph::train::vqvae2::{self, StepConfig};
use cellmorph::train::{AdamConfig, Method, Optimizer};
use cellmorph::{Device, Error, Precision, Result};

#[derive(Args, Debug)]
pub struct TrainStepArgs {
    /// Model: vqvae2, densenet or cp2image (--weights holds the generator
    /// under `G.` and the discriminator under `D.`; --batch holds `z`, `x`
    /// and `x_real`; the GAN recipe uses --betas 0.5,0.999 --lr 2e-4).
    #[arg(long)]
    model: String,
    /// The state before the step: a safetensors file with PyTorch
    /// state_dict names (parameters and buffers).
    #[arg(long)]
    weights: PathBuf,
    /// The batch: a safetensors file holding a tensor named `input` (and
    /// for densenet `labels`, int64 class indices; for cp2image `z`, `x`,
    /// `x_real` instead).
    #[arg(long)]
    batch: PathBuf,
    /// Output safetensors file (written only when everything succeeded).
    #[arg(long)]
    output: PathBuf,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Adam's (β1, β2), comma-separated.
    #[arg(long, default_value = "0.9,0.999", value_parser = parse_betas)]
    betas: (f64, f64),
    /// Adam's L2 weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// cpu, cuda, cuda:N or emulated (every model).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Only f32 for now.
    #[arg(long, default_value = "f32")]
    precision: Precision,
}

impl TrainStepArgs {
    /// A step's error, naming the weights and the batch it ran on.
    fn step_error(&self, e: Error) -> Error {
        Error::invalid(format!(
            "{} on {}: {e}",
            self.weights.display(),
            self.batch.display()
        ))
    }
}

pub(crate) fn parse_betas(s: &str) -> std::result::Result<(f64, f64), String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let parse = |p: &str| {
        p.parse::<f64>()
            .ok()
            .filter(|b| (0.0..1.0).contains(b))
            .ok_or_else(|| format!("betas {s:?}: {p:?} is not a number in [0, 1)"))
    };
    match parts.as_slice() {
        [a, b] => Ok((parse(a)?, parse(b)?)),
        _ => Err(format!("betas {s:?}: expected two numbers, e.g. 0.9,0.999")),
    }
}

pub fn run(a: TrainStepArgs) -> Result<()> {
    if !(a.lr.is_finite() && a.lr >= 0.0) {
        return Err(Error::invalid(format!(
            "--lr must be finite and ≥ 0, got {}",
            a.lr
        )));
    }
    if !(a.weight_decay.is_finite() && a.weight_decay >= 0.0) {
        return Err(Error::invalid(format!(
            "--weight-decay must be finite and ≥ 0, got {}",
            a.weight_decay
        )));
    }
    let adam = Method::Adam(AdamConfig {
        betas: a.betas,
        weight_decay: a.weight_decay,
        ..AdamConfig::default()
    });
    cellmorph::io::check_output_is_not_an_input(
        "--output",
        &a.output,
        &[("--weights", &a.weights), ("--batch", &a.batch)],
    )?;
    if a.precision != Precision::F32 {
        return Err(Error::invalid(format!(
            "train-step --model {} --precision {}: training runs in f32 only",
            a.model, a.precision
        )));
    }
    match a.model.as_str() {
        "vqvae2" => vqvae2_step(&a, adam),
        "densenet" => densenet_step(&a, adam),
        "cp2image" => cp2image_step(&a, adam),
        other => Err(Error::invalid(format!(
            "train-step: unknown model {other:?}; supported: vqvae2, densenet, cp2image"
        ))),
    }
}

fn vqvae2_step(a: &TrainStepArgs, method: Method) -> Result<()> {
    let be = super::open_device(a.device, a.precision)?;
    let weights = TensorFile::open(&a.weights)?;
    let (cfg, mut store) = vqvae2::load_store(&weights)?;
    cellmorph::apps::expression::init::check_vqvae2_tensors(&weights, &cfg)?;
    let batch = TensorFile::open(&a.batch)?;
    let (shape, x) = batch.f32("input")?;
    let mut opt = Optimizer::new(method)?;
    store.register(&mut opt)?;
    let out = vqvae2::train_step_on(
        &be,
        &mut store,
        &mut opt,
        a.lr,
        &cfg,
        &shape,
        &x,
        &StepConfig::default(),
    )
    .map_err(|e| a.step_error(e))?;

    let mut w = TensorWriter::new();
    w.set_metadata("model", "vqvae2");
    w.set_metadata("config", &cfg.to_string());
    store.write_values(&mut w, "after.")?;
    for p in store.params().iter().filter(|p| p.trainable) {
        w.add_slice(&format!("grad.{}", p.name), &p.shape, &p.grad)?;
    }
    w.add_slice("loss", &[1], &[out.loss])?;
    w.add_slice("recon_loss", &[1], &[out.recon_loss])?;
    w.add_slice("latent_loss", &[1], &[out.latent_loss])?;
    let to_i64 = |v: &[i32]| v.iter().map(|&c| c as i64).collect::<Vec<i64>>();
    w.add_slice("id_t", &out.id_t_shape, &to_i64(&out.id_t))?;
    w.add_slice("id_b", &out.id_b_shape, &to_i64(&out.id_b))?;
    w.add_slice("dec", &shape, &out.dec)?;
    w.write(&a.output)?;
    eprintln!(
        "vqvae2: loss {} (recon {}, latent {}) -> {}",
        out.loss,
        out.recon_loss,
        out.latent_loss,
        a.output.display()
    );
    Ok(())
}

fn densenet_step(a: &TrainStepArgs, method: Method) -> Result<()> {
    use cellmorph::train::densenet::{train_step_on, Batch};
    let Method::Adam(adam) = method else {
        return Err(Error::invalid("train-step --model densenet: Adam only"));
    };
    let weights = TensorFile::open(&a.weights)?;
    let batch = TensorFile::open(&a.batch)?;
    let (shape, x) = batch.f32("input")?;
    let shape: [usize; 4] = shape.as_slice().try_into().map_err(|_| {
        Error::format(
            &a.batch,
            format!("tensor \"input\" has shape {shape:?}; expected [N, C, H, W]"),
        )
    })?;
    let (_, labels) = batch.i64("labels")?;
    let labels = labels
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            usize::try_from(l).map_err(|_| {
                Error::format(
                    &a.batch,
                    format!("tensor \"labels\"[{i}] = {l} is not a class index"),
                )
            })
        })
        .collect::<Result<Vec<usize>>>()?;
    let be = super::open_device(a.device, a.precision)?;
    let step = train_step_on(
        &be,
        &weights,
        "",
        &Batch {
            input: &x,
            shape,
            labels: &labels,
        },
        adam,
        a.lr,
    )
    .map_err(|e| a.step_error(e))?;
    let mut w = TensorWriter::new();
    w.set_metadata("model", "densenet");
    step.after.write_values(&mut w, "after.")?;
    step.after.write_grads(&mut w, "grad.")?;
    let classes = step.output.logits.len() / shape[0].max(1);
    w.add_slice("logits", &[shape[0], classes], &step.output.logits)?;
    w.add_slice("loss", &[1], &[step.output.loss])?;
    w.write(&a.output)?;
    eprintln!(
        "densenet: loss {} -> {}",
        step.output.loss,
        a.output.display()
    );
    Ok(())
}

fn cp2image_step(a: &TrainStepArgs, method: Method) -> Result<()> {
    use cellmorph::train::cp2image::{train_step_on, Batch, NetState};
    let weights = TensorFile::open(&a.weights)?;
    let mut g = NetState::from_file(&weights, "G.")?;
    let mut d = NetState::from_file(&weights, "D.")?;
    let batch = TensorFile::open(&a.batch)?;
    let (_, z) = batch.f32("z")?;
    let (shape, x) = batch.f32("x")?;
    let (real_shape, x_real) = batch.f32("x_real")?;
    let shape: [usize; 4] = shape.as_slice().try_into().map_err(|_| {
        Error::format(
            &a.batch,
            format!("tensor \"x\" has shape {shape:?}; expected [N, C, H, W]"),
        )
    })?;
    if real_shape != shape {
        return Err(Error::format(
            &a.batch,
            format!("tensor \"x_real\" has shape {real_shape:?}, \"x\" {shape:?}"),
        ));
    }
    let (mut og, mut od) = (Optimizer::new(method)?, Optimizer::new(method)?);
    g.params.register(&mut og)?;
    d.params.register(&mut od)?;
    let be = super::open_device(a.device, a.precision)?;
    let losses = train_step_on(
        &be,
        &mut g,
        &mut d,
        &mut og,
        &mut od,
        a.lr,
        &Batch {
            z: &z,
            x: &x,
            x_real: &x_real,
            shape,
        },
    )
    .map_err(|e| a.step_error(e))?;
    let mut w = TensorWriter::new();
    w.set_metadata("model", "cp2image");
    g.write_values(&mut w, "G.after.")?;
    d.write_values(&mut w, "D.after.")?;
    g.write_grads(&mut w, "G.grad.")?;
    d.write_grads(&mut w, "D.grad.")?;
    w.add_slice("loss_g", &[1], &[losses.loss_g])?;
    w.add_slice("loss_d", &[1], &[losses.loss_d])?;
    w.write(&a.output)?;
    eprintln!(
        "cp2image: loss_g {}, loss_d {} -> {}",
        losses.loss_g,
        losses.loss_d,
        a.output.display()
    );
    Ok(())
}
