//! Exact t-SNE (van der Maaten & Hinton 2008) into two dimensions, as
//! scikit-learn's `TSNE(method="exact")` computes it:
//!
//! - squared Euclidean distances, rounded to `f32`; per sample a Gaussian
//!   conditional distribution whose precision is found by bisection to the
//!   perplexity (at most 100 steps, entropy within 1e-5 nats), kept in `f32`
//!   with scikit-learn's `f32`/`f64` mix so the values agree to a few ulps;
//! - the joint `p_ij = (p_j|i + p_i|j) / Σ`, at least machine epsilon;
//! - a Student-t (one degree of freedom) `q_ij`, KL(P‖Q) and its gradient;
//! - gradient descent with scikit-learn's schedule: 250 iterations with P
//!   exaggerated (12) and momentum 0.5, then momentum 0.8 up to `max_iter`
//!   (1000); per-coordinate gains (+0.2 / ×0.8, at least 0.01); learning
//!   rate `auto` = max(n / exaggeration / 4, 50); every 50 iterations a
//!   check that stops after 300 iterations without progress (250 in the
//!   first phase) or a gradient norm ≤ 1e-7.
//!
//! Initialization: `pca` (scikit-learn's default: the first two principal
//! components scaled so that the first has standard deviation 1e-4; each
//! component's largest loading positive) or `random` (1e-4 × standard
//! normal from [`crate::rng::SplitMix64`]; not NumPy's stream).
//!
//! Deterministic: every sum runs in a fixed order (rows in parallel, each
//! row's sum sequential, row results combined in row order), so the same
//! input and seed give the same bits on any thread count. The exact method
//! costs O(n²) time per iteration and O(n²) memory (about 12·n² bytes at
//! the peak), so inputs above [`MAX_SAMPLES`] are refused; Barnes–Hut is
//! not implemented.

use rayon::prelude::*;

use crate::rng::SplitMix64;
use crate::{Error, Result};

/// Most samples [`tsne`] accepts (about 1.2 GB of probabilities at the peak).
pub const MAX_SAMPLES: usize = 10_000;

/// Iterations of the first (exaggerated) phase, as scikit-learn.
pub const EXPLORATION_ITER: usize = 250;

const MACHINE_EPSILON: f64 = f64::EPSILON;
const N_ITER_CHECK: usize = 50;
const MIN_GRAD_NORM: f64 = 1e-7;
const N_ITER_WITHOUT_PROGRESS: usize = 300;
const MIN_GAIN: f64 = 0.01;
const PERPLEXITY_TOLERANCE: f64 = 1e-5;
const BINARY_SEARCH_STEPS: usize = 100;

/// How the embedding starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TsneInit {
    /// First two principal components, scaled to standard deviation 1e-4 on
    /// the first.
    Pca,
    /// 1e-4 × standard normal, seeded.
    Random,
}

impl std::str::FromStr for TsneInit {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "pca" => Ok(TsneInit::Pca),
            "random" => Ok(TsneInit::Random),
            other => Err(format!("unknown init {other:?} (pca or random)")),
        }
    }
}

/// Parameters of [`tsne`]; the defaults are scikit-learn's.
#[derive(Debug, Clone, PartialEq)]
pub struct TsneOptions {
    /// Perplexity (effective neighbour count), below the number of samples.
    pub perplexity: f64,
    /// Total gradient-descent iterations, at least [`EXPLORATION_ITER`].
    pub max_iter: usize,
    /// Factor on P during the first phase.
    pub early_exaggeration: f64,
    /// Step size; `None` is scikit-learn's `auto`.
    pub learning_rate: Option<f64>,
    /// Initialization.
    pub init: TsneInit,
    /// Seed of the random initialization.
    pub seed: u64,
}

impl Default for TsneOptions {
    fn default() -> TsneOptions {
        TsneOptions {
            perplexity: 30.0,
            max_iter: 1000,
            early_exaggeration: 12.0,
            learning_rate: None,
            init: TsneInit::Pca,
            seed: 0,
        }
    }
}

/// What [`tsne`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct TsneResult {
    /// Row-major n × 2 coordinates.
    pub embedding: Vec<f64>,
    /// KL(P‖Q) at the last iteration (scikit-learn's `kl_divergence_`; with
    /// exactly 250 iterations, where scikit-learn reports `f64::MAX`, the KL
    /// of the final embedding).
    pub kl_divergence: f64,
    /// Gradient steps taken (scikit-learn's `n_iter_` + 1).
    pub iterations: usize,
    /// The learning rate used.
    pub learning_rate: f64,
}

