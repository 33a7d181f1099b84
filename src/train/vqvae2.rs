//! One VQ-VAE-2 training step on any device (CPU, CUDA, emulated), in the
//! vq-vae-2-pytorch recipe (`docs/MODELS.md` §1 and §4): the forward pass
//! layer by layer, keeping each layer's input; the backward pass written out
//! layer by layer in reverse (no tape); the EMA codebook update with the
//! codes of the old codebook; then an optimizer step over the trainable
//! parameters.
//!
//! Loss: `MSE(dec, x) + w·(diff_t + diff_b)` with
//! `diff = mean((quant.detach() − pre)²)`, `w` = 0.25. The quantizer's
//! output is `pre + (quant − pre)` (PyTorch's straight-through expression,
//! same rounding) and its gradient passes unchanged to `pre`.
//!
//! Activations are [`Tensor`]s on the step's [`Backend`] and every layer
//! (conv, transposed conv, ReLU, residual add, channel concatenation and
//! its slicing backward, the nearest-code lookup) runs through
//! [`crate::ops`]: the CPU reference ops on the CPU device (the same bits as
//! the CPU-only step before), the kernels on CUDA and emulated devices. The
//! host keeps, in this version: the parameters and their gradients (the
//! [`ParamStore`]) and the optimizer step; the loss reductions; the
//! straight-through expression; the EMA codebook update and the dead-code
//! restart. Transfers per step: every trainable parameter and both codebooks
//! uploaded once; per quantizer level the encoder output `pre`, its codes
//! and code vectors downloaded, the straight-through output and the
//! commitment gradient uploaded (latent-sized); the reconstruction
//! downloaded and its MSE gradient uploaded (input-sized); the gradients
//! downloaded into the store at the end. Every op sums in a fixed order
//! (the device reductions in chunks fixed by the shapes, no atomics), so a
//! step is deterministic on every device; a device step differs from the CPU
//! one by the kernels' other summation order.

use crate::backend::Backend;
use crate::cpu::vq;
use crate::geometry::{Conv2dParams, ConvTranspose2dParams};
use crate::io::TensorFile;
use crate::models::vqvae2::VqVae2Config;
use crate::ops::{self, Codebook, VqOut};
use crate::rng::counter_u64;
use crate::tensor::Tensor;
use crate::train::loss;
use crate::train::optim::Optimizer;
use crate::train::store::ParamStore;
use crate::{Error, Result};
/// The step's recipe constants besides the optimizer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepConfig {
    /// Weight of the latent (commitment) loss (0.25).
    pub latent_loss_weight: f32,
    /// EMA decay of the codebooks (0.99).
    pub decay: f32,
    /// Laplace smoothing of the cluster sizes (1e-5).
    pub eps: f32,
}

impl Default for StepConfig {
    fn default() -> Self {
        StepConfig {
            latent_loss_weight: 0.25,
            decay: 0.99,
            eps: 1e-5,
        }
    }
}

/// What one step computed (before the update).
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    /// `recon_loss + w·latent_loss`.
    pub loss: f32,
    /// `MSE(dec, x)`.
    pub recon_loss: f32,
    /// `diff_t + diff_b`.
    pub latent_loss: f32,
    /// Top codes `[n, h/8, w/8]` from the old codebook.
    pub id_t: Vec<i32>,
    /// Shape of `id_t`.
    pub id_t_shape: Vec<usize>,
    /// Bottom codes `[n, h/4, w/4]` from the old codebook.
    pub id_b: Vec<i32>,
    /// Shape of `id_b`.
    pub id_b_shape: Vec<usize>,
    /// The reconstruction `[n, in_channel, h, w]`.
    pub dec: Vec<f32>,
}

/// Whether a vq-vae-2-pytorch `state_dict` key is a parameter (trained by
/// the optimizer) rather than a codebook buffer (`quantize_*.embed`,
/// `.cluster_size`, `.embed_avg`).
pub fn is_trainable(name: &str) -> bool {
    !(name.starts_with("quantize_t.") || name.starts_with("quantize_b."))
}

