//! DenseNet in torchvision's layout ([reference](crate::reference) §2), as used by Kim et al.
//! 2022 to screen stem-cell lines: DenseNet-121 with a two-class head.
//!
//! ```text
//! x [N, 3, H, W]
//!  └ conv0 7×7/2 + norm0 + ReLU ── [N, F0, H/2, W/2]
//!     └ max pool 3×3/2 ─────────── [N, F0, H/4, W/4] → channels [0, F0) of block 1's buffer
//!        └ denseblock b: layer l reads channels [0, c_l) of the block buffer and
//!          writes its `growth` new ones at [c_l, c_l + growth)   c_l = C_b + l·growth
//!           └ transition b: norm, ReLU, 1×1 conv, 2×2 avg pool ─ [N, C/2, h/2, w/2]
//!              → channels [0, C/2) of the next block's buffer
//!  norm5 ─── features [N, C, H/32, W/32] (before the last ReLU)
//!  ReLU, global average pool ─── pooled [N, C]
//!  classifier (Linear, or Linear/ReLU/Dropout sequence) ─── logits, softmax ─── probs
//! ```
//!
//! # Inference plan
//!
//! - **No concatenation copies.** Each dense block owns one buffer
//!   `[N, C_b + layers·growth, h, w]`. A layer's `conv1` reads the first `c_l`
//!   channels of it (the batch stride is the buffer's) and its `conv2`
//!   writes the layer's `growth` channels straight into their slice
//!   ([`crate::ops::conv2d_fused_into`]). The transition conv writes into the first
//!   channels of the next block's buffer. Only the stem's `F0` pooled
//!   channels are copied once into block 1's buffer (the max pool writes a
//!   dense tensor).
//! - **BatchNorm folded where legal**, i.e. where a BN directly follows a conv
//!   with nothing between: `norm0` into `conv0` and each layer's `norm2` into
//!   its `conv1` (`w' = w·s`, bias `t`, with `s = γ/√(var + eps)`,
//!   `t = β − mean·s`); the ReLU after each runs as the conv's epilogue.
//! - **BN + ReLU as the conv reads its input** where a BN precedes a conv
//!   with a ReLU between (folding is impossible there: ReLU does not commute
//!   with the affine map): each layer's `norm1` and each transition's `norm`
//!   are applied in the conv's gather, so the activated copy of the growing
//!   block buffer (the quadratic memory traffic of a naive DenseNet) is never
//!   written.
//! - **Transition pooling before its conv, in the conv's gather.** A 2×2/2
//!   average pool commutes with the bias-free 1×1 conv after it (both are
//!   linear, one over space, the other over channels), so the transition
//!   conv reads each 2×2 window of the block buffer, applies BN + ReLU to
//!   the four values and averages them as it gathers: one kernel, the GEMM
//!   over the pooled positions (a quarter of the multiply-adds of
//!   conv-then-pool), no intermediate tensor.
//! - `norm5` is not folded: its output is the reported `features`.
//! - **Bounded memory.** [`DenseNetWorkspace`] holds every activation of one
//!   batch and is reused from batch to batch; [`infer`] streams any number
//!   of images through it `batch_size` at a time (see
//!   [`DenseNetConfig::activation_bytes`] for its size).
//!
//! The same plan runs on every device: on the CPU the fused convs are the
//! reference conv applied to the same channel slices.
//!
//! # Head
//!
//! `classifier` is either one Linear or an `nn.Sequential` `classifier.{i}`
//! of Linear, ReLU and Dropout modules; only the Linear layers carry
//! weights, so their positions are all the file tells. Dropout is the
//! identity at inference. Between two Linear layers at indices `i < j`, the
//! positions `i+1..j` are taken to hold a ReLU when there is at least one
//! (a Linear followed directly by a Linear has none); modules before the
//! first Linear act on non-negative pooled features (ReLU, Dropout: the
//! identity) and nothing is applied after the last Linear (its output is the
//! logits).
//!
//! # Class activation maps
//!
//! [`DenseNet::class_activation_map`]: for a single Linear head, Zhou et
//! al.'s CAM `M_c(y, x) = Σ_k w_ck · f_k(y, x)` over the activated last
//! features `f = relu(norm5(·))`. For a head with hidden layers the head is
//! linearized at the image's pooled features: with the ReLU masks fixed it
//! is affine, `logits = W_eff·pooled + b_eff`, and `W_eff` (the exact
//! gradient of the logits with respect to the pooled features) takes the
//! place of `w`. Because the features are globally average-pooled, this is
//! exactly Grad-CAM's channel weighting (without its final ReLU), computed
//! without a backward pass. In both cases the mean of the map plus `b_eff_c`
//! is the logit `c`.

use std::fmt;
use std::path::Path;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::geometry::{Conv2dGeom, Conv2dParams, Pool2dGeom, Pool2dParams};
use crate::io::{TensorFile, TensorWriter};
use crate::models::weights::{BatchNorm, Weights};
use crate::ops::{
    batchnorm_into, conv2d_fused_into, copy_channels_into, global_avg_pool_into, linear_into,
    max_pool2d_into, relu_inplace, relu_into, softmax_into, BnRelu, FusedConv2d,
};
use crate::tensor::Tensor;

pub use crate::models::weights::BN_EPS;

/// One Linear layer of the classifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadLinear {
    /// Key prefix: `classifier` or `classifier.{i}`.
    pub name: String,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// Whether a ReLU follows (see the module docs on how this is read).
    pub relu_after: bool,
}

