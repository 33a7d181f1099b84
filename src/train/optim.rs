//! Optimizers (Adam, AdamW, SGD with momentum) over parameter groups, and
//! gradient clipping by global norm, with PyTorch's formulas
//! (`docs/MODELS.md` §4).
//!
//! Parameters are registered once, by name, into groups
//! ([`Optimizer::add_group`], [`Optimizer::add_param`]); each
//! [`Optimizer::step`] then takes the current values and gradients as flat
//! `f32` slices in registration order, plus the learning rate of this step
//! (typically [`Schedule::lr`](super::Schedule::lr)). A group's effective
//! learning rate is that rate times its [`ParamGroup::lr_mult`]; a frozen
//! group is not touched at all (values, state and step count unchanged, its
//! gradients not even read), like a PyTorch parameter whose `grad` is `None`.
//!
//! # Arithmetic
//!
//! The element-wise update runs in `f32`, in the order of PyTorch's
//! single-tensor (non-foreach) CPU path, with the scalars (bias corrections,
//! step size, `1 − lr·wd`) computed in `f64` as Python does and rounded to
//! `f32` where PyTorch passes them to a kernel. No fused multiply-add is
//! used. Each element is updated independently, so a step is deterministic
//! and the same inputs always give the same bits.
//!
//! # State
//!
//! Per parameter, a [`ParamState`] with PyTorch's `state_dict` keys (`step`,
//! `exp_avg`, `exp_avg_sq`, `momentum_buffer`), readable with
//! [`Optimizer::state`] and restorable with [`Optimizer::set_state`] so that
//! a checkpoint can carry it.

use crate::{Error, Result};

/// Hyper-parameters of Adam and AdamW (PyTorch's names and defaults:
/// betas (0.9, 0.999), eps 1e-8, weight_decay 0; note that PyTorch's
/// `AdamW` defaults to weight_decay 0.01, set it explicitly).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    /// `(β1, β2)`: decay of the first and second moment averages.
    pub betas: (f64, f64),
    /// Added to the denominator.
    pub eps: f64,
    /// Adam: L2 penalty added to the gradient (`g + wd·p`); AdamW: decoupled
    /// decay (`p ← p·(1 − lr·wd)` before the update). A group may override
    /// it ([`ParamGroup::weight_decay`]).
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Hyper-parameters of SGD (PyTorch's names; defaults all zero / off).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SgdConfig {
    /// Momentum factor μ (0: plain SGD, no buffer).
    pub momentum: f64,
    /// Dampening d of the gradient added to the buffer (PyTorch's default 0).
    pub dampening: f64,
    /// Nesterov momentum: step along `g + μ·buf` instead of `buf`.
    pub nesterov: bool,
    /// L2 penalty added to the gradient (`g + wd·p`); a group may override
    /// it ([`ParamGroup::weight_decay`]).
    pub weight_decay: f64,
}

/// Which update rule an [`Optimizer`] applies.
///
/// With `g` the gradient, `t` the parameter's step count after increment and
/// `lr` the group's effective learning rate:
///
/// - `Adam`: `g ← g + wd·p`; `m ← β1 m + (1−β1) g`; `v ← β2 v + (1−β2) g²`;
///   `p ← p − lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps)`.
/// - `AdamW`: `p ← p·(1 − lr·wd)`, then Adam's update without the L2 term.
/// - `Sgd`: `g ← g + wd·p`; with momentum μ ≠ 0, `buf ← g` on the first step
///   and `buf ← μ·buf + (1−d)·g` after, then `g ← g + μ·buf` (Nesterov) or
///   `g ← buf`; `p ← p − lr·g`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// `torch.optim.Adam` (weight decay as L2 on the gradient).
    Adam(AdamConfig),
    /// `torch.optim.AdamW` (decoupled weight decay).
    AdamW(AdamConfig),
    /// `torch.optim.SGD`.
    Sgd(SgdConfig),
}

/// A parameter group: parameters sharing a learning-rate multiplier, a
/// weight decay and whether they are trained at all.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamGroup {
    /// A label for messages and checkpoints (e.g. `"backbone"`).
    pub name: String,
    /// The group's learning rate is the step's rate times this (≥ 0).
    pub lr_mult: f64,
    /// A frozen group is skipped: values, state and step count stay as they are.
    pub frozen: bool,
    /// Overrides the method's weight decay for this group (e.g. `Some(0.0)`
    /// for biases and BatchNorm parameters).
    pub weight_decay: Option<f64>,
}

