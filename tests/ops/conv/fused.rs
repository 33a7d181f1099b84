//! `conv2d_fused_into` (the DenseNet conv: input channels read from the
//! front of a wider buffer, output written to a channel slice of another,
//! optional BatchNorm+ReLU prologue, optional 2×2 average pooling of the
//! activated input, optional ReLU epilogue; the CP2Image generator's conv:
//! optional 2× nearest upsampling of the input, optional LeakyReLU epilogue) against the same computation
//! composed from plain pieces on the CPU: slice and activate the input by
//! hand, run the reference `avg_pool2d` and `conv2d`, apply ReLU, write the
//! slice.
//! Checked for the CPU path itself, the emulated kernels and (ignored
//! without a GPU) the CUDA kernels; channels outside the slice must be left
//! bit-for-bit untouched.
//!
//! Tolerance, per output: |out − ref| ≤ 1e-4 + 1e-4·|ref| + 2·√K·u·S, as in
//! tests/ops/conv.rs: K products per output, u = 2⁻²⁴, S = the same conv on
//! |activated input|, |w|, |b|. The kernel and the reference sum the same
//! products in different orders, and the kernel's prologue uses a fused
//! multiply-add where the reference rounds twice (one more rounding of
//! each input, well inside u·S per product).

use std::fmt::Debug;

use cellmorph::backend::cuda_device_count;
use cellmorph::geometry::{Conv2dGeom, Conv2dParams, Pool2dParams};
use cellmorph::ops::{self, BnRelu, FusedConv2d};
use cellmorph::{Backend, Device, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};

use crate::common::data;

const ATOL: f32 = 1e-4;
const RTOL: f32 = 1e-4;
/// Value of the output channels the conv must not touch.
const SENTINEL: f32 = -7.25;

fn cuda() -> Backend {
    assert!(
        cuda_device_count() > 0,
        "skipped: no CUDA device (this test needs a GPU)"
    );
    Backend::new(Device::Cuda(0)).expect("opening CUDA device 0")
}

#[derive(Clone, Debug)]
struct Case {
    n: usize,
    /// Channels of the input buffer (≥ c_in).
    c_x: usize,
    c_in: usize,
    c_out: usize,
    /// Channels of the output buffer (≥ offset + c_out).
    c_y: usize,
    offset: usize,
    h: usize,
    w: usize,
    k: (usize, usize),
    stride: usize,
    pad: usize,
    bias: bool,
    bn_relu: bool,
    /// 2×2 average pooling of the activated input (a DenseNet transition).
    pool2: bool,
    relu: bool,
    /// Nearest 2× upsampling of the input (the CP2Image generator's blocks).
    up2: bool,
    /// LeakyReLU slope on the output.
    leaky: Option<f32>,
    seed: u64,
}

impl Case {
    /// The conv's own input size (pooled when pooling).
    fn conv_hw(&self) -> (usize, usize) {
        if self.pool2 {
            (self.h / 2, self.w / 2)
        } else if self.up2 {
            (2 * self.h, 2 * self.w)
        } else {
            (self.h, self.w)
        }
    }
    fn params(&self) -> Conv2dParams {
        Conv2dParams::new(self.stride, self.pad)
    }
    fn geom(&self) -> cellmorph::Result<Conv2dGeom> {
        let (h, w) = self.conv_hw();
        Conv2dGeom::new(
            &[self.n, self.c_in, h, w],
            &[self.c_out, self.c_in, self.k.0, self.k.1],
            self.params(),
        )
    }
}

