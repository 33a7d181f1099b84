//! One VQ-VAE-2 training step on the CPU, in the vq-vae-2-pytorch recipe
//! (`docs/MODELS.md` §1 and §4): the forward pass layer by layer, keeping
//! each layer's input; the backward pass written out layer by layer in
//! reverse (no tape); the EMA codebook update with the codes of the old
//! codebook; then an optimizer step over the trainable parameters.
//!
//! Loss: `MSE(dec, x) + w·(diff_t + diff_b)` with
//! `diff = mean((quant.detach() − pre)²)`, `w` = 0.25. The quantizer's
//! output is `pre + (quant − pre)` (PyTorch's straight-through expression,
//! same rounding) and its gradient passes unchanged to `pre`.
//!
//! Everything runs on the CPU reference ops of [`crate::cpu`]; each op sums
//! in a fixed order, so a step is deterministic.

use crate::cpu::{activation, conv, layout, vq};
use crate::geometry::{Conv2dGeom, Conv2dParams, ConvTranspose2dGeom, ConvTranspose2dParams};
use crate::io::TensorFile;
use crate::models::vqvae2::VqVae2Config;
use crate::rng::counter_u64;
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

/// An activation: NCHW shape and values.
#[derive(Clone, Debug)]
struct Act {
    shape: [usize; 4],
    data: Vec<f32>,
}

impl Act {
    fn new(shape: [usize; 4], data: Vec<f32>) -> Self {
        Act { shape, data }
    }
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
    x: Act,
    inner: Option<(Act, Act)>,
}

fn param(store: &ParamStore, id: usize) -> &[f32] {
    &store.get(id).value
}

fn conv_geom(
    store: &ParamStore,
    x: &Act,
    w: usize,
    stride: usize,
    pad: usize,
) -> Result<Conv2dGeom> {
    Conv2dGeom::new(
        &x.shape,
        &store.get(w).shape,
        Conv2dParams::new(stride, pad),
    )
}

fn convt_geom(store: &ParamStore, x: &Act, w: usize) -> Result<ConvTranspose2dGeom> {
    ConvTranspose2dGeom::new(
        &x.shape,
        &store.get(w).shape,
        ConvTranspose2dParams::new(2, 1),
    )
}

fn conv_fwd(
    store: &ParamStore,
    x: &Act,
    w: usize,
    b: usize,
    stride: usize,
    pad: usize,
) -> Result<Act> {
    let g = conv_geom(store, x, w, stride, pad)?;
    let s = g.out_shape();
    let mut y = vec![0f32; s.iter().product()];
    conv::conv2d_forward(&g, &x.data, param(store, w), Some(param(store, b)), &mut y)?;
    Ok(Act::new(s, y))
}

/// Conv2d backward: accumulates the weight and bias gradients into the
/// store, returns `dx`.
#[allow(clippy::too_many_arguments)]
fn conv_bwd(
    store: &mut ParamStore,
    x: &Act,
    dy: &[f32],
    w: usize,
    b: usize,
    stride: usize,
    pad: usize,
) -> Result<Vec<f32>> {
    let g = conv_geom(store, x, w, stride, pad)?;
    let mut dx = vec![0f32; x.data.len()];
    let mut dw = vec![0f32; store.get(w).value.len()];
    let mut db = vec![0f32; store.get(b).value.len()];
    conv::conv2d_backward(
        &g,
        &x.data,
        param(store, w),
        dy,
        &mut dx,
        &mut dw,
        Some(&mut db),
    )?;
    store.accumulate(w, &dw)?;
    store.accumulate(b, &db)?;
    Ok(dx)
}

fn convt_fwd(store: &ParamStore, x: &Act, w: usize, b: usize) -> Result<Act> {
    let g = convt_geom(store, x, w)?;
    let s = g.out_shape();
    let mut y = vec![0f32; s.iter().product()];
    conv::conv_transpose2d_forward(&g, &x.data, param(store, w), Some(param(store, b)), &mut y)?;
    Ok(Act::new(s, y))
}

fn convt_bwd(store: &mut ParamStore, x: &Act, dy: &[f32], w: usize, b: usize) -> Result<Vec<f32>> {
    let g = convt_geom(store, x, w)?;
    let mut dx = vec![0f32; x.data.len()];
    let mut dw = vec![0f32; store.get(w).value.len()];
    let mut db = vec![0f32; store.get(b).value.len()];
    conv::conv_transpose2d_backward(
        &g,
        &x.data,
        param(store, w),
        dy,
        &mut dx,
        &mut dw,
        Some(&mut db),
    )?;
    store.accumulate(w, &dw)?;
    store.accumulate(b, &db)?;
    Ok(dx)
}

fn relu(x: &Act) -> Result<Act> {
    let mut y = vec![0f32; x.data.len()];
    activation::relu_forward(&x.data, &mut y)?;
    Ok(Act::new(x.shape, y))
}

