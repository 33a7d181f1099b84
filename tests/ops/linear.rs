//! The linear layer (`ops::linear`, run on the conv2d implicit-GEMM kernels
//! of `kernels/conv.cu` as a 1×1 conv) and its backward
//! (`ops::linear_backward`, the conv2d backward kernels), emulated and on
//! CUDA, against the CPU reference over random and fixed shapes; the
//! backward also against PyTorch (`tests/fixtures/ops_backward.safetensors`)
//! and for bit-identical reruns; then shape and device errors.
//!
//! Tolerance: that of the conv tests (tests/ops/conv.rs), with K = in for
//! the forward, K = out for dx and K = n (the batch) for dW and db; against
//! PyTorch the fixture's 1e-4 of the largest magnitude.

use cellmorph::io::TensorFile;
use cellmorph::ops;
use cellmorph::{Backend, Error, Tensor};
use proptest::prelude::*;

use super::conv::{
    abs, assert_shape_err, compare, cuda, emulated, property, CUDA_CASES, EMU_CASES,
};
use crate::common::data;

#[derive(Clone, Debug)]
struct LinearCase {
    n: usize,
    in_f: usize,
    out_f: usize,
    bias: bool,
    seed: u64,
}

fn linear_cases() -> impl Strategy<Value = LinearCase> {
    (
        1usize..=140,
        1usize..=300,
        1usize..=80,
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(n, in_f, out_f, bias, seed)| LinearCase {
            n,
            in_f,
            out_f,
            bias,
            seed,
        })
}

fn check_linear(be: &Backend, c: &LinearCase) -> Result<(), String> {
    let xv = data(c.seed, c.n * c.in_f);
    let wv = data(c.seed ^ 1, c.out_f * c.in_f);
    let bv = data(c.seed ^ 2, c.out_f);
    let run = |be: &Backend, xv: &[f32], wv: &[f32], bv: &[f32]| -> cellmorph::Result<Vec<f32>> {
        let x = Tensor::from_slice(be, &[c.n, c.in_f], xv)?;
        let w = Tensor::from_slice(be, &[c.out_f, c.in_f], wv)?;
        let b = Tensor::from_slice(be, &[c.out_f], bv)?;
        let y = ops::linear(be, &x, &w, c.bias.then_some(&b))?;
        assert_eq!(y.shape(), &[c.n, c.out_f]);
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
        c.in_f,
    )
}

