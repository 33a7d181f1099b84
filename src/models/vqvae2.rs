//! VQ-VAE-2 in the `vq-vae-2-pytorch` layout ([reference](crate::reference) §1), as used by
//! Wakui et al. 2023 for expression-from-morphology features.
//!
//! ```text
//! x [N, in, H, W]
//!  └ enc_b: Encoder stride 4 ─────────────── enc_b [N, c, H/4, W/4] ──────────┐
//!     └ enc_t: Encoder stride 2 ──────────── enc_t [N, c, H/8, W/8]            │
//!        └ quantize_conv_t (1×1) ─────────── pre_t [N, D, H/8, W/8]            │
//!           └ quantize_t ─────────────────── quant_t, id_t [N, H/8, W/8]       │
//!              └ dec_t: Decoder stride 2 ─── [N, D, H/4, W/4] ─ concat ────────┘
//!                 └ quantize_conv_b (1×1) ── pre_b [N, D, H/4, W/4]
//!                    └ quantize_b ────────── quant_b, id_b [N, H/4, W/4]
//! decode: concat(upsample_t(quant_t), quant_b) [N, 2D, H/4, W/4]
//!          └ dec: Decoder stride 4 ───────── dec [N, in, H, W]
//! ```
//!
//! Every hyper-parameter is read off the weights' names and shapes; weights
//! stay on the device they were loaded to and every method takes that
//! device's [`Backend`]. Intermediates are dropped as soon as the next layer
//! has consumed them, so device memory stays near the few largest
//! activations of one batch.

use std::fmt;
use std::path::Path;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::geometry::{Conv2dParams, ConvTranspose2dParams};
use crate::io::TensorFile;
use crate::models::weights::Weights;
use crate::ops::{
    self, code_histogram, concat_channels, relu, relu_inplace, vq_lookup, vq_lookup_hist_into,
    vq_lookup_into, Codebook, VqOut, VqOutput,
};
use crate::tensor::Tensor;

/// The hyper-parameters of a VQ-VAE-2, all read off its weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VqVae2Config {
    /// Image channels (1 for phase contrast).
    pub in_channel: usize,
    /// Encoder/decoder width (128 in the paper).
    pub channel: usize,
    /// Residual blocks per encoder/decoder (2).
    pub n_res_block: usize,
    /// Width inside a residual block (32); 0 when there are no residual blocks.
    pub n_res_channel: usize,
    /// Code vector length D (64).
    pub embed_dim: usize,
    /// Codes per codebook K (64).
    pub n_embed: usize,
}

impl fmt::Display for VqVae2Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "in_channel {}, channel {}, n_res_block {}, n_res_channel {}, embed_dim {}, n_embed {}",
            self.in_channel,
            self.channel,
            self.n_res_block,
            self.n_res_channel,
            self.embed_dim,
            self.n_embed
        )
    }
}

