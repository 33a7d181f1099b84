//! Convolutions: conv2d (implicit-GEMM kernel in f32 or on tensor cores, plus
//! a direct kernel as a cross-check) and transposed conv2d. Kernels:
//! `kernels/conv.cu`, `kernels/conv_tc.cu`; CPU
//! reference: `crate::cpu::conv`. Layouts are PyTorch's: x `[n, c_in, h, w]`,
//! conv weight `[c_out, c_in, kh, kw]`, transposed-conv weight
//! `[c_in, c_out, kh, kw]`, bias `[c_out]`, y `[n, c_out, oh, ow]`.

use super::{expect_shape, on_device};
use crate::backend::{Backend, KernelArg, LaunchCfg};
use crate::cpu;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::geometry::{Conv2dGeom, Conv2dParams, ConvTranspose2dGeom, ConvTranspose2dParams};
use crate::precision::Precision;
use crate::tensor::{check_device, Tensor};

/// Threads per block of the implicit-GEMM kernels (`kConvThreads`).
const GEMM_THREADS: u32 = 128;
/// Output pixels per implicit-GEMM block tile (`kConvBM`).
const GEMM_TILE_M: usize = 128;
/// Threads per block of the direct kernel.
const DIRECT_THREADS: u32 = 256;
/// Grid cap of the (grid-stride) direct kernel.
const DIRECT_MAX_BLOCKS: usize = 65535;
/// The hardware limit on `grid.x`.
const MAX_GRID_X: usize = i32::MAX as usize;
/// The hardware limit on `grid.y` and `grid.z`.
const MAX_GRID_YZ: usize = 65535;

/// Which conv2d kernel to launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Conv2dKernel {
    /// `conv2d_igemm{32,64}_f32`.
    Gemm,
    /// `conv2d_direct_f32`.
    Direct,
}

/// The sizes every kernel of `kernels/conv.cu` takes after its four
/// pointers: `n, c_in, h, w, c_out, kh, kw, sh, sw, ph, pw, oh, ow`, all
/// `int`. Also checks the kernels' 32-bit index assumptions: one image of
/// the input and of the output, and the whole weight, fit an `int`.
#[allow(clippy::too_many_arguments)]
fn size_args(
    op: &'static str,
    n: usize,
    c_in: usize,
    (h, w): (usize, usize),
    c_out: usize,
    (kh, kw): (usize, usize),
    (sh, sw): (usize, usize),
    (ph, pw): (usize, usize),
    (oh, ow): (usize, usize),
) -> Result<Vec<KernelArg>> {
    let fits = |what: &str, dims: &[usize]| -> Result<()> {
        let v = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        match v {
            Some(v) if v <= i32::MAX as usize => Ok(()),
            _ => Err(Error::invalid(format!(
                "{op}: {what} {dims:?} exceeds the kernels' 32-bit index range"
            ))),
        }
    };
    fits("input image", &[c_in, h, w])?;
    fits("output image", &[c_out, oh, ow])?;
    fits("weight", &[c_out, c_in, kh, kw])?;
    // Padded input coordinates (oy·sh − ph + ky) must not overflow either.
    fits("padded input height", &[h + 2 * ph + kh])?;
    fits("padded input width", &[w + 2 * pw + kw])?;
    [
        ("n", n),
        ("c_in", c_in),
        ("h", h),
        ("w", w),
        ("c_out", c_out),
        ("kh", kh),
        ("kw", kw),
        ("stride_h", sh),
        ("stride_w", sw),
        ("pad_h", ph),
        ("pad_w", pw),
        ("oh", oh),
        ("ow", ow),
    ]
    .into_iter()
    .map(|(what, v)| KernelArg::int(what, v))
    .collect()
}

/// The implicit-GEMM channel tile for `c_out` output channels: the 32-wide
/// kernel when a 64-wide tile would be at least half padding.
fn gemm_variant(transposed: bool, c_out: usize) -> (&'static str, usize) {
    match (transposed, c_out <= 32) {
        (false, true) => ("conv2d_igemm32_f32", 32),
        (false, false) => ("conv2d_igemm64_f32", 64),
        (true, true) => ("conv_transpose2d_igemm32_f32", 32),
        (true, false) => ("conv_transpose2d_igemm64_f32", 64),
    }
}

/// Launch geometry of the implicit GEMM: `m` output pixels (the largest
/// phase for the transposed conv), `c_out` channels in tiles of `tile_n`,
/// `phases` on `grid.z`.
fn gemm_cfg(
    op: &'static str,
    m: usize,
    c_out: usize,
    tile_n: usize,
    phases: usize,
) -> Result<LaunchCfg> {
    let gx = m.div_ceil(GEMM_TILE_M);
    let gy = c_out.div_ceil(tile_n);
    if gx > MAX_GRID_X || gy > MAX_GRID_YZ || phases > MAX_GRID_YZ {
        return Err(Error::invalid(format!(
            "{op}: {m} output pixels × {c_out} channels × {phases} phases exceed the launch grid"
        )));
    }
    Ok(LaunchCfg {
        grid: (gx.max(1) as u32, gy.max(1) as u32, phases.max(1) as u32),
        block: (GEMM_THREADS, 1, 1),
        shared_bytes: 0,
    })
}

/// Checks that `b`, if given, is `[c_out]` on `be`'s device.
pub(super) fn check_bias(
    op: &'static str,
    be: &Backend,
    b: Option<&Tensor>,
    c_out: usize,
) -> Result<()> {
    if let Some(b) = b {
        check_device(op, be, b)?;
        if b.shape() != [c_out] {
            return Err(Error::shape(
                op,
                format!("bias has shape {:?}, expected [{c_out}]", b.shape()),
            ));
        }
    }
    Ok(())
}

/// The bias pointer, or a null pointer (the kernels then add nothing).
fn bias_arg(b: Option<&Tensor>) -> KernelArg {
    b.map_or(KernelArg::Ptr(0), Tensor::arg)
}

/// Output channels below which the tensor-core kernel is not used: its
/// channel tile is at least 32 wide, so a 3-channel output layer would be
/// mostly padding; such layers stay f32.
const TC_MIN_C_OUT: usize = 8;
/// Reduction length (c_in·kh·kw) below which the tensor-core kernel is not
/// used: its K slab is 32, one MMA step is 16.
const TC_MIN_K: usize = 16;

/// Whether a conv2d of geometry `g` runs on the tensor-core kernel (operands
/// rounded to `precision`, f32 accumulation): `precision` is bf16 or f16 and
/// the layer has at least 8 output channels and a reduction of at least 16.
/// Transposed convolutions, linear layers and the direct kernel always run
/// in f32. The CPU reference rounds exactly the layers this selects, so a
/// precision gives the same model on every device.
pub fn conv2d_uses_tensor_cores(precision: Precision, g: &Conv2dGeom) -> bool {
    precision.is_reduced() && g.c_out >= TC_MIN_C_OUT && g.c_in * g.kh * g.kw >= TC_MIN_K
}

/// `v` rounded to `p` (see [`Precision::round`]), as a new buffer.
fn rounded(p: Precision, v: &[f32]) -> Vec<f32> {
    let mut r = v.to_vec();
    p.round_slice(&mut r);
    r
}

