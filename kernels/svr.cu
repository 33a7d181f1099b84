// Batched linear epsilon-SVR: libsvm's SMO (second-order working-set
// selection, no shrinking), one warp per problem. The device mirror of
// src/svr/smo.rs (the CPU reference) and of the grid search's chains in
// src/svr/grid.rs; the Rust side is src/svr/device.rs.
//
// Exactness: every floating-point operation of the reference is done here in
// the same order, in f64, with products that feed a sum rounded on their own
// (mul_rn: no FMA contraction), and every sum the reference takes in index
// order (ρ, predictions, R²) is taken sequentially by one lane. Warp
// reductions only compare (max/min and the arg ties), which is exact. So β,
// b, the iteration count, the held-out scores and the choice of (C, ε) equal
// the CPU solver's bit for bit (up to the sign of a zero b, where fmin/fmax
// may pick either zero). These helpers, the WSS objective and the clipped
// two-variable step are shared with svm.cu in smo_warp.cuh.
//
// Problem layout in a warp (R = rows per lane, l ≤ 32·R): lane k holds the
// training rows m = k + 32·r (r < R) and for each the two dual variables
// α_m (index t = m, sign +1) and α*_m (t = l + m, sign −1): α, α* and their
// gradients in registers, 4·R doubles. Working-set selection (libsvm WSS 2,
// `>=`/`<=` scans in t order, so the LAST index wins a tie):
//   i = argmax over I_up of −y_t·G_t: per-lane scan, warp max of the value,
//       then the warp max of the index among lanes holding that value;
//   j = argmin of the second-order decrease over I_low, same scheme with min;
//   gmax2 = max over I_low of y_t·G_t (stopping test), a warp max.
// α_i, G_i, α_j, G_j are broadcast from their lanes, every lane computes the
// two-variable update redundantly (no divergence) and updates the gradients
// of its own rows with rows ri and rj of the Gram matrix K, which lives in
// shared memory. ρ (libsvm's calculate_rho) is summed by lane 0 from a
// per-warp scratch area.
//
// Variants: R = 1, 2, 4 as _l32, _l64, _l128 (the most training rows).
//
// Kernels (kSvrWarps = 4 warps = 128 threads per block; dynamic shared memory
// Lmax² + kSvrWarps·4·Lmax doubles: the block's Gram matrix, then each warp's
// scratch of 4·l doubles):
//   svr_batch_l{32,64,128}_f64  independent problems. Problems sharing a Gram
//       matrix ("set") are stored consecutively by the host; block b solves
//       problems block_first[b] + w, w < block_count[b] ≤ kSvrWarps, all on
//       set block_set[b]. Sets: gram[set_off[s] ..] l×l row-major with
//       l = set_l[s], iteration cap set_max_iter[s]. Problem p: targets
//       y[y_off[p] .. + l], c[p], eps[p], tol[p]; outputs beta at the same
//       offsets as y, b[p], iterations[p], flags[p] (bit 0 converged, bit 1
//       the C bound was touched: smo::SmoOutcome::c_bound_active).
//   svr_grid_l{32,64,128}_f64   the cross-validation part of the grid search.
//       grid (⌈genes·n_eps / kSvrWarps⌉, folds); block (x, f) works on fold f,
//       warp w on the chain q = x·kSvrWarps + w: gene q / n_eps, ε index
//       q % n_eps. A chain solves C in increasing order (c_sorted, with
//       c_index the position of each in the grid's C list) and scores each
//       solve by R² on the fold's held-out rows; once a solve never touched
//       the C bound, every larger C repeats it bit for bit, so its score is
//       written for them and the chain stops (as src/svr/grid.rs does).
//       Fold f: rows[f·n ..]: its l = fold_l[f] training rows, then its n − l
//       held-out rows (sample indices); gram[f·lmax² ..] l×l; cross
//       [f·nt_max·lmax ..] (n − l)×l held-out × training kernel values, read
//       from global memory (once per solve). y [genes, n] gene-major. Outputs:
//       scores[chain·n_c + c] with chain = (gene·folds + f)·n_eps + e (the
//       CPU's chain order) and counts[2·chain] = SMO solves,
//       counts[2·chain + 1] = settings whose solve did not converge.
//
// Speed (paper grid: 218 genes × 3 folds × 11 ε = 7,194 chains, l = 19–20):
// 1,799 blocks of 4 warps with 7 KiB of shared memory each. At ≤ 96
// registers a thread an SM holds 5 blocks, so an H100 (132 SMs) runs them in
// under 3 waves. With the paper's features C never binds, so a chain is one
// solve of a few dozen iterations, each a dependent sequence of about 30
// warp collectives and two f64 divisions (well under 1 µs). Everything an
// iteration touches is in registers or shared memory; global memory is read
// once per solve. Solving the 719,400 problems one by one instead would take
// 100 times the solves: the chains are what puts the grid far below 1 s.