/// The hyper-parameters of a torchvision DenseNet, all read off its weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DenseNetConfig {
    /// Image channels (3).
    pub in_channels: usize,
    /// Channels after the stem, `num_init_features` (64 for DenseNet-121).
    pub num_init_features: usize,
    /// Channels each dense layer adds (32).
    pub growth_rate: usize,
    /// Bottleneck width factor: `conv1` has `bn_size · growth_rate` outputs (4).
    pub bn_size: usize,
    /// Dense layers per block ((6, 12, 24, 16) for DenseNet-121).
    pub block_config: Vec<usize>,
    /// Output channels of each transition (one fewer than the blocks).
    pub transition_channels: Vec<usize>,
    /// Channels of the last block, of `features` and `pooled` (1024).
    pub num_features: usize,
    /// The classifier's Linear layers in order.
    pub head: Vec<HeadLinear>,
}

impl fmt::Display for DenseNetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head: Vec<String> = self
            .head
            .iter()
            .map(|l| {
                format!(
                    "{} {}→{}{}",
                    l.name,
                    l.in_features,
                    l.out_features,
                    if l.relu_after { " ReLU" } else { "" }
                )
            })
            .collect();
        write!(
            f,
            "DenseNet: {} input channels, {} initial features, growth {}, bn_size {}, blocks {:?}, {} features, head [{}]",
            self.in_channels,
            self.num_init_features,
            self.growth_rate,
            self.bn_size,
            self.block_config,
            self.num_features,
            head.join(", ")
        )
    }
}

/// Spatial size after a layer, as [`Conv2dGeom`] / [`Pool2dGeom`] compute it.
type Hw = (usize, usize);

/// The spatial sizes of every stage for an `h × w` input.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stages {
    stem: Hw,
    blocks: Vec<Hw>,
}

impl DenseNetConfig {
    /// Reads the hyper-parameters off the names and shapes of a torchvision
    /// DenseNet `state_dict`: `num_init_features` and `in_channels` from
    /// `features.conv0.weight`, blocks and layers by counting
    /// `features.denseblock{b}.denselayer{l}`, `growth_rate` and `bn_size`
    /// from the first layer's `conv2`, transitions and head from their
    /// weights. Every other tensor's shape is checked when the model loads.
    pub fn from_weights(file: &TensorFile) -> Result<Self> {
        let bad = |msg: String| Error::format(file.path(), msg);
        let shape = |name: &str| -> Result<Vec<usize>> {
            file.shape(name).map(<[usize]>::to_vec).ok_or_else(|| {
                bad(format!(
                    "missing tensor {name:?}: not a torchvision DenseNet state_dict"
                ))
            })
        };
        let conv0 = shape("features.conv0.weight")?;
        let (num_init_features, in_channels) = match conv0.as_slice() {
            &[f, c, 7, 7] if f > 0 && c > 0 => (f, c),
            _ => {
                return Err(bad(format!(
                    "features.conv0.weight has shape {conv0:?}, expected [num_init_features, in_channels, 7, 7]"
                )))
            }
        };
        let layer = |b: usize, l: usize| format!("features.denseblock{b}.denselayer{l}");
        let blocks = (1..)
            .take_while(|&b| file.contains(&format!("{}.conv1.weight", layer(b, 1))))
            .count();
        if blocks == 0 {
            return Err(bad(
                "no features.denseblock1.denselayer1: not a torchvision DenseNet state_dict"
                    .to_string(),
            ));
        }
        let block_config: Vec<usize> = (1..=blocks)
            .map(|b| {
                (1..)
                    .take_while(|&l| file.contains(&format!("{}.conv1.weight", layer(b, l))))
                    .count()
            })
            .collect();
        let conv2 = shape(&format!("{}.conv2.weight", layer(1, 1)))?;
        let (growth_rate, bottleneck) = match conv2.as_slice() {
            &[g, b, 3, 3] if g > 0 && b > 0 => (g, b),
            _ => {
                return Err(bad(format!(
                    "{}.conv2.weight has shape {conv2:?}, expected [growth_rate, bn_size·growth_rate, 3, 3]",
                    layer(1, 1)
                )))
            }
        };
        if bottleneck % growth_rate != 0 {
            return Err(bad(format!(
                "{}.conv2.weight {conv2:?}: the bottleneck width {bottleneck} is not a multiple of the growth rate {growth_rate}",
                layer(1, 1)
            )));
        }
        let mut channels = num_init_features;
        let mut transition_channels = Vec::new();
        for (b, &layers) in block_config.iter().enumerate() {
            channels += layers * growth_rate;
            if b + 1 < blocks {
                let name = format!("features.transition{}.conv.weight", b + 1);
                let t = shape(&name)?;
                match t.as_slice() {
                    &[out, c, 1, 1] if c == channels && out > 0 => {
                        transition_channels.push(out);
                        channels = out;
                    }
                    _ => {
                        return Err(bad(format!(
                        "{name} has shape {t:?}, expected [c_out, {channels}, 1, 1] after block {}",
                        b + 1
                    )))
                    }
                }
            }
        }
        let extra = format!("features.transition{blocks}.conv.weight");
        if file.contains(&extra) {
            return Err(bad(format!(
                "{extra} exists but there is no denseblock{} after it",
                blocks + 1
            )));
        }
        let head = read_head(file, channels)?;
        Ok(DenseNetConfig {
            in_channels,
            num_init_features,
            growth_rate,
            bn_size: bottleneck / growth_rate,
            block_config,
            transition_channels,
            num_features: channels,
            head,
        })
    }

    /// Number of output classes.
    pub fn num_classes(&self) -> usize {
        self.head.last().map_or(0, |l| l.out_features)
    }

    /// Width of the bottleneck between a layer's two convs.
    pub fn bottleneck(&self) -> usize {
        self.bn_size * self.growth_rate
    }

    /// Input channels of every block (`num_init_features`, then the
    /// transitions' outputs).
    fn block_inputs(&self) -> Vec<usize> {
        std::iter::once(self.num_init_features)
            .chain(self.transition_channels.iter().copied())
            .collect()
    }

    /// Channels of every block's buffer: its input plus `layers · growth`.
    fn block_widths(&self) -> Vec<usize> {
        self.block_inputs()
            .iter()
            .zip(&self.block_config)
            .map(|(c, l)| c + l * self.growth_rate)
            .collect()
    }

