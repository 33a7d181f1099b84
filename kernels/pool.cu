// Pooling over NCHW planes, f32: max and average pooling, global average
// pooling.
//
// Layouts and shapes (dense, row-major; planes = N·C):
//   max_pool2d_f32, avg_pool2d_f32
//       x [planes, h, w] → y [planes, oh, ow] with floor-mode output sizes
//       (src/geometry.rs Pool2dGeom). The window of output (oy, ox) starts at
//       (oy·sh − ph, ox·sw − pw) and spans kh × kw. Max pooling treats padding
//       as −∞ and lets a NaN win (PyTorch's rule); average pooling treats it
//       as zeros and divides by the window clipped to the padded input when
//       count_include_pad != 0, else by its in-bounds part. The sum is taken
//       row by row (Σ of row sums), the CPU reference's order.
//   global_avg_pool_f32   x [planes, hw] → y [planes]: the mean of each plane.
//   max_pool2d_backward_f32   x [planes, h, w], dy [planes, oh, ow] →
//       dx [planes, h, w]. A gather, no atomics and no stored indices: each dx
//       element visits the windows that cover it (oy in
//       [⌈(iy+ph−kh+1)/sh⌉, ⌊(iy+ph)/sh⌋] ∩ [0, oh), likewise ox), recomputes
//       each window's argmax with the CPU reference's rule (first maximum in
//       row-major order, a NaN replaces the best so far, PyTorch's rule) and
//       adds dy where the argmax is itself, in increasing (oy, ox) from 0 —
//       the CPU reference's order of additions, so the result is bit-exact.
//   avg_pool2d_backward_f32   dy [planes, oh, ow] → dx [planes, h, w], the
//       same gather adding dy / divisor (one division, the forward's divisor
//       rule) in increasing (oy, ox): bit-exact against the CPU reference.
//   global_avg_pool_backward_f32   dy [planes] → dx [planes, hw],
//       dx[p, i] = dy[p] / (float)hw: a gather (each dx element reads the one
//       output that averaged it), one division as in the CPU reference.
//
// Launch geometry (chosen in src/ops/pool.rs):
//   pool2d             one thread per output element. block.x threads over the
//                      output plane (a multiple of 32, at most 256, sized to
//                      the plane), grid.x = ⌈plane/block.x⌉ capped, grid.y over
//                      planes (capped at 65535); both grid-stride. In-plane
//                      indices are 32-bit (the ops layer checks that a plane
//                      fits), plane offsets 64-bit.
//   global_avg_pool    one block per plane (grid-stride over planes), block.x
//                      a multiple of 32 up to 512 sized to hw: each thread sums
//                      a strided part of the plane, warps reduce with xor
//                      shuffles, then warp 0 reduces the per-warp sums from
//                      shared memory. Any plane size works.
//   pool2d backward    one thread per dx element, the forward's plane
//                      geometry over the input plane (block.x ≤ 256 over h·w,
//                      grid.y over planes); work per thread is about
//                      ⌈kh/sh⌉·⌈kw/sw⌉ windows (× kh·kw to recompute a max).
//   global_avg_pool_backward   one thread per dx element, 1-D grid-stride
//                      (256 threads, grid.x capped); offsets 64-bit.

#include "common.cuh"

namespace {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float pool_warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) {
        v += __shfl_xor_sync(kFullMask, v, off);
    }
    return v;
}

__device__ __forceinline__ long long pool_first() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long pool_stride() {
    return (long long)blockDim.x * gridDim.x;
}

// The range [lo, hi) of output indices along one axis whose windows cover
// input index i (window of o: [o·s − p, o·s − p + k)).
__device__ __forceinline__ void pool_covering(int i, int k, int s, int p, int out, int* lo, int* hi) {
    const int a = i + p - k + 1;  // o·s ≥ a
    *lo = a <= 0 ? 0 : (a + s - 1) / s;
    *hi = min((i + p) / s + 1, out);
}

}  // namespace

