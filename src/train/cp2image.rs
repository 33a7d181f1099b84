//! One CP2Image training step (`docs/MODELS.md` §3 and §4) on any device:
//! a generator update, then a discriminator update, both with Adam.
//!
//! - Generator step: `fake = G(z)`; the discriminator's hidden features
//!   `h_i` (block outputs) of `fake` and of the real cells `x`;
//!   `loss_g = MSE(fake, x) + Σ_i MSE(h_i(fake), h_i(x).detach())`, only
//!   G's parameters updated.
//! - Discriminator step, with the updated generator: `fake = G(z).detach()`,
//!   `loss_d = −(mean log D(x_real) + mean log(1 − D(fake)))`, only D's
//!   parameters updated.
//!
//! Every module runs in training mode: BatchNorm with batch statistics and
//! running statistics updated per forward; the discriminator's spectral
//! norm does one power iteration per forward (`v ← n(Wᵀu)`, `u ← n(Wv)`,
//! `σ = uᵀWv`, weight `W/σ`), and its backward treats u and v as constants:
//! `dW = G/σ − ⟨G, W⟩/σ² · u vᵀ` for the gradient `G` of `W/σ`.
//!
//! Written llm.c style: each layer's forward keeps what its backward needs
//! (as [`Tensor`]s on the step's device), no tape; every layer runs through
//! [`crate::ops`], so the CPU device runs the [`crate::cpu`] reference ops
//! and CUDA / the emulated device the kernels. Reductions run in a fixed
//! order on every device, so a step is deterministic.
//!
//! On the host in this version, with the transfers they cost:
//! - the parameters live in the host [`ParamStore`]: each step uploads G's
//!   and D's tensors once (running statistics included, which then stay on
//!   the device until the step ends and are downloaded into the store), and
//!   G's trainable tensors again after G's Adam update; every gradient a
//!   backward produces is downloaded and accumulated into the store, where
//!   Adam runs;
//! - the spectral norm's power iteration and its backward correction
//!   (matrices of at most `c_out × c_in·9`): per discriminator forward and
//!   block, `W/σ` is uploaded, and in the discriminator step `dW` of
//!   `W/σ` is downloaded;
//! - the loss reductions ([`crate::train::loss`]): the generated image and
//!   the hidden features (generator step), the probabilities are
//!   downloaded; the loss gradients (`d fake`, `d h_i`, `d prob`) uploaded;
//! - the batch `z`, `x`, `x_real` is uploaded once per step.

use std::collections::BTreeMap;

use crate::backend::Backend;
use crate::geometry::{Conv2dParams, Pool2dParams};
use crate::io::{TensorFile, TensorWriter};
use crate::ops;
use crate::tensor::Tensor;
use crate::train::loss;
use crate::train::optim::Optimizer;
use crate::train::store::{Param, ParamStore};
use crate::{Error, Result};

const OP: &str = "cp2image train step";
/// LeakyReLU slope of both networks.
const SLOPE: f32 = 0.2;
/// BatchNorm momentum and eps (PyTorch's defaults).
const BN_MOMENTUM: f32 = 0.1;
const BN_EPS: f32 = 1e-5;
/// Spectral norm's normalize eps (PyTorch's default).
const SN_EPS: f64 = 1e-12;

/// One network's `state_dict` for training: f32 tensors in a
/// [`ParamStore`] (running statistics and spectral-norm `weight_u`,
/// `weight_v` as buffers) and the BatchNorm counters beside it.
#[derive(Clone, Debug, PartialEq)]
pub struct NetState {
    /// Every f32 tensor by `state_dict` name.
    pub params: ParamStore,
    /// `P.num_batches_tracked` of every BatchNorm `P`.
    pub num_batches_tracked: BTreeMap<String, i64>,
    blocks: usize,
}

fn is_buffer(name: &str) -> bool {
    [".running_mean", ".running_var", ".weight_u", ".weight_v"]
        .iter()
        .any(|s| name.ends_with(s))
}

