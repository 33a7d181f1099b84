// The value an implicit-GEMM conv reads for one (input channel, input
// position), with the fused prologues: shared by conv.cu (f32) and
// conv_tc.cu (tensor cores), which differ only in how they walk k and stage
// the values.
#pragma once

#include "common.cuh"

// Input value at channel `ci`, position (iy, ix) of the conv's input plane
// (h, w), already known to be inside it (zero padding is the caller's):
//   plain      x[off]                                  (off = img·x_bstride + ci·h·w + iy·w + ix)
//   BN_RELU_IN max(x[off]·in_scale[ci] + in_shift[ci], 0)
//   POOL2_IN   the mean of BN_RELU_IN over the 2×2 window whose top-left is off
//              (the caller walks the full-resolution plane with stride 2)
//   UP2_IN     x[img_off + ci·src_hw + (iy/2)·src_w + ix/2]: (h, w) is a nearest
//              2× upsampling of the (h/2, w/2) buffer
// fmaf and `v < 0 ? 0 : v` as in the f32 reference kernels (NaN passes); the
// CPU reference uses the same fused multiply-add (f32::mul_add), so a value
// rounded to bf16/f16 afterwards rounds the same way on every device.
template <bool BN_RELU_IN, bool POOL2_IN, bool UP2_IN>
__device__ __forceinline__ float conv_input_value(const float* __restrict__ x, long long off,
                                                  long long img_off, int ci, int iy, int ix, int w,
                                                  int src_w, int src_hw, const float* __restrict__ in_scale,
                                                  const float* __restrict__ in_shift) {
    if (POOL2_IN) {
        const float* p = x + off;
        const float s = in_scale[ci];
        const float b = in_shift[ci];
        auto act = [&](float u) {
            u = fmaf(u, s, b);
            return u < 0.0f ? 0.0f : u;
        };
        return 0.25f * ((act(p[0]) + act(p[1])) + (act(p[w]) + act(p[w + 1])));
    }
    if (UP2_IN) {
        return x[img_off + (long long)ci * src_hw + (iy >> 1) * src_w + (ix >> 1)];
    }
    float v = x[off];
    if (BN_RELU_IN) {
        v = fmaf(v, in_scale[ci], in_shift[ci]);
        v = v < 0.0f ? 0.0f : v;
    }
    return v;
}
