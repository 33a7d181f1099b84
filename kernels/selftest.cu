// Self-test kernels for the CUDA-on-CPU emulation (emulation/cuda_emu.h).
// Each exercises one feature; they compile with nvcc and with the emulation,
// and tests/emulation/driver.cpp checks their results on the emulation.
// "Linear thread id" below is x + y*bx + z*bx*by, CUDA's warp order.
//
// Kernels (launch geometry):
//   selftest_saxpy_f32          1-D, any block size, grid >= n / block
//   selftest_block_sum_f32      1-D, block size a power of two <= 1024
//   selftest_warp_reduce_f32    any block shape, threads per block a multiple of 32
//   selftest_warp_scan_i32      any block shape, threads per block a multiple of 32
//   selftest_ballot_i32         any block shape, threads per block a multiple of 32
//   selftest_histogram          1-D, any geometry
//   selftest_atomic_ops         1-D, any geometry
//   selftest_reverse_dyn_f32    1-D, shared_bytes = blockDim.x * sizeof(float)
//   selftest_index_3d           3-D grid and block, grid dims < 1024
//   selftest_block_vote         1-D, any block size
//   selftest_intrinsics         1-D, any geometry
//   selftest_divergent_barrier  emulation only: NEVER launch it on a GPU
#include "common.cuh"

// Linear thread id within the block and global linear thread id, for kernels
// that accept any block shape.
static __device__ __forceinline__ unsigned selftest_tid() {
  return threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
}

static __device__ __forceinline__ unsigned long long selftest_gid() {
  const unsigned long long threads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned long long block =
      blockIdx.x + blockIdx.y * gridDim.x + blockIdx.z * (unsigned long long)gridDim.x * gridDim.y;
  return block * threads + selftest_tid();
}

// y[i] = a * x[i] + y[i] for i < n. The trivial kernel used for timing.
extern "C" __global__ void selftest_saxpy_f32(int n, float a, const float* __restrict__ x,
                                              float* __restrict__ y) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}
CM_EXPORT(selftest_saxpy_f32)

// out[b] = sum of x[b*blockDim.x .. (b+1)*blockDim.x) (zero past n), by a tree
// reduction in static shared memory with __syncthreads between levels.
extern "C" __global__ void selftest_block_sum_f32(const float* __restrict__ x,
                                                  float* __restrict__ out, int n) {
  __shared__ float partial[1024];
  const unsigned t = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + t;
  partial[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) partial[t] += partial[t + s];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = partial[0];
}
CM_EXPORT(selftest_block_sum_f32)

// Per warp of 32 consecutive global thread ids g (x[g] = 0 past n):
//   warp_sums[g / 32] = sum via a __shfl_down_sync tree (lane 0 writes),
//   all_sums[g]       = the same sum in double via a __shfl_xor_sync
//                       butterfly, which leaves it in every lane (g < n).
extern "C" __global__ void selftest_warp_reduce_f32(const float* __restrict__ x,
                                                    float* __restrict__ warp_sums,
                                                    double* __restrict__ all_sums, int n) {
  const unsigned long long g = selftest_gid();
  const float v = g < (unsigned long long)n ? x[g] : 0.0f;
  float down = v;
  for (int offset = 16; offset > 0; offset >>= 1) down += __shfl_down_sync(0xffffffffu, down, offset);
  double both = v;
  for (int mask = 16; mask > 0; mask >>= 1) both += __shfl_xor_sync(0xffffffffu, both, mask);
  if (selftest_tid() % 32 == 0) warp_sums[g / 32] = down;
  if (g < (unsigned long long)n) all_sums[g] = both;
}
CM_EXPORT(selftest_warp_reduce_f32)

// Per global thread g < n, within its warp (lane = linear tid % 32):
//   out[4g+0] = inclusive prefix sum of x over lanes 0..lane (__shfl_up_sync),
//   out[4g+1] = x of lane (lane & ~7)           (__shfl_sync, width 8),
//   out[4g+2] = x of lane+3 if in the same 8-lane segment, else own x
//                                               (__shfl_down_sync, width 8),
//   out[4g+3] = x of lane (lane+1) % 32 read back from shared memory after
//               __syncwarp.
extern "C" __global__ void selftest_warp_scan_i32(const int* __restrict__ x, int* __restrict__ out,
                                                  int n) {
  __shared__ int slots[1024];
  const unsigned long long g = selftest_gid();
  const unsigned tid = selftest_tid();
  const unsigned lane = tid % 32;
  const int v = g < (unsigned long long)n ? x[g] : 0;
  int scan = v;
  for (unsigned d = 1; d < 32; d <<= 1) {
    const int up = __shfl_up_sync(0xffffffffu, scan, d);
    if (lane >= d) scan += up;
  }
  const int seg_first = __shfl_sync(0xffffffffu, v, 0, 8);
  const int seg_down = __shfl_down_sync(0xffffffffu, v, 3, 8);
  slots[tid] = v;
  __syncwarp();
  const int rotated = slots[(tid & ~31u) | ((lane + 1) % 32)];
  if (g < (unsigned long long)n) {
    out[4 * g + 0] = scan;
    out[4 * g + 1] = seg_first;
    out[4 * g + 2] = seg_down;
    out[4 * g + 3] = rotated;
  }
}
CM_EXPORT(selftest_warp_scan_i32)

