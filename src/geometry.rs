//! Op geometry: the parameters of each layer and the shapes they imply.
//!
//! One struct per op family, built from the input shapes with full shape
//! checking (errors name the op and the shapes). The CPU reference, the CUDA
//! launch and the emulated launch all read the same struct, so they cannot
//! disagree about an output size.

use crate::error::{Error, Result};

/// Stride and zero padding of a 2-D convolution (dilation 1, groups 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    /// (vertical, horizontal) stride.
    pub stride: (usize, usize),
    /// (vertical, horizontal) zero padding on each side.
    pub padding: (usize, usize),
}

impl Conv2dParams {
    /// Square stride and padding.
    pub fn new(stride: usize, padding: usize) -> Self {
        Conv2dParams {
            stride: (stride, stride),
            padding: (padding, padding),
        }
    }
}

/// Everything a conv2d needs: input `[n, c_in, h, w]`, weight
/// `[c_out, c_in, kh, kw]`, output `[n, c_out, oh, ow]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dGeom {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub c_in: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub c_out: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Vertical stride.
    pub stride_h: usize,
    /// Horizontal stride.
    pub stride_w: usize,
    /// Vertical padding (each side).
    pub pad_h: usize,
    /// Horizontal padding (each side).
    pub pad_w: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

fn dims4(op: &'static str, what: &str, s: &[usize]) -> Result<[usize; 4]> {
    match s {
        [a, b, c, d] => Ok([*a, *b, *c, *d]),
        _ => Err(Error::shape(
            op,
            format!("{what} must be 4-D, got shape {s:?}"),
        )),
    }
}

fn out_len(op: &'static str, size: usize, k: usize, stride: usize, pad: usize) -> Result<usize> {
    if stride == 0 {
        return Err(Error::shape(op, "stride must be at least 1"));
    }
    if k == 0 {
        return Err(Error::shape(op, "kernel size must be at least 1"));
    }
    let padded = size + 2 * pad;
    if padded < k {
        return Err(Error::shape(
            op,
            format!("input size {size} with padding {pad} is smaller than the kernel {k}"),
        ));
    }
    Ok((padded - k) / stride + 1)
}

impl Conv2dGeom {
    /// Checks `x` `[n, c_in, h, w]` against `weight` `[c_out, c_in, kh, kw]`.
    pub fn new(x: &[usize], weight: &[usize], p: Conv2dParams) -> Result<Self> {
        const OP: &str = "conv2d";
        let [n, c_in, h, w] = dims4(OP, "input", x)?;
        let [c_out, wc_in, kh, kw] = dims4(OP, "weight", weight)?;
        if wc_in != c_in {
            return Err(Error::shape(
                OP,
                format!("input {x:?} has {c_in} channels but weight {weight:?} expects {wc_in}"),
            ));
        }
        let oh = out_len(OP, h, kh, p.stride.0, p.padding.0)?;
        let ow = out_len(OP, w, kw, p.stride.1, p.padding.1)?;
        Ok(Conv2dGeom {
            n,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            stride_h: p.stride.0,
            stride_w: p.stride.1,
            pad_h: p.padding.0,
            pad_w: p.padding.1,
            oh,
            ow,
        })
    }
    /// Output shape `[n, c_out, oh, ow]`.
    pub fn out_shape(&self) -> [usize; 4] {
        [self.n, self.c_out, self.oh, self.ow]
    }
    /// Multiply-adds times two.
    pub fn flops(&self) -> f64 {
        2.0 * (self.n * self.c_out * self.oh * self.ow) as f64
            * (self.c_in * self.kh * self.kw) as f64
    }
}

/// Stride, padding and output padding of a transposed convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvTranspose2dParams {
    /// (vertical, horizontal) stride.
    pub stride: (usize, usize),
    /// (vertical, horizontal) padding, as PyTorch's `padding`.
    pub padding: (usize, usize),
    /// Extra rows/columns added to one side of the output, as PyTorch's `output_padding`.
    pub output_padding: (usize, usize),
}

impl ConvTranspose2dParams {
    /// Square stride and padding, no output padding.
    pub fn new(stride: usize, padding: usize) -> Self {
        ConvTranspose2dParams {
            stride: (stride, stride),
            padding: (padding, padding),
            output_padding: (0, 0),
        }
    }
}

/// A transposed convolution: input `[n, c_in, h, w]`, weight
/// `[c_in, c_out, kh, kw]` (PyTorch layout), output `[n, c_out, oh, ow]` with
/// `oh = (h − 1)·stride − 2·pad + kh + output_padding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvTranspose2dGeom {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub c_in: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub c_out: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Vertical stride.
    pub stride_h: usize,
    /// Horizontal stride.
    pub stride_w: usize,
    /// Vertical padding (each side).
    pub pad_h: usize,
    /// Horizontal padding (each side).
    pub pad_w: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