impl VqVae2Config {
    /// Reads the hyper-parameters off the tensor names and shapes of a
    /// vq-vae-2-pytorch `state_dict`: `in_channel` and `channel` from
    /// `enc_b.blocks.{0,2}.weight`, `n_res_block` by counting residual blocks
    /// (the same count in all four encoders/decoders), `n_res_channel` from
    /// the first one, `embed_dim` and `n_embed` from `quantize_t.embed`. The
    /// shapes of all other tensors are checked when the model is loaded.
    pub fn from_weights(file: &TensorFile) -> Result<Self> {
        let shape = |name: &str| -> Result<Vec<usize>> {
            file.shape(name).map(<[usize]>::to_vec).ok_or_else(|| {
                Error::format(
                    file.path(),
                    format!("missing tensor {name:?}: not a vq-vae-2-pytorch VQVAE state_dict"),
                )
            })
        };
        let bad = |msg: String| Error::format(file.path(), msg);

        let first = shape("enc_b.blocks.0.weight")?;
        let second = shape("enc_b.blocks.2.weight")?;
        let (half, in_channel, channel, second_in) = match (first.as_slice(), second.as_slice()) {
            (&[half, inc, 4, 4], &[c, half2, 4, 4]) => (half, inc, c, half2),
            _ => {
                return Err(bad(format!(
                    "enc_b.blocks.0.weight {first:?} and enc_b.blocks.2.weight {second:?} are not 4×4 convolutions [c/2, in, 4, 4] and [c, c/2, 4, 4]"
                )))
            }
        };
        if half != channel / 2 || second_in != half || channel < 2 {
            return Err(bad(format!(
                "enc_b.blocks.0.weight {first:?} should have channel/2 outputs where enc_b.blocks.2.weight {second:?} gives channel = {channel}"
            )));
        }

        let count = |prefix: &str, first_block: usize| {
            (0..)
                .take_while(|i| {
                    file.contains(&format!(
                        "{prefix}.blocks.{}.conv.1.weight",
                        first_block + i
                    ))
                })
                .count()
        };
        let n_res_block = count("enc_b", 5);
        let with_decoder = has_decoder(file);
        for (prefix, first_block) in [("enc_t", 3), ("dec_t", 1), ("dec", 1)] {
            if prefix == "dec" && !with_decoder {
                continue;
            }
            let n = count(prefix, first_block);
            if n != n_res_block {
                return Err(bad(format!(
                    "enc_b has {n_res_block} residual blocks but {prefix} has {n}; every encoder and decoder has the same number"
                )));
            }
        }
        let n_res_channel = if n_res_block == 0 {
            0
        } else {
            shape("enc_b.blocks.5.conv.1.weight")?[0]
        };

        let embed = shape("quantize_t.embed")?;
        let (embed_dim, n_embed) = match embed.as_slice() {
            &[d, k] if d > 0 && k > 0 => (d, k),
            _ => {
                return Err(bad(format!(
                    "quantize_t.embed has shape {embed:?}, expected [embed_dim, n_embed]"
                )))
            }
        };
        Ok(VqVae2Config {
            in_channel,
            channel,
            n_res_block,
            n_res_channel,
            embed_dim,
            n_embed,
        })
    }
}

/// Reads tensors with the shapes the config implies through the checked
/// reader, which remembers which were read so that leftovers (a different
/// architecture) are reported.
struct Loader<'a> {
    w: Weights<'a>,
    be: &'a Backend,
    cfg: VqVae2Config,
}