// Per warp w of global thread ids (flag = g < n && flags[g] != 0), lane 0 writes:
//   ballots[w]   = __ballot_sync of the flags,
//   counts[w]    = __popc of that ballot,
//   votes[3w+0]  = (__any_sync ? 1 : 0) | (__all_sync ? 2 : 0),
//   votes[3w+1]  = __activemask() in converged code (every lane),
//   votes[3w+2]  = __activemask() inside `if (lane % 3 == 0)`, passed to lane
//                  0 by __shfl_sync (0x49249249 on the emulation; the GPU
//                  reports the lanes it happens to run together).
extern "C" __global__ void selftest_ballot_i32(const int* __restrict__ flags,
                                               unsigned* __restrict__ ballots,
                                               int* __restrict__ counts,
                                               unsigned* __restrict__ votes, int n) {
  const unsigned long long g = selftest_gid();
  const unsigned lane = selftest_tid() % 32;
  const int flag = g < (unsigned long long)n && flags[g] != 0;
  const unsigned converged = __activemask();
  unsigned branch = 0;
  if (lane % 3 == 0) branch = __activemask();
  branch = __shfl_sync(0xffffffffu, branch, 0);
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const int any = __any_sync(0xffffffffu, flag);
  const int all = __all_sync(0xffffffffu, flag);
  if (lane == 0) {
    const unsigned long long w = g / 32;
    ballots[w] = ballot;
    counts[w] = __popc(ballot);
    votes[3 * w + 0] = (any ? 1u : 0u) | (all ? 2u : 0u);
    votes[3 * w + 1] = converged;
    votes[3 * w + 2] = branch;
  }
}
CM_EXPORT(selftest_ballot_i32)

// count[bin[i]] += 1 and weight_sum[bin[i]] += weight[i] with int and float
// atomicAdd; bins outside [0, nbins) are skipped.
extern "C" __global__ void selftest_histogram(const int* __restrict__ bin,
                                              const float* __restrict__ weight,
                                              int* __restrict__ count,
                                              float* __restrict__ weight_sum, int n, int nbins) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int b = bin[i];
  if (b < 0 || b >= nbins) return;
  atomicAdd(&count[b], 1);
  atomicAdd(&weight_sum[b], weight[i]);
}
CM_EXPORT(selftest_histogram)

// For each i < n with value v = values[i]:
//   ints[0] max v, ints[1] min v (atomicMax/Min int), ints[2] += 1 by an
//   atomicCAS loop, ints[3] -= 1 (atomicSub), ints[4] = some i (atomicExch);
//   uints[0] max (unsigned)v, uints[1] min (unsigned)v, uints[2] |= 1 << i%32,
//   uints[3] &= ~(1 << i%32), uints[4] atomicInc with limit 9;
//   sum64[0] += v*v as unsigned long long.
extern "C" __global__ void selftest_atomic_ops(const int* __restrict__ values, int* ints,
                                               unsigned* uints, unsigned long long* sum64, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int v = values[i];
  atomicMax(&ints[0], v);
  atomicMin(&ints[1], v);
  int seen = ints[2];
  for (;;) {
    const int prev = atomicCAS(&ints[2], seen, seen + 1);
    if (prev == seen) break;
    seen = prev;
  }
  atomicSub(&ints[3], 1);
  atomicExch(&ints[4], i);
  atomicMax(&uints[0], (unsigned)v);
  atomicMin(&uints[1], (unsigned)v);
  atomicOr(&uints[2], 1u << (i % 32));
  atomicAnd(&uints[3], ~(1u << (i % 32)));
  atomicInc(&uints[4], 9u);
  atomicAdd(&sum64[0], (unsigned long long)((long long)v * v));
}
CM_EXPORT(selftest_atomic_ops)

// Reverses each block's slice of x (the last slice may be short) through
// dynamic shared memory: y[start + t] = x[start + count - 1 - t].
extern "C" __global__ void selftest_reverse_dyn_f32(const float* __restrict__ x,
                                                    float* __restrict__ y, int n) {
  CM_DYNAMIC_SHARED(float, tile);
  const int start = blockIdx.x * blockDim.x;
  const int count = min((int)blockDim.x, n - start);
  const int t = threadIdx.x;
  if (t < count) tile[t] = x[start + t];
  __syncthreads();
  if (t < count) y[start + t] = tile[count - 1 - t];
}
CM_EXPORT(selftest_reverse_dyn_f32)

