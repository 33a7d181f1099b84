// Tensor-core conv2d: the implicit GEMM of conv.cu with bf16 or f16
// operands and f32 accumulation (mma.sync m16n8k16, kernels/mma.cuh).
//
// Same problem, layouts and fusions as conv.cu's conv2d_igemm{64,32}_{...}_f32
// (read its header): C[M, N] = A[M, K] · B[K, N], M = n·oh·ow output pixels
// (NCHW f32 tensors in memory), N = c_out, K = c_in·kh·kw; A gathered on the
// fly from x (zero padding, optional BatchNorm+ReLU prologue, optional 2×2
// average pool), B = the f32 weights [c_out, K]. Both operands are rounded
// to bf16/f16 (round to nearest even) as they are staged in shared memory —
// after the prologue and the pooling, which run in f32 — so tensors stay f32
// in memory and the rest of a model is untouched. Bias and ReLU run in f32 on
// the accumulators.
//
// Variants: conv2d_tc{64,32}_{bf16,f16}_{strided,strided_relu,bnrelu,
// bnrelu_relu,bnrelu_pool2,strided_leaky,up2,up2_leaky}, with the arguments
// and meaning of conv.cu's fused kernels:
//   (const float* x, const float* w, const float* bias (or null), float* y,
//    const float* in_scale, const float* in_shift (null unless bnrelu),
//    int n, c_in, h, w, c_out, kh, kw, sh, sw, ph, pw, oh, ow,
//    long long x_bstride, long long y_bstride, int y_coff, float out_slope)
// A plain conv passes x_bstride = c_in·h·w, y_bstride = c_out·oh·ow, y_coff 0.
//
// Tiling: block 128 threads (4 warps) owns a 128 (pixels) × BN (channels)
// tile of C, K in slabs of 32 staged in double-buffered shared memory as
// halves (rows padded to 40 halves = 20 words, so that the fragment reads of
// a warp — rows g = 0…7 at word offset q — hit 32 distinct banks). BN = 64:
// warps 2 (M) × 2 (N), each 64 × 32 = 4 × 4 mma tiles; BN = 32: warps 4 × 1,
// each 32 × 32 = 2 × 4 mma tiles. Thread t gathers pixel m0 + t for all 32 k
// of a slab (coalesced along ox for each k, the k → (ci, ky, kx) walk
// block-uniform with carries, as in conv.cu); the weights are read as pairs
// of consecutive k, a warp covering two rows × 32 k. One barrier per slab;
// the next slab's global loads are in flight during the current MMAs.
//
// Launch: block (128, 1, 1), grid (⌈M/128⌉, ⌈c_out/BN⌉, 1); static shared
// memory 2·(128 + BN)·40 halves: 30 KiB (BN 64), 25 KiB (BN 32). Registers
// (ptxas, CUDA 13.0, sm_80 / sm_90): BN 64 179 / 180–185; BN 32 asks for
// 3 blocks per SM (__launch_bounds__(128, 3), at most 168 registers) and uses
// 121–124 / 120–125: with no minimum ptxas chose 96 and spilled the pooling
// variant, with 4 blocks (128 registers) it spilled the upsampling ones.
//
// Not done yet (needs a GPU to measure): NHWC/bf16 activations in memory,
// ldmatrix and cp.async staging, wgmma on sm_90a, a wider N tile for
// 128+-channel layers.

#include "common.cuh"
#include "mma.cuh"
#include "conv_gather.cuh"

#ifdef CELLMORPH_EMULATION
#define TC_UNROLL
#else
#define TC_UNROLL _Pragma("unroll")
#endif