/// The tensor-core kernel for `c_out` channels, precision `p` and fused
/// `variant` (`strided`, `strided_relu`, `bnrelu`, `bnrelu_relu`,
/// `bnrelu_pool2`), with its channel tile.
fn tc_variant(p: Precision, c_out: usize, variant: &str) -> (String, usize) {
    let tile_n = if c_out <= 32 { 32 } else { 64 };
    (format!("conv2d_tc{tile_n}_{}_{variant}", p.name()), tile_n)
}

/// Launches a conv2d kernel on `g` (devices and shapes already checked).
/// Also the linear layer's kernel, as a 1×1 conv over `[n, in, 1, 1]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn launch_conv2d(
    op: &'static str,
    be: &Backend,
    g: &Conv2dGeom,
    kernel: Conv2dKernel,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    y: &mut Tensor,
) -> Result<()> {
    let total = g.n * g.c_out * g.oh * g.ow;
    if total == 0 {
        return Ok(());
    }
    let sizes = size_args(
        op,
        g.n,
        g.c_in,
        (g.h, g.w),
        g.c_out,
        (g.kh, g.kw),
        (g.stride_h, g.stride_w),
        (g.pad_h, g.pad_w),
        (g.oh, g.ow),
    )?;
    let (name, cfg) = match kernel {
        Conv2dKernel::Gemm => {
            let (name, tile_n) = gemm_variant(false, g.c_out);
            (name, gemm_cfg(op, g.n * g.oh * g.ow, g.c_out, tile_n, 1)?)
        }
        Conv2dKernel::Direct => (
            "conv2d_direct_f32",
            LaunchCfg::linear(
                total.min(DIRECT_MAX_BLOCKS * DIRECT_THREADS as usize),
                DIRECT_THREADS,
            )?,
        ),
    };
    let mut args = vec![x.arg(), w.arg(), bias_arg(b), y.arg_mut()];
    args.extend(sizes);
    // SAFETY: the caller checked that x [n, c_in, h, w], w [c_out, c_in, kh,
    // kw], b [c_out] (or null) and y [n, c_out, oh, ow] live on be's device
    // with the extents of `g`, and they outlive the launch. The conv2d
    // kernels take (const float* x, const float* w, const float* bias,
    // float* y, 13 × int) as built here, read only inside those extents
    // (bounds-checked gathers) and write y's n·c_out·oh·ow elements; size_args
    // checked that the per-image extents and the weight fit their int indices.
    unsafe { be.launch(name, cfg, &args) }
}

/// Checks a conv2d call and returns its geometry.
fn check_conv2d(
    op: &'static str,
    be: &Backend,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    p: Conv2dParams,
    y: &Tensor,
) -> Result<Conv2dGeom> {
    on_device(op, be, &[x, w, y])?;
    let g = Conv2dGeom::new(x.shape(), w.shape(), p)?;
    check_bias(op, be, b, g.c_out)?;
    expect_shape(op, "output", y, &g.out_shape())?;
    Ok(g)
}

#[allow(clippy::too_many_arguments)]
fn conv2d_with(
    op: &'static str,
    kernel: Conv2dKernel,
    be: &Backend,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    p: Conv2dParams,
    y: &mut Tensor,
) -> Result<()> {
    let g = check_conv2d(op, be, x, w, b, p, y)?;
    let tc = kernel == Conv2dKernel::Gemm && conv2d_uses_tensor_cores(be.precision(), &g);
    if be.device() == Device::Cpu {
        let b = b.map(|b| b.host_for(op)).transpose()?;
        if tc {
            let (xr, wr) = (
                rounded(be.precision(), x.host_for(op)?),
                rounded(be.precision(), w.host_for(op)?),
            );
            return cpu::conv2d_forward(&g, &xr, &wr, b, y.host_mut_for(op)?);
        }
        return cpu::conv2d_forward(&g, x.host_for(op)?, w.host_for(op)?, b, y.host_mut_for(op)?);
    }
    if tc {
        let plain = FusedConv2d {
            weight: w,
            bias: b,
            params: p,
            input_bn_relu: None,
            input_pool2: false,
            relu: false,
            input_upsample2: false,
            leaky_relu: None,
        };
        let (x_img, y_img) = (g.c_in * g.h * g.w, g.c_out * g.oh * g.ow);
        return launch_fused(
            op,
            be,
            &g,
            (g.h, g.w),
            x,
            &plain,
            y,
            (x_img, y_img),
            0,
            true,
        );
    }
    launch_conv2d(op, be, &g, kernel, x, w, b, y)
}

/// A zeroed conv2d output for `x` and `w` (shapes checked again by the `_into` form).
fn conv2d_alloc(be: &Backend, x: &Tensor, w: &Tensor, p: Conv2dParams) -> Result<Tensor> {
    let g = Conv2dGeom::new(x.shape(), w.shape(), p)?;
    Tensor::zeros(be, &g.out_shape())
}

/// 2-D convolution (cross-correlation, PyTorch's `Conv2d` with dilation 1
/// and groups 1): x `[n, c_in, h, w]`, w `[c_out, c_in, kh, kw]`, optional
/// bias `[c_out]` → `[n, c_out, oh, ow]`. On CUDA and emulated devices this
/// runs the implicit-GEMM kernel: in f32, or on tensor cores when the
/// backend's precision is bf16/f16 and [`conv2d_uses_tensor_cores`] selects
/// the layer (the CPU then computes the same rounded-operand reference).
pub fn conv2d(
    be: &Backend,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    p: Conv2dParams,
) -> Result<Tensor> {
    let mut y = conv2d_alloc(be, x, w, p)?;
    conv2d_into(be, x, w, b, p, &mut y)?;
    Ok(y)
}

/// [`conv2d`] into a preallocated `y` `[n, c_out, oh, ow]`.
pub fn conv2d_into(
    be: &Backend,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    p: Conv2dParams,
    y: &mut Tensor,
) -> Result<()> {
    conv2d_with("conv2d", Conv2dKernel::Gemm, be, x, w, b, p, y)
}

/// [`conv2d`] with the direct kernel (one thread per output): the
/// cross-check of the GEMM kernel, and an option for tiny layers. Same
/// shapes; on the CPU device it is the same reference.
pub fn conv2d_direct(
    be: &Backend,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    p: Conv2dParams,
) -> Result<Tensor> {
    let mut y = conv2d_alloc(be, x, w, p)?;
    conv2d_direct_into(be, x, w, b, p, &mut y)?;
    Ok(y)
}

/// [`conv2d_direct`] into a preallocated `y` `[n, c_out, oh, ow]`.
pub fn conv2d_direct_into(
    be: &Backend,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    p: Conv2dParams,
    y: &mut Tensor,
) -> Result<()> {
    conv2d_with("conv2d_direct", Conv2dKernel::Direct, be, x, w, b, p, y)
}

