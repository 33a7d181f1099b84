// Development check of the CUDA-on-CPU emulation: launches every kernel of
// kernels/selftest.cu through its cm_emu_launch_* entry point, checks the
// results against host computations, checks that broken launches and
// divergent barriers are reported as errors, and times large launches.
// Built and run by tests/emulation/run.sh. Exits nonzero on any failure.
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "emulation/cuda_emu.h"

#define CM_DECLARE(name)                                                                 \
  extern "C" int cm_emu_launch_##name(const cm_emu_launch_cfg* cfg, void** args, char* err, \
                                      size_t err_len);
CM_DECLARE(selftest_saxpy_f32)
CM_DECLARE(selftest_block_sum_f32)
CM_DECLARE(selftest_warp_reduce_f32)
CM_DECLARE(selftest_warp_scan_i32)
CM_DECLARE(selftest_ballot_i32)
CM_DECLARE(selftest_histogram)
CM_DECLARE(selftest_atomic_ops)
CM_DECLARE(selftest_reverse_dyn_f32)
CM_DECLARE(selftest_index_3d)
CM_DECLARE(selftest_block_vote)
CM_DECLARE(selftest_intrinsics)
CM_DECLARE(selftest_divergent_barrier)
#undef CM_DECLARE

using LaunchFn = int (*)(const cm_emu_launch_cfg*, void**, char*, size_t);

static int g_failures = 0;
static int g_checks = 0;

