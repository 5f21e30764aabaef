// The SIMT emulator's shared memory and its checks (docs/gpu-verification.md):
//   * bounds: each array (LOMO_SHARED, and the launch's dynamic shared memory) lies in one arena
//     per OS thread between redzones; an access that falls in a redzone, or outside every array,
//     fails naming the array and the index;
//   * races: two threads of a block touch the same byte between two barriers, at least one of them
//     writing (atomics against atomics excepted), and no __syncwarp of both orders them;
//   * initialisation: a read of a byte the block has not written since it started.
// The accesses are seen by compiler instrumentation: the emulated kernels (csrc/emulated/<op>.cpp,
// probes.cpp) are compiled with -fsanitize=kernel-address and outline callbacks (setup.py), whose
// callbacks are the __asan_*_noabort functions below (hidden: nothing outside this library binds to
// them). Every load and store of those files calls one; those outside the calling OS thread's arena
// return at once. The redzones are also compared with their fill at every barrier and block exit,
// for writes the instrumentation does not see (a libc memset).
#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "emulated/emulator_internal.h"

#if defined(__SANITIZE_ADDRESS__)  // the sanitizer build (.ci/sanitize): also ASan's own check
#include <sanitizer/asan_interface.h>
#define LOMO_EMU_ASAN 1
#else
#define LOMO_EMU_ASAN 0
#endif

