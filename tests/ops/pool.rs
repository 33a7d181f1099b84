//! Pooling (kernels/pool.cu: max, average and global average pooling, and
//! global average pooling's backward) against the CPU reference, on the emulated device and on a CUDA GPU when
//! there is one, plus the ops layer's shape errors.
//!
//! Inputs and runners: `super::support`. Tolerances, per op, with the reason:
//! - max pool: exact (a selection).
//! - average pools: the summation bound for any order, (terms)·ε·mean|x|
//!   over the window or plane (ε = f32 epsilon), which also covers the
//!   division.
//! - global average pool backward: exact (one division `dy / hw` per element,
//!   the CPU reference's operation).
//! - max and average pool backward: exact. The kernels gather, per input
//!   element, the covering windows' contributions in increasing (oy, ox)
//!   from 0 — the order in which the CPU reference scatters them — with the
//!   same argmax rule and the same `dy / divisor` division.

use cellmorph::geometry::Pool2dParams;
use cellmorph::{ops, Backend};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::support::{
    assert_close, cuda, emulated, exact, expect_shape_error, numel, ok, on_devices, pair, run,
    zeros, Rng, EPS,
};

#[derive(Debug, Clone)]
struct PoolCase {
    shape: [usize; 4],
    params: Pool2dParams,
    seed: u64,
}

