// Vector quantization (VQ-VAE-2's Quantize) and code-frequency histograms.
//
// Layouts and shapes (dense, row-major):
//   x       [n, d, hw]   NCHW features with H·W folded; the vector of position
//                        p = s·hw + pix is x[s, :, pix] (channels = embedding
//                        dim, as PyTorch's quantize sees it after permuting to
//                        channels-last).
//   embed   [d, K]       codebook, column k is code e_k (vq-vae-2-pytorch's
//                        transposed layout).
//   norms   [K]          ||e_k||², from vq_code_norms_f32.
//   ids     [n, hw]      int32 code per position.
//   quant   [n, d, hw]   e_{ids} per position (NCHW again); may be null.
//   err     [n, hw]      ||x − e_{ids}||² per position, summed directly (not
//                        through the expanded formula); may be null.
//   hist    [segments, K] int32 counts, ADDED to (the caller zeroes it or
//                        accumulates over batches). Row r (sample s of x, or
//                        row r of ids) counts into segment row_segment[r], or
//                        into segment r when row_segment is null.
//
// Distance: dist_k = (||x||² − 2·x·e_k) + ||e_k||², argmin with ties to the
// lowest k (strict < while k increases); a NaN distance never wins, so a NaN
// vector gets code 0. Every dot product and squared norm is a chain of fmaf
// over c = 0..d−1 starting from 0, exactly as the CPU reference (src/cpu/vq.rs)
// computes it with f32::mul_add, so distances, ids and err are bitwise equal
// to the reference on every device.
//
// Kernels:
//   vq_code_norms_f32   one thread per code.
//   vq_lookup_f32       one thread per position, 128 positions per block
//                       (grid.x = ⌈n·hw/128⌉). The positions × codes distance
//                       matrix never exists: the codebook streams through
//                       shared memory in tiles of 32 codes × dc channels
//                       (dc ≤ d chosen by the host, so any K and d fit in
//                       (32·dc + 32)·4 bytes), each thread keeping 32 dot
//                       products in registers and a running (best, best_k).
//                       Tile entries are read as float4 broadcasts; x is read
//                       straight from global memory (neighbouring threads read
//                       neighbouring pixels, so every read is coalesced).
//   vq_lookup_hist_f32  the same plus the histogram of the chosen codes:
//                       bins privatized in shared memory for the (at most)
//                       two rows a block of 128 positions usually touches
//                       (2·K ints after the tile), flushed with one atomicAdd
//                       per nonzero bin; positions of any further row (only
//                       when hw < 128) add straight to global memory.
//   code_histogram_i32  ids [rows, row_len]: each row split into
//                       chunks_per_row chunks, one block (256 threads) per
//                       (row, chunk), grid-stride over them; K bins in shared
//                       memory, one atomicAdd per nonzero bin to global.
//                       Codes outside [0, K) are not counted but tallied in
//                       *invalid so the host can report them.
// Flat offsets are 64-bit throughout.

#include "common.cuh"

namespace {

// Positions per block of the lookup, one per thread.
constexpr int kVqThreads = 128;
// Codes per shared-memory tile; each thread holds this many dot products.
constexpr int kVqTile = 32;

// The nearest code of every position of the block's 128, then its outputs.
template <bool kHist>
__device__ __forceinline__ void vq_lookup_body(const float* __restrict__ x, const float* __restrict__ embed,
                                               const float* __restrict__ norms, long long n, int d, long long hw,
                                               int n_embed, int dc, int* __restrict__ ids,
                                               float* __restrict__ quant, float* __restrict__ err,
                                               int* __restrict__ hist, const int* __restrict__ row_segment) {
    CM_DYNAMIC_SHARED(float, smem);
    float* const es = smem;                 // [dc][kVqTile]: channel-major code tile
    float* const ee = smem + dc * kVqTile;  // [kVqTile]: ||e_k||² of the tile's codes

    const long long positions = n * hw;
    const long long p = (long long)blockIdx.x * kVqThreads + threadIdx.x;
    const bool active = p < positions;
    const long long s = active ? p / hw : 0;
    const long long pix = active ? p - s * hw : 0;
    const float* const xp = x + s * d * hw + pix;  // channel c at xp[c·hw]

    float xx = 0.0f;
    float best = INFINITY;
    int best_k = 0;
    for (int k0 = 0; k0 < n_embed; k0 += kVqTile) {
        float acc[kVqTile];
        for (int j = 0; j < kVqTile; ++j) {
            acc[j] = 0.0f;
        }
        for (int c0 = 0; c0 < d; c0 += dc) {
            const int cn = min(dc, d - c0);
            __syncthreads();  // every thread is done with the previous tile
            for (int i = threadIdx.x; i < cn * kVqTile; i += kVqThreads) {
                const int k = k0 + i % kVqTile;
                es[i] = k < n_embed ? embed[(long long)(c0 + i / kVqTile) * n_embed + k] : 0.0f;
            }
            if (c0 == 0 && threadIdx.x < kVqTile) {
                const int k = k0 + threadIdx.x;
                ee[threadIdx.x] = k < n_embed ? norms[k] : 0.0f;
            }
            __syncthreads();
            if (active) {
                for (int c = 0; c < cn; ++c) {
                    const float xv = xp[(long long)(c0 + c) * hw];
                    if (k0 == 0) {
                        xx = fmaf(xv, xv, xx);
                    }
                    const float4* const e4 = reinterpret_cast<const float4*>(es + c * kVqTile);
                    for (int q = 0; q < kVqTile / 4; ++q) {
                        const float4 e = e4[q];
                        acc[4 * q + 0] = fmaf(xv, e.x, acc[4 * q + 0]);
                        acc[4 * q + 1] = fmaf(xv, e.y, acc[4 * q + 1]);
                        acc[4 * q + 2] = fmaf(xv, e.z, acc[4 * q + 2]);
                        acc[4 * q + 3] = fmaf(xv, e.w, acc[4 * q + 3]);
                    }
                }
            }
        }
        if (active) {
            const int kn = min(kVqTile, n_embed - k0);
            for (int j = 0; j < kVqTile; ++j) {
                // 2·acc is exact, so a contracted fma here rounds the same.
                const float dist = (xx - 2.0f * acc[j]) + ee[j];
                if (j < kn && dist < best) {
                    best = dist;
                    best_k = k0 + j;
                }
            }
        }
    }

    if (active) {
        ids[p] = best_k;
        float e2 = 0.0f;
        for (int c = 0; c < d; ++c) {
            const float q = embed[(long long)c * n_embed + best_k];
            if (quant != nullptr) {
                quant[(s * d + c) * hw + pix] = q;
            }
            const float t = xp[(long long)c * hw] - q;
            e2 = fmaf(t, t, e2);
        }
        if (err != nullptr) {
            err[p] = e2;
        }
    }

    if constexpr (kHist) {
        int* const bins = reinterpret_cast<int*>(ee + kVqTile);  // [2][n_embed]
        for (int i = threadIdx.x; i < 2 * n_embed; i += kVqThreads) {
            bins[i] = 0;
        }
        __syncthreads();
        const long long row0 = (long long)blockIdx.x * kVqThreads / hw;
        if (active) {
            const long long slot = s - row0;
            if (slot < 2) {
                atomicAdd(&bins[slot * n_embed + best_k], 1);
            } else {
                const long long seg = row_segment != nullptr ? row_segment[s] : s;
                atomicAdd(&hist[seg * n_embed + best_k], 1);
            }
        }
        __syncthreads();
        for (int i = threadIdx.x; i < 2 * n_embed; i += kVqThreads) {
            const long long row = row0 + i / n_embed;
            const int count = bins[i];
            if (row < n && count != 0) {
                const long long seg = row_segment != nullptr ? row_segment[row] : row;
                atomicAdd(&hist[seg * n_embed + i % n_embed], count);
            }
        }
    }
}

}  // namespace

