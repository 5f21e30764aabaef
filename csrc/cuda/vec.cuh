// CUDA helpers: 16-byte vector loads/stores and deterministic block reductions.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/device.cuh"
#include "rounding.h"

namespace lomo {
namespace LOMO_CUDA_NS {

constexpr int kThreads = 256;  // every kernel here assumes blockDim.x == kThreads

// N = 16 / sizeof(S) consecutive elements: one 128-bit load or store.
template <typename S>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(S);
  S v[N];
};

template <typename S>
__device__ __forceinline__ Pack<S> load_pack(const S* p) {
  LOMO_CHECK_VECTOR_ACCESS(p, sizeof(Pack<S>), false);
  return *reinterpret_cast<const Pack<S>*>(p);
}
template <typename S>
__device__ __forceinline__ void store_pack(S* p, const Pack<S>& x) {
  LOMO_CHECK_VECTOR_ACCESS(p, sizeof(Pack<S>), true);
  *reinterpret_cast<Pack<S>*>(p) = x;
}

// N consecutive elements of S moved as N * sizeof(S) / 16 128-bit accesses: the same elements as
// one Pack of a narrower operand (a float32 buffer or gradient next to 16-bit values).
template <typename S, int N>
struct alignas(16) Packs {
  static_assert(N * sizeof(S) % 16 == 0, "Packs: whole 16-byte accesses");
  static constexpr int kParts = N * sizeof(S) / 16;
  S v[N];
};

template <typename S, int N>
__device__ __forceinline__ Packs<S, N> load_packs(const S* p) {
  Packs<S, N> x;
#pragma unroll
  for (int i = 0; i < Packs<S, N>::kParts; ++i) {
    const Pack<S> part = load_pack(p + i * Pack<S>::N);
#pragma unroll
    for (int k = 0; k < Pack<S>::N; ++k) x.v[i * Pack<S>::N + k] = part.v[k];
  }
  return x;
}
template <typename S, int N>
__device__ __forceinline__ void store_packs(S* p, const Packs<S, N>& x) {
#pragma unroll
  for (int i = 0; i < Packs<S, N>::kParts; ++i) {
    Pack<S> part;
#pragma unroll
    for (int k = 0; k < Pack<S>::N; ++k) part.v[k] = x.v[i * Pack<S>::N + k];
    store_pack(p + i * Pack<S>::N, part);
  }
}

// The gradient of one Pack<S> of parameter elements, stored as SG: that Pack when SG is S, else
// Packs of SG (a float32 accumulation buffer of a 16-bit parameter).
template <typename SG, typename S>
using GradPack = std::conditional_t<std::is_same<SG, S>::value, Pack<S>, Packs<SG, Pack<S>::N>>;

// dst from 16-byte aligned p: a Pack, or Packs (whole 16-byte accesses).
template <typename S>
__device__ __forceinline__ void load_into(Pack<S>& dst, const S* p) {
  dst = load_pack(p);
}
template <typename S, int N>
__device__ __forceinline__ void load_into(Packs<S, N>& dst, const S* p) {
  dst = load_packs<S, N>(p);
}

// Whether, with p's body moved in 16-byte packs from its first 16-byte boundary on, the same
// elements of g (elements of g_size bytes) start 16-byte boundaries too.
inline bool same_phase(const void* p, int64_t p_size, const void* g, int64_t g_size) {
  const auto pa = reinterpret_cast<uintptr_t>(p), ga = reinterpret_cast<uintptr_t>(g);
  if (pa % p_size != 0 || ga % g_size != 0) return false;
  const auto head = static_cast<uintptr_t>((16 - pa % 16) % 16 / p_size);
  return (ga + head * g_size) % 16 == 0;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Butterfly sum over a warp: every lane gets the same value, the tree is fixed.
template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Sum over a block of kBlock threads (blockDim.x; a multiple of 32, at most 1024); the result is
// valid in every thread. Fixed tree: warps, then warp 0 over the warp sums in order. `smem` holds
// 32 T. (kBlock is a constant and the thread index is read afresh: keeping blockDim.x or
// threadIdx.x live across the callers' loops spilled them to the stack.)
template <int kBlock, typename T>
__device__ __forceinline__ T block_sum(T x, T* smem) {
  static_assert(kBlock % 32 == 0 && kBlock <= 1024, "block_sum: kBlock");
  const unsigned tid = fresh_thread_index();
  const int lane = tid & 31, warp = tid >> 5, nwarps = kBlock >> 5;
  x = warp_sum(x);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  T y = lane < nwarps ? smem[lane] : T(0);
  return warp_sum(y);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace LOMO_CUDA_NS
}  // namespace lomo