impl Loader<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.w.tensor(self.be, name, shape)
    }

    fn conv(
        &mut self,
        prefix: &str,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Conv> {
        Ok(Conv {
            w: self.tensor(&format!("{prefix}.weight"), &[c_out, c_in, k, k])?,
            b: self.tensor(&format!("{prefix}.bias"), &[c_out])?,
            p: Conv2dParams::new(stride, pad),
        })
    }

    /// A ConvTranspose2d(c_in → c_out, 4, stride 2, pad 1): ×2 upsampling.
    fn up(&mut self, prefix: &str, c_in: usize, c_out: usize) -> Result<ConvUp> {
        Ok(ConvUp {
            w: self.tensor(&format!("{prefix}.weight"), &[c_in, c_out, 4, 4])?,
            b: self.tensor(&format!("{prefix}.bias"), &[c_out])?,
        })
    }

    fn res_blocks(&mut self, prefix: &str, first_block: usize) -> Result<Vec<ResBlock>> {
        let (c, r) = (self.cfg.channel, self.cfg.n_res_channel);
        (first_block..first_block + self.cfg.n_res_block)
            .map(|i| {
                Ok(ResBlock {
                    conv1: self.conv(&format!("{prefix}.blocks.{i}.conv.1"), c, r, 3, 1, 1)?,
                    conv3: self.conv(&format!("{prefix}.blocks.{i}.conv.3"), r, c, 1, 1, 0)?,
                })
            })
            .collect()
    }

    /// `Quantize(dim, n_embed)`: `P.embed` on the device (finite, like every
    /// weight); the training-only buffers `P.cluster_size` and `P.embed_avg`
    /// are shape-checked when present and not loaded.
    fn quantize(&mut self, prefix: &str) -> Result<Codebook> {
        let (d, k) = (self.cfg.embed_dim, self.cfg.n_embed);
        self.w.skip(&format!("{prefix}.cluster_size"), &[&[k]])?;
        self.w.skip(&format!("{prefix}.embed_avg"), &[&[d, k]])?;
        let embed = self.tensor(&format!("{prefix}.embed"), &[d, k])?;
        Codebook::new(self.be, embed)
    }

    /// `Encoder(c_in, channel, n_res, r, stride)` under `prefix`.
    fn encoder(&mut self, prefix: &str, c_in: usize, stride: usize) -> Result<Encoder> {
        let c = self.cfg.channel;
        let stem = if stride == 4 {
            vec![
                self.conv(&format!("{prefix}.blocks.0"), c_in, c / 2, 4, 2, 1)?,
                self.conv(&format!("{prefix}.blocks.2"), c / 2, c, 4, 2, 1)?,
                self.conv(&format!("{prefix}.blocks.4"), c, c, 3, 1, 1)?,
            ]
        } else {
            vec![
                self.conv(&format!("{prefix}.blocks.0"), c_in, c / 2, 4, 2, 1)?,
                self.conv(&format!("{prefix}.blocks.2"), c / 2, c, 3, 1, 1)?,
            ]
        };
        let res = self.res_blocks(prefix, stem.len() * 2 - 1)?;
        Ok(Encoder { stem, res })
    }

    /// `Decoder(c_in, c_out, channel, n_res, r, stride)` under `prefix`.
    fn decoder(
        &mut self,
        prefix: &str,
        c_in: usize,
        c_out: usize,
        stride: usize,
    ) -> Result<Decoder> {
        let (c, n_res) = (self.cfg.channel, self.cfg.n_res_block);
        let conv_in = self.conv(&format!("{prefix}.blocks.0"), c_in, c, 3, 1, 1)?;
        let res = self.res_blocks(prefix, 1)?;
        // After the residual blocks: index n_res + 1 is a ReLU, then the
        // transposed convs (with a ReLU between them for stride 4).
        let first_up = n_res + 2;
        let up = if stride == 4 {
            vec![
                self.up(&format!("{prefix}.blocks.{first_up}"), c, c / 2)?,
                self.up(&format!("{prefix}.blocks.{}", first_up + 2), c / 2, c_out)?,
            ]
        } else {
            vec![self.up(&format!("{prefix}.blocks.{first_up}"), c, c_out)?]
        };
        Ok(Decoder { conv_in, res, up })
    }
}

/// Conv2d with bias.
#[derive(Debug)]
struct Conv {
    w: Tensor,
    b: Tensor,
    p: Conv2dParams,
}

impl Conv {
    fn forward(&self, be: &Backend, x: &Tensor) -> Result<Tensor> {
        ops::conv2d(be, x, &self.w, Some(&self.b), self.p)
    }
}

/// ConvTranspose2d(4, stride 2, pad 1) with bias: doubles H and W.
#[derive(Debug)]
struct ConvUp {
    w: Tensor,
    b: Tensor,
}

impl ConvUp {
    fn forward(&self, be: &Backend, x: &Tensor) -> Result<Tensor> {
        ops::conv_transpose2d(
            be,
            x,
            &self.w,
            Some(&self.b),
            ConvTranspose2dParams::new(2, 1),
        )
    }
}

/// `x + conv1x1(relu(conv3x3(relu(x))))`, width `c → r → c`.
#[derive(Debug)]
struct ResBlock {
    conv1: Conv,
    conv3: Conv,
}

impl ResBlock {
    fn forward(&self, be: &Backend, x: Tensor) -> Result<Tensor> {
        let mut h = self.conv1.forward(be, &relu(be, &x)?)?; // [N, r, h, w]
        relu_inplace(be, &mut h)?;
        let h = self.conv3.forward(be, &h)?; // [N, c, h, w]
        ops::add(be, &x, &h)
    }
}

/// Strided convs with ReLUs between them, residual blocks, a final ReLU.
#[derive(Debug)]
struct Encoder {
    stem: Vec<Conv>,
    res: Vec<ResBlock>,
}

