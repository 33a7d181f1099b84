// Batched two-class C-SVC duals (the pairs of a one-vs-one RBF SVM): libsvm's
// SMO (second-order working-set selection, no shrinking), one warp per
// problem. The device mirror of src/svm/smo.rs (the CPU reference); the Rust
// side is src/svm/device.rs.
//
// Exactness: every floating-point operation of the reference is done here in
// the same order, in f64, with products that feed a sum rounded on their own
// (mul_rn: no FMA contraction), and the one sum the reference takes in index
// order (ρ) is taken sequentially by one lane. Warp reductions only compare
// (max/min and the arg ties), which is exact. So the dual coefficients, ρ and
// the iteration count equal the CPU solver's bit for bit (up to the sign of a
// zero ρ from the bounds' midpoint, where fmin/fmax may pick either zero).
// These helpers, the WSS objective and the clipped two-variable step are
// shared with svr.cu in smo_warp.cuh.
//
// Problem layout: l training rows, the n_pos rows of label +1 first, then the
// l − n_pos rows of label −1 (how src/svm/mod.rs orders a pair's samples).
// The l×l Gram matrix K (RBF values, computed on the host exactly as the CPU
// path does) is shared by the problems of one "set" (a pair's samples under
// one γ; the problems differ in C). Each warp keeps its problem's α and G
// (2·l doubles) in memory; lane k handles the rows m = k + 32·r. Working-set
// selection (libsvm WSS 3, `>=`/`<=` scans in t order, so the LAST index wins
// a tie):
//   i = argmax over I_up of −y_t·G_t: per-lane scan, warp max of the value,
//       then the warp max of the index among lanes holding that value;
//   j = argmin of the second-order decrease over I_low, same scheme with min;
//   gmax2 = max over I_low of y_t·G_t (stopping test), a warp max.
// Every lane reads α_i, G_i, α_j, G_j and computes the two-variable update
// redundantly; lane 0 stores α_i, α_j; each lane updates the gradients of its
// rows with rows i and j of K. ρ (libsvm's calculate_rho) is summed by lane 0.
//
// Kernels (kSvmWarps = 4 warps = 128 threads per block). Problems sharing a
// set are stored consecutively by the host; block b solves problems
// block_first[b] + w, w < block_count[b] ≤ kSvmWarps, all on set block_set[b].
// Set s: gram[set_off[s] ..] l×l row-major with l = set_l[s], n_pos[s] rows of
// label +1, iteration cap set_max_iter[s]. Problem p: c[p], tol[p]; outputs
// coef[coef_off[p] .. + l] = y_t·α_t (libsvm's signed coefficients), rho[p],
// iterations[p], converged[p] (1 or 0).
//   svm_batch_shared_f64  l ≤ 128 (src/svm/device.rs SHARED_MAX_ROWS):
//       dynamic shared memory lmax² + kSvmWarps·2·lmax doubles (at most
//       136 KiB): the block's Gram matrix, then each warp's α and G. `work`
//       is unused.
//   svm_batch_global_f64  any l: K is read from global memory (through L1/L2)
//       and a warp's α lives in coef, its G in work[coef_off[p] ..]; no
//       shared memory.
//
// Speed: an iteration is a dependent chain of 5 warp collectives, two f64
// divisions and ⌈l/32⌉ rows per lane of scans and gradient updates, so a
// problem takes microseconds to milliseconds; throughput comes from solving
// every pair of every fold and setting of a grid search in one launch.

#include "common.cuh"
#include "smo_warp.cuh"

