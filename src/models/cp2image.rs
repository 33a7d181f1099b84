//! CP2Image (Ji et al.; [reference](crate::reference) §3): single-cell images from CellProfiler
//! feature vectors, and the discriminator whose hidden layers its training
//! loss compares.
//!
//! ```text
//! Generator
//! z [N, p] (standardized features)
//!  └ fc Linear(p → c0·4·4), reshape ──────────── [N, c0, 4, 4]
//!     └ blocks.i: conv 3×3 pad 1 → BN → LeakyReLU(0.2) → upsample ×2
//!                                                 [N, c_{i+1}, 2s, 2s]  (i = 0..3)
//!        └ out: conv 3×3 pad 1 → sigmoid ──────── image [N, 3, 64, 64] in [0, 1]
//!
//! Discriminator
//! x [N, 3, 64, 64]
//!  └ blocks.i: spectral-norm conv 3×3 pad 1 → BN → LeakyReLU(0.2) → avg-pool 2
//!                                                 h_i [N, c_{i+1}, s/2, s/2]  (i = 0..4)
//!     └ flatten → fc Linear(c5·2·2 → 1) → sigmoid ─ prob [N, 1]
//! ```
//!
//! Channels and the number of blocks are read off the weights (so the image
//! side is 4·2^blocks for the generator, 64 with the paper's four blocks).
//!
//! Load-time folding: the spectral norm's `W / σ` (σ = uᵀ(W_mat v) with the
//! stored u and v, as PyTorch's `spectral_norm` at inference) and, by
//! default, each BatchNorm into the conv right before it
//! (`W' = W·γ/√(var+ε)`, `b' = (b − mean)·γ/√(var+ε) + β`, in f64), so a
//! block costs one conv and one activation. [`BatchNormMode::Separate`] keeps
//! the BatchNorm as its own op, exactly as PyTorch runs it; the tests compare
//! the two.

use std::fmt;
use std::path::Path;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::geometry::{Conv2dParams, Pool2dParams};
use crate::io::{TensorFile, TensorWriter};
use crate::models::batch::{for_each_batch, Gathered};
use crate::models::weights::{BatchNorm, Weights};
use crate::ops;
use crate::tensor::Tensor;

pub use crate::models::weights::BN_EPS;
/// Negative slope of every LeakyReLU.
pub const LEAKY_SLOPE: f32 = 0.2;
/// Side of the generator's first feature map (`fc` reshapes to `c0 × 4 × 4`).
pub const GENERATOR_SEED_SIZE: usize = 4;
/// Side of the discriminator's last feature map (`fc` reads `c5 × 2 × 2`).
pub const DISCRIMINATOR_FINAL_SIZE: usize = 2;

/// How the BatchNorm layers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BatchNormMode {
    /// Folded into the preceding convolution at load time (the fast path).
    #[default]
    Folded,
    /// A separate BatchNorm op after each convolution, as PyTorch runs it.
    Separate,
}

/// The generator's hyper-parameters, read off its weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratorConfig {
    /// Input features p (`fc.weight` is `[c0·16, p]`).
    pub n_features: usize,
    /// Channels c_0 … c_B of the seed map and the B blocks' outputs.
    pub channels: Vec<usize>,
    /// Channels of the output image (`out.weight` `[3, c_B, 3, 3]`).
    pub out_channels: usize,
}

impl GeneratorConfig {
    /// The paper's channels `(256, 128, 64, 32, 16)` for `n_features` inputs
    /// and 3 output channels.
    pub fn paper(n_features: usize) -> Self {
        GeneratorConfig {
            n_features,
            channels: vec![256, 128, 64, 32, 16],
            out_channels: 3,
        }
    }

    /// Number of conv/upsample blocks.
    pub fn n_blocks(&self) -> usize {
        self.channels.len().saturating_sub(1)
    }

    /// Side of the generated images: `4 · 2^blocks`.
    pub fn image_size(&self) -> usize {
        GENERATOR_SEED_SIZE << self.n_blocks()
    }

