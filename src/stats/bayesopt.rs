//! Bayesian optimization on the unit cube: a Gaussian-process surrogate and
//! expected improvement, for maximizing a noisy function of a few
//! parameters that is costly to evaluate (the hyper-parameter search of
//! `screen tune`).
//!
//! - Points lie in `[0, 1]^d`: the caller maps its parameters onto the cube
//!   (a learning rate by its logarithm, say). Values are **maximized**.
//! - [`latin_hypercube`]: the seeded initial design, one point in each of
//!   `n` equal slices of every axis.
//! - [`GaussianProcess::fit`]: the values standardized (mean 0, sd 1), the
//!   covariance `σ²·(k(r/ℓ) + η·δ)` with `k` the Matérn 5/2 kernel of the
//!   Euclidean distance `r` (one length scale `ℓ` for all axes: with tens of
//!   points, a length per axis would be poorly determined), `ℓ` and the
//!   noise ratio `η` chosen by type-II maximum likelihood over the fixed
//!   grid [`LENGTH_SCALES`] × [`NOISE_RATIOS`] (the first best in grid
//!   order on ties), `σ²` profiled out in closed form (`yᵀK⁻¹y / n`).
//!   The noise term matters: a validation AUC on a few dozen images moves
//!   by steps of 1/(positives·negatives).
//! - [`expected_improvement`] of the latent function over the best value
//!   seen, less a margin `ξ`.
//! - [`suggest`]: the point of highest expected improvement among a seeded
//!   candidate set: uniform points of the cube and Gaussian steps around
//!   the best points seen (the first candidate wins a tie).
//!
//! Everything is deterministic: the same points, values and generator give
//! the same bits.

use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// Length scales (in unit-cube distance) that [`GaussianProcess::fit`]
/// tries.
pub const LENGTH_SCALES: [f64; 8] = [0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.3, 2.0];
/// Noise variances, relative to the signal's, that [`GaussianProcess::fit`]
/// tries.
pub const NOISE_RATIOS: [f64; 5] = [1e-6, 1e-4, 1e-3, 1e-2, 1e-1];

/// `n` points of `[0, 1]^dim`, one in each of the `n` slices `[k/n,
/// (k+1)/n)` of every axis (each axis's slices in a seeded order, each
/// point uniform within its cell).
pub fn latin_hypercube(n: usize, dim: usize, rng: &mut SplitMix64) -> Vec<Vec<f64>> {
    let mut points = vec![vec![0.0; dim]; n];
    for axis in 0..dim {
        let mut slots: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            slots.swap(i, rng.below(i + 1));
        }
        for (p, &s) in points.iter_mut().zip(&slots) {
            p[axis] = (s as f64 + rng.next_f64()) / n as f64;
        }
    }
    points
}

/// Matérn 5/2 correlation at distance `r` with length scale `l`.
fn matern52(r: f64, l: f64) -> f64 {
    let s = 5f64.sqrt() * r / l;
    (1.0 + s + s * s / 3.0) * (-s).exp()
}

fn distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt()
}

/// Lower Cholesky factor of the symmetric `n × n` matrix `a` (row-major);
/// `None` when it is not positive definite.
fn cholesky(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= l[i * n + k] * l[j * n + k];
            }
            if i == j {
                if s <= 0.0 || s.is_nan() {
                    return None;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    Some(l)
}

/// Solves `L z = b` for lower-triangular `l`.
fn forward_solve(l: &[f64], n: usize, b: &[f64]) -> Vec<f64> {
    let mut z = vec![0.0; n];
    for i in 0..n {
        let s: f64 = (0..i).map(|k| l[i * n + k] * z[k]).sum();
        z[i] = (b[i] - s) / l[i * n + i];
    }
    z
}

/// Solves `Lᵀ z = b` for lower-triangular `l`.
fn backward_solve(l: &[f64], n: usize, b: &[f64]) -> Vec<f64> {
    let mut z = vec![0.0; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| l[k * n + i] * z[k]).sum();
        z[i] = (b[i] - s) / l[i * n + i];
    }
    z
}

/// A Gaussian process fitted to points of the unit cube (see the module
/// documentation).
#[derive(Clone, Debug)]
pub struct GaussianProcess {
    x: Vec<Vec<f64>>,
    /// Cholesky factor of the unit-amplitude covariance `K + ηI`.
    l: Vec<f64>,
    /// `(K + ηI)⁻¹ y` for the standardized `y`.
    alpha: Vec<f64>,
    y_mean: f64,
    y_sd: f64,
    signal: f64,
    length_scale: f64,
    noise: f64,
    log_likelihood: f64,
}

