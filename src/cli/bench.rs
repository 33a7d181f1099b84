//! `cellmorph bench`: time one workload (a model forward or a single op) on
//! a device and print the timing as one JSON line, for comparing the kernels
//! with other implementations (benches/compare/) on the same weights and
//! inputs.
//!
//! Inputs are generated (seeded) or read from a safetensors file, uploaded
//! before timing; every timed iteration runs the workload once and then
//! synchronizes the device; outputs of the last iteration are downloaded
//! after timing when `--output` asks for them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use cellmorph::geometry::{Conv2dGeom, Conv2dParams};
use cellmorph::io::{TensorFile, TensorWriter};
use cellmorph::models::cp2image::Generator;
use cellmorph::models::densenet::DenseNet;
use cellmorph::models::vqvae2::VqVae2;
use cellmorph::ops::{self, Codebook, VqOut};
use cellmorph::rng::SplitMix64;
use cellmorph::{Backend, Device, Error, Precision, Result, Tensor};

/// What `bench` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// DenseNet forward, device-resident input "input" [batch, 3, H, W] to
    /// "logits" and "probs" (needs --weights; --batch 64, --height 226,
    /// --width 306).
    #[value(name = "densenet")]
    Densenet,
    /// VQ-VAE-2 encoder, both lookups and per-image histograms from "input"
    /// [batch, in_channels, H, W] to "id_t", "id_b", "hist_t", "hist_b"
    /// (needs --weights; --batch 256, --height/--width 160, divisible by 8).
    #[value(name = "vqvae2-profile")]
    Vqvae2Profile,
    /// One VQ-VAE-2 training step (forward, backward, EMA codebook update,
    /// Adam at lr 3e-4) on "input" [batch, in_channels, H, W], every
    /// iteration from the same starting weights; outputs "loss", "id_t",
    /// "id_b" (needs --weights; --batch 32, --height/--width 160; any device,
    /// the Adam step and the EMA update on the host).
    #[value(name = "vqvae2-train-step")]
    Vqvae2TrainStep,
    /// One DenseNet training step as `screen train --unfreeze all` takes it
    /// per batch: every layer trained, training-mode BatchNorm, forward,
    /// cross-entropy with balanced class weights `n / (classes·n_c)` of the
    /// batch's labels, backward, AdamW (lr 1e-4, weight decay 0); no
    /// dropout. "input" [batch, 3, H, W] and i64 "labels" [batch] (generated:
    /// image i has label i mod classes), every iteration from the same
    /// weights; outputs "loss", "logits" (needs --weights with the head;
    /// --batch 8, --height 226, --width 306; any device, f32; the timed
    /// step includes uploading the weights and downloading the gradients,
    /// the optimizer runs on the host).
    #[value(name = "densenet-train-step")]
    DensenetTrainStep,
    /// One CP2Image training step as `cp2image train` takes it: a generator
    /// update (MSE + feature matching) then a discriminator update (BCE),
    /// Adam lr 2e-4, betas (0.5, 0.999), on "z" [batch, p], "x" and
    /// "x_real" [batch, channels, size, size], every iteration from the
    /// same weights; outputs "loss_g", "loss_d" (needs --weights holding
    /// the generator under "G." and the discriminator under "D."; --batch
    /// 32; every device, f32).
    #[value(name = "cp2image-train-step")]
    Cp2imageTrainStep,
    /// CP2Image generator forward, "input" [batch, p] to "image" (needs
    /// --weights; --batch 4096).
    #[value(name = "cp2image-generator")]
    Cp2imageGenerator,
    /// conv2d with bias into a preallocated output: "x" [batch, c_in, H, W],
    /// "w" [c_out, c_in, k, k], "b" [c_out] to "y" (--batch 64, --stride 1,
    /// --pad 0; --c-in, --height, --width, --c-out, --kernel needed without
    /// --input).
    #[value(name = "conv")]
    Conv,
    /// Nearest-code lookup (codes only): "z" [n, dim] and "codebook"
    /// [codes, dim] to "codes" i32 [n] (--n 65536, --dim 64, --codes 512).
    #[value(name = "vq-lookup")]
    VqLookup,
    /// Code histogram: "codes" i32 [n] in [0, bins) to "hist" i32
    /// [segments, bins], segment s counting the s-th of `segments` equal
    /// contiguous shares (--n 16777216, --bins 512, --segments 1).
    #[value(name = "histogram")]
    Histogram,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Densenet => "densenet",
            Workload::Vqvae2Profile => "vqvae2-profile",
            Workload::Vqvae2TrainStep => "vqvae2-train-step",
            Workload::DensenetTrainStep => "densenet-train-step",
            Workload::Cp2imageTrainStep => "cp2image-train-step",
            Workload::Cp2imageGenerator => "cp2image-generator",
            Workload::Conv => "conv",
            Workload::VqLookup => "vq-lookup",
            Workload::Histogram => "histogram",
        }
    }

    /// The workload-specific flags it reads (the common ones always apply).
    fn flags(self) -> &'static [&'static str] {
        match self {
            Workload::Densenet
            | Workload::Vqvae2Profile
            | Workload::Vqvae2TrainStep
            | Workload::DensenetTrainStep => &["--weights", "--batch", "--height", "--width"],
            Workload::Cp2imageGenerator | Workload::Cp2imageTrainStep => &["--weights", "--batch"],
            Workload::Conv => &[
                "--batch", "--c-in", "--height", "--width", "--c-out", "--kernel", "--stride",
                "--pad",
            ],
            Workload::VqLookup => &["--n", "--dim", "--codes"],
            Workload::Histogram => &["--n", "--bins", "--segments"],
        }
    }
}

