//! Finite-difference checks of every CPU backward op.
//!
//! For an op `y = f(x, …)` and a random upstream gradient `dy`, the loss
//! `L = Σ dy · f(x)` has `∂L/∂x = backward(dy)`. Each gradient element is
//! compared with the central difference `(L(x + h) − L(x − h)) / 2h`, where
//! the forward runs in f32 (the op under test) and `L` is summed in f64.
//!
//! Shapes are drawn from seeded loops (strides 1–3, paddings, odd sizes); every
//! seed is printed and named in the failure message, so a failure reproduces
//! by running the same seed.

use cellmorph::cpu;
use cellmorph::geometry::{
    Conv2dGeom, Conv2dParams, ConvTranspose2dGeom, ConvTranspose2dParams, Pool2dGeom, Pool2dParams,
};

/// Random shapes per op.
const SEEDS: u64 = 24;

/// Step for ops that are linear in the checked input: the central difference
/// is then exact up to rounding, and a large step keeps the f32 rounding of
/// the forward (~1e-6 absolute on `L` here) small once divided by 2h.
const H_LINEAR: f32 = 0.05;
/// Step for curved ops (sigmoid, softmax): truncation error ~h²·f'''/6 ≈ 2e-5.
const H_CURVED: f32 = 0.01;

/// `|analytic − fd| ≤ ATOL + RTOL·|fd|`. The difference quotient carries up to
/// ~1e-4 of f32 rounding noise (error of `L` ≈ 1e-6 over 2h = 0.02–0.1) plus
/// the truncation above; gradients here are O(1–10). A wrong index, a missed
/// padding row or an off-by-one stride gives errors of O(0.1) and more.
const ATOL: f64 = 1e-3;
const RTOL: f64 = 1e-3;

/// SplitMix64: a tiny, dependency-free seeded generator.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
    /// Uniform in `[lo, hi)`.
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.uniform(-1.0, 1.0)).collect()
    }
    /// Distinct values at least 0.05 apart, shuffled: a step of h = 0.01 can
    /// never change which element of a max-pool window is the maximum.
    fn distinct(&mut self, len: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..len)
            .map(|i| (i as f32 - len as f32 / 2.0) * 0.05)
            .collect();
        for i in (1..len).rev() {
            v.swap(i, self.range(0, i));
        }
        v
    }
    /// Random values kept at least 0.1 away from the kink of ReLU at 0.
    fn away_from_zero(&mut self, len: usize) -> Vec<f32> {
        self.vec(len)
            .into_iter()
            .map(|v| if v < 0.0 { v - 0.1 } else { v + 0.1 })
            .collect()
    }
}

/// `Σ dy · y` in f64.
fn dot(dy: &[f32], y: &[f32]) -> f64 {
    dy.iter().zip(y).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Central differences of `loss` with respect to every element of `x`.
fn numeric_grad(x: &[f32], h: f32, loss: impl Fn(&[f32]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let (up, down) = (x[i] + h, x[i] - h);
            xp[i] = up;
            let l_up = loss(&xp);
            xp[i] = down;
            let l_down = loss(&xp);
            xp[i] = x[i];
            (l_up - l_down) / (up as f64 - down as f64)
        })
        .collect()
}

fn assert_close(what: &str, seed: u64, analytic: &[f32], numeric: &[f64]) {
    assert_eq!(
        analytic.len(),
        numeric.len(),
        "{what} (seed {seed}): lengths"
    );
    for (i, (&a, &n)) in analytic.iter().zip(numeric).enumerate() {
        let err = (a as f64 - n).abs();
        assert!(
            err <= ATOL + RTOL * n.abs(),
            "{what} (seed {seed}): element {i}: analytic {a} vs finite difference {n} (|Δ| = {err:.2e})"
        );
    }
}

