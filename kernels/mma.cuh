// Tensor-core building blocks shared by the reduced-precision kernels:
//   cm_to_half<BF16>(float)      f32 → bf16 (BF16) or f16 bits, round to nearest even
//   cm_mma_16816<BF16>(d, a, b)  d += A·B for one warp: mma.sync m16n8k16,
//                                bf16/f16 inputs, f32 accumulation
//
// On the GPU these are single PTX instructions (cvt.rn.{bf16,f16}.f32 and
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32; sm_80+).
// Under CELLMORPH_EMULATION they are software: the conversions bit-exact, the
// MMA exact products summed in f32 in k order (a tensor core sums the same
// exact products in its own order, so results agree to f32 rounding).
//
// Fragment layout of mma.m16n8k16 (PTX ISA, "Matrix Fragments for
// mma.m16n8k16 with floating point type"), lane = 4·g + q (g = lane / 4,
// q = lane % 4); each 32-bit register holds two halves, the lower-indexed
// element in the low 16 bits:
//   A (16 × 16, row-major)  a[0] = A[g][2q, 2q+1]      a[1] = A[g+8][2q, 2q+1]
//                           a[2] = A[g][2q+8, 2q+9]    a[3] = A[g+8][2q+8, 2q+9]
//   B (16 × 8, k-major)     b[0] = B[2q, 2q+1][g]      b[1] = B[2q+8, 2q+9][g]
//   C, D (16 × 8, f32)      d[0], d[1] = D[g][2q, 2q+1]    d[2], d[3] = D[g+8][2q, 2q+1]
// Every lane of the warp must take part (all 32, converged).
#pragma once

#include "common.cuh"

#ifdef CELLMORPH_EMULATION

namespace cm_emu_mma {

inline unsigned f32_bits(float x) {
    unsigned u;
    std::memcpy(&u, &x, 4);
    return u;
}

inline float bits_f32(unsigned u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

// f32 → bf16, round to nearest even; NaN stays a (quiet) NaN.
inline unsigned short to_bf16(float x) {
    const unsigned u = f32_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((u >> 16) | 0x0040u);
    }
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// f32 → IEEE half, round to nearest even, overflow to ±∞, subnormals kept.
inline unsigned short to_f16(float x) {
    const unsigned u = f32_bits(x);
    const unsigned sign = (u >> 16) & 0x8000u;
    const unsigned a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) {  // ∞ or NaN
        return (unsigned short)(sign | 0x7c00u | (a > 0x7f800000u ? 0x0200u | ((a >> 13) & 0x3ffu) : 0u));
    }
    if (a >= 0x477ff000u) {  // ≥ 65520: rounds past the largest half
        return (unsigned short)(sign | 0x7c00u);
    }
    if (a >= 0x38800000u) {  // normal half: rebias the exponent 127 → 15, round 23 → 10 bits
        const unsigned r = a - 0x38000000u;
        return (unsigned short)(sign | ((r + 0x0fffu + ((r >> 13) & 1u)) >> 13));
    }
    if (a < 0x33000000u) {  // below 2^-25 (2^-25 itself ties to the even 0 below)
        return (unsigned short)sign;
    }
    // Subnormal half: units of 2^-24; the f32 value is m·2^(e − 150).
    const unsigned e = a >> 23;
    const unsigned m = (a & 0x7fffffu) | 0x800000u;
    const unsigned shift = 126u - e;  // 14 … 24
    unsigned q = m >> shift;
    const unsigned rem = m & ((1u << shift) - 1u);
    const unsigned half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) {
        ++q;
    }
    return (unsigned short)(sign | q);
}

inline float from_bf16(unsigned h) { return bits_f32((h & 0xffffu) << 16); }

inline float from_f16(unsigned h) {
    const unsigned sign = (h & 0x8000u) << 16;
    const unsigned e = (h >> 10) & 0x1fu;
    const unsigned m = h & 0x3ffu;
    if (e == 0) {
        const float v = std::ldexp((float)m, -24);
        return sign ? -v : v;
    }
    if (e == 31) {
        return bits_f32(sign | 0x7f800000u | (m << 13));
    }
    return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

template <bool BF16>
inline float widen(unsigned packed, int hi) {
    const unsigned h = hi ? packed >> 16 : packed & 0xffffu;
    return BF16 ? from_bf16(h) : from_f16(h);
}

// The fragments of every lane of the block, by flat thread index: a warp's
// lanes publish theirs, meet at __syncwarp, read each other's, and meet again
// before anyone may publish the next ones. Static shared data of the
// emulation is per OS thread, and a block runs on one OS thread.
struct Slot {
    unsigned a[4];
    unsigned b[2];
};

template <bool BF16>
inline void mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    static thread_local Slot slots[1024];
    const unsigned flat = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned lane = flat % 32u;
    Slot* warp = slots + (flat - lane);
    for (int i = 0; i < 4; ++i) warp[lane].a[i] = a[i];
    warp[lane].b[0] = b[0];
    warp[lane].b[1] = b[1];
    __syncwarp();
    const int g = (int)lane / 4;
    const int q = (int)lane % 4;
    for (int r = 0; r < 4; ++r) {
        const int row = g + (r >= 2 ? 8 : 0);
        const int col = 2 * q + (r & 1);
        float acc = d[r];
        for (int k = 0; k < 16; ++k) {
            // A[row][k]: lane 4·(row % 8) + (k % 8) / 2, register (row ≥ 8) + 2·(k ≥ 8), half k % 2.
            const Slot& sa = warp[4 * (row % 8) + (k % 8) / 2];
            const float av = widen<BF16>(sa.a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k & 1);
            // B[k][col]: lane 4·col + (k % 8) / 2, register k ≥ 8, half k % 2.
            const Slot& sb = warp[4 * col + (k % 8) / 2];
            const float bv = widen<BF16>(sb.b[k >= 8 ? 1 : 0], k & 1);
            acc = std::fmaf(av, bv, acc);
        }
        d[r] = acc;
    }
    __syncwarp();
}

}  // namespace cm_emu_mma

template <bool BF16>
__device__ __forceinline__ unsigned short cm_to_half(float x) {
    return BF16 ? cm_emu_mma::to_bf16(x) : cm_emu_mma::to_f16(x);
}

template <bool BF16>
__device__ __forceinline__ void cm_mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    cm_emu_mma::mma_16816<BF16>(d, a, b);
}

#else  // nvcc

template <bool BF16>
__device__ __forceinline__ unsigned short cm_to_half(float x) {
    unsigned short r;
    if (BF16) {
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    } else {
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    }
    return r;
}

template <bool BF16>
__device__ __forceinline__ void cm_mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    if (BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
            "{%8, %9}, {%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
            "{%8, %9}, {%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}

#endif

// Two halves in one 32-bit register, `lo` in the low 16 bits.
__device__ __forceinline__ unsigned cm_pack_half2(unsigned short lo, unsigned short hi) {
    return (unsigned)lo | ((unsigned)hi << 16);
}
