// SIMT emulation of the CUDA programming model on the CPU: the kernels of csrc/cuda/*.cu compile
// unchanged as host C++ (csrc/emulated/*.cpp include them after this header) and run on CPU tensors
// as the backend "cuda_emulated". It exists so that CI, which has no GPU, executes the same kernel
// source a user's GPU runs (docs/design.md, "Verifying GPU code without a GPU").
//
// What is real, not approximated by a serial loop:
//   * a grid of blocks (3-D), spread over OS threads (torch's intra-op threads; one block at a time
//     per OS thread), so atomics meet true concurrency (a launch under the memory model: one OS
//     thread);
//   * the threads of a block are fibers (user-level contexts, one stack each) on that OS thread; a
//     thread runs until it reaches a barrier or a warp collective, then the next one runs, so
//     __syncthreads() is a true barrier and warp collectives exchange values between 32 lanes;
//   * shared memory is per block: static (LOMO_SHARED) and dynamic (LOMO_DYNAMIC_SHARED) arrays
//     lie in an arena of the OS thread, each between redzones, poisoned (0xFF bytes) when the block
//     starts; every load and store of the kernel files is instrumented (setup.py), and an access
//     out of an array's bounds, two threads' accesses to one byte between barriers with a write
//     among them (a race), or a read of a byte the block never wrote fails the launch
//     (emulator_shared.cpp);
//   * the launch limits of a GPU: static + dynamic shared memory within 48 KB unless the kernel
//     opted in (cudaFuncSetAttribute, up to 227 KB), kernel parameters within 32764 bytes, no more
//     threads per block than the kernel's __launch_bounds__ (its first statement LOMO_BOUNDS(n));
//   * a memory model for the memory blocks exchange data through (emulator_model.cpp): stores
//     published only by __threadfence(), relaxed atomics, __ldcg against a stale per-block L1;
//     blocks start in reversed or shuffled orders;
//   * schedule variants per block (warp order and lane order forward or reversed) so that a missing
//     barrier gives a wrong result in some block instead of passing by luck;
//   * 16-byte vector accesses (load_pack / store_pack) are checked for alignment and, for the tensors
//     the entry point registered, for bounds: a failure names the kernel, block and thread.
//
// Floating point: every intrinsic maps to the IEEE operation it names (__fmaf_rn -> fmaf, ...), so
// results are bitwise those of the GPU, except: rsqrtf (approximate on the GPU, within 2 ulp; here
// the correctly rounded 1/sqrt), fp32 subnormals (flushed by the GPU only under -ftz=true, which
// this project never uses) and the payload of an fp32 NaN (the GPU's arithmetic makes 0x7FFFFFFF,
// the host's keeps the operand's or makes 0xFFC00000). The fp16/bf16 conversion intrinsics give
// the GPU's 0x7FFF for every NaN, as cvt does; the kernels never store that pattern: rounding.h
// stores the canonical NaN on both builds (docs/spec.md), so fp16/bf16 results are bitwise equal,
// NaN included. Tests compare fp32 NaNs by NaN-ness. The emulated sources must be compiled with
// -ffp-contract=off (setup.py does), like the nvcc build's --fmad=false.
//
// Not emulated: texture/surface memory, cooperative groups, dynamic parallelism, clusters,
// spin-waits on another block's progress (blocks run to completion one at a time per OS thread),
// registers per thread (the static budgets of lomo_kernels/budgets.py read them from the SASS).
#pragma once

#define LOMO_CUDA_EMULATION 1

// `#pragma unroll` has no meaning for the host compiler.
#pragma GCC diagnostic ignored "-Wunknown-pragmas"

// The torch headers the kernel files include come first, so the keyword macros below never reach them.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "float_bits.h"  // not rounding.h: that one is built on these intrinsics

// ------------------------------------------------------------------------------------------
// Keywords
// ------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)  // the bound is checked by the kernel's LOMO_BOUNDS(n) (device.cuh)
#define __align__(n) __attribute__((aligned(n)))
// Static shared memory is declared with LOMO_SHARED (csrc/cuda/device.cuh), which the emulation
// poisons per block; a plain __shared__ would keep the previous block's values.
#define __shared__ \
  static_assert(false, "declare static shared memory with LOMO_SHARED(T, name, [dims])");

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct lomo_emu_stream;
using cudaStream_t = lomo_emu_stream*;
constexpr int warpSize = 32;

