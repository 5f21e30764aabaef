// Scratch memory of the CPU kernels. With a caller's workspace (op contract: float32, 1-D,
// zero-filled once, reused for every call) the kernels carve their per-call scratch from it after
// the public header and allocate nothing; without one they allocate the same layout per call, so
// both give bitwise the same results. The layout functions run twice: with a counting Carver
// (base 0) for _C.workspace_numel, with a real one in the kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "checks.h"
#include "cpu/cpu_common.h"

namespace lomo {
namespace cpu {

constexpr int64_t kHeader = 4;  // sum(p*p), bad, sum(u*u), reserved (reference.WS_*)
constexpr int64_t kAlign = 64;  // every scratch array starts on its own cache line

// Bump allocator: each array starts at a 64-byte boundary and its size is rounded up to one, so
// a counted layout and a carved one differ only by the first alignment (kSlack covers it).
class Carver {
 public:
  explicit Carver(void* base = nullptr) : cur_(reinterpret_cast<uintptr_t>(base)), start_(cur_) {}
  template <class T>
  T* take(int64_t count) {
    cur_ = (cur_ + kAlign - 1) / kAlign * kAlign;
    T* p = reinterpret_cast<T*>(cur_);
    const uintptr_t bytes = static_cast<uintptr_t>(count) * sizeof(T);
    cur_ += (bytes + kAlign - 1) / kAlign * kAlign;
    return p;
  }
  int64_t bytes() const { return static_cast<int64_t>(cur_ - start_); }

 private:
  uintptr_t cur_, start_;
};

constexpr int64_t kSlack = kAlign / 4;  // float32 elements

// float32 elements for `header` public floats followed by `private_bytes` of scratch.
inline int64_t scratch_numel(int64_t header, int64_t private_bytes) {
  return header + (private_bytes + 3) / 4 + kSlack;
}

// The caller's workspace (checked) or a per-call buffer of `need` float32 elements.
class Scratch {
 public:
  Scratch(const char* op, const std::optional<at::Tensor>& ws, int64_t need) {
    if (ws.has_value()) {
      const at::Tensor& w = *ws;
      TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 1 &&
                      w.is_contiguous(),
                  op, ": workspace must be a contiguous 1-d float32 CPU tensor, got ",
                  w.scalar_type(), " ", w.sizes(), " on ", w.device());
      TORCH_CHECK(w.numel() >= need, op, ": workspace has ", w.numel(), " elements, needs ",
                  need, " (ops.workspace_numel)");
      data_ = w.data_ptr<float>();
    } else {
      owned_ = at::empty({need}, at::TensorOptions().dtype(at::kFloat));
      data_ = owned_.data_ptr<float>();
    }
  }
  float* header() const { return data_; }
  // Carves the private region that follows `header` public floats.
  Carver carver(int64_t header) const { return Carver(data_ + header); }

 private:
  float* data_ = nullptr;
  at::Tensor owned_;
};

// Per-unit partial sums of a pass, one cache line each (no false sharing between threads).
struct alignas(64) Slot {
  double pp;   // sum(p*p)
  double gsq;  // sum((g / loss_scale)**2)
  double uu;   // sum(u*u)
  uint32_t bad;
};

// Maps a global unit index of a multi-tensor call to its tensor: first[i] is the first unit of
// tensor i, first[k] the total.
inline int64_t tensor_of_unit(const int64_t* first, int64_t k, int64_t unit) {
  int64_t lo = 0, hi = k;  // first[lo] <= unit < first[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (first[mid] <= unit)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// fn(tensor i, unit within it) for every unit of k tensors, in one parallel loop.
template <class T, class Fn>
void parallel_tensor_units(const T* tensors, const int64_t* first, int64_t k, const Fn& fn) {
  parallel_units(first[k], [&](int64_t u) {
    const int64_t i = k == 1 ? 0 : tensor_of_unit(first, k, u);
    fn(tensors[i], u - first[i]);
  });
}

// The scratch of a call over k tensors of `units` units in all: per tensor its context T and
// first unit (multi-tensor calls; a single tensor keeps them on the stack), per unit a partial
// record U.
template <class T, class U>
struct TensorScratch {
  T* tensors = nullptr;
  int64_t* first = nullptr;
  U* parts = nullptr;
};

template <class T, class U>
TensorScratch<T, U> carve_tensors(Carver& cv, int64_t k, int64_t units, bool multi) {
  TensorScratch<T, U> s;
  if (multi) {
    s.tensors = cv.take<T>(k);
    s.first = cv.take<int64_t>(k + 1);
  }
  s.parts = cv.take<U>(units);
  return s;
}

inline int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

// The CPU kernels' float32 workspace elements for `shapes` (lomo_update.cpp,
// adalomo_update.cpp); `multi`: the multi-tensor op (the whole list in one call).
int64_t lomo_workspace_numel_cpu(const std::vector<std::vector<int64_t>>& shapes, bool multi);
int64_t adalomo_workspace_numel_cpu(const std::vector<std::vector<int64_t>>& shapes, bool multi);
int64_t grad_accumulate_workspace_numel_cpu(const std::vector<std::vector<int64_t>>& shapes);

}  // namespace cpu
}  // namespace lomo
