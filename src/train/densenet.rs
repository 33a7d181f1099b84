//! One DenseNet training step on the CPU, as PyTorch runs it
//! (`docs/MODELS.md` §2 and §4): training-mode BatchNorm (batch statistics,
//! running statistics updated with momentum 0.1 and the unbiased variance,
//! `num_batches_tracked += 1`), cross-entropy averaged over the batch,
//! backward, then one optimizer step (Adam in PyTorch's form).
//!
//! Written llm.c style: every layer's forward keeps what its backward needs
//! and the backward is written out layer by layer in reverse, from the
//! [`crate::cpu`] reference ops; there is no tape. A dense block's features
//! live in one buffer `[n, C_b + layers·growth, h, w]`; layer `l` reads its
//! first `c_l` channels and writes its `growth` new ones after them, so in
//! backward the gradient of the buffer is complete for a layer's channels
//! when that layer is reached, and the layer adds its input gradient into
//! channels `[0, c_l)`.
//!
//! Dropout in a `classifier.{i}` head (Kim et al.'s Linear, ReLU, Dropout,
//! Linear) is the identity here: there is no dropout in this step. All
//! reductions run in a fixed order, so a step is deterministic.

use std::collections::BTreeMap;

use crate::cpu;
use crate::geometry::{Conv2dGeom, Conv2dParams, Pool2dGeom, Pool2dParams};
use crate::io::{TensorFile, TensorWriter};
use crate::models::densenet::{DenseNetConfig, BN_EPS};
use crate::rng::dropout_keep;
use crate::train::loss;
use crate::train::optim::{AdamConfig, Method, Optimizer};
use crate::train::store::ParamStore;
use crate::{Error, Result};

/// PyTorch's BatchNorm momentum for the running statistics.
pub const BN_MOMENTUM: f32 = 0.1;

const OP: &str = "densenet train step";

/// A DenseNet's whole `state_dict` for training: parameters (trainable, with
/// gradients) and running statistics (buffers) in a [`ParamStore`], and the
/// BatchNorm step counters (int64 in PyTorch) beside it.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseNetState {
    /// The hyper-parameters, read off the weights.
    pub config: DenseNetConfig,
    /// Every f32 tensor by `state_dict` name; `running_mean` and
    /// `running_var` are buffers (`trainable = false`).
    pub params: ParamStore,
    /// `P.num_batches_tracked` of every BatchNorm `P`, by full name.
    pub num_batches_tracked: BTreeMap<String, i64>,
}

impl DenseNetState {
    /// Reads the tensors of `file` whose names start with `prefix` (e.g.
    /// `"before."`, or `""` for a plain `state_dict`), with the prefix
    /// removed. A missing `num_batches_tracked` counts as 0.
    pub fn from_file(file: &TensorFile, prefix: &str) -> Result<Self> {
        let is_buffer = |k: &str| k.ends_with(".running_mean") || k.ends_with(".running_var");
        let (params, mut counters) = ParamStore::read_state_dict(file, prefix, is_buffer)?;
        // The config is read off the unprefixed names.
        let mut sub = TensorWriter::new();
        params.write_values(&mut sub, "")?;
        let view = TensorFile::from_bytes(
            format!("{}[{prefix}*]", file.path().display()),
            sub.to_bytes()?,
        )?;
        let config = DenseNetConfig::from_weights(&view)?;
        let plan = Plan::new(&config, &params)?;
        for bn in plan.norms() {
            counters
                .entry(format!("{}.num_batches_tracked", bn.name))
                .or_insert(0);
        }
        if let Some(extra) = counters.keys().find(|k| {
            !plan
                .norms()
                .any(|bn| **k == format!("{}.num_batches_tracked", bn.name))
        }) {
            return Err(Error::invalid(format!(
                "{OP}: {extra:?} belongs to no BatchNorm of the network"
            )));
        }
        Ok(DenseNetState {
            config,
            params,
            num_batches_tracked: counters,
        })
    }

    /// Adds the `state_dict` (f32 tensors, and the counters as int64 scalars
    /// as PyTorch stores them) to `w` with `prefix` in front of each name.
    pub fn write_values(&self, w: &mut TensorWriter, prefix: &str) -> Result<()> {
        self.params.write_values(w, prefix)?;
        for (name, &count) in &self.num_batches_tracked {
            w.add_slice(&format!("{prefix}{name}"), &[], &[count])?;
        }
        Ok(())
    }

    /// Adds the gradient of every trainable parameter to `w` as
    /// `{prefix}{name}`.
    pub fn write_grads(&self, w: &mut TensorWriter, prefix: &str) -> Result<()> {
        for p in self.params.params().iter().filter(|p| p.trainable) {
            w.add_slice(&format!("{prefix}{}", p.name), &p.shape, &p.grad)?;
        }
        Ok(())
    }
}

/// One training batch: images `[n, c, h, w]` and a class index per image.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    /// The images, NCHW, row-major.
    pub input: &'a [f32],
    /// `[n, c, h, w]`.
    pub shape: [usize; 4],
    /// `n` class indices.
    pub labels: &'a [usize],
}

/// What a forward and backward pass report.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    /// `[n, classes]`, computed with the parameters before the update.
    pub logits: Vec<f32>,
    /// Mean cross-entropy of the batch.
    pub loss: f32,
}

/// The result of [`train_step`].
#[derive(Clone, Debug, PartialEq)]
pub struct TrainStep {
    /// The state after the step: updated parameters, running statistics and
    /// counters; each parameter's `grad` holds the gradient of this step
    /// (taken at the parameters before the update).
    pub after: DenseNetState,
    /// Logits and loss of the forward pass.
    pub output: StepOutput,
}