    /// Spatial sizes for an `h × w` input, or an error saying the input is
    /// too small.
    fn stages(&self, h: usize, w: usize) -> Result<Stages> {
        const OP: &str = "densenet";
        let small = |e: Error| {
            Error::shape(
                OP,
                format!("an input of {h}×{w} pixels is too small for this network ({e})"),
            )
        };
        let conv = |hw: Hw, k: usize, s: usize, p: usize| -> Result<Hw> {
            Conv2dGeom::new(&[1, 1, hw.0, hw.1], &[1, 1, k, k], Conv2dParams::new(s, p))
                .map(|g| (g.oh, g.ow))
                .map_err(small)
        };
        if h == 0 || w == 0 {
            return Err(Error::shape(OP, format!("empty input ({h}×{w})")));
        }
        let stem = conv((h, w), 7, 2, 3)?;
        let pooled = Pool2dGeom::new(OP, &[1, 1, stem.0, stem.1], Pool2dParams::new(3, 2, 1))
            .map_err(small)?;
        let mut blocks = vec![(pooled.oh, pooled.ow)];
        for _ in &self.transition_channels {
            let last = blocks[blocks.len() - 1];
            blocks.push(conv(last, 2, 2, 0)?);
        }
        Ok(Stages { stem, blocks })
    }

    /// Shape of `features` for an `n × in_channels × h × w` input.
    pub fn features_shape(&self, n: usize, h: usize, w: usize) -> Result<[usize; 4]> {
        let s = self.stages(h, w)?;
        let (fh, fw) = s.blocks.last().copied().unwrap_or(s.stem);
        Ok([n, self.num_features, fh, fw])
    }

    /// Floating-point operations (2 per multiply-add) of the convolutions and
    /// the head for one `h × w` image, as this plan executes them (each
    /// transition's conv over the pooled positions).
    pub fn flops(&self, h: usize, w: usize) -> Result<f64> {
        let s = self.stages(h, w)?;
        let area = |hw: Hw| (hw.0 * hw.1) as f64;
        let (g, bott) = (self.growth_rate as f64, self.bottleneck() as f64);
        let mut macs = area(s.stem) * (self.num_init_features * self.in_channels * 49) as f64;
        for (b, (&layers, &c0)) in self
            .block_config
            .iter()
            .zip(&self.block_inputs())
            .enumerate()
        {
            let hw = area(s.blocks[b]);
            for l in 0..layers {
                let c_in = (c0 + l * self.growth_rate) as f64;
                macs += hw * (bott * c_in + g * bott * 9.0);
            }
            if let (Some(&out), Some(&next)) =
                (self.transition_channels.get(b), s.blocks.get(b + 1))
            {
                let c = (c0 + layers * self.growth_rate) as f64;
                macs += area(next) * out as f64 * c;
            }
        }
        macs += self
            .head
            .iter()
            .map(|l| (l.in_features * l.out_features) as f64)
            .sum::<f64>();
        Ok(2.0 * macs)
    }

    /// Bytes of device memory the activations of one `h × w` image take in a
    /// [`DenseNetWorkspace`] (the input batch and the weights come on top):
    /// multiply by the batch size to bound a run's memory.
    pub fn activation_bytes(&self, h: usize, w: usize) -> Result<usize> {
        let s = self.stages(h, w)?;
        let area = |hw: Hw| hw.0 * hw.1;
        let stem = self.num_init_features * (area(s.stem) + area(s.blocks[0]));
        let blocks: usize = self
            .block_widths()
            .iter()
            .zip(&s.blocks)
            .map(|(c, &hw)| (c + self.bottleneck()) * area(hw))
            .sum();
        let last = s.blocks.last().copied().unwrap_or(s.stem);
        let tail = 2 * self.num_features * area(last)
            + self.num_features
            + self.head.iter().map(|l| l.out_features).sum::<usize>()
            + self.num_classes();
        Ok(4 * (stem + blocks + tail))
    }
}

/// The classifier's Linear layers: `classifier.weight` alone, or
/// `classifier.{i}.weight` for the Linear positions of a Sequential.
fn read_head(file: &TensorFile, features: usize) -> Result<Vec<HeadLinear>> {
    let bad = |msg: String| Error::format(file.path(), msg);
    let mut linears: Vec<(String, Option<usize>)> = Vec::new();
    if file.contains("classifier.weight") {
        linears.push(("classifier".to_string(), None));
    }
    let mut indexed: Vec<usize> = file
        .names()
        .iter()
        .filter_map(|n| {
            n.strip_prefix("classifier.")?
                .strip_suffix(".weight")?
                .parse()
                .ok()
        })
        .collect();
    indexed.sort_unstable();
    if !linears.is_empty() && !indexed.is_empty() {
        return Err(bad(
            "both classifier.weight and classifier.{i}.weight exist: the head must be one Linear or one Sequential".to_string(),
        ));
    }
    linears.extend(
        indexed
            .iter()
            .map(|i| (format!("classifier.{i}"), Some(*i))),
    );
    if linears.is_empty() {
        return Err(bad(
            "missing the head: neither classifier.weight nor classifier.{i}.weight exists"
                .to_string(),
        ));
    }
    let mut head = Vec::with_capacity(linears.len());
    let mut width = features;
    for (k, (name, index)) in linears.iter().enumerate() {
        let wname = format!("{name}.weight");
        let s = file.shape(&wname).unwrap_or(&[]);
        let out = match *s {
            [out, inp] if inp == width && out > 0 => out,
            _ => {
                return Err(bad(format!(
                    "{wname} has shape {s:?}, expected [out_features, {width}] (a Linear layer fed {width} features)"
                )))
            }
        };
        let relu_after = match (index, linears.get(k + 1)) {
            (Some(i), Some((_, Some(j)))) => j - i >= 2,
            _ => false,
        };
        head.push(HeadLinear {
            name: name.clone(),
            in_features: width,
            out_features: out,
            relu_after,
        });
        width = out;
    }
    Ok(head)
}