namespace lomo {
namespace emu {
namespace detail {

namespace {

constexpr size_t kRedzone = 256;  // before every array and after the last one
constexpr unsigned char kRedzoneFill = 0xA5;
constexpr size_t kArenaBytes = 2 * kMaxSharedOptIn;  // the arrays (<= the limit) and redzones
constexpr uint32_t kEpochLimit = 0xFFFF0000u;         // then the shadow restarts

// The calling OS thread's arena while it runs blocks with the checks on (else empty): the one test
// every instrumented access makes.
__thread uintptr_t tls_lo __attribute__((tls_model("initial-exec"))) = 0;
__thread uintptr_t tls_size __attribute__((tls_model("initial-exec"))) = 0;
// The fiber stacks: the kernels' locals, which ASan's shadow does not describe (the kernel files
// have no stack instrumentation; the sanitizer build only).
__thread uintptr_t tls_stacks_lo __attribute__((tls_model("initial-exec"))) = 0;
__thread uintptr_t tls_stacks_size __attribute__((tls_model("initial-exec"))) = 0;
// Inside an atomic (AtomicHook): its accesses are recorded once, as an atomic, by atomic_shared.
__thread int tls_atomic_depth __attribute__((tls_model("initial-exec"))) = 0;

size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

std::string thread_name(const BlockRun& r, int linear) {
  const uint3 t = r.fibers[linear].tid;
  char buf[48];
  std::snprintf(buf, sizeof(buf), "(%u,%u,%u)", t.x, t.y, t.z);
  return buf;
}

// "'name'[index]" of byte `a` of array `s` (a byte offset for the dynamic shared memory).
std::string element(const SharedArray& s, uintptr_t a) {
  const auto off = static_cast<long long>(a - s.lo);
  char buf[160];
  if (s.tag)
    std::snprintf(buf, sizeof(buf), "'%s'[%lld]", s.name,
                  off >= 0 ? off / static_cast<long long>(s.elem)
                           : -((-off + static_cast<long long>(s.elem) - 1) /
                               static_cast<long long>(s.elem)));
  else
    std::snprintf(buf, sizeof(buf), "%s, byte %lld", s.name, off);
  return buf;
}

const SharedArray* array_at(const SharedMemory& m, uintptr_t a) {
  for (const SharedArray& s : m.arrays)
    if (a >= s.lo && a < s.hi) return &s;
  return nullptr;
}

[[noreturn]] void out_of_bounds(BlockRun& r, uintptr_t a, size_t n, bool store) {
  const SharedMemory& m = r.shared;
  // The array the access belongs to: the one it starts in (and runs past), else the nearest
  // before it (past its end) or after it (before its start).
  const SharedArray* s = array_at(m, a);
  const char* where = "runs past the end of";
  if (!s) {
    const SharedArray* before = nullptr;
    const SharedArray* after = nullptr;
    for (const SharedArray& x : m.arrays) {
      if (x.hi <= a) before = &x;
      if (x.lo > a && !after) after = &x;
    }
    if (before && (!after || a - before->hi <= after->lo - a)) {
      s = before;
      where = "is past the end of";
    } else {
      s = after;
      where = "is before the start of";
    }
  }
  char buf[384];
  if (!s) {
    std::snprintf(buf, sizeof(buf), "shared-memory %s of %zu bytes outside every shared array",
                  store ? "store" : "load", n);
  } else {
    std::snprintf(buf, sizeof(buf),
                  "shared-memory %s of %zu bytes at %s %s %s (%zu bytes: %s out of bounds)",
                  store ? "store" : "load", n, element(*s, a).c_str(), where,
                  s->tag ? ("'" + std::string(s->name) + "'").c_str() : s->name,
                  static_cast<size_t>(s->hi - s->lo), store ? "write" : "read");
  }
  fail_here(r, buf);
}

// At a barrier or the block's exit: a read of memory the block never wrote, else a redzone
// overwritten without instrumentation.
void check_uninitialised(BlockRun& r) {
  const SharedMemory& m = r.shared;
  if (m.uninit_tid < 0) return;
  const SharedArray* s = array_at(m, m.uninit_addr);
  fail_here(r, "thread " + thread_name(r, m.uninit_tid) +
                   " read uninitialised shared memory: " +
                   (s ? element(*s, m.uninit_addr) : std::string("?")) +
                   " had not been written by this block (found at the next barrier or the "
                   "block's exit)");
}

void check_redzones(BlockRun& r) {
  const SharedMemory& m = r.shared;
  if (m.arrays.empty()) return;
  uintptr_t prev = reinterpret_cast<uintptr_t>(m.arena);
  const auto clean = [](uintptr_t lo, uintptr_t hi) {
    for (uintptr_t a = lo; a < hi; ++a)
      if (*reinterpret_cast<const unsigned char*>(a) != kRedzoneFill) return a;
    return uintptr_t{0};
  };
  for (size_t i = 0; i <= m.arrays.size(); ++i) {
    const uintptr_t hi = i < m.arrays.size() ? m.arrays[i].lo : prev + kRedzone;
    if (const uintptr_t bad = clean(prev, hi)) {
      const SharedArray* s = i > 0 ? &m.arrays[i - 1] : nullptr;
      char buf[256];
      std::snprintf(buf, sizeof(buf),
                    "a redzone of shared memory was overwritten at %s (a write out of bounds "
                    "that was not instrumented, e.g. by memset or memcpy; found at a barrier or "
                    "the block's exit)",
                    s ? (element(*s, bad) + " past '" + s->name + "'").c_str()
                      : (element(m.arrays[i], bad) + " before '" + m.arrays[i].name + "'").c_str());
      fail_here(r, buf);
    }
    if (i < m.arrays.size()) prev = m.arrays[i].hi;
  }
}

// Reserves `bytes` (aligned) between redzones, poisoned (0xFF: NaN, -1).
unsigned char* allocate(BlockRun& r, const void* tag, size_t bytes, size_t align, size_t elem,
                        const char* name) {
  SharedMemory& m = r.shared;
  const size_t lo = align_up(m.used + kRedzone, std::max<size_t>(align, 16));
  if (lo + bytes + kRedzone > m.capacity)
    fail_here(r, "the shared arrays of this block and their redzones exceed the emulator's arena");
  unsigned char* p = m.arena + lo;
  std::memset(m.arena + m.used, kRedzoneFill, lo - m.used);
  std::memset(p, 0xFF, bytes);
  std::memset(p + bytes, kRedzoneFill, kRedzone);
  m.used = lo + bytes;
  if (m.shadow.size() < m.used + kRedzone) m.shadow.resize(m.used + kRedzone);
  const auto a = reinterpret_cast<uintptr_t>(p);
  m.arrays.push_back({tag, a, a + bytes, name, elem});
  return p;
}

bool ordered(const SharedMemory& m, int warp_u, int lane_u, uint32_t seq_u, int warp_t, int lane_t) {
  if (warp_u != warp_t || m.met.empty()) return false;
  return m.met[(static_cast<size_t>(warp_u) * 32 + lane_u) * 32 + lane_t] > seq_u;
}

enum class Access : uint8_t { Read, Write, Atomic };

[[noreturn]] void race(BlockRun& r, uintptr_t a, Access now, int other, bool other_wrote) {
  const SharedArray* s = array_at(r.shared, a);
  const char* kinds[] = {"reads", "writes", "atomically updates"};
  char buf[384];
  std::snprintf(buf, sizeof(buf),
                "shared-memory race on %s: this thread %s it, and thread %s %s it in the same "
                "interval between barriers (no __syncthreads between the two accesses, nor a "
                "__syncwarp of both)",
                s ? element(*s, a).c_str() : "?", kinds[static_cast<int>(now)],
                thread_name(r, other).c_str(), other_wrote ? "wrote" : "read");
  fail_here(r, buf);
}

void record(BlockRun& r, uintptr_t a, size_t n, Access kind) {
  SharedMemory& m = r.shared;
  const Fiber& f = *r.cur;
  const auto t = static_cast<uint16_t>(f.linear);
  const uint32_t seq = m.warp_seq.empty() ? 0 : m.warp_seq[f.warp];
  const size_t base = a - reinterpret_cast<uintptr_t>(m.arena);
  for (size_t i = 0; i < n; ++i) {
    ByteShadow& b = m.shadow[base + i];
    const auto peer = [&](uint16_t u, uint32_t useq) {
      return u != t && !ordered(m, u / 32, u % 32, useq, f.warp, f.lane);
    };
    if (kind != Access::Write && b.w_epoch < m.block_epoch && m.uninit_tid < 0) {
      m.uninit_addr = a + i;
      m.uninit_tid = t;
    }
    if (b.w_epoch == m.epoch && peer(b.w_tid, b.w_seq) &&
        !(kind == Access::Atomic && b.w_atomic))
      race(r, a + i, kind, b.w_tid, true);
    if (kind != Access::Read && b.r_epoch == m.epoch) {
      for (int k = 0; k < b.readers; ++k)
        if (peer(b.r_tid[k], b.r_seq[k])) race(r, a + i, kind, b.r_tid[k], false);
    }
    if (kind == Access::Read) {
      if (b.r_epoch != m.epoch) {
        b.r_epoch = m.epoch;
        b.readers = 0;
      }
      int k = 0;
      while (k < b.readers && b.r_tid[k] != t) ++k;
      if (k == b.readers && b.readers < 2) ++b.readers;
      if (k < 2) {  // a third reader is not kept: two distinct ones suffice to find a writer's peer
        b.r_tid[k] = t;
        b.r_seq[k] = seq;
      }
    } else {
      b.w_epoch = m.epoch;
      b.w_tid = t;
      b.w_seq = seq;
      b.w_atomic = kind == Access::Atomic;
    }
  }
}

// Every instrumented access of the calling thread's arena: bounds, then (checks on) the shadow.
void shared_access(uintptr_t a, size_t n, Access kind) {
  BlockRun& r = *tls_run;
  if (!r.cur) return;  // the emulator itself, between fibers
  const SharedArray* s = array_at(r.shared, a);
  if (!s || a + n > s->hi) out_of_bounds(r, a, n, kind != Access::Read);
  record(r, a, n, kind);
}

inline void on_access(void* p, size_t n, bool store) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (a - tls_lo < tls_size) {
    if (tls_atomic_depth == 0) shared_access(a, n, store ? Access::Write : Access::Read);
    return;
  }
#if LOMO_EMU_ASAN
  if (a - tls_stacks_lo < tls_stacks_size) return;
  if (void* bad = __asan_region_is_poisoned(reinterpret_cast<void*>(a), n))
    __asan_report_error(__builtin_return_address(0), __builtin_frame_address(0),
                        __builtin_frame_address(0), bad, store, n);
#endif
}

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  const std::string s = v ? v : "";
  TORCH_CHECK(s.empty() || s == "0" || s == "1", name, " must be 0 or 1, got '", s, "'");
  return s != "0";
}

}  // namespace

SharedMemory::~SharedMemory() {
  if (arena) munmap(arena, capacity);
}

bool shared_checks_enabled() { return env_flag("LOMO_KERNELS_EMULATION_SHARED_CHECKS"); }

void shared_worker_begin(BlockRun& r) {
  SharedMemory& m = r.shared;
  if (!m.arena) {
    void* p = mmap(nullptr, kArenaBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "cuda_emulated: cannot map the shared-memory arena");
    m.arena = static_cast<unsigned char*>(p);
    m.capacity = kArenaBytes;
  }
  m.checks = r.L->shared_checks;
  tls_lo = m.checks ? reinterpret_cast<uintptr_t>(m.arena) : 0;
  tls_size = m.checks ? m.capacity : 0;
  tls_stacks_lo = reinterpret_cast<uintptr_t>(r.stack_base);
  tls_stacks_size = r.stack_slots * r.stack_stride;
}

void shared_worker_end() {
  tls_lo = 0;
  tls_size = 0;
  tls_stacks_lo = 0;
  tls_stacks_size = 0;
}

void shared_block_start(BlockRun& r) {
  SharedMemory& m = r.shared;
  if (m.epoch >= kEpochLimit) {
    std::fill(m.shadow.begin(), m.shadow.end(), ByteShadow{});
    m.epoch = 0;
  }
  m.block_epoch = m.epoch += 2;  // a gap: nothing the previous block did is in this interval
  m.used = 0;
  m.static_bytes = 0;
  m.arrays.clear();
  m.uninit_tid = -1;
  m.warp_seq.clear();
  m.met.clear();
  if (r.L->smem) allocate(r, nullptr, r.L->smem, 16, 1, "the dynamic shared memory");
}

void shared_barrier(BlockRun& r) {
  if (!r.shared.checks) return;
  ++r.shared.epoch;
  check_uninitialised(r);
  check_redzones(r);
}

void shared_block_exit(BlockRun& r) {
  if (!r.shared.checks) return;
  check_uninitialised(r);
  check_redzones(r);
}

void shared_syncwarp(BlockRun& r, int warp, unsigned mask) {
  SharedMemory& m = r.shared;
  if (!m.checks) return;
  if (m.warp_seq.empty()) {
    m.warp_seq.assign(static_cast<size_t>(r.nwarps), 0);
    m.met.assign(static_cast<size_t>(r.nwarps) * 32 * 32, 0);
  }
  const uint32_t seq = ++m.warp_seq[warp];
  for (unsigned u = 0; u < 32; ++u) {
    if (!(mask >> u & 1u)) continue;
    for (unsigned t = 0; t < 32; ++t)
      if (mask >> t & 1u) m.met[(static_cast<size_t>(warp) * 32 + u) * 32 + t] = seq;
  }
}

}  // namespace detail