/// Options of [`DenseNetTrainer::step_with`] beyond the plain step.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepSettings<'a> {
    /// The dense block (0-based) the batch enters: 0, the batch holds
    /// images; `b > 0`, it holds block `b`'s input `[n, C_b, h, w]` and
    /// nothing before block `b` runs (its BatchNorms keep their statistics
    /// and counters, its parameters get no gradient).
    pub first_block: usize,
    /// Per-class weights of the cross-entropy (PyTorch's `weight=`:
    /// the weighted mean over the batch).
    pub class_weights: Option<&'a [f32]>,
    /// Dropout after each ReLU of the head, as `(seed, step, p)`: element
    /// `k` of the layer's `[n, out]` output is kept (and scaled by
    /// `1/(1−p)`) when [`dropout_keep`]`(seed, step, k, p)`.
    pub dropout: Option<(u64, u64, f32)>,
}

/// A DenseNet with an optimizer, stepping on batches.
#[derive(Clone, Debug)]
pub struct DenseNetTrainer {
    state: DenseNetState,
    plan: Plan,
    opt: Optimizer,
}

impl DenseNetTrainer {
    /// A trainer with a fresh Adam (`torch.optim.Adam`) over every trainable
    /// parameter.
    pub fn new(state: DenseNetState, adam: AdamConfig) -> Result<Self> {
        Self::with_method(state, Method::Adam(adam))
    }

    /// A trainer with a fresh optimizer `method` over the parameters marked
    /// trainable (freeze a parameter by clearing its `trainable` first).
    pub fn with_method(state: DenseNetState, method: Method) -> Result<Self> {
        let plan = Plan::new(&state.config, &state.params)?;
        let mut opt = Optimizer::new(method)?;
        state.params.register(&mut opt)?;
        Ok(DenseNetTrainer { state, plan, opt })
    }

    /// Number of dense blocks.
    pub fn blocks(&self) -> usize {
        self.plan.blocks.len()
    }

    /// The shape `[n, C, h, w]` of dense block `block`'s input for images
    /// of `h × w`.
    pub fn block_input_shape(
        &self,
        n: usize,
        h: usize,
        w: usize,
        block: usize,
    ) -> Result<[usize; 4]> {
        let c = *self.plan.block_in.get(block).ok_or_else(|| {
            Error::invalid(format!(
                "{OP}: block {block} of a network of {} blocks",
                self.plan.blocks.len()
            ))
        })?;
        if h < 4 || w < 4 {
            return Err(Error::shape(OP, format!("input {h}×{w} is too small")));
        }
        // conv0 7×7/2 pad 3, max pool 3×3/2 pad 1, then one 2×2/2 average
        // pool per transition.
        let stem = |x: usize| ((x - 1) / 2) / 2 + 1;
        let (h, w) = (stem(h) >> block, stem(w) >> block);
        if h == 0 || w == 0 {
            return Err(Error::shape(
                OP,
                format!("block {block}'s input would be empty"),
            ));
        }
        Ok([n, c, h, w])
    }

    /// Eval-mode forward (BatchNorm with the running statistics, no
    /// dropout) from block `first` (0: `input` is images `[n, c, h, w]`;
    /// otherwise block `first`'s input) up to block `stop`: for `stop` <
    /// the number of blocks, block `stop`'s input and its shape; for `stop`
    /// = the number of blocks, the logits `[n, classes]` (shape `[n,
    /// classes, 1, 1]`). Changes nothing.
    pub fn eval_forward(
        &self,
        input: &[f32],
        shape: [usize; 4],
        first: usize,
        stop: usize,
    ) -> Result<(Vec<f32>, [usize; 4])> {
        eval_forward(&self.plan, &self.state.params, input, shape, first, stop)
    }

    /// The current state (gradients of the last step included).
    pub fn state(&self) -> &DenseNetState {
        &self.state
    }

    /// The optimizer (its per-parameter state, step counts).
    pub fn optimizer(&self) -> &Optimizer {
        &self.opt
    }

    /// The state and the optimizer, mutable (to restore a checkpoint).
    pub fn parts_mut(&mut self) -> (&mut DenseNetState, &mut Optimizer) {
        (&mut self.state, &mut self.opt)
    }

    /// Gives the state back.
    pub fn into_state(self) -> DenseNetState {
        self.state
    }

    /// Forward and backward in training mode: the gradients replace the
    /// previous ones, the running statistics and counters advance; the
    /// parameters are not updated.
    pub fn forward_backward(&mut self, batch: &Batch) -> Result<StepOutput> {
        self.forward_backward_with(batch, &StepSettings::default())
    }

    /// [`DenseNetTrainer::forward_backward`] with `settings`: only the
    /// BatchNorms from block `settings.first_block` on run (in training
    /// mode) and count the batch.
    pub fn forward_backward_with(
        &mut self,
        batch: &Batch,
        settings: &StepSettings,
    ) -> Result<StepOutput> {
        self.state.params.zero_grads();
        let (fwd, output) = forward(&self.plan, &mut self.state.params, batch, settings)?;
        backward(&self.plan, &mut self.state.params, batch, &fwd, settings)?;
        for bn in self.plan.norms_from(settings.first_block) {
            let key = format!("{}.num_batches_tracked", bn.name);
            let c = self.state.num_batches_tracked.entry(key).or_insert(0);
            *c = c.saturating_add(1);
        }
        Ok(output)
    }