impl Encoder {
    fn forward(&self, be: &Backend, x: &Tensor) -> Result<Tensor> {
        let (first, rest) = self
            .stem
            .split_first()
            .ok_or_else(|| Error::invalid("vqvae2: an encoder without convolutions"))?;
        let mut h = first.forward(be, x)?; // [N, c/2, H/2, W/2]
        for conv in rest {
            relu_inplace(be, &mut h)?;
            h = conv.forward(be, &h)?; // stride 4: [N, c, H/4, W/4], then same size
        }
        for block in &self.res {
            h = block.forward(be, h)?;
        }
        relu_inplace(be, &mut h)?;
        Ok(h)
    }
}

/// A 3×3 conv, residual blocks, ReLU, then ×2 transposed convs with ReLUs
/// between them.
#[derive(Debug)]
struct Decoder {
    conv_in: Conv,
    res: Vec<ResBlock>,
    up: Vec<ConvUp>,
}

impl Decoder {
    fn forward(&self, be: &Backend, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(be, x)?; // [N, c, h, w]
        for block in &self.res {
            h = block.forward(be, h)?;
        }
        for up in &self.up {
            relu_inplace(be, &mut h)?;
            h = up.forward(be, &h)?; // [N, ·, 2h, 2w]
        }
        Ok(h)
    }
}

/// Where [`VqVae2::encode_histograms`] counts: the row offsets of the
/// segments, then the top and the bottom histograms.
type HistTargets<'a> = (
    Option<&'a [usize]>,
    &'a mut Tensor<i32>,
    &'a mut Tensor<i32>,
);

/// Everything [`VqVae2::encode`] computes.
#[derive(Debug)]
pub struct Encoded {
    /// Bottom encoder output `[N, channel, H/4, W/4]`.
    pub enc_b: Tensor,
    /// Top encoder output `[N, channel, H/8, W/8]`.
    pub enc_t: Tensor,
    /// Quantized top map `[N, embed_dim, H/8, W/8]`.
    pub quant_t: Tensor,
    /// Quantized bottom map `[N, embed_dim, H/4, W/4]`.
    pub quant_b: Tensor,
    /// Top codes `[N, H/8, W/8]`.
    pub id_t: Tensor<i32>,
    /// Bottom codes `[N, H/4, W/4]`.
    pub id_b: Tensor<i32>,
    /// Latent loss `mean((quant_t − pre_t)²) + mean((quant_b − pre_b)²)`.
    pub diff: f32,
}

/// A VQ-VAE-2 with its weights on one device.
#[derive(Debug)]
pub struct VqVae2 {
    config: VqVae2Config,
    enc_b: Encoder,
    enc_t: Encoder,
    quantize_conv_t: Conv,
    quantize_t: Codebook,
    dec_t: Decoder,
    quantize_conv_b: Conv,
    quantize_b: Codebook,
    /// `upsample_t` and `dec`: absent from encoder-only weights, which
    /// profile but cannot reconstruct.
    decoder: Option<(ConvUp, Decoder)>,
}

/// Whether `file` holds the reconstruction path (`upsample_t.*`, `dec.*`);
/// weights without it profile images but cannot decode them.
pub fn has_decoder(file: &TensorFile) -> bool {
    file.names()
        .iter()
        .any(|n| n.starts_with("dec.") || n.starts_with("upsample_t."))
}

impl VqVae2 {
    /// Loads a vq-vae-2-pytorch `VQVAE` `state_dict` saved with safetensors
    /// onto `be`'s device.
    pub fn load(be: &Backend, path: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(be, &TensorFile::open(path)?)
    }

    /// [`VqVae2::load`] from an opened file. Errors name the file and the
    /// tensor: a missing key, a dtype that is not floating point, a shape
    /// that disagrees with the hyper-parameters read off the other weights,
    /// a NaN or infinity in a weight or a codebook (with its flat index), or
    /// tensors this architecture does not have.
    pub fn from_file(be: &Backend, file: &TensorFile) -> Result<Self> {
        let cfg = VqVae2Config::from_weights(file)?;
        let (c, d) = (cfg.channel, cfg.embed_dim);
        let mut w = Loader {
            w: Weights::new(file).shapes_from(format!(
                "the hyper-parameters read off the other weights ({cfg})"
            )),
            be,
            cfg,
        };
        let model = VqVae2 {
            config: cfg,
            enc_b: w.encoder("enc_b", cfg.in_channel, 4)?,
            enc_t: w.encoder("enc_t", c, 2)?,
            quantize_conv_t: w.conv("quantize_conv_t", c, d, 1, 1, 0)?,
            quantize_t: w.quantize("quantize_t")?,
            dec_t: w.decoder("dec_t", d, d, 2)?,
            quantize_conv_b: w.conv("quantize_conv_b", d + c, d, 1, 1, 0)?,
            quantize_b: w.quantize("quantize_b")?,
            decoder: if has_decoder(file) {
                Some((
                    w.up("upsample_t", d, d)?,
                    w.decoder("dec", 2 * d, cfg.in_channel, 4)?,
                ))
            } else {
                None
            },
        };
        w.w.reject_leftovers(&format!("are not part of a VQ-VAE-2 with {cfg}"))?;
        Ok(model)
    }

