//! libsvm's SMO solver for one epsilon-SVR dual over a precomputed Gram matrix.
//!
//! This is the CPU reference for the batched solver: one call solves one
//! problem, touching nothing but its arguments, so a GPU block per problem
//! can mirror it line by line.
//!
//! Following libsvm (`solve_epsilon_svr`), the dual has 2l variables: `α_m`
//! (index m, sign +1) and `α*_m` (index m + l, sign −1), linear term
//! `p = ε − y` for the first half and `ε + y` for the second, one equality
//! constraint `Σ sign·α = 0` and the box `0 ≤ α ≤ C`. The 2l × 2l matrix
//! `Q[s][t] = sign_s·sign_t·K[s mod l][t mod l]` is never formed: every access
//! goes through the l × l Gram matrix `K`. Working-set selection is libsvm's
//! second-order rule (Fan, Chen and Lin 2005) with the same `>=`/`<=` tie
//! breaking, the two-variable update and its clipping are libsvm's, and so is
//! the bias. There is no shrinking: with at most a few dozen variables it
//! saves little, and without it the iterates are those of libsvm run with
//! `shrinking=False` (up to libsvm keeping `Q` in `f32`; here all is `f64`).

/// libsvm's `TAU`: the curvature used when a pair's is not positive.
pub const TAU: f64 = 1e-12;

/// libsvm's iteration cap for a dual with `2·l` variables:
/// `max(10⁷, 100·2l)`.
pub fn default_max_iter(l: usize) -> usize {
    10_000_000usize.max(200usize.saturating_mul(l))
}

/// Scratch memory for [`solve`], reusable across problems of any size.
#[derive(Debug, Default, Clone)]
pub struct Workspace {
    alpha: Vec<f64>,
    grad: Vec<f64>,
    qd: Vec<f64>,
}

/// What [`solve`] reports besides the dual coefficients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SmoOutcome {
    /// The intercept `b = −ρ`.
    pub b: f64,
    /// Number of SMO iterations (pair updates).
    pub iterations: usize,
    /// Whether the maximal KKT violation fell below the tolerance before the
    /// iteration cap.
    pub converged: bool,
    /// Whether any comparison against `C` came out true during the run (an
    /// update clipped at `C`, a variable reached `C`, or a pair's sum
    /// exceeded `C`). When false, every step was exactly what it would have
    /// been with `C = ∞`, so the run — every iterate, `β` and `b`, bit for
    /// bit — is the same for every larger `C`.
    pub c_bound_active: bool,
}