impl NetState {
    /// The tensors of `file` under `prefix` (e.g. `"G.before."`, or `""`),
    /// prefix removed. A missing `num_batches_tracked` counts as 0.
    pub fn from_file(file: &TensorFile, prefix: &str) -> Result<Self> {
        let (params, mut counters) = ParamStore::read_state_dict(file, prefix, is_buffer)?;
        let blocks = (0..)
            .take_while(|i| params.id(&format!("blocks.{i}.bn.weight")).is_ok())
            .count();
        if blocks == 0 {
            return Err(Error::format(
                file.path(),
                format!("no tensors \"{prefix}blocks.0.bn.weight\": not a CP2Image network"),
            ));
        }
        // The tensors must be exactly the network's: per block
        // `bn.{weight,bias,running_mean,running_var}` and the conv's, then
        // `fc` (and `out` for the generator); the discriminator's convs carry
        // spectral norm (`weight_orig`, `weight_u`, `weight_v`).
        let sn = params.params().iter().any(|p| {
            [".weight_orig", ".weight_u", ".weight_v"]
                .iter()
                .any(|s| p.name.ends_with(s))
        });
        let (kind, conv): (&str, &[&str]) = if sn {
            (
                "discriminator",
                &["weight_orig", "weight_u", "weight_v", "bias"],
            )
        } else {
            ("generator", &["weight", "bias"])
        };
        let mut expected: Vec<String> = Vec::new();
        for i in 0..blocks {
            for t in ["weight", "bias", "running_mean", "running_var"] {
                expected.push(format!("blocks.{i}.bn.{t}"));
            }
            expected.extend(conv.iter().map(|t| format!("blocks.{i}.conv.{t}")));
        }
        let heads: &[&str] = if sn { &["fc"] } else { &["fc", "out"] };
        for h in heads {
            expected.push(format!("{h}.weight"));
            expected.push(format!("{h}.bias"));
        }
        if let Some(name) = expected.iter().find(|n| params.id(n).is_err()) {
            return Err(Error::format(
                file.path(),
                format!("missing tensor \"{prefix}{name}\" (a CP2Image {kind} of {blocks} blocks has it)"),
            ));
        }
        let known: std::collections::HashSet<&str> = expected.iter().map(String::as_str).collect();
        let extra = params
            .params()
            .iter()
            .map(|p| p.name.as_str())
            .find(|n| !known.contains(n))
            .or_else(|| {
                counters.keys().map(String::as_str).find(|k| {
                    k.strip_suffix(".num_batches_tracked")
                        .is_none_or(|bn| !known.contains(format!("{bn}.weight").as_str()))
                })
            });
        if let Some(name) = extra {
            return Err(Error::format(
                file.path(),
                format!(
                    "tensor \"{prefix}{name}\" is not part of a CP2Image {kind} of {blocks} blocks"
                ),
            ));
        }
        for i in 0..blocks {
            counters
                .entry(format!("blocks.{i}.bn.num_batches_tracked"))
                .or_insert(0);
        }
        Ok(NetState {
            params,
            num_batches_tracked: counters,
            blocks,
        })
    }

    /// Adds the `state_dict` (f32 tensors, counters as int64 scalars) to
    /// `w` under `prefix`.
    pub fn write_values(&self, w: &mut TensorWriter, prefix: &str) -> Result<()> {
        self.params.write_values(w, prefix)?;
        for (name, &count) in &self.num_batches_tracked {
            w.add_slice(&format!("{prefix}{name}"), &[], &[count])?;
        }
        Ok(())
    }

    /// Adds every trainable parameter's gradient to `w` under `prefix`.
    pub fn write_grads(&self, w: &mut TensorWriter, prefix: &str) -> Result<()> {
        for p in self.params.params().iter().filter(|p| p.trainable) {
            w.add_slice(&format!("{prefix}{}", p.name), &p.shape, &p.grad)?;
        }
        Ok(())
    }

    fn get(&self, name: &str) -> Result<(usize, Vec<usize>)> {
        let id = self.params.id(name)?;
        Ok((id, self.params.get(id).shape.clone()))
    }

    fn count_batch(&mut self, block: usize) {
        if let Some(c) = self
            .num_batches_tracked
            .get_mut(&format!("blocks.{block}.bn.num_batches_tracked"))
        {
            *c += 1;
        }
    }
}

/// The 3×3 convs of both networks: stride 1, padding 1.
fn conv_params() -> Conv2dParams {
    Conv2dParams::new(1, 1)
}

/// The discriminator's 2×2 average pooling.
fn pool_params() -> Pool2dParams {
    Pool2dParams::new(2, 2, 0)
}

/// One network's tensors on the step's device: the parameters the layers
/// read (by store id; `None` for those not uploaded) and each block's
/// BatchNorm running statistics, which the forwards update in place.
struct DevNet {
    params: Vec<Option<Tensor>>,
    /// Block `i`'s running statistics.
    running: Vec<Running>,
}

/// One BatchNorm's running statistics on the device and their store ids.
struct Running {
    mean: Tensor,
    var: Tensor,
    ids: (usize, usize),
}