/// Time one workload on a device; prints one JSON object on one line to
/// stdout: workload, device, precision, batch, shape, warmup, iters,
/// median_s, mean_s, min_s, items_per_s, flops, gflop_per_s.
///
/// With --input, sizes are read off the file's tensors; a size flag given
/// as well must agree with the file (an error otherwise). Without --input,
/// inputs are generated from --seed: images uniform in [0, 1] (densenet) or
/// [−1, 1] (vqvae2-profile), features ~ N(0, 1) (cp2image-generator), conv
/// x and b uniform in [−1, 1] and w uniform in [−1, 1]/sqrt(c_in·k·k), VQ
/// vectors and codebook ~ N(0, 1), codes uniform in [0, bins).
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The workload to time.
    #[arg(value_enum)]
    workload: Workload,
    /// cpu, cuda, cuda:N or emulated.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Convolution precision: f32 (reference), or bf16/f16 on tensor cores
    /// (operands rounded, f32 accumulation).
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Untimed iterations before timing.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed iterations (at least 1); median, mean and min are over these.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Seed of the generated inputs (unused with --input).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Inputs as a safetensors file with the workload's input tensors
    /// (input; x, w, b; z, codebook; codes); sizes are read off them.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Write the outputs of the last timed iteration here (safetensors).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Model weights (safetensors, PyTorch state_dict names); needed by
    /// every model workload (cp2image-train-step: "G." generator and "D."
    /// discriminator in one file).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Items per iteration: images (densenet 64, vqvae2-profile 256,
    /// vqvae2-train-step 32, densenet-train-step 8, cp2image-train-step 32),
    /// feature vectors (cp2image-generator 4096), conv batch (64).
    #[arg(long)]
    batch: Option<usize>,
    /// Image height (densenet 226, vqvae2-profile 160; conv: required
    /// without --input).
    #[arg(long)]
    height: Option<usize>,
    /// Image width (densenet 306, vqvae2-profile 160; conv: required
    /// without --input).
    #[arg(long)]
    width: Option<usize>,
    /// conv input channels (required without --input).
    #[arg(long)]
    c_in: Option<usize>,
    /// conv output channels (required without --input).
    #[arg(long)]
    c_out: Option<usize>,
    /// conv kernel size k (square k×k; required without --input).
    #[arg(long)]
    kernel: Option<usize>,
    /// conv stride (default 1).
    #[arg(long)]
    stride: Option<usize>,
    /// conv zero padding on each side (default 0).
    #[arg(long)]
    pad: Option<usize>,
    /// Number of vectors (vq-lookup, default 65536) or codes (histogram,
    /// default 16777216).
    #[arg(long)]
    n: Option<usize>,
    /// vq-lookup vector dimension (default 64).
    #[arg(long)]
    dim: Option<usize>,
    /// vq-lookup codebook size (default 512).
    #[arg(long)]
    codes: Option<usize>,
    /// histogram bins: codes lie in [0, bins) (default 512).
    #[arg(long)]
    bins: Option<usize>,
    /// histogram segments: equal contiguous shares of the codes, one
    /// histogram row each; must divide n (default 1).
    #[arg(long)]
    segments: Option<usize>,
}

