// BatchNorm, f32 tensors: inference with running statistics (plain and fused
// with the ReLU that follows it), and training mode (batch statistics) with
// its backward.
//
// Layouts and shapes (all buffers dense, row-major):
//   x, y, dy, dx [planes = N·C, hw] (NCHW with H·W folded); every per-channel
//   vector (gamma, beta, mean, var, running_mean, running_var, save_mean,
//   save_inv_std, dgamma, dbeta) [C]. Channel of plane p is p % C.
//   batchnorm_f32, batchnorm_relu_f32 (inference)
//       The per-channel affine map scale = gamma / sqrt(var + eps),
//       shift = beta − mean·scale is folded in-kernel, once per plane a
//       thread visits, so a call needs no host round trip and no scratch
//       buffer; the rounding is the CPU reference's.
//   Training mode, the CPU reference's arithmetic (src/cpu/norm.rs): every
//   per-channel sum in f64 over the m = N·hw values of the channel, taken
//   in k = n·hw + i order, split into `parts` chunks of chunk_len values
//   (the last one shorter; the split depends on m only, see
//   src/ops/norm.rs batchnorm_chunks). Workspace `part` [parts, C] doubles
//   (two such blocks for the backward), `mean64` [C] doubles.
//   batchnorm_sum_partial_f32      part[s, ch] = Σ_chunk x
//   batchnorm_mean_f64             mean64[ch] = (Σ_s part[s, ch]) / m
//   batchnorm_sqdev_partial_f32    part[s, ch] = Σ_chunk (x − mean64)²
//   batchnorm_train_stats_f32      biased variance Σ/m → save_mean,
//       save_inv_std = 1/√(var + eps); running_mean and (with the unbiased
//       variance Σ/(m − 1), only when m > 1) running_var moved by momentum.
//   batchnorm_train_apply_f32      y = x·scale + shift, scale = gamma·inv_std,
//       shift = beta − mean·scale (f32, as the CPU reference).
//   batchnorm_backward_partial_f32 part[s, ch] = Σ_chunk dy,
//       part[parts + s, ch] = Σ_chunk dy·(x − mean)·inv_std
//   batchnorm_backward_reduce_f32  dbeta, dgamma = Σ_s of those, as f32
//   batchnorm_train_dx_f32         dx = gamma·inv_std/m · (m·dy − dbeta −
//       x̂·dgamma) in f64 from the f32 dbeta/dgamma, rounded once.
//
// Determinism: no atomics. Within a chunk thread t adds the values ≡ t
// (mod 256) in order, then a fixed shared-memory tree; chunks are summed in
// increasing s by the reduce kernels. The same bits on every run and GPU.
//
// Variants: batchnorm_relu_f32 fuses the ReLU that follows every BatchNorm in
// DenseNet (one read, one write).
//
// Launch geometry (chosen in src/ops/norm.rs):
//   element-wise (inference, apply, dx)   block.x threads over the plane (a
//       multiple of 32, at most 256, sized to hw), grid.x = ⌈hw/block.x⌉
//       capped, grid.y over planes (capped at 65535); both grid-stride.
//   *_partial   block (256, 1, 1), grid (C, parts, 1); 2 or 4 KiB shared.
//   mean, stats, reduce   one thread per channel, 1-D grid-stride.
// Flat offsets are 64-bit throughout.

#include "common.cuh"

namespace {

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

template <bool kRelu>
__device__ __forceinline__ void batchnorm_body(const float* __restrict__ x, const float* __restrict__ gamma,
                                               const float* __restrict__ beta, const float* __restrict__ mean,
                                               const float* __restrict__ var, float eps, float* __restrict__ y,
                                               int c, long long hw, long long planes) {
    for (long long p = blockIdx.y; p < planes; p += gridDim.y) {
        const int ch = (int)(p % c);
        const float scale = gamma[ch] / sqrtf(var[ch] + eps);
        const float shift = beta[ch] - mean[ch] * scale;
        const float* xp = x + p * hw;
        float* yp = y + p * hw;
        for (long long i = ew_first(); i < hw; i += ew_stride()) {
            const float v = xp[i] * scale + shift;
            yp[i] = kRelu ? ew_relu(v) : v;
        }
    }
}

}  // namespace

extern "C" __global__ void batchnorm_f32(const float* __restrict__ x, const float* __restrict__ gamma,
                                         const float* __restrict__ beta, const float* __restrict__ mean,
                                         const float* __restrict__ var, float eps, float* __restrict__ y, int c,
                                         long long hw, long long planes) {
    batchnorm_body<false>(x, gamma, beta, mean, var, eps, y, c, hw, planes);
}
CM_EXPORT(batchnorm_f32)