fn relu_bwd(x: &Act, dy: &[f32]) -> Result<Vec<f32>> {
    let mut dx = vec![0f32; dy.len()];
    activation::relu_backward(&x.data, dy, &mut dx)?;
    Ok(dx)
}

fn add_into(acc: &mut [f32], g: &[f32]) {
    for (a, &b) in acc.iter_mut().zip(g) {
        *a += b;
    }
}

/// A sequence of layers (an encoder or a decoder).
struct Stack {
    layers: Vec<Layer>,
}

impl Stack {
    fn forward(&self, store: &ParamStore, x: Act) -> Result<(Act, Vec<Saved>)> {
        let mut saved = Vec::with_capacity(self.layers.len());
        let mut x = x;
        for layer in &self.layers {
            let (y, inner) = match *layer {
                Layer::Conv { w, b, stride, pad } => {
                    (conv_fwd(store, &x, w, b, stride, pad)?, None)
                }
                Layer::ConvT { w, b } => (convt_fwd(store, &x, w, b)?, None),
                Layer::Relu => (relu(&x)?, None),
                Layer::Res { w1, b1, w3, b3 } => {
                    let a = relu(&x)?;
                    let h = conv_fwd(store, &a, w1, b1, 1, 1)?;
                    let r = relu(&h)?;
                    let mut y = conv_fwd(store, &r, w3, b3, 1, 0)?;
                    add_into(&mut y.data, &x.data);
                    (y, Some((a, h)))
                }
            };
            saved.push(Saved { x, inner });
            x = y;
        }
        Ok((x, saved))
    }