#define CHECK(cond, ...)                                      \
  do {                                                        \
    ++g_checks;                                               \
    if (!(cond)) {                                            \
      ++g_failures;                                           \
      std::printf("  FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                               \
      std::printf("\n");                                      \
    }                                                         \
  } while (0)

static cm_emu_launch_cfg cfg3(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                              unsigned bz, size_t shared = 0) {
  cm_emu_launch_cfg c;
  c.grid[0] = gx;
  c.grid[1] = gy;
  c.grid[2] = gz;
  c.block[0] = bx;
  c.block[1] = by;
  c.block[2] = bz;
  c.shared_bytes = shared;
  return c;
}

static cm_emu_launch_cfg cfg1(unsigned grid, unsigned block, size_t shared = 0) {
  return cfg3(grid, 1, 1, block, 1, 1, shared);
}

static unsigned blocks_for(size_t n, unsigned block) {
  return static_cast<unsigned>((n + block - 1) / block);
}

// Launches and expects success; returns false (and records a failure) if not.
static bool launch_ok(LaunchFn fn, const cm_emu_launch_cfg& c, std::vector<void*> args) {
  char err[512] = {0};
  const int rc = fn(&c, args.data(), err, sizeof err);
  CHECK(rc == 0, "launch failed: %s", err);
  return rc == 0;
}

// Launches and expects an error whose message contains `needle`.
static void launch_fails(const char* what, LaunchFn fn, const cm_emu_launch_cfg& c,
                         std::vector<void*> args, const char* needle) {
  char err[512] = {0};
  const int rc = fn(&c, args.data(), err, sizeof err);
  CHECK(rc != 0, "%s: launch succeeded", what);
  CHECK(std::strstr(err, needle) != nullptr, "%s: message \"%s\" lacks \"%s\"", what, err,
        needle);
  std::printf("  %s -> %s\n", what, err);
}

static void set_threads(const char* n) {
  if (n == nullptr) {
    unsetenv("CELLMORPH_EMU_THREADS");
  } else {
    setenv("CELLMORPH_EMU_THREADS", n, 1);
  }
}

static double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Small integers: every sum below is exact in float, whatever the order.
static std::vector<float> small_ints(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> d(-8, 8);
  std::vector<float> v(n);
  for (auto& e : v) e = static_cast<float>(d(rng));
  return v;
}

static void test_saxpy_threads() {
  std::printf("saxpy over OS-thread counts\n");
  const int n = 1000003;
  const float a = 0.5f;
  auto x = small_ints(n, 1);
  auto y0 = small_ints(n, 2);
  for (const char* threads : {"1", "2", "3", "7"}) {
    set_threads(threads);
    auto y = y0;
    int nn = n;
    float aa = a;
    const float* xp = x.data();
    float* yp = y.data();
    if (!launch_ok(cm_emu_launch_selftest_saxpy_f32, cfg1(blocks_for(n, 256), 256),
                   {&nn, &aa, &xp, &yp}))
      continue;
    size_t bad = 0;
    for (int i = 0; i < n; ++i) bad += y[i] != a * x[i] + y0[i];
    CHECK(bad == 0, "threads=%s: %zu wrong elements", threads, bad);
  }
  set_threads(nullptr);
}

static void test_block_sum() {
  std::printf("block sum (shared memory + __syncthreads)\n");
  set_threads("3");
  for (unsigned block : {32u, 64u, 256u, 1024u}) {
    const int n = 100000 + 17;
    auto x = small_ints(n, block);
    const unsigned grid = blocks_for(n, block);
    std::vector<float> out(grid, -1.0f);
    int nn = n;
    const float* xp = x.data();
    float* op = out.data();
    if (!launch_ok(cm_emu_launch_selftest_block_sum_f32, cfg1(grid, block), {&xp, &op, &nn}))
      continue;
    unsigned bad = 0;
    for (unsigned b = 0; b < grid; ++b) {
      float s = 0;
      for (unsigned t = 0; t < block; ++t) {
        const size_t i = static_cast<size_t>(b) * block + t;
        if (i < static_cast<size_t>(n)) s += x[i];
      }
      bad += out[b] != s;
    }
    CHECK(bad == 0, "block=%u: %u wrong block sums", block, bad);
  }
  set_threads(nullptr);
}

static void test_warp_reduce() {
  std::printf("warp reduce (__shfl_down_sync float, __shfl_xor_sync double)\n");
  struct Shape {
    unsigned gx, gy, gz, bx, by, bz;
  };
  for (Shape s : {Shape{50, 1, 1, 128, 1, 1}, Shape{5, 3, 2, 32, 4, 1}, Shape{3, 2, 2, 8, 8, 2},
                  Shape{4, 1, 1, 1024, 1, 1}}) {
    const size_t threads = size_t{s.gx} * s.gy * s.gz * s.bx * s.by * s.bz;
    const int n = static_cast<int>(threads - 45);  // a partly filled last warp
    auto x = small_ints(n, 7);
    std::vector<float> warp_sums(threads / 32, -1.0f);
    std::vector<double> all(n, -1.0);
    int nn = n;
    const float* xp = x.data();
    float* wp = warp_sums.data();
    double* ap = all.data();
    if (!launch_ok(cm_emu_launch_selftest_warp_reduce_f32, cfg3(s.gx, s.gy, s.gz, s.bx, s.by, s.bz),
                   {&xp, &wp, &ap, &nn}))
      continue;
    size_t bad = 0;
    for (size_t w = 0; w < threads / 32; ++w) {
      double sum = 0;
      for (size_t l = 0; l < 32; ++l) {
        if (w * 32 + l < static_cast<size_t>(n)) sum += x[w * 32 + l];
      }
      bad += warp_sums[w] != static_cast<float>(sum);
      for (size_t l = 0; l < 32; ++l) {
        const size_t g = w * 32 + l;
        if (g < static_cast<size_t>(n)) bad += all[g] != sum;
      }
    }
    CHECK(bad == 0, "block (%u,%u,%u): %zu wrong sums", s.bx, s.by, s.bz, bad);
  }
}

static void test_warp_scan() {
  std::printf("warp scan (__shfl_up_sync, __shfl_sync/__shfl_down_sync width 8, __syncwarp)\n");
  const int n = 64 * 20;
  std::vector<int> x(n);
  for (int i = 0; i < n; ++i) x[i] = (i * 37) % 101 - 50;
  std::vector<int> out(4 * n, -7);
  int nn = n;
  const int* xp = x.data();
  int* op = out.data();
  if (!launch_ok(cm_emu_launch_selftest_warp_scan_i32, cfg3(20, 1, 1, 32, 2, 1), {&xp, &op, &nn}))
    return;
  size_t bad = 0;
  for (int g = 0; g < n; ++g) {
    const int base = g & ~31, lane = g & 31;
    int scan = 0;
    for (int l = 0; l <= lane; ++l) scan += x[base + l];
    const int seg = base + (lane & ~7);
    const int down = (lane % 8) + 3 < 8 ? x[g + 3] : x[g];
    const int rotated = x[base + (lane + 1) % 32];
    bad += out[4 * g] != scan;
    bad += out[4 * g + 1] != x[seg];
    bad += out[4 * g + 2] != down;
    bad += out[4 * g + 3] != rotated;
  }
  CHECK(bad == 0, "%zu wrong values", bad);
}

static void test_ballot() {
  std::printf("ballot / any / all / activemask\n");
  const int warps = 64;
  const int n = warps * 32 - 40;  // last two warps partly past n
  std::vector<int> flags(n);
  std::mt19937 rng(3);
  for (int i = 0; i < n; ++i) flags[i] = (rng() % 3) == 0;
  // Warp 0 all set, warp 1 none set: exercise __all_sync and __any_sync.
  for (int i = 0; i < 32; ++i) flags[i] = 1;
  for (int i = 32; i < 64; ++i) flags[i] = 0;
  std::vector<unsigned> ballots(warps, 0xdeadbeef), votes(3 * warps, 0xdeadbeef);
  std::vector<int> counts(warps, -1);
  int nn = n;
  const int* fp = flags.data();
  unsigned* bp = ballots.data();
  int* cp = counts.data();
  unsigned* vp = votes.data();
  if (!launch_ok(cm_emu_launch_selftest_ballot_i32, cfg3(16, 1, 1, 16, 4, 2),
                 {&fp, &bp, &cp, &vp, &nn}))
    return;
  int bad = 0;
  for (int w = 0; w < warps; ++w) {
    unsigned expect = 0;
    for (int l = 0; l < 32; ++l) {
      const int g = w * 32 + l;
      if (g < n && flags[g]) expect |= 1u << l;
    }
    bad += ballots[w] != expect;
    bad += counts[w] != __builtin_popcount(expect);
    bad += votes[3 * w] != ((expect != 0 ? 1u : 0u) | (expect == ~0u ? 2u : 0u));
    bad += votes[3 * w + 1] != ~0u;
    bad += votes[3 * w + 2] != 0x49249249u;
  }
  CHECK(bad == 0, "%d wrong values", bad);
  CHECK(votes[0] == 3 && votes[3] == 0, "all/any flags %u %u", votes[0], votes[3]);
}

static void test_histogram() {
  std::printf("histogram (atomicAdd int and float)\n");
  set_threads("4");
  const int n = 1 << 20, nbins = 37;
  std::vector<int> bin(n);
  std::vector<float> weight(n);
  std::mt19937 rng(11);
  for (int i = 0; i < n; ++i) {
    bin[i] = static_cast<int>(rng() % (nbins + 3)) - 1;  // some out of range
    weight[i] = static_cast<float>(rng() % 8) * 0.25f;  // sums stay exact in float
  }
  std::vector<int> count(nbins, 0);
  std::vector<float> wsum(nbins, 0.0f);
  int nn = n, nb = nbins;
  const int* bp = bin.data();
  const float* wp = weight.data();
  int* cp = count.data();
  float* sp = wsum.data();
  if (launch_ok(cm_emu_launch_selftest_histogram, cfg1(blocks_for(n, 256), 256),
                {&bp, &wp, &cp, &sp, &nn, &nb})) {
    std::vector<int> ec(nbins, 0);
    std::vector<double> ew(nbins, 0.0);
    for (int i = 0; i < n; ++i) {
      if (bin[i] < 0 || bin[i] >= nbins) continue;
      ++ec[bin[i]];
      ew[bin[i]] += weight[i];
    }
    int bad = 0;
    for (int b = 0; b < nbins; ++b) bad += count[b] != ec[b] || wsum[b] != ew[b];
    CHECK(bad == 0, "%d wrong bins", bad);
  }
  set_threads(nullptr);
}

static void test_atomic_ops() {
  std::printf("atomicMax/Min/CAS/Sub/Exch/Or/And/Inc, 64-bit atomicAdd\n");
  set_threads("4");
  const int n = 300001;
  std::vector<int> v(n);
  std::mt19937 rng(5);
  for (int i = 0; i < n; ++i) v[i] = static_cast<int>(rng() % 2000001) - 1000000;
  std::vector<int> ints = {INT_MIN, INT_MAX, 0, 0, -1};
  std::vector<unsigned> uints = {0u, ~0u, 0u, ~0u, 0u};
  unsigned long long sum64 = 0;
  int nn = n;
  const int* vp = v.data();
  int* ip = ints.data();
  unsigned* up = uints.data();
  unsigned long long* sp = &sum64;
  if (!launch_ok(cm_emu_launch_selftest_atomic_ops, cfg1(blocks_for(n, 128), 128),
                 {&vp, &ip, &up, &sp, &nn})) {
    set_threads(nullptr);
    return;
  }
  int imax = INT_MIN, imin = INT_MAX;
  unsigned umax = 0, umin = ~0u;
  unsigned long long sq = 0;
  for (int e : v) {
    imax = std::max(imax, e);
    imin = std::min(imin, e);
    umax = std::max(umax, static_cast<unsigned>(e));
    umin = std::min(umin, static_cast<unsigned>(e));
    sq += static_cast<unsigned long long>(static_cast<long long>(e) * e);
  }
  CHECK(ints[0] == imax && ints[1] == imin, "int max/min %d %d", ints[0], ints[1]);
  CHECK(ints[2] == n, "CAS counter %d", ints[2]);
  CHECK(ints[3] == -n, "atomicSub %d", ints[3]);
  CHECK(ints[4] >= 0 && ints[4] < n, "atomicExch left %d", ints[4]);
  CHECK(uints[0] == umax && uints[1] == umin, "unsigned max/min %u %u", uints[0], uints[1]);
  CHECK(uints[2] == ~0u && uints[3] == 0u, "or/and %08x %08x", uints[2], uints[3]);
  CHECK(uints[4] == static_cast<unsigned>(n % 10), "atomicInc %u", uints[4]);
  CHECK(sum64 == sq, "sum64 %llu vs %llu", sum64, sq);
  set_threads(nullptr);
}

static void test_reverse_dyn() {
  std::printf("dynamic shared memory reverse\n");
  for (unsigned block : {1u, 96u, 512u}) {
    const int n = 10000 + 3;
    auto x = small_ints(n, 9);
    std::vector<float> y(n, -100.0f);
    int nn = n;
    const float* xp = x.data();
    float* yp = y.data();
    if (!launch_ok(cm_emu_launch_selftest_reverse_dyn_f32,
                   cfg1(blocks_for(n, block), block, block * sizeof(float)), {&xp, &yp, &nn}))
      continue;
    int bad = 0;
    for (int start = 0; start < n; start += block) {
      const int count = std::min<int>(block, n - start);
      for (int t = 0; t < count; ++t) bad += y[start + t] != x[start + count - 1 - t];
    }
    CHECK(bad == 0, "block=%u: %d wrong", block, bad);
  }
}

static void test_index_3d() {
  std::printf("3-D index built-ins\n");
  struct Shape {
    unsigned gx, gy, gz, bx, by, bz;
  };
  for (Shape s : {Shape{3, 2, 2, 5, 3, 2}, Shape{2, 2, 2, 32, 8, 4}, Shape{7, 1, 3, 1, 1, 1},
                  Shape{1, 1, 1, 1, 1, 64}}) {
    const size_t per_block = size_t{s.bx} * s.by * s.bz;
    const size_t threads = per_block * s.gx * s.gy * s.gz;
    std::vector<unsigned> out(4 * threads, 0xffffffffu);
    unsigned* op = out.data();
    if (!launch_ok(cm_emu_launch_selftest_index_3d, cfg3(s.gx, s.gy, s.gz, s.bx, s.by, s.bz),
                   {&op}))
      continue;
    size_t bad = 0;
    const unsigned bdim = s.bx | s.by << 10 | s.bz << 20;
    const unsigned gdim = s.gx | s.gy << 10 | s.gz << 20;
    for (size_t g = 0; g < threads; ++g) {
      const size_t b = g / per_block, t = g % per_block;
      const unsigned tx = t % s.bx, ty = t / s.bx % s.by, tz = static_cast<unsigned>(t / (s.bx * s.by));
      const unsigned bx = b % s.gx, by = b / s.gx % s.gy, bz = static_cast<unsigned>(b / (s.gx * s.gy));
      bad += out[4 * g] != (tx | ty << 10 | tz << 20);
      bad += out[4 * g + 1] != (bx | by << 10 | bz << 20);
      bad += out[4 * g + 2] != bdim;
      bad += out[4 * g + 3] != gdim;
    }
    CHECK(bad == 0, "grid (%u,%u,%u) block (%u,%u,%u): %zu wrong", s.gx, s.gy, s.gz, s.bx, s.by,
          s.bz, bad);
  }
}

static void test_block_vote() {
  std::printf("__syncthreads_count/and/or\n");
  const unsigned block = 100, grid = 6;
  const int n = 540;  // the last block is partly past n
  std::vector<int> flags(n);
  for (int i = 0; i < n; ++i) flags[i] = i % 7 == 0;
  for (int i = 100; i < 200; ++i) flags[i] = 1;  // block 1: all set
  for (int i = 200; i < 300; ++i) flags[i] = 0;  // block 2: none set
  std::vector<int> out(3 * grid, -1);
  int nn = n;
  const int* fp = flags.data();
  int* op = out.data();
  if (!launch_ok(cm_emu_launch_selftest_block_vote, cfg1(grid, block), {&fp, &op, &nn})) return;
  int bad = 0;
  for (unsigned b = 0; b < grid; ++b) {
    int c = 0;
    for (unsigned t = 0; t < block; ++t) {
      const unsigned i = b * block + t;
      c += i < static_cast<unsigned>(n) && flags[i];
    }
    bad += out[3 * b] != c || out[3 * b + 1] != (c == static_cast<int>(block)) ||
           out[3 * b + 2] != (c > 0);
  }
  CHECK(bad == 0, "%d wrong blocks", bad);
  CHECK(out[3] == 100 && out[4] == 1 && out[8] == 0, "blocks 1/2: %d %d %d", out[3], out[4], out[8]);
}

static void test_intrinsics() {
  std::printf("math and bit intrinsics\n");
  const int n = 1000;
  std::vector<float> x(n);
  for (int i = 0; i < n; ++i) x[i] = (static_cast<float>(i) - 500.0f) * 0.037f;
  std::vector<float> f(6 * n);
  std::vector<int> k(6 * n);
  int nn = n;
  const float* xp = x.data();
  float* fp = f.data();
  int* kp = k.data();
  if (!launch_ok(cm_emu_launch_selftest_intrinsics, cfg1(blocks_for(n, 64), 64),
                 {&xp, &fp, &kp, &nn}))
    return;
  int bad = 0;
  for (int i = 0; i < n; ++i) {
    const float v = x[i];
    const float sat = v / 4.0f;
    const float ef[6] = {v / 3.0f,
                         std::exp(v / 8.0f),
                         std::log(std::fabs(v) + 1.0f),
                         1.0f / std::sqrt(std::fabs(v) + 1.0f),
                         sat < 0.0f ? 0.0f : (sat > 1.0f ? 1.0f : sat),
                         std::max(v, 0.5f) + std::min(v, -0.5f)};
    const unsigned u = static_cast<unsigned>(i);
    const int ek[6] = {i == 0 ? 32 : __builtin_clz(u), __builtin_popcount(u * 2654435761u),
                       __builtin_ffs(i), std::min(i, 7), static_cast<int>(std::max(u, 5u)), 1};
    // The emulation computes with the same host libm functions: exact.
    for (int j = 0; j < 6; ++j) bad += f[6 * i + j] != ef[j] || k[6 * i + j] != ek[j];
  }
  CHECK(bad == 0, "%d wrong values", bad);
}

static void test_errors() {
  std::printf("errors\n");
  int mode = 0;
  std::vector<int> out(1024, 0);
  int* op = out.data();
  const std::vector<void*> args = {&mode, &op};
  LaunchFn div = cm_emu_launch_selftest_divergent_barrier;
  mode = 0;
  launch_fails("exited threads + __syncthreads", div, cfg1(1, 64), args, "divergent barrier");
  mode = 1;
  launch_fails("two different __syncthreads", div, cfg1(1, 64), args, "different barriers");
  mode = 2;
  launch_fails("shuffle waiting for lanes in __syncthreads", div, cfg1(1, 64), args,
               "waits at __syncthreads");
  mode = 3;
  launch_fails("__syncwarp mask without own lane", div, cfg1(1, 64), args,
               "does not include its own lane");
  mode = 4;
  launch_fails("__trap", div, cfg1(1, 64), args, "__trap()");
  // The same errors inside a large multi-threaded grid stop the launch.
  set_threads("4");
  mode = 0;
  launch_fails("divergent barrier in a 4096-block grid", div, cfg1(4096, 64), args,
               "divergent barrier");
  set_threads(nullptr);
  mode = 5;
  launch_fails("__ballot_sync and __any_sync mixed", div, cfg1(1, 64), args,
               "mismatched warp collectives");
  mode = 6;  // no bug: exited lanes named in a mask are left out
  std::fill(out.begin(), out.end(), -1);
  if (launch_ok(div, cfg1(1, 80), args)) {
    int bad = 0;
    for (int t = 0; t < 80; ++t) bad += out[t] != (t % 32 < 16 ? (t % 32) ^ 1 : -1);
    CHECK(bad == 0, "shuffle after lanes exited: %d wrong", bad);
  }

  int n = 10;
  float a = 1;
  const float* xp = nullptr;
  float* yp = nullptr;
  const std::vector<void*> sargs = {&n, &a, &xp, &yp};
  LaunchFn sx = cm_emu_launch_selftest_saxpy_f32;
  launch_fails("block of 1025 threads", sx, cfg1(1, 1025), sargs, "invalid block");
  launch_fails("block of 32x32x2 threads", sx, cfg3(1, 1, 1, 32, 32, 2), sargs, "invalid block");
  launch_fails("block z = 65", sx, cfg3(1, 1, 1, 1, 1, 65), sargs, "invalid block");
  launch_fails("empty block", sx, cfg1(1, 0), sargs, "invalid block");
  launch_fails("empty grid", sx, cfg3(4, 0, 1, 32, 1, 1), sargs, "invalid grid");
  launch_fails("228 KiB dynamic shared memory", sx, cfg1(1, 32, 228 * 1024), sargs,
               "dynamic shared memory");
  setenv("CELLMORPH_EMU_THREADS", "zero", 1);
  launch_fails("bad CELLMORPH_EMU_THREADS", sx, cfg1(1, 32), sargs, "CELLMORPH_EMU_THREADS");
  set_threads(nullptr);
  char tiny[8];
  cm_emu_launch_cfg bad = cfg1(0, 32);
  CHECK(sx(&bad, const_cast<void**>(sargs.data()), tiny, sizeof tiny) != 0 &&
            std::strlen(tiny) == sizeof tiny - 1,
        "short error buffer is NUL-terminated");
}

static void test_concurrent_launches() {
  std::printf("concurrent launches from 3 host threads\n");
  set_threads("2");
  const int n = 200000;
  auto x = small_ints(n, 21);
  std::vector<std::vector<float>> outs(3, std::vector<float>(blocks_for(n, 128), 0.0f));
  std::vector<int> rcs(3, -1);
  std::vector<std::thread> hosts;
  for (int h = 0; h < 3; ++h) {
    hosts.emplace_back([&, h] {
      for (int rep = 0; rep < 5 && rcs[h] != 1; ++rep) {
        int nn = n;
        const float* xp = x.data();
        float* op = outs[h].data();
        void* args[] = {&xp, &op, &nn};
        char err[256];
        const cm_emu_launch_cfg c = cfg1(blocks_for(n, 128), 128);
        rcs[h] = cm_emu_launch_selftest_block_sum_f32(&c, args, err, sizeof err);
      }
    });
  }
  for (auto& t : hosts) t.join();
  for (int h = 0; h < 3; ++h) {
    CHECK(rcs[h] == 0, "host thread %d rc %d", h, rcs[h]);
    int bad = 0;
    for (size_t b = 0; b < outs[h].size(); ++b) {
      float s = 0;
      for (size_t i = b * 128; i < std::min<size_t>((b + 1) * 128, n); ++i) s += x[i];
      bad += outs[h][b] != s;
    }
    CHECK(bad == 0, "host thread %d: %d wrong sums", h, bad);
  }
  set_threads(nullptr);
}

// Best of `reps` wall-clock times of one launch.
static double time_launch(LaunchFn fn, const cm_emu_launch_cfg& c, std::vector<void*> args,
                          int reps) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t0 = now_s();
    char err[256];
    const int rc = fn(&c, args.data(), err, sizeof err);
    const double dt = now_s() - t0;
    CHECK(rc == 0, "timed launch failed: %s", err);
    best = std::min(best, dt);
  }
  return best;
}

static void timings() {
  const unsigned hw = std::thread::hardware_concurrency();
  std::printf("timings (best of 3; hardware_concurrency = %u)\n", hw);
  const int n = 1 << 20;
  auto x = small_ints(n, 31);
  std::vector<float> y(n, 0.0f);
  std::vector<float> sums(n / 32);
  std::vector<double> all(n);
  int nn = n;
  float a = 2.0f;
  const float* xp = x.data();
  float* yp = y.data();
  float* sp = sums.data();
  double* ap = all.data();
  for (const char* threads : {"1", static_cast<const char*>(nullptr)}) {
    set_threads(threads);
    const char* label = threads ? "1 OS thread " : "all OS threads";
    for (unsigned block : {256u, 1024u}) {
      const double t = time_launch(cm_emu_launch_selftest_saxpy_f32, cfg1(n / block, block),
                                   {&nn, &a, &xp, &yp}, 3);
      std::printf("  %s saxpy        1M threads, block %4u: %7.1f ms (%5.1f ns/thread)\n",
                  label, block, t * 1e3, t * 1e9 / n);
    }
    double t = time_launch(cm_emu_launch_selftest_block_sum_f32, cfg1(n / 256, 256),
                           {&xp, &sp, &nn}, 3);
    std::printf("  %s block_sum    1M threads, block  256: %7.1f ms (%5.1f ns/thread, 9 barriers)\n",
                label, t * 1e3, t * 1e9 / n);
    t = time_launch(cm_emu_launch_selftest_warp_reduce_f32, cfg1(n / 256, 256),
                    {&xp, &sp, &ap, &nn}, 3);
    std::printf("  %s warp_reduce  1M threads, block  256: %7.1f ms (%5.1f ns/thread, 10 shuffles)\n",
                label, t * 1e3, t * 1e9 / n);
    for (unsigned grid : {1u, 8u}) {
      int small = static_cast<int>(grid * 32);
      const int reps = 2000;
      int failed = 0;
      const double t0 = now_s();
      for (int r = 0; r < reps; ++r) {
        void* args[] = {&small, &a, &xp, &yp};
        const cm_emu_launch_cfg c = cfg1(grid, 32);
        char err[256];
        failed += cm_emu_launch_selftest_saxpy_f32(&c, args, err, sizeof err) != 0;
      }
      CHECK(failed == 0, "%d small launches failed", failed);
      std::printf("  %s launch overhead, %u block(s) of 32 threads: %6.1f us per launch\n", label,
                  grid, (now_s() - t0) * 1e6 / reps);
    }
  }
  set_threads(nullptr);
}

int main(int argc, char** argv) {
  const bool with_timings = !(argc > 1 && std::strcmp(argv[1], "--no-timings") == 0);
  test_saxpy_threads();
  test_block_sum();
  test_warp_reduce();
  test_warp_scan();
  test_ballot();
  test_histogram();
  test_atomic_ops();
  test_reverse_dyn();
  test_index_3d();
  test_block_vote();
  test_intrinsics();
  test_errors();
  test_concurrent_launches();
  if (with_timings) timings();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