impl DevNet {
    /// Uploads `net`'s running statistics and every other tensor that
    /// `pick` selects.
    fn upload(be: &Backend, net: &NetState, pick: impl Fn(&Param) -> bool) -> Result<Self> {
        let mut running = Vec::with_capacity(net.blocks);
        let mut stats = vec![false; net.params.params().len()];
        for i in 0..net.blocks {
            let (m, v) = (
                net.get(&format!("blocks.{i}.bn.running_mean"))?,
                net.get(&format!("blocks.{i}.bn.running_var"))?,
            );
            running.push(Running {
                mean: Tensor::from_slice(be, &m.1, &net.params.get(m.0).value)?,
                var: Tensor::from_slice(be, &v.1, &net.params.get(v.0).value)?,
                ids: (m.0, v.0),
            });
            stats[m.0] = true;
            stats[v.0] = true;
        }
        let mut dev = DevNet {
            params: Vec::new(),
            running,
        };
        dev.params = net
            .params
            .params()
            .iter()
            .zip(&stats)
            .map(|(p, &s)| {
                (!s && pick(p))
                    .then(|| Tensor::from_slice(be, &p.shape, &p.value))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(dev)
    }

    /// Uploads `net`'s trainable tensors again (after an optimizer step).
    fn refresh_trainable(&mut self, be: &Backend, net: &NetState) -> Result<()> {
        for (slot, p) in self.params.iter_mut().zip(net.params.params()) {
            if p.trainable && slot.is_some() {
                *slot = Some(Tensor::from_slice(be, &p.shape, &p.value)?);
            }
        }
        Ok(())
    }

    /// Block `i`'s running statistics and the parameters, borrowed apart.
    fn split(&mut self, i: usize) -> Result<(&[Option<Tensor>], &mut Running)> {
        let running = self
            .running
            .get_mut(i)
            .ok_or_else(|| Error::invalid(format!("{OP}: no running statistics for block {i}")))?;
        Ok((&self.params, running))
    }

    /// Downloads the running statistics into `net`'s store.
    fn download_running(self, net: &mut NetState) -> Result<()> {
        for r in self.running {
            net.params.get_mut(r.ids.0).value = r.mean.into_vec()?;
            net.params.get_mut(r.ids.1).value = r.var.into_vec()?;
        }
        Ok(())
    }
}

/// The device copy of store tensor `id`.
fn dev_param<'a>(params: &'a [Option<Tensor>], net: &NetState, id: usize) -> Result<&'a Tensor> {
    params.get(id).and_then(Option::as_ref).ok_or_else(|| {
        Error::invalid(format!(
            "{OP}: tensor \"{}\" was not uploaded",
            net.params.get(id).name
        ))
    })
}

/// The device copy of the store tensor named `name`.
fn dev_named<'a>(params: &'a [Option<Tensor>], net: &NetState, name: &str) -> Result<&'a Tensor> {
    dev_param(params, net, net.params.id(name)?)
}

/// Downloads a gradient and adds it into the store's gradient of `id`.
fn accumulate(net: &mut NetState, id: usize, grad: Tensor) -> Result<()> {
    net.params.accumulate(id, &grad.into_vec()?)
}

/// What a conv + BN + LeakyReLU keeps for backward (its input and weight
/// are the caller's).
struct ConvBn {
    conv_out: Tensor,
    save_mean: Tensor,
    save_inv_std: Tensor,
    bn_out: Tensor,
}

/// conv (weight `w`, bias `blocks.{block}.conv.bias` of `params`) →
/// BatchNorm (training, running statistics `running`) → LeakyReLU(0.2) on
/// `x`.
#[allow(clippy::too_many_arguments)]
fn conv_bn_forward(
    be: &Backend,
    net: &mut NetState,
    params: &[Option<Tensor>],
    running: &mut Running,
    block: usize,
    x: &Tensor,
    w: &Tensor,
) -> Result<(ConvBn, Tensor)> {
    let p = format!("blocks.{block}");
    let b = dev_named(params, net, &format!("{p}.conv.bias"))?;
    let conv_out = ops::conv2d(be, x, w, Some(b), conv_params())?;
    let gamma = dev_named(params, net, &format!("{p}.bn.weight"))?;
    let beta = dev_named(params, net, &format!("{p}.bn.bias"))?;
    let bn = ops::batchnorm_train(
        be,
        &conv_out,
        gamma,
        beta,
        &mut running.mean,
        &mut running.var,
        BN_EPS,
        BN_MOMENTUM,
    )?;
    net.count_batch(block);
    let y = ops::leaky_relu(be, &bn.y, SLOPE)?;
    Ok((
        ConvBn {
            conv_out,
            save_mean: bn.save_mean,
            save_inv_std: bn.save_inv_std,
            bn_out: bn.y,
        },
        y,
    ))
}