// For global linear thread id g: out[4g+0..3] = threadIdx, blockIdx,
// blockDim, gridDim, each packed as x | y << 10 | z << 20.
extern "C" __global__ void selftest_index_3d(unsigned* __restrict__ out) {
  const unsigned long long g = selftest_gid();
  out[4 * g + 0] = threadIdx.x | threadIdx.y << 10 | threadIdx.z << 20;
  out[4 * g + 1] = blockIdx.x | blockIdx.y << 10 | blockIdx.z << 20;
  out[4 * g + 2] = blockDim.x | blockDim.y << 10 | blockDim.z << 20;
  out[4 * g + 3] = gridDim.x | gridDim.y << 10 | gridDim.z << 20;
}
CM_EXPORT(selftest_index_3d)

// Per block b, with pred = i < n && flags[i] != 0: out[3b+0..2] =
// __syncthreads_count, __syncthreads_and, __syncthreads_or of pred.
extern "C" __global__ void selftest_block_vote(const int* __restrict__ flags,
                                               int* __restrict__ out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int pred = i < n && flags[i] != 0;
  const int count = __syncthreads_count(pred);
  const int all = __syncthreads_and(pred);
  const int any = __syncthreads_or(pred);
  if (threadIdx.x == 0) {
    out[3 * blockIdx.x + 0] = count;
    out[3 * blockIdx.x + 1] = all;
    out[3 * blockIdx.x + 2] = any;
  }
}
CM_EXPORT(selftest_block_vote)

// Per i < n with v = x[i] (read through __ldg):
//   f[6i+0..5] = __fdividef(v, 3), __expf(v / 8), __logf(|v| + 1),
//                rsqrtf(|v| + 1), __saturatef(v / 4), max(v, 0.5f) + min(v, -0.5f)
//   k[6i+0..5] = __clz(i), __popc(i * 2654435761u), __ffs(i), min(i, 7),
//                max((unsigned)i, 5u), bits of __int_as_float(__float_as_int(v))
//                equal to those of v (1) or not (0).
extern "C" __global__ void selftest_intrinsics(const float* __restrict__ x, float* __restrict__ f,
                                               int* __restrict__ k, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float v = __ldg(&x[i]);
  f[6 * i + 0] = __fdividef(v, 3.0f);
  f[6 * i + 1] = __expf(v / 8.0f);
  f[6 * i + 2] = __logf(fabsf(v) + 1.0f);
  f[6 * i + 3] = rsqrtf(fabsf(v) + 1.0f);
  f[6 * i + 4] = __saturatef(v / 4.0f);
  f[6 * i + 5] = max(v, 0.5f) + min(v, -0.5f);
  k[6 * i + 0] = __clz(i);
  k[6 * i + 1] = __popc((unsigned)i * 2654435761u);
  k[6 * i + 2] = __ffs(i);
  k[6 * i + 3] = min(i, 7);
  k[6 * i + 4] = (int)max((unsigned)i, 5u);
  k[6 * i + 5] = __float_as_uint(__int_as_float(__float_as_int(v))) == __float_as_uint(v);
}
CM_EXPORT(selftest_intrinsics)

// Deliberately broken synchronization, to check that the emulation reports
// an error instead of hanging. Undefined behaviour in CUDA: NEVER launch it
// on a GPU. One block of at least 32 threads; `mode` selects the bug:
//   0: threads with threadIdx.x >= 16 exit; the others wait in __syncthreads,
//   1: odd and even threads wait at two different __syncthreads,
//   2: lanes < 16 call __shfl_sync with the full mask while lanes >= 16 wait
//      in __syncthreads,
//   3: each lane calls __syncwarp with a mask that excludes itself,
//   4: thread 5 calls __trap(),
//   5: even lanes call __ballot_sync, odd lanes __any_sync (same mask),
//   other: no bug: lanes >= 16 of each warp exit and the others call
//      __shfl_xor_sync(full mask, lane, 1) and __syncwarp() (CUDA requires
//      only the non-exited lanes named in a mask to take part).
// Threads that get past the bug write out[threadIdx.x] = v (1, or the
// shuffled lane number).
extern "C" __global__ void selftest_divergent_barrier(int mode, int* __restrict__ out) {
  const unsigned t = threadIdx.x;
  const int lane = t % 32;
  int v = 1;
  if (mode == 0) {
    if (t >= 16) return;
    __syncthreads();
  } else if (mode == 1) {
    if (t % 2) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else if (mode == 2) {
    if (lane < 16) {
      v = __shfl_sync(0xffffffffu, v, 0);
    } else {
      __syncthreads();
    }
  } else if (mode == 3) {
    __syncwarp(~(1u << lane));
  } else if (mode == 4) {
    if (t == 5) __trap();
  } else if (mode == 5) {
    v = lane % 2 ? __any_sync(0xffffffffu, 1) : (int)__ballot_sync(0xffffffffu, 1);
  } else {
    if (lane >= 16) return;
    v = __shfl_xor_sync(0xffffffffu, lane, 1);
    __syncwarp();
  }
  out[t] = v;
}
CM_EXPORT(selftest_divergent_barrier)