/// A store of every tensor of a VQ-VAE-2 `state_dict` file (parameters
/// trainable, codebooks as buffers), with the model's hyper-parameters read
/// off it.
pub fn load_store(file: &TensorFile) -> Result<(VqVae2Config, ParamStore)> {
    let cfg = VqVae2Config::from_weights(file)?;
    if cfg.n_res_block > 0 && cfg.n_res_channel == 0 {
        return Err(Error::format(file.path(), "residual blocks of width 0"));
    }
    let store = ParamStore::from_file(file, is_trainable)?;
    Ok((cfg, store))
}

/// One layer of an encoder or decoder, by store ids.
#[derive(Clone, Copy, Debug)]
enum Layer {
    Conv {
        w: usize,
        b: usize,
        stride: usize,
        pad: usize,
    },
    ConvT {
        w: usize,
        b: usize,
    },
    Relu,
    /// `x + conv3(relu(conv1(relu(x))))`, conv1 3×3 pad 1, conv3 1×1.
    Res {
        w1: usize,
        b1: usize,
        w3: usize,
        b3: usize,
    },
}

/// What a layer's backward needs: its input, and inside a residual block
/// the two intermediate activations.
#[derive(Debug)]
struct Saved {
    x: Tensor,
    inner: Option<(Tensor, Tensor)>,
}

/// The transposed convolutions' stride and padding (4×4 kernels, ×2).
fn convt_params() -> ConvTranspose2dParams {
    ConvTranspose2dParams::new(2, 1)
}

/// The trainable parameters on the step's device (uploaded once per call),
/// and the gradients of the backward pass, both by store id.
struct Params<'a> {
    be: &'a Backend,
    values: Vec<Option<Tensor>>,
    grads: Vec<Option<Tensor>>,
}