/// Index of pair (i, j), i < j, in a condensed (upper-triangle, row-major)
/// vector of n(n−1)/2 values, as SciPy's `squareform`.
pub fn condensed_index(n: usize, i: usize, j: usize) -> usize {
    let (i, j) = if i < j { (i, j) } else { (j, i) };
    n * i - i * (i + 1) / 2 + (j - i - 1)
}

fn check_data(op: &str, x: &[f64], n: usize, d: usize) -> Result<()> {
    if d == 0 || x.len() != n * d {
        return Err(Error::invalid(format!(
            "{op}: {} values for {n} samples × {d} features",
            x.len()
        )));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "{op}: value of sample {}, feature {} is not finite ({})",
            i / d,
            i % d,
            x[i]
        )));
    }
    Ok(())
}

fn check_perplexity(n: usize, perplexity: f64) -> Result<()> {
    if n < 2 {
        return Err(Error::invalid(format!(
            "t-SNE needs at least 2 samples, got {n}"
        )));
    }
    if n > MAX_SAMPLES {
        return Err(Error::invalid(format!(
            "exact t-SNE keeps n² probabilities: {n} samples is above the limit of {MAX_SAMPLES} (Barnes–Hut is not implemented)"
        )));
    }
    if !(perplexity > 0.0 && perplexity.is_finite()) {
        return Err(Error::invalid(format!(
            "perplexity must be a positive number, got {perplexity}"
        )));
    }
    if perplexity >= n as f64 {
        return Err(Error::invalid(format!(
            "perplexity ({perplexity}) must be less than the number of samples ({n}), as scikit-learn requires; use a smaller --perplexity or more samples"
        )));
    }
    Ok(())
}

/// Conditional probabilities p_j|i of row `i` from its squared distances,
/// in scikit-learn's precision (`_binary_search_perplexity`): values
/// stored in `f32`, exponentials and sums in `f64`.
fn conditional_row(dist: &[f32], i: usize, desired_entropy: f64, row: &mut [f32]) {
    let mut beta = 1.0f64;
    let (mut beta_min, mut beta_max) = (f64::NEG_INFINITY, f64::INFINITY);
    for _ in 0..BINARY_SEARCH_STEPS {
        let mut sum = 0.0f64;
        for (j, (p, &dj)) in row.iter_mut().zip(dist).enumerate() {
            if j != i {
                *p = (-f64::from(dj) * beta).exp() as f32;
                sum += f64::from(*p);
            }
        }
        if sum == 0.0 {
            sum = 1e-8;
        }
        let mut sum_dp = 0.0f64;
        for (p, &dj) in row.iter_mut().zip(dist) {
            *p = (f64::from(*p) / sum) as f32;
            sum_dp += f64::from(dj * *p);
        }
        let entropy_diff = sum.ln() + beta * sum_dp - desired_entropy;
        if entropy_diff.abs() <= PERPLEXITY_TOLERANCE {
            break;
        }
        if entropy_diff > 0.0 {
            beta_min = beta;
            beta = if beta_max == f64::INFINITY {
                beta * 2.0
            } else {
                (beta + beta_max) / 2.0
            };
        } else {
            beta_max = beta;
            beta = if beta_min == f64::NEG_INFINITY {
                beta / 2.0
            } else {
                (beta + beta_min) / 2.0
            };
        }
    }
}

