//! The activations and other element-wise ops (kernels/activation.cu:
//! ReLU, LeakyReLU, sigmoid, add, softmax, dropout, and the backward passes
//! of ReLU, LeakyReLU, sigmoid and dropout) against the CPU reference, on the
//! emulated device and on a CUDA GPU when there is one, plus the ops layer's
//! shape and device errors. Also here: NaN and ±∞ through the ops that must
//! pass them on (max pooling among them), and the grid-stride loops of the
//! capped launch grids (ReLU's 1-D grid and upsampling's planes on grid.y).
//!
//! Inputs and runners: `super::support`. Tolerances, per op, with the reason:
//! - ReLU, LeakyReLU, add, max pool: exact. Each output is a selection or one
//!   correctly rounded IEEE operation on every device.
//! - ReLU, LeakyReLU and sigmoid backward: exact. Each dx element is a
//!   selection, one product or `dy·y·(1−y)` evaluated with the reference's
//!   operations in the reference's order (no FMA contraction is possible), so
//!   every device gives the reference's bits.
//! - dropout and its backward: exact. The mask is integer arithmetic and one
//!   exact f32 comparison (`crate::rng::dropout_keep`), each kept element
//!   one product by the same f32 scale on every device.
//! - sigmoid: 1e-6 relative. CUDA's `expf` is within 2 ulp of libm's, which
//!   moves `1/(1+e)` by at most ~3 ulp (3.6e-7 relative).
//! - softmax: (dim + 8)·ε relative (ε = f32 epsilon). The row sum is
//!   accumulated in another order than the reference's (error ≤
//!   (dim − 1)·ε/2 relative, Higham), plus `expf` and the division.

use cellmorph::geometry::Pool2dParams;
use cellmorph::{ops, Backend, Error, Tensor};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::support::{
    any_shape, assert_close, cuda, emulated, exact, expect_shape_error, numel, ok, on_devices,
    pair, run, zeros, Rng, EPS,
};

fn relu_matches_cpu(be: &Backend) {
    run(be, (any_shape(), any::<u64>()), |be, (shape, seed)| {
        let ctx = format!("relu {shape:?} seed {seed}");
        let data = Rng(seed).vec(numel(&shape), -4.0, 4.0);
        let (xc, xd) = pair(be, &shape, &data)?;
        let reference = ok(ok(ops::relu(&Backend::cpu(), &xc))?.to_vec())?;
        exact(&ctx, &reference, &ok(ok(ops::relu(be, &xd))?.to_vec())?)?;
        let mut y = ok(Tensor::from_slice(be, &shape, &vec![7.0; data.len()]))?;
        ok(ops::relu_into(be, &xd, &mut y))?;
        exact(&format!("{ctx} (into)"), &reference, &ok(y.to_vec())?)?;
        let mut x = xd;
        ok(ops::relu_inplace(be, &mut x))?;
        exact(&format!("{ctx} (in place)"), &reference, &ok(x.to_vec())?)
    });
}

fn leaky_relu_matches_cpu(be: &Backend) {
    run(
        be,
        (any_shape(), 0.0f32..0.5, any::<u64>()),
        |be, (shape, slope, seed)| {
            let ctx = format!("leaky_relu {shape:?} slope {slope} seed {seed}");
            let data = Rng(seed).vec(numel(&shape), -4.0, 4.0);
            let (xc, xd) = pair(be, &shape, &data)?;
            let reference = ok(ok(ops::leaky_relu(&Backend::cpu(), &xc, slope))?.to_vec())?;
            exact(
                &ctx,
                &reference,
                &ok(ok(ops::leaky_relu(be, &xd, slope))?.to_vec())?,
            )
        },
    );
}