impl<'a> Params<'a> {
    fn upload(be: &'a Backend, store: &ParamStore) -> Result<Self> {
        let values = store
            .params()
            .iter()
            .map(|p| {
                p.trainable
                    .then(|| Tensor::from_slice(be, &p.shape, &p.value))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let grads = (0..values.len()).map(|_| None).collect();
        Ok(Params { be, values, grads })
    }

    fn get(&self, id: usize) -> Result<&Tensor> {
        self.values.get(id).and_then(Option::as_ref).ok_or_else(|| {
            Error::invalid(format!(
                "vqvae2 train step: parameter {id} is not trainable"
            ))
        })
    }

    /// Adds `g` to the gradient of parameter `id` (on the device).
    fn accumulate(&mut self, id: usize, g: Tensor) -> Result<()> {
        let slot = self
            .grads
            .get_mut(id)
            .ok_or_else(|| Error::invalid(format!("vqvae2 train step: no parameter {id}")))?;
        *slot = Some(match slot.take() {
            None => g,
            Some(prev) => ops::add(self.be, &prev, &g)?,
        });
        Ok(())
    }

    /// Downloads the gradients into the store's (zeroed first).
    fn download_grads(self, store: &mut ParamStore) -> Result<()> {
        store.zero_grads();
        for (id, g) in self.grads.into_iter().enumerate() {
            if let Some(g) = g {
                store.accumulate(id, &g.to_vec()?)?;
            }
        }
        Ok(())
    }

    fn conv(&self, x: &Tensor, w: usize, b: usize, stride: usize, pad: usize) -> Result<Tensor> {
        let p = Conv2dParams::new(stride, pad);
        ops::conv2d(self.be, x, self.get(w)?, Some(self.get(b)?), p)
    }

    /// Conv2d backward: accumulates the weight and bias gradients, returns `dx`.
    fn conv_bwd(
        &mut self,
        x: &Tensor,
        dy: &Tensor,
        w: usize,
        b: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Tensor> {
        let p = Conv2dParams::new(stride, pad);
        let g = ops::conv2d_backward(self.be, x, self.get(w)?, dy, p, true)?;
        self.take_grads(g, w, b)
    }

    fn convt(&self, x: &Tensor, w: usize, b: usize) -> Result<Tensor> {
        ops::conv_transpose2d(self.be, x, self.get(w)?, Some(self.get(b)?), convt_params())
    }

    fn convt_bwd(&mut self, x: &Tensor, dy: &Tensor, w: usize, b: usize) -> Result<Tensor> {
        let g = ops::conv_transpose2d_backward(self.be, x, self.get(w)?, dy, convt_params(), true)?;
        self.take_grads(g, w, b)
    }

    fn take_grads(&mut self, g: ops::ConvGrads, w: usize, b: usize) -> Result<Tensor> {
        let db = g.db.ok_or_else(|| {
            Error::invalid("vqvae2 train step: a conv backward without its bias gradient")
        })?;
        self.accumulate(w, g.dw)?;
        self.accumulate(b, db)?;
        Ok(g.dx)
    }
}

/// A sequence of layers (an encoder or a decoder).
struct Stack {
    layers: Vec<Layer>,
}

impl Stack {
    fn forward(&self, p: &Params, x: Tensor) -> Result<(Tensor, Vec<Saved>)> {
        let be = p.be;
        let mut saved = Vec::with_capacity(self.layers.len());
        let mut x = x;
        for layer in &self.layers {
            let (y, inner) = match *layer {
                Layer::Conv { w, b, stride, pad } => (p.conv(&x, w, b, stride, pad)?, None),
                Layer::ConvT { w, b } => (p.convt(&x, w, b)?, None),
                Layer::Relu => (ops::relu(be, &x)?, None),
                Layer::Res { w1, b1, w3, b3 } => {
                    let a = ops::relu(be, &x)?;
                    let h = p.conv(&a, w1, b1, 1, 1)?;
                    let r = ops::relu(be, &h)?;
                    let y = ops::add(be, &p.conv(&r, w3, b3, 1, 0)?, &x)?;
                    (y, Some((a, h)))
                }
            };
            saved.push(Saved { x, inner });
            x = y;
        }
        Ok((x, saved))
    }

    /// Backward from `dy` at the stack's output; returns `dx` at its input.
    fn backward(&self, p: &mut Params, saved: &[Saved], dy: Tensor) -> Result<Tensor> {
        let be = p.be;
        let mut dy = dy;
        for (layer, s) in self.layers.iter().zip(saved).rev() {
            dy = match *layer {
                Layer::Conv { w, b, stride, pad } => p.conv_bwd(&s.x, &dy, w, b, stride, pad)?,
                Layer::ConvT { w, b } => p.convt_bwd(&s.x, &dy, w, b)?,
                Layer::Relu => ops::relu_backward(be, &s.x, &dy)?,
                Layer::Res { w1, b1, w3, b3 } => {
                    let (a, h) = s.inner.as_ref().ok_or_else(|| {
                        Error::invalid("residual block saved without its activations")
                    })?;
                    let r = ops::relu(be, h)?;
                    let dr = p.conv_bwd(&r, &dy, w3, b3, 1, 0)?;
                    let dh = ops::relu_backward(be, h, &dr)?;
                    let da = p.conv_bwd(a, &dh, w1, b1, 1, 1)?;
                    let dx = ops::relu_backward(be, &s.x, &da)?;
                    ops::add(be, &dx, &dy)?
                }
            };
        }
        Ok(dy)
    }
}
/// The layers of the model, by store id.
struct Net {
    enc_b: Stack,
    enc_t: Stack,
    quantize_conv_t: (usize, usize),
    dec_t: Stack,
    quantize_conv_b: (usize, usize),
    upsample_t: (usize, usize),
    dec: Stack,
}

fn conv_ids(store: &ParamStore, prefix: &str) -> Result<(usize, usize)> {
    Ok((
        store.id(&format!("{prefix}.weight"))?,
        store.id(&format!("{prefix}.bias"))?,
    ))
}

fn conv_layer(store: &ParamStore, prefix: &str, stride: usize, pad: usize) -> Result<Layer> {
    let (w, b) = conv_ids(store, prefix)?;
    Ok(Layer::Conv { w, b, stride, pad })
}

fn convt_layer(store: &ParamStore, prefix: &str) -> Result<Layer> {
    let (w, b) = conv_ids(store, prefix)?;
    Ok(Layer::ConvT { w, b })
}

fn res_layers(store: &ParamStore, prefix: &str, first: usize, n: usize) -> Result<Vec<Layer>> {
    (first..first + n)
        .map(|i| {
            let (w1, b1) = conv_ids(store, &format!("{prefix}.blocks.{i}.conv.1"))?;
            let (w3, b3) = conv_ids(store, &format!("{prefix}.blocks.{i}.conv.3"))?;
            Ok(Layer::Res { w1, b1, w3, b3 })
        })
        .collect()
}

impl Net {
    fn new(store: &ParamStore, cfg: &VqVae2Config) -> Result<Self> {
        let n = cfg.n_res_block;
        let blk = |p: &str, i: usize| format!("{p}.blocks.{i}");

        let mut enc_b = vec![
            conv_layer(store, &blk("enc_b", 0), 2, 1)?,
            Layer::Relu,
            conv_layer(store, &blk("enc_b", 2), 2, 1)?,
            Layer::Relu,
            conv_layer(store, &blk("enc_b", 4), 1, 1)?,
        ];
        enc_b.extend(res_layers(store, "enc_b", 5, n)?);
        enc_b.push(Layer::Relu);

        let mut enc_t = vec![
            conv_layer(store, &blk("enc_t", 0), 2, 1)?,
            Layer::Relu,
            conv_layer(store, &blk("enc_t", 2), 1, 1)?,
        ];
        enc_t.extend(res_layers(store, "enc_t", 3, n)?);
        enc_t.push(Layer::Relu);

        let decoder = |p: &str, stride4: bool| -> Result<Stack> {
            let mut l = vec![conv_layer(store, &blk(p, 0), 1, 1)?];
            l.extend(res_layers(store, p, 1, n)?);
            l.push(Layer::Relu);
            l.push(convt_layer(store, &blk(p, n + 2))?);
            if stride4 {
                l.push(Layer::Relu);
                l.push(convt_layer(store, &blk(p, n + 4))?);
            }
            Ok(Stack { layers: l })
        };

        Ok(Net {
            enc_b: Stack { layers: enc_b },
            enc_t: Stack { layers: enc_t },
            quantize_conv_t: conv_ids(store, "quantize_conv_t")?,
            dec_t: decoder("dec_t", false)?,
            quantize_conv_b: conv_ids(store, "quantize_conv_b")?,
            upsample_t: conv_ids(store, "upsample_t")?,
            dec: decoder("dec", true)?,
        })
    }
}

/// One quantizer level's forward: codes from the current codebook, the
/// codebook vectors `quant` and the quantizer input `pre` on the host, and
/// the straight-through output `pre + (quant − pre)` on the device.
struct Quantized {
    shape: [usize; 4],
    pre: Vec<f32>,
    ids: Vec<i32>,
    quant: Vec<f32>,
    out: Tensor,
}

fn dims4(t: &Tensor) -> Result<[usize; 4]> {
    t.shape().try_into().map_err(|_| {
        Error::shape(
            "vqvae2 train step",
            format!("expected an [n, c, h, w] activation, got {:?}", t.shape()),
        )
    })
}

fn quantize(be: &Backend, store: &ParamStore, level: &str, pre: &Tensor) -> Result<Quantized> {
    let embed = store.by_name(&format!("{level}.embed"))?;
    let shape = dims4(pre)?;
    let [n, d, h, w] = shape;
    let k = match embed.shape.as_slice() {
        &[ed, k] if ed == d => k,
        s => {
            return Err(Error::shape(
                "vqvae2 train step",
                format!("{level}.embed has shape {s:?}, expected [{d}, n_embed]"),
            ))
        }
    };
    let cb = Codebook::new(be, Tensor::from_slice(be, &[d, k], &embed.value)?)?;
    let mut ids = Tensor::<i32>::zeros(be, &[n, h, w])?;
    let mut quant = Tensor::zeros(be, &shape)?;
    ops::vq_lookup_into(
        be,
        pre,
        &cb,
        VqOut {
            ids: &mut ids,
            quant: Some(&mut quant),
            err: None,
        },
    )?;
    let (pre, ids, quant) = (pre.to_vec()?, ids.to_vec()?, quant.to_vec()?);
    let out: Vec<f32> = pre.iter().zip(&quant).map(|(&x, &q)| x + (q - x)).collect();
    Ok(Quantized {
        shape,
        pre,
        ids,
        quant,
        out: Tensor::from_vec(be, &shape, out)?,
    })
}

/// Splits the gradient of a channel concatenation into its first `ca`
/// channels and the rest.
fn split(be: &Backend, dy: &Tensor, ca: usize) -> Result<(Tensor, Tensor)> {
    let c = dims4(dy)?[1];
    let cb = c.checked_sub(ca).ok_or_else(|| {
        Error::shape(
            "vqvae2 train step",
            format!("cannot split {ca} channels off {:?}", dy.shape()),
        )
    })?;
    Ok((
        ops::slice_channels(be, dy, 0, ca)?,
        ops::slice_channels(be, dy, ca, cb)?,
    ))
}

/// What the forward pass keeps for the backward pass and the EMA update.
struct Forward {
    saved_enc_b: Vec<Saved>,
    saved_enc_t: Vec<Saved>,
    et: Tensor,
    q_t: Quantized,
    saved_dec_t: Vec<Saved>,
    cat_b: Tensor,
    q_b: Quantized,
    saved_dec: Vec<Saved>,
    /// The reconstruction, downloaded.
    dec: Vec<f32>,
}

fn check_input(cfg: &VqVae2Config, shape: &[usize], x: &[f32]) -> Result<[usize; 4]> {
    let s: [usize; 4] = shape.try_into().map_err(|_| {
        Error::shape(
            "vqvae2 train step",
            format!("input must be [n, c, h, w], got {shape:?}"),
        )
    })?;
    if s[1] != cfg.in_channel
        || !s[2].is_multiple_of(8)
        || !s[3].is_multiple_of(8)
        || s[0] == 0
        || s[2] == 0
        || s[3] == 0
    {
        return Err(Error::shape(
            "vqvae2 train step",
            format!(
                "input {shape:?}: need {} channel(s), a non-empty batch and a height and width divisible by 8",
                cfg.in_channel
            ),
        ));
    }
    if x.len() != s.iter().product::<usize>() {
        return Err(Error::shape(
            "vqvae2 train step",
            format!(
                "input shape {shape:?} needs {} values, got {}",
                s.iter().product::<usize>(),
                x.len()
            ),
        ));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "input: non-finite value at flat index {i}"
        )));
    }
    Ok(s)
}

