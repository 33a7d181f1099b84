//! BatchNorm: inference with running statistics, plain and fused with the
//! ReLU that follows it; training mode (batch statistics, running statistics
//! updated) and its backward. Kernels: `kernels/norm.cu`; CPU reference:
//! `crate::cpu::norm`.

use super::{conv_grad_chunks, expect_shape, i64_arg, on_device, plane_cfg, stride_cfg};
use crate::backend::{Backend, KernelArg, LaunchCfg};
use crate::cpu;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// `(n, c, hw)` of a BatchNorm input `[n, c, ...]` after checking the
/// per-channel vectors are `[c]`.
fn bn_dims(
    op: &'static str,
    x: &Tensor,
    per_channel: &[(&str, &Tensor)],
) -> Result<(usize, usize, usize)> {
    let (n, c, rest) = match x.shape() {
        [n, c, rest @ ..] => (*n, *c, rest),
        s => {
            return Err(Error::shape(
                op,
                format!("input must be [n, c, ...], got shape {s:?}"),
            ))
        }
    };
    for &(name, t) in per_channel {
        if t.shape() != [c] {
            return Err(Error::shape(
                op,
                format!(
                    "{name} has shape {:?}, expected [{c}] for input {:?}",
                    t.shape(),
                    x.shape()
                ),
            ));
        }
    }
    Ok((n, c, rest.iter().product()))
}

/// BatchNorm inference with running statistics, optionally followed by ReLU.
#[allow(clippy::too_many_arguments)]
fn batchnorm_impl(
    op: &'static str,
    relu: bool,
    be: &Backend,
    x: &Tensor,
    [gamma, beta, mean, var]: [&Tensor; 4],
    eps: f32,
    y: &mut Tensor,
) -> Result<()> {
    on_device(op, be, &[x, gamma, beta, mean, var, y])?;
    let (n, c, hw) = bn_dims(
        op,
        x,
        &[
            ("gamma", gamma),
            ("beta", beta),
            ("mean", mean),
            ("var", var),
        ],
    )?;
    expect_shape(op, "output", y, x.shape())?;
    if be.device() == Device::Cpu {
        let out = y.host_mut_for(op)?;
        cpu::batchnorm_forward(
            n,
            c,
            hw,
            x.host_for(op)?,
            gamma.host_for(op)?,
            beta.host_for(op)?,
            mean.host_for(op)?,
            var.host_for(op)?,
            eps,
            out,
        )?;
        if relu {
            // ReLU in place: each value is read before it is overwritten.
            out.iter_mut().filter(|v| **v < 0.0).for_each(|v| *v = 0.0);
        }
        return Ok(());
    }
    if x.numel() == 0 {
        return Ok(());
    }
    let planes = n * c;
    let args = [
        x.arg(),
        gamma.arg(),
        beta.arg(),
        mean.arg(),
        var.arg(),
        KernelArg::F32(eps),
        y.arg_mut(),
        KernelArg::int("channels", c)?,
        i64_arg("plane size", hw)?,
        i64_arg("planes", planes)?,
    ];
    let name = if relu {
        "batchnorm_relu_f32"
    } else {
        "batchnorm_f32"
    };
    // SAFETY: x and y hold n·c·hw f32 and gamma, beta, mean, var hold c f32
    // each, all on be's device (checked above) and outliving the launch; the
    // kernel's parameters are (const float* x, gamma, beta, mean, var, float
    // eps, float* y, int c, long long hw, long long planes) and it touches
    // planes p < n·c, in-plane indices < hw and channels p % c only.
    unsafe { be.launch(name, plane_cfg(hw, planes), &args) }
}

/// BatchNorm inference: `y = (x − mean) / √(var + eps) · gamma + beta` per
/// channel. Shapes: `x` `[n, c, ...]` (NCHW or `[n, c]`), `gamma`, `beta`,
/// `mean`, `var` `[c]`.
pub fn batchnorm(
    be: &Backend,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let mut y = Tensor::zeros(be, x.shape())?;
    batchnorm_into(be, x, gamma, beta, mean, var, eps, &mut y)?;
    Ok(y)
}