fn sigmoid_matches_cpu(be: &Backend) {
    run(be, (any_shape(), any::<u64>()), |be, (shape, seed)| {
        let ctx = format!("sigmoid {shape:?} seed {seed}");
        let data = Rng(seed).vec(numel(&shape), -12.0, 12.0);
        let (xc, xd) = pair(be, &shape, &data)?;
        let reference = ok(ok(ops::sigmoid(&Backend::cpu(), &xc))?.to_vec())?;
        let out = ok(ok(ops::sigmoid(be, &xd))?.to_vec())?;
        assert_close(&ctx, &reference, &out, |i| 1e-6 * reference[i].abs())
    });
}

/// The backward ops against the CPU reference: `saved` (x for ReLU and
/// LeakyReLU, y for sigmoid) and `dy` random, `dx` bit-exact, through both the
/// allocating and the `_into` forms. x includes exact zeros (ReLU's kink).
fn activation_backward_matches_cpu(be: &Backend) {
    run(
        be,
        (any_shape(), 0.0f32..0.5, any::<u64>()),
        |be, (shape, slope, seed)| {
            let ctx = format!("backward {shape:?} slope {slope} seed {seed}");
            let n = numel(&shape);
            let mut rng = Rng(seed);
            let mut x = rng.vec(n, -4.0, 4.0);
            for v in x.iter_mut().step_by(7) {
                *v = 0.0;
            }
            let y = rng.vec(n, 0.0, 1.0);
            let dy = rng.vec(n, -2.0, 2.0);
            let cpu = Backend::cpu();
            let (xc, xd) = pair(be, &shape, &x)?;
            let (yc, yd) = pair(be, &shape, &y)?;
            let (dyc, dyd) = pair(be, &shape, &dy)?;

            let reference = ok(ok(ops::relu_backward(&cpu, &xc, &dyc))?.to_vec())?;
            exact(
                &format!("relu {ctx}"),
                &reference,
                &ok(ok(ops::relu_backward(be, &xd, &dyd))?.to_vec())?,
            )?;
            let mut dx = ok(Tensor::from_slice(be, &shape, &vec![7.0; n]))?;
            ok(ops::relu_backward_into(be, &xd, &dyd, &mut dx))?;
            exact(&format!("relu {ctx} (into)"), &reference, &ok(dx.to_vec())?)?;

            let reference = ok(ok(ops::leaky_relu_backward(&cpu, &xc, &dyc, slope))?.to_vec())?;
            exact(
                &format!("leaky_relu {ctx}"),
                &reference,
                &ok(ok(ops::leaky_relu_backward(be, &xd, &dyd, slope))?.to_vec())?,
            )?;
            let mut dx = ok(Tensor::from_slice(be, &shape, &vec![7.0; n]))?;
            ok(ops::leaky_relu_backward_into(be, &xd, &dyd, slope, &mut dx))?;
            exact(
                &format!("leaky_relu {ctx} (into)"),
                &reference,
                &ok(dx.to_vec())?,
            )?;

            let reference = ok(ok(ops::sigmoid_backward(&cpu, &yc, &dyc))?.to_vec())?;
            exact(
                &format!("sigmoid {ctx}"),
                &reference,
                &ok(ok(ops::sigmoid_backward(be, &yd, &dyd))?.to_vec())?,
            )?;
            let mut dx = ok(Tensor::from_slice(be, &shape, &vec![7.0; n]))?;
            ok(ops::sigmoid_backward_into(be, &yd, &dyd, &mut dx))?;
            exact(
                &format!("sigmoid {ctx} (into)"),
                &reference,
                &ok(dx.to_vec())?,
            )
        },
    );
}

fn add_matches_cpu(be: &Backend) {
    run(be, (any_shape(), any::<u64>()), |be, (shape, seed)| {
        let ctx = format!("add {shape:?} seed {seed}");
        let mut rng = Rng(seed);
        let (a, b) = (
            rng.vec(numel(&shape), -4.0, 4.0),
            rng.vec(numel(&shape), -4.0, 4.0),
        );
        let ((ac, ad), (bc, bd)) = (pair(be, &shape, &a)?, pair(be, &shape, &b)?);
        let reference = ok(ok(ops::add(&Backend::cpu(), &ac, &bc))?.to_vec())?;
        exact(&ctx, &reference, &ok(ok(ops::add(be, &ad, &bd))?.to_vec())?)?;
        let mut y = ok(Tensor::zeros(be, &shape))?;
        ok(ops::add_into(be, &ad, &bd, &mut y))?;
        exact(&format!("{ctx} (into)"), &reference, &ok(y.to_vec())?)
    });
}

