// Runtime of the CUDA-on-CPU emulation: block scheduling over a pool of OS
// threads, one cooperative fiber per CUDA thread, barriers and warp
// collectives. The model is described in cuda_emu.h.
//
// Context switches use a small hand-written x86_64 routine (what the ABI
// makes callee-saved: six registers, the MXCSR and the x87 control word);
// glibc's swapcontext also saves the signal mask with a system call, which
// made emulated threads 13-40x slower here. Other targets, or -DCM_EMU_UCONTEXT,
// use ucontext.

// System headers come before cuda_emu.h, whose macros (__noinline__ ...)
// would break them.
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <deque>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) && !defined(CM_EMU_UCONTEXT)
#define CM_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#include "cuda_emu.h"

namespace cm_emu {
namespace detail {

__thread const ThreadInfo* t_cur = nullptr;

namespace {

constexpr size_t kMaxBlockThreads = 1024;
constexpr size_t kMaxSharedBytes = 227 * 1024;  // H100 opt-in limit per block
constexpr size_t kDefaultStackKiB = 256;
constexpr unsigned kMaxPoolThreads = 256;
// Handing blocks to another OS thread costs tens of microseconds on a busy
// machine; a grid gets one more OS thread per this many CUDA threads (about
// 0.1 ms of emulation at the cheapest), so small launches stay on the caller.
constexpr unsigned long long kCudaThreadsPerWorker = 8192;
constexpr unsigned long long kPoison = ~0ull;

// ---------------------------------------------------------------------------
// Contexts
// ---------------------------------------------------------------------------
#ifdef CM_EMU_ASM_SWITCH

// Saves the callee-saved state on the current stack, stores the stack
// pointer in *save, loads `load` and restores the same state from there.
// It resumes with an indirect jmp rather than ret: the return-address
// predictor is always wrong after a stack switch, the indirect predictor
// mostly right (this halved the cost of a trivial emulated thread).
// A new context is a stack prepared by context_init whose resume address is
// cm_emu_ctx_start, which calls the function in r13.
asm(R"(
	.text
	.p2align 4
	.globl cm_emu_ctx_switch
	.hidden cm_emu_ctx_switch
	.type cm_emu_ctx_switch, @function
cm_emu_ctx_switch:
	pushq %rbp
	pushq %rbx
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	subq $8, %rsp
	stmxcsr (%rsp)
	fnstcw 4(%rsp)
	movq %rsp, (%rdi)
	movq %rsi, %rsp
	ldmxcsr (%rsp)
	fldcw 4(%rsp)
	addq $8, %rsp
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %rbx
	popq %rbp
	popq %rcx
	jmpq *%rcx
	.size cm_emu_ctx_switch, .-cm_emu_ctx_switch

	.p2align 4
	.globl cm_emu_ctx_start
	.hidden cm_emu_ctx_start
	.type cm_emu_ctx_start, @function
cm_emu_ctx_start:
	.cfi_startproc
	.cfi_undefined rip
	callq *%r13
	ud2
	.cfi_endproc
	.size cm_emu_ctx_start, .-cm_emu_ctx_start
)");

extern "C" void cm_emu_ctx_switch(void** save, void* load);
extern "C" void cm_emu_ctx_start();

struct Context {
  void* sp = nullptr;
};

// MXCSR (low half) and x87 control word (high half) of the calling thread:
// new fibers start with the launching thread's floating-point environment.
unsigned long long current_fp_control() {
  unsigned mxcsr = 0;
  unsigned short fpcw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  return mxcsr | (static_cast<unsigned long long>(fpcw) << 32);
}

void context_init(Context& c, char* stack_lo, char* stack_top, void (*entry)(),
                  unsigned long long fp_control) {
  (void)stack_lo;
  // After the 8 words below are popped, rsp = top - 16: 16-byte aligned, as
  // the ABI requires before the `call` in cm_emu_ctx_start.
  auto top = reinterpret_cast<uintptr_t>(stack_top) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<unsigned long long*>(top - 16 - 64);
  sp[0] = fp_control;
  sp[1] = 0;                                            // r15
  sp[2] = 0;                                            // r14
  sp[3] = reinterpret_cast<unsigned long long>(entry);  // r13
  sp[4] = 0;                                            // r12
  sp[5] = 0;                                            // rbx
  sp[6] = 0;                                            // rbp
  sp[7] = reinterpret_cast<unsigned long long>(&cm_emu_ctx_start);
  c.sp = sp;
}

inline void context_switch(Context& from, Context& to) { cm_emu_ctx_switch(&from.sp, to.sp); }

#else

struct Context {
  ucontext_t uc;
};

// ucontext saves and restores the floating-point environment itself.
unsigned long long current_fp_control() { return 0; }

void context_init(Context& c, char* stack_lo, char* stack_top, void (*entry)(),
                  unsigned long long) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack_lo;
  c.uc.uc_stack.ss_size = static_cast<size_t>(stack_top - stack_lo);
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

inline void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

#endif

// ---------------------------------------------------------------------------
// Fibers and the per-OS-thread worker
// ---------------------------------------------------------------------------
enum class State : unsigned char { Ready, AtBlock, AtWarp, Done };

struct Fiber : ThreadInfo {
  Context ctx;
  unsigned index = 0;  // linear thread id in the block
  State state = State::Ready;
  // Block barrier wait.
  BarrierOp bop = BarrierOp::Plain;
  int pred = 0;
  const char* file = nullptr;
  int line = 0;
  // Warp collective wait; src < 0 means "own value".
  WarpOp wop = WarpOp::Sync;
  unsigned mask = 0;
  unsigned long long value = 0;
  int src = -1;
  // Result handed back when a barrier or collective releases.
  unsigned long long result = 0;
};

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Sync: return "__syncwarp";
    case WarpOp::ShflIdx: return "__shfl_sync";
    case WarpOp::ShflUp: return "__shfl_up_sync";
    case WarpOp::ShflDown: return "__shfl_down_sync";
    case WarpOp::ShflXor: return "__shfl_xor_sync";
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::Any: return "__any_sync";
    case WarpOp::All: return "__all_sync";
    case WarpOp::Active: return "__activemask";
  }
  return "?";
}

bool same_site(const Fiber& a, const Fiber& b) {
  return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

// Reads a positive integer environment variable; 0 if unset.
bool env_positive(const char* name, unsigned long max, unsigned long& out, std::string& err) {
  out = 0;
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return true;
  char* end = nullptr;
  unsigned long v = std::strtoul(s, &end, 10);
  if (*end != '\0' || v == 0 || v > max) {
    err = format("%s=\"%s\" is not an integer in [1, %lu]", name, s, max);
    return false;
  }
  out = v;
  return true;
}

struct Worker;
__thread Worker* t_worker = nullptr;

void fiber_entry();

// Runs blocks on one OS thread. Fiber stacks and the dynamic shared buffer
// are kept between blocks and launches.
struct Worker {
  // Stacks: one lazily committed mapping, fiber i at [i*stride, (i+1)*stride).
  // No guard pages: they cost two memory mappings per fiber, and a process
  // with a few dozen workers would reach the kernel's limit on mappings.
  // Kernels that run on a GPU (1 KiB of stack per thread by default) are
  // far from overflowing 256 KiB.
  char* stacks = nullptr;
  size_t stacks_len = 0;
  size_t stack_bytes = 0;
  size_t stride = 0;
  size_t nstacks = 0;

  std::vector<Fiber> fibers;
  unsigned nthreads = 0;
  Context sched;
  unsigned long long fp_control = 0;
  BlockInfo block;

  unsigned char* dyn = nullptr;
  size_t dyn_cap = 0;
  size_t dyn_bytes = 0;

  Thunk thunk = nullptr;
  void** args = nullptr;
  unsigned done = 0;
  bool failed = false;
  std::string error;

  Worker() = default;
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;
  ~Worker() {
    if (stacks != nullptr) munmap(stacks, stacks_len);
    std::free(dyn);
  }

  bool ensure_stacks(size_t count, size_t bytes, std::string& err) {
    if (stacks != nullptr && count <= nstacks && bytes == stack_bytes) return true;
    if (stacks != nullptr) munmap(stacks, stacks_len);
    stacks = nullptr;
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    stack_bytes = bytes;
    // One spare page: room for the cache-colouring offset of stack_top, and
    // a stride that is not a multiple of a large power of two.
    stride = (bytes + page - 1) / page * page + page;
    nstacks = std::max(count, nstacks);
    stacks_len = nstacks * stride;
    void* p = mmap(nullptr, stacks_len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (p == MAP_FAILED) {
      nstacks = 0;
      err = format("cannot map %zu fiber stacks of %zu KiB", count, bytes / 1024);
      return false;
    }
    stacks = static_cast<char*>(p);
    return true;
  }

  bool prepare(const cm_emu_launch_cfg& cfg, Thunk th, void** a, size_t stack_kib,
               std::string& err) {
    const dim3 bd(cfg.block[0], cfg.block[1], cfg.block[2]);
    nthreads = bd.x * bd.y * bd.z;
    if (!ensure_stacks(nthreads, stack_kib * 1024, err)) return false;
    if (cfg.shared_bytes > dyn_cap) {
      std::free(dyn);
      dyn_cap = (cfg.shared_bytes + 63) / 64 * 64;
      dyn = static_cast<unsigned char*>(std::aligned_alloc(64, dyn_cap));
      if (dyn == nullptr) {
        dyn_cap = 0;
        err = format("cannot allocate %zu bytes of dynamic shared memory", cfg.shared_bytes);
        return false;
      }
    }
    dyn_bytes = cfg.shared_bytes;
    block.block_dim = bd;
    block.grid_dim = dim3(cfg.grid[0], cfg.grid[1], cfg.grid[2]);
    fibers.resize(nthreads);
    for (unsigned i = 0; i < nthreads; ++i) {
      Fiber& f = fibers[i];
      f.thread_idx = uint3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
      f.block = &block;
      f.lane = i % 32;
      f.index = i;
    }
    thunk = th;
    args = a;
    fp_control = current_fp_control();
    return true;
  }

  char* stack_lo(size_t i) const { return stacks + i * stride; }

  // The top of fiber i's stack, shifted by a few cache lines so that the hot
  // tops of the fibers' stacks do not all map to the same cache sets.
  char* stack_top(size_t i) const { return stacks + (i + 1) * stride - (i % 64) * 64; }

  void fail(std::string msg) {
    if (!failed) error = std::move(msg);
    failed = true;
  }

  // Fiber side: hands control to the next runnable fiber of the current
  // pass, or back to the scheduler when the pass is over. Switching between
  // fibers directly costs one context switch per hand-over instead of two.
  void yield(Fiber& f) {
    for (unsigned i = f.index + 1; i < nthreads; ++i) {
      Fiber& next = fibers[i];
      if (next.state == State::Ready) {
        t_cur = &next;
        context_switch(f.ctx, next.ctx);
        return;
      }
    }
    context_switch(f.ctx, sched);
  }

  // Fiber side: abandons the block after an error; never returns.
  [[noreturn]] void abort_fiber(Fiber& f, std::string msg) {
    fail(std::move(msg));
    context_switch(f.ctx, sched);
    std::abort();
  }

  bool run_block(uint3 idx) {
    block.block_idx = idx;
    if (dyn_bytes > 0) std::memset(dyn, 0xFF, dyn_bytes);
    for (unsigned i = 0; i < nthreads; ++i) {
      Fiber& f = fibers[i];
      f.state = State::Ready;
      context_init(f.ctx, stack_lo(i), stack_top(i), &fiber_entry, fp_control);
    }
    done = 0;
    failed = false;
    for (;;) {
      // One pass: every runnable fiber runs until it finishes or waits, the
      // first one started from here, each following one by its predecessor.
      for (unsigned i = 0; i < nthreads; ++i) {
        Fiber& f = fibers[i];
        if (f.state != State::Ready) continue;
        t_cur = &f;
        context_switch(sched, f.ctx);
        break;
      }
      t_cur = nullptr;
      if (failed) return false;
      if (done == nthreads) return true;
      if (!release()) return false;
    }
  }

  // Scheduler side, when every fiber is finished or waiting: releases what
  // can be released (warp collectives, then the block barrier, then
  // __activemask). Returns false with `error` set when nothing can progress.
  bool release() {
    bool released = false;
    for (unsigned base = 0; base < nthreads && !failed; base += 32) {
      released |= release_warp(base);
    }
    if (failed) return false;
    if (released) return true;
    if (release_block()) return true;
    if (failed) return false;
    for (unsigned base = 0; base < nthreads; base += 32) released |= release_active(base);
    if (released) return true;
    fail(describe_stuck());
    return false;
  }

  unsigned warp_size_at(unsigned base) const { return std::min(32u, nthreads - base); }

  // Lanes of the warp at `base` that exist and have not exited. CUDA only
  // requires the non-exited lanes named in a mask to take part.
  unsigned live_lanes(unsigned base) const {
    unsigned m = 0;
    for (unsigned l = 0; l < warp_size_at(base); ++l) {
      if (fibers[base + l].state != State::Done) m |= 1u << l;
    }
    return m;
  }

  // Lanes of the warp at `base` waiting in a collective other than __activemask.
  unsigned waiting_lanes(unsigned base) const {
    unsigned m = 0;
    for (unsigned l = 0; l < warp_size_at(base); ++l) {
      const Fiber& f = fibers[base + l];
      if (f.state == State::AtWarp && f.wop != WarpOp::Active) m |= 1u << l;
    }
    return m;
  }

  bool release_warp(unsigned base) {
    const unsigned live = live_lanes(base);
    const unsigned waiting = waiting_lanes(base);
    unsigned handled = 0;
    bool released = false;
    for (unsigned l = 0; l < 32; ++l) {
      if (!((waiting & ~handled) >> l & 1)) continue;
      const Fiber& lead = fibers[base + l];
      const unsigned group = lead.mask & live;
      if (group & ~waiting) continue;  // someone named in the mask is not there yet
      for (unsigned k = 0; k < 32; ++k) {
        if (!(group >> k & 1)) continue;
        const Fiber& o = fibers[base + k];
        if (o.wop != lead.wop || (o.mask & live) != group) {
          fail(format("mismatched warp collectives in warp %u: lane %u in %s(mask 0x%08x), "
                      "lane %u in %s(mask 0x%08x)",
                      base / 32, l, warp_op_name(lead.wop), lead.mask, k, warp_op_name(o.wop),
                      o.mask));
          return false;
        }
      }
      finish_collective(base, group);
      handled |= group;
      released = true;
    }
    return released;
  }

  void finish_collective(unsigned base, unsigned group) {
    const WarpOp op = fibers[base + __builtin_ctz(group)].wop;
    unsigned vote = 0;
    for (unsigned k = 0; k < 32; ++k) {
      if ((group >> k & 1) && fibers[base + k].value != 0) vote |= 1u << k;
    }
    for (unsigned k = 0; k < 32; ++k) {
      if (!(group >> k & 1)) continue;
      Fiber& f = fibers[base + k];
      switch (op) {
        case WarpOp::Sync:
        case WarpOp::Active: f.result = 0; break;
        case WarpOp::Ballot: f.result = vote; break;
        case WarpOp::Any: f.result = vote != 0; break;
        case WarpOp::All: f.result = vote == group; break;
        case WarpOp::ShflIdx:
        case WarpOp::ShflUp:
        case WarpOp::ShflDown:
        case WarpOp::ShflXor:
          if (f.src < 0) {
            f.result = f.value;
          } else if (group >> f.src & 1) {
            f.result = fibers[base + static_cast<unsigned>(f.src)].value;
          } else {
            f.result = kPoison;  // source lane absent, exited or not in the mask
          }
          break;
      }
      f.state = State::Ready;
    }
  }

  bool release_block() {
    const Fiber* first = nullptr;
    unsigned waiting = 0;
    int count = 0;
    for (unsigned i = 0; i < nthreads; ++i) {
      const Fiber& f = fibers[i];
      if (f.state == State::Done) continue;
      if (f.state != State::AtBlock) return false;
      if (first == nullptr) {
        first = &f;
      } else if (!same_site(*first, f)) {
        fail(format("threads of one block wait at different barriers: thread (%u,%u,%u) at "
                    "%s:%d, thread (%u,%u,%u) at %s:%d",
                    first->thread_idx.x, first->thread_idx.y, first->thread_idx.z, first->file,
                    first->line, f.thread_idx.x, f.thread_idx.y, f.thread_idx.z, f.file, f.line));
        return false;
      }
      ++waiting;
      count += f.pred != 0;
    }
    if (first == nullptr) return false;
    if (waiting != nthreads) {
      fail(format("__syncthreads at %s:%d reached by %u of %u threads; the others exited "
                  "(divergent barrier)",
                  first->file, first->line, waiting, nthreads));
      return false;
    }
    unsigned long long result = 0;
    switch (first->bop) {
      case BarrierOp::Plain: break;
      case BarrierOp::Count: result = static_cast<unsigned long long>(count); break;
      case BarrierOp::And: result = static_cast<unsigned>(count) == nthreads; break;
      case BarrierOp::Or: result = count > 0; break;
    }
    for (unsigned i = 0; i < nthreads; ++i) {
      fibers[i].result = result;
      fibers[i].state = State::Ready;
    }
    return true;
  }

  bool release_active(unsigned base) {
    unsigned active = 0;
    for (unsigned l = 0; l < warp_size_at(base); ++l) {
      const Fiber& f = fibers[base + l];
      if (f.state == State::AtWarp && f.wop == WarpOp::Active) active |= 1u << l;
    }
    if (active == 0) return false;
    for (unsigned l = 0; l < 32; ++l) {
      if (!(active >> l & 1)) continue;
      fibers[base + l].result = active;
      fibers[base + l].state = State::Ready;
    }
    return true;
  }

  std::string where(const Fiber& f) const {
    switch (f.state) {
      case State::Done: return "has exited";
      case State::Ready: return "is runnable";
      case State::AtBlock: return format("waits at __syncthreads (%s:%d)", f.file, f.line);
      case State::AtWarp:
        return format("waits in %s(mask 0x%08x)", warp_op_name(f.wop), f.mask);
    }
    return "?";
  }

  // Explains a block in which nothing can progress, naming one waiting thread
  // and one thread it waits for.
  std::string describe_stuck() const {
    unsigned at_block = 0, at_warp = 0;
    for (unsigned i = 0; i < nthreads; ++i) {
      at_block += fibers[i].state == State::AtBlock;
      at_warp += fibers[i].state == State::AtWarp;
    }
    std::string msg = format("deadlock: %u threads at __syncthreads, %u in warp collectives, "
                             "%u exited",
                             at_block, at_warp, done);
    for (unsigned base = 0; base < nthreads; base += 32) {
      const unsigned live = live_lanes(base);
      const unsigned waiting = waiting_lanes(base);
      for (unsigned l = 0; l < 32; ++l) {
        if (!(waiting >> l & 1)) continue;
        const Fiber& f = fibers[base + l];
        const unsigned missing = f.mask & live & ~waiting;
        if (missing == 0) continue;
        const Fiber& m = fibers[base + __builtin_ctz(missing)];
        msg += format("; thread (%u,%u,%u) %s and needs thread (%u,%u,%u), which %s",
                      f.thread_idx.x, f.thread_idx.y, f.thread_idx.z, where(f).c_str(),
                      m.thread_idx.x, m.thread_idx.y, m.thread_idx.z, where(m).c_str());
        return msg;
      }
    }
    return msg;
  }
};

Fiber& current_fiber() { return *static_cast<Fiber*>(const_cast<ThreadInfo*>(t_cur)); }

void fiber_entry() {
  Worker& w = *t_worker;
  try {
    w.thunk(w.args);
  } catch (const std::exception& e) {
    w.abort_fiber(current_fiber(), format("kernel threw an exception: %s", e.what()));
  } catch (...) {
    w.abort_fiber(current_fiber(), "kernel threw an exception");
  }
  Fiber& f = current_fiber();
  f.state = State::Done;
  ++w.done;
  w.yield(f);
  std::abort();  // a finished fiber is never resumed
}

Worker& this_worker() {
  thread_local Worker w;
  t_worker = &w;
  return w;
}

// ---------------------------------------------------------------------------
// Launches and the thread pool
// ---------------------------------------------------------------------------
struct Job {
  const cm_emu_launch_cfg* cfg;
  void** args;
  Thunk thunk;
  size_t stack_kib;
  unsigned long long total;
  unsigned max_workers;  // including the launching thread
  std::atomic<unsigned long long> next{0};
  std::atomic<bool> failed{false};
  unsigned workers = 1;  // guarded by Pool::mu
  std::mutex err_mu;
  std::string error;

  bool wants_help() const {
    return workers < max_workers && !failed.load(std::memory_order_relaxed) &&
           next.load(std::memory_order_relaxed) < total;
  }

  void fail(std::string msg) {
    std::lock_guard<std::mutex> lk(err_mu);
    if (!failed.load(std::memory_order_relaxed)) error = std::move(msg);
    failed.store(true, std::memory_order_relaxed);
  }

  // Runs blocks on the calling OS thread until none are left. Never throws:
  // the pool must always see its helpers leave.
  void work() noexcept {
    try {
      run_blocks();
    } catch (const std::exception& e) {
      fail(format("emulation runtime error: %s", e.what()));
    }
  }

  void run_blocks() {
    Worker& w = this_worker();
    std::string err;
    if (!w.prepare(*cfg, thunk, args, stack_kib, err)) {
      fail(err);
      return;
    }
    const unsigned long long gx = cfg->grid[0], gy = cfg->grid[1];
    while (!failed.load(std::memory_order_relaxed)) {
      const unsigned long long b = next.fetch_add(1, std::memory_order_relaxed);
      if (b >= total) break;
      const uint3 idx{static_cast<unsigned>(b % gx), static_cast<unsigned>(b / gx % gy),
                      static_cast<unsigned>(b / (gx * gy))};
      if (!w.run_block(idx)) {
        fail(format("block (%u,%u,%u): %s", idx.x, idx.y, idx.z, w.error.c_str()));
        break;
      }
    }
  }
};

// Process-wide pool shared by all launches (also concurrent ones from
// several host threads). Threads are created on demand and never exit.
struct Pool {
  std::mutex mu;
  std::condition_variable work_cv;  // a job was queued
  std::condition_variable done_cv;  // a helper left a job
  std::deque<Job*> jobs;
  unsigned nthreads = 0;

  void helper_loop() {
    std::unique_lock<std::mutex> lk(mu);
    for (;;) {
      Job* job = nullptr;
      work_cv.wait(lk, [&] {
        for (Job* j : jobs) {
          if (j->wants_help()) {
            job = j;
            return true;
          }
        }
        return false;
      });
      ++job->workers;
      lk.unlock();
      job->work();
      lk.lock();
      --job->workers;
      done_cv.notify_all();
    }
  }

  void run(Job& job) {
    {
      std::lock_guard<std::mutex> lk(mu);
      while (nthreads + 1 < job.max_workers) {
        std::thread([this] { helper_loop(); }).detach();
        ++nthreads;
      }
      jobs.push_back(&job);
    }
    work_cv.notify_all();
    job.work();
    std::unique_lock<std::mutex> lk(mu);
    jobs.erase(std::find(jobs.begin(), jobs.end(), &job));
    done_cv.wait(lk, [&] { return job.workers == 1; });
  }
};

// Never destroyed: detached helpers may still wait on it at exit.
Pool& pool() {
  static Pool* p = new Pool;
  return *p;
}

std::string check_config(const cm_emu_launch_cfg* cfg) {
  if (cfg == nullptr) return "null launch configuration";
  const unsigned* b = cfg->block;
  const unsigned* g = cfg->grid;
  if (b[0] == 0 || b[1] == 0 || b[2] == 0 || b[0] > 1024 || b[1] > 1024 || b[2] > 64 ||
      static_cast<unsigned long long>(b[0]) * b[1] * b[2] > kMaxBlockThreads) {
    return format("invalid block (%u,%u,%u): each dimension must be >= 1, x,y <= 1024, z <= 64, "
                  "and at most %zu threads",
                  b[0], b[1], b[2], kMaxBlockThreads);
  }
  if (g[0] == 0 || g[1] == 0 || g[2] == 0 || g[0] > 0x7fffffffu || g[1] > 65535 || g[2] > 65535) {
    return format("invalid grid (%u,%u,%u): each dimension must be >= 1, x < 2^31, y,z <= 65535",
                  g[0], g[1], g[2]);
  }
  if (cfg->shared_bytes > kMaxSharedBytes) {
    return format("%zu bytes of dynamic shared memory exceed the %zu-byte limit",
                  cfg->shared_bytes, kMaxSharedBytes);
  }
  return {};
}

}  // namespace

int block_barrier(BarrierOp op, int pred, const char* file, int line) {
  Fiber& f = current_fiber();
  f.bop = op;
  f.pred = pred;
  f.file = file;
  f.line = line;
  f.state = State::AtBlock;
  t_worker->yield(f);
  return static_cast<int>(f.result);
}

unsigned long long warp_op(WarpOp op, unsigned mask, unsigned long long value, int arg,
                           int width) {
  Fiber& f = current_fiber();
  Worker& w = *t_worker;
  const int lane = static_cast<int>(f.lane);
  if (op != WarpOp::Active && !(mask >> lane & 1)) {
    w.abort_fiber(f, format("thread (%u,%u,%u) (lane %d) calls %s with mask 0x%08x, which "
                            "does not include its own lane",
                            f.thread_idx.x, f.thread_idx.y, f.thread_idx.z, lane,
                            warp_op_name(op), mask));
  }
  int src = -1;
  if (op == WarpOp::ShflIdx || op == WarpOp::ShflUp || op == WarpOp::ShflDown ||
      op == WarpOp::ShflXor) {
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
      w.abort_fiber(f, format("%s width %d is not a power of two in [1, 32]", warp_op_name(op),
                              width));
    }
    // Source lane selection as PTX shfl.sync defines it for each mode.
    const int seg = lane & ~(width - 1);
    switch (op) {
      case WarpOp::ShflIdx: src = seg + (arg & (width - 1)); break;
      case WarpOp::ShflUp: src = lane - arg >= seg ? lane - arg : -1; break;
      case WarpOp::ShflDown: src = lane + arg < seg + width ? lane + arg : -1; break;
      default: src = (lane ^ arg) < seg + width ? lane ^ arg : -1; break;
    }
    // Out-of-range deltas or lane masks keep the lane's own value.
    if (src < 0 || src > 31 || src == lane) src = -1;
  }
  f.wop = op;
  f.mask = mask;
  f.value = value;
  f.src = src;
  f.state = State::AtWarp;
  w.yield(f);
  return f.result;
}

void trap(const char* file, int line) {
  Fiber& f = current_fiber();
  t_worker->abort_fiber(f, format("__trap() at %s:%d by thread (%u,%u,%u)", file, line,
                                  f.thread_idx.x, f.thread_idx.y, f.thread_idx.z));
}

void* dynamic_shared_raw() { return t_worker->dyn; }

}  // namespace detail

