//! One CP2Image training step on the CPU (`docs/MODELS.md` §3 and §4): a
//! generator update, then a discriminator update, both with Adam.
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
//! Written llm.c style on the [`crate::cpu`] reference ops: each layer's
//! forward keeps what its backward needs; no tape. Reductions run in a
//! fixed order, so a step is deterministic.

use std::collections::BTreeMap;

use crate::cpu::{activation, conv, layout, linear, norm, pool};
use crate::geometry::{Conv2dGeom, Conv2dParams, Pool2dGeom, Pool2dParams};
use crate::io::{TensorFile, TensorWriter};
use crate::train::loss;
use crate::train::optim::Optimizer;
use crate::train::store::ParamStore;
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

/// What a conv + BN + LeakyReLU keeps for backward.
struct ConvBn {
    geom: Conv2dGeom,
    x: Vec<f32>,
    w: Vec<f32>,
    conv_out: Vec<f32>,
    save_mean: Vec<f32>,
    save_inv_std: Vec<f32>,
    bn_out: Vec<f32>,
}

/// conv (weight `w`, bias `b`) → BatchNorm (training) → LeakyReLU(0.2).
fn conv_bn_forward(
    net: &mut NetState,
    block: usize,
    x: Vec<f32>,
    x_shape: [usize; 4],
    w: Vec<f32>,
    w_shape: &[usize],
) -> Result<(ConvBn, Vec<f32>)> {
    let p = format!("blocks.{block}");
    let geom = Conv2dGeom::new(&x_shape, w_shape, Conv2dParams::new(1, 1))?;
    let (b, _) = net.get(&format!("{p}.conv.bias"))?;
    let mut conv_out = vec![0.0; geom.n * geom.c_out * geom.oh * geom.ow];
    conv::conv2d_forward(&geom, &x, &w, Some(&net.params.get(b).value), &mut conv_out)?;
    let (c, hw) = (geom.c_out, geom.oh * geom.ow);
    let ids = [
        net.params.id(&format!("{p}.bn.weight"))?,
        net.params.id(&format!("{p}.bn.bias"))?,
        net.params.id(&format!("{p}.bn.running_mean"))?,
        net.params.id(&format!("{p}.bn.running_var"))?,
    ];
    let gamma = net.params.get(ids[0]).value.clone();
    let beta = net.params.get(ids[1]).value.clone();
    let mut rm = std::mem::take(&mut net.params.get_mut(ids[2]).value);
    let mut rv = std::mem::take(&mut net.params.get_mut(ids[3]).value);
    let (mut save_mean, mut save_inv_std) = (vec![0.0; c], vec![0.0; c]);
    let mut bn_out = vec![0.0; conv_out.len()];
    let r = norm::batchnorm_train_forward(
        geom.n,
        c,
        hw,
        &conv_out,
        &gamma,
        &beta,
        BN_EPS,
        BN_MOMENTUM,
        &mut rm,
        &mut rv,
        &mut save_mean,
        &mut save_inv_std,
        &mut bn_out,
    );
    net.params.get_mut(ids[2]).value = rm;
    net.params.get_mut(ids[3]).value = rv;
    r?;
    net.count_batch(block);
    let mut y = vec![0.0; bn_out.len()];
    activation::leaky_relu_forward(SLOPE, &bn_out, &mut y)?;
    Ok((
        ConvBn {
            geom,
            x,
            w,
            conv_out,
            save_mean,
            save_inv_std,
            bn_out,
        },
        y,
    ))
}

/// Backward of [`conv_bn_forward`]: with `params`, accumulates the BN and
/// bias gradients into the store; returns (dx, dW) with dW the gradient of
/// the weight the forward used.
fn conv_bn_backward(
    net: &mut NetState,
    block: usize,
    s: &ConvBn,
    dy: &[f32],
    params: bool,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let p = format!("blocks.{block}");
    let g = &s.geom;
    let (c, hw) = (g.c_out, g.oh * g.ow);
    let mut d_bn = vec![0.0; dy.len()];
    activation::leaky_relu_backward(SLOPE, &s.bn_out, dy, &mut d_bn)?;
    let gamma_id = net.params.id(&format!("{p}.bn.weight"))?;
    let beta_id = net.params.id(&format!("{p}.bn.bias"))?;
    let mut d_conv = vec![0.0; dy.len()];
    let (mut dgamma, mut dbeta) = (vec![0.0; c], vec![0.0; c]);
    norm::batchnorm_train_backward(
        g.n,
        c,
        hw,
        &s.conv_out,
        &net.params.get(gamma_id).value,
        &s.save_mean,
        &s.save_inv_std,
        &d_bn,
        &mut d_conv,
        &mut dgamma,
        &mut dbeta,
    )?;
    let mut dx = vec![0.0; s.x.len()];
    let mut dw = vec![0.0; s.w.len()];
    let mut db = vec![0.0; c];
    conv::conv2d_backward(g, &s.x, &s.w, &d_conv, &mut dx, &mut dw, Some(&mut db))?;
    if params {
        net.params.accumulate(gamma_id, &dgamma)?;
        net.params.accumulate(beta_id, &dbeta)?;
        net.params
            .accumulate(net.params.id(&format!("{p}.conv.bias"))?, &db)?;
    }
    Ok((dx, dw))
}