    /// One step: [`DenseNetTrainer::forward_backward`], then the optimizer
    /// at learning rate `lr`.
    pub fn step(&mut self, batch: &Batch, lr: f64) -> Result<StepOutput> {
        self.step_with(batch, &StepSettings::default(), lr)
    }

    /// One step with `settings` ([`DenseNetTrainer::forward_backward_with`],
    /// then the optimizer over the trainable parameters).
    pub fn step_with(
        &mut self,
        batch: &Batch,
        settings: &StepSettings,
        lr: f64,
    ) -> Result<StepOutput> {
        let out = self.forward_backward_with(batch, settings)?;
        self.state.params.step(&mut self.opt, lr)?;
        Ok(out)
    }

    /// The training-mode loss of `batch` at the current parameters, changing
    /// nothing (running statistics are updated on a copy): what a
    /// finite-difference check differentiates.
    pub fn loss(&self, batch: &Batch) -> Result<f32> {
        let mut params = self.state.params.clone();
        Ok(
            forward(&self.plan, &mut params, batch, &StepSettings::default())?
                .1
                .loss,
        )
    }

    /// [`DenseNetTrainer::loss`] with `settings`.
    pub fn loss_with(&self, batch: &Batch, settings: &StepSettings) -> Result<f32> {
        let mut params = self.state.params.clone();
        Ok(forward(&self.plan, &mut params, batch, settings)?.1.loss)
    }

    /// Sets element `index` of parameter `name` (for finite differences).
    pub fn set_value(&mut self, name: &str, index: usize, value: f32) -> Result<()> {
        let id = self.state.params.id(name)?;
        let p = self.state.params.get_mut(id);
        let len = p.value.len();
        let v = p.value.get_mut(index).ok_or_else(|| {
            Error::invalid(format!("{name}: index {index} out of range ({len} values)"))
        })?;
        *v = value;
        Ok(())
    }
}

/// One training step from the `state_dict` in `before` (names after
/// `prefix`) on `batch`, with a fresh Adam at learning rate `lr`: PyTorch's
/// `loss.backward(); opt.step()` on a model in `train()` mode.
pub fn train_step(
    before: &TensorFile,
    prefix: &str,
    batch: &Batch,
    adam: AdamConfig,
    lr: f64,
) -> Result<TrainStep> {
    let state = DenseNetState::from_file(before, prefix)?;
    let mut trainer = DenseNetTrainer::new(state, adam)?;
    let output = trainer.step(batch, lr)?;
    Ok(TrainStep {
        after: trainer.into_state(),
        output,
    })
}

// ---------------------------------------------------------------------------
// The plan: store ids of every layer's tensors, shapes checked.

#[derive(Clone, Debug)]
struct Bn {
    name: String,
    c: usize,
    gamma: usize,
    beta: usize,
    mean: usize,
    var: usize,
}

#[derive(Clone, Debug)]
struct DenseLayer {
    c_in: usize,
    norm1: Bn,
    conv1: usize,
    norm2: Bn,
    conv2: usize,
}

#[derive(Clone, Debug)]
struct Transition {
    norm: Bn,
    conv: usize,
}

#[derive(Clone, Debug)]
struct HeadLayer {
    w: usize,
    b: usize,
    in_f: usize,
    out_f: usize,
    relu_after: bool,
}

#[derive(Clone, Debug)]
struct Plan {
    in_channels: usize,
    f0: usize,
    growth: usize,
    bottleneck: usize,
    conv0: usize,
    norm0: Bn,
    /// Input channels of each block.
    block_in: Vec<usize>,
    /// Channels of each block's buffer.
    block_width: Vec<usize>,
    blocks: Vec<Vec<DenseLayer>>,
    transitions: Vec<Transition>,
    norm5: Bn,
    head: Vec<HeadLayer>,
    classes: usize,
}

struct Lookup<'a> {
    store: &'a ParamStore,
    used: Vec<bool>,
}

impl Lookup<'_> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<usize> {
        let id = self.store.id(name)?;
        let got = &self.store.get(id).shape;
        if got != shape {
            return Err(Error::invalid(format!(
                "{OP}: {name} has shape {got:?}, expected {shape:?}"
            )));
        }
        self.used[id] = true;
        Ok(id)
    }

    fn bn(&mut self, name: &str, c: usize) -> Result<Bn> {
        Ok(Bn {
            name: name.to_string(),
            c,
            gamma: self.get(&format!("{name}.weight"), &[c])?,
            beta: self.get(&format!("{name}.bias"), &[c])?,
            mean: self.get(&format!("{name}.running_mean"), &[c])?,
            var: self.get(&format!("{name}.running_var"), &[c])?,
        })
    }
}

