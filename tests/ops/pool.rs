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

on_devices!(
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