/// The joint probabilities of `x` (n × d, row-major) at `perplexity`, as a
/// condensed vector of n(n−1)/2 values ([`condensed_index`]); they sum to
/// 1/2 over the condensed pairs (1 over all ordered pairs).
///
/// # Errors
/// Fewer than 2 or more than [`MAX_SAMPLES`] samples, a perplexity not
/// below n, a non-finite value.
pub fn joint_probabilities(x: &[f64], n: usize, d: usize, perplexity: f64) -> Result<Vec<f64>> {
    check_data("t-SNE", x, n, d)?;
    check_perplexity(n, perplexity)?;
    // scikit-learn passes the perplexity as a C float.
    let desired_entropy = f64::from(perplexity as f32).ln();
    let mut cond = vec![0f32; n * n];
    cond.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        let xi = &x[i * d..(i + 1) * d];
        let dist: Vec<f32> = (0..n)
            .map(|j| {
                if j == i {
                    return 0.0;
                }
                let xj = &x[j * d..(j + 1) * d];
                xi.iter()
                    .zip(xj)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f64>() as f32
            })
            .collect();
        conditional_row(&dist, i, desired_entropy, row);
    });
    // Symmetrized in f32 as scikit-learn adds the two f32 matrices.
    let sym = |i: usize, j: usize| cond[i * n + j] + cond[j * n + i];
    let row_sums: Vec<f64> = (0..n)
        .into_par_iter()
        .map(|i| (0..n).map(|j| f64::from(sym(i, j))).sum())
        .collect();
    let total = row_sums.iter().sum::<f64>().max(MACHINE_EPSILON);
    let mut p = Vec::with_capacity(n * (n - 1) / 2);
    for i in 0..n {
        for j in i + 1..n {
            p.push((f64::from(sym(i, j)) / total).max(MACHINE_EPSILON));
        }
    }
    Ok(p)
}

/// KL(P‖Q) (when `compute_error`, else NaN) and its gradient with respect
/// to the n × 2 embedding `y`, for condensed joint probabilities `p`, as
/// scikit-learn's `_kl_divergence` with one degree of freedom.
pub fn kl_divergence_gradient(
    p: &[f64],
    y: &[f64],
    n: usize,
    compute_error: bool,
) -> (f64, Vec<f64>) {
    let w = |i: usize, j: usize| {
        let dx = y[2 * i] - y[2 * j];
        let dy = y[2 * i + 1] - y[2 * j + 1];
        1.0 / (1.0 + (dx * dx + dy * dy))
    };
    // One pass over the ordered pairs gathers, per row, its share of Z
    // (j > i, the order every Z here is summed in), the smallest w, and the
    // attractive Σ p·w·(yi − yj) and repulsive Σ w²·(yi − yj) parts: where
    // no q is clamped at machine epsilon, grad_i = 4 (A_i − B_i / 2Z), the
    // same sum as scikit-learn's Σ (p − q)·w·(yi − yj) up to rounding.
    let rows: Vec<[f64; 6]> = (0..n)
        .into_par_iter()
        .map(|i| {
            let (yi0, yi1) = (y[2 * i], y[2 * i + 1]);
            let (mut z, mut w_min) = (0.0, f64::INFINITY);
            let (mut ax, mut ay, mut bx, mut by) = (0.0, 0.0, 0.0, 0.0);
            for j in (0..n).filter(|&j| j != i) {
                let (dx, dy) = (yi0 - y[2 * j], yi1 - y[2 * j + 1]);
                let wij = 1.0 / (1.0 + (dx * dx + dy * dy));
                let pw = p[condensed_index(n, i, j)] * wij;
                let ww = wij * wij;
                ax += pw * dx;
                ay += pw * dy;
                bx += ww * dx;
                by += ww * dy;
                w_min = w_min.min(wij);
                if j > i {
                    z += wij;
                }
            }
            [z, w_min, ax, ay, bx, by]
        })
        .collect();
    let two_z = 2.0 * rows.iter().map(|r| r[0]).sum::<f64>();
    let w_min = rows.iter().map(|r| r[1]).fold(f64::INFINITY, f64::min);
    let q = |wij: f64| (wij / two_z).max(MACHINE_EPSILON);
    let kl = if compute_error {
        let rows: Vec<f64> = (0..n)
            .into_par_iter()
            .map(|i| {
                (i + 1..n)
                    .map(|j| {
                        let pij = p[condensed_index(n, i, j)];
                        pij * (pij.max(MACHINE_EPSILON) / q(w(i, j))).ln()
                    })
                    .sum()
            })
            .collect();
        2.0 * rows.iter().sum::<f64>()
    } else {
        f64::NAN
    };
    // 2 (dof + 1) / dof = 4 with one degree of freedom.
    if w_min / two_z >= MACHINE_EPSILON {
        let grad = rows
            .iter()
            .flat_map(|r| [4.0 * (r[2] - r[4] / two_z), 4.0 * (r[3] - r[5] / two_z)])
            .collect();
        return (kl, grad);
    }
    let mut grad = vec![0f64; 2 * n];
    grad.par_chunks_mut(2).enumerate().for_each(|(i, g)| {
        let (mut gx, mut gy) = (0.0, 0.0);
        for j in (0..n).filter(|&j| j != i) {
            let wij = w(i, j);
            let f = (p[condensed_index(n, i, j)] - q(wij)) * wij;
            gx += f * (y[2 * i] - y[2 * j]);
            gy += f * (y[2 * i + 1] - y[2 * j + 1]);
        }
        g[0] = 4.0 * gx;
        g[1] = 4.0 * gy;
    });
    (kl, grad)
}