impl BenchArgs {
    /// The workload-specific flags given on the command line.
    fn given(&self) -> Vec<&'static str> {
        let p = |f: &'static str, given: bool| given.then_some(f);
        [
            p("--weights", self.weights.is_some()),
            p("--batch", self.batch.is_some()),
            p("--height", self.height.is_some()),
            p("--width", self.width.is_some()),
            p("--c-in", self.c_in.is_some()),
            p("--c-out", self.c_out.is_some()),
            p("--kernel", self.kernel.is_some()),
            p("--stride", self.stride.is_some()),
            p("--pad", self.pad.is_some()),
            p("--n", self.n.is_some()),
            p("--dim", self.dim.is_some()),
            p("--codes", self.codes.is_some()),
            p("--bins", self.bins.is_some()),
            p("--segments", self.segments.is_some()),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Rejects flags the workload does not read, zero sizes and zero iterations.
    fn validate(&self) -> Result<()> {
        let w = self.workload;
        let unused: Vec<&str> = self
            .given()
            .into_iter()
            .filter(|f| !w.flags().contains(f))
            .collect();
        if !unused.is_empty() {
            return Err(Error::invalid(format!(
                "bench {}: {} does not apply (it reads {})",
                w.name(),
                unused.join(", "),
                w.flags().join(", ")
            )));
        }
        if w.flags().contains(&"--weights") && self.weights.is_none() {
            return Err(Error::invalid(format!(
                "bench {} needs --weights (a safetensors state_dict)",
                w.name()
            )));
        }
        if w == Workload::Conv && self.input.is_none() {
            let missing: Vec<&str> = [
                ("--c-in", self.c_in),
                ("--height", self.height),
                ("--width", self.width),
                ("--c-out", self.c_out),
                ("--kernel", self.kernel),
            ]
            .into_iter()
            .filter_map(|(f, v)| v.is_none().then_some(f))
            .collect();
            if !missing.is_empty() {
                return Err(Error::invalid(format!(
                    "bench conv needs {} (or --input with x, w, b)",
                    missing.join(", ")
                )));
            }
        }
        if self.iters == 0 {
            return Err(Error::invalid("--iters must be at least 1"));
        }
        let sizes = [
            ("--batch", self.batch),
            ("--height", self.height),
            ("--width", self.width),
            ("--c-in", self.c_in),
            ("--c-out", self.c_out),
            ("--kernel", self.kernel),
            ("--stride", self.stride),
            ("--n", self.n),
            ("--dim", self.dim),
            ("--codes", self.codes),
            ("--bins", self.bins),
            ("--segments", self.segments),
        ];
        for (flag, v) in sizes {
            if v == Some(0) {
                return Err(Error::invalid(format!("{flag} must be at least 1")));
            }
        }
        Ok(())
    }

    /// The weights file of a model workload.
    fn weights(&self) -> Result<TensorFile> {
        let path = self.weights.as_ref().ok_or_else(|| {
            Error::invalid(format!("bench {} needs --weights", self.workload.name()))
        })?;
        TensorFile::open(path)
    }
}

/// What a workload reports besides its timings.
struct Measured {
    /// Items per iteration (images, vectors, codes).
    batch: usize,
    /// The sizes used.
    shape: Value,
    /// Floating-point operations per iteration, where simple to count.
    flops: Option<f64>,
    /// Seconds of each timed iteration.
    times: Vec<f64>,
}

pub fn run(a: BenchArgs) -> Result<()> {
    a.validate()?;
    let input = a.input.as_ref().map(TensorFile::open).transpose()?;
    let be = super::open_device(a.device, a.precision)?;
    let mut out = a.output.as_ref().map(|_| TensorWriter::new());
    let ctx = Ctx {
        a: &a,
        be: &be,
        input: input.as_ref(),
    };
    eprintln!(
        "bench {}: {} warmup + {} timed iteration(s)",
        a.workload.name(),
        a.warmup,
        a.iters
    );
    let m = match a.workload {
        Workload::Densenet => densenet(&ctx, out.as_mut())?,
        Workload::Vqvae2Profile => vqvae2_profile(&ctx, out.as_mut())?,
        Workload::Vqvae2TrainStep => vqvae2_train_step(&ctx, out.as_mut())?,
        Workload::DensenetTrainStep => densenet_train_step(&ctx, out.as_mut())?,
        Workload::Cp2imageTrainStep => cp2image_train_step(&ctx, out.as_mut())?,
        Workload::Cp2imageGenerator => cp2image_generator(&ctx, out.as_mut())?,
        Workload::Conv => conv(&ctx, out.as_mut())?,
        Workload::VqLookup => vq_lookup(&ctx, out.as_mut())?,
        Workload::Histogram => histogram(&ctx, out.as_mut())?,
    };
    if let (Some(path), Some(out)) = (&a.output, out.as_mut()) {
        out.set_metadata("workload", a.workload.name());
        out.set_metadata("device", &be.describe());
        out.set_metadata("precision", be.precision().name());
        out.write(path)?;
        eprintln!("outputs of the last iteration -> {}", path.display());
    }
    let (median, _, min) = stats(&m.times);
    eprintln!(
        "bench {}: median {:.3} ms, min {:.3} ms over {} iteration(s)",
        a.workload.name(),
        median * 1e3,
        min * 1e3,
        m.times.len()
    );
    println!("{}", report(&a, &be, &m));
    Ok(())
}

/// (median, mean, min) of `times` (non-empty).
fn stats(times: &[f64]) -> (f64, f64, f64) {
    let mut s = times.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (median, s.iter().sum::<f64>() / n as f64, s[0])
}

/// The JSON line.
fn report(a: &BenchArgs, be: &Backend, m: &Measured) -> Value {
    let (median, mean, min) = stats(&m.times);
    let rate = |v: f64| (median > 0.0 && v.is_finite()).then(|| v / median);
    json!({
        "workload": a.workload.name(),
        "device": be.describe(),
        "precision": be.precision().name(),
        "batch": m.batch,
        "shape": m.shape,
        "warmup": a.warmup,
        "iters": a.iters,
        "median_s": median,
        "mean_s": mean,
        "min_s": min,
        "items_per_s": rate(m.batch as f64),
        "flops": m.flops,
        "gflop_per_s": m.flops.and_then(rate).map(|v| v / 1e9),
    })
}

/// Runs `warmup + iters` iterations: `prep` (untimed, then a device
/// synchronize), then `run` and a synchronize, timed. Returns the timed
/// iterations' seconds and the last iteration's result.
fn time_iters<S, O>(
    be: &Backend,
    warmup: usize,
    iters: usize,
    mut prep: impl FnMut() -> Result<S>,
    mut run: impl FnMut(S) -> Result<O>,
) -> Result<(Vec<f64>, O)> {
    let mut times = Vec::with_capacity(iters);
    let mut last = None;
    for i in 0..warmup + iters {
        let state = prep()?;
        be.synchronize()?;
        let t0 = Instant::now();
        let o = run(state)?;
        be.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        if i >= warmup {
            times.push(dt);
        }
        last = Some(o);
    }
    let last = last.ok_or_else(|| Error::invalid("--iters must be at least 1"))?;
    Ok((times, last))
}

/// Timing with nothing to prepare per iteration.
fn time_simple<O>(
    be: &Backend,
    a: &BenchArgs,
    run: impl FnMut(()) -> Result<O>,
) -> Result<(Vec<f64>, O)> {
    time_iters(be, a.warmup, a.iters, || Ok(()), run)
}

/// What every workload reads.
struct Ctx<'a> {
    a: &'a BenchArgs,
    be: &'a Backend,
    input: Option<&'a TensorFile>,
}