impl GaussianProcess {
    /// Fits the process to values `y` at points `x` (see the module
    /// documentation for the kernel and how its parameters are chosen).
    ///
    /// # Errors
    /// No points, points of different dimensions or outside `[0, 1]`, a
    /// non-finite value, or no grid point giving a positive-definite
    /// covariance.
    pub fn fit(x: &[Vec<f64>], y: &[f64]) -> Result<GaussianProcess> {
        let n = x.len();
        if n == 0 || y.len() != n {
            return Err(Error::invalid(format!(
                "Gaussian process: {n} points and {} values (needs at least one of each, as many values as points)",
                y.len()
            )));
        }
        let dim = x[0].len();
        for (i, p) in x.iter().enumerate() {
            if p.len() != dim || p.iter().any(|v| !(0.0..=1.0).contains(v)) {
                return Err(Error::invalid(format!(
                    "Gaussian process: point {i} {p:?} is not in the unit cube of dimension {dim}"
                )));
            }
        }
        if let Some((i, v)) = y.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::invalid(format!(
                "Gaussian process: value {i} is not finite ({v})"
            )));
        }
        let y_mean = y.iter().sum::<f64>() / n as f64;
        let var = y.iter().map(|v| (v - y_mean) * (v - y_mean)).sum::<f64>() / n as f64;
        // Constant values: any positive scale will do.
        let y_sd = if var > 0.0 { var.sqrt() } else { 1.0 };
        let ys: Vec<f64> = y.iter().map(|v| (v - y_mean) / y_sd).collect();
        let mut dist = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                dist[i * n + j] = distance(&x[i], &x[j]);
            }
        }
        let mut best: Option<GaussianProcess> = None;
        for &length_scale in &LENGTH_SCALES {
            for &noise in &NOISE_RATIOS {
                let k: Vec<f64> = (0..n * n)
                    .map(|ij| {
                        let diag = if ij / n == ij % n { noise } else { 0.0 };
                        matern52(dist[ij], length_scale) + diag
                    })
                    .collect();
                let Some(l) = cholesky(&k, n) else {
                    continue;
                };
                let alpha = backward_solve(&l, n, &forward_solve(&l, n, &ys));
                let quad: f64 = ys.iter().zip(&alpha).map(|(a, b)| a * b).sum();
                // Constant values give quad = 0: keep the signal positive.
                let signal = (quad / n as f64).max(1e-12);
                let log_det: f64 = (0..n).map(|i| l[i * n + i].ln()).sum();
                let log_likelihood = -0.5 * n as f64 * signal.ln() - log_det;
                if best
                    .as_ref()
                    .is_none_or(|b| log_likelihood > b.log_likelihood)
                {
                    best = Some(GaussianProcess {
                        x: x.to_vec(),
                        l,
                        alpha,
                        y_mean,
                        y_sd,
                        signal,
                        length_scale,
                        noise,
                        log_likelihood,
                    });
                }
            }
        }
        best.ok_or_else(|| {
            Error::invalid(format!(
                "Gaussian process: no length scale and noise of the grid give a positive-definite covariance for these {n} points"
            ))
        })
    }

    /// The chosen length scale.
    pub fn length_scale(&self) -> f64 {
        self.length_scale
    }

    /// The chosen noise ratio.
    pub fn noise(&self) -> f64 {
        self.noise
    }

    /// The posterior mean and standard deviation of the latent function at
    /// `p`, in the units of the fitted values.
    pub fn predict(&self, p: &[f64]) -> (f64, f64) {
        let n = self.x.len();
        let k: Vec<f64> = self
            .x
            .iter()
            .map(|q| matern52(distance(p, q), self.length_scale))
            .collect();
        let mean: f64 = k.iter().zip(&self.alpha).map(|(a, b)| a * b).sum();
        let v = forward_solve(&self.l, n, &k);
        let var = self.signal * (1.0 - v.iter().map(|a| a * a).sum::<f64>()).max(0.0);
        (self.y_mean + self.y_sd * mean, self.y_sd * var.sqrt())
    }

    /// The standard deviation of the fitted values (the unit of `ξ` in
    /// [`suggest`]).
    pub fn value_scale(&self) -> f64 {
        self.y_sd
    }
}

/// The standard normal distribution function, by the complementary error
/// function's Chebyshev fit of Numerical Recipes (`erfcc`, relative error
/// below 1.2e-7).
pub fn normal_cdf(z: f64) -> f64 {
    let x = -z / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * x.abs());
    let poly = -1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * (-x * x + poly).exp();
    0.5 * if x >= 0.0 { erfc } else { 2.0 - erfc }
}

/// Expected improvement of a normal `N(mean, sd²)` over `best + xi`
/// (maximization): `d·Φ(d/sd) + sd·φ(d/sd)` with `d = mean − best − xi`;
/// `max(d, 0)` when `sd` is 0.
pub fn expected_improvement(mean: f64, sd: f64, best: f64, xi: f64) -> f64 {
    let d = mean - best - xi;
    if sd <= 0.0 || sd.is_nan() {
        return d.max(0.0);
    }
    let z = d / sd;
    let pdf = (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt();
    (d * normal_cdf(z) + sd * pdf).max(0.0)
}

/// How [`suggest`] searches for the next point.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SuggestOptions {
    /// Uniform candidates in the cube.
    pub random_candidates: usize,
    /// Candidates at Gaussian steps from the best points seen.
    pub local_candidates: usize,
    /// How many of the best points seen the local candidates surround.
    pub local_centres: usize,
    /// Standard deviation of a local step, per axis (clamped to the cube).
    pub local_sd: f64,
    /// Margin of the expected improvement, in standard deviations of the
    /// values seen.
    pub xi: f64,
}

