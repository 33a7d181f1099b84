//! One DenseNet training step on any device (CPU, CUDA, emulated), as
//! PyTorch runs it (`docs/MODELS.md` §2 and §4): training-mode BatchNorm
//! (batch statistics, running statistics updated with momentum 0.1 and the
//! unbiased variance, `num_batches_tracked += 1`), cross-entropy averaged
//! over the batch (optionally class-weighted), dropout after the hidden ReLU
//! of a Kim head, backward, then one optimizer step (Adam/AdamW in
//! PyTorch's form).
//!
//! Written llm.c style: every layer's forward keeps what its backward needs
//! and the backward is written out layer by layer in reverse; there is no
//! tape. One code path for every device: activations are
//! [`Tensor`]s on the step's [`Backend`] and every layer runs through
//! [`crate::ops`] (the [`crate::cpu`] reference ops on the CPU device, the
//! kernels on CUDA and emulated devices). A dense block's features live in
//! one buffer `[n, C_b + layers·growth, h, w]`; layer `l` reads its first
//! `c_l` channels ([`ops::slice_channels`]) and writes its `growth` new ones
//! after them ([`ops::copy_channels_into`]), so in backward the gradient of
//! the buffer is complete for a layer's channels when that layer is reached,
//! and the layer adds its input gradient into channels `[0, c_l)`
//! ([`ops::add_channels_into`]).
//!
//! On the host in this version, with the transfers they cost per step:
//! - the parameters and running statistics the pass uses are uploaded from
//!   the host [`ParamStore`] (all of them from the first block run on), and
//!   the batch; the updated running statistics come back after the step;
//! - the logits come back for the cross-entropy and its gradient
//!   (`[n, classes]` each way);
//! - every parameter gradient comes back into the store, where the
//!   optimizer steps.
//!
//! On the CPU device the step's tensors are the store's own buffers, moved
//! out for the step and back (no copy). Every reduction
//! (BatchNorm, weight and bias gradients) runs in an order fixed by the
//! shapes, without atomics: a step is deterministic on every device.

use std::collections::BTreeMap;

use crate::backend::Backend;
use crate::device::Device;
use crate::geometry::{Conv2dParams, Pool2dParams};
use crate::io::{TensorFile, TensorWriter};
use crate::models::densenet::{DenseNetConfig, BN_EPS};
use crate::ops;
use crate::precision::Precision;
use crate::tensor::Tensor;
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
    /// `1/(1−p)`) when [`crate::rng::dropout_keep`]`(seed, step, k, p)`
    /// ([`ops::dropout`]).
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
        self.eval_forward_on(&Backend::cpu(), input, shape, first, stop)
    }

    /// [`DenseNetTrainer::eval_forward`] on `be`'s device (the parameters
    /// it reads are uploaded, the result comes back to the host).
    pub fn eval_forward_on(
        &self,
        be: &Backend,
        input: &[f32],
        shape: [usize; 4],
        first: usize,
        stop: usize,
    ) -> Result<(Vec<f32>, [usize; 4])> {
        eval_forward(
            be,
            &self.plan,
            &self.state.params,
            input,
            shape,
            first,
            stop,
        )
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
        self.forward_backward_on(&Backend::cpu(), batch, settings)
    }

    /// [`DenseNetTrainer::forward_backward_with`] on `be`'s device: the
    /// parameters from block `settings.first_block` on are uploaded, the
    /// running statistics and the gradients come back into the state.
    pub fn forward_backward_on(
        &mut self,
        be: &Backend,
        batch: &Batch,
        settings: &StepSettings,
    ) -> Result<StepOutput> {
        check_precision(be)?;
        let first = settings.first_block;
        let nb = self.plan.blocks.len();
        let plan = &self.plan;
        let store = &mut self.state.params;
        store.zero_grads();
        let mut w = Weights::lend(be, store, &plan.ids(first.min(nb), nb))?;
        let step = forward(be, plan, &mut w, batch, settings).and_then(|(fwd, output)| {
            backward(be, plan, &w, store, batch, &fwd, &output.logits, settings)?;
            Ok(output)
        });
        // The running statistics come back whether or not the step failed
        // (as each BatchNorm's would have on the host).
        w.give_back(be, store, plan.norms_from(first))?;
        let output = step?;
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
        self.step_on(&Backend::cpu(), batch, settings, lr)
    }

    /// [`DenseNetTrainer::step_with`] on `be`'s device
    /// ([`DenseNetTrainer::forward_backward_on`]; the optimizer steps on
    /// the host).
    pub fn step_on(
        &mut self,
        be: &Backend,
        batch: &Batch,
        settings: &StepSettings,
        lr: f64,
    ) -> Result<StepOutput> {
        let out = self.forward_backward_on(be, batch, settings)?;
        self.state.params.step(&mut self.opt, lr)?;
        Ok(out)
    }

    /// The training-mode loss of `batch` at the current parameters, changing
    /// nothing (running statistics are updated on a copy): what a
    /// finite-difference check differentiates.
    pub fn loss(&self, batch: &Batch) -> Result<f32> {
        self.loss_with(batch, &StepSettings::default())
    }

    /// [`DenseNetTrainer::loss`] with `settings`.
    pub fn loss_with(&self, batch: &Batch, settings: &StepSettings) -> Result<f32> {
        let be = Backend::cpu();
        let nb = self.plan.blocks.len();
        let ids = self.plan.ids(settings.first_block.min(nb), nb);
        let mut w = Weights::upload(&be, &self.state.params, &ids)?;
        Ok(forward(&be, &self.plan, &mut w, batch, settings)?.1.loss)
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
    train_step_on(&Backend::cpu(), before, prefix, batch, adam, lr)
}