    /// Backward from `dy` at the stack's output; returns `dx` at its input.
    fn backward(&self, store: &mut ParamStore, saved: &[Saved], dy: Vec<f32>) -> Result<Vec<f32>> {
        let mut dy = dy;
        for (layer, s) in self.layers.iter().zip(saved).rev() {
            dy = match *layer {
                Layer::Conv { w, b, stride, pad } => conv_bwd(store, &s.x, &dy, w, b, stride, pad)?,
                Layer::ConvT { w, b } => convt_bwd(store, &s.x, &dy, w, b)?,
                Layer::Relu => relu_bwd(&s.x, &dy)?,
                Layer::Res { w1, b1, w3, b3 } => {
                    let (a, h) = s.inner.as_ref().ok_or_else(|| {
                        Error::invalid("residual block saved without its activations")
                    })?;
                    let r = relu(h)?;
                    let dr = conv_bwd(store, &r, &dy, w3, b3, 1, 0)?;
                    let dh = relu_bwd(h, &dr)?;
                    let da = conv_bwd(store, a, &dh, w1, b1, 1, 1)?;
                    let mut dx = relu_bwd(&s.x, &da)?;
                    add_into(&mut dx, &dy);
                    dx
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
/// codebook vectors `quant` and the straight-through output
/// `pre + (quant − pre)`.
struct Quantized {
    ids: Vec<i32>,
    quant: Vec<f32>,
    out: Act,
}

fn quantize(store: &ParamStore, level: &str, pre: &Act) -> Result<Quantized> {
    let embed = store.by_name(&format!("{level}.embed"))?;
    let [n, d, h, w] = pre.shape;
    let k = match embed.shape.as_slice() {
        &[ed, k] if ed == d => k,
        s => {
            return Err(Error::shape(
                "vqvae2 train step",
                format!("{level}.embed has shape {s:?}, expected [{d}, n_embed]"),
            ))
        }
    };
    let mut norms = vec![0f32; k];
    vq::vq_code_norms(d, k, &embed.value, &mut norms)?;
    let mut ids = vec![0i32; n * h * w];
    let mut quant = vec![0f32; pre.data.len()];
    vq::vq_lookup_forward(
        n,
        d,
        h * w,
        k,
        &pre.data,
        &embed.value,
        &norms,
        &mut ids,
        Some(&mut quant),
        None,
    )?;
    let out = pre
        .data
        .iter()
        .zip(&quant)
        .map(|(&x, &q)| x + (q - x))
        .collect();
    Ok(Quantized {
        ids,
        quant,
        out: Act::new(pre.shape, out),
    })
}

fn concat(a: &Act, b: &Act) -> Result<Act> {
    let [n, ca, h, w] = a.shape;
    let cb = b.shape[1];
    if b.shape != [n, cb, h, w] {
        return Err(Error::shape(
            "vqvae2 train step",
            format!(
                "cannot concatenate {:?} and {:?} along channels",
                a.shape, b.shape
            ),
        ));
    }
    let c = ca + cb;
    let mut y = vec![0f32; n * c * h * w];
    layout::copy_channels(n, ca, h * w, &a.data, c, 0, &mut y)?;
    layout::copy_channels(n, cb, h * w, &b.data, c, ca, &mut y)?;
    Ok(Act::new([n, c, h, w], y))
}

/// Splits the gradient of a channel concatenation of `ca` and `cb` channels.
fn split(shape: [usize; 4], ca: usize, dy: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
    let [n, c, h, w] = shape;
    let cb = c - ca;
    let mut da = vec![0f32; n * ca * h * w];
    let mut db = vec![0f32; n * cb * h * w];
    layout::slice_channels(n, c, h * w, dy, 0, ca, &mut da)?;
    layout::slice_channels(n, c, h * w, dy, ca, cb, &mut db)?;
    Ok((da, db))
}

/// What the forward pass keeps for the backward pass and the EMA update.
struct Forward {
    saved_enc_b: Vec<Saved>,
    saved_enc_t: Vec<Saved>,
    et: Act,
    pre_t: Act,
    q_t: Quantized,
    saved_dec_t: Vec<Saved>,
    cat_b: Act,
    pre_b: Act,
    q_b: Quantized,
    saved_dec: Vec<Saved>,
    dec: Act,
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

fn forward(net: &Net, store: &ParamStore, x: Act) -> Result<Forward> {
    let (eb, saved_enc_b) = net.enc_b.forward(store, x)?;
    let (et, saved_enc_t) = net.enc_t.forward(store, eb.clone())?;
    let (w, b) = net.quantize_conv_t;
    let pre_t = conv_fwd(store, &et, w, b, 1, 0)?;
    let q_t = quantize(store, "quantize_t", &pre_t)?;
    let (dt, saved_dec_t) = net.dec_t.forward(store, q_t.out.clone())?;
    let cat_b = concat(&dt, &eb)?;
    let (w, b) = net.quantize_conv_b;
    let pre_b = conv_fwd(store, &cat_b, w, b, 1, 0)?;
    let q_b = quantize(store, "quantize_b", &pre_b)?;
    let (w, b) = net.upsample_t;
    let up = convt_fwd(store, &q_t.out, w, b)?;
    let cat = concat(&up, &q_b.out)?;
    let (dec, saved_dec) = net.dec.forward(store, cat)?;
    Ok(Forward {
        saved_enc_b,
        saved_enc_t,
        et,
        pre_t,
        q_t,
        saved_dec_t,
        cat_b,
        pre_b,
        q_b,
        saved_dec,
        dec,
    })
}

/// The losses of a forward pass: `(loss, recon_loss, latent_loss)`.
fn losses(f: &Forward, x: &[f32], w: f32) -> Result<(f32, f32, f32)> {
    let recon = loss::mse(&f.dec.data, x)?;
    let diff_t = loss::vq_commitment(&f.q_t.quant, &f.pre_t.data)?;
    let diff_b = loss::vq_commitment(&f.q_b.quant, &f.pre_b.data)?;
    let latent = diff_t + diff_b;
    Ok((recon + w * latent, recon, latent))
}

/// The loss of the current parameters on `x` (forward only, nothing
/// changed): `(loss, recon_loss, latent_loss)`.
pub fn loss_only(
    store: &ParamStore,
    cfg: &VqVae2Config,
    shape: &[usize],
    x: &[f32],
    step: &StepConfig,
) -> Result<(f32, f32, f32)> {
    let s = check_input(cfg, shape, x)?;
    let net = Net::new(store, cfg)?;
    let f = forward(&net, store, Act::new(s, x.to_vec()))?;
    losses(&f, x, step.latent_loss_weight)
}

/// The forward pass only (nothing changed): losses, codes and the
/// reconstruction of `x`, as a training step would compute them before its
/// update. For validation metrics.
pub fn evaluate(
    store: &ParamStore,
    cfg: &VqVae2Config,
    shape: &[usize],
    x: &[f32],
    step: &StepConfig,
) -> Result<StepOutput> {
    let s = check_input(cfg, shape, x)?;
    let net = Net::new(store, cfg)?;
    let f = forward(&net, store, Act::new(s, x.to_vec()))?;
    let (total, recon, latent) = losses(&f, x, step.latent_loss_weight)?;
    let ids_shape = |a: &Act| vec![a.shape[0], a.shape[2], a.shape[3]];
    Ok(StepOutput {
        loss: total,
        recon_loss: recon,
        latent_loss: latent,
        id_t_shape: ids_shape(&f.pre_t),
        id_t: f.q_t.ids,
        id_b_shape: ids_shape(&f.pre_b),
        id_b: f.q_b.ids,
        dec: f.dec.data,
    })
}

/// Forward and backward on `x` `[n, in_channel, h, w]`: sets the store's
/// gradients (zeroed first) to the loss's gradient, updates nothing else,
/// and returns the step's outputs together with the quantizer inputs
/// `pre_t`, `pre_b` that the EMA update needs.
fn forward_backward(
    store: &mut ParamStore,
    cfg: &VqVae2Config,
    shape: &[usize],
    x: &[f32],
    step: &StepConfig,
) -> Result<(StepOutput, Act, Act)> {
    let s = check_input(cfg, shape, x)?;
    let net = Net::new(store, cfg)?;
    let f = forward(&net, store, Act::new(s, x.to_vec()))?;
    let (total, recon, latent) = losses(&f, x, step.latent_loss_weight)?;
    store.zero_grads();
    let wl = step.latent_loss_weight;
    let e = cfg.embed_dim;

    // Decoder, then the concatenation [upsample_t(quant_t), quant_b].
    let d_dec = loss::mse_backward(&f.dec.data, x, 1.0)?;
    let d_cat = net.dec.backward(store, &f.saved_dec, d_dec)?;
    let cat_shape = f.saved_dec[0].x.shape;
    let (d_up, d_qb) = split(cat_shape, e, &d_cat)?;
    let (w, b) = net.upsample_t;
    let d_qt_up = convt_bwd(store, &f.q_t.out, &d_up, w, b)?;

    // Bottom quantizer: straight-through plus the commitment term.
    let mut d_pre_b = d_qb;
    add_into(
        &mut d_pre_b,
        &loss::vq_commitment_backward(&f.q_b.quant, &f.pre_b.data, wl)?,
    );
    let (w, b) = net.quantize_conv_b;
    let d_cat_b = conv_bwd(store, &f.cat_b, &d_pre_b, w, b, 1, 0)?;
    let (d_dt, d_eb_direct) = split(f.cat_b.shape, e, &d_cat_b)?;
    let d_qt_dec = net.dec_t.backward(store, &f.saved_dec_t, d_dt)?;

    // Top quantizer.
    let mut d_pre_t = d_qt_up;
    add_into(&mut d_pre_t, &d_qt_dec);
    add_into(
        &mut d_pre_t,
        &loss::vq_commitment_backward(&f.q_t.quant, &f.pre_t.data, wl)?,
    );
    let (w, b) = net.quantize_conv_t;
    let d_et = conv_bwd(store, &f.et, &d_pre_t, w, b, 1, 0)?;

    // Encoders; enc_b's output feeds enc_t and the bottom concatenation.
    let mut d_eb = net.enc_t.backward(store, &f.saved_enc_t, d_et)?;
    add_into(&mut d_eb, &d_eb_direct);
    net.enc_b.backward(store, &f.saved_enc_b, d_eb)?;

    let ids_shape = |a: &Act| vec![a.shape[0], a.shape[2], a.shape[3]];
    let out = StepOutput {
        loss: total,
        recon_loss: recon,
        latent_loss: latent,
        id_t_shape: ids_shape(&f.pre_t),
        id_t: f.q_t.ids.clone(),
        id_b_shape: ids_shape(&f.pre_b),
        id_b: f.q_b.ids.clone(),
        dec: f.dec.data,
    };
    Ok((out, f.pre_t, f.pre_b))
}

/// Gradients only: the store's gradients are set to those of the loss at
/// the current parameters; values and buffers are unchanged.
pub fn gradients(
    store: &mut ParamStore,
    cfg: &VqVae2Config,
    shape: &[usize],
    x: &[f32],
    step: &StepConfig,
) -> Result<StepOutput> {
    Ok(forward_backward(store, cfg, shape, x, step)?.0)
}

fn ema_update(
    store: &mut ParamStore,
    level: &str,
    pre: &Act,
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

/// One training step: forward and backward on `x`, the EMA update of both
/// codebooks with the codes of the old codebooks, and one step of `opt`
/// (registered with [`ParamStore::register`]) at learning rate `lr` over
/// the trainable parameters. The store's gradients are left holding this
/// step's gradients.
pub fn train_step(
    store: &mut ParamStore,
    opt: &mut Optimizer,
    lr: f64,
    cfg: &VqVae2Config,
    shape: &[usize],
    x: &[f32],
    step: &StepConfig,
) -> Result<StepOutput> {
    Ok(train_step_restarting(store, opt, lr, cfg, shape, x, step, None)?.0)
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
/// on the top and bottom level.
#[allow(clippy::too_many_arguments)]
pub fn train_step_restarting(
    store: &mut ParamStore,
    opt: &mut Optimizer,
    lr: f64,
    cfg: &VqVae2Config,
    shape: &[usize],
    x: &[f32],
    step: &StepConfig,
    restart: Option<&Restart>,
) -> Result<(StepOutput, [usize; 2])> {
    let (out, pre_t, pre_b) = forward_backward(store, cfg, shape, x, step)?;
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
    pre: &Act,
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
