// CUDA-on-CPU emulation: lets every kernel in kernels/*.cu compile as host C++
// (g++ -x c++ -std=c++17 -DCELLMORPH_EMULATION) and run without a GPU.
//
// Included only through common.cuh under CELLMORPH_EMULATION; never by nvcc.
//
// Execution model (implemented in cuda_emu.cpp):
// - A launch runs every block of the grid. Blocks are handed out one at a
//   time to a process-wide pool of OS threads (the calling thread takes part);
//   at most CELLMORPH_EMU_THREADS (default: hardware_concurrency) threads work
//   on one launch, never more than it has blocks, and one per 8192 CUDA
//   threads of the grid (small launches run on the calling thread alone).
// - Inside a block every CUDA thread is a cooperative fiber on the OS thread
//   that runs the block. A fiber runs until it finishes or reaches a barrier.
//   Stacks are CELLMORPH_EMU_STACK_KB KiB (default 256), without guard page.
// - __syncthreads() releases when every thread of the block waits at the same
//   __syncthreads() (same file and line). Threads that exited while others
//   wait, or threads waiting at different barriers, are reported as errors.
// - Warp collectives (__syncwarp, __shfl*_sync, __ballot_sync, __any_sync,
//   __all_sync) wait until every non-exited lane named in the mask (lanes past
//   the end of a partial warp count as exited) waits in the same kind of
//   collective with the same mask, as CUDA specifies. Different collectives
//   or masks among those lanes, or a mask without the calling lane, are
//   errors. A shuffle that reads a lane outside the mask, or an exited one,
//   gets all-ones bits (NaN for float), like uninitialized data would.
// - __activemask() returns the lanes of the warp that wait in __activemask()
//   once the whole block cannot progress otherwise: in converged code that is
//   every live lane, in a branch it is the lanes that took the branch.
// - A block in which no thread can progress is an error, never a hang.
// - Dynamic shared memory (CM_DYNAMIC_SHARED) is filled with 0xFF bytes before
//   each block so that reads of unwritten data show up as NaN / -1. Static
//   __shared__ variables are thread_local: they are neither cleared nor
//   poisoned between blocks.
//
// Rules for kernel code that the emulation needs (nvcc does not check them):
// - Include standard headers only through common.cuh (this header includes
//   them before it defines the CUDA keywords as macros).
// - All kernel files are linked into one library: __device__ helpers and
//   __device__ variables must be `static`, `inline`/`__forceinline__`, or in
//   an anonymous namespace; kernel names must be unique.
// - Do not write `inline __forceinline__` or `static __constant__`
//   (__forceinline__ already means inline, __constant__ already means static).
#pragma once

#include <algorithm>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <math.h>
#include <memory>
#include <type_traits>
#include <utility>

// Launch geometry passed by the Rust launch layer (#[repr(C)] on that side).
struct cm_emu_launch_cfg {
  unsigned grid[3];
  unsigned block[3];
  size_t shared_bytes;
};

// ---------------------------------------------------------------------------
// Qualifiers
// ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__ static
// One instance per OS thread; all fibers of a block share the OS thread.
#define __shared__ static thread_local

// ---------------------------------------------------------------------------
// Vector types
// ---------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