    /// Reads the configuration off a generator `state_dict`: p and c_0 from
    /// `fc.weight`, the blocks by counting `blocks.{i}.conv.weight`, the
    /// output channels from `out.weight`. All other shapes are checked on
    /// loading.
    pub fn from_weights(file: &TensorFile) -> Result<Self> {
        let fc = required_shape(file, "fc.weight", "generator")?;
        let seed_area = GENERATOR_SEED_SIZE * GENERATOR_SEED_SIZE;
        let (c0, p) = match fc.as_slice() {
            &[rows, p] if rows > 0 && rows.is_multiple_of(seed_area) && p > 0 => {
                (rows / seed_area, p)
            }
            _ => {
                return Err(Error::format(
                    file.path(),
                    format!("fc.weight has shape {fc:?}; the generator needs [c0·{seed_area}, p]"),
                ))
            }
        };
        let mut channels = vec![c0];
        while let Some(s) = file.shape(&format!("blocks.{}.conv.weight", channels.len() - 1)) {
            match s {
                &[c_out, _, 3, 3] if c_out > 0 => channels.push(c_out),
                _ => {
                    return Err(Error::format(
                        file.path(),
                        format!(
                            "blocks.{}.conv.weight has shape {s:?}; a 3×3 conv [c_out, c_in, 3, 3] is needed",
                            channels.len() - 1
                        ),
                    ))
                }
            }
        }
        if channels.len() < 2 {
            return Err(Error::format(
                file.path(),
                "no blocks.0.conv.weight: not a CP2Image generator state_dict",
            ));
        }
        let out = required_shape(file, "out.weight", "generator")?;
        let out_channels = match out.as_slice() {
            &[c, _, 3, 3] if c > 0 => c,
            _ => {
                return Err(Error::format(
                    file.path(),
                    format!(
                        "out.weight has shape {out:?}; a 3×3 conv [c_out, c_in, 3, 3] is needed"
                    ),
                ))
            }
        };
        Ok(GeneratorConfig {
            n_features: p,
            channels,
            out_channels,
        })
    }
}

impl fmt::Display for GeneratorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p = {}, channels {:?}, {} output channels, {}×{} images",
            self.n_features,
            self.channels,
            self.out_channels,
            self.image_size(),
            self.image_size()
        )
    }
}

/// The discriminator's hyper-parameters, read off its weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscriminatorConfig {
    /// Channels c_0 (image channels) … c_B of the input and the B blocks.
    pub channels: Vec<usize>,
    /// Side of the input images: `2 · 2^blocks` (64 for five blocks).
    pub image_size: usize,
}

impl DiscriminatorConfig {
    /// Number of conv/pool blocks.
    pub fn n_blocks(&self) -> usize {
        self.channels.len().saturating_sub(1)
    }

    /// Reads the configuration off a discriminator `state_dict`: the blocks
    /// by counting `blocks.{i}.conv.weight_orig`, the image size from the
    /// blocks and `fc.weight` `[1, c_B·2·2]`.
    pub fn from_weights(file: &TensorFile) -> Result<Self> {
        let mut channels = Vec::new();
        for i in 0.. {
            let Some(s) = file.shape(&format!("blocks.{i}.conv.weight_orig")) else {
                break;
            };
            match s {
                &[c_out, c_in, 3, 3] if c_out > 0 && c_in > 0 => {
                    if i == 0 {
                        channels.push(c_in);
                    }
                    channels.push(c_out);
                }
                _ => {
                    return Err(Error::format(
                        file.path(),
                        format!(
                            "blocks.{i}.conv.weight_orig has shape {s:?}; a 3×3 conv [c_out, c_in, 3, 3] is needed"
                        ),
                    ))
                }
            }
        }
        if channels.len() < 2 {
            return Err(Error::format(
                file.path(),
                "no blocks.0.conv.weight_orig: not a CP2Image discriminator state_dict (spectral-normalized convs)",
            ));
        }
        let blocks = channels.len() - 1;
        let c_last = channels[blocks];
        let fc = required_shape(file, "fc.weight", "discriminator")?;
        let fin = DISCRIMINATOR_FINAL_SIZE;
        match fc.as_slice() {
            &[1, n] if n == c_last * fin * fin => {}
            _ => {
                return Err(Error::format(
                    file.path(),
                    format!(
                        "fc.weight has shape {fc:?}; after {blocks} blocks ending in {c_last} channels it must be [1, {}]",
                        c_last * fin * fin
                    ),
                ))
            }
        }
        Ok(DiscriminatorConfig {
            channels,
            image_size: fin << blocks,
        })
    }
}

impl fmt::Display for DiscriminatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "channels {:?}, {}×{} images",
            self.channels, self.image_size, self.image_size
        )
    }
}

/// The shape of `name`, or an error saying which model needs it.
fn required_shape(file: &TensorFile, name: &str, model: &str) -> Result<Vec<usize>> {
    file.shape(name).map(<[usize]>::to_vec).ok_or_else(|| {
        Error::format(
            file.path(),
            format!("missing tensor {name:?}: not a CP2Image {model} state_dict"),
        )
    })
}

/// Reads host copies of tensors through the checked reader, which remembers
/// which were read so that leftovers (another architecture) are reported.
struct Loader<'a> {
    w: Weights<'a>,
}