/// [`batchnorm`] into a preallocated `y` of `x`'s shape.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_into(
    be: &Backend,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
    y: &mut Tensor,
) -> Result<()> {
    batchnorm_impl("batchnorm", false, be, x, [gamma, beta, mean, var], eps, y)
}

/// [`batchnorm`] followed by ReLU in one pass (DenseNet's BN → ReLU).
pub fn batchnorm_relu(
    be: &Backend,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let mut y = Tensor::zeros(be, x.shape())?;
    batchnorm_relu_into(be, x, gamma, beta, mean, var, eps, &mut y)?;
    Ok(y)
}

/// [`batchnorm_relu`] into a preallocated `y` of `x`'s shape.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_relu_into(
    be: &Backend,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
    y: &mut Tensor,
) -> Result<()> {
    batchnorm_impl(
        "batchnorm_relu",
        true,
        be,
        x,
        [gamma, beta, mean, var],
        eps,
        y,
    )
}

/// Threads per block of the per-channel partial-sum kernels (`kStatThreads`).
const STAT_THREADS: u32 = 256;

/// The deterministic split of one channel's `m = n·hw` values for the
/// training-mode sums: `(chunk_len, parts)`, a function of `m` alone (never
/// of the GPU or of how `m` factors into batch and plane), the rule of
/// [`conv_grad_chunks`]: at most 16 chunks of at least 256 values.
pub fn batchnorm_chunks(m: usize) -> (usize, usize) {
    conv_grad_chunks(m)
}

/// What [`batchnorm_train`] returns: the output and the batch statistics
/// its backward needs.
#[derive(Debug)]
pub struct BatchNormTrain {
    /// The normalized output, `x`'s shape.
    pub y: Tensor,
    /// Batch mean per channel `[c]`.
    pub save_mean: Tensor,
    /// `1/√(σ² + eps)` per channel `[c]`, σ² the biased batch variance.
    pub save_inv_std: Tensor,
}

/// Gradients of [`batchnorm_train`].
#[derive(Debug)]
pub struct BatchNormGrads {
    /// Input gradient, `x`'s shape.
    pub dx: Tensor,
    /// Gradient of `gamma` `[c]`.
    pub dgamma: Tensor,
    /// Gradient of `beta` `[c]`.
    pub dbeta: Tensor,
}

/// Launches one per-channel partial-sum kernel over grid `(c, parts)`,
/// block [`STAT_THREADS`].
///
/// # Safety
///
/// `args` must match `name`'s parameter list, and every buffer they point
/// to must live on `be`'s device, be as long as the kernel reads or writes
/// for that grid, and outlive the call.
unsafe fn launch_partial(
    be: &Backend,
    name: &str,
    c: usize,
    parts: usize,
    args: &[KernelArg],
) -> Result<()> {
    let cfg = LaunchCfg {
        grid: (
            u32::try_from(c)
                .map_err(|_| Error::invalid(format!("{c} channels exceed the grid")))?,
            parts as u32,
            1,
        ),
        block: (STAT_THREADS, 1, 1),
        shared_bytes: 0,
    };
    // SAFETY: the caller's contract (this function's # Safety).
    unsafe { be.launch(name, cfg, args) }
}

/// BatchNorm2d in training mode, as `torch.nn.BatchNorm2d.train()` runs it:
/// batch mean `μ` and biased variance `σ²` per channel over `n` and the
/// spatial positions, `y = (x − μ)/√(σ² + eps)·gamma + beta`, and the
/// running statistics moved by `momentum` towards `μ` and the *unbiased*
/// variance (left alone when a channel has one value). The caller counts
/// `num_batches_tracked`. Shapes: `x` `[n, c, ...]`, `gamma`, `beta`,
/// `running_mean`, `running_var` `[c]`; an empty batch is an error.
///
/// On CUDA and emulated devices the sums are f64, as in the CPU reference
/// ([`cpu::batchnorm_train_forward`]), in the chunks of [`batchnorm_chunks`]
/// reduced in a fixed order (no atomics): the same bits on every run and GPU.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train(
    be: &Backend,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &mut Tensor,
    running_var: &mut Tensor,
    eps: f32,
    momentum: f32,
) -> Result<BatchNormTrain> {
    let c = match x.shape() {
        [_, c, ..] => *c,
        s => {
            return Err(Error::shape(
                "batchnorm_train",
                format!("input must be [n, c, ...], got shape {s:?}"),
            ))
        }
    };
    let mut out = BatchNormTrain {
        y: Tensor::zeros(be, x.shape())?,
        save_mean: Tensor::zeros(be, &[c])?,
        save_inv_std: Tensor::zeros(be, &[c])?,
    };
    batchnorm_train_into(
        be,
        x,
        gamma,
        beta,
        eps,
        momentum,
        running_mean,
        running_var,
        &mut out.save_mean,
        &mut out.save_inv_std,
        &mut out.y,
    )?;
    Ok(out)
}

