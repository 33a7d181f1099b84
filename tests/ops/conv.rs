//! The convolutions (`conv2d` on the implicit-GEMM kernel, `conv2d_direct`,
//! `conv_transpose2d`; kernels/conv.cu): the kernels, emulated and on CUDA,
//! against the CPU reference over random shapes and over fixed shapes that
//! hit the GEMM tile edges; then shape and device errors. The fused conv
//! (`conv2d_fused_into`) is in [`fused`], the tensor-core kernel in
//! `super::conv_tc`, and the linear layer, which runs on these kernels, in
//! `super::linear`.
//!
//! Tolerance, per output: |out − ref| ≤ 1e-4 + 1e-4·|ref| + 2·√K·u·S, where
//! K is the number of products summed, u = 2⁻²⁴ the f32 unit roundoff and
//! S = Σ|x·w| + |b| (the same op run on |x|, |w|, |b|). The kernels and the
//! reference sum the same K products in different orders (GEMM slabs of 8
//! against the reference's row loops), so they differ by rounding only; the
//! error of one f32 sum of K terms is typically below √K·u·S (Higham's
//! probabilistic bound; the worst case is K·u·S), hence 2·√K·u·S for two
//! sums. With inputs in [−1, 1) and K ≈ 1000 that is about 1e-3 on a sum
//! of magnitude ~250, far below a wrong or missing tap (|x·w| ~ 0.25).
//! The fixed 1e-4 terms cover small K, where cancellation leaves S tiny.

use std::fmt::Debug;

use cellmorph::backend::cuda_device_count;
use cellmorph::geometry::{Conv2dGeom, Conv2dParams, ConvTranspose2dGeom, ConvTranspose2dParams};
use cellmorph::ops;
use cellmorph::{Backend, Device, Error, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};

use crate::common::data;

mod fused;

const ATOL: f32 = 1e-4;
const RTOL: f32 = 1e-4;
/// Property cases on the emulated device (each CUDA thread is a fiber there).
pub(super) const EMU_CASES: u32 = 24;
pub(super) const CUDA_CASES: u32 = 96;

pub(super) fn abs(v: &[f32]) -> Vec<f32> {
    v.iter().map(|a| a.abs()).collect()
}

pub(super) fn emulated() -> Backend {
    Backend::new(Device::Emulated).expect("the emulated device must be built")
}

/// CUDA device 0. These tests are `#[ignore]`d so that a machine without a GPU
/// reports them as ignored, never as passed; forced to run there, they fail.
pub(super) fn cuda() -> Backend {
    assert!(
        cuda_device_count() > 0,
        "skipped: no CUDA device (this test needs a GPU)"
    );
    Backend::new(Device::Cuda(0)).expect("opening CUDA device 0")
}

/// Compares `got` with `want` under the module's tolerance; `mag` is the op
/// on absolute values and `k` the number of products per output.
pub(super) fn compare(
    what: &str,
    got: &[f32],
    want: &[f32],
    mag: &[f32],
    k: usize,
) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} outputs, expected {}",
            got.len(),
            want.len()
        ));
    }
    let u = f32::EPSILON / 2.0;
    let sum_tol = 2.0 * (k as f32).sqrt() * u;
    for (i, ((&g, &r), &s)) in got.iter().zip(want).zip(mag).enumerate() {
        let tol = ATOL + RTOL * r.abs() + sum_tol * s;
        if !g.is_finite() || (g - r).abs() > tol {
            return Err(format!(
                "{what}: output {i} is {g}, reference {r} (|Δ| = {}, tolerance {tol})",
                (g - r).abs()
            ));
        }
    }
    Ok(())
}

fn upload(be: &Backend, shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_slice(be, shape, v).expect("upload")
}

// ---------------------------------------------------------------------------
// conv2d
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct ConvCase {
    n: usize,
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: (usize, usize),
    pad: (usize, usize),
    bias: bool,
    seed: u64,
}

impl ConvCase {
    fn params(&self) -> Conv2dParams {
        Conv2dParams {
            stride: self.stride,
            padding: self.pad,
        }
    }
    fn x_shape(&self) -> [usize; 4] {
        [self.n, self.c_in, self.h, self.w]
    }
    fn w_shape(&self) -> [usize; 4] {
        [self.c_out, self.c_in, self.kh, self.kw]
    }
    fn geom(&self) -> cellmorph::Result<Conv2dGeom> {
        Conv2dGeom::new(&self.x_shape(), &self.w_shape(), self.params())
    }
}