/// Transposed 2-D convolution (PyTorch's `ConvTranspose2d`, groups 1):
/// x `[n, c_in, h, w]`, w `[c_in, c_out, kh, kw]`, optional bias `[c_out]` →
/// `[n, c_out, oh, ow]` with `oh = (h − 1)·stride − 2·pad + kh + output_padding`.
pub fn conv_transpose2d(
    be: &Backend,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    p: ConvTranspose2dParams,
) -> Result<Tensor> {
    let g = ConvTranspose2dGeom::new(x.shape(), w.shape(), p)?;
    let mut y = Tensor::zeros(be, &g.out_shape())?;
    conv_transpose2d_into(be, x, w, b, p, &mut y)?;
    Ok(y)
}

/// [`conv_transpose2d`] into a preallocated `y` `[n, c_out, oh, ow]`.
pub fn conv_transpose2d_into(
    be: &Backend,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    p: ConvTranspose2dParams,
    y: &mut Tensor,
) -> Result<()> {
    const OP: &str = "conv_transpose2d";
    on_device(OP, be, &[x, w, y])?;
    let g = ConvTranspose2dGeom::new(x.shape(), w.shape(), p)?;
    check_bias(OP, be, b, g.c_out)?;
    expect_shape(OP, "output", y, &g.out_shape())?;
    if be.device() == Device::Cpu {
        let b = b.map(|b| b.host_for(OP)).transpose()?;
        return cpu::conv_transpose2d_forward(
            &g,
            x.host_for(OP)?,
            w.host_for(OP)?,
            b,
            y.host_mut_for(OP)?,
        );
    }
    if y.numel() == 0 {
        return Ok(());
    }
    let sizes = size_args(
        OP,
        g.n,
        g.c_in,
        (g.h, g.w),
        g.c_out,
        (g.kh, g.kw),
        (g.stride_h, g.stride_w),
        (g.pad_h, g.pad_w),
        (g.oh, g.ow),
    )?;
    // Outputs of the largest phase: every phase has ⌈oh/sh⌉ × ⌈ow/sw⌉ or fewer.
    let phase_m = g.n * g.oh.div_ceil(g.stride_h) * g.ow.div_ceil(g.stride_w);
    let (name, tile_n) = gemm_variant(true, g.c_out);
    let cfg = gemm_cfg(OP, phase_m, g.c_out, tile_n, g.stride_h * g.stride_w)?;
    let mut args = vec![x.arg(), w.arg(), bias_arg(b), y.arg_mut()];
    args.extend(sizes);
    // SAFETY: checked above: x [n, c_in, h, w], w [c_in, c_out, kh, kw], b
    // [c_out] (or null) and y [n, c_out, oh, ow] live on be's device with the
    // extents of `g` and outlive the launch. The transposed-conv kernels take
    // (const float*, const float*, const float*, float*, 13 × int) as built
    // here; every read is bounds-checked against those extents and each
    // output element is written once by the block of its phase.
    unsafe { be.launch(name, cfg, &args) }
}

/// An inference BatchNorm followed by ReLU, as per-channel `scale` and
/// `shift` (`scale = γ/√(var + eps)`, `shift = β − mean·scale`):
/// `max(x·scale + shift, 0)`, NaN passing through.
#[derive(Clone, Copy, Debug)]
pub struct BnRelu<'a> {
    /// Per-channel factor `[c]`.
    pub scale: &'a Tensor,
    /// Per-channel offset `[c]`.
    pub shift: &'a Tensor,
}

/// A conv2d with the fusions of a densely connected network (see
/// [`conv2d_fused_into`]).
#[derive(Clone, Copy, Debug)]
pub struct FusedConv2d<'a> {
    /// Weight `[c_out, c_in, kh, kw]`: the conv reads input channels `[0, c_in)`.
    pub weight: &'a Tensor,
    /// Optional bias `[c_out]` (a BatchNorm folded into the conv puts its shift here).
    pub bias: Option<&'a Tensor>,
    /// Stride and zero padding.
    pub params: Conv2dParams,
    /// BatchNorm + ReLU applied to every input value as it is read, with
    /// `[c_in]` scale and shift; the zero padding is not transformed (it pads
    /// the activated input, as in PyTorch).
    pub input_bn_relu: Option<BnRelu<'a>>,
    /// Average-pool the (activated) input over 2×2 windows, stride 2, floor
    /// mode, before the conv: a DenseNet transition, pooling first since it
    /// commutes with a 1×1 conv (a quarter of the multiply-adds). Needs a
    /// 1×1 weight, stride 1, no padding, and `input_bn_relu`; the output is
    /// `⌊h/2⌋ × ⌊w/2⌋`.
    pub input_pool2: bool,
    /// ReLU on the output, after the bias.
    pub relu: bool,
    /// Read the input through a nearest-neighbour 2× upsampling: the conv
    /// runs over a `2h × 2w` plane whose value at `(iy, ix)` is the input's
    /// `(iy/2, ix/2)`, without the upsampled tensor ever being written (the
    /// CP2Image generator's `upsample → conv`). Not with `input_bn_relu` or
    /// `input_pool2`.
    pub input_upsample2: bool,
    /// LeakyReLU on the output with this negative slope, after the bias
    /// (`v < 0 ? v·slope : v`, NaN passing through). Not with `relu`.
    pub leaky_relu: Option<f32>,
}