/// [`batchnorm_train`] into preallocated `save_mean`, `save_inv_std` `[c]`
/// and `y` (`x`'s shape); `running_mean` and `running_var` are updated in
/// place.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_into(
    be: &Backend,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    momentum: f32,
    running_mean: &mut Tensor,
    running_var: &mut Tensor,
    save_mean: &mut Tensor,
    save_inv_std: &mut Tensor,
    y: &mut Tensor,
) -> Result<()> {
    const OP: &str = "batchnorm_train";
    on_device(
        OP,
        be,
        &[
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            save_mean,
            save_inv_std,
            y,
        ],
    )?;
    let (n, c, hw) = bn_dims(
        OP,
        x,
        &[
            ("gamma", gamma),
            ("beta", beta),
            ("running_mean", running_mean),
            ("running_var", running_var),
            ("save_mean", save_mean),
            ("save_inv_std", save_inv_std),
        ],
    )?;
    expect_shape(OP, "output", y, x.shape())?;
    if be.device() == Device::Cpu {
        return cpu::batchnorm_train_forward(
            n,
            c,
            hw,
            x.host_for(OP)?,
            gamma.host_for(OP)?,
            beta.host_for(OP)?,
            eps,
            momentum,
            running_mean.host_mut_for(OP)?,
            running_var.host_mut_for(OP)?,
            save_mean.host_mut_for(OP)?,
            save_inv_std.host_mut_for(OP)?,
            y.host_mut_for(OP)?,
        );
    }
    let m = n * hw;
    if m == 0 {
        return Err(Error::shape(
            OP,
            "training-mode batch norm needs at least one value per channel",
        ));
    }
    if c == 0 {
        return Ok(());
    }
    let (chunk_len, parts) = batchnorm_chunks(m);
    let mut part = Tensor::<f64>::zeros(be, &[parts * c])?;
    let mut mean64 = Tensor::<f64>::zeros(be, &[c])?;
    let (c_arg, hw_arg) = (KernelArg::int("channels", c)?, i64_arg("plane size", hw)?);
    let (m_arg, chunk_arg) = (i64_arg("batch values", m)?, i64_arg("chunk", chunk_len)?);
    let parts_arg = KernelArg::int("chunks", parts)?;
    // SAFETY: batchnorm_sum_partial_f32(const float* x, double* part, int c,
    // long long hw, long long m, long long chunk_len): block (ch, s) reads x
    // at (b·c + ch)·hw + i for b·hw + i < m and writes part[s·c + ch],
    // s < parts = ⌈m / chunk_len⌉; x holds n·c·hw f32 on be's device
    // (checked above) and part parts·c f64, both alive past the launch.
    unsafe {
        launch_partial(
            be,
            "batchnorm_sum_partial_f32",
            c,
            parts,
            &[x.arg(), part.arg_mut(), c_arg, hw_arg, m_arg, chunk_arg],
        )?
    };
    let args = [part.arg(), mean64.arg_mut(), parts_arg, c_arg, m_arg];
    // SAFETY: part holds parts·c and mean64 c f64 on be's device, alive until
    // the end of this function; batchnorm_mean_f64(const double* part,
    // double* mean64, int parts, int c, long long m) reads part[s·c + ch]
    // and writes mean64[ch], ch < c.
    unsafe { be.launch("batchnorm_mean_f64", stride_cfg(c), &args)? };
    // SAFETY: batchnorm_sqdev_partial_f32(const float* x, const double*
    // mean64, double* part, int c, long long hw, long long m, long long
    // chunk_len): the sum kernel's reads and writes (same buffers), plus
    // mean64[ch], ch < c.
    unsafe {
        launch_partial(
            be,
            "batchnorm_sqdev_partial_f32",
            c,
            parts,
            &[
                x.arg(),
                mean64.arg(),
                part.arg_mut(),
                c_arg,
                hw_arg,
                m_arg,
                chunk_arg,
            ],
        )?
    };
    let args = [
        part.arg(),
        mean64.arg(),
        parts_arg,
        c_arg,
        m_arg,
        KernelArg::F32(eps),
        KernelArg::F32(momentum),
        running_mean.arg_mut(),
        running_var.arg_mut(),
        save_mean.arg_mut(),
        save_inv_std.arg_mut(),
    ];
    // SAFETY: as above for part and mean64; running_mean, running_var,
    // save_mean and save_inv_std hold c f32 each on be's device (checked
    // above). batchnorm_train_stats_f32(const double* part, const double*
    // mean64, int parts, int c, long long m, float eps, float momentum,
    // float* running_mean, float* running_var, float* save_mean, float*
    // save_inv_std) touches channel ch < c of each.
    unsafe { be.launch("batchnorm_train_stats_f32", stride_cfg(c), &args)? };
    let args = [
        x.arg(),
        gamma.arg(),
        beta.arg(),
        save_mean.arg(),
        save_inv_std.arg(),
        y.arg_mut(),
        c_arg,
        hw_arg,
        i64_arg("planes", n * c)?,
    ];
    // SAFETY: x and y hold n·c·hw f32, gamma, beta, save_mean, save_inv_std
    // c f32, all on be's device (checked above) and outliving the launch;
    // batchnorm_train_apply_f32(const float* x, gamma, beta, save_mean,
    // save_inv_std, float* y, int c, long long hw, long long planes) touches
    // planes p < n·c, in-plane indices < hw and channels p % c only.
    unsafe { be.launch("batchnorm_train_apply_f32", plane_cfg(hw, n * c), &args) }
}