namespace {

constexpr int kTcThreads = 128;
constexpr int kTcBM = 128;
constexpr int kTcBK = 32;
// Row stride of the shared tiles in 32-bit words (32 halves + 8 padding).
constexpr int kTcRowWords = (kTcBK + 8) / 2;

struct TcGeom {
    int c_in, h, w, c_out, kh, kw, sh, sw, ph, pw, oh, ow;
    long long m;  // n·oh·ow
    int k;        // c_in·kh·kw
    long long x_bstride, y_bstride;
};

template <int BN, bool BF16, bool BN_RELU_IN, bool RELU_OUT, bool POOL2_IN, bool UP2_IN, bool LEAKY_OUT>
__device__ __forceinline__ void conv_tc_tile(const TcGeom& g, const float* __restrict__ x,
                                             const float* __restrict__ wt, const float* __restrict__ bias,
                                             float* __restrict__ y, const float* __restrict__ in_scale,
                                             const float* __restrict__ in_shift,
                                             unsigned (*As)[kTcBM][kTcRowWords],
                                             unsigned (*Bs)[BN][kTcRowWords], float out_slope) {
    constexpr int kWarpsM = BN == 64 ? 2 : 4;
    constexpr int kWM = kTcBM / kWarpsM;  // 64 or 32 rows per warp
    constexpr int kMI = kWM / 16;         // m16 tiles per warp
    constexpr int kNI = 4;                // n8 tiles per warp (32 channels)
    // Weight pairs per slab and per thread.
    constexpr int kBPairs = BN * kTcBK / 2 / kTcThreads;

    const int t = threadIdx.x;
    const int lane = t % 32;
    const int warp = t / 32;
    const int wm = warp % kWarpsM;
    const int wn = warp / kWarpsM;
    const long long m0 = (long long)blockIdx.x * kTcBM;
    const int n0 = blockIdx.y * BN;
    if (m0 >= g.m) {
        return;
    }
    const int hw = g.h * g.w;
    const long long ohw = (long long)g.oh * g.ow;

    // --- A gather state: pixel m0 + t. ---
    long long a_base = 0;
    long long a_img = 0;    // UP2_IN: the image's first float
    int iy0 = INT_MIN / 2;  // pixels past M read zeros
    int ix0 = 0;
    {
        const long long m = m0 + t;
        if (m < g.m) {
            const long long img = m / ohw;
            const int r = (int)(m - img * ohw);
            const int oy = r / g.ow;
            const int ox = r - oy * g.ow;
            iy0 = oy * g.sh - g.ph;
            ix0 = ox * g.sw - g.pw;
            a_img = img * g.x_bstride;
            a_base = a_img + (long long)iy0 * g.w + ix0;
        }
    }
    // UP2_IN: (h, w) is the upsampled plane; the buffer holds (h/2, w/2).
    const int src_w = g.w >> 1;
    const int src_hw = (g.h >> 1) * src_w;
    int a_ci = 0, a_ky = 0, a_kx = 0, a_koff = 0;
    const int a_row_step = g.w - g.kw;
    const int a_chan_step = hw - g.kh * g.w;

    unsigned pa[kTcBK / 2];
    unsigned pb[kBPairs];

    auto gather_one = [&]() -> float {
        const bool ok = a_ci < g.c_in && (unsigned)(iy0 + a_ky) < (unsigned)g.h &&
                        (unsigned)(ix0 + a_kx) < (unsigned)g.w;
        const float v = ok ? conv_input_value<BN_RELU_IN, POOL2_IN, UP2_IN>(x, a_base + a_koff, a_img, a_ci,
                                                                          iy0 + a_ky, ix0 + a_kx, g.w, src_w,
                                                                          src_hw, in_scale, in_shift)
                           : 0.0f;
        ++a_kx;
        ++a_koff;
        if (a_kx == g.kw) {
            a_kx = 0;
            ++a_ky;
            a_koff += a_row_step;
            if (a_ky == g.kh) {
                a_ky = 0;
                ++a_ci;
                a_koff += a_chan_step;
            }
        }
        return v;
    };

    auto load_slab = [&](int k0) {
TC_UNROLL
        for (int e = 0; e < kTcBK / 2; ++e) {
            const float lo = gather_one();
            const float hi = gather_one();
            pa[e] = cm_pack_half2(cm_to_half<BF16>(lo), cm_to_half<BF16>(hi));
        }
TC_UNROLL
        for (int i = 0; i < kBPairs; ++i) {
            const int idx = i * kTcThreads + t;
            const int co = n0 + idx / (kTcBK / 2);
            const int k = k0 + 2 * (idx % (kTcBK / 2));
            float lo = 0.0f, hi = 0.0f;
            if (co < g.c_out) {
                const float* wr = wt + (long long)co * g.k;
                lo = k < g.k ? wr[k] : 0.0f;
                hi = k + 1 < g.k ? wr[k + 1] : 0.0f;
            }
            pb[i] = cm_pack_half2(cm_to_half<BF16>(lo), cm_to_half<BF16>(hi));
        }
    };
    auto store_slab = [&](int buf) {
TC_UNROLL
        for (int e = 0; e < kTcBK / 2; ++e) {
            As[buf][t][e] = pa[e];
        }
TC_UNROLL
        for (int i = 0; i < kBPairs; ++i) {
            const int idx = i * kTcThreads + t;
            Bs[buf][idx / (kTcBK / 2)][idx % (kTcBK / 2)] = pb[i];
        }
    };

    float acc[kMI][kNI][4];
TC_UNROLL
    for (int i = 0; i < kMI; ++i) {
TC_UNROLL
        for (int j = 0; j < kNI; ++j) {
TC_UNROLL
            for (int r = 0; r < 4; ++r) {
                acc[i][j][r] = 0.0f;
            }
        }
    }

    const int gq = lane / 4;  // g of the fragment layout
    const int qq = lane % 4;  // q of the fragment layout
    const int slabs = (g.k + kTcBK - 1) / kTcBK;
    if (slabs > 0) {
        load_slab(0);
        store_slab(0);
    }
    __syncthreads();
    for (int s = 0; s < slabs; ++s) {
        const int cur = s & 1;
        if (s + 1 < slabs) {
            load_slab((s + 1) * kTcBK);
        }
TC_UNROLL
        for (int kk = 0; kk < kTcBK / 16; ++kk) {
            const int kw0 = kk * 8 + qq;  // word of halves (2q, 2q+1) of this k16 step
            unsigned af[kMI][4];
            unsigned bf[kNI][2];
TC_UNROLL
            for (int i = 0; i < kMI; ++i) {
                const int row = wm * kWM + i * 16 + gq;
                af[i][0] = As[cur][row][kw0];
                af[i][1] = As[cur][row + 8][kw0];
                af[i][2] = As[cur][row][kw0 + 4];
                af[i][3] = As[cur][row + 8][kw0 + 4];
            }
TC_UNROLL
            for (int j = 0; j < kNI; ++j) {
                const int col = wn * 32 + j * 8 + gq;
                bf[j][0] = Bs[cur][col][kw0];
                bf[j][1] = Bs[cur][col][kw0 + 4];
            }
TC_UNROLL
            for (int i = 0; i < kMI; ++i) {
TC_UNROLL
                for (int j = 0; j < kNI; ++j) {
                    cm_mma_16816<BF16>(acc[i][j], af[i], bf[j]);
                }
            }
        }
        if (s + 1 < slabs) {
            store_slab(cur ^ 1);
        }
        __syncthreads();
    }

    // --- Epilogue: bias, ReLU, store. Thread holds rows gq, gq + 8 of each
    // m16 tile and channels 2·qq, 2·qq + 1 of each n8 tile. ---
    float bv[kNI][2];
TC_UNROLL
    for (int j = 0; j < kNI; ++j) {
TC_UNROLL
        for (int c = 0; c < 2; ++c) {
            const int co = n0 + wn * 32 + j * 8 + 2 * qq + c;
            bv[j][c] = (bias != nullptr && co < g.c_out) ? bias[co] : 0.0f;
        }
    }
TC_UNROLL
    for (int i = 0; i < kMI; ++i) {
TC_UNROLL
        for (int h2 = 0; h2 < 2; ++h2) {
            const long long m = m0 + wm * kWM + i * 16 + gq + 8 * h2;
            if (m >= g.m) {
                continue;
            }
            const long long img = m / ohw;
            const long long p = m - img * ohw;
            float* yp = y + img * g.y_bstride + p;
TC_UNROLL
            for (int j = 0; j < kNI; ++j) {
TC_UNROLL
                for (int c = 0; c < 2; ++c) {
                    const int co = n0 + wn * 32 + j * 8 + 2 * qq + c;
                    if (co < g.c_out) {
                        float v = acc[i][j][2 * h2 + c] + bv[j][c];
                        if (RELU_OUT) {
                            v = v < 0.0f ? 0.0f : v;
                        }
                        if (LEAKY_OUT) {
                            v = v < 0.0f ? v * out_slope : v;
                        }
                        yp[co * ohw] = v;
                    }
                }
            }
        }
    }
}

}  // namespace