    /// The hyper-parameters read off the weights.
    pub fn config(&self) -> &VqVae2Config {
        &self.config
    }

    /// Whether the weights included the reconstruction path (`upsample_t`,
    /// `dec`); profiling needs only the encoders and codebooks.
    pub fn has_decoder(&self) -> bool {
        self.decoder.is_some()
    }

    /// The top quantizer's input `pre_t` `[N, D, H/8, W/8]` and the bottom
    /// encoder's output `enc_b` `[N, channel, H/4, W/4]`: what codebooks are
    /// fitted to (see `apps::expression::init`).
    pub fn pre_quantize_top(&self, be: &Backend, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check_input(x)?;
        let enc_b = self.enc_b.forward(be, x)?;
        let pre_t = self
            .quantize_conv_t
            .forward(be, &self.enc_t.forward(be, &enc_b)?)?;
        Ok((pre_t, enc_b))
    }

    /// The top lookup of `pre_t`: codes `[N, h, w]` and their vectors `quant_t`.
    pub fn quantize_top(&self, be: &Backend, pre_t: &Tensor) -> Result<(Tensor<i32>, Tensor)> {
        let out = vq_lookup(be, pre_t, &self.quantize_t)?;
        Ok((out.ids, out.quant))
    }

    /// The bottom lookup of `pre_b`: codes `[N, h, w]` and their vectors `quant_b`.
    pub fn quantize_bottom(&self, be: &Backend, pre_b: &Tensor) -> Result<(Tensor<i32>, Tensor)> {
        let out = vq_lookup(be, pre_b, &self.quantize_b)?;
        Ok((out.ids, out.quant))
    }

    /// The bottom quantizer's input `pre_b` `[N, D, H/4, W/4]` from the top
    /// vectors and the bottom encoder's output.
    pub fn pre_quantize_bottom(
        &self,
        be: &Backend,
        quant_t: &Tensor,
        enc_b: &Tensor,
    ) -> Result<Tensor> {
        self.bottom_input(be, quant_t, enc_b)
    }

    /// Checks that `x` is `[N, in_channel, H, W]`.
    fn check_input(&self, x: &Tensor) -> Result<()> {
        match x.shape() {
            &[_, c, _, _] if c == self.config.in_channel => Ok(()),
            s => Err(Error::shape(
                "vqvae2",
                format!(
                    "input must be [N, {}, H, W], got {s:?}",
                    self.config.in_channel
                ),
            )),
        }
    }

    /// The bottom quantizer's input from the top codes' vectors and the
    /// bottom encoder's output: `quantize_conv_b(concat(dec_t(quant_t), enc_b))`.
    fn bottom_input(&self, be: &Backend, quant_t: &Tensor, enc_b: &Tensor) -> Result<Tensor> {
        let dec_t = self.dec_t.forward(be, quant_t)?; // [N, D, H/4, W/4]
        if dec_t.shape()[2..] != enc_b.shape()[2..] {
            return Err(Error::shape(
                "vqvae2",
                format!(
                    "the bottom map is {:?} but the top path returns {:?}: use image sizes divisible by 8",
                    &enc_b.shape()[2..],
                    &dec_t.shape()[2..]
                ),
            ));
        }
        let cat = concat_channels(be, &[&dec_t, enc_b])?; // [N, D + c, H/4, W/4]
        drop(dec_t);
        self.quantize_conv_b.forward(be, &cat) // [N, D, H/4, W/4]
    }

