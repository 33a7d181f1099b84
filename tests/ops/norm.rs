//! BatchNorm (kernels/norm.cu) against the CPU reference, on the emulated
//! device and on a CUDA GPU when there is one: inference (`batchnorm`,
//! `batchnorm_relu`), training mode (`batchnorm_train`: output, saved
//! statistics, running statistics) and its backward
//! (`batchnorm_train_backward`), over random shapes and shapes at the chunk
//! edges of the deterministic per-channel sums; training mode also against
//! PyTorch (`tests/fixtures/ops_backward.safetensors`) and for bit-identical
//! reruns; plus the ops layer's shape errors.
//!
//! Inputs and runners: `super::support`. Tolerances, per op, with the reason:
//! - batch norm (inference, and the training output `y`):
//!   4·ε·(|x·scale| + |mean·scale| + |beta|) absolute (ε = f32 epsilon).
//!   nvcc contracts `x·scale + shift` and `beta − mean·scale` into FMAs,
//!   which skips one rounding in each, each at most ε/2 of those terms.
//! - training statistics (saved mean and 1/std, running mean and variance)
//!   and the parameter gradients (dgamma, dbeta): 2·ε·|ref| + 1e-10. Device
//!   and CPU evaluate the same f64 expressions and differ only in the order
//!   of the f64 sums (relative error ≤ m·2⁻⁵³ ≈ 1e-12 for the m ≤ 5·10³
//!   values of a channel here), so after the cast to f32 they are at most one
//!   f32 rounding apart; 1e-10 absolute covers sums that cancel to ~0.
//! - dx: 2·ε·|k|·(|dbeta| + |x̂·dgamma|) + ε·|dx| with k = gamma·inv_std/m:
//!   dx is one f64 expression rounded once, from the f32 dbeta and dgamma,
//!   which may each be one f32 rounding away from the reference's.
//! - against PyTorch: the fixture's 1e-4 of the largest magnitude (see
//!   `super::golden_backward`).

use cellmorph::io::TensorFile;
use cellmorph::{ops, Backend, Error, Tensor};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::Value;

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

/// Everything one training-mode forward and backward produces, as host vectors:
/// y, save_mean, save_inv_std, running_mean, running_var, dx, dgamma, dbeta.
#[derive(PartialEq)]
struct TrainOut {
    y: Vec<f32>,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
    dx: Vec<f32>,
    dgamma: Vec<f32>,
    dbeta: Vec<f32>,
}

/// Training-mode inputs: x, gamma, beta, running mean and variance, dy.
struct TrainIn {
    shape: Vec<usize>,
    x: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
    dy: Vec<f32>,
}

impl TrainIn {
    fn seeded(shape: &[usize], seed: u64) -> TrainIn {
        let c = shape[1];
        let mut rng = Rng(seed);
        // A common offset, so the mean is far from 0 as in real activations.
        let offset = rng.uniform(-3.0, 3.0);
        TrainIn {
            shape: shape.to_vec(),
            x: rng
                .vec(numel(shape), -2.0, 2.0)
                .iter()
                .map(|v| v + offset)
                .collect(),
            gamma: rng.vec(c, -2.0, 2.0),
            beta: rng.vec(c, -1.0, 1.0),
            running_mean: rng.vec(c, -1.0, 1.0),
            running_var: rng.vec(c, 0.5, 2.0),
            dy: rng.vec(numel(shape), -1.0, 1.0),
        }
    }
}

const BN_EPS: f32 = 1e-5;
const BN_MOMENTUM: f32 = 0.1;

/// One training-mode forward and backward on `be`; outputs start as NaN so
/// an element a kernel leaves unwritten fails the comparison.
fn train_run(be: &Backend, t: &TrainIn) -> cellmorph::Result<TrainOut> {
    let c = t.shape[1];
    let up = |s: &[usize], v: &[f32]| Tensor::from_slice(be, s, v);
    let nan = |s: &[usize]| Tensor::from_slice(be, s, &vec![f32::NAN; numel(s)]);
    let (x, gamma, beta, dy) = (
        up(&t.shape, &t.x)?,
        up(&[c], &t.gamma)?,
        up(&[c], &t.beta)?,
        up(&t.shape, &t.dy)?,
    );
    let (mut rm, mut rv) = (up(&[c], &t.running_mean)?, up(&[c], &t.running_var)?);
    let (mut mean, mut inv_std, mut y) = (nan(&[c])?, nan(&[c])?, nan(&t.shape)?);
    ops::batchnorm_train_into(
        be,
        &x,
        &gamma,
        &beta,
        BN_EPS,
        BN_MOMENTUM,
        &mut rm,
        &mut rv,
        &mut mean,
        &mut inv_std,
        &mut y,
    )?;
    let (mut dx, mut dgamma, mut dbeta) = (nan(&t.shape)?, nan(&[c])?, nan(&[c])?);
    ops::batchnorm_train_backward_into(
        be,
        &x,
        &gamma,
        &mean,
        &inv_std,
        &dy,
        &mut dx,
        &mut dgamma,
        &mut dbeta,
    )?;
    Ok(TrainOut {
        y: y.to_vec()?,
        mean: mean.to_vec()?,
        inv_std: inv_std.to_vec()?,
        running_mean: rm.to_vec()?,
        running_var: rv.to_vec()?,
        dx: dx.to_vec()?,
        dgamma: dgamma.to_vec()?,
        dbeta: dbeta.to_vec()?,
    })
}