#define CONV_TC_KERNEL(NAME, BN, BF16, BN_RELU_IN, RELU_OUT, POOL2_IN, UP2_IN, LEAKY_OUT)                       \
    extern "C" __global__ void __launch_bounds__(kTcThreads, BN == 32 ? 3 : 1)                                                  \
        NAME(const float* __restrict__ x, const float* __restrict__ wt, const float* __restrict__ bias,         \
             float* __restrict__ y, const float* __restrict__ in_scale, const float* __restrict__ in_shift,     \
             int n, int c_in, int h, int w, int c_out, int kh, int kw, int sh, int sw, int ph, int pw,          \
             int oh, int ow, long long x_bstride, long long y_bstride, int y_coff, float out_slope) {           \
        __shared__ unsigned As[2][kTcBM][kTcRowWords];                                                          \
        __shared__ unsigned Bs[2][BN][kTcRowWords];                                                             \
        TcGeom g;                                                                                               \
        g.c_in = c_in;                                                                                          \
        g.h = h;                                                                                                \
        g.w = w;                                                                                                \
        g.c_out = c_out;                                                                                        \
        g.kh = kh;                                                                                              \
        g.kw = kw;                                                                                              \
        g.sh = sh;                                                                                              \
        g.sw = sw;                                                                                              \
        g.ph = ph;                                                                                              \
        g.pw = pw;                                                                                              \
        g.oh = oh;                                                                                              \
        g.ow = ow;                                                                                              \
        g.m = (long long)n * oh * ow;                                                                           \
        g.k = c_in * kh * kw;                                                                                   \
        g.x_bstride = x_bstride;                                                                                \
        g.y_bstride = y_bstride;                                                                                \
        conv_tc_tile<BN, BF16, BN_RELU_IN, RELU_OUT, POOL2_IN, UP2_IN, LEAKY_OUT>(                              \
            g, x, wt, bias, y + (long long)y_coff * oh * ow, in_scale, in_shift, As, Bs, out_slope);            \
    }

