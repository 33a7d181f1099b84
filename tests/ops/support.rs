//! Helpers of the activation, norm, pool and layout tests: seeded data,
//! proptest runners, tolerances, the devices, and the `on_devices!` macro
//! that turns each property into an `emulated::NAME` and an (ignored)
//! `cuda::NAME` test.
//!
//! Every property draws a shape (and op parameters) and a `seed`; inputs come
//! from SplitMix64 seeded with it, so a failure report (which prints the whole
//! drawn case) reproduces exactly. The tolerances, per op and with their
//! reasons, are in each family module's docs.

use cellmorph::backend::cuda_device_count;
use cellmorph::{Backend, Device, Error, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};

pub(crate) const EPS: f32 = f32::EPSILON;

/// Cases per property: the emulation runs every CUDA thread as a fiber
/// (~1 µs each), so it gets fewer and the GPU more.
fn cases(be: &Backend) -> u32 {
    match be.device() {
        Device::Cuda(_) => 96,
        _ => 24,
    }
}

/// SplitMix64, so inputs depend on the printed seed only.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub(crate) fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
    pub(crate) fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

pub(crate) fn ok<T>(r: cellmorph::Result<T>) -> Result<T, TestCaseError> {
    r.map_err(|e| TestCaseError::fail(e.to_string()))
}

pub(crate) fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Runs `check` over `strategy` on `be`; failures name the device and print
/// the drawn case (with its seed).
pub(crate) fn run<S>(
    be: &Backend,
    strategy: S,
    check: impl Fn(&Backend, S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(crate::common::proptest_config(cases(be)));
    if let Err(e) = runner.run(&strategy, |v| check(be, v)) {
        panic!("on {}: {e}", be.device());
    }
}

/// Checks `|ref − out| ≤ tol(i)` element-wise. A non-finite output passes
/// only where the reference is the same non-finite value.
pub(crate) fn assert_close(
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

pub(crate) fn exact(ctx: &str, reference: &[f32], out: &[f32]) -> Result<(), TestCaseError> {
    assert_close(ctx, reference, out, |_| 0.0)
}

/// The same data as a tensor on the CPU and on `be`.
pub(crate) fn pair(
    be: &Backend,
    shape: &[usize],
    data: &[f32],
) -> Result<(Tensor, Tensor), TestCaseError> {
    Ok((
        ok(Tensor::from_slice(&Backend::cpu(), shape, data))?,
        ok(Tensor::from_slice(be, shape, data))?,
    ))
}

/// Shapes of rank 1–4, mostly non-empty, up to 12⁴ elements.
pub(crate) fn any_shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![15 => 1usize..=12, 1 => Just(0usize)], 1..=4)
}

pub(crate) fn emulated() -> Backend {
    Backend::new(Device::Emulated).expect("the emulated device is built into the test binary")
}

/// CUDA device 0. The CUDA tests are `#[ignore]`d so that a machine without a GPU
/// reports them as ignored, never as passed; forced to run there, they fail.
pub(crate) fn cuda() -> Backend {
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
pub(crate) use on_devices;

/// The shape error of `r`, which must come from `op` and mention every `parts`.
pub(crate) fn expect_shape_error<T: std::fmt::Debug>(
    r: cellmorph::Result<T>,
    op: &str,
    parts: &[&str],
) {
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

pub(crate) fn zeros(be: &Backend, shape: &[usize]) -> Tensor {
    Tensor::zeros(be, shape).expect("allocating a host tensor")
}