/// Runs `t` on `be` and on the CPU and compares everything with the
/// tolerances of the module docs.
fn train_check(be: &Backend, t: &TrainIn, ctx: &str) -> Result<(), TestCaseError> {
    let (c, hw) = (t.shape[1], t.shape[2..].iter().product::<usize>());
    let m = (t.shape[0] * hw) as f32;
    let want = ok(train_run(&Backend::cpu(), t))?;
    let got = ok(train_run(be, t))?;
    let ch = |i: usize| (i / hw) % c;
    let ctx = |what: &str| format!("{what} of batchnorm_train {ctx} on {}", be.device());
    let y_tol = |i: usize| {
        let scale = (t.gamma[ch(i)] * want.inv_std[ch(i)]).abs();
        4.0 * EPS * (t.x[i].abs() * scale + want.mean[ch(i)].abs() * scale + t.beta[ch(i)].abs())
    };
    assert_close(&ctx("y"), &want.y, &got.y, y_tol)?;
    let stat = |what: &str, r: &[f32], o: &[f32]| {
        assert_close(&ctx(what), r, o, |i| 2.0 * EPS * r[i].abs() + 1e-10)
    };
    stat("save_mean", &want.mean, &got.mean)?;
    stat("save_inv_std", &want.inv_std, &got.inv_std)?;
    stat("running_mean", &want.running_mean, &got.running_mean)?;
    stat("running_var", &want.running_var, &got.running_var)?;
    stat("dgamma", &want.dgamma, &got.dgamma)?;
    stat("dbeta", &want.dbeta, &got.dbeta)?;
    let dx_tol = |i: usize| {
        let k = (t.gamma[ch(i)] * want.inv_std[ch(i)] / m).abs();
        let xhat = (t.x[i] - want.mean[ch(i)]) * want.inv_std[ch(i)];
        2.0 * EPS * k * (want.dbeta[ch(i)].abs() + (xhat * want.dgamma[ch(i)]).abs())
            + EPS * want.dx[i].abs()
    };
    assert_close(&ctx("dx"), &want.dx, &got.dx, dx_tol)
}

fn batchnorm_train_matches_cpu(be: &Backend) {
    run(be, (bn_shape(), any::<u64>()), |be, (shape, seed)| {
        train_check(
            be,
            &TrainIn::seeded(&shape, seed),
            &format!("{shape:?} seed {seed}"),
        )
    });
}

/// Shapes at the chunk edges of the per-channel sums (`ops::batchnorm_chunks`:
/// at most 16 chunks of at least 256 values): one value (the running variance
/// stays), 256 and 257 values (one and two chunks), chunk boundaries inside an
/// image, sixteen chunks, an `[n, c]` input.
fn train_fixed_shapes() -> Vec<Vec<usize>> {
    vec![
        vec![1, 3, 1, 1],
        vec![1, 2, 16, 16],
        vec![1, 2, 1, 257],
        vec![3, 2, 10, 10],
        vec![2, 3, 48, 48],
        vec![37, 5],
    ]
}

fn batchnorm_train_fixed_shapes(be: &Backend) {
    for (i, shape) in train_fixed_shapes().into_iter().enumerate() {
        let t = TrainIn::seeded(&shape, 100 + i as u64);
        if let Err(e) = train_check(be, &t, &format!("{shape:?}")) {
            panic!("{e}");
        }
        if shape[0] * shape[2..].iter().product::<usize>() == 1 {
            let out = train_run(be, &t).unwrap();
            assert_eq!(
                out.running_var, t.running_var,
                "one value per channel: running_var must stay"
            );
        }
    }
    let (_, parts) = ops::batchnorm_chunks(2 * 48 * 48);
    assert_eq!(
        parts, 16,
        "the largest fixed shape must reach sixteen chunks"
    );
}

/// Two runs give the same bits (no atomics; chunks by shape only).
fn batchnorm_train_deterministic(be: &Backend) {
    let t = TrainIn::seeded(&[3, 4, 17, 19], 7);
    let (a, b) = (train_run(be, &t).unwrap(), train_run(be, &t).unwrap());
    let bits = |o: &TrainOut| -> Vec<u32> {
        [
            &o.y,
            &o.mean,
            &o.inv_std,
            &o.running_mean,
            &o.running_var,
            &o.dx,
            &o.dgamma,
            &o.dbeta,
        ]
        .iter()
        .flat_map(|v| v.iter().map(|x| x.to_bits()))
        .collect()
    };
    assert!(bits(&a) == bits(&b), "two runs on {} differ", be.device());
    assert!(
        ops::batchnorm_chunks(3 * 17 * 19).1 > 1,
        "the case must span several chunks"
    );
}