/// [`train_step`] on `be`'s device ([`DenseNetTrainer::step_on`]).
pub fn train_step_on(
    be: &Backend,
    before: &TensorFile,
    prefix: &str,
    batch: &Batch,
    adam: AdamConfig,
    lr: f64,
) -> Result<TrainStep> {
    let state = DenseNetState::from_file(before, prefix)?;
    let mut trainer = DenseNetTrainer::new(state, adam)?;
    let output = trainer.step_on(be, batch, &StepSettings::default(), lr)?;
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
    relu_after: bool,
}

#[derive(Clone, Debug)]
struct Plan {
    in_channels: usize,
    f0: usize,
    growth: usize,
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
    /// Every store tensor's name, by id (for errors).
    names: Vec<String>,
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
            conv0,
            norm0,
            block_in,
            block_width,
            blocks,
            transitions,
            norm5,
            head,
            classes: cfg.num_classes(),
            names: store.params().iter().map(|p| p.name.clone()).collect(),
        })
    }

    /// The store ids a pass from block `first` to block `stop` reads: the
    /// stem when `first` is 0, the blocks `first..stop` with the
    /// transitions after them, and `norm5` and the head when `stop` is the
    /// number of blocks.
    fn ids(&self, first: usize, stop: usize) -> Vec<usize> {
        let bn = |b: &Bn| [b.gamma, b.beta, b.mean, b.var];
        let mut ids = Vec::new();
        if first == 0 {
            ids.push(self.conv0);
            ids.extend(bn(&self.norm0));
        }
        for b in first..stop.min(self.blocks.len()) {
            for l in &self.blocks[b] {
                ids.extend(bn(&l.norm1));
                ids.extend(bn(&l.norm2));
                ids.extend([l.conv1, l.conv2]);
            }
            if let Some(t) = self.transitions.get(b) {
                ids.extend(bn(&t.norm));
                ids.push(t.conv);
            }
        }
        if stop == self.blocks.len() {
            ids.extend(bn(&self.norm5));
            ids.extend(self.head.iter().flat_map(|l| [l.w, l.b]));
        }
        ids
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
// Layer helpers over the pass's tensors.

/// The parameters and running statistics a pass reads, copied from the
/// store to the pass's device (by store id; `None` for tensors the pass
/// does not use).
struct Weights {
    t: Vec<Option<Tensor>>,
}

impl Weights {
    fn upload(be: &Backend, store: &ParamStore, ids: &[usize]) -> Result<Self> {
        let mut t: Vec<Option<Tensor>> = (0..store.params().len()).map(|_| None).collect();
        for &id in ids {
            let p = store.get(id);
            t[id] =
                Some(Tensor::from_slice(be, &p.shape, &p.value).map_err(|e| named(&p.name, e))?);
        }
        Ok(Weights { t })
    }

    /// [`Weights::upload`], except on the CPU device, where the values move
    /// out of the store (no copy) until [`Weights::give_back`].
    fn lend(be: &Backend, store: &mut ParamStore, ids: &[usize]) -> Result<Self> {
        if be.device() != Device::Cpu {
            return Self::upload(be, store, ids);
        }
        let mut w = Weights {
            t: (0..store.params().len()).map(|_| None).collect(),
        };
        for &id in ids {
            let p = store.get_mut(id);
            // Checked first, so that from_vec cannot fail and lose the values.
            if p.value.len() != p.shape.iter().product::<usize>() {
                let msg = format!(
                    "{OP}: {} holds {} values for shape {:?}",
                    p.name,
                    p.value.len(),
                    p.shape
                );
                w.give_back(be, store, std::iter::empty::<&Bn>())?;
                return Err(Error::invalid(msg));
            }
            let value = std::mem::take(&mut p.value);
            w.t[id] = Some(Tensor::from_vec(be, &p.shape, value)?);
        }
        Ok(w)
    }

    /// Ends a [`Weights::lend`]: on the CPU device every value moves back
    /// into the store (the running statistics as the pass left them); on
    /// other devices the running statistics of `norms` are downloaded.
    fn give_back<'a>(
        self,
        be: &Backend,
        store: &mut ParamStore,
        norms: impl Iterator<Item = &'a Bn>,
    ) -> Result<()> {
        if be.device() == Device::Cpu {
            for (id, t) in self.t.into_iter().enumerate() {
                if let Some(t) = t {
                    store.get_mut(id).value = t.into_vec()?;
                }
            }
            return Ok(());
        }
        for bn in norms {
            for id in [bn.mean, bn.var] {
                store.get_mut(id).value = self.get(id)?.to_vec()?;
            }
        }
        Ok(())
    }

    fn get(&self, id: usize) -> Result<&Tensor> {
        self.t
            .get(id)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::invalid(format!("{OP}: tensor {id} is not on the device")))
    }

    fn take(&mut self, id: usize) -> Result<Tensor> {
        self.t
            .get_mut(id)
            .and_then(Option::take)
            .ok_or_else(|| Error::invalid(format!("{OP}: tensor {id} is not on the device")))
    }

    fn put(&mut self, id: usize, t: Tensor) {
        if let Some(slot) = self.t.get_mut(id) {
            *slot = Some(t);
        }
    }
}