impl ParamGroup {
    /// A trainable group with multiplier 1 and the method's weight decay.
    pub fn new(name: impl Into<String>) -> Self {
        ParamGroup {
            name: name.into(),
            lr_mult: 1.0,
            frozen: false,
            weight_decay: None,
        }
    }

    /// The same group, frozen.
    pub fn frozen(mut self) -> Self {
        self.frozen = true;
        self
    }

    /// The same group with learning-rate multiplier `m`.
    pub fn with_lr_mult(mut self, m: f64) -> Self {
        self.lr_mult = m;
        self
    }

    /// The same group with its own weight decay.
    pub fn with_weight_decay(mut self, wd: f64) -> Self {
        self.weight_decay = Some(wd);
        self
    }

    fn validate(&self) -> Result<()> {
        if !(self.lr_mult.is_finite() && self.lr_mult >= 0.0) {
            return Err(Error::invalid(format!(
                "parameter group {:?}: lr_mult must be finite and ≥ 0, got {}",
                self.name, self.lr_mult
            )));
        }
        if let Some(wd) = self.weight_decay {
            check_nonneg(
                &format!("parameter group {:?}: weight_decay", self.name),
                wd,
            )?;
        }
        Ok(())
    }
}

/// The largest step count a parameter's state may hold: 2⁵³, where the
/// step stops being exact as the f64 of Adam's bias corrections (a run at a
/// million steps a second would take 285 years to get there).
pub const MAX_STEP: u64 = 1 << 53;

/// A registered parameter: its name, element count and group index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamInfo {
    /// The parameter's name (its `state_dict` key, e.g. `classifier.weight`).
    pub name: String,
    /// Number of elements.
    pub len: usize,
    /// Index of its group in [`Optimizer::groups`].
    pub group: usize,
}

/// Optimizer state of one parameter, named as in PyTorch's optimizer
/// `state_dict`. A tensor is `None` until the first step creates it (and
/// stays `None` where the method has no use for it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamState {
    /// Number of updates applied to this parameter (PyTorch's Adam `step`;
    /// SGD counts too, although PyTorch's SGD state has no `step`).
    pub step: u64,
    /// Adam/AdamW first moment `m`.
    pub exp_avg: Option<Vec<f32>>,
    /// Adam/AdamW second moment `v`.
    pub exp_avg_sq: Option<Vec<f32>>,
    /// SGD momentum buffer (only with momentum ≠ 0).
    pub momentum_buffer: Option<Vec<f32>>,
}

impl ParamState {
    /// The tensors present, as `(key, values)` with PyTorch's keys, in a
    /// fixed order: `exp_avg`, `exp_avg_sq`, `momentum_buffer`.
    pub fn tensors(&self) -> Vec<(&'static str, &[f32])> {
        [
            ("exp_avg", &self.exp_avg),
            ("exp_avg_sq", &self.exp_avg_sq),
            ("momentum_buffer", &self.momentum_buffer),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect()
    }
}

/// An optimizer over named parameters in groups. See the module docs.
#[derive(Clone, Debug)]
pub struct Optimizer {
    method: Method,
    groups: Vec<ParamGroup>,
    params: Vec<ParamInfo>,
    state: Vec<ParamState>,
}

fn check_nonneg(what: &str, v: f64) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{what} must be finite and ≥ 0, got {v}"
        )))
    }
}

fn check_unit(what: &str, v: f64) -> Result<()> {
    if (0.0..1.0).contains(&v) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{what} must lie in [0, 1), got {v}"
        )))
    }
}

impl Optimizer {
    /// An optimizer with no groups yet; checks the hyper-parameters as
    /// PyTorch does (betas in [0, 1), eps, weight decay, momentum ≥ 0;
    /// Nesterov needs momentum > 0 and dampening 0).
    pub fn new(method: Method) -> Result<Self> {
        match &method {
            Method::Adam(c) | Method::AdamW(c) => {
                check_unit("Adam beta1", c.betas.0)?;
                check_unit("Adam beta2", c.betas.1)?;
                check_nonneg("Adam eps", c.eps)?;
                check_nonneg("Adam weight_decay", c.weight_decay)?;
            }
            Method::Sgd(c) => {
                check_nonneg("SGD momentum", c.momentum)?;
                check_nonneg("SGD dampening", c.dampening)?;
                check_nonneg("SGD weight_decay", c.weight_decay)?;
                if c.nesterov && (c.momentum <= 0.0 || c.dampening != 0.0) {
                    return Err(Error::invalid(
                        "SGD: Nesterov momentum requires a momentum and zero dampening",
                    ));
                }
            }
        }
        Ok(Optimizer {
            method,
            groups: Vec::new(),
            params: Vec::new(),
            state: Vec::new(),
        })
    }