/// Checks the input and the backend, uploads the parameters and builds the
/// layer list.
fn prepare<'a>(
    be: &'a Backend,
    store: &ParamStore,
    cfg: &VqVae2Config,
    shape: &[usize],
    x: &[f32],
) -> Result<(Net, Params<'a>, Tensor)> {
    if be.precision().is_reduced() {
        return Err(Error::invalid(format!(
            "vqvae2 train step: training runs in f32 only, not {}",
            be.precision()
        )));
    }
    let s = check_input(cfg, shape, x)?;
    let net = Net::new(store, cfg)?;
    let params = Params::upload(be, store)?;
    let x = Tensor::from_slice(be, &s, x)?;
    Ok((net, params, x))
}

fn forward(net: &Net, p: &Params, store: &ParamStore, x: Tensor) -> Result<Forward> {
    let be = p.be;
    let (eb, saved_enc_b) = net.enc_b.forward(p, x)?;
    let (et, saved_enc_t) = net.enc_t.forward(p, eb.to_device(be)?)?;
    let (w, b) = net.quantize_conv_t;
    let pre_t = p.conv(&et, w, b, 1, 0)?;
    let q_t = quantize(be, store, "quantize_t", &pre_t)?;
    let (dt, saved_dec_t) = net.dec_t.forward(p, q_t.out.to_device(be)?)?;
    let cat_b = ops::concat_channels(be, &[&dt, &eb])?;
    let (w, b) = net.quantize_conv_b;
    let pre_b = p.conv(&cat_b, w, b, 1, 0)?;
    let q_b = quantize(be, store, "quantize_b", &pre_b)?;
    let (w, b) = net.upsample_t;
    let up = p.convt(&q_t.out, w, b)?;
    let cat = ops::concat_channels(be, &[&up, &q_b.out])?;
    let (dec, saved_dec) = net.dec.forward(p, cat)?;
    Ok(Forward {
        saved_enc_b,
        saved_enc_t,
        et,
        q_t,
        saved_dec_t,
        cat_b,
        q_b,
        saved_dec,
        dec: dec.to_vec()?,
    })
}