// Built-in variables: set by the scheduler at every switch between threads (fibers).
extern __thread uint3 threadIdx;
extern __thread uint3 blockIdx;
extern __thread uint3 blockDim;
extern __thread uint3 gridDim;

// ------------------------------------------------------------------------------------------
// The emulator's entry points (csrc/emulated/emulator*.cpp)
// ------------------------------------------------------------------------------------------
namespace lomo {

struct LaunchSite {
  const char* file;
  int line;
  const char* text;  // the launch's argument list as written: the kernel first
};

namespace emu {

using Invoke = void (*)(const void* call);
// `kernel` identifies the kernel (its opt-in to more shared memory); `param_bytes` is the size of
// its parameter space as a GPU lays it out.
void run_grid(const LaunchSite& site, const void* kernel, size_t param_bytes, dim3 grid,
              dim3 block, size_t dynamic_smem, Invoke invoke, const void* call);

// The size of a kernel's parameter space: each parameter at the next multiple of its alignment.
template <typename... P>
constexpr size_t param_bytes() {
  size_t end = 0;
  ((end = (end + alignof(P) - 1) / alignof(P) * alignof(P) + sizeof(P)), ...);
  return end;
}

// The opt-in of cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes).
void set_max_dynamic_shared(const void* kernel, size_t bytes);
// A static shared array of the current block (LOMO_SHARED; `tag` identifies the declaration): the
// first thread of the block to declare it places it in the block's arena between redzones,
// poisoned; the block's static + dynamic shared memory is checked against the limit. Returns it.
void* static_shared_memory(const void* tag, size_t bytes, size_t align, size_t elem,
                           const char* name);
// An atomic of `bytes` at `p` begins (depth 1) or ends (-1): on shared memory it is recorded as one
// atomic access (atomics do not race with each other), not as the loads and stores it makes.
void atomic_shared(const void* p, size_t bytes, int depth);
// The first statement of a kernel declared __launch_bounds__(max_threads, ...) (LOMO_BOUNDS):
// a block of more threads fails, as a GPU refuses its launch.
void check_launch_bounds(int max_threads);

// Warp collectives: every lane of `mask` contributes `value` and blocks until all of them have
// arrived; the last one computes each lane's result (a shuffle: the value of the lane `src` it
// names; a vote or reduction: one value for all) into that lane's own slot. Returns the result.
enum class Collective : uint8_t {
  SyncWarp, Shuffle, Ballot, AddU32, MinU32, MaxU32, MinI32, MaxI32, AndU32, OrU32, XorU32
};
uint64_t warp_collective(unsigned mask, Collective kind, uint64_t value, unsigned src = 0);
unsigned lane_id();
unsigned active_mask();

enum class BlockSync : uint8_t { Plain, Count, And, Or };
int block_barrier(BlockSync kind, int predicate);

// The cross-block memory model (emulator_model.cpp; docs/gpu-verification.md): set while a launch
// with cross-block memory runs under it. Fences mark a block's stores published; atomics are
// relaxed (they act on the coherent value and publish nothing); __ldcg reads published values.
class MemoryModel;
extern __thread MemoryModel* tls_model;
void model_fence(MemoryModel& m);
void model_atomic_begin(MemoryModel& m, const void* p, size_t bytes);
void model_atomic_end(MemoryModel& m, const void* p, size_t bytes, bool acquire);
void model_coherent_load(MemoryModel& m, const void* p, void* out, size_t bytes);
// `t` is memory through which the blocks of the next launches exchange data (a workspace): the
// model applies to it; registered for the calling thread and kept alive until its MemoryScope ends.
void cross_block_tensor(const at::Tensor& t);

struct AtomicHook {  // around one atomic read-modify-write of `bytes` at `p`
  AtomicHook(const void* p_, size_t bytes_, bool acquire_ = false)
      : p(p_), bytes(bytes_), acquire(acquire_) {
    atomic_shared(p, bytes, 1);
    if (tls_model) model_atomic_begin(*tls_model, p, bytes);
  }
  ~AtomicHook() {
    if (tls_model) model_atomic_end(*tls_model, p, bytes, acquire);
    atomic_shared(p, bytes, -1);
  }
  const void* p;
  size_t bytes;
  bool acquire;
};

// atomicAdd with acq_rel semantics at device scope (PTX atom.acq_rel.gpu). For the memory model it
// is an acquire (the block then sees what other blocks published before it), not a release: the
// model publishes a block's stores only at __threadfence(), the project's rule for tickets.
inline int atomic_add_acq_rel(int* a, int v) {
  const AtomicHook hook(a, sizeof(*a), true);
  return __atomic_fetch_add(a, v, __ATOMIC_ACQ_REL);
}

template <typename T>
inline T coherent_load(const T* p) {  // an L2 (device-coherent) load
  if (!tls_model) return *p;
  T v;
  model_coherent_load(*tls_model, p, &v, sizeof(T));
  return v;
}

unsigned char* dynamic_shared_memory();
void check_vector_access(const void* p, size_t bytes, bool store);
[[noreturn]] void fail(const char* what);

// A kernel call: the kernel and its arguments converted to its parameter types (as a launch
// converts them), invoked once by every thread.
template <typename... P, typename... A>
void launch_kernel(const LaunchSite& site, void (*kernel)(P...), dim3 grid, dim3 block,
                   size_t dynamic_smem, cudaStream_t, A&&... args) {
  struct Call {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> args;
  };
  const Call call{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  run_grid(site, reinterpret_cast<const void*>(kernel), param_bytes<std::decay_t<P>...>(), grid,
           block, dynamic_smem,
           [](const void* c) {
             const Call& k = *static_cast<const Call*>(c);
             std::apply(k.kernel, k.args);  // each thread gets its own copy of the parameters
           },
           &call);
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp collective on T");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// Source lane of a shuffle; `width` splits the warp into segments (a power of two <= 32).
enum class ShuffleMode { Index, Up, Down, Xor };
unsigned shuffle_source(ShuffleMode mode, unsigned lane, int arg, int width, unsigned mask);

template <typename T>
inline T shuffle(ShuffleMode mode, unsigned mask, T var, int arg, int width) {
  const unsigned src = shuffle_source(mode, lane_id(), arg, width, mask);
  return from_bits<T>(warp_collective(mask, Collective::Shuffle, to_bits(var), src));
}

inline uint32_t reduce(unsigned mask, Collective kind, uint32_t v) {
  return static_cast<uint32_t>(warp_collective(mask, kind, v));
}

}  // namespace emu
}  // namespace lomo

// ------------------------------------------------------------------------------------------
// Runtime API: the one kernel attribute the launch limits depend on
// ------------------------------------------------------------------------------------------
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  TORCH_CHECK(attr == cudaFuncAttributeMaxDynamicSharedMemorySize && value >= 0,
              "cuda_emulated: cudaFuncSetAttribute: only cudaFuncAttributeMaxDynamicSharedMemorySize");
  lomo::emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel),
                                    static_cast<size_t>(value));
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------------
// Synchronisation and warp intrinsics
// ------------------------------------------------------------------------------------------
inline void __syncthreads() { lomo::emu::block_barrier(lomo::emu::BlockSync::Plain, 0); }
inline int __syncthreads_count(int p) {
  return lomo::emu::block_barrier(lomo::emu::BlockSync::Count, p);
}
inline int __syncthreads_and(int p) {
  return lomo::emu::block_barrier(lomo::emu::BlockSync::And, p);
}
inline int __syncthreads_or(int p) { return lomo::emu::block_barrier(lomo::emu::BlockSync::Or, p); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  lomo::emu::warp_collective(mask, lomo::emu::Collective::SyncWarp, 0);
}
inline unsigned __activemask() { return lomo::emu::active_mask(); }

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return lomo::emu::shuffle(lomo::emu::ShuffleMode::Index, mask, var, src_lane, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return lomo::emu::shuffle(lomo::emu::ShuffleMode::Up, mask, var, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return lomo::emu::shuffle(lomo::emu::ShuffleMode::Down, mask, var, static_cast<int>(delta),
                            width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return lomo::emu::shuffle(lomo::emu::ShuffleMode::Xor, mask, var, lane_mask, width);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return lomo::emu::reduce(mask, lomo::emu::Collective::Ballot, predicate != 0);
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  return __ballot_sync(mask, predicate) == mask;
}

#define LOMO_EMU_REDUCE(name, T, kind)                                                      \
  inline T name(unsigned mask, T v) {                                                      \
    return static_cast<T>(                                                                 \
        lomo::emu::reduce(mask, lomo::emu::Collective::kind, static_cast<uint32_t>(v)));    \
  }
LOMO_EMU_REDUCE(__reduce_add_sync, unsigned, AddU32)
LOMO_EMU_REDUCE(__reduce_add_sync, int, AddU32)
LOMO_EMU_REDUCE(__reduce_min_sync, unsigned, MinU32)
LOMO_EMU_REDUCE(__reduce_min_sync, int, MinI32)
LOMO_EMU_REDUCE(__reduce_max_sync, unsigned, MaxU32)
LOMO_EMU_REDUCE(__reduce_max_sync, int, MaxI32)
LOMO_EMU_REDUCE(__reduce_and_sync, unsigned, AndU32)
LOMO_EMU_REDUCE(__reduce_or_sync, unsigned, OrU32)
LOMO_EMU_REDUCE(__reduce_xor_sync, unsigned, XorU32)
#undef LOMO_EMU_REDUCE

// ------------------------------------------------------------------------------------------
// Memory: fences, atomics (correct across OS threads; fibers never interleave inside one), loads.
// Atomics are relaxed for the memory model: each one acts on the coherent value of its word
// (AtomicHook) and publishes nothing else.
// ------------------------------------------------------------------------------------------
// A device-scope fence publishes the calling block's earlier global stores (the memory model).
inline void __threadfence() {
  if (lomo::emu::tls_model) lomo::emu::model_fence(*lomo::emu::tls_model);
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
inline void __threadfence_system() { __threadfence(); }
inline void __threadfence_block() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

#define LOMO_EMU_ATOMIC_HOOK const ::lomo::emu::AtomicHook lomo_atomic_hook(a, sizeof(*a))
#define LOMO_EMU_ATOMIC_INT(T)                                                               \
  inline T atomicAdd(T* a, T v) {                                                            \
    LOMO_EMU_ATOMIC_HOOK;                                                                    \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                       \
  }                                                                                          \
  inline T atomicSub(T* a, T v) {                                                            \
    LOMO_EMU_ATOMIC_HOOK;                                                                    \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                       \
  }                                                                                          \
  inline T atomicExch(T* a, T v) {                                                           \
    LOMO_EMU_ATOMIC_HOOK;                                                                    \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                      \
  }                                                                                          \
  inline T atomicAnd(T* a, T v) {                                                            \
    LOMO_EMU_ATOMIC_HOOK;                                                                    \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                       \
  }                                                                                          \
  inline T atomicOr(T* a, T v) {                                                             \
    LOMO_EMU_ATOMIC_HOOK;                                                                    \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                        \
  }                                                                                          \
  inline T atomicXor(T* a, T v) {                                                            \
    LOMO_EMU_ATOMIC_HOOK;                                                                    \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                       \
  }                                                                                          \
  inline T atomicCAS(T* a, T compare, T v) {                                                 \
    LOMO_EMU_ATOMIC_HOOK;                                                                    \
    __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);  \
    return compare; /* the old value, whether or not it was swapped */                       \
  }                                                                                          \
  inline T atomicMax(T* a, T v) {                                                            \
    LOMO_EMU_ATOMIC_HOOK;                                                                    \
    T old = __atomic_load_n(a, __ATOMIC_SEQ_CST);                                            \
    while (old < v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_SEQ_CST,       \
                                                   __ATOMIC_SEQ_CST)) {                     \
    }                                                                                        \
    return old;                                                                              \
  }                                                                                          \
  inline T atomicMin(T* a, T v) {                                                            \
    LOMO_EMU_ATOMIC_HOOK;                                                                    \
    T old = __atomic_load_n(a, __ATOMIC_SEQ_CST);                                            \
    while (v < old && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_SEQ_CST,       \
                                                   __ATOMIC_SEQ_CST)) {                     \
    }                                                                                        \
    return old;                                                                              \
  }