/// Training passes run in f32: a bf16/f16 backend would round the
/// convolutions' operands.
fn check_precision(be: &Backend) -> Result<()> {
    if be.precision() != Precision::F32 {
        return Err(Error::invalid(format!(
            "{OP}: training runs in f32 only, the backend is {}",
            be.precision()
        )));
    }
    Ok(())
}

/// What a training-mode BatchNorm's backward needs besides its input.
struct BnSaved {
    mean: Tensor,
    inv_std: Tensor,
}

/// Training-mode BatchNorm: the running statistics advance on the device.
fn bn_forward(be: &Backend, w: &mut Weights, bn: &Bn, x: &Tensor) -> Result<(Tensor, BnSaved)> {
    let mut rm = w.take(bn.mean)?;
    let mut rv = w.take(bn.var)?;
    let out = ops::batchnorm_train(
        be,
        x,
        w.get(bn.gamma)?,
        w.get(bn.beta)?,
        &mut rm,
        &mut rv,
        BN_EPS,
        BN_MOMENTUM,
    );
    w.put(bn.mean, rm);
    w.put(bn.var, rv);
    let out = out.map_err(|e| named(&bn.name, e))?;
    Ok((
        out.y,
        BnSaved {
            mean: out.save_mean,
            inv_std: out.save_inv_std,
        },
    ))
}

/// Returns `dx`; adds `dgamma`, `dbeta` to the store's gradients.
fn bn_backward(
    be: &Backend,
    w: &Weights,
    store: &mut ParamStore,
    bn: &Bn,
    x: &Tensor,
    saved: &BnSaved,
    dy: &Tensor,
) -> Result<Tensor> {
    let g = ops::batchnorm_train_backward(be, x, w.get(bn.gamma)?, &saved.mean, &saved.inv_std, dy)
        .map_err(|e| named(&bn.name, e))?;
    store.accumulate(bn.gamma, &g.dgamma.into_vec()?)?;
    store.accumulate(bn.beta, &g.dbeta.into_vec()?)?;
    Ok(g.dx)
}