/// Backward of [`conv_bn_forward`] on its input `x` and weight `w`: with
/// `params`, accumulates the BN and bias gradients into the store; returns
/// (dx, dW) with dW the gradient of `w`.
#[allow(clippy::too_many_arguments)]
fn conv_bn_backward(
    be: &Backend,
    net: &mut NetState,
    dev: &DevNet,
    block: usize,
    s: &ConvBn,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    params: bool,
) -> Result<(Tensor, Tensor)> {
    let p = format!("blocks.{block}");
    let d_bn = ops::leaky_relu_backward(be, &s.bn_out, dy, SLOPE)?;
    let gamma_id = net.params.id(&format!("{p}.bn.weight"))?;
    let beta_id = net.params.id(&format!("{p}.bn.bias"))?;
    let bn = ops::batchnorm_train_backward(
        be,
        &s.conv_out,
        dev_param(&dev.params, net, gamma_id)?,
        &s.save_mean,
        &s.save_inv_std,
        &d_bn,
    )?;
    let cg = ops::conv2d_backward(be, x, w, &bn.dx, conv_params(), params)?;
    if params {
        accumulate(net, gamma_id, bn.dgamma)?;
        accumulate(net, beta_id, bn.dbeta)?;
        let bias_id = net.params.id(&format!("{p}.conv.bias"))?;
        let db = cg
            .db
            .ok_or_else(|| Error::invalid(format!("{OP}: {p}: no bias gradient")))?;
        accumulate(net, bias_id, db)?;
    }
    Ok((cg.dx, cg.dw))
}

// ---------------------------------------------------------------- generator

/// What a generator forward keeps: the fc output `[n, c0, 4, 4]`, each
/// block's saved tensors and its upsampled output (the next block's input;
/// the last one feeds the output conv), the image.
struct GenForward {
    h0: Tensor,
    blocks: Vec<ConvBn>,
    ups: Vec<Tensor>,
    image: Tensor,
}

impl GenForward {
    /// The input of block `i`.
    fn block_input(&self, i: usize) -> &Tensor {
        match i.checked_sub(1).and_then(|j| self.ups.get(j)) {
            Some(t) => t,
            None => &self.h0,
        }
    }

    /// The output conv's input.
    fn pre_out(&self) -> &Tensor {
        self.ups.last().unwrap_or(&self.h0)
    }
}

fn generator_forward(
    be: &Backend,
    g: &mut NetState,
    dev: &mut DevNet,
    z: &Tensor,
) -> Result<GenForward> {
    let (_, fc_shape) = g.get("fc.weight")?;
    let [out_f, p] = fc_shape[..] else {
        return Err(Error::shape(
            OP,
            format!("fc.weight has shape {fc_shape:?}, expected [out, p]"),
        ));
    };
    let n = z.shape().first().copied().unwrap_or(0);
    if z.shape() != [n, p] {
        return Err(Error::shape(
            OP,
            format!("z has shape {:?}, expected [{n}, {p}]", z.shape()),
        ));
    }
    let (_, w0) = g.get("blocks.0.conv.weight")?;
    let [_, c0, _, _] = w0[..] else {
        return Err(Error::shape(
            OP,
            format!("blocks.0.conv.weight has shape {w0:?}, expected 4 dimensions"),
        ));
    };
    if c0 == 0 || out_f % (c0 * 16) != 0 || out_f != c0 * 16 {
        return Err(Error::shape(
            OP,
            format!("fc has {out_f} outputs, blocks.0 reads {c0} channels of 4×4"),
        ));
    }
    let h0 = ops::linear(
        be,
        z,
        dev_named(&dev.params, g, "fc.weight")?,
        Some(dev_named(&dev.params, g, "fc.bias")?),
    )?
    .reshape(&[n, c0, 4, 4])?;
    let mut blocks = Vec::with_capacity(g.blocks);
    let mut ups: Vec<Tensor> = Vec::with_capacity(g.blocks);
    for i in 0..g.blocks {
        let wid = g.params.id(&format!("blocks.{i}.conv.weight"))?;
        let (params, running) = dev.split(i)?;
        let w = dev_param(params, g, wid)?;
        let x = ups.last().unwrap_or(&h0);
        let (saved, y) = conv_bn_forward(be, g, params, running, i, x, w)?;
        ups.push(ops::upsample_nearest2x(be, &y)?);
        blocks.push(saved);
    }
    let pre_out = ups.last().unwrap_or(&h0);
    let logits = ops::conv2d(
        be,
        pre_out,
        dev_named(&dev.params, g, "out.weight")?,
        Some(dev_named(&dev.params, g, "out.bias")?),
        conv_params(),
    )?;
    let image = ops::sigmoid(be, &logits)?;
    Ok(GenForward {
        h0,
        blocks,
        ups,
        image,
    })
}