impl<'a> Loader<'a> {
    fn new(file: &'a TensorFile) -> Self {
        Loader {
            w: Weights::new(file).shapes_from("the channels read off the other weights"),
        }
    }

    /// `name`'s values, which must have `shape` (see [`Weights::host`]).
    fn read(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.w.host(name, shape)
    }

    /// [`Loader::read`] for a tensor that may be absent.
    fn read_optional(&mut self, name: &str, shape: &[usize]) -> Result<Option<Vec<f32>>> {
        self.w.host_optional(name, shape)
    }

    /// A 3×3 conv `prefix.weight` `[c_out, c_in, 3, 3]` with its optional
    /// bias (zeros when absent, as `Conv2d(bias=False)` before a BatchNorm).
    fn conv(&mut self, prefix: &str, c_in: usize, c_out: usize) -> Result<HostConv> {
        let w = self.read(&format!("{prefix}.weight"), &[c_out, c_in, 3, 3])?;
        let b = self.read_optional(&format!("{prefix}.bias"), &[c_out])?;
        Ok(HostConv {
            w,
            b: b.unwrap_or_else(|| vec![0.0; c_out]),
            c_in,
            c_out,
        })
    }

    /// A spectral-normalized 3×3 conv (`weight_orig`, `weight_u`,
    /// `weight_v`, optional `bias`), returned with `W / σ` applied.
    fn sn_conv(&mut self, prefix: &str, c_in: usize, c_out: usize) -> Result<HostConv> {
        let k = c_in * 9;
        let w = self.read(&format!("{prefix}.weight_orig"), &[c_out, c_in, 3, 3])?;
        let u = self.read(&format!("{prefix}.weight_u"), &[c_out])?;
        let v = self.read(&format!("{prefix}.weight_v"), &[k])?;
        let b = self.read_optional(&format!("{prefix}.bias"), &[c_out])?;
        let sigma = spectral_sigma(&w, &u, &v);
        if !(sigma.is_finite() && sigma != 0.0) {
            return Err(Error::format(
                self.w.file().path(),
                format!("{prefix}: spectral norm σ = uᵀ(W v) = {sigma} cannot divide the weight"),
            ));
        }
        Ok(HostConv {
            w: w.iter().map(|&x| (f64::from(x) / sigma) as f32).collect(),
            b: b.unwrap_or_else(|| vec![0.0; c_out]),
            c_in,
            c_out,
        })
    }

    /// A `BatchNorm2d(c)` under `prefix` (see [`Weights::batchnorm`]).
    fn batchnorm(&mut self, prefix: &str, c: usize) -> Result<BatchNorm> {
        self.w.batchnorm(prefix, c)
    }

    /// Fails when the file holds tensors the model did not read.
    fn finish(self, model: &str) -> Result<()> {
        self.w
            .reject_leftovers(&format!("are not part of this {model}"))
    }
}

/// σ = uᵀ(W_mat v) with `W_mat` = `w` as `[u.len(), v.len()]`, in f64.
fn spectral_sigma(w: &[f32], u: &[f32], v: &[f32]) -> f64 {
    w.chunks_exact(v.len().max(1))
        .zip(u)
        .map(|(row, &ui)| {
            let wv: f64 = row
                .iter()
                .zip(v)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            f64::from(ui) * wv
        })
        .sum()
}

/// A conv's weight `[c_out, c_in, 3, 3]` and bias `[c_out]` on the host.
struct HostConv {
    w: Vec<f32>,
    b: Vec<f32>,
    c_in: usize,
    c_out: usize,
}

impl HostConv {
    /// Folds `bn` (applied right after this conv) into the weight and bias
    /// with [`BatchNorm::fold_into_conv`]: per output channel
    /// `s = γ/√(var + ε)`, `W' = W·s`, `b' = (b − mean)·s + β`.
    fn fold(mut self, bn: &BatchNorm) -> Result<Self> {
        bn.fold_into_conv(&mut self.w, &mut self.b)?;
        Ok(self)
    }

    fn upload(self, be: &Backend, bn: Option<BatchNorm>, mode: BatchNormMode) -> Result<ConvBn> {
        let (conv, bn) = match (bn, mode) {
            (Some(bn), BatchNormMode::Folded) => (self.fold(&bn)?, None),
            (bn, _) => (self, bn),
        };
        let c = conv.c_out;
        let bn = bn
            .map(|bn| {
                Ok::<_, Error>(DeviceBn {
                    gamma: Tensor::from_vec(be, &[c], bn.gamma)?,
                    beta: Tensor::from_vec(be, &[c], bn.beta)?,
                    mean: Tensor::from_vec(be, &[c], bn.mean)?,
                    var: Tensor::from_vec(be, &[c], bn.var)?,
                })
            })
            .transpose()?;
        Ok(ConvBn {
            w: Tensor::from_vec(be, &[conv.c_out, conv.c_in, 3, 3], conv.w)?,
            b: Tensor::from_vec(be, &[conv.c_out], conv.b)?,
            bn,
        })
    }
}