#include "common.cuh"
#include "smo_warp.cuh"

namespace {

constexpr int kSvrWarps = 4;
constexpr int kSvrThreads = 32 * kSvrWarps;
// Blocks per SM that __launch_bounds__ promises (≤ 128 registers a thread).
// Without it ptxas spills a few bytes in some variants; with 6 or more it
// must spill to fit.
constexpr int kSvrMinBlocks = 4;

struct SmoResult {
    double b;
    long long iterations;
    bool converged;
    bool c_bound;
};

// Solves one dual (smo::solve) with the calling warp. K: l×l Gram matrix in
// shared memory; y_at(m): target of training row m; scratch: 4·l doubles of
// this warp. On return scratch[m] = β_m = α_m − α*_m for m < l. Must be
// called by all 32 lanes with the same arguments. Only α, α* and G stay in
// registers (K_mm and y are reloaded where needed), which keeps the R = 4
// variant within its registers.
template <int R, class YAt>
__device__ __forceinline__ SmoResult smo_warp(const double* __restrict__ K, int l, YAt y_at, double c,
                                              double eps, double tol, long long max_iter,
                                              double* __restrict__ scratch) {
    const int lane = threadIdx.x & 31;
    double ap[R], an[R], gp[R], gn[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int m = lane + 32 * r;
        const double y = m < l ? y_at(m) : 0.0;
        ap[r] = 0.0;
        an[r] = 0.0;
        // G = Qα + p = p at α = 0.
        gp[r] = eps - y;
        gn[r] = eps + y;
    }
    bool converged = false;
    bool c_bound = false;
    long long iter = 0;
    while (iter < max_iter) {
        // i maximizes −y_t·G_t over I_up.
        // Each lane keeps G and α of its candidate, so that the owner of the
        // winner can broadcast them (no register array is indexed at run
        // time, which would move it to local memory).
        double best = -INFINITY, best_g = 0.0, best_a = 0.0;
        int best_t = -1;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int m = lane + 32 * r;
            if (m < l && ap[r] < c && -gp[r] >= best) {
                best = -gp[r];
                best_t = m;
                best_g = gp[r];
                best_a = ap[r];
            }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int m = lane + 32 * r;
            if (m < l && an[r] > 0.0 && gn[r] >= best) {
                best = gn[r];
                best_t = l + m;
                best_g = gn[r];
                best_a = an[r];
            }
        }
        const int i = warp_arg_max(best, best_t);
        if (i < 0) {
            converged = true;
            break;
        }
        const bool i_pos = i < l;
        const int ri = i_pos ? i : i - l;
        // Lane ri % 32 holds row ri, and its candidate is i.
        const double g_i = __shfl_sync(kFullMask, best_g, ri & 31);
        const double a_i = __shfl_sync(kFullMask, best_a, ri & 31);
        const double gmax = i_pos ? -g_i : g_i;

        // j minimizes the second-order decrease over I_low; gmax2 is the
        // maximal y_t·G_t over I_low.
        const double* const Ki = K + ri * l;
        const double qd_i = Ki[ri];
        double gmax2 = -INFINITY;
        double obj_min = INFINITY, min_g = 0.0, min_a = 0.0;
        int min_t = -1;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int m = lane + 32 * r;
            if (m < l && ap[r] > 0.0) {
                const double g = gp[r];
                if (g >= gmax2) gmax2 = g;
                const double grad_diff = gmax + g;
                if (grad_diff > 0.0) {
                    // K_ii + K_tt − 2·K_it for either sign of t.
                    const double quad = qd_i + K[m * l + m] - 2.0 * Ki[m];
                    const double obj = wss_objective(grad_diff, quad);
                    if (obj <= obj_min) {
                        obj_min = obj;
                        min_t = m;
                        min_g = gp[r];
                        min_a = ap[r];
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int m = lane + 32 * r;
            if (m < l && an[r] < c) {
                const double yg = -gn[r];
                if (yg >= gmax2) gmax2 = yg;
                const double grad_diff = gmax + yg;
                if (grad_diff > 0.0) {
                    const double quad = qd_i + K[m * l + m] - 2.0 * Ki[m];
                    const double obj = wss_objective(grad_diff, quad);
                    if (obj <= obj_min) {
                        obj_min = obj;
                        min_t = l + m;
                        min_g = gn[r];
                        min_a = an[r];
                    }
                }
            }
        }
        const int j = warp_arg_min(obj_min, min_t);
        const double gmax2_w = warp_max(gmax2);
        if (gmax + gmax2_w < tol || j < 0) {
            converged = true;
            break;
        }
        ++iter;

        const bool j_pos = j < l;
        const int rj = j_pos ? j : j - l;
        const double g_j = __shfl_sync(kFullMask, min_g, rj & 31);
        const double a_j = __shfl_sync(kFullMask, min_a, rj & 31);

        // Two-variable update with libsvm's clipping (C_i = C_j = C),
        // computed by every lane.
        const double* const Kj = K + rj * l;
        const double s_i = i_pos ? 1.0 : -1.0;
        const double s_j = j_pos ? 1.0 : -1.0;
        const double q_ij = s_i * s_j * Ki[rj];
        const double qd_j = Kj[rj];
        double ai = a_i, aj = a_j;
        // libsvm's quad_coef: Q_ii + Q_jj ± 2·q_ij (+ for opposite signs).
        const double quad = i_pos != j_pos ? qd_i + qd_j + 2.0 * q_ij : qd_i + qd_j - 2.0 * q_ij;
        if (smo_step(i_pos != j_pos, quad, g_i, g_j, c, ai, aj)) c_bound = true;

        // G_t += Q_ti·Δα_i + Q_tj·Δα_j; both halves share the K row term.
        const double ci = s_i * (ai - a_i);
        const double cj = s_j * (aj - a_j);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int m = lane + 32 * r;
            // Selects, not conditional stores, keep ap/an in registers.
            ap[r] = m == rj && j_pos ? aj : (m == ri && i_pos ? ai : ap[r]);
            an[r] = m == rj && !j_pos ? aj : (m == ri && !i_pos ? ai : an[r]);
            if (m < l) {
                const double v = mul_rn(Ki[m], ci) + mul_rn(Kj[m], cj);
                gp[r] += v;
                gn[r] -= v;
            }
        }
    }

    // ρ as libsvm's calculate_rho, summed in t order by lane 0.
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int m = lane + 32 * r;
        if (m < l) {
            scratch[m] = ap[r];
            scratch[l + m] = an[r];
            scratch[2 * l + m] = gp[r];
            scratch[3 * l + m] = -gn[r];
        }
    }
    __syncwarp();
    double b = 0.0;
    if (lane == 0) {
        double ub = INFINITY, lb = -INFINITY, sum_free = 0.0;
        int nr_free = 0;
        for (int t = 0; t < 2 * l; ++t) {
            const bool pos = t < l;
            const double a = scratch[t];
            const double yg = scratch[2 * l + t];
            if (a >= c) {
                if (pos) lb = fmax(lb, yg); else ub = fmin(ub, yg);
            } else if (a <= 0.0) {
                if (pos) ub = fmin(ub, yg); else lb = fmax(lb, yg);
            } else {
                ++nr_free;
                sum_free += yg;
            }
        }
        const double rho = nr_free > 0 ? sum_free / nr_free : (ub + lb) / 2.0;
        b = -rho;
    }
    // Lane 0 is done reading α before β overwrites it.
    __syncwarp();
    b = __shfl_sync(kFullMask, b, 0);
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int m = lane + 32 * r;
        if (m < l) scratch[m] = ap[r] - an[r];
    }
    __syncwarp();
    return SmoResult{b, iter, converged, c_bound};
}

