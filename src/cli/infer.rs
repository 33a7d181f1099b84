//! `cellmorph infer`: run a model on a tensor file, write its named outputs.

use std::path::PathBuf;

use clap::Args;

use cellmorph::{Device, Error, Result};

/// The models `infer` knows, with their output tensors.
pub const MODELS: &[(&str, &str)] = &[];

#[derive(Args, Debug)]
pub struct InferArgs {
    /// Model name (see the list in the error message when unsure).
    #[arg(long)]
    model: String,
    /// Weights as a safetensors file with PyTorch state_dict names.
    #[arg(long)]
    weights: PathBuf,
    /// Input safetensors file holding a tensor named `input`.
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors file.
    #[arg(long)]
    output: PathBuf,
    /// cpu, cuda, cuda:N or emulated.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Images per device batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
}

fn supported() -> String {
    if MODELS.is_empty() {
        return "none yet in this build".to_string();
    }
    MODELS
        .iter()
        .map(|(m, outs)| format!("{m} (outputs: {outs})"))
        .collect::<Vec<_>>()
        .join("; ")
}

pub fn run(a: InferArgs) -> Result<()> {
    if a.batch_size == 0 {
        return Err(Error::invalid("--batch-size must be at least 1"));
    }
    let _ = (&a.weights, &a.input, &a.output, a.device);
    Err(Error::invalid(format!(
        "unknown model {:?}; supported models: {}",
        a.model,
        supported()
    )))
}