impl Default for SuggestOptions {
    fn default() -> Self {
        SuggestOptions {
            random_candidates: 2000,
            local_candidates: 500,
            local_centres: 5,
            local_sd: 0.05,
            xi: 0.01,
        }
    }
}

/// The point [`suggest`] chose and what the surrogate expects there.
#[derive(Clone, Debug, PartialEq)]
pub struct Suggestion {
    /// The point (in the unit cube).
    pub x: Vec<f64>,
    /// Its expected improvement.
    pub ei: f64,
    /// Posterior mean and standard deviation there.
    pub mean: f64,
    /// See `mean`.
    pub sd: f64,
    /// The fitted length scale and noise ratio.
    pub length_scale: f64,
    /// See `length_scale`.
    pub noise: f64,
}

/// The candidate of highest expected improvement (see the module
/// documentation) given values `y` at points `x`; candidates come from
/// `rng`.
///
/// # Errors
/// As [`GaussianProcess::fit`]; no candidates.
pub fn suggest(
    x: &[Vec<f64>],
    y: &[f64],
    rng: &mut SplitMix64,
    o: &SuggestOptions,
) -> Result<Suggestion> {
    if o.random_candidates + o.local_candidates == 0 {
        return Err(Error::invalid("suggest: no candidates to choose from"));
    }
    let gp = GaussianProcess::fit(x, y)?;
    let dim = x[0].len();
    let best = y.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let xi = o.xi * gp.value_scale();
    // The best points seen, best first (the earlier one on ties).
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| y[b].total_cmp(&y[a]).then(a.cmp(&b)));
    order.truncate(o.local_centres.max(1));
    let mut chosen: Option<Suggestion> = None;
    for c in 0..o.random_candidates + o.local_candidates {
        let p: Vec<f64> = if c < o.random_candidates {
            (0..dim).map(|_| rng.next_f64()).collect()
        } else {
            let centre = &x[order[(c - o.random_candidates) % order.len()]];
            centre
                .iter()
                .map(|v| (v + o.local_sd * rng.normal()).clamp(0.0, 1.0))
                .collect()
        };
        let (mean, sd) = gp.predict(&p);
        let ei = expected_improvement(mean, sd, best, xi);
        if chosen.as_ref().is_none_or(|s| ei > s.ei) {
            chosen = Some(Suggestion {
                x: p,
                ei,
                mean,
                sd,
                length_scale: gp.length_scale(),
                noise: gp.noise(),
            });
        }
    }
    chosen.ok_or_else(|| Error::invalid("suggest: no candidates to choose from"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Φ against values of the exact function (scipy.stats.norm.cdf); the
    /// fit's relative error bound is 1.2e-7 on erfc, so 2e-7 absolute.
    #[test]
    fn normal_cdf_matches_known_values() {
        for (z, want) in [
            (0.0, 0.5),
            (1.0, 0.841_344_746_068_542_9),
            (-2.0, 0.022_750_131_948_179_195),
            (3.5, 0.999_767_370_920_964_2),
            (-0.3, 0.382_088_577_811_047_2),
        ] {
            assert!((normal_cdf(z) - want).abs() < 2e-7, "Φ({z})");
        }
    }

    #[test]
    fn latin_hypercube_fills_every_slice_once() {
        let pts = latin_hypercube(7, 3, &mut SplitMix64::new(4));
        for axis in 0..3 {
            let mut slices: Vec<usize> = pts.iter().map(|p| (p[axis] * 7.0) as usize).collect();
            slices.sort_unstable();
            assert_eq!(slices, (0..7).collect::<Vec<_>>());
        }
    }

    /// With almost no noise the posterior mean passes through the data and
    /// the deviation there is near 0; far away it returns to the mean.
    #[test]
    fn posterior_interpolates_and_widens() {
        let x: Vec<Vec<f64>> = (0..6).map(|i| vec![i as f64 / 5.0]).collect();
        let y: Vec<f64> = x.iter().map(|p| (6.0 * p[0]).sin()).collect();
        let gp = GaussianProcess::fit(&x, &y).unwrap();
        for (p, v) in x.iter().zip(&y) {
            let (m, s) = gp.predict(p);
            assert!((m - v).abs() < 0.05, "{p:?}: {m} vs {v}");
            assert!(s < 0.1 * gp.value_scale(), "{p:?}: sd {s}");
        }
        let (_, s_mid) = gp.predict(&[0.1]);
        let (_, s_at) = gp.predict(&[0.2]);
        assert!(s_mid > s_at);
    }

    #[test]
    fn expected_improvement_limits() {
        assert_eq!(expected_improvement(1.0, 0.0, 0.5, 0.0), 0.5);
        assert_eq!(expected_improvement(0.0, 0.0, 0.5, 0.0), 0.0);
        // Mean at the best: sd·φ(0).
        let ei = expected_improvement(0.5, 2.0, 0.5, 0.0);
        assert!((ei - 2.0 / (2.0 * std::f64::consts::PI).sqrt()).abs() < 1e-6);
    }
}