/// The hyper-parameters of a torchvision `DenseNet` constructor (the
/// transitions halve the channels, as torchvision's do).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DenseNetArch {
    /// Image channels.
    pub in_channels: usize,
    /// Channels after the stem.
    pub num_init_features: usize,
    /// Channels each dense layer adds.
    pub growth_rate: usize,
    /// Bottleneck width factor.
    pub bn_size: usize,
    /// Dense layers per block.
    pub block_config: Vec<usize>,
}

impl DenseNetArch {
    /// torchvision's `densenet121`: 3 channels, 64 initial features, growth
    /// 32, bn_size 4, blocks (6, 12, 24, 16), 1024 features.
    pub fn densenet121() -> Self {
        DenseNetArch {
            in_channels: 3,
            num_init_features: 64,
            growth_rate: 32,
            bn_size: 4,
            block_config: vec![6, 12, 24, 16],
        }
    }
}

/// A DenseNet backbone `state_dict` (every `features.*` tensor, no
/// classifier) with torchvision's initialization, seeded: conv weights
/// Kaiming-normal (`std = √(2/fan_in)`), BatchNorm γ = 1, β = 0, running
/// mean 0, running variance 1, `num_batches_tracked` 0. Each tensor draws
/// from its own stream (`seed ^ fnv1a64(name)`), so the values do not
/// depend on the order of the tensors.
///
/// # Errors
/// A zero in the architecture.
pub fn random_backbone(arch: &DenseNetArch, seed: u64) -> Result<TensorWriter> {
    let a = arch;
    if a.in_channels == 0
        || a.num_init_features == 0
        || a.growth_rate == 0
        || a.bn_size == 0
        || a.block_config.is_empty()
        || a.block_config.contains(&0)
    {
        return Err(Error::invalid(format!(
            "random DenseNet: every size must be at least 1, got {a:?}"
        )));
    }
    let mut w = TensorWriter::new();
    let conv = |w: &mut TensorWriter, name: &str, shape: [usize; 4]| -> Result<()> {
        let fan_in = shape[1] * shape[2] * shape[3];
        let std = (2.0 / fan_in as f64).sqrt();
        let mut rng = crate::rng::SplitMix64::new(seed ^ crate::rng::fnv1a64(name));
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
        w.add_slice(name, &shape, &v)
    };
    let bn = |w: &mut TensorWriter, name: &str, c: usize| -> Result<()> {
        for (key, v) in [
            ("weight", 1.0f32),
            ("bias", 0.0),
            ("running_mean", 0.0),
            ("running_var", 1.0),
        ] {
            w.add_slice(&format!("{name}.{key}"), &[c], &vec![v; c])?;
        }
        w.add_slice(&format!("{name}.num_batches_tracked"), &[], &[0i64])
    };
    conv(
        &mut w,
        "features.conv0.weight",
        [a.num_init_features, a.in_channels, 7, 7],
    )?;
    bn(&mut w, "features.norm0", a.num_init_features)?;
    let (g, bott) = (a.growth_rate, a.bn_size * a.growth_rate);
    let mut c = a.num_init_features;
    for (b, &layers) in a.block_config.iter().enumerate() {
        for l in 0..layers {
            let p = format!("features.denseblock{}.denselayer{}", b + 1, l + 1);
            bn(&mut w, &format!("{p}.norm1"), c + l * g)?;
            conv(
                &mut w,
                &format!("{p}.conv1.weight"),
                [bott, c + l * g, 1, 1],
            )?;
            bn(&mut w, &format!("{p}.norm2"), bott)?;
            conv(&mut w, &format!("{p}.conv2.weight"), [g, bott, 3, 3])?;
        }
        c += layers * g;
        if b + 1 < a.block_config.len() {
            let p = format!("features.transition{}", b + 1);
            bn(&mut w, &format!("{p}.norm"), c)?;
            conv(&mut w, &format!("{p}.conv.weight"), [c / 2, c, 1, 1])?;
            c /= 2;
        }
    }
    bn(&mut w, "features.norm5", c)?;
    Ok(w)
}

/// Reads tensors with the shapes the config implies through the checked
/// reader, which remembers which were read so that leftovers (another
/// architecture) are reported.
struct Loader<'a> {
    w: Weights<'a>,
    be: &'a Backend,
}

impl Loader<'_> {
    fn host(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.w.host(name, shape)
    }

    fn upload(&self, shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        Tensor::from_vec(self.be, shape, data)
    }

    /// A BatchNorm2d(c) (see [`Weights::batchnorm`]).
    fn bn(&mut self, prefix: &str, c: usize) -> Result<BatchNorm> {
        self.w.batchnorm(prefix, c)
    }

    /// A BatchNorm applied as a conv's BN+ReLU prologue.
    fn bn_relu(&mut self, prefix: &str, c: usize) -> Result<ScaleShift> {
        let (scale, shift) = self.bn(prefix, c)?.scale_shift();
        Ok(ScaleShift {
            scale: self.upload(&[c], scale)?,
            shift: self.upload(&[c], shift)?,
        })
    }

    /// A bias-free conv `prefix.weight` `[c_out, c_in, k, k]` with the
    /// BatchNorm `bn` that follows it folded in: weights multiplied per
    /// output channel by the f32 scale (the same f32 numbers a BN+ReLU
    /// prologue uses), the BN's shift as bias.
    fn conv_bn(&mut self, prefix: &str, shape: [usize; 4], bn: &str) -> Result<(Tensor, Tensor)> {
        let mut w = self.host(&format!("{prefix}.weight"), &shape)?;
        let (scale, shift) = self.bn(bn, shape[0])?.scale_shift();
        let per_out = shape[1] * shape[2] * shape[3];
        for (row, s) in w.chunks_exact_mut(per_out.max(1)).zip(&scale) {
            row.iter_mut().for_each(|v| *v *= s);
        }
        Ok((self.upload(&shape, w)?, self.upload(&[shape[0]], shift)?))
    }

    /// Errors when the file holds tensors the architecture does not use.
    fn check_leftovers(&self) -> Result<()> {
        self.w.reject_leftovers(
            "do not belong to the DenseNet read off the other weights (e.g. conv biases or extra layers)",
        )
    }
}