impl Ctx<'_> {
    fn input_path(&self) -> &Path {
        self.input.map_or(Path::new("--input"), |f| f.path())
    }

    /// Reads float tensor `name` of the input file with `rank` dimensions,
    /// rejecting non-finite values.
    fn read_f32(
        &self,
        file: &TensorFile,
        name: &str,
        rank: usize,
    ) -> Result<(Vec<usize>, Vec<f32>)> {
        let (shape, data) = file.f32(name)?;
        if shape.len() != rank {
            return Err(Error::format(
                file.path(),
                format!(
                    "tensor {name:?} has shape {shape:?}; bench {} needs {rank} dimensions",
                    self.a.workload.name()
                ),
            ));
        }
        if data.iter().any(|v| !v.is_finite()) {
            return Err(Error::format(
                file.path(),
                format!("tensor {name:?} contains NaN or infinite values"),
            ));
        }
        Ok((shape, data))
    }

    /// A size read off the file: `file_value`, which a flag given
    /// explicitly (`given`) must equal.
    fn agree(
        &self,
        flag: &str,
        given: Option<usize>,
        tensor: &str,
        shape: &[usize],
        file_value: usize,
    ) -> Result<usize> {
        match given {
            Some(v) if v != file_value => Err(Error::format(
                self.input_path(),
                format!(
                    "tensor {tensor:?} has shape {shape:?}, which means {flag} {file_value}, but {flag} {v} was given"
                ),
            )),
            _ => Ok(file_value),
        }
    }

    /// Fails when dimension `what` of `tensor` is not `want` (set by the
    /// weights or another tensor).
    fn expect_dim(
        &self,
        tensor: &str,
        shape: &[usize],
        what: &str,
        got: usize,
        want: usize,
    ) -> Result<()> {
        if got != want {
            return Err(Error::format(
                self.input_path(),
                format!("tensor {tensor:?} has shape {shape:?}: {what} is {got}, expected {want}"),
            ));
        }
        Ok(())
    }

    /// An image batch "input" [n, channels, h, w] from the file (checked
    /// against the weights' channels and the flags) or generated uniform in
    /// [lo, hi); returns (n, h, w, data).
    fn images(
        &self,
        channels: usize,
        defaults: (usize, usize, usize),
        (lo, hi): (f32, f32),
    ) -> Result<(usize, usize, usize, Vec<f32>)> {
        let a = self.a;
        match self.input {
            Some(f) => {
                let (s, data) = self.read_f32(f, "input", 4)?;
                self.expect_dim(
                    "input",
                    &s,
                    "the channel count (from the weights)",
                    s[1],
                    channels,
                )?;
                let n = self.agree("--batch", a.batch, "input", &s, s[0])?;
                let h = self.agree("--height", a.height, "input", &s, s[2])?;
                let w = self.agree("--width", a.width, "input", &s, s[3])?;
                Ok((n, h, w, data))
            }
            None => {
                let n = a.batch.unwrap_or(defaults.0);
                let h = a.height.unwrap_or(defaults.1);
                let w = a.width.unwrap_or(defaults.2);
                let len = checked_len(&[n, channels, h, w])?;
                let mut rng = SplitMix64::new(a.seed);
                Ok((n, h, w, uniform_vec(&mut rng, len, lo, hi)))
            }
        }
    }
}

/// The number of elements of `shape`, or an error when it overflows.
/// The most values one benchmark tensor may hold (4 GiB of f32): sizes come
/// from flags, and an allocation beyond the machine's memory would abort.
const MAX_BENCH_VALUES: usize = 1 << 30;

/// The number of values of `shape`, at most [`MAX_BENCH_VALUES`].
fn checked_len(shape: &[usize]) -> Result<usize> {
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match n {
        Some(n) if n <= MAX_BENCH_VALUES => Ok(n),
        _ => Err(Error::invalid(format!(
            "a tensor of shape {shape:?} would need {:.1} GiB; the benchmark's limit is {} GiB per tensor — give smaller sizes",
            shape.iter().map(|&d| d as f64).product::<f64>() * 4.0 / f64::from(1u32 << 30),
            (MAX_BENCH_VALUES * 4) >> 30
        ))),
    }
}

