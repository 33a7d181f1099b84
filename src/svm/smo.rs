//! libsvm's SMO solver for one two-class C-SVC dual over a precomputed
//! kernel matrix.
//!
//! The dual: minimize `½ αᵀQα − eᵀα` subject to `yᵀα = 0`, `0 ≤ α ≤ C`,
//! with `Q[s][t] = y_s·y_t·K[s][t]` (never formed: every access goes
//! through `K` and the labels). Working-set selection is libsvm's
//! second-order rule (WSS 3 of Fan, Chen and Lin 2005) with its `>=`/`<=`
//! tie breaking; the two-variable update, its clipping, the stopping rule
//! (`Gmax + Gmax2 < tol`) and the bias (`calculate_rho`: the mean of `y·G`
//! over free variables, else the midpoint of the feasible interval) are
//! libsvm's. There is no shrinking and everything is `f64` (libsvm keeps
//! `Q` in `f32`), so the iterates are those of libsvm with
//! `shrinking=False` up to that rounding; with shrinking (scikit-learn's
//! default) libsvm may stop at a slightly different point that meets the
//! same tolerance.

/// libsvm's `TAU`: the curvature used when a pair's is not positive.
pub use crate::svr::smo::TAU;

/// libsvm's iteration cap for `l` variables: `max(10⁷, 100·l)`.
pub fn default_max_iter(l: usize) -> usize {
    10_000_000usize.max(100usize.saturating_mul(l))
}

/// What [`solve`] reports besides the dual coefficients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SmoOutcome {
    /// libsvm's `ρ`: the decision function is `Σ_t y_t·α_t·K(x_t, x) − ρ`.
    pub rho: f64,
    /// Number of SMO iterations (pair updates).
    pub iterations: usize,
    /// Whether the maximal KKT violation fell below the tolerance before
    /// the iteration cap.
    pub converged: bool,
}