/// A bias-free conv of weight `id` on `x` `[n, c, h, w]`.
fn conv_forward(
    be: &Backend,
    w: &Weights,
    plan: &Plan,
    id: usize,
    x: &Tensor,
    (stride, pad): (usize, usize),
) -> Result<Tensor> {
    ops::conv2d(be, x, w.get(id)?, None, Conv2dParams::new(stride, pad))
        .map_err(|e| named(&plan.names[id], e))
}

/// Returns `dx`; adds `dw` to the store's gradient of `id`.
#[allow(clippy::too_many_arguments)]
fn conv_backward(
    be: &Backend,
    w: &Weights,
    plan: &Plan,
    store: &mut ParamStore,
    id: usize,
    x: &Tensor,
    dy: &Tensor,
    (stride, pad): (usize, usize),
) -> Result<Tensor> {
    let g = ops::conv2d_backward(be, x, w.get(id)?, dy, Conv2dParams::new(stride, pad), false)
        .map_err(|e| named(&plan.names[id], e))?;
    store.accumulate(id, &g.dw.into_vec()?)?;
    Ok(g.dx)
}

fn named(tensor: &str, e: Error) -> Error {
    Error::invalid(format!("{OP}, {tensor}: {e}"))
}

/// conv0 7×7/2 pad 3.
const CONV0: (usize, usize) = (2, 3);
/// A dense layer's 1×1 bottleneck conv and a transition's conv.
const CONV1X1: (usize, usize) = (1, 0);
/// A dense layer's 3×3 conv, pad 1.
const CONV3X3: (usize, usize) = (1, 1);

fn pool0() -> Pool2dParams {
    Pool2dParams::new(3, 2, 1)
}

fn transition_pool() -> Pool2dParams {
    Pool2dParams::new(2, 2, 0)
}

// ---------------------------------------------------------------------------
// Forward, keeping what backward needs.

struct LayerSaved {
    bn1: BnSaved,
    /// relu(norm1(x)): conv1's input.
    r1: Tensor,
    /// conv1's output: norm2's input.
    b1: Tensor,
    bn2: BnSaved,
    /// relu(norm2(b1)): conv2's input.
    r2: Tensor,
}

struct TransitionSaved {
    bn: BnSaved,
    /// relu(norm(block buffer)): the conv's input.
    r: Tensor,
    /// The conv's output size (the avg pool's input).
    hw_conv: (usize, usize),
}

struct StemSaved {
    /// The batch on the device (conv0's input).
    input: Tensor,
    /// conv0's output (norm0's input).
    c0: Tensor,
    bn0: BnSaved,
    /// relu(norm0(c0)): the max pool's input.
    r0: Tensor,
}