/// Backward of [`batchnorm_train`] through the batch statistics, from the
/// forward input `x`, `gamma` and the forward's `save_mean`,
/// `save_inv_std`: with `x̂ = (x − μ)·inv_std` and sums over `n` and the
/// spatial positions (`m` values per channel), `dbeta = Σ dy`,
/// `dgamma = Σ dy·x̂`, `dx = gamma·inv_std/m · (m·dy − dbeta − x̂·dgamma)`.
/// On CUDA and emulated devices the sums are f64 in the chunks of
/// [`batchnorm_chunks`] reduced in a fixed order (deterministic, no
/// atomics); `dx` is computed in f64 from the f32 `dbeta`, `dgamma`, as in
/// [`cpu::batchnorm_train_backward`].
pub fn batchnorm_train_backward(
    be: &Backend,
    x: &Tensor,
    gamma: &Tensor,
    save_mean: &Tensor,
    save_inv_std: &Tensor,
    dy: &Tensor,
) -> Result<BatchNormGrads> {
    let c = gamma.shape().first().copied().unwrap_or(0);
    let mut g = BatchNormGrads {
        dx: Tensor::zeros(be, x.shape())?,
        dgamma: Tensor::zeros(be, &[c])?,
        dbeta: Tensor::zeros(be, &[c])?,
    };
    batchnorm_train_backward_into(
        be,
        x,
        gamma,
        save_mean,
        save_inv_std,
        dy,
        &mut g.dx,
        &mut g.dgamma,
        &mut g.dbeta,
    )?;
    Ok(g)
}