#[derive(Debug)]
struct DeviceBn {
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    var: Tensor,
}

/// A 3×3 pad-1 conv followed by its BatchNorm (folded in, or separate).
#[derive(Debug)]
struct ConvBn {
    w: Tensor,
    b: Tensor,
    bn: Option<DeviceBn>,
}

impl ConvBn {
    /// `leaky?(bn(conv(up2?(x))))`: with the BatchNorm folded, one fused
    /// conv (`up2` read in the gather, LeakyReLU in the epilogue); with a
    /// separate BatchNorm, the ops one after the other.
    fn forward_fused(
        &self,
        be: &Backend,
        x: &Tensor,
        up2: bool,
        leaky: Option<f32>,
    ) -> Result<Tensor> {
        if self.bn.is_some() {
            let up;
            let x = if up2 {
                up = ops::upsample_nearest2x(be, x)?;
                &up
            } else {
                x
            };
            let y = self.forward(be, x)?;
            return match leaky {
                Some(slope) => ops::leaky_relu(be, &y, slope),
                None => Ok(y),
            };
        }
        let (&[n, _, h, w], &[c_out, ..]) = (x.shape(), self.w.shape()) else {
            return Err(Error::shape(
                "cp2image conv",
                format!("input must be [N, c, h, w], got {:?}", x.shape()),
            ));
        };
        let (oh, ow) = if up2 { (2 * h, 2 * w) } else { (h, w) };
        let mut y = Tensor::zeros(be, &[n, c_out, oh, ow])?;
        let conv = ops::FusedConv2d {
            weight: &self.w,
            bias: Some(&self.b),
            params: Conv2dParams::new(1, 1),
            input_bn_relu: None,
            input_pool2: false,
            relu: false,
            input_upsample2: up2,
            leaky_relu: leaky,
        };
        ops::conv2d_fused_into(be, x, &conv, &mut y, 0)?;
        Ok(y)
    }

    /// `bn(conv(x))`, shape `[N, c_out, h, w]`.
    fn forward(&self, be: &Backend, x: &Tensor) -> Result<Tensor> {
        let y = ops::conv2d(be, x, &self.w, Some(&self.b), Conv2dParams::new(1, 1))?;
        match &self.bn {
            None => Ok(y),
            Some(bn) => ops::batchnorm(be, &y, &bn.gamma, &bn.beta, &bn.mean, &bn.var, BN_EPS),
        }
    }
}

/// Checks `x` is `[N, rest…]`, naming the model.
fn check_input(op: &'static str, x: &Tensor, rest: &[usize], what: &str) -> Result<()> {
    match x.shape().split_first() {
        Some((_, r)) if r == rest => Ok(()),
        _ => Err(Error::shape(
            op,
            format!("input must be {what} [N, {rest:?}], got {:?}", x.shape()),
        )),
    }
}

/// The CP2Image generator with its weights on one device.
#[derive(Debug)]
pub struct Generator {
    config: GeneratorConfig,
    fc_w: Tensor,
    fc_b: Tensor,
    blocks: Vec<ConvBn>,
    out: ConvBn,
}

impl Generator {
    /// Loads a generator `state_dict` (safetensors) onto `be`'s device with
    /// the BatchNorms folded into the convs.
    pub fn load(be: &Backend, path: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(be, &TensorFile::open(path)?)
    }

    /// [`Generator::load`] from an opened file.
    pub fn from_file(be: &Backend, file: &TensorFile) -> Result<Self> {
        Self::from_file_with(be, file, BatchNormMode::Folded)
    }

    /// Loads with the BatchNorms folded or separate. Errors name the file
    /// and the tensor: a missing key, a shape that disagrees with the
    /// channels read off the other weights, a non-finite value, or tensors
    /// this architecture does not have.
    pub fn from_file_with(be: &Backend, file: &TensorFile, mode: BatchNormMode) -> Result<Self> {
        let config = GeneratorConfig::from_weights(file)?;
        let ch = &config.channels;
        let seed_area = GENERATOR_SEED_SIZE * GENERATOR_SEED_SIZE;
        let mut ld = Loader::new(file);
        let fc_rows = ch[0] * seed_area;
        let fc_w = ld.read("fc.weight", &[fc_rows, config.n_features])?;
        let fc_b = ld
            .read_optional("fc.bias", &[fc_rows])?
            .unwrap_or_else(|| vec![0.0; fc_rows]);
        let blocks = ch
            .windows(2)
            .enumerate()
            .map(|(i, c)| {
                let conv = ld.conv(&format!("blocks.{i}.conv"), c[0], c[1])?;
                let bn = ld.batchnorm(&format!("blocks.{i}.bn"), c[1])?;
                conv.upload(be, Some(bn), mode)
            })
            .collect::<Result<Vec<_>>>()?;
        let c_last = ch[ch.len() - 1];
        let out = ld
            .conv("out", c_last, config.out_channels)?
            .upload(be, None, mode)?;
        ld.finish("CP2Image generator")?;
        Ok(Generator {
            fc_w: Tensor::from_vec(be, &[fc_rows, config.n_features], fc_w)?,
            fc_b: Tensor::from_vec(be, &[fc_rows], fc_b)?,
            blocks,
            out,
            config,
        })
    }