#[test]
fn conv2d_backward_matches_finite_differences() {
    let mut checked = 0;
    for seed in 0..SEEDS * 4 {
        let mut r = Rng::new(seed);
        let (kh, kw) = (r.range(1, 4), r.range(1, 4));
        let p = Conv2dParams {
            stride: (r.range(1, 2), r.range(1, 2)),
            padding: (r.range(0, 2), r.range(0, 2)),
        };
        let x_shape = [r.range(1, 2), r.range(1, 3), r.range(1, 7), r.range(1, 7)];
        let w_shape = [r.range(1, 3), x_shape[1], kh, kw];
        let Ok(g) = Conv2dGeom::new(&x_shape, &w_shape, p) else {
            continue;
        };
        println!(
            "seed {seed}: x {x_shape:?} w {w_shape:?} {p:?} -> {:?}",
            g.out_shape()
        );
        let x = r.vec(x_shape.iter().product());
        let w = r.vec(w_shape.iter().product());
        let b = r.vec(g.c_out);
        let dy = r.vec(g.out_shape().iter().product());

        let (mut dx, mut dw, mut db) = (vec![9.0; x.len()], vec![9.0; w.len()], vec![9.0; b.len()]);
        cpu::conv2d_backward(&g, &x, &w, &dy, &mut dx, &mut dw, Some(&mut db)).unwrap();

        let loss = |x: &[f32], w: &[f32], b: &[f32]| {
            let mut y = vec![0.0; dy.len()];
            cpu::conv2d_forward(&g, x, w, Some(b), &mut y).unwrap();
            dot(&dy, &y)
        };
        assert_close(
            "conv2d dx",
            seed,
            &dx,
            &numeric_grad(&x, H_LINEAR, |x| loss(x, &w, &b)),
        );
        assert_close(
            "conv2d dw",
            seed,
            &dw,
            &numeric_grad(&w, H_LINEAR, |w| loss(&x, w, &b)),
        );
        assert_close(
            "conv2d db",
            seed,
            &db,
            &numeric_grad(&b, H_LINEAR, |b| loss(&x, &w, b)),
        );

        // Without a bias, dx and dw are the same.
        let (mut dx2, mut dw2) = (vec![0.0; x.len()], vec![0.0; w.len()]);
        cpu::conv2d_backward(&g, &x, &w, &dy, &mut dx2, &mut dw2, None).unwrap();
        assert_eq!(
            (dx2, dw2),
            (dx, dw),
            "seed {seed}: conv2d backward without bias"
        );
        checked += 1;
    }
    assert!(
        checked >= SEEDS as usize,
        "only {checked} valid conv2d shapes drawn"
    );
}

#[test]
fn conv_transpose2d_backward_matches_finite_differences() {
    let mut checked = 0;
    for seed in 0..SEEDS * 4 {
        let mut r = Rng::new(1000 + seed);
        let (kh, kw) = (r.range(1, 4), r.range(1, 4));
        let stride = (r.range(1, 3), r.range(1, 3));
        let p = ConvTranspose2dParams {
            stride,
            padding: (r.range(0, 2), r.range(0, 2)),
            output_padding: (r.range(0, stride.0 - 1), r.range(0, stride.1 - 1)),
        };
        let x_shape = [r.range(1, 2), r.range(1, 3), r.range(1, 5), r.range(1, 5)];
        let w_shape = [x_shape[1], r.range(1, 3), kh, kw];
        let Ok(g) = ConvTranspose2dGeom::new(&x_shape, &w_shape, p) else {
            continue;
        };
        println!(
            "seed {seed}: x {x_shape:?} w {w_shape:?} {p:?} -> {:?}",
            g.out_shape()
        );
        let x = r.vec(x_shape.iter().product());
        let w = r.vec(w_shape.iter().product());
        let b = r.vec(g.c_out);
        let dy = r.vec(g.out_shape().iter().product());

        let (mut dx, mut dw, mut db) = (vec![9.0; x.len()], vec![9.0; w.len()], vec![9.0; b.len()]);
        cpu::conv_transpose2d_backward(&g, &x, &w, &dy, &mut dx, &mut dw, Some(&mut db)).unwrap();

        let loss = |x: &[f32], w: &[f32], b: &[f32]| {
            let mut y = vec![0.0; dy.len()];
            cpu::conv_transpose2d_forward(&g, x, w, Some(b), &mut y).unwrap();
            dot(&dy, &y)
        };
        assert_close(
            "conv_transpose2d dx",
            seed,
            &dx,
            &numeric_grad(&x, H_LINEAR, |x| loss(x, &w, &b)),
        );
        assert_close(
            "conv_transpose2d dw",
            seed,
            &dw,
            &numeric_grad(&w, H_LINEAR, |w| loss(&x, w, &b)),
        );
        assert_close(
            "conv_transpose2d db",
            seed,
            &db,
            &numeric_grad(&b, H_LINEAR, |b| loss(&x, &w, b)),
        );
        checked += 1;
    }
    assert!(
        checked >= SEEDS as usize,
        "only {checked} valid conv_transpose2d shapes drawn"
    );
}