/// One phase of scikit-learn's `_gradient_descent`: iterations `it ..
/// max_iter` from `y` (updated in place), with fresh momentum and gains.
/// Returns the last error and the last iteration index.
#[allow(clippy::too_many_arguments)]
pub fn gradient_descent(
    p: &[f64],
    y: &mut [f64],
    n: usize,
    it: usize,
    max_iter: usize,
    momentum: f64,
    learning_rate: f64,
    n_iter_without_progress: usize,
) -> (f64, usize) {
    let mut update = vec![0f64; y.len()];
    let mut gains = vec![1f64; y.len()];
    let mut error = f64::MAX;
    let mut best_error = f64::MAX;
    let mut best_iter = it;
    let mut last = it;
    for i in it..max_iter {
        last = i;
        let check = (i + 1) % N_ITER_CHECK == 0;
        let (e, mut grad) = kl_divergence_gradient(p, y, n, check || i + 1 == max_iter);
        error = e;
        for k in 0..y.len() {
            gains[k] = if update[k] * grad[k] < 0.0 {
                gains[k] + 0.2
            } else {
                gains[k] * 0.8
            }
            .max(MIN_GAIN);
            grad[k] *= gains[k];
            update[k] = momentum * update[k] - learning_rate * grad[k];
            y[k] += update[k];
        }
        if check {
            let grad_norm = grad.iter().map(|g| g * g).sum::<f64>().sqrt();
            if error < best_error {
                best_error = error;
                best_iter = i;
            } else if i - best_iter > n_iter_without_progress {
                break;
            }
            if grad_norm <= MIN_GRAD_NORM {
                break;
            }
        }
    }
    (error, last)
}

/// scikit-learn's `learning_rate="auto"`: max(n / exaggeration / 4, 50).
pub fn auto_learning_rate(n: usize, early_exaggeration: f64) -> f64 {
    (n as f64 / early_exaggeration / 4.0).max(50.0)
}

/// t-SNE of `x` (n × d, row-major) into two dimensions.
///
/// # Errors
/// As [`joint_probabilities`]; options out of range; a PCA initialization
/// of data whose first principal component has no spread.
pub fn tsne(x: &[f64], n: usize, d: usize, opts: &TsneOptions) -> Result<TsneResult> {
    check_options(opts)?;
    let p = joint_probabilities(x, n, d, opts.perplexity)?;
    let y0 = match opts.init {
        TsneInit::Pca => pca_init(x, n, d)?,
        TsneInit::Random => random_init(n, opts.seed),
    };
    tsne_from(&p, n, y0, opts)
}

fn check_options(opts: &TsneOptions) -> Result<()> {
    if opts.max_iter < EXPLORATION_ITER {
        return Err(Error::invalid(format!(
            "t-SNE iterations must be at least {EXPLORATION_ITER} (the early-exaggeration phase), got {}",
            opts.max_iter
        )));
    }
    if !(opts.early_exaggeration >= 1.0 && opts.early_exaggeration.is_finite()) {
        return Err(Error::invalid(format!(
            "early exaggeration must be at least 1, got {}",
            opts.early_exaggeration
        )));
    }
    if let Some(lr) = opts.learning_rate {
        if !(lr > 0.0 && lr.is_finite()) {
            return Err(Error::invalid(format!(
                "learning rate must be positive, got {lr}"
            )));
        }
    }
    Ok(())
}