fn densenet(c: &Ctx, out: Option<&mut TensorWriter>) -> Result<Measured> {
    let be = c.be;
    let model = DenseNet::from_file(be, &c.a.weights()?)?;
    let cfg = model.config();
    let ch = cfg.in_channels;
    let (n, h, w, data) = c.images(ch, (64, 226, 306), (0.0, 1.0))?;
    let flops = cfg.flops(h, w)? * n as f64;
    let classes = cfg.num_classes();
    let x = Tensor::from_vec(be, &[n, ch, h, w], data)?;
    let mut ws = model.workspace(be, n, h, w)?;
    let (times, ()) = time_simple(be, c.a, |()| model.forward_into(be, &x, &mut ws))?;
    if let Some(out) = out {
        out.add("logits", ws.logits())?;
        out.add("probs", ws.probs())?;
    }
    Ok(Measured {
        batch: n,
        shape: json!({"channels": ch, "height": h, "width": w, "classes": classes}),
        flops: Some(flops),
        times,
    })
}

fn vqvae2_profile(c: &Ctx, out: Option<&mut TensorWriter>) -> Result<Measured> {
    let be = c.be;
    let model = VqVae2::from_file(be, &c.a.weights()?)?;
    let cfg = *model.config();
    let (n, h, w, data) = c.images(cfg.in_channel, (256, 160, 160), (-1.0, 1.0))?;
    if h % 8 != 0 || w % 8 != 0 {
        return Err(Error::invalid(format!(
            "bench vqvae2-profile: images are {h}×{w}; the VQ-VAE-2 needs height and width divisible by 8"
        )));
    }
    let k = cfg.n_embed;
    let x = Tensor::from_vec(be, &[n, cfg.in_channel, h, w], data)?;
    let zeros = || Ok((Tensor::zeros(be, &[n, k])?, Tensor::zeros(be, &[n, k])?));
    let (times, (id_t, id_b, hist_t, hist_b)) = time_iters(
        be,
        c.a.warmup,
        c.a.iters,
        zeros,
        |(mut hist_t, mut hist_b): (Tensor<i32>, Tensor<i32>)| {
            let (id_t, id_b) = model.encode_histograms(be, &x, None, &mut hist_t, &mut hist_b)?;
            Ok((id_t, id_b, hist_t, hist_b))
        },
    )?;
    if let Some(out) = out {
        out.add("id_t", &id_t)?;
        out.add("id_b", &id_b)?;
        out.add("hist_t", &hist_t)?;
        out.add("hist_b", &hist_b)?;
    }
    Ok(Measured {
        batch: n,
        shape: json!({
            "channels": cfg.in_channel,
            "height": h,
            "width": w,
            "n_embed": k,
            "embed_dim": cfg.embed_dim,
        }),
        flops: None,
        times,
    })
}

fn vqvae2_train_step(c: &Ctx, out: Option<&mut TensorWriter>) -> Result<Measured> {
    use cellmorph::train::vqvae2::{load_store, train_step_on, StepConfig};
    use cellmorph::train::{AdamConfig, Method, Optimizer};
    let (cfg, start) = load_store(&c.a.weights()?)?;
    let (n, h, w, data) = c.images(cfg.in_channel, (32, 160, 160), (-1.0, 1.0))?;
    if h % 8 != 0 || w % 8 != 0 {
        return Err(Error::invalid(format!(
            "bench vqvae2-train-step: images are {h}×{w}; the VQ-VAE-2 needs height and width divisible by 8"
        )));
    }
    let shape = [n, cfg.in_channel, h, w];
    let fresh = || -> Result<_> {
        let store = start.clone();
        let mut opt = Optimizer::new(Method::Adam(AdamConfig::default()))?;
        store.register(&mut opt)?;
        Ok((store, opt))
    };
    let (times, step) = time_iters(
        c.be,
        c.a.warmup,
        c.a.iters,
        fresh,
        |(mut store, mut opt)| {
            train_step_on(
                c.be,
                &mut store,
                &mut opt,
                3e-4,
                &cfg,
                &shape,
                &data,
                &StepConfig::default(),
            )
        },
    )?;
    if let Some(out) = out {
        out.add_slice("loss", &[], &[step.loss])?;
        out.add_slice("id_t", &step.id_t_shape, &step.id_t)?;
        out.add_slice("id_b", &step.id_b_shape, &step.id_b)?;
    }
    Ok(Measured {
        batch: n,
        shape: json!({
            "channels": cfg.in_channel,
            "height": h,
            "width": w,
            "n_embed": cfg.n_embed,
            "embed_dim": cfg.embed_dim,
        }),
        flops: None,
        times,
    })
}