extern "C" __global__ void max_pool2d_f32(const float* __restrict__ x, float* __restrict__ y, long long planes,
                                          int h, int w, int oh, int ow, int kh, int kw, int sh, int sw, int ph,
                                          int pw) {
    const long long out_plane = (long long)oh * ow;
    for (long long p = blockIdx.y; p < planes; p += gridDim.y) {
        const float* xp = x + p * h * w;
        float* yp = y + p * out_plane;
        for (long long i = pool_first(); i < out_plane; i += pool_stride()) {
            const int oy = (int)i / ow;
            const int ox = (int)i - oy * ow;
            const int y0 = oy * sh - ph;
            const int x0 = ox * sw - pw;
            const int y_lo = max(y0, 0), y_hi = min(y0 + kh, h);
            const int x_lo = max(x0, 0), x_hi = min(x0 + kw, w);
            float best = -INFINITY;
            for (int iy = y_lo; iy < y_hi; ++iy) {
                const float* row = xp + (long long)iy * w;
                for (int ix = x_lo; ix < x_hi; ++ix) {
                    const float v = row[ix];
                    // v != v: a NaN wins and then stays (nothing compares greater).
                    if (v > best || v != v) {
                        best = v;
                    }
                }
            }
            yp[i] = best;
        }
    }
}
CM_EXPORT(max_pool2d_f32)

extern "C" __global__ void avg_pool2d_f32(const float* __restrict__ x, float* __restrict__ y, long long planes,
                                          int h, int w, int oh, int ow, int kh, int kw, int sh, int sw, int ph,
                                          int pw, int count_include_pad) {
    const long long out_plane = (long long)oh * ow;
    for (long long p = blockIdx.y; p < planes; p += gridDim.y) {
        const float* xp = x + p * h * w;
        float* yp = y + p * out_plane;
        for (long long i = pool_first(); i < out_plane; i += pool_stride()) {
            const int oy = (int)i / ow;
            const int ox = (int)i - oy * ow;
            const int y0 = oy * sh - ph;
            const int x0 = ox * sw - pw;
            const int y_lo = max(y0, 0), y_hi = min(y0 + kh, h);
            const int x_lo = max(x0, 0), x_hi = min(x0 + kw, w);
            float sum = 0.0f;
            for (int iy = y_lo; iy < y_hi; ++iy) {
                const float* row = xp + (long long)iy * w;
                float row_sum = 0.0f;
                for (int ix = x_lo; ix < x_hi; ++ix) {
                    row_sum += row[ix];
                }
                sum += row_sum;
            }
            const int count = count_include_pad
                                  ? (min(y0 + kh, h + ph) - y0) * (min(x0 + kw, w + pw) - x0)
                                  : (y_hi - y_lo) * (x_hi - x_lo);
            yp[i] = sum / (float)count;
        }
    }
}
CM_EXPORT(avg_pool2d_f32)

extern "C" __global__ void global_avg_pool_f32(const float* __restrict__ x, float* __restrict__ y, long long planes,
                                               long long hw) {
    __shared__ float warp_sums[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    for (long long p = blockIdx.x; p < planes; p += gridDim.x) {
        const float* xp = x + p * hw;
        float s = 0.0f;
        for (long long i = threadIdx.x; i < hw; i += blockDim.x) {
            s += xp[i];
        }
        s = pool_warp_sum(s);
        if (lane == 0) {
            warp_sums[warp] = s;
        }
        __syncthreads();
        if (warp == 0) {
            float t = lane < warps ? warp_sums[lane] : 0.0f;
            t = pool_warp_sum(t);
            if (lane == 0) {
                y[p] = t / (float)hw;
            }
        }
        // warp_sums is rewritten for the next plane only after warp 0 has read it.
        __syncthreads();
    }
}
CM_EXPORT(global_avg_pool_f32)

extern "C" __global__ void global_avg_pool_backward_f32(const float* __restrict__ dy, float* __restrict__ dx,
                                                        long long planes, long long hw) {
    const long long total = planes * hw;
    const float count = (float)hw;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        dx[i] = dy[i / hw] / count;
    }
}
CM_EXPORT(global_avg_pool_backward_f32)