/// Accumulates the generator's parameter gradients for `d_image`.
fn generator_backward(
    be: &Backend,
    g: &mut NetState,
    dev: &DevNet,
    f: &GenForward,
    z: &Tensor,
    d_image: &Tensor,
) -> Result<()> {
    let d_logits = ops::sigmoid_backward(be, &f.image, d_image)?;
    let (ow, ob) = (g.params.id("out.weight")?, g.params.id("out.bias")?);
    let cg = ops::conv2d_backward(
        be,
        f.pre_out(),
        dev_param(&dev.params, g, ow)?,
        &d_logits,
        conv_params(),
        true,
    )?;
    accumulate(g, ow, cg.dw)?;
    let db = cg
        .db
        .ok_or_else(|| Error::invalid(format!("{OP}: out: no bias gradient")))?;
    accumulate(g, ob, db)?;
    let mut dh = cg.dx;
    for (i, s) in f.blocks.iter().enumerate().rev() {
        let dy = ops::upsample_nearest2x_backward(be, &dh)?;
        let wid = g.params.id(&format!("blocks.{i}.conv.weight"))?;
        let w = dev_param(&dev.params, g, wid)?;
        let (dx, dw) = conv_bn_backward(be, g, dev, i, s, f.block_input(i), w, &dy, true)?;
        accumulate(g, wid, dw)?;
        dh = dx;
    }
    let (fc_w, fc_b) = (g.params.id("fc.weight")?, g.params.id("fc.bias")?);
    let w = dev_param(&dev.params, g, fc_w)?;
    let n = z.shape().first().copied().unwrap_or(0);
    let dh = dh.reshape(&[n, w.shape()[0]])?;
    let lg = ops::linear_backward(be, z, w, &dh, true)?;
    accumulate(g, fc_w, lg.dw)?;
    let db = lg
        .db
        .ok_or_else(|| Error::invalid(format!("{OP}: fc: no bias gradient")))?;
    accumulate(g, fc_b, db)
}

// ------------------------------------------------------------ discriminator

/// The spectral-normalized weight of one forward and what its backward
/// needs.
struct Sn {
    u: Vec<f64>,
    v: Vec<f64>,
    sigma: f64,
}

/// One power iteration on block `block`'s `weight_u`/`weight_v` (updated
/// in the store), then `W/σ`.
fn spectral_norm(d: &mut NetState, block: usize) -> Result<(Vec<f32>, Vec<usize>, Sn)> {
    let p = format!("blocks.{block}.conv");
    let (wid, shape) = d.get(&format!("{p}.weight_orig"))?;
    let (uid, _) = d.get(&format!("{p}.weight_u"))?;
    let (vid, _) = d.get(&format!("{p}.weight_v"))?;
    let w = &d.params.get(wid).value;
    let rows = shape.first().copied().unwrap_or(0);
    let cols = w.len().checked_div(rows).unwrap_or(0);
    let (u0, v0) = (&d.params.get(uid).value, &d.params.get(vid).value);
    if u0.len() != rows || v0.len() != cols || rows * cols != w.len() {
        return Err(Error::shape(
            OP,
            format!(
                "{p}: weight_u [{}] and weight_v [{}] do not fit weight_orig {shape:?}",
                u0.len(),
                v0.len()
            ),
        ));
    }
    let normalize = |x: Vec<f64>| {
        let n = x.iter().map(|v| v * v).sum::<f64>().sqrt().max(SN_EPS);
        x.into_iter().map(|v| v / n).collect::<Vec<f64>>()
    };
    // v ← n(Wᵀu), u ← n(Wv), in f32 as PyTorch stores them.
    let wt_u: Vec<f64> = (0..cols)
        .map(|j| {
            (0..rows)
                .map(|i| w[i * cols + j] as f64 * u0[i] as f64)
                .sum()
        })
        .collect();
    let v: Vec<f64> = normalize(wt_u)
        .into_iter()
        .map(|x| x as f32 as f64)
        .collect();
    let w_v: Vec<f64> = (0..rows)
        .map(|i| (0..cols).map(|j| w[i * cols + j] as f64 * v[j]).sum())
        .collect();
    let u: Vec<f64> = normalize(w_v.clone())
        .into_iter()
        .map(|x| x as f32 as f64)
        .collect();
    let sigma: f64 = u.iter().zip(&w_v).map(|(a, b)| a * b).sum();
    if !(sigma.is_finite() && sigma != 0.0) {
        return Err(Error::invalid(format!(
            "{p}: spectral norm σ = {sigma} (a zero or non-finite weight)"
        )));
    }
    let w_sn: Vec<f32> = w.iter().map(|&x| (x as f64 / sigma) as f32).collect();
    d.params.get_mut(uid).value = u.iter().map(|&x| x as f32).collect();
    d.params.get_mut(vid).value = v.iter().map(|&x| x as f32).collect();
    Ok((w_sn, shape, Sn { u, v, sigma }))
}

