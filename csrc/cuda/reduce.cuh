// Deterministic cross-block finalisation for the update kernels: a block that finished its part
// takes an integer ticket; the one that arrives last reads every block's partial result and reduces
// them in a fixed order (no floating-point atomics, no extra launch, no host synchronisation).
// Every counter is reset by its last arrival, so a workspace is reusable by the next call.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cuda/vec.cuh"

// A kernel parameter read in place (no local copy) even when indexed at run time.
#ifndef __grid_constant__
#define __grid_constant__
#endif

namespace lomo {
namespace LOMO_CUDA_NS {

// Host: fills `call` (a multi-tensor launch's argument: records t[], count) with the records
// ts[begin, begin + capacity) and numbers their tiles; returns the tiles, the launch's grid size.
template <class Call, class Record>
int fill_records(Call& call, const std::vector<Record>& ts, size_t begin, size_t capacity) {
  call.count = 0;
  int tiles = 0;
  for (size_t i = begin; i < std::min(ts.size(), begin + capacity); ++i) {
    call.t[call.count] = ts[i];
    call.t[call.count].first = tiles;
    tiles += ts[i].tiles;
    ++call.count;
  }
  return tiles;
}

// True in every thread of the block that arrives last of `count` at `counter` (all threads of the
// block call it). The barrier first: every thread's global writes happen before thread 0 passes
// it. Then thread 0 alone fences (cumulative: it makes the writes it has observed through the
// barrier visible at device scope) and takes the ticket with an acq_rel atomic: release for this
// block's writes, acquire of every earlier block's. The second barrier hands that on to the
// block's other threads, which read the others' partials with __ldcg (L1 is not coherent). One
// fence per block and ticket (the cooperative-groups grid-sync / CUTLASS semaphore idiom), not
// one per warp.
__device__ __forceinline__ bool last_arrival(int* counter, int count, int* flag) {
  __syncthreads();
  if (fresh_thread_index() == 0) {
    __threadfence();
    const bool last = atomic_add_acq_rel(counter, 1) == count - 1;
    if (last) atomicExch(counter, 0);  // every other block of this launch has counted already
    *flag = last;
  }
  __syncthreads();
  return *flag != 0;
}

// sum(a[0 .. count)) by one block in a fixed order (thread t: t, t + kThreads, ..., then the fixed
// block tree), in double; valid in every thread.
__device__ __forceinline__ double sum_in_order(const float* a, int64_t count, double* smem) {
  double acc = 0.0;
  for (int64_t i = fresh_thread_index(); i < count; i += kThreads) acc += __ldcg(a + i);
  return block_sum<kThreads>(acc, smem);
}

// max over a[0 .. count) of the non-negative flags (any bad element), valid in every thread.
__device__ __forceinline__ bool any_in(const float* a, int64_t count) {
  bool any = false;
  for (int64_t i = fresh_thread_index(); i < count; i += kThreads) any |= __ldcg(a + i) > 0.0f;
  return __syncthreads_or(any) != 0;
}

// Stochastic-rounding bits of element e + k of a pack that starts at element e: the hash's high
// word is hoisted per pack, unless the pack crosses a multiple of 2**32 (only peeled packs can).
__device__ __forceinline__ uint32_t pack_bits(uint32_t key, uint32_t hk, int64_t e, int k,
                                              bool crosses) {
  return crosses ? random_bits(key, static_cast<uint64_t>(e + k))
                 : mix32(static_cast<uint32_t>(e + k) ^ hk);
}

// Carves a workspace: float data from the front, integer tickets from the back. One workspace
// serves many shapes and ops in turn and a call resets only its own tickets, so no call's data may
// land on another call's tickets: every need is twice the larger part, so that in a workspace of W
// floats any front part (<= W/2) and any back part (<= W/2) are disjoint. Without `ws` it counts.
class Carver {
 public:
  Carver(float* ws = nullptr, int64_t numel = 0) : ws_(ws), numel_(numel) {}
  float* data(int64_t count) {
    float* p = ws_ ? ws_ + front_ : nullptr;
    front_ += count;
    return p;
  }
  int* tickets(int64_t count) {
    back_ += count;
    return ws_ ? reinterpret_cast<int*>(ws_ + numel_ - back_) : nullptr;
  }
  int64_t need() const { return 2 * std::max(front_, back_); }

 private:
  float* ws_;
  int64_t numel_, front_ = 0, back_ = 0;
};

}  // namespace LOMO_CUDA_NS
}  // namespace lomo
