// Convolution family, f32: conv2d (implicit GEMM and direct), transposed
// conv2d (implicit GEMM per output phase); linear runs on the conv2d kernels
// as a 1×1 conv over [n, in, 1, 1].
//
// Backward: the input gradients run on these kernels (conv2d's dx is a
// transposed conv of dy, conv_transpose2d's dx a conv2d of dy; see
// src/ops/conv.rs), the weight and bias gradients in kernels/conv_backward.cu.
//
// Layouts and shapes (dense, row-major, PyTorch's):
//   conv2d            x [n, c_in, h, w], w [c_out, c_in, kh, kw], bias [c_out]
//                     or null, y [n, c_out, oh, ow] (src/geometry.rs Conv2dGeom):
//                     y[b, co, oy, ox] = bias[co] + Σ_{ci,ky,kx}
//                       w[co, ci, ky, kx] · x[b, ci, oy·sh − ph + ky, ox·sw − pw + kx]
//                     with zeros outside the input.
//   conv_transpose2d  x [n, c_in, h, w], w [c_in, c_out, kh, kw], bias [c_out]
//                     or null, y [n, c_out, oh, ow] (ConvTranspose2dGeom), as a
//                     gather: y[b, co, oy, ox] = bias[co] + Σ w[ci, co, ky, kx] ·
//                     x[b, ci, iy, ix] over iy·sh = oy + ph − ky, ix·sw = ox + pw − kx.
//   Per-image extents (c_in·h·w, c_out·oh·ow) and the weight count fit an
//   int (the ops layer checks); batch offsets and output-pixel indices are
//   64-bit.
//
// Variants:
//   conv2d_igemm64_f32, conv2d_igemm32_f32
//       Implicit GEMM, no im2col buffer: C[M, N] = A[M, K] · B[K, N] with
//       M = n·oh·ow output pixels, N = c_out, K = c_in·kh·kw, A gathered from x
//       on the fly (padding by bounds checks), B = the weights. A block of
//       128 threads owns a 128 × BN tile of C (BN = 64 or 32 channels); K
//       advances in slabs of 8, staged in double-buffered shared memory (one
//       barrier per slab; the next slab's global loads are in flight while
//       the current one is multiplied). Thread t gathers output pixel m0 + t
//       for all 8 k of a slab: its (image, iy0, ix0) is decomposed once, and
//       the k → (ci, ky, kx) walk is block-uniform with carries instead of
//       divisions. Each thread accumulates an 8 × (BN/8) register tile: pixels
//       tm + 16·i (so a warp's stores hit consecutive ox) and channels
//       tn·(BN/8) + j (float4 reads of B). Bias fused in the store.
//   conv2d_direct_f32
//       One thread per output (grid-stride, ox fastest), plain loops over
//       (ci, ky, kx). For tiny c_out and as the tests' cross-check.
//   conv2d_igemm{64,32}_{strided,strided_relu,bnrelu,bnrelu_relu}_f32
//       The same GEMM for networks that keep their activations in shared
//       buffers (DenseNet's dense blocks), plus fused pro- and epilogues:
//       the input is the first c_in channels of a wider buffer (batch stride
//       x_bstride floats), the output goes to channels [y_coff, y_coff +
//       c_out) of a wider buffer (batch stride y_bstride floats, the same
//       plane size oh·ow). `bnrelu` applies max(x·in_scale[ci] +
//       in_shift[ci], 0) to every in-bounds input value as it is gathered
//       (an inference BatchNorm followed by ReLU; zero padding stays zero,
//       as when PyTorch pads the activated tensor); `relu` applies
//       max(v, 0) to the output after the bias. The comparisons are
//       written `v < 0 ? 0 : v` so that NaN passes through, as in relu_f32.
//   conv2d_igemm{64,32}_{strided_leaky,up2,up2_leaky}_f32
//       The CP2Image generator's block: `up2` reads the input through a
//       nearest 2× upsampling (the conv runs over a (h, w) plane, passed as
//       h, w, whose value at (iy, ix) is the buffer's (iy/2, ix/2); the buffer
//       is (h/2, w/2)), so the upsampled tensor is never written; `leaky`
//       applies v < 0 ? v·out_slope : v after the bias (LeakyReLU, NaN passes).
//       Every fused kernel takes a trailing `float out_slope` (read only by
//       the leaky variants).
//   conv2d_igemm{64,32}_bnrelu_pool2_f32
//       A DenseNet transition: 1×1 conv over avg_pool2x2(bnrelu(x)). The
//       gather reads the 2×2 window of each pooled position and averages the
//       four activated values, so the GEMM runs over the pooled positions
//       (a quarter of the multiply-adds of conv-then-pool; pooling commutes
//       with the 1×1 conv). Launched as a 1×1 stride-2 conv over the full
//       input (h, w) with oh = ⌊h/2⌋, ow = ⌊w/2⌋ (floor mode), so every
//       window lies inside the input.
//   conv_transpose2d_igemm64_f32, conv_transpose2d_igemm32_f32
//       The same GEMM per output phase (ry, rx) = ((oy + ph) mod sh,
//       (ox + pw) mod sw), one phase per blockIdx.z: within a phase the taps
//       that reach an output are ky = ry + jy·sh, kx = rx + jx·sw, and the
//       input they read is (qy − jy, qx − jx) with qy = (oy + ph − ry)/sh, so
//       every phase is a stride-1 correlation with a strided slice of the
//       kernel: M = n·(phase outputs), K = c_in·⌈(kh − ry)/sh⌉·⌈(kw − rx)/sw⌉.
//       No atomics, no wasted taps.
//
// Launch geometry (chosen in src/ops/conv.rs and src/ops/linear.rs):
//   igemm   block (128, 1, 1); grid (⌈M/128⌉, ⌈c_out/BN⌉, 1) for conv2d
//           (all variants),
//           (⌈M_phase,max/128⌉, ⌈c_out/BN⌉, sh·sw) for the transposed conv
//           (blocks past their phase's M exit). Static shared memory
//           2·8·128 floats (A) + 2·8·(BN/4 + 1) float4 (B): 12.5 KiB for BN 64.
//   direct  block (256, 1, 1), grid (⌈n·c_out·oh·ow / 256⌉ capped, 1, 1).