/// Softmax on `be` against the CPU, and every row of the output summing to 1.
fn check_softmax(
    be: &Backend,
    ctx: &str,
    shape: &[usize],
    axis: usize,
    data: &[f32],
) -> Result<(), TestCaseError> {
    let (xc, xd) = pair(be, shape, data)?;
    let reference = ok(ok(ops::softmax(&Backend::cpu(), &xc, axis))?.to_vec())?;
    let out = ok(ok(ops::softmax(be, &xd, axis))?.to_vec())?;
    let dim = shape[axis];
    let rtol = (dim as f32 + 8.0) * EPS;
    assert_close(ctx, &reference, &out, |i| rtol * reference[i].abs())?;
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    for o in 0..outer {
        for j in 0..inner {
            let sum: f32 = (0..dim).map(|d| out[(o * dim + d) * inner + j]).sum();
            // Each term within rtol, plus the summation of dim terms ≤ 1.
            prop_assert!(
                (sum - 1.0).abs() <= 2.0 * rtol,
                "{}: row ({}, {}) sums to {}",
                ctx,
                o,
                j,
                sum
            );
        }
    }
    Ok(())
}

fn softmax_matches_cpu(be: &Backend) {
    let case = prop::collection::vec(1usize..=10, 1..=4)
        .prop_flat_map(|shape| {
            let rank = shape.len();
            (Just(shape), 0..rank)
        })
        .prop_flat_map(|(shape, axis)| (Just(shape), Just(axis), any::<u64>()));
    run(be, case, |be, (shape, axis, seed)| {
        let data = Rng(seed).vec(numel(&shape), -8.0, 8.0);
        check_softmax(
            be,
            &format!("softmax {shape:?} axis {axis} seed {seed}"),
            &shape,
            axis,
            &data,
        )
    });
}

/// Rows of thousands, both along the last axis (a warp per row) and strided.
fn softmax_long_rows(be: &Backend) {
    let seed = 0x5eed_0001;
    for (shape, axis) in [
        (vec![3usize, 3000], 1usize),
        (vec![3000, 3], 0),
        (vec![2, 1500, 2], 1),
    ] {
        let data = Rng(seed).vec(numel(&shape), -20.0, 20.0);
        let ctx = format!("softmax {shape:?} axis {axis} seed {seed}");
        if let Err(e) = check_softmax(be, &ctx, &shape, axis, &data) {
            panic!("on {}: {e}", be.device());
        }
    }
}

/// NaN and ±∞ through the ops that must pass them on like PyTorch: ReLU
/// keeps NaN, max pooling lets a NaN win, sigmoid saturates to 0 and 1.
fn special_values_match_cpu(be: &Backend) {
    let data = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        0.0,
        -1.5,
        2.5,
        f32::MAX,
        -100.0,
        100.0,
        1e-30,
        -1e-30,
    ];
    let shape = [1usize, 3, 2, 2];
    let check = || -> Result<(), TestCaseError> {
        let (xc, xd) = pair(be, &shape, &data)?;
        let cpu = Backend::cpu();
        type Unary = fn(&Backend, &Tensor) -> cellmorph::Result<Tensor>;
        let unary: [(&str, Unary); 4] = [
            ("relu", ops::relu),
            ("sigmoid", ops::sigmoid),
            ("leaky_relu", |be, x| ops::leaky_relu(be, x, 0.2)),
            ("max_pool2d", |be, x| {
                ops::max_pool2d(be, x, Pool2dParams::new(2, 1, 1))
            }),
        ];
        for (name, f) in unary {
            let reference = ok(ok(f(&cpu, &xc))?.to_vec())?;
            let out = ok(ok(f(be, &xd))?.to_vec())?;
            // Bit-exact except sigmoid's expf (see the module doc).
            assert_close(&format!("{name} on {data:?}"), &reference, &out, |i| {
                1e-6 * reference[i].abs()
            })?;
        }
        let nan_pool = ok(ok(ops::max_pool2d(be, &xd, Pool2dParams::new(2, 2, 0)))?.to_vec())?;
        prop_assert!(
            nan_pool[0].is_nan(),
            "max pool over a window with NaN gave {}",
            nan_pool[0]
        );
        Ok(())
    };
    if let Err(e) = check() {
        panic!("on {}: {e}", be.device());
    }
}