namespace {

constexpr int kSvmWarps = 4;
constexpr int kSvmThreads = 32 * kSvmWarps;
// Blocks per SM that __launch_bounds__ promises (≤ 128 registers a thread).
// Without a minimum, ptxas (CUDA 13) caps the shared variant at 56 registers
// and spills a few bytes; with it, it takes 64 and spills nothing.
constexpr int kSvmMinBlocks = 4;

// Solves one dual (smo::solve) with the calling warp. K: l×l Gram matrix;
// alpha, grad: l doubles each of this warp. On return coef[t] = y_t·α_t and
// *rho, *iterations, *converged hold the outcome (written by lane 0). Must be
// called by all 32 lanes with the same arguments. coef may alias alpha.
__device__ __forceinline__ void smo_warp(const double* __restrict__ K, int l, int n_pos, double c, double tol,
                                         long long max_iter, double* alpha, double* __restrict__ grad,
                                         double* coef, double* rho_out, long long* iter_out, int* conv_out) {
    const int lane = threadIdx.x & 31;
    for (int m = lane; m < l; m += 32) {
        alpha[m] = 0.0;
        // G = Qα − e = −e at α = 0.
        grad[m] = -1.0;
    }
    __syncwarp();
    bool converged = false;
    long long iter = 0;
    while (iter < max_iter) {
        // i maximizes −y_t·G_t over I_up.
        double best = -INFINITY;
        int best_t = -1;
        for (int m = lane; m < l; m += 32) {
            const double g = grad[m];
            const double a = alpha[m];
            if (m < n_pos) {
                if (a < c && -g >= best) {
                    best = -g;
                    best_t = m;
                }
            } else if (a > 0.0 && g >= best) {
                best = g;
                best_t = m;
            }
        }
        const int i = warp_arg_max(best, best_t);
        if (i < 0) {
            // No i: gmax = −∞, so the reference stops here too.
            converged = true;
            break;
        }
        const bool i_pos = i < n_pos;
        const double g_i = grad[i];
        const double gmax = i_pos ? -g_i : g_i;

        // j minimizes the second-order decrease over I_low; gmax2 is the
        // maximal y_t·G_t over I_low.
        const double* const Ki = K + (long long)i * l;
        const double qd_i = Ki[i];
        double gmax2 = -INFINITY;
        double obj_min = INFINITY;
        int min_t = -1;
        for (int m = lane; m < l; m += 32) {
            const double g = grad[m];
            const double a = alpha[m];
            const bool pos = m < n_pos;
            // y_t·G_t, over I_low: α_t > 0 for y = +1, α_t < C for y = −1.
            if (pos ? !(a > 0.0) : !(a < c)) continue;
            const double yg = pos ? g : -g;
            if (yg >= gmax2) gmax2 = yg;
            const double grad_diff = gmax + yg;
            if (grad_diff > 0.0) {
                // K_ii + K_tt − 2·K_it for either label of t.
                const double quad = qd_i + K[(long long)m * l + m] - 2.0 * Ki[m];
                const double obj = wss_objective(grad_diff, quad);
                if (obj <= obj_min) {
                    obj_min = obj;
                    min_t = m;
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

        // Two-variable update with libsvm's clipping (C_i = C_j = C),
        // computed by every lane.
        const bool j_pos = j < n_pos;
        const double g_j = grad[j];
        const double old_i = alpha[i];
        const double old_j = alpha[j];
        const double* const Kj = K + (long long)j * l;
        const double k_ij = Ki[j];
        double ai = old_i, aj = old_j;
        smo_step(i_pos != j_pos, qd_i + Kj[j] - 2.0 * k_ij, g_i, g_j, c, ai, aj);
        // Every lane has read α and G before any is written.
        __syncwarp();
        if (lane == 0) {
            alpha[i] = ai;
            alpha[j] = aj;
        }

        // G_t += Q_ti·Δα_i + Q_tj·Δα_j = y_t·(K_ti·y_i·Δα_i + K_tj·y_j·Δα_j);
        // the products by ±1 are exact, so adding or subtracting is the same.
        const double ci = i_pos ? ai - old_i : -(ai - old_i);
        const double cj = j_pos ? aj - old_j : -(aj - old_j);
        for (int m = lane; m < l; m += 32) {
            const double v = mul_rn(Ki[m], ci) + mul_rn(Kj[m], cj);
            grad[m] = m < n_pos ? grad[m] + v : grad[m] - v;
        }
        __syncwarp();
    }

    // ρ as libsvm's calculate_rho, summed in t order by lane 0.
    if (lane == 0) {
        double ub = INFINITY, lb = -INFINITY, sum_free = 0.0;
        long long nr_free = 0;
        for (int t = 0; t < l; ++t) {
            const bool pos = t < n_pos;
            const double yg = pos ? grad[t] : -grad[t];
            const double a = alpha[t];
            if (a >= c) {
                if (pos) lb = fmax(lb, yg); else ub = fmin(ub, yg);
            } else if (a <= 0.0) {
                if (pos) ub = fmin(ub, yg); else lb = fmax(lb, yg);
            } else {
                ++nr_free;
                sum_free += yg;
            }
        }
        *rho_out = nr_free > 0 ? sum_free / (double)nr_free : (ub + lb) / 2.0;
        *iter_out = iter;
        *conv_out = converged ? 1 : 0;
    }
    // Lane 0 is done reading α before coef (which may be α) is written.
    __syncwarp();
    for (int m = lane; m < l; m += 32) {
        const double a = alpha[m];
        coef[m] = m < n_pos ? a : -a;
    }
    __syncwarp();
}

template <bool kShared>
__device__ __forceinline__ void svm_batch_body(const double* __restrict__ gram, const long long* __restrict__ set_off,
                                               const int* __restrict__ set_l, const int* __restrict__ set_n_pos,
                                               const long long* __restrict__ set_max_iter,
                                               const int* __restrict__ block_set, const int* __restrict__ block_first,
                                               const int* __restrict__ block_count,
                                               const long long* __restrict__ coef_off, const double* __restrict__ c,
                                               const double* __restrict__ tol, double* __restrict__ work,
                                               double* __restrict__ coef, double* __restrict__ rho,
                                               long long* __restrict__ iterations, int* __restrict__ converged) {
    const int set = block_set[blockIdx.x];
    const int l = set_l[set];
    const int warp = threadIdx.x >> 5;
    const double* const K = gram + set_off[set];
    if (kShared) {
        CM_DYNAMIC_SHARED(double, smem);
        for (int e = threadIdx.x; e < l * l; e += blockDim.x) smem[e] = K[e];
        __syncthreads();
        if (warp >= block_count[blockIdx.x]) return;
        const int p = block_first[blockIdx.x] + warp;
        double* const scratch = smem + l * l + warp * 2 * l;
        smo_warp(smem, l, set_n_pos[set], c[p], tol[p], set_max_iter[set], scratch, scratch + l, coef + coef_off[p],
                 rho + p, iterations + p, converged + p);
    } else {
        if (warp >= block_count[blockIdx.x]) return;
        const int p = block_first[blockIdx.x] + warp;
        double* const out = coef + coef_off[p];
        smo_warp(K, l, set_n_pos[set], c[p], tol[p], set_max_iter[set], out, work + coef_off[p], out, rho + p,
                 iterations + p, converged + p);
    }
}

}  // namespace

#define SVM_BATCH_KERNEL(name, SHARED)                                                                        \
    extern "C" __global__ void __launch_bounds__(kSvmThreads, kSvmMinBlocks)                                                \
        name(const double* gram, const long long* set_off, const int* set_l, const int* set_n_pos,            \
             const long long* set_max_iter, const int* block_set, const int* block_first,                     \
             const int* block_count, const long long* coef_off, const double* c, const double* tol,           \
             double* work, double* coef, double* rho, long long* iterations, int* converged) {                \
        svm_batch_body<SHARED>(gram, set_off, set_l, set_n_pos, set_max_iter, block_set, block_first,         \
                               block_count, coef_off, c, tol, work, coef, rho, iterations, converged);        \
    }

SVM_BATCH_KERNEL(svm_batch_shared_f64, true)
CM_EXPORT(svm_batch_shared_f64)
SVM_BATCH_KERNEL(svm_batch_global_f64, false)
CM_EXPORT(svm_batch_global_f64)