/// Per-channel BN+ReLU prologue on the device.
#[derive(Debug)]
struct ScaleShift {
    scale: Tensor,
    shift: Tensor,
}

impl ScaleShift {
    fn as_bn_relu(&self) -> BnRelu<'_> {
        BnRelu {
            scale: &self.scale,
            shift: &self.shift,
        }
    }
}

/// `norm1 → ReLU → conv1 (+ folded norm2) → ReLU → conv2`.
#[derive(Debug)]
struct DenseLayer {
    /// Channels read from the block buffer.
    c_in: usize,
    norm1: ScaleShift,
    conv1_w: Tensor,
    conv1_b: Tensor,
    conv2_w: Tensor,
}

/// `norm → ReLU → 2×2 average pool → 1×1 conv` (pool and conv commute).
#[derive(Debug)]
struct Transition {
    norm: ScaleShift,
    w: Tensor,
}

/// One Linear layer of the head, on the device and (for CAMs) on the host.
#[derive(Debug)]
struct Linear {
    w: Tensor,
    b: Tensor,
    w_host: Vec<f32>,
    b_host: Vec<f32>,
}

/// A torchvision DenseNet with its weights on one device.
#[derive(Debug)]
pub struct DenseNet {
    config: DenseNetConfig,
    conv0_w: Tensor,
    conv0_b: Tensor,
    blocks: Vec<Vec<DenseLayer>>,
    transitions: Vec<Transition>,
    norm5: [Tensor; 4],
    head: Vec<Linear>,
}

/// The activations of one batch, allocated once for `n` images of `h × w`
/// and reused by [`DenseNet::forward_into`]. The outputs are read with
/// [`features`](Self::features), [`activated`](Self::activated),
/// [`pooled`](Self::pooled), [`logits`](Self::logits) and
/// [`probs`](Self::probs).
#[derive(Debug)]
pub struct DenseNetWorkspace {
    n: usize,
    h: usize,
    w: usize,
    stem: Tensor,
    stem_pooled: Tensor,
    blocks: Vec<Tensor>,
    bottlenecks: Vec<Tensor>,
    features: Tensor,
    activated: Tensor,
    pooled: Tensor,
    hidden: Vec<Tensor>,
    probs: Tensor,
}

impl DenseNetWorkspace {
    /// Images per batch.
    pub fn batch(&self) -> usize {
        self.n
    }

    /// Input height and width.
    pub fn input_hw(&self) -> (usize, usize) {
        (self.h, self.w)
    }

    /// The stem's output `relu(norm0(conv0(x)))` `[n, F0, H/2, W/2]`.
    pub fn stem(&self) -> &Tensor {
        &self.stem
    }

    /// Each dense block's buffer after its last layer `[n, C_b, h_b, w_b]`:
    /// the block's output (the concatenation, before the BatchNorm that
    /// follows it, see [`DenseNet::block_norm`]).
    pub fn block_outputs(&self) -> &[Tensor] {
        &self.blocks
    }

    /// `norm5` output `[n, C, h/32, w/32]` (before the last ReLU).
    pub fn features(&self) -> &Tensor {
        &self.features
    }

    /// `relu(features)`, what the pool and the CAMs see.
    pub fn activated(&self) -> &Tensor {
        &self.activated
    }

    /// Globally average-pooled activated features `[n, C]`.
    pub fn pooled(&self) -> &Tensor {
        &self.pooled
    }

    /// The head's output `[n, classes]`.
    pub fn logits(&self) -> &Tensor {
        // The head has at least one layer (checked when the model loads).
        &self.hidden[self.hidden.len() - 1]
    }

    /// Softmax of the logits `[n, classes]`.
    pub fn probs(&self) -> &Tensor {
        &self.probs
    }
}

/// A class activation map of one image (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct ClassActivationMap {
    /// Map height (the features' height).
    pub height: usize,
    /// Map width.
    pub width: usize,
    /// `M_c(y, x)`, row-major.
    pub values: Vec<f32>,
    /// The class.
    pub class: usize,
    /// The head's (local) affine offset for the class: mean of the map plus
    /// `offset` is the class's logit.
    pub offset: f32,
}

impl DenseNet {
    /// Loads a torchvision DenseNet `state_dict` (safetensors) onto `be`'s
    /// device, reading the hyper-parameters off the weights and folding the
    /// BatchNorms as the module docs describe.
    ///
    /// # Errors
    /// A file that cannot be read, a missing tensor, a dtype that is not
    /// floating point, a shape that disagrees with the rest, a non-finite
    /// weight (with its flat index), a negative running variance, or tensors
    /// that belong to no DenseNet layer; every message names the file and
    /// the tensor.
    pub fn load(be: &Backend, path: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(be, &TensorFile::open(path)?)
    }

