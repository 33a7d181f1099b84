// Convolution backward, f32: the weight and bias gradients of conv2d and
// conv_transpose2d, deterministic (no floating-point atomics). The input
// gradients need no kernel of their own: conv2d's dx is a transposed conv of
// dy and conv_transpose2d's dx a conv2d of dy, both run on the forward
// implicit-GEMM kernels of kernels/conv.cu (see src/ops/conv.rs).
//
// Layouts and shapes (dense, row-major, PyTorch's), for conv2d:
//   x [n, c_in, h, w], dy [n, c_out, oh, ow], dw [c_out, c_in, kh, kw],
//   db [c_out]:
//     dw[co, ci, ky, kx] = Σ_{b, oy, ox} dy[b, co, oy, ox] ·
//                          x[b, ci, oy·sh − ph + ky, ox·sw − pw + kx]
//     (zeros outside the input), db[co] = Σ_{b, oy, ox} dy[b, co, oy, ox].
//   A GEMM C[M, N] = Σ_K A[M, K] · B[K, N] with M = c_out, N = c_in·kh·kw,
//   K = n·oh·ow pixels p = (b, oy, ox): A = dy read along its planes, B = x
//   gathered on the fly (padding by bounds checks).
//   conv_transpose2d (x [n, c_in, h, w], w [c_in, c_out, kh, kw], dy
//   [n, c_out, oh, ow]) has dw[ci, co, ky, kx] = Σ_{b, iy, ix} x[b, ci, iy,
//   ix] · dy[b, co, iy·sh − ph + ky, ix·sw − pw + kx]: the same kernel with
//   the roles swapped (its "dy" is x, its gathered "x" is dy).
//   Per-image extents and the weight count fit an int (the ops layer
//   checks); pixel indices and batch offsets are 64-bit.
//
// Determinism: K is split into `parts` chunks of chunk_len pixels (the last
// one shorter), p ∈ [s·chunk_len, min((s + 1)·chunk_len, K)) for chunk s.
// The chunking depends on the shape only (src/ops/conv.rs: at most 16
// chunks of at least 256 pixels), never on the GPU. Each chunk's partial
// sums go to a workspace, summed in a fixed order by conv_grad_reduce_f32;
// within a chunk every sum has a fixed order too. Two runs, and any two
// GPUs, give the same bits.
//
// Kernels:
//   conv2d_wgrad_partial_f32
//       The partial GEMM of chunk s = blockIdx.z: a block of 256 threads owns
//       a 64 (M) × 64 (N) tile; K advances in slabs of 16 pixels staged in
//       double-buffered shared memory (one barrier per slab; the next slab's
//       global loads are in flight during the current multiply). For the
//       loads thread t takes pixel slab + t % 16 (one (b, oy, ox)
//       decomposition per slab) and rows/columns t / 16 + 16·e, e < 4 (a
//       column's (ci, ky, kx) decomposed once); shared rows are 66 floats so
//       these transposing stores hit 32 distinct banks. Thread t accumulates
//       a 4 × 4 register tile: rows t / 16 + 16·i, columns t % 16 + 16·j (a
//       half-warp stores 16 consecutive columns). Products are added in
//       pixel order. Writes part[s·M·N + m·N + nn] (dw itself when parts = 1).
//   conv_bias_grad_partial_f32
//       Block (co, s) = (blockIdx.x, blockIdx.y) of 256 threads sums dy[b, co,
//       ·] over chunk s: image by image, thread t adds the chunk's pixels
//       ≡ t (mod 256) within each image in order, then a fixed shared-memory
//       tree. Writes part[s·c + co] (db when parts = 1).
//   conv_grad_reduce_f32
//       out[i] = Σ_{s < parts} part[s·len + i], s ascending (0 when parts is
//       0, the empty-K case), grid-stride, one thread per element.
//
// Launch geometry (chosen in src/ops/conv.rs):
//   wgrad    block (256, 1, 1); grid (⌈N/64⌉, ⌈M/64⌉, parts). Static shared
//            memory 2·2·16·66 floats = 16.5 KiB.
//   bias     block (256, 1, 1); grid (c, parts, 1). 1 KiB shared.
//   reduce   block (256, 1, 1); grid (⌈len/256⌉ capped, 1, 1).
// Workspace: parts·M·N + parts·c_out floats when parts > 1, none otherwise.