extern "C" __global__ void max_pool2d_backward_f32(const float* __restrict__ x, const float* __restrict__ dy,
                                                   float* __restrict__ dx, long long planes, int h, int w, int oh,
                                                   int ow, int kh, int kw, int sh, int sw, int ph, int pw) {
    const long long in_plane = (long long)h * w;
    for (long long p = blockIdx.y; p < planes; p += gridDim.y) {
        const float* xp = x + p * in_plane;
        const float* dyp = dy + p * ((long long)oh * ow);
        float* dxp = dx + p * in_plane;
        for (long long i = pool_first(); i < in_plane; i += pool_stride()) {
            const int iy = (int)i / w;
            const int ix = (int)i - iy * w;
            int oy_lo, oy_hi, ox_lo, ox_hi;
            pool_covering(iy, kh, sh, ph, oh, &oy_lo, &oy_hi);
            pool_covering(ix, kw, sw, pw, ow, &ox_lo, &ox_hi);
            float acc = 0.0f;
            for (int oy = oy_lo; oy < oy_hi; ++oy) {
                const int y0 = oy * sh - ph;
                const int y_lo = max(y0, 0), y_hi = min(y0 + kh, h);
                for (int ox = ox_lo; ox < ox_hi; ++ox) {
                    const int x0 = ox * sw - pw;
                    const int x_lo = max(x0, 0), x_hi = min(x0 + kw, w);
                    // The window's argmax, as cpu::pool's window_argmax picks it.
                    int best_i = -1;
                    float best = 0.0f;
                    for (int yy = y_lo; yy < y_hi; ++yy) {
                        for (int xx = x_lo; xx < x_hi; ++xx) {
                            const float v = xp[(long long)yy * w + xx];
                            if (best_i < 0 || v > best || v != v) {
                                best = v;
                                best_i = yy * w + xx;
                            }
                        }
                    }
                    if (best_i == (int)i) {
                        acc += dyp[(long long)oy * ow + ox];
                    }
                }
            }
            dxp[i] = acc;
        }
    }
}
CM_EXPORT(max_pool2d_backward_f32)

extern "C" __global__ void avg_pool2d_backward_f32(const float* __restrict__ dy, float* __restrict__ dx,
                                                   long long planes, int h, int w, int oh, int ow, int kh, int kw,
                                                   int sh, int sw, int ph, int pw, int count_include_pad) {
    const long long in_plane = (long long)h * w;
    for (long long p = blockIdx.y; p < planes; p += gridDim.y) {
        const float* dyp = dy + p * ((long long)oh * ow);
        float* dxp = dx + p * in_plane;
        for (long long i = pool_first(); i < in_plane; i += pool_stride()) {
            const int iy = (int)i / w;
            const int ix = (int)i - iy * w;
            int oy_lo, oy_hi, ox_lo, ox_hi;
            pool_covering(iy, kh, sh, ph, oh, &oy_lo, &oy_hi);
            pool_covering(ix, kw, sw, pw, ow, &ox_lo, &ox_hi);
            float acc = 0.0f;
            for (int oy = oy_lo; oy < oy_hi; ++oy) {
                const int y0 = oy * sh - ph;
                const int rows = count_include_pad ? min(y0 + kh, h + ph) - y0 : min(y0 + kh, h) - max(y0, 0);
                for (int ox = ox_lo; ox < ox_hi; ++ox) {
                    const int x0 = ox * sw - pw;
                    const int cols =
                        count_include_pad ? min(x0 + kw, w + pw) - x0 : min(x0 + kw, w) - max(x0, 0);
                    acc += dyp[(long long)oy * ow + ox] / (float)(rows * cols);
                }
            }
            dxp[i] = acc;
        }
    }
}
CM_EXPORT(avg_pool2d_backward_f32)