/// Fused conv2d over channel slices of wider buffers:
/// `y[:, off..off + c_out] = act(conv(up2?(pool2?(bn_relu?(x[:, ..c_in]))), w) + b)`
/// (`act`: none, ReLU or LeakyReLU) for
/// `x` `[n, c_x, h, w]` with `c_x ≥ c_in` and `y` `[n, c_y, oh, ow]` with
/// `c_y ≥ off + c_out`; the other channels of `y` are left alone. This is how
/// a dense layer reads the channels written so far in its block's buffer and
/// appends its own without a concatenation copy. On CUDA and emulated
/// devices one implicit-GEMM kernel does it all; on the CPU it is the
/// reference conv applied image by image to the (contiguous) slices.
pub fn conv2d_fused_into(
    be: &Backend,
    x: &Tensor,
    conv: &FusedConv2d,
    y: &mut Tensor,
    y_channel_offset: usize,
) -> Result<()> {
    const OP: &str = "conv2d_fused";
    on_device(OP, be, &[x, conv.weight, y])?;
    let (xs, ws) = (x.shape(), conv.weight.shape());
    let (&[n, c_x, h, w], &[c_out, c_in, _, _]) = (xs, ws) else {
        return Err(Error::shape(
            OP,
            format!("input must be [n, c, h, w] and weight [c_out, c_in, kh, kw], got input {xs:?} and weight {ws:?}"),
        ));
    };
    if c_in > c_x {
        return Err(Error::shape(
            OP,
            format!("weight {ws:?} reads {c_in} channels but input {xs:?} has only {c_x}"),
        ));
    }
    if conv.input_pool2
        && (ws[2..] != [1, 1]
            || conv.params != Conv2dParams::new(1, 0)
            || conv.input_bn_relu.is_none()
            || h < 2
            || w < 2)
    {
        return Err(Error::shape(
            OP,
            format!(
                "2×2 input pooling needs a 1×1 weight (got {ws:?}), stride 1 and no padding (got {:?}), a BatchNorm+ReLU prologue and an input of at least 2×2 (got {xs:?})",
                conv.params
            ),
        ));
    }
    if let Some(slope) = conv.leaky_relu.filter(|s| !s.is_finite()) {
        return Err(Error::invalid(format!(
            "{OP}: the LeakyReLU slope must be finite, got {slope}"
        )));
    }
    fusion_variant(OP, conv)?;
    // The conv's own input: the pooled or upsampled one.
    let (ch, cw) = if conv.input_pool2 {
        (h / 2, w / 2)
    } else if conv.input_upsample2 {
        (2 * h, 2 * w)
    } else {
        (h, w)
    };
    let g = Conv2dGeom::new(&[n, c_in, ch, cw], ws, conv.params)?;
    check_bias(OP, be, conv.bias, c_out)?;
    if let Some(bn) = conv.input_bn_relu {
        for (what, t) in [("input scale", bn.scale), ("input shift", bn.shift)] {
            check_device(OP, be, t)?;
            if t.shape() != [c_in] {
                return Err(Error::shape(
                    OP,
                    format!("{what} has shape {:?}, expected [{c_in}]", t.shape()),
                ));
            }
        }
    }
    let ys = y.shape().to_vec();
    let c_y = match ys.as_slice() {
        &[yn, c_y, oh, ow] if yn == n && oh == g.oh && ow == g.ow => c_y,
        _ => {
            return Err(Error::shape(
                OP,
                format!(
                    "output has shape {ys:?}, expected [{n}, c, {}, {}]",
                    g.oh, g.ow
                ),
            ))
        }
    };
    if y_channel_offset
        .checked_add(c_out)
        .is_none_or(|end| end > c_y)
    {
        return Err(Error::shape(
            OP,
            format!(
                "{c_out} output channels at offset {y_channel_offset} do not fit output {ys:?}"
            ),
        ));
    }
    let (x_img, y_img, out_plane) = (c_x * h * w, c_y * g.oh * g.ow, g.oh * g.ow);
    let tc = conv2d_uses_tensor_cores(be.precision(), &g);
    if be.device() == Device::Cpu {
        let round = if tc { be.precision() } else { Precision::F32 };
        return conv2d_fused_cpu(
            &g,
            (h, w),
            x,
            conv,
            y,
            (x_img, y_img),
            y_channel_offset * out_plane,
            round,
        );
    }
    launch_fused(
        OP,
        be,
        &g,
        (h, w),
        x,
        conv,
        y,
        (x_img, y_img),
        y_channel_offset,
        tc,
    )
}

/// The kernel-name part of `conv`'s fusions (`strided`, `bnrelu_pool2`, …),
/// or an error for a combination no kernel implements (checked on every
/// device, so the CPU reference accepts exactly what the kernels do).
fn fusion_variant(op: &str, conv: &FusedConv2d) -> Result<&'static str> {
    Ok(match (
    conv.input_bn_relu.is_some(),
    conv.input_pool2,
    conv.input_upsample2,
    conv.relu,
    conv.leaky_relu.is_some(),
) {
    (false, false, false, false, false) => "strided",
    (false, false, false, true, false) => "strided_relu",
    (false, false, false, false, true) => "strided_leaky",
    (false, false, true, false, false) => "up2",
    (false, false, true, false, true) => "up2_leaky",
    (true, false, false, false, false) => "bnrelu",
    (true, false, false, true, false) => "bnrelu_relu",
    (true, true, false, false, false) => "bnrelu_pool2",
    _ => {
        return Err(Error::invalid(format!(
            "{op}: no kernel for this combination of fusions (BatchNorm+ReLU prologue {}, 2×2 pooling {}, 2× upsampling {}, ReLU {}, LeakyReLU {})",
            conv.input_bn_relu.is_some(),
            conv.input_pool2,
            conv.input_upsample2,
            conv.relu,
            conv.leaky_relu.is_some()
        )))
    }
})
}

/// Launches a fused conv2d kernel (f32 implicit GEMM, or the tensor-core one
/// when `tc`) for [`conv2d_fused_into`] (and the tensor-core plain conv2d):
/// `g` is the conv's own geometry (over the pooled input when pooling),
/// `(h, w)` the input buffer's plane, `x_img`/`y_img` the floats per image
/// of the two buffers. Devices and shapes were checked by the caller.
#[allow(clippy::too_many_arguments)]
fn launch_fused(
    op: &'static str,
    be: &Backend,
    g: &Conv2dGeom,
    (h, w): (usize, usize),
    x: &Tensor,
    conv: &FusedConv2d,
    y: &mut Tensor,
    (x_img, y_img): (usize, usize),
    y_channel_offset: usize,
    tc: bool,
) -> Result<()> {
    let (n, c_out, out_plane) = (g.n, g.c_out, g.oh * g.ow);
    if n * c_out * out_plane == 0 {
        return Ok(());
    }
    let mut args = vec![
        x.arg(),
        conv.weight.arg(),
        bias_arg(conv.bias),
        y.arg_mut(),
        conv.input_bn_relu
            .map_or(KernelArg::Ptr(0), |b| b.scale.arg()),
        conv.input_bn_relu
            .map_or(KernelArg::Ptr(0), |b| b.shift.arg()),
    ];
    // Pooling runs as a 1×1 stride-2 conv over the full input whose gather
    // averages each 2×2 window (see kernels/conv.cu).
    let (in_hw, stride) = if conv.input_pool2 {
        ((h, w), (2, 2))
    } else {
        ((g.h, g.w), (g.stride_h, g.stride_w))
    };
    args.extend(size_args(
        op,
        g.n,
        g.c_in,
        in_hw,
        g.c_out,
        (g.kh, g.kw),
        stride,
        (g.pad_h, g.pad_w),
        (g.oh, g.ow),
    )?);
    // Whole images of both buffers keep the kernel's int index assumption.
    KernelArg::int("input image (all channels)", x_img)?;
    KernelArg::int("output image (all channels)", y_img)?;
    args.extend([
        KernelArg::I64(x_img as i64),
        KernelArg::I64(y_img as i64),
        KernelArg::int("output channel offset", y_channel_offset)?,
        KernelArg::F32(conv.leaky_relu.unwrap_or(0.0)),
    ]);
    let variant = fusion_variant(op, conv)?;
    let (name, tile_n) = if tc {
        tc_variant(be.precision(), c_out, variant)
    } else {
        // The 32-wide channel tile when a 64-wide one would be at least half padding.
        let tile_n = if c_out <= 32 { 32 } else { 64 };
        (format!("conv2d_igemm{tile_n}_{variant}_f32"), tile_n)
    };
    let cfg = gemm_cfg(op, g.n * out_plane, c_out, tile_n, 1)?;
    // SAFETY: checked by the caller: x [n, c_x, h, w], w [c_out, c_in, kh, kw], bias
    // [c_out] or null, scale/shift [c_in] or null (only the bnrelu variants
    // read them, and they get both) and y [n, c_y, oh, ow] live on be's device
    // and outlive the launch. The kernel (f32 or tensor-core: the same
    // arguments and access pattern) takes (const float* x, w, bias,
    // float* y, const float* scale, shift, 13 × int, long long x_bstride,
    // long long y_bstride, int y_coff, float out_slope) as built here; it
    // reads channels < c_in ≤ c_x of each x image (stride c_x·h·w) inside the
    // image (the pooling variant reads rows/columns < 2·⌊h/2⌋, 2·⌊w/2⌋; the
    // upsampling variant, given the 2h × 2w plane, reads rows/columns
    // (2h − 1)/2 < h, (2w − 1)/2 < w), and writes channels
    // [y_coff, y_coff + c_out) ⊆ [0, c_y) of each y image (stride c_y·oh·ow);
    // per-image extents fit an int (checked).
    unsafe { be.launch(&name, cfg, &args) }
}