#[test]
fn batchnorm_backward_matches_finite_differences() {
    for seed in 0..SEEDS {
        let mut r = Rng::new(2000 + seed);
        let (n, c, hw) = (r.range(1, 3), r.range(1, 4), r.range(1, 12));
        println!("seed {seed}: n {n} c {c} hw {hw}");
        let x = r.vec(n * c * hw);
        let (gamma, beta, mean) = (r.vec(c), r.vec(c), r.vec(c));
        let var: Vec<f32> = (0..c).map(|_| r.uniform(0.5, 2.0)).collect();
        let dy = r.vec(x.len());
        let eps = 1e-5;

        let (mut dx, mut dgamma, mut dbeta) = (vec![9.0; x.len()], vec![9.0; c], vec![9.0; c]);
        cpu::batchnorm_backward(
            n,
            c,
            hw,
            &x,
            &gamma,
            &mean,
            &var,
            eps,
            &dy,
            &mut dx,
            &mut dgamma,
            &mut dbeta,
        )
        .unwrap();

        let loss = |x: &[f32], gamma: &[f32], beta: &[f32]| {
            let mut y = vec![0.0; x.len()];
            cpu::batchnorm_forward(n, c, hw, x, gamma, beta, &mean, &var, eps, &mut y).unwrap();
            dot(&dy, &y)
        };
        assert_close(
            "batchnorm dx",
            seed,
            &dx,
            &numeric_grad(&x, H_LINEAR, |x| loss(x, &gamma, &beta)),
        );
        assert_close(
            "batchnorm dgamma",
            seed,
            &dgamma,
            &numeric_grad(&gamma, H_LINEAR, |g| loss(&x, g, &beta)),
        );
        assert_close(
            "batchnorm dbeta",
            seed,
            &dbeta,
            &numeric_grad(&beta, H_LINEAR, |b| loss(&x, &gamma, b)),
        );
    }
}

#[test]
fn activation_backwards_match_finite_differences() {
    for seed in 0..SEEDS {
        let mut r = Rng::new(3000 + seed);
        let len = r.range(1, 40);
        println!("seed {seed}: len {len}");
        let x = r.away_from_zero(len);
        let dy = r.vec(len);
        let mut dx = vec![9.0; len];

        cpu::relu_backward(&x, &dy, &mut dx).unwrap();
        let relu = |x: &[f32]| {
            let mut y = vec![0.0; len];
            cpu::relu_forward(x, &mut y).unwrap();
            dot(&dy, &y)
        };
        assert_close("relu dx", seed, &dx, &numeric_grad(&x, H_LINEAR, relu));

        let slope = 0.2;
        cpu::leaky_relu_backward(slope, &x, &dy, &mut dx).unwrap();
        let leaky = |x: &[f32]| {
            let mut y = vec![0.0; len];
            cpu::leaky_relu_forward(slope, x, &mut y).unwrap();
            dot(&dy, &y)
        };
        assert_close(
            "leaky_relu dx",
            seed,
            &dx,
            &numeric_grad(&x, H_LINEAR, leaky),
        );

        let x: Vec<f32> = x.iter().map(|v| 3.0 * v).collect();
        let mut y = vec![0.0; len];
        cpu::sigmoid_forward(&x, &mut y).unwrap();
        cpu::sigmoid_backward(&y, &dy, &mut dx).unwrap();
        let sigmoid = |x: &[f32]| {
            let mut y = vec![0.0; len];
            cpu::sigmoid_forward(x, &mut y).unwrap();
            dot(&dy, &y)
        };
        assert_close(
            "sigmoid dx",
            seed,
            &dx,
            &numeric_grad(&x, H_CURVED, sigmoid),
        );
    }
}

