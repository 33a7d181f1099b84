// Data movement over NCHW planes, f32: nearest-neighbour ×2 upsampling,
// channel concatenation and its backward (channel slicing).
//
// Layouts and shapes (dense, row-major; planes = N·C):
//   upsample_nearest2x_f32 x [planes, h, w] → y [planes, 2h, 2w],
//       y[oy, ox] = x[oy / 2, ox / 2].
//   upsample_nearest2x_backward_f32 dy [planes, 2h, 2w] → dx [planes, h, w],
//       a gather: dx[iy, ix] = dy[2iy, 2ix] + dy[2iy, 2ix+1]
//       + dy[2iy+1, 2ix] + dy[2iy+1, 2ix+1], summed left to right in that
//       order (the CPU reference's order, so the result is bit-identical).
//   copy_channels_f32  src [n, c_src, hw] into channels [c_off, c_off + c_src)
//                      of dst [n, c_dst, hw] (concatenation into a
//                      preallocated output); other channels are untouched.
//   slice_channels_f32 channels [c_off, c_off + c_dst) of src [n, c_src, hw]
//                      into dst [n, c_dst, hw] (the backward of a
//                      concatenation: each input's part of the gradient).
//   add_channels_f32   dst[:, c_off + k] += src[:, k] for src [n, c_src, hw],
//                      dst [n, c_dst, hw]: one f32 add per element, as the
//                      CPU reference (a dense layer's input gradient added
//                      into its block buffer's gradient); other channels
//                      untouched.
//
// Launch geometry (chosen in src/ops/layout.rs):
//   upsample           one thread per output element. block.x threads over the
//                      output plane (a multiple of 32, at most 256, sized to
//                      the plane), grid.x = ⌈plane/block.x⌉ capped, grid.y over
//                      planes (capped at 65535); both grid-stride. In-plane
//                      indices are 32-bit (the ops layer checks that a plane
//                      fits), plane offsets 64-bit.
//   upsample backward  one thread per dx element, otherwise as upsample (the
//                      block sized to the dx plane; 32-bit in-plane indices,
//                      the ops layer checks that a dy plane fits).
//   copy_channels_f32  grid.y over n (grid-stride), 1-D grid-stride over the
//                      contiguous c_src·hw block of each image (256 threads,
//                      grid.x capped); offsets 64-bit.
//   slice_channels_f32 as copy_channels_f32, over the contiguous c_dst·hw
//                      block of each output image.
//   add_channels_f32   as copy_channels_f32 (same block of each image).

#include "common.cuh"

namespace {

__device__ __forceinline__ long long layout_first() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long layout_stride() {
    return (long long)blockDim.x * gridDim.x;
}

}  // namespace

extern "C" __global__ void upsample_nearest2x_f32(const float* __restrict__ x, float* __restrict__ y,
                                                  long long planes, int h, int w) {
    const int ow = 2 * w;
    const long long out_plane = 4LL * h * w;
    for (long long p = blockIdx.y; p < planes; p += gridDim.y) {
        const float* xp = x + p * h * w;
        float* yp = y + p * out_plane;
        for (long long i = layout_first(); i < out_plane; i += layout_stride()) {
            const int oy = (int)i / ow;
            const int ox = (int)i - oy * ow;
            yp[i] = xp[(long long)(oy >> 1) * w + (ox >> 1)];
        }
    }
}
CM_EXPORT(upsample_nearest2x_f32)

extern "C" __global__ void upsample_nearest2x_backward_f32(const float* __restrict__ dy, float* __restrict__ dx,
                                                           long long planes, int h, int w) {
    const int ow = 2 * w;
    const long long in_plane = (long long)h * w;
    for (long long p = blockIdx.y; p < planes; p += gridDim.y) {
        const float* dyp = dy + p * 4 * in_plane;
        float* dxp = dx + p * in_plane;
        for (long long i = layout_first(); i < in_plane; i += layout_stride()) {
            const int iy = (int)i / w;
            const int ix = (int)i - iy * w;
            const float* top = dyp + (long long)(2 * iy) * ow + 2 * ix;
            const float* bottom = top + ow;
            dxp[i] = top[0] + top[1] + bottom[0] + bottom[1];
        }
    }
}
CM_EXPORT(upsample_nearest2x_backward_f32)

extern "C" __global__ void copy_channels_f32(const float* __restrict__ src, float* __restrict__ dst, long long n,
                                             long long c_src, long long hw, long long c_dst, long long c_off) {
    const long long block = c_src * hw;
    for (long long img = blockIdx.y; img < n; img += gridDim.y) {
        const float* s = src + img * block;
        float* d = dst + (img * c_dst + c_off) * hw;
        for (long long i = layout_first(); i < block; i += layout_stride()) {
            d[i] = s[i];
        }
    }
}
CM_EXPORT(copy_channels_f32)

extern "C" __global__ void slice_channels_f32(const float* __restrict__ src, float* __restrict__ dst, long long n,
                                              long long c_src, long long hw, long long c_dst, long long c_off) {
    const long long block = c_dst * hw;
    for (long long img = blockIdx.y; img < n; img += gridDim.y) {
        const float* s = src + (img * c_src + c_off) * hw;
        float* d = dst + img * block;
        for (long long i = layout_first(); i < block; i += layout_stride()) {
            d[i] = s[i];
        }
    }
}
CM_EXPORT(slice_channels_f32)

extern "C" __global__ void add_channels_f32(const float* __restrict__ src, float* __restrict__ dst, long long n,
                                            long long c_src, long long hw, long long c_dst, long long c_off) {
    const long long block = c_src * hw;
    for (long long img = blockIdx.y; img < n; img += gridDim.y) {
        const float* s = src + img * block;
        float* d = dst + (img * c_dst + c_off) * hw;
        for (long long i = layout_first(); i < block; i += layout_stride()) {
            d[i] = d[i] + s[i];
        }
    }
}
CM_EXPORT(add_channels_f32)