#include "common.cuh"
#include "conv_gather.cuh"

// Full unrolling keeps the register tiles in registers on the GPU; the host
// compiler of the emulation build has no such pragma (and warns on it).
#ifdef CELLMORPH_EMULATION
#define CONV_UNROLL
#else
#define CONV_UNROLL _Pragma("unroll")
#endif

namespace {

constexpr int kConvThreads = 128;
// Output pixels per block tile, and K per shared-memory slab.
constexpr int kConvBM = 128;
constexpr int kConvBK = 8;
// The 128 threads form a 16 (pixels) × 8 (channels) grid over the tile.
constexpr int kConvTM = kConvBM / 16;

// Problem description shared by the conv and transposed-conv GEMMs, filled
// once per block from the kernel arguments (all block-uniform).
struct ConvGemm {
    int c_in, h, w, c_out, kh, kw;
    int oh, ow;
    // Output pixels of this GEMM: n images × qh × qw positions; output
    // position (a, b) lands at (oy0 + a·ssh, ox0 + b·ssw).
    int qh, qw;
    int oy0, ox0, ssh, ssw;
    // Input origin of position (a, b): (iy_a, ix_b) = (a·ish + iy_off, b·isw + ix_off).
    int ish, isw, iy_off, ix_off;
    // Taps walked along K per input channel, and the kernel element of tap
    // (jy, jx): (ry + jy·tsh, rx + jx·tsw).
    int ty, tx, ry, rx, tsh, tsw;
    long long m;  // n·qh·qw
    int k;        // c_in·ty·tx
    // Floats from one image to the next in x and in y (c_in·h·w and
    // c_out·oh·ow for dense tensors).
    long long x_bstride, y_bstride;
};

// A 128 × BN tile of the GEMM. TRANSPOSED selects how A walks the input
// (kernel taps add to the input position for conv2d and subtract for the
// transposed conv) and how B is laid out in memory. BN_RELU_IN applies
// max(x·in_scale[ci] + in_shift[ci], 0) to in-bounds inputs as they are
// gathered; RELU_OUT applies max(·, 0) after the bias. POOL2_IN (with
// BN_RELU_IN, for a 1×1 stride-2 conv) averages the activated 2×2 window
// whose top-left value the plain gather would read.
template <int BN, bool TRANSPOSED, bool BN_RELU_IN, bool RELU_OUT, bool POOL2_IN, bool UP2_IN = false,
          bool LEAKY_OUT = false>
__device__ __forceinline__ void conv_gemm_tile(const ConvGemm& g, const float* __restrict__ x,
                                               const float* __restrict__ wt, const float* __restrict__ bias,
                                               float* __restrict__ y, const float* __restrict__ in_scale,
                                               const float* __restrict__ in_shift, float (*As)[kConvBK][kConvBM],
                                               float4 (*Bs)[kConvBK][BN / 4 + 1], float out_slope = 0.0f) {
    constexpr int TN = BN / 8;
    constexpr int kSign = TRANSPOSED ? -1 : 1;
    // Threads that load one float4 of B (4 channels at one k) per slab.
    constexpr int kBLoaders = kConvBK * BN / 4;

    const int t = threadIdx.x;
    const long long m0 = (long long)blockIdx.x * kConvBM;
    const int n0 = blockIdx.y * BN;
    if (m0 >= g.m) {
        return;  // the whole block: only transposed phases with fewer outputs get here
    }
    const int hw = g.h * g.w;
    const long long qhw = (long long)g.qh * g.qw;

    // --- A gather state: thread t loads output pixel m0 + t, every k. ---
    long long a_base = 0;
    long long a_img = 0;    // UP2_IN: the image's first float
    int iy0 = INT_MIN / 2;  // out of range for every tap: pixels past M read zeros
    int ix0 = 0;
    {
        const long long m = m0 + t;
        if (m < g.m) {
            const long long img = m / qhw;
            const int r = (int)(m - img * qhw);
            const int a = r / g.qw;
            const int b = r - a * g.qw;
            iy0 = a * g.ish + g.iy_off;
            ix0 = b * g.isw + g.ix_off;
            a_img = img * g.x_bstride;
            a_base = a_img + (long long)iy0 * g.w + ix0;
        }
    }
    // UP2_IN: (h, w) is the upsampled plane; the buffer holds (h/2, w/2).
    const int src_w = g.w >> 1;
    const int src_hw = (g.h >> 1) * src_w;
    // The k walk (block-uniform): k ↔ (ci, jy, jx), koff = ci·hw ± (jy·w + jx).
    int a_ci = 0, a_jy = 0, a_jx = 0, a_koff = 0;
    const int a_row_step = kSign * (g.w - g.tx);
    const int a_chan_step = hw - kSign * g.ty * g.w;

    // --- B load state: threads < kBLoaders load w at k = slab + b_kk for
    // channels n0 + 4·b_n4 + q. ---
    const int b_kk = t % kConvBK;
    const int b_n4 = t / kConvBK;
    // Transposed weights are not a plain [N, K] matrix: walk (ci, jy, jx)
    // with per-slab carries.
    int b_ci = 0, b_jy = 0, b_jx = 0;
    int b_dci = 0, b_djy = 0, b_djx = 0;
    if (TRANSPOSED && g.k > 0) {
        const int taps = g.ty * g.tx;
        b_ci = b_kk / taps;
        b_jy = (b_kk - b_ci * taps) / g.tx;
        b_jx = b_kk - b_ci * taps - b_jy * g.tx;
        b_dci = kConvBK / taps;
        b_djy = (kConvBK - b_dci * taps) / g.tx;
        b_djx = kConvBK - b_dci * taps - b_djy * g.tx;
    }

    float pa[kConvBK];
    float pb[4];

    auto load_slab = [&](int k0) {
CONV_UNROLL
        for (int e = 0; e < kConvBK; ++e) {
            const bool ok = a_ci < g.c_in && (unsigned)(iy0 + kSign * a_jy) < (unsigned)g.h &&
                            (unsigned)(ix0 + kSign * a_jx) < (unsigned)g.w;
            const int iy = iy0 + kSign * a_jy;
            const int ix = ix0 + kSign * a_jx;
            const float v = ok ? conv_input_value<BN_RELU_IN, POOL2_IN, UP2_IN>(
                                     x, a_base + a_koff, a_img, a_ci, iy, ix, g.w, src_w, src_hw, in_scale, in_shift)
                               : 0.0f;
            pa[e] = v;
            ++a_jx;
            a_koff += kSign;
            if (a_jx == g.tx) {
                a_jx = 0;
                ++a_jy;
                a_koff += a_row_step;
                if (a_jy == g.ty) {
                    a_jy = 0;
                    ++a_ci;
                    a_koff += a_chan_step;
                }
            }
        }
        if (t < kBLoaders) {
            bool k_ok;
            int boff;
            int n_stride;
            if (TRANSPOSED) {
                k_ok = b_ci < g.c_in;
                boff = k_ok ? b_ci * g.c_out * g.kh * g.kw + (g.ry + b_jy * g.tsh) * g.kw + g.rx + b_jx * g.tsw : 0;
                n_stride = g.kh * g.kw;
                b_jx += b_djx;
                if (b_jx >= g.tx) {
                    b_jx -= g.tx;
                    ++b_jy;
                }
                b_jy += b_djy;
                if (b_jy >= g.ty) {
                    b_jy -= g.ty;
                    ++b_ci;
                }
                b_ci += b_dci;
            } else {
                boff = k0 + b_kk;
                k_ok = boff < g.k;
                n_stride = g.k;
            }
CONV_UNROLL
            for (int q = 0; q < 4; ++q) {
                const int co = n0 + 4 * b_n4 + q;
                pb[q] = (k_ok && co < g.c_out) ? wt[co * n_stride + boff] : 0.0f;
            }
        }
    };
    auto store_slab = [&](int buf) {
CONV_UNROLL
        for (int e = 0; e < kConvBK; ++e) {
            As[buf][e][t] = pa[e];
        }
        if (t < kBLoaders) {
            Bs[buf][b_kk][b_n4] = make_float4(pb[0], pb[1], pb[2], pb[3]);
        }
    };

    const int tm = t % 16;
    const int tn = t / 16;
    float acc[kConvTM][TN];
CONV_UNROLL
    for (int i = 0; i < kConvTM; ++i) {
CONV_UNROLL
        for (int j = 0; j < TN; ++j) {
            acc[i][j] = 0.0f;
        }
    }

    const int slabs = (g.k + kConvBK - 1) / kConvBK;
    if (slabs > 0) {
        load_slab(0);
        store_slab(0);
    }
    __syncthreads();
    for (int s = 0; s < slabs; ++s) {
        const int cur = s & 1;
        if (s + 1 < slabs) {
            load_slab((s + 1) * kConvBK);
        }
CONV_UNROLL
        for (int kk = 0; kk < kConvBK; ++kk) {
            float a[kConvTM];
            float b[TN];
CONV_UNROLL
            for (int i = 0; i < kConvTM; ++i) {
                a[i] = As[cur][kk][tm + 16 * i];
            }
CONV_UNROLL
            for (int j4 = 0; j4 < TN / 4; ++j4) {
                const float4 v = Bs[cur][kk][tn * (TN / 4) + j4];
                b[4 * j4 + 0] = v.x;
                b[4 * j4 + 1] = v.y;
                b[4 * j4 + 2] = v.z;
                b[4 * j4 + 3] = v.w;
            }
CONV_UNROLL
            for (int i = 0; i < kConvTM; ++i) {
CONV_UNROLL
                for (int j = 0; j < TN; ++j) {
                    acc[i][j] += a[i] * b[j];
                }
            }
        }
        if (s + 1 < slabs) {
            store_slab(cur ^ 1);
        }
        __syncthreads();
    }

    // --- Store (+ bias). ---
    const long long out_plane = (long long)g.oh * g.ow;
    float bv[TN];
CONV_UNROLL
    for (int j = 0; j < TN; ++j) {
        const int co = n0 + tn * TN + j;
        bv[j] = (bias != nullptr && co < g.c_out) ? bias[co] : 0.0f;
    }
    // Pixel m0 + tm + 16·i as (image, position in the phase): one 64-bit
    // division, then steps of 16 with carries (a phase plane fits an int).
    long long img = (m0 + tm) / qhw;
    int r = (int)(m0 + tm - img * qhw);
CONV_UNROLL
    for (int i = 0; i < kConvTM; ++i) {
        if (m0 + tm + 16 * i >= g.m) {
            break;
        }
        int p = r;
        if (TRANSPOSED) {
            const int a = r / g.qw;
            const int b = r - a * g.qw;
            p = (g.oy0 + a * g.ssh) * g.ow + g.ox0 + b * g.ssw;
        }
        float* yp = y + img * g.y_bstride + p;
CONV_UNROLL
        for (int j = 0; j < TN; ++j) {
            const int co = n0 + tn * TN + j;
            if (co < g.c_out) {
                float v = acc[i][j] + bv[j];
                if (RELU_OUT) {
                    v = v < 0.0f ? 0.0f : v;
                }
                if (LEAKY_OUT) {
                    v = v < 0.0f ? v * out_slope : v;
                }
                yp[co * out_plane] = v;
            }
        }
        r += 16;
        while (r >= qhw) {
            r -= (int)qhw;
            ++img;
        }
    }
}

__device__ __forceinline__ ConvGemm conv2d_gemm(int n, int c_in, int h, int w, int c_out, int kh, int kw, int sh,
                                                 int sw, int ph, int pw, int oh, int ow) {
    ConvGemm g;
    g.c_in = c_in;
    g.h = h;
    g.w = w;
    g.c_out = c_out;
    g.kh = kh;
    g.kw = kw;
    g.oh = oh;
    g.ow = ow;
    g.qh = oh;
    g.qw = ow;
    g.oy0 = 0;
    g.ox0 = 0;
    g.ssh = 1;
    g.ssw = 1;
    g.ish = sh;
    g.isw = sw;
    g.iy_off = -ph;
    g.ix_off = -pw;
    g.ty = kh;
    g.tx = kw;
    g.ry = 0;
    g.rx = 0;
    g.tsh = 1;
    g.tsw = 1;
    g.m = (long long)n * oh * ow;
    g.k = c_in * kh * kw;
    g.x_bstride = (long long)c_in * h * w;
    g.y_bstride = (long long)c_out * oh * ow;
    return g;
}

// The phase (ry, rx) = blockIdx.z of a transposed conv as a stride-1 gather.
__device__ __forceinline__ ConvGemm conv_transpose2d_gemm(int n, int c_in, int h, int w, int c_out, int kh, int kw,
                                                          int sh, int sw, int ph, int pw, int oh, int ow) {
    const int ry = (int)blockIdx.z / sw;
    const int rx = (int)blockIdx.z - ry * sw;
    ConvGemm g;
    g.c_in = c_in;
    g.h = h;
    g.w = w;
    g.c_out = c_out;
    g.kh = kh;
    g.kw = kw;
    g.oh = oh;
    g.ow = ow;
    // First output row of the phase: (oy0 + ph) ≡ ry (mod sh).
    g.oy0 = ((ry - ph) % sh + sh) % sh;
    g.ox0 = ((rx - pw) % sw + sw) % sw;
    g.qh = g.oy0 < oh ? (oh - g.oy0 + sh - 1) / sh : 0;
    g.qw = g.ox0 < ow ? (ow - g.ox0 + sw - 1) / sw : 0;
    g.ssh = sh;
    g.ssw = sw;
    g.ish = 1;
    g.isw = 1;
    g.iy_off = (g.oy0 + ph - ry) / sh;
    g.ix_off = (g.ox0 + pw - rx) / sw;
    g.ty = ry < kh ? (kh - ry + sh - 1) / sh : 0;
    g.tx = rx < kw ? (kw - rx + sw - 1) / sw : 0;
    g.ry = ry;
    g.rx = rx;
    g.tsh = sh;
    g.tsw = sw;
    g.m = (long long)n * g.qh * g.qw;
    g.k = c_in * g.ty * g.tx;
    g.x_bstride = (long long)c_in * h * w;
    g.y_bstride = (long long)c_out * oh * ow;
    return g;
}

}  // namespace