/// The optimization of [`tsne`] from condensed joint probabilities `p` and
/// an initial n × 2 embedding `y0` (scikit-learn's `init=array`).
///
/// # Errors
/// Options out of range, or `p`/`y0` of the wrong length or not finite.
pub fn tsne_from(p: &[f64], n: usize, y0: Vec<f64>, opts: &TsneOptions) -> Result<TsneResult> {
    check_options(opts)?;
    if n < 2 || p.len() != n * (n - 1) / 2 || y0.len() != 2 * n {
        return Err(Error::invalid(format!(
            "t-SNE: {} probabilities and {} coordinates for {n} samples",
            p.len(),
            y0.len()
        )));
    }
    if y0.iter().chain(p).any(|v| !v.is_finite()) {
        return Err(Error::invalid("t-SNE: non-finite initial coordinates"));
    }
    let ex = opts.early_exaggeration;
    let lr = opts
        .learning_rate
        .unwrap_or_else(|| auto_learning_rate(n, ex));
    let mut y = y0;
    // scikit-learn scales P in place and back, which rounds; so do we.
    let mut p: Vec<f64> = p.iter().map(|v| v * ex).collect();
    let (_, it) = gradient_descent(
        &p,
        &mut y,
        n,
        0,
        EXPLORATION_ITER,
        0.5,
        lr,
        EXPLORATION_ITER,
    );
    p.iter_mut().for_each(|v| *v /= ex);
    let (kl, iterations) = if it + 1 < opts.max_iter {
        let (kl, last) = gradient_descent(
            &p,
            &mut y,
            n,
            it + 1,
            opts.max_iter,
            0.8,
            lr,
            N_ITER_WITHOUT_PROGRESS,
        );
        (kl, last + 1)
    } else {
        // No second phase (250 iterations in all): the last error used the
        // exaggerated P (scikit-learn then reports f64::MAX); report the KL
        // of the final embedding instead.
        (kl_divergence_gradient(&p, &y, n, true).0, it + 1)
    };
    Ok(TsneResult {
        embedding: y,
        kl_divergence: kl,
        iterations,
        learning_rate: lr,
    })
}

/// 1e-4 × standard normal, n × 2, from SplitMix64 seeded with `seed`.
pub fn random_init(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = SplitMix64::new(seed);
    (0..2 * n).map(|_| 1e-4 * rng.normal()).collect()
}

/// The first two principal components of `x` (n × d), as scikit-learn's
/// `PCA(2).fit_transform` (each component's largest loading positive),
/// scaled so that the first has standard deviation (ddof 0) 1e-4.
///
/// Block power iteration on the centred data (a block of up to 8 vectors,
/// fixed start, Rayleigh–Ritz at the end), converged to 1e-13.
///
/// # Errors
/// Fewer than 2 samples or features, non-finite values, or no spread along
/// the first component.
pub fn pca_init(x: &[f64], n: usize, d: usize) -> Result<Vec<f64>> {
    check_data("PCA", x, n, d)?;
    if n < 2 || d < 2 {
        return Err(Error::invalid(format!(
            "PCA initialization needs at least 2 samples and 2 features (got {n} × {d}); use random initialization"
        )));
    }
    let mean: Vec<f64> = (0..d)
        .map(|c| (0..n).map(|r| x[r * d + c]).sum::<f64>() / n as f64)
        .collect();
    let xc: Vec<f64> = x.iter().enumerate().map(|(i, v)| v - mean[i % d]).collect();
    let components = top_components(&xc, n, d, 2);
    let mut y = vec![0f64; 2 * n];
    for r in 0..n {
        let row = &xc[r * d..(r + 1) * d];
        for (k, v) in components.iter().enumerate() {
            y[2 * r + k] = row.iter().zip(v).map(|(a, b)| a * b).sum();
        }
    }
    let m0 = (0..n).map(|r| y[2 * r]).sum::<f64>() / n as f64;
    let sd = ((0..n).map(|r| (y[2 * r] - m0).powi(2)).sum::<f64>() / n as f64).sqrt();
    if !(sd > 0.0 && sd.is_finite()) {
        return Err(Error::invalid(
            "PCA initialization: the samples do not vary (first principal component has no spread); use random initialization",
        ));
    }
    y.iter_mut().for_each(|v| *v = *v / sd * 1e-4);
    Ok(y)
}

