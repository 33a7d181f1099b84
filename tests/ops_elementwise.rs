//! The element-wise, softmax, pooling and layout ops (kernels/elementwise.cu,
//! kernels/pool.cu) against the CPU reference, on the emulated device and on
//! a CUDA GPU when there is one, plus the ops layer's shape errors.
//!
//! Every property draws a shape (and op parameters) and a `seed`; inputs come
//! from SplitMix64 seeded with it, so a failure report (which prints the whole
//! drawn case) reproduces exactly. Tolerances, per op, with the reason:
//! - ReLU, LeakyReLU, add, max pool, upsample, concat: exact. Each output is
//!   a selection or one correctly rounded IEEE operation on every device.
//! - sigmoid: 1e-6 relative. CUDA's `expf` is within 2 ulp of libm's, which
//!   moves `1/(1+e)` by at most ~3 ulp (3.6e-7 relative).
//! - batch norm: 4·ε·(|x·scale| + |mean·scale| + |beta|) absolute (ε = f32
//!   epsilon). nvcc contracts `x·scale + shift` and `beta − mean·scale` into
//!   FMAs, which skips one rounding in each, each at most ε/2 of those terms.
//! - softmax: (dim + 8)·ε relative. The row sum is accumulated in another
//!   order than the reference's (error ≤ (dim − 1)·ε/2 relative, Higham), plus
//!   `expf` and the division.
//! - average pools: the summation bound for any order, (terms)·ε·mean|x|
//!   over the window or plane, which also covers the division.