/// Kernel 1–4, stride 1–3, padding ≤ kernel/2 per axis, both divisor rules;
/// the input is at least the kernel so every output exists.
fn pool_case() -> impl Strategy<Value = PoolCase> {
    (
        (1usize..=2, 1usize..=3, 1usize..=20, 1usize..=20),
        (1usize..=4, 1usize..=4, 1usize..=3, 1usize..=3),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_flat_map(
            |((n, c, h, w), (kh, kw, sh, sw), count_include_pad, seed)| {
                (0..=kh / 2, 0..=kw / 2).prop_map(move |(ph, pw)| PoolCase {
                    shape: [n, c, h.max(kh), w.max(kw)],
                    params: Pool2dParams {
                        kernel: (kh, kw),
                        stride: (sh, sw),
                        padding: (ph, pw),
                        count_include_pad,
                    },
                    seed,
                })
            },
        )
}

fn max_pool_matches_cpu(be: &Backend) {
    run(be, pool_case(), |be, case| {
        let data = Rng(case.seed).vec(numel(&case.shape), -4.0, 4.0);
        let (xc, xd) = pair(be, &case.shape, &data)?;
        let reference = ok(ok(ops::max_pool2d(&Backend::cpu(), &xc, case.params))?.to_vec())?;
        exact(
            &format!("max_pool2d {case:?}"),
            &reference,
            &ok(ok(ops::max_pool2d(be, &xd, case.params))?.to_vec())?,
        )
    });
}

fn avg_pool_matches_cpu(be: &Backend) {
    run(be, pool_case(), |be, case| {
        let data = Rng(case.seed).vec(numel(&case.shape), -4.0, 4.0);
        let (xc, xd) = pair(be, &case.shape, &data)?;
        let reference = ok(ok(ops::avg_pool2d(&Backend::cpu(), &xc, case.params))?.to_vec())?;
        let out = ok(ok(ops::avg_pool2d(be, &xd, case.params))?.to_vec())?;
        // Window of k terms, each |x| ≤ 4: summation bound k·ε·max|x|.
        let (kh, kw) = case.params.kernel;
        let tol = (kh * kw) as f32 * EPS * 4.0;
        assert_close(&format!("avg_pool2d {case:?}"), &reference, &out, |_| tol)
    });
}

/// Global average pooling against the CPU with the per-plane summation bound.
fn check_global_avg_pool(
    be: &Backend,
    ctx: &str,
    shape: &[usize],
    data: &[f32],
) -> Result<(), TestCaseError> {
    let hw = shape[2] * shape[3];
    let (xc, xd) = pair(be, shape, data)?;
    let reference = ok(ok(ops::global_avg_pool(&Backend::cpu(), &xc))?.to_vec())?;
    let out = ok(ok(ops::global_avg_pool(be, &xd))?.to_vec())?;
    prop_assert_eq!(reference.len(), shape[0] * shape[1]);
    assert_close(ctx, &reference, &out, |p| {
        let mean_abs = data[p * hw..][..hw].iter().map(|v| v.abs()).sum::<f32>() / hw as f32;
        hw as f32 * EPS * mean_abs
    })
}

fn global_avg_pool_matches_cpu(be: &Backend) {
    let case = (
        1usize..=3,
        1usize..=4,
        1usize..=64,
        1usize..=64,
        any::<u64>(),
    );
    run(be, case, |be, (n, c, h, w, seed)| {
        let shape = [n, c, h, w];
        let data = Rng(seed).vec(numel(&shape), -4.0, 4.0);
        check_global_avg_pool(
            be,
            &format!("global_avg_pool {shape:?} seed {seed}"),
            &shape,
            &data,
        )
    });
}

/// Planes of 160×160 (the VQ-VAE-2 input size) and an odd 301×299.
fn global_avg_pool_large_planes(be: &Backend) {
    let seed = 0x5eed_0002;
    for shape in [[1usize, 2, 160, 160], [1, 1, 301, 299]] {
        // Positive data so a lost or doubled element cannot cancel out.
        let data = Rng(seed).vec(numel(&shape), 0.0, 1.0);
        let ctx = format!("global_avg_pool {shape:?} seed {seed}");
        if let Err(e) = check_global_avg_pool(be, &ctx, &shape, &data) {
            panic!("on {}: {e}", be.device());
        }
    }
}

/// The gather backward of global average pooling against the CPU reference,
/// through both forms (the `_into` form into a prefilled `dx`).
fn global_avg_pool_backward_matches_cpu(be: &Backend) {
    let case = (
        1usize..=3,
        1usize..=4,
        1usize..=20,
        1usize..=20,
        any::<u64>(),
    );
    run(be, case, |be, (n, c, h, w, seed)| {
        let ctx = format!("global_avg_pool_backward [{n}, {c}, {h}, {w}] seed {seed}");
        let dy = Rng(seed).vec(n * c, -4.0, 4.0);
        let (dyc, dyd) = pair(be, &[n, c], &dy)?;
        let reference =
            ok(ok(ops::global_avg_pool_backward(&Backend::cpu(), &dyc, h, w))?.to_vec())?;
        let out = ok(ops::global_avg_pool_backward(be, &dyd, h, w))?;
        prop_assert_eq!(out.shape(), &[n, c, h, w]);
        exact(&ctx, &reference, &ok(out.to_vec())?)?;
        let mut dx = ok(cellmorph::Tensor::from_slice(
            be,
            &[n, c, h, w],
            &vec![7.0; n * c * h * w],
        ))?;
        ok(ops::global_avg_pool_backward_into(be, &dyd, &mut dx))?;
        exact(&format!("{ctx} (into)"), &reference, &ok(dx.to_vec())?)
    });
}

/// Data with ties: values from a small set, so that windows often hold
/// several maxima and the first-maximum rule decides.
fn tied_data(seed: u64, len: usize) -> Vec<f32> {
    Rng(seed)
        .vec(len, 0.0, 4.0)
        .into_iter()
        .map(f32::floor)
        .collect()
}

/// Max and average pooling backward against the CPU reference, through both
/// forms (the `_into` form into a `dx` prefilled with 7s), plus determinism.
fn pool_backward_matches_cpu(be: &Backend) {
    run(be, pool_case(), |be, case| {
        let ctx = format!("pool2d backward {case:?}");
        let x = if case.seed % 2 == 0 {
            tied_data(case.seed, numel(&case.shape))
        } else {
            Rng(case.seed).vec(numel(&case.shape), -4.0, 4.0)
        };
        let [n, c, h, w] = case.shape;
        let (xc, xd) = pair(be, &case.shape, &x)?;
        let out_shape = ok(ops::max_pool2d(&Backend::cpu(), &xc, case.params))?
            .shape()
            .to_vec();
        let dy = Rng(case.seed ^ 1).vec(numel(&out_shape), -4.0, 4.0);
        let (dyc, dyd) = pair(be, &out_shape, &dy)?;

        let reference = ok(ok(ops::max_pool2d_backward(
            &Backend::cpu(),
            &xc,
            &dyc,
            case.params,
        ))?
        .to_vec())?;
        let out = ok(ok(ops::max_pool2d_backward(be, &xd, &dyd, case.params))?.to_vec())?;
        exact(&format!("max {ctx}"), &reference, &out)?;
        let mut dx = ok(cellmorph::Tensor::from_slice(
            be,
            &case.shape,
            &vec![7.0; x.len()],
        ))?;
        ok(ops::max_pool2d_backward_into(
            be,
            &xd,
            &dyd,
            case.params,
            &mut dx,
        ))?;
        let again = ok(dx.to_vec())?;
        prop_assert!(
            again
                .iter()
                .zip(&out)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "max {}: two runs differ",
            ctx
        );

        let reference = ok(ok(ops::avg_pool2d_backward(
            &Backend::cpu(),
            &dyc,
            case.params,
            h,
            w,
        ))?
        .to_vec())?;
        let out = ok(ops::avg_pool2d_backward(be, &dyd, case.params, h, w))?;
        prop_assert_eq!(out.shape(), &[n, c, h, w]);
        let out = ok(out.to_vec())?;
        exact(&format!("avg {ctx}"), &reference, &out)?;
        let mut dx = ok(cellmorph::Tensor::from_slice(
            be,
            &case.shape,
            &vec![7.0; x.len()],
        ))?;
        ok(ops::avg_pool2d_backward_into(
            be,
            &dyd,
            case.params,
            &mut dx,
        ))?;
        let again = ok(dx.to_vec())?;
        prop_assert!(
            again
                .iter()
                .zip(&out)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "avg {}: two runs differ",
            ctx
        );
        Ok(())
    });
}

/// NaN and −∞ windows: the argmax rule's edge cases (a NaN replaces the best
/// so far; an all −∞ window picks its first element).
fn max_pool_backward_nan_and_infinity(be: &Backend) {
    let nan = f32::NAN;
    let ninf = f32::NEG_INFINITY;
    let x = [
        1.0, nan, 3.0, nan, //
        ninf, ninf, 2.0, 2.0, //
        ninf, ninf, nan, 0.5, //
        5.0, 5.0, 0.0, nan,
    ];
    let shape = [1, 1, 4, 4];
    let params = Pool2dParams::new(2, 1, 1);
    let (xc, xd) = pair(be, &shape, &x).expect("tensors");
    let out_shape = ops::max_pool2d(&Backend::cpu(), &xc, params)
        .expect("forward")
        .shape()
        .to_vec();
    let dy = Rng(3).vec(numel(&out_shape), -4.0, 4.0);
    let (dyc, dyd) = pair(be, &out_shape, &dy).expect("tensors");
    let reference = ops::max_pool2d_backward(&Backend::cpu(), &xc, &dyc, params)
        .and_then(|t| t.to_vec())
        .expect("cpu");
    let out = ops::max_pool2d_backward(be, &xd, &dyd, params)
        .and_then(|t| t.to_vec())
        .expect("device");
    if let Err(e) = exact("max_pool2d_backward NaN/−∞", &reference, &out) {
        panic!("on {}: {e}", be.device());
    }
}

on_devices!(
    pool_backward_matches_cpu,
    max_pool_backward_nan_and_infinity,
    global_avg_pool_backward_matches_cpu,
    max_pool_matches_cpu,
    avg_pool_matches_cpu,
    global_avg_pool_matches_cpu,
    global_avg_pool_large_planes,
);

#[test]
fn shape_errors() {
    let be = emulated();
    let x = zeros(&be, &[1, 2, 5, 5]);
    expect_shape_error(
        ops::global_avg_pool_backward(&be, &x, 3, 3),
        "global_avg_pool_backward",
        &["[n, c]", "[1, 2, 5, 5]"],
    );
    expect_shape_error(
        ops::global_avg_pool_backward_into(
            &be,
            &zeros(&be, &[1, 3]),
            &mut zeros(&be, &[1, 2, 5, 5]),
        ),
        "global_avg_pool_backward",
        &["dy", "[1, 3]", "[1, 2]"],
    );
    expect_shape_error(
        ops::max_pool2d(&be, &zeros(&be, &[2, 5, 5]), Pool2dParams::new(2, 2, 0)),
        "max_pool2d",
        &["[2, 5, 5]"],
    );
    expect_shape_error(
        ops::avg_pool2d(&be, &x, Pool2dParams::new(2, 1, 2)),
        "avg_pool2d",
        &["padding"],
    );
    expect_shape_error(
        ops::max_pool2d(&be, &x, Pool2dParams::new(7, 1, 0)),
        "max_pool2d",
        &["kernel"],
    );
    expect_shape_error(
        ops::max_pool2d_into(
            &be,
            &x,
            Pool2dParams::new(2, 2, 0),
            &mut zeros(&be, &[1, 2, 3, 3]),
        ),
        "max_pool2d",
        &["[1, 2, 3, 3]", "[1, 2, 2, 2]"],
    );
    expect_shape_error(
        ops::max_pool2d_backward(
            &be,
            &x,
            &zeros(&be, &[1, 2, 3, 3]),
            Pool2dParams::new(2, 2, 0),
        ),
        "max_pool2d_backward",
        &["dy", "[1, 2, 3, 3]", "[1, 2, 2, 2]"],
    );
    expect_shape_error(
        ops::max_pool2d_backward_into(
            &be,
            &x,
            &zeros(&be, &[1, 2, 2, 2]),
            Pool2dParams::new(2, 2, 0),
            &mut zeros(&be, &[1, 2, 4, 5]),
        ),
        "max_pool2d_backward",
        &["dx", "[1, 2, 4, 5]", "[1, 2, 5, 5]"],
    );
    expect_shape_error(
        ops::avg_pool2d_backward(
            &be,
            &zeros(&be, &[1, 2, 3, 3]),
            Pool2dParams::new(2, 2, 0),
            5,
            5,
        ),
        "avg_pool2d_backward",
        &["dy", "[1, 2, 3, 3]", "[1, 2, 2, 2]"],
    );
    expect_shape_error(
        ops::global_avg_pool(&be, &zeros(&be, &[2, 3])),
        "global_avg_pool",
        &["[2, 3]"],
    );
    expect_shape_error(
        ops::global_avg_pool_into(&be, &x, &mut zeros(&be, &[2, 1])),
        "global_avg_pool",
        &["[2, 1]", "[1, 2]"],
    );
}