using namespace detail;

void* static_shared_memory(const void* tag, size_t bytes, size_t align, size_t elem,
                           const char* name) {
  BlockRun& r = *tls_run;
  SharedMemory& m = r.shared;
  for (const SharedArray& s : m.arrays)
    if (s.tag == tag) return reinterpret_cast<void*>(s.lo);  // declared by an earlier thread
  m.static_bytes += bytes;
  if (m.static_bytes + r.L->smem > r.L->smem_limit) {
    char buf[256];
    std::snprintf(buf, sizeof(buf),
                  "%zu bytes of static shared memory (up to '%s') and %zu dynamic exceed the %zu "
                  "a block may use%s",
                  m.static_bytes, name, r.L->smem, r.L->smem_limit,
                  r.L->smem_limit == kDefaultShared ? " without the opt-in" : "");
    fail_here(r, buf);
  }
  return allocate(r, tag, bytes, align, elem, name);
}

unsigned char* dynamic_shared_memory() {
  BlockRun& r = *tls_run;
  if (!r.L->smem) fail_here(r, "dynamic shared memory used but the launch requested 0 bytes");
  return reinterpret_cast<unsigned char*>(r.shared.arrays.front().lo);
}

void atomic_shared(const void* p, size_t bytes, int depth) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (depth > 0 && a - tls_lo < tls_size && tls_atomic_depth == 0) shared_access(a, bytes, Access::Atomic);
  tls_atomic_depth += depth;
}

