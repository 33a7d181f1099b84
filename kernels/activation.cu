// Activations and the other element-wise inference ops, f32.
//
// Layouts and shapes (all buffers dense, row-major):
//   relu_f32, relu_inplace_f32, leaky_relu_f32, sigmoid_f32, add_f32
//       flat arrays of n elements.
//   relu_backward_f32, leaky_relu_backward_f32 (x, dy, dx),
//   sigmoid_backward_f32 (y, dy, dx)
//       flat arrays of n elements; x is the forward input, y the forward
//       output, dy the upstream gradient, dx the input gradient. Each dx[i]
//       is computed from element i alone with the same operations, in the
//       same order, as the CPU reference (bit-identical results).
//   dropout_f32 (x, y)   flat arrays of n elements, y[i] = x[i]·scale where
//       element i is kept, else x[i]·0 (NaN and ±∞ propagate, as in
//       PyTorch); the same kernel is the backward (dy, dx).
//       Kept: the top 24 bits of counter_u64(seed, step, i) (src/rng.rs: three
//       SplitMix64 mixes, wrapping 64-bit arithmetic) times 2⁻²⁴, ≥ p in f32,
//       exactly crate::rng::dropout_keep; scale = 1/(1 − p) comes from the
//       host (the CPU reference's f32), so the mask and the values are the
//       CPU's bit for bit.
//   softmax_rows_f32   x, y [rows, dim]: softmax over the last axis.
//   softmax_cols_f32   x, y [outer, dim, inner], inner > 1: softmax over dim.
//
// Variants: relu_inplace_f32 exists so an in-place ReLU does not alias the
// __restrict__ pointers of relu_f32.
//
// Launch geometry (chosen in src/ops/activation.rs):
//   flat kernels       1-D grid-stride: 256 threads, blocks = ⌈n/256⌉ capped
//                      (the loop covers the rest).
//   softmax_rows_f32   one warp per row, 8 warps (256 threads) per block,
//                      grid-stride over rows; three passes over the row (max,
//                      Σexp(x − max), write) with xor-shuffle reductions, so
//                      any dim works (lanes stride over it).
//   softmax_cols_f32   one thread per (outer, inner) column, grid-stride;
//                      neighbouring threads read neighbouring inner indices,
//                      so every pass over dim is coalesced.
// Flat offsets are 64-bit throughout.

#include "common.cuh"

namespace {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float ew_warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
    }
    return v;
}

__device__ __forceinline__ float ew_warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) {
        v += __shfl_xor_sync(kFullMask, v, off);
    }
    return v;
}

// SplitMix64's output function, as mix64 in src/rng.rs.
__device__ __forceinline__ unsigned long long rng_mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// ReLU that lets NaN through (PyTorch's behaviour; fmaxf would turn it into 0).
__device__ __forceinline__ float ew_relu(float v) {
    return v < 0.0f ? 0.0f : v;
}

__device__ __forceinline__ long long ew_first() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long ew_stride() {
    return (long long)blockDim.x * gridDim.x;
}

}  // namespace

extern "C" __global__ void relu_f32(const float* __restrict__ x, float* __restrict__ y, long long n) {
    for (long long i = ew_first(); i < n; i += ew_stride()) {
        y[i] = ew_relu(x[i]);
    }
}
CM_EXPORT(relu_f32)

extern "C" __global__ void relu_inplace_f32(float* x, long long n) {
    for (long long i = ew_first(); i < n; i += ew_stride()) {
        x[i] = ew_relu(x[i]);
    }
}
CM_EXPORT(relu_inplace_f32)

extern "C" __global__ void leaky_relu_f32(const float* __restrict__ x, float* __restrict__ y, float slope,
                                          long long n) {
    for (long long i = ew_first(); i < n; i += ew_stride()) {
        const float v = x[i];
        y[i] = v > 0.0f ? v : slope * v;
    }
}
CM_EXPORT(leaky_relu_f32)

extern "C" __global__ void sigmoid_f32(const float* __restrict__ x, float* __restrict__ y, long long n) {
    for (long long i = ew_first(); i < n; i += ew_stride()) {
        y[i] = 1.0f / (1.0f + expf(-x[i]));
    }
}
CM_EXPORT(sigmoid_f32)

extern "C" __global__ void add_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ y,
                                   long long n) {
    for (long long i = ew_first(); i < n; i += ew_stride()) {
        y[i] = a[i] + b[i];
    }
}
CM_EXPORT(add_f32)

