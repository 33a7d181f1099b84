//! The linear layer (`ops::linear`, run on the conv2d implicit-GEMM kernels
//! of `kernels/conv.cu` as a 1×1 conv), emulated and on CUDA, against the
//! CPU reference over random and fixed shapes; then shape and device errors.
//!
//! Tolerance: that of the conv tests (tests/ops/conv.rs), with K = in.

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