struct __align__(8) float2 { float x, y; };
struct float3 { float x, y, z; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(16) double2 { double x, y; };
struct __align__(8) int2 { int x, y; };
struct int3 { int x, y, z; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(8) uint2 { unsigned x, y; };
struct __align__(16) uint4 { unsigned x, y, z, w; };
struct __align__(4) uchar4 { unsigned char x, y, z, w; };

inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float3 make_float3(float x, float y, float z) { return float3{x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline double2 make_double2(double x, double y) { return double2{x, y}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline int3 make_int3(int x, int y, int z) { return int3{x, y, z}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  return uint4{x, y, z, w};
}
inline uchar4 make_uchar4(unsigned char x, unsigned char y, unsigned char z, unsigned char w) {
  return uchar4{x, y, z, w};
}

// ---------------------------------------------------------------------------
// Runtime interface (cuda_emu.cpp)
// ---------------------------------------------------------------------------
namespace cm_emu {
namespace detail {

struct BlockInfo {
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

// What a running fiber exposes to kernel code.
struct ThreadInfo {
  uint3 thread_idx;
  const BlockInfo* block;
  unsigned lane;
};

// The fiber running on this OS thread (null outside a launch).
extern __thread const ThreadInfo* t_cur;

enum class BarrierOp : int { Plain, Count, And, Or };
enum class WarpOp : int { Sync, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All, Active };

// Block barrier; returns the count / and / or of `pred` over the block.
int block_barrier(BarrierOp op, int pred, const char* file, int line);
// Warp collective; `arg` is the shuffle's source lane, delta or lane mask.
unsigned long long warp_op(WarpOp op, unsigned mask, unsigned long long value, int arg, int width);
[[noreturn]] void trap(const char* file, int line);
void* dynamic_shared_raw();

// Barriers as the kernel sees them. The empty asm statements keep the
// compiler from carrying (static thread_local) shared variables in registers
// across the switch to other fibers, whatever it concludes about the call.
inline int sync_block(BarrierOp op, int pred, const char* file, int line) {
  asm volatile("" ::: "memory");
  const int r = block_barrier(op, pred, file, line);
  asm volatile("" ::: "memory");
  return r;
}

inline unsigned long long sync_warp(WarpOp op, unsigned mask, unsigned long long value, int arg,
                                    int width) {
  asm volatile("" ::: "memory");
  const unsigned long long r = warp_op(op, mask, value, arg, width);
  asm volatile("" ::: "memory");
  return r;
}

template <class T>
inline T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_raw());
}

template <class T>
inline unsigned long long to_bits(T v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "warp shuffles move at most 8 trivially copyable bytes");
  unsigned long long b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <class T>
inline T from_bits(unsigned long long b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

template <class T, class F>
inline T atomic_update(T* addr, F f) {
  T old;
  __atomic_load(addr, &old, __ATOMIC_RELAXED);
  T desired;
  do {
    desired = f(old);
  } while (!__atomic_compare_exchange(addr, &old, &desired, true, __ATOMIC_RELAXED,
                                      __ATOMIC_RELAXED));
  return old;
}

}  // namespace detail

using Thunk = void (*)(void** args);

// Runs `thunk(args)` once per CUDA thread of the grid described by `cfg`.
// Returns 0, or nonzero with a message (prefixed by `name`) in `err`.
int launch(const cm_emu_launch_cfg* cfg, void** args, Thunk thunk, const char* name, char* err,
           size_t err_len) noexcept;

template <class... A, std::size_t... I>
inline void call_unpacked(void (*f)(A...), void** args, std::index_sequence<I...>) {
  (void)args;
  f(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}

// Calls `f` with the CUDA-driver-style parameter array: args[i] points to the
// value of the i-th parameter.
template <class... A>
inline void call(void (*f)(A...), void** args) {
  call_unpacked(f, args, std::index_sequence_for<A...>{});
}

template <auto F>
void thunk(void** args) {
  call(F, args);
}

}  // namespace cm_emu

// ---------------------------------------------------------------------------
// Built-in variables
// ---------------------------------------------------------------------------
#define threadIdx (::cm_emu::detail::t_cur->thread_idx)
#define blockIdx (::cm_emu::detail::t_cur->block->block_idx)
#define blockDim (::cm_emu::detail::t_cur->block->block_dim)
#define gridDim (::cm_emu::detail::t_cur->block->grid_dim)
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------
// Synchronization
// ---------------------------------------------------------------------------
#define __syncthreads()                                                                       \
  ((void)::cm_emu::detail::sync_block(::cm_emu::detail::BarrierOp::Plain, 0, __FILE__, \
                                         __LINE__))
#define __syncthreads_count(pred) \
  ::cm_emu::detail::sync_block(::cm_emu::detail::BarrierOp::Count, (pred), __FILE__, __LINE__)
#define __syncthreads_and(pred) \
  ::cm_emu::detail::sync_block(::cm_emu::detail::BarrierOp::And, (pred), __FILE__, __LINE__)
#define __syncthreads_or(pred) \
  ::cm_emu::detail::sync_block(::cm_emu::detail::BarrierOp::Or, (pred), __FILE__, __LINE__)
#define __trap() ::cm_emu::detail::trap(__FILE__, __LINE__)

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::cm_emu::detail::sync_warp(::cm_emu::detail::WarpOp::Sync, mask, 0, 0, 32);
}

template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize) {
  using namespace ::cm_emu::detail;
  return from_bits<T>(sync_warp(WarpOp::ShflIdx, mask, to_bits(var), srcLane, width));
}

template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  using namespace ::cm_emu::detail;
  return from_bits<T>(sync_warp(WarpOp::ShflUp, mask, to_bits(var), static_cast<int>(delta), width));
}

template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  using namespace ::cm_emu::detail;
  return from_bits<T>(
      sync_warp(WarpOp::ShflDown, mask, to_bits(var), static_cast<int>(delta), width));
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize) {
  using namespace ::cm_emu::detail;
  return from_bits<T>(sync_warp(WarpOp::ShflXor, mask, to_bits(var), laneMask, width));
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  using namespace ::cm_emu::detail;
  return static_cast<unsigned>(sync_warp(WarpOp::Ballot, mask, pred != 0, 0, 32));
}

inline int __any_sync(unsigned mask, int pred) {
  using namespace ::cm_emu::detail;
  return static_cast<int>(sync_warp(WarpOp::Any, mask, pred != 0, 0, 32));
}

inline int __all_sync(unsigned mask, int pred) {
  using namespace ::cm_emu::detail;
  return static_cast<int>(sync_warp(WarpOp::All, mask, pred != 0, 0, 32));
}

inline unsigned __activemask() {
  using namespace ::cm_emu::detail;
  return static_cast<unsigned>(sync_warp(WarpOp::Active, 0, 0, 0, 32));
}

// All threads of a block share one OS thread, so a compiler fence orders them.
inline void __threadfence_block() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---------------------------------------------------------------------------
// Atomics: real host atomics, because blocks run in parallel on OS threads.
// Relaxed ordering, like CUDA's atomicXxx.
// ---------------------------------------------------------------------------
#define CM_EMU_FETCH_OPS(T)                                                                  \
  inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }     \
  inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }     \
  inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); }     \
  inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }       \
  inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_RELAXED); }     \
  inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }   \
  inline T atomicCAS(T* a, T expected, T desired) {                                        \
    __atomic_compare_exchange_n(a, &expected, desired, false, __ATOMIC_RELAXED,            \
                                __ATOMIC_RELAXED);                                         \
    return expected;                                                                       \
  }                                                                                        \
  inline T atomicMax(T* a, T v) {                                                          \
    return ::cm_emu::detail::atomic_update(a, [v](T old) { return old < v ? v : old; });   \
  }                                                                                        \
  inline T atomicMin(T* a, T v) {                                                          \
    return ::cm_emu::detail::atomic_update(a, [v](T old) { return v < old ? v : old; });   \
  }