#[test]
fn softmax_backward_matches_finite_differences() {
    for seed in 0..SEEDS {
        let mut r = Rng::new(4000 + seed);
        let (outer, dim, inner) = (r.range(1, 4), r.range(1, 6), r.range(1, 4));
        println!("seed {seed}: outer {outer} dim {dim} inner {inner}");
        let x: Vec<f32> = r.vec(outer * dim * inner).iter().map(|v| 3.0 * v).collect();
        let dy = r.vec(x.len());
        let mut y = vec![0.0; x.len()];
        cpu::softmax_forward(outer, dim, inner, &x, &mut y).unwrap();
        let mut dx = vec![9.0; x.len()];
        cpu::softmax_backward(outer, dim, inner, &y, &dy, &mut dx).unwrap();
        let loss = |x: &[f32]| {
            let mut y = vec![0.0; x.len()];
            cpu::softmax_forward(outer, dim, inner, x, &mut y).unwrap();
            dot(&dy, &y)
        };
        assert_close("softmax dx", seed, &dx, &numeric_grad(&x, H_CURVED, loss));
    }
}

/// A random pooling geometry: kernel 1–3, stride 1–3, padding up to half the kernel.
fn random_pool(r: &mut Rng, op: &'static str) -> Pool2dGeom {
    let (kh, kw) = (r.range(1, 3), r.range(1, 3));
    let p = Pool2dParams {
        kernel: (kh, kw),
        stride: (r.range(1, 3), r.range(1, 3)),
        padding: (r.range(0, kh / 2), r.range(0, kw / 2)),
        count_include_pad: r.range(0, 1) == 1,
    };
    let shape = [r.range(1, 2), r.range(1, 3), r.range(kh, 8), r.range(kw, 8)];
    Pool2dGeom::new(op, &shape, p).unwrap()
}

#[test]
fn max_pool2d_backward_matches_finite_differences() {
    for seed in 0..SEEDS {
        let mut r = Rng::new(5000 + seed);
        let g = random_pool(&mut r, "max_pool2d");
        println!("seed {seed}: {g:?}");
        let x = r.distinct(g.n * g.c * g.h * g.w);
        let dy = r.vec(g.out_shape().iter().product());
        let mut dx = vec![9.0; x.len()];
        cpu::max_pool2d_backward(&g, &x, &dy, &mut dx).unwrap();
        let loss = |x: &[f32]| {
            let mut y = vec![0.0; dy.len()];
            cpu::max_pool2d_forward(&g, x, &mut y).unwrap();
            dot(&dy, &y)
        };
        // H_CURVED: the max is piecewise linear, and the step must stay below
        // half the 0.05 spacing of `distinct` values.
        assert_close(
            "max_pool2d dx",
            seed,
            &dx,
            &numeric_grad(&x, H_CURVED, loss),
        );
    }
}

/// On a tie the gradient goes to the first maximum in scan order, as PyTorch.
#[test]
fn max_pool2d_backward_sends_ties_to_the_first_maximum() {
    let g = Pool2dGeom::new("max_pool2d", &[1, 1, 2, 2], Pool2dParams::new(2, 2, 0)).unwrap();
    let mut dx = vec![9.0; 4];
    cpu::max_pool2d_backward(&g, &[0.0, 1.0, 1.0, 1.0], &[5.0], &mut dx).unwrap();
    assert_eq!(dx, [0.0, 5.0, 0.0, 0.0]);
}

#[test]
fn avg_pool2d_backward_matches_finite_differences() {
    for seed in 0..SEEDS {
        let mut r = Rng::new(6000 + seed);
        let g = random_pool(&mut r, "avg_pool2d");
        println!("seed {seed}: {g:?}");
        let x = r.vec(g.n * g.c * g.h * g.w);
        let dy = r.vec(g.out_shape().iter().product());
        let mut dx = vec![9.0; x.len()];
        cpu::avg_pool2d_backward(&g, &dy, &mut dx).unwrap();
        let loss = |x: &[f32]| {
            let mut y = vec![0.0; dy.len()];
            cpu::avg_pool2d_forward(&g, x, &mut y).unwrap();
            dot(&dy, &y)
        };
        assert_close(
            "avg_pool2d dx",
            seed,
            &dx,
            &numeric_grad(&x, H_LINEAR, loss),
        );
    }
}