impl Plan {
    fn new(cfg: &DenseNetConfig, store: &ParamStore) -> Result<Self> {
        let mut lk = Lookup {
            store,
            used: vec![false; store.params().len()],
        };
        let (f0, growth, bott) = (cfg.num_init_features, cfg.growth_rate, cfg.bottleneck());
        let conv0 = lk.get("features.conv0.weight", &[f0, cfg.in_channels, 7, 7])?;
        let norm0 = lk.bn("features.norm0", f0)?;
        let mut block_in = Vec::new();
        let mut block_width = Vec::new();
        let mut blocks = Vec::new();
        let mut transitions = Vec::new();
        let mut c = f0;
        for (b, &layers) in cfg.block_config.iter().enumerate() {
            block_in.push(c);
            let mut block = Vec::with_capacity(layers);
            for l in 0..layers {
                let p = format!("features.denseblock{}.denselayer{}", b + 1, l + 1);
                let c_in = c + l * growth;
                block.push(DenseLayer {
                    c_in,
                    norm1: lk.bn(&format!("{p}.norm1"), c_in)?,
                    conv1: lk.get(&format!("{p}.conv1.weight"), &[bott, c_in, 1, 1])?,
                    norm2: lk.bn(&format!("{p}.norm2"), bott)?,
                    conv2: lk.get(&format!("{p}.conv2.weight"), &[growth, bott, 3, 3])?,
                });
            }
            blocks.push(block);
            c += layers * growth;
            block_width.push(c);
            if let Some(&out) = cfg.transition_channels.get(b) {
                let p = format!("features.transition{}", b + 1);
                transitions.push(Transition {
                    norm: lk.bn(&format!("{p}.norm"), c)?,
                    conv: lk.get(&format!("{p}.conv.weight"), &[out, c, 1, 1])?,
                });
                c = out;
            }
        }
        if transitions.len() + 1 != blocks.len() {
            return Err(Error::invalid(format!(
                "{OP}: {} blocks but {} transitions",
                blocks.len(),
                transitions.len()
            )));
        }
        let norm5 = lk.bn("features.norm5", c)?;
        let mut head = Vec::with_capacity(cfg.head.len());
        for l in &cfg.head {
            head.push(HeadLayer {
                w: lk.get(
                    &format!("{}.weight", l.name),
                    &[l.out_features, l.in_features],
                )?,
                b: lk.get(&format!("{}.bias", l.name), &[l.out_features])?,
                in_f: l.in_features,
                out_f: l.out_features,
                relu_after: l.relu_after,
            });
        }
        if let Some(i) = lk.used.iter().position(|u| !u) {
            return Err(Error::invalid(format!(
                "{OP}: tensor {:?} is not part of the network",
                store.get(i).name
            )));
        }
        Ok(Plan {
            in_channels: cfg.in_channels,
            f0,
            growth,
            bottleneck: bott,
            conv0,
            norm0,
            block_in,
            block_width,
            blocks,
            transitions,
            norm5,
            head,
            classes: cfg.num_classes(),
        })
    }

    /// Every BatchNorm, in network order.
    fn norms(&self) -> impl Iterator<Item = &Bn> {
        self.norms_from(0)
    }

    /// The BatchNorms from block `first` on (norm0 only when `first` is 0).
    fn norms_from(&self, first: usize) -> impl Iterator<Item = &Bn> {
        (first == 0)
            .then_some(&self.norm0)
            .into_iter()
            .chain(
                self.blocks
                    .iter()
                    .enumerate()
                    .skip(first)
                    .flat_map(move |(b, layers)| {
                        layers
                            .iter()
                            .flat_map(|l| [&l.norm1, &l.norm2])
                            .chain(self.transitions.get(b).map(|t| &t.norm))
                    }),
            )
            .chain(std::iter::once(&self.norm5))
    }
}

// ---------------------------------------------------------------------------
// Layer helpers over the store.

/// What a training-mode BatchNorm's backward needs besides its input.
struct BnSaved {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

fn bn_forward(
    store: &mut ParamStore,
    bn: &Bn,
    n: usize,
    hw: usize,
    x: &[f32],
) -> Result<(Vec<f32>, BnSaved)> {
    let mut rm = store.get(bn.mean).value.clone();
    let mut rv = store.get(bn.var).value.clone();
    let mut saved = BnSaved {
        mean: vec![0.0; bn.c],
        inv_std: vec![0.0; bn.c],
    };
    let mut y = vec![0.0; x.len()];
    cpu::norm::batchnorm_train_forward(
        n,
        bn.c,
        hw,
        x,
        &store.get(bn.gamma).value,
        &store.get(bn.beta).value,
        BN_EPS,
        BN_MOMENTUM,
        &mut rm,
        &mut rv,
        &mut saved.mean,
        &mut saved.inv_std,
        &mut y,
    )
    .map_err(|e| named(&bn.name, e))?;
    store.get_mut(bn.mean).value = rm;
    store.get_mut(bn.var).value = rv;
    Ok((y, saved))
}

/// Returns `dx`; adds `dgamma`, `dbeta` to the store's gradients.
fn bn_backward(
    store: &mut ParamStore,
    bn: &Bn,
    n: usize,
    hw: usize,
    x: &[f32],
    saved: &BnSaved,
    dy: &[f32],
) -> Result<Vec<f32>> {
    let mut dx = vec![0.0; x.len()];
    let mut dgamma = vec![0.0; bn.c];
    let mut dbeta = vec![0.0; bn.c];
    cpu::norm::batchnorm_train_backward(
        n,
        bn.c,
        hw,
        x,
        &store.get(bn.gamma).value,
        &saved.mean,
        &saved.inv_std,
        dy,
        &mut dx,
        &mut dgamma,
        &mut dbeta,
    )
    .map_err(|e| named(&bn.name, e))?;
    store.accumulate(bn.gamma, &dgamma)?;
    store.accumulate(bn.beta, &dbeta)?;
    Ok(dx)
}

/// A bias-free conv of weight `id` on `x` `[n, c, h, w]`.
fn conv_geom(
    store: &ParamStore,
    id: usize,
    x: [usize; 4],
    stride: usize,
    pad: usize,
) -> Result<Conv2dGeom> {
    let p = store.get(id);
    Conv2dGeom::new(&x, &p.shape, Conv2dParams::new(stride, pad)).map_err(|e| named(&p.name, e))
}

fn conv_forward(store: &ParamStore, id: usize, g: &Conv2dGeom, x: &[f32]) -> Result<Vec<f32>> {
    let p = store.get(id);
    let mut y = vec![0.0; g.n * g.c_out * g.oh * g.ow];
    cpu::conv2d_forward(g, x, &p.value, None, &mut y).map_err(|e| named(&p.name, e))?;
    Ok(y)
}

/// Returns `dx`; adds `dw` to the store's gradient of `id`.
fn conv_backward(
    store: &mut ParamStore,
    id: usize,
    g: &Conv2dGeom,
    x: &[f32],
    dy: &[f32],
) -> Result<Vec<f32>> {
    let p = store.get(id);
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; p.value.len()];
    cpu::conv2d_backward(g, x, &p.value, dy, &mut dx, &mut dw, None)
        .map_err(|e| named(&p.name, e))?;
    store.accumulate(id, &dw)?;
    Ok(dx)
}

fn relu(x: &[f32]) -> Result<Vec<f32>> {
    let mut y = vec![0.0; x.len()];
    cpu::relu_forward(x, &mut y)?;
    Ok(y)
}

/// ReLU backward from the ReLU's output `y` (`y > 0` exactly where its input was).
fn relu_backward(y: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
    let mut dx = vec![0.0; y.len()];
    cpu::relu_backward(y, dy, &mut dx)?;
    Ok(dx)
}

/// Channels `[offset, offset + count)` of `x` `[n, total, hw]`.
fn channels(
    x: &[f32],
    n: usize,
    total: usize,
    hw: usize,
    offset: usize,
    count: usize,
) -> Result<Vec<f32>> {
    let mut y = vec![0.0; n * count * hw];
    cpu::slice_channels(n, total, hw, x, offset, count, &mut y)?;
    Ok(y)
}

/// Adds `src` `[n, c, hw]` into channels `[0, c)` of `dst` `[n, total, hw]`.
fn add_leading_channels(src: &[f32], dst: &mut [f32], n: usize, total: usize, hw: usize) {
    let c = src.len() / (n * hw).max(1);
    for ni in 0..n {
        let d = &mut dst[ni * total * hw..][..c * hw];
        for (a, &b) in d.iter_mut().zip(&src[ni * c * hw..][..c * hw]) {
            *a += b;
        }
    }
}

fn named(tensor: &str, e: Error) -> Error {
    Error::invalid(format!("{OP}, {tensor}: {e}"))
}

// ---------------------------------------------------------------------------
// Forward, keeping what backward needs.

struct LayerSaved {
    bn1: BnSaved,
    /// relu(norm1(x)): conv1's input.
    r1: Vec<f32>,
    /// conv1's output: norm2's input.
    b1: Vec<f32>,
    bn2: BnSaved,
    /// relu(norm2(b1)): conv2's input.
    r2: Vec<f32>,
}

struct TransitionSaved {
    bn: BnSaved,
    /// relu(norm(block buffer)): the conv's input.
    r: Vec<f32>,
    /// The conv's output size (the avg pool's input).
    hw_conv: (usize, usize),
}

struct StemSaved {
    /// conv0's output (norm0's input).
    c0: Vec<f32>,
    g0: Conv2dGeom,
    bn0: BnSaved,
    /// relu(norm0(c0)): the max pool's input.
    r0: Vec<f32>,
    pool0: Pool2dGeom,
}

struct Forward {
    /// The stem (none when the batch enters a later block).
    stem: Option<StemSaved>,
    /// Spatial size of each block (`(0, 0)` for blocks not run).
    sizes: Vec<(usize, usize)>,
    /// Each block's full buffer (empty for blocks not run).
    buffers: Vec<Vec<f32>>,
    layers: Vec<Vec<LayerSaved>>,
    /// The transitions run: after block `first`, `first + 1`, ...
    transitions: Vec<TransitionSaved>,
    bn5: BnSaved,
    /// relu(norm5(last buffer)).
    a5: Vec<f32>,
    /// The input of every head Linear (`pooled` first).
    head_in: Vec<Vec<f32>>,
    /// Per head Linear with dropout after its ReLU: the scale of each
    /// output (0 where dropped or clamped by the ReLU).
    head_scale: Vec<Option<Vec<f32>>>,
    logits: Vec<f32>,
}

fn check_batch(plan: &Plan, batch: &Batch, first: usize) -> Result<()> {
    let [n, c, h, w] = batch.shape;
    let want = match first {
        0 => plan.in_channels,
        b => *plan.block_in.get(b).ok_or_else(|| {
            Error::invalid(format!(
                "{OP}: first block {b} of a network of {} blocks",
                plan.blocks.len()
            ))
        })?,
    };
    if c != want || n == 0 || h == 0 || w == 0 {
        return Err(Error::shape(
            OP,
            format!(
                "input shape {:?}: need a non-empty batch of {want} channels",
                batch.shape
            ),
        ));
    }
    if batch.input.len() != n * c * h * w {
        return Err(Error::shape(
            OP,
            format!(
                "input has {} values for shape {:?}",
                batch.input.len(),
                batch.shape
            ),
        ));
    }
    if batch.labels.len() != n {
        return Err(Error::shape(
            OP,
            format!("{} labels for {n} images", batch.labels.len()),
        ));
    }
    Ok(())
}