// Copies an l×l Gram matrix into the block's shared memory.
__device__ __forceinline__ void load_gram(const double* __restrict__ src, int l, double* __restrict__ dst) {
    for (int e = threadIdx.x; e < l * l; e += blockDim.x) dst[e] = src[e];
    __syncthreads();
}

template <int R>
__device__ __forceinline__ void svr_batch_body(const double* __restrict__ gram, const long long* __restrict__ set_off,
                                               const int* __restrict__ set_l,
                                               const long long* __restrict__ set_max_iter,
                                               const int* __restrict__ block_set, const int* __restrict__ block_first,
                                               const int* __restrict__ block_count,
                                               const long long* __restrict__ y_off, const double* __restrict__ y,
                                               const double* __restrict__ c, const double* __restrict__ eps,
                                               const double* __restrict__ tol, double* __restrict__ beta,
                                               double* __restrict__ b, long long* __restrict__ iterations,
                                               int* __restrict__ flags) {
    CM_DYNAMIC_SHARED(double, smem);
    const int set = block_set[blockIdx.x];
    const int l = set_l[set];
    load_gram(gram + set_off[set], l, smem);
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= block_count[blockIdx.x]) return;
    const int p = block_first[blockIdx.x] + warp;
    const double* const yp = y + y_off[p];
    double* const scratch = smem + l * l + warp * 4 * l;
    const SmoResult s = smo_warp<R>(
        smem, l, [yp](int m) { return yp[m]; }, c[p], eps[p], tol[p], set_max_iter[set], scratch);
    for (int m = lane; m < l; m += 32) beta[y_off[p] + m] = scratch[m];
    if (lane == 0) {
        b[p] = s.b;
        iterations[p] = s.iterations;
        flags[p] = (s.converged ? 1 : 0) | (s.c_bound ? 2 : 0);
    }
}