/// Enough elements and planes that the capped grids (8192 blocks in x, 65535
/// in y) make every grid-stride loop take more than one step.
fn grid_stride_loops(be: &Backend) {
    let check = || -> Result<(), TestCaseError> {
        let n = 8192 * 256 + 4099;
        let data = Rng(0x5eed_0003).vec(n, -1.0, 1.0);
        let (xc, xd) = pair(be, &[n], &data)?;
        let reference = ok(ok(ops::relu(&Backend::cpu(), &xc))?.to_vec())?;
        exact(
            &format!("relu [{n}]"),
            &reference,
            &ok(ok(ops::relu(be, &xd))?.to_vec())?,
        )?;

        let shape = [65_540usize, 1, 1, 1];
        let data = Rng(0x5eed_0004).vec(shape[0], -1.0, 1.0);
        let (xc, xd) = pair(be, &shape, &data)?;
        let reference = ok(ok(ops::upsample_nearest2x(&Backend::cpu(), &xc))?.to_vec())?;
        exact(
            &format!("upsample {shape:?}"),
            &reference,
            &ok(ok(ops::upsample_nearest2x(be, &xd))?.to_vec())?,
        )
    };
    if let Err(e) = check() {
        panic!("on {}: {e}", be.device());
    }
}

/// The dropout mask and values equal the CPU's bit for bit, over a few
/// thousand elements and several (seed, step, p), forward and backward; the
/// kept elements are exactly those of `rng::dropout_keep`.
fn dropout_matches_cpu(be: &Backend) {
    let n = 4099;
    let x: Vec<f32> = Rng(11).vec(n, -3.0, 3.0);
    let cpu = Backend::cpu();
    let (xc, xd) = pair(be, &[n], &x).unwrap();
    let keys = [(0u64, 0u64), (1, 2), (u64::MAX, 7), (12_345, 1 << 40)];
    for (seed, step) in keys {
        for p in [0.1f32, 0.5, 0.9] {
            let ctx = format!("dropout seed {seed} step {step} p {p} on {}", be.device());
            let want = ops::dropout(&cpu, &xc, seed, step, p)
                .unwrap()
                .to_vec()
                .unwrap();
            let got = ops::dropout(be, &xd, seed, step, p)
                .unwrap()
                .to_vec()
                .unwrap();
            let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
            assert!(
                bits(&want) == bits(&got),
                "{ctx}: forward differs from the CPU"
            );
            let scale = 1.0 / (1.0 - p);
            for (i, (&g, &xi)) in got.iter().zip(&x).enumerate() {
                let keep = cellmorph::rng::dropout_keep(seed, step, i as u64, p);
                let expect = if keep { xi * scale } else { xi * 0.0 };
                assert_eq!(g.to_bits(), expect.to_bits(), "{ctx}: element {i}");
            }
            let kept = (0..n as u64)
                .filter(|&i| cellmorph::rng::dropout_keep(seed, step, i, p))
                .count() as f32;
            // Binomial: 5 standard deviations of n·p·(1 − p) ≤ 160 elements.
            assert!(
                (kept - n as f32 * (1.0 - p)).abs() < 160.0,
                "{ctx}: kept {kept}"
            );
            let want = ops::dropout_backward(&cpu, &xc, seed, step, p)
                .unwrap()
                .to_vec()
                .unwrap();
            let got = ops::dropout_backward(be, &xd, seed, step, p)
                .unwrap()
                .to_vec()
                .unwrap();
            assert!(
                bits(&want) == bits(&got),
                "{ctx}: backward differs from the CPU"
            );
        }
    }
    // p = 0 is the identity; NaN is never dropped to a plain 0.
    let y = ops::dropout(be, &xd, 3, 4, 0.0).unwrap().to_vec().unwrap();
    assert!(
        y.iter().zip(&x).all(|(a, b)| a.to_bits() == b.to_bits()),
        "p = 0 is not the identity"
    );
    let nan = Tensor::from_slice(be, &[64], &[f32::NAN; 64]).unwrap();
    let y = ops::dropout(be, &nan, 3, 4, 0.5).unwrap().to_vec().unwrap();
    assert!(
        y.iter().all(|v| v.is_nan()),
        "dropout turned a NaN into a number"
    );
    // p outside [0, 1) is an error, on the CPU and the device alike.
    for bad in [1.0f32, -0.1, 1.5, f32::NAN] {
        for b in [&cpu, be] {
            let x = if b.device() == be.device() { &xd } else { &xc };
            match ops::dropout(b, x, 1, 1, bad) {
                Err(Error::Invalid(msg)) => assert!(msg.contains("[0, 1)"), "{msg}"),
                other => panic!("p = {bad}: expected an invalid-argument error, got {other:?}"),
            }
            assert!(
                ops::dropout_backward(b, x, 1, 1, bad).is_err(),
                "backward p = {bad}"
            );
        }
    }
}