fn cases(c_out: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Case> {
    (
        (
            1usize..=3,
            1usize..=20,
            0usize..=5,
            c_out,
            0usize..=6,
            0usize..=4,
        ),
        (
            1usize..=16,
            1usize..=16,
            1usize..=5,
            1usize..=5,
            1usize..=2,
            0usize..=2,
        ),
        (
            any::<bool>(),
            any::<bool>(),
            0u8..4,
            any::<bool>(),
            any::<bool>(),
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (n, c_in, x_extra, c_out, offset, y_extra),
                (h, w, kh, kw, stride, pad),
                (bias, bn_relu, pool, relu, leaky, seed),
            )| {
                // One case in four is a transition: 1×1, stride 1, no
                // padding, BN+ReLU prologue, no output ReLU; one in four
                // reads its input upsampled 2× (no prologue).
                let pool2 = pool == 0;
                let up2 = pool == 1;
                let relu = relu && !pool2 && !up2;
                Case {
                    n,
                    c_x: c_in + x_extra,
                    c_in,
                    c_out,
                    c_y: offset + c_out + y_extra,
                    offset,
                    h: if pool2 { h.max(2) } else { h },
                    w: if pool2 { w.max(2) } else { w },
                    k: if pool2 { (1, 1) } else { (kh, kw) },
                    stride: if pool2 { 1 } else { stride },
                    pad: if pool2 { 0 } else { pad },
                    bias,
                    bn_relu: (bn_relu || pool2) && !up2,
                    pool2,
                    relu,
                    up2,
                    // LeakyReLU only where a kernel has it: without a
                    // prologue and without ReLU.
                    leaky: (leaky && !relu && !((bn_relu || pool2) && !up2)).then_some(0.2),
                    seed,
                }
            },
        )
        .prop_filter("kernel larger than the padded input", |c| c.geom().is_ok())
}

/// The inputs of one case.
struct Inputs {
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl Inputs {
    fn new(c: &Case) -> Self {
        Inputs {
            x: data(c.seed, c.n * c.c_x * c.h * c.w),
            w: data(c.seed ^ 1, c.c_out * c.c_in * c.k.0 * c.k.1),
            b: data(c.seed ^ 2, c.c_out),
            scale: data(c.seed ^ 3, c.c_in),
            shift: data(c.seed ^ 4, c.c_in),
        }
    }
}

/// The expected output buffer from plain CPU pieces, with the conv run on
/// `abs`-transformed operands when `magnitude` (for the tolerance).
fn reference(c: &Case, inp: &Inputs, magnitude: bool) -> Vec<f32> {
    let cpu = Backend::cpu();
    let g = c.geom().unwrap();
    let plane = c.h * c.w;
    let f = |v: f32| if magnitude { v.abs() } else { v };
    let mut act = Vec::with_capacity(c.n * c.c_in * plane);
    for img in 0..c.n {
        for ci in 0..c.c_in {
            let src = &inp.x[(img * c.c_x + ci) * plane..][..plane];
            act.extend(src.iter().map(|&v| {
                if c.bn_relu {
                    (v * inp.scale[ci] + inp.shift[ci]).max(0.0)
                } else {
                    f(v)
                }
            }));
        }
    }
    let mut x = Tensor::from_vec(&cpu, &[c.n, c.c_in, c.h, c.w], act).unwrap();
    if c.pool2 {
        x = ops::avg_pool2d(&cpu, &x, Pool2dParams::new(2, 2, 0)).unwrap();
    }
    if c.up2 {
        x = ops::upsample_nearest2x(&cpu, &x).unwrap();
    }
    let wv: Vec<f32> = inp.w.iter().map(|&v| f(v)).collect();
    let w = Tensor::from_vec(&cpu, &[c.c_out, c.c_in, c.k.0, c.k.1], wv).unwrap();
    let b = Tensor::from_vec(&cpu, &[c.c_out], inp.b.iter().map(|&v| f(v)).collect()).unwrap();
    let mut y = ops::conv2d(&cpu, &x, &w, c.bias.then_some(&b), c.params()).unwrap();
    if c.relu && !magnitude {
        ops::relu_inplace(&cpu, &mut y).unwrap();
    }
    if let (Some(slope), false) = (c.leaky, magnitude) {
        y = ops::leaky_relu(&cpu, &y, slope).unwrap();
    }
    let conv = y.to_vec().unwrap();
    let out_plane = g.oh * g.ow;
    let mut out = vec![SENTINEL; c.n * c.c_y * out_plane];
    for img in 0..c.n {
        let dst = &mut out[(img * c.c_y + c.offset) * out_plane..][..c.c_out * out_plane];
        dst.copy_from_slice(&conv[img * c.c_out * out_plane..][..c.c_out * out_plane]);
    }
    out
}

/// Runs the fused op on `be` and compares the whole output buffer.
fn check(be: &Backend, c: &Case) -> Result<(), String> {
    let g = c.geom().map_err(|e| e.to_string())?;
    let inp = Inputs::new(c);
    let up =
        |shape: &[usize], v: &[f32]| Tensor::from_slice(be, shape, v).map_err(|e| e.to_string());
    let x = up(&[c.n, c.c_x, c.h, c.w], &inp.x)?;
    let w = up(&[c.c_out, c.c_in, c.k.0, c.k.1], &inp.w)?;
    let b = up(&[c.c_out], &inp.b)?;
    let scale = up(&[c.c_in], &inp.scale)?;
    let shift = up(&[c.c_in], &inp.shift)?;
    let y_shape = [c.n, c.c_y, g.oh, g.ow];
    let mut y = up(&y_shape, &vec![SENTINEL; y_shape.iter().product()])?;
    let conv = FusedConv2d {
        weight: &w,
        bias: c.bias.then_some(&b),
        params: c.params(),
        input_bn_relu: c.bn_relu.then_some(BnRelu {
            scale: &scale,
            shift: &shift,
        }),
        input_pool2: c.pool2,
        relu: c.relu,
        input_upsample2: c.up2,
        leaky_relu: c.leaky,
    };
    ops::conv2d_fused_into(be, &x, &conv, &mut y, c.offset)
        .map_err(|e| format!("{}: {e}", be.device()))?;
    let got = y.to_vec().map_err(|e| e.to_string())?;
    let want = reference(c, &inp, false);
    let mag = reference(c, &inp, true);
    let u = f32::EPSILON / 2.0;
    let sum_tol = 2.0 * ((c.c_in * c.k.0 * c.k.1) as f32).sqrt() * u;
    let out_plane = g.oh * g.ow;
    for (i, ((&o, &r), &s)) in got.iter().zip(&want).zip(&mag).enumerate() {
        let ch = (i / out_plane) % c.c_y;
        let inside = (c.offset..c.offset + c.c_out).contains(&ch);
        let ok = if inside {
            o.is_finite() && (o - r).abs() <= ATOL + RTOL * r.abs() + sum_tol * s
        } else {
            o.to_bits() == SENTINEL.to_bits()
        };
        if !ok {
            return Err(format!(
                "{c:?} on {}: output {i} (channel {ch}, inside the slice: {inside}) is {o}, reference {r}",
                be.device()
            ));
        }
    }
    Ok(())
}

fn property<S>(cases: u32, strategy: S, test: impl Fn(&S::Value) -> Result<(), String>)
where
    S: Strategy,
    S::Value: Debug,
{
    let mut runner = TestRunner::new(crate::common::proptest_config(cases));
    if let Err(e) = runner.run(&strategy, |v| test(&v).map_err(TestCaseError::fail)) {
        panic!("{e}");
    }
}

#[test]
fn fused_cpu_matches_composition() {
    let be = Backend::cpu();
    property(96, cases(1..=40), |c| check(&be, c));
}

#[test]
fn fused_emulated_matches_cpu() {
    let be = Backend::new(Device::Emulated).expect("the emulated device must be built");
    property(24, cases(1..=20), |c| check(&be, c));
}

/// Output channels past 32 take the 64-wide channel tile.
#[test]
fn fused_wide_emulated_matches_cpu() {
    let be = Backend::new(Device::Emulated).expect("the emulated device must be built");
    property(8, cases(33..=72), |c| check(&be, c));
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn fused_cuda_matches_cpu() {
    let be = cuda();
    property(96, cases(1..=20), |c| check(&be, c));
    property(96, cases(33..=72), |c| check(&be, c));
}

/// Shape errors name the op and the offending shapes; nothing is launched.
#[test]
fn fused_shape_errors() {
    let be = Backend::cpu();
    let t = |shape: &[usize]| Tensor::zeros(&be, shape).unwrap();
    let (x, w) = (t(&[2, 4, 8, 8]), t(&[6, 4, 3, 3]));
    let conv = |w| FusedConv2d {
        weight: w,
        bias: None,
        params: Conv2dParams::new(1, 1),
        input_bn_relu: None,
        input_pool2: false,
        relu: false,
        input_upsample2: false,
        leaky_relu: None,
    };
    let expect_err = |r: cellmorph::Result<()>, needle: &str| {
        let msg = r.expect_err("must fail").to_string();
        assert!(
            msg.contains("conv2d_fused") && msg.contains(needle),
            "{msg:?} should name the op and {needle:?}"
        );
    };
    // The weight reads more channels than the input has.
    let wide = t(&[6, 5, 3, 3]);
    expect_err(
        ops::conv2d_fused_into(&be, &x, &conv(&wide), &mut t(&[2, 6, 8, 8]), 0),
        "[2, 4, 8, 8]",
    );
    // The output slice runs past the buffer.
    expect_err(
        ops::conv2d_fused_into(&be, &x, &conv(&w), &mut t(&[2, 8, 8, 8]), 3),
        "offset 3",
    );
    // Wrong spatial size or batch.
    expect_err(
        ops::conv2d_fused_into(&be, &x, &conv(&w), &mut t(&[2, 6, 7, 8]), 0),
        "[2, 6, 7, 8]",
    );
    expect_err(
        ops::conv2d_fused_into(&be, &x, &conv(&w), &mut t(&[1, 6, 8, 8]), 0),
        "[1, 6, 8, 8]",
    );
    // BatchNorm vectors must cover the channels read.
    let (s, sh) = (t(&[3]), t(&[4]));
    let bn = FusedConv2d {
        input_bn_relu: Some(BnRelu {
            scale: &s,
            shift: &sh,
        }),
        ..conv(&w)
    };
    expect_err(
        ops::conv2d_fused_into(&be, &x, &bn, &mut t(&[2, 6, 8, 8]), 0),
        "[3]",
    );
    // Pooling needs a 1×1 weight and the BatchNorm+ReLU prologue.
    let pool = FusedConv2d {
        params: Conv2dParams::new(1, 0),
        input_pool2: true,
        ..conv(&w)
    };
    expect_err(
        ops::conv2d_fused_into(&be, &x, &pool, &mut t(&[2, 6, 4, 4]), 0),
        "2×2 input pooling",
    );
}