on_devices!(
    batchnorm_matches_cpu,
    batchnorm_train_matches_cpu,
    batchnorm_train_fixed_shapes,
    batchnorm_train_deterministic,
);

/// Max |Δ| / max |ref| against PyTorch: the fixture README's 1e-4.
const GOLDEN_TOL: f32 = 1e-4;

/// The training-mode cases of the PyTorch backward fixture on the emulated
/// device (running statistics start at PyTorch's 0 and 1).
#[test]
fn batchnorm_train_emulated_matches_pytorch() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ops_backward.safetensors"
    );
    let f = TensorFile::open(path).expect("ops_backward fixture");
    let cases: Vec<Value> = serde_json::from_str(
        f.metadata()
            .and_then(|m| m.get("cases"))
            .expect("metadata key cases"),
    )
    .expect("cases is JSON");
    let be = emulated();
    let mut checked = 0;
    for c in cases.iter().filter(|c| c["op"] == "batchnorm_train") {
        let name = c["name"].as_str().expect("case name");
        let t = |what: &str| {
            f.f32(&format!("{name}.{what}"))
                .unwrap_or_else(|e| panic!("{name}.{what}: {e}"))
        };
        let param = |key: &str| c["params"][key].as_f64().expect("param") as f32;
        let ((xs, x), (_, gamma), (_, beta), (_, dy)) = (t("x"), t("weight"), t("bias"), t("dy"));
        let ch = xs[1];
        let up = |s: &[usize], v: &[f32]| Tensor::from_slice(&be, s, v).unwrap();
        let (mut rm, mut rv) = (up(&[ch], &vec![0.0; ch]), up(&[ch], &vec![1.0; ch]));
        let (x, gamma, beta, dy) = (
            up(&xs, &x),
            up(&[ch], &gamma),
            up(&[ch], &beta),
            up(&xs, &dy),
        );
        let fwd = ops::batchnorm_train(
            &be,
            &x,
            &gamma,
            &beta,
            &mut rm,
            &mut rv,
            param("eps"),
            param("momentum"),
        )
        .unwrap();
        let g =
            ops::batchnorm_train_backward(&be, &x, &gamma, &fwd.save_mean, &fwd.save_inv_std, &dy)
                .unwrap();
        for (what, got) in [
            ("y", &fwd.y),
            ("running_mean_after", &rm),
            ("running_var_after", &rv),
            ("dx", &g.dx),
            ("dweight", &g.dgamma),
            ("dbias", &g.dbeta),
        ] {
            let (got, want) = (got.to_vec().unwrap(), t(what).1);
            assert_eq!(got.len(), want.len(), "{name}.{what}: length");
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= GOLDEN_TOL * scale,
                "{name}.{what}: max |Δ| {err:e} > {GOLDEN_TOL:e} × {scale:e}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 1, "the fixture has batchnorm_train cases");
}

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
    let (mut rm, mut rv) = (zeros(&be, &[3]), zeros(&be, &[3]));
    expect_shape_error(
        ops::batchnorm_train(&be, &x, &c3, &c4, &mut rm, &mut rv, 1e-5, 0.1).map(|_| ()),
        "batchnorm_train",
        &["beta", "[4]", "[3]"],
    );
    expect_shape_error(
        ops::batchnorm_train(
            &be,
            &zeros(&be, &[0, 3, 4, 4]),
            &c3,
            &c3,
            &mut rm,
            &mut rv,
            1e-5,
            0.1,
        )
        .map(|_| ()),
        "batchnorm_train",
        &["at least one value"],
    );
    let (mut dx, mut dg, mut db) = (
        zeros(&be, &[2, 3, 4, 4]),
        zeros(&be, &[3]),
        zeros(&be, &[3]),
    );
    expect_shape_error(
        ops::batchnorm_train_backward_into(
            &be,
            &x,
            &c3,
            &c3,
            &c3,
            &zeros(&be, &[2, 3, 4, 5]),
            &mut dx,
            &mut dg,
            &mut db,
        ),
        "batchnorm_train_backward",
        &["dy", "[2, 3, 4, 5]", "[2, 3, 4, 4]"],
    );
    expect_shape_error(
        ops::batchnorm_train_backward(&be, &x, &c3, &c4, &c3, &x).map(|_| ()),
        "batchnorm_train_backward",
        &["save_mean", "[4]", "[3]"],
    );
}

#[test]
fn tensors_on_another_device_are_rejected() {
    let be = emulated();
    let cpu = Backend::cpu();
    let x = zeros(&be, &[2, 3, 4, 4]);
    let (g, b) = (zeros(&be, &[3]), zeros(&be, &[3]));
    let (mut rm, mut rv) = (zeros(&cpu, &[3]), zeros(&be, &[3]));
    match ops::batchnorm_train(&be, &x, &g, &b, &mut rm, &mut rv, 1e-5, 0.1) {
        Err(Error::DeviceMismatch { op, .. }) => assert_eq!(op, "batchnorm_train"),
        other => panic!("expected a device mismatch, got {:?}", other.map(|_| ())),
    }
}