fn densenet_train_step(c: &Ctx, out: Option<&mut TensorWriter>) -> Result<Measured> {
    use cellmorph::train::densenet::{Batch, DenseNetState, DenseNetTrainer, StepSettings};
    use cellmorph::train::{AdamConfig, Method};
    let start = DenseNetState::from_file(&c.a.weights()?, "")?;
    let cfg = start.config.clone();
    let ch = cfg.in_channels;
    let classes = cfg.num_classes();
    let (n, h, w, data) = c.images(ch, (8, 226, 306), (0.0, 1.0))?;
    let labels: Vec<usize> = match c.input {
        Some(f) => {
            let (s, raw) = f.i64("labels")?;
            if s != [n] {
                return Err(Error::format(
                    f.path(),
                    format!("tensor \"labels\" has shape {s:?}; bench densenet-train-step needs [{n}] (one per image)"),
                ));
            }
            raw.iter()
                .map(|&v| {
                    usize::try_from(v)
                        .ok()
                        .filter(|&k| k < classes)
                        .ok_or_else(|| {
                            Error::format(
                                f.path(),
                                format!("label {v} is outside [0, {classes}) (the head's classes)"),
                            )
                        })
                })
                .collect::<Result<_>>()?
        }
        None => (0..n).map(|i| i % classes).collect(),
    };
    // Balanced class weights of this batch (scikit-learn's "balanced", as
    // `screen train` computes them over its training set); a class absent
    // from the batch gets weight 1, which no term uses.
    let mut counts = vec![0usize; classes];
    for &l in &labels {
        counts[l] += 1;
    }
    let class_weights: Vec<f32> = counts
        .iter()
        .map(|&k| {
            if k == 0 {
                1.0
            } else {
                (n as f64 / (classes as f64 * k as f64)) as f32
            }
        })
        .collect();
    let settings = StepSettings {
        first_block: 0,
        class_weights: Some(&class_weights),
        dropout: None,
    };
    let shape = [n, ch, h, w];
    let batch = Batch {
        input: &data,
        shape,
        labels: &labels,
    };
    // `screen train`'s stage 2: AdamW at its default lr (1e-3 / 10), weight
    // decay 0.
    let lr = 1e-4;
    let method = Method::AdamW(AdamConfig::default());
    let (times, step) = time_iters(
        c.be,
        c.a.warmup,
        c.a.iters,
        || DenseNetTrainer::with_method(start.clone(), method),
        |mut trainer| trainer.step_on(c.be, &batch, &settings, lr),
    )?;
    if let Some(out) = out {
        out.add_slice("loss", &[], &[step.loss])?;
        out.add_slice("logits", &[n, classes], &step.logits)?;
    }
    Ok(Measured {
        batch: n,
        shape: json!({"channels": ch, "height": h, "width": w, "classes": classes}),
        flops: None,
        times,
    })
}

fn cp2image_train_step(c: &Ctx, out: Option<&mut TensorWriter>) -> Result<Measured> {
    use cellmorph::train::cp2image::{train_step_on, Batch, NetState};
    use cellmorph::train::{AdamConfig, Method, Optimizer};
    let file = c.a.weights()?;
    let g0 = NetState::from_file(&file, "G.")?;
    let d0 = NetState::from_file(&file, "D.")?;
    let shape_of = |s: &NetState, name: &str| -> Result<Vec<usize>> {
        Ok(s.params.get(s.params.id(name)?).shape.clone())
    };
    let fc = shape_of(&g0, "fc.weight")?;
    let out_w = shape_of(&g0, "out.weight")?;
    let (Some(&p), Some(&channels)) = (fc.get(1), out_w.first()) else {
        return Err(Error::format(
            file.path(),
            "G.fc.weight or G.out.weight is not a matrix / conv weight",
        ));
    };
    let blocks = (0..)
        .take_while(|i| g0.params.id(&format!("blocks.{i}.bn.weight")).is_ok())
        .count();
    let size = 4usize
        .checked_shl(u32::try_from(blocks).unwrap_or(u32::MAX))
        .filter(|&s| s <= 4096)
        .ok_or_else(|| Error::format(file.path(), format!("{blocks} generator blocks")))?;
    let (n, z, x, x_real) = match c.input {
        Some(f) => {
            let (zs, z) = c.read_f32(f, "z", 2)?;
            c.expect_dim("z", &zs, "the feature count p (from the weights)", zs[1], p)?;
            let n = c.agree("--batch", c.a.batch, "z", &zs, zs[0])?;
            let want = [n, channels, size, size];
            let (xs, x) = c.read_f32(f, "x", 4)?;
            let (rs, x_real) = c.read_f32(f, "x_real", 4)?;
            for (name, s) in [("x", &xs), ("x_real", &rs)] {
                if s[..] != want {
                    return Err(Error::format(
                        f.path(),
                        format!("tensor {name:?} has shape {s:?}; the generator makes {want:?}"),
                    ));
                }
            }
            (n, z, x, x_real)
        }
        None => {
            let n = c.a.batch.unwrap_or(32);
            let len = checked_len(&[n, channels, size, size])?;
            let mut rng = SplitMix64::new(c.a.seed);
            let z = normal_vec(&mut rng, checked_len(&[n, p])?);
            let x = uniform_vec(&mut rng, len, 0.0, 1.0);
            let x_real = uniform_vec(&mut rng, len, 0.0, 1.0);
            (n, z, x, x_real)
        }
    };
    let batch = Batch {
        z: &z,
        x: &x,
        x_real: &x_real,
        shape: [n, channels, size, size],
    };
    // `cp2image train`'s defaults: Adam lr 2e-4, betas (0.5, 0.999).
    let adam = Method::Adam(AdamConfig {
        betas: (0.5, 0.999),
        ..AdamConfig::default()
    });
    let fresh = || -> Result<_> {
        let (g, d) = (g0.clone(), d0.clone());
        let (mut og, mut od) = (Optimizer::new(adam)?, Optimizer::new(adam)?);
        g.params.register(&mut og)?;
        d.params.register(&mut od)?;
        Ok((g, d, og, od))
    };
    let (times, losses) = time_iters(
        c.be,
        c.a.warmup,
        c.a.iters,
        fresh,
        |(mut g, mut d, mut og, mut od)| {
            train_step_on(c.be, &mut g, &mut d, &mut og, &mut od, 2e-4, &batch)
        },
    )?;
    if let Some(out) = out {
        out.add_slice("loss_g", &[], &[losses.loss_g])?;
        out.add_slice("loss_d", &[], &[losses.loss_d])?;
    }
    Ok(Measured {
        batch: n,
        shape: json!({"features": p, "channels": channels, "image_size": size}),
        flops: None,
        times,
    })
}