/// The CPU path of [`conv2d_fused_into`]: the prologue (BatchNorm+ReLU,
/// 2×2 pooling or 2× upsampling, rounding to the precision) into scratch
/// buffers, the reference conv, then the output activation. Dense buffers
/// (the input is exactly `c_in` channels, the output exactly `c_out` at
/// offset 0) go through in one batch; channel slices of wider buffers
/// (DenseNet's blocks) image by image, each image's input channels being a
/// contiguous prefix and its output channels a contiguous range.
#[allow(clippy::too_many_arguments)]
fn conv2d_fused_cpu(
    g: &Conv2dGeom,
    (h, w): (usize, usize),
    x: &Tensor,
    conv: &FusedConv2d,
    y: &mut Tensor,
    (x_img, y_img): (usize, usize),
    y_off: usize,
    round: Precision,
) -> Result<()> {
    const OP: &str = "conv2d_fused";
    let (plane, in_len, out_len) = (h * w, g.c_in * h * w, g.c_out * g.oh * g.ow);
    let conv_in_len = g.c_in * g.h * g.w;
    // Images per reference conv call.
    let chunk = if x_img == in_len && y_img == out_len && y_off == 0 {
        g.n.max(1)
    } else {
        1
    };
    let xs = x.host_for(OP)?;
    let wt = conv.weight.host_for(OP)?;
    // The tensor-core reference: weights and the conv's (activated, pooled,
    // upsampled) input rounded to the precision.
    let wt_rounded = rounded(round, if round.is_reduced() { wt } else { &[] });
    let wt = if round.is_reduced() { &wt_rounded } else { wt };
    let b = conv.bias.map(|b| b.host_for(OP)).transpose()?;
    let bn = conv
        .input_bn_relu
        .map(|bn| Ok::<_, Error>((bn.scale.host_for(OP)?, bn.shift.host_for(OP)?)))
        .transpose()?;
    let ys = y.host_mut_for(OP)?;
    let scratch = |used: bool, len: usize| vec![0.0f32; if used { chunk * len } else { 0 }];
    let mut activated = scratch(bn.is_some(), in_len);
    let mut pooled = scratch(conv.input_pool2, conv_in_len);
    let mut upsampled = scratch(conv.input_upsample2, conv_in_len);
    let mut input_rounded = scratch(round.is_reduced(), conv_in_len);
    for img0 in (0..g.n).step_by(chunk) {
        let k = chunk.min(g.n - img0);
        let part = Conv2dGeom { n: k, ..*g };
        let xi = &xs[img0 * x_img..][..(k - 1) * x_img + in_len];
        let mut input: &[f32] = xi;
        if let Some((scale, shift)) = bn {
            // Chunks of several images are dense: plane p is channel p mod c_in.
            for (p, (dst, src)) in activated[..k * in_len]
                .chunks_exact_mut(plane.max(1))
                .zip(xi.chunks_exact(plane.max(1)))
                .enumerate()
            {
                let ci = p % g.c_in.max(1);
                bn_relu_plane(dst, src, scale[ci], shift[ci]);
            }
            input = &activated[..k * in_len];
        }
        if conv.input_pool2 {
            for (dst, src) in pooled[..k * conv_in_len]
                .chunks_exact_mut((g.h * g.w).max(1))
                .zip(input.chunks_exact(plane.max(1)))
            {
                for (oy, row) in dst.chunks_exact_mut(g.w.max(1)).enumerate() {
                    let (r0, r1) = (&src[2 * oy * w..][..w], &src[(2 * oy + 1) * w..][..w]);
                    for (ox, d) in row.iter_mut().enumerate() {
                        let (i, j) = (2 * ox, 2 * ox + 1);
                        *d = 0.25 * ((r0[i] + r0[j]) + (r1[i] + r1[j]));
                    }
                }
            }
            input = &pooled[..k * conv_in_len];
        }
        if conv.input_upsample2 {
            let dst = &mut upsampled[..k * conv_in_len];
            cpu::upsample_nearest2x_forward(k, g.c_in, h, w, &input[..k * in_len], dst)?;
            input = &upsampled[..k * conv_in_len];
        }
        if round.is_reduced() {
            let dst = &mut input_rounded[..k * conv_in_len];
            dst.copy_from_slice(&input[..k * conv_in_len]);
            round.round_slice(dst);
            input = &input_rounded[..k * conv_in_len];
        }
        let yi = &mut ys[img0 * y_img + y_off..][..(k - 1) * y_img + out_len];
        cpu::conv2d_forward(&part, input, wt, b, yi)?;
        if conv.relu {
            yi.iter_mut().filter(|v| **v < 0.0).for_each(|v| *v = 0.0);
        }
        if let Some(slope) = conv.leaky_relu {
            yi.iter_mut()
                .filter(|v| **v < 0.0)
                .for_each(|v| *v *= slope);
        }
    }
    Ok(())
}

/// One plane of the BatchNorm+ReLU prologue: `dst = max(src·s + t, 0)`
/// (NaN passes) with `src·s + t` a fused multiply-add, rounded once, as the
/// kernels' `fmaf` (kernels/conv_gather.cuh). The value is then pooled and
/// rounded to bf16/f16 for the tensor-core reference: computed with two
/// roundings it could differ from the kernel's by one f32 ulp and, next to a
/// bf16 rounding boundary, round to the neighbouring bf16 value (2⁻⁸
/// relative), a difference the rounded-operand reference must not have.
fn bn_relu_plane(dst: &mut [f32], src: &[f32], s: f32, t: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports FMA (just detected), the only feature
        // bn_relu_plane_fma is compiled for.
        return unsafe { bn_relu_plane_fma(dst, src, s, t) };
    }
    bn_relu_plane_impl(dst, src, s, t);
}

/// [`bn_relu_plane_impl`] compiled for CPUs with hardware FMA, where
/// `mul_add` is one instruction instead of a libm call (same bits).
///
/// # Safety
/// The CPU must support FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn bn_relu_plane_fma(dst: &mut [f32], src: &[f32], s: f32, t: f32) {
    bn_relu_plane_impl(dst, src, s, t);
}

#[inline(always)]
fn bn_relu_plane_impl(dst: &mut [f32], src: &[f32], s: f32, t: f32) {
    for (d, &v) in dst.iter_mut().zip(src) {
        let a = v.mul_add(s, t);
        *d = if a < 0.0 { 0.0 } else { a };
    }
}

// ---------------------------------------------------------------------------
// Backward: weight and bias gradients on kernels/conv_backward.cu, input
// gradients on the forward kernels above.
// ---------------------------------------------------------------------------