CONV_TC_KERNEL(conv2d_tc64_bf16_strided, 64, true, false, false, false, false, false)
CM_EXPORT(conv2d_tc64_bf16_strided)
CONV_TC_KERNEL(conv2d_tc64_bf16_strided_relu, 64, true, false, true, false, false, false)
CM_EXPORT(conv2d_tc64_bf16_strided_relu)
CONV_TC_KERNEL(conv2d_tc64_bf16_bnrelu, 64, true, true, false, false, false, false)
CM_EXPORT(conv2d_tc64_bf16_bnrelu)
CONV_TC_KERNEL(conv2d_tc64_bf16_bnrelu_relu, 64, true, true, true, false, false, false)
CM_EXPORT(conv2d_tc64_bf16_bnrelu_relu)
CONV_TC_KERNEL(conv2d_tc64_bf16_bnrelu_pool2, 64, true, true, false, true, false, false)
CM_EXPORT(conv2d_tc64_bf16_bnrelu_pool2)
CONV_TC_KERNEL(conv2d_tc64_f16_strided, 64, false, false, false, false, false, false)
CM_EXPORT(conv2d_tc64_f16_strided)
CONV_TC_KERNEL(conv2d_tc64_f16_strided_relu, 64, false, false, true, false, false, false)
CM_EXPORT(conv2d_tc64_f16_strided_relu)
CONV_TC_KERNEL(conv2d_tc64_f16_bnrelu, 64, false, true, false, false, false, false)
CM_EXPORT(conv2d_tc64_f16_bnrelu)
CONV_TC_KERNEL(conv2d_tc64_f16_bnrelu_relu, 64, false, true, true, false, false, false)
CM_EXPORT(conv2d_tc64_f16_bnrelu_relu)
CONV_TC_KERNEL(conv2d_tc64_f16_bnrelu_pool2, 64, false, true, false, true, false, false)
CM_EXPORT(conv2d_tc64_f16_bnrelu_pool2)
CONV_TC_KERNEL(conv2d_tc32_bf16_strided, 32, true, false, false, false, false, false)
CM_EXPORT(conv2d_tc32_bf16_strided)
CONV_TC_KERNEL(conv2d_tc32_bf16_strided_relu, 32, true, false, true, false, false, false)
CM_EXPORT(conv2d_tc32_bf16_strided_relu)
CONV_TC_KERNEL(conv2d_tc32_bf16_bnrelu, 32, true, true, false, false, false, false)
CM_EXPORT(conv2d_tc32_bf16_bnrelu)
CONV_TC_KERNEL(conv2d_tc32_bf16_bnrelu_relu, 32, true, true, true, false, false, false)
CM_EXPORT(conv2d_tc32_bf16_bnrelu_relu)
CONV_TC_KERNEL(conv2d_tc32_bf16_bnrelu_pool2, 32, true, true, false, true, false, false)
CM_EXPORT(conv2d_tc32_bf16_bnrelu_pool2)
CONV_TC_KERNEL(conv2d_tc32_f16_strided, 32, false, false, false, false, false, false)
CM_EXPORT(conv2d_tc32_f16_strided)
CONV_TC_KERNEL(conv2d_tc32_f16_strided_relu, 32, false, false, true, false, false, false)
CM_EXPORT(conv2d_tc32_f16_strided_relu)
CONV_TC_KERNEL(conv2d_tc32_f16_bnrelu, 32, false, true, false, false, false, false)
CM_EXPORT(conv2d_tc32_f16_bnrelu)
CONV_TC_KERNEL(conv2d_tc32_f16_bnrelu_relu, 32, false, true, true, false, false, false)
CM_EXPORT(conv2d_tc32_f16_bnrelu_relu)
CONV_TC_KERNEL(conv2d_tc32_f16_bnrelu_pool2, 32, false, true, false, true, false, false)
CM_EXPORT(conv2d_tc32_f16_bnrelu_pool2)
CONV_TC_KERNEL(conv2d_tc64_bf16_strided_leaky, 64, true, false, false, false, false, true)
CM_EXPORT(conv2d_tc64_bf16_strided_leaky)
CONV_TC_KERNEL(conv2d_tc64_bf16_up2, 64, true, false, false, false, true, false)
CM_EXPORT(conv2d_tc64_bf16_up2)
CONV_TC_KERNEL(conv2d_tc64_bf16_up2_leaky, 64, true, false, false, false, true, true)
CM_EXPORT(conv2d_tc64_bf16_up2_leaky)
CONV_TC_KERNEL(conv2d_tc64_f16_strided_leaky, 64, false, false, false, false, false, true)
CM_EXPORT(conv2d_tc64_f16_strided_leaky)
CONV_TC_KERNEL(conv2d_tc64_f16_up2, 64, false, false, false, false, true, false)
CM_EXPORT(conv2d_tc64_f16_up2)
CONV_TC_KERNEL(conv2d_tc64_f16_up2_leaky, 64, false, false, false, false, true, true)
CM_EXPORT(conv2d_tc64_f16_up2_leaky)
CONV_TC_KERNEL(conv2d_tc32_bf16_strided_leaky, 32, true, false, false, false, false, true)
CM_EXPORT(conv2d_tc32_bf16_strided_leaky)
CONV_TC_KERNEL(conv2d_tc32_bf16_up2, 32, true, false, false, false, true, false)
CM_EXPORT(conv2d_tc32_bf16_up2)
CONV_TC_KERNEL(conv2d_tc32_bf16_up2_leaky, 32, true, false, false, false, true, true)
CM_EXPORT(conv2d_tc32_bf16_up2_leaky)
CONV_TC_KERNEL(conv2d_tc32_f16_strided_leaky, 32, false, false, false, false, false, true)
CM_EXPORT(conv2d_tc32_f16_strided_leaky)
CONV_TC_KERNEL(conv2d_tc32_f16_up2, 32, false, false, false, false, true, false)
CM_EXPORT(conv2d_tc32_f16_up2)
CONV_TC_KERNEL(conv2d_tc32_f16_up2_leaky, 32, false, false, false, false, true, true)
CM_EXPORT(conv2d_tc32_f16_up2_leaky)