    /// The hyper-parameters read off the weights.
    pub fn config(&self) -> &GeneratorConfig {
        &self.config
    }

    /// Images `[N, out_channels, S, S]` in [0, 1] from standardized feature
    /// vectors `z` `[N, p]` on `be`'s device.
    pub fn forward(&self, be: &Backend, z: &Tensor) -> Result<Tensor> {
        let p = self.config.n_features;
        check_input(
            "cp2image generator",
            z,
            &[p],
            "standardized feature vectors",
        )?;
        let n = z.shape()[0];
        let s = GENERATOR_SEED_SIZE;
        let mut h = ops::linear(be, z, &self.fc_w, Some(&self.fc_b))? // [N, c0·16]
            .reshape(&[n, self.config.channels[0], s, s])?; // [N, c0, 4, 4]
                                                            // `h` is read through a 2× upsampling from the second block on: with
                                                            // folded BatchNorms the upsampling happens in the next conv's gather
                                                            // and the LeakyReLU in the conv's epilogue, so neither the upsampled
                                                            // tensor nor the pre-activation is ever written.
        let mut upsampled = false;
        for block in &self.blocks {
            h = block.forward_fused(be, &h, upsampled, Some(LEAKY_SLOPE))?; // [N, c_{i+1}, s, s]
            upsampled = true;
        }
        let y = self.out.forward_fused(be, &h, upsampled, None)?; // [N, 3, S, S]
        drop(h);
        ops::sigmoid(be, &y)
    }
}

/// What the discriminator computes for a batch.
#[derive(Debug)]
pub struct DiscriminatorOutput {
    /// Probability that each image is real, `[N, 1]`.
    pub prob: Tensor,
    /// Block outputs h_0 … h_{B−1} (after pooling), `[N, c_{i+1}, S/2^{i+1}, S/2^{i+1}]`.
    pub hidden: Vec<Tensor>,
}

/// The CP2Image discriminator with its weights on one device.
#[derive(Debug)]
pub struct Discriminator {
    config: DiscriminatorConfig,
    blocks: Vec<ConvBn>,
    fc_w: Tensor,
    fc_b: Tensor,
}

impl Discriminator {
    /// Loads a discriminator `state_dict` (safetensors) onto `be`'s device,
    /// spectral norms applied and BatchNorms folded into the convs.
    pub fn load(be: &Backend, path: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(be, &TensorFile::open(path)?)
    }

    /// [`Discriminator::load`] from an opened file.
    pub fn from_file(be: &Backend, file: &TensorFile) -> Result<Self> {
        Self::from_file_with(be, file, BatchNormMode::Folded)
    }

    /// Loads with the BatchNorms folded or separate (the spectral norm is
    /// always applied to the weight at load time). Errors as
    /// [`Generator::from_file_with`], plus a σ that is zero or not finite.
    pub fn from_file_with(be: &Backend, file: &TensorFile, mode: BatchNormMode) -> Result<Self> {
        let config = DiscriminatorConfig::from_weights(file)?;
        let ch = &config.channels;
        let mut ld = Loader::new(file);
        let blocks = ch
            .windows(2)
            .enumerate()
            .map(|(i, c)| {
                let conv = ld.sn_conv(&format!("blocks.{i}.conv"), c[0], c[1])?;
                let bn = ld.batchnorm(&format!("blocks.{i}.bn"), c[1])?;
                conv.upload(be, Some(bn), mode)
            })
            .collect::<Result<Vec<_>>>()?;
        let fin = DISCRIMINATOR_FINAL_SIZE;
        let fc_in = ch[ch.len() - 1] * fin * fin;
        let fc_w = ld.read("fc.weight", &[1, fc_in])?;
        let fc_b = ld
            .read_optional("fc.bias", &[1])?
            .unwrap_or_else(|| vec![0.0]);
        ld.finish("CP2Image discriminator")?;
        Ok(Discriminator {
            fc_w: Tensor::from_vec(be, &[1, fc_in], fc_w)?,
            fc_b: Tensor::from_vec(be, &[1], fc_b)?,
            blocks,
            config,
        })
    }