/// Threads per block of the weight-gradient GEMM (`kWgThreads`).
const WGRAD_THREADS: u32 = 256;
/// Rows (output channels) and columns (`c_in·kh·kw`) per weight-gradient
/// block tile (`kWgBM`, `kWgBN`).
const WGRAD_TILE: usize = 64;
/// Pixels per shared-memory slab of the weight-gradient GEMM (`kWgBK`):
/// chunks are rounded up to whole slabs.
const WGRAD_SLAB: usize = 16;
/// Threads per block of the bias-gradient kernel (`kBiasThreads`).
const BIAS_THREADS: u32 = 256;
/// Threads per block of the partial-sum reduction.
const REDUCE_THREADS: u32 = 256;
/// Most chunks a weight or bias gradient's pixel sum is split into: bounds
/// the workspace at 16 copies of the gradient.
pub const CONV_GRAD_MAX_CHUNKS: usize = 16;
/// Fewest pixels per chunk: shorter chunks would mostly add reduction work.
pub const CONV_GRAD_MIN_CHUNK: usize = 256;

/// The deterministic split of a gradient's sum over `k = n·oh·ow` pixels
/// (`n·h·w` for a transposed conv) into chunks: `(chunk_len, parts)`, a
/// function of `k` alone (never of the GPU): `parts = clamp(⌈k/256⌉, 1, 16)`
/// chunks of `⌈k/parts⌉` pixels rounded up to a multiple of 16, the last one
/// shorter. `(0, 0)` when `k` is 0.
pub fn conv_grad_chunks(k: usize) -> (usize, usize) {
    if k == 0 {
        return (0, 0);
    }
    let parts = k
        .div_ceil(CONV_GRAD_MIN_CHUNK)
        .clamp(1, CONV_GRAD_MAX_CHUNKS);
    let len = k.div_ceil(parts).next_multiple_of(WGRAD_SLAB);
    (len, k.div_ceil(len))
}

/// Workspace floats a device conv backward allocates (and frees) for a weight
/// of `weight_len` elements, `c_out` bias channels (0 without a bias) and
/// `k` pixels: one partial gradient per chunk when there are several chunks.
pub fn conv_grad_workspace_len(weight_len: usize, c_out: usize, k: usize) -> usize {
    match conv_grad_chunks(k) {
        (_, parts) if parts > 1 => parts * (weight_len + c_out),
        _ => 0,
    }
}

/// Gradients of a conv2d, transposed conv2d or linear layer: `dx` like the
/// input, `dw` like the weight, `db` `[c_out]` (`[out]`) when asked for.
#[derive(Debug)]
pub struct ConvGrads {
    /// Input gradient.
    pub dx: Tensor,
    /// Weight gradient.
    pub dw: Tensor,
    /// Bias gradient.
    pub db: Option<Tensor>,
}

impl ConvGrads {
    /// Zeroed gradients on `be`: `dx` of `x`'s shape, `dw` of `w`'s and,
    /// given a bias length, `db` of it.
    pub(super) fn zeros(
        be: &Backend,
        x: &Tensor,
        w: &Tensor,
        bias_len: Option<usize>,
    ) -> Result<ConvGrads> {
        Ok(ConvGrads {
            dx: Tensor::zeros(be, x.shape())?,
            dw: Tensor::zeros(be, w.shape())?,
            db: bias_len.map(|c| Tensor::zeros(be, &[c])).transpose()?,
        })
    }
}

/// Sums `parts` partials of `len` floats each (`part`, in order) into `out`;
/// with 0 parts fills `out` with zeros.
fn launch_grad_reduce(
    be: &Backend,
    part: KernelArg,
    out: &mut Tensor,
    len: usize,
    parts: usize,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let cfg = LaunchCfg::linear(
        len.min(DIRECT_MAX_BLOCKS * REDUCE_THREADS as usize),
        REDUCE_THREADS,
    )?;
    let args = [
        part,
        out.arg_mut(),
        KernelArg::I64(len as i64),
        KernelArg::int("chunks", parts)?,
    ];
    // SAFETY: `out` holds `len` f32 on be's device and `part` (null only when
    // parts is 0) parts·len; both outlive the launch (the caller's
    // workspace). conv_grad_reduce_f32(const float* part, float* out,
    // long long len, int parts) reads part[s·len + i] for s < parts and
    // writes out[i], i < len.
    unsafe { be.launch("conv_grad_reduce_f32", cfg, &args) }
}

/// The weight gradient as a GEMM over pixels (see kernels/conv_backward.cu):
/// `dw[m, (ci, ky, kx)] = Σ_p rows[b, m, p] · gathered[b, ci, p·s − pad + k]`
/// for `rows` `[n, c_rows, oh, ow]` and `gathered` `[n, c_gath, h, w]`,
/// `dw` `[c_rows, c_gath, kh, kw]`. Shapes checked by the caller.
#[allow(clippy::too_many_arguments)]
fn launch_weight_grad(
    op: &'static str,
    be: &Backend,
    gathered: &Tensor,
    rows: &Tensor,
    dw: &mut Tensor,
    n: usize,
    c_gath: usize,
    (h, w): (usize, usize),
    c_rows: usize,
    (kh, kw): (usize, usize),
    stride: (usize, usize),
    pad: (usize, usize),
    (oh, ow): (usize, usize),
) -> Result<()> {
    let (gm, gn) = (c_rows, c_gath * kh * kw);
    let len = gm * gn;
    if len == 0 {
        return Ok(());
    }
    let (chunk_len, parts) = conv_grad_chunks(n * oh * ow);
    if parts == 0 {
        return launch_grad_reduce(be, KernelArg::Ptr(0), dw, len, 0);
    }
    let sizes = size_args(
        op,
        n,
        c_gath,
        (h, w),
        c_rows,
        (kh, kw),
        stride,
        pad,
        (oh, ow),
    )?;
    let (gx, gy) = (gn.div_ceil(WGRAD_TILE), gm.div_ceil(WGRAD_TILE));
    if gx > MAX_GRID_X || gy > MAX_GRID_YZ {
        return Err(Error::invalid(format!(
            "{op}: a weight gradient of {gm} × {gn} exceeds the launch grid"
        )));
    }
    let cfg = LaunchCfg {
        grid: (gx as u32, gy as u32, parts as u32),
        block: (WGRAD_THREADS, 1, 1),
        shared_bytes: 0,
    };
    let mut workspace = if parts > 1 {
        Some(Tensor::<f32>::zeros(be, &[parts * len])?)
    } else {
        None
    };
    let target = match workspace.as_mut() {
        Some(ws) => ws.arg_mut(),
        None => dw.arg_mut(),
    };
    let mut args = vec![gathered.arg(), rows.arg(), target];
    args.extend(sizes);
    args.push(KernelArg::I64(chunk_len as i64));
    // SAFETY: the caller checked that gathered [n, c_gath, h, w], rows
    // [n, c_rows, oh, ow] and dw [c_rows, c_gath, kh, kw] live on be's device
    // and outlive the launch; the workspace (parts·len floats) is alive until
    // the end of this function. conv2d_wgrad_partial_f32(const float* x,
    // const float* dy, float* part, 13 × int, long long chunk_len) as built
    // here reads x inside each image (bounds-checked gather) and dy at pixels
    // < n·oh·ow, and writes part[s·len + i] for s < parts = ⌈n·oh·ow /
    // chunk_len⌉ (grid.z) and i < len; size_args checked the int extents.
    unsafe { be.launch("conv2d_wgrad_partial_f32", cfg, &args)? };
    match workspace {
        Some(ws) => launch_grad_reduce(be, ws.arg(), dw, len, parts),
        None => Ok(()),
    }
}