#[test]
fn linear_emulated_matches_cpu() {
    let be = emulated();
    property(EMU_CASES, linear_cases(), |c| check_linear(&be, c));
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn linear_cuda_matches_cpu() {
    let be = cuda();
    property(CUDA_CASES, linear_cases(), |c| check_linear(&be, c));
}

/// M (batch) past the 128 tile, N past 64, K = 1024 (DenseNet's head).
fn linear_fixed() -> Vec<LinearCase> {
    let case = |n, in_f, out_f| LinearCase {
        n,
        in_f,
        out_f,
        bias: true,
        seed: (n * 7 + in_f * 3 + out_f) as u64,
    };
    vec![
        case(130, 9, 65),
        case(128, 8, 64),
        case(1, 1024, 3),
        case(4, 1024, 2),
    ]
}

#[test]
fn linear_fixed_emulated() {
    let be = emulated();
    for c in linear_fixed() {
        check_linear(&be, &c).unwrap();
    }
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn linear_fixed_cuda() {
    let be = cuda();
    for c in linear_fixed() {
        check_linear(&be, &c).unwrap();
    }
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// `linear_backward_into` on `be`, into gradients prefilled with NaN (an
/// element a kernel leaves unwritten fails the comparison).
fn backward_run(
    be: &Backend,
    c: &LinearCase,
    xv: &[f32],
    wv: &[f32],
    dyv: &[f32],
) -> cellmorph::Result<Grads> {
    let x = Tensor::from_slice(be, &[c.n, c.in_f], xv)?;
    let w = Tensor::from_slice(be, &[c.out_f, c.in_f], wv)?;
    let dy = Tensor::from_slice(be, &[c.n, c.out_f], dyv)?;
    let nan = |s: &[usize]| Tensor::from_slice(be, s, &vec![f32::NAN; s.iter().product()]);
    let (mut dx, mut dw, mut db) = (
        nan(&[c.n, c.in_f])?,
        nan(&[c.out_f, c.in_f])?,
        nan(&[c.out_f])?,
    );
    ops::linear_backward_into(be, &x, &w, &dy, &mut dx, &mut dw, c.bias.then_some(&mut db))?;
    let db = if c.bias { db.to_vec()? } else { Vec::new() };
    Ok((dx.to_vec()?, dw.to_vec()?, db))
}

fn check_linear_backward(be: &Backend, c: &LinearCase) -> Result<(), String> {
    let xv = data(c.seed, c.n * c.in_f);
    let wv = data(c.seed ^ 1, c.out_f * c.in_f);
    let dyv = data(c.seed ^ 2, c.n * c.out_f);
    let cpu = Backend::cpu();
    let want = backward_run(&cpu, c, &xv, &wv, &dyv).map_err(|e| e.to_string())?;
    let mag = backward_run(&cpu, c, &abs(&xv), &abs(&wv), &abs(&dyv)).map_err(|e| e.to_string())?;
    let got = backward_run(be, c, &xv, &wv, &dyv).map_err(|e| format!("{}: {e}", be.device()))?;
    let ctx = |what: &str| format!("{what} of {c:?} on {}", be.device());
    compare(&ctx("dx"), &got.0, &want.0, &mag.0, c.out_f)?;
    compare(&ctx("dw"), &got.1, &want.1, &mag.1, c.n)?;
    compare(&ctx("db"), &got.2, &want.2, &mag.2, c.n)
}

#[test]
fn linear_backward_emulated_matches_cpu() {
    let be = emulated();
    property(EMU_CASES, linear_cases(), |c| check_linear_backward(&be, c));
}

#[test]
#[ignore = "needs a CUDA device (none here, so it did not run): scripts/gpu-check.sh runs it with --include-ignored"]
fn linear_backward_cuda_matches_cpu() {
    let be = cuda();
    property(CUDA_CASES, linear_cases(), |c| {
        check_linear_backward(&be, c)
    });
    for c in linear_backward_fixed() {
        check_linear_backward(&be, &c).unwrap();
    }
}

/// The forward's tile edges, a batch of 257 (two chunks of the batch sum)
/// and 4100 (sixteen chunks), DenseNet's head (1024 → 2).
fn linear_backward_fixed() -> Vec<LinearCase> {
    let mut v = linear_fixed();
    let case = |n, in_f, out_f| LinearCase {
        n,
        in_f,
        out_f,
        bias: true,
        seed: (n * 7 + in_f * 3 + out_f) as u64,
    };
    v.extend([case(257, 5, 3), case(4100, 3, 2), case(32, 1024, 2)]);
    v
}

#[test]
fn linear_backward_fixed_emulated() {
    let be = emulated();
    for c in linear_backward_fixed() {
        check_linear_backward(&be, &c).unwrap();
    }
    assert_eq!(
        ops::conv_grad_chunks(4100).1,
        16,
        "4100 rows: sixteen chunks"
    );
}

/// Two runs give the same bits, with the batch sums in several chunks.
fn linear_backward_deterministic(be: &Backend) {
    let c = LinearCase {
        n: 1000,
        in_f: 7,
        out_f: 5,
        bias: true,
        seed: 3,
    };
    let (xv, wv, dyv) = (data(3, 7000), data(4, 35), data(5, 5000));
    let bits = |g: Grads| -> Vec<u32> {
        [g.0, g.1, g.2]
            .concat()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    let a = bits(backward_run(be, &c, &xv, &wv, &dyv).unwrap());
    let b = bits(backward_run(be, &c, &xv, &wv, &dyv).unwrap());
    assert!(a == b, "two runs on {} differ", be.device());
    assert!(
        ops::conv_grad_chunks(c.n).1 > 1,
        "the batch must span several chunks"
    );
}

#[test]
fn linear_backward_deterministic_emulated() {
    linear_backward_deterministic(&emulated());
}

#[test]
#[ignore = "needs a CUDA device (none here, so it did not run): scripts/gpu-check.sh runs it with --include-ignored"]
fn linear_backward_deterministic_cuda() {
    linear_backward_deterministic(&cuda());
}

/// The linear case of the PyTorch backward fixture on the emulated device.
#[test]
fn linear_backward_emulated_matches_pytorch() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ops_backward.safetensors"
    );
    let f = TensorFile::open(path).expect("ops_backward fixture");
    let t = |what: &str| {
        f.f32(&format!("linear.{what}"))
            .unwrap_or_else(|e| panic!("linear.{what}: {e}"))
    };
    let be = emulated();
    let up = |(s, v): (Vec<usize>, Vec<f32>)| Tensor::from_slice(&be, &s, &v).unwrap();
    let (x, w, dy) = (up(t("x")), up(t("weight")), up(t("dy")));
    let g = ops::linear_backward(&be, &x, &w, &dy, true).unwrap();
    let db = g.db.expect("a bias gradient was asked for");
    for (what, got) in [("dx", &g.dx), ("dweight", &g.dw), ("dbias", &db)] {
        let (got, want) = (got.to_vec().unwrap(), t(what).1);
        assert_eq!(got.len(), want.len(), "linear.{what}: length");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        // The fixture README's tolerance for op gradients.
        assert!(
            err <= 1e-4 * scale,
            "linear.{what}: max |Δ| {err:e} > 1e-4 × {scale:e}"
        );
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

fn errors_on(be: &Backend) {
    let t = |shape: &[usize]| Tensor::zeros(be, shape).unwrap();
    assert_shape_err(
        ops::linear(be, &t(&[2, 10]), &t(&[7, 10]), Some(&t(&[6]))),
        "linear",
        &["[6]", "[7]"],
    );
    // Features mismatch, and a non-matrix input.
    assert_shape_err(
        ops::linear(be, &t(&[2, 10]), &t(&[7, 9]), None),
        "linear",
        &["[2, 10]", "[7, 9]"],
    );
    assert_shape_err(
        ops::linear(be, &t(&[2, 10, 1]), &t(&[7, 10]), None),
        "linear",
        &["[2, 10, 1]"],
    );
    // A preallocated output of the wrong shape.
    assert_shape_err(
        ops::linear_into(be, &t(&[2, 10]), &t(&[7, 10]), None, &mut t(&[7, 2])),
        "linear",
        &["[7, 2]", "[2, 7]"],
    );
    // Backward: dy, dw and db shapes.
    let (x, w) = (t(&[2, 10]), t(&[7, 10]));
    assert_shape_err(
        ops::linear_backward(be, &x, &w, &t(&[2, 6]), false).map(|_| ()),
        "linear_backward",
        &["dy", "[2, 6]", "[2, 7]"],
    );
    assert_shape_err(
        ops::linear_backward_into(
            be,
            &x,
            &w,
            &t(&[2, 7]),
            &mut t(&[2, 10]),
            &mut t(&[10, 7]),
            None,
        ),
        "linear_backward",
        &["dw", "[10, 7]", "[7, 10]"],
    );
    assert_shape_err(
        ops::linear_backward_into(
            be,
            &x,
            &w,
            &t(&[2, 7]),
            &mut t(&[2, 10]),
            &mut t(&[7, 10]),
            Some(&mut t(&[6])),
        ),
        "linear_backward",
        &["db", "[6]", "[7]"],
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
    let lw = Tensor::zeros(&cpu, &[5, 3]).unwrap();
    let lx = Tensor::zeros(&be, &[2, 3]).unwrap();
    match ops::linear(&be, &lx, &lw, None) {
        Err(Error::DeviceMismatch { op, .. }) => assert_eq!(op, "linear"),
        other => panic!("linear: expected a device mismatch, got {other:?}"),
    }
}