    /// [`DenseNet::load`] from an opened file.
    pub fn from_file(be: &Backend, file: &TensorFile) -> Result<Self> {
        let config = DenseNetConfig::from_weights(file)?;
        let mut ld = Loader {
            w: Weights::new(file).shapes_from("the hyper-parameters read off the other weights"),
            be,
        };
        let (f0, cin) = (config.num_init_features, config.in_channels);
        let (conv0_w, conv0_b) = ld.conv_bn("features.conv0", [f0, cin, 7, 7], "features.norm0")?;
        let (g, bott) = (config.growth_rate, config.bottleneck());
        let mut blocks = Vec::with_capacity(config.block_config.len());
        let mut transitions = Vec::new();
        for (b, (&layers, &c0)) in config
            .block_config
            .iter()
            .zip(&config.block_inputs())
            .enumerate()
        {
            let mut block = Vec::with_capacity(layers);
            for l in 0..layers {
                let p = format!("features.denseblock{}.denselayer{}", b + 1, l + 1);
                let c_in = c0 + l * g;
                let norm1 = ld.bn_relu(&format!("{p}.norm1"), c_in)?;
                let (conv1_w, conv1_b) = ld.conv_bn(
                    &format!("{p}.conv1"),
                    [bott, c_in, 1, 1],
                    &format!("{p}.norm2"),
                )?;
                let conv2 = ld.host(&format!("{p}.conv2.weight"), &[g, bott, 3, 3])?;
                block.push(DenseLayer {
                    c_in,
                    norm1,
                    conv1_w,
                    conv1_b,
                    conv2_w: ld.upload(&[g, bott, 3, 3], conv2)?,
                });
            }
            blocks.push(block);
            if let Some(&c_out) = config.transition_channels.get(b) {
                let p = format!("features.transition{}", b + 1);
                let c = c0 + layers * g;
                let norm = ld.bn_relu(&format!("{p}.norm"), c)?;
                let w = ld.host(&format!("{p}.conv.weight"), &[c_out, c, 1, 1])?;
                transitions.push(Transition {
                    norm,
                    w: ld.upload(&[c_out, c, 1, 1], w)?,
                });
            }
        }
        let c = config.num_features;
        let n5 = ld.bn("features.norm5", c)?;
        let norm5 = [
            ld.upload(&[c], n5.gamma)?,
            ld.upload(&[c], n5.beta)?,
            ld.upload(&[c], n5.mean)?,
            ld.upload(&[c], n5.var)?,
        ];
        let mut head = Vec::with_capacity(config.head.len());
        for l in &config.head {
            let (i, o) = (l.in_features, l.out_features);
            let w_host = ld.host(&format!("{}.weight", l.name), &[o, i])?;
            let b_host = ld.host(&format!("{}.bias", l.name), &[o])?;
            head.push(Linear {
                w: ld.upload(&[o, i], w_host.clone())?,
                b: ld.upload(&[o], b_host.clone())?,
                w_host,
                b_host,
            });
        }
        ld.check_leftovers()?;
        Ok(DenseNet {
            config,
            conv0_w,
            conv0_b,
            blocks,
            transitions,
            norm5,
            head,
        })
    }

    /// The hyper-parameters read off the weights.
    pub fn config(&self) -> &DenseNetConfig {
        &self.config
    }

    /// The BatchNorm that follows dense block `b` (0-based) as per-channel
    /// `(scale, shift)` on the host: transition `b`'s norm, or `norm5` after
    /// the last block. `relu(scale·x + shift)` is what the next stage reads.
    pub fn block_norm(&self, b: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        if let Some(t) = self.transitions.get(b) {
            return Ok((t.norm.scale.to_vec()?, t.norm.shift.to_vec()?));
        }
        if b + 1 != self.blocks.len() {
            return Err(Error::invalid(format!(
                "densenet: block {b} does not exist ({} dense blocks)",
                self.blocks.len()
            )));
        }
        let [g, bt, m, v] = &self.norm5;
        let (g, bt, m, v) = (g.to_vec()?, bt.to_vec()?, m.to_vec()?, v.to_vec()?);
        let scale: Vec<f32> = g
            .iter()
            .zip(&v)
            .map(|(&g, &v)| g / (v + BN_EPS).sqrt())
            .collect();
        let shift = bt
            .iter()
            .zip(&m)
            .zip(&scale)
            .map(|((&b, &m), &s)| b - m * s)
            .collect();
        Ok((scale, shift))
    }