/// `db[c] = Σ_{b, p} dy[b, c, p]` for `dy` `[n, c, plane]`, in the chunks of
/// [`conv_grad_chunks`]. Shapes checked by the caller.
fn launch_bias_grad(
    op: &'static str,
    be: &Backend,
    dy: &Tensor,
    db: &mut Tensor,
    n: usize,
    c: usize,
    plane: usize,
) -> Result<()> {
    if c == 0 {
        return Ok(());
    }
    let (chunk_len, parts) = conv_grad_chunks(n * plane);
    if parts == 0 {
        return launch_grad_reduce(be, KernelArg::Ptr(0), db, c, 0);
    }
    if c > MAX_GRID_X {
        return Err(Error::invalid(format!(
            "{op}: {c} bias channels exceed the launch grid"
        )));
    }
    let cfg = LaunchCfg {
        grid: (c as u32, parts as u32, 1),
        block: (BIAS_THREADS, 1, 1),
        shared_bytes: 0,
    };
    let mut workspace = if parts > 1 {
        Some(Tensor::<f32>::zeros(be, &[parts * c])?)
    } else {
        None
    };
    let target = match workspace.as_mut() {
        Some(ws) => ws.arg_mut(),
        None => db.arg_mut(),
    };
    let args = [
        dy.arg(),
        target,
        KernelArg::int("batch", n)?,
        KernelArg::int("channels", c)?,
        KernelArg::I64(plane as i64),
        KernelArg::I64(chunk_len as i64),
    ];
    // SAFETY: dy holds n·c·plane f32 and db c on be's device (checked by the
    // caller), the workspace parts·c until the end of this function.
    // conv_bias_grad_partial_f32(const float* dy, float* part, int n, int c,
    // long long plane, long long chunk_len) reads dy at (b·c + co)·plane + p,
    // p < plane, b < n, and writes part[s·c + co] for block (co, s),
    // s < parts = ⌈n·plane / chunk_len⌉.
    unsafe { be.launch("conv_bias_grad_partial_f32", cfg, &args)? };
    match workspace {
        Some(ws) => launch_grad_reduce(be, ws.arg(), db, c, parts),
        None => Ok(()),
    }
}

/// A forward geometry error re-attributed to the backward op `op`.
fn backward_error(op: &'static str, e: Error) -> Error {
    match e {
        Error::Shape { msg, .. } => Error::shape(op, msg),
        e => e,
    }
}

/// Checks the gradient tensors of a conv backward: devices, `dy`, `dx`, `dw`
/// and `db` shapes.
#[allow(clippy::too_many_arguments)]
fn check_grads(
    op: &'static str,
    be: &Backend,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    dy_shape: &[usize],
    dx: &Tensor,
    dw: &Tensor,
    db: Option<&Tensor>,
    c_out: usize,
) -> Result<()> {
    on_device(op, be, &[x, w, dy, dx, dw])?;
    expect_shape(op, "dy", dy, dy_shape)?;
    expect_shape(op, "dx", dx, x.shape())?;
    expect_shape(op, "dw", dw, w.shape())?;
    if let Some(db) = db {
        check_device(op, be, db)?;
        expect_shape(op, "db", db, &[c_out])?;
    }
    Ok(())
}

/// The CPU branch of a conv backward: the host slices of `[x, w, dy]`,
/// `dx`, `dw` and `db` handed to `f` (the `crate::cpu` backward with its
/// geometry).
fn host_backward(
    op: &'static str,
    inputs: [&Tensor; 3],
    dx: &mut Tensor,
    dw: &mut Tensor,
    db: Option<&mut Tensor>,
    f: impl FnOnce([&[f32]; 3], &mut [f32], &mut [f32], Option<&mut [f32]>) -> Result<()>,
) -> Result<()> {
    let [x, w, dy] = inputs;
    let db = db.map(|d| d.host_mut_for(op)).transpose()?;
    f(
        [x.host_for(op)?, w.host_for(op)?, dy.host_for(op)?],
        dx.host_mut_for(op)?,
        dw.host_mut_for(op)?,
        db,
    )
}

/// Backward of [`conv2d`]: from the input `x` `[n, c_in, h, w]`, the weight
/// `w` `[c_out, c_in, kh, kw]` and the output gradient `dy`
/// `[n, c_out, oh, ow]`, the gradients of `x`, `w` and (when `bias`) of the
/// bias. f32 on every device (also under a bf16/f16 precision). On CUDA and
/// emulated devices: `dx` on the transposed-conv implicit GEMM
/// (`conv_transpose2d_igemm{32,64}_f32` over `dy`, M = n·h·w pixels by phase,
/// N = c_in, K = c_out·taps), `dw` on `conv2d_wgrad_partial_f32` (M = c_out,
/// N = c_in·kh·kw, K = n·oh·ow in [`conv_grad_chunks`]) and `db` on
/// `conv_bias_grad_partial_f32`, partials summed in a fixed order by
/// `conv_grad_reduce_f32`: no atomics, the same bits on every run and GPU.
/// The CPU device runs [`cpu::conv2d_backward`].
pub fn conv2d_backward(
    be: &Backend,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    p: Conv2dParams,
    bias: bool,
) -> Result<ConvGrads> {
    let g = Conv2dGeom::new(x.shape(), w.shape(), p)
        .map_err(|e| backward_error("conv2d_backward", e))?;
    let mut grads = ConvGrads::zeros(be, x, w, bias.then_some(g.c_out))?;
    let ConvGrads { dx, dw, db } = &mut grads;
    conv2d_backward_into(be, x, w, dy, p, dx, dw, db.as_mut())?;
    Ok(grads)
}

/// [`conv2d_backward`] into preallocated `dx`, `dw` and `db` (all overwritten).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward_into(
    be: &Backend,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    p: Conv2dParams,
    dx: &mut Tensor,
    dw: &mut Tensor,
    db: Option<&mut Tensor>,
) -> Result<()> {
    const OP: &str = "conv2d_backward";
    let g = Conv2dGeom::new(x.shape(), w.shape(), p).map_err(|e| backward_error(OP, e))?;
    check_grads(
        OP,
        be,
        x,
        w,
        dy,
        &g.out_shape(),
        dx,
        dw,
        db.as_deref(),
        g.c_out,
    )?;
    if be.device() == Device::Cpu {
        return host_backward(OP, [x, w, dy], dx, dw, db, |[x, w, dy], dx, dw, db| {
            cpu::conv2d_backward(&g, x, w, dy, dx, dw, db)
        });
    }
    conv2d_backward_device(OP, be, &g, x, w, dy, dx, dw, db)
}

