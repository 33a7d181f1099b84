//! `cellmorph infer`: run a model on the tensor named `input` of a
//! safetensors file and write its named outputs.

use std::path::PathBuf;

use clap::Args;

use cellmorph::io::{TensorFile, TensorWriter};
use cellmorph::models;
use cellmorph::{Device, Error, Precision, Result};

/// The models `infer` knows, with their outputs.
const MODELS: &[(&str, &str)] = &[
    (
        "vqvae2",
        "id_t, id_b, quant_t, quant_b, dec, diff, hist_t, hist_b",
    ),
    ("densenet", "features, pooled, logits, probs"),
    ("cp2image-generator", "image"),
    ("cp2image-discriminator", "prob, hidden.0 … hidden.4"),
];

#[derive(Args, Debug)]
pub struct InferArgs {
    /// Model: vqvae2, densenet, cp2image-generator, cp2image-discriminator.
    #[arg(long)]
    model: String,
    /// Weights as a safetensors file with PyTorch state_dict names.
    #[arg(long)]
    weights: PathBuf,
    /// Input safetensors file holding a tensor named `input`.
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors file (written only when everything succeeded).
    #[arg(long)]
    output: PathBuf,
    /// cpu, cuda, cuda:N or emulated.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Convolution precision: f32 (reference), or bf16/f16 on tensor cores
    /// (operands rounded, f32 accumulation).
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Items per device batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
}

fn supported() -> String {
    MODELS
        .iter()
        .map(|(m, outs)| format!("{m} (outputs: {outs})"))
        .collect::<Vec<_>>()
        .join("; ")
}

pub fn run(a: InferArgs) -> Result<()> {
    if !MODELS.iter().any(|(m, _)| *m == a.model) {
        return Err(Error::invalid(format!(
            "unknown model {:?}; supported: {}",
            a.model,
            supported()
        )));
    }
    if a.batch_size == 0 {
        return Err(Error::invalid("--batch-size must be at least 1"));
    }
    cellmorph::io::check_output_is_not_an_input(
        "--output",
        &a.output,
        &[("--weights", &a.weights), ("--input", &a.input)],
    )?;
    let weights = TensorFile::open(&a.weights)?;
    let inputs = TensorFile::open(&a.input)?;
    let (shape, data) = inputs.f32("input")?;
    if data.iter().any(|v| !v.is_finite()) {
        return Err(Error::format(
            &a.input,
            "tensor \"input\" contains NaN or infinite values",
        ));
    }
    let be = super::open_device(a.device, a.precision)?;
    let mut out = TensorWriter::new();
    out.set_metadata("model", &a.model);
    out.set_metadata("device", &be.describe());
    let t0 = std::time::Instant::now();
    match a.model.as_str() {
        "vqvae2" => models::vqvae2::infer(&be, &weights, &shape, &data, a.batch_size, &mut out)?,
        other => {
            // These take the input as a host tensor and batch it themselves.
            let host = cellmorph::Tensor::from_vec(&cellmorph::Backend::cpu(), &shape, data)?;
            let run = match other {
                "densenet" => models::densenet::infer,
                "cp2image-generator" => models::cp2image::infer_generator,
                "cp2image-discriminator" => models::cp2image::infer_discriminator,
                _ => return Err(Error::invalid(format!("unknown model {other:?}"))),
            };
            run(&be, &weights, &host, a.batch_size, &mut out)?
        }
    }
    be.synchronize()?;
    let secs = t0.elapsed().as_secs_f64();
    out.write(&a.output)?;
    eprintln!(
        "{}: {} item(s) in {secs:.2} s -> {}",
        a.model,
        shape.first().copied().unwrap_or(0),
        a.output.display()
    );
    Ok(())
}