/// The losses of a forward pass: `(loss, recon_loss, latent_loss)`.
fn losses(f: &Forward, x: &[f32], w: f32) -> Result<(f32, f32, f32)> {
    let recon = loss::mse(&f.dec, x)?;
    let diff_t = loss::vq_commitment(&f.q_t.quant, &f.q_t.pre)?;
    let diff_b = loss::vq_commitment(&f.q_b.quant, &f.q_b.pre)?;
    let latent = diff_t + diff_b;
    Ok((recon + w * latent, recon, latent))
}

/// [`loss_only_on`] on the CPU.
pub fn loss_only(
    store: &ParamStore,
    cfg: &VqVae2Config,
    shape: &[usize],
    x: &[f32],
    step: &StepConfig,
) -> Result<(f32, f32, f32)> {
    loss_only_on(&Backend::cpu(), store, cfg, shape, x, step)
}

/// The loss of the current parameters on `x` (forward only on `be`,
/// nothing changed): `(loss, recon_loss, latent_loss)`.
pub fn loss_only_on(
    be: &Backend,
    store: &ParamStore,
    cfg: &VqVae2Config,
    shape: &[usize],
    x: &[f32],
    step: &StepConfig,
) -> Result<(f32, f32, f32)> {
    let (net, p, xt) = prepare(be, store, cfg, shape, x)?;
    let f = forward(&net, &p, store, xt)?;
    losses(&f, x, step.latent_loss_weight)
}

