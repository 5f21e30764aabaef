// The SIMT emulator's state shared by its parts (not seen by kernels): emulator.cpp (fibers, the
// block scheduler, the grid launch), emulator_sync.cpp (barriers and warp collectives, called from
// kernel code), emulator_memory.cpp (shared memory, vector-access checks, MemoryScope) and
// emulator_shared.cpp (shared memory and its checks), emulator_model.cpp (the cross-block memory
// model).
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

// Shared memory of the block an OS thread runs (emulator_shared.cpp): one arena holding the
// launch's dynamic shared memory and each LOMO_SHARED array the block declares, every one of them
// between redzones; what a block's threads did to each byte since the last barrier (the race and
// initialisation checks).
struct SharedArray {
  const void* tag;  // the declaration (LOMO_SHARED's static tag); null: the dynamic shared memory
  uintptr_t lo, hi;
  const char* name;
  size_t elem;  // element size (the dynamic shared memory: 1)
};
struct ByteShadow {  // one byte of the arena
  uint32_t w_epoch = 0;  // barrier interval of its last write (before the block's first: never)
  uint32_t r_epoch = 0;  // barrier interval of the reads recorded
  uint32_t w_seq = 0;    // the writer's warp's __syncwarp count at the write
  uint32_t r_seq[2] = {0, 0};
  uint16_t w_tid = 0, r_tid[2] = {0, 0};  // linear thread ids: the last writer, two readers
  uint8_t w_atomic = 0, readers = 0;
};
struct SharedMemory {
  unsigned char* arena = nullptr;
  size_t capacity = 0, used = 0;
  std::vector<SharedArray> arrays;  // in address order
  size_t static_bytes = 0;          // what the launch limit counts: the arrays, not the redzones
  std::vector<ByteShadow> shadow;   // per arena byte, up to the high-water mark
  uint32_t epoch = 0;               // the current barrier interval (grows across blocks)
  uint32_t block_epoch = 0;         // the interval the block started in
  bool checks = true;               // LOMO_KERNELS_EMULATION_SHARED_CHECKS
  // The first read of a byte the block had not written: reported at the next barrier or the
  // block's exit unless, before that, another thread's write in the same interval shows a race.
  uintptr_t uninit_addr = 0;
  int uninit_tid = -1;
  std::vector<uint32_t> warp_seq;   // per warp: __syncwarp calls completed
  std::vector<uint32_t> met;        // per warp, per lane pair: the last __syncwarp both were in
  ~SharedMemory();
};

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
  bool shared_checks = true;         // bounds, races and initialisation of shared memory
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
  SharedMemory shared;

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

// Shared memory (emulator_shared.cpp): the block's arena with the dynamic shared memory poisoned
// (at its start); a barrier's release (a new interval; the redzones checked); the block's exit (the
// redzones checked); a completed __syncwarp (orders its lanes' shared accesses); the accesses of
// the calling OS thread checked from worker_begin to worker_end.
void shared_block_start(BlockRun& r);
void shared_barrier(BlockRun& r);
void shared_block_exit(BlockRun& r);
void shared_syncwarp(BlockRun& r, int warp, unsigned mask);
void shared_worker_begin(BlockRun& r);
void shared_worker_end();
bool shared_checks_enabled();  // LOMO_KERNELS_EMULATION_SHARED_CHECKS (default on)

// Fails the launch with `what`, naming the current block and thread; never returns to the fiber.
[[noreturn]] void fail_here(BlockRun& r, const std::string& what);
// Switches to the next runnable fiber; returns when the current one runs again.
void block_until_released(BlockRun& r);
// Releases every thread waiting at the block barrier (the last arriver calls it).
void release_block_barrier(BlockRun& r);

}  // namespace detail
}  // namespace emu
}  // namespace lomo