    /// `VQVAE.encode`: both code maps, their vectors and the latent loss,
    /// plus the encoder outputs. `x` is `[N, in_channel, H, W]` scaled to
    /// [−1, 1] (see [`scale_u8`]), H and W divisible by 8.
    pub fn encode(&self, be: &Backend, x: &Tensor) -> Result<Encoded> {
        self.check_input(x)?;
        let enc_b = self.enc_b.forward(be, x)?; // [N, c, H/4, W/4]
        let enc_t = self.enc_t.forward(be, &enc_b)?; // [N, c, H/8, W/8]
        let pre_t = self.quantize_conv_t.forward(be, &enc_t)?; // [N, D, H/8, W/8]
        let top = vq_lookup(be, &pre_t, &self.quantize_t)?;
        drop(pre_t);
        let pre_b = self.bottom_input(be, &top.quant, &enc_b)?; // [N, D, H/4, W/4]
        let bottom = vq_lookup(be, &pre_b, &self.quantize_b)?;
        drop(pre_b);
        let diff =
            mean_error(&top, self.config.embed_dim)? + mean_error(&bottom, self.config.embed_dim)?;
        Ok(Encoded {
            enc_b,
            enc_t,
            quant_t: top.quant,
            quant_b: bottom.quant,
            id_t: top.ids,
            id_b: bottom.ids,
            diff: diff as f32,
        })
    }

    /// The bottom half of [`VqVae2::encode`]: `id_b` `[N, 2h, 2w]` and
    /// `quant_b` `[N, D, 2h, 2w]` from the top vectors `quant_t`
    /// `[N, D, h, w]` and the bottom encoder's output `enc_b`
    /// `[N, channel, 2h, 2w]`.
    pub fn encode_bottom(
        &self,
        be: &Backend,
        quant_t: &Tensor,
        enc_b: &Tensor,
    ) -> Result<(Tensor<i32>, Tensor)> {
        let pre_b = self.bottom_input(be, quant_t, enc_b)?;
        let bottom = vq_lookup(be, &pre_b, &self.quantize_b)?;
        Ok((bottom.ids, bottom.quant))
    }

    /// `VQVAE.decode`: the reconstruction `[N, in_channel, H, W]` from
    /// `quant_t` `[N, D, h, w]` and `quant_b` `[N, D, 2h, 2w]`.
    /// An error for encoder-only weights ([`VqVae2::has_decoder`]).
    pub fn decode(&self, be: &Backend, quant_t: &Tensor, quant_b: &Tensor) -> Result<Tensor> {
        let (upsample_t, dec) = self.decoder.as_ref().ok_or_else(|| {
            Error::invalid(
                "these VQ-VAE-2 weights have no decoder (upsample_t.*, dec.*): they profile images but cannot reconstruct them",
            )
        })?;
        let up_t = upsample_t.forward(be, quant_t)?; // [N, D, 2h, 2w]
        let cat = concat_channels(be, &[&up_t, quant_b])?; // [N, 2D, 2h, 2w]
        drop(up_t);
        dec.forward(be, &cat) // [N, in, 8h, 8w]
    }

    /// The codes only (`id_t` `[N, H/8, W/8]`, `id_b` `[N, H/4, W/4]`), for
    /// batches of patches: skips the decoder, the bottom vectors and the
    /// errors, and frees each activation once used.
    pub fn encode_codes(&self, be: &Backend, x: &Tensor) -> Result<(Tensor<i32>, Tensor<i32>)> {
        self.codes(be, x, None)
    }

    /// [`VqVae2::encode_codes`] that also counts the codes into `hist_t` and
    /// `hist_b` `[segments, n_embed]` (ADDED to them, so a sample accumulates
    /// over batches) in the lookup kernel: patch/image `r` of the batch counts
    /// into segment `r` when `row_offsets` is `None`, else segment `j` owns
    /// rows `row_offsets[j]..row_offsets[j + 1]`.
    pub fn encode_histograms(
        &self,
        be: &Backend,
        x: &Tensor,
        row_offsets: Option<&[usize]>,
        hist_t: &mut Tensor<i32>,
        hist_b: &mut Tensor<i32>,
    ) -> Result<(Tensor<i32>, Tensor<i32>)> {
        self.codes(be, x, Some((row_offsets, hist_t, hist_b)))
    }