impl ConvTranspose2dGeom {
    /// Checks `x` `[n, c_in, h, w]` against `weight` `[c_in, c_out, kh, kw]`.
    pub fn new(x: &[usize], weight: &[usize], p: ConvTranspose2dParams) -> Result<Self> {
        const OP: &str = "conv_transpose2d";
        let [n, c_in, h, w] = dims4(OP, "input", x)?;
        let [wc_in, c_out, kh, kw] = dims4(OP, "weight", weight)?;
        if wc_in != c_in {
            return Err(Error::shape(
                OP,
                format!("input {x:?} has {c_in} channels but weight {weight:?} expects {wc_in}"),
            ));
        }
        if p.stride.0 == 0 || p.stride.1 == 0 || kh == 0 || kw == 0 || h == 0 || w == 0 {
            return Err(Error::shape(
                OP,
                format!("empty input, kernel or stride (input {x:?}, weight {weight:?})"),
            ));
        }
        if p.output_padding.0 >= p.stride.0 || p.output_padding.1 >= p.stride.1 {
            return Err(Error::shape(
                OP,
                "output_padding must be smaller than the stride",
            ));
        }
        let full_h = (h - 1) * p.stride.0 + kh + p.output_padding.0;
        let full_w = (w - 1) * p.stride.1 + kw + p.output_padding.1;
        if full_h <= 2 * p.padding.0 || full_w <= 2 * p.padding.1 {
            return Err(Error::shape(
                OP,
                format!("padding {:?} leaves no output for input {x:?}", p.padding),
            ));
        }
        Ok(ConvTranspose2dGeom {
            n,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            stride_h: p.stride.0,
            stride_w: p.stride.1,
            pad_h: p.padding.0,
            pad_w: p.padding.1,
            oh: full_h - 2 * p.padding.0,
            ow: full_w - 2 * p.padding.1,
        })
    }
    /// Output shape `[n, c_out, oh, ow]`.
    pub fn out_shape(&self) -> [usize; 4] {
        [self.n, self.c_out, self.oh, self.ow]
    }
    /// Multiply-adds times two.
    pub fn flops(&self) -> f64 {
        2.0 * (self.n * self.c_in * self.h * self.w) as f64
            * (self.c_out * self.kh * self.kw) as f64
    }
}

/// Max or average pooling window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2dParams {
    /// (vertical, horizontal) window size.
    pub kernel: (usize, usize),
    /// (vertical, horizontal) stride.
    pub stride: (usize, usize),
    /// (vertical, horizontal) padding (implicit −∞ for max, zeros for average).
    pub padding: (usize, usize),
    /// Average pooling only: divide by the full window (PyTorch's default,
    /// `count_include_pad=True`) or by the in-bounds part.
    /// Average pooling divides by the full window, padding included.
    pub count_include_pad: bool,
}

impl Pool2dParams {
    /// Square window, stride and padding; `count_include_pad = true` as PyTorch.
    pub fn new(kernel: usize, stride: usize, padding: usize) -> Self {
        Pool2dParams {
            kernel: (kernel, kernel),
            stride: (stride, stride),
            padding: (padding, padding),
            count_include_pad: true,
        }
    }
}

/// Pooling geometry: input `[n, c, h, w]`, output `[n, c, oh, ow]` (floor mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2dGeom {
    /// Batch size.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Vertical stride.
    pub stride_h: usize,
    /// Horizontal stride.
    pub stride_w: usize,
    /// Vertical padding (each side).
    pub pad_h: usize,
    /// Horizontal padding (each side).
    pub pad_w: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
    /// Average pooling divides by the full window, padding included.
    pub count_include_pad: bool,
}

impl Pool2dGeom {
    /// Checks the input shape against the window (`op` names the caller in errors).
    pub fn new(op: &'static str, x: &[usize], p: Pool2dParams) -> Result<Self> {
        let [n, c, h, w] = dims4(op, "input", x)?;
        if 2 * p.padding.0 > p.kernel.0 || 2 * p.padding.1 > p.kernel.1 {
            return Err(Error::shape(
                op,
                format!(
                    "padding {:?} must be at most half the kernel {:?}",
                    p.padding, p.kernel
                ),
            ));
        }
        let oh = out_len(op, h, p.kernel.0, p.stride.0, p.padding.0)?;
        let ow = out_len(op, w, p.kernel.1, p.stride.1, p.padding.1)?;
        Ok(Pool2dGeom {
            n,
            c,
            h,
            w,
            kh: p.kernel.0,
            kw: p.kernel.1,
            stride_h: p.stride.0,
            stride_w: p.stride.1,
            pad_h: p.padding.0,
            pad_w: p.padding.1,
            oh,
            ow,
            count_include_pad: p.count_include_pad,
        })
    }
    /// Output shape `[n, c, oh, ow]`.
    pub fn out_shape(&self) -> [usize; 4] {
        [self.n, self.c, self.oh, self.ow]
    }
}