/// Gradient of `weight_orig` from the gradient `g` of `W/σ`.
fn spectral_norm_backward(w: &[f32], g: &[f32], sn: &Sn) -> Vec<f32> {
    let cols = sn.v.len();
    let dot: f64 = g.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum();
    let k = dot / (sn.sigma * sn.sigma);
    g.iter()
        .enumerate()
        .map(|(idx, &gi)| {
            let (i, j) = (idx / cols, idx % cols);
            (gi as f64 / sn.sigma - k * sn.u[i] * sn.v[j]) as f32
        })
        .collect()
}

/// What one discriminator block keeps: the conv/BN tensors, the power
/// iteration, the uploaded `W/σ`, the LeakyReLU output's size and the
/// pooled output's shape.
struct DiscBlock {
    cb: ConvBn,
    sn: Sn,
    w_sn: Tensor,
    pre_pool_hw: (usize, usize),
    out_shape: [usize; 4],
}

/// What a discriminator forward keeps.
struct DiscForward {
    blocks: Vec<DiscBlock>,
    /// The block outputs h_0..h_{B−1} (after pooling); the last one
    /// flattened to `[n, features]` for `fc`.
    pooled: Vec<Tensor>,
    prob: Tensor,
}

impl DiscForward {
    /// The input of block `i > 0` (block 0 reads the caller's image).
    fn block_input<'a>(&'a self, i: usize, image: &'a Tensor) -> &'a Tensor {
        match i.checked_sub(1).and_then(|j| self.pooled.get(j)) {
            Some(t) => t,
            None => image,
        }
    }
}

fn discriminator_forward(
    be: &Backend,
    d: &mut NetState,
    dev: &mut DevNet,
    x: &Tensor,
) -> Result<DiscForward> {
    let n = match x.shape() {
        &[n, _, _, _] => n,
        s => {
            return Err(Error::shape(
                OP,
                format!("discriminator input has shape {s:?}, expected [n, c, h, w]"),
            ))
        }
    };
    let (mut blocks, mut pooled) = (Vec::with_capacity(d.blocks), Vec::<Tensor>::new());
    for i in 0..d.blocks {
        let (w_sn, wshape, sn) = spectral_norm(d, i)?;
        let w_sn = Tensor::from_vec(be, &wshape, w_sn)?;
        let (params, running) = dev.split(i)?;
        let input = pooled.last().unwrap_or(x);
        let (cb, y) = conv_bn_forward(be, d, params, running, i, input, &w_sn)?;
        let h = ops::avg_pool2d(be, &y, pool_params())?;
        let out_shape: [usize; 4] = h
            .shape()
            .try_into()
            .map_err(|_| Error::shape(OP, "pooled block output is not 4-D"))?;
        blocks.push(DiscBlock {
            cb,
            sn,
            w_sn,
            pre_pool_hw: (y.shape()[2], y.shape()[3]),
            out_shape,
        });
        pooled.push(h);
    }
    let (fw, fshape) = d.get("fc.weight")?;
    let last = pooled
        .pop()
        .ok_or_else(|| Error::shape(OP, "a discriminator without blocks"))?;
    let in_f = last.numel() / n.max(1);
    if fshape != [1, in_f] {
        return Err(Error::shape(
            OP,
            format!("fc.weight is {fshape:?}, the last block gives {in_f} features"),
        ));
    }
    let flat = last.reshape(&[n, in_f])?;
    let logit = ops::linear(
        be,
        &flat,
        dev_param(&dev.params, d, fw)?,
        Some(dev_named(&dev.params, d, "fc.bias")?),
    )?;
    pooled.push(flat);
    let prob = ops::sigmoid(be, &logit)?;
    Ok(DiscForward {
        blocks,
        pooled,
        prob,
    })
}

