// lomo_kernels._C: the native kernels for the ops that lomo_kernels/ops.py declares (the schemas
// live there, once; this module only adds CPU/CUDA implementations).
//
// Registration is a function, not a static TORCH_LIBRARY_IMPL: a static registration whose C++
// signature does not match the declared schema (an extension built from an older checkout) aborts
// the whole process at import. ops.py first compares contract_version() with its own, then calls
// register_kernels(), whose errors surface as Python exceptions.
#include <torch/extension.h>
#include <torch/library.h>

#include <memory>
#include <vector>

#include "ops.h"

namespace {

// Bump together with CONTRACT_VERSION in lomo_kernels/ops.py whenever a schema changes.
constexpr int64_t kContractVersion = 3;

std::vector<std::unique_ptr<torch::Library>>& libraries() {
  static std::vector<std::unique_ptr<torch::Library>> libs;  // alive for the process
  return libs;
}

std::unique_ptr<torch::Library> impl_library(c10::DispatchKey key) {
  return std::make_unique<torch::Library>(torch::Library::IMPL, "lomo_kernels", key, __FILE__,
                                          __LINE__);
}

void register_kernels() {
  if (!libraries().empty()) return;
  auto cpu = impl_library(c10::DispatchKey::CPU);
  cpu->impl("lomo_update_", &lomo::lomo_update_cpu);
  cpu->impl("adalomo_update_", &lomo::adalomo_update_cpu);
  cpu->impl("golore_update_", &lomo::golore_update_cpu);
  libraries().push_back(std::move(cpu));
#ifdef LOMO_KERNELS_WITH_CUDA
  auto cuda = impl_library(c10::DispatchKey::CUDA);
  cuda->impl("lomo_update_", &lomo::lomo_update_cuda);
  cuda->impl("adalomo_update_", &lomo::adalomo_update_cuda);
  cuda->impl("golore_update_", &lomo::golore_update_cuda);
  libraries().push_back(std::move(cuda));
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lomo_kernels native kernels (C++/OpenMP CPU, CUDA); ops via torch.ops.lomo_kernels";
  m.def("contract_version", [] { return kContractVersion; },
        "The version of the op schemas this build implements.");
  m.def("register_kernels", &register_kernels,
        "Register the CPU (and CUDA) kernels for the ops declared in lomo_kernels/ops.py.");
  m.def(
      "has_cuda",
      [] {
#ifdef LOMO_KERNELS_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the CUDA kernels were compiled into this build.");
}