/// Solves one C-SVC dual with libsvm's SMO.
///
/// `gram` is the l × l row-major kernel matrix of the training samples in
/// the order libsvm sees them, `y` their labels (+1 or −1). On return
/// `alpha[t]` is `y_t·α_t` (libsvm's signed coefficient). Panics if the
/// lengths are not l², l and l or l is 0 (callers check shapes).
pub fn solve(
    gram: &[f64],
    l: usize,
    y: &[f64],
    c: f64,
    tol: f64,
    max_iter: usize,
    alpha: &mut [f64],
) -> SmoOutcome {
    assert!(l > 0 && gram.len() == l * l && y.len() == l && alpha.len() == l);
    let qd: Vec<f64> = (0..l).map(|t| gram[t * l + t]).collect();
    alpha.fill(0.0);
    // G = Qα − e = −e at α = 0.
    let mut grad = vec![-1.0; l];
    let mut iterations = 0;
    let mut converged = false;
    while iterations < max_iter {
        // i maximizes −y_t·G_t over I_up.
        let mut gmax = f64::NEG_INFINITY;
        let mut gmax_idx = usize::MAX;
        for t in 0..l {
            if y[t] > 0.0 {
                if alpha[t] < c && -grad[t] >= gmax {
                    gmax = -grad[t];
                    gmax_idx = t;
                }
            } else if alpha[t] > 0.0 && grad[t] >= gmax {
                gmax = grad[t];
                gmax_idx = t;
            }
        }
        // j minimizes the second-order objective decrease over I_low;
        // gmax2 tracks max y_t·G_t over I_low for the stopping test.
        // Without an i, gmax = −∞ and no grad_diff is positive.
        let ri = if gmax_idx == usize::MAX { 0 } else { gmax_idx };
        let k_i = &gram[ri * l..ri * l + l];
        let mut gmax2 = f64::NEG_INFINITY;
        let mut gmin_idx = usize::MAX;
        let mut obj_diff_min = f64::INFINITY;
        for t in 0..l {
            // y_t·G_t, over I_low: α_t > 0 for y = +1, α_t < C for y = −1.
            let (in_low, yg) = if y[t] > 0.0 {
                (alpha[t] > 0.0, grad[t])
            } else {
                (alpha[t] < c, -grad[t])
            };
            if !in_low {
                continue;
            }
            if yg >= gmax2 {
                gmax2 = yg;
            }
            let grad_diff = gmax + yg;
            if grad_diff > 0.0 {
                // QD_i + QD_t − 2·y_i·Q_it is the kernel distance
                // K_ii + K_tt − 2·K_it for either label of t.
                let quad = qd[ri] + qd[t] - 2.0 * k_i[t];
                let obj_diff = if quad > 0.0 {
                    -(grad_diff * grad_diff) / quad
                } else {
                    -(grad_diff * grad_diff) / TAU
                };
                if obj_diff <= obj_diff_min {
                    gmin_idx = t;
                    obj_diff_min = obj_diff;
                }
            }
        }
        if gmax + gmax2 < tol || gmin_idx == usize::MAX {
            converged = true;
            break;
        }
        let (i, j) = (gmax_idx, gmin_idx);
        iterations += 1;

        // Two-variable update with libsvm's clipping (C_i = C_j = C).
        let k_ij = gram[i * l + j];
        let (old_i, old_j) = (alpha[i], alpha[j]);
        let (mut ai, mut aj) = (old_i, old_j);
        let mut quad = qd[i] + qd[j] - 2.0 * k_ij;
        if quad <= 0.0 {
            quad = TAU;
        }
        if y[i] != y[j] {
            let delta = (-grad[i] - grad[j]) / quad;
            let diff = ai - aj;
            ai += delta;
            aj += delta;
            if diff > 0.0 {
                if aj < 0.0 {
                    aj = 0.0;
                    ai = diff;
                }
            } else if ai < 0.0 {
                ai = 0.0;
                aj = -diff;
            }
            if diff > 0.0 {
                if ai > c {
                    ai = c;
                    aj = c - diff;
                }
            } else if aj > c {
                aj = c;
                ai = c + diff;
            }
        } else {
            let delta = (grad[i] - grad[j]) / quad;
            let sum = ai + aj;
            ai -= delta;
            aj += delta;
            if sum > c {
                if ai > c {
                    ai = c;
                    aj = sum - c;
                }
            } else if aj < 0.0 {
                aj = 0.0;
                ai = sum;
            }
            if sum > c {
                if aj > c {
                    aj = c;
                    ai = sum - c;
                }
            } else if ai < 0.0 {
                ai = 0.0;
                aj = sum;
            }
        }
        alpha[i] = ai;
        alpha[j] = aj;

        // G_t += Q_ti·Δα_i + Q_tj·Δα_j = y_t·(K_ti·y_i·Δα_i + K_tj·y_j·Δα_j).
        let ci = y[i] * (ai - old_i);
        let cj = y[j] * (aj - old_j);
        let (row_i, row_j) = (&gram[i * l..i * l + l], &gram[j * l..j * l + l]);
        for t in 0..l {
            grad[t] += y[t] * (row_i[t] * ci + row_j[t] * cj);
        }
    }

    // ρ as libsvm's `calculate_rho`.
    let mut ub = f64::INFINITY;
    let mut lb = f64::NEG_INFINITY;
    let mut sum_free = 0.0;
    let mut nr_free = 0usize;
    for t in 0..l {
        let yg = y[t] * grad[t];
        if alpha[t] >= c {
            if y[t] < 0.0 {
                ub = ub.min(yg);
            } else {
                lb = lb.max(yg);
            }
        } else if alpha[t] <= 0.0 {
            if y[t] > 0.0 {
                ub = ub.min(yg);
            } else {
                lb = lb.max(yg);
            }
        } else {
            nr_free += 1;
            sum_free += yg;
        }
    }
    let rho = if nr_free > 0 {
        sum_free / nr_free as f64
    } else {
        (ub + lb) / 2.0
    };
    for (a, &yt) in alpha.iter_mut().zip(y) {
        *a *= yt;
    }
    SmoOutcome {
        rho,
        iterations,
        converged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_separable_points_get_the_max_margin_solution() {
        // x = ±1 with the linear kernel: w = 1, b = 0, α = ½ each.
        let gram = [1.0, -1.0, -1.0, 1.0];
        let mut alpha = [0.0; 2];
        let out = solve(&gram, 2, &[1.0, -1.0], 10.0, 1e-3, 100, &mut alpha);
        assert!(out.converged);
        assert!((alpha[0] - 0.5).abs() < 1e-12 && (alpha[1] + 0.5).abs() < 1e-12);
        assert!(out.rho.abs() < 1e-12);
    }

    #[test]
    fn the_box_bounds_the_coefficients() {
        // Overlapping points: both at C, ρ from the bounds' midpoint.
        let gram = [1.0, 0.9, 0.9, 1.0];
        let mut alpha = [0.0; 2];
        let out = solve(&gram, 2, &[1.0, -1.0], 0.5, 1e-3, 100, &mut alpha);
        assert_eq!(alpha, [0.5, -0.5]);
        assert!(out.converged && out.rho.abs() < 1e-12);
    }
}