    /// The hyper-parameters read off the weights.
    pub fn config(&self) -> &DiscriminatorConfig {
        &self.config
    }

    /// The probability of being real and the hidden representations of
    /// images `x` `[N, c_0, S, S]` on `be`'s device.
    pub fn forward(&self, be: &Backend, x: &Tensor) -> Result<DiscriminatorOutput> {
        let (c0, s) = (self.config.channels[0], self.config.image_size);
        check_input("cp2image discriminator", x, &[c0, s, s], "images")?;
        let n = x.shape()[0];
        let pool = Pool2dParams::new(2, 2, 0);
        let mut hidden: Vec<Tensor> = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let input = hidden.last().unwrap_or(x);
            let y = block.forward(be, input)?; // [N, c_{i+1}, s, s]
            let y = ops::leaky_relu(be, &y, LEAKY_SLOPE)?;
            hidden.push(ops::avg_pool2d(be, &y, pool)?); // [N, c_{i+1}, s/2, s/2]
        }
        let last = hidden
            .pop()
            .ok_or_else(|| Error::invalid("cp2image discriminator: no blocks"))?;
        let map_shape = last.shape().to_vec();
        let flat = last.reshape(&[n, self.fc_w.shape()[1]])?; // [N, c_B·2·2]
        let logit = ops::linear(be, &flat, &self.fc_w, Some(&self.fc_b))?; // [N, 1]
        hidden.push(flat.reshape(&map_shape)?);
        Ok(DiscriminatorOutput {
            prob: ops::sigmoid(be, &logit)?,
            hidden,
        })
    }
}

/// `cellmorph infer --model cp2image-generator`: loads the generator from
/// `weights`, runs `input` `[N, p]` (standardized features) in batches of
/// `batch_size` and adds `image` `[N, 3, S, S]` to `out`.
pub fn infer_generator(
    be: &Backend,
    weights: &TensorFile,
    input: &Tensor,
    batch_size: usize,
    out: &mut TensorWriter,
) -> Result<()> {
    let g = Generator::from_file(be, weights)?;
    check_input(
        "cp2image generator",
        input,
        &[g.config.n_features],
        "standardized feature vectors",
    )?;
    let mut gathered = Gathered::new();
    for_each_batch(be, input.shape(), &input.to_vec()?, batch_size, |z, _| {
        gathered.push("image", &g.forward(be, z)?)
    })?;
    gathered.write_into(out)
}

/// `cellmorph infer --model cp2image-discriminator`: loads the discriminator
/// from `weights`, runs `input` `[N, 3, S, S]` in batches of `batch_size`
/// and adds `prob` `[N, 1]` and `hidden.0` … `hidden.{B−1}` to `out`.
pub fn infer_discriminator(
    be: &Backend,
    weights: &TensorFile,
    input: &Tensor,
    batch_size: usize,
    out: &mut TensorWriter,
) -> Result<()> {
    let d = Discriminator::from_file(be, weights)?;
    let (c0, s) = (d.config.channels[0], d.config.image_size);
    check_input("cp2image discriminator", input, &[c0, s, s], "images")?;
    let mut gathered = Gathered::new();
    for_each_batch(be, input.shape(), &input.to_vec()?, batch_size, |x, _| {
        let o = d.forward(be, x)?;
        gathered.push("prob", &o.prob)?;
        for (i, h) in o.hidden.iter().enumerate() {
            gathered.push(&format!("hidden.{i}"), h)?;
        }
        Ok(())
    })?;
    gathered.write_into(out)
}

/// The most values [`random_generator_weights`] draws (1 GiB of f32).
pub const MAX_RANDOM_PARAMETERS: usize = 1 << 28;

/// The number of weights of a generator with `config` (fc, and per block
/// a 3×3 conv with bias and four BatchNorm vectors), or `None` on overflow.
fn generator_parameter_count(config: &GeneratorConfig) -> Option<usize> {
    let ch = &config.channels;
    let area = GENERATOR_SEED_SIZE * GENERATOR_SEED_SIZE;
    let fc = ch[0]
        .checked_mul(area)?
        .checked_mul(config.n_features.checked_add(1)?)?;
    ch.windows(2).try_fold(fc, |acc, c| {
        let conv = c[1].checked_mul(c[0])?.checked_mul(9)?.checked_add(c[1])?;
        acc.checked_add(conv)?.checked_add(c[1].checked_mul(4)?)
    })
}