fn cp2image_generator(c: &Ctx, out: Option<&mut TensorWriter>) -> Result<Measured> {
    let be = c.be;
    let g = Generator::from_file(be, &c.a.weights()?)?;
    let p = g.config().n_features;
    let (n, data) = match c.input {
        Some(f) => {
            let (s, data) = c.read_f32(f, "input", 2)?;
            c.expect_dim(
                "input",
                &s,
                "the feature count p (from the weights)",
                s[1],
                p,
            )?;
            (c.agree("--batch", c.a.batch, "input", &s, s[0])?, data)
        }
        None => {
            let n = c.a.batch.unwrap_or(4096);
            let mut rng = SplitMix64::new(c.a.seed);
            (n, normal_vec(&mut rng, checked_len(&[n, p])?))
        }
    };
    let z = Tensor::from_vec(be, &[n, p], data)?;
    let (times, image) = time_simple(be, c.a, |()| g.forward(be, &z))?;
    if let Some(out) = out {
        out.add("image", &image)?;
    }
    Ok(Measured {
        batch: n,
        shape: json!({
            "features": p,
            "image_size": g.config().image_size(),
            "out_channels": g.config().out_channels,
        }),
        flops: None,
        times,
    })
}

fn conv(c: &Ctx, out: Option<&mut TensorWriter>) -> Result<Measured> {
    let (a, be) = (c.a, c.be);
    let params = Conv2dParams::new(a.stride.unwrap_or(1), a.pad.unwrap_or(0));
    let (xs, x, ws, w, b) = match c.input {
        Some(f) => {
            let (xs, x) = c.read_f32(f, "x", 4)?;
            let (ws, w) = c.read_f32(f, "w", 4)?;
            let (bs, b) = c.read_f32(f, "b", 1)?;
            c.agree("--batch", a.batch, "x", &xs, xs[0])?;
            c.agree("--c-in", a.c_in, "x", &xs, xs[1])?;
            c.agree("--height", a.height, "x", &xs, xs[2])?;
            c.agree("--width", a.width, "x", &xs, xs[3])?;
            c.agree("--c-out", a.c_out, "w", &ws, ws[0])?;
            c.expect_dim("w", &ws, "c_in (from x)", ws[1], xs[1])?;
            c.agree("--kernel", a.kernel, "w", &ws, ws[2])?;
            c.expect_dim(
                "w",
                &ws,
                "the kernel width (square kernels only)",
                ws[3],
                ws[2],
            )?;
            c.expect_dim("b", &bs, "c_out (from w)", bs[0], ws[0])?;
            (xs, x, ws, w, b)
        }
        None => {
            let need = |flag: &str, v: Option<usize>| {
                v.ok_or_else(|| {
                    Error::invalid(format!("bench conv needs {flag} (or --input with x, w, b)"))
                })
            };
            let n = a.batch.unwrap_or(64);
            let c_in = need("--c-in", a.c_in)?;
            let h = need("--height", a.height)?;
            let wd = need("--width", a.width)?;
            let c_out = need("--c-out", a.c_out)?;
            let k = need("--kernel", a.kernel)?;
            let xs = vec![n, c_in, h, wd];
            let ws = vec![c_out, c_in, k, k];
            let mut rng = SplitMix64::new(a.seed);
            let x = uniform_vec(&mut rng, checked_len(&xs)?, -1.0, 1.0);
            let scale = 1.0 / ((c_in * k * k) as f32).sqrt();
            let w = uniform_vec(&mut rng, checked_len(&ws)?, -scale, scale);
            let b = uniform_vec(&mut rng, c_out, -1.0, 1.0);
            (xs, x, ws, w, b)
        }
    };
    let g = Conv2dGeom::new(&xs, &ws, params)?;
    checked_len(&g.out_shape())?;
    let x = Tensor::from_vec(be, &xs, x)?;
    let w = Tensor::from_vec(be, &ws, w)?;
    let b = Tensor::from_vec(be, &[g.c_out], b)?;
    let mut y = Tensor::zeros(be, &g.out_shape())?;
    let (times, ()) = time_simple(be, a, |()| {
        ops::conv2d_into(be, &x, &w, Some(&b), params, &mut y)
    })?;
    if let Some(out) = out {
        out.add("y", &y)?;
    }
    let flops = 2.0 * (g.n * g.c_out * g.oh * g.ow) as f64 * (g.c_in * g.kh * g.kw) as f64;
    Ok(Measured {
        batch: g.n,
        shape: json!({
            "c_in": g.c_in,
            "height": g.h,
            "width": g.w,
            "c_out": g.c_out,
            "kernel": g.kh,
            "stride": g.stride_h,
            "pad": g.pad_h,
            "out_height": g.oh,
            "out_width": g.ow,
        }),
        flops: Some(flops),
        times,
    })
}