CM_EMU_FETCH_OPS(int)
CM_EMU_FETCH_OPS(unsigned)
CM_EMU_FETCH_OPS(unsigned long long)
CM_EMU_FETCH_OPS(long long)
#undef CM_EMU_FETCH_OPS

inline float atomicAdd(float* a, float v) {
  return ::cm_emu::detail::atomic_update(a, [v](float old) { return old + v; });
}
inline double atomicAdd(double* a, double v) {
  return ::cm_emu::detail::atomic_update(a, [v](double old) { return old + v; });
}
inline float atomicExch(float* a, float v) {
  float old;
  __atomic_exchange(a, &v, &old, __ATOMIC_RELAXED);
  return old;
}
// CUDA's wrapping increment/decrement: ((old >= limit) ? 0 : old + 1) and
// ((old == 0 || old > limit) ? limit : old - 1).
inline unsigned atomicInc(unsigned* a, unsigned limit) {
  return ::cm_emu::detail::atomic_update(a,
                                         [limit](unsigned old) { return old >= limit ? 0 : old + 1; });
}
inline unsigned atomicDec(unsigned* a, unsigned limit) {
  return ::cm_emu::detail::atomic_update(
      a, [limit](unsigned old) { return (old == 0 || old > limit) ? limit : old - 1; });
}

// ---------------------------------------------------------------------------
// Math and bit intrinsics (host versions are the exact functions).
// ---------------------------------------------------------------------------
template <class T>
inline T __ldg(const T* p) {
  return *p;
}

inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) {
  *s = sinf(x);
  *c = cosf(x);
}
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
// NaN maps to 0, as in CUDA.
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline int __float2int_rn(float x) { return static_cast<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(floorf(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return static_cast<unsigned>(nearbyintf(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }

inline int __float_as_int(float x) { return ::cm_emu::detail::from_bits<int>(::cm_emu::detail::to_bits(x)); }
inline unsigned __float_as_uint(float x) {
  return ::cm_emu::detail::from_bits<unsigned>(::cm_emu::detail::to_bits(x));
}
inline float __int_as_float(int x) { return ::cm_emu::detail::from_bits<float>(::cm_emu::detail::to_bits(x)); }
inline float __uint_as_float(unsigned x) {
  return ::cm_emu::detail::from_bits<float>(::cm_emu::detail::to_bits(x));
}
inline long long __double_as_longlong(double x) {
  return ::cm_emu::detail::from_bits<long long>(::cm_emu::detail::to_bits(x));
}
inline double __longlong_as_double(long long x) {
  return ::cm_emu::detail::from_bits<double>(::cm_emu::detail::to_bits(x));
}

inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline int __mulhi(int a, int b) {
  return static_cast<int>((static_cast<long long>(a) * b) >> 32);
}

// min/max overloads as CUDA declares them (mixed signedness goes unsigned,
// mixed float/double goes double); floats use fminf/fmaxf NaN semantics.
#define CM_EMU_MINMAX(R, A, B)                                                               \
  inline R min(A a, B b) {                                                                   \
    return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b);    \
  }                                                                                          \
  inline R max(A a, B b) {                                                                   \
    return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(b) : static_cast<R>(a);    \
  }
CM_EMU_MINMAX(int, int, int)
CM_EMU_MINMAX(unsigned, unsigned, unsigned)
CM_EMU_MINMAX(unsigned, int, unsigned)
CM_EMU_MINMAX(unsigned, unsigned, int)
CM_EMU_MINMAX(long, long, long)
CM_EMU_MINMAX(unsigned long, unsigned long, unsigned long)
CM_EMU_MINMAX(unsigned long, long, unsigned long)
CM_EMU_MINMAX(unsigned long, unsigned long, long)
CM_EMU_MINMAX(long long, long long, long long)
CM_EMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
CM_EMU_MINMAX(unsigned long long, long long, unsigned long long)
CM_EMU_MINMAX(unsigned long long, unsigned long long, long long)
#undef CM_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }
