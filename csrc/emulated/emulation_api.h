// What the host side (op registration, Python bindings) sees of the SIMT emulator; plain C++, no
// CUDA keywords, so it can be included anywhere.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>
#include <utility>

namespace torch {
class Library;
}

namespace lomo {
namespace emu {

// Adds the emulated kernels (csrc/emulated/register.cpp) to `lib`, a CPU IMPL library of the
// namespace lomo_kernels_cuda_emulated.
void register_emulated_kernels(torch::Library& lib);

struct EmulationStats {
  int64_t launches, blocks, threads, switches;  // since the process started (launches: resettable)
  const char* fibers;                           // "asm" or "ucontext"
};

int64_t launch_count();
void reset_launch_count();
EmulationStats stats();

// The tensors an emulated op may touch, registered for the calling thread's launches: a 16-byte
// vector access that starts inside one of them and runs past its end, or falls elsewhere in its
// storage, fails.
class MemoryScope {
 public:
  MemoryScope(std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors);
  ~MemoryScope();
  void add(const char* name, const at::Tensor* t);  // one more (e.g. each tensor of a list)
  MemoryScope(const MemoryScope&) = delete;
  MemoryScope& operator=(const MemoryScope&) = delete;
};

}  // namespace emu
}  // namespace lomo