void check_launch_bounds(int max_threads) {
  BlockRun& r = *tls_run;
  if (r.nthreads <= max_threads) return;
  char buf[160];
  std::snprintf(buf, sizeof(buf),
                "a block of %d threads launched for a kernel declared __launch_bounds__(%d) (a "
                "GPU refuses the launch: too many resources requested)",
                r.nthreads, max_threads);
  fail_here(r, buf);
}

}  // namespace emu
}  // namespace lomo

// The instrumentation's callbacks (see the top of this file). Hidden: the emulated kernels of this
// library call them; nothing else binds to them (in the sanitizer build libasan has its own).
#define LOMO_EMU_HOOK __attribute__((visibility("hidden"))) void
extern "C" {
#define LOMO_EMU_SIZED_HOOKS(n)                                                                 \
  LOMO_EMU_HOOK __asan_load##n##_noabort(void* a) { lomo::emu::detail::on_access(a, n, false); } \
  LOMO_EMU_HOOK __asan_store##n##_noabort(void* a) { lomo::emu::detail::on_access(a, n, true); }
LOMO_EMU_SIZED_HOOKS(1)
LOMO_EMU_SIZED_HOOKS(2)
LOMO_EMU_SIZED_HOOKS(4)
LOMO_EMU_SIZED_HOOKS(8)
LOMO_EMU_SIZED_HOOKS(16)
#undef LOMO_EMU_SIZED_HOOKS
LOMO_EMU_HOOK __asan_loadN_noabort(void* a, size_t n) { lomo::emu::detail::on_access(a, n, false); }
LOMO_EMU_HOOK __asan_storeN_noabort(void* a, size_t n) { lomo::emu::detail::on_access(a, n, true); }
#if !LOMO_EMU_ASAN  // else libasan's
LOMO_EMU_HOOK __asan_handle_no_return() {}
LOMO_EMU_HOOK __asan_before_dynamic_init(const char*) {}
LOMO_EMU_HOOK __asan_after_dynamic_init() {}
#endif
}
