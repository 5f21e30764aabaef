// The SIMT emulator behind csrc/cuda/emulation.h: fibers, the block scheduler and the grid launch
// (barriers and warp collectives: emulator_sync.cpp; memory checks: emulator_memory.cpp). Built into
// lomo_kernels._C with LOMO_KERNELS_CUDA_EMULATION=1.
//
// Threads of a block are fibers on one OS thread. A fiber runs until it blocks (a barrier or a warp
// collective whose other participants have not arrived) or exits; the scheduler then switches
// directly to the next runnable fiber of the same warp, else of the next warp ("warp-greedy": one
// warp runs ahead of the others until a block barrier, as warps do on a GPU). The last arriver at a
// barrier releases the others and carries on. Schedule variants per block (warp order, lane order)
// make code whose result depends on the interleaving fail in some block.
//
// Context switch: on x86-64 a few instructions (the callee-saved registers and the stack pointer;
// the SSE/x87 control words are shared by all fibers, which never change them); elsewhere, or with
// LOMO_KERNELS_EMULATION_FIBERS=ucontext, glibc's swapcontext (a signal-mask syscall per switch).
//
// Blocks start in a reversed or shuffled order (per launch). A launch with cross-block memory (a
// workspace) runs under the memory model of emulator_model.cpp, its blocks one at a time.
//
// Environment: LOMO_KERNELS_EMULATION_THREADS=n (OS threads running blocks; default torch's
// intra-op thread count, 1 to debug), LOMO_KERNELS_EMULATION_SCHEDULE=mixed|forward|reverse,
// LOMO_KERNELS_EMULATION_MEMORY_MODEL=1|0 (default 1), LOMO_KERNELS_EMULATION_SEED=n (block order),
// LOMO_KERNELS_EMULATION_SHARED_CHECKS=1|0 (default 1: bounds, races and initialisation of shared
// memory, emulator_shared.cpp).
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda/emulation.h"
#include "emulated/emulation_api.h"
#include "emulated/emulator_internal.h"

__thread uint3 threadIdx;
__thread uint3 blockIdx;
__thread uint3 blockDim;
__thread uint3 gridDim;


#if defined(__x86_64__) && defined(__linux__)
#define LOMO_EMU_ASM_SWITCH 1
// lomo_emu_switch(&save_sp, next_sp): push the callee-saved registers, save the stack pointer,
// load the other fiber's and pop its registers. A new fiber's stack holds seven words: six
// registers (rbx = its Fiber*, r12 = the entry function) and the return address of the trampoline,
// which calls entry(fiber) with an ABI-aligned stack.
extern "C" void lomo_emu_switch(void** save_sp, void* next_sp);
extern "C" void lomo_emu_trampoline();
asm(R"(
  .text
  .p2align 4
  .globl lomo_emu_switch
  .hidden lomo_emu_switch
  .type lomo_emu_switch,@function
lomo_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lomo_emu_switch, .-lomo_emu_switch
  .p2align 4
  .globl lomo_emu_trampoline
  .hidden lomo_emu_trampoline
  .type lomo_emu_trampoline,@function
lomo_emu_trampoline:
  movq %rbx, %rdi
  callq *%r12
  ud2
  .size lomo_emu_trampoline, .-lomo_emu_trampoline
)");
#else
#define LOMO_EMU_ASM_SWITCH 0
#endif