/// Transposes a row-major `[rows, cols]` matrix to `[cols, rows]`.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; data.len()];
    for (r, row) in data.chunks_exact(cols.max(1)).enumerate() {
        for (col, &v) in row.iter().enumerate() {
            t[col * rows + r] = v;
        }
    }
    t
}

fn vq_lookup(c: &Ctx, out: Option<&mut TensorWriter>) -> Result<Measured> {
    let (a, be) = (c.a, c.be);
    let (n, dim, codes, z, book) = match c.input {
        Some(f) => {
            let (zs, z) = c.read_f32(f, "z", 2)?;
            let (bs, book) = c.read_f32(f, "codebook", 2)?;
            let n = c.agree("--n", a.n, "z", &zs, zs[0])?;
            let dim = c.agree("--dim", a.dim, "z", &zs, zs[1])?;
            let codes = c.agree("--codes", a.codes, "codebook", &bs, bs[0])?;
            c.expect_dim("codebook", &bs, "dim (from z)", bs[1], dim)?;
            (n, dim, codes, z, book)
        }
        None => {
            let n = a.n.unwrap_or(65_536);
            let dim = a.dim.unwrap_or(64);
            let codes = a.codes.unwrap_or(512);
            let mut rng = SplitMix64::new(a.seed);
            let z = normal_vec(&mut rng, checked_len(&[n, dim])?);
            let book = normal_vec(&mut rng, checked_len(&[codes, dim])?);
            (n, dim, codes, z, book)
        }
    };
    if codes > i32::MAX as usize {
        return Err(Error::invalid(format!(
            "--codes {codes} does not fit 32-bit code ids"
        )));
    }
    // Our layout: the vectors as one image [1, dim, n] (channel-major, as the
    // VQ-VAE's feature maps), the codebook as [dim, codes].
    let x = Tensor::from_vec(be, &[1, dim, n], transpose(&z, n, dim))?;
    let cb = Codebook::new(
        be,
        Tensor::from_vec(be, &[dim, codes], transpose(&book, codes, dim))?,
    )?;
    let mut ids = Tensor::<i32>::zeros(be, &[1, n])?;
    let (times, ()) = time_simple(be, a, |()| {
        ops::vq_lookup_into(
            be,
            &x,
            &cb,
            VqOut {
                ids: &mut ids,
                quant: None,
                err: None,
            },
        )
    })?;
    if let Some(out) = out {
        out.add_slice("codes", &[n], &ids.to_vec()?)?;
    }
    Ok(Measured {
        batch: n,
        shape: json!({"n": n, "dim": dim, "codes": codes}),
        flops: Some(2.0 * n as f64 * codes as f64 * dim as f64),
        times,
    })
}

fn histogram(c: &Ctx, out: Option<&mut TensorWriter>) -> Result<Measured> {
    let (a, be) = (c.a, c.be);
    let bins = a.bins.unwrap_or(512);
    let segments = a.segments.unwrap_or(1);
    if bins > i32::MAX as usize {
        return Err(Error::invalid(format!(
            "--bins {bins} does not fit 32-bit codes"
        )));
    }
    let (n, codes) = match c.input {
        Some(f) => {
            let (s, raw) = f.i64("codes")?;
            if s.len() != 1 {
                return Err(Error::format(
                    f.path(),
                    format!("tensor \"codes\" has shape {s:?}; bench histogram needs [n]"),
                ));
            }
            let n = c.agree("--n", a.n, "codes", &s, s[0])?;
            let mut codes = Vec::with_capacity(raw.len());
            for (i, &v) in raw.iter().enumerate() {
                match i32::try_from(v) {
                    Ok(k) if v >= 0 && (v as usize) < bins => codes.push(k),
                    _ => {
                        return Err(Error::format(
                            f.path(),
                            format!(
                            "tensor \"codes\"[{i}] = {v} is outside [0, {bins}) (--bins {bins})"
                        ),
                        ))
                    }
                }
            }
            (n, codes)
        }
        None => {
            let n = a.n.unwrap_or(16_777_216);
            let mut rng = SplitMix64::new(a.seed);
            let codes = (0..n)
                .map(|_| (rng.next_u64() % bins as u64) as i32)
                .collect();
            (n, codes)
        }
    };
    if n % segments != 0 {
        return Err(Error::invalid(format!(
            "--segments {segments} must divide the {n} codes into equal shares"
        )));
    }
    // Segment s is row s of [segments, n / segments].
    let ids = Tensor::from_vec(be, &[segments, n / segments], codes)?;
    let (times, hist) = time_iters(
        be,
        a.warmup,
        a.iters,
        || Tensor::<i32>::zeros(be, &[segments, bins]),
        |mut hist| {
            ops::code_histogram_accumulate(be, &ids, None, &mut hist)?;
            Ok(hist)
        },
    )?;
    if let Some(out) = out {
        out.add("hist", &hist)?;
    }
    Ok(Measured {
        batch: n,
        shape: json!({"n": n, "bins": bins, "segments": segments}),
        flops: None,
        times,
    })
}

/// `len` values uniform in [lo, hi), drawn in f64 and rounded to f32.
fn uniform_vec(rng: &mut SplitMix64, len: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..len)
        .map(|_| rng.uniform(f64::from(lo), f64::from(hi)) as f32)
        .collect()
}

/// `len` standard normal values (Box–Muller).
fn normal_vec(rng: &mut SplitMix64, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.normal() as f32).collect()
}