/// The CUDA / emulated part of [`conv2d_backward_into`] for a checked
/// geometry: the kernels read the tensors' buffers by `g`'s extents only, so
/// the linear layer passes `[n, in]`-shaped tensors as a 1×1 conv over
/// `[n, in, 1, 1]`. The caller has checked devices and shapes; the element
/// counts the kernels rely on are checked again here.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv2d_backward_device(
    op: &'static str,
    be: &Backend,
    g: &Conv2dGeom,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    dx: &mut Tensor,
    dw: &mut Tensor,
    db: Option<&mut Tensor>,
) -> Result<()> {
    let counts = [
        ("x", x.numel(), g.n * g.c_in * g.h * g.w),
        ("dx", dx.numel(), g.n * g.c_in * g.h * g.w),
        ("w", w.numel(), g.c_out * g.c_in * g.kh * g.kw),
        ("dw", dw.numel(), g.c_out * g.c_in * g.kh * g.kw),
        ("dy", dy.numel(), g.n * g.c_out * g.oh * g.ow),
        ("db", db.as_ref().map_or(g.c_out, |t| t.numel()), g.c_out),
    ];
    for (what, got, want) in counts {
        if got != want {
            return Err(Error::shape(
                op,
                format!("{what} has {got} elements, expected {want}"),
            ));
        }
    }
    let (stride, pad) = ((g.stride_h, g.stride_w), (g.pad_h, g.pad_w));
    // dx: a transposed conv of dy through w, read as a [c_out, c_in, kh, kw]
    // transposed-conv weight, onto the input plane (every input pixel is an
    // output of exactly one phase, so dx is fully overwritten).
    if dx.numel() > 0 {
        let sizes = size_args(
            op,
            g.n,
            g.c_out,
            (g.oh, g.ow),
            g.c_in,
            (g.kh, g.kw),
            stride,
            pad,
            (g.h, g.w),
        )?;
        let phase_m = g.n * g.h.div_ceil(g.stride_h) * g.w.div_ceil(g.stride_w);
        let (name, tile_n) = gemm_variant(true, g.c_in);
        let cfg = gemm_cfg(op, phase_m, g.c_in, tile_n, g.stride_h * g.stride_w)?;
        let mut args = vec![dy.arg(), w.arg(), KernelArg::Ptr(0), dx.arg_mut()];
        args.extend(sizes);
        // SAFETY: dy [n, c_out, oh, ow], w [c_out, c_in, kh, kw] and dx
        // [n, c_in, h, w] (element counts checked above) live on be's device
        // (checked by the caller) and outlive the launch. The transposed-conv kernels take (const float* x, const
        // float* w, const float* bias, float* y, 13 × int) as built here,
        // with x = dy ([n, c_out, oh, ow]: their c_in = c_out, plane oh × ow),
        // w read as their [c_in, c_out, kh, kw] weight (our [c_out, c_in, kh,
        // kw]), a null bias and y = dx (their c_out = c_in, plane h × w);
        // every read is bounds-checked against those extents and each dx
        // element is written once by the block of its phase.
        unsafe { be.launch(name, cfg, &args)? };
    }
    launch_weight_grad(
        op,
        be,
        x,
        dy,
        dw,
        g.n,
        g.c_in,
        (g.h, g.w),
        g.c_out,
        (g.kh, g.kw),
        stride,
        pad,
        (g.oh, g.ow),
    )?;
    if let Some(db) = db {
        launch_bias_grad(op, be, dy, db, g.n, g.c_out, g.oh * g.ow)?;
    }
    Ok(())
}

/// Backward of [`conv_transpose2d`]: from `x` `[n, c_in, h, w]`, `w`
/// `[c_in, c_out, kh, kw]` and `dy` `[n, c_out, oh, ow]`, the gradients of
/// `x`, `w` and (when `bias`) of the bias. f32 on every device. On CUDA and
/// emulated devices `dx` is a conv2d of `dy` with `w` read as a
/// `[c_in, c_out, kh, kw]` conv weight (`conv2d_igemm{32,64}_f32`), `dw` the
/// conv2d weight-gradient GEMM with the roles swapped (rows from `x`, the
/// gather from `dy`; K = n·h·w) and `db` the same deterministic chunked sums
/// as [`conv2d_backward`]. The CPU device runs
/// [`cpu::conv_transpose2d_backward`].
pub fn conv_transpose2d_backward(
    be: &Backend,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    p: ConvTranspose2dParams,
    bias: bool,
) -> Result<ConvGrads> {
    let g = ConvTranspose2dGeom::new(x.shape(), w.shape(), p)
        .map_err(|e| backward_error("conv_transpose2d_backward", e))?;
    let mut grads = ConvGrads::zeros(be, x, w, bias.then_some(g.c_out))?;
    let ConvGrads { dx, dw, db } = &mut grads;
    conv_transpose2d_backward_into(be, x, w, dy, p, dx, dw, db.as_mut())?;
    Ok(grads)
}

/// [`conv_transpose2d_backward`] into preallocated `dx`, `dw` and `db` (all
/// overwritten).
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose2d_backward_into(
    be: &Backend,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    p: ConvTranspose2dParams,
    dx: &mut Tensor,
    dw: &mut Tensor,
    db: Option<&mut Tensor>,
) -> Result<()> {
    const OP: &str = "conv_transpose2d_backward";
    let g = ConvTranspose2dGeom::new(x.shape(), w.shape(), p).map_err(|e| backward_error(OP, e))?;
    check_grads(
        OP,
        be,
        x,
        w,
        dy,
        &g.out_shape(),
        dx,
        dw,
        db.as_deref(),
        g.c_out,
    )?;
    if be.device() == Device::Cpu {
        return host_backward(OP, [x, w, dy], dx, dw, db, |[x, w, dy], dx, dw, db| {
            cpu::conv_transpose2d_backward(&g, x, w, dy, dx, dw, db)
        });
    }
    let (stride, pad) = ((g.stride_h, g.stride_w), (g.pad_h, g.pad_w));
    // dx: the conv2d of dy [n, c_out, oh, ow] with w as a [c_in, c_out, kh,
    // kw] conv weight, onto the h × w input plane.
    let as_conv = Conv2dGeom {
        n: g.n,
        c_in: g.c_out,
        h: g.oh,
        w: g.ow,
        c_out: g.c_in,
        kh: g.kh,
        kw: g.kw,
        stride_h: g.stride_h,
        stride_w: g.stride_w,
        pad_h: g.pad_h,
        pad_w: g.pad_w,
        oh: g.h,
        ow: g.w,
    };
    launch_conv2d(OP, be, &as_conv, Conv2dKernel::Gemm, dy, w, None, dx)?;
    launch_weight_grad(
        OP,
        be,
        dy,
        x,
        dw,
        g.n,
        g.c_out,
        (g.oh, g.ow),
        g.c_in,
        (g.kh, g.kw),
        stride,
        pad,
        (g.h, g.w),
    )?;
    if let Some(db) = db {
        launch_bias_grad(OP, be, dy, db, g.n, g.c_out, g.oh * g.ow)?;
    }
    Ok(())
}