// ---------------------------------------------------------------- generator

/// What a generator forward keeps.
struct GenForward {
    z: Vec<f32>,
    n: usize,
    blocks: Vec<ConvBn>,
    pre_out: Vec<f32>,
    pre_out_shape: [usize; 4],
    out_geom: Conv2dGeom,
    image: Vec<f32>,
}

fn generator_forward(g: &mut NetState, z: &[f32], n: usize) -> Result<GenForward> {
    let (fc_w, fc_shape) = g.get("fc.weight")?;
    let (fc_b, _) = g.get("fc.bias")?;
    let (out_f, p) = (fc_shape[0], fc_shape[1]);
    if z.len() != n * p {
        return Err(Error::shape(
            OP,
            format!("z has {} values, expected [{n}, {p}]", z.len()),
        ));
    }
    let (_, w0) = g.get("blocks.0.conv.weight")?;
    let c0 = w0[1];
    if c0 == 0 || out_f % (c0 * 16) != 0 || out_f != c0 * 16 {
        return Err(Error::shape(
            OP,
            format!("fc has {out_f} outputs, blocks.0 reads {c0} channels of 4×4"),
        ));
    }
    let mut h = vec![0.0; n * out_f];
    linear::linear_forward(
        n,
        p,
        out_f,
        z,
        &g.params.get(fc_w).value,
        Some(&g.params.get(fc_b).value),
        &mut h,
    )?;
    let mut shape = [n, c0, 4, 4];
    let mut blocks = Vec::with_capacity(g.blocks);
    for i in 0..g.blocks {
        let (wid, wshape) = g.get(&format!("blocks.{i}.conv.weight"))?;
        let w = g.params.get(wid).value.clone();
        let (saved, y) = conv_bn_forward(g, i, h, shape, w, &wshape)?;
        let c = saved.geom.c_out;
        let mut up = vec![0.0; y.len() * 4];
        layout::upsample_nearest2x_forward(n, c, shape[2], shape[3], &y, &mut up)?;
        shape = [n, c, shape[2] * 2, shape[3] * 2];
        blocks.push(saved);
        h = up;
    }
    let (ow, owshape) = g.get("out.weight")?;
    let (ob, _) = g.get("out.bias")?;
    let out_geom = Conv2dGeom::new(&shape, &owshape, Conv2dParams::new(1, 1))?;
    let mut logits = vec![0.0; n * out_geom.c_out * out_geom.oh * out_geom.ow];
    conv::conv2d_forward(
        &out_geom,
        &h,
        &g.params.get(ow).value,
        Some(&g.params.get(ob).value),
        &mut logits,
    )?;
    let mut image = vec![0.0; logits.len()];
    activation::sigmoid_forward(&logits, &mut image)?;
    Ok(GenForward {
        z: z.to_vec(),
        n,
        blocks,
        pre_out: h,
        pre_out_shape: shape,
        out_geom,
        image,
    })
}

