// The SIMT emulator's memory checks: static and dynamic shared memory of a block (poisoned, within
// the launch limits), 16-byte vector accesses (alignment and the bounds of the tensors an op
// registered with MemoryScope).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <unordered_map>

#include "emulated/emulation_api.h"
#include "emulated/emulator_internal.h"

namespace lomo {
namespace emu {
namespace detail {

thread_local std::vector<MemRange> tls_ranges;
thread_local std::vector<at::Tensor> tls_keep_alive;

namespace {
std::mutex opt_in_mutex;
std::unordered_map<const void*, size_t> opt_ins;  // kernel -> cudaFuncSetAttribute's bytes
}  // namespace

size_t max_dynamic_shared(const void* kernel) {
  std::lock_guard<std::mutex> lock(opt_in_mutex);
  const auto it = opt_ins.find(kernel);
  return it == opt_ins.end() ? 0 : it->second;
}

}  // namespace detail

using namespace detail;

void set_max_dynamic_shared(const void* kernel, size_t bytes) {
  TORCH_CHECK(bytes <= kMaxSharedOptIn, "cuda_emulated: cudaFuncSetAttribute: ", bytes,
              " bytes of dynamic shared memory exceed the ", kMaxSharedOptIn, " of a block");
  std::lock_guard<std::mutex> lock(opt_in_mutex);
  opt_ins[kernel] = bytes;
}

void check_vector_access(const void* p, size_t bytes, bool store) {
  BlockRun& r = *tls_run;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  char buf[256];
  if (a % bytes) {
    std::snprintf(buf, sizeof(buf), "misaligned %zu-byte vector %s at %p", bytes,
                  store ? "store" : "load", p);
    fail_here(r, buf);
  }
  // Inside a registered tensor: fine. Starting in one and running past its end, or elsewhere in
  // its storage: an error (on a GPU it reads or overwrites a neighbour without a fault).
  const MemRange* hit = nullptr;
  for (const MemRange& m : *r.L->ranges) {
    if (a >= m.view_lo && a + bytes <= m.view_hi) return;
    if ((a >= m.view_lo && a < m.view_hi) || (a >= m.storage_lo && a < m.storage_hi)) hit = &m;
  }
  if (hit) {
    const bool starts_inside = a >= hit->view_lo && a < hit->view_hi;
    std::snprintf(buf, sizeof(buf), "%zu-byte vector %s at %p %s outside tensor '%s' [%p, %p)%s",
                  bytes, store ? "store" : "load", p, starts_inside ? "runs" : "is", hit->name,
                  reinterpret_cast<void*>(hit->view_lo), reinterpret_cast<void*>(hit->view_hi),
                  starts_inside ? " past its end" : ", in its storage");
    fail_here(r, buf);
  }
}

void fail(const char* what) { fail_here(*tls_run, what); }

MemoryScope::MemoryScope(std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  tls_ranges.clear();
  tls_keep_alive.clear();
  for (const auto& [name, t] : ts) add(name, t);
}

void MemoryScope::add(const char* name, const at::Tensor* t) {
  if (!t || !t->defined() || !t->has_storage()) return;
  const auto* base = static_cast<const char*>(t->storage().data());
  const auto* data = static_cast<const char*>(t->data_ptr());
  tls_ranges.push_back({reinterpret_cast<uintptr_t>(base),
                        reinterpret_cast<uintptr_t>(base + t->storage().nbytes()),
                        reinterpret_cast<uintptr_t>(data),
                        reinterpret_cast<uintptr_t>(data + t->numel() * t->element_size()),
                        name, std::strcmp(name, "workspace") == 0});
}

MemoryScope::~MemoryScope() {
  tls_ranges.clear();
  tls_keep_alive.clear();
}

}  // namespace emu
}  // namespace lomo