extern "C" __global__ void batchnorm_relu_f32(const float* __restrict__ x, const float* __restrict__ gamma,
                                              const float* __restrict__ beta, const float* __restrict__ mean,
                                              const float* __restrict__ var, float eps, float* __restrict__ y,
                                              int c, long long hw, long long planes) {
    batchnorm_body<true>(x, gamma, beta, mean, var, eps, y, c, hw, planes);
}
CM_EXPORT(batchnorm_relu_f32)

namespace {

constexpr int kStatThreads = 256;

// The fixed shared-memory tree over kStatThreads partial sums; red[0] holds
// the total afterwards (every thread must call it).
__device__ __forceinline__ void stat_tree(double* red) {
    const int t = threadIdx.x;
    __syncthreads();
    for (int o = kStatThreads / 2; o > 0; o >>= 1) {
        if (t < o) {
            red[t] += red[t + o];
        }
        __syncthreads();
    }
}

// Calls f(offset) for the values of channel ch in chunk s = blockIdx.y that
// this thread owns: image by image over k ∈ [s·chunk_len, min((s + 1)·
// chunk_len, m)), k = img·hw + i, the values i ≡ threadIdx.x (mod 256) of
// each image's part, in increasing order.
template <typename F>
__device__ __forceinline__ void chunk_for_each(int c, long long hw, long long m, long long chunk_len, int ch,
                                               F f) {
    const long long k_begin = (long long)blockIdx.y * chunk_len;
    const long long k_end = k_begin + chunk_len < m ? k_begin + chunk_len : m;
    for (long long img = k_begin / hw; img * hw < k_end; ++img) {
        const long long first = img * hw;
        const long long lo = k_begin > first ? k_begin - first : 0;
        const long long hi = k_end - first < hw ? k_end - first : hw;
        const long long base = (img * c + ch) * hw;
        for (long long i = lo + threadIdx.x; i < hi; i += kStatThreads) {
            f(base + i);
        }
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kStatThreads)
    batchnorm_sum_partial_f32(const float* __restrict__ x, double* __restrict__ part, int c, long long hw,
                              long long m, long long chunk_len) {
    __shared__ double red[kStatThreads];
    const int ch = blockIdx.x;
    double acc = 0.0;
    chunk_for_each(c, hw, m, chunk_len, ch, [&](long long o) { acc += (double)x[o]; });
    red[threadIdx.x] = acc;
    stat_tree(red);
    if (threadIdx.x == 0) {
        part[(long long)blockIdx.y * c + ch] = red[0];
    }
}
CM_EXPORT(batchnorm_sum_partial_f32)

extern "C" __global__ void batchnorm_mean_f64(const double* __restrict__ part, double* __restrict__ mean64,
                                              int parts, int c, long long m) {
    for (long long ch = ew_first(); ch < c; ch += ew_stride()) {
        double sum = 0.0;
        for (int s = 0; s < parts; ++s) {
            sum += part[(long long)s * c + ch];
        }
        mean64[ch] = sum / (double)m;
    }
}
CM_EXPORT(batchnorm_mean_f64)

extern "C" __global__ void __launch_bounds__(kStatThreads)
    batchnorm_sqdev_partial_f32(const float* __restrict__ x, const double* __restrict__ mean64,
                                double* __restrict__ part, int c, long long hw, long long m, long long chunk_len) {
    __shared__ double red[kStatThreads];
    const int ch = blockIdx.x;
    const double mean = mean64[ch];
    double acc = 0.0;
    chunk_for_each(c, hw, m, chunk_len, ch, [&](long long o) {
        const double d = (double)x[o] - mean;
        acc += d * d;
    });
    red[threadIdx.x] = acc;
    stat_tree(red);
    if (threadIdx.x == 0) {
        part[(long long)blockIdx.y * c + ch] = red[0];
    }
}
CM_EXPORT(batchnorm_sqdev_partial_f32)

extern "C" __global__ void batchnorm_train_stats_f32(const double* __restrict__ part,
                                                     const double* __restrict__ mean64, int parts, int c,
                                                     long long m, float eps, float momentum,
                                                     float* __restrict__ running_mean,
                                                     float* __restrict__ running_var, float* __restrict__ save_mean,
                                                     float* __restrict__ save_inv_std) {
    const double mom = (double)momentum;
    for (long long ch = ew_first(); ch < c; ch += ew_stride()) {
        double sq = 0.0;
        for (int s = 0; s < parts; ++s) {
            sq += part[(long long)s * c + ch];
        }
        const double mean = mean64[ch];
        const double var = sq / (double)m;
        save_mean[ch] = (float)mean;
        save_inv_std[ch] = (float)(1.0 / sqrt(var + (double)eps));
        running_mean[ch] = (float)((1.0 - mom) * (double)running_mean[ch] + mom * mean);
        if (m > 1) {
            const double unbiased = sq / (double)(m - 1);
            running_var[ch] = (float)((1.0 - mom) * (double)running_var[ch] + mom * unbiased);
        }
    }
}
CM_EXPORT(batchnorm_train_stats_f32)

extern "C" __global__ void batchnorm_train_apply_f32(const float* __restrict__ x, const float* __restrict__ gamma,
                                                     const float* __restrict__ beta,
                                                     const float* __restrict__ save_mean,
                                                     const float* __restrict__ save_inv_std, float* __restrict__ y,
                                                     int c, long long hw, long long planes) {
    for (long long p = blockIdx.y; p < planes; p += gridDim.y) {
        const int ch = (int)(p % c);
        const float scale = gamma[ch] * save_inv_std[ch];
        const float shift = beta[ch] - save_mean[ch] * scale;
        const float* xp = x + p * hw;
        float* yp = y + p * hw;
        for (long long i = ew_first(); i < hw; i += ew_stride()) {
            yp[i] = xp[i] * scale + shift;
        }
    }
}
CM_EXPORT(batchnorm_train_apply_f32)

extern "C" __global__ void __launch_bounds__(kStatThreads)
    batchnorm_backward_partial_f32(const float* __restrict__ x, const float* __restrict__ dy,
                                   const float* __restrict__ save_mean, const float* __restrict__ save_inv_std,
                                   double* __restrict__ part, int c, long long hw, long long m,
                                   long long chunk_len) {
    __shared__ double red_dy[kStatThreads];
    __shared__ double red_dyx[kStatThreads];
    const int ch = blockIdx.x;
    const double mean = (double)save_mean[ch];
    const double inv_std = (double)save_inv_std[ch];
    double sum_dy = 0.0, sum_dy_xhat = 0.0;
    chunk_for_each(c, hw, m, chunk_len, ch, [&](long long o) {
        const double g = (double)dy[o];
        sum_dy += g;
        sum_dy_xhat += g * ((double)x[o] - mean) * inv_std;
    });
    red_dy[threadIdx.x] = sum_dy;
    red_dyx[threadIdx.x] = sum_dy_xhat;
    stat_tree(red_dy);
    stat_tree(red_dyx);
    if (threadIdx.x == 0) {
        const long long parts = gridDim.y;
        part[(long long)blockIdx.y * c + ch] = red_dy[0];
        part[(parts + blockIdx.y) * c + ch] = red_dyx[0];
    }
}
CM_EXPORT(batchnorm_backward_partial_f32)

extern "C" __global__ void batchnorm_backward_reduce_f32(const double* __restrict__ part, int parts, int c,
                                                         float* __restrict__ dgamma, float* __restrict__ dbeta) {
    for (long long ch = ew_first(); ch < c; ch += ew_stride()) {
        double sum_dy = 0.0, sum_dy_xhat = 0.0;
        for (int s = 0; s < parts; ++s) {
            sum_dy += part[(long long)s * c + ch];
            sum_dy_xhat += part[((long long)parts + s) * c + ch];
        }
        dbeta[ch] = (float)sum_dy;
        dgamma[ch] = (float)sum_dy_xhat;
    }
}
CM_EXPORT(batchnorm_backward_reduce_f32)

extern "C" __global__ void batchnorm_train_dx_f32(const float* __restrict__ x, const float* __restrict__ dy,
                                                  const float* __restrict__ gamma,
                                                  const float* __restrict__ save_mean,
                                                  const float* __restrict__ save_inv_std,
                                                  const float* __restrict__ dgamma, const float* __restrict__ dbeta,
                                                  float* __restrict__ dx, int c, long long hw, long long planes,
                                                  long long m) {
    const double md = (double)m;
    for (long long p = blockIdx.y; p < planes; p += gridDim.y) {
        const int ch = (int)(p % c);
        const double mean = (double)save_mean[ch];
        const double inv_std = (double)save_inv_std[ch];
        const double k = (double)gamma[ch] * inv_std / md;
        const double db = (double)dbeta[ch];
        const double dg = (double)dgamma[ch];
        const float* xp = x + p * hw;
        const float* dyp = dy + p * hw;
        float* dxp = dx + p * hw;
        for (long long i = ew_first(); i < hw; i += ew_stride()) {
            const double xhat = ((double)xp[i] - mean) * inv_std;
            dxp[i] = (float)(k * (md * (double)dyp[i] - db - xhat * dg));
        }
    }
}
CM_EXPORT(batchnorm_train_dx_f32)