/// [`evaluate_on`] on the CPU.
pub fn evaluate(
    store: &ParamStore,
    cfg: &VqVae2Config,
    shape: &[usize],
    x: &[f32],
    step: &StepConfig,
) -> Result<StepOutput> {
    evaluate_on(&Backend::cpu(), store, cfg, shape, x, step)
}

fn ids_shape(s: &[usize; 4]) -> Vec<usize> {
    vec![s[0], s[2], s[3]]
}

/// The forward pass only on `be` (nothing changed): losses, codes and the
/// reconstruction of `x`, as a training step would compute them before its
/// update. For validation metrics.
pub fn evaluate_on(
    be: &Backend,
    store: &ParamStore,
    cfg: &VqVae2Config,
    shape: &[usize],
    x: &[f32],
    step: &StepConfig,
) -> Result<StepOutput> {
    let (net, p, xt) = prepare(be, store, cfg, shape, x)?;
    let f = forward(&net, &p, store, xt)?;
    let (total, recon, latent) = losses(&f, x, step.latent_loss_weight)?;
    Ok(StepOutput {
        loss: total,
        recon_loss: recon,
        latent_loss: latent,
        id_t_shape: ids_shape(&f.q_t.shape),
        id_t: f.q_t.ids,
        id_b_shape: ids_shape(&f.q_b.shape),
        id_b: f.q_b.ids,
        dec: f.dec,
    })
}

/// The quantizer input of one level on the host, for the EMA update and
/// the dead-code restart.
struct Pre {
    shape: [usize; 4],
    data: Vec<f32>,
}