/// A generator `state_dict` with seeded random weights (untrained), for
/// examples and benchmarks where no trained generator exists: conv and
/// linear weights uniform with the variance of He initialization for
/// LeakyReLU(0.2) (so activations keep their scale through the blocks and
/// the images show structure), biases zero, BatchNorm the identity
/// (γ = 1, β = 0, mean 0, var 1). The file's metadata says it is untrained
/// (see [`is_untrained`]).
pub fn random_generator_weights(config: &GeneratorConfig, seed: u64) -> Result<TensorWriter> {
    if config.n_features == 0 || config.channels.len() < 2 || config.channels.contains(&0) {
        return Err(Error::invalid(format!(
            "random generator weights need p ≥ 1 and at least two nonzero channel counts, got {config}"
        )));
    }
    let n = generator_parameter_count(config).filter(|&n| n <= MAX_RANDOM_PARAMETERS);
    if n.is_none() {
        return Err(Error::invalid(format!(
            "random generator weights for {config} would hold more than {MAX_RANDOM_PARAMETERS} values (1 GiB of f32); use fewer features or channels"
        )));
    }
    let mut rng = crate::rng::SplitMix64::new(seed);
    let leaky_gain2 = 2.0 / (1.0 + f64::from(LEAKY_SLOPE).powi(2));
    let mut uniform = |shape: &[usize], fan_in: usize, gain2: f64| -> Vec<f32> {
        let bound = (3.0 * gain2 / fan_in as f64).sqrt();
        let n: usize = shape.iter().product();
        (0..n).map(|_| rng.uniform(-bound, bound) as f32).collect()
    };
    let mut w = TensorWriter::new();
    let ch = &config.channels;
    let seed_area = GENERATOR_SEED_SIZE * GENERATOR_SEED_SIZE;
    let fc_shape = [ch[0] * seed_area, config.n_features];
    // fc feeds a conv without an activation in between: unit gain.
    w.add_slice(
        "fc.weight",
        &fc_shape,
        &uniform(&fc_shape, config.n_features, 1.0),
    )?;
    w.add_slice("fc.bias", &[fc_shape[0]], &vec![0.0f32; fc_shape[0]])?;
    for (i, c) in ch.windows(2).enumerate() {
        let shape = [c[1], c[0], 3, 3];
        w.add_slice(
            &format!("blocks.{i}.conv.weight"),
            &shape,
            &uniform(&shape, c[0] * 9, leaky_gain2),
        )?;
        w.add_slice(
            &format!("blocks.{i}.conv.bias"),
            &[c[1]],
            &vec![0.0f32; c[1]],
        )?;
        fresh_batchnorm(&mut w, &format!("blocks.{i}.bn"), c[1])?;
    }
    let c_last = ch[ch.len() - 1];
    let out_shape = [config.out_channels, c_last, 3, 3];
    w.add_slice(
        "out.weight",
        &out_shape,
        &uniform(&out_shape, c_last * 9, 1.0),
    )?;
    w.add_slice(
        "out.bias",
        &[config.out_channels],
        &vec![0.0f32; config.out_channels],
    )?;
    w.set_metadata(
        UNTRAINED_KEY,
        &format!("seeded random weights (seed {seed}), not trained"),
    );
    Ok(w)
}