    /// The update rule.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// Adds a group; returns its index.
    pub fn add_group(&mut self, group: ParamGroup) -> Result<usize> {
        group.validate()?;
        self.groups.push(group);
        Ok(self.groups.len() - 1)
    }

    /// Registers a parameter of `len` elements in group `group`; returns its
    /// index, which is its position in the slices given to [`step`](Self::step).
    /// Names must be unique.
    pub fn add_param(
        &mut self,
        group: usize,
        name: impl Into<String>,
        len: usize,
    ) -> Result<usize> {
        let name = name.into();
        if group >= self.groups.len() {
            return Err(Error::invalid(format!(
                "parameter {name:?}: no group {group} (there are {})",
                self.groups.len()
            )));
        }
        if self.params.iter().any(|p| p.name == name) {
            return Err(Error::invalid(format!(
                "parameter {name:?} is registered twice"
            )));
        }
        self.params.push(ParamInfo { name, len, group });
        self.state.push(ParamState::default());
        Ok(self.params.len() - 1)
    }

    /// The groups, by index.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Freezes or unfreezes group `group` (e.g. to fine-tune a backbone after
    /// training the head).
    pub fn set_frozen(&mut self, group: usize, frozen: bool) -> Result<()> {
        let g = self.group_mut(group)?;
        g.frozen = frozen;
        Ok(())
    }

    /// Sets the learning-rate multiplier of group `group` (finite, ≥ 0).
    pub fn set_lr_mult(&mut self, group: usize, lr_mult: f64) -> Result<()> {
        let mut g = self.group_mut(group)?.clone();
        g.lr_mult = lr_mult;
        g.validate()?;
        self.groups[group] = g;
        Ok(())
    }

    fn group_mut(&mut self, group: usize) -> Result<&mut ParamGroup> {
        let n = self.groups.len();
        self.groups
            .get_mut(group)
            .ok_or_else(|| Error::invalid(format!("no parameter group {group} (there are {n})")))
    }

    /// The registered parameters, in registration order.
    pub fn params(&self) -> &[ParamInfo] {
        &self.params
    }

    /// The state of parameter `index`, or `None` for an unknown index.
    pub fn state(&self, index: usize) -> Option<&ParamState> {
        self.state.get(index)
    }