/// Random conv2d shapes with `c_out` in `c_out`; shapes whose kernel does
/// not fit the padded input are rejected.
fn conv_cases(c_out: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = ConvCase> {
    (
        (1usize..=3, 1usize..=20, c_out, 1usize..=24, 1usize..=24),
        (
            1usize..=7,
            1usize..=7,
            1usize..=3,
            1usize..=3,
            0usize..=3,
            0usize..=3,
        ),
        (any::<bool>(), any::<u64>()),
    )
        .prop_map(
            |((n, c_in, c_out, h, w), (kh, kw, sh, sw, ph, pw), (bias, seed))| ConvCase {
                n,
                c_in,
                c_out,
                h,
                w,
                kh,
                kw,
                stride: (sh, sw),
                pad: (ph, pw),
                bias,
                seed,
            },
        )
        .prop_filter("kernel larger than the padded input", |c| c.geom().is_ok())
}

type ConvFn =
    fn(&Backend, &Tensor, &Tensor, Option<&Tensor>, Conv2dParams) -> cellmorph::Result<Tensor>;

/// Runs `op` on `be` and on the CPU reference and compares.
fn check_conv(be: &Backend, op: ConvFn, c: &ConvCase) -> Result<(), String> {
    let g = c.geom().map_err(|e| e.to_string())?;
    let xv = data(c.seed, c.x_shape().iter().product());
    let wv = data(c.seed ^ 1, c.w_shape().iter().product());
    let bv = data(c.seed ^ 2, c.c_out);
    let run = |be: &Backend, xv: &[f32], wv: &[f32], bv: &[f32]| -> cellmorph::Result<Vec<f32>> {
        let x = Tensor::from_slice(be, &c.x_shape(), xv)?;
        let w = Tensor::from_slice(be, &c.w_shape(), wv)?;
        let b = Tensor::from_slice(be, &[c.c_out], bv)?;
        let y = op(be, &x, &w, c.bias.then_some(&b), c.params())?;
        assert_eq!(y.shape(), g.out_shape());
        y.to_vec()
    };
    let cpu = Backend::cpu();
    let want = run(&cpu, &xv, &wv, &bv).map_err(|e| e.to_string())?;
    let mag = run(&cpu, &abs(&xv), &abs(&wv), &abs(&bv)).map_err(|e| e.to_string())?;
    let got = run(be, &xv, &wv, &bv).map_err(|e| format!("{}: {e}", be.device()))?;
    compare(
        &format!("{c:?} on {}", be.device()),
        &got,
        &want,
        &mag,
        c.c_in * c.kh * c.kw,
    )
}

/// Runs a property over `cases` random values (the failing value, with its
/// data seed, is in the panic message after shrinking).
pub(super) fn property<S>(cases: u32, strategy: S, test: impl Fn(&S::Value) -> Result<(), String>)
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
fn conv2d_gemm_emulated_matches_cpu() {
    let be = emulated();
    property(EMU_CASES, conv_cases(1..=20), |c| {
        check_conv(&be, ops::conv2d, c)
    });
}

/// Output channels past 32 take the 64-wide channel tile.
#[test]
fn conv2d_gemm_wide_emulated_matches_cpu() {
    let be = emulated();
    property(8, conv_cases(33..=80), |c| check_conv(&be, ops::conv2d, c));
}

#[test]
fn conv2d_direct_emulated_matches_cpu() {
    let be = emulated();
    property(EMU_CASES, conv_cases(1..=20), |c| {
        check_conv(&be, ops::conv2d_direct, c)
    });
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn conv2d_cuda_matches_cpu() {
    let be = cuda();
    property(CUDA_CASES, conv_cases(1..=20), |c| {
        check_conv(&be, ops::conv2d, c)
    });
    property(CUDA_CASES, conv_cases(33..=80), |c| {
        check_conv(&be, ops::conv2d, c)
    });
    property(CUDA_CASES, conv_cases(1..=20), |c| {
        check_conv(&be, ops::conv2d_direct, c)
    });
}

/// Shapes at the GEMM tile edges: M (output pixels, tile 128), N (output
/// channels, tile 32 or 64) and K (c_in·kh·kw, slab 8) below, at and just
/// past a multiple of the tile, plus the models' typical layers.
fn conv_fixed() -> Vec<ConvCase> {
    let case = |n, c_in, c_out, (h, w), (kh, kw), s: usize, p: usize, bias| ConvCase {
        n,
        c_in,
        c_out,
        h,
        w,
        kh,
        kw,
        stride: (s, s),
        pad: (p, p),
        bias,
        seed: (n * 1000 + c_in * 100 + c_out) as u64,
    };
    vec![
        // M = 129, N = 65, K = 1.
        case(1, 1, 65, (1, 129), (1, 1), 1, 0, true),
        // M = 128, N = 64, K = 27.
        case(2, 3, 64, (8, 8), (3, 3), 1, 1, false),
        // M = 127, N = 33, K = 9.
        case(1, 9, 33, (1, 127), (1, 1), 1, 0, true),
        // M = 256, N = 32, K = 16.
        case(1, 4, 32, (32, 32), (2, 2), 2, 0, true),
        // M = 257, N = 31, K = 7.
        case(1, 7, 31, (1, 257), (1, 1), 1, 0, false),
        // K = 980 with stride 2 and padding 3 (DenseNet's stem shape, smaller).
        case(1, 20, 70, (24, 24), (7, 7), 2, 3, true),
        // VQ-VAE encoder: 4×4, stride 2, pad 1.
        case(2, 3, 16, (16, 16), (4, 4), 2, 1, true),
        // Single output channel and pixel.
        case(1, 5, 1, (3, 3), (3, 3), 1, 0, true),
    ]
}

#[test]
fn conv2d_tile_edges_emulated() {
    let be = emulated();
    for c in conv_fixed() {
        check_conv(&be, ops::conv2d, &c).unwrap();
        check_conv(&be, ops::conv2d_direct, &c).unwrap();
    }
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn conv2d_tile_edges_cuda() {
    let be = cuda();
    for c in conv_fixed() {
        check_conv(&be, ops::conv2d, &c).unwrap();
        check_conv(&be, ops::conv2d_direct, &c).unwrap();
    }
}

#[test]
fn conv2d_empty_batch_emulated() {
    let be = emulated();
    let x = Tensor::zeros(&be, &[0, 3, 8, 8]).unwrap();
    let w = upload(&be, &[4, 3, 3, 3], &data(7, 108));
    let y = ops::conv2d(&be, &x, &w, None, Conv2dParams::new(1, 1)).unwrap();
    assert_eq!(y.shape(), &[0, 4, 8, 8]);
}

// ---------------------------------------------------------------------------
// conv_transpose2d
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct TransposeCase {
    conv: ConvCase,
    output_padding: (usize, usize),
}

impl TransposeCase {
    fn params(&self) -> ConvTranspose2dParams {
        ConvTranspose2dParams {
            stride: self.conv.stride,
            padding: self.conv.pad,
            output_padding: self.output_padding,
        }
    }
    fn w_shape(&self) -> [usize; 4] {
        let c = &self.conv;
        [c.c_in, c.c_out, c.kh, c.kw]
    }
    fn geom(&self) -> cellmorph::Result<ConvTranspose2dGeom> {
        ConvTranspose2dGeom::new(&self.conv.x_shape(), &self.w_shape(), self.params())
    }
}

/// Random transposed-conv shapes (output_padding below the stride); shapes
/// whose padding leaves no output are rejected.
fn transpose_cases(c_out: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = TransposeCase> {
    (
        (1usize..=3, 1usize..=20, c_out, 1usize..=24, 1usize..=24),
        (
            1usize..=7,
            1usize..=7,
            1usize..=3,
            1usize..=3,
            0usize..=3,
            0usize..=3,
        ),
        (any::<bool>(), any::<u64>(), 0usize..3, 0usize..3),
    )
        .prop_map(
            |((n, c_in, c_out, h, w), (kh, kw, sh, sw, ph, pw), (bias, seed, oph, opw))| {
                TransposeCase {
                    conv: ConvCase {
                        n,
                        c_in,
                        c_out,
                        h,
                        w,
                        kh,
                        kw,
                        stride: (sh, sw),
                        pad: (ph, pw),
                        bias,
                        seed,
                    },
                    output_padding: (oph % sh, opw % sw),
                }
            },
        )
        .prop_filter("padding leaves no output", |c| c.geom().is_ok())
}

fn check_transpose(be: &Backend, t: &TransposeCase) -> Result<(), String> {
    let c = &t.conv;
    let g = t.geom().map_err(|e| e.to_string())?;
    let xv = data(c.seed, c.x_shape().iter().product());
    let wv = data(c.seed ^ 1, t.w_shape().iter().product());
    let bv = data(c.seed ^ 2, c.c_out);
    let run = |be: &Backend, xv: &[f32], wv: &[f32], bv: &[f32]| -> cellmorph::Result<Vec<f32>> {
        let x = Tensor::from_slice(be, &c.x_shape(), xv)?;
        let w = Tensor::from_slice(be, &t.w_shape(), wv)?;
        let b = Tensor::from_slice(be, &[c.c_out], bv)?;
        let y = ops::conv_transpose2d(be, &x, &w, c.bias.then_some(&b), t.params())?;
        assert_eq!(y.shape(), g.out_shape());
        y.to_vec()
    };
    let cpu = Backend::cpu();
    let want = run(&cpu, &xv, &wv, &bv).map_err(|e| e.to_string())?;
    let mag = run(&cpu, &abs(&xv), &abs(&wv), &abs(&bv)).map_err(|e| e.to_string())?;
    let got = run(be, &xv, &wv, &bv).map_err(|e| format!("{}: {e}", be.device()))?;
    // At most c_in·kh·kw products reach one output.
    compare(
        &format!("{t:?} on {}", be.device()),
        &got,
        &want,
        &mag,
        c.c_in * c.kh * c.kw,
    )
}

#[test]
fn conv_transpose2d_emulated_matches_cpu() {
    let be = emulated();
    property(EMU_CASES, transpose_cases(1..=20), |t| {
        check_transpose(&be, t)
    });
}

#[test]
fn conv_transpose2d_wide_emulated_matches_cpu() {
    let be = emulated();
    property(8, transpose_cases(33..=80), |t| check_transpose(&be, t));
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn conv_transpose2d_cuda_matches_cpu() {
    let be = cuda();
    property(CUDA_CASES, transpose_cases(1..=20), |t| {
        check_transpose(&be, t)
    });
    property(CUDA_CASES, transpose_cases(33..=80), |t| {
        check_transpose(&be, t)
    });
}

/// Phases with no taps (kernel smaller than the stride: bias only), the
/// VQ-VAE decoder's 4×4 / stride 2 / pad 1, ragged tiles, output padding.
fn transpose_fixed() -> Vec<TransposeCase> {
    let case = |n, c_in, c_out, (h, w), k: usize, s: usize, p: usize, op: usize| TransposeCase {
        conv: ConvCase {
            n,
            c_in,
            c_out,
            h,
            w,
            kh: k,
            kw: k,
            stride: (s, s),
            pad: (p, p),
            bias: true,
            seed: (n * 1000 + c_in * 100 + c_out + k) as u64,
        },
        output_padding: (op, op),
    };
    vec![
        case(1, 3, 5, (4, 5), 1, 3, 0, 2),
        case(1, 4, 6, (5, 5), 2, 3, 0, 1),
        case(2, 16, 40, (9, 9), 4, 2, 1, 0),
        case(1, 8, 65, (8, 16), 4, 2, 1, 1),
        case(1, 20, 33, (12, 12), 5, 2, 2, 1),
        case(3, 2, 3, (7, 6), 3, 1, 1, 0),
    ]
}

#[test]
fn conv_transpose2d_fixed_emulated() {
    let be = emulated();
    for t in transpose_fixed() {
        check_transpose(&be, &t).unwrap();
    }
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn conv_transpose2d_fixed_cuda() {
    let be = cuda();
    for t in transpose_fixed() {
        check_transpose(&be, &t).unwrap();
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Asserts a shape error from `op` whose message names every string in `names`.
pub(super) fn assert_shape_err<T: Debug>(r: cellmorph::Result<T>, op: &str, names: &[&str]) {
    match r {
        Err(Error::Shape { op: got, msg }) => {
            assert_eq!(got, op, "{msg}");
            for n in names {
                assert!(msg.contains(n), "{op}: message {msg:?} does not name {n}");
            }
        }
        other => panic!("{op}: expected a shape error, got {other:?}"),
    }
}

fn errors_on(be: &Backend) {
    let t = |shape: &[usize]| Tensor::zeros(be, shape).unwrap();
    let p = Conv2dParams::new(1, 1);
    let (x, w) = (t(&[1, 3, 8, 8]), t(&[4, 3, 3, 3]));

    // Wrong input channels.
    assert_shape_err(
        ops::conv2d(be, &x, &t(&[4, 2, 3, 3]), None, p),
        "conv2d",
        &["[1, 3, 8, 8]", "[4, 2, 3, 3]"],
    );
    assert_shape_err(
        ops::conv2d_direct(be, &x, &t(&[4, 2, 3, 3]), None, p),
        "conv2d",
        &["[1, 3, 8, 8]", "[4, 2, 3, 3]"],
    );
    // Wrong bias length, for conv2d, its direct variant and the transposed conv
    // (linear: `linear::shape_errors_name_op_and_shapes`).
    assert_shape_err(
        ops::conv2d(be, &x, &w, Some(&t(&[5])), p),
        "conv2d",
        &["[5]", "[4]"],
    );
    assert_shape_err(
        ops::conv2d_direct(be, &x, &w, Some(&t(&[4, 1])), p),
        "conv2d_direct",
        &["[4, 1]", "[4]"],
    );
    let tp = ConvTranspose2dParams::new(2, 1);
    assert_shape_err(
        ops::conv_transpose2d(be, &x, &t(&[3, 6, 4, 4]), Some(&t(&[3])), tp),
        "conv_transpose2d",
        &["[3]", "[6]"],
    );
    // Transposed conv: the weight's first axis is c_in.
    assert_shape_err(
        ops::conv_transpose2d(be, &x, &t(&[4, 3, 4, 4]), None, tp),
        "conv_transpose2d",
        &["[1, 3, 8, 8]", "[4, 3, 4, 4]"],
    );
    // Preallocated outputs of the wrong shape.
    assert_shape_err(
        ops::conv2d_into(be, &x, &w, None, p, &mut t(&[1, 4, 7, 8])),
        "conv2d",
        &["[1, 4, 7, 8]", "[1, 4, 8, 8]"],
    );
    assert_shape_err(
        ops::conv_transpose2d_into(be, &x, &t(&[3, 6, 4, 4]), None, tp, &mut t(&[1, 6, 15, 16])),
        "conv_transpose2d",
        &["[1, 6, 15, 16]", "[1, 6, 16, 16]"],
    );
}

#[test]
fn shape_errors_name_op_and_shapes() {
    errors_on(&Backend::cpu());
    errors_on(&emulated());
}

#[test]
fn tensors_on_another_device_are_rejected() {
    let be = emulated();
    let cpu = Backend::cpu();
    let p = Conv2dParams::new(1, 1);
    let (x, w, b) = (
        Tensor::zeros(&be, &[1, 3, 8, 8]).unwrap(),
        Tensor::zeros(&be, &[4, 3, 3, 3]).unwrap(),
        Tensor::zeros(&be, &[4]).unwrap(),
    );
    let x_cpu = Tensor::zeros(&cpu, &[1, 3, 8, 8]).unwrap();
    let b_cpu = Tensor::zeros(&cpu, &[4]).unwrap();
    let mismatch = |r: cellmorph::Result<Tensor>, op: &str| match r {
        Err(Error::DeviceMismatch { op: got, .. }) => assert_eq!(got, op),
        other => panic!("{op}: expected a device mismatch, got {other:?}"),
    };
    mismatch(ops::conv2d(&be, &x_cpu, &w, None, p), "conv2d");
    mismatch(ops::conv2d(&be, &x, &w, Some(&b_cpu), p), "conv2d");
    mismatch(
        ops::conv2d_direct(&be, &x_cpu, &w, Some(&b), p),
        "conv2d_direct",
    );
    let mut y_cpu = Tensor::zeros(&cpu, &[1, 4, 8, 8]).unwrap();
    match ops::conv2d_into(&be, &x, &w, Some(&b), p, &mut y_cpu) {
        Err(Error::DeviceMismatch { op, .. }) => assert_eq!(op, "conv2d"),
        other => panic!("conv2d_into: expected a device mismatch, got {other:?}"),
    }
    let wt = Tensor::zeros(&be, &[3, 4, 4, 4]).unwrap();
    mismatch(
        ops::conv_transpose2d(&be, &x_cpu, &wt, None, ConvTranspose2dParams::new(2, 1)),
        "conv_transpose2d",
    );
}