struct Forward {
    /// The stem (none when the batch enters a later block).
    stem: Option<StemSaved>,
    /// Spatial size of each block (`(0, 0)` for blocks not run).
    sizes: Vec<(usize, usize)>,
    /// Each block's full buffer (`None` for blocks not run).
    buffers: Vec<Option<Tensor>>,
    layers: Vec<Vec<LayerSaved>>,
    /// The transitions run: after block `first`, `first + 1`, ...
    transitions: Vec<TransitionSaved>,
    bn5: BnSaved,
    /// relu(norm5(last buffer)).
    a5: Tensor,
    /// The input of every head Linear (`pooled` first).
    head_in: Vec<Tensor>,
    /// Per head Linear followed by ReLU and dropout: the ReLU's output
    /// before the dropout.
    head_relu: Vec<Option<Tensor>>,
    /// The head's dropout `(seed, step, p)`, `p > 0`.
    dropout: Option<(u64, u64, f32)>,
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

/// The training-mode forward on `be`; the running statistics in `w`
/// advance. The logits come back to the host for the loss.
fn forward(
    be: &Backend,
    plan: &Plan,
    w: &mut Weights,
    batch: &Batch,
    s: &StepSettings,
) -> Result<(Forward, StepOutput)> {
    let first = s.first_block;
    check_batch(plan, batch, first)?;
    let n = batch.shape[0];
    let input = Tensor::from_slice(be, &batch.shape, batch.input)?;

    let (stem, mut sizes, mut block_input) = if first == 0 {
        // Stem: conv0 7×7/2, norm0, ReLU, max pool 3×3/2 pad 1.
        let c0 = conv_forward(be, w, plan, plan.conv0, &input, CONV0)?;
        let (n0, bn0) = bn_forward(be, w, &plan.norm0, &c0)?;
        let r0 = ops::relu(be, &n0)?;
        let p0 = ops::max_pool2d(be, &r0, pool0())?;
        let size = (p0.shape()[2], p0.shape()[3]);
        let stem = StemSaved { input, c0, bn0, r0 };
        (Some(stem), vec![size], p0)
    } else {
        let mut sizes = vec![(0, 0); first];
        sizes.push((batch.shape[2], batch.shape[3]));
        (None, sizes, input)
    };
    let mut buffers: Vec<Option<Tensor>> = (0..first).map(|_| None).collect();
    let mut layers: Vec<Vec<LayerSaved>> = (0..first).map(|_| Vec::new()).collect();
    let mut transitions = Vec::new();
    for (b, block) in plan.blocks.iter().enumerate().skip(first) {
        let (h, wd) = sizes[b];
        let width = plan.block_width[b];
        let mut buf = Tensor::zeros(be, &[n, width, h, wd])?;
        ops::copy_channels_into(be, &block_input, &mut buf, 0)?;
        let mut saved = Vec::with_capacity(block.len());
        for layer in block {
            let x = ops::slice_channels(be, &buf, 0, layer.c_in)?;
            let (a1, bn1) = bn_forward(be, w, &layer.norm1, &x)?;
            let r1 = ops::relu(be, &a1)?;
            let b1 = conv_forward(be, w, plan, layer.conv1, &r1, CONV1X1)?;
            let (a2, bn2) = bn_forward(be, w, &layer.norm2, &b1)?;
            let r2 = ops::relu(be, &a2)?;
            let out = conv_forward(be, w, plan, layer.conv2, &r2, CONV3X3)?;
            ops::copy_channels_into(be, &out, &mut buf, layer.c_in)?;
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
            let (a, bn) = bn_forward(be, w, &t.norm, &buf)?;
            let r = ops::relu(be, &a)?;
            let conv = conv_forward(be, w, plan, t.conv, &r, CONV1X1)?;
            let hw_conv = (conv.shape()[2], conv.shape()[3]);
            let pooled = ops::avg_pool2d(be, &conv, transition_pool())?;
            transitions.push(TransitionSaved { bn, r, hw_conv });
            sizes.push((pooled.shape()[2], pooled.shape()[3]));
            block_input = pooled;
        }
        buffers.push(Some(buf));
    }

    // norm5, ReLU, global average pool, head.
    let last = buffers
        .last()
        .and_then(Option::as_ref)
        .ok_or_else(|| Error::invalid(format!("{OP}: no dense blocks")))?;
    let (f5, bn5) = bn_forward(be, w, &plan.norm5, last)?;
    let a5 = ops::relu(be, &f5)?;
    let mut head_in = vec![ops::global_avg_pool(be, &a5)?];
    let mut head_relu = Vec::new();
    let dropout = s.dropout.filter(|&(_, _, p)| p > 0.0);
    let mut logits = None;
    for (i, l) in plan.head.iter().enumerate() {
        let y = ops::linear(be, &head_in[i], w.get(l.w)?, Some(w.get(l.b)?))
            .map_err(|e| named(&plan.names[l.w], e))?;
        if i + 1 == plan.head.len() {
            logits = Some(y);
        } else if l.relu_after {
            let r = ops::relu(be, &y)?;
            match dropout {
                Some((seed, step, p)) => {
                    head_in.push(ops::dropout(be, &r, seed, step, p)?);
                    head_relu.push(Some(r));
                }
                None => {
                    head_in.push(r);
                    head_relu.push(None);
                }
            }
        } else {
            head_relu.push(None);
            head_in.push(y);
        }
    }
    let logits = logits
        .ok_or_else(|| Error::invalid(format!("{OP}: the head has no layers")))?
        .to_vec()?;
    let loss = loss::cross_entropy(&logits, plan.classes, batch.labels, s.class_weights)?;
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
            head_relu,
            dropout,
        },
        StepOutput { logits, loss },
    ))
}

