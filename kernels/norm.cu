// BatchNorm inference with running statistics, f32, plain and fused with
// the ReLU that follows it.
//
// Layouts and shapes (all buffers dense, row-major):
//   batchnorm_f32, batchnorm_relu_f32
//       x, y [planes = N·C, hw] (NCHW with H·W folded); gamma, beta, mean,
//       var [C]. Channel of plane p is p % C. The per-channel affine map
//       scale = gamma / sqrt(var + eps), shift = beta − mean·scale is folded
//       in-kernel, once per plane a thread visits, so a call needs no host
//       round trip and no scratch buffer; the rounding is the CPU reference's.
//
// Variants: batchnorm_relu_f32 fuses the ReLU that follows every BatchNorm in
// DenseNet (one read, one write).
//
// Launch geometry (chosen in src/ops/norm.rs): block.x threads over the plane
// (a multiple of 32, at most 256, sized to hw), grid.x = ⌈hw/block.x⌉ capped,
// grid.y over planes (capped at 65535); both grid-stride. Flat offsets are
// 64-bit throughout.

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