#[test]
fn global_pool_and_upsample_backwards_match_finite_differences() {
    for seed in 0..SEEDS {
        let mut r = Rng::new(7000 + seed);
        let (n, c, h, w) = (r.range(1, 2), r.range(1, 3), r.range(1, 5), r.range(1, 5));
        println!("seed {seed}: [{n}, {c}, {h}, {w}]");
        let x = r.vec(n * c * h * w);
        let mut dx = vec![9.0; x.len()];

        let dy = r.vec(n * c);
        cpu::global_avg_pool_backward(n, c, h * w, &dy, &mut dx).unwrap();
        let gap = |x: &[f32]| {
            let mut y = vec![0.0; n * c];
            cpu::global_avg_pool_forward(n, c, h * w, x, &mut y).unwrap();
            dot(&dy, &y)
        };
        assert_close(
            "global_avg_pool dx",
            seed,
            &dx,
            &numeric_grad(&x, H_LINEAR, gap),
        );

        let dy = r.vec(4 * x.len());
        cpu::upsample_nearest2x_backward(n, c, h, w, &dy, &mut dx).unwrap();
        let up = |x: &[f32]| {
            let mut y = vec![0.0; 4 * x.len()];
            cpu::upsample_nearest2x_forward(n, c, h, w, x, &mut y).unwrap();
            dot(&dy, &y)
        };
        assert_close(
            "upsample_nearest2x dx",
            seed,
            &dx,
            &numeric_grad(&x, H_LINEAR, up),
        );
    }
}

#[test]
fn linear_backward_matches_finite_differences() {
    for seed in 0..SEEDS {
        let mut r = Rng::new(8000 + seed);
        let (n, in_f, out_f) = (r.range(1, 4), r.range(1, 9), r.range(1, 7));
        println!("seed {seed}: n {n} in {in_f} out {out_f}");
        let (x, w, b) = (r.vec(n * in_f), r.vec(out_f * in_f), r.vec(out_f));
        let dy = r.vec(n * out_f);
        let (mut dx, mut dw, mut db) = (vec![9.0; x.len()], vec![9.0; w.len()], vec![9.0; out_f]);
        cpu::linear_backward(n, in_f, out_f, &x, &w, &dy, &mut dx, &mut dw, Some(&mut db)).unwrap();
        let loss = |x: &[f32], w: &[f32], b: &[f32]| {
            let mut y = vec![0.0; dy.len()];
            cpu::linear_forward(n, in_f, out_f, x, w, Some(b), &mut y).unwrap();
            dot(&dy, &y)
        };
        assert_close(
            "linear dx",
            seed,
            &dx,
            &numeric_grad(&x, H_LINEAR, |x| loss(x, &w, &b)),
        );
        assert_close(
            "linear dw",
            seed,
            &dw,
            &numeric_grad(&w, H_LINEAR, |w| loss(&x, w, &b)),
        );
        assert_close(
            "linear db",
            seed,
            &db,
            &numeric_grad(&b, H_LINEAR, |b| loss(&x, &w, b)),
        );
    }
}

/// Concatenation's backward is `slice_channels`; `add` passes `dy` to both inputs.
#[test]
fn concat_and_add_backwards_match_finite_differences() {
    for seed in 0..SEEDS {
        let mut r = Rng::new(9000 + seed);
        let (n, c_a, c_b, hw) = (r.range(1, 3), r.range(1, 3), r.range(1, 3), r.range(1, 6));
        let c = c_a + c_b;
        println!("seed {seed}: n {n} channels {c_a} + {c_b} hw {hw}");
        let (a, b) = (r.vec(n * c_a * hw), r.vec(n * c_b * hw));
        let dy = r.vec(n * c * hw);
        let concat = |a: &[f32], b: &[f32]| {
            let mut y = vec![0.0; dy.len()];
            cpu::copy_channels(n, c_a, hw, a, c, 0, &mut y).unwrap();
            cpu::copy_channels(n, c_b, hw, b, c, c_a, &mut y).unwrap();
            dot(&dy, &y)
        };
        let (mut da, mut db) = (vec![9.0; a.len()], vec![9.0; b.len()]);
        cpu::slice_channels(n, c, hw, &dy, 0, c_a, &mut da).unwrap();
        cpu::slice_channels(n, c, hw, &dy, c_a, c_b, &mut db).unwrap();
        assert_close(
            "concat da",
            seed,
            &da,
            &numeric_grad(&a, H_LINEAR, |a| concat(a, &b)),
        );
        assert_close(
            "concat db",
            seed,
            &db,
            &numeric_grad(&b, H_LINEAR, |b| concat(&a, b)),
        );

        let (b, dy) = (r.vec(a.len()), r.vec(a.len()));
        let add = |a: &[f32]| {
            let mut y = vec![0.0; a.len()];
            cpu::add_forward(a, &b, &mut y).unwrap();
            dot(&dy, &y)
        };
        assert_close("add da", seed, &dy, &numeric_grad(&a, H_LINEAR, add));
    }
}