/// The `k` leading right singular vectors of `xc` (n × d, centred), each
/// with its largest-magnitude entry positive.
fn top_components(xc: &[f64], n: usize, d: usize, k: usize) -> Vec<Vec<f64>> {
    let b = d.min(k + 6);
    let mut rng = SplitMix64::new(0x7453_4e45);
    let mut v: Vec<Vec<f64>> = (0..b)
        .map(|_| (0..d).map(|_| rng.normal()).collect())
        .collect();
    orthonormalize(&mut v);
    // Applies XᵀX to a vector.
    let apply = |u: &[f64]| -> Vec<f64> {
        let xu: Vec<f64> = (0..n)
            .map(|r| {
                xc[r * d..(r + 1) * d]
                    .iter()
                    .zip(u)
                    .map(|(a, b)| a * b)
                    .sum()
            })
            .collect();
        (0..d)
            .map(|c| (0..n).map(|r| xc[r * d + c] * xu[r]).sum())
            .collect()
    };
    let mut previous: Option<Vec<Vec<f64>>> = None;
    for _ in 0..2000 {
        let mut w: Vec<Vec<f64>> = v.par_iter().map(|u| apply(u)).collect();
        orthonormalize(&mut w);
        let ritz = rayleigh_ritz(&w, &apply, k);
        let done = previous.as_ref().is_some_and(|p| {
            p.iter().zip(&ritz).all(|(a, b)| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max)
                    < 1e-13
            })
        });
        v = w;
        previous = Some(ritz);
        if done {
            break;
        }
    }
    previous.unwrap_or_default()
}

/// Gram–Schmidt (twice) in place; a vector that vanishes becomes zero.
fn orthonormalize(v: &mut [Vec<f64>]) {
    for i in 0..v.len() {
        for _ in 0..2 {
            for j in 0..i {
                let dot: f64 = v[i].iter().zip(&v[j]).map(|(a, b)| a * b).sum();
                let (head, tail) = v.split_at_mut(i);
                tail[0]
                    .iter_mut()
                    .zip(&head[j])
                    .for_each(|(a, b)| *a -= dot * b);
            }
        }
        let norm = v[i].iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm > 0.0 {
            v[i].iter_mut().for_each(|a| *a /= norm);
        }
    }
}

/// The `k` leading Ritz vectors of the operator in the span of the
/// orthonormal block `w`, sign-fixed (largest-magnitude entry positive).
fn rayleigh_ritz(w: &[Vec<f64>], apply: &dyn Fn(&[f64]) -> Vec<f64>, k: usize) -> Vec<Vec<f64>> {
    let b = w.len();
    let aw: Vec<Vec<f64>> = w.iter().map(|u| apply(u)).collect();
    let mut h = vec![0f64; b * b];
    for i in 0..b {
        for j in 0..b {
            h[i * b + j] = w[i].iter().zip(&aw[j]).map(|(a, c)| a * c).sum();
        }
    }
    let (values, vectors) = jacobi_eigen(&mut h, b);
    let mut order: Vec<usize> = (0..b).collect();
    order.sort_by(|&a, &c| values[c].total_cmp(&values[a]));
    order
        .iter()
        .take(k)
        .map(|&e| {
            let d = w[0].len();
            let mut u: Vec<f64> = (0..d)
                .map(|c| (0..b).map(|i| vectors[i * b + e] * w[i][c]).sum())
                .collect();
            let big = u
                .iter()
                .copied()
                .fold(0.0f64, |m, x| if x.abs() > m.abs() { x } else { m });
            if big < 0.0 {
                u.iter_mut().for_each(|x| *x = -*x);
            }
            u
        })
        .collect()
}

