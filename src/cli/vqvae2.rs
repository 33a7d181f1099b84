//! `cellmorph vqvae2 init` and `cellmorph vqvae2 train`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use cellmorph::apps::expression::train::{
    describe, init_weights, train, ImagePool, InitOptions, TrainOptions, TrainPaths,
};
use cellmorph::imaging::read_sample_list;
use cellmorph::models::vqvae2::VqVae2Config;
use cellmorph::{Device, Error, Precision, Result};

#[derive(Subcommand, Debug)]
pub enum Vqvae2Command {
    /// Seeded VQ-VAE-2 weights (the paper's architecture by default) with both
    /// codebooks seeded by k-means++ on encoder outputs of patches of the
    /// listed images.
    Init(InitArgs),
    /// Train a VQ-VAE-2 on random patches of the listed images (on any
    /// device; the CUDA path is verified under emulation).
    Train(TrainArgs),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Sample list CSV with the header `sample,image`.
    #[arg(long)]
    samples: PathBuf,
    /// Output weights (safetensors, vq-vae-2-pytorch names).
    #[arg(long)]
    output: PathBuf,
    /// Encoder/decoder width.
    #[arg(long, default_value_t = 128)]
    channel: usize,
    /// Residual blocks per encoder/decoder.
    #[arg(long, default_value_t = 2)]
    n_res_block: usize,
    /// Width inside a residual block.
    #[arg(long, default_value_t = 32)]
    n_res_channel: usize,
    /// Code vector length.
    #[arg(long, default_value_t = 64)]
    embed_dim: usize,
    /// Codes per codebook.
    #[arg(long, default_value_t = 64)]
    n_embed: usize,
    /// Patch side in pixels.
    #[arg(long, default_value_t = 160)]
    patch: usize,
    /// Random patches whose encoder outputs seed the codebooks.
    #[arg(long, default_value_t = 64)]
    seed_patches: usize,
    /// Seed of the weights and of the patch draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Sample list CSV with the header `sample,image`.
    #[arg(long)]
    samples: PathBuf,
    /// Output weights (safetensors, vq-vae-2-pytorch names). The metrics CSV,
    /// curves PNG, reconstruction sheet and checkpoint are written beside it
    /// (`<stem>.metrics.csv`, `.curves.png`, `.reconstructions.png`,
    /// `.checkpoint.safetensors`).
    #[arg(long)]
    output: PathBuf,
    /// Starting weights (from `vqvae2 init`, or any vq-vae-2-pytorch state_dict).
    #[arg(long, required_unless_present = "resume")]
    init: Option<PathBuf>,
    /// Continue from a checkpoint of an earlier run with the same options and
    /// images (only --steps and --checkpoint-every may change); the result
    /// equals an unbroken run bit for bit. A checkpoint made with other
    /// options or images, of another model, or damaged is refused.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Total optimizer steps.
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    /// Steps per epoch: metrics, plots and (by default) a checkpoint after each.
    #[arg(long, default_value_t = 100)]
    steps_per_epoch: u64,
    /// Patches per step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Patch side in pixels.
    #[arg(long, default_value_t = 160)]
    patch: usize,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// Seed of the split, the patches, the augmentation and the restarts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fraction of the images held out for validation metrics (0: none).
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Steps between checkpoints (0: after every epoch).
    #[arg(long, default_value_t = 0)]
    checkpoint_every: u64,
    /// A code whose EMA usage count falls below this is re-seeded from an
    /// encoder output of the current batch (0: never).
    #[arg(long, default_value_t = 1.0)]
    dead_threshold: f32,
    /// Fixed patches per split for the per-epoch metrics.
    #[arg(long, default_value_t = 64)]
    eval_patches: usize,
    /// Weight of the commitment loss.
    #[arg(long, default_value_t = 0.25)]
    latent_loss_weight: f32,
    /// EMA decay of the codebooks.
    #[arg(long, default_value_t = 0.99)]
    decay: f32,
    /// cpu, cuda, cuda:N or emulated: where the training step and the
    /// metrics run (the optimizer and the EMA codebook update stay on the
    /// host). Runs are bit-reproducible on one device; devices differ in
    /// their summation order.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Only f32 so far.
    #[arg(long, default_value = "f32")]
    precision: Precision,
}