#include "common.cuh"

#ifdef CELLMORPH_EMULATION
#define WGRAD_UNROLL
#else
#define WGRAD_UNROLL _Pragma("unroll")
#endif

namespace {

constexpr int kWgThreads = 256;
constexpr int kWgBM = 64;
constexpr int kWgBN = 64;
constexpr int kWgBK = 16;
// Shared row length: 2·lk + lr covers 32 banks for a warp's stores.
constexpr int kWgLd = kWgBM + 2;
// Rows (and columns) each thread loads per slab.
constexpr int kWgE = kWgBM * kWgBK / kWgThreads;
constexpr int kBiasThreads = 256;

}  // namespace

extern "C" __global__ void __launch_bounds__(kWgThreads)
    conv2d_wgrad_partial_f32(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ part,
                             int n, int c_in, int h, int w, int c_out, int kh, int kw, int sh, int sw, int ph,
                             int pw, int oh, int ow, long long chunk_len) {
    __shared__ float As[2][kWgBK][kWgLd];
    __shared__ float Bs[2][kWgBK][kWgLd];

    const int t = threadIdx.x;
    const int khw = kh * kw;
    const int gm = c_out;
    const int gn = c_in * khw;
    const long long ohw = (long long)oh * ow;
    const long long k_total = (long long)n * ohw;
    const int m0 = blockIdx.y * kWgBM;
    const int n0 = blockIdx.x * kWgBN;
    const long long k_begin = (long long)blockIdx.z * chunk_len;
    long long k_end = k_begin + chunk_len;
    if (k_end > k_total) {
        k_end = k_total;
    }
    const int hw = h * w;
    const long long x_bstride = (long long)c_in * hw;
    const long long dy_bstride = (long long)c_out * ohw;

    // --- Load state: pixel k0 + lk of each slab; rows/columns lr + 16·e. ---
    const int lk = t % kWgBK;
    const int lr = t / kWgBK;
    int a_off[kWgE];  // co·ohw, or -1 past M
    int b_off[kWgE];  // ci·hw, or -1 past N
    int b_ky[kWgE];
    int b_kx[kWgE];
WGRAD_UNROLL
    for (int e = 0; e < kWgE; ++e) {
        const int co = m0 + lr + 16 * e;
        a_off[e] = co < gm ? co * (int)ohw : -1;
        const int nn = n0 + lr + 16 * e;
        if (nn < gn) {
            const int ci = nn / khw;
            const int r = nn - ci * khw;
            b_ky[e] = r / kw;
            b_kx[e] = r - b_ky[e] * kw;
            b_off[e] = ci * hw;
        } else {
            b_ky[e] = 0;
            b_kx[e] = 0;
            b_off[e] = -1;
        }
    }

    float pa[kWgE];
    float pb[kWgE];
    auto load_slab = [&](long long k0) {
        const long long p = k0 + lk;
        const bool p_ok = p < k_end;
        long long img = 0;
        int oy = 0, ox = 0, pix = 0;
        if (p_ok) {
            img = p / ohw;
            pix = (int)(p - img * ohw);
            oy = pix / ow;
            ox = pix - oy * ow;
        }
        const float* dyp = dy + img * dy_bstride + pix;
        const float* xp = x + img * x_bstride;
        const int iy0 = oy * sh - ph;
        const int ix0 = ox * sw - pw;
WGRAD_UNROLL
        for (int e = 0; e < kWgE; ++e) {
            pa[e] = (p_ok && a_off[e] >= 0) ? dyp[a_off[e]] : 0.0f;
            const int iy = iy0 + b_ky[e];
            const int ix = ix0 + b_kx[e];
            const bool ok = p_ok && b_off[e] >= 0 && (unsigned)iy < (unsigned)h && (unsigned)ix < (unsigned)w;
            pb[e] = ok ? xp[b_off[e] + iy * w + ix] : 0.0f;
        }
    };
    auto store_slab = [&](int buf) {
WGRAD_UNROLL
        for (int e = 0; e < kWgE; ++e) {
            As[buf][lk][lr + 16 * e] = pa[e];
            Bs[buf][lk][lr + 16 * e] = pb[e];
        }
    };

    const int tm = t / 16;
    const int tn = t % 16;
    float acc[4][4];
WGRAD_UNROLL
    for (int i = 0; i < 4; ++i) {
WGRAD_UNROLL
        for (int j = 0; j < 4; ++j) {
            acc[i][j] = 0.0f;
        }
    }

    const long long len = k_end > k_begin ? k_end - k_begin : 0;
    const long long slabs = (len + kWgBK - 1) / kWgBK;
    if (slabs > 0) {
        load_slab(k_begin);
        store_slab(0);
    }
    __syncthreads();
    for (long long s = 0; s < slabs; ++s) {
        const int cur = (int)(s & 1);
        if (s + 1 < slabs) {
            load_slab(k_begin + (s + 1) * kWgBK);
        }
WGRAD_UNROLL
        for (int kk = 0; kk < kWgBK; ++kk) {
            float a[4];
            float b[4];
WGRAD_UNROLL
            for (int i = 0; i < 4; ++i) {
                a[i] = As[cur][kk][tm + 16 * i];
                b[i] = Bs[cur][kk][tn + 16 * i];
            }
WGRAD_UNROLL
            for (int i = 0; i < 4; ++i) {
WGRAD_UNROLL
                for (int j = 0; j < 4; ++j) {
                    acc[i][j] += a[i] * b[j];
                }
            }
        }
        if (s + 1 < slabs) {
            store_slab(cur ^ 1);
        }
        __syncthreads();
    }

    float* out = part + (long long)blockIdx.z * gm * gn;
WGRAD_UNROLL
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + tm + 16 * i;
        if (m >= gm) {
            break;
        }
WGRAD_UNROLL
        for (int j = 0; j < 4; ++j) {
            const int nn = n0 + tn + 16 * j;
            if (nn < gn) {
                out[(long long)m * gn + nn] = acc[i][j];
            }
        }
    }
}
CM_EXPORT(conv2d_wgrad_partial_f32)

