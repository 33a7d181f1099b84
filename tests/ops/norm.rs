//! BatchNorm inference (kernels/norm.cu: `batchnorm`, `batchnorm_relu`)
//! against the CPU reference, on the emulated device and on a CUDA GPU when
//! there is one, plus the ops layer's shape errors.
//!
//! Inputs and runners: `super::support`. Tolerances, per op, with the reason:
//! - batch norm: 4·ε·(|x·scale| + |mean·scale| + |beta|) absolute (ε = f32
//!   epsilon). nvcc contracts `x·scale + shift` and `beta − mean·scale` into
//!   FMAs, which skips one rounding in each, each at most ε/2 of those terms.

use cellmorph::{ops, Backend, Tensor};
use proptest::prelude::*;

use super::support::{
    assert_close, cuda, emulated, expect_shape_error, numel, ok, on_devices, pair, run, zeros, Rng,
    EPS,
};

/// BatchNorm inputs: `[n, c]` up to `[n, c, h, w]`.
fn bn_shape() -> impl Strategy<Value = Vec<usize>> {
    (
        1usize..=3,
        1usize..=8,
        prop::collection::vec(1usize..=20, 0..=2),
    )
        .prop_map(|(n, c, rest)| {
            let mut s = vec![n, c];
            s.extend(rest);
            s
        })
}

fn batchnorm_matches_cpu(be: &Backend) {
    run(be, (bn_shape(), any::<u64>()), |be, (shape, seed)| {
        let c = shape[1];
        let hw: usize = shape[2..].iter().product();
        let mut rng = Rng(seed);
        let x = rng.vec(numel(&shape), -4.0, 4.0);
        let gamma = rng.vec(c, -2.0, 2.0);
        let beta = rng.vec(c, -1.0, 1.0);
        let mean = rng.vec(c, -1.0, 1.0);
        let var = rng.vec(c, 0.05, 3.0);
        let eps = 1e-5;
        let (xc, xd) = pair(be, &shape, &x)?;
        let params: Vec<(Tensor, Tensor)> = [&gamma, &beta, &mean, &var]
            .iter()
            .map(|v| pair(be, &[c], v))
            .collect::<Result<_, _>>()?;
        let [g, b, m, v] = [0, 1, 2, 3].map(|i| &params[i]);
        // The FMA-contraction bound of the module doc, per element.
        let tol = |i: usize| {
            let ch = (i / hw) % c;
            let scale = (gamma[ch] / (var[ch] + eps).sqrt()).abs();
            4.0 * EPS * (x[i].abs() * scale + mean[ch].abs() * scale + beta[ch].abs())
        };
        let cpu = Backend::cpu();
        let reference = ok(ok(ops::batchnorm(&cpu, &xc, &g.0, &b.0, &m.0, &v.0, eps))?.to_vec())?;
        let out = ok(ok(ops::batchnorm(be, &xd, &g.1, &b.1, &m.1, &v.1, eps))?.to_vec())?;
        assert_close(
            &format!("batchnorm {shape:?} seed {seed}"),
            &reference,
            &out,
            tol,
        )?;
        let reference =
            ok(ok(ops::batchnorm_relu(&cpu, &xc, &g.0, &b.0, &m.0, &v.0, eps))?.to_vec())?;
        prop_assert!(
            reference.iter().all(|&r| r >= 0.0),
            "CPU batchnorm_relu left a negative value"
        );
        let out = ok(ok(ops::batchnorm_relu(be, &xd, &g.1, &b.1, &m.1, &v.1, eps))?.to_vec())?;
        assert_close(
            &format!("batchnorm_relu {shape:?} seed {seed}"),
            &reference,
            &out,
            tol,
        )
    });
}

on_devices!(batchnorm_matches_cpu);

#[test]
fn shape_errors() {
    let be = emulated();
    let x = zeros(&be, &[2, 3, 4, 4]);
    let (c3, c4) = (zeros(&be, &[3]), zeros(&be, &[4]));
    expect_shape_error(
        ops::batchnorm(&be, &x, &c3, &c3, &c4, &c3, 1e-5),
        "batchnorm",
        &["mean", "[4]", "[3]"],
    );
    expect_shape_error(
        ops::batchnorm_relu(&be, &zeros(&be, &[3]), &c3, &c3, &c3, &c3, 1e-5),
        "batchnorm_relu",
        &["[3]"],
    );
}