    /// The encoder, both lookups and (optionally) their histograms; nothing
    /// else is kept.
    fn codes(
        &self,
        be: &Backend,
        x: &Tensor,
        mut hist: Option<HistTargets>,
    ) -> Result<(Tensor<i32>, Tensor<i32>)> {
        self.check_input(x)?;
        let lookup = |x: &Tensor,
                      cb: &Codebook,
                      quant: Option<&mut Tensor>,
                      hist: Option<(Option<&[usize]>, &mut Tensor<i32>)>| {
            let mut ids = Tensor::zeros(be, &[&x.shape()[..1], &x.shape()[2..]].concat())?;
            let out = VqOut {
                ids: &mut ids,
                quant,
                err: None,
            };
            match hist {
                None => vq_lookup_into(be, x, cb, out)?,
                Some((offsets, h)) => vq_lookup_hist_into(be, x, cb, out, offsets, h)?,
            }
            Ok::<_, Error>(ids)
        };
        let enc_b = self.enc_b.forward(be, x)?; // [N, c, H/4, W/4]
        let pre_t = self
            .quantize_conv_t
            .forward(be, &self.enc_t.forward(be, &enc_b)?)?; // [N, D, H/8, W/8]
        let mut quant_t = Tensor::zeros(be, pre_t.shape())?;
        let hist_top = hist.as_mut().map(|(o, t, _)| (*o, &mut **t));
        let id_t = lookup(&pre_t, &self.quantize_t, Some(&mut quant_t), hist_top)?;
        drop(pre_t);
        let pre_b = self.bottom_input(be, &quant_t, &enc_b)?; // [N, D, H/4, W/4]
        drop((enc_b, quant_t));
        let hist_bottom = hist.map(|(o, _, b)| (o, b));
        let id_b = lookup(&pre_b, &self.quantize_b, None, hist_bottom)?;
        Ok((id_t, id_b))
    }

    /// Code-frequency histogram per image `[N, n_embed]` of a code map
    /// `[N, h, w]` (`id_t` or `id_b`).
    pub fn histogram(&self, be: &Backend, ids: &Tensor<i32>) -> Result<Tensor<i32>> {
        code_histogram(be, ids, self.config.n_embed, None)
    }
}

/// `Σ err / (positions · dim)`: the mean squared quantization error over
/// every element, as PyTorch's `(quantize − input).pow(2).mean()`.
fn mean_error(out: &VqOutput, dim: usize) -> Result<f64> {
    let err = out.err.to_vec()?;
    let total: f64 = err.iter().map(|&e| f64::from(e)).sum();
    Ok(total / (err.len() * dim).max(1) as f64)
}

/// Checks a patch side for the VQ-VAE-2: the encoders halve the input three
/// times (bottom map 1/4, top map 1/8), so a patch must be at least 8×8
/// pixels with a side divisible by 8.
///
/// # Errors
/// [`Error::Invalid`] naming `--patch`, in pixels.
pub fn check_patch(patch: usize) -> Result<()> {
    if patch < 8 || !patch.is_multiple_of(8) {
        return Err(Error::invalid(format!(
            "--patch {patch}: the VQ-VAE-2 needs square patches of at least 8×8 pixels with a side divisible by 8 (its top code map is 1/8 of the patch), e.g. 160"
        )));
    }
    Ok(())
}

/// Column sums of histograms `[rows, n_embed]`: the counts of a sample made
/// of all the rows (images or patches).
pub fn sum_histograms(hist: &Tensor<i32>) -> Result<Vec<u64>> {
    let k = match hist.shape() {
        &[_, k] => k,
        s => {
            return Err(Error::shape(
                "sum_histograms",
                format!("histograms must be [rows, n_embed], got {s:?}"),
            ))
        }
    };
    let mut sums = vec![0u64; k];
    for row in hist.to_vec()?.chunks_exact(k.max(1)) {
        for (s, &c) in sums.iter_mut().zip(row) {
            let c = u64::try_from(c)
                .map_err(|_| Error::invalid(format!("sum_histograms: negative count {c}")))?;
            *s += c;
        }
    }
    Ok(sums)
}