on_devices!(
    dropout_matches_cpu,
    relu_matches_cpu,
    leaky_relu_matches_cpu,
    sigmoid_matches_cpu,
    activation_backward_matches_cpu,
    add_matches_cpu,
    softmax_matches_cpu,
    softmax_long_rows,
    special_values_match_cpu,
    grid_stride_loops,
);

#[test]
fn shape_errors() {
    let be = emulated();
    let a = zeros(&be, &[2, 3]);
    expect_shape_error(
        ops::add(&be, &a, &zeros(&be, &[3, 2])),
        "add",
        &["[2, 3]", "[3, 2]"],
    );
    expect_shape_error(
        ops::relu_into(&be, &a, &mut zeros(&be, &[6])),
        "relu",
        &["[6]", "[2, 3]"],
    );
    expect_shape_error(
        ops::sigmoid_into(&be, &a, &mut zeros(&be, &[2, 4])),
        "sigmoid",
        &["[2, 4]", "[2, 3]"],
    );
    expect_shape_error(ops::softmax(&be, &a, 2), "softmax", &["axis 2", "[2, 3]"]);
    expect_shape_error(
        ops::relu_backward(&be, &a, &zeros(&be, &[3, 2])),
        "relu_backward",
        &["dy", "[3, 2]", "[2, 3]"],
    );
    expect_shape_error(
        ops::leaky_relu_backward_into(&be, &a, &a, 0.1, &mut zeros(&be, &[6])),
        "leaky_relu_backward",
        &["dx", "[6]", "[2, 3]"],
    );
    expect_shape_error(
        ops::sigmoid_backward(&be, &a, &zeros(&be, &[2])),
        "sigmoid_backward",
        &["dy", "[2]", "[2, 3]"],
    );
}

#[test]
fn tensors_from_another_device_are_rejected() {
    let be = emulated();
    let host = zeros(&Backend::cpu(), &[4]);
    match ops::relu(&be, &host) {
        Err(Error::DeviceMismatch { op, .. }) => assert_eq!(op, "relu"),
        other => panic!("expected a device mismatch, got {other:?}"),
    }
}
