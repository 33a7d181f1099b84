//! Command-line interface: one file per command family.

mod devices;
mod infer;
mod svr;

use clap::{Parser, Subcommand};

use cellmorph::{Backend, Device, Result};

/// Label-free cell imaging with hand-written CUDA kernels and a CPU reference path.
#[derive(Parser, Debug)]
#[command(name = "cellmorph", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show which devices this build and machine can use.
    Devices,
    /// Run a model on the tensor named `input` of a safetensors file.
    Infer(infer::InferArgs),
    /// Per-gene linear SVR: grid search and prediction.
    #[command(subcommand)]
    Svr(svr::SvrCommand),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Devices => devices::run(),
        Command::Infer(a) => infer::run(a),
        Command::Svr(c) => svr::run(c),
    }
}

/// Opens the device named on the command line, saying which one was opened.
pub(crate) fn open_device(device: Device) -> Result<Backend> {
    let be = Backend::new(device)?;
    eprintln!("device: {}", be.describe());
    Ok(be)
}