// scikit-learn's r2_score of the n predictions pred against y[rows[k]],
// every sum in index order (grid::r2_score).
__device__ __forceinline__ double r2_score(const double* __restrict__ y, const int* __restrict__ rows,
                                           const double* __restrict__ pred, int n) {
    if (n < 2) return NAN;
    double sum = y[rows[0]];
    for (int k = 1; k < n; ++k) sum += y[rows[k]];
    const double mean = sum / n;
    double d = y[rows[0]] - pred[0];
    double ss_res = mul_rn(d, d);
    d = y[rows[0]] - mean;
    double ss_tot = mul_rn(d, d);
    for (int k = 1; k < n; ++k) {
        d = y[rows[k]] - pred[k];
        ss_res += mul_rn(d, d);
        d = y[rows[k]] - mean;
        ss_tot += mul_rn(d, d);
    }
    if (ss_res == 0.0) return 1.0;
    if (ss_tot == 0.0) return 0.0;
    return 1.0 - ss_res / ss_tot;
}

template <int R>
__device__ __forceinline__ void svr_grid_body(const double* __restrict__ gram, const double* __restrict__ cross,
                                              const int* __restrict__ fold_rows, const int* __restrict__ fold_l,
                                              const long long* __restrict__ fold_max_iter, int lmax, int nt_max,
                                              int n,
                                              const double* __restrict__ y, int n_genes,
                                              const double* __restrict__ c_sorted, const int* __restrict__ c_index,
                                              int n_c, const double* __restrict__ eps, int n_eps, double tol,
                                              double* __restrict__ scores, int* __restrict__ counts) {
    CM_DYNAMIC_SHARED(double, smem);
    const int f = blockIdx.y;
    const int l = fold_l[f];
    const int nt = n - l;
    load_gram(gram + (long long)f * lmax * lmax, l, smem);
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int q = blockIdx.x * kSvrWarps + warp;
    if (q >= n_genes * n_eps) return;
    const int g = q / n_eps;
    const int e = q % n_eps;
    const long long chain = ((long long)g * gridDim.y + f) * n_eps + e;
    const int* const rows = fold_rows + (long long)f * n;
    const double* const yg = y + (long long)g * n;
    const double* const xc = cross + (long long)f * nt_max * lmax;
    double* const scratch = smem + l * l + warp * 4 * l;
    const auto y_at = [yg, rows](int m) { return yg[rows[m]]; };
    int solves = 0, unconverged = 0;
    for (int k = 0; k < n_c; ++k) {
        const SmoResult s = smo_warp<R>(smem, l, y_at, c_sorted[k], eps[e], tol, fold_max_iter[f], scratch);
        ++solves;
        // Held-out predictions Σ_m β_m·K(x_m, x) + b, each summed in m order.
        for (int t = lane; t < nt; t += 32) {
            const double* const kt = xc + (long long)t * l;
            double sum = mul_rn(kt[0], scratch[0]);
            for (int m = 1; m < l; ++m) sum += mul_rn(kt[m], scratch[m]);
            scratch[l + t] = sum + s.b;
        }
        __syncwarp();
        if (lane == 0) {
            const double score = r2_score(yg, rows + l, scratch + l, nt);
            // Without the C bound every larger C is the same solve.
            const int last = s.c_bound ? k : n_c - 1;
            for (int k2 = k; k2 <= last; ++k2) {
                scores[chain * n_c + c_index[k2]] = score;
                unconverged += s.converged ? 0 : 1;
            }
        }
        __syncwarp();
        if (!s.c_bound) break;
    }
    if (lane == 0) {
        counts[2 * chain] = solves;
        counts[2 * chain + 1] = unconverged;
    }
}

}  // namespace