mod length_checks {
    use super::*;
    use cellmorph::Error;

    #[test]
    fn conv2d_backward_rejects_wrong_dw() {
        let g = Conv2dGeom::new(&[1, 2, 5, 5], &[3, 2, 3, 3], Conv2dParams::new(2, 1)).unwrap();
        let (x, w, dy) = (vec![0.0; 50], vec![0.0; 54], vec![0.0; 27]);
        let (mut dx, mut dw) = (vec![0.0; 50], vec![0.0; 53]);
        let err = cpu::conv2d_backward(&g, &x, &w, &dy, &mut dx, &mut dw, None).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Shape {
                    op: "conv2d_backward",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("dw has 53 elements, expected 54"),
            "{err}"
        );
    }

    #[test]
    fn conv_transpose2d_backward_rejects_wrong_dy() {
        let g = ConvTranspose2dGeom::new(
            &[1, 2, 3, 3],
            &[2, 4, 4, 4],
            ConvTranspose2dParams::new(2, 1),
        )
        .unwrap();
        let (x, w, dy) = (vec![0.0; 18], vec![0.0; 128], vec![0.0; 4 * 6 * 5]);
        let (mut dx, mut dw) = (vec![0.0; 18], vec![0.0; 128]);
        let err =
            cpu::conv_transpose2d_backward(&g, &x, &w, &dy, &mut dx, &mut dw, None).unwrap_err();
        assert!(
            err.to_string()
                .contains("dy has 120 elements, expected 144"),
            "{err}"
        );
    }

    #[test]
    fn batchnorm_and_linear_backward_reject_wrong_lengths() {
        let (x, dy) = (vec![0.0; 12], vec![0.0; 12]);
        let (mut dx, mut dgamma, mut dbeta) = (vec![0.0; 12], vec![0.0; 2], vec![0.0; 3]);
        let p = vec![1.0; 3];
        let err = cpu::batchnorm_backward(
            2,
            3,
            2,
            &x,
            &p,
            &p,
            &p,
            1e-5,
            &dy,
            &mut dx,
            &mut dgamma,
            &mut dbeta,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("dgamma has 2 elements, expected 3"),
            "{err}"
        );

        let (x, w, dy) = (vec![0.0; 6], vec![0.0; 12], vec![0.0; 8]);
        let (mut dx, mut dw, mut db) = (vec![0.0; 6], vec![0.0; 12], vec![0.0; 3]);
        let err = cpu::linear_backward(2, 3, 4, &x, &w, &dy, &mut dx, &mut dw, Some(&mut db))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Shape {
                    op: "linear_backward",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("db has 3 elements, expected 4"),
            "{err}"
        );
    }

    #[test]
    fn pool_backwards_reject_wrong_lengths() {
        let g = Pool2dGeom::new("avg_pool2d", &[1, 2, 4, 4], Pool2dParams::new(3, 2, 1)).unwrap();
        let mut dx = vec![0.0; 32];
        assert!(cpu::avg_pool2d_backward(&g, &[0.0; 7], &mut dx).is_err());
        assert!(cpu::max_pool2d_backward(&g, &[0.0; 31], &[0.0; 8], &mut dx).is_err());
        assert!(cpu::global_avg_pool_backward(1, 2, 16, &[0.0; 2], &mut dx[..31]).is_err());
        assert!(cpu::upsample_nearest2x_backward(1, 2, 2, 2, &[0.0; 31], &mut dx[..8]).is_err());
        assert!(cpu::slice_channels(1, 2, 16, &dx.clone(), 1, 2, &mut [0.0; 32]).is_err());
    }
}
