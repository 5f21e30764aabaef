// The one place where the CUDA build and the emulated build (csrc/cuda/emulation.h) differ, for the
// host code of csrc/cuda/*.cu: the namespace the kernels live in, the device check of the entry
// points, the stream, the device guard, the SM count, memset, and the kernel launch. Kernel bodies
// never test LOMO_CUDA_EMULATION.
//
//   LOMO_LAUNCH(kernel, grid, block, dynamic_smem_bytes, stream, args...)
//       kernel<<<grid, block, smem, stream>>>(args...) plus the launch check; emulated: runs the
//       grid on the CPU (and counts the launch).
//   LOMO_DYNAMIC_SHARED(T, name)   `extern __shared__` memory of the launch, as a T*.
//   LOMO_SHARED(T, name, [dims])   `__shared__ T name[dims]` (emulated: placed per block between
//                                  redzones, poisoned, every access checked for bounds, races and
//                                  initialisation; a plain __shared__ does not compile there).
//   LOMO_BOUNDS(n)                 the first statement of a kernel declared __launch_bounds__(n, ...):
//                                  nothing on the GPU (which refuses a larger block at launch);
//                                  emulated, a block of more than n threads fails.
//   LOMO_CHECK_DEVICE(op, x)       x is a CUDA tensor (emulated: a CPU tensor).
//   atomic_add_acq_rel(p, v)       atomicAdd with acq_rel semantics at device (gpu) scope: the
//                                  PTX atom.acq_rel.gpu (emulated: emu::atomic_add_acq_rel).
//   LOMO_CROSS_BLOCK_MEMORY(t)     t is a workspace the blocks of a launch exchange data through
//                                  (emulated: under the emulator's memory model; GPU: nothing).
//   fresh_thread_index()           threadIdx.x, read again from the special register: nvcc keeps
//                                  threadIdx.x live across a long loop otherwise, and the calls to
//                                  the slow paths of IEEE division / sqrt inside it force it to the
//                                  stack (a spill).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(LOMO_CUDA_EMULATION)
#include "cuda/emulation.h"
#define LOMO_CUDA_NS cuda_emulated
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#define LOMO_CUDA_NS cuda
namespace lomo {
struct LaunchSite {
  const char* file;
  int line;
  const char* text;
};
}  // namespace lomo
#endif

#include <c10/core/Device.h>

#include "checks.h"

namespace lomo {
namespace LOMO_CUDA_NS {

#if defined(LOMO_CUDA_EMULATION)
using Stream = cudaStream_t;
inline Stream current_stream() { return nullptr; }
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
// An H100 SXM: grid sizes derived from the SM count match the GPU's.
inline int64_t sm_count() { return 132; }
inline void memset_async(void* p, int value, size_t bytes, Stream) { std::memset(p, value, bytes); }
using emu::launch_kernel;
inline unsigned fresh_thread_index() { return threadIdx.x; }
using emu::atomic_add_acq_rel;  // hooked: an acquire for the memory model (emulation.h)
#define LOMO_CHECK_DEVICE(op, x) CHECK_CPU(op, x)
#define LOMO_CHECK_VECTOR_ACCESS(p, bytes, store) ::lomo::emu::check_vector_access(p, bytes, store)
#define LOMO_CROSS_BLOCK_MEMORY(t) ::lomo::emu::cross_block_tensor(t)
#define LOMO_DYNAMIC_SHARED(T, name) \
  T* name = reinterpret_cast<T*>(::lomo::emu::dynamic_shared_memory())
#define LOMO_SHARED(T, name, ...)                                                          \
  using lomo_shared_type_##name = T __VA_ARGS__;                                           \
  static char lomo_shared_tag_##name; /* identifies the declaration */                      \
  lomo_shared_type_##name& name = *static_cast<lomo_shared_type_##name*>(                  \
      ::lomo::emu::static_shared_memory(&lomo_shared_tag_##name,                           \
                                        sizeof(lomo_shared_type_##name),                   \
                                        alignof(lomo_shared_type_##name), sizeof(T), #name))
#define LOMO_BOUNDS(n) ::lomo::emu::check_launch_bounds(n)
#else
using Stream = cudaStream_t;
inline Stream current_stream() { return at::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
inline int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
inline void memset_async(void* p, int value, size_t bytes, Stream s) {
  C10_CUDA_CHECK(cudaMemsetAsync(p, value, bytes, s));
}
template <typename... P, typename... A>
void launch_kernel(const LaunchSite&, void (*kernel)(P...), dim3 grid, dim3 block,
                   size_t dynamic_smem, Stream stream, A&&... args) {
  kernel<<<grid, block, dynamic_smem, stream>>>(std::forward<A>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
__device__ __forceinline__ unsigned fresh_thread_index() {
  unsigned t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return t;
}
__device__ __forceinline__ int atomic_add_acq_rel(int* p, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;"
               : "=r"(old)
               : "l"(p), "r"(v)
               : "memory");
  return old;
}
#define LOMO_CHECK_DEVICE(op, x) CHECK_CUDA(op, x)
#define LOMO_CHECK_VECTOR_ACCESS(p, bytes, store) ((void)0)
#define LOMO_CROSS_BLOCK_MEMORY(t) ((void)0)
#define LOMO_DYNAMIC_SHARED(T, name)                                 \
  extern __shared__ __align__(16) unsigned char lomo_dynamic_smem[]; \
  T* name = reinterpret_cast<T*>(lomo_dynamic_smem)
#define LOMO_SHARED(T, name, ...) __shared__ T name __VA_ARGS__
#define LOMO_BOUNDS(n) ((void)0)
#endif

}  // namespace LOMO_CUDA_NS
}  // namespace lomo

#define LOMO_LAUNCH(...) \
  ::lomo::LOMO_CUDA_NS::launch_kernel(::lomo::LaunchSite{__FILE__, __LINE__, #__VA_ARGS__}, __VA_ARGS__)