/// Accumulates the generator's parameter gradients for `d_image`.
fn generator_backward(g: &mut NetState, f: &GenForward, d_image: &[f32]) -> Result<()> {
    let mut d_logits = vec![0.0; d_image.len()];
    activation::sigmoid_backward(&f.image, d_image, &mut d_logits)?;
    let (ow, _) = g.get("out.weight")?;
    let (ob, _) = g.get("out.bias")?;
    let mut dh = vec![0.0; f.pre_out.len()];
    let mut dw = vec![0.0; g.params.get(ow).value.len()];
    let mut db = vec![0.0; f.out_geom.c_out];
    conv::conv2d_backward(
        &f.out_geom,
        &f.pre_out,
        &g.params.get(ow).value,
        &d_logits,
        &mut dh,
        &mut dw,
        Some(&mut db),
    )?;
    g.params.accumulate(ow, &dw)?;
    g.params.accumulate(ob, &db)?;
    let mut shape = f.pre_out_shape;
    for (i, s) in f.blocks.iter().enumerate().rev() {
        let (c, h2, w2) = (shape[1], shape[2] / 2, shape[3] / 2);
        let mut dy = vec![0.0; f.n * c * h2 * w2];
        layout::upsample_nearest2x_backward(f.n, c, h2, w2, &dh, &mut dy)?;
        let (dx, dw) = conv_bn_backward(g, i, s, &dy, true)?;
        g.params
            .accumulate(g.params.id(&format!("blocks.{i}.conv.weight"))?, &dw)?;
        shape = [f.n, s.geom.c_in, s.geom.h, s.geom.w];
        dh = dx;
    }
    let (fc_w, fc_shape) = g.get("fc.weight")?;
    let (fc_b, _) = g.get("fc.bias")?;
    let (out_f, p) = (fc_shape[0], fc_shape[1]);
    let mut dz = vec![0.0; f.z.len()];
    let mut dw = vec![0.0; out_f * p];
    let mut db = vec![0.0; out_f];
    linear::linear_backward(
        f.n,
        p,
        out_f,
        &f.z,
        &g.params.get(fc_w).value,
        &dh,
        &mut dz,
        &mut dw,
        Some(&mut db),
    )?;
    g.params.accumulate(fc_w, &dw)?;
    g.params.accumulate(fc_b, &db)
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

/// What a discriminator forward keeps.
struct DiscForward {
    n: usize,
    blocks: Vec<(ConvBn, Sn, Pool2dGeom, Vec<f32>)>,
    /// The block outputs h_0..h_{B−1} (after pooling).
    hidden: Vec<Vec<f32>>,
    flat: Vec<f32>,
    prob: Vec<f32>,
}

fn discriminator_forward(d: &mut NetState, x: &[f32], shape: [usize; 4]) -> Result<DiscForward> {
    let n = shape[0];
    if x.len() != shape.iter().product::<usize>() {
        return Err(Error::shape(OP, "discriminator input length"));
    }
    let mut h = x.to_vec();
    let mut s = shape;
    let (mut blocks, mut hidden) = (Vec::new(), Vec::new());
    for i in 0..d.blocks {
        let (w_sn, wshape, sn) = spectral_norm(d, i)?;
        let (saved, y) = conv_bn_forward(d, i, h, s, w_sn, &wshape)?;
        let c = saved.geom.c_out;
        let pg = Pool2dGeom::new(OP, &[n, c, s[2], s[3]], Pool2dParams::new(2, 2, 0))?;
        let mut pooled = vec![0.0; n * c * pg.oh * pg.ow];
        pool::avg_pool2d_forward(&pg, &y, &mut pooled)?;
        s = [n, c, pg.oh, pg.ow];
        hidden.push(pooled.clone());
        blocks.push((saved, sn, pg, y));
        h = pooled;
    }
    let (fw, fshape) = d.get("fc.weight")?;
    let (fb, _) = d.get("fc.bias")?;
    let in_f = s[1] * s[2] * s[3];
    if fshape != [1, in_f] {
        return Err(Error::shape(
            OP,
            format!("fc.weight is {fshape:?}, the last block gives {in_f} features"),
        ));
    }
    let mut logit = vec![0.0; n];
    linear::linear_forward(
        n,
        in_f,
        1,
        &h,
        &d.params.get(fw).value,
        Some(&d.params.get(fb).value),
        &mut logit,
    )?;
    let mut prob = vec![0.0; n];
    activation::sigmoid_forward(&logit, &mut prob)?;
    Ok(DiscForward {
        n,
        blocks,
        hidden,
        flat: h,
        prob,
    })
}

/// Backward of a discriminator forward for gradients `d_prob` of the
/// probabilities and `d_hidden[i]` of the block outputs (either may be
/// zero); accumulates D's parameter gradients when `params` is set and
/// returns the input gradient.
fn discriminator_backward(
    d: &mut NetState,
    f: &DiscForward,
    d_prob: &[f32],
    d_hidden: &[Vec<f32>],
    params: bool,
) -> Result<Vec<f32>> {
    let (fw, fshape) = d.get("fc.weight")?;
    let (fb, _) = d.get("fc.bias")?;
    let in_f = fshape[1];
    let mut d_logit = vec![0.0; f.n];
    activation::sigmoid_backward(&f.prob, d_prob, &mut d_logit)?;
    let mut dh = vec![0.0; f.flat.len()];
    let mut dw = vec![0.0; in_f];
    let mut db = vec![0.0; 1];
    linear::linear_backward(
        f.n,
        in_f,
        1,
        &f.flat,
        &d.params.get(fw).value,
        &d_logit,
        &mut dh,
        &mut dw,
        Some(&mut db),
    )?;
    if params {
        d.params.accumulate(fw, &dw)?;
        d.params.accumulate(fb, &db)?;
    }
    for (i, (saved, sn, pg, _)) in f.blocks.iter().enumerate().rev() {
        if let Some(extra) = d_hidden.get(i) {
            for (a, &b) in dh.iter_mut().zip(extra) {
                *a += b;
            }
        }
        let mut dy = vec![0.0; pg.n * pg.c * pg.h * pg.w];
        pool::avg_pool2d_backward(pg, &dh, &mut dy)?;
        let (dx, dw_sn) = conv_bn_backward(d, i, saved, &dy, params)?;
        if params {
            let wid = d.params.id(&format!("blocks.{i}.conv.weight_orig"))?;
            let w = d.params.get(wid).value.clone();
            d.params
                .accumulate(wid, &spectral_norm_backward(&w, &dw_sn, sn))?;
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
/// documentation) with the default [`LossWeights`]; `opt_g` and `opt_d`
/// are registered over `g.params` and `d.params`
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
    train_step_weighted(g, d, opt_g, opt_d, lr, batch, &LossWeights::default())
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
    let n = batch.shape[0];
    let len: usize = batch.shape.iter().product();
    if batch.x.len() != len || batch.x_real.len() != len {
        return Err(Error::shape(
            OP,
            format!("x and x_real must both be {:?}", batch.shape),
        ));
    }
    // Generator step.
    g.params.zero_grads();
    let fake = generator_forward(g, batch.z, n)?;
    if fake.image.len() != len {
        return Err(Error::shape(
            OP,
            format!(
                "the generator makes {} values per batch, x has {len}",
                fake.image.len()
            ),
        ));
    }
    let df = discriminator_forward(d, &fake.image, batch.shape)?;
    let dr = discriminator_forward(d, batch.x, batch.shape)?;
    let mut loss_g = w.mse * loss::mse(&fake.image, batch.x)?;
    let mut d_hidden = Vec::with_capacity(df.hidden.len());
    for (hf, hr) in df.hidden.iter().zip(&dr.hidden) {
        loss_g += w.feature_matching * loss::mse(hf, hr)?;
        d_hidden.push(loss::mse_backward(hf, hr, w.feature_matching)?);
    }
    let ones = vec![1.0; n];
    let d_prob = if w.adversarial != 0.0 {
        loss_g += w.adversarial * loss::bce(&df.prob, &ones)?;
        loss::bce_backward(&df.prob, &ones, w.adversarial)?
    } else {
        vec![0.0; n]
    };
    let mut d_image = discriminator_backward(d, &df, &d_prob, &d_hidden, false)?;
    for (a, b) in d_image
        .iter_mut()
        .zip(loss::mse_backward(&fake.image, batch.x, w.mse)?)
    {
        *a += b;
    }
    generator_backward(g, &fake, &d_image)?;
    g.params.step(opt_g, lr)?;

    // Discriminator step with the updated generator.
    d.params.zero_grads();
    let fake = generator_forward(g, batch.z, n)?;
    let pr = discriminator_forward(d, batch.x_real, batch.shape)?;
    let pf = discriminator_forward(d, &fake.image, batch.shape)?;
    let zeros = vec![0.0; n];
    let loss_d = loss::bce(&pr.prob, &ones)? + loss::bce(&pf.prob, &zeros)?;
    discriminator_backward(
        d,
        &pr,
        &loss::bce_backward(&pr.prob, &ones, 1.0)?,
        &[],
        true,
    )?;
    discriminator_backward(
        d,
        &pf,
        &loss::bce_backward(&pf.prob, &zeros, 1.0)?,
        &[],
        true,
    )?;
    d.params.step(opt_d, lr)?;
    Ok(StepLosses { loss_g, loss_d })
}