use cellmorph::backend::cuda_device_count;
use cellmorph::geometry::Pool2dParams;
use cellmorph::{ops, Backend, Device, Error, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const EPS: f32 = f32::EPSILON;

/// Cases per property: the emulation runs every CUDA thread as a fiber
/// (~1 µs each), so it gets fewer and the GPU more.
fn cases(be: &Backend) -> u32 {
    match be.device() {
        Device::Cuda(_) => 96,
        _ => 24,
    }
}

/// SplitMix64, so inputs depend on the printed seed only.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

fn ok<T>(r: cellmorph::Result<T>) -> Result<T, TestCaseError> {
    r.map_err(|e| TestCaseError::fail(e.to_string()))
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Runs `check` over `strategy` on `be`; failures name the device and print
/// the drawn case (with its seed).
fn run<S>(
    be: &Backend,
    strategy: S,
    check: impl Fn(&Backend, S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let config = Config {
        cases: cases(be),
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    if let Err(e) = runner.run(&strategy, |v| check(be, v)) {
        panic!("on {}: {e}", be.device());
    }
}

/// Checks `|ref − out| ≤ tol(i)` element-wise. A non-finite output passes
/// only where the reference is the same non-finite value.
fn assert_close(
    ctx: &str,
    reference: &[f32],
    out: &[f32],
    tol: impl Fn(usize) -> f32,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(reference.len(), out.len(), "{}: output lengths differ", ctx);
    for (i, (&r, &o)) in reference.iter().zip(out).enumerate() {
        let good = if r.is_finite() {
            o.is_finite() && (r - o).abs() <= tol(i)
        } else {
            (r.is_nan() && o.is_nan()) || r == o
        };
        if !good {
            return Err(TestCaseError::fail(format!(
                "{ctx}: element {i}: reference {r}, got {o} (tolerance {})",
                tol(i)
            )));
        }
    }
    Ok(())
}

fn exact(ctx: &str, reference: &[f32], out: &[f32]) -> Result<(), TestCaseError> {
    assert_close(ctx, reference, out, |_| 0.0)
}

/// The same data as a tensor on the CPU and on `be`.
fn pair(be: &Backend, shape: &[usize], data: &[f32]) -> Result<(Tensor, Tensor), TestCaseError> {
    Ok((
        ok(Tensor::from_slice(&Backend::cpu(), shape, data))?,
        ok(Tensor::from_slice(be, shape, data))?,
    ))
}

/// Shapes of rank 1–4, mostly non-empty, up to 12⁴ elements.
fn any_shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![15 => 1usize..=12, 1 => Just(0usize)], 1..=4)
}

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

fn upsample_matches_cpu(be: &Backend) {
    let case = (
        1usize..=3,
        1usize..=3,
        1usize..=16,
        1usize..=16,
        any::<u64>(),
    );
    run(be, case, |be, (n, c, h, w, seed)| {
        let shape = [n, c, h, w];
        let data = Rng(seed).vec(numel(&shape), -4.0, 4.0);
        let (xc, xd) = pair(be, &shape, &data)?;
        let reference = ok(ok(ops::upsample_nearest2x(&Backend::cpu(), &xc))?.to_vec())?;
        let out = ok(ops::upsample_nearest2x(be, &xd))?;
        prop_assert_eq!(out.shape(), &[n, c, 2 * h, 2 * w]);
        exact(
            &format!("upsample_nearest2x {shape:?} seed {seed}"),
            &reference,
            &ok(out.to_vec())?,
        )
    });
}

/// Concatenation of 1–3 inputs, and a copy into a channel slice of a
/// prefilled destination that must leave the other channels untouched.
fn concat_matches_cpu(be: &Backend) {
    let case = (
        1usize..=2,
        prop::collection::vec(1usize..=4, 1..=3),
        prop::collection::vec(1usize..=8, 0..=2),
        any::<u64>(),
    );
    run(be, case, |be, (n, channels, spatial, seed)| {
        let ctx = format!("concat n {n} channels {channels:?} spatial {spatial:?} seed {seed}");
        let mut rng = Rng(seed);
        let shape_of = |c: usize| [vec![n, c], spatial.clone()].concat();
        let mut inputs = Vec::new();
        for &c in &channels {
            let shape = shape_of(c);
            inputs.push(pair(be, &shape, &rng.vec(numel(&shape), -4.0, 4.0))?);
        }
        let cpu_refs: Vec<&Tensor> = inputs.iter().map(|p| &p.0).collect();
        let dev_refs: Vec<&Tensor> = inputs.iter().map(|p| &p.1).collect();
        let reference = ok(ops::concat_channels(&Backend::cpu(), &cpu_refs))?;
        let out = ok(ops::concat_channels(be, &dev_refs))?;
        prop_assert_eq!(out.shape(), reference.shape());
        exact(&ctx, &ok(reference.to_vec())?, &ok(out.to_vec())?)?;

        // The last input into a destination with two spare channels on each side.
        let last = inputs.len() - 1;
        let dst_shape = shape_of(channels[last] + 4);
        let fill = rng.vec(numel(&dst_shape), 10.0, 20.0);
        let (mut dc, mut dd) = pair(be, &dst_shape, &fill)?;
        ok(ops::copy_channels_into(
            &Backend::cpu(),
            &inputs[last].0,
            &mut dc,
            2,
        ))?;
        ok(ops::copy_channels_into(be, &inputs[last].1, &mut dd, 2))?;
        let reference = ok(dc.to_vec())?;
        let hw: usize = spatial.iter().product();
        let block = (channels[last] + 4) * hw;
        for (i, (&r, &f)) in reference.iter().zip(&fill).enumerate() {
            let ch = (i % block) / hw;
            if !(2..2 + channels[last]).contains(&ch) {
                prop_assert_eq!(r, f, "{}: CPU copy_channels touched channel {}", ctx, ch);
            }
        }
        exact(
            &format!("{ctx} (copy_channels_into)"),
            &reference,
            &ok(dd.to_vec())?,
        )
    });
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

fn emulated() -> Backend {
    Backend::new(Device::Emulated).expect("the emulated device is built into the test binary")
}

/// CUDA device 0. The CUDA tests are `#[ignore]`d so that a machine without a GPU
/// reports them as ignored, never as passed; forced to run there, they fail.
fn cuda() -> Backend {
    assert!(
        cuda_device_count() > 0,
        "skipped: no CUDA device (this test needs a GPU)"
    );
    Backend::new(Device::Cuda(0)).expect("a CUDA device was counted but does not open")
}

/// One test per property and device: `emulated::NAME` and `cuda::NAME`.
macro_rules! on_devices {
    ($($prop:ident),* $(,)?) => {
        mod emulated {
            $(#[test] fn $prop() { super::$prop(&super::emulated()); })*
        }
        mod cuda {
            $(
                #[test]
                #[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
                fn $prop() { super::$prop(&super::cuda()); }
            )*
        }
    };
}

on_devices!(
    relu_matches_cpu,
    leaky_relu_matches_cpu,
    sigmoid_matches_cpu,
    add_matches_cpu,
    batchnorm_matches_cpu,
    softmax_matches_cpu,
    softmax_long_rows,
    max_pool_matches_cpu,
    avg_pool_matches_cpu,
    global_avg_pool_matches_cpu,
    global_avg_pool_large_planes,
    upsample_matches_cpu,
    concat_matches_cpu,
    special_values_match_cpu,
    grid_stride_loops,
);

/// The shape error of `r`, which must come from `op` and mention every `parts`.
fn expect_shape_error<T: std::fmt::Debug>(r: cellmorph::Result<T>, op: &str, parts: &[&str]) {
    match r {
        Err(Error::Shape { op: got, msg }) => {
            assert_eq!(got, op, "error from the wrong op: {msg}");
            for p in parts {
                assert!(
                    msg.contains(p),
                    "{op}: message {msg:?} does not mention {p:?}"
                );
            }
        }
        other => panic!("{op}: expected a shape error, got {other:?}"),
    }
}

fn zeros(be: &Backend, shape: &[usize]) -> Tensor {
    Tensor::zeros(be, shape).expect("allocating a host tensor")
}

#[test]
fn elementwise_shape_errors() {
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

#[test]
fn pool_and_layout_shape_errors() {
    let be = emulated();
    let x = zeros(&be, &[1, 2, 5, 5]);
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
    expect_shape_error(
        ops::upsample_nearest2x_into(&be, &x, &mut zeros(&be, &[1, 2, 10, 9])),
        "upsample_nearest2x",
        &["[1, 2, 10, 9]", "[1, 2, 10, 10]"],
    );

    expect_shape_error(
        ops::concat_channels(&be, &[]),
        "concat_channels",
        &["no tensors"],
    );
    expect_shape_error(
        ops::concat_channels(&be, &[&x, &zeros(&be, &[1, 3, 5, 4])]),
        "concat_channels",
        &["[1, 3, 5, 4]", "[1, 2, 5, 5]"],
    );
    let mut dst = zeros(&be, &[1, 3, 5, 5]);
    expect_shape_error(
        ops::copy_channels_into(&be, &x, &mut dst, 2),
        "copy_channels",
        &["offset 2", "[1, 2, 5, 5]", "[1, 3, 5, 5]"],
    );
    expect_shape_error(
        ops::copy_channels_into(&be, &zeros(&be, &[2, 2, 5, 5]), &mut dst, 0),
        "copy_channels",
        &["[2, 2, 5, 5]", "[1, 3, 5, 5]"],
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