#define CONV_IGEMM_KERNEL(NAME, BN, TRANSPOSED, GEOM)                                                           \
    extern "C" __global__ void __launch_bounds__(kConvThreads)                                                  \
        NAME(const float* __restrict__ x, const float* __restrict__ wt, const float* __restrict__ bias,         \
             float* __restrict__ y, int n, int c_in, int h, int w, int c_out, int kh, int kw, int sh, int sw,  \
             int ph, int pw, int oh, int ow) {                                                                  \
        __shared__ float As[2][kConvBK][kConvBM];                                                               \
        __shared__ float4 Bs[2][kConvBK][BN / 4 + 1];                                                           \
        const ConvGemm g = GEOM(n, c_in, h, w, c_out, kh, kw, sh, sw, ph, pw, oh, ow);                          \
        conv_gemm_tile<BN, TRANSPOSED, false, false, false>(g, x, wt, bias, y, nullptr, nullptr, As, Bs);       \
    }

CONV_IGEMM_KERNEL(conv2d_igemm64_f32, 64, false, conv2d_gemm)
CM_EXPORT(conv2d_igemm64_f32)
CONV_IGEMM_KERNEL(conv2d_igemm32_f32, 32, false, conv2d_gemm)
CM_EXPORT(conv2d_igemm32_f32)
CONV_IGEMM_KERNEL(conv_transpose2d_igemm64_f32, 64, true, conv_transpose2d_gemm)
CM_EXPORT(conv_transpose2d_igemm64_f32)
CONV_IGEMM_KERNEL(conv_transpose2d_igemm32_f32, 32, true, conv_transpose2d_gemm)
CM_EXPORT(conv_transpose2d_igemm32_f32)