/// Eigenvalues and eigenvectors (columns of the returned row-major matrix)
/// of the symmetric `a` (b × b, destroyed), by cyclic Jacobi rotations.
fn jacobi_eigen(a: &mut [f64], b: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0f64; b * b];
    for i in 0..b {
        v[i * b + i] = 1.0;
    }
    for _ in 0..100 {
        let off: f64 = (0..b)
            .flat_map(|i| (0..b).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * b + j] * a[i * b + j])
            .sum();
        let diag: f64 = (0..b).map(|i| a[i * b + i] * a[i * b + i]).sum();
        if off <= 1e-30 * diag.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..b {
            for q in p + 1..b {
                let apq = a[p * b + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * b + q] - a[p * b + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for r in 0..b {
                    let (arp, arq) = (a[r * b + p], a[r * b + q]);
                    a[r * b + p] = c * arp - s * arq;
                    a[r * b + q] = s * arp + c * arq;
                }
                for r in 0..b {
                    let (apr, aqr) = (a[p * b + r], a[q * b + r]);
                    a[p * b + r] = c * apr - s * aqr;
                    a[q * b + r] = s * apr + c * aqr;
                }
                for r in 0..b {
                    let (vrp, vrq) = (v[r * b + p], v[r * b + q]);
                    v[r * b + p] = c * vrp - s * vrq;
                    v[r * b + q] = s * vrp + c * vrq;
                }
            }
        }
    }
    ((0..b).map(|i| a[i * b + i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condensed_index_matches_squareform_order() {
        let n = 5;
        let mut k = 0;
        for i in 0..n {
            for j in i + 1..n {
                assert_eq!(condensed_index(n, i, j), k);
                assert_eq!(condensed_index(n, j, i), k);
                k += 1;
            }
        }
    }

    #[test]
    fn conditional_rows_reach_the_perplexity() {
        let mut rng = SplitMix64::new(3);
        let (n, d) = (40, 3);
        let x: Vec<f64> = (0..n * d).map(|_| rng.normal()).collect();
        let p = joint_probabilities(&x, n, d, 10.0).unwrap();
        let total: f64 = p.iter().sum();
        assert!((total - 0.5).abs() < 1e-6, "{total}");
        assert!(joint_probabilities(&x, n, d, 40.0).is_err());
        let mut bad = x.clone();
        bad[5] = f64::NAN;
        assert!(joint_probabilities(&bad, n, d, 10.0).is_err());
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let mut rng = SplitMix64::new(9);
        let (n, d) = (12, 4);
        let x: Vec<f64> = (0..n * d).map(|_| rng.normal()).collect();
        let p = joint_probabilities(&x, n, d, 3.0).unwrap();
        let y: Vec<f64> = (0..2 * n).map(|_| rng.normal()).collect();
        let (_, g) = kl_divergence_gradient(&p, &y, n, true);
        for k in [0, 5, 17] {
            let h = 1e-6;
            let mut yp = y.clone();
            yp[k] += h;
            let mut ym = y.clone();
            ym[k] -= h;
            let fd = (kl_divergence_gradient(&p, &yp, n, true).0
                - kl_divergence_gradient(&p, &ym, n, true).0)
                / (2.0 * h);
            // Central differences at h = 1e-6: error ~1e-9 on O(0.1) values.
            assert!((fd - g[k]).abs() < 1e-6, "{k}: {fd} vs {}", g[k]);
        }
    }

    #[test]
    fn pca_finds_the_dominant_direction_and_same_seed_same_bits() {
        let mut rng = SplitMix64::new(1);
        let n = 30;
        // Spread 10 along (1, 1, 0)/√2, 1 elsewhere.
        let x: Vec<f64> = (0..n)
            .flat_map(|_| {
                let t = 10.0 * rng.normal();
                let e = [rng.normal(), rng.normal(), rng.normal()];
                [t + e[0], t - e[0] * 0.1, e[2]]
            })
            .collect();
        let y = pca_init(&x, n, 3).unwrap();
        let m = (0..n).map(|r| y[2 * r]).sum::<f64>() / n as f64;
        let sd = ((0..n).map(|r| (y[2 * r] - m).powi(2)).sum::<f64>() / n as f64).sqrt();
        assert!((sd - 1e-4).abs() < 1e-12, "{sd}");
        let a = tsne(
            &x,
            n,
            3,
            &TsneOptions {
                perplexity: 5.0,
                ..TsneOptions::default()
            },
        )
        .unwrap();
        let b = tsne(
            &x,
            n,
            3,
            &TsneOptions {
                perplexity: 5.0,
                ..TsneOptions::default()
            },
        )
        .unwrap();
        assert_eq!(a, b);
        assert!(a.kl_divergence.is_finite() && a.kl_divergence >= 0.0);
        let short = TsneOptions {
            perplexity: 5.0,
            max_iter: EXPLORATION_ITER,
            ..TsneOptions::default()
        };
        let c = tsne(&x, n, 3, &short).unwrap();
        assert_eq!(c.iterations, EXPLORATION_ITER);
        assert!(c.kl_divergence.is_finite() && c.kl_divergence >= 0.0);
        assert!(pca_init(&vec![1.0; 2 * n], n, 2).is_err());
    }
}