// dx = dy where x > 0, else 0 (PyTorch's choice at x = 0).
extern "C" __global__ void relu_backward_f32(const float* __restrict__ x, const float* __restrict__ dy,
                                             float* __restrict__ dx, long long n) {
    for (long long i = ew_first(); i < n; i += ew_stride()) {
        dx[i] = x[i] > 0.0f ? dy[i] : 0.0f;
    }
}
CM_EXPORT(relu_backward_f32)

// dx = dy where x > 0, else slope · dy.
extern "C" __global__ void leaky_relu_backward_f32(const float* __restrict__ x, const float* __restrict__ dy,
                                                   float* __restrict__ dx, float slope, long long n) {
    for (long long i = ew_first(); i < n; i += ew_stride()) {
        const float g = dy[i];
        dx[i] = x[i] > 0.0f ? g : slope * g;
    }
}
CM_EXPORT(leaky_relu_backward_f32)

// dx = (dy · y) · (1 − y), from the forward output y; two roundings in the
// reference's order (no add follows a multiply, so nothing contracts to FMA).
extern "C" __global__ void sigmoid_backward_f32(const float* __restrict__ y, const float* __restrict__ dy,
                                                float* __restrict__ dx, long long n) {
    for (long long i = ew_first(); i < n; i += ew_stride()) {
        const float v = y[i];
        dx[i] = dy[i] * v * (1.0f - v);
    }
}
CM_EXPORT(sigmoid_backward_f32)

extern "C" __global__ void dropout_f32(const float* __restrict__ x, float* __restrict__ y, unsigned long long seed,
                                       unsigned long long step, float p, float scale, long long n) {
    constexpr unsigned long long kGamma = 0x9E3779B97F4A7C15ull;
    // counter_u64's first two mixes depend on (seed, step) only.
    const unsigned long long key = rng_mix64(rng_mix64(seed + kGamma) ^ (step * kGamma));
    for (long long i = ew_first(); i < n; i += ew_stride()) {
        const unsigned long long bits = rng_mix64(key ^ ((unsigned long long)i * 0xD1B54A32D192ED03ull));
        const float u = (float)(bits >> 40) * (1.0f / 16777216.0f);
        // A product even where dropped, so NaN and ±∞ propagate (PyTorch's x·mask·scale).
        y[i] = x[i] * (u >= p ? scale : 0.0f);
    }
}
CM_EXPORT(dropout_f32)

extern "C" __global__ void softmax_rows_f32(const float* __restrict__ x, float* __restrict__ y, long long rows,
                                            long long dim) {
    const int lane = threadIdx.x & 31;
    const long long warps_per_block = blockDim.x >> 5;
    // The row index is uniform across a warp, so whole warps enter and leave
    // the loop together and the full-mask shuffles are safe.
    for (long long row = blockIdx.x * warps_per_block + (threadIdx.x >> 5); row < rows;
         row += gridDim.x * warps_per_block) {
        const float* xr = x + row * dim;
        float* yr = y + row * dim;
        float m = -INFINITY;
        for (long long d = lane; d < dim; d += 32) {
            m = fmaxf(m, xr[d]);
        }
        m = ew_warp_max(m);
        float s = 0.0f;
        for (long long d = lane; d < dim; d += 32) {
            s += expf(xr[d] - m);
        }
        s = ew_warp_sum(s);
        for (long long d = lane; d < dim; d += 32) {
            yr[d] = expf(xr[d] - m) / s;
        }
    }
}
CM_EXPORT(softmax_rows_f32)

extern "C" __global__ void softmax_cols_f32(const float* __restrict__ x, float* __restrict__ y, long long outer,
                                            long long dim, long long inner) {
    const long long cols = outer * inner;
    for (long long col = ew_first(); col < cols; col += ew_stride()) {
        const long long o = col / inner;
        const long long j = col - o * inner;
        const float* xc = x + o * dim * inner + j;
        float* yc = y + o * dim * inner + j;
        float m = -INFINITY;
        for (long long d = 0; d < dim; ++d) {
            m = fmaxf(m, xc[d * inner]);
        }
        float s = 0.0f;
        for (long long d = 0; d < dim; ++d) {
            s += expf(xc[d * inner] - m);
        }
        for (long long d = 0; d < dim; ++d) {
            yc[d * inner] = expf(xc[d * inner] - m) / s;
        }
    }
}
CM_EXPORT(softmax_cols_f32)