// Strided input/output with optional BN+ReLU prologue (and 2×2 pooling) and
// ReLU epilogue. in_scale/in_shift are read only by the bnrelu variants (null
// otherwise).
#define CONV_FUSED_KERNEL(NAME, BN, BN_RELU_IN, RELU_OUT, POOL2_IN, UP2_IN, LEAKY_OUT)                         \
    extern "C" __global__ void __launch_bounds__(kConvThreads)                                                  \
        NAME(const float* __restrict__ x, const float* __restrict__ wt, const float* __restrict__ bias,         \
             float* __restrict__ y, const float* __restrict__ in_scale, const float* __restrict__ in_shift,     \
             int n, int c_in, int h, int w, int c_out, int kh, int kw, int sh, int sw, int ph, int pw,          \
             int oh, int ow, long long x_bstride, long long y_bstride, int y_coff, float out_slope) {           \
        __shared__ float As[2][kConvBK][kConvBM];                                                               \
        __shared__ float4 Bs[2][kConvBK][BN / 4 + 1];                                                           \
        ConvGemm g = conv2d_gemm(n, c_in, h, w, c_out, kh, kw, sh, sw, ph, pw, oh, ow);                         \
        g.x_bstride = x_bstride;                                                                                \
        g.y_bstride = y_bstride;                                                                                \
        conv_gemm_tile<BN, false, BN_RELU_IN, RELU_OUT, POOL2_IN, UP2_IN, LEAKY_OUT>(                            \
            g, x, wt, bias, y + (long long)y_coff * oh * ow, in_scale, in_shift, As, Bs, out_slope);            \
    }