#define SVR_BATCH_KERNEL(name, R)                                                                              \
    extern "C" __global__ void __launch_bounds__(kSvrThreads, kSvrMinBlocks)                                                  \
        name(const double* gram, const long long* set_off, const int* set_l, const long long* set_max_iter,    \
             const int* block_set, const int* block_first, const int* block_count, const long long* y_off,     \
             const double* y, const double* c, const double* eps, const double* tol, double* beta, double* b,  \
             long long* iterations, int* flags) {                                                              \
        svr_batch_body<R>(gram, set_off, set_l, set_max_iter, block_set, block_first, block_count, y_off, y,   \
                          c, eps, tol, beta, b, iterations, flags);                                            \
    }

#define SVR_GRID_KERNEL(name, R)                                                                               \
    extern "C" __global__ void __launch_bounds__(kSvrThreads, kSvrMinBlocks)                                                  \
        name(const double* gram, const double* cross, const int* fold_rows, const int* fold_l,                 \
             const long long* fold_max_iter, int lmax, int nt_max, int n, const double* y, int n_genes,        \
             const double* c_sorted, const int* c_index, int n_c, const double* eps, int n_eps, double tol,    \
             double* scores, int* counts) {                                                                    \
        svr_grid_body<R>(gram, cross, fold_rows, fold_l, fold_max_iter, lmax, nt_max, n, y, n_genes,           \
                         c_sorted, c_index, n_c, eps, n_eps, tol, scores, counts);                             \
    }

SVR_BATCH_KERNEL(svr_batch_l32_f64, 1)
CM_EXPORT(svr_batch_l32_f64)
SVR_BATCH_KERNEL(svr_batch_l64_f64, 2)
CM_EXPORT(svr_batch_l64_f64)
SVR_BATCH_KERNEL(svr_batch_l128_f64, 4)
CM_EXPORT(svr_batch_l128_f64)

SVR_GRID_KERNEL(svr_grid_l32_f64, 1)
CM_EXPORT(svr_grid_l32_f64)
SVR_GRID_KERNEL(svr_grid_l64_f64, 2)
CM_EXPORT(svr_grid_l64_f64)
SVR_GRID_KERNEL(svr_grid_l128_f64, 4)
CM_EXPORT(svr_grid_l128_f64)