/// Backward of a discriminator forward on `image` for gradients `d_prob`
/// `[n, 1]` of the probabilities and `d_hidden[i]` of the block outputs
/// (either may be zero; `d_hidden` may be empty); accumulates D's parameter
/// gradients when `params` is set and returns the input gradient.
#[allow(clippy::too_many_arguments)]
fn discriminator_backward(
    be: &Backend,
    d: &mut NetState,
    dev: &DevNet,
    f: &DiscForward,
    image: &Tensor,
    d_prob: &Tensor,
    d_hidden: &[Tensor],
    params: bool,
) -> Result<Tensor> {
    let (fw, fb) = (d.params.id("fc.weight")?, d.params.id("fc.bias")?);
    let d_logit = ops::sigmoid_backward(be, &f.prob, d_prob)?;
    let flat = f
        .pooled
        .last()
        .ok_or_else(|| Error::shape(OP, "a discriminator without blocks"))?;
    let lg = ops::linear_backward(be, flat, dev_param(&dev.params, d, fw)?, &d_logit, true)?;
    if params {
        accumulate(d, fw, lg.dw)?;
        let db = lg
            .db
            .ok_or_else(|| Error::invalid(format!("{OP}: fc: no bias gradient")))?;
        accumulate(d, fb, db)?;
    }
    let mut dh = lg.dx;
    for (i, b) in f.blocks.iter().enumerate().rev() {
        dh = dh.reshape(&b.out_shape)?;
        if let Some(extra) = d_hidden.get(i) {
            dh = ops::add(be, &dh, extra)?;
        }
        let dy =
            ops::avg_pool2d_backward(be, &dh, pool_params(), b.pre_pool_hw.0, b.pre_pool_hw.1)?;
        let (dx, dw_sn) = conv_bn_backward(
            be,
            d,
            dev,
            i,
            &b.cb,
            f.block_input(i, image),
            &b.w_sn,
            &dy,
            params,
        )?;
        if params {
            let wid = d.params.id(&format!("blocks.{i}.conv.weight_orig"))?;
            let g = spectral_norm_backward(&d.params.get(wid).value, &dw_sn.into_vec()?, &b.sn);
            d.params.accumulate(wid, &g)?;
        }
        dh = dx;
    }
    Ok(dh)
}

// ---------------------------------------------------------------- the step

/// The step's batch: features `z` `[n, p]`, the cells `x` `[n, c, 64, 64]`
/// they describe, and an independent real batch `x_real` for the
/// discriminator (same shape).
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    /// Standardized feature vectors.
    pub z: &'a [f32],
    /// The real cells of `z`.
    pub x: &'a [f32],
    /// Real cells for the discriminator step.
    pub x_real: &'a [f32],
    /// `[n, c, h, w]` of `x` and `x_real`.
    pub shape: [usize; 4],
}

/// The two losses of a step (before its updates).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepLosses {
    /// The generator's loss.
    pub loss_g: f32,
    /// The discriminator's loss.
    pub loss_d: f32,
}

/// Weights of the generator's three loss terms.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossWeights {
    /// `MSE(G(z), x)`.
    pub mse: f32,
    /// `Σ_i MSE(h_i(G(z)), h_i(x))`.
    pub feature_matching: f32,
    /// The non-saturating adversarial term `−mean log D(G(z))`.
    pub adversarial: f32,
}

impl Default for LossWeights {
    /// `docs/MODELS.md` §3–4 and the golden: MSE and feature matching at
    /// weight 1, no adversarial term.
    fn default() -> Self {
        LossWeights {
            mse: 1.0,
            feature_matching: 1.0,
            adversarial: 0.0,
        }
    }
}

/// One generator update then one discriminator update (see the module
/// documentation) on the CPU with the default [`LossWeights`]; `opt_g` and
/// `opt_d` are registered over `g.params` and `d.params`
/// ([`ParamStore::register`]). Afterwards `g` holds the generator step's
/// gradients and `d` the discriminator step's.
pub fn train_step(
    g: &mut NetState,
    d: &mut NetState,
    opt_g: &mut Optimizer,
    opt_d: &mut Optimizer,
    lr: f64,
    batch: &Batch,
) -> Result<StepLosses> {
    train_step_on(&Backend::cpu(), g, d, opt_g, opt_d, lr, batch)
}

/// [`train_step`] on `be`'s device (f32 precision only).
pub fn train_step_on(
    be: &Backend,
    g: &mut NetState,
    d: &mut NetState,
    opt_g: &mut Optimizer,
    opt_d: &mut Optimizer,
    lr: f64,
    batch: &Batch,
) -> Result<StepLosses> {
    train_step_weighted_on(be, g, d, opt_g, opt_d, lr, batch, &LossWeights::default())
}

/// [`train_step`] with the generator's loss terms weighted by `w`.
#[allow(clippy::too_many_arguments)]
pub fn train_step_weighted(
    g: &mut NetState,
    d: &mut NetState,
    opt_g: &mut Optimizer,
    opt_d: &mut Optimizer,
    lr: f64,
    batch: &Batch,
    w: &LossWeights,
) -> Result<StepLosses> {
    train_step_weighted_on(&Backend::cpu(), g, d, opt_g, opt_d, lr, batch, w)
}