CONV_FUSED_KERNEL(conv2d_igemm64_strided_f32, 64, false, false, false, false, false)
CM_EXPORT(conv2d_igemm64_strided_f32)
CONV_FUSED_KERNEL(conv2d_igemm32_strided_f32, 32, false, false, false, false, false)
CM_EXPORT(conv2d_igemm32_strided_f32)
CONV_FUSED_KERNEL(conv2d_igemm64_strided_relu_f32, 64, false, true, false, false, false)
CM_EXPORT(conv2d_igemm64_strided_relu_f32)
CONV_FUSED_KERNEL(conv2d_igemm32_strided_relu_f32, 32, false, true, false, false, false)
CM_EXPORT(conv2d_igemm32_strided_relu_f32)
CONV_FUSED_KERNEL(conv2d_igemm64_bnrelu_f32, 64, true, false, false, false, false)
CM_EXPORT(conv2d_igemm64_bnrelu_f32)
CONV_FUSED_KERNEL(conv2d_igemm32_bnrelu_f32, 32, true, false, false, false, false)
CM_EXPORT(conv2d_igemm32_bnrelu_f32)
CONV_FUSED_KERNEL(conv2d_igemm64_bnrelu_relu_f32, 64, true, true, false, false, false)
CM_EXPORT(conv2d_igemm64_bnrelu_relu_f32)
CONV_FUSED_KERNEL(conv2d_igemm32_bnrelu_relu_f32, 32, true, true, false, false, false)
CM_EXPORT(conv2d_igemm32_bnrelu_relu_f32)
CONV_FUSED_KERNEL(conv2d_igemm64_bnrelu_pool2_f32, 64, true, false, true, false, false)
CM_EXPORT(conv2d_igemm64_bnrelu_pool2_f32)
CONV_FUSED_KERNEL(conv2d_igemm32_bnrelu_pool2_f32, 32, true, false, true, false, false)
CM_EXPORT(conv2d_igemm32_bnrelu_pool2_f32)