    /// Allocates the activations for batches of `n` images of `h × w` on
    /// `be`'s device ([`DenseNetConfig::activation_bytes`] per image).
    pub fn workspace(
        &self,
        be: &Backend,
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<DenseNetWorkspace> {
        let cfg = &self.config;
        let s = cfg.stages(h, w)?;
        let f0 = cfg.num_init_features;
        let t = |shape: &[usize]| Tensor::zeros(be, shape);
        let blocks = cfg
            .block_widths()
            .iter()
            .zip(&s.blocks)
            .map(|(&c, &(bh, bw))| t(&[n, c, bh, bw]))
            .collect::<Result<Vec<_>>>()?;
        let bottlenecks = s
            .blocks
            .iter()
            .map(|&(bh, bw)| t(&[n, cfg.bottleneck(), bh, bw]))
            .collect::<Result<Vec<_>>>()?;
        let fshape = cfg.features_shape(n, h, w)?;
        Ok(DenseNetWorkspace {
            n,
            h,
            w,
            stem: t(&[n, f0, s.stem.0, s.stem.1])?,
            stem_pooled: t(&[n, f0, s.blocks[0].0, s.blocks[0].1])?,
            blocks,
            bottlenecks,
            features: t(&fshape)?,
            activated: t(&fshape)?,
            pooled: t(&[n, cfg.num_features])?,
            hidden: cfg
                .head
                .iter()
                .map(|l| t(&[n, l.out_features]))
                .collect::<Result<Vec<_>>>()?,
            probs: t(&[n, cfg.num_classes()])?,
        })
    }

    /// Runs the network on `x` `[n, in_channels, h, w]` into `ws` (made by
    /// [`DenseNet::workspace`] for the same `n`, `h`, `w`).
    pub fn forward_into(&self, be: &Backend, x: &Tensor, ws: &mut DenseNetWorkspace) -> Result<()> {
        let want = [ws.n, self.config.in_channels, ws.h, ws.w];
        if x.shape() != want {
            return Err(Error::shape(
                "densenet",
                format!(
                    "input has shape {:?}, expected {want:?} (the workspace's batch and size, {} channels)",
                    x.shape(),
                    self.config.in_channels
                ),
            ));
        }
        // Stem: conv0 with norm0 folded and ReLU fused, then the max pool.
        let conv0 = FusedConv2d {
            weight: &self.conv0_w,
            bias: Some(&self.conv0_b),
            params: Conv2dParams::new(2, 3),
            input_bn_relu: None,
            input_pool2: false,
            relu: true,
            input_upsample2: false,
            leaky_relu: None,
        };
        conv2d_fused_into(be, x, &conv0, &mut ws.stem, 0)?; // [n, F0, H/2, W/2]
        max_pool2d_into(
            be,
            &ws.stem,
            Pool2dParams::new(3, 2, 1),
            &mut ws.stem_pooled,
        )?; // [n, F0, H/4, W/4]
        let first = ws
            .blocks
            .first_mut()
            .ok_or_else(|| Error::invalid("densenet: no dense blocks"))?;
        copy_channels_into(be, &ws.stem_pooled, first, 0)?;

        for (b, layers) in self.blocks.iter().enumerate() {
            let (done, next) = ws.blocks.split_at_mut(b + 1);
            let buf = &mut done[b]; // [n, C_b + layers·growth, h_b, w_b]
            let bottleneck = &mut ws.bottlenecks[b]; // [n, bn_size·growth, h_b, w_b]
            for layer in layers {
                let conv1 = FusedConv2d {
                    weight: &layer.conv1_w,
                    bias: Some(&layer.conv1_b),
                    params: Conv2dParams::new(1, 0),
                    input_bn_relu: Some(layer.norm1.as_bn_relu()),
                    input_pool2: false,
                    relu: true,
                    input_upsample2: false,
                    leaky_relu: None,
                };
                conv2d_fused_into(be, buf, &conv1, bottleneck, 0)?;
                let conv2 = FusedConv2d {
                    weight: &layer.conv2_w,
                    bias: None,
                    params: Conv2dParams::new(1, 1),
                    input_bn_relu: None,
                    input_pool2: false,
                    relu: false,
                    input_upsample2: false,
                    leaky_relu: None,
                };
                conv2d_fused_into(be, bottleneck, &conv2, buf, layer.c_in)?;
            }
            if let (Some(t), Some(next_buf)) = (self.transitions.get(b), next.first_mut()) {
                let conv = FusedConv2d {
                    weight: &t.w,
                    bias: None,
                    params: Conv2dParams::new(1, 0),
                    input_bn_relu: Some(t.norm.as_bn_relu()),
                    input_pool2: true,
                    relu: false,
                    input_upsample2: false,
                    leaky_relu: None,
                };
                conv2d_fused_into(be, buf, &conv, next_buf, 0)?; // [n, C/2, h_b/2, w_b/2]
            }
        }

        let last = ws
            .blocks
            .last()
            .ok_or_else(|| Error::invalid("densenet: no dense blocks"))?;
        let [g, bt, m, v] = &self.norm5;
        batchnorm_into(be, last, g, bt, m, v, BN_EPS, &mut ws.features)?; // [n, C, H/32, W/32]
        relu_into(be, &ws.features, &mut ws.activated)?;
        global_avg_pool_into(be, &ws.activated, &mut ws.pooled)?; // [n, C]
        for (i, (layer, cfg)) in self.head.iter().zip(&self.config.head).enumerate() {
            let (before, rest) = ws.hidden.split_at_mut(i);
            let out = &mut rest[0]; // [n, out_features]
            let input = before.last().unwrap_or(&ws.pooled);
            linear_into(be, input, &layer.w, Some(&layer.b), out)?;
            if cfg.relu_after {
                relu_inplace(be, out)?;
            }
        }
        let logits = ws
            .hidden
            .last()
            .ok_or_else(|| Error::invalid("densenet: the head has no layer"))?;
        softmax_into(be, logits, 1, &mut ws.probs)
    }

    /// Runs the network on `x` `[n, in_channels, h, w]` with a fresh workspace.
    pub fn forward(&self, be: &Backend, x: &Tensor) -> Result<DenseNetWorkspace> {
        let [n, _, h, w] = dims4(x)?;
        let mut ws = self.workspace(be, n, h, w)?;
        self.forward_into(be, x, &mut ws)?;
        Ok(ws)
    }

    /// The head as an affine map at `pooled` (one image's `[C]` pooled
    /// features): `(W_eff [classes × C], b_eff [classes])` with
    /// `logits = W_eff·pooled + b_eff`, the ReLU masks taken at `pooled`.
    /// For a single Linear head this is its weight and bias.
    pub fn head_linearization(&self, pooled: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let c = self.config.num_features;
        if pooled.len() != c {
            return Err(Error::shape(
                "densenet head",
                format!("{} pooled features, expected {c}", pooled.len()),
            ));
        }
        // Forward on the host, keeping the ReLU masks.
        let mut act: Vec<f64> = pooled.iter().map(|&v| f64::from(v)).collect();
        let mut masks: Vec<Vec<bool>> = Vec::new();
        for (layer, cfg) in self.head.iter().zip(&self.config.head) {
            let mut out: Vec<f64> = layer
                .w_host
                .chunks_exact(cfg.in_features)
                .zip(&layer.b_host)
                .map(|(row, &b)| {
                    row.iter()
                        .zip(&act)
                        .map(|(&w, &a)| f64::from(w) * a)
                        .sum::<f64>()
                        + f64::from(b)
                })
                .collect();
            if cfg.relu_after {
                let mask: Vec<bool> = out.iter().map(|&v| v > 0.0).collect();
                out.iter_mut().zip(&mask).for_each(|(v, &m)| {
                    if !m {
                        *v = 0.0;
                    }
                });
                masks.push(mask);
            }
            act = out;
        }
        // W_eff = W_L · D_{L−1} · W_{L−1} ⋯ D_1 · W_1, built from the last layer down.
        let (last, rest) = self
            .head
            .split_last()
            .ok_or_else(|| Error::invalid("densenet: the head has no layer"))?;
        let mut m: Vec<f64> = last.w_host.iter().map(|&v| f64::from(v)).collect();
        let mut cols = self.config.head[rest.len()].in_features;
        for (layer, cfg) in rest.iter().zip(&self.config.head).rev() {
            let mask = masks.pop();
            let inner = cfg.in_features;
            let mut next = vec![0.0f64; (m.len() / cols) * inner];
            for (row, out_row) in m.chunks_exact(cols).zip(next.chunks_exact_mut(inner)) {
                for (j, (&coef, w_row)) in
                    row.iter().zip(layer.w_host.chunks_exact(inner)).enumerate()
                {
                    let on = mask.as_ref().is_none_or(|mk| mk[j]);
                    if on && coef != 0.0 {
                        out_row
                            .iter_mut()
                            .zip(w_row)
                            .for_each(|(o, &w)| *o += coef * f64::from(w));
                    }
                }
            }
            m = next;
            cols = inner;
        }
        let offset: Vec<f32> = m
            .chunks_exact(c)
            .zip(&act)
            .map(|(row, &logit)| {
                let lin: f64 = row
                    .iter()
                    .zip(pooled)
                    .map(|(&w, &p)| w * f64::from(p))
                    .sum();
                (logit - lin) as f32
            })
            .collect();
        Ok((m.into_iter().map(|v| v as f32).collect(), offset))
    }

    /// The class activation map of `class` for one image, from its
    /// activated features `[C, h, w]` (a slice of
    /// [`DenseNetWorkspace::activated`]); see the module docs.
    pub fn class_activation_map(
        &self,
        activated: &[f32],
        (h, w): (usize, usize),
        class: usize,
    ) -> Result<ClassActivationMap> {
        const OP: &str = "class_activation_map";
        let c = self.config.num_features;
        let hw = h * w;
        if activated.len() != c * hw || hw == 0 {
            return Err(Error::shape(
                OP,
                format!("{} feature values for [{c}, {h}, {w}]", activated.len()),
            ));
        }
        if class >= self.config.num_classes() {
            return Err(Error::invalid(format!(
                "{OP}: class {class} does not exist (the head has {} classes)",
                self.config.num_classes()
            )));
        }
        let pooled: Vec<f32> = activated
            .chunks_exact(hw)
            .map(|plane| (plane.iter().map(|&v| f64::from(v)).sum::<f64>() / hw as f64) as f32)
            .collect();
        let (w_eff, b_eff) = self.head_linearization(&pooled)?;
        let weights = &w_eff[class * c..(class + 1) * c];
        let mut values = vec![0.0f64; hw];
        for (&wk, plane) in weights.iter().zip(activated.chunks_exact(hw)) {
            values
                .iter_mut()
                .zip(plane)
                .for_each(|(m, &f)| *m += f64::from(wk) * f64::from(f));
        }
        Ok(ClassActivationMap {
            height: h,
            width: w,
            values: values.into_iter().map(|v| v as f32).collect(),
            class,
            offset: b_eff[class],
        })
    }
}

fn dims4(x: &Tensor) -> Result<[usize; 4]> {
    match *x.shape() {
        [n, c, h, w] => Ok([n, c, h, w]),
        ref s => Err(Error::shape(
            "densenet",
            format!("input must be [n, c, h, w], got shape {s:?}"),
        )),
    }
}

/// Runs the DenseNet in `weights` over `input` `[N, in_channels, H, W]` (on
/// any device; it is streamed through `be` `batch_size` images at a time)
/// and adds its outputs to `out`: `features` `[N, C, H/32, W/32]` (after
/// `norm5`, before the last ReLU), `pooled` `[N, C]`, `logits` and `probs`
/// `[N, classes]`. Device memory stays at one batch's activations
/// ([`DenseNetConfig::activation_bytes`] × `batch_size`) plus the weights.
pub fn infer(
    be: &Backend,
    weights: &TensorFile,
    input: &Tensor,
    batch_size: usize,
    out: &mut TensorWriter,
) -> Result<()> {
    if batch_size == 0 {
        return Err(Error::invalid(
            "densenet: the batch size must be at least 1",
        ));
    }
    let model = DenseNet::from_file(be, weights)?;
    let [n, c, h, w] = dims4(input)?;
    if c != model.config.in_channels {
        return Err(Error::shape(
            "densenet",
            format!(
                "input {:?} has {c} channels but the network takes {}",
                input.shape(),
                model.config.in_channels
            ),
        ));
    }
    let fshape = model.config.features_shape(n, h, w)?;
    let classes = model.config.num_classes();
    let data = input.to_vec()?;
    let image = c * h * w;
    let mut features = Vec::with_capacity(fshape.iter().product());
    let mut pooled = Vec::with_capacity(n * model.config.num_features);
    let mut logits = Vec::with_capacity(n * classes);
    let mut probs = Vec::with_capacity(n * classes);
    let mut ws: Option<DenseNetWorkspace> = None;
    for start in (0..n).step_by(batch_size) {
        let b = batch_size.min(n - start);
        let ws = match ws {
            Some(ref mut ws) if ws.batch() == b => ws,
            _ => {
                // Free the previous batch's buffers before allocating the last, smaller one.
                drop(ws.take());
                ws.insert(model.workspace(be, b, h, w)?)
            }
        };
        let x = Tensor::from_slice(be, &[b, c, h, w], &data[start * image..(start + b) * image])?;
        model.forward_into(be, &x, ws)?;
        features.extend(ws.features().to_vec()?);
        pooled.extend(ws.pooled().to_vec()?);
        logits.extend(ws.logits().to_vec()?);
        probs.extend(ws.probs().to_vec()?);
    }
    out.add_slice("features", &fshape, &features)?;
    out.add_slice("pooled", &[n, model.config.num_features], &pooled)?;
    out.add_slice("logits", &[n, classes], &logits)?;
    out.add_slice("probs", &[n, classes], &probs)?;
    Ok(())
}