extern "C" __global__ void __launch_bounds__(kBiasThreads)
    conv_bias_grad_partial_f32(const float* __restrict__ dy, float* __restrict__ part, int n, int c,
                               long long plane, long long chunk_len) {
    __shared__ float red[kBiasThreads];
    const int t = threadIdx.x;
    const int co = blockIdx.x;
    const long long k_total = (long long)n * plane;
    const long long k_begin = (long long)blockIdx.y * chunk_len;
    long long k_end = k_begin + chunk_len;
    if (k_end > k_total) {
        k_end = k_total;
    }
    // Image by image over the chunk's pixel range (no division in the loop).
    float acc = 0.0f;
    for (long long img = k_begin / plane; img * plane < k_end; ++img) {
        const long long first = img * plane;
        const long long lo = k_begin > first ? k_begin - first : 0;
        const long long hi = k_end - first < plane ? k_end - first : plane;
        const float* dyp = dy + (img * c + co) * plane;
        for (long long pix = lo + t; pix < hi; pix += kBiasThreads) {
            acc += dyp[pix];
        }
    }
    red[t] = acc;
    __syncthreads();
    for (int o = kBiasThreads / 2; o > 0; o >>= 1) {
        if (t < o) {
            red[t] += red[t + o];
        }
        __syncthreads();
    }
    if (t == 0) {
        part[(long long)blockIdx.y * c + co] = red[0];
    }
}
CM_EXPORT(conv_bias_grad_partial_f32)

extern "C" __global__ void conv_grad_reduce_f32(const float* __restrict__ part, float* __restrict__ out,
                                                long long len, int parts) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (long long)blockDim.x * gridDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < parts; ++s) {
            acc += part[(long long)s * len + i];
        }
        out[i] = acc;
    }
}
CM_EXPORT(conv_grad_reduce_f32)