/// Seeded weights for a discriminator with `channels` (`c_0` = image
/// channels, then one per block), as PyTorch initializes them: convolution
/// and linear weights uniform in ±1/√fan_in (`kaiming_uniform_(a=√5)`),
/// biases likewise, BatchNorm at (1, 0) with running (0, 1), and the
/// spectral norm's `weight_u`, `weight_v` normalized N(0, 1) draws. The
/// input side is `2 · 2^blocks`.
pub fn random_discriminator_weights(channels: &[usize], seed: u64) -> Result<TensorWriter> {
    if channels.len() < 2 || channels.contains(&0) {
        return Err(Error::invalid(format!(
            "a discriminator needs image channels and at least one block, all nonzero; got {channels:?}"
        )));
    }
    let total = channels.windows(2).try_fold(0usize, |acc, c| {
        acc.checked_add(c[0].checked_mul(c[1])?.checked_mul(9)?)
    });
    if total.is_none_or(|t| t > MAX_RANDOM_PARAMETERS) {
        return Err(Error::invalid(format!(
            "random discriminator weights for channels {channels:?} would hold more than {MAX_RANDOM_PARAMETERS} values"
        )));
    }
    let mut rng = crate::rng::SplitMix64::new(seed ^ 0xD15C_0000);
    let mut uniform = |n: usize, fan_in: usize| -> Vec<f32> {
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        (0..n).map(|_| rng.uniform(-bound, bound) as f32).collect()
    };
    let mut w = TensorWriter::new();
    let mut unit = Vec::new();
    for (i, c) in channels.windows(2).enumerate() {
        let fan_in = c[0] * 9;
        w.add_slice(
            &format!("blocks.{i}.conv.weight_orig"),
            &[c[1], c[0], 3, 3],
            &uniform(c[1] * fan_in, fan_in),
        )?;
        w.add_slice(
            &format!("blocks.{i}.conv.bias"),
            &[c[1]],
            &uniform(c[1], fan_in),
        )?;
        unit.push((format!("blocks.{i}.conv.weight_u"), c[1]));
        unit.push((format!("blocks.{i}.conv.weight_v"), fan_in));
        fresh_batchnorm(&mut w, &format!("blocks.{i}.bn"), c[1])?;
    }
    let last = channels[channels.len() - 1];
    let area = DISCRIMINATOR_FINAL_SIZE * DISCRIMINATOR_FINAL_SIZE;
    w.add_slice(
        "fc.weight",
        &[1, last * area],
        &uniform(last * area, last * area),
    )?;
    w.add_slice("fc.bias", &[1], &uniform(1, last * area))?;
    let mut normal = crate::rng::SplitMix64::new(seed ^ 0x5EC7_0000);
    for (name, n) in unit {
        let v: Vec<f64> = (0..n).map(|_| normal.normal()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        let v: Vec<f32> = v.iter().map(|x| (x / norm) as f32).collect();
        w.add_slice(&name, &[n], &v)?;
    }
    w.set_metadata(
        UNTRAINED_KEY,
        &format!("seeded random discriminator weights (seed {seed}), not trained"),
    );
    Ok(w)
}

/// A BatchNorm as PyTorch creates it: weight 1, bias 0, running (0, 1), no
/// batches tracked.
fn fresh_batchnorm(w: &mut TensorWriter, prefix: &str, c: usize) -> Result<()> {
    for (name, v) in [
        ("weight", 1.0f32),
        ("bias", 0.0),
        ("running_mean", 0.0),
        ("running_var", 1.0),
    ] {
        w.add_slice(&format!("{prefix}.{name}"), &[c], &vec![v; c])?;
    }
    w.add_slice(&format!("{prefix}.num_batches_tracked"), &[], &[0i64])
}

/// Metadata key marking weights written by [`random_generator_weights`].
pub const UNTRAINED_KEY: &str = "cellmorph.untrained";

/// The untrained-weights note of `file`, when it was written by
/// [`random_generator_weights`].
pub fn is_untrained(file: &TensorFile) -> Option<&str> {
    file.metadata()
        .and_then(|m| m.get(UNTRAINED_KEY))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spectral_sigma_is_u_w_v() {
        // W = [[1, 2], [3, 4]], u = [1, 0.5], v = [0.5, -1]: W v = [-1.5, -2.5],
        // uᵀ(W v) = -1.5 − 1.25.
        let s = spectral_sigma(&[1.0, 2.0, 3.0, 4.0], &[1.0, 0.5], &[0.5, -1.0]);
        assert!((s + 2.75).abs() < 1e-12, "{s}");
    }

    #[test]
    fn folding_matches_conv_then_batchnorm_on_a_constant_input() {
        // With x = 1 everywhere (no padding touched at the centre) the conv
        // gives Σ W + b per channel; BN then maps it per channel.
        let conv = HostConv {
            w: (0..18).map(|i| i as f32 * 0.1 - 0.7).collect(),
            b: vec![0.3, -0.2],
            c_in: 1,
            c_out: 2,
        };
        let bn = BatchNorm {
            gamma: vec![1.5, -0.5],
            beta: vec![0.1, 0.2],
            mean: vec![0.4, -1.0],
            var: vec![2.0, 0.25],
        };
        let sums: Vec<f64> = conv
            .w
            .chunks(9)
            .zip(&conv.b)
            .map(|(r, &b)| r.iter().map(|&v| f64::from(v)).sum::<f64>() + f64::from(b))
            .collect();
        let folded = conv.fold(&bn).unwrap();
        for (o, &sum) in sums.iter().enumerate() {
            let want = (sum - f64::from(bn.mean[o]))
                / (f64::from(bn.var[o]) + f64::from(BN_EPS)).sqrt()
                * f64::from(bn.gamma[o])
                + f64::from(bn.beta[o]);
            let got: f64 = folded.w[o * 9..(o + 1) * 9]
                .iter()
                .map(|&v| f64::from(v))
                .sum::<f64>()
                + f64::from(folded.b[o]);
            assert!((got - want).abs() < 1e-5, "channel {o}: {got} vs {want}");
        }
    }
}