/// Forward and backward on `be` for `x` `[n, in_channel, h, w]`: sets the
/// store's gradients (zeroed first) to the loss's gradient, updates nothing
/// else, and returns the step's outputs together with the quantizer inputs
/// `pre_t`, `pre_b` that the EMA update needs.
fn forward_backward(
    be: &Backend,
    store: &mut ParamStore,
    cfg: &VqVae2Config,
    shape: &[usize],
    x: &[f32],
    step: &StepConfig,
) -> Result<(StepOutput, Pre, Pre)> {
    let (net, mut p, xt) = prepare(be, store, cfg, shape, x)?;
    let f = forward(&net, &p, store, xt)?;
    let (total, recon, latent) = losses(&f, x, step.latent_loss_weight)?;
    let wl = step.latent_loss_weight;
    let e = cfg.embed_dim;
    let upload = |shape: &[usize], v: Vec<f32>| Tensor::from_vec(be, shape, v);

    // Decoder, then the concatenation [upsample_t(quant_t), quant_b].
    let d_dec = upload(shape, loss::mse_backward(&f.dec, x, 1.0)?)?;
    let d_cat = net.dec.backward(&mut p, &f.saved_dec, d_dec)?;
    let (d_up, d_qb) = split(be, &d_cat, e)?;
    let (w, b) = net.upsample_t;
    let d_qt_up = p.convt_bwd(&f.q_t.out, &d_up, w, b)?;

    // Bottom quantizer: straight-through plus the commitment term.
    let commit_b = loss::vq_commitment_backward(&f.q_b.quant, &f.q_b.pre, wl)?;
    let d_pre_b = ops::add(be, &d_qb, &upload(&f.q_b.shape, commit_b)?)?;
    let (w, b) = net.quantize_conv_b;
    let d_cat_b = p.conv_bwd(&f.cat_b, &d_pre_b, w, b, 1, 0)?;
    let (d_dt, d_eb_direct) = split(be, &d_cat_b, e)?;
    let d_qt_dec = net.dec_t.backward(&mut p, &f.saved_dec_t, d_dt)?;

    // Top quantizer.
    let commit_t = loss::vq_commitment_backward(&f.q_t.quant, &f.q_t.pre, wl)?;
    let d_pre_t = ops::add(be, &d_qt_up, &d_qt_dec)?;
    let d_pre_t = ops::add(be, &d_pre_t, &upload(&f.q_t.shape, commit_t)?)?;
    let (w, b) = net.quantize_conv_t;
    let d_et = p.conv_bwd(&f.et, &d_pre_t, w, b, 1, 0)?;

    // Encoders; enc_b's output feeds enc_t and the bottom concatenation.
    let d_eb = net.enc_t.backward(&mut p, &f.saved_enc_t, d_et)?;
    let d_eb = ops::add(be, &d_eb, &d_eb_direct)?;
    net.enc_b.backward(&mut p, &f.saved_enc_b, d_eb)?;
    p.download_grads(store)?;

    let out = StepOutput {
        loss: total,
        recon_loss: recon,
        latent_loss: latent,
        id_t_shape: ids_shape(&f.q_t.shape),
        id_t: f.q_t.ids,
        id_b_shape: ids_shape(&f.q_b.shape),
        id_b: f.q_b.ids,
        dec: f.dec,
    };
    Ok((
        out,
        Pre {
            shape: f.q_t.shape,
            data: f.q_t.pre,
        },
        Pre {
            shape: f.q_b.shape,
            data: f.q_b.pre,
        },
    ))
}

/// Gradients only: the store's gradients are set to those of the loss at
/// the current parameters; values and buffers are unchanged.
/// On the CPU; see [`gradients_on`].
pub fn gradients(
    store: &mut ParamStore,
    cfg: &VqVae2Config,
    shape: &[usize],
    x: &[f32],
    step: &StepConfig,
) -> Result<StepOutput> {
    gradients_on(&Backend::cpu(), store, cfg, shape, x, step)
}

/// Gradients only, computed on `be`: the store's gradients are set to those
/// of the loss at the current parameters; values and buffers are unchanged.
pub fn gradients_on(
    be: &Backend,
    store: &mut ParamStore,
    cfg: &VqVae2Config,
    shape: &[usize],
    x: &[f32],
    step: &StepConfig,
) -> Result<StepOutput> {
    Ok(forward_backward(be, store, cfg, shape, x, step)?.0)
}

fn ema_update(
    store: &mut ParamStore,
    level: &str,
    pre: &Pre,
    ids: &[i32],
    step: &StepConfig,
) -> Result<()> {
    let ids_cs = store.id(&format!("{level}.cluster_size"))?;
    let ids_avg = store.id(&format!("{level}.embed_avg"))?;
    let ids_embed = store.id(&format!("{level}.embed"))?;
    let k = store.get(ids_cs).value.len();
    let [n, d, h, w] = pre.shape;
    let mut cluster = std::mem::take(&mut store.get_mut(ids_cs).value);
    let mut avg = std::mem::take(&mut store.get_mut(ids_avg).value);
    let mut embed = std::mem::take(&mut store.get_mut(ids_embed).value);
    let r = vq::vq_ema_update(
        n,
        d,
        h * w,
        k,
        &pre.data,
        ids,
        step.decay,
        step.eps,
        &mut cluster,
        &mut avg,
        &mut embed,
    );
    store.get_mut(ids_cs).value = cluster;
    store.get_mut(ids_avg).value = avg;
    store.get_mut(ids_embed).value = embed;
    r.map_err(|e| Error::invalid(format!("{level}: EMA codebook update: {e}")))
}

/// [`train_step_on`] on the CPU.
pub fn train_step(
    store: &mut ParamStore,
    opt: &mut Optimizer,
    lr: f64,
    cfg: &VqVae2Config,
    shape: &[usize],
    x: &[f32],
    step: &StepConfig,
) -> Result<StepOutput> {
    train_step_on(&Backend::cpu(), store, opt, lr, cfg, shape, x, step)
}