/// [`train_step_weighted`] on `be`'s device. Training runs in f32: a
/// backend with a reduced precision is refused.
#[allow(clippy::too_many_arguments)]
pub fn train_step_weighted_on(
    be: &Backend,
    g: &mut NetState,
    d: &mut NetState,
    opt_g: &mut Optimizer,
    opt_d: &mut Optimizer,
    lr: f64,
    batch: &Batch,
    w: &LossWeights,
) -> Result<StepLosses> {
    if be.precision().is_reduced() {
        return Err(Error::invalid(format!(
            "{OP}: training runs in f32, not {}",
            be.precision()
        )));
    }
    let n = batch.shape[0];
    let len: usize = batch.shape.iter().product();
    if batch.x.len() != len || batch.x_real.len() != len {
        return Err(Error::shape(
            OP,
            format!("x and x_real must both be {:?}", batch.shape),
        ));
    }
    let (_, fc_shape) = g.get("fc.weight")?;
    let p = fc_shape.get(1).copied().unwrap_or(0);
    if batch.z.len() != n * p {
        return Err(Error::shape(
            OP,
            format!("z has {} values, expected [{n}, {p}]", batch.z.len()),
        ));
    }
    let z = Tensor::from_slice(be, &[n, p], batch.z)?;
    let x = Tensor::from_slice(be, &batch.shape, batch.x)?;
    let x_real = Tensor::from_slice(be, &batch.shape, batch.x_real)?;
    // Spectral norm runs on the host: D's weight_orig, weight_u, weight_v
    // stay there.
    let sn_host = |p: &Param| {
        [".weight_orig", ".weight_u", ".weight_v"]
            .iter()
            .any(|s| p.name.ends_with(s))
    };
    let mut gdev = DevNet::upload(be, g, |_| true)?;
    let mut ddev = DevNet::upload(be, d, |p| !sn_host(p))?;

    // Generator step.
    g.params.zero_grads();
    let fake = generator_forward(be, g, &mut gdev, &z)?;
    if fake.image.shape() != batch.shape {
        return Err(Error::shape(
            OP,
            format!(
                "the generator makes {:?} per batch, x is {:?}",
                fake.image.shape(),
                batch.shape
            ),
        ));
    }
    let df = discriminator_forward(be, d, &mut ddev, &fake.image)?;
    let dr = discriminator_forward(be, d, &mut ddev, &x)?;
    let image = fake.image.to_vec()?;
    let mut loss_g = w.mse * loss::mse(&image, batch.x)?;
    let mut d_hidden = Vec::with_capacity(df.pooled.len());
    for ((hf, hr), b) in df.pooled.iter().zip(&dr.pooled).zip(&df.blocks) {
        let (hf, hr) = (hf.to_vec()?, hr.to_vec()?);
        loss_g += w.feature_matching * loss::mse(&hf, &hr)?;
        let dh = loss::mse_backward(&hf, &hr, w.feature_matching)?;
        d_hidden.push(Tensor::from_vec(be, &b.out_shape, dh)?);
    }
    let ones = vec![1.0; n];
    let d_prob = if w.adversarial != 0.0 {
        let prob = df.prob.to_vec()?;
        loss_g += w.adversarial * loss::bce(&prob, &ones)?;
        let dp = loss::bce_backward(&prob, &ones, w.adversarial)?;
        Tensor::from_vec(be, &[n, 1], dp)?
    } else {
        Tensor::zeros(be, &[n, 1])?
    };
    let d_image =
        discriminator_backward(be, d, &ddev, &df, &fake.image, &d_prob, &d_hidden, false)?;
    let d_mse = Tensor::from_vec(
        be,
        &batch.shape,
        loss::mse_backward(&image, batch.x, w.mse)?,
    )?;
    let d_image = ops::add(be, &d_image, &d_mse)?;
    generator_backward(be, g, &gdev, &fake, &z, &d_image)?;
    g.params.step(opt_g, lr)?;
    gdev.refresh_trainable(be, g)?;

    // Discriminator step with the updated generator.
    d.params.zero_grads();
    let fake = generator_forward(be, g, &mut gdev, &z)?;
    let pr = discriminator_forward(be, d, &mut ddev, &x_real)?;
    let pf = discriminator_forward(be, d, &mut ddev, &fake.image)?;
    let (prob_r, prob_f) = (pr.prob.to_vec()?, pf.prob.to_vec()?);
    let zeros = vec![0.0; n];
    let loss_d = loss::bce(&prob_r, &ones)? + loss::bce(&prob_f, &zeros)?;
    let d_prob = Tensor::from_vec(be, &[n, 1], loss::bce_backward(&prob_r, &ones, 1.0)?)?;
    discriminator_backward(be, d, &ddev, &pr, &x_real, &d_prob, &[], true)?;
    let d_prob = Tensor::from_vec(be, &[n, 1], loss::bce_backward(&prob_f, &zeros, 1.0)?)?;
    discriminator_backward(be, d, &ddev, &pf, &fake.image, &d_prob, &[], true)?;
    d.params.step(opt_d, lr)?;
    gdev.download_running(g)?;
    ddev.download_running(d)?;
    Ok(StepLosses { loss_g, loss_d })
}