extern "C" __global__ void vq_code_norms_f32(const float* __restrict__ embed, int d, int n_embed,
                                             float* __restrict__ norms) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k < n_embed) {
        float acc = 0.0f;
        for (int c = 0; c < d; ++c) {
            const float v = embed[(long long)c * n_embed + k];
            acc = fmaf(v, v, acc);
        }
        norms[k] = acc;
    }
}
CM_EXPORT(vq_code_norms_f32)

extern "C" __global__ void __launch_bounds__(kVqThreads)
    vq_lookup_f32(const float* __restrict__ x, const float* __restrict__ embed, const float* __restrict__ norms,
                  long long n, int d, long long hw, int n_embed, int dc, int* __restrict__ ids,
                  float* __restrict__ quant, float* __restrict__ err) {
    vq_lookup_body<false>(x, embed, norms, n, d, hw, n_embed, dc, ids, quant, err, nullptr, nullptr);
}
CM_EXPORT(vq_lookup_f32)

extern "C" __global__ void __launch_bounds__(kVqThreads)
    vq_lookup_hist_f32(const float* __restrict__ x, const float* __restrict__ embed, const float* __restrict__ norms,
                       long long n, int d, long long hw, int n_embed, int dc, int* __restrict__ ids,
                       float* __restrict__ quant, float* __restrict__ err, int* __restrict__ hist,
                       const int* __restrict__ row_segment) {
    vq_lookup_body<true>(x, embed, norms, n, d, hw, n_embed, dc, ids, quant, err, hist, row_segment);
}
CM_EXPORT(vq_lookup_hist_f32)

extern "C" __global__ void code_histogram_i32(const int* __restrict__ ids, long long rows, long long row_len,
                                              int n_embed, const int* __restrict__ row_segment,
                                              long long chunks_per_row, int* __restrict__ hist,
                                              int* __restrict__ invalid) {
    CM_DYNAMIC_SHARED(int, bins);  // [n_embed]
    const long long work = rows * chunks_per_row;
    const long long chunk = (row_len + chunks_per_row - 1) / chunks_per_row;
    for (long long b = blockIdx.x; b < work; b += gridDim.x) {
        for (int i = threadIdx.x; i < n_embed; i += blockDim.x) {
            bins[i] = 0;
        }
        __syncthreads();
        const long long row = b / chunks_per_row;
        const long long begin = (b - row * chunks_per_row) * chunk;
        const long long end = min(row_len, begin + chunk);
        const int* const r = ids + row * row_len;
        int bad = 0;
        for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
            const int k = r[i];
            if (k >= 0 && k < n_embed) {
                atomicAdd(&bins[k], 1);
            } else {
                ++bad;
            }
        }
        if (bad != 0) {
            atomicAdd(invalid, bad);
        }
        __syncthreads();
        const long long seg = row_segment != nullptr ? row_segment[row] : row;
        for (int i = threadIdx.x; i < n_embed; i += blockDim.x) {
            const int count = bins[i];
            if (count != 0) {
                atomicAdd(&hist[seg * n_embed + i], count);
            }
        }
        __syncthreads();  // bins are zeroed again for the next (row, chunk)
    }
}
CM_EXPORT(code_histogram_i32)
