// Probe kernels of the SIMT emulator itself, written as CUDA (they compile only in the emulated
// build): tests/test_cuda_emulation.py checks their outputs against independent Python
// computations, and that the emulator rejects what a GPU would not run correctly.
#include <torch/extension.h>

#include "cuda/emulation.h"
#include "cuda/vec.cuh"
#include "emulated/emulation_api.h"

namespace lomo {
namespace cuda_emulated {
namespace {

// out[t, :] for every thread t of the grid (blocks of 64): shuffles of v = 1000 * block + thread in
// segments of `width`, then votes and a warp reduction.
__global__ void shuffle_probe(int* out, int width) {
  const int t = threadIdx.x, v = static_cast<int>(1000 * blockIdx.x) + t;
  int* o = out + (static_cast<int64_t>(blockIdx.x) * blockDim.x + t) * 10;
  o[0] = __shfl_xor_sync(0xFFFFFFFFu, v, 5, width);
  o[1] = __shfl_down_sync(0xFFFFFFFFu, v, 3, width);
  o[2] = __shfl_up_sync(0xFFFFFFFFu, v, 3, width);
  o[3] = __shfl_sync(0xFFFFFFFFu, v, 7, width);
  o[4] = __shfl_sync(0xFFFFFFFFu, v, -1, width);
  o[5] = static_cast<int>(__ballot_sync(0xFFFFFFFFu, v % 3 == 0));
  o[6] = __any_sync(0xFFFFFFFFu, v % 29 == 0);
  o[7] = __all_sync(0xFFFFFFFFu, v >= 0);
  o[8] = __reduce_add_sync(0xFFFFFFFFu, v);
  // a double through a shuffle, and a half-warp collective on the lower 16 lanes only
  const double d = __shfl_xor_sync(0xFFFFFFFFu, 0.5 * v, 1);
  int half = -1;
  if ((t & 31) < 16) half = __reduce_max_sync(0x0000FFFFu, v);
  o[9] = static_cast<int>(2.0 * d) + half;
}

// Barrier variants, 3-D indices and dynamic shared memory: out[global linear thread] = 4 values.
__global__ void block_probe(int* out) {
  LOMO_DYNAMIC_SHARED(int, smem);
  const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int nt = blockDim.x * blockDim.y * blockDim.z;
  const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  smem[t] = 7 * b + t;
  const int count = __syncthreads_count(t % 5 == 0);
  const int reversed = smem[nt - 1 - t];
  const int all = __syncthreads_and(t < nt);
  const int any = __syncthreads_or(t == nt - 1 && b % 2 == 0);
  int* o = out + (static_cast<int64_t>(b) * nt + t) * 4;
  o[0] = reversed;
  o[1] = count;
  o[2] = all + 2 * any;
  o[3] = static_cast<int>(threadIdx.x + 100 * threadIdx.y + 10000 * threadIdx.z);
}

// Atomics from every thread of every block (blocks run concurrently on several OS threads), and a
// last-block-done reduction: each block's partial sum, a fence, a ticket; the last block sums.
struct AtomicOut {
  int add;
  unsigned inc;
  unsigned long long big;
  int cas_count;
  int max;
  unsigned last_block;
  long long total;
};

__global__ void atomic_probe(AtomicOut* out, unsigned* ticket, long long* partials) {
  LOMO_SHARED(long long, part, [32]);
  const int t = threadIdx.x;
  const unsigned b = blockIdx.x;
  atomicAdd(&out->add, 1);
  atomicInc(&out->inc, 99u);  // wraps to 0 after 99
  atomicAdd(&out->big, 1ull << 33);
  int old = out->cas_count, seen;
  while ((seen = atomicCAS(&out->cas_count, old, old + 1)) != old) old = seen;
  atomicMax(&out->max, static_cast<int>(b * 1000 + t));
  long long v = static_cast<long long>(b) * blockDim.x + t;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  if ((t & 31) == 0) part[t >> 5] = v;
  __syncthreads();
  LOMO_SHARED(bool, last);
  if (t == 0) {
    long long s = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) s += part[w];
    partials[b] = s;
    __threadfence();
    last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (last && t == 0) {
    __threadfence();
    long long total = 0;
    for (unsigned i = 0; i < gridDim.x; ++i) total += partials[i];
    out->total = total;
    out->last_block = b;
  }
}

// A last-block-done sum through cross-block memory: right (variant 0), or with a bug that only
// the memory model exposes: 1, no __threadfence() between a block's partial and its ticket; 2, the
// finisher reads the partials with plain loads (a stale L1 on a GPU) instead of __ldcg; 3, the
// finisher does not fence after its ticket (no acquire).
__global__ void ticket_probe(float* partials, int* ticket, float* total, int variant) {
  LOMO_SHARED(int, last);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = static_cast<float>(blockIdx.x) + 1.0f;
    if (variant != 1) __threadfence();
    last = atomicAdd(ticket, 1) == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (last && threadIdx.x == 0) {
    if (variant != 3) __threadfence();
    float s = 0.0f;
    for (unsigned i = 0; i < gridDim.x; ++i) s += variant == 2 ? partials[i] : __ldcg(partials + i);
    *total = s;
    atomicExch(ticket, 0);
  }
}

// The order blocks start in: out[k] = the k-th block to take a number.
__global__ void order_probe(int* out, int* counter) {
  if (threadIdx.x == 0) out[atomicAdd(counter, 1)] = static_cast<int>(blockIdx.x);
}

// A block reduction through shared memory with the barrier between the writes and the reads
// missing: the emulator's schedule variants must make some block read stale values.
__global__ void missing_barrier_probe(int* out) {
  LOMO_SHARED(int, s, [256]);
  const int t = threadIdx.x;
  s[t] = static_cast<int>(blockIdx.x) + t + 1;
  // __syncthreads() belongs here
  out[blockIdx.x * blockDim.x + t] = s[(t + 37) % blockDim.x];
  __syncthreads();
}

// Kernels a GPU would not run correctly: each must fail with a clear message.
__global__ void deadlock_probe() {
  if (threadIdx.x < 16) (void)__shfl_xor_sync(0xFFFFFFFFu, 1, 1);  // lanes 16..31 never come
  __syncthreads();
}
__global__ void exited_lane_probe() {
  if (threadIdx.x == 3) return;
  (void)__shfl_xor_sync(0xFFFFFFFFu, 1, 1);
}
__global__ void misaligned_probe(const float* p) {
  struct alignas(16) F4 { float v[4]; };
  LOMO_CHECK_VECTOR_ACCESS(p + 1, sizeof(F4), false);
}
__global__ void out_of_bounds_probe(const uint16_t* p, int64_t n) {
  Pack<uint16_t> x = load_pack(p + (n / 8) * 8);  // the pack after the last full one
  (void)x;
}
__global__ void mixed_collectives_probe() {
  if (threadIdx.x % 2) (void)__ballot_sync(0xFFFFFFFFu, 1);
  else (void)__shfl_xor_sync(0xFFFFFFFFu, 1, 1);
}

// Static shared memory the kernel never initialises (the bug: `if (threadIdx.x == 0) count = 0;`
// and a barrier are missing): it must start from the poison in every block, not from zero (fresh
// memory) nor from the previous block's count.
__global__ void uninitialised_shared_probe(int* out) {
  LOMO_SHARED(int, count);
  atomicAdd(&count, 1);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = count;
}

// The shared-memory checks (emulator_shared.cpp), one bug per variant, at `index` (from the host,
// so that the compiler cannot see the bug): 0, a static array of 32 ints written at index (32: one
// past its end); 1, read at index (-1: one before its start); 2, the dynamic shared memory (64
// ints) written at index (64).
__global__ void shared_bounds_probe(int* out, int variant, int index) {
  LOMO_SHARED(int, s, [32]);
  LOMO_DYNAMIC_SHARED(int, d);
  const int t = static_cast<int>(threadIdx.x);
  if (t < 32) s[t] = t;
  d[t] = t;
  if (variant == 0 && t == 0) s[index] = t;
  __syncthreads();
  int v = s[t % 32] + d[t];
  if (variant == 1 && t == 0) v += s[index];
  if (variant == 2 && t == 0) d[index] = v;
  out[t] = v;
}

// Shared accesses between barriers, by variant: racy ones (1 a read of another thread's write
// without a barrier, 2 a write over what another thread reads, 3 every thread writing one word,
// 5 lanes exchanging through shared memory with no __syncwarp, 7 a plain read next to atomics)
// and ordered ones (0 with __syncthreads, 4 with __syncwarp, 6 atomics only).
__global__ void shared_race_probe(int* out, int variant) {
  LOMO_SHARED(int, s, [64]);
  LOMO_SHARED(int, counter);
  const int t = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  s[t] = t;
  if (t == 0) counter = 0;
  if (variant != 1 && variant != 4 && variant != 5) __syncthreads();
  if (variant == 4) __syncwarp();
  int v = 0;
  switch (variant) {
    case 0: case 1: v = s[(t + 1) % n]; break;
    case 2: v = s[(t + 1) % n]; s[t] = v; break;
    case 3: s[0] = t; break;
    case 4: case 5: v = s[t ^ 1]; break;
    case 6: atomicAdd(&counter, 1); break;
    case 7: if (t == 0) v = counter; else atomicAdd(&counter, 1); break;
  }
  __syncthreads();
  out[blockIdx.x * n + t] = v + (variant == 6 ? counter : 0);
}

// At most 64 threads per block: launched with more, it must fail as the GPU refuses it.
__global__ void __launch_bounds__(64) bounded_probe(int* out) {
  LOMO_BOUNDS(64);
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

// n ints of dynamic shared memory, written and summed; OPT_IN: the kernel raised its limit.
template <bool OPT_IN>
__global__ void dynamic_shared_probe(int* out, int n) {
  LOMO_DYNAMIC_SHARED(int, s);
  for (int i = static_cast<int>(threadIdx.x); i < n; i += static_cast<int>(blockDim.x)) s[i] = i;
  __syncthreads();
  if (threadIdx.x == 0) {
    int sum = 0;
    for (int i = 0; i < n; ++i) sum += s[i];
    out[0] = sum;
  }
}

// 32 KB of static shared memory next to the launch's dynamic shared memory.
__global__ void static_and_dynamic_shared_probe(int* out) {
  LOMO_SHARED(int, big, [8192]);
  LOMO_DYNAMIC_SHARED(int, s);
  big[threadIdx.x] = 1;
  s[threadIdx.x] = 2;
  __syncthreads();
  out[threadIdx.x] = big[threadIdx.x] + s[threadIdx.x];
}

// 32768 bytes of parameters: over a kernel's 32764.
struct ManyRecords {
  int v[8190];
};
__global__ void parameter_space_probe(ManyRecords r, int* out) { out[0] = r.v[0]; }

}  // namespace

void emulation_probe(const std::string& name, at::Tensor out, int64_t arg, int64_t arg2) {
  const emu::MemoryScope scope({{"out", &out}});
  if (name == "shuffle") {  // arg blocks of 64 threads, arg2 the shuffle width
    TORCH_CHECK(out.scalar_type() == at::kInt && out.numel() == arg * 64 * 10);
    LOMO_LAUNCH(shuffle_probe, static_cast<unsigned>(arg), 64, 0, nullptr, out.data_ptr<int>(),
                static_cast<int>(arg2));
  } else if (name == "block") {
    const dim3 grid(3, 2, 2), block(8, 4, 2);
    TORCH_CHECK(out.numel() == 12 * 64 * 4);
    LOMO_LAUNCH(block_probe, grid, block, 64 * sizeof(int), nullptr, out.data_ptr<int>());
  } else if (name == "atomic") {
    TORCH_CHECK(out.scalar_type() == at::kByte && out.numel() >= 64 + 8 * arg);
    auto* o = reinterpret_cast<AtomicOut*>(out.data_ptr());
    auto* ticket = reinterpret_cast<unsigned*>(out.data_ptr<uint8_t>() + 48);
    auto* partials = reinterpret_cast<long long*>(out.data_ptr<uint8_t>() + 64);
    static_assert(sizeof(AtomicOut) <= 48);
    LOMO_LAUNCH(atomic_probe, static_cast<unsigned>(arg), 128, 0, nullptr, o, ticket, partials);
  } else if (name == "ticket") {  // out: arg partials, the ticket, the total; arg2 the variant
    TORCH_CHECK(out.scalar_type() == at::kFloat && out.numel() == arg + 2);
    float* o = out.data_ptr<float>();
    emu::cross_block_tensor(out);
    LOMO_LAUNCH(ticket_probe, static_cast<unsigned>(arg), 64, 0, nullptr, o,
                reinterpret_cast<int*>(o + arg), o + arg + 1, static_cast<int>(arg2));
  } else if (name == "order") {  // out: arg block numbers, then the counter
    TORCH_CHECK(out.scalar_type() == at::kInt && out.numel() == arg + 1);
    LOMO_LAUNCH(order_probe, static_cast<unsigned>(arg), 32, 0, nullptr, out.data_ptr<int>(),
                out.data_ptr<int>() + arg);
  } else if (name == "missing_barrier") {
    LOMO_LAUNCH(missing_barrier_probe, static_cast<unsigned>(arg), 256, 0, nullptr,
                out.data_ptr<int>());
  } else if (name == "deadlock") {
    LOMO_LAUNCH(deadlock_probe, 1, 64, 0, nullptr);
  } else if (name == "exited_lane") {
    LOMO_LAUNCH(exited_lane_probe, 1, 32, 0, nullptr);
  } else if (name == "misaligned") {
    LOMO_LAUNCH(misaligned_probe, 1, 32, 0, nullptr, out.data_ptr<float>());
  } else if (name == "out_of_bounds") {
    LOMO_LAUNCH(out_of_bounds_probe, 1, 32, 0, nullptr,
                reinterpret_cast<const uint16_t*>(out.data_ptr()), arg);
  } else if (name == "mixed_collectives") {
    LOMO_LAUNCH(mixed_collectives_probe, 1, 32, 0, nullptr);
  } else if (name == "uninitialised_shared") {  // arg blocks of 64 threads
    LOMO_LAUNCH(uninitialised_shared_probe, static_cast<unsigned>(arg), 64, 0, nullptr,
                out.data_ptr<int>());
  } else if (name == "dynamic_shared") {  // arg bytes; arg2 != 0: the kernel opted in to arg bytes
    const int n = static_cast<int>(arg / 4);
    if (arg2) {
      cudaFuncSetAttribute(dynamic_shared_probe<true>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(arg));
      LOMO_LAUNCH(dynamic_shared_probe<true>, 1, 256, arg, nullptr, out.data_ptr<int>(), n);
    } else {
      LOMO_LAUNCH(dynamic_shared_probe<false>, 1, 256, arg, nullptr, out.data_ptr<int>(), n);
    }
  } else if (name == "static_and_dynamic_shared") {  // arg bytes of dynamic shared memory
    LOMO_LAUNCH(static_and_dynamic_shared_probe, 1, 64, arg, nullptr, out.data_ptr<int>());
  } else if (name == "parameter_space") {
    static const ManyRecords records{};
    LOMO_LAUNCH(parameter_space_probe, 1, 32, 0, nullptr, records, out.data_ptr<int>());
  } else if (name == "shared_bounds") {  // arg: the variant, arg2 the index
    LOMO_LAUNCH(shared_bounds_probe, 1, 64, 64 * sizeof(int), nullptr, out.data_ptr<int>(),
                static_cast<int>(arg), static_cast<int>(arg2));
  } else if (name == "shared_race") {  // arg: the variant
    LOMO_LAUNCH(shared_race_probe, 2, 64, 0, nullptr, out.data_ptr<int>(), static_cast<int>(arg));
  } else if (name == "launch_bounds") {  // arg threads per block, 2 blocks
    LOMO_LAUNCH(bounded_probe, 2, static_cast<unsigned>(arg), 0, nullptr, out.data_ptr<int>());
  } else if (name == "bad_block") {
    LOMO_LAUNCH(deadlock_probe, 1, 2048, 0, nullptr);
  } else {
    TORCH_CHECK(false, "unknown emulation probe '", name, "'");
  }
}

}  // namespace cuda_emulated
}  // namespace lomo