    /// Replaces the state of parameter `index` (e.g. from a checkpoint), after
    /// checking that it is a state this optimizer could have reached: every
    /// tensor present has the parameter's length and finite values
    /// (`exp_avg_sq` also ≥ 0); the tensors are those of the method (Adam's
    /// `exp_avg` and `exp_avg_sq`, both or neither; SGD's `momentum_buffer`
    /// only with momentum); none before the first step and, after it, all
    /// the method keeps; and `step` is at most [`MAX_STEP`]. An error names
    /// the parameter and leaves the state unchanged.
    pub fn set_state(&mut self, index: usize, state: ParamState) -> Result<()> {
        let info = self.params.get(index).ok_or_else(|| {
            Error::invalid(format!(
                "no parameter {index} (there are {})",
                self.params.len()
            ))
        })?;
        for (key, v) in state.tensors() {
            if v.len() != info.len {
                return Err(Error::invalid(format!(
                    "{}: optimizer state {key} has {} elements, the parameter {}",
                    info.name,
                    v.len(),
                    info.len
                )));
            }
        }
        let name = &info.name;
        for (key, v) in state.tensors() {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(Error::invalid(format!(
                    "{name}: optimizer state {key} holds a non-finite value ({}) at index {i}",
                    v[i]
                )));
            }
        }
        if let Some(i) = state
            .exp_avg_sq
            .as_deref()
            .and_then(|v| v.iter().position(|x| *x < 0.0))
        {
            return Err(Error::invalid(format!(
                "{name}: optimizer state exp_avg_sq holds a negative value at index {i} (a second moment is ≥ 0)"
            )));
        }
        if state.step > MAX_STEP {
            return Err(Error::invalid(format!(
                "{name}: step count {} is beyond any run (at most {MAX_STEP})",
                state.step
            )));
        }
        let (adam, momentum) = match &self.method {
            Method::Adam(_) | Method::AdamW(_) => (true, false),
            Method::Sgd(c) => (false, c.momentum != 0.0),
        };
        let unexpected = match (adam, momentum) {
            (true, _) => state.momentum_buffer.is_some().then_some("momentum_buffer"),
            (false, m) => {
                if state.exp_avg.is_some() {
                    Some("exp_avg")
                } else if !m && state.momentum_buffer.is_some() {
                    Some("momentum_buffer")
                } else {
                    None
                }
            }
        };
        if let Some(key) = unexpected {
            return Err(Error::invalid(format!(
                "{name}: optimizer state {key} does not belong to this optimizer ({:?})",
                self.method
            )));
        }
        if state.exp_avg.is_some() != state.exp_avg_sq.is_some() {
            return Err(Error::invalid(format!(
                "{}: optimizer state exp_avg and exp_avg_sq must be both present or both absent",
                name
            )));
        }
        let has = !state.tensors().is_empty();
        let needs = adam || momentum;
        if state.step == 0 && has {
            return Err(Error::invalid(format!(
                "{name}: optimizer state tensors at step 0 (they are created by the first step)"
            )));
        }
        if state.step > 0 && needs && !has {
            return Err(Error::invalid(format!(
                "{name}: step {} but no optimizer state tensors ({})",
                state.step,
                if adam {
                    "exp_avg, exp_avg_sq"
                } else {
                    "momentum_buffer"
                }
            )));
        }
        self.state[index] = state;
        Ok(())
    }

    /// One optimizer step at learning rate `lr` (finite, ≥ 0), before group
    /// multipliers. `params[i]` and `grads[i]` belong to the `i`-th
    /// registered parameter; the gradients of frozen groups are not read (any
    /// length will do, e.g. empty). Everything is checked before anything is
    /// changed, so an error leaves values and state as they were.
    pub fn step(&mut self, lr: f64, params: &mut [&mut [f32]], grads: &[&[f32]]) -> Result<()> {
        check_nonneg("learning rate", lr)?;
        let n = self.params.len();
        if params.len() != n || grads.len() != n {
            return Err(Error::shape(
                "Optimizer::step",
                format!(
                    "{n} parameters registered, but {} values and {} gradients given",
                    params.len(),
                    grads.len()
                ),
            ));
        }
        for (i, info) in self.params.iter().enumerate() {
            let frozen = self.groups[info.group].frozen;
            if params[i].len() != info.len || (!frozen && grads[i].len() != info.len) {
                return Err(Error::shape(
                    "Optimizer::step",
                    format!(
                        "{}: {} elements registered, value has {}, gradient {}",
                        info.name,
                        info.len,
                        params[i].len(),
                        grads[i].len()
                    ),
                ));
            }
        }
        for (i, info) in self.params.iter().enumerate() {
            let group = &self.groups[info.group];
            if group.frozen {
                continue;
            }
            let lr = lr * group.lr_mult;
            let state = &mut self.state[i];
            match &self.method {
                Method::Adam(c) => {
                    let wd = group.weight_decay.unwrap_or(c.weight_decay);
                    adam_update(params[i], grads[i], state, lr, c, wd, false)
                }
                Method::AdamW(c) => {
                    let wd = group.weight_decay.unwrap_or(c.weight_decay);
                    adam_update(params[i], grads[i], state, lr, c, wd, true)
                }
                Method::Sgd(c) => {
                    let wd = group.weight_decay.unwrap_or(c.weight_decay);
                    sgd_update(params[i], grads[i], state, lr, c, wd)
                }
            }
        }
        Ok(())
    }
}

/// PyTorch's `lerp(start, end, w)` for `f32`, as its scalar CPU kernel
/// writes it.
fn lerp(start: f32, end: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        start + w * (end - start)
    } else {
        end - (end - start) * (1.0 - w)
    }
}

