// Pieces of libsvm's SMO shared by svm.cu (C-SVC) and svr.cu (ε-SVR), whose
// solvers must match their CPU references bit for bit: an unfused product,
// warp reductions that only compare (so they are exact, and a NaN never
// replaces a number; every lane must call them), the second-order
// working-set objective and the clipped two-variable step.
#pragma once

#include "common.cuh"

namespace {

constexpr unsigned kFullMask = 0xffffffffu;
// libsvm's TAU (smo::TAU in src/svm/smo.rs and src/svr/smo.rs).
constexpr double kTau = 1e-12;

// A product rounded on its own, as the CPU reference computes it: nvcc would
// otherwise contract a·b + c into one FMA and change the last bit.
__device__ __forceinline__ double mul_rn(double a, double b) {
#ifdef CELLMORPH_EMULATION
    return a * b;
#else
    return __dmul_rn(a, b);
#endif
}

// Warp-wide max / min; a NaN never replaces a number.
__device__ __forceinline__ double warp_max(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const double w = __shfl_xor_sync(kFullMask, v, o);
        v = w > v ? w : v;
    }
    return v;
}

__device__ __forceinline__ double warp_min(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const double w = __shfl_xor_sync(kFullMask, v, o);
        v = w < v ? w : v;
    }
    return v;
}

__device__ __forceinline__ int warp_max_int(int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    return __reduce_max_sync(kFullMask, v);
#else
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v = max(v, __shfl_xor_sync(kFullMask, v, o));
    }
    return v;
#endif
}

// A working-set index from each lane's candidate t (−1: none) with value v:
// the t of the largest (arg_max) or smallest (arg_min) v over the warp, the
// largest such t on a tie (libsvm's `>=`/`<=` scans in t order keep the last
// index of a tie); −1 if no lane has a candidate.
__device__ __forceinline__ int warp_arg_max(double v, int t) {
    const double w = warp_max(v);
    return warp_max_int(v == w ? t : -1);
}

__device__ __forceinline__ int warp_arg_min(double v, int t) {
    const double w = warp_min(v);
    return warp_max_int(v == w ? t : -1);
}

// libsvm's second-order working-set objective for a candidate t: the
// decrease −(gmax + y_t·G_t)² / a_it, with a curvature a_it ≤ 0 taken as TAU.
__device__ __forceinline__ double wss_objective(double grad_diff, double quad) {
    return quad > 0.0 ? -(grad_diff * grad_diff) / quad : -(grad_diff * grad_diff) / kTau;
}

// libsvm's two-variable step with its clipping to [0, C]² (C_i = C_j = C),
// in the reference's order of operations. ai, aj: α_i, α_j in, the new values
// out; g_i, g_j: their gradients; quad: Q_ii + Q_jj − 2·Q_ij (TAU when ≤ 0);
// opposite: y_i ≠ y_j. Returns whether the step touched the C bound (ε-SVR's
// c_bound_active; the C-SVC ignores it).
__device__ __forceinline__ bool smo_step(bool opposite, double quad, double g_i, double g_j, double c,
                                         double& ai, double& aj) {
    bool c_bound = false;
    if (quad <= 0.0) quad = kTau;
    if (opposite) {
        const double delta = (-g_i - g_j) / quad;
        const double diff = ai - aj;
        ai += delta;
        aj += delta;
        if (diff > 0.0) {
            if (aj < 0.0) {
                aj = 0.0;
                ai = diff;
            }
        } else if (ai < 0.0) {
            ai = 0.0;
            aj = -diff;
        }
        if (diff > 0.0) {
            if (ai > c) {
                c_bound = true;
                ai = c;
                aj = c - diff;
            }
        } else if (aj > c) {
            c_bound = true;
            aj = c;
            ai = c + diff;
        }
    } else {
        const double delta = (g_i - g_j) / quad;
        const double sum = ai + aj;
        ai -= delta;
        aj += delta;
        if (sum > c) {
            c_bound = true;
            if (ai > c) {
                ai = c;
                aj = sum - c;
            }
        } else if (aj < 0.0) {
            aj = 0.0;
            ai = sum;
        }
        if (sum > c) {
            if (aj > c) {
                aj = c;
                ai = sum - c;
            }
        } else if (ai < 0.0) {
            ai = 0.0;
            aj = sum;
        }
    }
    return c_bound || ai >= c || aj >= c;
}

}  // namespace