/// One training step: forward and backward on `be` for `x`, the EMA update of both
/// codebooks with the codes of the old codebooks, and one step of `opt`
/// (registered with [`ParamStore::register`]) at learning rate `lr` over
/// the trainable parameters. The store's gradients are left holding this
/// step's gradients.
#[allow(clippy::too_many_arguments)]
pub fn train_step_on(
    be: &Backend,
    store: &mut ParamStore,
    opt: &mut Optimizer,
    lr: f64,
    cfg: &VqVae2Config,
    shape: &[usize],
    x: &[f32],
    step: &StepConfig,
) -> Result<StepOutput> {
    Ok(train_step_restarting(be, store, opt, lr, cfg, shape, x, step, None)?.0)
}

/// Dead-code restart: after the EMA update, every code whose EMA count
/// (`cluster_size`) is below `threshold` is re-seeded from one encoder
/// output of the current batch (`embed` and `embed_avg` set to it,
/// `cluster_size` to 1), drawn with [`counter_u64`]`(seed, step, code)`.
/// vq-vae-2-pytorch has no restart; Jukebox's VQ-VAE restarts the same way.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Restart {
    /// Codes with an EMA count below this are restarted (e.g. 1.0).
    pub threshold: f32,
    /// Seed of the draws.
    pub seed: u64,
    /// The training step (a key of the draws).
    pub step: u64,
}

/// [`train_step`], then the optional dead-code [`Restart`] of both
/// codebooks; returns the step's outputs and the number of codes restarted
/// on the top and bottom level. The step runs on `be`.
#[allow(clippy::too_many_arguments)]
pub fn train_step_restarting(
    be: &Backend,
    store: &mut ParamStore,
    opt: &mut Optimizer,
    lr: f64,
    cfg: &VqVae2Config,
    shape: &[usize],
    x: &[f32],
    step: &StepConfig,
    restart: Option<&Restart>,
) -> Result<(StepOutput, [usize; 2])> {
    let (out, pre_t, pre_b) = forward_backward(be, store, cfg, shape, x, step)?;
    ema_update(store, "quantize_t", &pre_t, &out.id_t, step)?;
    ema_update(store, "quantize_b", &pre_b, &out.id_b, step)?;
    let mut restarted = [0, 0];
    if let Some(r) = restart {
        restarted[0] = restart_dead_codes(store, "quantize_t", &pre_t, r, 0)?;
        restarted[1] = restart_dead_codes(store, "quantize_b", &pre_b, r, 1)?;
    }
    store.step(opt, lr)?;
    Ok((out, restarted))
}

/// See [`Restart`]; `level` (0 top, 1 bottom) keys the draws.
fn restart_dead_codes(
    store: &mut ParamStore,
    level: &str,
    pre: &Pre,
    r: &Restart,
    level_key: u64,
) -> Result<usize> {
    let ids_cs = store.id(&format!("{level}.cluster_size"))?;
    let ids_avg = store.id(&format!("{level}.embed_avg"))?;
    let ids_embed = store.id(&format!("{level}.embed"))?;
    let k = store.get(ids_cs).value.len();
    let [n, d, h, w] = pre.shape;
    let positions = n * h * w;
    if positions == 0 || store.get(ids_embed).value.len() != d * k {
        return Err(Error::invalid(format!(
            "{level}: dead-code restart: codebook [{d}, {k}] and encoder output {:?} disagree",
            pre.shape
        )));
    }
    let dead: Vec<usize> = (0..k)
        .filter(|&j| store.get(ids_cs).value[j] < r.threshold)
        .collect();
    for &j in &dead {
        let draw = counter_u64(r.seed, r.step, (level_key << 32) | j as u64);
        let p = ((u128::from(draw) * positions as u128) >> 64) as usize;
        let (b, hw) = (p / (h * w), p % (h * w));
        for c in 0..d {
            let v = pre.data[(b * d + c) * h * w + hw];
            store.get_mut(ids_embed).value[c * k + j] = v;
            store.get_mut(ids_avg).value[c * k + j] = v;
        }
        store.get_mut(ids_cs).value[j] = 1.0;
    }
    Ok(dead.len())
}