int launch(const cm_emu_launch_cfg* cfg, void** args, Thunk thunk, const char* name, char* err,
           size_t err_len) noexcept {
  using namespace detail;
  std::string msg;
  try {
    msg = check_config(cfg);
    unsigned long threads = 0, stack_kib = 0;
    if (msg.empty() && env_positive("CELLMORPH_EMU_THREADS", kMaxPoolThreads, threads, msg) &&
        env_positive("CELLMORPH_EMU_STACK_KB", 1ul << 20, stack_kib, msg)) {
      // hardware_concurrency reads /sys on every call: ask once.
      static const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
      if (threads == 0) threads = hw;
      if (stack_kib == 0) stack_kib = kDefaultStackKiB;
      stack_kib = std::max(stack_kib, 16ul);
      Job job;
      job.cfg = cfg;
      job.args = args;
      job.thunk = thunk;
      job.stack_kib = stack_kib;
      job.total = static_cast<unsigned long long>(cfg->grid[0]) * cfg->grid[1] * cfg->grid[2];
      const unsigned long long cuda_threads =
          job.total * cfg->block[0] * cfg->block[1] * cfg->block[2];
      job.max_workers = static_cast<unsigned>(
          std::min({static_cast<unsigned long long>(threads), job.total,
                    (cuda_threads + kCudaThreadsPerWorker - 1) / kCudaThreadsPerWorker}));
      if (job.max_workers == 1) {
        job.work();
      } else {
        pool().run(job);
      }
      if (job.failed.load()) msg = job.error;
    }
  } catch (const std::exception& e) {
    msg = format("emulation runtime error: %s", e.what());
  } catch (...) {
    msg = "emulation runtime error";
  }
  if (msg.empty()) return 0;
  if (err != nullptr && err_len > 0) snprintf(err, err_len, "%s: %s", name, msg.c_str());
  return 1;
}

}  // namespace cm_emu