/// `torch.optim._single_tensor_adam` (amsgrad, maximize off) for one
/// parameter, element by element in `f32`:
///
/// ```text
/// step += 1
/// [AdamW]  p *= f32(1 − lr·wd)
/// [Adam]   g = g + f32(wd)·p
/// m = lerp(m, g, f32(1 − β1))                       (exp_avg.lerp_)
/// v = v·f32(β2) + f32(1 − β2)·g·g                   (mul_, addcmul_)
/// denom = sqrt(v) / f32(sqrt(1 − β2^step)) + f32(eps)
/// p = p + f32(−lr / (1 − β1^step))·m / denom       (addcdiv_)
/// ```
///
/// with the bias corrections in `f64` (`powf`, as Python's `**`).
fn adam_update(
    p: &mut [f32],
    g: &[f32],
    state: &mut ParamState,
    lr: f64,
    c: &AdamConfig,
    wd: f64,
    decoupled: bool,
) {
    let n = p.len();
    let m = state.exp_avg.get_or_insert_with(|| vec![0.0; n]);
    let v = state.exp_avg_sq.get_or_insert_with(|| vec![0.0; n]);
    state.step += 1;
    let t = state.step as f64;
    let (beta1, beta2) = c.betas;

    if decoupled && wd != 0.0 {
        let f = (1.0 - lr * wd) as f32;
        for x in p.iter_mut() {
            *x *= f;
        }
    }
    let l2 = if !decoupled && wd != 0.0 {
        Some(wd as f32)
    } else {
        None
    };
    let bias_correction1 = 1.0 - beta1.powf(t);
    let bias_correction2 = 1.0 - beta2.powf(t);
    let neg_step_size = (-(lr / bias_correction1)) as f32;
    let bc2_sqrt = bias_correction2.powf(0.5) as f32;
    let w1 = (1.0 - beta1) as f32;
    let b2 = beta2 as f32;
    let c2 = (1.0 - beta2) as f32;
    let eps = c.eps as f32;

    for i in 0..n {
        let gi = match l2 {
            Some(wd) => g[i] + wd * p[i],
            None => g[i],
        };
        m[i] = lerp(m[i], gi, w1);
        v[i] *= b2;
        v[i] += c2 * gi * gi;
        let denom = v[i].sqrt() / bc2_sqrt + eps;
        p[i] += neg_step_size * m[i] / denom;
    }
}

/// `torch.optim._single_tensor_sgd` (maximize off) for one parameter, in
/// `f32`:
///
/// ```text
/// g = g + f32(wd)·p
/// buf = g (first step) | buf·f32(μ) + f32(1 − d)·g
/// g = g + f32(μ)·buf (Nesterov) | buf
/// p = p + f32(−lr)·g
/// ```
fn sgd_update(p: &mut [f32], g: &[f32], state: &mut ParamState, lr: f64, c: &SgdConfig, wd: f64) {
    let n = p.len();
    state.step += 1;
    let wd = wd as f32;
    let mu = c.momentum as f32;
    let keep = (1.0 - c.dampening) as f32;
    let neg_lr = (-lr) as f32;
    let first = state.momentum_buffer.is_none();
    let buf = if c.momentum != 0.0 {
        Some(state.momentum_buffer.get_or_insert_with(|| vec![0.0; n]))
    } else {
        None
    };
    match buf {
        None => {
            for i in 0..n {
                let gi = if wd != 0.0 { g[i] + wd * p[i] } else { g[i] };
                p[i] += neg_lr * gi;
            }
        }
        Some(buf) => {
            for i in 0..n {
                let gi = if wd != 0.0 { g[i] + wd * p[i] } else { g[i] };
                if first {
                    buf[i] = gi;
                } else {
                    buf[i] *= mu;
                    buf[i] += keep * gi;
                }
                let d = if c.nesterov { gi + mu * buf[i] } else { buf[i] };
                p[i] += neg_lr * d;
            }
        }
    }
}

/// The global 2-norm of all gradients, `sqrt(Σ_k Σ_i g_ki²)`: squares summed
/// in `f64`, sequentially, tensor by tensor and within each in index order.
pub fn grad_norm(grads: &[&[f32]]) -> f64 {
    let mut acc = 0.0f64;
    for g in grads {
        for &v in g.iter() {
            let v = v as f64;
            acc += v * v;
        }
    }
    acc.sqrt()
}

/// Clips gradients by their global norm, as `torch.nn.utils.clip_grad_norm_`:
/// `total = `[`grad_norm`]`(grads)`, `scale = max_norm / (total + 1e-6)`,
/// and every gradient is multiplied by `f32(scale)` when `scale < 1`
/// (otherwise left bit-for-bit unchanged). Returns `total` (before
/// clipping).
///
/// Unlike PyTorch's default (`error_if_nonfinite=False`, which would fill
/// the gradients with NaN), a NaN or infinite total is an error and the
/// gradients are left untouched. Pass only the gradients of trained
/// parameters.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f64) -> Result<f64> {
    check_nonneg("clip_grad_norm: max_norm", max_norm)?;
    let views: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
    let total = grad_norm(&views);
    if !total.is_finite() {
        return Err(Error::invalid(format!(
            "clip_grad_norm: the total gradient norm is {total}"
        )));
    }
    let scale = max_norm / (total + 1e-6);
    if scale < 1.0 {
        let s = scale as f32;
        for g in grads.iter_mut() {
            for v in g.iter_mut() {
                *v *= s;
            }
        }
    }
    Ok(total)
}