pub fn run(cmd: Vqvae2Command) -> Result<()> {
    match cmd {
        Vqvae2Command::Init(a) => init(a),
        Vqvae2Command::Train(a) => train_cmd(a),
    }
}

fn pool(samples: &PathBuf, patch: usize) -> Result<ImagePool> {
    let list = read_sample_list(samples)?;
    let (pool, skipped) = ImagePool::new(&list, patch)?;
    for (path, why) in &skipped {
        eprintln!("skipped {}: {why}", path.display());
    }
    if pool.is_empty() {
        return Err(Error::format(
            samples,
            format!("none of the listed images holds a {patch}×{patch} patch"),
        ));
    }
    Ok(pool)
}

fn init(a: InitArgs) -> Result<()> {
    cellmorph::io::check_output_is_not_an_input(
        "--output",
        &a.output,
        &[("--samples", &a.samples)],
    )?;
    if a.n_res_block > 0 && a.n_res_channel == 0 {
        return Err(Error::invalid(
            "--n-res-channel must be at least 1 with residual blocks",
        ));
    }
    for (flag, v) in [
        ("--channel", a.channel),
        ("--embed-dim", a.embed_dim),
        ("--n-embed", a.n_embed),
    ] {
        if v == 0 || v > 4096 {
            return Err(Error::invalid(format!(
                "{flag} must lie in 1..=4096, got {v}"
            )));
        }
    }
    let mut pool = pool(&a.samples, a.patch)?;
    let opts = InitOptions {
        config: VqVae2Config {
            in_channel: 1,
            channel: a.channel,
            n_res_block: a.n_res_block,
            n_res_channel: a.n_res_channel,
            embed_dim: a.embed_dim,
            n_embed: a.n_embed,
        },
        patch: a.patch,
        seed_patches: a.seed_patches,
        seed: a.seed,
    };
    init_weights(&mut pool, &opts, &a.output)?;
    println!(
        "wrote {} (untrained VQ-VAE-2, {}; codebooks seeded on {} patches of {} images)",
        a.output.display(),
        opts.config,
        a.seed_patches,
        pool.len()
    );
    Ok(())
}

fn train_cmd(a: TrainArgs) -> Result<()> {
    if a.precision != Precision::F32 {
        return Err(Error::invalid(format!(
            "--precision {}: vqvae2 train runs in f32 only so far",
            a.precision
        )));
    }
    let be = super::open_device(a.device, Precision::F32)?;
    let paths = TrainPaths::beside(&a.output);
    let mut inputs: Vec<(&str, &std::path::Path)> = vec![("--samples", &a.samples)];
    if let Some(i) = &a.init {
        inputs.push(("--init", i));
    }
    for (role, path) in paths.all() {
        cellmorph::io::check_output_is_not_an_input(role, path, &inputs)?;
    }
    if let Some(r) = &a.resume {
        if r != &paths.checkpoint {
            cellmorph::io::check_output_is_not_an_input(
                "checkpoint",
                &paths.checkpoint,
                &[("--resume", r)],
            )?;
        }
    }
    let opts = TrainOptions {
        patch: a.patch,
        batch: a.batch_size,
        steps: a.steps,
        steps_per_epoch: a.steps_per_epoch,
        lr: a.lr,
        seed: a.seed,
        val_fraction: a.val_fraction,
        checkpoint_every: a.checkpoint_every,
        dead_threshold: a.dead_threshold,
        eval_patches: a.eval_patches,
        latent_loss_weight: a.latent_loss_weight,
        decay: a.decay,
    };
    let mut pool = pool(&a.samples, a.patch)?;
    // Resuming reads the architecture from the checkpoint, which is a state_dict too.
    let init = match (&a.resume, &a.init) {
        (Some(r), _) => r.clone(),
        (None, Some(i)) => i.clone(),
        (None, None) => return Err(Error::invalid("give --init or --resume")),
    };
    let s = train(
        &be,
        &mut pool,
        &init,
        a.resume.as_deref(),
        &opts,
        &paths,
        true,
    )?;
    if let Some(last) = s.rows.last() {
        println!("{}", describe(last));
    }
    println!(
        "trained {} steps ({} this run, {:.3} steps/s) on {} training and {} validation images",
        a.steps,
        a.steps - s.resumed_from,
        s.steps_per_s,
        s.images.0,
        s.images.1
    );
    for (role, path) in paths.all() {
        println!("  {role}: {}", path.display());
    }
    Ok(())
}
