// The SIMT emulator's state shared by its parts (not seen by kernels): emulator.cpp (fibers, the
// block scheduler, the grid launch), emulator_sync.cpp (barriers and warp collectives, called from
// kernel code) and emulator_memory.cpp (shared memory, vector-access checks, MemoryScope).
#pragma once

#include <ucontext.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "cuda/emulation.h"

namespace lomo {
namespace emu {
namespace detail {

constexpr size_t kStackBytes = 64 * 1024;  // kernel frames are small; a guard page below each
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxDynamicSmem = 227 * 1024;  // H100: the opt-in maximum per block

enum class Wait : uint8_t { None, Block, Warp, Exited };

struct Fiber {
  void* sp = nullptr;            // asm switch: saved stack pointer
  ucontext_t* uc = nullptr;      // ucontext switch
  char* stack_top = nullptr;     // 16-byte aligned
  uint3 tid{};
  int linear = 0, lane = 0, warp = 0;
  Wait wait = Wait::None;
  unsigned wmask = 0;            // pending warp collective: mask, kind, contribution, source lane
  Collective wkind = Collective::SyncWarp;
  uint64_t wvalue = 0;
  unsigned wsrc = 0;
  uint64_t wresult = 0;          // written by the lane that completes the collective
  int sync_result = 0;
};

struct WarpState {
  unsigned arrived, exited, members;
};

struct MemRange {
  uintptr_t storage_lo, storage_hi, view_lo, view_hi;
  const char* name;
};

struct Launch {
  LaunchSite site;
  uint3 grid, block;
  int64_t nblocks;
  int nthreads;
  size_t smem;
  Invoke invoke;
  const void* call;
  const std::vector<MemRange>* ranges;
  int schedule;  // 0 mixed, 1 forward, 2 reverse
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::string error;
};

enum class Switcher { Asm, Ucontext };

// Per OS thread: the fibers (stacks are kept between launches) and the state of the block it runs.
struct BlockRun {
  Launch* L = nullptr;
  Switcher switcher = Switcher::Asm;
  std::vector<Fiber> fibers;
  std::vector<int> order;  // schedule order (linear thread ids), warps contiguous
  std::vector<int> pos;    // position of each thread in `order`
  WarpState warps[kMaxThreads / 32];
  int nthreads = 0, nwarps = 0, live = 0, arrived = 0;
  BlockSync bkind = BlockSync::Plain;
  int count = 0;  // predicates that were non-zero at the pending block barrier
  Fiber* cur = nullptr;
  void* main_sp = nullptr;
  ucontext_t main_uc;
  bool failed = false;
  std::string error;
  int64_t switches = 0;
  char* stack_base = nullptr;
  size_t stack_slots = 0, stack_stride = 0;
  std::vector<unsigned char> smem_buf;
  unsigned char* smem = nullptr;

  ~BlockRun();
  void reserve(int n);  // fiber stacks for n threads (kept between launches)
};

// The block the calling OS thread runs (set by the scheduler before it enters a fiber).
extern __thread BlockRun* tls_run;
// The tensors registered by MemoryScope on the calling thread, checked by its launches.
extern thread_local std::vector<MemRange> tls_ranges;

// Fails the launch with `what`, naming the current block and thread; never returns to the fiber.
[[noreturn]] void fail_here(BlockRun& r, const std::string& what);
// Switches to the next runnable fiber; returns when the current one runs again.
void block_until_released(BlockRun& r);
// Releases every thread waiting at the block barrier (the last arriver calls it).
void release_block_barrier(BlockRun& r);

}  // namespace detail
}  // namespace emu
}  // namespace lomo