fn forward(
    plan: &Plan,
    store: &mut ParamStore,
    batch: &Batch,
    s: &StepSettings,
) -> Result<(Forward, StepOutput)> {
    let first = s.first_block;
    check_batch(plan, batch, first)?;
    let n = batch.shape[0];
    let g = plan.growth;

    let (stem, mut sizes, mut block_input) = if first == 0 {
        // Stem: conv0 7×7/2, norm0, ReLU, max pool 3×3/2 pad 1.
        let g0 = conv_geom(store, plan.conv0, batch.shape, 2, 3)?;
        let c0 = conv_forward(store, plan.conv0, &g0, batch.input)?;
        let (n0, bn0) = bn_forward(store, &plan.norm0, n, g0.oh * g0.ow, &c0)?;
        let r0 = relu(&n0)?;
        let pool0 = Pool2dGeom::new(OP, &[n, plan.f0, g0.oh, g0.ow], Pool2dParams::new(3, 2, 1))?;
        let mut p0 = vec![0.0; n * plan.f0 * pool0.oh * pool0.ow];
        cpu::max_pool2d_forward(&pool0, &r0, &mut p0)?;
        let size = (pool0.oh, pool0.ow);
        let stem = StemSaved {
            c0,
            g0,
            bn0,
            r0,
            pool0,
        };
        (Some(stem), vec![size], p0)
    } else {
        let mut sizes = vec![(0, 0); first];
        sizes.push((batch.shape[2], batch.shape[3]));
        (None, sizes, batch.input.to_vec())
    };
    let mut buffers: Vec<Vec<f32>> = vec![Vec::new(); first];
    let mut layers: Vec<Vec<LayerSaved>> = (0..first).map(|_| Vec::new()).collect();
    let mut transitions = Vec::new();
    for (b, block) in plan.blocks.iter().enumerate().skip(first) {
        let (h, w) = sizes[b];
        let hw = h * w;
        let width = plan.block_width[b];
        let mut buf = vec![0.0; n * width * hw];
        cpu::copy_channels(n, plan.block_in[b], hw, &block_input, width, 0, &mut buf)?;
        let mut saved = Vec::with_capacity(block.len());
        for layer in block {
            let x = channels(&buf, n, width, hw, 0, layer.c_in)?;
            let (a1, bn1) = bn_forward(store, &layer.norm1, n, hw, &x)?;
            let r1 = relu(&a1)?;
            let g1 = conv_geom(store, layer.conv1, [n, layer.c_in, h, w], 1, 0)?;
            let b1 = conv_forward(store, layer.conv1, &g1, &r1)?;
            let (a2, bn2) = bn_forward(store, &layer.norm2, n, hw, &b1)?;
            let r2 = relu(&a2)?;
            let g2 = conv_geom(store, layer.conv2, [n, plan.bottleneck, h, w], 1, 1)?;
            let out = conv_forward(store, layer.conv2, &g2, &r2)?;
            cpu::copy_channels(n, g, hw, &out, width, layer.c_in, &mut buf)?;
            saved.push(LayerSaved {
                bn1,
                r1,
                b1,
                bn2,
                r2,
            });
        }
        layers.push(saved);
        if let Some(t) = plan.transitions.get(b) {
            let (a, bn) = bn_forward(store, &t.norm, n, hw, &buf)?;
            let r = relu(&a)?;
            let gt = conv_geom(store, t.conv, [n, width, h, w], 1, 0)?;
            let conv = conv_forward(store, t.conv, &gt, &r)?;
            let pg = Pool2dGeom::new(OP, &[n, gt.c_out, gt.oh, gt.ow], Pool2dParams::new(2, 2, 0))?;
            let mut pooled = vec![0.0; n * gt.c_out * pg.oh * pg.ow];
            cpu::avg_pool2d_forward(&pg, &conv, &mut pooled)?;
            transitions.push(TransitionSaved {
                bn,
                r,
                hw_conv: (gt.oh, gt.ow),
            });
            sizes.push((pg.oh, pg.ow));
            block_input = pooled;
        }
        buffers.push(buf);
    }

    // norm5, ReLU, global average pool, head.
    let last = buffers
        .last()
        .ok_or_else(|| Error::invalid(format!("{OP}: no dense blocks")))?;
    let (h, w) = sizes[sizes.len() - 1];
    let c5 = plan.norm5.c;
    let (f5, bn5) = bn_forward(store, &plan.norm5, n, h * w, last)?;
    let a5 = relu(&f5)?;
    let mut pooled = vec![0.0; n * c5];
    cpu::global_avg_pool_forward(n, c5, h * w, &a5, &mut pooled)?;
    let mut head_in = vec![pooled];
    let mut head_scale = Vec::new();
    let mut logits = Vec::new();
    for (i, l) in plan.head.iter().enumerate() {
        let mut y = vec![0.0; n * l.out_f];
        let (wp, bp) = (store.get(l.w), store.get(l.b));
        cpu::linear_forward(
            n,
            l.in_f,
            l.out_f,
            &head_in[i],
            &wp.value,
            Some(&bp.value),
            &mut y,
        )
        .map_err(|e| named(&wp.name, e))?;
        if i + 1 == plan.head.len() {
            logits = y;
        } else if l.relu_after {
            let mut r = relu(&y)?;
            let scale = match s.dropout {
                Some((seed, step, p)) if p > 0.0 => {
                    let keep = 1.0 / (1.0 - p);
                    let scale: Vec<f32> = r
                        .iter()
                        .enumerate()
                        .map(|(k, &v)| {
                            if v > 0.0 && dropout_keep(seed, step, k as u64, p) {
                                keep
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    for (v, m) in r.iter_mut().zip(&scale) {
                        *v *= m;
                    }
                    Some(scale)
                }
                _ => None,
            };
            head_scale.push(scale);
            head_in.push(r);
        } else {
            head_scale.push(None);
            head_in.push(y);
        }
    }
    let loss = loss::cross_entropy(&logits, plan.classes, batch.labels, s.class_weights)?;
    let output = StepOutput {
        logits: logits.clone(),
        loss,
    };
    Ok((
        Forward {
            stem,
            sizes,
            buffers,
            layers,
            transitions,
            bn5,
            a5,
            head_in,
            head_scale,
            logits,
        },
        output,
    ))
}

// ---------------------------------------------------------------------------
// Backward, layer by layer in reverse.

fn backward(
    plan: &Plan,
    store: &mut ParamStore,
    batch: &Batch,
    f: &Forward,
    s: &StepSettings,
) -> Result<()> {
    let n = batch.shape[0];
    let g = plan.growth;
    let first = s.first_block;

    // Loss and head.
    let mut dy =
        loss::cross_entropy_backward(&f.logits, plan.classes, batch.labels, s.class_weights, 1.0)?;
    for (i, l) in plan.head.iter().enumerate().rev() {
        let x = &f.head_in[i];
        let mut dx = vec![0.0; x.len()];
        let mut dw = vec![0.0; l.out_f * l.in_f];
        let mut db = vec![0.0; l.out_f];
        let wp = store.get(l.w);
        cpu::linear_backward(
            n,
            l.in_f,
            l.out_f,
            x,
            &wp.value,
            &dy,
            &mut dx,
            &mut dw,
            Some(&mut db),
        )
        .map_err(|e| named(&wp.name, e))?;
        store.accumulate(l.w, &dw)?;
        store.accumulate(l.b, &db)?;
        dy = match i.checked_sub(1) {
            Some(j) => match &f.head_scale[j] {
                Some(scale) => dx.iter().zip(scale).map(|(d, m)| d * m).collect(),
                None if plan.head[j].relu_after => relu_backward(x, &dx)?,
                None => dx,
            },
            None => dx,
        };
    }

    // Global average pool, ReLU, norm5.
    let nb = plan.blocks.len();
    let (h, w) = f.sizes[nb - 1];
    let c5 = plan.norm5.c;
    let mut da5 = vec![0.0; n * c5 * h * w];
    cpu::global_avg_pool_backward(n, c5, h * w, &dy, &mut da5)?;
    let df5 = relu_backward(&f.a5, &da5)?;
    let mut dbuf = bn_backward(
        store,
        &plan.norm5,
        n,
        h * w,
        &f.buffers[nb - 1],
        &f.bn5,
        &df5,
    )?;

    // Blocks and transitions, last to first; `dbuf` is the gradient of the
    // current block's buffer.
    for b in (first..nb).rev() {
        let (h, w) = f.sizes[b];
        let hw = h * w;
        let width = plan.block_width[b];
        let buf = &f.buffers[b];
        for (layer, s) in plan.blocks[b].iter().zip(&f.layers[b]).rev() {
            let dout = channels(&dbuf, n, width, hw, layer.c_in, g)?;
            let g2 = conv_geom(store, layer.conv2, [n, plan.bottleneck, h, w], 1, 1)?;
            let dr2 = conv_backward(store, layer.conv2, &g2, &s.r2, &dout)?;
            let da2 = relu_backward(&s.r2, &dr2)?;
            let db1 = bn_backward(store, &layer.norm2, n, hw, &s.b1, &s.bn2, &da2)?;
            let g1 = conv_geom(store, layer.conv1, [n, layer.c_in, h, w], 1, 0)?;
            let dr1 = conv_backward(store, layer.conv1, &g1, &s.r1, &db1)?;
            let da1 = relu_backward(&s.r1, &dr1)?;
            let x = channels(buf, n, width, hw, 0, layer.c_in)?;
            let dx = bn_backward(store, &layer.norm1, n, hw, &x, &s.bn1, &da1)?;
            add_leading_channels(&dx, &mut dbuf, n, width, hw);
        }
        if b == first {
            break;
        }
        // The block's input came from transition b−1: avg pool ← conv ← ReLU ← norm.
        let t = &plan.transitions[b - 1];
        let ts = &f.transitions[b - 1 - first];
        let c_in = plan.block_in[b];
        let dpooled = channels(&dbuf, n, width, hw, 0, c_in)?;
        let (ch, cw) = ts.hw_conv;
        let pg = Pool2dGeom::new(OP, &[n, c_in, ch, cw], Pool2dParams::new(2, 2, 0))?;
        let mut dconv = vec![0.0; n * c_in * ch * cw];
        cpu::avg_pool2d_backward(&pg, &dpooled, &mut dconv)?;
        let (ph, pw) = f.sizes[b - 1];
        let prev_width = plan.block_width[b - 1];
        let gt = conv_geom(store, t.conv, [n, prev_width, ph, pw], 1, 0)?;
        let dr = conv_backward(store, t.conv, &gt, &ts.r, &dconv)?;
        let da = relu_backward(&ts.r, &dr)?;
        dbuf = bn_backward(store, &t.norm, n, ph * pw, &f.buffers[b - 1], &ts.bn, &da)?;
    }

    // Stem: max pool ← ReLU ← norm0 ← conv0.
    let Some(st) = &f.stem else {
        return Ok(());
    };
    let (h, w) = f.sizes[0];
    let dp0 = channels(&dbuf, n, plan.block_width[0], h * w, 0, plan.f0)?;
    let mut dr0 = vec![0.0; st.r0.len()];
    cpu::max_pool2d_backward(&st.pool0, &st.r0, &dp0, &mut dr0)?;
    let dn0 = relu_backward(&st.r0, &dr0)?;
    let hw0 = st.g0.oh * st.g0.ow;
    let dc0 = bn_backward(store, &plan.norm0, n, hw0, &st.c0, &st.bn0, &dn0)?;
    conv_backward(store, plan.conv0, &st.g0, batch.input, &dc0)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Eval-mode forward (running statistics, nothing kept).

fn bn_eval(store: &ParamStore, bn: &Bn, n: usize, hw: usize, x: &[f32]) -> Result<Vec<f32>> {
    let mut y = vec![0.0; x.len()];
    cpu::norm::batchnorm_forward(
        n,
        bn.c,
        hw,
        x,
        &store.get(bn.gamma).value,
        &store.get(bn.beta).value,
        &store.get(bn.mean).value,
        &store.get(bn.var).value,
        BN_EPS,
        &mut y,
    )
    .map_err(|e| named(&bn.name, e))?;
    Ok(y)
}

fn eval_forward(
    plan: &Plan,
    store: &ParamStore,
    input: &[f32],
    shape: [usize; 4],
    first: usize,
    stop: usize,
) -> Result<(Vec<f32>, [usize; 4])> {
    let nb = plan.blocks.len();
    if first > stop || stop > nb {
        return Err(Error::invalid(format!(
            "{OP}: eval from block {first} to block {stop} of a network of {nb} blocks"
        )));
    }
    let labels = vec![0usize; shape[0]];
    check_batch(
        plan,
        &Batch {
            input,
            shape,
            labels: &labels,
        },
        first,
    )?;
    let n = shape[0];
    let (mut x, mut size) = if first == 0 {
        let g0 = conv_geom(store, plan.conv0, shape, 2, 3)?;
        let c0 = conv_forward(store, plan.conv0, &g0, input)?;
        let r0 = relu(&bn_eval(store, &plan.norm0, n, g0.oh * g0.ow, &c0)?)?;
        let pool0 = Pool2dGeom::new(OP, &[n, plan.f0, g0.oh, g0.ow], Pool2dParams::new(3, 2, 1))?;
        let mut p0 = vec![0.0; n * plan.f0 * pool0.oh * pool0.ow];
        cpu::max_pool2d_forward(&pool0, &r0, &mut p0)?;
        (p0, (pool0.oh, pool0.ow))
    } else {
        (input.to_vec(), (shape[2], shape[3]))
    };
    for b in first..stop {
        let (h, w) = size;
        let hw = h * w;
        let width = plan.block_width[b];
        let mut buf = vec![0.0; n * width * hw];
        cpu::copy_channels(n, plan.block_in[b], hw, &x, width, 0, &mut buf)?;
        for layer in &plan.blocks[b] {
            let xin = channels(&buf, n, width, hw, 0, layer.c_in)?;
            let r1 = relu(&bn_eval(store, &layer.norm1, n, hw, &xin)?)?;
            let g1 = conv_geom(store, layer.conv1, [n, layer.c_in, h, w], 1, 0)?;
            let b1 = conv_forward(store, layer.conv1, &g1, &r1)?;
            let r2 = relu(&bn_eval(store, &layer.norm2, n, hw, &b1)?)?;
            let g2 = conv_geom(store, layer.conv2, [n, plan.bottleneck, h, w], 1, 1)?;
            let out = conv_forward(store, layer.conv2, &g2, &r2)?;
            cpu::copy_channels(n, plan.growth, hw, &out, width, layer.c_in, &mut buf)?;
        }
        match plan.transitions.get(b) {
            Some(t) => {
                let r = relu(&bn_eval(store, &t.norm, n, hw, &buf)?)?;
                let gt = conv_geom(store, t.conv, [n, width, h, w], 1, 0)?;
                let conv = conv_forward(store, t.conv, &gt, &r)?;
                let pg =
                    Pool2dGeom::new(OP, &[n, gt.c_out, gt.oh, gt.ow], Pool2dParams::new(2, 2, 0))?;
                let mut pooled = vec![0.0; n * gt.c_out * pg.oh * pg.ow];
                cpu::avg_pool2d_forward(&pg, &conv, &mut pooled)?;
                x = pooled;
                size = (pg.oh, pg.ow);
            }
            None => x = buf,
        }
    }
    if stop < nb {
        return Ok((x, [n, plan.block_in[stop], size.0, size.1]));
    }
    let (h, w) = size;
    let c5 = plan.norm5.c;
    let a5 = relu(&bn_eval(store, &plan.norm5, n, h * w, &x)?)?;
    let mut h_in = vec![0.0; n * c5];
    cpu::global_avg_pool_forward(n, c5, h * w, &a5, &mut h_in)?;
    for l in &plan.head {
        let mut y = vec![0.0; n * l.out_f];
        let (wp, bp) = (store.get(l.w), store.get(l.b));
        cpu::linear_forward(
            n,
            l.in_f,
            l.out_f,
            &h_in,
            &wp.value,
            Some(&bp.value),
            &mut y,
        )
        .map_err(|e| named(&wp.name, e))?;
        h_in = if l.relu_after { relu(&y)? } else { y };
    }
    Ok((h_in, [n, plan.classes, 1, 1]))
}