// ---------------------------------------------------------------------------
// Backward, layer by layer in reverse.

#[allow(clippy::too_many_arguments)]
fn backward(
    be: &Backend,
    plan: &Plan,
    w: &Weights,
    store: &mut ParamStore,
    batch: &Batch,
    f: &Forward,
    logits: &[f32],
    s: &StepSettings,
) -> Result<()> {
    let n = batch.shape[0];
    let g = plan.growth;
    let first = s.first_block;

    // Loss (on the host) and head.
    let dlogits =
        loss::cross_entropy_backward(logits, plan.classes, batch.labels, s.class_weights, 1.0)?;
    let mut dy = Tensor::from_vec(be, &[n, plan.classes], dlogits)?;
    for (i, l) in plan.head.iter().enumerate().rev() {
        let x = &f.head_in[i];
        let grads = ops::linear_backward(be, x, w.get(l.w)?, &dy, true)
            .map_err(|e| named(&plan.names[l.w], e))?;
        store.accumulate(l.w, &grads.dw.into_vec()?)?;
        let db = grads
            .db
            .ok_or_else(|| Error::invalid(format!("{OP}: no bias gradient")))?;
        store.accumulate(l.b, &db.into_vec()?)?;
        let dx = grads.dx;
        dy = match i.checked_sub(1) {
            Some(j) => match (&f.head_relu[j], f.dropout) {
                (Some(r), Some((seed, step, p))) => {
                    let dr = ops::dropout_backward(be, &dx, seed, step, p)?;
                    ops::relu_backward(be, r, &dr)?
                }
                _ if plan.head[j].relu_after => ops::relu_backward(be, x, &dx)?,
                _ => dx,
            },
            None => dx,
        };
    }

    // Global average pool, ReLU, norm5.
    let nb = plan.blocks.len();
    let (h, wd) = f.sizes[nb - 1];
    let da5 = ops::global_avg_pool_backward(be, &dy, h, wd)?;
    let df5 = ops::relu_backward(be, &f.a5, &da5)?;
    let buffer = |b: usize| {
        f.buffers[b]
            .as_ref()
            .ok_or_else(|| Error::invalid(format!("{OP}: block {b} did not run")))
    };
    let mut dbuf = bn_backward(be, w, store, &plan.norm5, buffer(nb - 1)?, &f.bn5, &df5)?;

    // Blocks and transitions, last to first; `dbuf` is the gradient of the
    // current block's buffer.
    for b in (first..nb).rev() {
        let buf = buffer(b)?;
        for (layer, s) in plan.blocks[b].iter().zip(&f.layers[b]).rev() {
            let dout = ops::slice_channels(be, &dbuf, layer.c_in, g)?;
            let dr2 = conv_backward(be, w, plan, store, layer.conv2, &s.r2, &dout, CONV3X3)?;
            let da2 = ops::relu_backward(be, &s.r2, &dr2)?;
            let db1 = bn_backward(be, w, store, &layer.norm2, &s.b1, &s.bn2, &da2)?;
            let dr1 = conv_backward(be, w, plan, store, layer.conv1, &s.r1, &db1, CONV1X1)?;
            let da1 = ops::relu_backward(be, &s.r1, &dr1)?;
            let x = ops::slice_channels(be, buf, 0, layer.c_in)?;
            let dx = bn_backward(be, w, store, &layer.norm1, &x, &s.bn1, &da1)?;
            ops::add_channels_into(be, &dx, &mut dbuf, 0)?;
        }
        if b == first {
            break;
        }
        // The block's input came from transition b−1: avg pool ← conv ← ReLU ← norm.
        let t = &plan.transitions[b - 1];
        let ts = &f.transitions[b - 1 - first];
        let dpooled = ops::slice_channels(be, &dbuf, 0, plan.block_in[b])?;
        let (ch, cw) = ts.hw_conv;
        let dconv = ops::avg_pool2d_backward(be, &dpooled, transition_pool(), ch, cw)?;
        let dr = conv_backward(be, w, plan, store, t.conv, &ts.r, &dconv, CONV1X1)?;
        let da = ops::relu_backward(be, &ts.r, &dr)?;
        dbuf = bn_backward(be, w, store, &t.norm, buffer(b - 1)?, &ts.bn, &da)?;
    }

    // Stem: max pool ← ReLU ← norm0 ← conv0.
    let Some(st) = &f.stem else {
        return Ok(());
    };
    let dp0 = ops::slice_channels(be, &dbuf, 0, plan.f0)?;
    let dr0 = ops::max_pool2d_backward(be, &st.r0, &dp0, pool0())?;
    let dn0 = ops::relu_backward(be, &st.r0, &dr0)?;
    let dc0 = bn_backward(be, w, store, &plan.norm0, &st.c0, &st.bn0, &dn0)?;
    conv_backward(be, w, plan, store, plan.conv0, &st.input, &dc0, CONV0)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Eval-mode forward (running statistics, nothing kept).

fn bn_relu_eval(be: &Backend, w: &Weights, bn: &Bn, x: &Tensor) -> Result<Tensor> {
    let y = ops::batchnorm(
        be,
        x,
        w.get(bn.gamma)?,
        w.get(bn.beta)?,
        w.get(bn.mean)?,
        w.get(bn.var)?,
        BN_EPS,
    )
    .map_err(|e| named(&bn.name, e))?;
    ops::relu(be, &y)
}

fn eval_forward(
    be: &Backend,
    plan: &Plan,
    store: &ParamStore,
    input: &[f32],
    shape: [usize; 4],
    first: usize,
    stop: usize,
) -> Result<(Vec<f32>, [usize; 4])> {
    check_precision(be)?;
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
    let w = Weights::upload(be, store, &plan.ids(first, stop))?;
    let n = shape[0];
    let mut x = Tensor::from_slice(be, &shape, input)?;
    if first == 0 {
        let c0 = conv_forward(be, &w, plan, plan.conv0, &x, CONV0)?;
        let r0 = bn_relu_eval(be, &w, &plan.norm0, &c0)?;
        x = ops::max_pool2d(be, &r0, pool0())?;
    }
    for b in first..stop {
        let (h, wd) = (x.shape()[2], x.shape()[3]);
        let mut buf = Tensor::zeros(be, &[n, plan.block_width[b], h, wd])?;
        ops::copy_channels_into(be, &x, &mut buf, 0)?;
        for layer in &plan.blocks[b] {
            let xin = ops::slice_channels(be, &buf, 0, layer.c_in)?;
            let r1 = bn_relu_eval(be, &w, &layer.norm1, &xin)?;
            let b1 = conv_forward(be, &w, plan, layer.conv1, &r1, CONV1X1)?;
            let r2 = bn_relu_eval(be, &w, &layer.norm2, &b1)?;
            let out = conv_forward(be, &w, plan, layer.conv2, &r2, CONV3X3)?;
            ops::copy_channels_into(be, &out, &mut buf, layer.c_in)?;
        }
        x = match plan.transitions.get(b) {
            Some(t) => {
                let r = bn_relu_eval(be, &w, &t.norm, &buf)?;
                let conv = conv_forward(be, &w, plan, t.conv, &r, CONV1X1)?;
                ops::avg_pool2d(be, &conv, transition_pool())?
            }
            None => buf,
        };
    }
    if stop < nb {
        let out_shape = [n, plan.block_in[stop], x.shape()[2], x.shape()[3]];
        return Ok((x.into_vec()?, out_shape));
    }
    let a5 = bn_relu_eval(be, &w, &plan.norm5, &x)?;
    let mut h_in = ops::global_avg_pool(be, &a5)?;
    for l in &plan.head {
        let y = ops::linear(be, &h_in, w.get(l.w)?, Some(w.get(l.b)?))
            .map_err(|e| named(&plan.names[l.w], e))?;
        h_in = if l.relu_after { ops::relu(be, &y)? } else { y };
    }
    Ok((h_in.into_vec()?, [n, plan.classes, 1, 1]))
}