/// The sample profile ([reference](crate::reference) §1): for the top counts then the bottom
/// counts, `log2((c[k] + 1) / Σ_j (c[j] + 1))`; `2·n_embed` values.
pub fn profile(counts_t: &[u64], counts_b: &[u64]) -> Result<Vec<f32>> {
    if counts_t.is_empty() || counts_t.len() != counts_b.len() {
        return Err(Error::invalid(format!(
            "profile: top and bottom histograms need the same nonzero number of codes, got {} and {}",
            counts_t.len(),
            counts_b.len()
        )));
    }
    fn block(c: &[u64]) -> impl Iterator<Item = f32> + '_ {
        // f64 holds counts and sums up to 2^53 exactly.
        let total: f64 = c.iter().map(|&v| v as f64 + 1.0).sum();
        c.iter()
            .map(move |&v| ((v as f64 + 1.0) / total).log2() as f32)
    }
    Ok(block(counts_t).chain(block(counts_b)).collect())
}

/// Reconstruction error in 8-bit units as the paper reports it:
/// `mean(((dec − x) · 127.5)²)` over every element.
pub fn mse_8bit(dec: &Tensor, x: &Tensor) -> Result<f32> {
    if dec.shape() != x.shape() {
        return Err(Error::shape(
            "mse_8bit",
            format!(
                "reconstruction {:?} and input {:?} differ in shape",
                dec.shape(),
                x.shape()
            ),
        ));
    }
    let (d, x) = (dec.to_vec()?, x.to_vec()?);
    let total: f64 = d
        .iter()
        .zip(&x)
        .map(|(&a, &b)| (f64::from(a - b) * 127.5).powi(2))
        .sum();
    Ok((total / d.len().max(1) as f64) as f32)
}

/// Input scaling of 8-bit pixels: `p / 255 · 2 − 1`, into [−1, 1].
pub fn scale_u8(pixels: &[u8]) -> Vec<f32> {
    pixels
        .iter()
        .map(|&p| f32::from(p) / 255.0 * 2.0 - 1.0)
        .collect()
}

/// Input scaling of 16-bit pixels: `p / 65535 · 2 − 1`, into [−1, 1].
pub fn scale_u16(pixels: &[u16]) -> Vec<f32> {
    pixels
        .iter()
        .map(|&p| f32::from(p) / 65535.0 * 2.0 - 1.0)
        .collect()
}

/// `cellmorph infer --model vqvae2`: runs [`VqVae2::encode`] and
/// [`VqVae2::decode`] over `input` `[N, in_channel, H, W]` (host data) in
/// device batches and adds `id_t`, `id_b` (int32), `quant_t`, `quant_b`,
/// `dec`, `diff` (`[1]`, the latent loss over the whole input), `hist_t`, `hist_b`
/// (`[N, n_embed]` code counts per image) to `out`.
pub fn infer(
    be: &Backend,
    weights: &TensorFile,
    shape: &[usize],
    input: &[f32],
    batch_size: usize,
    out: &mut crate::io::TensorWriter,
) -> Result<()> {
    let model = VqVae2::from_file(be, weights)?;
    let mut g = crate::models::batch::Gathered::new();
    crate::models::batch::for_each_batch(be, shape, input, batch_size, |x, _| {
        let enc = model.encode(be, x)?;
        let dec = model.decode(be, &enc.quant_t, &enc.quant_b)?;
        g.push_i32("hist_t", &model.histogram(be, &enc.id_t)?)?;
        g.push_i32("hist_b", &model.histogram(be, &enc.id_b)?)?;
        g.push_i32("id_t", &enc.id_t)?;
        g.push_i32("id_b", &enc.id_b)?;
        g.push("quant_t", &enc.quant_t)?;
        g.push("quant_b", &enc.quant_b)?;
        g.push("dec", &dec)?;
        g.push_mean("diff", enc.diff as f64, x.shape()[0] as f64)
    })?;
    g.write_into(out)
}