LOMO_EMU_ATOMIC_INT(int)
LOMO_EMU_ATOMIC_INT(unsigned)
LOMO_EMU_ATOMIC_INT(unsigned long long)
#undef LOMO_EMU_ATOMIC_INT
// No floating-point atomicAdd on purpose: reductions here are deterministic (docs/spec.md), so a
// kernel that uses one fails to compile in the emulated build.

// ((old >= limit) ? 0 : old + 1) and ((old == 0 || old > limit) ? limit : old - 1), atomically.
inline unsigned atomicInc(unsigned* a, unsigned limit) {
  LOMO_EMU_ATOMIC_HOOK;
  unsigned old = __atomic_load_n(a, __ATOMIC_SEQ_CST);
  while (!__atomic_compare_exchange_n(a, &old, old >= limit ? 0u : old + 1u, true,
                                      __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
inline unsigned atomicDec(unsigned* a, unsigned limit) {
  LOMO_EMU_ATOMIC_HOOK;
  unsigned old = __atomic_load_n(a, __ATOMIC_SEQ_CST);
  while (!__atomic_compare_exchange_n(a, &old, (old == 0u || old > limit) ? limit : old - 1u,
                                      true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}

// Cache-hinted loads/stores. __ldcg (cache global: L2, bypassing the non-coherent L1) and __ldcv
// (volatile) read the coherent value under the memory model; the others are plain loads, which
// the model lets see a stale (poisoned) copy of what other blocks of the launch stored.
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return lomo::emu::coherent_load(p); }
template <typename T> inline T __ldca(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldlu(const T* p) { return *p; }
template <typename T> inline T __ldcv(const T* p) { return lomo::emu::coherent_load(p); }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stwb(T* p, T v) { *p = v; }
template <typename T> inline void __stwt(T* p, T v) { *p = v; }

// ------------------------------------------------------------------------------------------
// Arithmetic intrinsics: the IEEE operation each one names (see the header comment)
// ------------------------------------------------------------------------------------------
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }
// The GPU's rsqrtf is an approximation (max 2 ulp); this is the correctly rounded value.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

inline unsigned __float_as_uint(float x) { return lomo::f32_bits(x); }
inline float __uint_as_float(unsigned b) { return lomo::f32_from_bits(b); }
inline int __float_as_int(float x) { return static_cast<int>(lomo::f32_bits(x)); }
inline float __int_as_float(int b) { return lomo::f32_from_bits(static_cast<uint32_t>(b)); }
inline long long __double_as_longlong(double x) {
  long long b;
  std::memcpy(&b, &x, 8);
  return b;
}
inline double __longlong_as_double(long long b) {
  double x;
  std::memcpy(&x, &b, 8);
  return x;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  x = ((x >> 8) & 0x00FF00FFu) | ((x & 0x00FF00FFu) << 8);
  return (x >> 16) | (x << 16);
}

// fp16 / bf16 storage types and their round-to-nearest-even conversions (float_bits.h's bit-exact
// implementations).
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16{b}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline float __half2float(__half h) { return lomo::f16_bits_to_f32(h.bits); }
inline __half __float2half_rn(float x) {
  return __half{lomo::f32_to_f16_bits(x, lomo::kGpuCvtNaN)};  // cvt.rn.f16.f32: NaN -> 0x7FFF
}
inline __half __float2half(float x) { return __float2half_rn(x); }
inline float __bfloat162float(__nv_bfloat16 h) { return lomo::bf16_bits_to_f32(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  return __nv_bfloat16{lomo::f32_to_bf16_bits(x, lomo::kGpuCvtNaN)};  // cvt.rn.bf16.f32
}
inline __nv_bfloat16 __float2bfloat16(float x) { return __float2bfloat16_rn(x); }