CONV_FUSED_KERNEL(conv2d_igemm64_strided_leaky_f32, 64, false, false, false, false, true)
CM_EXPORT(conv2d_igemm64_strided_leaky_f32)
CONV_FUSED_KERNEL(conv2d_igemm64_up2_f32, 64, false, false, false, true, false)
CM_EXPORT(conv2d_igemm64_up2_f32)
CONV_FUSED_KERNEL(conv2d_igemm64_up2_leaky_f32, 64, false, false, false, true, true)
CM_EXPORT(conv2d_igemm64_up2_leaky_f32)
CONV_FUSED_KERNEL(conv2d_igemm32_strided_leaky_f32, 32, false, false, false, false, true)
CM_EXPORT(conv2d_igemm32_strided_leaky_f32)
CONV_FUSED_KERNEL(conv2d_igemm32_up2_f32, 32, false, false, false, true, false)
CM_EXPORT(conv2d_igemm32_up2_f32)
CONV_FUSED_KERNEL(conv2d_igemm32_up2_leaky_f32, 32, false, false, false, true, true)
CM_EXPORT(conv2d_igemm32_up2_leaky_f32)

extern "C" __global__ void conv2d_direct_f32(const float* __restrict__ x, const float* __restrict__ wt,
                                             const float* __restrict__ bias, float* __restrict__ y, int n,
                                             int c_in, int h, int w, int c_out, int kh, int kw, int sh, int sw,
                                             int ph, int pw, int oh, int ow) {
    const long long out_plane = (long long)oh * ow;
    const long long total = (long long)n * c_out * out_plane;
    const long long hw = (long long)h * w;
    const int khw = kh * kw;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long plane = i / out_plane;
        const int p = (int)(i - plane * out_plane);
        const long long img = plane / c_out;
        const int co = (int)(plane - img * c_out);
        const int oy = p / ow;
        const int ox = p - oy * ow;
        const int iy0 = oy * sh - ph;
        const int ix0 = ox * sw - pw;
        float acc = bias != nullptr ? bias[co] : 0.0f;
        for (int ci = 0; ci < c_in; ++ci) {
            const float* xc = x + (img * c_in + ci) * hw;
            const float* wc = wt + ((long long)co * c_in + ci) * khw;
            for (int ky = 0; ky < kh; ++ky) {
                const int iy = iy0 + ky;
                if ((unsigned)iy >= (unsigned)h) {
                    continue;
                }
                for (int kx = 0; kx < kw; ++kx) {
                    const int ix = ix0 + kx;
                    if ((unsigned)ix < (unsigned)w) {
                        acc += wc[ky * kw + kx] * xc[(long long)iy * w + ix];
                    }
                }
            }
        }
        y[i] = acc;
    }
}
CM_EXPORT(conv2d_direct_f32)