/// [`batchnorm_train_backward`] into preallocated `dx` (`x`'s shape),
/// `dgamma` and `dbeta` `[c]`, all overwritten.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_backward_into(
    be: &Backend,
    x: &Tensor,
    gamma: &Tensor,
    save_mean: &Tensor,
    save_inv_std: &Tensor,
    dy: &Tensor,
    dx: &mut Tensor,
    dgamma: &mut Tensor,
    dbeta: &mut Tensor,
) -> Result<()> {
    const OP: &str = "batchnorm_train_backward";
    on_device(
        OP,
        be,
        &[x, gamma, save_mean, save_inv_std, dy, dx, dgamma, dbeta],
    )?;
    let (n, c, hw) = bn_dims(
        OP,
        x,
        &[
            ("gamma", gamma),
            ("save_mean", save_mean),
            ("save_inv_std", save_inv_std),
            ("dgamma", dgamma),
            ("dbeta", dbeta),
        ],
    )?;
    expect_shape(OP, "dy", dy, x.shape())?;
    expect_shape(OP, "dx", dx, x.shape())?;
    if be.device() == Device::Cpu {
        return cpu::batchnorm_train_backward(
            n,
            c,
            hw,
            x.host_for(OP)?,
            gamma.host_for(OP)?,
            save_mean.host_for(OP)?,
            save_inv_std.host_for(OP)?,
            dy.host_for(OP)?,
            dx.host_mut_for(OP)?,
            dgamma.host_mut_for(OP)?,
            dbeta.host_mut_for(OP)?,
        );
    }
    let m = n * hw;
    if c == 0 {
        return Ok(());
    }
    let (chunk_len, parts) = batchnorm_chunks(m);
    let parts_arg = KernelArg::int("chunks", parts)?;
    let c_arg = KernelArg::int("channels", c)?;
    // Two partial blocks: Σ dy, then Σ dy·x̂ (at least one f64 each, so the
    // reduce kernel always has a valid pointer, also for an empty batch).
    let mut part = Tensor::<f64>::zeros(be, &[2 * parts.max(1) * c])?;
    if parts > 0 {
        let args = [
            x.arg(),
            dy.arg(),
            save_mean.arg(),
            save_inv_std.arg(),
            part.arg_mut(),
            c_arg,
            i64_arg("plane size", hw)?,
            i64_arg("batch values", m)?,
            i64_arg("chunk", chunk_len)?,
        ];
        // SAFETY: batchnorm_backward_partial_f32(const float* x, const float*
        // dy, const float* save_mean, const float* save_inv_std, double*
        // part, int c, long long hw, long long m, long long chunk_len): block
        // (ch, s) reads x and dy at (b·c + ch)·hw + i for b·hw + i < m
        // (n·c·hw f32 each on be's device, checked above), save_* at ch < c,
        // and writes part[s·c + ch] and part[(parts + s)·c + ch], s < parts
        // (2·parts·c f64); all alive past the launch.
        unsafe { launch_partial(be, "batchnorm_backward_partial_f32", c, parts, &args)? };
    }
    let args = [
        part.arg(),
        parts_arg,
        c_arg,
        dgamma.arg_mut(),
        dbeta.arg_mut(),
    ];
    // SAFETY: part holds 2·parts·c f64 (alive until the end of this
    // function), dgamma and dbeta c f32 on be's device (checked above);
    // batchnorm_backward_reduce_f32(const double* part, int parts, int c,
    // float* dgamma, float* dbeta) reads part[s·c + ch] and
    // part[(parts + s)·c + ch] for s < parts and writes channel ch < c.
    unsafe { be.launch("batchnorm_backward_reduce_f32", stride_cfg(c), &args)? };
    if m == 0 {
        return Ok(());
    }
    let args = [
        x.arg(),
        dy.arg(),
        gamma.arg(),
        save_mean.arg(),
        save_inv_std.arg(),
        dgamma.arg(),
        dbeta.arg(),
        dx.arg_mut(),
        c_arg,
        i64_arg("plane size", hw)?,
        i64_arg("planes", n * c)?,
        i64_arg("batch values", m)?,
    ];
    // SAFETY: x, dy and dx hold n·c·hw f32, the five per-channel vectors c
    // f32, all on be's device (checked above) and outliving the launch;
    // batchnorm_train_dx_f32(const float* x, dy, gamma, save_mean,
    // save_inv_std, dgamma, dbeta, float* dx, int c, long long hw, long long
    // planes, long long m) touches planes p < n·c, in-plane indices < hw and
    // channels p % c only.
    unsafe { be.launch("batchnorm_train_dx_f32", plane_cfg(hw, n * c), &args) }
}