/// Solves one epsilon-SVR dual with libsvm's SMO.
///
/// `gram` is the l × l row-major matrix `K[m][n] = x_m·x_n` of the training
/// rows, `y` the l targets. On return `beta[m] = α_m − α*_m`, so that
/// `f(x) = Σ_m beta[m]·(x_m·x) + b`. Panics if `gram`, `y` or `beta` do not
/// have l² and l elements or l is 0 (callers check shapes once per batch).
#[allow(clippy::too_many_arguments)]
pub fn solve(
    gram: &[f64],
    l: usize,
    y: &[f64],
    c: f64,
    epsilon: f64,
    tol: f64,
    max_iter: usize,
    ws: &mut Workspace,
    beta: &mut [f64],
) -> SmoOutcome {
    assert!(l > 0 && gram.len() == l * l && y.len() == l && beta.len() == l);
    let n = 2 * l;
    let sign = |t: usize| if t < l { 1.0 } else { -1.0 };

    ws.qd.clear();
    ws.qd.extend((0..l).map(|m| gram[m * l + m]));
    ws.alpha.clear();
    ws.alpha.resize(n, 0.0);
    ws.grad.clear();
    // G = Qα + p = p at α = 0.
    ws.grad.extend(y.iter().map(|&yi| epsilon - yi));
    ws.grad.extend(y.iter().map(|&yi| epsilon + yi));
    let qd = &ws.qd;
    let alpha = &mut ws.alpha;
    let grad = &mut ws.grad;
    let mut c_bound_active = false;

    let mut iterations = 0;
    let mut converged = false;
    while iterations < max_iter {
        // Working-set selection, libsvm's `select_working_set` (WSS 2),
        // scanning t = 0..2l as two halves (α then α*) to avoid `t mod l`.
        // i maximizes −y_t·G_t over I_up.
        let mut gmax = f64::NEG_INFINITY;
        let mut gmax_idx = usize::MAX;
        let (a_pos, a_neg) = alpha.split_at(l);
        let (g_pos, g_neg) = grad.split_at(l);
        for (m, (&a, &g)) in a_pos.iter().zip(g_pos).enumerate() {
            if a < c && -g >= gmax {
                gmax = -g;
                gmax_idx = m;
            }
        }
        for (m, (&a, &g)) in a_neg.iter().zip(g_neg).enumerate() {
            if a > 0.0 && g >= gmax {
                gmax = g;
                gmax_idx = l + m;
            }
        }
        // j minimizes the second-order objective decrease over I_low;
        // gmax2 tracks max y_t·G_t over I_low for the stopping test. Without
        // an i, gmax = −∞ and no grad_diff is positive, as in libsvm.
        let mut gmax2 = f64::NEG_INFINITY;
        let mut gmin_idx = usize::MAX;
        let mut obj_diff_min = f64::INFINITY;
        let ri = if gmax_idx == usize::MAX {
            0
        } else {
            gmax_idx % l
        };
        let k_i = &gram[ri * l..ri * l + l];
        let qd_i = qd[ri];
        let mut consider = |t: usize, grad_diff: f64, qd_t: f64, k_it: f64| {
            // QD_i + QD_t − 2·y_i·Q_it reduces to the kernel distance
            // K_ii + K_tt − 2·K_it for either sign of t.
            let quad = qd_i + qd_t - 2.0 * k_it;
            let obj_diff = if quad > 0.0 {
                -(grad_diff * grad_diff) / quad
            } else {
                -(grad_diff * grad_diff) / TAU
            };
            if obj_diff <= obj_diff_min {
                gmin_idx = t;
                obj_diff_min = obj_diff;
            }
        };
        let rows = qd.iter().zip(k_i);
        for (m, ((&a, &g), (&qd_t, &k_it))) in a_pos.iter().zip(g_pos).zip(rows.clone()).enumerate()
        {
            if a > 0.0 {
                if g >= gmax2 {
                    gmax2 = g;
                }
                if gmax + g > 0.0 {
                    consider(m, gmax + g, qd_t, k_it);
                }
            }
        }
        for (m, ((&a, &g), (&qd_t, &k_it))) in a_neg.iter().zip(g_neg).zip(rows).enumerate() {
            if a < c {
                // y·G = −G; gmax − G_t is computed as gmax + (−G_t), the
                // same IEEE operation as libsvm's.
                let yg = -g;
                if yg >= gmax2 {
                    gmax2 = yg;
                }
                if gmax + yg > 0.0 {
                    consider(l + m, gmax + yg, qd_t, k_it);
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
        let (ri, rj) = (i % l, j % l);
        let k_ij = gram[ri * l + rj];
        let q_ij = sign(i) * sign(j) * k_ij;
        let (old_i, old_j) = (alpha[i], alpha[j]);
        let (mut ai, mut aj) = (old_i, old_j);
        if sign(i) != sign(j) {
            let mut quad = qd[ri] + qd[rj] + 2.0 * q_ij;
            if quad <= 0.0 {
                quad = TAU;
            }
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
                    c_bound_active = true;
                    ai = c;
                    aj = c - diff;
                }
            } else if aj > c {
                c_bound_active = true;
                aj = c;
                ai = c + diff;
            }
        } else {
            let mut quad = qd[ri] + qd[rj] - 2.0 * q_ij;
            if quad <= 0.0 {
                quad = TAU;
            }
            let delta = (grad[i] - grad[j]) / quad;
            let sum = ai + aj;
            ai -= delta;
            aj += delta;
            if sum > c {
                c_bound_active = true;
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
        if ai >= c || aj >= c {
            c_bound_active = true;
        }
        alpha[i] = ai;
        alpha[j] = aj;

        // G_t += Q_ti·Δα_i + Q_tj·Δα_j; both halves share the K row term.
        let ci = sign(i) * (ai - old_i);
        let cj = sign(j) * (aj - old_j);
        let (row_i, row_j) = (&gram[ri * l..ri * l + l], &gram[rj * l..rj * l + l]);
        let (g_pos, g_neg) = grad.split_at_mut(l);
        for m in 0..l {
            let v = row_i[m] * ci + row_j[m] * cj;
            g_pos[m] += v;
            g_neg[m] -= v;
        }
    }

    // ρ as libsvm's `calculate_rho`: mean of y·G over free variables, else
    // the midpoint of the feasible interval.
    let mut ub = f64::INFINITY;
    let mut lb = f64::NEG_INFINITY;
    let mut sum_free = 0.0;
    let mut nr_free = 0usize;
    for t in 0..n {
        let y_t = sign(t);
        let yg = y_t * grad[t];
        if alpha[t] >= c {
            if y_t < 0.0 {
                ub = ub.min(yg);
            } else {
                lb = lb.max(yg);
            }
        } else if alpha[t] <= 0.0 {
            if y_t > 0.0 {
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
    for (m, b) in beta.iter_mut().enumerate() {
        *b = alpha[m] - alpha[m + l];
    }
    SmoOutcome {
        b: -rho,
        iterations,
        converged,
        c_bound_active,
    }
}
