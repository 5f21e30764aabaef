// The SIMT emulator's state shared by its parts (not seen by kernels): emulator.cpp (fibers, the
// block scheduler, the grid launch), emulator_sync.cpp (barriers and warp collectives, called from
// kernel code), emulator_memory.cpp (shared memory, vector-access checks, MemoryScope) and
// emulator_model.cpp (the cross-block memory model).
#pragma once

#include <ucontext.h>

#include <atomic>
#include <memory>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "cuda/emulation.h"

namespace lomo {
namespace emu {
class MemoryModel;  // emulator_model.cpp
namespace detail {

constexpr size_t kStackBytes = 64 * 1024;  // kernel frames are small; a guard page below each
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxSharedOptIn = 227 * 1024;  // H100: shared memory per block with the opt-in
constexpr size_t kDefaultShared = 48 * 1024;    // static + dynamic per block without it
constexpr size_t kMaxParamBytes = 32764;        // kernel parameters (CUDA 12.1+, Volta and later)

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
  bool cross_block;  // blocks of one launch exchange data through it (a workspace): modelled
};

struct Launch {
  LaunchSite site;
  uint3 grid, block;
  int64_t nblocks;
  int nthreads;
  size_t smem;
  size_t smem_limit;  // static + dynamic shared memory per block
  Invoke invoke;
  const void* call;
  const std::vector<MemRange>* ranges;
  int schedule;  // 0 mixed, 1 forward, 2 reverse
  int64_t order_a = 1, order_c = 0;  // the k-th block to start is (order_a * k + order_c) % nblocks
  MemoryModel* model = nullptr;      // the cross-block memory model, if on for this launch
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
  std::vector<std::pair<void*, size_t>> static_smem;  // declared (and poisoned) in this block
  size_t static_smem_bytes = 0;

  ~BlockRun();
  void reserve(int n);  // fiber stacks for n threads (kept between launches)
};

// The block the calling OS thread runs (set by the scheduler before it enters a fiber).
extern __thread BlockRun* tls_run;
// The tensors registered by MemoryScope on the calling thread, checked by its launches.
extern thread_local std::vector<MemRange> tls_ranges;
// The scratch tensors registered by cross_block_tensor, alive as long as their ranges are.
extern thread_local std::vector<at::Tensor> tls_keep_alive;

// The cross-block memory model of one launch (emulator_model.cpp): created by run_grid when the
// model is on and the launch has cross-block memory; blocks then run one at a time on the
// launching OS thread, and the scheduler tells it where each block starts and ends.
struct MemoryModelDeleter {
  void operator()(MemoryModel* m) const;
};
using MemoryModelPtr = std::unique_ptr<MemoryModel, MemoryModelDeleter>;
// Null when no range is cross-block or the model is off.
MemoryModelPtr make_memory_model(const std::vector<MemRange>& ranges);
void model_block_start(MemoryModel& m, int64_t block);
void model_block_exit(MemoryModel& m);
void model_finish(MemoryModel& m);  // publishes every store, ends the model's hooks
bool memory_model_enabled();        // LOMO_KERNELS_EMULATION_MEMORY_MODEL (default on)

// The opt-in of `kernel` to more dynamic shared memory (0: none).
size_t max_dynamic_shared(const void* kernel);

// Fails the launch with `what`, naming the current block and thread; never returns to the fiber.
[[noreturn]] void fail_here(BlockRun& r, const std::string& what);
// Switches to the next runnable fiber; returns when the current one runs again.
void block_until_released(BlockRun& r);
// Releases every thread waiting at the block barrier (the last arriver calls it).
void release_block_barrier(BlockRun& r);

}  // namespace detail
}  // namespace emu
}  // namespace lomo