#if defined(__SANITIZE_ADDRESS__)  // the sanitizer build (.ci/sanitize): ASan is told of every switch
#include <pthread.h>
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace lomo {
namespace emu {
namespace detail {

__thread BlockRun* tls_run = nullptr;

// AddressSanitizer follows the fibers' stacks (its fiber API): before a switch, the stack it goes
// to; after it, on the stack that runs again.
#if defined(__SANITIZE_ADDRESS__)
__thread const void* tls_main_stack = nullptr;
__thread size_t tls_main_stack_size = 0;
void asan_leaving(void** fake, const Fiber* to) {
  if (!tls_main_stack) {  // the OS thread's own stack, where blocks start and end
    pthread_attr_t a;
    void* lo = nullptr;
    pthread_getattr_np(pthread_self(), &a);
    pthread_attr_getstack(&a, &lo, &tls_main_stack_size);
    pthread_attr_destroy(&a);
    tls_main_stack = lo;
  }
  if (to)
    __sanitizer_start_switch_fiber(fake, to->stack_top - kStackBytes, kStackBytes);
  else
    __sanitizer_start_switch_fiber(fake, tls_main_stack, tls_main_stack_size);
}
void asan_arrived(void* fake) { __sanitizer_finish_switch_fiber(fake, nullptr, nullptr); }
// A fiber leaves its stack for good from inside its frames (switch_to_main), so their redzones stay
// poisoned: a fresh fiber on the same stack clears them, or its first frames (ASan's own, in
// __asan_handle_no_return) are reported as overflowing a previous block's stale redzone.
void asan_fresh_stack(const Fiber& f) {
  __asan_unpoison_memory_region(f.stack_top - kStackBytes, kStackBytes);
}
#else
inline void asan_leaving(void**, const Fiber*) {}
inline void asan_arrived(void*) {}
inline void asan_fresh_stack(const Fiber&) {}
#endif

BlockRun::~BlockRun() {
  if (stack_base) munmap(stack_base, stack_slots * stack_stride);
  for (Fiber& f : fibers) delete f.uc;
}

void BlockRun::reserve(int n) {
  if (static_cast<size_t>(n) <= stack_slots) return;
  if (stack_base) munmap(stack_base, stack_slots * stack_stride);
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  stack_stride = kStackBytes + page;
  stack_slots = static_cast<size_t>(kMaxThreads);
  void* m = mmap(nullptr, stack_slots * stack_stride, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(m != MAP_FAILED, "cuda_emulated: cannot map fiber stacks");
  stack_base = static_cast<char*>(m);
  fibers.resize(stack_slots);
  for (size_t i = 0; i < stack_slots; ++i) {
    char* lo = stack_base + i * stack_stride;
    mprotect(lo, page, PROT_NONE);  // overflow faults instead of corrupting the next stack
    fibers[i].stack_top = lo + stack_stride;
  }
}

struct Stats {
  std::atomic<int64_t> launches{0}, blocks{0}, threads{0}, switches{0};
};
Stats g_stats;

thread_local std::unique_ptr<BlockRun> tls_run_owner;

BlockRun& run_of_this_thread() {
  if (!tls_run_owner) tls_run_owner = std::make_unique<BlockRun>();
  tls_run = tls_run_owner.get();
  return *tls_run;
}

std::string kernel_name(const char* text) {
  int depth = 0;
  const char* p = text;
  for (; *p; ++p) {
    if (*p == '<' || *p == '(') ++depth;
    if (*p == '>' || *p == ')') --depth;
    if (*p == ',' && depth == 0) break;
  }
  return std::string(text, p);
}

std::string where(const BlockRun& r) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "block (%u,%u,%u) thread (%u,%u,%u)", blockIdx.x, blockIdx.y,
                blockIdx.z, r.cur ? r.cur->tid.x : 0u, r.cur ? r.cur->tid.y : 0u,
                r.cur ? r.cur->tid.z : 0u);
  return buf;
}

void fiber_main(Fiber* f);

void switch_to(BlockRun& r, Fiber* from, Fiber* to) {
  r.cur = to;
  ++r.switches;
  threadIdx = to->tid;
  void* fake = nullptr;
  asan_leaving(&fake, to);
  if (r.switcher == Switcher::Asm) {
#if LOMO_EMU_ASM_SWITCH
    lomo_emu_switch(&from->sp, to->sp);
#endif
  } else {
    swapcontext(from->uc, to->uc);
  }
  asan_arrived(fake);
}

[[noreturn]] void switch_to_main(BlockRun& r) {
  Fiber* from = r.cur;
  r.cur = nullptr;
  asan_leaving(nullptr, nullptr);  // this fiber's stack is left for good
  if (r.switcher == Switcher::Asm) {
#if LOMO_EMU_ASM_SWITCH
    lomo_emu_switch(&from->sp, r.main_sp);
#endif
  } else {
    swapcontext(from->uc, &r.main_uc);
  }
  __builtin_trap();  // an exited or failed fiber is never resumed
}

void ucontext_entry() { fiber_main(tls_run->cur); }

void start_fiber(BlockRun& r, Fiber& f) {
  asan_fresh_stack(f);
  if (r.switcher == Switcher::Asm) {
    void** sp = reinterpret_cast<void**>(f.stack_top - 72);
    sp[0] = sp[1] = sp[2] = nullptr;                      // r15 r14 r13
    sp[3] = reinterpret_cast<void*>(&fiber_main);          // r12
    sp[4] = &f;                                            // rbx
    sp[5] = nullptr;                                       // rbp
#if LOMO_EMU_ASM_SWITCH
    sp[6] = reinterpret_cast<void*>(&lomo_emu_trampoline);  // return address
#endif
    f.sp = sp;
  } else {
    if (!f.uc) f.uc = new ucontext_t;
    getcontext(f.uc);
    f.uc->uc_stack.ss_sp = f.stack_top - kStackBytes;
    f.uc->uc_stack.ss_size = kStackBytes;
    f.uc->uc_link = nullptr;
    makecontext(f.uc, &ucontext_entry, 0);
  }
}

[[noreturn]] void fail_here(BlockRun& r, const std::string& what) {
  r.failed = true;
  r.error = where(r) + ": " + what;
  switch_to_main(r);
}

std::string describe_waits(const BlockRun& r) {
  std::string s;
  int shown = 0;
  for (int t = 0; t < r.nthreads && shown < 8; ++t) {
    const Fiber& f = r.fibers[t];
    if (f.wait == Wait::Exited) continue;
    char buf[96];
    std::snprintf(buf, sizeof(buf), "%sthread %d waits at %s", shown ? ", " : "", t,
                  f.wait == Wait::Block ? "__syncthreads" : "a warp collective");
    s += buf;
    ++shown;
  }
  return s;
}

// Switch to the next runnable fiber: the current warp's lanes first (in schedule order, cyclic),
// then the following warps. Returns when the current fiber runs again.
void block_until_released(BlockRun& r) {
  Fiber* self = r.cur;
  const int p = r.pos[self->linear];
  const int w0 = p / 32 * 32, wn = std::min(32, r.nthreads - w0);
  for (int k = 1; k < wn; ++k) {
    Fiber& f = r.fibers[r.order[w0 + (p - w0 + k) % wn]];
    if (f.wait == Wait::None) return switch_to(r, self, &f);
  }
  for (int k = wn; k < r.nthreads; ++k) {
    Fiber& f = r.fibers[r.order[(w0 + k) % r.nthreads]];
    if (f.wait == Wait::None) return switch_to(r, self, &f);
  }
  if (self->wait == Wait::None) return;  // released while looking (cannot happen: no preemption)
  fail_here(r, "deadlock: no thread can proceed (" + describe_waits(r) + ")");
}

void release_block_barrier(BlockRun& r) {
  int result = 0;
  switch (r.bkind) {
    case BlockSync::Plain: break;
    case BlockSync::Count: result = r.count; break;
    case BlockSync::And: result = r.count == r.arrived; break;
    case BlockSync::Or: result = r.count > 0; break;
  }
  for (int t = 0; t < r.nthreads; ++t) {
    Fiber& f = r.fibers[t];
    if (f.wait == Wait::Block) f.wait = Wait::None;
    f.sync_result = result;  // read by each waiter when it resumes
  }
  r.arrived = 0;
  r.count = 0;
  shared_barrier(r);  // a new interval for the race check
}

[[noreturn]] void exit_current(BlockRun& r) {
  Fiber* f = r.cur;
  WarpState& w = r.warps[f->warp];
  const unsigned bit = 1u << f->lane;
  f->wait = Wait::Exited;
  w.exited |= bit;
  --r.live;
  for (unsigned l = 0; l < 32; ++l) {  // a lane that still waits for this one would hang
    if (!(w.arrived >> l & 1u)) continue;
    const Fiber& o = r.fibers[f->warp * 32 + l];
    if (o.wait == Wait::Warp && (o.wmask & bit))
      fail_here(r, "exits while lane " + std::to_string(l) +
                       " waits for it in a warp collective (mask includes an exited lane)");
  }
  if (r.arrived > 0 && r.arrived == r.live) release_block_barrier(r);
  for (int k = 1; k <= r.nthreads; ++k) {
    Fiber& n = r.fibers[r.order[(r.pos[f->linear] + k) % r.nthreads]];
    if (n.wait == Wait::None) {
      switch_to(r, f, &n);
      __builtin_trap();
    }
  }
  if (r.live > 0) fail_here(r, "deadlock after this thread exited (" + describe_waits(r) + ")");
  shared_block_exit(r);
  switch_to_main(r);
}

void fiber_main(Fiber* f) {
  asan_arrived(nullptr);
  BlockRun& r = *tls_run;
  (void)f;
  r.L->invoke(r.L->call);
  exit_current(r);
}

void init_block(BlockRun& r, const Launch& L, int64_t b) {
  blockIdx = {static_cast<unsigned>(b % L.grid.x),
              static_cast<unsigned>(b / L.grid.x % L.grid.y),
              static_cast<unsigned>(b / (static_cast<int64_t>(L.grid.x) * L.grid.y))};
  const int n = L.nthreads;
  r.nthreads = n;
  r.nwarps = (n + 31) / 32;
  r.live = n;
  r.arrived = 0;
  r.count = 0;
  r.failed = false;
  r.cur = nullptr;
  for (int t = 0; t < n; ++t) {
    Fiber& f = r.fibers[t];
    f.tid = {t % L.block.x, t / L.block.x % L.block.y, t / (L.block.x * L.block.y)};
    f.linear = t;
    f.lane = t % 32;
    f.warp = t / 32;
    f.wait = Wait::None;
    f.wmask = 0;
    f.sync_result = 0;
    start_fiber(r, f);
  }
  for (int w = 0; w < r.nwarps; ++w) {
    const int lanes = std::min(32, n - w * 32);
    r.warps[w].arrived = r.warps[w].exited = 0;
    r.warps[w].members = lanes == 32 ? 0xFFFFFFFFu : (1u << lanes) - 1u;
  }
  // Schedule variant: bit 0 reverses the warp order, bit 1 the lane order.
  int variant = L.schedule == 1 ? 0 : L.schedule == 2 ? 3 : static_cast<int>(b & 3);
  r.order.resize(n);
  r.pos.resize(n);
  int k = 0;
  for (int ws = 0; ws < r.nwarps; ++ws) {
    const int w = (variant & 1) ? r.nwarps - 1 - ws : ws;
    const int lanes = std::min(32, n - w * 32);
    for (int ls = 0; ls < lanes; ++ls) {
      const int t = w * 32 + ((variant & 2) ? lanes - 1 - ls : ls);
      r.order[k] = t;
      r.pos[t] = k++;
    }
  }
  shared_block_start(r);  // arrays are placed (and poisoned) when the block first declares them
}

void run_block(BlockRun& r, Launch& L, int64_t k) {
  const auto b = static_cast<int64_t>(
      (static_cast<unsigned __int128>(L.order_a) * static_cast<uint64_t>(k) +
       static_cast<uint64_t>(L.order_c)) % static_cast<uint64_t>(L.nblocks));
  if (L.model) model_block_start(*L.model, b);
  init_block(r, L, b);
  Fiber* first = &r.fibers[r.order[0]];
  r.cur = first;
  threadIdx = first->tid;
  ++r.switches;
  void* fake = nullptr;
  asan_leaving(&fake, first);
  if (r.switcher == Switcher::Asm) {
#if LOMO_EMU_ASM_SWITCH
    lomo_emu_switch(&r.main_sp, first->sp);
#endif
  } else {
    swapcontext(&r.main_uc, first->uc);
  }
  asan_arrived(fake);
  if (r.failed) {
    std::lock_guard<std::mutex> lock(L.error_mutex);
    if (!L.failed.exchange(true)) L.error = r.error;
  } else if (L.model) {
    model_block_exit(*L.model);
  }
}

void worker(Launch& L, Switcher switcher) {
  BlockRun& r = run_of_this_thread();
  r.reserve(L.nthreads);
  r.L = &L;
  r.switcher = switcher;
  r.switches = 0;
  shared_worker_begin(r);
  blockDim = L.block;
  gridDim = L.grid;
  int64_t blocks = 0;
  for (int64_t b; !L.failed.load(std::memory_order_relaxed) && (b = L.next.fetch_add(1)) < L.nblocks;
       ++blocks)
    run_block(r, L, b);
  g_stats.blocks += blocks;
  g_stats.threads += blocks * L.nthreads;
  g_stats.switches += r.switches;
  shared_worker_end();
  r.L = nullptr;
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  TORCH_CHECK(end && *end == '\0' && x >= 1 && x <= 4096, name, " must be a positive integer, got '",
              v, "'");
  return static_cast<int>(x);
}

Switcher switcher_from_env() {
  const char* v = std::getenv("LOMO_KERNELS_EMULATION_FIBERS");
  const std::string s = v ? v : "";
  TORCH_CHECK(s.empty() || s == "asm" || s == "ucontext",
              "LOMO_KERNELS_EMULATION_FIBERS must be 'asm' or 'ucontext', got '", s, "'");
  if (s == "ucontext" || !LOMO_EMU_ASM_SWITCH) return Switcher::Ucontext;
  return Switcher::Asm;
}

int schedule_from_env() {
  const char* v = std::getenv("LOMO_KERNELS_EMULATION_SCHEDULE");
  const std::string s = v ? v : "";
  TORCH_CHECK(s.empty() || s == "mixed" || s == "forward" || s == "reverse",
              "LOMO_KERNELS_EMULATION_SCHEDULE must be mixed, forward or reverse, got '", s, "'");
  return s == "forward" ? 1 : s == "reverse" ? 2 : 0;
}

// The order blocks start in: reversed on even launches, a shuffle (an affine permutation seeded by
// the launch number and LOMO_KERNELS_EMULATION_SEED) on odd ones, so that code which relies on
// block order (the last ticket taken by the last block, ...) fails.
void choose_block_order(Launch& L, int64_t launch) {
  const int64_t n = L.nblocks;
  const int64_t seed = launch + env_int("LOMO_KERNELS_EMULATION_SEED", 1);
  if (n <= 1) return;
  if (seed % 2 == 0) {
    L.order_a = n - 1;  // (n - 1) * k + (n - 1) == n - 1 - k (mod n)
    L.order_c = n - 1;
    return;
  }
  static const int64_t primes[] = {1000003, 7919, 104729, 15485863, 2147483647};
  for (int64_t p : primes) {
    if (n % p != 0) {
      L.order_a = p % n;
      break;
    }
  }
  L.order_c = (seed * 2654435761LL) % n;
}

// Runs the model's hooks for one launch on the launching thread and publishes every store at the
// end, whether or not the launch failed.
struct ModelScope {
  explicit ModelScope(MemoryModel* m) : model(m) { tls_model = m; }
  ~ModelScope() {
    if (model) model_finish(*model);
    tls_model = nullptr;
  }
  MemoryModel* model;
};

}  // namespace detail

using namespace detail;

// ------------------------------------------------------------------------------------------
// Launch
// ------------------------------------------------------------------------------------------
void run_grid(const LaunchSite& site, const void* kernel, size_t param_bytes, dim3 grid,
              dim3 block, size_t smem, Invoke invoke, const void* call) {
  const int64_t threads = static_cast<int64_t>(block.x) * block.y * block.z;
  const std::string name = kernel_name(site.text);
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7FFFFFFFu &&
                  grid.y <= 65535 && grid.z <= 65535,
              "cuda_emulated: invalid grid (", grid.x, ", ", grid.y, ", ", grid.z, ") for ", name,
              " at ", site.file, ":", site.line);
  TORCH_CHECK(threads >= 1 && threads <= kMaxThreads && block.x <= 1024 && block.y <= 1024 &&
                  block.z <= 64,
              "cuda_emulated: invalid block (", block.x, ", ", block.y, ", ", block.z, ") for ",
              name, " at ", site.file, ":", site.line);
  // What a GPU refuses at launch (cudaErrorInvalidValue) or nvcc at compile time.
  TORCH_CHECK(param_bytes <= kMaxParamBytes, "cuda_emulated: the parameters of ", name, " take ",
              param_bytes, " bytes, more than a kernel's ", kMaxParamBytes, " at ", site.file, ":",
              site.line);
  const size_t opt_in = max_dynamic_shared(kernel);
  TORCH_CHECK(smem <= std::max(opt_in, kDefaultShared), "cuda_emulated: ", smem,
              " bytes of dynamic shared memory for ", name, " at ", site.file, ":", site.line,
              " exceed the ", std::max(opt_in, kDefaultShared), " a block may use ",
              opt_in ? "(the kernel's opt-in)"
                     : "without the opt-in (cudaFuncSetAttribute(kernel, "
                       "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes))");
  const int64_t launch = g_stats.launches++;
  Launch L;
  L.site = site;
  L.grid = {grid.x, grid.y, grid.z};
  L.block = {block.x, block.y, block.z};
  L.nblocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  L.nthreads = static_cast<int>(threads);
  L.smem = smem;
  L.smem_limit = opt_in ? kMaxSharedOptIn : kDefaultShared;
  L.invoke = invoke;
  L.call = call;
  L.ranges = &tls_ranges;
  L.schedule = schedule_from_env();
  L.shared_checks = shared_checks_enabled();
  const Switcher switcher = switcher_from_env();
  choose_block_order(L, launch);
  const MemoryModelPtr model = make_memory_model(tls_ranges);
  L.model = model.get();
  // Under the memory model the blocks run one at a time (it finds their stores by comparison).
  const int os_threads = model ? 1 : static_cast<int>(std::min<int64_t>(
      env_int("LOMO_KERNELS_EMULATION_THREADS", at::get_num_threads()), L.nblocks));
  const ModelScope model_scope(L.model);
  if (os_threads <= 1) {
    worker(L, switcher);
  } else {
    at::parallel_for(0, os_threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) worker(L, switcher);
    });
  }
  TORCH_CHECK(!L.failed.load(), "cuda_emulated: ", name, " (", site.file, ":", site.line, "), ",
              L.error);
}

// ------------------------------------------------------------------------------------------
// emulation_api.h
// ------------------------------------------------------------------------------------------
int64_t launch_count() { return g_stats.launches.load(); }

void reset_launch_count() { g_stats.launches = 0; }

EmulationStats stats() {
  return {g_stats.launches.load(), g_stats.blocks.load(), g_stats.threads.load(),
          g_stats.switches.load(), switcher_from_env() == Switcher::Asm ? "asm" : "ucontext"};
}

}  // namespace emu
}  // namespace lomo
